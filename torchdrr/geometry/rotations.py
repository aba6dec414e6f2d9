"""Rotation and rigid-pose parameterisations, to and from 3x3 rotation matrices.

Every function is batched over leading dimensions (``[..., 3]`` in, ``[..., 3, 3]`` out), works in float32 and
float64 on any device, and is differentiable with autograd. Angles are in radians, translations in mm.

Conventions:

* Rotation matrices act on column vectors: ``x' = R x``.
* Rotation vector (axis-angle): ``phi = angle * axis``; ``R = exp([phi]x)`` (Rodrigues). ``matrix_to_rotvec``
  returns angles in ``[0, pi]``.
* Unit quaternion: ``(w, x, y, z)``, scalar first, Hamilton product; ``q`` and ``-q`` are the same rotation, and
  outputs are canonicalised to ``w >= 0`` (at exactly ``w = 0``, a half-turn, either sign can come back).
  Inputs need not be normalised: they are divided by their norm.
* Euler angles (as in SciPy's ``Rotation.from_euler``): ``convention`` is three axis letters with no two
  consecutive letters equal (6 Tait-Bryan sequences such as ``"XYZ"`` and 6 proper ones such as ``"ZYZ"``).
  Uppercase letters are *intrinsic* rotations (about the axes of the frame as it rotates): ``"XYZ"`` with angles
  ``(a, b, c)`` is ``R = Rx(a) @ Ry(b) @ Rz(c)``. Lowercase letters are *extrinsic* rotations (about the fixed
  axes): ``"xyz"`` is ``R = Rz(c) @ Ry(b) @ Rx(a)``. ``Ri(angle)`` is the right-handed rotation about axis ``i``.
  ``matrix_to_euler`` returns the first and third angle in ``[-pi, pi]`` and the middle one in ``[-pi/2, pi/2]``
  (Tait-Bryan) or ``[0, pi]`` (proper); at gimbal lock it returns the solution whose third angle is 0.
* 6D (Zhou et al., CVPR 2019): the first two *columns* of R, concatenated: ``(R[:, 0], R[:, 1])``, ``[..., 6]``.
  Back to R by Gram-Schmidt; the two 3-vectors must be nonzero and not parallel.
* SE(3): a 4x4 homogeneous matrix ``T = [[R, t], [0, 1]]`` and its logarithm, the twist
  ``xi = (rho, phi)``, ``[..., 6]``: translation part ``rho`` (mm) FIRST, rotation vector ``phi`` (rad) second, with
  ``T = exp(xi)``, ``R = exp([phi]x)`` and ``t = V(phi) rho`` (``rho`` equals ``t`` only when ``phi = 0``).

Angles below 1 rad use Taylor series (so values and gradients stay finite and accurate at angle 0), and the matrix to
quaternion/rotation-vector conversion picks the best-conditioned of four formulas (Shepperd's method), so angles
near pi are as accurate as others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EULER_CONVENTIONS",
    "POSE_PARAMETERIZATIONS",
    "euler_to_matrix",
    "extrinsics_to_pose",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "matrix_to_rotvec",
    "pose_to_extrinsics",
    "quaternion_to_matrix",
    "quaternion_to_rotvec",
    "rotation_6d_to_matrix",
    "rotvec_to_matrix",
    "rotvec_to_quaternion",
    "se3_exp",
    "se3_log",
    "skew",
]

#: The 12 Euler sequences, as intrinsic (uppercase) names; each also exists in lowercase (extrinsic).
EULER_CONVENTIONS: tuple[str, ...] = (
    "XYZ",
    "XZY",
    "YXZ",
    "YZX",
    "ZXY",
    "ZYX",
    "XYX",
    "XZX",
    "YXY",
    "YZY",
    "ZXZ",
    "ZYZ",
)

#: Names accepted by ``pose_to_extrinsics`` and ``extrinsics_to_pose``.
POSE_PARAMETERIZATIONS: tuple[str, ...] = ("matrix", "rotvec", "quaternion", "euler", "6d", "se3")

_AXIS_INDEX = {"X": 0, "Y": 1, "Z": 2}


# ----------------------------------------------------------------------------------------------------- validation


def _check_tensor(name: str, value: object, trailing: tuple[int, ...], check_finite: bool = True) -> Tensor:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite floating tensor ending in ``trailing``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < len(trailing) or tuple(value.shape[value.dim() - len(trailing) :]) != trailing:
        expected = "[..., " + ", ".join(str(n) for n in trailing) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if check_finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, but it holds NaN or infinite values")
    return value


#: Below this angle (rad) the coefficients come from their Taylor series, above it from the closed forms. The
#: closed form of ``(a - sin a) / a^3`` loses ``log10(6 / a^2)`` digits to cancellation, under one digit at a = 1;
#: the series, summed to ``a^18``, is accurate to rounding there.
_SERIES_LIMIT = 1.0
_SERIES_TERMS = 10


def _alternating_series(x: Tensor, first_denominator: int) -> Tensor:
    """``sum_{n < _SERIES_TERMS} (-1)^n x^n / (2n + d)!`` for ``d = first_denominator``, by Horner's rule.

    With ``x = a^2``: ``d = 1`` gives ``sin(a)/a``, ``d = 2`` ``(1 - cos a)/a^2`` and ``d = 3`` ``(a - sin a)/a^3``.
    """
    result = torch.zeros_like(x)
    for n in reversed(range(_SERIES_TERMS)):
        result = 1.0 / math.factorial(2 * n + first_denominator) - x * result
    return result


def _rotation_coefficients(angle_squared: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sin(a)/a``, ``(1 - cos a)/a^2`` and ``(a - sin a)/a^3`` for ``a^2 = angle_squared``, all finite at 0.

    The branches are computed on a "safe" input (1 where not used) so that neither branch produces NaN or infinite
    gradients that ``torch.where`` would multiply by zero and turn into NaN.
    """
    small = angle_squared < _SERIES_LIMIT**2
    # Closed forms on angles >= _SERIES_LIMIT only; 4 stands in elsewhere (any value in range would do).
    safe_squared = torch.where(small, torch.full_like(angle_squared, 4.0), angle_squared)
    angle = torch.sqrt(safe_squared)
    sin = torch.sin(angle)
    sinc = sin / angle
    # 1 - cos a = 2 sin^2(a/2): no cancellation for small a.
    one_minus_cos = 2 * torch.sin(angle / 2) ** 2 / safe_squared
    angle_minus_sin = (angle - sin) / (safe_squared * angle)
    x = torch.where(small, angle_squared, torch.zeros_like(angle_squared))
    return (
        torch.where(small, _alternating_series(x, 1), sinc),
        torch.where(small, _alternating_series(x, 2), one_minus_cos),
        torch.where(small, _alternating_series(x, 3), angle_minus_sin),
    )


def skew(vector: Tensor) -> Tensor:
    """The cross-product matrix ``[v]x`` (``[v]x w = v x w``): ``[..., 3]`` -> ``[..., 3, 3]``."""
    x, y, z = vector.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )


# ------------------------------------------------------------------------------------------- rotation vector


def rotvec_to_matrix(rotvec: Tensor, check_finite: bool = True) -> Tensor:
    """Rodrigues' formula: rotation vector ``[..., 3]`` (axis * angle, rad) -> rotation matrix ``[..., 3, 3]``.

    ``check_finite=False`` skips the finiteness check, which reads a value back from the device (e.g. inside a CUDA
    graph, for inputs checked beforehand)."""
    _check_tensor("rotvec", rotvec, (3,), check_finite)
    sinc, one_minus_cos, _ = _rotation_coefficients((rotvec**2).sum(-1))
    cross = skew(rotvec)
    identity = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return identity + sinc[..., None, None] * cross + one_minus_cos[..., None, None] * (cross @ cross)


def rotvec_to_quaternion(rotvec: Tensor) -> Tensor:
    """Rotation vector ``[..., 3]`` (rad) -> unit quaternion ``[..., 4]`` ``(w, x, y, z)`` with ``w >= 0``."""
    _check_tensor("rotvec", rotvec, (3,))
    angle_squared = (rotvec**2).sum(-1)
    # No cancellation in sin(a/2)/a or cos(a/2): the series only avoids 0 / 0 at a = 0; below 1e-3 rad their
    # a^6 truncation error is below float64 rounding.
    small = angle_squared < 1e-6
    safe_squared = torch.where(small, torch.ones_like(angle_squared), angle_squared)
    angle = torch.sqrt(safe_squared)
    x = torch.where(small, angle_squared, torch.zeros_like(angle_squared))
    # sin(a/2)/a = 1/2 - a^2/48 + a^4/3840 - ...; cos(a/2) = 1 - a^2/8 + a^4/384 - ...
    half_sinc = torch.where(small, 0.5 - x / 48 * (1 - x / 80), torch.sin(angle / 2) / angle)
    cos_half = torch.where(small, 1 - x / 8 * (1 - x / 48), torch.cos(angle / 2))
    quaternion = torch.cat([cos_half[..., None], half_sinc[..., None] * rotvec], -1)
    return _canonical_quaternion(quaternion)


def quaternion_to_rotvec(quaternion: Tensor) -> Tensor:
    """Quaternion ``[..., 4]`` ``(w, x, y, z)`` (any norm > 0) -> rotation vector ``[..., 3]``, angle in [0, pi]."""
    _check_tensor("quaternion", quaternion, (4,))
    quaternion = _canonical_quaternion(quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True))
    w, vector = quaternion[..., 0], quaternion[..., 1:]
    sin_half_squared = (vector**2).sum(-1)
    # 2 atan2(s, w) / s has no cancellation, so the series is only needed to avoid 0 / 0 (and its gradient) at
    # s = 0; s < 1e-3 keeps the truncation error (s / w)^6 / 7 below float64 rounding.
    small = sin_half_squared < 1e-6
    safe_squared = torch.where(small, torch.ones_like(sin_half_squared), sin_half_squared)
    sin_half = torch.sqrt(safe_squared)
    # angle / sin(angle/2) = 2 atan2(s, w) / s; atan2 keeps full precision near pi, where w -> 0.
    scale = 2 * torch.atan2(sin_half, w) / sin_half
    # Series of 2 atan(x) / s with x = s / w (w ~ 1 there): (2 / w) (1 - x^2 / 3 + x^4 / 5).
    safe_w = torch.where(small, w, torch.ones_like(w))
    x = torch.where(small, sin_half_squared, torch.zeros_like(sin_half_squared)) / safe_w**2
    scale_series = 2 / safe_w * (1 - x / 3 + x**2 / 5)
    return torch.where(small, scale_series, scale)[..., None] * vector


def matrix_to_rotvec(matrix: Tensor) -> Tensor:
    """Rotation matrix ``[..., 3, 3]`` -> rotation vector ``[..., 3]`` with angle in ``[0, pi]`` (rad).

    Goes through the quaternion (Shepperd's method), which stays accurate near angle pi where ``(R - R^T) / 2``
    vanishes. At exactly pi both ``phi`` and ``-phi`` are valid; either may come back.
    """
    return quaternion_to_rotvec(matrix_to_quaternion(matrix))


# ------------------------------------------------------------------------------------------------ quaternion


def _canonical_quaternion(quaternion: Tensor) -> Tensor:
    """Flip ``q`` to ``-q`` where ``w < 0`` (same rotation)."""
    sign = torch.where(quaternion[..., :1] < 0, -1.0, 1.0).to(quaternion.dtype)
    return quaternion * sign


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """Quaternion ``[..., 4]`` ``(w, x, y, z)`` (normalised here; norm must be > 0) -> rotation ``[..., 3, 3]``."""
    _check_tensor("quaternion", quaternion, (4,))
    norm = torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("quaternion must have a nonzero norm")
    w, x, y, z = (quaternion / norm).unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """Rotation matrix ``[..., 3, 3]`` -> unit quaternion ``[..., 4]`` ``(w, x, y, z)``, ``w >= 0``.

    Shepperd's method: of the four formulas (each divides by one of ``|w|, |x|, |y|, |z|``), use the one with the
    largest divisor, which is at least 1/2, so every rotation, including half-turns, is well conditioned.
    The input is assumed to be a rotation (orthonormal, det +1); it is not checked.
    """
    _check_tensor("matrix", matrix, (3, 3))
    m = matrix
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4 w^2, 4 x^2, 4 y^2, 4 z^2: they sum to 4, so the largest is >= 1.
    four_squares = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    # Clamped so that the unselected branches (possibly sqrt(0)) give finite gradients, not 0 * inf = NaN.
    twice_component = torch.sqrt(four_squares.clamp_min(0.1))  # 2|w|, 2|x|, 2|y|, 2|z|
    # Each row is 2 * component * (w, x, y, z) for the branch that takes that component from the diagonal.
    candidates = torch.stack(
        [
            torch.stack([four_squares[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, four_squares[..., 1], m01 + m10, m02 + m20], -1),
            torch.stack([m02 - m20, m01 + m10, four_squares[..., 2], m12 + m21], -1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, four_squares[..., 3]], -1),
        ],
        -2,
    ) / (2 * twice_component[..., None])
    best = four_squares.argmax(-1)
    index = best[..., None, None].expand(*best.shape, 1, 4)
    quaternion = torch.gather(candidates, -2, index).squeeze(-2)
    # Renormalise: absorbs rounding and mild non-orthogonality of the input.
    quaternion = quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)
    return _canonical_quaternion(quaternion)


# ---------------------------------------------------------------------------------------------------- Euler


def _parse_euler_convention(convention: object) -> tuple[tuple[int, int, int], bool]:
    """``"XYZ"`` -> ((0, 1, 2), intrinsic=True); raises ValueError for anything that is not one of the 24 names."""
    if (
        not isinstance(convention, str)
        or len(convention) != 3
        or not (convention.isupper() or convention.islower())
        or convention.upper() not in EULER_CONVENTIONS
    ):
        raise ValueError(
            f"convention must be one of {EULER_CONVENTIONS} (intrinsic) or their lowercase (extrinsic), "
            f"got {convention!r}"
        )
    axes = tuple(_AXIS_INDEX[letter] for letter in convention.upper())
    return axes, convention.isupper()  # type: ignore[return-value]


def _elementary_rotation(axis: int, angle: Tensor) -> Tensor:
    """Right-handed rotation by ``angle`` ``[...]`` (rad) about coordinate axis ``axis`` -> ``[..., 3, 3]``."""
    cos, sin, one, zero = torch.cos(angle), torch.sin(angle), torch.ones_like(angle), torch.zeros_like(angle)
    if axis == 0:
        rows = [[one, zero, zero], [zero, cos, -sin], [zero, sin, cos]]
    elif axis == 1:
        rows = [[cos, zero, sin], [zero, one, zero], [-sin, zero, cos]]
    else:
        rows = [[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def euler_to_matrix(angles: Tensor, convention: str) -> Tensor:
    """Euler angles ``[..., 3]`` (rad) -> rotation matrix ``[..., 3, 3]``.

    Args:
        angles: the three angles, in the order of the letters of ``convention``.
        convention: e.g. ``"ZYX"`` (intrinsic: ``Rz(a) @ Ry(b) @ Rx(c)``) or ``"zyx"`` (extrinsic:
            ``Rx(c) @ Ry(b) @ Rz(a)``); see the module docstring.
    """
    axes, intrinsic = _parse_euler_convention(convention)
    _check_tensor("angles", angles, (3,))
    first, second, third = (
        _elementary_rotation(axis, angle) for axis, angle in zip(axes, angles.unbind(-1), strict=True)
    )
    return first @ second @ third if intrinsic else third @ second @ first


def _intrinsic_matrix_to_euler(matrix: Tensor, axes: tuple[int, int, int]) -> Tensor:
    """Angles ``[..., 3]`` of ``R = R_i(a) R_j(b) R_k(c)`` for the intrinsic sequence ``axes = (i, j, k)``."""
    i, j, k = axes
    proper = i == k
    other = 3 - i - j  # the axis that is neither i nor j
    # +1 when (i, j, other) is a cyclic permutation of (x, y, z), which fixes the signs of the off-diagonal terms.
    parity = 1.0 if (j - i) % 3 == 1 else -1.0
    m = matrix
    if proper:
        # R[i, i] = cos b and (R[i, j], R[i, other]) = sin b (sin c, parity cos c).
        sin_middle = torch.sqrt(m[..., i, j] ** 2 + m[..., i, other] ** 2)
        middle = torch.atan2(sin_middle, m[..., i, i])
        first = torch.atan2(m[..., j, i], -parity * m[..., other, i])
        third = torch.atan2(m[..., i, j], parity * m[..., i, other])
        degenerate_measure = sin_middle
    else:
        # R[i, k] = parity sin b, (R[i, i], R[i, j]) = cos b (cos c, -parity sin c).
        cos_middle = torch.sqrt(m[..., i, i] ** 2 + m[..., i, j] ** 2)
        middle = torch.atan2(parity * m[..., i, k], cos_middle)
        first = torch.atan2(-parity * m[..., j, k], m[..., k, k])
        third = torch.atan2(-parity * m[..., i, j], m[..., i, i])
        degenerate_measure = cos_middle
    # Gimbal lock: the first and third axes coincide, only their sum (or difference) is defined. Choose third = 0;
    # then column j of R is R_i(first) e_j, whatever the middle angle, which gives the first angle. The threshold
    # sqrt(eps) balances the rounding error of the general formulas (~eps / measure) against the error of forcing
    # third = 0 (~measure).
    locked = degenerate_measure < math.sqrt(torch.finfo(matrix.dtype).eps)
    first_locked = torch.atan2(parity * m[..., other, j], m[..., j, j])
    first = torch.where(locked, first_locked, first)
    third = torch.where(locked, torch.zeros_like(third), third)
    return torch.stack([first, middle, third], -1)


def matrix_to_euler(matrix: Tensor, convention: str) -> Tensor:
    """Rotation matrix ``[..., 3, 3]`` -> Euler angles ``[..., 3]`` (rad) in the order of ``convention``'s letters.

    Ranges: first and third angle in ``[-pi, pi]``; middle in ``[-pi/2, pi/2]`` (Tait-Bryan) or ``[0, pi]``
    (proper Euler). At gimbal lock (middle angle at +-pi/2, or 0 / pi for proper sequences) the third angle is set
    to 0 and the first absorbs the whole rotation about the locked axis; the result still reproduces ``matrix``.
    Differentiable away from gimbal lock; at it the angles are not a smooth function of R and gradients are not
    meaningful (they may be NaN or infinite).
    """
    axes, intrinsic = _parse_euler_convention(convention)
    _check_tensor("matrix", matrix, (3, 3))
    if intrinsic:
        return _intrinsic_matrix_to_euler(matrix, axes)
    # Extrinsic (i, j, k) with angles (a, b, c) is R_k(c) R_j(b) R_i(a): the intrinsic sequence (k, j, i) with
    # angles (c, b, a).
    reversed_angles = _intrinsic_matrix_to_euler(matrix, axes[::-1])
    return reversed_angles.flip(-1)


# ------------------------------------------------------------------------------------------------------- 6D


def rotation_6d_to_matrix(rotation_6d: Tensor) -> Tensor:
    """6D representation ``[..., 6]`` (two 3-vectors, not parallel) -> rotation ``[..., 3, 3]`` by Gram-Schmidt.

    Column 0 of R is the first vector normalised, column 1 the second made orthogonal to it and normalised, column
    2 their cross product (Zhou et al. 2019).
    """
    _check_tensor("rotation_6d", rotation_6d, (6,))
    first, second = rotation_6d[..., :3], rotation_6d[..., 3:]
    column0 = first / torch.linalg.vector_norm(first, dim=-1, keepdim=True)
    second_orthogonal = second - (column0 * second).sum(-1, keepdim=True) * column0
    column1 = second_orthogonal / torch.linalg.vector_norm(second_orthogonal, dim=-1, keepdim=True)
    column2 = torch.linalg.cross(column0, column1, dim=-1)
    matrix = torch.stack([column0, column1, column2], -1)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("rotation_6d must hold two nonzero, non-parallel 3-vectors")
    return matrix


def matrix_to_rotation_6d(matrix: Tensor) -> Tensor:
    """Rotation ``[..., 3, 3]`` -> its first two columns concatenated, ``[..., 6]``."""
    _check_tensor("matrix", matrix, (3, 3))
    return torch.cat([matrix[..., :, 0], matrix[..., :, 1]], -1)


# ------------------------------------------------------------------------------------------------------ SE(3)


def se3_exp(twist: Tensor) -> Tensor:
    """Exponential map: twist ``[..., 6]`` = ``(rho (mm), phi (rad))`` -> homogeneous transform ``[..., 4, 4]``.

    ``R = exp([phi]x)``, ``t = V rho`` with ``V = I + (1 - cos a)/a^2 [phi]x + (a - sin a)/a^3 [phi]x^2``,
    ``a = |phi|``.
    """
    _check_tensor("twist", twist, (6,))
    rho, phi = twist[..., :3], twist[..., 3:]
    sinc, one_minus_cos, angle_minus_sin = _rotation_coefficients((phi**2).sum(-1))
    cross = skew(phi)
    cross_squared = cross @ cross
    identity = torch.eye(3, dtype=twist.dtype, device=twist.device)
    rotation = identity + sinc[..., None, None] * cross + one_minus_cos[..., None, None] * cross_squared
    left_jacobian = identity + one_minus_cos[..., None, None] * cross + angle_minus_sin[..., None, None] * cross_squared
    translation = (left_jacobian @ rho[..., None]).squeeze(-1)
    return _homogeneous(rotation, translation)


def se3_log(transform: Tensor) -> Tensor:
    """Logarithm map: ``[..., 4, 4]`` (or ``[..., 3, 4]``) rigid transform -> twist ``[..., 6]`` ``(rho, phi)``.

    The rotation angle ``|phi|`` is in ``[0, pi]``; ``rho = V(phi)^-1 t``. The bottom row of a 4x4 input is not
    read.
    """
    if isinstance(transform, Tensor) and transform.shape[-2:] == (3, 4):
        _check_tensor("transform", transform, (3, 4))
    else:
        _check_tensor("transform", transform, (4, 4))
    rotation, translation = transform[..., :3, :3], transform[..., :3, 3]
    phi = matrix_to_rotvec(rotation)
    _, one_minus_cos, angle_minus_sin = _rotation_coefficients((phi**2).sum(-1))
    cross = skew(phi)
    identity = torch.eye(3, dtype=transform.dtype, device=transform.device)
    left_jacobian = (
        identity + one_minus_cos[..., None, None] * cross + angle_minus_sin[..., None, None] * (cross @ cross)
    )
    # V is well conditioned for angles in [0, pi] (its singular values are >= 2 / pi).
    rho = torch.linalg.solve(left_jacobian, translation[..., None]).squeeze(-1)
    return torch.cat([rho, phi], -1)


def _homogeneous(rotation: Tensor, translation: Tensor) -> Tensor:
    """``[[R, t], [0, 0, 0, 1]]`` ``[..., 4, 4]`` from ``R`` ``[..., 3, 3]`` and ``t`` ``[..., 3]``."""
    top = torch.cat([rotation, translation[..., None]], -1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], -2)


# -------------------------------------------------------------------------------------------------------- pose

_ROTATION_SIZES = {"rotvec": 3, "quaternion": 4, "euler": 3, "6d": 6, "se3": 3}


def pose_to_extrinsics(params: Tensor, parameterization: str, convention: str | None = None) -> tuple[Tensor, Tensor]:
    """World -> camera extrinsics ``(R [..., 3, 3], t [..., 3] mm)`` from a pose vector, for DRR optimisation.

    Layout of ``params`` (translation FIRST, then the rotation parameters):

    * ``"matrix"``: ``[..., 4, 4]`` or ``[..., 3, 4]`` ``[R | t]`` (R is taken as is).
    * ``"rotvec"``: ``[..., 6]`` ``(t, rotation vector)``.
    * ``"quaternion"``: ``[..., 7]`` ``(t, w, x, y, z)`` (quaternion normalised here).
    * ``"euler"``: ``[..., 6]`` ``(t, angles)``; ``convention`` (e.g. ``"ZYX"``) is required.
    * ``"6d"``: ``[..., 9]`` ``(t, first column of R, second column of R)``.
    * ``"se3"``: ``[..., 6]`` twist ``(rho, phi)``; ``[R | t] = se3_exp(params)``, so ``t = V(phi) rho``.

    Angles in radians, translations in mm; differentiable in ``params``.
    """
    if parameterization not in POSE_PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {POSE_PARAMETERIZATIONS}, got {parameterization!r}")
    if convention is not None and parameterization != "euler":
        raise ValueError(f"convention is only used with parameterization='euler', got {convention!r}")
    if parameterization == "matrix":
        if isinstance(params, Tensor) and params.shape[-2:] == (3, 4):
            _check_tensor("params", params, (3, 4))
        else:
            _check_tensor("params", params, (4, 4))
        return params[..., :3, :3], params[..., :3, 3]
    _check_tensor("params", params, (3 + _ROTATION_SIZES[parameterization],))
    if parameterization == "se3":
        transform = se3_exp(params)
        return transform[..., :3, :3], transform[..., :3, 3]
    translation, rotation_params = params[..., :3], params[..., 3:]
    if parameterization == "rotvec":
        rotation = rotvec_to_matrix(rotation_params)
    elif parameterization == "quaternion":
        rotation = quaternion_to_matrix(rotation_params)
    elif parameterization == "euler":
        if convention is None:
            raise ValueError("convention is required with parameterization='euler' (e.g. 'ZYX')")
        rotation = euler_to_matrix(rotation_params, convention)
    else:
        rotation = rotation_6d_to_matrix(rotation_params)
    return rotation, translation


def extrinsics_to_pose(
    rotation: Tensor, translation: Tensor, parameterization: str, convention: str | None = None
) -> Tensor:
    """Inverse of ``pose_to_extrinsics``: ``R [..., 3, 3]``, ``t [..., 3]`` (mm) -> pose vector (same layouts)."""
    if parameterization not in POSE_PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {POSE_PARAMETERIZATIONS}, got {parameterization!r}")
    if convention is not None and parameterization != "euler":
        raise ValueError(f"convention is only used with parameterization='euler', got {convention!r}")
    _check_tensor("rotation", rotation, (3, 3))
    _check_tensor("translation", translation, (3,))
    batch = torch.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1])
    rotation, translation = rotation.expand(*batch, 3, 3), translation.expand(*batch, 3)
    if parameterization == "matrix":
        return _homogeneous(rotation, translation)
    if parameterization == "se3":
        return se3_log(_homogeneous(rotation, translation))
    if parameterization == "rotvec":
        rotation_params = matrix_to_rotvec(rotation)
    elif parameterization == "quaternion":
        rotation_params = matrix_to_quaternion(rotation)
    elif parameterization == "euler":
        if convention is None:
            raise ValueError("convention is required with parameterization='euler' (e.g. 'ZYX')")
        rotation_params = matrix_to_euler(rotation, convention)
    else:
        rotation_params = matrix_to_rotation_6d(rotation)
    return torch.cat([translation, rotation_params], -1)

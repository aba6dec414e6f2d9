"""Rotation and pose parameterisations: round trips, independent constructions, gradients and bad input."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch

from torchdrr.geometry.rotations import (
    _SERIES_LIMIT,
    EULER_CONVENTIONS,
    POSE_PARAMETERIZATIONS,
    _rotation_coefficients,
    euler_to_matrix,
    extrinsics_to_pose,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    matrix_to_rotvec,
    pose_to_extrinsics,
    quaternion_to_matrix,
    quaternion_to_rotvec,
    rotation_6d_to_matrix,
    rotvec_to_matrix,
    rotvec_to_quaternion,
    se3_exp,
    se3_log,
    skew,
)

F64 = torch.float64
ALL_EULER = [*EULER_CONVENTIONS, *(name.lower() for name in EULER_CONVENTIONS)]


def random_rotations(count: int, seed: int = 0) -> torch.Tensor:
    """Haar-ish random rotations from the QR of Gaussian matrices: independent of the code under test."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(count, 3, 3, generator=generator, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q * torch.sign(torch.linalg.det(q))[..., None, None]  # flip to det +1


def rotvecs_with_delicate_angles(seed: int = 1) -> torch.Tensor:
    """Random axes with angles spread over (0, pi) plus angles near 0 and near pi, ``[N, 3]``."""
    generator = torch.Generator().manual_seed(seed)
    delicate = torch.tensor([0.0, 1e-12, 1e-8, 1e-5, 1e-3, 9.9e-3, 1.01e-2, 0.5, math.pi - 1e-3, math.pi - 1e-6])
    angles = torch.cat([delicate, torch.rand(40, generator=generator) * math.pi]).to(F64)
    axes = torch.nn.functional.normalize(torch.randn(angles.numel(), 3, generator=generator, dtype=F64), dim=-1)
    return axes * angles[:, None]


def elementary(axis: str, angle: float) -> torch.Tensor:
    """A right-handed rotation about a named axis, written out by hand for the independent Euler check."""
    c, s = math.cos(angle), math.sin(angle)
    matrices = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }
    return torch.tensor(matrices[axis.lower()], dtype=F64)


def hamilton_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quaternion product ``p q`` for ``(w, x, y, z)``: the rotation ``q`` then ``p``."""
    pw, pv = p[..., 0], p[..., 1:]
    qw, qv = q[..., 0], q[..., 1:]
    w = pw * qw - (pv * qv).sum(-1)
    vector = pw[..., None] * qv + qw[..., None] * pv + torch.linalg.cross(pv, qv, dim=-1)
    return torch.cat([w[..., None], vector], -1)


def assert_rotation(matrix: torch.Tensor, atol: float = 1e-12) -> None:
    identity = torch.eye(3, dtype=matrix.dtype).expand_as(matrix)
    torch.testing.assert_close(matrix @ matrix.transpose(-1, -2), identity, atol=atol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(matrix), torch.ones(matrix.shape[:-2], dtype=matrix.dtype))


# ------------------------------------------------------------------------------------------- rotation vector


def test_rotvec_to_matrix_matches_matrix_exponential():
    rotvecs = rotvecs_with_delicate_angles()
    expected = torch.linalg.matrix_exp(skew(rotvecs))
    torch.testing.assert_close(rotvec_to_matrix(rotvecs), expected, atol=1e-14, rtol=0)


def test_rotvec_round_trips_including_near_zero_and_near_pi():
    rotvecs = rotvecs_with_delicate_angles()
    torch.testing.assert_close(matrix_to_rotvec(rotvec_to_matrix(rotvecs)), rotvecs, atol=1e-14, rtol=1e-12)
    matrices = random_rotations(64)
    torch.testing.assert_close(rotvec_to_matrix(matrix_to_rotvec(matrices)), matrices, atol=1e-13, rtol=0)


def test_matrix_to_rotvec_at_exactly_pi_returns_a_half_turn():
    axes = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 2, 3], [-1, 1, 0.5]], dtype=F64))
    matrices = rotvec_to_matrix(math.pi * axes)
    rotvecs = matrix_to_rotvec(matrices)
    torch.testing.assert_close(torch.linalg.vector_norm(rotvecs, dim=-1), torch.full((4,), math.pi, dtype=F64))
    torch.testing.assert_close(rotvec_to_matrix(rotvecs), matrices, atol=1e-14, rtol=0)


def reference_coefficients(angle: float) -> tuple[float, float, float]:
    """sin(a)/a, (1 - cos a)/a^2, (a - sin a)/a^3 summed from their series in 40-digit decimals."""
    getcontext().prec = 40
    a2 = Decimal(angle) ** 2
    sums = [Decimal(0), Decimal(0), Decimal(0)]
    term = Decimal(1)  # a^(2n) / (2n + 1)!, then shifted per series
    for n in range(30):
        sign = -1 if n % 2 else 1
        sums[0] += sign * term  # sum (-1)^n a^2n / (2n+1)!
        sums[1] += sign * term / (2 * n + 2)  # sum (-1)^n a^2n / (2n+2)!
        sums[2] += sign * term / ((2 * n + 2) * (2 * n + 3))  # sum (-1)^n a^2n / (2n+3)!
        term = term * a2 / ((2 * n + 2) * (2 * n + 3))
    return float(sums[0]), float(sums[1]), float(sums[2])


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-15), (torch.float32, 5e-7)])
def test_small_angle_series_match_high_precision_values_on_both_sides_of_the_switch(dtype, rtol):
    limit = _SERIES_LIMIT
    angles = [0.0, 1e-8, 1e-4, 1e-2, 0.3, 0.999 * limit, 1.001 * limit, 2.0, 3.0, math.pi - 1e-6]
    computed = _rotation_coefficients(torch.tensor(angles, dtype=dtype) ** 2)
    # Reference from the dtype-rounded angle, so that only the coefficient functions are compared.
    reference = torch.tensor([reference_coefficients(float(torch.tensor(a, dtype=dtype))) for a in angles], dtype=F64)
    for index in range(3):
        torch.testing.assert_close(computed[index].double(), reference[:, index], atol=0, rtol=rtol)


def test_rotvec_float32_round_trip_near_zero():
    rotvecs = rotvecs_with_delicate_angles()[:20].float()
    matrices = rotvec_to_matrix(rotvecs)
    assert matrices.dtype == torch.float32
    torch.testing.assert_close(matrix_to_rotvec(matrices), rotvecs, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ quaternion


def test_quaternion_matches_axis_angle_and_composes_like_matrices():
    rotvecs = rotvecs_with_delicate_angles()
    angles = torch.linalg.vector_norm(rotvecs, dim=-1, keepdim=True)
    axes = torch.where(angles > 0, rotvecs / angles.clamp_min(1e-300), torch.tensor([1.0, 0, 0], dtype=F64))
    expected = torch.cat([torch.cos(angles / 2), torch.sin(angles / 2) * axes], -1)  # w >= 0 for angles <= pi
    torch.testing.assert_close(rotvec_to_quaternion(rotvecs), expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(quaternion_to_rotvec(expected), rotvecs, atol=1e-15, rtol=1e-13)
    # Composition: R(p q) = R(p) R(q).
    p, q = expected[:25], expected[25:50]
    torch.testing.assert_close(
        quaternion_to_matrix(hamilton_product(p, q)), quaternion_to_matrix(p) @ quaternion_to_matrix(q)
    )


def test_quaternion_round_trips_and_canonical_sign():
    matrices = random_rotations(64, seed=3)
    quaternions = matrix_to_quaternion(matrices)
    assert bool((quaternions[:, 0] >= 0).all())
    torch.testing.assert_close(torch.linalg.vector_norm(quaternions, dim=-1), torch.ones(64, dtype=F64))
    torch.testing.assert_close(quaternion_to_matrix(quaternions), matrices, atol=1e-14, rtol=0)
    # Unnormalised input of either sign maps to the same rotation and back to the canonical quaternion.
    torch.testing.assert_close(quaternion_to_matrix(-3.5 * quaternions), matrices, atol=1e-14, rtol=0)
    torch.testing.assert_close(matrix_to_quaternion(quaternion_to_matrix(-quaternions)), quaternions)


def test_matrix_to_quaternion_near_pi_uses_a_well_conditioned_branch():
    rotvecs = rotvecs_with_delicate_angles()[-2:]  # pi - 1e-3, pi - 1e-6
    extra = torch.nn.functional.normalize(torch.tensor([[0.3, -0.2, 0.9]], dtype=F64)) * (math.pi - 1e-9)
    rotvecs = torch.cat([rotvecs, extra])
    quaternions = matrix_to_quaternion(rotvec_to_matrix(rotvecs))
    torch.testing.assert_close(quaternions, rotvec_to_quaternion(rotvecs), atol=1e-13, rtol=0)


# ---------------------------------------------------------------------------------------------------- Euler


@pytest.mark.parametrize("convention", ALL_EULER)
def test_euler_to_matrix_matches_composed_elementary_rotations(convention):
    generator = torch.Generator().manual_seed(7)
    angles = (torch.rand(4, 3, generator=generator, dtype=F64) - 0.5) * 2 * math.pi
    for row in angles:
        first, second, third = (elementary(axis, float(angle)) for axis, angle in zip(convention, row, strict=True))
        # Intrinsic: each rotation is about the already rotated axes, so they multiply on the right.
        expected = first @ second @ third if convention.isupper() else third @ second @ first
        torch.testing.assert_close(euler_to_matrix(row, convention), expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("convention", ALL_EULER)
def test_euler_round_trips_including_gimbal_lock(convention):
    matrices = random_rotations(32, seed=11)
    torch.testing.assert_close(
        euler_to_matrix(matrix_to_euler(matrices, convention), convention), matrices, atol=1e-13, rtol=0
    )
    # Angles inside the canonical ranges come back unchanged.
    proper = convention[0].lower() == convention[2].lower()
    generator = torch.Generator().manual_seed(13)
    outer = (torch.rand(16, 2, generator=generator, dtype=F64) - 0.5) * 2 * (math.pi - 1e-3)
    middle = torch.rand(16, generator=generator, dtype=F64) * (math.pi - 2e-3) + 1e-3
    middle = middle if proper else middle - math.pi / 2
    angles = torch.stack([outer[:, 0], middle, outer[:, 1]], -1)
    torch.testing.assert_close(
        matrix_to_euler(euler_to_matrix(angles, convention), convention), angles, atol=1e-9, rtol=0
    )
    # Gimbal lock, exactly and within 1e-10 rad / 1e-5 rad of it: any valid solution, but it must rebuild R.
    locked_middles = [0.0, math.pi, 1e-10, math.pi - 1e-10, 1e-5] if proper else [math.pi / 2, -math.pi / 2]
    if not proper:
        locked_middles += [math.pi / 2 - 1e-10, -math.pi / 2 + 1e-10, math.pi / 2 - 1e-5]
    locked = torch.tensor([[0.7, b, -1.9] for b in locked_middles], dtype=F64)
    locked_matrices = euler_to_matrix(locked, convention)
    recovered = matrix_to_euler(locked_matrices, convention)
    assert bool(torch.isfinite(recovered).all())
    torch.testing.assert_close(euler_to_matrix(recovered, convention), locked_matrices, atol=1e-9, rtol=0)


def test_extrinsic_is_the_reversed_intrinsic_sequence():
    angles = torch.tensor([0.3, -1.1, 2.4], dtype=F64)
    torch.testing.assert_close(euler_to_matrix(angles, "xyz"), euler_to_matrix(angles.flip(-1), "ZYX"))
    assert not torch.allclose(euler_to_matrix(angles, "xyz"), euler_to_matrix(angles, "XYZ"))


# ------------------------------------------------------------------------------------------------------- 6D


def test_rotation_6d_round_trip_and_gram_schmidt():
    matrices = random_rotations(32, seed=5)
    torch.testing.assert_close(rotation_6d_to_matrix(matrix_to_rotation_6d(matrices)), matrices, atol=1e-14, rtol=0)
    generator = torch.Generator().manual_seed(6)
    raw = torch.randn(32, 6, generator=generator, dtype=F64)
    built = rotation_6d_to_matrix(raw)
    assert_rotation(built)
    # Column 0 is the first vector's direction; column 1 lies in the plane of the two vectors.
    torch.testing.assert_close(built[..., :, 0], torch.nn.functional.normalize(raw[:, :3], dim=-1))
    normal = torch.linalg.cross(raw[:, :3], raw[:, 3:], dim=-1)
    torch.testing.assert_close((built[..., :, 1] * normal).sum(-1), torch.zeros(32, dtype=F64), atol=1e-13, rtol=0)
    assert bool(((built[..., :, 1] * raw[:, 3:]).sum(-1) > 0).all())


# ------------------------------------------------------------------------------------------------------ SE(3)


def twists_with_delicate_angles() -> torch.Tensor:
    rotvecs = rotvecs_with_delicate_angles()
    generator = torch.Generator().manual_seed(8)
    return torch.cat([100 * torch.randn(rotvecs.shape[0], 3, generator=generator, dtype=F64), rotvecs], -1)


def test_se3_exp_matches_matrix_exponential_of_the_twist():
    twists = twists_with_delicate_angles()
    algebra = torch.zeros(twists.shape[0], 4, 4, dtype=F64)
    algebra[:, :3, :3] = skew(twists[:, 3:])
    algebra[:, :3, 3] = twists[:, :3]
    torch.testing.assert_close(se3_exp(twists), torch.linalg.matrix_exp(algebra), atol=1e-12, rtol=1e-12)


def test_se3_exp_log_round_trips():
    twists = twists_with_delicate_angles()
    torch.testing.assert_close(se3_log(se3_exp(twists)), twists, atol=1e-8, rtol=0)
    transforms = torch.zeros(64, 4, 4, dtype=F64)
    transforms[:, :3, :3] = random_rotations(64, seed=9)
    transforms[:, :3, 3] = 50 * torch.randn(64, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    transforms[:, 3, 3] = 1
    torch.testing.assert_close(se3_exp(se3_log(transforms)), transforms, atol=1e-11, rtol=0)
    torch.testing.assert_close(se3_log(transforms[:, :3, :]), se3_log(transforms))


# -------------------------------------------------------------------------------------------------------- pose


@pytest.mark.parametrize("parameterization", POSE_PARAMETERIZATIONS)
def test_pose_round_trips_for_every_parameterization(parameterization):
    convention = "ZYX" if parameterization == "euler" else None
    rotations = random_rotations(16, seed=10)
    translations = 100 * torch.randn(16, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    params = extrinsics_to_pose(rotations, translations, parameterization, convention)
    rotation, translation = pose_to_extrinsics(params, parameterization, convention)
    torch.testing.assert_close(rotation, rotations, atol=1e-12, rtol=0)
    torch.testing.assert_close(translation, translations, atol=1e-10, rtol=0)
    if parameterization not in ("matrix", "se3"):
        torch.testing.assert_close(params[..., :3], translations)  # documented layout: translation first


@pytest.mark.parametrize("parameterization", POSE_PARAMETERIZATIONS)
def test_pose_gradients_reach_the_parameters(parameterization):
    convention = "xyz" if parameterization == "euler" else None
    params = extrinsics_to_pose(
        random_rotations(2, seed=12), torch.tensor([1.0, 2.0, 3.0], dtype=F64), parameterization, convention
    ).requires_grad_(True)
    torch.autograd.gradcheck(lambda p: pose_to_extrinsics(p, parameterization, convention), (params,))


# ---------------------------------------------------------------------------------------------------- gradients


def generic_rotvecs() -> torch.Tensor:
    return torch.tensor([[0.3, -0.5, 0.8], [1.2, 0.4, -0.9], [1e-4, 2e-4, -1e-4]], dtype=F64)


@pytest.mark.parametrize(
    "function, make_input",
    [
        (rotvec_to_matrix, generic_rotvecs),
        (rotvec_to_quaternion, generic_rotvecs),
        (lambda q: quaternion_to_matrix(q), lambda: rotvec_to_quaternion(generic_rotvecs()) * 1.7),
        (quaternion_to_rotvec, lambda: rotvec_to_quaternion(generic_rotvecs())),
        (matrix_to_quaternion, lambda: rotvec_to_matrix(generic_rotvecs())),
        (matrix_to_rotvec, lambda: rotvec_to_matrix(generic_rotvecs())),
        (rotation_6d_to_matrix, lambda: torch.tensor([[1.0, 0.2, -0.3, 0.1, 0.9, 0.4]], dtype=F64)),
        (se3_exp, lambda: torch.cat([torch.tensor([[5.0, -3.0, 2.0]] * 3, dtype=F64), generic_rotvecs()], -1)),
        (se3_log, lambda: se3_exp(torch.cat([torch.ones(3, 3, dtype=F64), generic_rotvecs()], -1))),
    ],
)
def test_gradcheck_away_from_singularities(function, make_input):
    torch.autograd.gradcheck(function, (make_input().requires_grad_(True),))


@pytest.mark.parametrize("convention", ALL_EULER)
def test_gradcheck_euler(convention):
    angles = torch.tensor([[0.4, 0.9, -1.3], [2.0, 0.3, 0.7]], dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda a: euler_to_matrix(a, convention), (angles,))
    torch.autograd.gradcheck(lambda a: matrix_to_euler(euler_to_matrix(a, convention), convention), (angles,))


@pytest.mark.parametrize("function", [rotvec_to_matrix, lambda v: se3_exp(torch.cat([v, v], -1))[..., :3, :]])
def test_gradients_at_and_near_angle_zero_are_finite_and_match_finite_differences(function):
    # At zero the Jacobian of exp([v]x) is the generator basis: d R / d v_k = [e_k]x.
    zero = torch.zeros(3, dtype=F64)
    jacobian = torch.autograd.functional.jacobian(function, zero)
    generators = skew(torch.eye(3, dtype=F64)).permute(1, 2, 0)  # [3, 3, k]
    torch.testing.assert_close(jacobian[..., :3, :3, :], generators, atol=1e-15, rtol=0)
    for magnitude in (1e-9, 1e-6, 1e-3):
        point = torch.tensor([1.0, -2.0, 0.5], dtype=F64) * magnitude
        analytic = torch.autograd.functional.jacobian(function, point)
        assert bool(torch.isfinite(analytic).all())
        step = 1e-7
        for k in range(3):
            offset = torch.zeros(3, dtype=F64)
            offset[k] = step
            central = (function(point + offset) - function(point - offset)) / (2 * step)
            torch.testing.assert_close(analytic[..., k], central, atol=1e-8, rtol=0)


def test_inverse_maps_have_finite_gradients_at_the_identity():
    identity = torch.eye(3, dtype=F64, requires_grad=True)
    matrix_to_rotvec(identity).sum().backward()
    assert bool(torch.isfinite(identity.grad).all())
    quaternion = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    rotvec = quaternion_to_rotvec(quaternion)
    # d rotvec / d (x, y, z) = 2 I at the identity.
    jacobian = torch.autograd.functional.jacobian(quaternion_to_rotvec, quaternion.detach())
    torch.testing.assert_close(jacobian[:, 1:], 2 * torch.eye(3, dtype=F64))
    assert rotvec.abs().max() == 0


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: rotvec_to_matrix(torch.zeros(2, 4)), "rotvec"),
        (lambda: rotvec_to_matrix(torch.tensor([0.0, float("nan"), 0.0])), "rotvec"),
        (lambda: rotvec_to_matrix(torch.zeros(3, dtype=torch.int64)), "rotvec"),
        (lambda: quaternion_to_matrix(torch.zeros(4)), "quaternion"),
        (lambda: quaternion_to_matrix(torch.tensor([1.0, float("inf"), 0, 0])), "quaternion"),
        (lambda: matrix_to_quaternion(torch.eye(4)), "matrix"),
        (lambda: matrix_to_euler(torch.eye(3), "XYY"), "convention"),
        (lambda: euler_to_matrix(torch.zeros(3), "XyZ"), "convention"),
        (lambda: euler_to_matrix(torch.zeros(2), "XYZ"), "angles"),
        (lambda: rotation_6d_to_matrix(torch.tensor([1.0, 0, 0, 2.0, 0, 0])), "rotation_6d"),
        (lambda: se3_exp(torch.zeros(3)), "twist"),
        (lambda: se3_log(torch.eye(3)), "transform"),
        (lambda: pose_to_extrinsics(torch.zeros(6), "axis-angle"), "parameterization"),
        (lambda: pose_to_extrinsics(torch.zeros(6), "euler"), "convention"),
        (lambda: pose_to_extrinsics(torch.zeros(6), "quaternion"), "params"),
        (lambda: pose_to_extrinsics([0.0] * 6, "rotvec"), "params"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_agrees_with_kornia_where_kornia_covers_the_conversion():
    """A cross-check against an independent implementation (kornia is optional: not a torchdrr dependency)."""
    conversions = pytest.importorskip("kornia.geometry.conversions")
    rotvecs = rotvecs_with_delicate_angles()[4:]  # kornia's own small-angle handling is coarser below 1e-3 rad
    matrices = rotvec_to_matrix(rotvecs)
    torch.testing.assert_close(conversions.axis_angle_to_rotation_matrix(rotvecs), matrices, atol=1e-12, rtol=0)
    quaternions = matrix_to_quaternion(matrices)  # (w, x, y, z), as kornia's quaternions
    torch.testing.assert_close(conversions.quaternion_to_rotation_matrix(quaternions), matrices, atol=1e-12, rtol=0)
    theirs = conversions.rotation_matrix_to_quaternion(matrices)
    theirs = theirs * torch.where(theirs[:, :1] < 0, -1.0, 1.0).to(F64)
    torch.testing.assert_close(theirs, quaternions, atol=1e-9, rtol=0)


@pytest.mark.parametrize("parameterization", POSE_PARAMETERIZATIONS)
def test_float32_keeps_its_dtype_and_round_trips(parameterization):
    convention = "zxz" if parameterization == "euler" else None
    rotations = random_rotations(16, seed=14).float()
    translations = torch.randn(16, 3, generator=torch.Generator().manual_seed(14)) * 100
    params = extrinsics_to_pose(rotations, translations, parameterization, convention)
    rotation, translation = pose_to_extrinsics(params, parameterization, convention)
    assert params.dtype == rotation.dtype == translation.dtype == torch.float32
    torch.testing.assert_close(rotation, rotations, atol=2e-6, rtol=0)
    torch.testing.assert_close(translation, translations, atol=1e-4, rtol=0)

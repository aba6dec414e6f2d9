"""Error metrics of 2D/3D registration: how far an estimated C-arm pose is from the true one.

Conventions (design.md §3, ``torchdrr.geometry.camera``): a pose is world -> camera, ``x_cam = R x_world + t`` with
``R`` ``[B, 3, 3]`` and ``t`` ``[B, 3]`` in mm; ``K`` ``[3, 3]`` or ``[B, 3, 3]`` in pixels, ``P = K [R | t]``; pixel
coordinates are ``(u, v)`` = (column, row). World points are in mm (the CT affine maps voxel index
``(i, j, k, 1)`` to world mm).

Every metric takes an estimated and a true pose and returns one value per pose, ``[B]``:

* ``target_registration_error`` (alias ``mtre``): mean over landmarks of the 3D distance (mm) between where each
  landmark lands in the camera frame under the two poses. Because ``R_true`` is an isometry this equals the world
  distance between ``x`` and ``T_true^-1 T_est x``: the displacement that the pose error inflicts on the anatomy.
* ``rotation_error_deg``: the geodesic angle (degrees, in ``[0, 180]``) of ``R_est R_true^T``.
* ``translation_error_mm``: by default the distance (mm) between the two X-ray source positions ``-R^T t`` in world
  coordinates. With ``center`` (a world point, e.g. the isocenter or the volume centre) it is instead the distance
  between the camera-frame positions of that point, ``|(R_est c + t_est) - (R_true c + t_true)|``: the translation
  part of the error when the rotation error is taken about ``c`` (a pure rotation about ``c`` gives 0).
* ``reprojection_error_px``: mean over landmarks of the pixel distance between their projections under the two
  poses. Landmarks at depth <= 0 (in or behind the source plane) under either pose have no projection: they are
  left out of that pose's mean with a ``UserWarning``; a pose with no landmark left gets NaN. (An evaluation loop
  over many registrations should not crash on one diverged estimate, and NaN cannot be mistaken for a small error.)

Batch sizes broadcast: every batched input has batch size ``B`` or 1. Inputs are validated at the boundary; a
``ValueError`` names the argument, what was expected and what was found. Rotations are assumed orthonormal with
determinant +1 (not checked). The metrics are differentiable in the pose tensors wherever the metric itself is
differentiable (see each function; at zero error a distance has a kink and autograd returns the finite zero
subgradient, never NaN).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from torchdrr.geometry.camera import Camera

__all__ = [
    "RegistrationErrors",
    "mtre",
    "registration_errors",
    "reprojection_error_px",
    "rotation_error_deg",
    "target_registration_error",
    "translation_error_mm",
    "volume_landmarks",
]


# ------------------------------------------------------------------------------------------------ validation


def _check_float_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, but it holds NaN or infinite values")


def _batched(name: str, value: object, trailing: tuple[int, ...]) -> Tensor:
    """``value`` as ``[B, *trailing]`` (an unbatched ``trailing``-shaped tensor becomes B = 1); checks finiteness."""
    value = _check_float_tensor(name, value)
    batched = "[B, " + ", ".join(str(n) for n in trailing) + "]"
    unbatched = "[" + ", ".join(str(n) for n in trailing) + "]"
    if tuple(value.shape) == trailing:
        value = value.unsqueeze(0)
    elif value.dim() != len(trailing) + 1 or tuple(value.shape[1:]) != trailing:
        raise ValueError(f"{name} must have shape {batched} (or {unbatched}), got {tuple(value.shape)}")
    if value.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one pose (B >= 1), got shape {tuple(value.shape)}")
    _check_finite(name, value)
    return value


def _landmarks(value: object, dtype: torch.dtype, device: torch.device) -> Tensor:
    value = _check_float_tensor("landmarks", value)
    if value.dim() != 2 or value.shape[1] != 3:
        raise ValueError(f"landmarks must have shape [N, 3] (world mm), got {tuple(value.shape)}")
    if value.shape[0] < 1:
        raise ValueError(f"landmarks must hold at least one point (N >= 1), got shape {tuple(value.shape)}")
    _check_finite("landmarks", value)
    return value.to(dtype=dtype, device=device)


def _broadcast(named: dict[str, Tensor], follow: tuple[str, ...] = ()) -> tuple[list[Tensor], torch.dtype]:
    """Expand the ``[B_i, ...]`` tensors to one batch size (each B_i is B or 1), on one device, in one dtype.

    The dtype is the promoted dtype of the tensors not named in ``follow`` (the intrinsics follow the poses: a
    float64 K with float32 poses gives float32 results, as ``Camera.project``)."""
    devices = {value.device for value in named.values()}
    if len(devices) > 1:
        found = ", ".join(f"{name} on {value.device}" for name, value in named.items())
        raise ValueError(f"the pose tensors must be on one device, got {found}")
    sizes = {value.shape[0] for value in named.values()}
    batch = max(sizes)
    if not sizes <= {1, batch}:
        found = ", ".join(f"{name}: {value.shape[0]}" for name, value in named.items())
        raise ValueError(f"batch sizes must be equal or 1 (broadcastable), got {found}")
    dtype = torch.float32
    for name, value in named.items():
        if name not in follow:
            dtype = torch.promote_types(dtype, value.dtype)
    return [value.to(dtype).expand(batch, *value.shape[1:]) for value in named.values()], dtype


def _poses(
    rotation_est: object, translation_est: object, rotation_true: object, translation_true: object
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (r_est, t_est, r_true, t_true), _ = _broadcast(
        {
            "rotation_est": _batched("rotation_est", rotation_est, (3, 3)),
            "translation_est": _batched("translation_est", translation_est, (3,)),
            "rotation_true": _batched("rotation_true", rotation_true, (3, 3)),
            "translation_true": _batched("translation_true", translation_true, (3,)),
        }
    )
    return r_est, t_est, r_true, t_true


def _to_camera(rotation: Tensor, translation: Tensor, points: Tensor) -> Tensor:
    """``R x + t`` for ``R`` ``[B, 3, 3]``, ``t`` ``[B, 3]``, ``x`` ``[N, 3]`` -> ``[B, N, 3]``."""
    return points @ rotation.transpose(-1, -2) + translation[:, None, :]


# --------------------------------------------------------------------------------------------------- metrics


def target_registration_error(
    rotation_est: Tensor, translation_est: Tensor, rotation_true: Tensor, translation_true: Tensor, landmarks: Tensor
) -> Tensor:
    """Mean target registration error (mTRE, mm) of estimated poses.

    Args:
        rotation_est: ``[B, 3, 3]`` (or ``[3, 3]``) estimated world -> camera rotation.
        translation_est: ``[B, 3]`` (or ``[3]``) estimated world -> camera translation (mm).
        rotation_true: ``[B, 3, 3]`` (or ``[3, 3]``) true rotation.
        translation_true: ``[B, 3]`` (or ``[3]``) true translation (mm).
        landmarks: ``[N, 3]`` world points (mm), N >= 1 (e.g. from :func:`volume_landmarks`).

    Returns:
        ``[B]`` mean over landmarks of ``|(R_est x + t_est) - (R_true x + t_true)|`` in mm (the camera-frame
        distance, equal to the world distance between ``x`` and ``T_true^-1 T_est x``). Batch sizes broadcast (B or
        1); the dtype is the promoted dtype of the poses. Differentiable; at zero error the gradient is the zero
        subgradient.
    """
    r_est, t_est, r_true, t_true = _poses(rotation_est, translation_est, rotation_true, translation_true)
    points = _landmarks(landmarks, r_est.dtype, r_est.device)
    difference = _to_camera(r_est, t_est, points) - _to_camera(r_true, t_true, points)
    return torch.linalg.vector_norm(difference, dim=-1).mean(-1)


#: Short alias of :func:`target_registration_error`.
mtre = target_registration_error


def rotation_error_deg(rotation_est: Tensor, rotation_true: Tensor) -> Tensor:
    """Geodesic angle between estimated and true rotations, in degrees.

    Args:
        rotation_est: ``[B, 3, 3]`` (or ``[3, 3]``) estimated rotation.
        rotation_true: ``[B, 3, 3]`` (or ``[3, 3]``) true rotation.

    Returns:
        ``[B]`` angle in ``[0, 180]`` degrees of ``M = R_est R_true^T``, computed as
        ``atan2(|vee(M - M^T)| / 2, (trace M - 1) / 2)`` (sine and cosine of the angle), which is accurate to
        rounding at every angle, including near 0 and 180 degrees where ``acos`` of the trace is not.

    The angle is a distance: it has a kink at 0 (like ``|x|``), where autograd returns the zero subgradient
    (finite, not NaN), and it is not differentiable at exactly 180 degrees (the axis flips), where the gradient is
    finite but not meaningful. Everywhere else it is differentiable.
    """
    (r_est, r_true), _ = _broadcast(
        {
            "rotation_est": _batched("rotation_est", rotation_est, (3, 3)),
            "rotation_true": _batched("rotation_true", rotation_true, (3, 3)),
        }
    )
    # M = R_est R_true^T by products and sums in a fixed order, so that M is exactly symmetric (and the angle
    # exactly 0) when the two rotations are equal, whatever the matmul backend.
    relative = (r_est[:, :, None, :] * r_true[:, None, :, :]).sum(-1)
    axis_part = torch.stack(
        [
            relative[:, 2, 1] - relative[:, 1, 2],
            relative[:, 0, 2] - relative[:, 2, 0],
            relative[:, 1, 0] - relative[:, 0, 1],
        ],
        -1,
    )  # 2 sin(angle) * axis
    sine = 0.5 * torch.linalg.vector_norm(axis_part, dim=-1)
    cosine = 0.5 * (relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)
    return torch.rad2deg(torch.atan2(sine, cosine))


def translation_error_mm(
    rotation_est: Tensor,
    translation_est: Tensor,
    rotation_true: Tensor,
    translation_true: Tensor,
    center: Tensor | None = None,
) -> Tensor:
    """Translation error (mm) of estimated poses.

    Args:
        rotation_est: ``[B, 3, 3]`` (or ``[3, 3]``) estimated world -> camera rotation.
        translation_est: ``[B, 3]`` (or ``[3]``) estimated translation (mm).
        rotation_true: ``[B, 3, 3]`` (or ``[3, 3]``) true rotation.
        translation_true: ``[B, 3]`` (or ``[3]``) true translation (mm).
        center: optional world point ``[3]`` (mm), e.g. the isocenter or ``volume_center(affine, shape)``.

    Returns:
        ``[B]`` in mm:

        * ``center=None`` (default): ``|s_est - s_true|``, the world distance between the X-ray source positions
          ``s = -R^T t``.
        * with ``center`` ``c``: ``|(R_est c + t_est) - (R_true c + t_true)|``, how far ``c`` moves in the camera
          frame (the TRE of the single landmark ``c``). A rotation error about ``c`` contributes nothing, so this is
          the translation part of the error when the pose error is split into a rotation about ``c`` and a shift.

        Differentiable; at zero error the gradient is the zero subgradient.
    """
    r_est, t_est, r_true, t_true = _poses(rotation_est, translation_est, rotation_true, translation_true)
    if center is None:
        source_est = -(t_est[:, None, :] @ r_est).squeeze(1)  # -R^T t, as a row vector: -t^T R
        source_true = -(t_true[:, None, :] @ r_true).squeeze(1)
        return torch.linalg.vector_norm(source_est - source_true, dim=-1)
    center = _check_float_tensor("center", center)
    if tuple(center.shape) != (3,):
        raise ValueError(f"center must have shape [3] (a world point in mm), got {tuple(center.shape)}")
    _check_finite("center", center)
    point = center.to(dtype=r_est.dtype, device=r_est.device)[None, :]
    difference = _to_camera(r_est, t_est, point) - _to_camera(r_true, t_true, point)
    return torch.linalg.vector_norm(difference, dim=-1).squeeze(-1)


def _reprojection(
    k_est: Tensor, k_true: Tensor, r_est: Tensor, t_est: Tensor, r_true: Tensor, t_true: Tensor, landmarks: object
) -> Tensor:
    """Mean pixel distance with per-pose intrinsics (all ``[B, ...]``, broadcast already); see the public function."""
    points = _landmarks(landmarks, r_est.dtype, r_est.device)
    camera_est = _to_camera(r_est, t_est, points)  # [B, N, 3]
    camera_true = _to_camera(r_true, t_true, points)
    depth_est, depth_true = camera_est[..., 2], camera_true[..., 2]
    valid = (depth_est > 0) & (depth_true > 0)  # [B, N]
    if not bool(valid.all()):
        behind_est = int((depth_est <= 0).sum())
        behind_true = int((depth_true <= 0).sum())
        empty = (~valid.any(-1)).nonzero().flatten().tolist()
        message = (
            f"reprojection_error_px: {behind_est} landmark projection(s) under the estimated pose and {behind_true} "
            f"under the true pose lie in or behind the source plane (depth <= 0) and are left out of the mean"
        )
        if empty:
            message += f"; pose(s) {empty} have no landmark left and get NaN"
        warnings.warn(message, UserWarning, stacklevel=3)

    def pixels(intrinsics: Tensor, camera_points: Tensor) -> Tensor:
        # Safe depth where invalid, so that neither the value nor the gradient of a left-out point is non-finite.
        depth = torch.where(valid, camera_points[..., 2], torch.ones_like(camera_points[..., 2]))
        homogeneous = camera_points @ intrinsics.transpose(-1, -2)  # [B, N, 3]: (u, v, 1) * depth
        return homogeneous[..., :2] / depth[..., None]

    distance = torch.linalg.vector_norm(pixels(k_est, camera_est) - pixels(k_true, camera_true), dim=-1)
    distance = torch.where(valid, distance, torch.zeros_like(distance))
    count = valid.sum(-1)
    total = distance.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1).to(total.dtype), torch.full_like(total, math.nan))


def reprojection_error_px(
    intrinsics: Tensor,
    rotation_est: Tensor,
    translation_est: Tensor,
    rotation_true: Tensor,
    translation_true: Tensor,
    landmarks: Tensor,
) -> Tensor:
    """Mean reprojection error (pixels) of estimated poses.

    Args:
        intrinsics: ``[3, 3]`` or ``[B, 3, 3]`` K (pixels), used for both poses.
        rotation_est: ``[B, 3, 3]`` (or ``[3, 3]``) estimated world -> camera rotation.
        translation_est: ``[B, 3]`` (or ``[3]``) estimated translation (mm).
        rotation_true: ``[B, 3, 3]`` (or ``[3, 3]``) true rotation.
        translation_true: ``[B, 3]`` (or ``[3]``) true translation (mm).
        landmarks: ``[N, 3]`` world points (mm), N >= 1.

    Returns:
        ``[B]`` mean over landmarks of the distance (pixels) between ``(u, v)`` of ``K [R_est | t_est] x`` and of
        ``K [R_true | t_true] x``. Landmarks at camera depth <= 0 under either pose are left out of that pose's mean
        with a ``UserWarning``; a pose whose landmarks are all left out gets NaN. Differentiable in all tensor
        inputs (the zero subgradient at zero error).
    """
    (k, r_est, t_est, r_true, t_true), _ = _broadcast(
        {
            "intrinsics": _batched("intrinsics", intrinsics, (3, 3)),
            "rotation_est": _batched("rotation_est", rotation_est, (3, 3)),
            "translation_est": _batched("translation_est", translation_est, (3,)),
            "rotation_true": _batched("rotation_true", rotation_true, (3, 3)),
            "translation_true": _batched("translation_true", translation_true, (3,)),
        },
        follow=("intrinsics",),
    )
    return _reprojection(k, k, r_est, t_est, r_true, t_true, landmarks)


class RegistrationErrors(NamedTuple):
    """All four registration errors of a batch of estimated poses, each ``[B]``."""

    #: mean target registration error (mm), :func:`target_registration_error`.
    mtre_mm: Tensor
    #: geodesic rotation error (degrees), :func:`rotation_error_deg`.
    rotation_deg: Tensor
    #: translation error (mm), :func:`translation_error_mm` (source positions, or about ``center`` if given).
    translation_mm: Tensor
    #: mean reprojection error (pixels), :func:`reprojection_error_px`.
    reprojection_px: Tensor


def registration_errors(
    camera_est: Camera, camera_true: Camera, landmarks: Tensor, center: Tensor | None = None
) -> RegistrationErrors:
    """All registration errors of estimated cameras against the true ones.

    Args:
        camera_est: estimated :class:`~torchdrr.geometry.Camera` (batch size B or 1).
        camera_true: true camera (batch size B or 1).
        landmarks: ``[N, 3]`` world points (mm), N >= 1.
        center: optional world point ``[3]`` (mm) for :func:`translation_error_mm`; default: source positions.

    Returns:
        :class:`RegistrationErrors` of ``[B]`` tensors. The reprojection error projects the landmarks with each
        camera's own intrinsics (they are usually the same K), so it is the pixel distance between where the two
        cameras' DRRs show each landmark.
    """
    for name, camera in (("camera_est", camera_est), ("camera_true", camera_true)):
        if not isinstance(camera, Camera):
            raise ValueError(f"{name} must be a torchdrr.geometry.Camera, got {type(camera).__name__}")
    (k_est, k_true, r_est, t_est, r_true, t_true), _ = _broadcast(
        {
            "camera_est.intrinsics": _batched("camera_est.intrinsics", camera_est.intrinsics, (3, 3)),
            "camera_true.intrinsics": _batched("camera_true.intrinsics", camera_true.intrinsics, (3, 3)),
            "camera_est.rotation": _batched("camera_est.rotation", camera_est.rotation, (3, 3)),
            "camera_est.translation": _batched("camera_est.translation", camera_est.translation, (3,)),
            "camera_true.rotation": _batched("camera_true.rotation", camera_true.rotation, (3, 3)),
            "camera_true.translation": _batched("camera_true.translation", camera_true.translation, (3,)),
        },
        follow=("camera_est.intrinsics", "camera_true.intrinsics"),
    )
    return RegistrationErrors(
        mtre_mm=target_registration_error(r_est, t_est, r_true, t_true, landmarks),
        rotation_deg=rotation_error_deg(r_est, r_true),
        translation_mm=translation_error_mm(r_est, t_est, r_true, t_true, center),
        reprojection_px=_reprojection(k_est, k_true, r_est, t_est, r_true, t_true, landmarks),
    )


# ------------------------------------------------------------------------------------------------- landmarks


def volume_landmarks(
    shape: Sequence[int] | torch.Size,
    affine: Tensor | np.ndarray,
    count: int = 100,
    seed: int = 0,
    margin: float = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """Default landmarks for the registration errors: random points inside a CT volume, in world mm.

    Index space follows ``Volume``: ``shape`` is ``(I, J, K)``, the sizes of ``Volume.data`` ``[I, J, K]``; voxel
    ``(i, j, k)`` has its centre at the integer index and the volume covers ``[-1/2, I - 1/2] x ... `` (design.md
    §2). The box used is that index box shrunk by ``margin * I`` (resp. J, K) on each side.

    Args:
        shape: the three spatial sizes ``(I, J, K)`` (each >= 1).
        affine: ``[4, 4]`` voxel index -> world mm (tensor or array; float64 unless a floating tensor is given).
        count: number of points (>= 1).
        seed: seed of the ``torch.Generator`` (CPU) that draws them: the same seed gives the same points on any
            device.
        margin: fraction of each axis' extent left out on each side, in ``[0, 0.5)``.
        mask: optional boolean ``[I, J, K]`` voxel mask (e.g. the body). If given, the points are the centres of
            ``count`` voxels drawn uniformly, with replacement, from the True voxels whose centres lie in the shrunk
            box (so a voxel may come twice when few are True).

    Returns:
        ``[count, 3]`` world points (mm) in the dtype and on the device of ``affine`` (float64 for arrays).
        Without ``mask`` they are uniform in the shrunk box (continuous, not voxel centres).
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)) or len(shape) != 3:
        raise ValueError(f"shape must be three voxel counts (I, J, K), got {shape!r}")
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shape):
        raise ValueError(f"shape must be three whole numbers >= 1, got {tuple(shape)!r}")
    sizes = tuple(int(n) for n in shape)
    if isinstance(affine, Tensor):
        affine_tensor = affine if affine.is_floating_point() else affine.to(torch.float64)
    else:
        try:
            affine_tensor = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"affine must be a [4, 4] tensor or array, got {type(affine).__name__}") from error
    if tuple(affine_tensor.shape) != (4, 4):
        raise ValueError(f"affine must have shape [4, 4] (voxel index -> world mm), got {tuple(affine_tensor.shape)}")
    _check_finite("affine", affine_tensor)
    linear = affine_tensor[:3, :3].detach().to(torch.float64).cpu()
    if abs(float(torch.linalg.det(linear))) <= 1e-12 * float(torch.linalg.vector_norm(linear, dim=-1).prod()):
        raise ValueError("affine's 3x3 linear part is singular: it does not map voxels to a volume in world mm")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be a whole number >= 1, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0.0 <= margin < 0.5):
        raise ValueError(f"margin must be a fraction in [0, 0.5), got {margin!r}")

    size = torch.tensor(sizes, dtype=torch.float64)
    low = -0.5 + margin * size
    high = size - 0.5 - margin * size
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if mask is None:
        indices = low + (high - low) * torch.rand(int(count), 3, generator=generator, dtype=torch.float64)
    else:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            found = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a boolean tensor, got {found}")
        if tuple(mask.shape) != sizes:
            raise ValueError(f"mask must have the volume's shape {list(sizes)}, got {list(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError("mask is empty: it has no True voxel to place landmarks in")
        # Voxel centres (integers) inside [low, high]: first..last along each axis.
        first = [math.ceil(float(v)) for v in low]
        last = [math.floor(float(v)) for v in high]
        inner = mask.detach().cpu()[first[0] : last[0] + 1, first[1] : last[1] + 1, first[2] : last[2] + 1]
        flat = inner.reshape(-1).nonzero().flatten()
        if flat.numel() == 0:
            raise ValueError(f"mask has no True voxel inside the box left by margin={margin}; lower the margin")
        chosen = flat[torch.randint(flat.numel(), (int(count),), generator=generator)]
        inner_shape = inner.shape
        i = chosen // (inner_shape[1] * inner_shape[2])
        j = (chosen // inner_shape[2]) % inner_shape[1]
        k = chosen % inner_shape[2]
        indices = torch.stack([i, j, k], -1).to(torch.float64) + torch.tensor(first, dtype=torch.float64)
    indices = indices.to(dtype=affine_tensor.dtype, device=affine_tensor.device)
    return indices @ affine_tensor[:3, :3].transpose(0, 1) + affine_tensor[:3, 3]

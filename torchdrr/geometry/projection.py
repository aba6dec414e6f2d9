"""3x4 projection matrices: build, decompose, project, and convert intrinsics to detector parameters.

Conventions (camera.py, design.md §3): ``P = K [R | t]`` maps homogeneous world points (mm) to homogeneous pixels
``(u, v, 1) * depth``, with ``u`` the column and ``v`` the row of a pixel centre and ``depth`` the point's camera
z (mm, > 0 in front of the source, toward the detector). Our K may be mirrored (``fu < 0``).

Sign conventions of ``decompose_projection`` (P is only defined up to a nonzero scale ``s``, ``P = s K [R | t]``):

* ``K[2, 2] = 1``, ``K[1, 1] = fv > 0``, ``det(R) = +1``; ``K[0, 0] = fu`` keeps its sign (negative for a mirrored
  camera); ``K[0, 1]`` (skew) is returned as found.
* The sign of ``s`` cannot be read off P alone: ``(s, fu, R)`` and ``(-s, -fu, diag(1, -1, -1) R)`` give the same
  P, the second describing a camera facing the other way. It is fixed either by a ``reference_point`` known to be
  in front of the camera (e.g. the isocenter or the volume centre; its depth comes out positive), or, without one,
  by assuming ``s > 0`` (true for ``projection_matrix``'s output and any positive rescaling of it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .rotations import _check_tensor

__all__ = [
    "DetectorGeometry",
    "decompose_projection",
    "detector_to_intrinsics",
    "intrinsics_to_detector",
    "project_points",
    "projection_matrix",
]


def projection_matrix(intrinsics: Tensor, rotation: Tensor, translation: Tensor) -> Tensor:
    """``P = K [R | t]``.

    Args:
        intrinsics: ``[..., 3, 3]`` K (pixels).
        rotation: ``[..., 3, 3]`` world -> camera rotation R.
        translation: ``[..., 3]`` world -> camera translation t (mm).

    Returns:
        ``P`` ``[..., 3, 4]``, leading dimensions broadcast; differentiable in all inputs.
    """
    _check_tensor("intrinsics", intrinsics, (3, 3))
    _check_tensor("rotation", rotation, (3, 3))
    _check_tensor("translation", translation, (3,))
    batch = torch.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1])
    extrinsics = torch.cat([rotation.expand(*batch, 3, 3), translation.expand(*batch, 3)[..., None]], -1)
    return intrinsics @ extrinsics


def decompose_projection(projection: Tensor, reference_point: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``P`` ``[..., 3, 4]`` into ``K`` ``[..., 3, 3]``, ``R`` ``[..., 3, 3]``, ``t`` ``[..., 3]`` (mm).

    An RQ decomposition of the left 3x3 block ``M = s K R`` by Gram-Schmidt from the bottom row up, with the sign
    conventions of the module docstring: ``K[2, 2] = 1``, ``fv > 0``, ``det R = +1``, ``fu`` signed.

    Args:
        projection: ``[..., 3, 4]`` P, any nonzero scale.
        reference_point: optional ``[..., 3]`` world point (mm) in front of the camera, fixing the sign of P's
            scale; without it the scale is taken as positive.

    Returns:
        ``(K, R, t)`` with ``projection_matrix(K, R, t) == P / s``. Differentiable in ``projection``.

    Raises:
        ValueError: if ``projection`` is not a finite ``[..., 3, 4]`` tensor or its left 3x3 block is singular.
    """
    _check_tensor("projection", projection, (3, 4))
    left = projection[..., :3, :3]
    # Relative singularity test: |det M| against the product of its row norms (Hadamard's bound).
    row_norms = torch.linalg.vector_norm(left, dim=-1)
    determinant = torch.linalg.det(left)
    if bool((determinant.abs() <= 1e3 * torch.finfo(left.dtype).eps * row_norms.prod(-1)).any()):
        raise ValueError("projection's left 3x3 block is singular (rank < 3): it is not a finite pinhole camera")
    # |s| = |M[2]| because K's last row is (0, 0, 1) and R's rows are unit vectors.
    scale = row_norms[..., 2]
    if reference_point is not None:
        _check_tensor("reference_point", reference_point, (3,))
        depth = (projection[..., 2, :3] * reference_point).sum(-1) + projection[..., 2, 3]
        if bool((depth == 0).any()):
            raise ValueError("reference_point lies in the source plane (depth 0): it cannot tell front from back")
        scale = scale * torch.sign(depth)
    normalised = projection / scale[..., None, None]
    row0, row1, row2 = normalised[..., 0, :3], normalised[..., 1, :3], normalised[..., 2, :3]

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(-1)

    # M = K R row by row: row2 = R2, row1 = fv R1 + cv R2, row0 = fu R0 + skew R1 + cu R2.
    axis2 = row2
    cv = dot(row1, axis2)
    row1_rest = row1 - cv[..., None] * axis2
    fv = torch.linalg.vector_norm(row1_rest, dim=-1)  # positive by convention
    axis1 = row1_rest / fv[..., None]
    cu = dot(row0, axis2)
    skew_term = dot(row0, axis1)
    # det R = +1 fixes R0 = R1 x R2; fu is whatever signed length row0 has along it.
    axis0 = torch.linalg.cross(axis1, axis2, dim=-1)
    fu = dot(row0, axis0)
    rotation = torch.stack([axis0, axis1, axis2], -2)
    zero, one = torch.zeros_like(fu), torch.ones_like(fu)
    intrinsics = torch.stack(
        [torch.stack([fu, skew_term, cu], -1), torch.stack([zero, fv, cv], -1), torch.stack([zero, zero, one], -1)],
        -2,
    )
    translation = torch.linalg.solve_triangular(intrinsics, normalised[..., :, 3:], upper=True).squeeze(-1)
    return intrinsics, rotation, translation


def project_points(camera: Tensor | tuple[Tensor, Tensor, Tensor], points: Tensor) -> Tensor:
    """Pixel coordinates ``(u, v)`` = (column, row) of world points.

    Args:
        camera: ``P`` ``[..., 3, 4]``, or a tuple ``(K [..., 3, 3], R [..., 3, 3], t [..., 3])``.
        points: ``[..., N, 3]`` world points (mm); leading dimensions broadcast with the camera's.

    Returns:
        ``[..., N, 2]`` ``(u, v)`` in pixels. Points in the source plane (depth 0) give non-finite values and points
        behind the source project through it; callers that care should check the depth. Differentiable.
    """
    if isinstance(camera, tuple):
        if len(camera) != 3:
            raise ValueError(f"camera must be P or a tuple (K, R, t), got a tuple of {len(camera)}")
        projection = projection_matrix(*camera)
    else:
        projection = _check_tensor("camera", camera, (3, 4))
    _check_tensor("points", points, (3,))
    if points.dim() < 2:
        raise ValueError(f"points must have shape [..., N, 3], got {tuple(points.shape)}")
    homogeneous = points @ projection[..., :3, :3].transpose(-1, -2) + projection[..., None, :, 3]
    return homogeneous[..., :2] / homogeneous[..., 2:]


class DetectorGeometry(NamedTuple):
    """A flat detector as read from K (see ``intrinsics_to_detector``)."""

    #: ``[..., 2]`` (row pitch, column pitch) in mm.
    pixel_spacing_mm: Tensor
    #: ``[..., 2]`` principal point ``(u, v)`` = (column, row) in pixels.
    principal_point_px: Tensor
    #: ``[...]`` bool: True where ``fu < 0`` (image shown as seen from the detector).
    mirror: Tensor


def intrinsics_to_detector(intrinsics: Tensor, sdd_mm: float | Tensor) -> DetectorGeometry:
    """Pixel pitches, principal point and mirror flag of ``K`` ``[..., 3, 3]`` for a detector at ``sdd_mm`` (mm).

    ``K`` must have ``K[2] = (0, 0, 1)``, zero skew, ``fv > 0`` and ``fu != 0`` (a ValueError names ``intrinsics``
    otherwise). Row pitch = ``SDD / fv``, column pitch = ``SDD / |fu|`` (mm). Principal-point offset from the
    detector centre of an ``H x W`` image = ``principal_point_px - ((W - 1) / 2, (H - 1) / 2)``.
    """
    _check_tensor("intrinsics", intrinsics, (3, 3))
    sdd = torch.as_tensor(sdd_mm, dtype=intrinsics.dtype, device=intrinsics.device)
    if not bool(torch.isfinite(sdd).all()) or not bool((sdd > 0).all()):
        raise ValueError(f"sdd_mm must be a positive finite distance in mm, got {sdd_mm}")
    fu, fv = intrinsics[..., 0, 0], intrinsics[..., 1, 1]
    tolerance = 1e3 * torch.finfo(intrinsics.dtype).eps * fv.abs()
    bottom = intrinsics[..., 2, :] - torch.tensor([0.0, 0.0, 1.0], dtype=intrinsics.dtype, device=intrinsics.device)
    if bool((bottom.abs().amax(-1) > 1e3 * torch.finfo(intrinsics.dtype).eps).any()):
        raise ValueError("intrinsics must have last row (0, 0, 1) (normalise K so K[2, 2] = 1)")
    if bool((intrinsics[..., 1, 0].abs() > tolerance).any()) or bool((intrinsics[..., 0, 1].abs() > tolerance).any()):
        raise ValueError("intrinsics must be upper triangular with zero skew (K[0, 1] = K[1, 0] = 0)")
    if not bool((fv > 0).all()) or bool((fu == 0).any()):
        raise ValueError("intrinsics must have fv = K[1, 1] > 0 and fu = K[0, 0] != 0")
    pixel_spacing = torch.stack([sdd / fv, sdd / fu.abs()], -1)
    principal_point = torch.stack([intrinsics[..., 0, 2], intrinsics[..., 1, 2]], -1)
    return DetectorGeometry(pixel_spacing, principal_point, fu < 0)


def detector_to_intrinsics(
    sdd_mm: float | Tensor,
    pixel_spacing_mm: tuple[float, float] | Tensor,
    height: int,
    width: int,
    principal_offset_px: tuple[float, float] | Tensor = (0.0, 0.0),
    mirror: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """K ``[..., 3, 3]`` of a flat detector; the inverse of ``intrinsics_to_detector``.

    Args:
        sdd_mm: ``[...]`` or scalar source-to-detector distance (mm, > 0).
        pixel_spacing_mm: ``[..., 2]`` (row pitch, column pitch) in mm (> 0).
        height: detector rows (>= 1).
        width: detector columns (>= 1).
        principal_offset_px: ``[..., 2]`` ``(du, dv)`` in pixels: principal point minus the detector centre
            ``((width - 1) / 2, (height - 1) / 2)``.
        mirror: negative ``fu`` (image seen from the detector), as ``camera.intrinsic_matrix``.
        dtype: floating dtype of the result (tensor inputs are cast to it).
        device: device of the result.

    Returns:
        ``K = [[+-SDD / col pitch, 0, cu], [0, SDD / row pitch, cv], [0, 0, 1]]``; equals
        ``intrinsic_matrix(sdd, height, width, spacing, mirror)`` for a zero offset. Differentiable in tensor inputs.
    """
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1 pixel, got {height} x {width}")
    sdd = torch.as_tensor(sdd_mm, dtype=dtype, device=device)
    spacing = torch.as_tensor(pixel_spacing_mm, dtype=dtype, device=device)
    offset = torch.as_tensor(principal_offset_px, dtype=dtype, device=device)
    if not bool(torch.isfinite(sdd).all()) or not bool((sdd > 0).all()):
        raise ValueError(f"sdd_mm must be a positive finite distance in mm, got {sdd_mm}")
    if spacing.shape[-1:] != (2,) or not bool(torch.isfinite(spacing).all()) or not bool((spacing > 0).all()):
        raise ValueError(f"pixel_spacing_mm must be [..., 2] positive finite pitches in mm, got {pixel_spacing_mm}")
    if offset.shape[-1:] != (2,) or not bool(torch.isfinite(offset).all()):
        raise ValueError(f"principal_offset_px must be [..., 2] finite pixel offsets, got {principal_offset_px}")
    fu = sdd / spacing[..., 1] * (-1.0 if mirror else 1.0)
    fv = sdd / spacing[..., 0]
    cu = (width - 1) / 2.0 + offset[..., 0]
    cv = (height - 1) / 2.0 + offset[..., 1]
    fu, fv, cu, cv = torch.broadcast_tensors(fu, fv, cu, cv)
    zero, one = torch.zeros_like(fu), torch.ones_like(fu)
    return torch.stack(
        [torch.stack([fu, zero, cu], -1), torch.stack([zero, fv, cv], -1), torch.stack([zero, zero, one], -1)], -2
    )

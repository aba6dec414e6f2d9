"""Pose and detector conversions between torchdrr and the peer renderers DiffDRR (0.6.x) and nanodrr (0.1.x).

Pure torch; neither peer is imported. The formulas below were derived by reading the peers' code (nothing copied) and
checked against rays recorded with the peers themselves (``benchmarks/peers/record_peer_rays.py`` writes
``tests/data/peer_rays.json``; ``tests/test_peer_poses.py`` checks them without the peers installed).

torchdrr (design.md §3): world = the CT affine's RAS+ frame (mm); ``R, t`` map world -> camera (OpenCV pinhole at
the source, z toward the detector); ``K = intrinsic_matrix(sdd, H, W, (row_pitch, col_pitch), mirror=True)``.

**DiffDRR** (``diffdrr.data.read(..., orientation=o, center_volume=True)``, ``DRR(subject, sdd, height, delx, width,
dely, x0=0, y0=0, reverse_x_axis=...)``, ``drr(rotation, translation, parameterization=..., convention=...)``):

* World: RAS+ of the volume's affine, shifted so the volume centre ``affine @ ((shape - 1) / 2)`` is at 0
  (``center_volume=True``; with ``center_volume=False`` pass ``center=zeros(3)``).
* Pose: ``M`` = the rotation (``"euler_angles"``: ``R_a(θ0) R_b(θ1) R_c(θ2)`` for convention ``"abc"``), the
  source is at ``M @ translation`` (centred world), and detector points are ``M (reorient @ p + translation)``
  where ``reorient`` is DiffDRR's fixed orientation matrix and ``p = (±delx (c - (W-1)/2), -dely (r - (H-1)/2),
  sdd)`` for their pixel (row r, column c).
* Detector: the rows agree; the columns are mirrored (their column c is our column ``W - 1 - c``) when
  ``orientation`` is ``"AP"`` or ``None`` with ``reverse_x_axis=True`` (DiffDRR's default), or ``"PA"`` with
  ``reverse_x_axis=False``; otherwise (``"PA"`` + ``reverse_x_axis=True``, ``"AP"``/``None`` +
  ``reverse_x_axis=False``) pixel (r, c) is our pixel (r, c). :func:`diffdrr_image_to_torchdrr` applies this.
  Pitches: our ``(row_pitch, col_pitch) = (dely, delx)``, same SDD, ``x0 = y0 = 0`` only.

**nanodrr** (``Subject.from_filepath`` / ``from_images``, ``make_k_inv(sdd, delx, dely, 0, 0, H, W)``,
``make_rt_inv(rotation, translation, orientation=o, isocenter=subject.isocenter)``):

* World: RAS+ of the volume's affine, not shifted. ``subject.isocenter`` is the volume centre rounded to float32:
  pass that same isocenter here for bit-level agreement.
* Pose: ``rt_inv = [M | M @ translation + isocenter] @ reorient`` maps their camera frame to the world, with ``M`` the
  intrinsic ZXY Euler rotation in degrees; their camera point of pixel (r, c) is
  ``(delx (c - (W-1)/2), dely (r - (H-1)/2), sdd)``.
* Detector: the rows agree; the columns are mirrored when ``orientation`` is ``"AP"`` or ``None`` and identical for
  ``"PA"``. :func:`nanodrr_image_to_torchdrr` applies this.

With either peer's ``"PA"`` the beam runs along +y of the pose frame, so the source goes at a negative y translation
(e.g. ``(0, -850, 0)``); with ``"AP"`` at ``(0, 850, 0)``. Each peer's orientation matrix for ``"PA"`` is a
reflection; the mirrored/not-mirrored column rule above is what keeps torchdrr's ``R`` a proper rotation in every case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..io.volume import volume_center
from .rotations import euler_to_matrix, matrix_to_euler

__all__ = [
    "diffdrr_columns_mirrored",
    "diffdrr_image_to_torchdrr",
    "euler_zxy_to_matrix",
    "from_diffdrr",
    "from_nanodrr",
    "from_nanodrr_rt_inv",
    "matrix_to_euler_zxy",
    "nanodrr_columns_mirrored",
    "nanodrr_image_to_torchdrr",
    "peer_intrinsics",
    "to_diffdrr",
    "to_nanodrr",
    "torchdrr_image_to_diffdrr",
    "torchdrr_image_to_nanodrr",
]

# DiffDRR 0.6.x ``diffdrr.data.read`` frame-of-reference matrices (C-arm frame -> world), 3x3 part.
_DIFFDRR_REORIENT = {
    "AP": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "PA": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    None: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}
# nanodrr 0.1.x ``nanodrr.camera.extrinsics`` orientation matrices (camera -> pose frame), 3x3 part.
_NANODRR_REORIENT = {
    "AP": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)),
    "PA": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0)),
    None: ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
}


def _reorient(table: dict, orientation: str | None, name: str, dtype, device) -> Tensor:
    if orientation not in table:
        raise ValueError(f"{name} orientation must be 'AP', 'PA' or None, got {orientation!r}")
    return torch.tensor(table[orientation], dtype=dtype, device=device)


def _det_sign(orientation: str | None) -> float:
    """Determinant of either peer's orientation matrix: +1 for "AP" and None, -1 for "PA" (a reflection)."""
    return 1.0 if orientation in ("AP", None) else -1.0


def euler_zxy_to_matrix(angles: Tensor, degrees: bool = False) -> Tensor:
    """``Rz(a) @ Rx(b) @ Ry(c)`` for ``angles[..., :] = (a, b, c)`` (intrinsic ZXY, as DiffDRR and nanodrr use)."""
    return euler_to_matrix(torch.deg2rad(angles) if degrees else angles, "ZXY")


def matrix_to_euler_zxy(matrix: Tensor, degrees: bool = False) -> Tensor:
    """Inverse of :func:`euler_zxy_to_matrix`, with the middle angle in ``[-90°, 90°]``; ``[..., 3]``."""
    angles = matrix_to_euler(matrix, "ZXY")
    return torch.rad2deg(angles) if degrees else angles


def peer_intrinsics(sdd: float, height: int, width: int, delx: float, dely: float, dtype=torch.float64) -> Tensor:
    """torchdrr's K for a peer detector given in the peers' terms (``delx`` column pitch, ``dely`` row pitch, mm;
    principal point at the centre, i.e. ``x0 = y0 = 0``)."""
    from torchdrr.geometry.camera import intrinsic_matrix

    return intrinsic_matrix(sdd, height, width, (dely, delx), mirror=True, dtype=dtype)


def _batch(x: Tensor, last: int) -> Tensor:
    return x.unsqueeze(0) if x.dim() == last else x


def _center_of(affine, shape, center, dtype, device, required: bool = True) -> Tensor:
    """The given centre (mm), else the volume centre from ``affine`` and ``shape``; without either, an error when
    ``required`` (DiffDRR always centres on the volume) or the origin (nanodrr's ``make_rt_inv`` default)."""
    if center is not None:
        return torch.as_tensor(center).to(dtype=dtype, device=device).reshape(3)
    if affine is not None and shape is not None:
        return volume_center(torch.as_tensor(affine, dtype=torch.float64), shape).to(dtype=dtype, device=device)
    if required:
        raise ValueError("give either center= (mm) or both affine= and shape= of the CT")
    return torch.zeros(3, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------- DiffDRR
def diffdrr_columns_mirrored(orientation: str | None = "AP", reverse_x_axis: bool = True) -> bool:
    """Whether DiffDRR's column c is torchdrr's column ``W - 1 - c`` (rows always agree)."""
    _reorient(_DIFFDRR_REORIENT, orientation, "DiffDRR", torch.float64, None)
    tau = -_det_sign(orientation)
    sigma = -1.0 if reverse_x_axis else 1.0
    return tau == sigma


def diffdrr_image_to_torchdrr(image: Tensor, orientation: str | None = "AP", reverse_x_axis: bool = True) -> Tensor:
    """DiffDRR image ``[..., H, W]`` -> the torchdrr image of the same pose (flips the last axis when mirrored)."""
    return image.flip(-1) if diffdrr_columns_mirrored(orientation, reverse_x_axis) else image


def torchdrr_image_to_diffdrr(image: Tensor, orientation: str | None = "AP", reverse_x_axis: bool = True) -> Tensor:
    """Inverse of :func:`diffdrr_image_to_torchdrr` (the same flip)."""
    return diffdrr_image_to_torchdrr(image, orientation, reverse_x_axis)


def _diffdrr_camera_to_frame(orientation, reverse_x_axis, dtype, device) -> Tensor:
    """``reorient @ D``: torchdrr camera coordinates -> DiffDRR's pre-pose frame (``M`` then maps it to the world)."""
    reo = _reorient(_DIFFDRR_REORIENT, orientation, "DiffDRR", dtype, device)
    tau = -_det_sign(orientation)
    return reo @ torch.diag(torch.tensor([tau, -1.0, 1.0], dtype=dtype, device=device))


def _diffdrr_matrix(rotation, translation, parameterization, convention, degrees):
    if parameterization == "euler_angles":
        if convention != "ZXY":
            raise NotImplementedError(f"only convention='ZXY' is supported for euler_angles, got {convention!r}")
        rotation, translation = _batch(rotation, 1), _batch(translation, 1)
        return euler_zxy_to_matrix(rotation, degrees), translation
    if parameterization == "matrix":
        if rotation.shape[-2:] == (4, 4):  # a full DiffDRR pose, as drr(pose, parameterization="matrix") takes
            pose = _batch(rotation, 2)
            m = pose[..., :3, :3]
            return m, (m.transpose(-1, -2) @ pose[..., :3, 3:]).squeeze(-1)
        return _batch(rotation, 2), _batch(translation, 1)
    raise NotImplementedError(f"parameterization must be 'euler_angles' or 'matrix', got {parameterization!r}")


def from_diffdrr(
    rotation: Tensor,
    translation: Tensor | None,
    parameterization: str = "euler_angles",
    convention: str | None = "ZXY",
    degrees: bool = False,
    *,
    affine: Tensor | None = None,
    shape: Sequence[int] | None = None,
    center: Tensor | None = None,
    orientation: str | None = "AP",
    reverse_x_axis: bool = True,
) -> tuple[Tensor, Tensor]:
    """torchdrr world -> camera ``(R [B, 3, 3], t [B, 3])`` of a DiffDRR pose.

    Args:
        rotation, translation, parameterization, convention, degrees: as passed to DiffDRR's ``drr(...)``:
            ``"euler_angles"`` with ``convention="ZXY"`` (``[B, 3]`` angles, radians unless ``degrees``), or
            ``"matrix"``: either a ``[B, 3, 3]`` rotation with ``[B, 3]`` translation (what
            ``RigidTransform.convert("matrix")`` returns) or a ``[B, 4, 4]`` DiffDRR pose (translation ignored).
        affine, shape: the CT's ``[4, 4]`` voxel -> RAS mm affine and its voxel shape; DiffDRR's ``read`` centres the
            volume at ``affine @ ((shape - 1) / 2)``. Or give ``center`` (mm) directly (zeros for
            ``center_volume=False``).
        orientation, reverse_x_axis: DiffDRR's ``read(orientation=...)`` and ``DRR(reverse_x_axis=...)``.

    Returns:
        ``R``, ``t`` in ``rotation``'s dtype; render with ``peer_intrinsics(sdd, H, W, delx, dely)`` and map DiffDRR's
        image with :func:`diffdrr_image_to_torchdrr`.
    """
    m, trans = _diffdrr_matrix(rotation, translation, parameterization, convention, degrees)
    dtype, device = m.dtype, m.device
    c = _center_of(affine, shape, center, dtype, device)
    frame = _diffdrr_camera_to_frame(orientation, reverse_x_axis, dtype, device)
    r_cw = m @ frame  # camera -> world rotation (R^T)
    source = (m @ trans.unsqueeze(-1)).squeeze(-1) + c
    r = r_cw.transpose(-1, -2)
    return r, -(r @ source.unsqueeze(-1)).squeeze(-1)


def to_diffdrr(
    rotation: Tensor,
    translation: Tensor,
    parameterization: str = "euler_angles",
    convention: str | None = "ZXY",
    degrees: bool = False,
    *,
    affine: Tensor | None = None,
    shape: Sequence[int] | None = None,
    center: Tensor | None = None,
    orientation: str | None = "AP",
    reverse_x_axis: bool = True,
) -> tuple[Tensor, Tensor]:
    """DiffDRR's ``(rotation, translation)`` for torchdrr extrinsics ``R [B, 3, 3]``, ``t [B, 3]``.

    Inverse of :func:`from_diffdrr` with the same keyword arguments. ``"euler_angles"`` (``"ZXY"``) gives ``[B, 3]``
    angles with the middle one in ``[-90°, 90°]``; ``"matrix"`` gives a ``[B, 3, 3]`` rotation and ``[B, 3]``
    translation (build DiffDRR's 4x4 pose as ``[M | M @ translation]``).
    """
    rotation, translation = _batch(rotation, 2), _batch(translation, 1)
    dtype, device = rotation.dtype, rotation.device
    c = _center_of(affine, shape, center, dtype, device)
    frame = _diffdrr_camera_to_frame(orientation, reverse_x_axis, dtype, device)
    r_cw = rotation.transpose(-1, -2)
    source = -(r_cw @ translation.unsqueeze(-1)).squeeze(-1)
    m = r_cw @ frame.transpose(-1, -2)
    trans = (m.transpose(-1, -2) @ (source - c).unsqueeze(-1)).squeeze(-1)
    if parameterization == "matrix":
        return m, trans
    if parameterization == "euler_angles":
        if convention != "ZXY":
            raise NotImplementedError(f"only convention='ZXY' is supported for euler_angles, got {convention!r}")
        return matrix_to_euler_zxy(m, degrees), trans
    raise NotImplementedError(f"parameterization must be 'euler_angles' or 'matrix', got {parameterization!r}")


# ----------------------------------------------------------------------------------------------------------- nanodrr
def nanodrr_columns_mirrored(orientation: str | None = "AP") -> bool:
    """Whether nanodrr's column c is torchdrr's column ``W - 1 - c`` (rows always agree)."""
    _reorient(_NANODRR_REORIENT, orientation, "nanodrr", torch.float64, None)
    return orientation in ("AP", None)


def nanodrr_image_to_torchdrr(image: Tensor, orientation: str | None = "AP") -> Tensor:
    """nanodrr image ``[..., H, W]`` -> the torchdrr image of the same pose (flips the last axis when mirrored)."""
    return image.flip(-1) if nanodrr_columns_mirrored(orientation) else image


def torchdrr_image_to_nanodrr(image: Tensor, orientation: str | None = "AP") -> Tensor:
    """Inverse of :func:`nanodrr_image_to_torchdrr` (the same flip)."""
    return nanodrr_image_to_torchdrr(image, orientation)


def _nanodrr_camera_to_frame(orientation, dtype, device) -> Tensor:
    """``reorient @ D``: torchdrr camera coordinates -> nanodrr's pose frame."""
    reo = _reorient(_NANODRR_REORIENT, orientation, "nanodrr", dtype, device)
    tau = _det_sign(orientation)
    return reo @ torch.diag(torch.tensor([tau, 1.0, 1.0], dtype=dtype, device=device))


def from_nanodrr_rt_inv(rt_inv: Tensor, orientation: str | None = "AP") -> tuple[Tensor, Tensor]:
    """torchdrr ``(R, t)`` of a nanodrr camera -> world matrix ``rt_inv`` ``[B, 4, 4]`` (from ``make_rt_inv``
    with the given ``orientation``)."""
    rt_inv = _batch(rt_inv, 2)
    dtype, device = rt_inv.dtype, rt_inv.device
    _reorient(_NANODRR_REORIENT, orientation, "nanodrr", dtype, device)  # validates orientation
    d = torch.diag(torch.tensor([_det_sign(orientation), 1.0, 1.0], dtype=dtype, device=device))
    r = (rt_inv[..., :3, :3] @ d).transpose(-1, -2)
    return r, -(r @ rt_inv[..., :3, 3:]).squeeze(-1)


def from_nanodrr(
    rotation: Tensor,
    translation: Tensor,
    *,
    orientation: str | None = "AP",
    isocenter: Tensor | None = None,
    affine: Tensor | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """torchdrr world -> camera ``(R [B, 3, 3], t [B, 3])`` of nanodrr's ``make_rt_inv(rotation, translation,
    orientation, isocenter)`` (``rotation``: ``[B, 3]`` ZXY Euler angles in degrees; ``translation``: ``[B, 3]`` mm).

    ``isocenter``: the same ``[3]`` point given to ``make_rt_inv`` (typically ``subject.isocenter``); if ``None``,
    ``volume_center(affine, shape)`` when both are given, else the origin (``make_rt_inv``'s default). Render with
    ``peer_intrinsics(sdd, H, W, delx, dely)`` and map nanodrr's image with :func:`nanodrr_image_to_torchdrr`.
    """
    rotation, translation = _batch(rotation, 1), _batch(translation, 1)
    dtype, device = rotation.dtype, rotation.device
    iso = _center_of(affine, shape, isocenter, dtype, device, required=False)
    m = euler_zxy_to_matrix(rotation, degrees=True)
    r_cw = m @ _nanodrr_camera_to_frame(orientation, dtype, device)
    source = (m @ translation.unsqueeze(-1)).squeeze(-1) + iso
    r = r_cw.transpose(-1, -2)
    return r, -(r @ source.unsqueeze(-1)).squeeze(-1)


def to_nanodrr(
    rotation: Tensor,
    translation: Tensor,
    *,
    orientation: str | None = "AP",
    isocenter: Tensor | None = None,
    affine: Tensor | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """nanodrr's ``make_rt_inv`` inputs ``(rotation [B, 3] ZXY degrees, translation [B, 3] mm)`` for torchdrr
    extrinsics ``R``, ``t``; inverse of :func:`from_nanodrr` with the same keyword arguments."""
    rotation, translation = _batch(rotation, 2), _batch(translation, 1)
    dtype, device = rotation.dtype, rotation.device
    iso = _center_of(affine, shape, isocenter, dtype, device, required=False)
    r_cw = rotation.transpose(-1, -2)
    source = -(r_cw @ translation.unsqueeze(-1)).squeeze(-1)
    m = r_cw @ _nanodrr_camera_to_frame(orientation, dtype, device).transpose(-1, -2)
    trans = (m.transpose(-1, -2) @ (source - iso).unsqueeze(-1)).squeeze(-1)
    return matrix_to_euler_zxy(m, degrees=True), trans

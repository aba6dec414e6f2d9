"""Pinhole X-ray camera: intrinsics and the rays through detector pixels.

Conventions (design.md §3): OpenCV pinhole at the X-ray source; camera x grows with the detector column, y with the
row, z points from the source toward the detector. ``K = [[fu, 0, cu], [0, fv, cv], [0, 0, 1]]`` with
``|fu| = SDD / column pitch`` and ``|fv| = SDD / row pitch``; pixel (row r, column c) has its centre at
``(u, v) = (c, r)``. Images are shown as seen from the detector looking toward the source, which mirrors the camera
image; the mirror is put in K as a negative ``fu`` so that ``P = K [R | t]`` projects a 3D point onto the pixel
where the DRR shows it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["intrinsic_matrix", "pixel_rays"]


def intrinsic_matrix(
    sdd_mm: float,
    height: int,
    width: int,
    pixel_spacing_mm: tuple[float, float],
    mirror: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The ``[3, 3]`` intrinsic matrix of a centred flat detector.

    Args:
        sdd_mm: source-to-detector distance in mm (> 0).
        height: detector rows (> 0).
        width: detector columns (> 0).
        pixel_spacing_mm: (row pitch, column pitch) in mm (> 0).
        mirror: show the image as seen from the detector (a C-arm monitor's view): ``fu < 0``.
        dtype: floating dtype of the result.

    Returns:
        ``K`` with principal point at the detector centre, ``((width - 1) / 2, (height - 1) / 2)``.
    """
    if not (sdd_mm > 0):
        raise ValueError(f"sdd_mm must be > 0 mm, got {sdd_mm}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1 pixel, got {height} x {width}")
    row_pitch, col_pitch = pixel_spacing_mm
    if not (row_pitch > 0 and col_pitch > 0):
        raise ValueError(f"pixel_spacing_mm must be two positive pitches in mm, got {pixel_spacing_mm}")
    fu = sdd_mm / col_pitch * (-1.0 if mirror else 1.0)
    fv = sdd_mm / row_pitch
    return torch.tensor([[fu, 0.0, (width - 1) / 2.0], [0.0, fv, (height - 1) / 2.0], [0.0, 0.0, 1.0]], dtype=dtype)


def pixel_rays(
    intrinsics: Tensor, rotation: Tensor, translation: Tensor, height: int, width: int, sdd_mm: float
) -> tuple[Tensor, Tensor]:
    """Source points and per-pixel detector points, in world mm, for a batch of poses.

    Args:
        intrinsics: ``[3, 3]`` or ``[B, 3, 3]`` K (see module docstring).
        rotation: ``[B, 3, 3]`` or ``[3, 3]`` world -> camera rotation R.
        translation: ``[B, 3]`` or ``[3]`` world -> camera translation t (mm).
        height: detector rows.
        width: detector columns.
        sdd_mm: source-to-detector distance (mm): the depth of the detector plane in the camera frame.

    Returns:
        ``sources`` ``[B, 1, 3]`` (the X-ray source, ``-R^T t``) and ``targets`` ``[B, height * width, 3]`` (pixel
        centres on the detector, row-major), both in the dtype and device of ``rotation``. Differentiable with
        respect to all tensor inputs.
    """
    rotation = rotation if rotation.dim() == 3 else rotation.unsqueeze(0)
    translation = translation if translation.dim() == 2 else translation.unsqueeze(0)
    if rotation.shape[-2:] != (3, 3) or translation.shape[-1] != 3 or rotation.shape[0] != translation.shape[0]:
        raise ValueError(
            f"rotation must be [B, 3, 3] and translation [B, 3] with one B, got {tuple(rotation.shape)} and "
            f"{tuple(translation.shape)}"
        )
    dtype, device = rotation.dtype, rotation.device
    rows = torch.arange(height, dtype=dtype, device=device)
    cols = torch.arange(width, dtype=dtype, device=device)
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)  # [H*W, 3] homogeneous (u, v, 1)
    k_inv = torch.linalg.inv(intrinsics.to(dtype=dtype, device=device))
    # Points on the detector plane z = SDD in camera coordinates: SDD * K^-1 (u, v, 1).
    camera_points = sdd_mm * (pixels @ k_inv.transpose(-1, -2))
    if camera_points.dim() == 2:
        camera_points = camera_points.unsqueeze(0)
    # world = R^T (p_cam - t), as row vectors: (p_cam - t) R.
    targets = (camera_points - translation.unsqueeze(1)) @ rotation
    sources = (-translation.unsqueeze(1)) @ rotation
    return sources, targets

"""A 3D sketch of a C-arm scene (volume box, patient axes, source, detector, rays), drawn from the same camera code
that casts the rays, so the picture cannot disagree with the renderer. Used for the README's conventions figure."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .camera import intrinsic_matrix, pixel_rays
from .carm import carm_extrinsics

__all__ = ["sketch_carm_scene"]

_COLORS = {"box": (150, 150, 150), "R": (200, 40, 40), "A": (40, 150, 40), "S": (40, 80, 210), "ray": (235, 150, 40)}


def _viewer_projection(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """[2, 3] orthographic projection of world points (RAS) onto the screen of a viewer who looks at the scene from
    the direction (cos e sin a, cos e cos a, sin e): azimuth a from anterior toward the patient's right, elevation e
    above. Screen x to the right, screen y down; a proper (unmirrored) view."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    toward_viewer = np.array([math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])
    forward = -toward_viewer
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.stack([right, -up])


def sketch_carm_scene(
    volume_shape: tuple[int, int, int],
    affine: Tensor,
    primary_deg: float,
    secondary_deg: float,
    sod_mm: float = 850.0,
    sdd_mm: float = 1020.0,
    detector_shape: tuple[int, int] = (960, 1240),
    pixel_spacing_mm: tuple[float, float] = (0.301, 0.301),
    title: str = "",
    size_px: int = 640,
    azimuth_deg: float = 35.0,
    elevation_deg: float = 20.0,
) -> Image.Image:
    """Draws the scene of one C-arm pose.

    Args:
        volume_shape: ``(I, J, K)`` voxels.
        affine: ``[4, 4]`` voxel -> world (RAS+, mm).
        primary_deg: primary angle (degrees, LAO positive).
        secondary_deg: secondary angle (degrees, cranial positive).
        sod_mm: source-to-isocenter distance (mm); the isocenter is the volume's centre.
        sdd_mm: source-to-detector distance (mm).
        detector_shape: (rows, columns).
        pixel_spacing_mm: (row pitch, column pitch) in mm.
        title: a line of text at the top.
        size_px: the picture's width in pixels (the height follows the scene).
        azimuth_deg: the viewer's azimuth, degrees from anterior toward the patient's right.
        elevation_deg: the viewer's elevation above the axial plane, degrees.

    Returns:
        An RGB picture: the volume's outer box (grey), the patient axes R (red), A (green), S (blue) from the
        volume's centre, the source, the detector with its first pixel (row 0, column 0) marked, and the rays to the
        detector's corners (orange).
    """
    affine = affine.to(torch.float64)
    corners_index = torch.tensor(
        [[i, j, k, 1.0] for i in (-0.5, volume_shape[0] - 0.5) for j in (-0.5, volume_shape[1] - 0.5)
         for k in (-0.5, volume_shape[2] - 0.5)],
        dtype=torch.float64,
    )  # fmt: skip
    box = (corners_index @ affine.T)[:, :3].numpy()
    centre = box.mean(axis=0)
    rows, cols = detector_shape
    rotation, translation = carm_extrinsics(primary_deg, secondary_deg, sod_mm, torch.as_tensor(centre))
    intrinsics = intrinsic_matrix(sdd_mm, rows, cols, pixel_spacing_mm)
    sources, targets = pixel_rays(intrinsics, rotation, translation, rows, cols, sdd_mm)
    source = sources[0, 0].numpy()
    pixel_grid = targets[0].reshape(rows, cols, 3)
    detector = np.stack([pixel_grid[0, 0], pixel_grid[0, -1], pixel_grid[-1, -1], pixel_grid[-1, 0]]).astype(float)
    axis_length = 0.6 * float(np.abs(box - centre).max())
    axes = {name: centre + axis_length * np.eye(3)[a] for a, name in enumerate("RAS")}

    projection = _viewer_projection(azimuth_deg, elevation_deg)
    everything = np.concatenate([box, detector, source[None], np.stack(list(axes.values()))])
    flat = everything @ projection.T
    low, high = flat.min(axis=0), flat.max(axis=0)
    margin = 0.08 * size_px
    scale = (size_px - 2 * margin) / float((high - low).max())

    def to_px(point: np.ndarray) -> tuple[float, float]:
        x, y = (np.asarray(point) @ projection.T - low) * scale + margin
        return float(x), float(y) + 0.04 * size_px

    height_px = int((high - low)[1] * scale + 2 * margin + 0.04 * size_px)
    picture = Image.new("RGB", (size_px, height_px), "white")
    draw = ImageDraw.Draw(picture)
    for a in range(8):
        for b in range(a + 1, 8):
            if bin(a ^ b).count("1") == 1:  # box edges join corners that differ in one index
                draw.line([to_px(box[a]), to_px(box[b])], fill=_COLORS["box"], width=2)
    for corner in detector:
        draw.line([to_px(source), to_px(corner)], fill=_COLORS["ray"], width=1)
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).polygon([to_px(p) for p in detector], fill=(120, 170, 230, 90))
    picture.paste(overlay, (0, 0), overlay)
    draw = ImageDraw.Draw(picture)
    draw.polygon([to_px(p) for p in detector], outline=(30, 60, 140), width=2)
    first_pixel = to_px(detector[0])
    draw.ellipse([first_pixel[0] - 5, first_pixel[1] - 5, first_pixel[0] + 5, first_pixel[1] + 5], fill=(0, 0, 0))
    draw.text((first_pixel[0] - 80, first_pixel[1] - 16), "pixel (0, 0)", fill=(0, 0, 0))
    for name, tip in axes.items():
        draw.line([to_px(centre), to_px(tip)], fill=_COLORS[name], width=4)
        draw.text((to_px(tip)[0] + 6, to_px(tip)[1] - 6), {"R": "R (+x)", "A": "A (+y)", "S": "S (+z)"}[name],
                  fill=_COLORS[name])  # fmt: skip
    sx, sy = to_px(source)
    draw.ellipse([sx - 7, sy - 7, sx + 7, sy + 7], fill=(0, 0, 0))
    draw.text((sx + 10, sy - 6), "source", fill=(0, 0, 0))
    last_row_corner = to_px(detector[3])
    draw.text((last_row_corner[0] + 8, last_row_corner[1] + 4), "detector", fill=(30, 60, 140))
    if title:
        draw.text((10, 10), title, fill=(0, 0, 0))
    return picture

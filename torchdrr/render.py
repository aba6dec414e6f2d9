"""The plain line-integral renderer: CT -> rough water-equivalent attenuation -> ray casting -> picture.

One channel, one energy, no detector: the quick view (`torchdrr render --physics line-integral`) and the baseline of
the benchmarks. The calibrated X-ray (materials, spectrum, detector, noise) is ``torchdrr.DRR``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .geometry import Camera
from .io import Volume, volume_center
from .io.writers import atomic_write
from .ops import camera_raycast

__all__ = ["WATER_MU_PER_MM", "hu_to_mu", "render_carm", "render_line_integrals", "save_png", "to_display"]

#: Rough linear attenuation of water for a diagnostic beam (about 0.2 /cm): one energy, no spectrum (see DRR).
WATER_MU_PER_MM = 0.02


def hu_to_mu(hu: Tensor) -> Tensor:
    """Rough linear attenuation in 1/mm: ``0.02 * (1 + HU / 1000)``, clipped at 0 (so padding, -2048, is air)."""
    return (WATER_MU_PER_MM * (1.0 + hu / 1000.0)).clamp_min(0.0)


def render_line_integrals(
    mu: Tensor | Volume,
    camera: Camera,
    affine: Tensor | None = None,
    mode: str = "siddon",
    step: float | None = None,
    supersample: int = 1,
    quads: Tensor | None = None,
) -> Tensor:
    """Line integrals of ``mu`` seen by ``camera``.

    Args:
        mu: ``[I, J, K]`` (or ``[C, I, J, K]``) linear attenuation in 1/mm, float32 or float64, on the device to
            render on; or a :class:`~torchdrr.io.Volume` whose data is already attenuation.
        camera: the cameras (batch of B poses, one detector).
        affine: ``[4, 4]`` voxel -> world mm; taken from the Volume when ``mu`` is one.
        mode: "siddon" or "trilinear" (see ``torchdrr.raycast``).
        step: trilinear step in mm.
        supersample: ``s x s`` rays per pixel whose line integrals are averaged (the calibrated physics averages
            intensities instead).
        quads: trilinear only, ``torchdrr.ops.trilinear_quads(mu)`` for faster GPU renders of a one-channel
            float32 ``mu`` (see ``torchdrr.ops.camera_raycast``).

    Returns:
        ``[B, C, H, W]`` dimensionless line integrals ``-log(I / I0)`` (C = 1 for a 3D ``mu``) in ``mu``'s dtype and
        device.
    """
    if isinstance(mu, Volume):
        affine, mu = mu.affine, mu.data
    if affine is None:
        raise ValueError("affine is required when mu is a tensor")
    camera = camera.to(device=mu.device)
    sources, ray_matrices = camera.ray_parameters(dtype=mu.dtype)
    integrals = camera_raycast(
        mu, affine, sources, ray_matrices, camera.height, camera.width, mode=mode,
        step=step, supersample=supersample, quads=quads,
    )  # fmt: skip
    channels = 1 if mu.dim() == 3 else mu.shape[0]
    integrals = integrals.reshape(camera.batch_size, camera.height, camera.width, supersample**2, channels)
    return integrals.mean(3).permute(0, 3, 1, 2)


def render_carm(
    mu: Tensor,
    affine: Tensor,
    primary_deg: Tensor | float,
    secondary_deg: Tensor | float,
    height: int = 512,
    width: int = 512,
    pixel_spacing_mm: tuple[float, float] = (0.85, 0.85),
    sdd_mm: float = 1020.0,
    sod_mm: float = 850.0,
    mode: str = "siddon",
    step: float | None = None,
) -> Tensor:
    """Line integrals of ``mu`` ``[I, J, K]`` (1/mm) seen by a C-arm at the given ``[B]`` or scalar angles
    (degrees), isocenter at the volume's centre: ``[B, 1, height, width]``. See :class:`Camera` and
    :func:`render_line_integrals`."""
    affine64 = affine.to(torch.float64)
    isocenter = volume_center(affine64, mu.shape[-3:]).to(mu.device)
    camera = Camera.from_carm(
        primary_deg,
        secondary_deg,
        isocenter,
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        height=height,
        width=width,
        pixel_spacing_mm=pixel_spacing_mm,
    )
    return render_line_integrals(mu, camera, affine64, mode=mode, step=step)


def to_display(line_integrals: Tensor, low_percentile: float = 0.5, high_percentile: float = 99.5) -> np.ndarray:
    """An 8-bit picture of one image ``[H, W]`` (or ``[1, H, W]``): bright where attenuation is high, as on film.

    The window spans the given percentiles of the pixels that saw the volume (line integral > 0).
    """
    image = line_integrals.detach().to("cpu", torch.float64).reshape(line_integrals.shape[-2:]).numpy()
    seen = image[image > 0]
    if seen.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = np.percentile(seen, [low_percentile, high_percentile])
    scaled = np.clip((image - low) / max(high - low, 1e-12), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Writes a 2D uint8/uint16 array as PNG atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output path must end in .png, got {path}")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    return atomic_write(path, lambda handle: Image.fromarray(picture).save(handle, format="PNG"))

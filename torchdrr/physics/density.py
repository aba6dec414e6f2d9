"""Conversion of CT numbers (Hounsfield units) to mass density.

The default is the two-line fit used by DeepDRR (coefficients only; no code is taken from it):
rho = 1.030 + 0.001029 * HU for HU <= 0 and rho = 1.030 + 0.0005886 * HU above, clipped at 0.

The Schneider et al. (2000) piecewise calibration is NOT provided: its table could not be verified from a primary
source in time, and inventing the numbers is worse than leaving it out.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AIR_DENSITY", "MODELS", "PADDING_HU", "check_density", "hu_to_density"]

# Density of dry air near sea level (NIST Table 2 lists 1.205e-3 g/cm^3); the design asks for 0.0012.
AIR_DENSITY = 0.0012
# Scanners pad outside the reconstruction circle with values such as -2048 or -3024; real tissue never goes below
# about -1100 HU, so anything at or below this is padding and is treated as air.
PADDING_HU = -1500.0

_INTERCEPT = 1.030
_SLOPE_LOW = 0.001029
_SLOPE_HIGH = 0.0005886


# Schneider, Bortfeld & Schlegel 2000 (Phys Med Biol 45:459) piecewise-linear HU -> density calibration, in the
# parametrisation used by Geant4/GATE's Schneider2000 density table: (upper HU of the segment, intercept, slope per HU).
# The fit is discontinuous at 100 HU (soft tissue -> bone-mixture branch), as in the published table.
_SCHNEIDER_SEGMENTS = (
    (-98.0, 1.03091, 1.0297e-3),
    (14.0, 1.018, 0.893e-3),
    (23.0, 1.03, 0.0),
    (100.0, 1.003, 1.169e-3),
    (float("inf"), 1.017, 0.592e-3),
)
MODELS = ("two-line", "schneider2000")


def hu_to_density(hu: Tensor, model: str = "two-line") -> Tensor:
    """Mass density from Hounsfield units.

    Args:
        hu: [...] CT numbers in HU (floating point).
        model: ``"two-line"`` (DeepDRR's fit, the default) or ``"schneider2000"`` (Schneider et al. 2000, piecewise
            linear; below -1000 HU it is air).

    Returns:
        [...] density in g/cm^3, same dtype and device as ``hu``, >= 0. Differentiable in ``hu`` (gradient 0 where
        the fit is clipped at 0 and in padding voxels, which are set to ``AIR_DENSITY``).
    """
    if not isinstance(hu, Tensor):
        raise TypeError(f"hu must be a torch.Tensor, got {type(hu).__name__}")
    if not hu.is_floating_point():
        raise TypeError(f"hu must be a floating-point tensor, got {hu.dtype}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if model == "schneider2000":
        rho = torch.full_like(hu, AIR_DENSITY)
        lower = -1000.0
        for upper, intercept, slope in _SCHNEIDER_SEGMENTS:
            inside = (hu > lower) & (hu <= upper) if lower > -1000.0 else (hu >= lower) & (hu <= upper)
            rho = torch.where(inside, intercept + torch.tensor(slope, dtype=hu.dtype, device=hu.device) * hu, rho)
            lower = upper
        return rho
    # Build the slopes in hu's dtype: a Python-scalar torch.where would round them to float32 first.
    low = torch.tensor(_SLOPE_LOW, dtype=hu.dtype, device=hu.device)
    high = torch.tensor(_SLOPE_HIGH, dtype=hu.dtype, device=hu.device)
    slope = torch.where(hu <= 0, low, high)
    rho = (_INTERCEPT + slope * hu).clamp_min(0.0)
    return torch.where(hu <= PADDING_HU, torch.full_like(rho, AIR_DENSITY), rho)


def check_density(density: Tensor, name: str = "density") -> Tensor:
    """Raise ValueError if ``density`` (g/cm^3) has negative or non-finite entries; return it unchanged."""
    if not isinstance(density, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(density).__name__}")
    with torch.no_grad():
        if not bool(torch.isfinite(density).all()):
            raise ValueError(f"{name} must be finite (g/cm^3)")
        if density.numel() and float(density.min()) < 0:
            raise ValueError(f"{name} must be >= 0 g/cm^3, got minimum {float(density.min()):g}")
    return density

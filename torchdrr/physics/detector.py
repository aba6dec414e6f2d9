"""X-ray detectors: what a pixel records from the photons that reach it.

Two kinds (design.md §4):

* ``EnergyIntegratingDetector``: a flat panel that records the energy deposited per pixel (DeepDRR's reading),
  ``I = N0 * sum_E p(E) eta(E) E T(E)`` in keV, one output channel.
* ``PhotonCountingDetector``: counts photons per energy bin above thresholds, ``N_k = N0 * sum_{E in bin k} p(E)
  eta(E) T(E)``, one output channel per bin.

Both can model the absorber's efficiency ``eta(E) = 1 - exp(-mu/rho(E) * rho * t)`` (a CsI scintillator for a flat
panel, e.g. CdTe for a photon-counting sensor; ideal, eta = 1, when no thickness is given) and the flat field's
inverse-square and obliquity falloff, ``cos^3`` of the angle between a pixel's ray and the detector normal.
The detector modules describe the response; ``torchdrr.DRR`` applies it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchdrr.physics.materials import get_material, mass_attenuation

__all__ = [
    "DETECTOR_OUTPUTS",
    "EnergyIntegratingDetector",
    "PhotonCountingDetector",
    "absorption_efficiency",
    "falloff_factor",
]

#: Output modes each detector kind can produce (``torchdrr.DRR``'s ``output``).
DETECTOR_OUTPUTS: dict[str, tuple[str, ...]] = {
    "energy-integrating": ("intensity", "flat_field", "line_integral", "display"),
    "photon-counting": ("photons", "flat_field", "line_integral", "display"),
}


def absorption_efficiency(
    energy_keV: Tensor | Sequence[float], material: str = "cesium iodide", thickness_mm: float = 0.6
) -> Tensor:
    """Fraction of the photons of each energy that a slab of absorber stops: ``1 - exp(-mu/rho(E) rho t)``.

    Args:
        energy_keV: ``[E]`` photon energies in keV.
        material: a registered material (default CsI, 4.51 g/cm^3) at its nominal density.
        thickness_mm: absorber thickness in mm (> 0); flat-panel CsI layers are about 0.4-0.7 mm.

    Returns:
        ``[E]`` float64 efficiencies in [0, 1] on ``energy_keV``'s device (CPU for a sequence). Attenuation (with
        coherent scattering) stands in for absorption: photons scattered out of the pixel count as absorbed and
        K-fluorescence escape is ignored, the usual first-order model.
    """
    thickness = float(thickness_mm)
    if not (math.isfinite(thickness) and thickness > 0):
        raise ValueError(f"thickness_mm must be a positive finite number of mm, got {thickness_mm!r}")
    absorber = get_material(material)
    energy = torch.as_tensor(energy_keV, dtype=torch.float64)
    mu_per_cm = mass_attenuation(absorber, energy) * absorber.density
    return -torch.expm1(-mu_per_cm * thickness / 10.0)


def falloff_factor(intrinsics: Tensor, height: int, width: int, supersample: int = 1) -> Tensor:
    """Inverse-square and obliquity falloff of the flat field at each (sub-)pixel, relative to the principal point.

    A pixel at distance ``r`` from the source, whose ray makes the angle ``theta`` with the detector normal, receives
    ``(SDD / r)^2`` (inverse square) times ``cos(theta)`` (the pixel is tilted to the ray) of the fluence at the
    principal point; with ``cos(theta) = SDD / r`` that is ``cos^3(theta)``. Only K matters:
    ``cos(theta) = 1 / |K^-1 (u, v, 1)|``.

    Args:
        intrinsics: ``[3, 3]`` K (differentiable).
        height: detector rows.
        width: detector columns.
        supersample: sub-rays per pixel along each axis, ordered as ``Camera.rays``.

    Returns:
        ``[height * width * supersample**2]`` factors in (0, 1], in K's dtype and device.
    """
    if isinstance(supersample, bool) or int(supersample) != supersample or supersample < 1:
        raise ValueError(f"supersample must be a whole number >= 1, got {supersample!r}")
    s = int(supersample)
    dtype, device = intrinsics.dtype, intrinsics.device
    offsets = (torch.arange(s, dtype=dtype, device=device) + 0.5) / s - 0.5
    rows = (torch.arange(height, dtype=dtype, device=device)[:, None] + offsets).reshape(height, 1, s, 1)
    cols = (torch.arange(width, dtype=dtype, device=device)[:, None] + offsets).reshape(1, width, 1, s)
    rows, cols = torch.broadcast_tensors(rows, cols)  # [H, W, s, s], the order of Camera.rays
    pixels = torch.stack([cols.reshape(-1), rows.reshape(-1), torch.ones_like(cols).reshape(-1)], dim=-1)
    directions = pixels @ torch.linalg.inv(intrinsics).transpose(0, 1)  # z = 1 on the plane at unit depth
    return directions.norm(dim=-1).pow(-3)


class _Detector(nn.Module):
    kind: str

    def __init__(self, absorber: str, absorber_thickness_mm: float | None, falloff: bool) -> None:
        super().__init__()
        self.absorber = get_material(absorber).name
        if absorber_thickness_mm is not None:
            thickness = float(absorber_thickness_mm)
            if not (math.isfinite(thickness) and thickness > 0):
                raise ValueError(
                    "absorber_thickness_mm must be a positive number of mm or None (ideal), got "
                    f"{absorber_thickness_mm!r}"
                )
            absorber_thickness_mm = thickness
        self.absorber_thickness_mm = absorber_thickness_mm
        if not isinstance(falloff, bool):
            raise TypeError(f"falloff must be a bool, got {type(falloff).__name__}")
        self.falloff = falloff

    @property
    def outputs(self) -> tuple[str, ...]:
        """The output modes this detector can produce."""
        return DETECTOR_OUTPUTS[self.kind]

    def efficiency(self, energy_keV: Tensor) -> Tensor:
        """``[E]`` float64 absorption efficiency at each energy (ones for an ideal detector)."""
        energy = torch.as_tensor(energy_keV, dtype=torch.float64)
        if self.absorber_thickness_mm is None:
            return torch.ones_like(energy)
        return absorption_efficiency(energy, self.absorber, self.absorber_thickness_mm)

    def channel_bins(self, energy_keV: Tensor) -> list[tuple[int, int]]:
        """Per output channel, the half-open range ``[start, end)`` of spectrum bins it records."""
        raise NotImplementedError

    @property
    def channels(self) -> int:
        raise NotImplementedError


class EnergyIntegratingDetector(_Detector):
    """A flat panel that records deposited energy: one channel, in keV per pixel (DeepDRR's reading).

    Args:
        absorber_thickness_mm: scintillator thickness in mm, or None for an ideal detector (eta = 1, DeepDRR).
        absorber: scintillator material (default CsI).
        falloff: apply inverse-square and obliquity falloff (``cos^3``) to the flat field.
    """

    kind = "energy-integrating"

    def __init__(
        self, absorber_thickness_mm: float | None = None, absorber: str = "cesium iodide", falloff: bool = False
    ) -> None:
        super().__init__(absorber, absorber_thickness_mm, falloff)

    @property
    def channels(self) -> int:
        return 1

    def channel_bins(self, energy_keV: Tensor) -> list[tuple[int, int]]:
        return [(0, int(torch.as_tensor(energy_keV).numel()))]

    def extra_repr(self) -> str:
        absorber = "ideal" if self.absorber_thickness_mm is None else f"{self.absorber_thickness_mm} mm {self.absorber}"
        return f"absorber={absorber}, falloff={self.falloff}"


class PhotonCountingDetector(_Detector):
    """A photon-counting (energy-resolving) detector: counts per energy bin above thresholds.

    Bin k counts the photons whose energy (spectrum bin centre) lies in ``[thresholds[k], thresholds[k+1])``, the
    last bin everything above the last threshold; photons below the first threshold are not counted (the threshold
    rejects electronic noise). One output channel per bin.

    Args:
        thresholds_keV: strictly increasing energy thresholds in keV (> 0).
        absorber_thickness_mm: sensor thickness in mm, or None for an ideal sensor.
        absorber: sensor material (default CdTe).
        falloff: apply inverse-square and obliquity falloff (``cos^3``) to the flat field.
    """

    kind = "photon-counting"

    def __init__(
        self,
        thresholds_keV: Sequence[float] = (20.0,),
        absorber_thickness_mm: float | None = None,
        absorber: str = "cadmium telluride",
        falloff: bool = False,
    ) -> None:
        super().__init__(absorber, absorber_thickness_mm, falloff)
        if isinstance(thresholds_keV, (int, float)):
            thresholds_keV = (thresholds_keV,)
        values = tuple(float(t) for t in thresholds_keV)
        if not values:
            raise ValueError("thresholds_keV must hold at least one threshold in keV")
        if any(not (math.isfinite(t) and t > 0) for t in values):
            raise ValueError(f"thresholds_keV must be positive finite energies in keV, got {values}")
        if any(b <= a for a, b in zip(values[:-1], values[1:], strict=True)):
            raise ValueError(f"thresholds_keV must be strictly increasing, got {values}")
        self.thresholds_keV = values

    @property
    def channels(self) -> int:
        return len(self.thresholds_keV)

    def channel_bins(self, energy_keV: Tensor) -> list[tuple[int, int]]:
        energy = torch.as_tensor(energy_keV, dtype=torch.float64).cpu().contiguous()
        if energy.numel() > 1 and bool((energy[1:] <= energy[:-1]).any()):
            raise ValueError("a photon-counting detector needs the spectrum's energies in increasing order")
        edges = torch.searchsorted(energy, torch.tensor(self.thresholds_keV, dtype=torch.float64)).tolist()
        edges.append(energy.numel())
        return [(edges[k], edges[k + 1]) for k in range(self.channels)]

    def extra_repr(self) -> str:
        absorber = "ideal" if self.absorber_thickness_mm is None else f"{self.absorber_thickness_mm} mm {self.absorber}"
        return f"thresholds_keV={self.thresholds_keV}, absorber={absorber}, falloff={self.falloff}"

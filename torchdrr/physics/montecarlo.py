"""Monte Carlo X-ray transport: the ground truth for scatter.

``transport`` follows photons from the X-ray source through a material volume to the detector of a ``Camera``: the
same volume, materials, spectrum and camera as the analytic ``DRR``. Photons are emitted toward uniform points of
the irradiated detector rectangle (the DRR's flat field: the same number of photons per pixel with nothing in the
beam, times cos^3 when the detector has falloff), tracked with Woodcock (delta) tracking, and undergo photoelectric
absorption, Compton scattering (Klein–Nishina × incoherent scattering function) or Rayleigh scattering (Thomson ×
squared form factor); ``scatter_data`` has the tables. An energy-integrating detector records E × η(E) per photon
(η the detector's absorption efficiency at normal incidence), separately for primary, single-scatter and
multiple-scatter photons, optionally behind a focused linear anti-scatter grid.

Not modelled: fluorescence (photoelectric absorption ends a history), Doppler broadening of Compton lines, electron
transport (electron energy is absorbed where the electron starts), air outside the volume (vacuum, as in the DRR),
the detector's angle-dependent efficiency for oblique scatter.

Random numbers are Philox4x32-10, addressed by (seed, camera, photon index): a run is reproducible, independent of
how photons are split into launches, and the CPU and the GPU draw the same numbers for a photon.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..geometry.camera import Camera
from ..ops.montecarlo import montecarlo_transport
from .detector import EnergyIntegratingDetector
from .scatter_data import TransportTables, majorant, transport_tables

__all__ = ["AntiScatterGrid", "MonteCarloScatter", "TransportResult", "transport"]

#: Photons below this energy (keV) after a scatter are absorbed where they are: they carry < 1 % of a diagnostic
#: photon's energy and would not cross a millimetre of tissue.
ENERGY_CUTOFF_KEV = 5.0
#: A scatter estimate noisier than this (median relative standard error over the pixels that have scatter) warns.
NOISY_SCATTER = 0.10


@dataclass(frozen=True)
class AntiScatterGrid:
    """A focused linear anti-scatter grid in front of the detector, strips along the detector's columns (v axis).

    A photon passes with probability ``primary_transmission * max(0, 1 - ratio * |tan a|)``, where a is its angle to
    the focal ray through its point in the plane across the strips: the geometric acceptance of absorbing strips of
    height h over interspaces of width D (ratio = h / D), without septal penetration. Primary photons (a = 0) pass
    with ``primary_transmission``.

    Attributes:
        ratio: grid ratio h / D (> 0; typical 8 to 15).
        primary_transmission: transmission of primary photons in (0, 1] (typical 0.6 to 0.75).
    """

    ratio: float = 10.0
    primary_transmission: float = 0.7

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"ratio must be a positive grid ratio, got {self.ratio!r}")
        if not (0 < self.primary_transmission <= 1):
            raise ValueError(f"primary_transmission must be in (0, 1], got {self.primary_transmission!r}")


@dataclass(frozen=True)
class TransportResult:
    """Detected energy per pixel, normalised per flat-field photon per pixel (the DRR's intensity at N0 = 1).

    Attributes:
        primary, single, multiple: ``[B, H, W]`` float64, keV per pixel per photon per pixel of the flat field,
            from photons that reached the pixel without interacting, after exactly one scatter, after two or more.
        primary_error, single_error, multiple_error, scatter_error: their standard errors (same units).
        absorbed: ``[B, M]`` keV left in each material per emitted photon (times its falloff weight, when the
            detector has falloff); ``absorbed_error``: its standard error.
        photons: histories per camera; photons_per_pixel: flat-field photons per pixel of the field.
        seconds: wall time of the transport (the tables and majorant excluded).
    """

    primary: Tensor
    single: Tensor
    multiple: Tensor
    primary_error: Tensor
    single_error: Tensor
    multiple_error: Tensor
    scatter_error: Tensor
    absorbed: Tensor
    absorbed_error: Tensor
    photons: int
    photons_per_pixel: float
    seconds: float

    @property
    def scatter(self) -> Tensor:
        """``[B, H, W]`` single + multiple scatter."""
        return self.single + self.multiple

    @property
    def scatter_to_primary(self) -> Tensor:
        """``[B, H, W]`` scatter / primary (inf where no primary arrives)."""
        return self.scatter / self.primary

    @property
    def photons_per_second(self) -> float:
        """Histories per second over all cameras."""
        return self.photons * self.primary.shape[0] / max(self.seconds, 1e-12)


def _spectrum_cdf(energy_keV: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    energy = torch.as_tensor(energy_keV, dtype=torch.float64).detach().cpu().reshape(-1)
    weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    if energy.shape != weights.shape or energy.numel() == 0:
        raise ValueError(
            f"spectrum energies and weights must be two [E] tensors, got {tuple(energy.shape)} and "
            f"{tuple(weights.shape)}"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("spectrum weights must be finite, >= 0 and not all 0")
    if not torch.isfinite(energy).all() or (energy <= 0).any():
        raise ValueError("spectrum energies must be positive and finite (keV)")
    cdf = torch.cumsum(weights, 0) / weights.sum()
    cdf[-1] = 1.0
    return energy, cdf


def _check_photons(photons_per_pixel: float) -> float:
    value = float(photons_per_pixel)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"photons_per_pixel must be a positive number of photons, got {photons_per_pixel!r}")
    if value < 100:
        warnings.warn(
            f"photons_per_pixel={value:g} is too few for a meaningful scatter estimate: the flat field alone has a "
            f"relative noise of {1 / math.sqrt(value):.0%} per pixel, and scatter behind a body is a few per cent of "
            "it; use 10^3 to 10^5",
            stacklevel=3,
        )
    return value


def transport(
    densities: Tensor,
    affine: Tensor,
    materials: Sequence[str],
    camera: Camera,
    spectrum: tuple[Tensor, Tensor],
    *,
    photons_per_pixel: float = 1000.0,
    detector: EnergyIntegratingDetector | None = None,
    grid: AntiScatterGrid | None = None,
    field: tuple[float, float, float, float] | None = None,
    seed: int = 0,
    energy_cutoff_keV: float = ENERGY_CUTOFF_KEV,
    photons_per_launch: int | None = None,
    progress: bool | None = None,
    tables: TransportTables | None = None,
    volume_majorant: Tensor | None = None,
) -> TransportResult:
    """Monte Carlo transport of X-ray photons through a material volume to the detectors of ``camera``.

    Args:
        densities: ``[M, I, J, K]`` g/cm^3 of each material (the DRR's material volume), float32, on the CPU or a
            GPU (where it runs).
        affine: ``[4, 4]`` voxel -> world mm.
        materials: the M material names (registered materials, see ``materials.material_names``).
        camera: B cameras sharing one detector (``Camera``); the tallies have its H x W pixels.
        spectrum: ``(energy_keV [S], photons [S])`` relative photon fluence per energy (e.g. ``spectrum_preset``).
        photons_per_pixel: flat-field photons per pixel of the irradiated field (the Monte Carlo's N0); the run has
            ``photons_per_pixel x field area`` histories per camera. Below 100 it warns.
        detector: energy-integrating detector (default ideal: η = 1); its efficiency and falloff are used.
        grid: an ``AntiScatterGrid`` in front of the detector, or None.
        field: the irradiated rectangle ``(u_min, u_max, v_min, v_max)`` in image coordinates (pixel centres at
            integers); default the whole detector ``(-0.5, W - 0.5, -0.5, H - 0.5)``.
        seed: the random stream's seed (int64): the same seed gives the same photons.
        energy_cutoff_keV: scattered photons below it are absorbed.
        photons_per_launch: histories per kernel launch (default 2^22 on the CPU, 2^28 on a GPU); the result does
            not depend on it.
        progress: a progress bar over launches (default: when there is more than one).
        tables, volume_majorant: precomputed ``transport_tables(materials, ...)`` and ``majorant`` (reused across
            calls by ``MonteCarloScatter``).

    Returns:
        A ``TransportResult``. A median relative error of the scatter above 10 % warns.
    """
    if not isinstance(camera, Camera):
        raise TypeError(f"camera must be a torchdrr.geometry.Camera, got {type(camera).__name__}")
    if not isinstance(densities, Tensor) or densities.dim() != 4:
        raise ValueError(f"densities must be an [M, I, J, K] tensor, got {getattr(densities, 'shape', densities)}")
    if densities.shape[0] != len(materials):
        raise ValueError(f"densities has {densities.shape[0]} channels but {len(materials)} materials were named")
    if detector is None:
        detector = EnergyIntegratingDetector()
    if not isinstance(detector, EnergyIntegratingDetector):
        raise TypeError(f"the Monte Carlo tallies an EnergyIntegratingDetector, got {type(detector).__name__}")
    if grid is not None and not isinstance(grid, AntiScatterGrid):
        raise TypeError(f"grid must be an AntiScatterGrid or None, got {type(grid).__name__}")
    ppp = _check_photons(photons_per_pixel)
    h, w = int(camera.height), int(camera.width)
    if field is None:
        field = (-0.5, w - 0.5, -0.5, h - 0.5)
    field = tuple(float(f) for f in field)
    if len(field) != 4 or not (field[0] < field[1] and field[2] < field[3]):
        raise ValueError(f"field must be (u_min, u_max, v_min, v_max) with u_min < u_max, v_min < v_max, got {field}")
    energy, cdf = _spectrum_cdf(*spectrum)
    device = densities.device
    densities = densities.detach().to(torch.float32)

    if tables is None:
        tables = transport_tables(materials, float(energy.max()))
    if volume_majorant is None:
        volume_majorant = majorant(densities, tables.total)
    grid_energy = tables.grid_energies
    efficiency = detector.efficiency(grid_energy).to(torch.float32)
    photons = int(round(ppp * (field[1] - field[0]) * (field[3] - field[2])))
    if photons < 1:
        raise ValueError(f"photons_per_pixel x field area gives {photons} photons; raise photons_per_pixel")

    sources, ray_matrices = camera.to(device=device).ray_parameters(dtype=torch.float32)
    to_device = {"device": device, "dtype": torch.float32}
    args = dict(
        spectrum_energy=energy.to(**to_device),
        spectrum_cdf=cdf.to(**to_device),
        grid_start=tables.grid_start_keV,
        grid_step=tables.grid_step_keV,
        interaction=tables.interaction.to(**to_device),
        majorant=volume_majorant.to(**to_device),
        efficiency=efficiency.to(**to_device),
        energy_cutoff=float(energy_cutoff_keV),
        compton_sf=tables.compton_sf.to(**to_device),
        compton_x_step=tables.compton_x_step,
        rayleigh_icdf=tables.rayleigh_icdf.to(**to_device),
        rayleigh_fraction=tables.rayleigh_fraction.to(**to_device),
        grid_ratio=grid.ratio if grid is not None else 0.0,
        grid_transmission=grid.primary_transmission if grid is not None else 1.0,
        falloff=bool(detector.falloff),
    )
    per_launch = int(photons_per_launch or (1 << 28 if device.type == "cuda" else 1 << 22))
    launches = range(0, photons, per_launch)
    if progress is None:
        progress = len(launches) > 1
    if progress:
        from tqdm.auto import tqdm

        launches = tqdm(launches, desc="Monte Carlo", unit="launch", leave=False)
    affine64 = torch.as_tensor(affine, dtype=torch.float64).detach().cpu()
    tally = absorbed = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for first in launches:
        count = min(per_launch, photons - first)
        part, part_absorbed = montecarlo_transport(
            densities, affine64, sources, ray_matrices, h, w, field, photons=count, seed=int(seed),
            first_photon=first, **args,
        )  # fmt: skip
        tally = part if tally is None else tally + part
        absorbed = part_absorbed if absorbed is None else absorbed + part_absorbed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    # Sums -> per-photon means scaled to one flat-field photon per pixel; errors from the sums of squares.
    def mean_and_error(total: Tensor, squares: Tensor) -> tuple[Tensor, Tensor]:
        variance = (squares - total * total / photons).clamp_min(0.0)
        return total / ppp, variance.sqrt() / ppp

    primary, primary_error = mean_and_error(tally[:, 0], tally[:, 3])
    single, single_error = mean_and_error(tally[:, 1], tally[:, 4])
    multiple, multiple_error = mean_and_error(tally[:, 2], tally[:, 5])
    # A photon lands in one tally only, so the scatter's sum of squares is the sum of both.
    _, scatter_error = mean_and_error(tally[:, 1] + tally[:, 2], tally[:, 4] + tally[:, 5])
    absorbed_mean = absorbed[..., 0] / photons
    absorbed_error = ((absorbed[..., 1] / photons - absorbed_mean**2).clamp_min(0.0) / photons).sqrt()
    result = TransportResult(
        primary, single, multiple, primary_error, single_error, multiple_error, scatter_error,
        absorbed_mean, absorbed_error, photons, ppp, seconds,
    )  # fmt: skip
    scatter = result.scatter
    has_scatter = scatter > 0
    if bool(has_scatter.any()):
        relative = float((scatter_error[has_scatter] / scatter[has_scatter]).median())
        if relative > NOISY_SCATTER:
            needed = ppp * (relative / NOISY_SCATTER) ** 2
            warnings.warn(
                f"the scatter estimate is noisy: median relative standard error {relative:.0%} per pixel with "
                f"{ppp:g} photons per pixel; about {needed:.3g} photons per pixel would bring it to "
                f"{NOISY_SCATTER:.0%}",
                stacklevel=2,
            )
    return result


class MonteCarloScatter(nn.Module):
    """The ``DRR``'s Monte Carlo scatter (``DRR(scatter="montecarlo")``): expected scatter by ``transport``.

    The transport runs on the DRR's material volume, spectrum, detector and cameras, read out in ``binning x
    binning`` pixel bins (scatter is smooth; the primary stays the DRR's analytic, full-resolution image). The
    binned scatter is interpolated bilinearly to full resolution and scaled by each image's N0. Not differentiable
    (a Monte Carlo estimate): use the scatter CNN inside a training graph.

    Args:
        photons_per_pixel: flat-field photons per binned pixel. The default, 10^4, gives scatter with a few per
            cent noise per bin behind a chest (about 10^8 photons for a 1240 x 960 detector in 10 x 10 bins).
        binning: detector pixels per bin along each axis; None picks the smallest that gives at most 128 bins
            across the wider side.
        grid: an ``AntiScatterGrid``. The DRR's primary has no grid loss (its flat field is taken with the grid in
            place), so the scatter is divided by the grid's primary transmission to keep the scatter-to-primary
            ratio right.
        seed: the first image's seed; each call advances it, so repeated renders draw fresh photons.
    """

    def __init__(
        self,
        photons_per_pixel: float = 1e4,
        binning: int | None = None,
        grid: AntiScatterGrid | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.photons_per_pixel = _check_photons(photons_per_pixel)
        if binning is not None and (isinstance(binning, bool) or int(binning) != binning or binning < 1):
            raise ValueError(f"binning must be None or a whole number of pixels >= 1, got {binning!r}")
        if grid is not None and not isinstance(grid, AntiScatterGrid):
            raise TypeError(f"grid must be an AntiScatterGrid or None, got {type(grid).__name__}")
        self.binning, self.grid, self.seed = binning, grid, int(seed)
        self._majorant_cache: tuple[tuple, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"photons_per_pixel={self.photons_per_pixel:g}, binning={self.binning}, grid={self.grid}"

    def bin_factor(self, height: int, width: int) -> int:
        """Detector pixels per bin for an ``height x width`` detector."""
        return int(self.binning) if self.binning is not None else max(1, math.ceil(max(height, width) / 128))

    def estimate(
        self,
        densities: Tensor,
        affine: Tensor,
        materials: Sequence[str],
        camera: Camera,
        spectrum: tuple[Tensor, Tensor],
        detector: EnergyIntegratingDetector,
        photons_per_pixel: Tensor,
    ) -> Tensor:
        """Expected scatter signal ``[B, 1, H, W]`` (keV per pixel) for images of N0 = ``photons_per_pixel`` ``[B]``.

        Args:
            densities, affine, materials: the DRR's material volume ``[M, I, J, K]`` (g/cm^3), its affine and names.
            camera: the DRR's cameras (full resolution).
            spectrum: ``(energy_keV [E], photons [E])`` of this render.
            detector: the DRR's energy-integrating detector.
            photons_per_pixel: each image's N0 (flat-field photons per pixel).
        """
        factor = self.bin_factor(camera.height, camera.width)
        binned = camera.binned(factor)
        energy = torch.as_tensor(spectrum[0]).detach().cpu()
        tables = transport_tables(materials, float(energy.max()))
        key = (densities.data_ptr(), densities._version, tuple(densities.shape), densities.device, tables.materials,
               tables.interaction.shape)  # fmt: skip
        if self._majorant_cache is None or self._majorant_cache[0] != key:
            self._majorant_cache = (key, majorant(densities, tables.total))
        result = transport(
            densities, affine, materials, binned, spectrum, photons_per_pixel=self.photons_per_pixel,
            detector=detector, grid=self.grid, seed=self.seed, tables=tables,
            volume_majorant=self._majorant_cache[1],
        )  # fmt: skip
        self.seed += 1
        scatter = result.scatter.unsqueeze(1)  # [B, 1, h, w] per flat-field photon per pixel
        if self.grid is not None:
            scatter = scatter / self.grid.primary_transmission
        full = torch.nn.functional.interpolate(
            scatter, size=(binned.height * factor, binned.width * factor), mode="bilinear", align_corners=False
        )
        # The bins drop a remainder at the far edges: repeat the last row and column over it.
        full = torch.nn.functional.pad(
            full, (0, camera.width - full.shape[-1], 0, camera.height - full.shape[-2]), mode="replicate"
        )
        return full * photons_per_pixel.to(full).view(-1, 1, 1, 1)

"""X-ray tube spectra: tabulated W-anode spectra, DeepDRR presets, filtration, mean energy and half-value layer.

The spectra come from ``data/spectra_w12.csv``, generated once with SpekPy (tungsten anode, 12 degree anode angle,
1 keV bins, no inherent filtration) for every integer kVp in 40-150 by :mod:`torchdrr.physics.make_spectrum_tables`.
Aluminium filtration is applied here by Beer-Lambert attenuation with mu/rho from
:func:`torchdrr.physics.materials.mass_attenuation`, so one table serves every filtration. SpekPy is *not* needed at
run time. All outputs are float64 CPU tensors (spectra are tiny; the renderer moves them where it needs them).

A spectrum is a pair ``(energy_keV [E] float64, photons [E] float64)``: bin-centre energies in keV and the relative
photon fluence in each bin. Every helper accepts any such pair, so users can pass their own spectra.
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from torchdrr.physics import materials

__all__ = [
    "PRESETS",
    "DEFAULT_PRESET",
    "KVP_RANGE",
    "spectrum",
    "spectrum_preset",
    "filter",
    "mean_energy",
    "half_value_layer",
    "air_mass_energy_absorption",
]

_DATA = pathlib.Path(__file__).parent / "data"
_SPECTRA_CSV = _DATA / "spectra_w12.csv"
_AIR_CSV = _DATA / "air_nist.csv"

#: DeepDRR spectrum presets: name -> (kVp, added filtration in mm Al).
PRESETS: dict[str, tuple[float, float]] = {"60kVp": (60.0, 3.5), "90kVp": (90.0, 4.0), "120kVp": (120.0, 4.3)}
DEFAULT_PRESET = "90kVp"


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _spectra_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the SpekPy table: (energy_keV [E], kvp [K], fluence [E, K]) as float64 numpy arrays."""
    with _SPECTRA_CSV.open() as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    kvps = np.array([float(v) for v in lines[0].strip().split(",")[1:]])
    data = np.loadtxt(lines[1:], delimiter=",", dtype=np.float64, ndmin=2)
    return data[:, 0], kvps, data[:, 1:]


#: Tube voltages covered by the committed table (kVp, inclusive).
KVP_RANGE: tuple[float, float] = (40.0, 150.0)


@functools.lru_cache(maxsize=1)
def _air_table() -> tuple[np.ndarray, np.ndarray]:
    """NIST dry-air table: (energy_keV [N], mu_en/rho cm^2/g [N]); edge energies appear twice (below, above)."""
    rows = []
    with _AIR_CSV.open() as fh:
        for ln in fh:
            if ln.startswith("#") or ln.startswith("energy"):
                continue
            parts = ln.strip().split(",")
            if len(parts) >= 3:
                rows.append((float(parts[0]), float(parts[2])))
    data = np.array(rows, dtype=np.float64)
    return data[:, 0], data[:, 1]


def air_mass_energy_absorption(energy_keV: Tensor | np.ndarray | float) -> Tensor:
    """Mass energy-absorption coefficient of dry air, mu_en/rho (cm^2/g, float64, same shape as the input).

    Log-log interpolation of the NIST SRD 126 table (1 keV - 20 MeV). At an absorption edge the value above the
    edge is used. Energies outside the table raise ``ValueError``.
    """
    e = np.asarray(torch.as_tensor(energy_keV, dtype=torch.float64).cpu(), dtype=np.float64)
    et, mt = _air_table()
    if np.any(e < et[0]) or np.any(e > et[-1]):
        raise ValueError(f"energy_keV must lie in the NIST air table range [{et[0]:g}, {et[-1]:g}] keV")
    # side="right" so that an energy exactly at an edge falls in the interval that starts above the edge.
    hi = np.clip(np.searchsorted(et, e, side="right"), 1, et.size - 1)
    lo = hi - 1
    t = (np.log(e) - np.log(et[lo])) / (np.log(et[hi]) - np.log(et[lo]))
    out = np.exp(np.log(mt[lo]) + t * (np.log(mt[hi]) - np.log(mt[lo])))
    return torch.as_tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# Materials (delegated to torchdrr.physics.materials)
# --------------------------------------------------------------------------------------------------------------------
def _resolve_material(material: str) -> materials.Material:
    """A registered material (``materials.get_material``, which knows the filter metals and their aliases)."""
    if not isinstance(material, str) or not material.strip():
        raise ValueError(f"material must be a non-empty string, got {material!r}")
    return materials.get_material(material)


def _linear_attenuation_per_mm(material: str, energy_keV: Tensor) -> np.ndarray:
    """mu (1/mm, float64 numpy, shape of ``energy_keV``) = mu/rho (materials.py, Elam) * nominal density / 10."""
    mat = _resolve_material(material)
    return materials.mass_attenuation(mat, energy_keV).numpy() * mat.density / 10.0


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def _as_spectrum(
    energy_keV: Tensor | Sequence[float] | np.ndarray, photons: Tensor | Sequence[float] | np.ndarray
) -> tuple[Tensor, Tensor]:
    """Validate and convert a user spectrum to two 1-D float64 CPU tensors."""
    e = torch.as_tensor(energy_keV, dtype=torch.float64).detach().cpu()
    n = torch.as_tensor(photons, dtype=torch.float64).detach().cpu()
    if e.ndim != 1 or e.numel() == 0:
        raise ValueError(f"energy_keV must be a non-empty 1-D array, got shape {tuple(e.shape)}")
    if n.shape != e.shape:
        raise ValueError(f"photons must have the shape of energy_keV {tuple(e.shape)}, got {tuple(n.shape)}")
    if not torch.isfinite(e).all() or (e <= 0).any():
        raise ValueError("energy_keV must be finite and positive")
    if not torch.isfinite(n).all():
        raise ValueError("photons must be finite")
    if (n < 0).any():
        raise ValueError("photons must be non-negative")
    if n.sum() <= 0:
        raise ValueError("photons must not be all zero")
    return e, n


def _check_thickness(thickness_mm: float, name: str) -> float:
    t = float(thickness_mm)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{name} must be finite and >= 0 mm, got {thickness_mm}")
    return t


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def filter(
    energy_keV: Tensor | np.ndarray | Sequence[float],
    photons: Tensor | np.ndarray | Sequence[float],
    material: str,
    thickness_mm: float,
) -> Tensor:
    """Attenuate a spectrum through a slab: ``photons * exp(-mu/rho(E) * rho * t)`` (Beer-Lambert, narrow beam).

    Args:
        energy_keV: [E] bin-centre energies, keV.
        photons: [E] photon fluence per bin (any units, non-negative).
        material: a material registered in ``torchdrr.physics.materials`` ("water", "soft tissue", ...) at its
            nominal density, e.g. the filter metals "aluminum" (2.699 g/cm^3), "copper", "tin", "lead" (aliases
            "Al", "Cu", ...).
        thickness_mm: slab thickness, mm (>= 0).

    Returns:
        [E] float64 transmitted photon fluence (same units, not renormalised).
    """
    e, n = _as_spectrum(energy_keV, photons)
    t_mm = _check_thickness(thickness_mm, "thickness_mm")
    mu_mm = torch.as_tensor(_linear_attenuation_per_mm(material, e))
    return n * torch.exp(-mu_mm * t_mm)


def mean_energy(
    energy_keV: Tensor | np.ndarray | Sequence[float], photons: Tensor | np.ndarray | Sequence[float]
) -> float:
    """Photon-fluence-weighted mean energy ``sum(N E) / sum(N)`` in keV."""
    e, n = _as_spectrum(energy_keV, photons)
    return float((n * e).sum() / n.sum())


def half_value_layer(
    energy_keV: Tensor | np.ndarray | Sequence[float], photons: Tensor | np.ndarray | Sequence[float]
) -> float:
    """First half-value layer in mm Al, defined by air kerma.

    Air kerma is proportional to ``sum_E N(E) E mu_en/rho_air(E)`` (NIST dry air); the HVL is the Al thickness ``t``
    with ``sum N E mu_en/rho_air exp(-mu_Al t) = 0.5 sum N E mu_en/rho_air``, found by bisection on ``log`` of the
    kerma ratio (monotone in ``t``). For a monoenergetic beam this is exactly ``ln 2 / mu_Al(E)``.
    """
    e, n = _as_spectrum(energy_keV, photons)
    w = (n * e * air_mass_energy_absorption(e)).numpy()  # kerma weight per bin
    mu_mm = _linear_attenuation_per_mm("aluminum", e)
    keep = w > 0
    w, mu_mm = w[keep] / w[keep].sum(), mu_mm[keep]

    def excess(t: float) -> float:
        # log(kerma ratio) + ln 2; a log-sum-exp keeps it accurate even for very thick layers.
        a = np.log(w) - mu_mm * t
        m = a.max()
        return float(m + np.log(np.exp(a - m).sum()) + math.log(2.0))

    lo, hi = 0.0, math.log(2.0) / float(mu_mm.max())  # lower bound: the softest-possible beam's HVL
    while excess(hi) > 0:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def spectrum(kvp: float, filtration_mm_al: float = 0.0, energy_bin_keV: float = 1.0) -> tuple[Tensor, Tensor]:
    """W-anode tube spectrum (12 degree anode, SpekPy), filtered by ``filtration_mm_al`` of aluminium.

    Integer kVp values come straight from the table; a fractional kVp is linearly interpolated bin by bin between
    the two neighbouring integer kVp spectra and bins whose centre lies above ``kvp`` are zeroed (no photon can have
    more energy than the tube voltage allows). Outside :data:`KVP_RANGE` a ValueError is raised (SpekPy is not used
    on the fly, so results never depend on whether it is installed).

    Args:
        kvp: tube voltage in kVp, within ``KVP_RANGE`` (40-150).
        filtration_mm_al: added aluminium filtration, mm (>= 0). The table has no inherent filtration.
        energy_bin_keV: bin width in keV; a positive integer (1 keV bins are summed in groups).

    Returns:
        energy_keV: [E] float64 bin-centre energies (keV), up to the last non-empty bin.
        photons: [E] float64 relative photon fluence per bin, normalised to sum to 1.
    """
    try:
        kvp_f = float(kvp)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"kvp must be a number, got {kvp!r}") from exc
    if not (KVP_RANGE[0] <= kvp_f <= KVP_RANGE[1]):
        raise ValueError(f"kvp must lie in the tabulated range [{KVP_RANGE[0]:g}, {KVP_RANGE[1]:g}] kVp, got {kvp}")
    t_mm = _check_thickness(filtration_mm_al, "filtration_mm_al")
    width = float(energy_bin_keV)
    if not (width >= 1 and width == int(width)):
        raise ValueError(f"energy_bin_keV must be a positive integer number of keV, got {energy_bin_keV}")
    width_i = int(width)

    e_tab, k_tab, f_tab = _spectra_table()
    j = int(np.clip(np.searchsorted(k_tab, kvp_f, side="right") - 1, 0, k_tab.size - 2))
    a = (kvp_f - k_tab[j]) / (k_tab[j + 1] - k_tab[j])
    f = (1.0 - a) * f_tab[:, j] + a * f_tab[:, j + 1]
    f = np.where(e_tab > kvp_f, 0.0, f)
    last = int(np.nonzero(f)[0].max()) + 1
    e, f = e_tab[:last], f[:last]

    if width_i > 1:
        # Sum groups of 1 keV bins; the new centre is the middle of the group's outer edges.
        nb = math.ceil(e.size / width_i)
        pad = nb * width_i - e.size
        f = np.concatenate([f, np.zeros(pad)]).reshape(nb, width_i).sum(axis=1)
        e = e[0] - 0.5 + width_i * (np.arange(nb) + 0.5)

    e_t = torch.as_tensor(e, dtype=torch.float64)
    n_t = torch.as_tensor(f, dtype=torch.float64)
    if t_mm > 0:
        n_t = filter(e_t, n_t, "aluminum", t_mm)
    return e_t, n_t / n_t.sum()


def spectrum_preset(name: str = DEFAULT_PRESET, energy_bin_keV: float = 1.0) -> tuple[Tensor, Tensor]:
    """DeepDRR preset spectrum ("60kVp", "90kVp" default, "120kVp"): see :data:`PRESETS` for kVp and mm Al."""
    if name not in PRESETS:
        raise ValueError(f"unknown spectrum preset name {name!r}; valid names: {sorted(PRESETS)}")
    kvp, mm_al = PRESETS[name]
    return spectrum(kvp, filtration_mm_al=mm_al, energy_bin_keV=energy_bin_keV)

"""Material definitions and X-ray mass attenuation coefficients.

Mass attenuation coefficients come from the Elam et al. tables shipped with ``xraydb`` (total, including coherent
scattering) and are combined with the mixture rule: mu/rho = sum_i w_i (mu/rho)_i, with w_i the mass fraction of
element i. xraydb is only queried when a (materials, energies) table is first needed; the result is cached so that
rendering never calls into xraydb.

ICRU-44 compositions are as tabulated by NIST, "X-Ray Mass Attenuation Coefficients" (Hubbell & Seltzer,
NISTIR 5632 / NIST Standard Reference Database 126), Table 2,
https://physics.nist.gov/PhysRefData/XrayMassCoef/tab2.html (rows marked "(ICRU-44)").
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ENERGY_RANGE_KEV",
    "Material",
    "attenuation_table",
    "get_material",
    "iodinated_contrast",
    "mass_attenuation",
    "material_names",
    "register_material",
]

# The Elam tables in xraydb are reliable between 100 eV and 800 keV (xraydb warns outside); diagnostic X-ray work
# never needs less than 1 keV, and below that the per-element table extrapolation is not trustworthy anyway.
ENERGY_RANGE_KEV: tuple[float, float] = (1.0, 800.0)

_FRACTION_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class Material:
    """A homogeneous material.

    Args:
        name: Lookup name (case-insensitive when registered).
        composition: Element symbol -> mass fraction (fractions must sum to 1 within 1e-3), or a chemical formula
            string such as ``"H2O"`` parsed with ``xraydb.chemparse`` and converted to mass fractions.
        density: Nominal density in g/cm^3 (> 0).
    """

    name: str
    composition: Mapping[str, float] | str
    density: float
    fractions: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import xraydb

        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not (isinstance(self.density, (int, float)) and math.isfinite(self.density) and self.density > 0):
            raise ValueError(f"density must be a positive finite number in g/cm^3, got {self.density!r}")
        if isinstance(self.composition, str):
            try:
                counts = xraydb.chemparse(self.composition)
            except Exception as exc:  # xraydb raises assorted errors on malformed formulas
                raise ValueError(f"composition: cannot parse formula {self.composition!r}: {exc}") from exc
            masses = {el: n * xraydb.atomic_mass(el) for el, n in counts.items()}
            total = sum(masses.values())
            fractions = {el: m / total for el, m in masses.items()}
        else:
            fractions = {str(el): float(w) for el, w in dict(self.composition).items()}
            if not fractions:
                raise ValueError("composition must not be empty")
            bad = {el: w for el, w in fractions.items() if not (math.isfinite(w) and w >= 0)}
            if bad:
                raise ValueError(f"composition: mass fractions must be finite and >= 0, got {bad}")
            total = sum(fractions.values())
            if abs(total - 1.0) > _FRACTION_TOLERANCE:
                raise ValueError(f"composition: mass fractions of {self.name!r} sum to {total:.6f}, expected 1")
            # Renormalise the tabulated rounding (e.g. 0.999) so the mixture rule is exact.
            fractions = {el: w / total for el, w in fractions.items()}
        for el in fractions:
            try:
                xraydb.atomic_number(el)
            except Exception as exc:
                raise ValueError(f"composition: unknown element symbol {el!r} in {self.name!r}") from exc
            if xraydb.atomic_number(el) is None:
                raise ValueError(f"composition: unknown element symbol {el!r} in {self.name!r}")
        object.__setattr__(self, "fractions", fractions)


# --- Built-in materials --------------------------------------------------------------------------------------------
# NIST Table 2 (see module docstring). Air: "Air, Dry (near sea level)"; water: "Water, Liquid".
_BUILTIN = [
    Material("air", {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827}, 0.001205),
    Material("water", {"H": 0.111898, "O": 0.888102}, 1.0),
    Material(
        "soft tissue",  # Tissue, Soft (ICRU-44)
        {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.708, "Na": 0.002, "P": 0.003, "S": 0.003, "Cl": 0.002, "K": 0.003},
        1.06,
    ),
    Material(
        "cortical bone",  # Bone, Cortical (ICRU-44)
        {"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001, "Mg": 0.002, "P": 0.103, "S": 0.003, "Ca": 0.225},
        1.92,
    ),
    Material(
        "lung",  # Lung Tissue (ICRU-44)
        {"H": 0.103, "C": 0.105, "N": 0.031, "O": 0.749, "Na": 0.002, "P": 0.002, "S": 0.003, "Cl": 0.003, "K": 0.002},
        1.05,
    ),
    Material(
        "adipose",  # Adipose Tissue (ICRU-44)
        {"H": 0.114, "C": 0.598, "N": 0.007, "O": 0.278, "Na": 0.001, "S": 0.001, "Cl": 0.001},
        0.95,
    ),
    Material(
        "muscle",  # Muscle, Skeletal (ICRU-44)
        {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.710, "Na": 0.001, "P": 0.002, "S": 0.003, "Cl": 0.001, "K": 0.004},
        1.05,
    ),
    Material(
        "blood",  # Blood, Whole (ICRU-44)
        {
            "H": 0.102,
            "C": 0.110,
            "N": 0.033,
            "O": 0.745,
            "Na": 0.001,
            "P": 0.001,
            "S": 0.002,
            "Cl": 0.003,
            "K": 0.002,
            "Fe": 0.001,
        },
        1.06,
    ),
    Material("titanium", {"Ti": 1.0}, 4.506),
    Material(
        "316L stainless steel",  # nominal 316L: Fe balance, Cr 17, Ni 12, Mo 2.5, Mn 2, Si 1 % by mass
        {"Fe": 0.655, "Cr": 0.17, "Ni": 0.12, "Mo": 0.025, "Mn": 0.02, "Si": 0.01},
        8.0,
    ),
    # Detector absorbers: the scintillator of flat-panel detectors and the sensor of photon-counting ones.
    Material("cesium iodide", "CsI", 4.51),
    Material("cadmium telluride", "CdTe", 5.85),
    # Pure elements used as beam filters (nominal densities).
    Material("aluminum", {"Al": 1.0}, 2.699),
    Material("copper", {"Cu": 1.0}, 8.96),
    Material("tin", {"Sn": 1.0}, 7.31),
    Material("lead", {"Pb": 1.0}, 11.35),
]

_REGISTRY: dict[str, Material] = {m.name.lower(): m for m in _BUILTIN}
# Other names users write for the same materials (case-insensitive).
_ALIASES = {
    "al": "aluminum",
    "aluminium": "aluminum",
    "cu": "copper",
    "sn": "tin",
    "pb": "lead",
    "ti": "titanium",
    "csi": "cesium iodide",
    "cdte": "cadmium telluride",
}

DEFAULT_IODINE_MASS_FRACTION = 0.02


def iodinated_contrast(iodine_mass_fraction: float = DEFAULT_IODINE_MASS_FRACTION) -> Material:
    """Whole blood (ICRU-44) mixed with iodine.

    Args:
        iodine_mass_fraction: Mass fraction of iodine in [0, 1). Blood's elements are scaled by (1 - fraction).

    Returns:
        A ``Material`` named ``"iodinated contrast"``. Its density is blood's (1.06 g/cm^3) raised by the iodine mass
        under the simple assumption that iodine adds mass without adding volume: rho = rho_blood / (1 - w_I).
    """
    w = float(iodine_mass_fraction)
    if not (math.isfinite(w) and 0.0 <= w < 1.0):
        raise ValueError(f"iodine_mass_fraction must be in [0, 1), got {iodine_mass_fraction!r}")
    blood = _REGISTRY["blood"]
    comp = {el: f * (1.0 - w) for el, f in blood.fractions.items()}
    comp["I"] = comp.get("I", 0.0) + w
    return Material("iodinated contrast", comp, blood.density / (1.0 - w))


_REGISTRY["iodinated contrast"] = iodinated_contrast()


def material_names() -> list[str]:
    """Names of all registered materials (built-in and user-registered)."""
    return sorted(_REGISTRY)


def register_material(material: Material, overwrite: bool = False) -> None:
    """Register a user material so that it can be referred to by name.

    Args:
        material: The material to add.
        overwrite: Replace an existing material of the same (case-insensitive) name.
    """
    if not isinstance(material, Material):
        raise TypeError(f"material must be a Material, got {type(material).__name__}")
    key = material.name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"material {material.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = material
    # Cached tables may hold the old definition under this name.
    _table_cached.cache_clear()
    _material_mu_cached.cache_clear()


def get_material(material: str | Material) -> Material:
    """Look up a material by name (case-insensitive; "Al", "Cu", "Sn", "Pb", "Ti" and "aluminium" are aliases); a
    ``Material`` is returned unchanged."""
    if isinstance(material, Material):
        return material
    if not isinstance(material, str):
        raise TypeError(f"material must be a str or Material, got {type(material).__name__}")
    key = material.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown material {material!r}; valid materials are: {', '.join(material_names())}")
    return _REGISTRY[key]


def _check_energies(energy: np.ndarray) -> None:
    lo, hi = ENERGY_RANGE_KEV
    if energy.size and (not np.all(np.isfinite(energy)) or energy.min() < lo or energy.max() > hi):
        raise ValueError(
            f"energy_keV must lie within [{lo:g}, {hi:g}] keV (range of the Elam tables), "
            f"got values in [{energy.min():g}, {energy.max():g}]"
        )


def _mu_rho_numpy(material: Material, energy_keV: np.ndarray, kind: str = "total") -> np.ndarray:
    """mu/rho (cm^2/g) by the mixture rule; ``kind`` is xraydb's: "total", or the partial "photo", "incoh" (Compton)
    or "coh" (Rayleigh)."""
    import xraydb

    energy_eV = np.asarray(energy_keV, dtype=np.float64).reshape(-1) * 1000.0
    out = np.zeros_like(energy_eV)
    if energy_eV.size == 0:
        return out
    with warnings.catch_warnings():
        # Range has been checked already; xraydb's reliability warnings would only be noise.
        warnings.simplefilter("ignore", UserWarning)
        for el, w in material.fractions.items():
            out += w * np.asarray(xraydb.mu_elam(el, energy_eV, kind=kind), dtype=np.float64).reshape(-1)
    return out


@functools.lru_cache(maxsize=256)
def _material_mu_cached(material: Material | str, energies: tuple[float, ...]) -> np.ndarray:
    out = _mu_rho_numpy(get_material(material), np.asarray(energies, dtype=np.float64))
    out.setflags(write=False)
    return out


def _to_numpy_energies(energy_keV: Tensor | float | Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    if isinstance(energy_keV, Tensor):
        arr = energy_keV.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(energy_keV, dtype=np.float64)
    return arr.reshape(-1), tuple(arr.shape)


def mass_attenuation(material: str | Material, energy_keV: Tensor | float) -> Tensor:
    """Total mass attenuation coefficient (with coherent scattering) of a material.

    Args:
        material: Registered material name (see ``material_names()``) or a ``Material``.
        energy_keV: Photon energies in keV, any shape, within ``ENERGY_RANGE_KEV``.

    Returns:
        mu/rho in cm^2/g, float64, same shape as ``energy_keV`` (0-d for a Python float), on the energy tensor's
        device (CPU for a float). Not differentiable with respect to energy (tabulated data).
    """
    mat = get_material(material)
    flat, shape = _to_numpy_energies(energy_keV)
    _check_energies(flat)
    # Hashable key: a registered material is keyed by its name so that register_material(overwrite=True) is honoured.
    key: Material | str = mat.name if _REGISTRY.get(mat.name.lower()) is mat else mat
    values = _material_mu_cached(key, tuple(flat.tolist()))
    device = energy_keV.device if isinstance(energy_keV, Tensor) else torch.device("cpu")
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(device)


@functools.lru_cache(maxsize=64)
def _table_cached(names: tuple[str, ...], energies: tuple[float, ...]) -> Tensor:
    rows = [_mu_rho_numpy(get_material(n), np.asarray(energies, dtype=np.float64)) for n in names]
    return torch.tensor(np.stack(rows) if rows else np.zeros((0, len(energies))), dtype=torch.float64)


def attenuation_table(materials: Sequence[str], energy_keV: Tensor) -> Tensor:
    """Mass attenuation table for several materials on an energy grid.

    Args:
        materials: M registered material names.
        energy_keV: [E] photon energies in keV (a 1-D tensor or sequence; scalars are treated as [1]).

    Returns:
        [M, E] float64 tensor of mu/rho in cm^2/g on ``energy_keV``'s device. The CPU table is cached per
        (names, energies); callers get a fresh copy so in-place edits cannot corrupt the cache.
    """
    if isinstance(materials, str):
        raise TypeError("materials must be a sequence of names, not a single string")
    names = tuple(get_material(m).name for m in materials)
    flat, _ = _to_numpy_energies(energy_keV)
    _check_energies(flat)
    table = _table_cached(names, tuple(flat.tolist()))
    device = energy_keV.device if isinstance(energy_keV, Tensor) else torch.device("cpu")
    return table.to(device, copy=True)

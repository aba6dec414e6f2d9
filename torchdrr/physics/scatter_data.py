"""Interaction data for the Monte Carlo photon transport (``torchdrr.physics.montecarlo``).

For each material, on a uniform energy grid:

* partial mass attenuation coefficients for photoelectric absorption, Compton (incoherent) and Rayleigh (coherent)
  scattering, from the Elam tables in ``xraydb`` (the same source as ``materials.mass_attenuation``, whose total is
  their sum), combined with the mixture rule;
* the angular distributions: Compton = Klein–Nishina × S(x) / Z and Rayleigh = Thomson × F²(x), with S and F the
  incoherent scattering function and atomic form factor of each element (committed table
  ``data/scattering_factors.npz``, made with xraylib by ``make_scatter_tables``), combined per material in the
  independent-atom approximation: S_mat = Σ_i n_i S_i and F²_mat = Σ_i n_i F_i², with n_i = w_i / A_i atoms per gram.

x = sin(θ/2) / λ is the momentum transfer in 1/Å (xraylib's convention).
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .materials import Material, _mu_rho_numpy, get_material

__all__ = ["HC_KEV_ANGSTROM", "TransportTables", "majorant", "transport_tables"]

HC_KEV_ANGSTROM = 12.3984198  # wavelength (Å) = hc / E (keV)
_TABLE = pathlib.Path(__file__).parent / "data" / "scattering_factors.npz"
# Resolution of the sampling tables: the Compton S(x) / Z table on a uniform x grid and the Rayleigh inverse CDF on a
# uniform probability grid. Both are read with linear interpolation.
COMPTON_POINTS = 2048
RAYLEIGH_POINTS = 4096
_RAYLEIGH_FINE_POINTS = 20000  # the integral of F^2 is built on this many x values before it is inverted


@functools.lru_cache(maxsize=1)
def _element_factors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(_TABLE) as table:
        return (
            table["x"].astype(np.float64),
            table["form_factor"].astype(np.float64),
            table["scattering_function"].astype(np.float64),
        )


def _atoms_per_gram(material: Material) -> list[tuple[int, float]]:
    """(Z, relative atoms per gram w_i / A_i) of the material's elements; refuses elements the table lacks."""
    import xraydb

    x, form_factor, _ = _element_factors()
    atoms = []
    for element, fraction in material.fractions.items():
        z = int(xraydb.atomic_number(element))
        if not 1 <= z <= form_factor.shape[0]:
            raise ValueError(
                f"material {material.name!r} has no scattering data: element {element} (Z = {z}) is beyond the "
                f"form-factor table (Z = 1 to {form_factor.shape[0]})"
            )
        if fraction > 0:
            atoms.append((z, fraction / float(xraydb.atomic_mass(element))))
    return atoms


def _interpolate(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    grid = _element_factors()[0]
    return np.interp(x, grid, values)


def compton_scattering_ratio(material: Material, x: np.ndarray) -> np.ndarray:
    """S_mat(x) / Z_mat in [0, 1]: the binding correction to Klein–Nishina of the material at momentum transfer x
    (1/Å)."""
    _, _, scattering_function = _element_factors()
    atoms = _atoms_per_gram(material)
    s = sum(n * _interpolate(scattering_function[z - 1], x) for z, n in atoms)
    electrons = sum(n * z for z, n in atoms)
    return np.clip(s / electrons, 0.0, 1.0)


def rayleigh_form_factor_squared(material: Material, x: np.ndarray) -> np.ndarray:
    """F²_mat(x) per gram (arbitrary scale; only its shape matters for sampling) at momentum transfer x (1/Å)."""
    _, form_factor, _ = _element_factors()
    return sum(n * _interpolate(form_factor[z - 1], x) ** 2 for z, n in _atoms_per_gram(material))


def _partial_attenuation(material: Material, energy_keV: np.ndarray) -> np.ndarray:
    """[E, 3] photoelectric, Compton and Rayleigh mass attenuation (cm^2/g) by the mixture rule."""
    return np.stack([_mu_rho_numpy(material, energy_keV, kind) for kind in ("photo", "incoh", "coh")], axis=1)


@dataclass(frozen=True)
class TransportTables:
    """Everything the transport op reads about the materials, as float32 CPU tensors (see ``csrc/ops.cpp``).

    Attributes:
        materials: the M material names, in the order of the density channels.
        grid_start_keV, grid_step_keV: the energy grid ``E_g = start + g * step``, g < G.
        interaction: ``[G, M, 3]`` photoelectric, Compton and Rayleigh linear attenuation per mm per g/cm^3
            (mass attenuation in cm^2/g divided by 10).
        compton_sf: ``[M, X]`` S(x) / Z on x = 0, step, ... (1/Å).
        compton_x_step: that step, 1/Å.
        rayleigh_icdf: ``[M, U]`` x^2 (1/Å^2) at cumulative fraction u / (U - 1) of the integral of F^2 over x^2.
        rayleigh_fraction: ``[M, G]`` the fraction of that integral below x_max(E_g)^2 = (E_g / hc)^2.
    """

    materials: tuple[str, ...]
    grid_start_keV: float
    grid_step_keV: float
    interaction: Tensor
    compton_sf: Tensor
    compton_x_step: float
    rayleigh_icdf: Tensor
    rayleigh_fraction: Tensor

    @property
    def total(self) -> Tensor:
        """``[G, M]`` total linear attenuation per mm per g/cm^3 (the sum of ``interaction``; for the majorant)."""
        return self.interaction.sum(-1)

    @property
    def grid_energies(self) -> Tensor:
        """``[G]`` the grid's energies in keV (float64)."""
        g = self.interaction.shape[0]
        return self.grid_start_keV + self.grid_step_keV * torch.arange(g, dtype=torch.float64)


@functools.lru_cache(maxsize=32)
def _tables_cached(names: tuple[str, ...], top_keV: float, start: float, step: float) -> TransportTables:
    materials = [get_material(n) for n in names]
    points = int(math.ceil((top_keV - start) / step)) + 1
    energy = start + step * np.arange(points)
    x_top = top_keV / HC_KEV_ANGSTROM
    interaction = np.stack([_partial_attenuation(m, energy) for m in materials], axis=1) / 10.0  # [G, M, 3] per mm

    compton_x = np.linspace(0.0, x_top, COMPTON_POINTS)
    compton = np.stack([compton_scattering_ratio(m, compton_x) for m in materials])

    # Rayleigh: the integral of F^2 over y = x^2, inverted on a uniform probability grid.
    fine_x = np.concatenate([[0.0], np.geomspace(1e-4, x_top, _RAYLEIGH_FINE_POINTS - 1)])
    fine_y = fine_x**2
    u = np.linspace(0.0, 1.0, RAYLEIGH_POINTS)
    y_max = (energy / HC_KEV_ANGSTROM) ** 2
    icdf, fraction = [], []
    for m in materials:
        f2 = rayleigh_form_factor_squared(m, fine_x)
        cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (f2[1:] + f2[:-1]) * np.diff(fine_y))])
        total = cumulative[-1]
        icdf.append(np.interp(u * total, cumulative, fine_y))
        fraction.append(np.interp(y_max, fine_y, cumulative) / total)

    def as_tensor(a: np.ndarray) -> Tensor:
        return torch.tensor(np.asarray(a), dtype=torch.float32)

    return TransportTables(
        materials=names,
        grid_start_keV=start,
        grid_step_keV=step,
        interaction=as_tensor(interaction),
        compton_sf=as_tensor(compton),
        compton_x_step=float(compton_x[1] - compton_x[0]),
        rayleigh_icdf=as_tensor(np.stack(icdf)),
        rayleigh_fraction=as_tensor(np.stack(fraction)),
    )


def transport_tables(
    materials: Sequence[str | Material], max_energy_keV: float, grid_step_keV: float = 0.5, grid_start_keV: float = 1.0
) -> TransportTables:
    """The transport tables of ``materials`` (one per density channel) for photons up to ``max_energy_keV``.

    The default grid (1 keV, step 0.5 keV) has the spectra's bin centres (1.5, 2.5, ... keV) as nodes, so a
    primary photon sees exactly the attenuation of the analytic DRR. Cached per (materials, grid).

    Raises:
        ValueError: a material has no scattering data (an element beyond the form-factor table), an unknown
            material, or a grid outside the attenuation tables (1 to 800 keV).
    """
    if isinstance(materials, str):
        raise TypeError("materials must be a sequence of material names, not a single string")
    resolved = [get_material(m) for m in materials]
    if not resolved:
        raise ValueError("materials must name at least one material")
    for m in resolved:
        _atoms_per_gram(m)  # refuses materials without scattering data, by name
    top = float(max_energy_keV) + float(grid_step_keV)
    if not (math.isfinite(top) and 1.0 <= grid_start_keV < top <= 800.0 and grid_step_keV > 0):
        raise ValueError(
            f"the energy grid must lie within 1-800 keV with a positive step, got start {grid_start_keV}, "
            f"top {max_energy_keV}, step {grid_step_keV}"
        )
    key = tuple(m.name for m in resolved)
    return _tables_cached(key, top, float(grid_start_keV), float(grid_step_keV))


def majorant(densities: Tensor, total: Tensor, chunk_elements: int = 1 << 26) -> Tensor:
    """The Woodcock majorant: the largest linear attenuation (per mm) of any voxel at each grid energy.

    Args:
        densities: ``[M, I, J, K]`` g/cm^3 per material.
        total: ``[G, M]`` total linear attenuation per mm per g/cm^3 (``TransportTables.total``).
        chunk_elements: the most ``G x voxels`` products held at once (memory bound).

    Returns:
        ``[G]`` float32 on ``densities``' device, raised by 1e-4 relative so that float32 rounding in the kernel
        can never put a voxel above it (which would bias the tracking).
    """
    m = densities.shape[0]
    flat = densities.detach().reshape(m, -1).to(torch.float32)
    table = total.to(flat.device, torch.float32)
    best = torch.zeros(table.shape[0], dtype=torch.float32, device=flat.device)
    step = max(1, chunk_elements // max(1, table.shape[0]))
    for begin in range(0, flat.shape[1], step):
        best = torch.maximum(best, (table @ flat[:, begin : begin + step]).amax(dim=1))
    return best * (1.0 + 1e-4)

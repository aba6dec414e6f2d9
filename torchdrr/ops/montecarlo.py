"""The Monte Carlo transport op (``torch.ops.torchdrr.montecarlo_transport``, csrc/montecarlo/) and its fake kernel.

The op is not differentiable (a Monte Carlo estimate); ``torchdrr.physics.montecarlo.transport`` is the user-facing
function that builds its tables and normalises its tallies. The fake kernel lets ``torch.compile`` trace through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._extension import require_kernels_for

__all__ = ["TALLIES", "montecarlo_transport"]

#: The tally planes of the op's first output, in order; then the sums of their squares.
TALLIES = ("primary", "single", "multiple")


@torch.library.register_fake("torchdrr::montecarlo_transport")
def _transport_fake(densities, affine, sources, ray_matrices, height, width, *args):
    cameras = sources.shape[0]
    tally = densities.new_empty((cameras, 2 * len(TALLIES), height, width), dtype=torch.float64)
    return tally, densities.new_empty((cameras, densities.shape[0], 2), dtype=torch.float64)


def montecarlo_transport(
    densities: Tensor,
    affine: Tensor,
    sources: Tensor,
    ray_matrices: Tensor,
    height: int,
    width: int,
    field: Sequence[float],
    spectrum_energy: Tensor,
    spectrum_cdf: Tensor,
    grid_start: float,
    grid_step: float,
    interaction: Tensor,
    majorant: Tensor,
    efficiency: Tensor,
    energy_cutoff: float,
    compton_sf: Tensor,
    compton_x_step: float,
    rayleigh_icdf: Tensor,
    rayleigh_fraction: Tensor,
    photons: int,
    seed: int,
    first_photon: int,
    grid_ratio: float,
    grid_transmission: float,
    falloff: bool,
) -> tuple[Tensor, Tensor]:
    """Runs ``photons`` histories per camera; see the schema in csrc/ops.cpp for every argument.

    Returns:
        ``tally`` ``[B, 6, H, W]`` float64 (keV detected per pixel from primary, single-scatter and multiple-scatter
        photons, then the sums of their squares) and ``absorbed`` ``[B, M, 2]`` float64 (keV left in each material,
        and the sum over photons of its square).
    """
    require_kernels_for(densities.device, "densities")
    return torch.ops.torchdrr.montecarlo_transport(
        densities, affine, sources, ray_matrices, int(height), int(width), [float(f) for f in field],
        spectrum_energy, spectrum_cdf, float(grid_start), float(grid_step), interaction, majorant, efficiency,
        float(energy_cutoff), compton_sf, float(compton_x_step), rayleigh_icdf, rayleigh_fraction, int(photons),
        int(seed), int(first_photon), float(grid_ratio), float(grid_transmission), bool(falloff),
    )  # fmt: skip

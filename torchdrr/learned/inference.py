"""Segmenting a real CT with the material network: on the network's voxel grid, back on the CT's.

The network was trained on 2 mm phantoms, so a CT is resampled to that voxel size first (trilinear, the same box),
segmented there with the sliding window, and its class probabilities are interpolated back onto the CT's own voxels
through the two grids' affines (trilinear, ``grid_sample``). The result feeds the DRR's material channels as
densities ``rho(HU) x probability`` (``ProbabilityMapSegmentation``), so rendering stays differentiable in everything
downstream of the materials.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from ..io import Volume, resample
from ..physics.segmentation import MaterialChannels, ProbabilityMapSegmentation
from .network import NetworkSegmentation, sliding_window_logits

__all__ = ["bundled_weights_path", "load_network", "network_material_channels", "segment_volume"]


def bundled_weights_path() -> Path:
    """The shipped weights of the material network (``torchdrr/assets/material_net.pt``; see
    ``torchdrr.learned.training`` for the command that reproduces them)."""
    return Path(str(resources.files("torchdrr.assets").joinpath("material_net.pt")))


def load_network(weights: str | Path | None = None, device: str | torch.device | None = None) -> NetworkSegmentation:
    """The material network from ``weights`` (default: the shipped ones), on ``device`` (default: the CPU)."""
    path = Path(weights) if weights is not None else bundled_weights_path()
    return NetworkSegmentation.from_checkpoint(path, device=device)  # raises FileNotFoundError naming a missing file


def _back_to_grid(probabilities: Tensor, coarse: Volume, fine: Volume) -> Tensor:
    """Interpolates ``[C, i, j, k]`` probabilities on ``coarse``'s voxels onto ``fine``'s voxels ``[C, I, J, K]``.

    Both grids share their axes (``resample`` keeps them), so each fine voxel index maps to a coarse index by one
    scale and offset per axis; ``grid_sample`` wants those as normalised coordinates in ``[-1, 1]``."""
    to_coarse = torch.linalg.solve(coarse.affine, fine.affine).to(torch.float64)  # fine index -> coarse index
    axes = []
    for axis, (n_fine, n_coarse) in enumerate(zip(fine.shape, coarse.shape, strict=True)):
        index = torch.arange(n_fine, dtype=torch.float64)
        mapped = to_coarse[axis, axis] * index + to_coarse[axis, 3]
        axes.append(((2 * mapped + 1) / n_coarse - 1).to(torch.float32))  # align_corners=False convention
    gi, gj, gk = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gk, gj, gi], dim=-1).unsqueeze(0).to(probabilities.device)  # grid_sample's order: x=k, y=j
    out = F.grid_sample(probabilities.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out[0]
    return out / out.sum(0, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def segment_volume(
    volume: Volume,
    network: NetworkSegmentation | None = None,
    spacing_mm: float | None = None,
    progress: bool = False,
) -> Tensor:
    """Class probabilities of every voxel of a CT: ``[C, I, J, K]`` float32 on the CPU, summing to 1 per voxel.

    Args:
        volume: the CT (HU).
        network: the material network (default: the shipped weights, on the CPU).
        spacing_mm: the voxel size the CT is segmented at (default: the network's training spacing).
        progress: show a progress bar over the sliding-window patches.

    Returns:
        Probabilities in the order of ``network.materials``.
    """
    network = network if network is not None else load_network()
    spacing = float(spacing_mm or network.spacing_mm or 2.0)
    coarse = resample(volume, spacing)
    probabilities = sliding_window_logits(
        network.network, coarse.data.float(), patch=network.patch, overlap=network.overlap,
        batch_size=network.batch_size, device=network.device, progress=progress,
    )  # fmt: skip
    return _back_to_grid(probabilities.float().cpu(), coarse, volume)


def network_material_channels(
    volume: Volume, network: NetworkSegmentation | None = None, progress: bool = False
) -> tuple[MaterialChannels, Tensor]:
    """The DRR's material channels of a CT from the network: densities ``[M, I, J, K]`` (g/cm^3) and the
    probabilities ``[M, I, J, K]`` they were made from."""
    network = network if network is not None else load_network()
    probabilities = segment_volume(volume, network, progress=progress)
    channels = ProbabilityMapSegmentation(network.materials)(probabilities, volume.data.float().cpu())
    return channels, probabilities

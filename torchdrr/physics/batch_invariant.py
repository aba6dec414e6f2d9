"""Reductions whose result for one image does not depend on the other images of the batch.

Training data must be reproducible sample by sample: ``torchdrr generate`` promises the same bytes whatever the
number of ranks, so an image must come out bit-identical whether it is rendered alone or in a batch of 64. PyTorch's
reductions do not promise that: the order in which a GPU reduction adds its terms depends on the launch
configuration, and that depends on the whole tensor's shape. These helpers avoid the question:

* ``ordered_sum`` adds the slices along a (short) dimension one after the other: element-wise additions only, the
  same order for every shape.
* ``fixed_point_mean`` averages many values per image (exposure control over all pixels) in integers, whose sums are
  exact in any order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fixed_point_mean", "ordered_mean", "ordered_sum"]


def ordered_sum(x: Tensor, dim: int) -> Tensor:
    """Sum of ``x`` over ``dim`` as ``x[0] + x[1] + ...`` (element-wise, in index order): one kernel per slice, so
    meant for short dimensions (energy groups, sub-rays, materials). The dimension is removed."""
    slices = x.unbind(dim)
    total = slices[0].clone()
    for part in slices[1:]:
        total += part
    return total


def ordered_mean(x: Tensor, dim: int) -> Tensor:
    """``ordered_sum(x, dim) / x.shape[dim]``."""
    n = x.shape[dim]
    return x.squeeze(dim) if n == 1 else ordered_sum(x, dim).div_(n)


def fixed_point_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of each row of ``values`` ``[B, N]`` (>= 0) over its ``mask`` ``[B, N]`` entries (all entries where a row's
    mask is empty, or without a mask), computed in 64-bit fixed point so that the result is exact in any order.

    Each row is scaled by its maximum (a max is order-independent) and rounded to integers of
    ``62 - ceil(log2(N + 1))`` bits, so a row sum cannot overflow. The rounding error of the mean is below
    ``N * 2**-(bits + 1)`` of the row's maximum: 2**-31 relative for 256 x 256 values, 5e-7 for 1240 x 960 (when
    one value dominates the row; far less for an image's pixels).

    Returns:
        ``[B]`` float64 means (0 for a row of zeros).
    """
    b, n = values.shape
    bits = 62 - math.ceil(math.log2(n + 1))
    values = values.to(torch.float64)
    peak = values.amax(1, keepdim=True)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    fixed = (values / scale * 2.0**bits).round_().to(torch.int64)
    total = fixed.sum(1)
    count = torch.full((b,), n, dtype=torch.int64, device=values.device)
    if mask is not None:
        masked_total, masked_count = (fixed * mask).sum(1), mask.sum(1, dtype=torch.int64)
        total = torch.where(masked_count > 0, masked_total, total)
        count = torch.where(masked_count > 0, masked_count, count)
    return total.to(torch.float64) / count.to(torch.float64) * scale.squeeze(1) * 2.0**-bits

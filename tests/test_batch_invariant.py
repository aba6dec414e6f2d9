"""The batch-invariant reductions: exact in any order, and accurate."""

from __future__ import annotations

import pytest
import torch

from torchdrr.physics.batch_invariant import fixed_point_mean, ordered_mean, ordered_sum


def test_ordered_sum_adds_the_slices_in_index_order(device) -> None:
    x = torch.rand(3, 5, 7, dtype=torch.float64, device=device)
    expected = x[:, 0].clone()
    for j in range(1, 5):
        expected = expected + x[:, j]
    assert torch.equal(ordered_sum(x, 1), expected)
    torch.testing.assert_close(ordered_mean(x, 1), x.mean(1), rtol=1e-15, atol=0)
    assert torch.equal(ordered_mean(x[:, :1], 1), x[:, 0])


@pytest.mark.parametrize("n", [7, 256 * 256])
def test_fixed_point_mean_is_accurate_and_order_independent(device, n) -> None:
    generator = torch.Generator().manual_seed(n)
    values = torch.rand(4, n, generator=generator, dtype=torch.float64).pow(3) * torch.tensor(
        [[1e-30], [1.0], [3e5], [0.0]]
    )
    values = values.to(device, torch.float32)
    mask = torch.rand(4, n, generator=generator).to(device) > 0.3
    mask[2] = False  # no body: the mean over every pixel
    got = fixed_point_mean(values, mask)
    v = values.double()
    expected = torch.stack([v[0][mask[0]].mean(), v[1][mask[1]].mean(), v[2].mean(), v[3][mask[3]].mean()])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)  # 1e-30 scale too: the row is scaled by its max
    assert got[3] == 0
    # Exact whatever the order of the values (and the batch): integer sums.
    order = torch.randperm(n, generator=generator).to(device)
    assert torch.equal(fixed_point_mean(values[:, order], mask[:, order]), got)
    assert torch.equal(fixed_point_mean(values[1:2], mask[1:2]), got[1:2])
    assert torch.equal(fixed_point_mean(values[2:3]), fixed_point_mean(values[2:3], mask[2:3]))

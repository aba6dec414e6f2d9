"""Tests for the pure-PyTorch ray-casting reference (the oracle for the C++/CUDA kernel).

Expected values come from independent computations: hand-derived chord lengths, a scalar world-space
parallelepiped clipper (no matrix inversion), closed-form integrals of linear fields and ``numpy.interp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchdrr.ops.reference import default_step, raycast_reference

from .geometry_cases import (
    AFFINES,
    INDEX_RAYS,
    MISSING_INDEX_RAYS,
    SHAPE,
    SPACING,
    outer_box_chord,
    random_rays,
    to_world,
    world_box_chord,
)

MODES = ("siddon", "trilinear")
RTOL = 1e-10
ATOL = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Uniform box: exact chord lengths
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine_name", list(AFFINES))
def test_uniform_box_chord_lengths(mode: str, affine_name: str) -> None:
    affine = AFFINES[affine_name]
    volume = torch.ones(SHAPE, dtype=torch.float64)
    sources = to_world(affine, [r[1] for r in INDEX_RAYS])
    targets = to_world(affine, [r[2] for r in INDEX_RAYS])
    got = raycast_reference(volume, affine, sources, targets, mode=mode)
    expected = torch.tensor(
        [outer_box_chord(affine, SHAPE, s.numpy(), t.numpy()) for s, t in zip(sources, targets, strict=True)]
    )
    assert got.shape == (len(INDEX_RAYS),)
    # Guard against a vacuous test: every ray except the zero-length one crosses the box.
    assert (expected[:-1] > 0.05).all()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_uniform_box_hand_computed(mode: str) -> None:
    """Chords derived by hand for the axis-aligned scaled affine (spacing 0.7, 0.8, 2.5 mm)."""
    affine = AFFINES["scaled"]
    volume = torch.ones(SHAPE, dtype=torch.float64)
    rays = [
        ([-3.0, 2.0, 3.0], [9.0, 2.0, 3.0], 5 * 0.7),  # full i extent
        ([1.0, 8.0, 3.3], [1.0, -2.0, 3.3], 6 * 0.8),  # full j extent, reversed
        ([2.2, 1.7, -4.0], [2.2, 1.7, 9.0], 7 * 2.5),  # full k extent
        ([1.0, 2.0, 3.0], [9.0, 2.0, 3.0], 3.5 * 0.7),  # starts inside at i = 1
        ([1.0, 2.0, 3.0], [1.0, 2.0, 5.0], 2.0 * 2.5),  # entirely inside
        ([-3.0, -0.25, 3.0], [9.0, -0.25, 3.0], 5 * 0.7),  # grazing inside the j = -1/2 face
        ([4.0, 5.0, 3.0], [5.0, 6.0, 3.0], math.hypot(0.5 * 0.7, 0.5 * 0.8)),  # corner clip
    ]
    sources = to_world(affine, [r[0] for r in rays])
    targets = to_world(affine, [r[1] for r in rays])
    got = raycast_reference(volume, affine, sources, targets, mode=mode)
    expected = torch.tensor([r[2] for r in rays], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine_name", list(AFFINES))
def test_missing_rays_are_exactly_zero(mode: str, affine_name: str) -> None:
    affine = AFFINES[affine_name]
    volume = torch.full(SHAPE, 3.0, dtype=torch.float64)
    sources = to_world(affine, [r[1] for r in MISSING_INDEX_RAYS]).requires_grad_(True)
    targets = to_world(affine, [r[2] for r in MISSING_INDEX_RAYS]).requires_grad_(True)
    got = raycast_reference(volume, affine, sources, targets, mode=mode)
    for s, t in zip(sources.detach(), targets.detach(), strict=True):
        assert outer_box_chord(affine, SHAPE, s.numpy(), t.numpy()) == 0.0
    assert torch.equal(got, torch.zeros(len(MISSING_INDEX_RAYS), dtype=torch.float64))
    got.sum().backward()
    assert torch.equal(sources.grad, torch.zeros_like(sources))
    assert torch.equal(targets.grad, torch.zeros_like(targets))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    mode=st.sampled_from(MODES),
    affine_name=st.sampled_from(list(AFFINES)),
    coords=st.lists(st.floats(-3.0, 10.0, allow_nan=False), min_size=6, max_size=6),
)
def test_uniform_boxrandom_rays(mode: str, affine_name: str, coords: list[float]) -> None:
    affine = AFFINES[affine_name]
    volume = torch.ones(SHAPE, dtype=torch.float64)
    source = to_world(affine, coords[:3])
    target = to_world(affine, coords[3:])
    got = raycast_reference(volume, affine, source, target, mode=mode)
    expected = outer_box_chord(affine, SHAPE, source.numpy(), target.numpy())
    assert got.shape == ()
    assert math.isclose(float(got), expected, rel_tol=1e-9, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Single bright voxel (Siddon): exact intersection length with that voxel's box
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine_name", list(AFFINES))
def test_bright_voxel_siddon(affine_name: str) -> None:
    affine = AFFINES[affine_name]
    voxel = np.array([2, 3, 4])
    volume = torch.zeros(SHAPE, dtype=torch.float64)
    volume[tuple(voxel)] = 1.0
    gen = np.random.default_rng(0)
    # Rays through random points of the voxel, in random directions, with endpoints inside/outside the volume.
    through = voxel + gen.uniform(-0.45, 0.45, size=(40, 3))
    direction = gen.normal(size=(40, 3))
    before = gen.uniform(0.0, 8.0, size=(40, 1))
    after = gen.uniform(0.0, 8.0, size=(40, 1))
    src_idx = through - before * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    tgt_idx = through + after * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    # Plus axis-parallel rays through the voxel.
    src_idx = np.concatenate([src_idx, [[2.1, 3.2, -3.0], [-1.0, 2.9, 4.3], [1.6, -2.0, 4.0]]])
    tgt_idx = np.concatenate([tgt_idx, [[2.1, 3.2, 9.0], [9.0, 2.9, 4.3], [1.6, 9.0, 4.0]]])
    sources, targets = to_world(affine, src_idx), to_world(affine, tgt_idx)
    got = raycast_reference(volume, affine, sources, targets, mode="siddon")
    expected = torch.tensor(
        [
            world_box_chord(affine, voxel - 0.5, voxel + 0.5, s.numpy(), t.numpy())
            for s, t in zip(sources, targets, strict=True)
        ]
    )
    assert (expected[-3:] > 0).all() and (expected > 0).float().mean() > 0.7
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# Channels, shapes and broadcasting
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_multichannel_equals_stacked_single_channel(mode: str) -> None:
    affine = AFFINES["rotated"]
    gen = torch.Generator().manual_seed(1)
    volume = torch.rand((3, *SHAPE), generator=gen, dtype=torch.float64)
    sources = to_world(affine, [r[1] for r in INDEX_RAYS])
    targets = to_world(affine, [r[2] for r in INDEX_RAYS])
    got = raycast_reference(volume, affine, sources, targets, mode=mode)
    assert got.shape == (len(INDEX_RAYS), 3)
    stacked = torch.stack([raycast_reference(volume[c], affine, sources, targets, mode=mode) for c in range(3)], dim=-1)
    torch.testing.assert_close(got, stacked, rtol=1e-14, atol=1e-14)
    assert (got[:-1].abs() > 0.01).all()


@pytest.mark.parametrize("mode", MODES)
def test_broadcasting_and_shapes(mode: str) -> None:
    affine = AFFINES["scaled"]
    gen = torch.Generator().manual_seed(2)
    batch, n_rays = 2, 4
    sources = to_world(affine, torch.tensor([[[-3.0, 2.0, 3.0]], [[2.0, -4.0, 1.0]]]).numpy())  # [B, 1, 3]
    targets = to_world(affine, (torch.rand((batch, n_rays, 3), generator=gen, dtype=torch.float64) * 4).numpy())
    volume4 = torch.rand((2, *SHAPE), generator=gen, dtype=torch.float64)
    out4 = raycast_reference(volume4, affine, sources, targets, mode=mode)
    out3 = raycast_reference(volume4[1], affine, sources, targets, mode=mode)
    assert out4.shape == (batch, n_rays, 2)
    assert out3.shape == (batch, n_rays)
    explicit = raycast_reference(volume4[1], affine, sources.expand(batch, n_rays, 3), targets, mode=mode)
    torch.testing.assert_close(out3, explicit, rtol=0, atol=0)
    torch.testing.assert_close(out4[..., 1], out3, rtol=1e-14, atol=1e-14)
    # Each ray on its own gives the same value as within the batch.
    single = raycast_reference(volume4[1], affine, sources[1, 0], targets[1, 2], mode=mode)
    assert single.shape == ()
    torch.testing.assert_close(single, out3[1, 2], rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Trilinear: linear fields, step semantics
# ----------------------------------------------------------------------------------------------------------


def _linear_field(coeffs: tuple[float, float, float, float], shape=SHAPE) -> torch.Tensor:
    i, j, k = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    a, b, c, d = coeffs
    return a * i + b * j + c * k + d


@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("step", [None, 0.37, 5.0])
def test_trilinear_linear_field_exact(affine_name: str, step: float | None) -> None:
    affine = AFFINES[affine_name]
    coeffs = (0.3, -1.1, 0.45, 2.0)
    volume = _linear_field(coeffs)
    gen = np.random.default_rng(3)
    # Both endpoints inside the centre-to-centre region [0, N-1]^3, so the whole segment is (convexity).
    upper = np.asarray(SHAPE, dtype=np.float64) - 1
    src_idx = gen.uniform(0, 1, size=(30, 3)) * upper
    tgt_idx = gen.uniform(0, 1, size=(30, 3)) * upper
    sources, targets = to_world(affine, src_idx), to_world(affine, tgt_idx)
    got = raycast_reference(volume, affine, sources, targets, mode="trilinear", step=step)

    def field(p: np.ndarray) -> np.ndarray:
        return coeffs[0] * p[:, 0] + coeffs[1] * p[:, 1] + coeffs[2] * p[:, 2] + coeffs[3]

    length = np.linalg.norm((targets - sources).numpy(), axis=1)
    expected = torch.tensor(length * 0.5 * (field(src_idx) + field(tgt_idx)))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_trilinear_clamps_to_edge_voxels() -> None:
    """Between the outer face and the edge voxel centre the field is constant (clamped), not extrapolated."""
    affine = AFFINES["scaled"]
    volume = _linear_field((1.0, 0.0, 0.0, 2.0))  # v = i + 2 at the centres, i = 0..4
    # Along i on a centre line the index-space profile is 2 on [-0.5, 0], i + 2 on [0, 4], 6 on [4, 4.5].
    # One ray enters through the i = -1/2 face and ends at i = 2, the other starts at i = 3 and leaves through
    # i = 4.5. Step 0.36 mm gives N = ceil(1.75 / 0.36) = 5 and ceil(1.05 / 0.36) = 3 pieces of 0.5 index
    # units, so no piece straddles the kinks at i = 0 and i = 4 and the midpoint rule is exact for the clamped
    # profile (extrapolation would give 1.75 and 6.25 there). (Step 0.35 would make L / step an integer up to
    # rounding, where ceil is ill-conditioned.)
    sources = to_world(affine, [[-3.0, 2.0, 3.0], [3.0, 2.0, 3.0]])
    targets = to_world(affine, [[2.0, 2.0, 3.0], [9.0, 2.0, 3.0]])
    got = raycast_reference(volume, affine, sources, targets, mode="trilinear", step=0.36)
    expected = 0.7 * torch.tensor([0.5 * 2.0 + (2.0 + 4.0), 5.5 + 0.5 * 6.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def _midpoint_rule_along_i(profile: np.ndarray, lo: float, hi: float, n: int, spacing: float) -> float:
    """Midpoint rule with ``n`` pieces over index range [lo, hi] of a 1-D linear-interpolated profile."""
    x = lo + (np.arange(n) + 0.5) / n * (hi - lo)
    return float(np.interp(x, np.arange(len(profile)), profile).sum() * (hi - lo) * spacing / n)


@pytest.mark.parametrize("affine_name", list(AFFINES))
def test_trilinear_sample_count_is_ceil(affine_name: str) -> None:
    affine = AFFINES[affine_name]
    profile = np.array([0.0, 3.0, -1.0, 4.0, 0.5])  # non-linear along i
    volume = torch.tensor(profile)[:, None, None].expand(SHAPE).contiguous()
    # Segment along i on a centre line (trilinear == 1-D interpolation), inside the box: L = 3.7 * 0.7 mm.
    lo, hi = 0.2, 3.9
    source, target = to_world(affine, [lo, 2.0, 3.0]), to_world(affine, [hi, 2.0, 3.0])
    length = (hi - lo) * SPACING[0]  # 2.59 mm
    for step in (1.0, 0.5, 0.3, 2.59 / 4.5, 10.0):
        n = math.ceil(length / step)
        got = float(raycast_reference(volume, affine, source, target, mode="trilinear", step=step))
        expected = _midpoint_rule_along_i(profile, lo, hi, n, SPACING[0])
        assert math.isclose(got, expected, rel_tol=RTOL), (step, got, expected)
        # The test would catch floor/round instead of ceil, or an off-by-one.
        for other in {n - 1, n + 1} - {0}:
            assert abs(got - _midpoint_rule_along_i(profile, lo, hi, other, SPACING[0])) > 1e-4


def test_default_step() -> None:
    for affine in AFFINES.values():
        assert math.isclose(default_step(affine), 0.35, rel_tol=1e-14)
    affine = AFFINES["rotated"]
    gen = torch.Generator().manual_seed(4)
    volume = torch.rand(SHAPE, generator=gen, dtype=torch.float64)
    sources = to_world(affine, [r[1] for r in INDEX_RAYS])
    targets = to_world(affine, [r[2] for r in INDEX_RAYS])
    default = raycast_reference(volume, affine, sources, targets, mode="trilinear")
    explicit = raycast_reference(volume, affine, sources, targets, mode="trilinear", step=0.35)
    coarse = raycast_reference(volume, affine, sources, targets, mode="trilinear", step=1.0)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert (default - coarse).abs().max() > 1e-3


def test_siddon_ignores_step() -> None:
    affine = AFFINES["rotated"]
    volume = torch.rand(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sources = to_world(affine, [r[1] for r in INDEX_RAYS])
    targets = to_world(affine, [r[2] for r in INDEX_RAYS])
    a = raycast_reference(volume, affine, sources, targets, mode="siddon")
    b = raycast_reference(volume, affine, sources, targets, mode="siddon", step=3.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine_name", ["scaled", "rotated"])
def test_gradcheck(mode: str, affine_name: str) -> None:
    affine = AFFINES[affine_name]
    shape = (3, 4, 2)
    gen = torch.Generator().manual_seed(6)
    volume = torch.rand((2, *shape), generator=gen, dtype=torch.float64).requires_grad_(True)
    sources, targets = random_rays(affine, shape, 8, seed=7)
    sources.requires_grad_(True)
    targets.requires_grad_(True)
    # Guard: the rays really cross the volume, so the gradients are non-trivial.
    lengths = raycast_reference(torch.ones(shape, dtype=torch.float64), affine, sources, targets, mode=mode)
    assert (lengths > 0.05).all()

    def fn(v: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return raycast_reference(v, affine, s, t, mode=mode, step=0.23)

    assert torch.autograd.gradcheck(fn, (volume, sources, targets), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_analytic_uniform_box(mode: str) -> None:
    """Closed-form endpoint gradients of the chord of a uniform box of value 2.

    Ray 0 lies inside: value 2 |t - s|, so d/ds = -2u, d/dt = 2u (u the unit direction).
    Ray 1 starts inside and leaves through the face i = I - 1/2, the world plane n . x = c with
    n = (A^-1)[0, :3], c = I - 1/2 - (A^-1)[0, 3]. With d = t - s, alpha = (c - n.s) / (n.d), the chord is
    f = alpha |d|, so df/dd = alpha (u - |d| n / (n.d)), df/ds at fixed d = -|d| n / (n.d), and
    grad_s = df/ds - df/dd, grad_t = df/dd.
    """
    affine = AFFINES["rotated"]
    volume = torch.full(SHAPE, 2.0, dtype=torch.float64)
    sources = to_world(affine, [[0.3, 0.4, 0.6], [1.2, 2.3, 3.1]]).requires_grad_(True)
    targets = to_world(affine, [[3.9, 4.1, 5.2], [7.0, 3.0, 5.0]]).requires_grad_(True)
    out = raycast_reference(volume, affine, sources, targets, mode=mode)
    out.sum().backward()

    s, t = sources.detach(), targets.detach()
    d = t - s
    length = d.norm(dim=-1, keepdim=True)
    unit = d / length
    inverse = torch.linalg.inv(affine)
    normal, offset = inverse[0, :3], SHAPE[0] - 0.5 - inverse[0, 3]
    alpha = (offset - normal @ s[1]) / (normal @ d[1])
    assert 0.3 < float(alpha) < 0.9  # really exits through that face, with the target outside
    d_dd = alpha * (unit[1] - length[1] * normal / (normal @ d[1]))
    d_ds = -length[1] * normal / (normal @ d[1])
    expected_s = 2.0 * torch.stack([-unit[0], d_ds - d_dd])
    expected_t = 2.0 * torch.stack([unit[0], d_dd])
    torch.testing.assert_close(out.detach(), 2.0 * torch.stack([length[0, 0], alpha * length[1, 0]]))
    torch.testing.assert_close(sources.grad, expected_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(targets.grad, expected_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_finite_for_axis_parallel_and_degenerate_rays(mode: str) -> None:
    affine = AFFINES["scaled"]
    volume = torch.rand(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    volume.requires_grad_(True)
    src_idx = [[-3.0, 2.0, 3.0], [1.0, 1.0, 1.0], [-0.6, -2.0, 1.0], [2.0, 3.0, 3.0]]
    tgt_idx = [[9.0, 2.0, 3.0], [1.0, 1.0, 1.0], [-0.6, 8.0, 5.0], [2.0, 3.0, 9.0]]
    sources = to_world(affine, src_idx).requires_grad_(True)
    targets = to_world(affine, tgt_idx).requires_grad_(True)
    out = raycast_reference(volume, affine, sources, targets, mode=mode)
    out.sum().backward()
    for grad in (volume.grad, sources.grad, targets.grad):
        assert torch.isfinite(grad).all()
    assert float(out[0].detach()) > 0 and float(out[3].detach()) > 0


def test_no_gradient_to_affine() -> None:
    affine = AFFINES["rotated"].clone().requires_grad_(True)
    volume = torch.ones(SHAPE, dtype=torch.float64, requires_grad=True)
    sources = to_world(affine.detach(), [r[1] for r in INDEX_RAYS])
    targets = to_world(affine.detach(), [r[2] for r in INDEX_RAYS])
    for mode in MODES:
        raycast_reference(volume, affine, sources, targets, mode=mode).sum().backward()
    assert affine.grad is None


# ----------------------------------------------------------------------------------------------------------
# Dtypes and validation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_float64(mode: str) -> None:
    affine = AFFINES["rotated"]
    volume = torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sources, targets = random_rays(affine, SHAPE, 32, seed=10)
    out64 = raycast_reference(volume, affine, sources, targets, mode=mode)
    out32 = raycast_reference(
        volume.float(), affine.float(), sources.float(), targets.float(), mode=mode, step=default_step(affine)
    )
    assert out32.dtype == torch.float32
    assert out64.dtype == torch.float64
    assert (out64.abs() > 0.1).all()
    torch.testing.assert_close(out32.double(), out64, rtol=2e-5, atol=2e-5)


def test_validation_errors() -> None:
    affine = AFFINES["scaled"]
    volume = torch.ones(SHAPE, dtype=torch.float64)
    points = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        raycast_reference(volume, affine, points, points, mode="nearest")
    with pytest.raises(ValueError, match="volume"):
        raycast_reference(volume[0], affine, points, points)
    with pytest.raises(ValueError, match="sources"):
        raycast_reference(volume, affine, points[:2], points)
    with pytest.raises(TypeError, match="targets"):
        raycast_reference(volume, affine, points, points.float())
    with pytest.raises(ValueError, match="affine"):
        raycast_reference(volume, affine[:3], points, points)
    with pytest.raises(ValueError, match="step"):
        raycast_reference(volume, affine, points, points, mode="trilinear", step=0.0)

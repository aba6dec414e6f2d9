"""Tests of the compiled ray-casting op (CPU and, where present, CUDA): exact answers and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import torchdrr
from torchdrr import _extension
from torchdrr.ops.reference import raycast_reference

from .conftest import cuda_ready
from .geometry_cases import (
    AFFINES,
    INDEX_RAYS,
    MISSING_INDEX_RAYS,
    SHAPE,
    outer_box_chord,
    random_rays,
    to_world,
    world_box_chord,
)

MODES = ("siddon", "trilinear")
DTYPES = (torch.float32, torch.float64)


def assert_chords_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, voxel_mm: float) -> None:
    """design.md's numerics: float32 within 1e-5 of the chord (chords longer than a voxel) or 1e-4 mm
    (shorter ones); float64 essentially exact."""
    got, expected = got.detach().cpu().double(), expected.double()
    error = (got - expected).abs()
    if dtype == torch.float64:
        allowed = 1e-10 * expected.abs() + 1e-12
    else:
        allowed = torch.where(expected > voxel_mm, 1e-5 * expected, torch.full_like(expected, 1e-4))
    worst = (error - allowed).argmax()
    assert bool((error <= allowed).all()), (
        f"max excess at ray {int(worst)}: got {got.flatten()[worst]}, expected {expected.flatten()[worst]}"
    )


def ray_tensors(affine, rays, dtype, device):
    sources = to_world(affine, [r[1] for r in rays]).to(dtype=dtype, device=device)
    targets = to_world(affine, [r[2] for r in rays]).to(dtype=dtype, device=device)
    return sources, targets


# ------------------------------------------------------------------------------------------------------------
# Exact answers
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_uniform_box_gives_chord_length(device, mode, dtype, affine_name) -> None:
    """Axis-aligned, oblique, grazing, corner-clipping, inside-starting and missing rays, uniform box."""
    affine = AFFINES[affine_name]
    rays = INDEX_RAYS + MISSING_INDEX_RAYS
    volume = torch.ones(SHAPE, dtype=dtype, device=device)
    sources, targets = ray_tensors(affine, rays, dtype, device)
    got = torchdrr.raycast(volume, affine, sources, targets, mode=mode)
    expected = torch.tensor(
        [outer_box_chord(affine, SHAPE, to_world(affine, s), to_world(affine, t)) for _, s, t in rays]
    )
    assert expected.gt(0).sum() >= len(INDEX_RAYS) - 1  # the cases really cross the box (one is zero-length)
    assert_chords_close(got, expected, dtype, voxel_mm=2.5)
    assert torch.all(got[len(INDEX_RAYS) :] == 0), "rays that miss must give exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_bright_voxel_gives_its_intersection_length(device, dtype) -> None:
    affine = AFFINES["rotated"]
    voxel = (2, 3, 4)
    volume = torch.zeros(SHAPE, dtype=dtype, device=device)
    volume[voxel] = 1.0
    rng = np.random.default_rng(7)
    centre = np.asarray(voxel, dtype=np.float64)
    # Rays through random points of the voxel (and some that miss it), in random directions.
    through = centre + rng.uniform(-0.7, 0.7, size=(200, 3))
    direction = rng.normal(size=(200, 3))
    src_index, tgt_index = through - 4 * direction, through + 4 * direction
    sources = to_world(affine, src_index)
    targets = to_world(affine, tgt_index)
    expected = torch.tensor(
        [
            world_box_chord(affine, centre - 0.5, centre + 0.5, s.numpy(), t.numpy())
            for s, t in zip(sources, targets, strict=True)
        ]
    )
    assert (expected > 0).sum() > 100 and (expected == 0).sum() > 10
    got = torchdrr.raycast(volume, affine, sources.to(device, dtype), targets.to(device, dtype))
    assert_chords_close(got, expected, dtype, voxel_mm=2.5)


@pytest.mark.parametrize("mode", MODES)
def test_clinical_scale_float32_accuracy(device, mode) -> None:
    """A CT-sized uniform box seen from 850 mm in float32 keeps design.md's accuracy (no drift)."""
    shape = (512, 512, 133)
    affine = torch.tensor(
        [[-0.703125, 0, 0, 166.0], [0, 0.703125, 0, -187.6], [0, 0, 2.5, -340.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    volume = torch.ones(shape, dtype=torch.float32, device=device)
    centre = (affine @ torch.tensor([255.5, 255.5, 66.0, 1.0], dtype=torch.float64))[:3]
    rng = np.random.default_rng(3)
    sources = (
        centre + torch.tensor([0.0, -850.0, 0.0], dtype=torch.float64) + torch.from_numpy(rng.normal(size=(2000, 3)))
    )
    detector = centre + torch.tensor([0.0, 170.0, 0.0], dtype=torch.float64)
    offsets = torch.from_numpy(rng.uniform(-1, 1, size=(2000, 3)) * np.array([190.0, 0.0, 150.0]))
    targets = detector + offsets
    expected = torch.tensor(
        [outer_box_chord(affine, shape, s.numpy(), t.numpy()) for s, t in zip(sources, targets, strict=True)]
    )
    step = 0.7 if mode == "trilinear" else None
    got = torchdrr.raycast(volume, affine, sources.float().to(device), targets.float().to(device), mode, step)
    assert expected.gt(100).sum() > 1000
    assert_chords_close(got, expected, torch.float32, voxel_mm=2.5)


# ------------------------------------------------------------------------------------------------------------
# Against the pure-PyTorch reference
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_on_random_volumes(device, mode, dtype) -> None:
    generator = torch.Generator().manual_seed(11)
    affine = AFFINES["rotated"]
    volume = torch.rand((3, *SHAPE), generator=generator, dtype=torch.float64) - 0.3
    sources, targets = random_rays(affine, SHAPE, 400, seed=5)
    step = None if mode == "siddon" else 0.37
    expected = raycast_reference(volume, affine, sources, targets, mode=mode, step=step)
    got = torchdrr.raycast(
        volume.to(device, dtype),
        affine,
        sources.to(device, dtype),
        targets.to(device, dtype),
        mode=mode,
        step=step,
    )
    assert got.shape == (400, 3)
    scale = expected.abs().max()
    error = (got.cpu().double() - expected).abs().max()
    tolerance = 1e-10 if dtype == torch.float64 else (1e-5 if mode == "siddon" else 1e-4)
    assert error <= tolerance * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def _random_case(seed: int, channels: int = 2, n_rays: int = 6):
    generator = torch.Generator().manual_seed(seed)
    affine = AFFINES["rotated"]
    volume = torch.rand((channels, 4, 5, 3), generator=generator, dtype=torch.float64)
    sources, targets = random_rays(affine, (4, 5, 3), n_rays, seed=seed)
    return affine, volume, sources, targets


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_volume_sources_targets(device, mode) -> None:
    """float64 finite differences agree with the analytic gradients (random rays avoid crossings)."""
    affine, volume, sources, targets = _random_case(seed=2)
    inputs = tuple(x.to(device).requires_grad_() for x in (volume, sources, targets))
    assert gradcheck(
        lambda v, s, t: torchdrr.raycast(v, affine, s, t, mode=mode), inputs, eps=1e-7, atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference_autograd(device, mode) -> None:
    affine, volume, sources, targets = _random_case(seed=4, channels=3, n_rays=50)
    weights = torch.rand(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(fn, dev):
        leaves = [x.to(dev).requires_grad_() for x in (volume, sources, targets)]
        out = fn(leaves[0], affine, leaves[1], leaves[2], mode=mode)
        return torch.autograd.grad((out * weights.to(dev)).sum(), leaves)

    for kernel, reference in zip(grads(torchdrr.raycast, device), grads(raycast_reference, "cpu"), strict=True):
        torch.testing.assert_close(kernel.cpu(), reference, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_adjoint_identity(device, mode, dtype) -> None:
    """<A x, y> = <x, A^T y>: the back-projection is the exact transpose of the projection."""
    generator = torch.Generator().manual_seed(9)
    affine = AFFINES["scaled"]
    x = torch.rand((2, *SHAPE), generator=generator, dtype=torch.float64).to(device, dtype).requires_grad_()
    sources, targets = random_rays(affine, SHAPE, 300, seed=1)
    y = torch.rand(300, 2, generator=generator, dtype=torch.float64).to(device, dtype)
    projection = torchdrr.raycast(x, affine, sources.to(device, dtype), targets.to(device, dtype), mode=mode)
    (backprojection,) = torch.autograd.grad((projection * y).sum(), x)
    lhs = (projection.double() * y.double()).sum()
    rhs = (x.detach().double() * backprojection.double()).sum()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(lhs - rhs) <= tolerance * abs(lhs), f"{lhs.item()} vs {rhs.item()}"


@pytest.mark.parametrize("mode", MODES)
def test_more_channels_than_one_walk_holds(device, mode) -> None:
    """11 channels (processed in chunks of 8) equal 11 single-channel casts, forward and backward."""
    affine, volume, sources, targets = _random_case(seed=8, channels=11, n_rays=40)
    volume, sources, targets = (x.to(device).requires_grad_() for x in (volume, sources, targets))
    together = torchdrr.raycast(volume, affine, sources, targets, mode=mode)
    apart = torch.stack([torchdrr.raycast(volume[c], affine, sources, targets, mode=mode) for c in range(11)], -1)
    torch.testing.assert_close(together, apart, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, 11 * 40, dtype=torch.float64, device=device).reshape(40, 11)
    g_together = torch.autograd.grad((together * weights).sum(), (volume, sources, targets))
    g_apart = torch.autograd.grad((apart * weights).sum(), (volume, sources, targets))
    for a, b in zip(g_together, g_apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# The op as a torch custom op
# ------------------------------------------------------------------------------------------------------------


class _RecordBackwardFlags(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.torchdrr.raycast_backward.default:
            self.calls.append((args[7], args[8]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("volume_grad", "rays_grad"), [(True, False), (False, True), (True, True)], ids=["volume", "rays", "both"]
)
def test_backward_computes_only_what_is_needed(volume_grad, rays_grad) -> None:
    affine, volume, sources, targets = _random_case(seed=3)
    volume.requires_grad_(volume_grad)
    sources.requires_grad_(rays_grad)
    recorder = _RecordBackwardFlags()
    with recorder:
        out = torchdrr.raycast(volume, affine, sources, targets)
        out.sum().backward()
    assert recorder.calls == [(volume_grad, rays_grad)]
    assert (volume.grad is not None) == volume_grad and (sources.grad is not None) == rays_grad
    # Unrequested gradients come back empty from the op itself.
    gv, gs, gt = torch.ops.torchdrr.raycast_backward(
        torch.ones(6, 2, dtype=torch.float64),
        volume.detach(),
        affine,
        sources.detach(),
        targets,
        0,
        0.0,
        False,
        False,
    )
    assert gv.numel() == gs.numel() == gt.numel() == 0


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, mode) -> None:
    affine, volume, sources, targets = _random_case(seed=6)
    volume, sources, targets = (x.float().to(device).requires_grad_() for x in (volume, sources, targets))
    mode_id = torchdrr.ops.RAYCAST_MODES[mode]
    torch.library.opcheck(torch.ops.torchdrr.raycast_forward.default, (volume, affine, sources, targets, mode_id, 0.0))
    grad = torch.rand(6, 2, device=device)
    for flags in [(True, True), (False, True), (True, False)]:
        args = (grad, volume.detach(), affine, sources.detach(), targets.detach(), mode_id, 0.0, *flags)
        torch.library.opcheck(torch.ops.torchdrr.raycast_backward.default, args)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph_matches_eager(device, mode) -> None:
    affine, volume, sources, targets = _random_case(seed=12, n_rays=30)
    leaves = [x.float().to(device).requires_grad_() for x in (volume, sources, targets)]

    def loss(v, s, t):
        return torchdrr.raycast(v, affine, s, t, mode=mode).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    eager_value = loss(*leaves)
    eager_grads = torch.autograd.grad(eager_value, leaves)
    compiled_value = compiled(*leaves)
    compiled_grads = torch.autograd.grad(compiled_value, leaves)
    torch.testing.assert_close(compiled_value, eager_value)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------------
# Input hygiene
# ------------------------------------------------------------------------------------------------------------


def test_layouts_and_broadcasting(device) -> None:
    affine, volume, sources, targets = _random_case(seed=13, channels=3, n_rays=12)
    volume, sources, targets = volume.to(device), sources.to(device), targets.to(device)
    expected = torchdrr.raycast(volume, affine, sources, targets)
    channels_last = volume.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    transposed_sources = sources.T.contiguous().T  # same values, non-contiguous
    assert not transposed_sources.is_contiguous() and not channels_last.is_contiguous()
    torch.testing.assert_close(torchdrr.raycast(channels_last, affine, transposed_sources, targets), expected)
    strided_volume = torch.stack([volume, volume], dim=-1)[..., 0]  # every other element in memory
    torch.testing.assert_close(torchdrr.raycast(strided_volume, affine, sources, targets), expected)
    # One source for many targets: [B, 1, 3] against [B, R, 3].
    grid = targets.reshape(3, 4, 3)
    source = sources[:3].reshape(3, 1, 3)
    out = torchdrr.raycast(volume, affine, source, grid)
    assert out.shape == (3, 4, 3)
    torch.testing.assert_close(out, torchdrr.raycast(volume, affine, source.expand(3, 4, 3), grid))
    assert torchdrr.raycast(volume[0], affine, sources, targets).shape == (12,)
    assert torchdrr.raycast(volume, affine.numpy(), sources, targets).shape == (12, 3)


def test_empty_rays(device) -> None:
    affine, volume, sources, targets = _random_case(seed=1)
    volume = volume.to(device).requires_grad_()
    out = torchdrr.raycast(volume, affine, sources[:0].to(device), targets[:0].to(device))
    assert out.shape == (0, 2)
    out.sum().backward()
    assert volume.grad is not None and torch.all(volume.grad == 0)
    assert torchdrr.raycast(
        volume, affine, torch.zeros(2, 0, 3, dtype=torch.float64, device=device), targets[:1].to(device)
    ).shape == (2, 0, 2)


def test_non_finite_endpoints_give_nan_not_garbage(device) -> None:
    affine, volume, sources, targets = _random_case(seed=1)
    sources = sources.clone()
    sources[1, 0] = float("nan")
    sources[2, 2] = float("inf")
    out = torchdrr.raycast(volume.to(device), affine, sources.to(device), targets.to(device))
    assert torch.isnan(out[1:3]).all() and torch.isfinite(out[[0, 3, 4, 5]]).all()


def _valid():
    affine, volume, sources, targets = _random_case(seed=1)
    return {"volume": volume, "affine": affine, "sources": sources, "targets": targets}


BAD_INPUTS = [
    ("int volume", {"volume": torch.zeros(4, 5, 3, dtype=torch.int16)}, TypeError, "volume must be float32"),
    (
        "2D volume",
        {"volume": torch.zeros(4, 5, dtype=torch.float64)},
        ValueError,
        r"volume must be \[I, J, K\]",
    ),
    ("empty volume", {"volume": torch.zeros(0, 5, 3, dtype=torch.float64)}, ValueError, "at least one"),
    ("list volume", {"volume": [[[1.0]]]}, TypeError, "volume must be a torch.Tensor"),
    (
        "sources not 3D points",
        {"sources": torch.zeros(6, 2, dtype=torch.float64)},
        ValueError,
        r"sources must be \[\.\.\., 3\]",
    ),
    (
        "targets dtype",
        {"targets": torch.zeros(6, 3, dtype=torch.float32)},
        TypeError,
        "targets must have the volume's dtype",
    ),
    (
        "targets device",
        {"targets": torch.zeros(6, 3, dtype=torch.float64, device="meta")},
        ValueError,
        "targets must be on the volume's device",
    ),
    ("no broadcast", {"targets": torch.zeros(5, 3, dtype=torch.float64)}, ValueError, "do not broadcast"),
    ("affine shape", {"affine": torch.eye(3, dtype=torch.float64)}, ValueError, r"affine must be \[4, 4\]"),
    ("affine int", {"affine": torch.eye(4, dtype=torch.int64)}, TypeError, "affine must be a floating-point"),
    (
        "affine NaN",
        {"affine": torch.diag(torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64))},
        ValueError,
        "affine must be finite",
    ),
    (
        "affine singular",
        {"affine": torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))},
        ValueError,
        "invertible",
    ),
    (
        "affine projective",
        {"affine": torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 1]], dtype=torch.float64)},
        ValueError,
        "last row",
    ),
    ("mode", {"mode": "nearest"}, ValueError, "mode must be one of"),
    ("step with siddon", {"step": 0.5}, ValueError, "step applies to mode='trilinear' only"),
    ("step negative", {"mode": "trilinear", "step": -1.0}, ValueError, "step must be a positive number"),
    ("step NaN", {"mode": "trilinear", "step": float("nan")}, ValueError, "step must be a positive number"),
]


@pytest.mark.parametrize(("case", "change", "error", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_error(case, change, error, message) -> None:
    arguments = {**_valid(), **change}
    with pytest.raises(error, match=message):
        torchdrr.raycast(**arguments)


def test_direct_op_calls_are_checked_too() -> None:
    """Calling torch.ops.torchdrr.* directly with bad shapes raises instead of reading out of bounds."""
    affine, volume, sources, targets = _random_case(seed=1)
    with pytest.raises(ValueError, match=r"sources and targets must both be \[N, 3\]"):
        torch.ops.torchdrr.raycast_forward(volume, affine, sources, targets[:3], 0, 0.0)
    with pytest.raises(ValueError, match="float64 CPU tensor"):
        torch.ops.torchdrr.raycast_forward(volume, affine.float(), sources, targets, 0, 0.0)
    with pytest.raises(ValueError, match=r"grad_output must be \[N, C\]"):
        torch.ops.torchdrr.raycast_backward(
            torch.ones(6, 5, dtype=torch.float64), volume, affine, sources, targets, 0, 0.0, True, True
        )


def test_cuda_tensor_without_cuda_kernels_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    with pytest.raises(RuntimeError, match="has no CUDA kernels"):
        _extension.require_kernels_for(torch.device("cuda", 0), "volume")
    with pytest.raises(ValueError, match="cpu' and 'cuda' devices only"):
        _extension.require_kernels_for(torch.device("meta"), "volume")


def test_build_info_reports_the_build() -> None:
    info = torchdrr.build_info()
    assert info["cpu_kernels"] is True and info["torchdrr"] == torchdrr.__version__
    assert info["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("torchdrr::raycast_forward", "CUDA")
    assert info["cuda_kernels"] == has_cuda_kernel


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode) -> None:
    generator = torch.Generator().manual_seed(21)
    affine = AFFINES["permuted_flipped"]
    volume = torch.rand((2, 40, 30, 20), generator=generator)
    sources, targets = random_rays(affine, (40, 30, 20), 5000, seed=2)
    cpu = torchdrr.raycast(volume, affine, sources.float(), targets.float(), mode=mode)
    gpu = torchdrr.raycast(volume.cuda(), affine, sources.float().cuda(), targets.float().cuda(), mode=mode)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-5, atol=2e-5)


def test_full_ct_matches_reference(full_ct_path) -> None:
    """On the real 512 x 512 x 133 chest CT, random detector rays agree with the float64 reference."""
    from torchdrr.io import load_nifti

    hu, affine = load_nifti(full_ct_path)
    mu = (0.02 * (1 + hu / 1000)).clamp_min(0)
    rng = np.random.default_rng(0)
    centre = (affine @ torch.tensor([255.5, 255.5, 66.0, 1.0], dtype=torch.float64))[:3]
    sources = (centre + torch.tensor([0.0, -850.0, 0.0], dtype=torch.float64)).expand(300, 3)
    targets = (
        centre
        + torch.tensor([0.0, 170.0, 0.0], dtype=torch.float64)
        + torch.from_numpy(rng.uniform(-1, 1, size=(300, 3)) * np.array([180.0, 0.0, 140.0]))
    )
    expected = raycast_reference(mu.double(), affine, sources, targets)
    got = torchdrr.raycast(mu, affine, sources.float(), targets.float())
    assert expected.max() > 5  # real attenuation along the chest
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.max()))

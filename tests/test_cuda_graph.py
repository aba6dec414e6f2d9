"""torchdrr.cuda_graphed (a render replayed as a CUDA graph) and call_op (the ops' no-grad fast path)."""

from __future__ import annotations

import pytest
import torch

import torchdrr
from torchdrr._extension import call_op
from torchdrr.geometry import carm_ray_parameters, intrinsic_matrix
from torchdrr.ops import camera_raycast

from .conftest import cuda_ready

needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")


def _scene(device: str):
    """A random 3-channel-free volume, its affine, a C-arm isocenter and K for a 24 x 20 detector."""
    generator = torch.Generator().manual_seed(7)
    volume = torch.rand((20, 18, 16), generator=generator, dtype=torch.float32).to(device)
    affine = torch.diag(torch.tensor([1.5, 1.25, 2.0, 1.0], dtype=torch.float64))
    isocenter = torch.tensor([14.25, 10.625, 15.0], dtype=torch.float64, device=device)
    intrinsics = intrinsic_matrix(400.0, 20, 24, (3.0, 3.0)).to(device)
    return volume, affine, isocenter, intrinsics


def _render_fn(device: str, mode: str = "siddon"):
    volume, affine, isocenter, intrinsics = _scene(device)
    step = 0.6 if mode == "trilinear" else None

    def render(primary_deg: torch.Tensor) -> torch.Tensor:
        sources, matrices = carm_ray_parameters(primary_deg, 0.0, 300.0, isocenter, intrinsics, 400.0,
                                                dtype=torch.float32)  # fmt: skip
        return camera_raycast(volume, affine, sources, matrices, 20, 24, mode=mode, step=step)

    return render


def test_rejects_bad_arguments_by_name() -> None:
    render = _render_fn("cpu")
    angles = torch.tensor([180.0, 190.0], dtype=torch.float64)
    with pytest.raises(TypeError, match="render must be callable"):
        torchdrr.cuda_graphed(3, angles)
    with pytest.raises(ValueError, match="warmup must be a whole number >= 1, got 0"):
        torchdrr.cuda_graphed(render, angles, warmup=0)
    with pytest.raises(ValueError, match="at least one example input"):
        torchdrr.cuda_graphed(render)
    with pytest.raises(TypeError, match=r"example_inputs\[0\] must be a torch.Tensor, got list"):
        torchdrr.cuda_graphed(render, [180.0])
    with pytest.raises(ValueError, match=r"example_inputs\[0\] must be a CUDA tensor .* got device cpu"):
        torchdrr.cuda_graphed(render, angles)


def test_call_op_matches_the_op_and_keeps_autograd_when_needed() -> None:
    volume, affine, isocenter, intrinsics = _scene("cpu")
    angles = torch.tensor([[170.0, 5.0, 0.0]], dtype=torch.float64)
    args = (angles, isocenter, intrinsics, 300.0, 400.0, torch.float64)
    expected = torch.ops.torchdrr.carm_ray_parameters(*args)
    got = call_op(torch.ops.torchdrr.carm_ray_parameters, *args)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # An argument that requires grad takes the autograd kernel (a graph is recorded); under no_grad it does not.
    with_grad = call_op(torch.ops.torchdrr.carm_ray_parameters, angles.clone().requires_grad_(True), *args[1:])
    assert all(t.grad_fn is not None for t in with_grad)
    with torch.no_grad():
        without = call_op(torch.ops.torchdrr.carm_ray_parameters, angles.clone().requires_grad_(True), *args[1:])
    assert all(t.grad_fn is None and not t.requires_grad for t in without)
    # Under no_grad a wrapper that takes the fast path gives outputs without history even for inputs that require
    # grad; with grad on they still get a gradient (the wrappers choose the path, not the caller).
    primary = torch.tensor([170.0], dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        sources, _ = carm_ray_parameters(primary, 5.0, 300.0, isocenter, intrinsics, 400.0)
    assert sources.grad_fn is None and not sources.requires_grad
    sources, matrices = carm_ray_parameters(primary, 5.0, 300.0, isocenter, intrinsics, 400.0)
    (gradient,) = torch.autograd.grad((sources.sum() + matrices.sum()), primary)
    assert gradient.abs().item() > 0


@needs_cuda
@pytest.mark.parametrize("mode", ["siddon", "trilinear"])
def test_replay_equals_eager_for_new_inputs(mode: str) -> None:
    render = _render_fn("cuda", mode)
    first = torch.tensor([180.0, 200.0], dtype=torch.float64, device="cuda")
    replay = torchdrr.cuda_graphed(render, first)
    for angles in (first, torch.tensor([150.0, 95.0], dtype=torch.float64, device="cuda")):
        with torch.no_grad():
            expected = render(angles)
        got = replay(angles)
        assert got.shape == (2, 20 * 24) and expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same kernels on the same inputs
    # clone_outputs (default): an earlier result survives the next replay.
    kept = replay(first)
    replay(torch.tensor([100.0, 110.0], dtype=torch.float64, device="cuda"))
    with torch.no_grad():
        torch.testing.assert_close(kept, render(first), rtol=0, atol=0)


@needs_cuda
def test_static_outputs_and_replay_errors() -> None:
    render = _render_fn("cuda")
    angles = torch.tensor([180.0], dtype=torch.float64, device="cuda")
    replay = torchdrr.cuda_graphed(render, angles, clone_outputs=False)
    assert replay(angles) is replay(angles + 1.0)  # one buffer, overwritten by each call
    with pytest.raises(ValueError, match=r"inputs\[0\] must match the captured example: shape \(1,\)"):
        replay(torch.tensor([180.0, 181.0], dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="torch.float64 on cuda:0; got shape \\(1,\\), torch.float32"):
        replay(angles.float())
    with pytest.raises(TypeError, match="expected 1 input tensors"):
        replay(angles, angles)
    with pytest.raises(ValueError, match="requires grad"):
        torchdrr.cuda_graphed(render, angles.clone().requires_grad_(True))


@needs_cuda
def test_a_render_that_syncs_fails_with_a_clear_error() -> None:
    render = _render_fn("cuda")

    def syncing(angles: torch.Tensor) -> torch.Tensor:
        image = render(angles)
        if image.max().item() < 0:  # a host sync: not capturable
            raise AssertionError
        return image

    with pytest.raises(RuntimeError, match="must not synchronise with the host"):
        torchdrr.cuda_graphed(syncing, torch.tensor([180.0], dtype=torch.float64, device="cuda"))

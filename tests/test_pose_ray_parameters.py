"""Tests of the pose ray-parameter op (torch.ops.torchdrr.pose_ray_parameters behind
torchdrr.geometry.camera_ray_parameters): the numbers and gradients of the composite tensor-op path, in one launch
forward and one backward (CPU and, where present, CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from torchdrr.geometry import Camera, camera_ray_parameters, intrinsic_matrix, rotvec_to_matrix

from .conftest import cuda_ready

F64 = torch.float64
SDD = 1020.0
needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")


def random_intrinsics(batch: int | None, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular pinhole Ks ``[3, 3]`` (batch None) or ``[B, 3, 3]`` with a mirror sign, skew, off-centre
    principal points and K[2, 2] != 1, so that every entry of the closed-form inverse matters; and the same Ks with
    garbage in the lower triangle, which the op must not read."""
    shape = () if batch is None else (batch,)
    k = torch.zeros(*shape, 3, 3, dtype=F64)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).to(F64)
    k[..., 0, 0] = sign * (2000 + 2000 * torch.rand(shape, generator=generator, dtype=F64))
    k[..., 1, 1] = 2000 + 2000 * torch.rand(shape, generator=generator, dtype=F64)
    k[..., 0, 1] = 30 * torch.randn(shape, generator=generator, dtype=F64)
    k[..., 0, 2] = 600 * torch.rand(shape, generator=generator, dtype=F64)
    k[..., 1, 2] = 500 * torch.rand(shape, generator=generator, dtype=F64)
    k[..., 2, 2] = 0.5 + torch.rand(shape, generator=generator, dtype=F64)
    garbage = k.clone()
    garbage[..., 1, 0], garbage[..., 2, 0], garbage[..., 2, 1] = 1e3, -7.0, 5e2
    return k, garbage


def poses(batch: int = 5, seed: int = 0, intrinsics_batched: bool = False, device: str = "cpu"):
    """Random rotations (any angle), translations of a few hundred mm, K and K with a garbage lower triangle."""
    generator = torch.Generator().manual_seed(seed)
    rotation = rotvec_to_matrix(2.5 * torch.randn(batch, 3, generator=generator, dtype=F64))
    translation = 300 * torch.randn(batch, 3, generator=generator, dtype=F64)
    k, k_garbage = random_intrinsics(batch if intrinsics_batched else None, generator)
    return rotation.to(device), translation.to(device), k.to(device), k_garbage.to(device)


def composite(intrinsics, rotation, translation, sdd=SDD):
    """The tensor-op path the op replaces (the former body of camera_ray_parameters), written out here so that the
    reference does not go through the op."""
    eye = torch.eye(3, dtype=rotation.dtype, device=rotation.device)
    k_inv = torch.linalg.solve_triangular(intrinsics, eye.expand_as(intrinsics), upper=True)
    rotation_t = rotation.transpose(-1, -2)
    return -(rotation_t @ translation.unsqueeze(-1)).squeeze(-1), sdd * (rotation_t @ k_inv)


def assert_close_to(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal to ``rtol`` relative to the largest entry (entries near 0 carry the rounding of the large ones)."""
    scale = float(expected.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("intrinsics_batched", [False, True])
def test_matches_the_composite_path(device, intrinsics_batched, out_dtype) -> None:
    rotation, translation, _, k_garbage = poses(6, 1, intrinsics_batched, device)
    sources, matrices = camera_ray_parameters(k_garbage, rotation, translation, SDD, dtype=out_dtype)
    expected_sources, expected_matrices = composite(torch.triu(k_garbage), rotation, translation)
    assert sources.shape == (6, 3) and matrices.shape == (6, 3, 3)
    assert sources.dtype == matrices.dtype == out_dtype and sources.device == rotation.device
    # float64: the same numbers up to rounding; float32: the float64 numbers rounded once (within one float32 ulp).
    rtol = 1e-13 if out_dtype == torch.float64 else 1.2e-7
    assert_close_to(sources, expected_sources.to(out_dtype), rtol)
    assert_close_to(matrices, expected_matrices.to(out_dtype), rtol)


def test_default_dtype_is_the_rotations_and_unbatched_extrinsics_work(device) -> None:
    rotation, translation, k, _ = poses(1, 2, device=device)
    for dtype in (F64, torch.float32):
        r, t = rotation[0].to(dtype), translation[0].to(dtype)
        sources, matrices = camera_ray_parameters(k, r, t, SDD)
        assert sources.dtype == dtype and sources.shape == (1, 3) and matrices.shape == (1, 3, 3)
        expected = composite(k.to(dtype), r.unsqueeze(0), t.unsqueeze(0))
        assert_close_to(sources, expected[0], 1e-13 if dtype == F64 else 1e-6)
        assert_close_to(matrices, expected[1], 1e-13 if dtype == F64 else 1e-6)


def test_a_batch_of_one_k_is_shared(device) -> None:
    rotation, translation, k, _ = poses(4, 3, device=device)
    got = camera_ray_parameters(k.unsqueeze(0), rotation, translation, SDD)
    expected = composite(k, rotation, translation)
    for g, e in zip(got, expected, strict=True):
        assert_close_to(g, e, 1e-13)


def test_camera_ray_parameters_passes_dtype(device) -> None:
    rotation, translation, _, _ = poses(3, 4, device=device)
    camera = Camera(intrinsic_matrix(SDD, 8, 6, (1.0, 1.0)).to(device), rotation, translation, 8, 6, SDD)
    sources, matrices = camera.ray_parameters(dtype=torch.float32)
    assert sources.dtype == matrices.dtype == torch.float32
    expected = camera.ray_parameters()
    assert expected[0].dtype == F64
    torch.testing.assert_close(sources, expected[0].float(), rtol=0, atol=0)
    torch.testing.assert_close(matrices, expected[1].float(), rtol=0, atol=0)


def test_strided_inputs_are_read_through_their_strides(device) -> None:
    """Transposed R, t and K and an expanded K give what their contiguous copies give."""
    rotation, translation, k, _ = poses(4, 5, intrinsics_batched=True, device=device)
    r_t = rotation.transpose(1, 2).contiguous().transpose(1, 2)
    t_t = translation.t().contiguous().t()
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    k_expanded = k[0].expand(4, 3, 3)
    assert not r_t.is_contiguous() and not t_t.is_contiguous() and not k_t.is_contiguous()
    op = torch.ops.torchdrr.pose_ray_parameters
    for kk, contiguous_k in ((k_t, k.contiguous()), (k_expanded, k[0].repeat(4, 1, 1))):
        got = op(kk, r_t, t_t, SDD, F64)
        expected = op(contiguous_k, rotation.contiguous(), translation.contiguous(), SDD, F64)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("intrinsics_batched", [False, True])
def test_gradcheck(device, intrinsics_batched) -> None:
    rotation, translation, k, _ = poses(3, 6, intrinsics_batched, device)
    rotation, translation = rotation.requires_grad_(), translation.requires_grad_()

    def fn(r, t):
        return camera_ray_parameters(k, r, t, SDD)

    assert gradcheck(fn, (rotation, translation), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("intrinsics_batched", [False, True])
def test_gradients_match_autograd_through_the_composite_path(device, intrinsics_batched, out_dtype) -> None:
    rotation, translation, k, _ = poses(5, 7, intrinsics_batched, device)
    generator = torch.Generator().manual_seed(9)
    weight_s = torch.randn(5, 3, generator=generator, dtype=F64).to(device=device, dtype=out_dtype)
    weight_m = torch.randn(5, 3, 3, generator=generator, dtype=F64).to(device=device, dtype=out_dtype)

    def grads(fn):
        r, t = rotation.clone().requires_grad_(), translation.clone().requires_grad_()
        sources, matrices = fn(r, t)
        loss = (sources * weight_s).sum() + (matrices * weight_m).sum()
        return torch.autograd.grad(loss, (r, t))

    got = grads(lambda r, t: camera_ray_parameters(k, r, t, SDD, dtype=out_dtype))
    expected = grads(lambda r, t: tuple(x.to(out_dtype) for x in composite(k, r, t)))
    assert got[0].dtype == got[1].dtype == F64  # the inputs' dtype, whatever the outputs'
    for g, e in zip(got, expected, strict=True):
        assert_close_to(g, e, 1e-12)


@pytest.mark.parametrize("used", ["sources", "ray_matrices"])
def test_gradient_of_one_output(device, used) -> None:
    """A loss of one output only: the other's gradient is zero (autograd materialises it)."""
    rotation, translation, k, _ = poses(3, 8, device=device)
    index = 0 if used == "sources" else 1

    def grads(fn):
        r, t = rotation.clone().requires_grad_(), translation.clone().requires_grad_()
        # The ray matrices do not depend on t: its gradient is then 0 (None, materialised, in autograd).
        return torch.autograd.grad(fn(r, t)[index].sum(), (r, t), allow_unused=True, materialize_grads=True)

    got = grads(lambda r, t: camera_ray_parameters(k, r, t, SDD))
    expected = grads(lambda r, t: composite(k, r, t))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-9)


def test_empty_batch(device) -> None:
    k = intrinsic_matrix(SDD, 4, 4, (1.0, 1.0)).to(device)
    rotation = torch.zeros(0, 3, 3, dtype=F64, device=device)
    translation = torch.zeros(0, 3, dtype=F64, device=device)
    sources, matrices = torch.ops.torchdrr.pose_ray_parameters(k, rotation, translation, SDD, torch.float32)
    assert sources.shape == (0, 3) and matrices.shape == (0, 3, 3) and sources.dtype == torch.float32
    grad_r, grad_t = torch.ops.torchdrr.pose_ray_parameters_backward(sources, matrices, k, rotation, translation, SDD)
    assert grad_r.shape == (0, 3, 3) and grad_t.shape == (0, 3)


@pytest.mark.parametrize("intrinsics_batched", [False, True])
def test_opcheck(device, intrinsics_batched) -> None:
    rotation, translation, k, _ = poses(3, 10, intrinsics_batched, device)
    for out_dtype in (torch.float64, torch.float32):
        torch.library.opcheck(
            torch.ops.torchdrr.pose_ray_parameters.default, (k, rotation, translation, SDD, out_dtype)
        )
        grad_sources = torch.rand(3, 3, dtype=out_dtype, device=device)
        grad_matrices = torch.rand(3, 3, 3, dtype=out_dtype, device=device)
        torch.library.opcheck(
            torch.ops.torchdrr.pose_ray_parameters_backward.default,
            (grad_sources, grad_matrices, k, rotation, translation, SDD),
        )


@pytest.mark.parametrize("k_grad", [False, True])
def test_torch_compile_fullgraph_matches_eager(k_grad) -> None:
    """The wrapper traces into one graph (dynamo, fake kernels, autograd registration), the composite fallback too
    (k_grad); aot_eager checks all of that without inductor's code generation, to keep the test cheap."""
    rotation, translation, k, _ = poses(3, 11)
    k = k.requires_grad_(k_grad)

    def loss(r, t, intrinsics):
        sources, matrices = camera_ray_parameters(intrinsics, r, t, SDD, dtype=torch.float32)
        return sources.square().sum() + matrices.sum()

    inputs = (rotation.clone().requires_grad_(), translation.clone().requires_grad_(), k)
    wrt = inputs if k_grad else inputs[:2]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), loss(*inputs), rtol=0, atol=0)
    got_grads = torch.autograd.grad(compiled(*inputs), wrt)
    expected_grads = torch.autograd.grad(loss(*inputs), wrt)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_intrinsics_that_need_a_gradient_take_the_composite_path() -> None:
    rotation, translation, k, _ = poses(3, 12, intrinsics_batched=True)
    k_op, k_ref = k.clone().requires_grad_(), k.clone().requires_grad_()
    r = rotation.clone().requires_grad_()
    sources, matrices = camera_ray_parameters(k_op, r, translation, SDD)
    (sources.sum() + matrices.square().sum()).backward()
    r_ref = rotation.clone().requires_grad_()
    expected_sources, expected_matrices = composite(k_ref, r_ref, translation)
    (expected_sources.sum() + expected_matrices.square().sum()).backward()
    assert k_op.grad is not None and float(k_op.grad.abs().max()) > 0
    torch.testing.assert_close(k_op.grad, k_ref.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.grad, r_ref.grad, rtol=1e-12, atol=1e-12 * float(r_ref.grad.abs().max()))
    assert_close_to(matrices, expected_matrices, 1e-13)


# _batched_extrinsics checks a tensor sdd_mm with float(), which warns for a tensor that requires a gradient.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_an_sdd_that_needs_a_gradient_takes_the_composite_path() -> None:
    rotation, translation, k, _ = poses(2, 13)
    sdd = torch.tensor(SDD, dtype=F64, requires_grad=True)
    camera_ray_parameters(k, rotation, translation, sdd)[1].sum().backward()
    sdd_ref = torch.tensor(SDD, dtype=F64, requires_grad=True)
    composite(k, rotation, translation, sdd_ref)[1].sum().backward()
    assert float(sdd.grad.abs()) > 0
    torch.testing.assert_close(sdd.grad, sdd_ref.grad, rtol=1e-12, atol=0)


def _good_args() -> dict:
    rotation, translation, k, _ = poses(3, 14)
    return dict(intrinsics=k, rotation=rotation, translation=translation, sdd_mm=SDD)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(rotation=torch.eye(4, dtype=F64)), ValueError, "rotation must be \\[B, 3, 3\\] and translation "
         "\\[B, 3\\] with one B, got \\(1, 4, 4\\) and \\(3, 3\\)"),
        (dict(translation=torch.zeros(2, 3, dtype=F64)), ValueError, "with one B, got \\(3, 3, 3\\) and \\(2, 3\\)"),
        (dict(sdd_mm=0.0), ValueError, "sdd_mm must be a positive distance in mm .*got 0.0"),
        (dict(sdd_mm=math.nan), ValueError, "sdd_mm must be a positive distance in mm .*got nan"),
        (dict(translation=torch.zeros(3, 3)), TypeError, "translation must have the rotation's dtype torch.float64, "
         "got torch.float32"),
        (dict(intrinsics=torch.eye(3, dtype=F64).expand(2, 3, 3)), ValueError, "intrinsics must be \\[3, 3\\] or "
         "\\[B, 3, 3\\] with the rotation's B = 3, got \\(2, 3, 3\\)"),
        (dict(intrinsics=torch.eye(4, dtype=F64)), ValueError, "intrinsics must be .*got \\(4, 4\\)"),
        (dict(dtype=torch.float16), TypeError, "dtype must be torch.float32 or torch.float64, got torch.float16"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_a_clear_error(change, error, message) -> None:
    kwargs = _good_args()
    kwargs.update(change)
    with pytest.raises(error, match=message):
        camera_ray_parameters(**kwargs)


def test_good_args_are_good() -> None:
    """The base of the error cases above runs, so that each error comes from its one changed argument."""
    sources, matrices = camera_ray_parameters(**_good_args())
    assert sources.shape == (3, 3) and matrices.shape == (3, 3, 3)


def _op_args() -> list:
    rotation, translation, k, _ = poses(3, 15)
    return [k, rotation, translation, SDD, F64]


@pytest.mark.parametrize(
    ("index", "value", "error", "message"),
    [
        (1, torch.zeros(3, 3, dtype=F64), ValueError, "rotation must be \\[B, 3, 3\\] .*got shape \\[3, 3\\]"),
        (1, torch.zeros(3, 3, 3, dtype=torch.int32), TypeError, "rotation must be float32 or float64, got Int"),
        (2, torch.zeros(2, 3, dtype=F64), ValueError, "translation must be \\[B, 3\\] = \\[3, 3\\], got shape "
         "\\[2, 3\\]"),
        (2, torch.zeros(3, 3), TypeError, "translation and intrinsics must have the rotation's dtype Double, got "
         "Float and Double"),
        (0, torch.eye(3, dtype=F64).expand(2, 3, 3), ValueError, "intrinsics must be \\[3, 3\\] or \\[B, 3, 3\\] = "
         "\\[3, 3, 3\\], got shape \\[2, 3, 3\\]"),
        (3, -1.0, ValueError, "sdd_mm must be a positive distance in mm .*got -1"),
        (4, torch.int64, TypeError, "out_dtype must be float32 or float64, got Long"),
    ],
)  # fmt: skip
def test_direct_op_calls_are_checked_too(index, value, error, message) -> None:
    args = _op_args()
    args[index] = value
    with pytest.raises(error, match=message):
        torch.ops.torchdrr.pose_ray_parameters(*args)


@pytest.mark.parametrize(
    ("grads", "error", "message"),
    [
        ((torch.zeros(2, 3, dtype=F64), torch.zeros(3, 3, 3, dtype=F64)), ValueError,
         "grad_sources must be \\[B, 3\\] = \\[3, 3\\], got shape \\[2, 3\\]"),
        ((torch.zeros(3, 3, dtype=F64), torch.zeros(3, 9, dtype=F64)), ValueError,
         "grad_ray_matrices must be \\[B, 3, 3\\] = \\[3, 3, 3\\], got shape \\[3, 9\\]"),
        ((torch.zeros(3, 3, dtype=F64), torch.zeros(3, 3, 3)), TypeError,
         "grad_sources and grad_ray_matrices must both be float32 or both float64, got Double and Float"),
    ],
)  # fmt: skip
def test_direct_backward_calls_are_checked(grads, error, message) -> None:
    k, rotation, translation, sdd, _ = _op_args()
    with pytest.raises(error, match=message):
        torch.ops.torchdrr.pose_ray_parameters_backward(*grads, k, rotation, translation, sdd)


@needs_cuda
def test_cuda_matches_cpu_and_launches_one_kernel_each_way() -> None:
    """The CUDA kernels give the CPU kernels' numbers, and the wrapper launches exactly one kernel forward (no eye,
    solve, bmm or casts) and one backward."""
    rotation, translation, k, _ = poses(8, 16)
    cpu = camera_ray_parameters(k, rotation, translation, SDD, dtype=torch.float32)
    r, t, k_cuda = rotation.cuda().requires_grad_(), translation.cuda().requires_grad_(), k.cuda()
    camera_ray_parameters(k_cuda, r, t, SDD, dtype=torch.float32)  # warm-up
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as forward_profile:
        sources, matrices = camera_ray_parameters(k_cuda, r, t, SDD, dtype=torch.float32)
        torch.cuda.synchronize()
    for g, e in zip((sources, matrices), cpu, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=1.2e-7, atol=1.2e-7 * float(e.abs().max()))
    with torch.profiler.profile(activities=activities) as backward_profile:
        (sources.sum() + matrices.sum()).backward()
        torch.cuda.synchronize()

    def kernels(profile):
        return [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    forward, backward = kernels(forward_profile), kernels(backward_profile)
    assert len(forward) == 1 and "pose_forward_kernel" in forward[0], forward
    assert sum("pose_backward_kernel" in name for name in backward) == 1, backward
    r_cpu, t_cpu = rotation.clone().requires_grad_(), translation.clone().requires_grad_()
    cpu_sources, cpu_matrices = camera_ray_parameters(k, r_cpu, t_cpu, SDD, dtype=torch.float32)
    (cpu_sources.sum() + cpu_matrices.sum()).backward()
    torch.testing.assert_close(r.grad.cpu(), r_cpu.grad, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(t.grad.cpu(), t_cpu.grad, rtol=1e-12, atol=1e-12)

"""Tests of the C-arm ray-parameter op (torchdrr.ops.carm_ray_parameters): the numbers and gradients of
carm_extrinsics followed by camera_ray_parameters, in one launch forward and one backward (CPU and, where present,
CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import torchdrr.geometry
import torchdrr.ops
from torchdrr.geometry import camera_ray_parameters, carm_extrinsics, intrinsic_matrix
from torchdrr.ops import carm_ray_parameters

from .conftest import cuda_ready

F64 = torch.float64
SOD, SDD = 610.0, 1020.0
needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")


def random_intrinsics(batch: int | None, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular pinhole Ks ``[3, 3]`` (batch None) or ``[B, 3, 3]``: mirrored or not, with skew, off-centre
    principal points and a K[2, 2] other than 1, so that every entry of the closed-form inverse is exercised. The
    lower triangle holds garbage: the op must not read it."""
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


def poses(batch: int = 5, seed: int = 0, isocenter_batched: bool = False, intrinsics_batched: bool = False):
    """Random angles over the whole range (secondary and in-plane non-zero), an isocenter and K."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.stack(
        [
            torch.rand(batch, generator=generator, dtype=F64) * 360 - 180,
            torch.rand(batch, generator=generator, dtype=F64) * 170 - 85,
            torch.rand(batch, generator=generator, dtype=F64) * 360 - 180,
        ],
        dim=-1,
    )
    isocenter = 80 * torch.randn((batch, 3) if isocenter_batched else (3,), generator=generator, dtype=F64)
    k, k_garbage = random_intrinsics(batch if intrinsics_batched else None, generator)
    return angles, isocenter, k, k_garbage


def composite(angles, isocenter, intrinsics, sod=SOD, sdd=SDD):
    """The path the op replaces: carm_extrinsics, then camera_ray_parameters."""
    rotation, translation = carm_extrinsics(angles[:, 0], angles[:, 1], sod, isocenter, angles[:, 2])
    return camera_ray_parameters(intrinsics, rotation, translation, sdd)


def assert_close_to(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal to ``rtol`` relative to the largest entry (entries near 0 carry the rounding of the large ones)."""
    scale = float(expected.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("intrinsics_batched", [False, True])
@pytest.mark.parametrize("isocenter_batched", [False, True])
def test_matches_the_composite_path(device, isocenter_batched, intrinsics_batched, out_dtype) -> None:
    angles, isocenter, _, k_garbage = poses(6, 1, isocenter_batched, intrinsics_batched)
    angles, isocenter, k_garbage = angles.to(device), isocenter.to(device), k_garbage.to(device)
    sources, matrices = carm_ray_parameters(
        angles[:, 0], angles[:, 1], SOD, isocenter, k_garbage, SDD, angles[:, 2], dtype=out_dtype
    )
    expected_sources, expected_matrices = composite(angles, isocenter, torch.triu(k_garbage))
    assert sources.shape == (6, 3) and matrices.shape == (6, 3, 3)
    assert sources.dtype == matrices.dtype == out_dtype and sources.device == angles.device
    # float64: the same numbers up to rounding; float32: the float64 numbers rounded once (within one float32 ulp).
    rtol = 1e-13 if out_dtype == torch.float64 else 1.2e-7
    assert_close_to(sources, expected_sources.to(out_dtype), rtol)
    assert_close_to(matrices, expected_matrices.to(out_dtype), rtol)


@pytest.mark.parametrize(
    ("primary", "secondary", "inplane", "batch"),
    [
        (30.0, -12.5, 7.0, 1),  # all floats
        ("t", 0.0, 0.0, 4),  # the benchmark's form: secondary and in-plane share one fill
        (-20.0, "t", 0.0, 4),
        ("t", 15.0, "t", 4),
        ("0d", "t", -0.0, 4),  # a 0-d tensor broadcasts like a float
        ("1", "t", "t", 4),  # a [1] tensor broadcasts too
    ],
)
def test_float_and_tensor_angles(device, primary, secondary, inplane, batch) -> None:
    generator = torch.Generator().manual_seed(5)
    isocenter = torch.tensor([3.0, -40.0, 12.0], dtype=F64, device=device)
    k = intrinsic_matrix(SDD, 9, 11, (2.0, 3.0)).to(device)

    def make(value):
        if value == "t":
            return (torch.rand(batch, generator=generator, dtype=F64) * 120 - 60).to(device)
        if value == "0d":
            return torch.tensor(33.0, dtype=F64, device=device)
        if value == "1":
            return torch.tensor([-71.0], dtype=F64, device=device)
        return value

    args = [make(v) for v in (primary, secondary, inplane)]
    sources, matrices = carm_ray_parameters(args[0], args[1], SOD, isocenter, k, SDD, args[2])
    rotation, translation = carm_extrinsics(args[0], args[1], SOD, isocenter, args[2])
    rotation, translation = rotation.expand(batch, 3, 3), translation.expand(batch, 3)
    expected_sources, expected_matrices = camera_ray_parameters(k, rotation, translation, SDD)
    assert sources.shape == (batch, 3)
    assert_close_to(sources, expected_sources, 1e-13)
    assert_close_to(matrices, expected_matrices, 1e-13)


def test_strided_inputs_are_read_through_their_strides(device) -> None:
    """Transposed angles, an expanded isocenter and a transposed K give what their contiguous copies give."""
    angles, isocenter, k, _ = poses(4, 2, intrinsics_batched=True)
    angles, isocenter, k = angles.to(device), isocenter.to(device), k.to(device)
    angles_t = angles.t().contiguous().t()
    isocenter_expanded = isocenter.expand(4, 3)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not angles_t.is_contiguous() and isocenter_expanded.stride(0) == 0 and not k_t.is_contiguous()
    got = torch.ops.torchdrr.carm_ray_parameters(angles_t, isocenter_expanded, k_t, SOD, SDD, F64)
    expected = torch.ops.torchdrr.carm_ray_parameters(angles, isocenter.repeat(4, 1), k.contiguous(), SOD, SDD, F64)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("isocenter_batched", [False, True])
def test_gradcheck(device, isocenter_batched) -> None:
    angles, isocenter, k, _ = poses(3, 3, isocenter_batched, intrinsics_batched=True)
    angles = angles.to(device).requires_grad_()
    isocenter = isocenter.to(device).requires_grad_()
    k = k.to(device)

    def fn(a, p):
        return carm_ray_parameters(a[:, 0], a[:, 1], SOD, p, k, SDD, a[:, 2])

    assert gradcheck(fn, (angles, isocenter), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("intrinsics_batched", [False, True])
@pytest.mark.parametrize("isocenter_batched", [False, True])
def test_gradients_match_autograd_through_the_composite_path(
    device, isocenter_batched, intrinsics_batched, out_dtype
) -> None:
    angles, isocenter, k, _ = poses(5, 4, isocenter_batched, intrinsics_batched)
    angles, isocenter, k = angles.to(device), isocenter.to(device), k.to(device)
    generator = torch.Generator().manual_seed(9)
    weight_s = torch.randn(5, 3, generator=generator, dtype=F64).to(device=device, dtype=out_dtype)
    weight_m = torch.randn(5, 3, 3, generator=generator, dtype=F64).to(device=device, dtype=out_dtype)

    def grads(fn):
        a, p = angles.clone().requires_grad_(), isocenter.clone().requires_grad_()
        sources, matrices = fn(a, p)
        loss = (sources * weight_s).sum() + (matrices * weight_m).sum()
        return torch.autograd.grad(loss, (a, p))

    got = grads(lambda a, p: carm_ray_parameters(a[:, 0], a[:, 1], SOD, p, k, SDD, a[:, 2], dtype=out_dtype))
    expected = grads(lambda a, p: tuple(x.to(out_dtype) for x in composite(a, p, k)))
    assert got[0].dtype == got[1].dtype == F64  # the inputs' dtype, whatever the outputs'
    assert got[1].shape == isocenter.shape
    for g, e in zip(got, expected, strict=True):
        assert_close_to(g, e, 1e-12)


@pytest.mark.parametrize("used", ["sources", "ray_matrices"])
def test_gradient_of_one_output(device, used) -> None:
    """A loss of one output only: the other's gradient is zero (autograd materialises it), the result still exact."""
    angles, isocenter, k, _ = poses(3, 6)
    angles, isocenter, k = angles.to(device), isocenter.to(device), k.to(device)
    index = 0 if used == "sources" else 1

    def grads(fn):
        a, p = angles.clone().requires_grad_(), isocenter.clone().requires_grad_()
        # The ray matrices do not depend on the isocenter: its gradient is then 0 (None, materialised, in autograd).
        return torch.autograd.grad(fn(a, p)[index].sum(), (a, p), allow_unused=True, materialize_grads=True)

    got = grads(lambda a, p: carm_ray_parameters(a[:, 0], a[:, 1], SOD, p, k, SDD, a[:, 2]))
    expected = grads(lambda a, p: composite(a, p, k))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-9)


def test_shared_isocenter_gradient_over_a_large_batch(device) -> None:
    """More poses than one CUDA block has threads: the shared isocenter's gradient is the sum over all of them, and
    the same bits on every call (a fixed reduction order)."""
    angles, isocenter, k, _ = poses(700, 7)
    angles, isocenter, k = angles.to(device), isocenter.to(device), k.to(device)
    grad_sources = torch.randn(700, 3, dtype=F64, generator=torch.Generator().manual_seed(1)).to(device)
    grad_matrices = torch.zeros(700, 3, 3, dtype=F64, device=device)
    args = (grad_sources, grad_matrices, angles, isocenter, k, SOD, SDD)
    grad_angles, grad_isocenter = torch.ops.torchdrr.carm_ray_parameters_backward(*args)
    torch.testing.assert_close(grad_isocenter, grad_sources.sum(0), rtol=1e-12, atol=1e-11)
    again = torch.ops.torchdrr.carm_ray_parameters_backward(*args)
    assert torch.equal(again[1], grad_isocenter) and torch.equal(again[0], grad_angles)
    a = angles.clone().requires_grad_()
    sources, _ = composite(a, isocenter, k)
    (expected,) = torch.autograd.grad(sources, a, grad_sources)
    assert_close_to(grad_angles, expected, 1e-12)


def test_empty_batch(device) -> None:
    isocenter = torch.zeros(3, dtype=F64, device=device)
    k = intrinsic_matrix(SDD, 4, 4, (1.0, 1.0)).to(device)
    angles = torch.zeros(0, 3, dtype=F64, device=device)
    sources, matrices = torch.ops.torchdrr.carm_ray_parameters(angles, isocenter, k, SOD, SDD, torch.float32)
    assert sources.shape == (0, 3) and matrices.shape == (0, 3, 3) and sources.dtype == torch.float32
    grad_angles, grad_isocenter = torch.ops.torchdrr.carm_ray_parameters_backward(
        sources, matrices, angles, isocenter, k, SOD, SDD
    )
    assert grad_angles.shape == (0, 3) and torch.equal(grad_isocenter, torch.zeros_like(isocenter))


@pytest.mark.parametrize("isocenter_batched", [False, True])
def test_opcheck(device, isocenter_batched) -> None:
    angles, isocenter, k, _ = poses(3, 8, isocenter_batched, intrinsics_batched=isocenter_batched)
    angles, isocenter, k = angles.to(device), isocenter.to(device), k.to(device)
    for out_dtype in (torch.float64, torch.float32):
        torch.library.opcheck(
            torch.ops.torchdrr.carm_ray_parameters.default, (angles, isocenter, k, SOD, SDD, out_dtype)
        )
        grad_sources = torch.rand(3, 3, dtype=out_dtype, device=device)
        grad_matrices = torch.rand(3, 3, 3, dtype=out_dtype, device=device)
        torch.library.opcheck(
            torch.ops.torchdrr.carm_ray_parameters_backward.default,
            (grad_sources, grad_matrices, angles, isocenter, k, SOD, SDD),
        )


@pytest.mark.parametrize("isocenter_batched", [False, True])
def test_primary_column_form_equals_the_three_angle_form(device, isocenter_batched) -> None:
    """angles [B, 1] with the secondary and in-plane angles as numbers (what the wrapper passes for float secondary
    and in-plane angles, with no kernel to stack them) gives the same bits as the [B, 3] form, forward and backward;
    its angle gradient is the primary column. An expanded (stride 0) column is read through its stride."""
    angles, isocenter, k, _ = poses(4, 12, isocenter_batched)
    angles[:, 1], angles[:, 2] = -23.5, 61.25
    angles, isocenter, k = angles.to(device), isocenter.to(device), k.to(device)
    column = angles[:, :1].contiguous()
    for out_dtype in (torch.float64, torch.float32):
        full = torch.ops.torchdrr.carm_ray_parameters(angles, isocenter, k, SOD, SDD, out_dtype)
        short = torch.ops.torchdrr.carm_ray_parameters(column, isocenter, k, SOD, SDD, out_dtype, -23.5, 61.25)
        for a, b in zip(short, full, strict=True):
            assert torch.equal(a, b)
        grads = (torch.rand(4, 3, dtype=out_dtype).to(device), torch.rand(4, 3, 3, dtype=out_dtype).to(device))
        full_angles, full_isocenter = torch.ops.torchdrr.carm_ray_parameters_backward(
            *grads, angles, isocenter, k, SOD, SDD
        )
        short_angles, short_isocenter = torch.ops.torchdrr.carm_ray_parameters_backward(
            *grads, column, isocenter, k, SOD, SDD, -23.5, 61.25
        )
        assert short_angles.shape == (4, 1) and full_angles[:, 0].abs().min() > 0
        assert torch.equal(short_angles[:, 0], full_angles[:, 0])
        assert torch.equal(short_isocenter, full_isocenter)
        torch.library.opcheck(
            torch.ops.torchdrr.carm_ray_parameters.default, (column, isocenter, k, SOD, SDD, out_dtype, -23.5, 61.25)
        )
        torch.library.opcheck(
            torch.ops.torchdrr.carm_ray_parameters_backward.default,
            (*grads, column, isocenter, k, SOD, SDD, -23.5, 61.25),
        )
    shared = angles[:1, :1].expand(4, 1)  # one primary angle for every pose
    sources, _ = torch.ops.torchdrr.carm_ray_parameters(shared, isocenter, k, SOD, SDD, F64, -23.5, 61.25)
    expected, _ = torch.ops.torchdrr.carm_ray_parameters(
        angles[:1].expand(4, 3).contiguous(), isocenter, k, SOD, SDD, F64
    )
    assert torch.equal(sources, expected)
    with pytest.raises(ValueError, match="secondary_deg and inplane_deg must be finite, got nan and 0"):
        torch.ops.torchdrr.carm_ray_parameters(column, isocenter, k, SOD, SDD, F64, math.nan, 0.0)
    with pytest.raises(ValueError, match=r"angles must be \[B, 3\] .* or \[B, 1\] .*got shape \[4, 2\]"):
        torch.ops.torchdrr.carm_ray_parameters(angles[:, :2], isocenter, k, SOD, SDD, F64)


@pytest.mark.parametrize("k_grad", [False, True])
def test_torch_compile_fullgraph_matches_eager(k_grad) -> None:
    """The wrapper traces into one graph (dynamo, fake kernels, autograd registration), the composite fallback too
    (k_grad); aot_eager checks all of that without inductor's code generation, to keep the test cheap."""
    angles, isocenter, k, _ = poses(3, 10)
    k = k.requires_grad_(k_grad)

    def loss(primary, centre, intrinsics):
        sources, matrices = carm_ray_parameters(primary, 11.0, SOD, centre, intrinsics, SDD, -4.0, dtype=torch.float32)
        return sources.square().sum() + matrices.sum()

    primary = angles[:, 0].clone().requires_grad_()
    centre = isocenter.clone().requires_grad_()
    inputs = (primary, centre, k)
    wrt = inputs if k_grad else inputs[:2]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, expected = compiled(*inputs), loss(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got_grads = torch.autograd.grad(compiled(*inputs), wrt)
    expected_grads = torch.autograd.grad(loss(*inputs), wrt)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_intrinsics_that_need_a_gradient_take_the_composite_path() -> None:
    angles, isocenter, k, _ = poses(3, 11, intrinsics_batched=True)
    k_op, k_ref = k.clone().requires_grad_(), k.clone().requires_grad_()
    primary = angles[:, 0].clone().requires_grad_()
    sources, matrices = carm_ray_parameters(primary, angles[:, 1], SOD, isocenter, k_op, SDD, angles[:, 2])
    (sources.sum() + matrices.square().sum()).backward()
    expected_sources, expected_matrices = composite(
        torch.stack([primary.detach(), angles[:, 1], angles[:, 2]], -1), isocenter, k_ref
    )
    (expected_sources.sum() + expected_matrices.square().sum()).backward()
    assert k_op.grad is not None and float(k_op.grad.abs().max()) > 0
    torch.testing.assert_close(k_op.grad, k_ref.grad, rtol=1e-12, atol=0)
    assert_close_to(matrices, expected_matrices, 1e-13)


# carm_extrinsics checks a tensor sod_mm with float(), which warns for a tensor that requires a gradient.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_distances_that_need_a_gradient_take_the_composite_path() -> None:
    angles, isocenter, k, _ = poses(2, 12)
    sod = torch.tensor(SOD, dtype=F64, requires_grad=True)
    sdd = torch.tensor(SDD, dtype=F64, requires_grad=True)
    sources, matrices = carm_ray_parameters(angles[:, 0], angles[:, 1], sod, isocenter, k, sdd, angles[:, 2])
    (sources.sum() + matrices.sum()).backward()
    sod_ref = torch.tensor(SOD, dtype=F64, requires_grad=True)
    sdd_ref = torch.tensor(SDD, dtype=F64, requires_grad=True)
    expected_sources, expected_matrices = composite(angles, isocenter, k, sod_ref, sdd_ref)
    (expected_sources.sum() + expected_matrices.sum()).backward()
    assert float(sod.grad.abs()) > 0 and float(sdd.grad.abs()) > 0
    torch.testing.assert_close(sod.grad, sod_ref.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(sdd.grad, sdd_ref.grad, rtol=1e-12, atol=0)


def test_exported_from_geometry_and_ops() -> None:
    assert torchdrr.geometry.carm_ray_parameters is torchdrr.ops.carm_ray_parameters
    assert "carm_ray_parameters" in torchdrr.geometry.__all__ and "carm_ray_parameters" in torchdrr.ops.__all__


def _good_kwargs() -> dict:
    return dict(
        primary_deg=torch.zeros(3, dtype=F64),
        secondary_deg=0.0,
        sod_mm=SOD,
        isocenter=torch.zeros(3, dtype=F64),
        intrinsics=intrinsic_matrix(SDD, 4, 5, (1.0, 1.0)),
        sdd_mm=SDD,
        inplane_deg=0.0,
    )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(sod_mm=0.0), ValueError, "sod_mm must be a positive distance in mm, got 0.0"),
        (dict(sod_mm=math.inf), ValueError, "sod_mm must be a positive distance in mm, got inf"),
        (dict(sod_mm=True), TypeError, "sod_mm must be a distance in mm \\(a real number\\), got bool"),
        (dict(sod_mm=torch.ones(2)), ValueError, "sod_mm must be one distance in mm, got a tensor of shape \\(2,\\)"),
        (dict(sdd_mm=-5.0), ValueError, "sdd_mm must be a positive distance in mm .*, got -5.0"),
        (dict(sdd_mm=math.nan), ValueError, "sdd_mm must be a positive distance in mm .*, got nan"),
        (dict(sdd_mm="1020"), TypeError, "sdd_mm must be a distance in mm \\(a real number\\), got str"),
        (dict(isocenter=[0.0, 0.0, 0.0]), TypeError, "isocenter must be a torch.Tensor, got list"),
        (dict(isocenter=torch.zeros(3, dtype=torch.int64)), TypeError, "isocenter must be float32 or float64 .* got "
         "torch.int64"),
        (dict(isocenter=torch.zeros(4, dtype=F64)), ValueError, "isocenter must be \\[3\\] or \\[B, 3\\] \\(mm\\), "
         "got shape \\(4,\\)"),
        (dict(isocenter=torch.zeros(3, device="meta", dtype=F64)), ValueError, "isocenter is on meta"),
        (dict(intrinsics=torch.eye(3).numpy()), TypeError, "intrinsics must be a torch.Tensor, got ndarray"),
        (dict(intrinsics=torch.eye(3, dtype=torch.int64)), TypeError, "intrinsics must be a floating-point K, got "
         "dtype torch.int64"),
        (dict(intrinsics=torch.eye(4, dtype=F64)), ValueError, "intrinsics must be \\[3, 3\\] or \\[B, 3, 3\\], got "
         "shape \\(4, 4\\)"),
        (dict(primary_deg=torch.zeros(3, 1, dtype=F64)), ValueError, "primary_deg must be a scalar or a \\[B\\] "
         "tensor of angles in degrees, got shape \\(3, 1\\)"),
        (dict(primary_deg=torch.zeros(3, dtype=torch.bool)), TypeError, "primary_deg must hold real angles in "
         "degrees, got dtype torch.bool"),
        (dict(secondary_deg=math.nan), ValueError, "secondary_deg must be a finite angle in degrees, got nan"),
        (dict(secondary_deg="0"), TypeError, "secondary_deg must be a float or a \\[B\\] tensor of angles in "
         "degrees, got str"),
        (dict(inplane_deg=torch.zeros(2, dtype=F64)), ValueError, "batch sizes of the angles, isocenter and "
         "intrinsics must agree \\(or be 1\\), got primary_deg 3, inplane_deg 2"),
        (dict(isocenter=torch.zeros(2, 3, dtype=F64)), ValueError, "got primary_deg 3, isocenter 2"),
        (dict(intrinsics=torch.eye(3, dtype=F64).expand(4, 3, 3)), ValueError, "got primary_deg 3, intrinsics 4"),
        (dict(dtype=torch.float16), TypeError, "dtype must be torch.float32 or torch.float64, got torch.float16"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_a_clear_error(change, error, message) -> None:
    kwargs = _good_kwargs()
    kwargs.update(change)
    with pytest.raises(error, match=message):
        carm_ray_parameters(**kwargs)


def test_good_kwargs_are_good() -> None:
    """The base of the error cases above runs, so that each error comes from its one changed argument."""
    sources, matrices = carm_ray_parameters(**_good_kwargs())
    assert sources.shape == (3, 3) and matrices.shape == (3, 3, 3)


def _op_args() -> tuple:
    angles, isocenter, k, _ = poses(3, 13)
    return angles, isocenter, k, SOD, SDD, F64


@pytest.mark.parametrize(
    ("index", "value", "error", "message"),
    [
        (0, torch.zeros(3, 4, dtype=F64), ValueError, "angles must be \\[B, 3\\] .*got shape \\[3, 4\\]"),
        (0, torch.zeros(3, 3, dtype=torch.int32), TypeError, "angles must be float32 or float64, got Int"),
        (1, torch.zeros(2, 3, dtype=F64), ValueError, "isocenter must be \\[3\\] or \\[B, 3\\] = \\[3, 3\\], got "
         "shape \\[2, 3\\]"),
        (1, torch.zeros(3), TypeError, "isocenter and intrinsics must have the angles' dtype Double, got Float and "
         "Double"),
        (2, torch.eye(3, dtype=F64).expand(2, 3, 3), ValueError, "intrinsics must be \\[3, 3\\] or \\[B, 3, 3\\] = "
         "\\[3, 3, 3\\], got shape \\[2, 3, 3\\]"),
        (3, 0.0, ValueError, "sod_mm must be a positive distance in mm, got 0"),
        (4, math.inf, ValueError, "sdd_mm must be a positive distance in mm .*got inf"),
        (5, torch.int64, TypeError, "out_dtype must be float32 or float64, got Long"),
    ],
)  # fmt: skip
def test_direct_op_calls_are_checked_too(index, value, error, message) -> None:
    args = list(_op_args())
    args[index] = value
    with pytest.raises(error, match=message):
        torch.ops.torchdrr.carm_ray_parameters(*args)


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
    angles, isocenter, k, sod, sdd, _ = _op_args()
    with pytest.raises(error, match=message):
        torch.ops.torchdrr.carm_ray_parameters_backward(*grads, angles, isocenter, k, sod, sdd)


@needs_cuda
def test_cuda_matches_cpu_and_launches_one_kernel_each_way() -> None:
    """The CUDA kernels give the CPU kernels' numbers; the wrapper makes no host-to-device copy and launches the op's
    kernel once forward and once backward (plus one fill and one stack for the angles)."""
    angles, isocenter, k, _ = poses(8, 14)
    cpu = carm_ray_parameters(angles[:, 0], 0.0, SOD, isocenter, k, SDD, dtype=torch.float32)
    primary, centre, k_cuda = angles[:, 0].cuda(), isocenter.cuda(), k.cuda()
    primary.requires_grad_()
    carm_ray_parameters(primary, 0.0, SOD, centre, k_cuda, SDD, dtype=torch.float32)  # warm-up
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as forward_profile:
        sources, matrices = carm_ray_parameters(primary, 0.0, SOD, centre, k_cuda, SDD, dtype=torch.float32)
        torch.cuda.synchronize()
    for g, e in zip((sources, matrices), cpu, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=1.2e-7, atol=1.2e-7 * float(e.abs().max()))
    with torch.profiler.profile(activities=activities) as backward_profile:
        (sources.sum() + matrices.sum()).backward()
        torch.cuda.synchronize()

    def kernels(profile):
        return [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    forward, backward = kernels(forward_profile), kernels(backward_profile)
    assert not [name for name in forward if "Memcpy" in name and "HtoD" in name], forward
    assert sum("carm_forward_kernel" in name for name in forward) == 1, forward
    assert len(forward) <= 3, forward  # fill (secondary = in-plane = 0), stack, the op
    assert sum("carm_backward_kernel" in name for name in backward) == 1, backward

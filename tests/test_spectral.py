"""Tests of the compiled spectral op ``log_weighted_transmission`` (CPU and, where present, CUDA): closed forms,
the pure-PyTorch reference, numerics at underflow, gradients, and the op as a torch custom op."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from torchdrr.ops import log_weighted_transmission, log_weighted_transmission_reference

from .conftest import cuda_ready

DTYPES = (torch.float32, torch.float64)


def random_case(materials: int, rows: int, bins: int, n_rays: int = 40, seed: int = 0, dtype=torch.float64):
    """Mass thicknesses of 0..4 g/cm^2, attenuation 0.05..2 cm^2/g, weights 0.1..2 (all float64 on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    mass_thickness = 4 * torch.rand(n_rays, materials, generator=generator, dtype=torch.float64)
    attenuation = 0.05 + 1.95 * torch.rand(materials, bins, generator=generator, dtype=torch.float64)
    weights = 0.1 + 1.9 * torch.rand(rows, bins, generator=generator, dtype=torch.float64)
    return mass_thickness.to(dtype), attenuation.to(dtype), weights.to(dtype)


def closed_form(mass_thickness, attenuation, weights, group_starts) -> torch.Tensor:
    """out[n, q, g] in float64 with Python's math, term by term (math.fsum, shift by the largest weighted term)."""
    a, mu, w = (x.detach().cpu().double().tolist() for x in (mass_thickness, attenuation, weights))
    out = torch.empty(len(a), len(w), len(group_starts) - 1, dtype=torch.float64)
    for n, thickness in enumerate(a):
        log_t = [-math.fsum(mu[m][e] * thickness[m] for m in range(len(mu))) for e in range(len(mu[0]))]
        for q, row in enumerate(w):
            for g in range(len(group_starts) - 1):
                terms = [(row[e], log_t[e]) for e in range(group_starts[g], group_starts[g + 1]) if row[e] > 0]
                if not terms:
                    out[n, q, g] = -math.inf
                    continue
                shift = max(lt for _, lt in terms)
                out[n, q, g] = shift + math.log(math.fsum(wq * math.exp(lt - shift) for wq, lt in terms))
    return out


# ------------------------------------------------------------------------------------------------------------
# Closed forms
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_monoenergetic_is_log_weight_minus_mu_a(device, dtype) -> None:
    mass_thickness = torch.tensor([[0.0], [0.5], [3.0], [40.0]], dtype=dtype, device=device)
    attenuation = torch.tensor([[0.2]], dtype=dtype, device=device)
    weights = torch.tensor([[2.5]], dtype=dtype, device=device)
    got = log_weighted_transmission(mass_thickness, attenuation, weights, [0, 1])
    assert got.shape == (4, 1, 1) and got.dtype == dtype and got.device.type == device
    mu, w = float(attenuation), float(weights)
    expected = torch.tensor([math.log(w) - mu * float(a) for a in mass_thickness.flatten()], dtype=torch.float64)
    tolerance = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.flatten().cpu().double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_bins_closed_form(device, dtype) -> None:
    mass_thickness = torch.tensor([[0.0], [1.0], [7.5], [60.0]], dtype=dtype, device=device)
    attenuation = torch.tensor([[0.3, 0.1]], dtype=dtype, device=device)
    weights = torch.tensor([[1.5, 0.25]], dtype=dtype, device=device)
    got = log_weighted_transmission(mass_thickness, attenuation, weights, torch.tensor([0, 2])).flatten()
    mu1, mu2 = attenuation.flatten().double().tolist()
    w1, w2 = weights.flatten().double().tolist()
    expected = torch.tensor(
        [math.log(w1 * math.exp(-mu1 * a) + w2 * math.exp(-mu2 * a)) for a in mass_thickness.flatten().tolist()],
        dtype=torch.float64,
    )
    tolerance = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tolerance, atol=tolerance)


# ------------------------------------------------------------------------------------------------------------
# Against the pure-PyTorch reference
# ------------------------------------------------------------------------------------------------------------

BINS = 12
LAYOUTS = {
    "one group, all bins": [0, BINS],
    "empty groups": [0, 3, 3, 7, BINS, BINS],
    "bins left out": [2, 5, 9],
    "one bin per group": list(range(BINS + 1)),
    "only empty": [4, 4],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3])
# 1-4 materials are compiled as exact counts, 5 and 8 under the bound 8 with run-time guards (dispatch_materials).
@pytest.mark.parametrize("materials", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_matches_reference(device, layout, materials, rows, dtype) -> None:
    starts = LAYOUTS[layout]
    mass_thickness, attenuation, weights = random_case(materials, rows, BINS, seed=materials * 10 + rows)
    weights[0, 5] = 0.0  # a zero weight inside a group must simply drop out
    expected = log_weighted_transmission_reference(mass_thickness, attenuation, weights, starts)
    got = log_weighted_transmission(*(x.to(device, dtype) for x in (mass_thickness, attenuation, weights)), starts)
    assert got.shape == (40, rows, len(starts) - 1) and got.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    # assert_close treats equal infinities as equal, so empty groups must be -inf in both.
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tolerance, atol=tolerance)
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("layout", ["empty groups", "bins left out"])
def test_gradients_match_reference_autograd(device, layout) -> None:
    starts = LAYOUTS[layout]
    mass_thickness, attenuation, weights = random_case(3, 2, BINS, n_rays=30, seed=5)
    upstream = torch.randn(30, 2, len(starts) - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(fn, dev):
        leaves = [mass_thickness.to(dev).requires_grad_(), weights.to(dev).requires_grad_()]
        out = fn(leaves[0], attenuation.to(dev), leaves[1], starts)
        finite = torch.isfinite(out)
        return torch.autograd.grad(torch.where(finite, out * upstream.to(dev), 0).sum(), leaves)

    for kernel, reference in zip(
        grads(log_weighted_transmission, device), grads(log_weighted_transmission_reference, "cpu"), strict=True
    ):
        torch.testing.assert_close(kernel.cpu(), reference, rtol=1e-12, atol=1e-13)


def test_batch_shapes_layouts_and_group_starts_forms(device) -> None:
    mass_thickness, attenuation, weights = random_case(2, 2, BINS, n_rays=12, seed=3)
    mass_thickness, attenuation, weights = (x.to(device) for x in (mass_thickness, attenuation, weights))
    starts = [0, 4, 9, BINS]
    flat = log_weighted_transmission(mass_thickness, attenuation, weights, starts)
    batched = log_weighted_transmission(mass_thickness.reshape(3, 4, 2), attenuation, weights, tuple(starts))
    assert batched.shape == (3, 4, 2, 3)
    torch.testing.assert_close(batched.reshape(12, 2, 3), flat, rtol=0, atol=0)
    transposed = mass_thickness.T.contiguous().T
    strided_tables = (attenuation.T.contiguous().T, torch.stack([weights, weights], -1)[..., 0])
    assert not transposed.is_contiguous() and not strided_tables[1].is_contiguous()
    torch.testing.assert_close(log_weighted_transmission(transposed, *strided_tables, starts), flat, rtol=0, atol=0)
    for form in (torch.tensor(starts), torch.tensor(starts, dtype=torch.int32, device=device)):
        torch.testing.assert_close(log_weighted_transmission(mass_thickness, attenuation, weights, form), flat)
    single = log_weighted_transmission(mass_thickness[0], attenuation, weights, starts)  # [M] -> [Q, G]
    torch.testing.assert_close(single, flat[0], rtol=0, atol=0)


def test_no_rays(device) -> None:
    _, attenuation, weights = random_case(2, 1, BINS)
    mass_thickness = torch.zeros(0, 2, dtype=torch.float64, device=device, requires_grad=True)
    weights = weights.to(device).requires_grad_()
    out = log_weighted_transmission(mass_thickness, attenuation.to(device), weights, [0, 6, BINS])
    assert out.shape == (0, 1, 2)
    out.sum().backward()
    assert mass_thickness.grad.shape == (0, 2) and torch.all(weights.grad == 0)


# ------------------------------------------------------------------------------------------------------------
# Numerics at the edges
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_accurate_where_transmission_underflows(device, dtype) -> None:
    """A * mu ~ 1e4: exp(L) underflows in both dtypes, the log of the sum must not."""
    mass_thickness = torch.tensor([[5000.0, 2000.0], [9000.0, 10.0], [1.0, 1.0]], dtype=dtype)
    attenuation = torch.tensor([[1.5, 1.0, 0.75, 2.0], [0.5, 0.25, 1.0, 0.125]], dtype=dtype)
    weights = torch.tensor([[0.5, 2.0, 1.0, 3.0], [0.0, 1.0, 4.0, 0.25]], dtype=dtype)
    starts = [0, 2, 4]
    got = log_weighted_transmission(*(x.to(device) for x in (mass_thickness, attenuation, weights)), starts).cpu()
    expected = closed_form(mass_thickness, attenuation, weights, starts)
    assert expected[:2].max() < -5000  # really far below exp's range
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_weight_at_the_least_attenuated_bin_does_not_underflow(device, dtype) -> None:
    """The shift is taken over weighted bins only: a zero weight where L = 0 must not push the weighted terms
    (L = -1e3) under exp's range."""
    mass_thickness = torch.tensor([[100.0]], dtype=dtype)
    attenuation = torch.tensor([[0.0, 10.0, 10.5]], dtype=dtype)
    weights = torch.tensor([[0.0, 1.0, 2.0]], dtype=dtype)
    got = log_weighted_transmission(*(x.to(device) for x in (mass_thickness, attenuation, weights)), [0, 3])
    expected = math.log(math.exp(-1000.0 + 1000.0) + 2 * math.exp(-1050.0 + 1000.0)) - 1000.0
    assert math.isclose(float(got), expected, rel_tol=1e-7 if dtype == torch.float32 else 1e-15)


def test_zero_weight_and_empty_groups_are_minus_inf_with_zero_gradient(device) -> None:
    mass_thickness, attenuation, weights = random_case(3, 2, BINS, n_rays=10, seed=9)
    weights[1, 4:8] = 0.0  # row 1, group 1: no weight at all
    starts = [0, 4, 8, 8, BINS]  # group 2 is empty
    mass_thickness, weights = mass_thickness.to(device).requires_grad_(), weights.to(device).requires_grad_()
    out = log_weighted_transmission(mass_thickness, attenuation.to(device), weights, starts)
    dead = torch.zeros(2, 4, dtype=torch.bool)
    dead[1, 1] = dead[:, 2] = True
    assert torch.all(out[:, dead] == -math.inf) and torch.isfinite(out[:, ~dead]).all()
    # The -inf entries take part in the loss with a finite upstream gradient: they must add 0, not NaN.
    grads = torch.autograd.grad(out.sum(), (mass_thickness, weights), retain_graph=True)
    live_grads = torch.autograd.grad(out[:, ~dead].sum(), (mass_thickness, weights))
    for g, live in zip(grads, live_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, live, rtol=1e-14, atol=0)
    assert torch.all(grads[1][1, 4:8] == 0)
    grad_direct = torch.ops.torchdrr.log_weighted_transmission_backward(
        torch.ones_like(out), out.detach(), mass_thickness.detach(), attenuation.to(device), weights.detach(), starts
    )
    torch.testing.assert_close(grad_direct, grads[0], rtol=1e-14, atol=0)


def test_fully_opaque_ray_is_minus_inf_with_zero_gradient(device) -> None:
    """An infinite mass thickness (all attenuation > 0) transmits nothing: -inf, and gradient 0, never NaN."""
    mass_thickness, attenuation, weights = random_case(2, 2, BINS, n_rays=3, seed=4)
    mass_thickness[1, 1] = math.inf
    mass_thickness, weights = mass_thickness.to(device).requires_grad_(), weights.to(device).requires_grad_()
    out = log_weighted_transmission(mass_thickness, attenuation.to(device), weights, [0, 5, BINS])
    assert torch.all(out[1] == -math.inf) and torch.isfinite(out[[0, 2]]).all()
    grad_thickness, grad_weights = torch.autograd.grad(out.sum(), (mass_thickness, weights), retain_graph=True)
    assert torch.all(grad_thickness[1] == 0) and torch.isfinite(grad_thickness).all()
    live_weights_grad = torch.autograd.grad(out[[0, 2]].sum(), weights)[0]
    torch.testing.assert_close(grad_weights, live_weights_grad, rtol=1e-14, atol=0)


def test_row_with_only_opaque_bins_adds_no_nan_to_the_gradient(device) -> None:
    """L = -inf (mu * A overflows) in the only bin row 1 weights: row 1 is -inf and must add 0 to the gradient,
    while row 0 (a finite bin of the same group) keeps its gradient -mu = -1."""
    mass_thickness = torch.tensor([[1e300]], dtype=torch.float64, device=device, requires_grad=True)
    attenuation = torch.tensor([[1.0, 1e10]], dtype=torch.float64, device=device)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    out = log_weighted_transmission(mass_thickness, attenuation, weights, [0, 2])
    assert out.flatten().tolist() == [-1e300, -math.inf]
    (grad,) = torch.autograd.grad(out.sum(), mass_thickness)
    assert grad.item() == -1.0


def test_nan_mass_thickness_gives_nan_in_its_ray_only(device) -> None:
    mass_thickness, attenuation, weights = random_case(2, 2, BINS, n_rays=4, seed=2)
    mass_thickness[1, 0] = math.nan
    out = log_weighted_transmission(*(x.to(device) for x in (mass_thickness, attenuation, weights)), [0, 5, BINS])
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


# ------------------------------------------------------------------------------------------------------------
# One weight table per image: weights [S, Q, E]
# ------------------------------------------------------------------------------------------------------------


def weight_set_case(sets: int, rays_per_set: int, dtype=torch.float64):
    """mass_thickness [S, R, 3] and weights [S, 2, BINS]: every set its own random spectrum, some bins zeroed."""
    mass_thickness, attenuation, _ = random_case(3, 2, BINS, n_rays=sets * rays_per_set, seed=31, dtype=dtype)
    generator = torch.Generator().manual_seed(32)
    weights = 0.1 + torch.rand(sets, 2, BINS, generator=generator, dtype=torch.float64)
    weights[1, :, BINS // 2 :] = 0  # e.g. a lower kVp for image 1
    return mass_thickness.reshape(sets, rays_per_set, 3), attenuation, weights.to(dtype)


# 256 rays per set: whole CUDA blocks per set (tables staged in shared memory); 37: blocks straddle two sets.
@pytest.mark.parametrize("rays_per_set", [256, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_sets_equal_one_call_per_set(device, rays_per_set, dtype) -> None:
    """Bit for bit: a ray's result does not depend on which call or which batch it is in."""
    mass_thickness, attenuation, weights = (x.to(device) for x in weight_set_case(4, rays_per_set, dtype))
    starts = [0, 3, 7, BINS]
    batched = log_weighted_transmission(mass_thickness, attenuation, weights, starts)
    assert batched.shape == (4, rays_per_set, 2, 3)
    for s in range(4):
        alone = log_weighted_transmission(mass_thickness[s], attenuation, weights[s], starts)
        torch.testing.assert_close(batched[s], alone, rtol=0, atol=0)
    expected = log_weighted_transmission_reference(mass_thickness, attenuation, weights, starts)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(batched, expected, rtol=tolerance, atol=tolerance)
    # The sets differ (image 1 has no weight above BINS // 2), so a kernel that used one table for all would fail.
    assert not torch.equal(batched[1], log_weighted_transmission(mass_thickness[1], attenuation, weights[0], starts))


def test_weight_sets_gradcheck(device) -> None:
    mass_thickness, attenuation, weights = weight_set_case(3, 4)
    weights = weights.clamp_min(0.05)  # finite differences need every weight inside the domain (>= 0)
    leaves = (mass_thickness.to(device).requires_grad_(), weights.to(device).requires_grad_())
    attenuation = attenuation.to(device)
    assert gradcheck(
        lambda a, w: log_weighted_transmission(a, attenuation, w, [1, 5, 9]), leaves, eps=1e-6, atol=1e-8, rtol=1e-6
    )


def test_weight_sets_opcheck(device) -> None:
    mass_thickness, attenuation, weights = (x.to(device) for x in weight_set_case(3, 5))
    forward = torch.ops.torchdrr.log_weighted_transmission_forward.default
    args = (mass_thickness.reshape(15, 3).requires_grad_(), attenuation, weights.requires_grad_(), [0, 4, BINS])
    torch.library.opcheck(forward, args)
    with pytest.raises(ValueError, match=r"N rays in S equal runs, got N = 14 and S = 3"):
        forward(mass_thickness.reshape(15, 3)[:14], attenuation, weights, [0, BINS])


# ------------------------------------------------------------------------------------------------------------
# Gradients and the op as a torch custom op
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3])
def test_gradcheck_mass_thickness_and_weights(device, rows) -> None:
    """float64 finite differences agree with the analytic gradients (positive weights; groups leave bins out)."""
    mass_thickness, attenuation, weights = random_case(3, rows, 9, n_rays=5, seed=rows)
    starts = [1, 4, 5, 8]
    leaves = (mass_thickness.to(device).requires_grad_(), weights.to(device).requires_grad_())
    attenuation = attenuation.to(device)
    assert gradcheck(
        lambda a, w: log_weighted_transmission(a, attenuation, w, starts), leaves, eps=1e-6, atol=1e-8, rtol=1e-6
    )


class _RecordBackwardCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.torchdrr.log_weighted_transmission_backward.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("thickness_grad", "weights_grad"), [(True, False), (False, True), (True, True)], ids=["thickness", "w", "both"]
)
def test_backward_computes_only_what_is_needed(thickness_grad, weights_grad) -> None:
    mass_thickness, attenuation, weights = random_case(2, 2, BINS, n_rays=6)
    mass_thickness.requires_grad_(thickness_grad)
    weights.requires_grad_(weights_grad)
    attenuation.requires_grad_()  # tabulated data: never gets a gradient
    recorder = _RecordBackwardCalls()
    with recorder:
        log_weighted_transmission(mass_thickness, attenuation, weights, [0, 6, BINS]).sum().backward()
    assert recorder.calls == int(thickness_grad)
    assert (mass_thickness.grad is not None) == thickness_grad and (weights.grad is not None) == weights_grad
    assert attenuation.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype) -> None:
    mass_thickness, attenuation, weights = (
        x.to(device, dtype).requires_grad_() for x in random_case(3, 2, BINS, n_rays=7, seed=4)
    )
    starts = [0, 5, 5, 10]
    forward = torch.ops.torchdrr.log_weighted_transmission_forward.default
    torch.library.opcheck(forward, (mass_thickness, attenuation.detach(), weights, starts))
    out = forward(mass_thickness.detach(), attenuation.detach(), weights.detach(), starts)
    args = (torch.rand_like(out), out, mass_thickness.detach(), attenuation.detach(), weights.detach(), starts)
    torch.library.opcheck(torch.ops.torchdrr.log_weighted_transmission_backward.default, args)


def test_torch_compile_fullgraph_matches_eager(device) -> None:
    mass_thickness, attenuation, weights = random_case(3, 2, BINS, n_rays=20, seed=12, dtype=torch.float32)
    leaves = [mass_thickness.to(device).requires_grad_(), weights.to(device).requires_grad_()]
    attenuation = attenuation.to(device)

    def loss(a, w):
        return log_weighted_transmission(a, attenuation, w, [0, 4, 9, BINS]).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    eager_value = loss(*leaves)
    eager_grads = torch.autograd.grad(eager_value, leaves)
    compiled_value = compiled(*leaves)
    compiled_grads = torch.autograd.grad(compiled_value, leaves)
    assert torch.isfinite(eager_value)
    torch.testing.assert_close(compiled_value, eager_value)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------------
# Input hygiene
# ------------------------------------------------------------------------------------------------------------


def _valid():
    mass_thickness, attenuation, weights = random_case(2, 2, 6, n_rays=4)
    return {"mass_thickness": mass_thickness, "attenuation": attenuation, "weights": weights, "group_starts": [0, 6]}


def _f64(*shape):
    return torch.ones(shape, dtype=torch.float64)


BAD_INPUTS = [
    ("list thickness", {"mass_thickness": [[1.0, 2.0]]}, TypeError, "mass_thickness must be a torch.Tensor"),
    ("int thickness", {"mass_thickness": torch.ones(4, 2, dtype=torch.int32)}, TypeError, "must be float32 or"),
    ("attenuation dtype", {"attenuation": torch.ones(2, 6)}, TypeError, "attenuation must have mass_thickness's dtype"),
    ("weights dtype", {"weights": torch.ones(2, 6)}, TypeError, "weights must have mass_thickness's dtype"),
    ("weights device", {"weights": _f64(2, 6).to("meta")}, ValueError, "weights must be on mass_thickness's device"),
    ("scalar thickness", {"mass_thickness": _f64()}, ValueError, r"mass_thickness must be \[\.\.\., M\]"),
    ("attenuation 1D", {"attenuation": _f64(6)}, ValueError, r"attenuation must be \[M, E\], got shape \(6,\)"),
    ("weights 1D", {"weights": _f64(6)}, ValueError, r"weights must be \[Q, E\] or \[S, Q, E\], got shape \(6,\)"),
    (
        "weight sets disagree with the batch",
        {"weights": _f64(3, 2, 6)},
        ValueError,
        r"weights \[S, Q, E\] need mass_thickness \[S, \.\.\., M\] with the same S: got weights \(3, 2, 6\)",
    ),
    ("M disagrees", {"attenuation": _f64(3, 6)}, ValueError, r"must agree on M: got \(4, 2\) and \(3, 6\)"),
    ("E disagrees", {"weights": _f64(2, 5)}, ValueError, r"must agree on E: got \(2, 5\) and \(2, 6\)"),
    (
        "too many materials",
        {"mass_thickness": _f64(4, 9), "attenuation": _f64(9, 6)},
        ValueError,
        "1 to 8 materials .M., got 9",
    ),
    ("too many rows", {"weights": _f64(9, 6)}, ValueError, r"1 to 8 rows \(Q\), got 9"),
    (
        "no bins",
        {"attenuation": _f64(2, 0), "weights": _f64(2, 0), "group_starts": [0, 0]},
        ValueError,
        r"at least one energy bin \(E >= 1\), got E = 0",
    ),
    ("one start", {"group_starts": [0]}, ValueError, r"G \+ 1 >= 2 bin indices .*got \[0\]"),
    ("decreasing", {"group_starts": [0, 4, 3]}, ValueError, r"non-decreasing within \[0, E = 6\], got \[0, 4, 3\]"),
    ("past E", {"group_starts": [0, 7]}, ValueError, r"non-decreasing within \[0, E = 6\], got \[0, 7\]"),
    ("negative start", {"group_starts": [-1, 3]}, ValueError, r"non-decreasing within \[0, E = 6\]"),
    ("float starts", {"group_starts": [0.0, 6.0]}, TypeError, "group_starts must hold integers"),
    ("float tensor starts", {"group_starts": torch.tensor([0.0, 6.0])}, TypeError, "got a tensor of torch.float32"),
    ("2D tensor starts", {"group_starts": torch.tensor([[0, 6]])}, ValueError, r"1-D tensor .* got shape \(1, 2\)"),
    ("int starts", {"group_starts": 6}, TypeError, "list/tuple of ints or a 1-D integer tensor, got int"),
    (
        "negative weight",
        {"weights": torch.tensor([[1.0, -0.5, 1, 1, 1, 1]] * 2, dtype=torch.float64)},
        ValueError,
        r"weights must be finite and >= 0, got minimum -0.5",
    ),
    ("NaN weight", {"weights": _f64(2, 6) * math.nan}, ValueError, "weights must be finite and >= 0, got NaN or Inf"),
    ("Inf attenuation", {"attenuation": _f64(2, 6) * math.inf}, ValueError, "attenuation must be finite"),
]


@pytest.mark.parametrize(("case", "change", "error", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_error(case, change, error, message) -> None:
    with pytest.raises(error, match=message):
        log_weighted_transmission(**{**_valid(), **change})


def test_direct_op_calls_are_checked_too() -> None:
    """Calling torch.ops.torchdrr.* directly with bad shapes raises instead of reading out of bounds."""
    a, mu, w, _ = _valid().values()
    forward = torch.ops.torchdrr.log_weighted_transmission_forward
    backward = torch.ops.torchdrr.log_weighted_transmission_backward
    with pytest.raises(ValueError, match=r"mass_thickness must be \[N, M\]"):
        forward(a[0], mu, w, [0, 6])
    with pytest.raises(ValueError, match="disagree on M"):
        forward(a, mu[:1], w, [0, 6])
    with pytest.raises(ValueError, match="disagree on E"):
        forward(a, mu, w[:, :5], [0, 6])
    with pytest.raises(ValueError, match=r"Q must be in \[1, 8\], got 9"):
        forward(a, mu, _f64(9, 6), [0, 6])
    with pytest.raises(ValueError, match=r"non-decreasing within \[0, E = 6\]"):
        forward(a, mu, w, [0, 7])
    with pytest.raises(ValueError, match=r"G \+ 1 >= 2"):
        forward(a, mu, w, [0])
    with pytest.raises(TypeError, match="must have mass_thickness's dtype"):
        forward(a, mu.float(), w, [0, 6])
    out = forward(a, mu, w, [0, 3, 6])
    with pytest.raises(ValueError, match=r"grad_output and output must be \[N, Q, G\] = \[4, 2, 2\]"):
        backward(out[:, :, :1], out, a, mu, w, [0, 3, 6])


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [150, 3000], ids=["tables in shared memory", "tables too big for shared memory"])
def test_cuda_matches_cpu(dtype, bins) -> None:
    mass_thickness, attenuation, weights = random_case(8, 2, bins, n_rays=3000, seed=21, dtype=dtype)
    attenuation = attenuation / 20  # keep the sums in a range where float32 relative error means something
    starts = [0, bins // 3, bins // 3, bins - 7]
    cpu = [mass_thickness.clone().requires_grad_(), weights.clone().requires_grad_()]
    gpu = [mass_thickness.cuda().requires_grad_(), weights.cuda().requires_grad_()]
    out_cpu = log_weighted_transmission(cpu[0], attenuation, cpu[1], starts)
    out_gpu = log_weighted_transmission(gpu[0], attenuation.cuda(), gpu[1], starts)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=tolerance, atol=tolerance)
    upstream = torch.linspace(-1, 1, out_cpu.numel(), dtype=dtype).reshape(out_cpu.shape)
    live = torch.isfinite(out_cpu)
    grads_cpu = torch.autograd.grad(torch.where(live, out_cpu * upstream, 0).sum(), cpu)
    grads_gpu = torch.autograd.grad(torch.where(live.cuda(), out_gpu * upstream.cuda(), 0).sum(), gpu)
    for g, c in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=tolerance * 10, atol=tolerance * 10)

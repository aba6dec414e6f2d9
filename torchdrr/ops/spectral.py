"""The spectral op: ``log_weighted_transmission``, its fake kernels and its autograd formula.

The kernels are C++/CUDA custom ops (``torch.ops.torchdrr.log_weighted_transmission_forward`` / ``_backward``,
csrc/spectral/). This module validates user input, flattens the batch dimensions, and registers what
``torch.compile`` and autograd need:

* fake (meta) kernels, so shapes propagate without running the kernels;
* ``register_autograd`` on the forward op. The gradient to ``mass_thickness`` comes from the backward op (run only
  when ``mass_thickness`` needs a gradient); the gradient to ``weights`` is computed here in PyTorch (run only when
  ``weights`` needs one). ``attenuation`` gets no gradient: it is tabulated physics data.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .._extension import call_op, require_kernels_for

__all__ = ["MAX_MATERIALS", "MAX_WEIGHT_ROWS", "log_weighted_transmission"]

#: Largest number of materials M and of weight rows Q the kernels handle (one ray keeps them in registers;
#: csrc/spectral/spectral_math.h).
MAX_MATERIALS = 8
MAX_WEIGHT_ROWS = 8
_FLOAT_DTYPES = (torch.float32, torch.float64)


@torch.library.register_fake("torchdrr::log_weighted_transmission_forward")
def _forward_fake(mass_thickness, attenuation, weights, group_starts):
    return mass_thickness.new_empty((mass_thickness.shape[0], weights.shape[-2], len(group_starts) - 1))


@torch.library.register_fake("torchdrr::log_weighted_transmission_backward")
def _backward_fake(grad_output, output, mass_thickness, attenuation, weights, group_starts):
    return mass_thickness.new_empty((mass_thickness.shape[0], mass_thickness.shape[1]))


def _setup_context(ctx, inputs, output):
    mass_thickness, attenuation, weights, group_starts = inputs
    ctx.save_for_backward(mass_thickness, attenuation, weights, output)
    ctx.group_starts = [int(s) for s in group_starts]


def _weights_gradient(
    grad_output: Tensor,
    output: Tensor,
    mass_thickness: Tensor,
    attenuation: Tensor,
    group_starts: list[int],
    sets: int,
) -> Tensor:
    """dLoss/dweights [Q, E] (or [S, Q, E]): sum_n grad_output[n, q, g(e)] exp(L[n, e] - output[n, q, g(e)]), the
    sum over all rays (or over each of the S runs of rays of a weight set).

    Terms whose output is -inf (no transmitted weight in the group) and bins outside every group contribute 0.
    """
    rows, bins = output.shape[1], attenuation.shape[1]
    grad = output.new_zeros((sets, rows, bins))
    bin_list = [e for g in range(len(group_starts) - 1) for e in range(group_starts[g], group_starts[g + 1])]
    if not bin_list:
        return grad
    group_list = [g for g in range(len(group_starts) - 1) for _ in range(group_starts[g], group_starts[g + 1])]
    covered = torch.tensor(bin_list, device=output.device)
    group_of_bin = torch.tensor(group_list, device=output.device)
    # L at the covered bins, [N, E']: a sum over the few materials rather than a matmul, which could run in TF32
    # on a GPU and lose the precision exp(L - out) needs when L is large.
    table = attenuation.index_select(1, covered)
    log_transmission = -sum(mass_thickness[:, m, None] * table[m] for m in range(table.shape[0]))
    out = output.index_select(2, group_of_bin)  # [N, Q, E']
    live = out != -math.inf  # NaN stays live, so that NaN in gives NaN out
    exponent = torch.where(live, log_transmission.unsqueeze(1) - out, 0.0)
    terms = torch.where(live, grad_output.index_select(2, group_of_bin) * torch.exp(exponent), 0.0)
    return grad.index_copy(2, covered, terms.unflatten(0, (sets, -1)).sum(1))


def _backward(ctx, grad_output):
    mass_thickness, attenuation, weights, output = ctx.saved_tensors
    grad_output = grad_output.contiguous()
    grad_mass_thickness = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_mass_thickness = torch.ops.torchdrr.log_weighted_transmission_backward(
            grad_output, output, mass_thickness, attenuation, weights, ctx.group_starts
        )
    if ctx.needs_input_grad[2]:
        sets = weights.shape[0] if weights.dim() == 3 else 1
        grad_weights = _weights_gradient(grad_output, output, mass_thickness, attenuation, ctx.group_starts, sets)
        grad_weights = grad_weights.reshape(weights.shape)
    return grad_mass_thickness, None, grad_weights, None


torch.library.register_autograd("torchdrr::log_weighted_transmission_forward", _backward, setup_context=_setup_context)


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _group_starts_list(group_starts: Sequence[int] | Tensor, bins: int) -> list[int]:
    """group_starts as a list of Python ints, checked: G + 1 >= 2 non-decreasing values in [0, bins]."""
    if isinstance(group_starts, Tensor):
        if group_starts.dim() != 1:
            raise ValueError(f"group_starts must be a 1-D tensor of G + 1 ints, got shape {tuple(group_starts.shape)}")
        if group_starts.is_floating_point() or group_starts.is_complex() or group_starts.dtype == torch.bool:
            raise TypeError(f"group_starts must hold integers, got a tensor of {group_starts.dtype}")
        starts = [int(s) for s in group_starts.tolist()]
    elif isinstance(group_starts, Sequence) and not isinstance(group_starts, str | bytes):
        starts = []
        for s in group_starts:
            if isinstance(s, bool):
                raise TypeError(f"group_starts must hold integers, got {group_starts!r}")
            try:
                starts.append(operator.index(s))
            except TypeError:
                raise TypeError(f"group_starts must hold integers, got {group_starts!r}") from None
    else:
        raise TypeError(
            f"group_starts must be a list/tuple of ints or a 1-D integer tensor, got {type(group_starts).__name__}"
        )
    if len(starts) < 2:
        raise ValueError(f"group_starts must hold G + 1 >= 2 bin indices (at least one group), got {starts}")
    if any(s < 0 or s > bins for s in starts) or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"group_starts must be non-decreasing within [0, E = {bins}], got {starts}")
    return starts


def log_weighted_transmission(
    mass_thickness: Tensor,
    attenuation: Tensor,
    weights: Tensor,
    group_starts: Sequence[int] | Tensor,
    check_values: bool = True,
) -> Tensor:
    """Log of the spectrally weighted transmission through several materials, summed over groups of energy bins.

    With the log-transmission ``L[n, e] = -sum_m attenuation[m, e] * mass_thickness[n, m]`` in energy bin ``e``::

        out[n, q, g] = log(sum_{e in group g} weights[q, e] * exp(L[n, e]))

    (with ``[S, Q, E]`` weights, ray ``n`` of ``mass_thickness[s]`` uses ``weights[s]``).

    Group ``g`` is the bins ``[group_starts[g], group_starts[g + 1])``; bins outside
    ``[group_starts[0], group_starts[G])`` are ignored. The sum is computed shifted by its largest weighted term, so
    the result stays accurate where ``exp(L)`` underflows (``attenuation * mass_thickness`` of 1e4 gives about
    ``-1e4``, not ``-inf``, even in float32).

    Args:
        mass_thickness: ``[..., M]`` float32/float64 mass thickness of each material along each ray, g/cm^2
            (e.g. the ray integral of a material's density). ``M <= 8``. Not scanned for NaN/Inf (that would cost a
            pass over every ray): a NaN mass thickness gives NaN in that ray's results.
        attenuation: ``[M, E]`` mass-attenuation coefficients, cm^2/g, same dtype and device; finite. ``E >= 1``.
            Receives no gradient (tabulated data).
        weights: ``[Q, E]`` non-negative finite weights per energy bin, same dtype and device (e.g. photon fluence
            times detector efficiency, or that times the bin energy for an energy-integrating detector).
            ``Q <= 8``. Or ``[S, Q, E]``: one table per index of ``mass_thickness``'s first dimension (which must be
            S), e.g. each image of a batch with its own spectrum, in one call.
        group_starts: ``G + 1`` non-decreasing bin indices in ``[0, E]``, ``G >= 1``: a list/tuple of ints or a 1-D
            integer tensor on any device (read to the host; under ``torch.compile`` pass a list).
        check_values: scan ``attenuation`` and ``weights`` for NaN, Inf and negative weights (one reduction and one
            device sync). Callers whose tables are valid by construction (the ``DRR`` module) pass False.

    Returns:
        ``[..., Q, G]`` in ``mass_thickness``'s dtype and device: the log of the weighted transmitted signal
        (units of log(weight units)). ``-inf`` where a group is empty or all its weights are zero; never NaN for
        finite inputs.

    Gradients reach ``mass_thickness`` and ``weights``, each computed only when needed (a zero-weight or empty
    group, whose result is ``-inf``, contributes gradient 0). The value checks on ``attenuation`` and ``weights``
    (finite, non-negative) are one reduction per call, skipped while ``torch.compile`` traces. The op works under
    ``torch.compile(fullgraph=True)``.
    """
    mass_thickness = _check_tensor("mass_thickness", mass_thickness)
    attenuation = _check_tensor("attenuation", attenuation)
    weights = _check_tensor("weights", weights)
    if mass_thickness.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mass_thickness must be float32 or float64, got {mass_thickness.dtype}")
    for name, table in (("attenuation", attenuation), ("weights", weights)):
        if table.dtype != mass_thickness.dtype:
            raise TypeError(f"{name} must have mass_thickness's dtype {mass_thickness.dtype}, got {table.dtype}")
        if table.device != mass_thickness.device:
            raise ValueError(f"{name} must be on mass_thickness's device {mass_thickness.device}, got {table.device}")
    if mass_thickness.dim() < 1:
        raise ValueError(f"mass_thickness must be [..., M], got shape {tuple(mass_thickness.shape)}")
    if attenuation.dim() != 2:
        raise ValueError(f"attenuation must be [M, E], got shape {tuple(attenuation.shape)}")
    if weights.dim() not in (2, 3):
        raise ValueError(f"weights must be [Q, E] or [S, Q, E], got shape {tuple(weights.shape)}")
    if weights.dim() == 3 and (mass_thickness.dim() < 2 or mass_thickness.shape[0] != weights.shape[0]):
        raise ValueError(
            f"weights [S, Q, E] need mass_thickness [S, ..., M] with the same S: got weights {tuple(weights.shape)} "
            f"and mass_thickness {tuple(mass_thickness.shape)}"
        )
    materials, bins = attenuation.shape
    rows = weights.shape[-2]
    if mass_thickness.shape[-1] != materials:
        raise ValueError(
            f"mass_thickness [..., M] and attenuation [M, E] must agree on M: got {tuple(mass_thickness.shape)} "
            f"and {tuple(attenuation.shape)}"
        )
    if weights.shape[-1] != bins:
        raise ValueError(
            f"weights [..., Q, E] and attenuation [M, E] must agree on E: got {tuple(weights.shape)} "
            f"and {tuple(attenuation.shape)}"
        )
    if not 1 <= materials <= MAX_MATERIALS:
        raise ValueError(
            f"attenuation must have 1 to {MAX_MATERIALS} materials (M), got {materials}: each ray keeps its mass "
            "thicknesses in registers; split the materials into several calls or combine them"
        )
    if not 1 <= rows <= MAX_WEIGHT_ROWS:
        raise ValueError(
            f"weights must have 1 to {MAX_WEIGHT_ROWS} rows (Q), got {rows}: each ray keeps one sum per row in "
            "registers; split the rows into several calls"
        )
    if bins < 1:
        raise ValueError(f"attenuation and weights must have at least one energy bin (E >= 1), got E = {bins}")
    starts = _group_starts_list(group_starts, bins)
    require_kernels_for(mass_thickness.device, "mass_thickness")
    if check_values and not torch.compiler.is_compiling():
        # One reduction and one sync for both tables; the details are looked up only when something is wrong.
        ok = torch.stack([torch.isfinite(attenuation).all(), (torch.isfinite(weights) & (weights >= 0)).all()])
        attenuation_ok, weights_ok = ok.tolist()
        if not attenuation_ok:
            raise ValueError("attenuation must be finite, got NaN or Inf values")
        if not weights_ok:
            bad = "NaN or Inf" if not bool(torch.isfinite(weights).all()) else f"minimum {float(weights.min())}"
            raise ValueError(f"weights must be finite and >= 0, got {bad}")

    batch_shape = mass_thickness.shape[:-1]
    out = call_op(torch.ops.torchdrr.log_weighted_transmission_forward, mass_thickness.reshape(-1, materials),
                  attenuation, weights, starts)  # fmt: skip
    return out.reshape(*batch_shape, rows, len(starts) - 1)

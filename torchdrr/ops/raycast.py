"""The ray-casting op: ``torchdrr.raycast``, its fake kernels and its autograd formula.

The kernels are C++/CUDA custom ops (``torch.ops.torchdrr.raycast_forward`` / ``raycast_backward``, csrc/). This
module validates user input, broadcasts rays, and registers what ``torch.compile`` and autograd need:

* fake (meta) kernels, so shapes propagate without running the kernels;
* ``register_autograd`` with the backward as its own custom op, which computes only the gradients that are needed
  (no back-projection when the volume needs no gradient, no endpoint gradients when the rays need none).
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from .._extension import call_op, require_kernels_for

__all__ = ["raycast", "RAYCAST_MODES"]

#: Integration modes and the integer codes the C++ op takes.
RAYCAST_MODES: dict[str, int] = {"siddon": 0, "trilinear": 1}
_FLOAT_DTYPES = (torch.float32, torch.float64)


@torch.library.register_fake("torchdrr::raycast_forward")
def _raycast_forward_fake(volume, affine, sources, targets, mode, step):
    return volume.new_empty((sources.shape[0], volume.shape[0]))


@torch.library.register_fake("torchdrr::raycast_backward")
def _raycast_backward_fake(grad_output, volume, affine, sources, targets, mode, step, volume_grad, rays_grad):
    grad_volume = torch.empty_like(volume) if volume_grad else volume.new_empty((0,))
    n_rays = sources.shape[0]
    grad_sources = volume.new_empty((n_rays, 3)) if rays_grad else volume.new_empty((0,))
    grad_targets = volume.new_empty((n_rays, 3)) if rays_grad else volume.new_empty((0,))
    return grad_volume, grad_sources, grad_targets


def _setup_context(ctx, inputs, output):
    volume, affine, sources, targets, mode, step = inputs
    ctx.save_for_backward(volume, affine, sources, targets)
    ctx.mode = mode
    ctx.step = step


def _backward(ctx, grad_output):
    volume, affine, sources, targets = ctx.saved_tensors
    want_volume = ctx.needs_input_grad[0]
    want_sources, want_targets = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_volume, grad_sources, grad_targets = torch.ops.torchdrr.raycast_backward(
        grad_output.contiguous(),
        volume,
        affine,
        sources,
        targets,
        ctx.mode,
        ctx.step,
        want_volume,
        want_sources or want_targets,
    )
    return (
        grad_volume if want_volume else None,
        None,
        grad_sources if want_sources else None,
        grad_targets if want_targets else None,
        None,
        None,
    )


torch.library.register_autograd("torchdrr::raycast_forward", _backward, setup_context=_setup_context)


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_affine_mode_step(affine: Tensor | np.ndarray, mode: str, step: float | None) -> tuple[Tensor, float]:
    """Validates the arguments the ray-casting ops share. Returns the affine as the ``[4, 4]`` float64 CPU tensor
    the kernels read (they check its finiteness and invertibility) and the step in mm (0: the kernel's default)."""
    # The common case first (this runs every render): a [4, 4] float64 CPU tensor that needs no gradient is what the
    # kernels read, as it is.
    ready = (
        type(affine) is Tensor
        and affine.dtype == torch.float64
        and affine.shape == (4, 4)
        and not affine.requires_grad
        and affine.device.type == "cpu"
    )
    if not ready:
        if isinstance(affine, np.ndarray):
            affine = torch.from_numpy(affine)
        affine = _check_tensor("affine", affine)
        if tuple(affine.shape) != (4, 4):
            raise ValueError(f"affine must be [4, 4], got shape {tuple(affine.shape)}")
        if not affine.is_floating_point():
            raise TypeError(f"affine must be a floating-point tensor, got {affine.dtype}")
        affine = affine.detach().to(device="cpu", dtype=torch.float64)
    if mode not in RAYCAST_MODES:
        raise ValueError(f"mode must be one of {sorted(RAYCAST_MODES)}, got {mode!r}")
    if step is None:
        return affine, 0.0  # the kernel: half the smallest spacing
    if mode != "trilinear":
        raise ValueError(f"step applies to mode='trilinear' only, got step={step!r} with mode={mode!r}")
    if isinstance(step, bool) or not isinstance(step, Real) or not math.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive number of mm, got {step!r}")
    return affine, float(step)


def raycast(
    volume: Tensor,
    affine: Tensor | np.ndarray,
    sources: Tensor,
    targets: Tensor,
    mode: str = "siddon",
    step: float | None = None,
) -> Tensor:
    """Integrates a volume along straight rays (line integrals, as in an X-ray).

    Args:
        volume: ``[C, I, J, K]`` or ``[I, J, K]`` float32/float64 values per voxel (e.g. attenuation in 1/mm, or
            density per material). Voxel ``(i, j, k)`` is the box ``[i-1/2, i+1/2) x [j-1/2, j+1/2) x [k-1/2, k+1/2)``
            in index space; outside the volume the value is zero.
        affine: ``[4, 4]`` voxel index ``(i, j, k, 1)`` -> world point in mm (e.g. a NIfTI affine). Any device.
            Gradients do not flow to it.
        sources: ``[..., 3]`` ray start points in world mm, same dtype and device as ``volume``.
        targets: ``[..., 3]`` ray end points in world mm; broadcast against ``sources`` (``[B, 1, 3]`` with
            ``[B, R, 3]`` gives ``B x R`` rays). Only the segment between the two points is integrated.
        mode: ``"siddon"``: exact intersection lengths with the voxel boxes, nearest-voxel values.
            ``"trilinear"``: trilinear interpolation between voxel centres (clamped to the edge voxel inside the
            volume's outer box, zero outside), the part inside the box split into ``ceil(L / step)`` equal pieces
            sampled at their midpoints.
        step: trilinear sample spacing in mm; default half the smallest voxel spacing. Not used by Siddon.

    Returns:
        ``[..., C]`` for a 4D volume or ``[...]`` for a 3D one: the integral of the volume along each segment, in
        volume units x mm. ``...`` is the broadcast shape of the rays.

    Gradients reach ``volume`` (back-projection), ``sources`` and ``targets``; each is computed only when needed.
    The op works under ``torch.compile(fullgraph=True)``.
    """
    volume = _check_tensor("volume", volume)
    sources = _check_tensor("sources", sources)
    targets = _check_tensor("targets", targets)
    if volume.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"volume must be float32 or float64, got {volume.dtype} (convert with volume.float() first)")
    if volume.dim() not in (3, 4):
        raise ValueError(f"volume must be [I, J, K] or [C, I, J, K], got shape {tuple(volume.shape)}")
    if volume.numel() == 0:
        raise ValueError(f"volume must have at least one channel and one voxel per axis, got {tuple(volume.shape)}")
    for name, points in (("sources", sources), ("targets", targets)):
        if points.dim() == 0 or points.shape[-1] != 3:
            raise ValueError(f"{name} must be [..., 3] points in mm, got shape {tuple(points.shape)}")
        if points.dtype != volume.dtype:
            raise TypeError(f"{name} must have the volume's dtype {volume.dtype}, got {points.dtype}")
        if points.device != volume.device:
            raise ValueError(f"{name} must be on the volume's device {volume.device}, got {points.device}")
    require_kernels_for(volume.device, "volume")
    try:
        ray_shape = torch.broadcast_shapes(sources.shape[:-1], targets.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"sources {tuple(sources.shape)} and targets {tuple(targets.shape)} do not broadcast against each other"
        ) from None

    affine, step_mm = check_affine_mode_step(affine, mode, step)

    volume4 = volume if volume.dim() == 4 else volume.unsqueeze(0)
    flat_sources = sources.expand(*ray_shape, 3).reshape(-1, 3)
    flat_targets = targets.expand(*ray_shape, 3).reshape(-1, 3)
    out = call_op(torch.ops.torchdrr.raycast_forward, volume4, affine, flat_sources, flat_targets,
                  RAYCAST_MODES[mode], step_mm)  # fmt: skip
    out = out.reshape(*ray_shape, volume4.shape[0])
    return out if volume.dim() == 4 else out.squeeze(-1)

"""The pose ray-parameter op: ``pose_ray_parameters``, extrinsics and K to what ``camera_raycast`` takes, in one launch.

``torchdrr.geometry.camera_ray_parameters`` (``K``, ``R``, ``t``, SDD -> ``sources = -R^T t``,
``ray_matrices = SDD R^T K^-1``) written as tensor ops is about 8 small kernels on a GPU (eye, solve_triangular, two
bmm, neg, mul, then a cast of each output), solve_triangular alone ~150 us of host time on the H100, and the DRR
module runs it on every render. ``torch.ops.torchdrr.pose_ray_parameters`` computes the same numbers per pose in one
kernel (csrc/geometry/pose_math.h) and writes them in the dtype asked for; its backward op gives the gradients to
``R`` and ``t`` in one more. ``camera_ray_parameters`` is the user-facing wrapper (it validates input and falls back
to the composite path where the op cannot serve); this module registers what ``torch.compile`` and autograd need:

* fake (meta) kernels, so shapes propagate without running the kernels;
* ``register_autograd`` on the forward op: the backward op gives dLoss/dR and dLoss/dt. ``intrinsics`` gets no
  gradient from the op.
"""

from __future__ import annotations

import torch

from .._extension import has_cuda_kernels

__all__ = ["pose_kernels_available"]


@torch.library.register_fake("torchdrr::pose_ray_parameters")
def _forward_fake(intrinsics, rotation, translation, sdd_mm, out_dtype):
    batch = rotation.shape[0]
    return rotation.new_empty((batch, 3), dtype=out_dtype), rotation.new_empty((batch, 3, 3), dtype=out_dtype)


@torch.library.register_fake("torchdrr::pose_ray_parameters_backward")
def _backward_fake(grad_sources, grad_ray_matrices, intrinsics, rotation, translation, sdd_mm):
    return rotation.new_empty(rotation.shape), translation.new_empty(translation.shape)


def _setup_context(ctx, inputs, output):
    intrinsics, rotation, translation, sdd_mm, out_dtype = inputs
    ctx.save_for_backward(intrinsics, rotation, translation)
    ctx.sdd_mm = sdd_mm


def _backward(ctx, grad_sources, grad_ray_matrices):
    intrinsics, rotation, translation = ctx.saved_tensors
    want_rotation, want_translation = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (want_rotation or want_translation):
        return None, None, None, None, None
    # Autograd materialises the gradient of an unused output as zeros; None is handled for callers that do not.
    if grad_sources is None:
        grad_sources = grad_ray_matrices.new_zeros((rotation.shape[0], 3))
    if grad_ray_matrices is None:
        grad_ray_matrices = grad_sources.new_zeros((rotation.shape[0], 3, 3))
    grad_rotation, grad_translation = torch.ops.torchdrr.pose_ray_parameters_backward(
        grad_sources, grad_ray_matrices, intrinsics, rotation, translation, ctx.sdd_mm
    )
    return (
        None,
        grad_rotation if want_rotation else None,
        grad_translation if want_translation else None,
        None,
        None,
    )


torch.library.register_autograd("torchdrr::pose_ray_parameters", _backward, setup_context=_setup_context)


def pose_kernels_available(device: torch.device) -> bool:
    """Whether this build has a ``pose_ray_parameters`` kernel for ``device`` (the CPU always; CUDA when compiled):
    ``camera_ray_parameters`` takes the composite path on any other device instead of raising, as it always ran
    there."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and has_cuda_kernels()

"""The camera ray-casting op: ``torchdrr.ops.camera_raycast``, line integrals of whole detector images.

``raycast`` takes one source and one target per ray. A DRR's rays all come from a pinhole camera, so this op takes
the camera instead and makes each pixel's ray inside the kernel: for pose ``b`` and the pixel (sub-pixel) centre at
image coordinates ``(u, v)`` (column, row),

    source = sources[b],    target = sources[b] + ray_matrices[b] @ (u, v, 1).

``ray_matrices`` is ``SDD * R^T K^-1`` (``torchdrr.geometry.camera_ray_parameters``), so the target is the pixel's
point on the detector plane: the rays of ``torchdrr.geometry.pixel_rays``. Why a separate op: no ``[B * H * W, 3]``
endpoint tensors are made, saved or differentiated (at 1240 x 960 they cost more than the ray cast), the CUDA kernel
maps each warp to a compact tile of pixels whose rays read the same voxels, and the backward reduces the pose
gradient over each block of rays inside the kernel, giving the ``[B, 3]`` and ``[B, 3, 3]`` gradients directly.

When the pose needs a gradient (Siddon), the forward walk also computes every ray's Jacobian
``(dF_c/ds, dF_c/dt)`` per channel and saves it (``torchdrr::camera_raycast_forward_jacobian``, ``[B, R, C, 6]``); the
pose backward is then a reduction of ``grad_output x Jacobian`` over the rays
(``torchdrr::camera_raycast_pose_from_jacobian``) instead of a second walk of every ray through the volume, which
cost twice the forward on the H100. A volume gradient still comes from ``torchdrr::camera_raycast_backward`` (its
back-projection walks the rays anyway). Above ``POSE_JACOBIAN_MAX_BYTES`` of Jacobian the op keeps the two-walk path.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch
from torch import Tensor

from .._extension import call_op, require_kernels_for
from .raycast import RAYCAST_MODES, check_affine_mode_step

__all__ = ["POSE_JACOBIAN_MAX_BYTES", "camera_pixel_grid", "camera_raycast"]

_FLOAT_DTYPES = (torch.float32, torch.float64)

# The largest per-ray Jacobian, in bytes, that camera_raycast saves from the forward so that the pose backward needs
# no second walk. Why a limit: the Jacobian is 6 values per ray and channel (6x the image), held from the forward
# until the backward; the walk it saves costs about twice the forward. 256 MiB holds a float32 1240 x 960 image for
# 9 cameras of one channel or 2 of four channels (28.6 MB per camera and channel); a larger batch, more channels or
# supersampling falls back to the second walk rather than take that much more memory.
POSE_JACOBIAN_MAX_BYTES = 256 * 2**20


@torch.library.register_fake("torchdrr::camera_raycast_forward")
def _forward_fake(volume, affine, sources, ray_matrices, height, width, supersample, mode, step, quads=None):
    rays = height * width * supersample * supersample
    return volume.new_empty((sources.shape[0], rays, volume.shape[0]))


@torch.library.register_fake("torchdrr::camera_raycast_backward")
def _backward_fake(
    grad_output, volume, affine, sources, ray_matrices, height, width, supersample, mode, step, volume_grad, pose_grad
):
    grad_volume = torch.empty_like(volume) if volume_grad else volume.new_empty((0,))
    batch = sources.shape[0]
    grad_sources = volume.new_empty((batch, 3)) if pose_grad else volume.new_empty((0,))
    grad_matrices = volume.new_empty((batch, 3, 3)) if pose_grad else volume.new_empty((0,))
    return grad_volume, grad_sources, grad_matrices


def _setup_context(ctx, inputs, output):
    volume, affine, sources, ray_matrices, height, width, supersample, mode, step = inputs[:9]  # then quads, if any
    ctx.save_for_backward(volume, affine, sources, ray_matrices)
    ctx.args = (height, width, supersample, mode, step)
    ctx.input_count = len(inputs)


def _backward(ctx, grad_output):
    volume, affine, sources, ray_matrices = ctx.saved_tensors
    want_volume = ctx.needs_input_grad[0]
    want_pose = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    grad_volume, grad_sources, grad_matrices = torch.ops.torchdrr.camera_raycast_backward(
        grad_output.contiguous(), volume, affine, sources, ray_matrices, *ctx.args, want_volume, want_pose
    )
    grads = (
        grad_volume if want_volume else None,
        None,
        grad_sources if ctx.needs_input_grad[2] else None,
        grad_matrices if ctx.needs_input_grad[3] else None,
    )
    return grads + (None,) * (ctx.input_count - len(grads))  # the ints, the step and the quads take none


torch.library.register_autograd("torchdrr::camera_raycast_forward", _backward, setup_context=_setup_context)


@torch.library.register_fake("torchdrr::camera_raycast_forward_jacobian")
def _forward_jacobian_fake(volume, affine, sources, ray_matrices, height, width, supersample, mode, step):
    rays = height * width * supersample * supersample
    batch, channels = sources.shape[0], volume.shape[0]
    return volume.new_empty((batch, rays, channels)), volume.new_empty((batch, rays, channels, 6))


@torch.library.register_fake("torchdrr::camera_raycast_pose_from_jacobian")
def _pose_from_jacobian_fake(grad_output, jacobian, height, width, supersample):
    batch = jacobian.shape[0]
    return jacobian.new_empty((batch, 3)), jacobian.new_empty((batch, 3, 3))


def _jacobian_setup_context(ctx, inputs, output):
    volume, affine, sources, ray_matrices, height, width, supersample, mode, step = inputs
    _, jacobian = output
    ctx.mark_non_differentiable(jacobian)
    # No zeros of the Jacobian's size for its (never used) gradient.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(volume, affine, sources, ray_matrices, jacobian)
    ctx.args = (height, width, supersample, mode, step)


def _jacobian_backward(ctx, grad_output, _grad_jacobian):
    volume, affine, sources, ray_matrices, jacobian = ctx.saved_tensors
    height, width, supersample, _, _ = ctx.args
    want_volume = ctx.needs_input_grad[0]
    want_sources, want_matrices = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_volume = grad_sources = grad_matrices = None
    if grad_output is not None:
        grad_output = grad_output.contiguous()
        if want_volume:  # the back-projection walks the rays anyway; the pose part is not asked of it
            grad_volume, _, _ = torch.ops.torchdrr.camera_raycast_backward(
                grad_output, volume, affine, sources, ray_matrices, *ctx.args, True, False
            )
        if want_sources or want_matrices:
            grad_sources, grad_matrices = torch.ops.torchdrr.camera_raycast_pose_from_jacobian(
                grad_output, jacobian, height, width, supersample
            )
    return (
        grad_volume,
        None,
        grad_sources if want_sources else None,
        grad_matrices if want_matrices else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "torchdrr::camera_raycast_forward_jacobian", _jacobian_backward, setup_context=_jacobian_setup_context
)


def _uses_pose_jacobian(volume4: Tensor, sources: Tensor, ray_matrices: Tensor, mode: str, rays: int) -> bool:
    """Whether camera_raycast casts through the Jacobian op: the pose will be differentiated, Siddon (the fused walk
    exists for it; trilinear would walk once per channel), and the Jacobian fits POSE_JACOBIAN_MAX_BYTES."""
    if not (torch.is_grad_enabled() and (sources.requires_grad or ray_matrices.requires_grad) and mode == "siddon"):
        return False
    jacobian_bytes = sources.shape[0] * rays * volume4.shape[0] * 6 * volume4.element_size()
    return jacobian_bytes <= POSE_JACOBIAN_MAX_BYTES


def _positive_int(name: str, value: object) -> int:
    if type(value) is int and value >= 1:  # the common case, checked first: this runs every render
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def camera_raycast(
    volume: Tensor,
    affine: Tensor | np.ndarray,
    sources: Tensor,
    ray_matrices: Tensor,
    height: int,
    width: int,
    mode: str = "siddon",
    step: float | None = None,
    supersample: int = 1,
    quads: Tensor | None = None,
) -> Tensor:
    """Integrates a volume along every pixel ray of a batch of pinhole cameras (one kernel launch for the batch).

    Args:
        volume: ``[C, I, J, K]`` or ``[I, J, K]`` float32/float64 values per voxel, as in ``torchdrr.raycast``.
        affine: ``[4, 4]`` voxel index -> world mm. Any device; gradients do not flow to it.
        sources: ``[B, 3]`` X-ray source positions in world mm (volume's dtype and device).
        ray_matrices: ``[B, 3, 3]`` maps a pixel's homogeneous image coordinates ``(u, v, 1)`` (column, row) to the
            vector from the source to the pixel's point on the detector, in world mm: ``SDD * R^T K^-1``
            (``torchdrr.geometry.camera_ray_parameters``).
        height: detector rows H.
        width: detector columns W.
        mode: ``"siddon"`` or ``"trilinear"`` (see ``torchdrr.raycast``).
        step: trilinear sample spacing in mm (default half the smallest voxel spacing); Siddon takes none.
        supersample: ``s`` rays per pixel along each axis through the centres of an ``s x s`` sub-pixel grid
            (offsets ``(k + 1/2) / s - 1/2`` pixel).
        quads: trilinear renders of a dense one-channel float32 volume only: ``trilinear_quads(volume)``, which the
            GPU's trilinear samples read instead of the volume (2 loads a sample instead of 8; the same image to the
            bit, for 4x the volume's memory). Built once per volume; stale quads give the old volume's image. The
            CPU checks and ignores them; gradients still come from ``volume``.

    Returns:
        ``[B, H * W * s * s, C]`` (``[B, H * W * s * s]`` for a 3D volume), ordered row, column, sub-row,
        sub-column like ``torchdrr.geometry.pixel_rays``: line integrals in volume units x mm.

    Gradients reach ``volume`` (back-projection), ``sources`` and ``ray_matrices``, each only when needed; the pose
    gradients are reduced over the rays inside the kernel. When ``sources`` or ``ray_matrices`` require grad (grad
    mode on, Siddon), the forward also saves every ray's Jacobian ``[B, R, C, 6]`` so that the pose backward walks no
    ray again, as long as it takes at most ``POSE_JACOBIAN_MAX_BYTES`` (module docstring). The image is the same
    either way and so are the gradients, up to rounding (that route sums the pose gradient in float64). Works under
    ``torch.compile(fullgraph=True)``.
    """
    for name, value in (("volume", volume), ("sources", sources), ("ray_matrices", ray_matrices)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if volume.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"volume must be float32 or float64, got {volume.dtype} (convert with volume.float() first)")
    if volume.dim() not in (3, 4) or volume.numel() == 0:
        raise ValueError(f"volume must be a non-empty [I, J, K] or [C, I, J, K], got shape {tuple(volume.shape)}")
    if sources.dim() != 2 or sources.shape[-1] != 3:
        raise ValueError(f"sources must be [B, 3] source positions in mm, got shape {tuple(sources.shape)}")
    if tuple(ray_matrices.shape) != (sources.shape[0], 3, 3):
        raise ValueError(
            f"ray_matrices must be [B, 3, 3] = [{sources.shape[0]}, 3, 3] (one per source), got "
            f"{tuple(ray_matrices.shape)}"
        )
    for name, value in (("sources", sources), ("ray_matrices", ray_matrices)):
        if value.dtype != volume.dtype:
            raise TypeError(f"{name} must have the volume's dtype {volume.dtype}, got {value.dtype}")
        if value.device != volume.device:
            raise ValueError(f"{name} must be on the volume's device {volume.device}, got {value.device}")
    if sources.shape[0] == 0:
        raise ValueError("sources must hold at least one camera, got a batch of 0")
    if sources.shape[0] > 65535:
        raise ValueError(f"one call renders at most 65535 cameras, got {sources.shape[0]}: split the batch")
    height, width = _positive_int("height", height), _positive_int("width", width)
    supersample = _positive_int("supersample", supersample)
    if height * width * supersample * supersample >= 2**31:
        raise ValueError(
            f"an image must have fewer than 2**31 rays, got {height} x {width} pixels x {supersample}^2 sub-pixels"
        )
    require_kernels_for(volume.device, "volume")
    affine, step_mm = check_affine_mode_step(affine, mode, step)
    volume4 = volume if volume.dim() == 4 else volume.unsqueeze(0)
    args = (
        volume4, affine, sources.contiguous(), ray_matrices.contiguous(), height, width, supersample,
        RAYCAST_MODES[mode], step_mm,
    )  # fmt: skip
    if quads is not None:
        quads = _checked_quads(quads, volume, mode)
        args += (quads if quads.dim() == 5 else quads.unsqueeze(0),)
    if _uses_pose_jacobian(volume4, sources, ray_matrices, mode, height * width * supersample * supersample):
        out, _ = torch.ops.torchdrr.camera_raycast_forward_jacobian(*args)
    else:
        out = call_op(torch.ops.torchdrr.camera_raycast_forward, *args)
    return out if volume.dim() == 4 else out.squeeze(-1)


def _checked_quads(quads: object, volume: Tensor, mode: str) -> Tensor:
    """``quads`` if it can be ``trilinear_quads(volume)`` (the op checks the strides), else a clear error."""
    if not isinstance(quads, Tensor):
        raise TypeError(f"quads must be None or torchdrr.ops.trilinear_quads(volume), got {type(quads).__name__}")
    if mode != "trilinear":
        raise ValueError(f"quads serve trilinear renders only, got mode={mode!r}: leave quads=None")
    if tuple(quads.shape) != (*volume.shape, 4) or quads.dtype != torch.float32 or quads.device != volume.device:
        raise ValueError(
            f"quads must be torchdrr.ops.trilinear_quads(volume): float32 {(*volume.shape, 4)} on {volume.device}, "
            f"got {quads.dtype} {tuple(quads.shape)} on {quads.device}"
        )
    return quads


def camera_pixel_grid(
    height: int, width: int, supersample: int = 1, dtype: torch.dtype = torch.float64, device=None
) -> Tensor:
    """Homogeneous image coordinates ``(u, v, 1)`` ``[H * W * s * s, 3]`` of the rays ``camera_raycast`` casts, in
    its order (row, column, sub-row, sub-column): what ``ray_matrices`` multiplies."""
    offsets = (torch.arange(supersample, dtype=dtype, device=device) + 0.5) / supersample - 0.5
    rows = torch.arange(height, dtype=dtype, device=device)[:, None, None, None] + offsets[None, None, :, None]
    cols = torch.arange(width, dtype=dtype, device=device)[None, :, None, None] + offsets[None, None, None, :]
    shape = (height, width, supersample, supersample)
    u, v = cols.expand(shape).reshape(-1), rows.expand(shape).reshape(-1)
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)

"""The C-arm ray-parameter op: ``carm_ray_parameters``, C-arm angles to what ``camera_raycast`` takes, in one launch.

``torchdrr.geometry.carm_extrinsics`` (angles -> ``R``, ``t``) followed by
``torchdrr.geometry.camera_ray_parameters`` (``K``, ``R``, ``t``, SDD -> ``sources = -R^T t``,
``ray_matrices = SDD R^T K^-1``) is a chain of about 35 tiny tensor ops; on a GPU their launches cost ~0.7 ms of host
time per render, more than the ray cast of a small image. ``torch.ops.torchdrr.carm_ray_parameters`` computes the
same numbers per pose in one kernel (csrc/geometry/carm_math.h), and its backward op gives the gradients to the
angles and the isocenter in one more. This module validates user input, builds the ``[B, 3]`` angle tensor and
registers what ``torch.compile`` and autograd need:

* fake (meta) kernels, so shapes propagate without running the kernels;
* ``register_autograd`` on the forward op: the backward op gives dLoss/dangles (per degree) and dLoss/disocenter.
  ``intrinsics`` gets no gradient from the op; :func:`carm_ray_parameters` takes the composite path when K needs
  one.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from .._extension import call_op, require_kernels_for

__all__ = ["carm_ray_parameters"]

_FLOAT_DTYPES = (torch.float32, torch.float64)
# float and int first: isinstance stops at the first match, and the Real ABC's check is the slow one (this runs on
# every render, where host time is what the op saves).
_NUMBER_TYPES = (float, int, Real)


@torch.library.register_fake("torchdrr::carm_ray_parameters")
def _forward_fake(angles, isocenter, intrinsics, sod_mm, sdd_mm, out_dtype, secondary_deg=0.0, inplane_deg=0.0):
    batch = angles.shape[0]
    return angles.new_empty((batch, 3), dtype=out_dtype), angles.new_empty((batch, 3, 3), dtype=out_dtype)


@torch.library.register_fake("torchdrr::carm_ray_parameters_backward")
def _backward_fake(
    grad_sources, grad_ray_matrices, angles, isocenter, intrinsics, sod_mm, sdd_mm, secondary_deg=0.0, inplane_deg=0.0
):
    return angles.new_empty(angles.shape), isocenter.new_empty(isocenter.shape)


def _setup_context(ctx, inputs, output):
    angles, isocenter, intrinsics, sod_mm, sdd_mm, out_dtype, secondary_deg, inplane_deg = inputs
    ctx.save_for_backward(angles, isocenter, intrinsics)
    ctx.numbers = (sod_mm, sdd_mm, secondary_deg, inplane_deg)


def _backward(ctx, grad_sources, grad_ray_matrices):
    angles, isocenter, intrinsics = ctx.saved_tensors
    want_angles, want_isocenter = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (want_angles or want_isocenter):
        return None, None, None, None, None, None, None, None
    # Autograd materialises the gradient of an unused output as zeros; None is handled for callers that do not.
    if grad_sources is None:
        grad_sources = grad_ray_matrices.new_zeros((angles.shape[0], 3))
    if grad_ray_matrices is None:
        grad_ray_matrices = grad_sources.new_zeros((angles.shape[0], 3, 3))
    grad_angles, grad_isocenter = torch.ops.torchdrr.carm_ray_parameters_backward(
        grad_sources, grad_ray_matrices, angles, isocenter, intrinsics, *ctx.numbers
    )
    return (
        grad_angles if want_angles else None,
        grad_isocenter if want_isocenter else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("torchdrr::carm_ray_parameters", _backward, setup_context=_setup_context)


def _distance(name: str, value: object, why: str = "") -> float | Tensor:
    """A positive finite distance in mm: a Python number, or a 0-d tensor (kept as a tensor when it needs a
    gradient, for the composite path)."""
    if type(value) is float and 0.0 < value < math.inf:  # the common case, checked first: this runs every render
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be one distance in mm, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            number = float(value.detach())
            result: float | Tensor = value
        else:
            number = result = float(value)
    elif isinstance(value, _NUMBER_TYPES) and not isinstance(value, bool):
        number = result = float(value)
    else:
        raise TypeError(f"{name} must be a distance in mm (a real number), got {type(value).__name__}")
    if not (number > 0) or not math.isfinite(number):
        raise ValueError(f"{name} must be a positive distance in mm{why}, got {number}")
    return result


def _angle(name: str, value: object, dtype: torch.dtype, device: torch.device) -> Tensor | float:
    """One angle argument: a ``[B]`` (or 0-d) real tensor cast to the compute dtype and device, or a finite float."""
    if type(value) is float and math.isfinite(value):  # the common case, checked first: this runs every render
        return value
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a scalar or a [B] tensor of angles in degrees, got shape "
                             f"{tuple(value.shape)}")  # fmt: skip
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must hold real angles in degrees, got dtype {value.dtype}")
        if value.dtype != dtype or value.device != device:
            value = value.to(dtype=dtype, device=device)
        return value.reshape(1) if value.dim() == 0 else value
    if isinstance(value, _NUMBER_TYPES) and not isinstance(value, bool):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite angle in degrees, got {number}")
        return number
    raise TypeError(f"{name} must be a float or a [B] tensor of angles in degrees, got {type(value).__name__}")


def carm_ray_parameters(
    primary_deg: Tensor | float,
    secondary_deg: Tensor | float,
    sod_mm: float,
    isocenter: Tensor,
    intrinsics: Tensor,
    sdd_mm: float,
    inplane_deg: Tensor | float = 0.0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``camera_raycast`` ray parameters of a C-arm at the given angles, in one kernel launch (one more backward).

    The same numbers as ``camera_ray_parameters(intrinsics, *carm_extrinsics(primary_deg, secondary_deg, sod_mm,
    isocenter, inplane_deg), sdd_mm)`` cast to ``dtype``, where that chain launches about 35 small kernels on a GPU.
    The angle conventions are those of :func:`torchdrr.geometry.carm_extrinsics`.

    Args:
        primary_deg: ``[B]`` tensor or scalar primary angle (degrees, LAO positive).
        secondary_deg: ``[B]`` tensor or scalar secondary angle (degrees, cranial positive).
        sod_mm: source-to-isocenter distance in mm (> 0, finite).
        isocenter: ``[3]`` or ``[B, 3]`` world point (mm) the C-arm rotates about; float32 or float64. Its dtype is
            the compute dtype and its device the device of everything (tensor angles and K are moved there).
        intrinsics: ``[3, 3]`` or ``[B, 3, 3]`` pinhole K (``torchdrr.geometry.intrinsic_matrix``), upper
            triangular: only its upper triangle is read. A zero on its diagonal gives inf (it is not scanned, which
            would make the host wait for the GPU).
        sdd_mm: source-to-detector distance in mm (> 0, finite): the depth of the detector plane.
        inplane_deg: ``[B]`` tensor or scalar in-plane detector rotation (degrees, counter-clockwise on the image).
        dtype: float32 or float64 dtype of the outputs (default: ``isocenter``'s); the computation runs in
            ``isocenter``'s dtype either way, so float64 poses give float32 rays without a separate cast.

    The batch B is that of the tensor angles, ``isocenter`` and ``intrinsics`` together; each has it or 1 (or is a
    scalar / unbatched), as in broadcasting.

    Returns:
        ``sources`` ``[B, 3]`` (X-ray source positions, world mm) and ``ray_matrices`` ``[B, 3, 3]``
        (``SDD * R^T K^-1``, world mm per pixel: the ray of the pixel centre ``(u, v)`` runs from ``sources[b]`` to
        ``sources[b] + ray_matrices[b] @ (u, v, 1)``), in ``dtype`` on ``isocenter``'s device. Differentiable with
        respect to tensor angles (per degree) and ``isocenter``; when ``intrinsics`` (or a tensor ``sod_mm`` /
        ``sdd_mm``) requires a gradient, the composite ``carm_extrinsics`` + ``camera_ray_parameters`` path runs
        instead so that it gets one. Works under ``torch.compile(fullgraph=True)``.
    """
    for name, value in (("isocenter", isocenter), ("intrinsics", intrinsics)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if isocenter.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"isocenter must be float32 or float64 (it sets the compute dtype), got {isocenter.dtype}")
    if not intrinsics.is_floating_point():
        raise TypeError(f"intrinsics must be a floating-point K, got dtype {intrinsics.dtype}")
    if isocenter.dim() not in (1, 2) or isocenter.shape[-1] != 3:
        raise ValueError(f"isocenter must be [3] or [B, 3] (mm), got shape {tuple(isocenter.shape)}")
    if intrinsics.dim() not in (2, 3) or tuple(intrinsics.shape[-2:]) != (3, 3):
        raise ValueError(f"intrinsics must be [3, 3] or [B, 3, 3], got shape {tuple(intrinsics.shape)}")
    sod = _distance("sod_mm", sod_mm)
    sdd = _distance("sdd_mm", sdd_mm, " (a source on the detector plane casts no rays)")
    out_dtype = isocenter.dtype if dtype is None else dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {out_dtype}")
    compute, device = isocenter.dtype, isocenter.device
    require_kernels_for(device, "isocenter")
    angles = [
        _angle(name, value, compute, device)
        for name, value in (
            ("primary_deg", primary_deg),
            ("secondary_deg", secondary_deg),
            ("inplane_deg", inplane_deg),
        )
    ]

    # One batch size for everything; a batch of 1 broadcasts.
    lengths = {
        name: a.shape[0]
        for name, a in zip(("primary_deg", "secondary_deg", "inplane_deg"), angles, strict=True)
        if isinstance(a, Tensor)
    }
    if isocenter.dim() == 2:
        lengths["isocenter"] = isocenter.shape[0]
    if intrinsics.dim() == 3:
        lengths["intrinsics"] = intrinsics.shape[0]
    batch = next((n for n in lengths.values() if n != 1), 1)
    if any(n not in (1, batch) for n in lengths.values()):
        sizes = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise ValueError(f"the batch sizes of the angles, isocenter and intrinsics must agree (or be 1), got {sizes}")
    if isocenter.dim() == 2 and isocenter.shape[0] != batch:
        isocenter = isocenter.reshape(3)  # [1, 3] shared by a larger batch
    if intrinsics.dim() == 3 and intrinsics.shape[0] != batch:
        intrinsics = intrinsics.reshape(3, 3)
    if intrinsics.dtype != compute or intrinsics.device != device:
        intrinsics = intrinsics.to(dtype=compute, device=device)
    composite_needed = intrinsics.requires_grad or isinstance(sod, Tensor) or isinstance(sdd, Tensor)

    secondary, inplane = angles[1], angles[2]
    if not isinstance(secondary, Tensor) and not isinstance(inplane, Tensor) and not composite_needed:
        # Fixed secondary and in-plane angles (the common C-arm sweep): the op takes the primary angles as a [B, 1]
        # view and the other two as numbers, so that no kernel stacks them (a fill and a stack were two launches, and
        # their host time, before every render).
        primary = angles[0]
        if not isinstance(primary, Tensor):
            primary = isocenter.new_full((1,), primary)
        primary_column = (primary if primary.shape[0] == batch else primary.expand(batch)).unsqueeze(1)
        return call_op(torch.ops.torchdrr.carm_ray_parameters, primary_column, isocenter, intrinsics, sod, sdd,
                       out_dtype, secondary, inplane)  # fmt: skip

    # The [B, 3] angles in as few launches as possible and without host-to-device copies: one fill per distinct
    # float angle (secondary = in-plane = 0 share one) and one stack of the broadcast views.
    fills: dict[tuple[float, float], Tensor] = {}
    columns = []
    for a in angles:
        if not isinstance(a, Tensor):
            key = (a, math.copysign(1.0, a))  # -0.0 == 0.0, but keeps its own sign
            if key not in fills:
                fills[key] = isocenter.new_full((1,), a)
            a = fills[key]
        columns.append(a if a.shape[0] == batch else a.expand(batch))
    angle_tensor = torch.stack(columns, dim=-1)  # [B, 3]

    if composite_needed:
        # The op gives K (and the distances) no gradient: the composite path does, at its launch cost. Imported
        # here: torchdrr.geometry re-exports this module's function, so a module-level import would be a cycle.
        from ..geometry.camera import camera_ray_parameters
        from ..geometry.carm import carm_extrinsics

        rotation, translation = carm_extrinsics(
            angle_tensor[:, 0], angle_tensor[:, 1], sod, isocenter, angle_tensor[:, 2]
        )
        sources, ray_matrices = camera_ray_parameters(intrinsics, rotation, translation, sdd)
        return sources.to(out_dtype), ray_matrices.to(out_dtype)
    return call_op(torch.ops.torchdrr.carm_ray_parameters, angle_tensor, isocenter, intrinsics, sod, sdd, out_dtype)

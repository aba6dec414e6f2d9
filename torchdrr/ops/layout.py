"""Memory layouts of a volume for the CUDA ray casts: which index axis is stored contiguously.

The ops read a volume through its strides, so any layout gives the same images and gradients; only the speed
changes. A CT read in C order (``[I, J, K]`` from NIfTI or DICOM, as ``torchdrr.io`` returns it) has k, the
patient's long axis, contiguous. A C-arm turns about that axis, so its rays run across it and neighbouring pixels
of a detector row read voxels one row of the volume apart. Stored with the index axis that runs along the detector's
rows contiguous (``row_axis``), a warp's neighbouring rays read neighbouring memory instead (the kernel picks its
warp tiles to match); stored with the axis along the rays contiguous (``ray_axis``), a ray's next voxels share its
cache lines. Which is faster depends on the mode (H100, chest CT, AP, 1240 x 960; benchmarks/NOTES.md):

- trilinear: the row axis (1.8-1.9 -> ~1.5 ms); the ray axis is slower than k (2.1-3.1 ms);
- Siddon: the ray axis, most of all for the 4-channel material walk of ``DRR`` (1.19 -> 0.95 ms; one channel
  0.94 -> 0.86 ms).

The CPU kernels are fastest with k contiguous: use these for CUDA volumes.

For trilinear renders of one float32 channel, ``trilinear_quads`` trades memory for speed: a copy holding, at each
voxel, the 4 voxels of a 2 x 2 face of its interpolation stencil, so that the GPU reads a sample's 8 voxels in 2
loads instead of 8 (``camera_raycast(..., quads=...)``; trilinear kernel 1.39 -> 1.15 ms on the H100, same image
to the bit).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_volume(volume: Tensor) -> None:
    if not isinstance(volume, Tensor) or volume.dim() not in (3, 4):
        got = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
        raise ValueError(f"volume must be an [I, J, K] or [C, I, J, K] tensor, got {got}")


def contiguous_axis(volume: Tensor) -> int:
    """The spatial index axis (0 = i, 1 = j, 2 = k) a volume stores contiguously: the one with the smallest stride
    among those longer than 1 (k when none is).

    Args:
        volume: ``[I, J, K]`` or ``[C, I, J, K]``.
    """
    _check_volume(volume)
    spatial = volume.shape[-3:]
    strides = volume.stride()[-3:]
    best = 2
    for axis in (0, 1):
        if spatial[axis] > 1 and (spatial[best] == 1 or strides[axis] < strides[best]):
            best = axis
    return best


def with_contiguous_axis(volume: Tensor, axis: int) -> Tensor:
    """The same voxel values, stored with index axis ``axis`` contiguous (the volume itself when it already is).

    The other two spatial axes keep their relative order. The channels of a ``[C, I, J, K]`` volume stay where they
    were: innermost for a channels-last volume (stride 1, as ``DRR.material_volume`` makes it), outermost otherwise.
    The result is a view of a new dense tensor with the volume's shape, dtype and device; it does not require grad
    unless the volume does (the copy is differentiable).

    Args:
        volume: ``[I, J, K]`` or ``[C, I, J, K]``.
        axis: 0 (i), 1 (j) or 2 (k).

    Returns:
        A tensor equal to ``volume`` (``torch.equal``) whose ``contiguous_axis`` is ``axis``.
    """
    _check_volume(volume)
    if isinstance(axis, bool) or not isinstance(axis, int) or axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (i), 1 (j) or 2 (k), got {axis!r}")
    channels_last = volume.dim() == 4 and volume.stride(0) == 1 and volume.shape[0] > 1
    others = [a for a in (0, 1, 2) if a != axis]
    spatial_order = [*others, axis]  # storage order, slowest first
    if volume.dim() == 3:
        order = spatial_order
    elif channels_last:
        order = [a + 1 for a in spatial_order] + [0]
    else:
        order = [0] + [a + 1 for a in spatial_order]
    stored = volume.permute(order)
    if stored.is_contiguous():
        return volume
    inverse = [order.index(d) for d in range(volume.dim())]
    return stored.contiguous().permute(inverse)


def _check_affine_and_matrices(affine: Tensor, ray_matrices: Tensor) -> tuple[Tensor, Tensor]:
    """(``[B, 3, 3]`` ray matrices, ``[3, 3]`` world -> index map), float64 on the CPU."""
    if not isinstance(affine, Tensor) or tuple(affine.shape) != (4, 4):
        raise ValueError(f"affine must be a [4, 4] tensor, got {getattr(affine, 'shape', type(affine).__name__)}")
    if not isinstance(ray_matrices, Tensor) or ray_matrices.dim() not in (2, 3) or ray_matrices.shape[-2:] != (3, 3):
        got = tuple(ray_matrices.shape) if isinstance(ray_matrices, Tensor) else type(ray_matrices).__name__
        raise ValueError(f"ray_matrices must be [B, 3, 3] or [3, 3], got {got}")
    matrices = ray_matrices.detach().to("cpu", torch.float64).reshape(-1, 3, 3)
    return matrices, torch.linalg.inv(affine.detach().to("cpu", torch.float64)[:3, :3])


def _largest_index_axis(directions: Tensor, world_to_index: Tensor) -> int:
    """The index axis along which world directions ``[B, 3]`` move most, in voxels (absolute values summed over B)."""
    return int((directions @ world_to_index.T).abs().sum(0).argmax())


def ray_axis(affine: Tensor, ray_matrices: Tensor, height: int, width: int) -> int:
    """The index axis the rays of these cameras run along (through the image centre): the best axis to store
    contiguously for CUDA Siddon renders from them (``with_contiguous_axis``).

    The centre ray's direction, ``ray_matrices @ ((W - 1) / 2, (H - 1) / 2, 1)``, mapped to voxel units by the
    inverse of the affine's linear part; its largest component (summed over the cameras as absolute values) names the
    axis. Reads ``ray_matrices`` on the host: call it once, at setup.

    Args:
        affine: ``[4, 4]`` voxel index -> world mm.
        ray_matrices: ``[B, 3, 3]`` or ``[3, 3]`` (``torchdrr.geometry.camera_ray_parameters``).
        height, width: the detector's rows and columns (pixels).

    Returns:
        0 (i), 1 (j) or 2 (k).
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    matrices, world_to_index = _check_affine_and_matrices(affine, ray_matrices)
    centre = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0, 1.0], dtype=torch.float64)
    return _largest_index_axis(matrices @ centre, world_to_index)  # the centre rays, world mm


def row_axis(affine: Tensor, ray_matrices: Tensor) -> int:
    """The index axis the detector's rows run along for these cameras: the best axis to store contiguously for
    CUDA trilinear renders from them (``with_contiguous_axis``).

    The detector's row direction (increasing u) is the first column of each ray matrix, in world mm a pixel; mapped
    to voxel units by the inverse of the affine's linear part, its largest component (summed over the cameras as
    absolute values) names the axis. Reads ``ray_matrices`` on the host: call it once, at setup.

    Args:
        affine: ``[4, 4]`` voxel index -> world mm.
        ray_matrices: ``[B, 3, 3]`` or ``[3, 3]`` (``torchdrr.geometry.camera_ray_parameters``).

    Returns:
        0 (i), 1 (j) or 2 (k).
    """
    matrices, world_to_index = _check_affine_and_matrices(affine, ray_matrices)
    return _largest_index_axis(matrices[:, :, 0], world_to_index)  # the row direction, world mm a pixel


def _is_dense(tensor: Tensor) -> bool:
    """Whether the elements fill one block of memory without overlap, in some order of the axes (what the C++ side
    calls non-overlapping and dense): the strides of the axes longer than 1, sorted, are the running products of
    their sizes."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape, strict=True) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def trilinear_quads(volume: Tensor) -> Tensor:
    """The voxel quads of a one-channel float32 volume: what ``camera_raycast(..., mode="trilinear", quads=...)``
    reads on the GPU instead of the volume, 2 loads a sample instead of 8, for the same image to the bit.

    At each voxel ``(i, j, k)``: ``(v, v + a, v + b, v + a + b)``, where ``v`` is the voxel's value, ``+ a`` its
    neighbour along the volume's contiguous index axis ``a`` (``contiguous_axis``), ``+ b`` its neighbour along axis
    ``b``, which is k when a is j and j otherwise (the order the kernels relabel the axes in), and a neighbour past
    the last voxel is the last voxel itself. Stored with 4x the volume's strides, so that a voxel's quad sits at 4x
    its offset: 16 bytes per voxel, 4x the volume's memory (532 MB for the 512 x 512 x 133 chest CT). Build them
    once per volume and build them again after changing the volume: the ray cast cannot tell stale quads from fresh
    ones. Layout first (``with_contiguous_axis``), quads second.

    Args:
        volume: ``[I, J, K]`` or ``[1, I, J, K]`` float32, dense (any dense strides; not an arbitrary view).

    Returns:
        ``[*volume.shape, 4]`` float32 on the volume's device, detached (gradients flow through the volume, which
        the backward reads).
    """
    _check_volume(volume)
    if volume.dtype != torch.float32:
        raise TypeError(f"trilinear_quads: volume must be float32 (the GPU reads 16-byte quads), got {volume.dtype}")
    if volume.dim() == 4 and volume.shape[0] != 1:
        raise ValueError(
            f"trilinear_quads: volume must have one channel ([I, J, K] or [1, I, J, K]), got {volume.shape[0]}: "
            "multi-channel volumes read a voxel's channels together instead"
        )
    if not _is_dense(volume):
        raise ValueError(
            f"trilinear_quads: volume must be dense, got strides {volume.stride()} for shape {tuple(volume.shape)}; "
            "make it dense first (with_contiguous_axis or .contiguous())"
        )
    values = volume.detach()[0] if volume.dim() == 4 else volume.detach()  # [I, J, K], the volume's strides
    a = contiguous_axis(volume)
    b = 2 if a == 1 else 1

    def next_index(axis: int) -> Tensor:
        size = values.shape[axis]
        return (torch.arange(1, size + 1, device=values.device)).clamp_max(size - 1)

    along_a, next_b = values.index_select(a, next_index(a)), next_index(b)
    quads = torch.empty_strided(
        (*values.shape, 4), (*(4 * s for s in values.stride()), 1), dtype=values.dtype, device=values.device
    )
    quads[..., 0].copy_(values)
    quads[..., 1].copy_(along_a)
    quads[..., 2].copy_(values.index_select(b, next_b))
    quads[..., 3].copy_(along_a.index_select(b, next_b))
    return quads.unsqueeze(0) if volume.dim() == 4 else quads

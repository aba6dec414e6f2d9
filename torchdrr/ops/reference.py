"""Pure-PyTorch reference implementations of the ray-casting op and of the spectral op.

This module is the test oracle for the C++/CUDA kernels (``log_weighted_transmission_reference`` is at the end).
The ray-casting reference is described below. It favours clarity and exactness over speed and
memory: every ray is processed at once (vectorised), with intermediate tensors of size
``n_rays x (I + J + K + 5)`` (Siddon) or ``n_rays x max_samples`` (trilinear).

Conventions (shared with the kernel):

* ``volume`` is ``[C, I, J, K]`` (or ``[I, J, K]`` for one channel). ``affine`` (``[4, 4]``) maps the voxel
  index ``(i, j, k, 1)`` to a world point in mm.
* Voxel ``(i, j, k)`` is the box ``[i-1/2, i+1/2) x [j-1/2, j+1/2) x [k-1/2, k+1/2)`` in index space, so voxel
  centres sit at integer indices. The volume is zero outside the outer box
  ``[-1/2, I-1/2] x [-1/2, J-1/2] x [-1/2, K-1/2]``.
* A ray is the *segment* from ``source`` to ``target`` (world mm). The result is the line integral of the
  volume along that segment, with length measured in world mm, i.e. in (volume units x mm).
* Segments lying exactly in a face of the outer box (a set of measure zero) are treated as inside: the outer
  box is closed.

Autograd gives gradients with respect to ``volume``, ``sources`` and ``targets`` (never ``affine``) that equal
the analytic derivative almost everywhere; all divisions are guarded with ``torch.where`` so no NaN/Inf can
leak into gradients for axis-parallel rays or rays that miss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "camera_raycast_reference",
    "default_step",
    "log_weighted_transmission_reference",
    "raycast_reference",
]


def default_step(affine: Tensor) -> float:
    """Default trilinear sampling step: half the smallest voxel spacing.

    Args:
        affine: ``[4, 4]`` voxel-index-to-world matrix (mm).

    Returns:
        The step in mm, ``0.5 * min(||affine[:3, 0]||, ||affine[:3, 1]||, ||affine[:3, 2]||)``.
    """
    _check_affine(affine)
    spacing = torch.linalg.vector_norm(affine.detach().to(torch.float64)[:3, :3], dim=0)  # [3] mm
    return 0.5 * float(spacing.min())


def raycast_reference(
    volume: Tensor,
    affine: Tensor,
    sources: Tensor,
    targets: Tensor,
    mode: str = "siddon",
    step: float | None = None,
) -> Tensor:
    """Integrate a voxel volume along line segments (reference implementation).

    Args:
        volume: ``[C, I, J, K]`` or ``[I, J, K]``, floating point (float32 or float64).
        affine: ``[4, 4]`` matrix mapping voxel indices ``(i, j, k, 1)`` to world points in mm. It is inverted
            in float64 and receives no gradient.
        sources: ``[..., 3]`` segment start points in world mm, same dtype/device as ``volume``.
        targets: ``[..., 3]`` segment end points in world mm; broadcast against ``sources``.
        mode: ``"siddon"`` for exact voxel-box intersection lengths with nearest-voxel values, or
            ``"trilinear"`` for midpoint-rule sampling of the trilinearly interpolated volume.
        step: trilinear only: the sampling step in world mm. The part of the segment inside the outer box
            (length ``L``) is split into ``ceil(L / step)`` equal pieces sampled at their midpoints.
            Defaults to :func:`default_step` (half the smallest voxel spacing). Ignored for ``"siddon"``.

    Returns:
        ``[..., C]`` for a 4-D volume, ``[...]`` for a 3-D volume, where ``...`` is the broadcast batch shape
        of ``sources`` and ``targets``. Units: volume units x mm.
    """
    if mode not in ("siddon", "trilinear"):
        raise ValueError(f"mode must be 'siddon' or 'trilinear', got {mode!r}")
    if volume.dim() not in (3, 4):
        raise ValueError(f"volume must be [C, I, J, K] or [I, J, K], got shape {tuple(volume.shape)}")
    if not volume.is_floating_point():
        raise TypeError(f"volume must be floating point, got {volume.dtype}")
    for name, points in (("sources", sources), ("targets", targets)):
        if points.shape[-1:] != (3,):
            raise ValueError(f"{name} must have shape [..., 3], got {tuple(points.shape)}")
        if points.dtype != volume.dtype:
            # Deliberately strict: silent promotion would make float32/float64 comparisons ambiguous.
            raise TypeError(f"{name} dtype {points.dtype} differs from volume dtype {volume.dtype}")
        if points.device != volume.device:
            raise ValueError(f"{name} is on {points.device} but volume is on {volume.device}")
    _check_affine(affine)
    if mode == "trilinear":
        step = default_step(affine) if step is None else float(step)
        if not (step > 0.0 and math.isfinite(step)):
            raise ValueError(f"step must be a positive finite number of mm, got {step}")

    squeeze_channel = volume.dim() == 3
    vol = volume.unsqueeze(0) if squeeze_channel else volume  # [C, I, J, K]
    shape = vol.shape[1:]

    src_w, tgt_w = torch.broadcast_tensors(sources, targets)
    batch_shape = src_w.shape[:-1]
    src_w = src_w.reshape(-1, 3)  # [R, 3] world mm
    tgt_w = tgt_w.reshape(-1, 3)  # [R, 3] world mm

    src = _index_space(affine, src_w)  # [R, 3] index space
    tgt = _index_space(affine, tgt_w)  # [R, 3]
    direction = tgt - src  # [R, 3]: x(alpha) = src + alpha * direction, alpha in [0, 1]
    world_length = _safe_norm(tgt_w - src_w)  # [R] mm

    # The affine map is linear along the segment, so alpha parameterises the same point in both spaces and
    # world lengths are world_length * delta_alpha.
    alpha_min, alpha_max, hit = _clip_to_box(src, direction, shape)

    if mode == "siddon":
        out = _siddon(vol, src, direction, alpha_min, alpha_max)  # [C, R], per unit world length
        out = out * world_length
    else:
        assert step is not None
        out = _trilinear(vol, src, direction, alpha_min, alpha_max, world_length, step)  # [C, R]
    # Rays that miss give exactly zero (and zero gradient), whatever the arithmetic above produced.
    out = torch.where(hit, out, torch.zeros_like(out))

    out = out.transpose(0, 1).reshape(*batch_shape, vol.shape[0])  # [..., C]
    return out.squeeze(-1) if squeeze_channel else out


def camera_raycast_reference(
    volume: Tensor,
    affine: Tensor,
    sources: Tensor,
    ray_matrices: Tensor,
    height: int,
    width: int,
    mode: str = "siddon",
    step: float | None = None,
    supersample: int = 1,
) -> Tensor:
    """Reference for ``torchdrr.ops.camera_raycast``: makes every pixel's ray explicitly and integrates it with
    :func:`raycast_reference`. Arguments and result as in ``camera_raycast`` (``sources [B, 3]``, ``ray_matrices
    [B, 3, 3]``; returns ``[B, H * W * s * s, C]`` or ``[B, H * W * s * s]``)."""
    from .camera_raycast import camera_pixel_grid  # the grid is the op's definition of its rays

    pixels = camera_pixel_grid(height, width, supersample, dtype=sources.dtype, device=sources.device)  # [R, 3]
    targets = sources[:, None, :] + pixels @ ray_matrices.transpose(-1, -2)  # [B, R, 3]
    return raycast_reference(volume, affine, sources[:, None, :], targets, mode=mode, step=step)


def _check_affine(affine: Tensor) -> None:
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be [4, 4], got shape {tuple(affine.shape)}")


def _index_space(affine: Tensor, points: Tensor) -> Tensor:
    """Map world points (mm) to continuous voxel-index coordinates.

    Args:
        affine: ``[4, 4]`` index-to-world matrix; inverted in float64, detached (no gradient to the affine).
        points: ``[..., 3]`` world points in mm.

    Returns:
        ``[..., 3]`` index-space coordinates, in ``points.dtype``; differentiable with respect to ``points``.
    """
    inverse = torch.linalg.inv(affine.detach().to(torch.float64))
    inverse = inverse.to(dtype=points.dtype, device=points.device)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


def _safe_norm(vectors: Tensor) -> Tensor:
    """Euclidean norm over the last axis whose gradient is 0 (not NaN) for a zero vector."""
    squared = (vectors * vectors).sum(-1)
    positive = squared > 0
    root = torch.sqrt(torch.where(positive, squared, torch.ones_like(squared)))
    return torch.where(positive, root, torch.zeros_like(root))


def _clip_to_box(src: Tensor, direction: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
    """Clip segments against the outer box ``[-1/2, N_a - 1/2]`` on each axis (Liang-Barsky slabs).

    Args:
        src: ``[R, 3]`` segment starts in index space.
        direction: ``[R, 3]`` ``target - source`` in index space.
        shape: ``(I, J, K)``.

    Returns:
        ``alpha_min`` ``[R]``, ``alpha_max`` ``[R]`` and ``hit`` ``[R]`` (bool). Where ``hit`` is true,
        ``0 <= alpha_min < alpha_max <= 1`` bounds the part of the segment inside the box. Where it is false,
        ``alpha_max == alpha_min``, so downstream lengths are exactly zero.
    """
    lower = torch.full((3,), -0.5, dtype=src.dtype, device=src.device)
    upper = torch.tensor([n - 0.5 for n in shape], dtype=src.dtype, device=src.device)

    parallel = direction == 0  # [R, 3]
    # Dividing by a guarded denominator keeps both forward values and gradients finite; the parallel entries
    # are replaced below and receive no gradient through torch.where.
    safe_dir = torch.where(parallel, torch.ones_like(direction), direction)
    to_lower = (lower - src) / safe_dir
    to_upper = (upper - src) / safe_dir
    enter = torch.minimum(to_lower, to_upper)  # [R, 3]
    leave = torch.maximum(to_lower, to_upper)  # [R, 3]
    # A parallel axis does not constrain alpha when the ray lies inside its slab (closed) and excludes the
    # whole ray otherwise.
    enter = torch.where(parallel, torch.zeros_like(enter), enter)
    leave = torch.where(parallel, torch.ones_like(leave), leave)
    outside_slab = parallel & ((src < lower) | (src > upper))

    alpha_min = enter.amax(dim=-1).clamp(min=0.0)  # [R]
    alpha_max = leave.amin(dim=-1).clamp(max=1.0)  # [R]
    hit = (alpha_max > alpha_min) & ~outside_slab.any(dim=-1)
    alpha_max = torch.where(hit, alpha_max, alpha_min)
    return alpha_min, alpha_max, hit


def _siddon(vol: Tensor, src: Tensor, direction: Tensor, alpha_min: Tensor, alpha_max: Tensor) -> Tensor:
    """Exact nearest-voxel integral, in units of (volume units x alpha).

    Args:
        vol: ``[C, I, J, K]``.
        src, direction: ``[R, 3]`` index-space segment start and ``target - source``.
        alpha_min, alpha_max: ``[R]`` clipped parameter range (equal for misses).

    Returns:
        ``[C, R]``: ``sum_segments value * delta_alpha``; multiply by the world length for mm.
    """
    n_channels = vol.shape[0]
    shape = vol.shape[1:]
    crossings = [alpha_min[:, None], alpha_max[:, None]]
    for axis, n in enumerate(shape):
        planes = torch.arange(n + 1, dtype=src.dtype, device=src.device) - 0.5  # [N_a + 1]
        s_a = src[:, axis : axis + 1]  # [R, 1]
        d_a = direction[:, axis : axis + 1]
        parallel = d_a == 0
        # alpha_c = (p - s_a) / d_a; autograd then gives d alpha_c / d s_a = (alpha_c - 1) / d_a and
        # d alpha_c / d t_a = -alpha_c / d_a. A parallel axis has no crossings: park them at alpha_min,
        # where they form zero-length segments.
        alpha = (planes - s_a) / torch.where(parallel, torch.ones_like(d_a), d_a)  # [R, N_a + 1]
        crossings.append(torch.where(parallel, alpha_min[:, None], alpha))
    alphas = torch.cat(crossings, dim=-1)  # [R, I + J + K + 5]
    # Clamping folds crossings outside the clipped range onto its ends (zero-length segments).
    alphas = torch.minimum(torch.maximum(alphas, alpha_min[:, None]), alpha_max[:, None])
    alphas, _ = torch.sort(alphas, dim=-1)  # differentiable w.r.t. the values
    lengths = alphas[:, 1:] - alphas[:, :-1]  # [R, M] in alpha units

    # Which voxel each segment lies in: decided at its midpoint, with no gradient (piecewise constant).
    with torch.no_grad():
        mid = 0.5 * (alphas[:, 1:] + alphas[:, :-1])  # [R, M]
        flat = torch.zeros_like(mid, dtype=torch.long)
        for axis, n in enumerate(shape):
            x = src[:, axis : axis + 1] + mid * direction[:, axis : axis + 1]
            # Voxel (i) is [i - 1/2, i + 1/2); the clamp only matters on the closed outer faces and for
            # zero-length segments, whose value is irrelevant.
            index = torch.floor(x + 0.5).long().clamp(0, n - 1)
            flat = flat * n + index
    values = vol.reshape(n_channels, -1)[:, flat]  # [C, R, M]
    return (values * lengths).sum(dim=-1)


def _trilinear(
    vol: Tensor,
    src: Tensor,
    direction: Tensor,
    alpha_min: Tensor,
    alpha_max: Tensor,
    world_length: Tensor,
    step: float,
) -> Tensor:
    """Midpoint-rule integral of the trilinearly interpolated volume, in volume units x mm.

    Args:
        vol: ``[C, I, J, K]``.
        src, direction: ``[R, 3]`` index-space segment start and ``target - source``.
        alpha_min, alpha_max: ``[R]`` clipped parameter range (equal for misses).
        world_length: ``[R]`` world length of the whole segment in mm.
        step: sampling step in mm.

    Returns:
        ``[C, R]``: ``sum_{n < N} V(x_n) * L / N`` with ``L`` the world length inside the outer box,
        ``N = ceil(L / step)`` and ``x_n`` the midpoint of the ``n``-th of ``N`` equal pieces.
    """
    inside_length = world_length * (alpha_max - alpha_min)  # [R] mm
    # The sample count is piecewise constant in the endpoints: held fixed (no gradient).
    with torch.no_grad():
        count = torch.ceil(inside_length / step).long()  # [R]; 0 exactly when the ray misses
        max_count = int(count.max()) if count.numel() > 0 else 0
    safe_count = count.clamp(min=1).to(src.dtype)
    n = torch.arange(max_count, dtype=src.dtype, device=src.device)  # [S]
    valid = n[None, :] < count[:, None]  # [R, S]: vectorise with max_count samples and mask the rest

    fraction = (n[None, :] + 0.5) / safe_count[:, None]  # [R, S]
    alpha = alpha_min[:, None] + fraction * (alpha_max - alpha_min)[:, None]  # [R, S]
    points = src[:, None, :] + alpha[..., None] * direction[:, None, :]  # [R, S, 3] index space

    values = _interpolate(vol, points)  # [C, R, S]
    values = torch.where(valid, values, torch.zeros_like(values))
    return values.sum(dim=-1) * (inside_length / safe_count)


def _interpolate(vol: Tensor, points: Tensor) -> Tensor:
    """Trilinear interpolation between voxel centres, clamped to the edge voxels.

    Args:
        vol: ``[C, I, J, K]``.
        points: ``[...]`` x 3 index-space positions (assumed inside the outer box; callers clip first).

    Returns:
        ``[C, ...]`` interpolated values, differentiable w.r.t. ``vol`` and ``points``.
    """
    n_channels = vol.shape[0]
    shape = vol.shape[1:]
    lows, highs, weights = [], [], []
    for axis, n in enumerate(shape):
        # Clamping to the centre range [0, N-1] makes the field constant between the edge centres and the
        # outer face, so a uniform volume stays uniform right up to the box.
        x = points[..., axis].clamp(0.0, n - 1.0)
        with torch.no_grad():
            low = torch.floor(x).long().clamp(0, max(n - 2, 0))
            high = (low + 1).clamp(max=n - 1)
        lows.append(low)
        highs.append(high)
        weights.append(x - low.to(x.dtype))  # in [0, 1]; exactly 0 when n == 1
    flat_vol = vol.reshape(n_channels, -1)
    result = torch.zeros((n_channels, *points.shape[:-1]), dtype=vol.dtype, device=vol.device)
    for corner in range(8):
        weight = torch.ones_like(weights[0])
        flat = torch.zeros_like(lows[0])
        for axis, n in enumerate(shape):
            upper = (corner >> (2 - axis)) & 1
            weight = weight * (weights[axis] if upper else 1.0 - weights[axis])
            flat = flat * n + (highs[axis] if upper else lows[axis])
        result = result + flat_vol[:, flat] * weight
    return result


def log_weighted_transmission_reference(
    mass_thickness: Tensor,
    attenuation: Tensor,
    weights: Tensor,
    group_starts: Sequence[int] | Tensor,
) -> Tensor:
    """Log of spectrally weighted, grouped transmission (reference of ``torchdrr.ops.log_weighted_transmission``).

    ``out[..., q, g] = log(sum_{e in g} weights[q, e] * exp(L[..., e]))`` with
    ``L[..., e] = -sum_m attenuation[m, e] * mass_thickness[..., m]``; group ``g`` is the bins
    ``[group_starts[g], group_starts[g + 1])``.

    Args:
        mass_thickness: ``[..., M]`` g/cm^2, float32 or float64.
        attenuation: ``[M, E]`` cm^2/g, same dtype.
        weights: ``[Q, E]`` >= 0, same dtype; or ``[S, Q, E]``, table ``s`` for ``mass_thickness[s]``.
        group_starts: ``G + 1`` non-decreasing bin indices in ``[0, E]`` (list/tuple of ints or 1-D integer tensor).

    Returns:
        ``[..., Q, G]``; ``-inf`` for empty groups and groups whose weights are all zero (with gradient 0 there).

    Each group's sum is shifted by the largest ``L`` among its bins (logsumexp style, the shift detached from the
    graph since the result does not depend on it), so autograd gives
    ``d out / d weights[q, e] = exp(L[e] - out[q, g])`` and
    ``d out / d mass_thickness[m] = -sum_e weights[q, e] exp(L[e] - out[q, g]) attenuation[m, e]``, as the kernels.
    The kernels shift each weight row by the largest ``L`` among its bins with positive weight instead, which is
    more robust; the two differ only where a zero-weight bin's ``L`` exceeds every weighted bin's by more than the
    dtype's exponent range (about 87 in float32), where this reference underflows to ``-inf``.
    """
    starts = [int(s) for s in (group_starts.tolist() if isinstance(group_starts, Tensor) else group_starts)]
    log_transmission = -(mass_thickness.unsqueeze(-1) * attenuation).sum(-2)  # [..., E]
    batch_shape = mass_thickness.shape[:-1]
    rows = weights.shape[-2]
    if weights.dim() == 3:  # [S, Q, E] -> [S, 1, ..., 1, Q, E], broadcast against [S, ..., Q, E_g]
        weights = weights.reshape(weights.shape[0], *([1] * (mass_thickness.dim() - 2)), rows, weights.shape[-1])
    groups = []
    for begin, end in zip(starts[:-1], starts[1:], strict=True):
        if begin == end:
            groups.append(mass_thickness.new_full((*batch_shape, rows), -math.inf))
            continue
        part = log_transmission[..., begin:end]  # [..., E_g]
        shift = part.detach().amax(-1, keepdim=True)  # [..., 1]
        shift = torch.where(shift == -math.inf, torch.zeros_like(shift), shift)  # a fully opaque group: sum 0
        total = (weights[..., begin:end] * torch.exp(part - shift).unsqueeze(-2)).sum(-1)  # [..., Q]
        empty = total == 0
        # The double where keeps log(0) out of the graph, so zero-weight groups get gradient 0, not NaN.
        groups.append(torch.where(empty, -math.inf, shift + torch.log(torch.where(empty, 1.0, total))))
    return torch.stack(groups, dim=-1)  # [..., Q, G]

"""2D/3D registration by gradient descent: the C-arm pose under which a DRR of the CT best matches an X-ray.

``register(drr, xray, initial_camera)`` optimises a rigid offset of the CT about its centre (``pose.apply_offset``:
degrees and mm) so that a similarity loss between the X-ray and the DRR falls:

1. Coarse to fine: the detector is read out in ``levels`` bins (e.g. 4 x 4, then 2 x 2, then full), the X-ray and
   its mask average-pooled to match; each level starts from the previous level's pose.
2. Multi-start on the coarsest level: ``starts`` offsets around the initial pose are optimised together, as one
   batch of cameras (one ray-cast call per step for all of them); the best one goes on to the finer levels.
3. Each level runs Adam (or L-BFGS); when the loss has not improved by ``tolerance`` (relative) for ``patience``
   steps it halves the step size (``plateau_halvings`` times) and then stops, or after ``iterations`` steps. The
   best pose seen is kept.
4. On CUDA each level's step (pose, rays, ray cast, physics, loss, gradients) is captured once as a CUDA graph and
   replayed: a step is a few hundred small kernels whose launch overhead would otherwise dominate. The optimiser's
   parameters and Adam stay on the host.

The DRR is rendered without noise, as line integrals (``-log(I / I0)``: bright where the body attenuates); the X-ray
is brought to the same sense (``xray_kind``). The losses of ``registration.losses`` are invariant to an affine (NCC
family) or monotone (mutual information) change of intensity, so neither the X-ray's contrast nor its calibration
needs to match the DRR's.
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..drr import DRR
from ..geometry import Camera
from ..io.xray import check_pixel_spacing
from .losses import get_loss, without_host_checks
from .pose import apply_offset, offset_camera

__all__ = ["XRAY_KINDS", "RegistrationResult", "register", "start_offsets"]

#: How an X-ray's values relate to attenuation: "line_integral" (or any image bright where the body attenuates,
#: e.g. an inverted display image), "intensity" (detected signal, dark where the body attenuates; log-transformed),
#: "display" (a display image, dark where the body attenuates; inverted).
XRAY_KINDS = ("line_integral", "intensity", "display")


@dataclass
class RegistrationResult:
    """What ``register`` found and what it cost.

    Attributes:
        camera: the estimated camera (one pose).
        offset: ``[6]`` the CT's offset from the initial pose: rotation vector (degrees), translation (mm).
        loss: final loss at the finest level.
        losses: the loss after every step, over all levels (for the best start on the coarsest level).
        level_ends: index into ``losses`` where each level ended.
        seconds: wall time.
        renders: DRRs rendered (a batch of S cameras counts S).
        iterations: optimiser steps, all levels.
        frames: the DRR of the leading start at each recorded step (``record_every``), ``[H / bin, W / bin]`` at its
            level's binning; empty unless asked.
        intrinsics_offset: ``[3]`` fitted focal change (percent) and principal-point shift (column, row; pixels),
            when ``optimize_intrinsics``; the camera's K includes it.
        contrast_gamma: the fitted contrast exponent, when ``fit_contrast``.
    """

    camera: Camera
    offset: Tensor
    loss: float
    losses: list[float] = field(default_factory=list)
    level_ends: list[int] = field(default_factory=list)
    seconds: float = 0.0
    renders: int = 0
    iterations: int = 0
    frames: list[Tensor] = field(default_factory=list)
    intrinsics_offset: Tensor | None = None
    contrast_gamma: float | None = None


def start_offsets(count: int, rotation_deg: float = 6.0, translation_mm: float = 12.0, seed: int = 0) -> Tensor:
    """``[count, 6]`` offsets for a multi-start: the initial pose itself, then points drawn uniformly in the box
    ``±rotation_deg`` (each rotation-vector axis) and ``±translation_mm`` (each axis) from a seeded generator."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    box = torch.tensor([rotation_deg] * 3 + [translation_mm] * 3, dtype=torch.float64)
    draws = (2 * torch.rand(count - 1, 6, generator=generator, dtype=torch.float64) - 1) * box
    return torch.cat([torch.zeros(1, 6, dtype=torch.float64), draws])


def _prepare_xray(xray: Tensor, kind: str) -> Tensor:
    """The X-ray as ``[1, 1, H, W]`` float, bright where the body attenuates."""
    if kind not in XRAY_KINDS:
        raise ValueError(f"xray_kind must be one of {XRAY_KINDS}, got {kind!r}")
    image = xray.detach()
    while image.dim() < 4:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[:2] != (1, 1):
        raise ValueError(f"xray must be one grayscale image [H, W] (or [1, 1, H, W]), got {tuple(xray.shape)}")
    image = image.to(torch.float64)
    if not torch.isfinite(image).all():
        raise ValueError("xray holds NaN or Inf values")
    if kind == "intensity":
        if (image <= 0).any():
            raise ValueError("an intensity X-ray must be > 0 everywhere (its log is taken); got values <= 0")
        image = -torch.log(image / image.max())
    elif kind == "display":
        image = image.max() - image
    return image


def _pool(image: Tensor, factor: int) -> Tensor:
    return image if factor == 1 else F.avg_pool2d(image, factor)


def _check_source_outside(drr: DRR, camera: Camera) -> None:
    """A source inside the CT's box casts rays that start inside the patient: raise, naming where it is."""
    source = (-camera.translation.unsqueeze(1) @ camera.rotation)[0, 0].to("cpu", torch.float64)  # -R^T t
    index = torch.linalg.solve(drr.affine, torch.cat([source, source.new_ones(1)]))[:3]
    shape = torch.tensor(drr.volume_shape, dtype=torch.float64)
    if bool(((index >= -0.5) & (index <= shape - 0.5)).all()):
        raise ValueError(
            f"the initial pose puts the X-ray source inside the CT (source at {source.tolist()} mm, voxel index "
            f"{[round(float(i), 1) for i in index]} of a {tuple(drr.volume_shape)} volume); check the pose's "
            "translation (the source should be hundreds of mm from the patient)"
        )


def _check_contrast(image: Tensor, weights: Tensor | None) -> None:
    """An image of one value (where the mask is valid) has no structure to register to."""
    values = image if weights is None else image[weights > 0]
    if values.numel() == 0:
        raise ValueError("the mask leaves no valid pixel of the X-ray")
    if float(values.max() - values.min()) <= 1e-12 * max(1.0, float(values.abs().max())):
        raise ValueError(
            f"the X-ray is constant ({float(values.reshape(-1)[0]):.6g} everywhere"
            f"{' inside the mask' if weights is not None else ''}): there is nothing to register to"
        )


def _adjusted_intrinsics(intrinsics: Tensor, parameters: Tensor) -> Tensor:
    """K after a focal change of ``parameters[0]`` percent and a principal-point shift of ``parameters[1:3]``
    pixels (column, row)."""
    scale = 1.0 + parameters[0] / 100.0
    row0 = torch.stack([intrinsics[0, 0] * scale, intrinsics[0, 1], intrinsics[0, 2] + parameters[1]])
    row1 = torch.stack([intrinsics[1, 0], intrinsics[1, 1] * scale, intrinsics[1, 2] + parameters[2]])
    return torch.stack([row0, row1, intrinsics[2]])


#: Eager steps run before a CUDA graph is captured (on a side stream: allocator and kernel warm-up).
_GRAPH_WARMUP = 2


def _capture_step(
    evaluate: Callable[..., tuple[Tensor, Tensor]], host: list[Tensor], active: list[int], device: torch.device
) -> tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, Tensor, tuple[Tensor, ...]]]:
    """A CUDA graph of one step: parameters -> DRRs -> loss -> gradients, replayed on static device tensors.

    A registration step is a few hundred small kernels (pose, rays, ray cast, physics, loss and their backward);
    launched one by one their host overhead is several times the device time. Returns the graph, the static
    parameter tensors to copy each step's values into, and the static outputs (loss [S], DRRs, gradients of the
    ``active`` parameters)."""
    statics = [h.detach().to(device).requires_grad_(i in active) for i, h in enumerate(host)]

    def step() -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        with without_host_checks():
            values, moving = evaluate(*statics)
            gradients = torch.autograd.grad(values.sum(), [statics[i] for i in active])
        return values.detach(), moving.detach(), gradients

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    # The warm-up runs with synchronising calls turned into errors: a step that syncs (e.g. a custom loss calling
    # .item()) is found here, before any capture starts; a capture that fails half-way leaves torch's CUDA random
    # generator in a state that breaks later random calls.
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with torch.cuda.stream(side):
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(_GRAPH_WARMUP):
                step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, statics, outputs


def register(
    drr: DRR,
    xray: Tensor,
    initial: Camera,
    *,
    loss: str | Callable[..., Tensor] | Sequence[str | Callable[..., Tensor]] | None = None,
    mask: Tensor | None = None,
    xray_kind: str = "line_integral",
    xray_pixel_spacing_mm: Sequence[float] | None = None,
    center: Tensor | None = None,
    levels: Sequence[int] = (4, 2, 1),
    starts: int | Tensor = 1,
    optimizer: str = "adam",
    iterations: int | Sequence[int] | None = None,
    learning_rate: float | Sequence[float] | None = None,
    scales: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    tolerance: float = 1e-4,
    patience: int = 10,
    plateau_halvings: int = 2,
    optimize_intrinsics: bool = False,
    fit_contrast: bool = False,
    record_every: int = 0,
    cuda_graph: bool | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> RegistrationResult:
    """Finds the camera under which ``drr`` best matches ``xray``, starting from ``initial``.

    Args:
        drr: the CT's DRR module (any physics; rendered noise-free as line integrals).
        xray: ``[H, W]`` X-ray on ``initial``'s detector (H x W pixels).
        initial: one camera (its K, detector and SDD are kept unless ``optimize_intrinsics``; R and t are optimised).
        loss: a name of ``registration.losses.LOSSES`` or a callable ``(fixed, moving, mask) -> [B]``, or one of
            them per level. Default: gradient NCC on the coarse levels (edges: a wide capture range) and NCC on the
            finest (it averages the X-ray's noise instead of differentiating it).
        mask: ``[H, W]`` valid pixels of the X-ray (e.g. inside the collimator), bool or weights in [0, 1].
        xray_kind: how ``xray``'s values relate to attenuation (``XRAY_KINDS``).
        xray_pixel_spacing_mm: the X-ray's pixel pitch (row, column) in mm when known (e.g. from DICOM): checked
            against the camera's (2 %).
        center: ``[3]`` world point (mm) the CT turns about; default the volume centre.
        levels: detector binning factors, coarse to fine (each must divide H and W).
        starts: number of multi-start offsets (``start_offsets``) or an ``[S, 6]`` tensor of them (degrees, mm), on
            the coarsest level.
        optimizer: "adam" or "lbfgs".
        iterations: maximum steps per level (one number or one per level; default 100 on the first, 60 on the
            middle ones, 40 on the last).
        learning_rate: Adam step size per level, in units of ``scales`` (default 2, halved at each finer level; for
            L-BFGS its lr, default 1).
        scales: ``[6]`` degrees / mm per optimiser unit for the three rotations and three translations (per-parameter
            scaling: e.g. a larger depth translation scale when the source distance is poorly known).
        tolerance, patience: a level stops when its best loss has not fallen by ``tolerance`` (relative) for
            ``patience`` steps...
        plateau_halvings: ...or, that many times per level, halves its step size and goes on.
        optimize_intrinsics: also fit the focal length (percent) and the principal point (pixels), shared by all
            starts, on top of the pose.
        fit_contrast: also fit a contrast exponent ``gamma`` (the DRR's line integrals are raised to it before the
            loss) for X-rays whose contrast is not an affine map of the DRR's (other spectrum, processing).
        record_every: keep a DRR of the leading start every that many steps (0: none) for ``frames``.
        cuda_graph: run each level's step (render, loss, gradients) as a captured CUDA graph: the same arithmetic
            without the host's launch overhead (default: on for a CUDA DRR with Adam and built-in losses; a step
            that synchronises with the host, e.g. a custom loss calling ``.item()``, is detected before capture and
            runs eagerly, with a warning). The graph's warm-up steps count as renders.
        progress: called as ``progress(level_name, step, loss)`` after every step.

    Returns:
        A ``RegistrationResult``; its pose is always finite (the best pose seen, the initial one at worst).

    Raises:
        ValueError: the X-ray does not fit the camera (size or pitch), is constant or not finite, or the initial pose
            puts the source inside the CT.
    """
    start_time = time.perf_counter()
    if not isinstance(initial, Camera) or initial.batch_size != 1:
        raise ValueError("initial must be a Camera with one pose")
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    levels = [int(f) for f in levels]
    if not levels:
        raise ValueError("levels must name at least one binning factor")
    height, width = initial.height, initial.width
    fixed = _prepare_xray(xray, xray_kind)
    if fixed.shape[-2:] != (height, width):
        raise ValueError(
            f"xray is {tuple(fixed.shape[-2:])} pixels but the camera's detector is {(height, width)} (H, W)"
        )
    check_pixel_spacing(xray_pixel_spacing_mm, initial.pixel_spacing_mm)
    for factor in levels:
        if factor < 1 or height % factor or width % factor:
            raise ValueError(f"levels must divide the detector {height} x {width}, got {factor}")
    if loss is None:
        loss = ["gncc"] * (len(levels) - 1) + ["ncc"]
    named = [loss] if isinstance(loss, str) or callable(loss) else list(loss)
    if len(named) not in (1, len(levels)):
        raise ValueError(f"loss must be one loss or one per level ({len(levels)}), got {len(named)}")
    loss_fns = [get_loss(n) if isinstance(n, str) else n for n in named] * (len(levels) // len(named))
    if iterations is None:
        iterations = [100] if len(levels) == 1 else [100] + [60] * (len(levels) - 2) + [40]
    iterations = [int(iterations)] * len(levels) if isinstance(iterations, int) else [int(i) for i in iterations]
    if learning_rate is None:
        learning_rate = [2.0 * 0.5**i for i in range(len(levels))] if optimizer == "adam" else 1.0
    rates = (
        [float(learning_rate)] * len(levels)
        if isinstance(learning_rate, (int, float))
        else [float(r) for r in learning_rate]
    )
    if len(iterations) != len(levels) or len(rates) != len(levels):
        raise ValueError(f"iterations and learning_rate need one value per level ({len(levels)})")
    scale = torch.as_tensor(scales, dtype=torch.float64).reshape(-1)
    if scale.numel() != 6 or not bool((scale > 0).all()):
        raise ValueError(f"scales must be six positive numbers (3 rotations in degrees, 3 translations in mm), got "
                         f"{list(scales)}")  # fmt: skip

    device, dtype = drr.device, drr.dtype
    weights = None
    if mask is not None:
        if tuple(mask.shape[-2:]) != (height, width) or mask.numel() != height * width:
            raise ValueError(f"mask must be [H, W] = [{height}, {width}], got {tuple(mask.shape)}")
        weights = mask.detach().to(torch.float64).reshape(1, 1, height, width)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or bool((weights > 1).any()):
            raise ValueError("mask must be boolean or weights in [0, 1]")
    _check_contrast(fixed, weights)
    fixed = fixed.to(device, dtype)
    weights = None if weights is None else weights.to(device, dtype)
    center = (drr.volume_center if center is None else center).to(device, torch.float64)
    camera = initial.to(device=device, dtype=torch.float64)
    _check_source_outside(drr, camera)
    scale = scale.to(device)
    scale = scale.to(device)
    offsets = start_offsets(int(starts)) if isinstance(starts, int) else starts.detach().to(torch.float64)
    if offsets.dim() != 2 or offsets.shape[1] != 6 or not bool(torch.isfinite(offsets).all()):
        raise ValueError(f"starts must be a count or an [S, 6] tensor of finite offsets, got {tuple(offsets.shape)}")
    # The optimiser's parameters live on the host (a few numbers per start): Adam and the bookkeeping then launch
    # nothing on the device, and a CUDA graph of the render can read them from static device copies.
    offsets = offsets.cpu().clone()
    intrinsic_offset = torch.zeros(3, dtype=torch.float64)  # focal %, principal point (px)
    contrast = torch.zeros(offsets.shape[0], 1, 1, 1, dtype=torch.float64)  # log gamma
    built_in = all(isinstance(n, str) for n in named)
    auto_graph = device.type == "cuda" and optimizer == "adam" and built_in  # custom losses may sync: eager
    use_graph = auto_graph if cuda_graph is None else bool(cuda_graph)
    if use_graph and (device.type != "cuda" or optimizer != "adam"):
        raise ValueError("cuda_graph=True needs a CUDA DRR and optimizer='adam'")

    if use_graph:
        with torch.no_grad():
            drr.material_volume()  # built (and cached) before capture: segmenting the CT may read values back

    result = RegistrationResult(camera=camera, offset=offsets[0], loss=math.inf)
    for level, (factor, steps, rate, loss_fn) in enumerate(zip(levels, iterations, rates, loss_fns, strict=True)):
        target = _pool(fixed, factor)
        level_mask = None if weights is None else _pool(weights, factor)
        count = offsets.shape[0]
        host = [
            (offsets / scale.cpu()).requires_grad_(True),
            intrinsic_offset.clone().requires_grad_(optimize_intrinsics),
            contrast.clone().requires_grad_(fit_contrast),
        ]
        active = [0] + ([1] if optimize_intrinsics else []) + ([2] if fit_contrast else [])

        def evaluate(
            pose: Tensor, intrinsic: Tensor, log_gamma: Tensor, factor: int = factor, target: Tensor = target,
            level_mask: Tensor | None = level_mask, loss_fn: Callable[..., Tensor] = loss_fn,
        ) -> tuple[Tensor, Tensor]:  # fmt: skip
            """Loss ``[S]`` and DRRs ``[S, 1, h, w]`` at device parameters (no host sync: graph-capturable)."""
            full = camera
            if optimize_intrinsics:
                full = replace(camera, intrinsics=_adjusted_intrinsics(camera.intrinsics, intrinsic))
            level_camera = full.binned(factor) if factor > 1 else full
            cameras = offset_camera(level_camera, pose * scale, center, check_finite=False)
            moving = drr(cameras, output="line_integral", noisy=False)
            if fit_contrast:
                moving = moving.clamp_min(0) ** torch.exp(log_gamma).to(moving.dtype)
            return loss_fn(target, moving, level_mask), moving

        graph = None
        if use_graph:
            try:
                graph, statics, outputs = _capture_step(evaluate, host, active, device)
                result.renders += _GRAPH_WARMUP * count
            except RuntimeError as error:  # e.g. a custom loss that syncs: fall back to eager steps
                frames = traceback.extract_tb(error.__traceback__)
                where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
                warnings.warn(f"register: the CUDA graph of a step could not be captured ({error}{where}); running "
                              "the steps eagerly", RuntimeWarning, stacklevel=2)  # fmt: skip
                use_graph, graph = False, None

        solver_parameters = [host[i] for i in active]
        if optimizer == "adam":
            solver = torch.optim.Adam(solver_parameters, lr=rate)
        else:
            solver = torch.optim.LBFGS(solver_parameters, lr=rate, max_iter=1, line_search_fn="strong_wolfe")

        def eager(host: list[Tensor] = host, evaluate: Callable = evaluate) -> tuple[Tensor, Tensor]:
            return evaluate(*(h.to(device) for h in host))

        best = torch.full((count,), math.inf, dtype=torch.float64)
        best_values = [h.detach().clone() for h in host]
        stale = halvings = 0
        for step in range(steps):
            evaluated = [h.detach().clone() for h in host]  # the parameters the loss is computed at
            if graph is not None:
                with torch.no_grad():
                    for static, value in zip(statics, host, strict=True):
                        static.copy_(value)
                graph.replay()
                values, moving, gradients = outputs
                current = values.to("cpu", torch.float64)
                if bool(torch.isfinite(current).all()):
                    for index, gradient in zip(active, gradients, strict=True):
                        host[index].grad = gradient.to("cpu", torch.float64)
                    solver.step()
            elif optimizer == "adam":
                solver.zero_grad()
                values, moving = eager()
                total = values.sum()
                if torch.isfinite(total):
                    total.backward()
                    solver.step()
                current = values.detach().to("cpu", torch.float64)
            else:

                def closure(
                    solver: torch.optim.Optimizer = solver, eager: Callable = eager, count: int = count
                ) -> Tensor:
                    solver.zero_grad()
                    total = eager()[0].sum()
                    result.renders += count
                    if torch.isfinite(total):
                        total.backward()
                    return total

                solver.step(closure)
                evaluated = [h.detach().clone() for h in host]
                with torch.no_grad():
                    values, moving = eager()
                current = values.detach().to("cpu", torch.float64)
            result.renders += count
            current = torch.where(torch.isfinite(current), current, torch.full_like(current, math.inf))
            improved = current < best - tolerance * best.abs().clamp_min(1e-3)
            better = current < best
            best_values[0] = torch.where(better[:, None], evaluated[0], best_values[0])
            best_values[2] = torch.where(better[:, None, None, None], evaluated[2], best_values[2])
            winner = int(torch.argmin(torch.minimum(current, best)))
            if bool(better[winner]) and float(current[winner]) <= float(best.min()):
                best_values[1] = evaluated[1]  # shared by the starts: kept with the best start's best loss
            best = torch.minimum(current, best)
            stale = 0 if bool(improved.any()) else stale + 1
            result.iterations += 1
            result.losses.append(float(best[winner]))
            if record_every and step % record_every == 0:
                result.frames.append(moving[winner, 0].detach().cpu())
            if progress is not None:
                progress(f"level {level + 1}/{len(levels)} (bin {factor})", step, float(best[winner]))
            if stale >= patience:
                if halvings >= plateau_halvings:
                    break
                halvings, stale = halvings + 1, 0  # a plateau: finer steps before giving up
                for group in solver.param_groups:
                    group["lr"] *= 0.5
        del graph
        offsets, intrinsic_offset, contrast = best_values[0] * scale.cpu(), best_values[1], best_values[2]
        if offsets.shape[0] > 1:  # multi-start: the best start goes on alone
            winner = int(torch.argmin(best))
            offsets, contrast = offsets[winner].unsqueeze(0), contrast[winner].unsqueeze(0)
        result.level_ends.append(len(result.losses))

    offsets, intrinsic_offset, contrast = offsets.to(device), intrinsic_offset.to(device), contrast.to(device)
    final = camera
    if optimize_intrinsics:
        final = replace(camera, intrinsics=_adjusted_intrinsics(camera.intrinsics, intrinsic_offset).detach())
    with torch.no_grad():
        moving = drr(offset_camera(final, offsets, center), output="line_integral", noisy=False)
        if fit_contrast:
            moving = moving.clamp_min(0) ** torch.exp(contrast).to(moving.dtype)
        values = loss_fns[-1](fixed, moving, weights)
        result.renders += 1
    rotation, translation = apply_offset(final.rotation, final.translation, offsets, center)
    result.camera = Camera(final.intrinsics, rotation.detach(), translation.detach(), height, width, final.sdd_mm)
    result.offset = offsets[0].detach().cpu()
    result.intrinsics_offset = intrinsic_offset.detach().cpu() if optimize_intrinsics else None
    result.contrast_gamma = float(torch.exp(contrast).reshape(-1)[0]) if fit_contrast else None
    result.loss = float(values[0])
    result.seconds = time.perf_counter() - start_time
    return result

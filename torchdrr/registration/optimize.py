"""2D/3D registration by gradient descent: the C-arm pose under which a DRR of the CT best matches an X-ray.

``register(drr, xray, initial_camera)`` optimises a rigid offset of the CT about its centre (``pose.apply_offset``:
degrees and mm) so that a similarity loss between the X-ray and the DRR falls:

1. Coarse to fine: the detector is read out in ``levels`` bins (e.g. 4 x 4, then 2 x 2, then full), the X-ray and
   its mask average-pooled to match; each level starts from the previous level's pose.
2. Multi-start on the coarsest level: ``starts`` offsets around the initial pose are optimised together, as one
   batch of cameras (one ray-cast call per step for all of them); the best one goes on to the finer levels.
3. Each level runs Adam (or L-BFGS) until the loss has not improved by ``tolerance`` (relative) for ``patience``
   steps, or ``iterations`` steps.

The DRR is rendered without noise, as line integrals (``-log(I / I0)``: bright where the body attenuates); the X-ray
is brought to the same sense (``xray_kind``). The losses of ``registration.losses`` are invariant to an affine (NCC
family) or monotone (mutual information) change of intensity, so neither the X-ray's contrast nor its calibration
needs to match the DRR's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..drr import DRR
from ..geometry import Camera
from .losses import get_loss
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
        frames: DRRs of the best pose at the end of each recorded step (``record_every``), ``[H, W]`` each, coarse
            levels upsampled to the finest size; empty unless asked.
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


def register(
    drr: DRR,
    xray: Tensor,
    initial: Camera,
    *,
    loss: str | Callable[..., Tensor] = "gncc",
    mask: Tensor | None = None,
    xray_kind: str = "line_integral",
    center: Tensor | None = None,
    levels: Sequence[int] = (4, 2, 1),
    starts: int | Tensor = 1,
    optimizer: str = "adam",
    iterations: int | Sequence[int] = 150,
    learning_rate: float | Sequence[float] | None = None,
    tolerance: float = 1e-4,
    patience: int = 15,
    record_every: int = 0,
    progress: Callable[[str, int, float], None] | None = None,
) -> RegistrationResult:
    """Finds the camera under which ``drr`` best matches ``xray``, starting from ``initial``.

    Args:
        drr: the CT's DRR module (any physics; rendered noise-free as line integrals).
        xray: ``[H, W]`` X-ray on ``initial``'s detector (H x W pixels).
        initial: one camera (its K, detector and SDD are kept; R and t are optimised).
        loss: a name of ``registration.losses.LOSSES`` or a callable ``(fixed, moving, mask) -> [B]``.
        mask: ``[H, W]`` valid pixels of the X-ray (e.g. inside the collimator), bool or weights in [0, 1].
        xray_kind: how ``xray``'s values relate to attenuation (``XRAY_KINDS``).
        center: ``[3]`` world point (mm) the CT turns about; default the volume centre.
        levels: detector binning factors, coarse to fine (each must divide H and W).
        starts: number of multi-start offsets (``start_offsets``) or an ``[S, 6]`` tensor of them, on the coarsest
            level.
        optimizer: "adam" or "lbfgs".
        iterations: maximum steps per level (one number or one per level).
        learning_rate: Adam step size per level, in degrees / mm (default 2, halved at each finer level; for
            L-BFGS its lr).
        tolerance, patience: a level stops when its best loss has not fallen by ``tolerance`` (relative) for
            ``patience`` steps.
        record_every: keep a DRR of the best pose every that many steps (0: none) for ``frames``.
        progress: called as ``progress(level_name, step, loss)`` after every step.

    Returns:
        A ``RegistrationResult``.
    """
    start_time = time.perf_counter()
    if not isinstance(initial, Camera) or initial.batch_size != 1:
        raise ValueError("initial must be a Camera with one pose")
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    levels = [int(f) for f in levels]
    height, width = initial.height, initial.width
    fixed = _prepare_xray(xray, xray_kind)
    if fixed.shape[-2:] != (height, width):
        raise ValueError(
            f"xray is {tuple(fixed.shape[-2:])} pixels but the camera's detector is {(height, width)} (H, W)"
        )
    for factor in levels:
        if factor < 1 or height % factor or width % factor:
            raise ValueError(f"levels must divide the detector {height} x {width}, got {factor}")
    loss_fn = get_loss(loss) if isinstance(loss, str) else loss
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

    device, dtype = drr.device, drr.dtype
    fixed = fixed.to(device, dtype)
    weights = None
    if mask is not None:
        weights = mask.detach().to(device, dtype).reshape(1, 1, height, width)
    center = (drr.volume_center if center is None else center).to(device, torch.float64)
    camera = initial.to(device=device, dtype=torch.float64)
    offsets = start_offsets(int(starts)) if isinstance(starts, int) else starts.detach().to(torch.float64)
    offsets = offsets.to(device).clone()

    result = RegistrationResult(camera=camera, offset=offsets[0], loss=math.inf)
    for level, (factor, steps, rate) in enumerate(zip(levels, iterations, rates, strict=True)):
        level_camera = camera.binned(factor) if factor > 1 else camera
        target = _pool(fixed, factor)
        level_mask = None if weights is None else _pool(weights, factor)
        parameters = offsets.clone().requires_grad_(True)

        def evaluate(
            parameters: Tensor = parameters, level_camera: Camera = level_camera, target: Tensor = target,
            level_mask: Tensor | None = level_mask,
        ) -> tuple[Tensor, Tensor]:  # fmt: skip
            cameras = offset_camera(level_camera, parameters, center)
            moving = drr(cameras, output="line_integral", noisy=False)
            result.renders += parameters.shape[0]
            return loss_fn(target, moving, level_mask), moving

        if optimizer == "adam":
            solver = torch.optim.Adam([parameters], lr=rate)
        else:
            solver = torch.optim.LBFGS([parameters], lr=rate, max_iter=1, line_search_fn="strong_wolfe")
        best = torch.full((parameters.shape[0],), math.inf, dtype=torch.float64)
        best_offsets = parameters.detach().clone()
        stale = 0
        for step in range(steps):
            if optimizer == "adam":
                solver.zero_grad()
                values, moving = evaluate()
                evaluated = parameters.detach().clone()  # the offsets the loss was computed at (before the step)
                values.sum().backward()
                solver.step()
            else:

                def closure(solver: torch.optim.Optimizer = solver, evaluate: Callable = evaluate) -> Tensor:
                    solver.zero_grad()
                    total = evaluate()[0].sum()
                    total.backward()
                    return total

                solver.step(closure)
                with torch.no_grad():
                    values, moving = evaluate()
                evaluated = parameters.detach().clone()
            current = values.detach().to("cpu", torch.float64)
            improved = current < best - tolerance * best.abs().clamp_min(1e-3)
            better = (current < best).to(evaluated.device)
            best_offsets = torch.where(better[:, None], evaluated, best_offsets)
            best = torch.minimum(current, best)
            stale = 0 if bool(improved.any()) else stale + 1
            result.iterations += 1
            winner = int(torch.argmin(best))
            result.losses.append(float(best[winner]))
            if record_every and step % record_every == 0:
                frame = moving[winner, 0].detach()
                if factor > 1:
                    frame = F.interpolate(frame[None, None], scale_factor=factor, mode="nearest")[0, 0]
                result.frames.append(frame.cpu())
            if progress is not None:
                progress(f"level {level + 1}/{len(levels)} (bin {factor})", step, float(best[winner]))
            if stale >= patience:
                break
        offsets = best_offsets
        if offsets.shape[0] > 1:  # multi-start: the best start goes on alone
            offsets = offsets[int(torch.argmin(best))].unsqueeze(0)
        result.level_ends.append(len(result.losses))

    with torch.no_grad():
        values = loss_fn(
            fixed, drr(offset_camera(camera, offsets, center), output="line_integral", noisy=False), weights
        )
        result.renders += 1
    rotation, translation = apply_offset(camera.rotation, camera.translation, offsets, center)
    result.camera = Camera(camera.intrinsics, rotation.detach(), translation.detach(), height, width, camera.sdd_mm)
    result.offset = offsets[0].detach().cpu()
    result.loss = float(values[0])
    result.seconds = time.perf_counter() - start_time
    return result

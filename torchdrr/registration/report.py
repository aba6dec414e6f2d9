"""Figures of a 2D/3D registration: the DRR's edges over the X-ray, before and after, its progress, its loss curve.

Everything here draws with torch, kornia and Pillow (no matplotlib). Images are ``[H, W]`` CPU tensors or numpy
arrays (row 0 at the top); the inputs are never modified. The figures are RGB ``uint8`` arrays ``[H, W, 3]``.

For the picture to read like a radiograph, pass the X-ray in the DRR's sense, bright where the body attenuates
(what ``register`` compares: a line-integral X-ray as is, a display X-ray inverted); the edges are the DRR's alone
and do not depend on the X-ray's sense.

How the edges are found (:func:`drr_edges`)
-------------------------------------------
1. The DRR is windowed to [0, 1] between its own 1st and 99th percentiles (inside the mask, when given), so its
   calibration does not matter and a few extreme rays (metal, the detector corners) do not flatten the rest.
2. Canny (``kornia.filters.canny``: Gaussian blur, sigma 1 pixel, Sobel gradient, non-maximum suppression) gives
   one-pixel-wide ridges of the gradient magnitude.
3. The thresholds come from the DRR's own ridge magnitudes: the strong threshold is their ``EDGE_QUANTILE``
   quantile (70 %) or ``EDGE_STEP`` (a sharp step of about 10 % of the window), whichever is lower; the weak one is
   half of it, and hysteresis keeps weak ridge pixels connected to strong ones. Ridges below ``RIDGE_FLOOR`` are
   never edges.

Why these thresholds: in a line-integral image the body outline is the largest step by far (air to several
centimetres of tissue), bone edges are several times smaller, and soft-tissue texture smaller again. A fixed threshold
alone keeps only the outline of a low-contrast DRR (a coarse level, a blurry or thin body part), so the strong
threshold is at most the 70 % quantile of the DRR's own ridges: the strongest 30 % of them are always drawn, which on
a chest DRR is the body outline, the spine, clavicles and ribs, the heart, lung and diaphragm borders, without the
texture. A quantile alone misses a bone in a DRR with few ridges (an outline and one bone: the outline fills the
top 30 %), so any step of about 10 % of the window (``EDGE_STEP``; bone edges are about that or more) is strong
whatever the quantile. Hysteresis lets those lines run on through their weaker stretches. Ridges weaker than
``RIDGE_FLOOR`` (a change of about 1 % of the window over a pixel) are never edges, so a flat DRR, or faint texture,
shows none. Every DRR is thresholded on its own, so the initial and final DRRs of a figure are drawn alike whatever
their ranges.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..io.writers import atomic_write, check_output_path

__all__ = [
    "ANIMATION_SUFFIXES",
    "EDGE_COLOUR",
    "comparison_figure",
    "drr_edges",
    "edge_overlay",
    "loss_curve_png",
    "save_optimisation_animation",
    "save_overlay_png",
    "strip_layout",
]

#: RGB colour of the DRR's edges (pure green: no gray pixel has it).
EDGE_COLOUR = (0, 255, 0)
#: Quantile of the DRR's ridge magnitudes used as the strong edge threshold (the weak one is half of it).
EDGE_QUANTILE = 0.7
#: Ridges at least this strong are always strong (a sharp step of about 10 % of the window: 2.59 x 0.1).
EDGE_STEP = 0.26
#: Canny ridge magnitudes below this are never edges (unnormalised Sobel of the [0, 1]-windowed, blurred DRR:
#: about 8 x the slope per pixel, so 0.1 is a change of ~1 % of the window over a pixel).
RIDGE_FLOOR = 0.1
#: Height of a text label band, pixels.
LABEL_HEIGHT = 14
#: Black gap between panels, pixels.
GAP = 2
#: Suffixes :func:`save_optimisation_animation` writes.
ANIMATION_SUFFIXES = (".gif", ".png")


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def _image(value: Tensor | np.ndarray, name: str) -> Tensor:
    """A detached float64 CPU copy ``[H, W]`` of ``value``, checked finite."""
    if isinstance(value, Tensor):
        tensor = value.detach().to("cpu", torch.float64).clone()
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.array(array, dtype=np.float64))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be one image [H, W], got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds NaN or Inf values")
    return tensor


def _mask(mask: Tensor | np.ndarray | None, shape: tuple[int, int], name: str = "mask") -> Tensor | None:
    """``mask`` as a bool ``[H, W]`` CPU tensor (nonzero = used), or None."""
    if mask is None:
        return None
    tensor = mask.detach().to("cpu") if isinstance(mask, Tensor) else torch.from_numpy(np.array(mask))
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must be [H, W] = {list(shape)} like the X-ray, got shape {tuple(tensor.shape)}")
    return tensor != 0


def _window(image: Tensor, mask: Tensor | None, low: float = 0.01, high: float = 0.99) -> Tensor:
    """``image`` mapped to [0, 1] between its ``low`` and ``high`` quantiles (of the pixels in ``mask``); a flat
    image maps to 0.5."""
    values = image[mask] if mask is not None and bool(mask.any()) else image.reshape(-1)
    if values.numel() > 1 << 24:  # torch.quantile's input limit: a strided subsample estimates it well
        values = values[:: math.ceil(values.numel() / (1 << 24))]
    bounds = torch.quantile(values, torch.tensor([low, high], dtype=values.dtype))
    lo, hi = float(bounds[0]), float(bounds[1])
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return torch.full_like(image, 0.5)
    return ((image - lo) / (hi - lo)).clamp(0.0, 1.0)


def _gray_levels(xray: Tensor, mask: Tensor | None) -> np.ndarray:
    """The X-ray as uint8 gray levels ``[H, W]``, windowed between its 1st and 99th percentiles (inside the mask);
    outside the mask at half brightness."""
    gray = _window(xray, mask)
    if mask is not None:
        gray = torch.where(mask, gray, 0.5 * gray)
    return (gray * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Edges


def _dilate(pixels: Tensor) -> Tensor:
    """``[..., H, W]`` bool dilated by a 3 x 3 square (separably: along rows, then along columns)."""
    rows = pixels.clone()
    rows[..., :, 1:] |= pixels[..., :, :-1]
    rows[..., :, :-1] |= pixels[..., :, 1:]
    out = rows.clone()
    out[..., 1:, :] |= rows[..., :-1, :]
    out[..., :-1, :] |= rows[..., 1:, :]
    return out


def _hysteresis(strong: Tensor, weak: Tensor) -> Tensor:
    """``[N, H, W]`` bool: the weak pixels 8-connected to a strong one (through weak pixels)."""
    current = strong & weak
    for _ in range(strong.shape[-1] * strong.shape[-2]):  # bound: a chain cannot be longer than the image
        grown = weak & _dilate(current)  # keeps current (current is weak)
        if torch.equal(grown, current):
            break
        current = grown
    return current


def _edges_batch(drrs: Tensor, mask: Tensor | None) -> Tensor:
    """``[N, H, W]`` bool edges of ``N`` DRRs ``[N, H, W]`` (see the module docstring)."""
    windowed = torch.stack([_window(d, mask) for d in drrs])[:, None].to(torch.float32)
    magnitude, _ = kornia.filters.canny(windowed, low_threshold=1e-6, high_threshold=1e-6, hysteresis=False)
    magnitude = magnitude[:, 0]
    ridges = magnitude > RIDGE_FLOOR
    if mask is not None:
        ridges &= mask
    strong = torch.zeros_like(ridges)
    weak = torch.zeros_like(ridges)
    for index in range(drrs.shape[0]):
        values = magnitude[index][ridges[index]]
        if values.numel() == 0:
            continue
        high = min(float(torch.quantile(values.to(torch.float64), EDGE_QUANTILE)), EDGE_STEP)
        strong[index] = ridges[index] & (magnitude[index] >= high)
        weak[index] = ridges[index] & (magnitude[index] >= 0.5 * high)
    return _hysteresis(strong, weak)


def drr_edges(drr: Tensor | np.ndarray, *, mask: Tensor | np.ndarray | None = None) -> Tensor:
    """The edges of a DRR: ``[H, W]`` bool, True on one-pixel-wide edge lines.

    Args:
        drr: ``[H, W]`` any calibration (windowed first); typically line integrals.
        mask: ``[H, W]``, nonzero where the image is used: the window is taken there and edges are kept only there.
    """
    image = _image(drr, "drr")
    return _edges_batch(image[None], _mask(mask, tuple(image.shape)))[0]


def _overlay_parts(
    xray: Tensor | np.ndarray, drr: Tensor | np.ndarray, mask: Tensor | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    image, moving = _image(xray, "xray"), _image(drr, "drr")
    if moving.shape != image.shape:
        raise ValueError(f"drr must be the X-ray's size {list(image.shape)}, got {list(moving.shape)}")
    region = _mask(mask, tuple(image.shape))
    return _gray_levels(image, region), _edges_batch(moving[None], region)[0].numpy()


def _compose(gray: np.ndarray, edges: np.ndarray) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[edges] = EDGE_COLOUR
    return rgb


def edge_overlay(
    xray: Tensor | np.ndarray, drr: Tensor | np.ndarray, *, mask: Tensor | np.ndarray | None = None
) -> np.ndarray:
    """The X-ray in gray with the DRR's edges drawn over it in ``EDGE_COLOUR``.

    Args:
        xray: ``[H, W]`` the X-ray, any units; shown between its 1st and 99th percentiles (black to white).
        drr: ``[H, W]`` the DRR at the X-ray's size, any units (see :func:`drr_edges` for how edges are found).
        mask: ``[H, W]``, nonzero where the registration looks: the windows are taken there, edges are drawn only
            there, and the X-ray outside it is shown at half brightness.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    gray, edges = _overlay_parts(xray, drr, mask)
    return _compose(gray, edges)


# ---------------------------------------------------------------------------------------------------------------------
# Labels and panels


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _labelled(panel: np.ndarray, text: str) -> np.ndarray:
    """``panel`` ``[H, W, 3]`` under a black band of ``LABEL_HEIGHT`` rows holding ``text`` in white (clipped to the
    panel's width)."""
    band = Image.new("RGB", (panel.shape[1], LABEL_HEIGHT), (0, 0, 0))
    ImageDraw.Draw(band).text((2, 1), text, fill=(255, 255, 255), font=_font())
    return np.concatenate([np.asarray(band), panel], axis=0)


def _hstack(panels: Sequence[np.ndarray]) -> np.ndarray:
    height = panels[0].shape[0]
    gap = np.zeros((height, GAP, 3), dtype=np.uint8)
    pieces: list[np.ndarray] = []
    for index, panel in enumerate(panels):
        if index:
            pieces.append(gap)
        pieces.append(panel)
    return np.concatenate(pieces, axis=1)


def _checkerboard(xray: Tensor, drr: Tensor, mask: Tensor | None, tile: int) -> np.ndarray:
    """``[H, W, 3]`` uint8: tiles of the windowed X-ray and the windowed DRR alternating."""
    a, b = _window(xray, mask), _window(drr, mask)
    rows = torch.arange(xray.shape[0])[:, None] // tile
    cols = torch.arange(xray.shape[1])[None, :] // tile
    picture = torch.where((rows + cols) % 2 == 0, a, b)
    levels = (picture * 255).round().to(torch.uint8).numpy()
    return np.repeat(levels[..., None], 3, axis=2)


def comparison_figure(
    xray: Tensor | np.ndarray,
    drr_initial: Tensor | np.ndarray,
    drr_final: Tensor | np.ndarray,
    *,
    mask: Tensor | np.ndarray | None = None,
    titles: Sequence[str] = ("initial", "final", "X-ray | final DRR"),
    checkerboard: bool = True,
    tile: int | None = None,
) -> np.ndarray:
    """Side-by-side panels: the initial DRR's edges on the X-ray | the final DRR's edges on the X-ray, and (when
    ``checkerboard``) a checkerboard alternating tiles of the X-ray and the final DRR, each under a text label.

    Args:
        xray, drr_initial, drr_final: ``[H, W]`` each, any units (each windowed between its 1st and 99th
            percentiles); the DRRs at the X-ray's size.
        mask: ``[H, W]``, as in :func:`edge_overlay`.
        titles: the panels' labels, in order (2 of them, or 3 with the checkerboard).
        checkerboard: add the third panel.
        tile: the checkerboard's square size in pixels (default ``max(4, min(H, W) // 8)``).

    Returns:
        ``[LABEL_HEIGHT + H, P * W + (P - 1) * GAP, 3]`` uint8 RGB, P = 2 or 3 panels, separated by black gaps.
    """
    image = _image(xray, "xray")
    initial, final = _image(drr_initial, "drr_initial"), _image(drr_final, "drr_final")
    for name, drr in (("drr_initial", initial), ("drr_final", final)):
        if drr.shape != image.shape:
            raise ValueError(f"{name} must be the X-ray's size {list(image.shape)}, got {list(drr.shape)}")
    count = 3 if checkerboard else 2
    titles = list(titles)
    if len(titles) < count:
        raise ValueError(f"titles must name the {count} panels, got {len(titles)}: {titles}")
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be >= 1 pixel, got {tile}")
    region = _mask(mask, tuple(image.shape))
    gray = _gray_levels(image, region)
    edges = _edges_batch(torch.stack([initial, final]), region).numpy()
    panels = [_compose(gray, edges[0]), _compose(gray, edges[1])]
    if checkerboard:
        size = tile if tile is not None else max(4, min(image.shape) // 8)
        panels.append(_checkerboard(image, final, region, size))
    return _hstack([_labelled(panel, str(title)) for panel, title in zip(panels, titles, strict=False)])


# ---------------------------------------------------------------------------------------------------------------------
# Files


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_overlay_png(image: np.ndarray, path: str | Path) -> Path:
    """Writes a figure (``[H, W, 3]`` RGB or ``[H, W]`` gray, uint8) as a PNG, atomically.

    Args:
        image: the figure, e.g. from :func:`edge_overlay` or :func:`comparison_figure`.
        path: destination ending in ``.png``, in an existing folder.

    Returns:
        The path written.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"image must be [H, W, 3] (RGB) or [H, W] (gray), got shape {tuple(array.shape)}")
    target = check_output_path(path, (".png",), "overlay")
    data = _png_bytes(array)
    return atomic_write(target, lambda handle: handle.write(data))


def _fit(height: int, width: int, side: int) -> tuple[int, int]:
    """``(height, width)`` scaled down (never up) so that the longer side is at most ``side``."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def strip_layout(count: int, height: int, width: int, thumbnail_side: int = 160) -> tuple[int, int, int, int]:
    """The grid of a PNG strip of ``count`` frames of an ``height`` x ``width`` X-ray.

    Returns:
        ``(rows, columns, thumbnail_height, thumbnail_width)``: ``columns = ceil(sqrt(count))``, ``rows =
        ceil(count / columns)``, thumbnails scaled down (never up) to a longer side of at most ``thumbnail_side``
        pixels. The strip is ``rows * (LABEL_HEIGHT + thumbnail_height) + (rows - 1) * GAP`` pixels high and
        ``columns * thumbnail_width + (columns - 1) * GAP`` wide.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    return (rows, columns, *_fit(height, width, thumbnail_side))


def _pick(count: int, most: int) -> list[int]:
    """``min(count, most)`` indices spread evenly over ``range(count)``, the first and last included."""
    if count <= most:
        return list(range(count))
    if most == 1:
        return [count - 1]
    return [math.floor(i * (count - 1) / (most - 1) + 0.5) for i in range(most)]


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``[H, W]`` -> ``size`` bilinearly (area-averaged when shrinking, so thin structures survive)."""
    if tuple(image.shape) == size:
        return image
    shrinking = size[0] <= image.shape[0] and size[1] <= image.shape[1]
    batch = image[None, None]
    if shrinking:
        return F.interpolate(batch, size=size, mode="area")[0, 0]
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)[0, 0]


def save_optimisation_animation(
    frames: Sequence[Tensor | np.ndarray],
    xray: Tensor | np.ndarray,
    path: str | Path,
    *,
    losses: Sequence[float] | None = None,
    steps: Sequence[int] | None = None,
    mask: Tensor | np.ndarray | None = None,
    fps: int = 10,
    max_frames: int = 60,
    max_side: int = 384,
    thumbnail_side: int = 160,
) -> Path:
    """The registration's progress: each recorded DRR's edges over the X-ray, labelled with its step and loss.

    ``.gif``: an animated GIF, one frame per recorded DRR, looping forever. ``.png``: a strip, a grid of thumbnails
    laid out by :func:`strip_layout`. At most ``max_frames`` of the frames are used, spread evenly, the first and
    last included. Written atomically.

    Args:
        frames: the DRRs ``[h, w]`` each, any units; frames at another resolution than the X-ray (coarse levels) are
            resized bilinearly (``torch.nn.functional.interpolate``). Pass coarse frames as they are: a frame already
            upsampled by nearest neighbour has staircase steps that show as spurious double edges.
        xray: ``[H, W]`` the X-ray, any units.
        path: destination ending in ``.gif`` or ``.png``, in an existing folder.
        losses: one loss per frame, shown in its label.
        steps: the optimiser step of each frame, shown in its label (default 0, 1, 2, ...).
        mask: ``[H, W]``, as in :func:`edge_overlay`.
        fps: GIF frames per second (1 to 100).
        max_frames: the most frames used (>= 1).
        max_side: GIF frames are scaled down (never up) to a longer side of at most this many pixels.
        thumbnail_side: the same for the PNG strip's thumbnails.

    Returns:
        The path written.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise ValueError(
            f"animation path must end in {' or '.join(ANIMATION_SUFFIXES)} (animated GIF or a PNG strip), got {target}"
        )
    target = check_output_path(target, ANIMATION_SUFFIXES, "animation")
    if len(frames) == 0:
        raise ValueError("frames is empty: nothing to animate")
    if losses is not None and len(losses) != len(frames):
        raise ValueError(f"losses must hold one value per frame ({len(frames)}), got {len(losses)}")
    if steps is not None and len(steps) != len(frames):
        raise ValueError(f"steps must hold one value per frame ({len(frames)}), got {len(steps)}")
    if not 1 <= fps <= 100:
        raise ValueError(f"fps must be between 1 and 100, got {fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if max_side < 8 or thumbnail_side < 8:
        raise ValueError(f"max_side and thumbnail_side must be >= 8 pixels, got {max_side} and {thumbnail_side}")
    image = _image(xray, "xray")
    region = _mask(mask, tuple(image.shape))
    chosen = _pick(len(frames), max_frames)
    if suffix == ".gif":
        size = _fit(image.shape[0], image.shape[1], max_side)
    else:
        rows, columns, *thumb = strip_layout(len(chosen), image.shape[0], image.shape[1], thumbnail_side)
        size = (thumb[0], thumb[1])
    small = _resize(image, size)
    small_mask = None
    if region is not None:
        small_mask = _resize(region.to(torch.float64), size) >= 0.5
    drrs = torch.stack([_resize(_image(frames[i], f"frames[{i}]"), size) for i in chosen])
    gray = _gray_levels(small, small_mask)
    edges = _edges_batch(drrs, small_mask).numpy()
    labels = []
    for i in chosen:
        step = int(steps[i]) if steps is not None else i
        labels.append(f"step {step}" + (f"  loss {float(losses[i]):.4g}" if losses is not None else ""))
    pictures = [_labelled(_compose(gray, edges[k]), labels[k]) for k in range(len(chosen))]

    if suffix == ".gif":
        data = _gif_bytes(pictures, fps)
    else:
        data = _png_bytes(_grid(pictures, rows, columns))
    return atomic_write(target, lambda handle: handle.write(data))


def _gif_bytes(pictures: list[np.ndarray], fps: int) -> bytes:
    """An animated GIF of RGB pictures (gray plus ``EDGE_COLOUR``), looping forever. One fixed palette (254 grays,
    then the edge colour at index 255) for every frame: no quantisation, the edges stay exactly that colour."""
    palette = [round(i * 255 / 253) for i in range(254) for _ in range(3)] + [255, 255, 255, *EDGE_COLOUR]
    indexed = []
    for rgb in pictures:
        edge = np.all(rgb == np.asarray(EDGE_COLOUR, dtype=np.uint8), axis=2)
        levels = np.round(rgb[..., 0].astype(np.float64) * 253 / 255).astype(np.uint8)  # gray -> index 0..253
        levels[edge] = 255
        frame = Image.fromarray(levels)  # mode "L"; a palette makes it "P" with these indices
        frame.putpalette(palette)
        indexed.append(frame)
    buffer = io.BytesIO()
    indexed[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=indexed[1:],
        duration=max(10, round(1000 / fps)),
        loop=0,
        optimize=False,
        disposal=1,
    )
    return buffer.getvalue()


def _grid(pictures: list[np.ndarray], rows: int, columns: int) -> np.ndarray:
    cell_height, cell_width = pictures[0].shape[:2]
    height = rows * cell_height + (rows - 1) * GAP
    width = columns * cell_width + (columns - 1) * GAP
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        top, left = row * (cell_height + GAP), column * (cell_width + GAP)
        canvas[top : top + cell_height, left : left + cell_width] = picture
    return canvas


# ---------------------------------------------------------------------------------------------------------------------
# Loss curve


def loss_curve_png(
    losses: Sequence[float], level_ends: Sequence[int], path: str | Path, *, size: tuple[int, int] = (480, 240)
) -> Path:
    """A small plot of the loss against the optimiser step, drawn with Pillow, written atomically as a PNG.

    Args:
        losses: the loss after each step (``RegistrationResult.losses``); non-finite values leave gaps.
        level_ends: for each level, ``len(losses)`` when it ended (``RegistrationResult.level_ends``); a dashed
            vertical line is drawn between steps ``end - 1`` and ``end`` for each end inside the curve.
        path: destination ending in ``.png``, in an existing folder.
        size: ``(width, height)`` of the picture in pixels (at least 160 x 100).

    Returns:
        The path written.
    """
    values = [float(v) for v in losses]
    if not values:
        raise ValueError("losses is empty: nothing to plot")
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        raise ValueError(f"losses holds no finite value ({len(values)} values)")
    ends = [int(e) for e in level_ends]
    if any(not 0 <= e <= len(values) for e in ends) or any(b < a for a, b in zip(ends, ends[1:], strict=False)):
        raise ValueError(f"level_ends must be non-decreasing step counts in [0, {len(values)}], got {ends}")
    width, height = int(size[0]), int(size[1])
    if width < 160 or height < 100:
        raise ValueError(f"size must be at least (160, 100) pixels, got {tuple(size)}")
    target = check_output_path(path, (".png",), "loss curve")

    left, right, top, bottom = 58, width - 10, 18, height - 20  # the plotting box
    low, high = min(finite), max(finite)
    if high == low:
        low, high = low - 0.5 * max(abs(low), 1e-12), high + 0.5 * max(abs(high), 1e-12)
    span = max(len(values) - 1, 1)

    def x_of(step: float) -> float:
        return left + (right - left) * step / span

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = _font()
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for end in ends:
        if 0 < end < len(values):
            x = x_of(end - 0.5)
            for y in range(top + 1, bottom, 6):
                draw.line((x, y, x, min(y + 3, bottom - 1)), fill=(150, 150, 150))
    segment: list[tuple[float, float]] = []
    for step, value in enumerate([*values, math.nan]):
        if math.isfinite(value):
            segment.append((x_of(step), y_of(value)))
            continue
        if len(segment) == 1:
            x, y = segment[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 90, 180))
        elif segment:
            draw.line(segment, fill=(31, 90, 180), width=2)
        segment = []
    draw.text((2, top - 4), f"{high:.4g}", fill=(0, 0, 0), font=font)
    draw.text((2, bottom - 8), f"{low:.4g}", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 4), "0", fill=(0, 0, 0), font=font)
    draw.text((right - 30, bottom + 4), f"{len(values) - 1}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 10, bottom + 4), "step", fill=(0, 0, 0), font=font)
    draw.text((left, 2), "loss", fill=(0, 0, 0), font=font)
    data = _png_bytes(np.asarray(picture))
    return atomic_write(target, lambda handle: handle.write(data))

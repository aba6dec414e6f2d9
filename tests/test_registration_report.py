"""``torchdrr.registration.report``: edge overlays, the comparison figure, the optimisation animation and the loss
curve, on synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchdrr.registration.report import (
    EDGE_COLOUR,
    GAP,
    LABEL_HEIGHT,
    comparison_figure,
    drr_edges,
    edge_overlay,
    loss_curve_png,
    save_optimisation_animation,
    save_overlay_png,
    strip_layout,
)


def _square(size: int = 64, low: int = 20, high: int = 44) -> torch.Tensor:
    """A DRR with a step edge: 1 inside rows and columns [low, high), 0.1 outside."""
    drr = torch.full((size, size), 0.1, dtype=torch.float64)
    drr[low:high, low:high] = 1.0
    return drr


def _xray(size: int = 64) -> torch.Tensor:
    return torch.rand(size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: pixels that are not gray."""
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def _near_border(shape: tuple[int, int], low: int, high: int, within: int = 2) -> np.ndarray:
    """``[H, W]`` bool: pixels within ``within`` px of the border of the square [low, high)^2 (edge between low - 1
    and low, and between high - 1 and high)."""
    rows, cols = np.indices(shape)
    outer = (rows >= low - within) & (rows < high + within) & (cols >= low - within) & (cols < high + within)
    inner = (rows >= low + within) & (rows < high - within) & (cols >= low + within) & (cols < high - within)
    return outer & ~inner


def _assert_square_outlined(coloured: np.ndarray, low: int, high: int) -> None:
    assert coloured.sum() > 0
    assert not (coloured & ~_near_border(coloured.shape, low, high)).any(), "edge pixels away from the square's border"
    # Every side is drawn: on each row (column) along the middle of a side there is an edge pixel next to it.
    middle = range(low + 3, high - 3)
    assert all(coloured[r, low - 2 : low + 2].any() and coloured[r, high - 2 : high + 2].any() for r in middle)
    assert all(coloured[low - 2 : low + 2, c].any() and coloured[high - 2 : high + 2, c].any() for c in middle)


def test_edge_overlay_draws_the_drr_step_edge_and_nothing_else() -> None:
    xray, drr = _xray(), _square()
    xray_before, drr_before = xray.clone(), drr.clone()
    overlay = edge_overlay(xray, drr)
    assert overlay.shape == (64, 64, 3) and overlay.dtype == np.uint8
    coloured = _coloured(overlay)
    _assert_square_outlined(coloured, 20, 44)
    assert (overlay[coloured] == np.asarray(EDGE_COLOUR)).all()
    assert torch.equal(xray, xray_before) and torch.equal(drr, drr_before)  # inputs untouched


def test_edges_show_the_outline_and_a_weaker_bone_but_not_faint_texture() -> None:
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    drr = 0.003 * torch.sin(cols / 1.5) * torch.cos(rows / 2)  # faint texture everywhere (0.3 % of the range)
    drr[8:56, 8:56] += 1.0  # the body
    drr[26:38, 26:38] += 0.2  # a bone: a step a fifth of the outline's
    coloured = _coloured(edge_overlay(_xray(), drr))
    body, bone = _near_border((64, 64), 8, 56), _near_border((64, 64), 26, 38)
    assert not (coloured & ~(body | bone)).any(), "texture drawn as edges"
    assert (coloured & bone).sum() >= 30 and (coloured & body).sum() >= 120  # both outlined (perimeters 48 and 192)


def test_edge_overlay_gray_is_the_windowed_xray_and_a_flat_drr_has_no_edges() -> None:
    ramp = torch.arange(64, dtype=torch.float64).repeat(64, 1)  # columns 0..63
    overlay = edge_overlay(ramp.numpy(), torch.full((64, 64), 3.0))
    assert not _coloured(overlay).any()
    gray = overlay[0, :, 0].astype(int)
    assert gray[0] == 0 and gray[-1] == 255 and (np.diff(gray) >= 0).all() and gray[32] in range(120, 136)


def test_edge_overlay_mask_limits_the_edges() -> None:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:, :32] = True
    coloured = _coloured(edge_overlay(_xray(), _square(), mask=mask))
    assert coloured[:, :32].sum() > 10 and not coloured[:, 32:].any()
    assert drr_edges(_square()).dtype == torch.bool and int(drr_edges(_square(), mask=mask)[:, 32:].sum()) == 0


def test_edge_overlay_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"drr must be the X-ray's size \[64, 64\], got \[32, 64\]"):
        edge_overlay(_xray(), _square()[:32])
    with pytest.raises(ValueError, match=r"mask must be \[H, W\] = \[64, 64\]"):
        edge_overlay(_xray(), _square(), mask=torch.ones(3, 3))


def test_comparison_figure_panels_follow_their_drrs() -> None:
    xray = _xray()
    figure = comparison_figure(
        xray, _square(low=20, high=44), _square(low=14, high=38), titles=("before", "after", "cb")
    )
    assert figure.shape == (LABEL_HEIGHT + 64, 3 * 64 + 2 * GAP, 3) and figure.dtype == np.uint8
    initial = figure[LABEL_HEIGHT:, :64]
    final = figure[LABEL_HEIGHT:, 64 + GAP : 128 + GAP]
    checker = figure[LABEL_HEIGHT:, 128 + 2 * GAP :]
    _assert_square_outlined(_coloured(initial), 20, 44)
    _assert_square_outlined(_coloured(final), 14, 38)
    assert not _coloured(checker).any() and len(np.unique(checker)) > 2
    assert (figure[:LABEL_HEIGHT] > 100).any()  # the labels are drawn
    two = comparison_figure(xray, _square(), _square(), checkerboard=False)
    assert two.shape == (LABEL_HEIGHT + 64, 2 * 64 + GAP, 3)
    with pytest.raises(ValueError, match="titles must name the 3 panels, got 1"):
        comparison_figure(xray, _square(), _square(), titles=("only",))


def test_save_overlay_png_round_trips(tmp_path: Path) -> None:
    overlay = edge_overlay(_xray(), _square())
    path = save_overlay_png(overlay, tmp_path / "overlay.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), overlay)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png"]  # no temporary file left
    with pytest.raises(ValueError, match=r"must end in \.png"):
        save_overlay_png(overlay, tmp_path / "overlay.jpg")


def test_gif_animation_has_every_frame_and_loops(tmp_path: Path) -> None:
    frames = [_square(32, 10 + k % 2, 22) for k in range(5)]  # a coarse level: half the X-ray's size
    path = save_optimisation_animation(frames, _xray(), tmp_path / "run.gif", losses=[0.5, 0.4, 0.3, 0.2, 0.1], fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info["loop"] == 0 and gif.info["duration"] == 200
        assert gif.size == (64, 64 + LABEL_HEIGHT)
        first = np.asarray(gif.convert("RGB"))[LABEL_HEIGHT:]
    _assert_square_outlined(_coloured(first), 20, 44)  # the 32 x 32 frame was resized onto the 64 x 64 X-ray


def test_gif_animation_subsamples_to_max_frames(tmp_path: Path) -> None:
    frames = [_square(64, 20 + k, 44) for k in range(7)]
    path = save_optimisation_animation(frames, _xray(), tmp_path / "run.gif", max_frames=3)
    with Image.open(path) as gif:
        assert gif.n_frames == 3


def test_png_strip_is_the_grid(tmp_path: Path) -> None:
    xray = _xray(64)[:, :48]  # 64 rows x 48 columns
    frames = [_square(64, 20, 44)[:, :48] for _ in range(7)]
    assert strip_layout(7, 64, 48, thumbnail_side=32) == (3, 3, 32, 24)
    path = save_optimisation_animation(frames, xray, tmp_path / "run.png", losses=[1.0] * 7, thumbnail_side=32)
    with Image.open(path) as strip:
        assert strip.size == (3 * 24 + 2 * GAP, 3 * (LABEL_HEIGHT + 32) + 2 * GAP)
        pixels = np.asarray(strip.convert("RGB"))
    assert _coloured(pixels).sum() > 0


def test_animation_refuses_bad_arguments(tmp_path: Path) -> None:
    frames = [_square()] * 3
    with pytest.raises(ValueError, match=r"must end in \.gif or \.png .* got .*run\.mp4"):
        save_optimisation_animation(frames, _xray(), tmp_path / "run.mp4")
    with pytest.raises(ValueError, match=r"losses must hold one value per frame \(3\), got 2"):
        save_optimisation_animation(frames, _xray(), tmp_path / "run.gif", losses=[1.0, 2.0])
    with pytest.raises(ValueError, match="frames is empty"):
        save_optimisation_animation([], _xray(), tmp_path / "run.gif")
    assert list(tmp_path.iterdir()) == []


def test_loss_curve_png_opens_and_draws_the_curve(tmp_path: Path) -> None:
    losses = [1.0 / (k + 1) for k in range(50)]
    path = loss_curve_png(losses, [20, 35, 50], tmp_path / "loss.png")
    with Image.open(path) as picture:
        assert picture.size == (480, 240)
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    curve = (pixels[..., 2] - pixels[..., 0] > 80).sum()  # the blue curve
    dashes = ((pixels[..., 0] == 150) & (pixels[..., 1] == 150)).sum()  # the gray level-end lines
    assert curve > 100 and dashes > 20
    with pytest.raises(ValueError, match=r"level_ends must be non-decreasing step counts in \[0, 50\], got \[30, 20\]"):
        loss_curve_png(losses, [30, 20], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="losses is empty"):
        loss_curve_png([], [], tmp_path / "bad.png")

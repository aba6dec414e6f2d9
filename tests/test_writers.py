"""The image encoders of ``torchdrr.io.writers``: what Pillow reads back."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from torchdrr.io.writers import encode_png, encode_tiff


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("shape", [(256, 256), (1, 7), (5, 1), (31, 45)])
@pytest.mark.parametrize("fast", [False, True], ids=["pillow", "fast"])
def test_png_reads_back_bit_for_bit(bit_depth, shape, fast) -> None:
    rng = np.random.default_rng(sum(shape) + bit_depth)
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    levels = rng.integers(0, 2**bit_depth, shape).astype(dtype)
    back = np.asarray(Image.open(io.BytesIO(encode_png(levels, bit_depth=bit_depth, fast=fast))))
    assert back.dtype == levels.dtype and back.shape == levels.shape
    assert np.array_equal(back, levels)


def test_fast_png_is_about_as_small_as_pillow_on_a_noisy_image() -> None:
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:128, 0:128]
    image = 30000 + 8000 * np.sin(cols / 30) * np.cos(rows / 40) + rng.normal(0, 300, (128, 128))
    levels = image.astype(np.uint16)
    fast, pillow = len(encode_png(levels, 16, fast=True)), len(encode_png(levels, 16))
    assert fast < 1.05 * pillow and fast < 0.85 * levels.nbytes  # it compresses, as well as Pillow's default


def test_multi_channel_tiff_reads_back() -> None:
    values = np.random.default_rng(0).random((3, 9, 11)).astype(np.float32)
    picture = Image.open(io.BytesIO(encode_tiff(values)))
    pages = []
    for page in range(3):
        picture.seek(page)
        pages.append(np.asarray(picture))
    assert np.array_equal(np.stack(pages), values)

"""Orientation on the real chest CT (design.md §3): what a radiologist expects to see where.

The bands and thresholds were read off the bundled LIDC-IDRI-0001 copy at this geometry; a mirrored or flipped camera
turns each inequality around (e.g. the heart-row ratio becomes about 0.85-0.9), so these tests can fail.
"""

from __future__ import annotations

import pytest
import torch

from torchdrr.io import bundled_ct_path, load_nifti, volume_center
from torchdrr.render import hu_to_mu, render_carm

SIZE, PITCH = 128, (3.4, 3.4)  # 128 x 128 pixels of 3.4 mm: the whole chest at SDD 1020 / SOD 850


@pytest.fixture(scope="module")
def chest():
    hu, affine = load_nifti(bundled_ct_path())
    return hu, affine, hu_to_mu(hu)


def render(mu, affine, view):
    angles = {"PA": (0.0, 0.0), "left lateral": (90.0, 0.0)}[view]
    return render_carm(mu, affine, *angles, SIZE, SIZE, PITCH)[0, 0]


def test_pa_shows_the_heart_on_the_image_right(chest) -> None:
    """PA: over the heart's rows (above the liver dome) the image's right half (patient's left) attenuates more."""
    _, affine, mu = chest
    image = render(mu, affine, "PA")
    heart_rows = slice(55, 70)
    left, right = image[heart_rows, 20:64].mean(), image[heart_rows, 64:108].mean()
    assert right > 1.07 * left, f"right/left = {float(right / left):.3f}"


def test_pa_shows_the_head_at_the_top(chest) -> None:
    """PA: the CT's most superior slices land in the top half of the image."""
    hu, affine, mu = chest
    superior = torch.zeros_like(mu)
    superior[..., -15:] = mu[..., -15:]  # the slice axis is S in this CT (axis codes L, A, S)
    image = render(superior, affine, "PA")
    rows = torch.arange(SIZE, dtype=image.dtype)
    centroid = float((image.sum(1) * rows).sum() / image.sum())
    assert centroid < SIZE / 2 - 20, f"centroid row {centroid:.1f}"


def test_left_lateral_shows_the_spine_on_the_image_right(chest) -> None:
    """Left lateral (detector on the patient's left): posterior on the image's right, so the vertebral column (most of
    the bone within 40 mm of the midline) sits right of centre."""
    hu, affine, mu = chest
    x_of_i = affine[0, 0] * torch.arange(hu.shape[0], dtype=torch.float64) + affine[0, 3]  # axis-aligned affine
    midline = (x_of_i - volume_center(affine, hu.shape)[0]).abs() < 40.0
    spine_and_sternum = mu * (hu > 250) * midline[:, None, None]
    image = render(spine_and_sternum, affine, "left lateral")
    columns = torch.arange(SIZE, dtype=image.dtype)
    centroid = float((image.sum(0) * columns).sum() / image.sum())
    assert centroid > SIZE / 2 + 2.5, f"centroid column {centroid:.1f}"
    assert image[:, SIZE // 2 :].mean() > 1.15 * image[:, : SIZE // 2].mean()

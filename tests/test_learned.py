"""The learned material path: training (Lightning), evaluation against thresholds, inference on a CT grid, the
``segment`` command and ``DRR(materials="network")``.

Training runs here as a few steps of a tiny network on tiny phantoms (the pipeline, not the quality); the quality
of the shipped weights is checked on held-out phantoms in ``test_shipped_network_beats_the_best_thresholds``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from torchdrr import DRR, Volume
from torchdrr.cli import main
from torchdrr.learned.evaluate import (
    DEEPDRR_GROUPS,
    HU_ORDER,
    _dice_from_histograms,
    _histograms,
    best_thresholds,
    evaluate,
    markdown,
    merge_classes,
    threshold_labels,
)
from torchdrr.learned.inference import _back_to_grid, bundled_weights_path, load_network, segment_volume
from torchdrr.learned.network import MaterialUNet, NetworkSegmentation
from torchdrr.learned.phantoms import MATERIAL_CLASSES, make_phantom
from torchdrr.learned.training import dice_per_class, train

TINY = dict(spacing_mm=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A checkpoint of a tiny network trained for 4 steps on 24 x 24 x 16 phantoms (8 mm voxels)."""
    folder = tmp_path_factory.mktemp("learned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(folder / "tiny.pt", steps=4, batch_size=2, patch=(16, 16, 16), phantom_shape=(24, 24, 16),
              device="cpu", log_dir=folder / "logs", validation_phantoms=2, validate_every=2,
              network_options={"width": 4, "levels": 1}, progress=False, **TINY)  # fmt: skip
    assert (folder / "logs").is_dir() and list((folder / "logs").rglob("metrics.csv"))
    return folder / "tiny.pt"


def test_dice_per_class() -> None:
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    dice = dice_per_class(predicted, truth, 4)
    torch.testing.assert_close(dice, torch.tensor([0.5, 0.8, 2 / 3, 1.0], dtype=torch.float64))


def test_thresholds_and_merging() -> None:
    hu = torch.tensor([-1000.0, -850.0, 0.0, 400.0, 900.0, 3000.0])
    assert threshold_labels(hu, (-900.0, -500.0, 200.0, 600.0, 2000.0), HU_ORDER).tolist() == [0, 1, 2, 4, 3, 5]
    assert merge_classes(torch.arange(6)).tolist() == [0, 0, 1, 2, 1, 2]


def test_histogram_dice_equals_voxel_dice_and_the_search_finds_separating_thresholds() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (4000,), generator=generator)
    centres = torch.tensor([-1000.0, -850.0, 40.0, 900.0, 400.0, 3000.0])  # separable by HU, in HU_ORDER
    hu = centres[labels] + torch.randn(4000, generator=generator) * 20
    phantoms = [(hu, labels)]
    thresholds, dice = best_thresholds(phantoms)
    assert torch.all(dice == 1.0), (thresholds, dice)
    voxel = dice_per_class(threshold_labels(hu, thresholds, HU_ORDER), labels, 6)
    torch.testing.assert_close(voxel, dice)
    # Any cut: the histogram's Dice is the voxel Dice of the same thresholds.
    counts = _histograms(phantoms, 6)
    cuts = [40, 100, 230, 300, 500]
    from_histograms = _dice_from_histograms(counts, cuts, HU_ORDER)
    edges = [-1100.0 + 5.0 * c for c in cuts]
    torch.testing.assert_close(dice_per_class(threshold_labels(hu, edges, HU_ORDER), labels, 6), from_histograms)
    three, dice3 = best_thresholds(phantoms, DEEPDRR_GROUPS)
    assert len(three) == 2 and torch.all(dice3 == 1.0)


def test_training_writes_a_loadable_half_precision_checkpoint(tiny_weights: Path) -> None:
    segmentation = NetworkSegmentation.from_checkpoint(tiny_weights)
    assert segmentation.materials == MATERIAL_CLASSES and isinstance(segmentation.network, MaterialUNet)
    stored = torch.load(tiny_weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in stored["state_dict"].values() if v.is_floating_point())
    hu = make_phantom((24, 24, 16), seed=5, **TINY).hu
    probabilities = segmentation.memberships(hu)
    torch.testing.assert_close(probabilities.sum(0), torch.ones_like(hu), atol=1e-5, rtol=0)


def test_evaluation_reports_every_method(tiny_weights: Path) -> None:
    segmentation = NetworkSegmentation.from_checkpoint(tiny_weights)
    result = evaluate(lambda hu: segmentation.memberships(hu).argmax(0), test_phantoms=2, fit_phantoms=2,
                      shape=(24, 24, 16), **TINY)  # fmt: skip
    assert set(result["dice"]) == {"network", "best thresholds"}
    assert set(result["dice_deepdrr_classes"]) == {"network", "best thresholds", "DeepDRR thresholds (-800, 350)"}
    for scores in [*result["dice"].values(), *result["dice_deepdrr_classes"].values()]:
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    table = markdown(result)
    assert table.count("| network |") == 2 and "| DeepDRR thresholds (-800, 350) |" in table


def test_probabilities_come_back_on_the_ct_grid(tiny_weights: Path) -> None:
    network = load_network(tiny_weights)
    phantom = make_phantom((40, 36, 24), seed=3, spacing_mm=(4.0, 4.0, 4.0))
    affine = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    ct = Volume(phantom.hu, affine)
    probabilities = segment_volume(ct, network, spacing_mm=8.0)
    assert probabilities.shape == (6, 40, 36, 24)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(40, 36, 24), atol=1e-5, rtol=0)
    # On the same grid, mapping back is the identity.
    same = torch.rand(6, 5, 6, 7)
    grid = Volume(torch.zeros(5, 6, 7), affine)
    torch.testing.assert_close(_back_to_grid(same / same.sum(0), grid, grid), same / same.sum(0))


def test_segment_command_writes_labels_on_the_ct_grid(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    phantom = make_phantom((40, 36, 24), seed=4, spacing_mm=(4.0, 4.0, 4.0))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-80.0, -70.0, -50.0]
    ct_path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.hu.numpy(), affine), ct_path)
    out, picture, probabilities = tmp_path / "labels.nii.gz", tmp_path / "bone.png", tmp_path / "p.nii"
    code = main(["segment", str(ct_path), "--weights", str(tiny_weights), "--out", str(out), "--picture",
                 str(picture), "--probabilities", str(probabilities), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    labels = nib.load(out)
    assert labels.shape == (40, 36, 24) and np.allclose(labels.affine, affine)
    assert labels.get_fdata().max() < 6
    assert nib.load(probabilities).shape == (40, 36, 24, 6)
    assert picture.stat().st_size > 1000
    assert "segmented ct.nii.gz" in capsys.readouterr().out
    # Bad output names fail before any work, with one line naming the option.
    code = main(["segment", str(ct_path), "--weights", str(tiny_weights), "--out", str(tmp_path / "labels.png")])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_materials_network_needs_a_ct_not_channels() -> None:
    with pytest.raises(ValueError, match="materials must be 'thresholds' or 'network'"):
        DRR(torch.zeros(4, 4, 4), torch.eye(4), materials="unet")


@pytest.mark.skipif(not bundled_weights_path().is_file(), reason="no shipped weights in this checkout")
def test_drr_with_the_shipped_network() -> None:
    phantom = make_phantom((88, 88, 32), seed=7, spacing_mm=(4.0, 4.0, 4.0))
    affine = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    drr = DRR(Volume(phantom.hu, affine), materials="network")
    assert drr.materials == MATERIAL_CLASSES
    from torchdrr.geometry import Camera

    camera = Camera.from_carm(0.0, 0.0, drr.volume_center, height=16, width=16, pixel_spacing_mm=(20.0, 20.0))
    image = drr(camera)
    assert torch.isfinite(image).all() and image.max() > 0.5


@pytest.mark.skipif(not bundled_weights_path().is_file(), reason="no shipped weights in this checkout")
def test_shipped_network_beats_the_best_thresholds() -> None:
    """Held-out phantoms (2 here; 16 in the note's table): the network's mean Dice over DeepDRR's three classes and
    over our six beats the best thresholds fitted on training phantoms."""
    network = load_network()
    result = evaluate(lambda hu: network.memberships(hu).argmax(0), test_phantoms=2, fit_phantoms=2)
    for table in ("dice", "dice_deepdrr_classes"):
        network_mean = np.mean(list(result[table]["network"].values()))
        thresholds_mean = np.mean(list(result[table]["best thresholds"].values()))
        assert network_mean > thresholds_mean, markdown(result)


def test_phantom_seeds_never_overlap_between_sets() -> None:
    from torchdrr.learned.training import PhantomDataModule

    data = PhantomDataModule(train_phantoms=10, validation_phantoms=3, test_phantoms=4, batch_size=4)
    seeds = {
        name: [int(s) for batch in loader for s in batch]
        for name, loader in (
            ("train", data.train_dataloader()),
            ("val", data.val_dataloader()),
            ("test", data.test_dataloader()),
        )
    }
    assert seeds["train"] == list(range(10)) and len(seeds["val"]) == 3 and len(seeds["test"]) == 4
    assert not set(seeds["train"]) & set(seeds["val"]) and not set(seeds["val"]) & set(seeds["test"])
    with pytest.raises(ValueError, match="batch_size"):
        PhantomDataModule(10, batch_size=0)

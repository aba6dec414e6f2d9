"""DRRDataset and the sample parameters: determinism, batch invariance, geometry, physics and bad input."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from torchdrr import DRR
from torchdrr.data import DRRDataset, PhysicsDistribution, PoseDistribution, sample_parameters
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path

SIZE = 24


def small(**kwargs) -> DRRDataset:
    options = dict(length=12, height=SIZE, width=SIZE + 4, pixel_spacing_mm=(12.0, 12.0))
    options.update(kwargs)
    return DRRDataset(**options)


def test_parameters_are_a_pure_function_of_seed_and_index_and_respect_the_ranges() -> None:
    poses = PoseDistribution(primary_deg=(-10, 30), secondary_deg=(5, 6), translation_mm=(-3, 3), sdd_mm=(900, 1100),
                             sod_mm=(700, 800))  # fmt: skip
    physics = PhysicsDistribution(kvp=(60, 100), filtration_mm_al=(1, 2), photons_behind_patient=(10, 100))
    a = [sample_parameters(7, i, [1.0], poses, physics) for i in range(300)]
    b = [sample_parameters(7, i, [1.0], poses, physics) for i in reversed(range(300))][::-1]
    assert a == b
    assert a != [sample_parameters(8, i, [1.0], poses, physics) for i in range(300)]
    for p in a:
        assert -10 <= p.primary_deg <= 30 and 5 <= p.secondary_deg <= 6 and 900 <= p.sdd_mm <= 1100
        assert all(-3 <= v <= 3 for v in p.translation_mm) and 700 <= p.sod_mm <= 800
        assert 60 <= p.kvp <= 100 and 1 <= p.filtration_mm_al <= 2 and 10 <= p.photons_behind_patient <= 100
    # Uniform draws fill the range: the sample spread is near the uniform standard deviation (40 / sqrt 12).
    primary = np.array([p.primary_deg for p in a])
    assert abs(primary.std() - 40 / math.sqrt(12)) < 1.5
    # The dose is log-uniform: its log has the uniform mean.
    assert abs(np.log([p.photons_behind_patient for p in a]).mean() - 0.5 * (math.log(10) + math.log(100))) < 0.1


def test_ct_weights_are_the_sampling_probabilities() -> None:
    draws = [
        sample_parameters(0, i, [1.0, 3.0], PoseDistribution(), PhysicsDistribution()).ct_index for i in range(4000)
    ]
    share = np.mean(draws)
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)


def test_items_do_not_depend_on_the_batch_and_survive_pickling() -> None:
    dataset = small(landmarks=torch.tensor([[0.0, 0.0, 0.0], [40.0, -30.0, 20.0]]))
    batch = dataset.render_batch([5, 2, 9])
    for row, index in enumerate([5, 2, 9]):
        single = dataset[index]
        assert torch.equal(batch["image"][row], single["image"])
        assert torch.equal(batch["P"][row], single["P"])
    clone = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker gets
    assert clone._drrs == {}
    assert torch.equal(clone[2]["image"], dataset[2]["image"])


def test_batches_mixing_noisy_and_noise_free_samples_keep_every_image_in_its_place() -> None:
    dataset = small(physics=PhysicsDistribution(noise_probability=0.5))
    noisy = [dataset.parameters(i).noisy for i in range(12)]
    assert any(noisy) and not all(noisy)
    batch = dataset.render_batch(list(range(12)))
    for index in range(12):
        assert torch.equal(batch["image"][index], dataset[index]["image"]), index


@pytest.mark.parametrize("supersample", [1, 2])
def test_images_do_not_depend_on_the_batch(device, supersample) -> None:
    """Bit for bit, on the GPU too, where reductions and convolutions could pick shape-dependent algorithms."""
    size = (64, 80) if device == "cuda" else (SIZE, SIZE + 4)
    dataset = DRRDataset(length=40, height=size[0], width=size[1], device=device, pixel_spacing_mm=(12.0, 12.0),
                         physics=PhysicsDistribution(noise_probability=0.8),
                         drr_options={"supersample": supersample})  # fmt: skip
    full = dataset.render_batch(list(range(40)))["image"]
    assert full.device.type == device and torch.isfinite(full).all()
    for indices in ([7], [30, 7, 2], list(range(5, 21))):
        part = dataset.render_batch(indices)["image"]
        assert torch.equal(part, full[indices]), indices


def test_item_geometry_and_landmarks_are_consistent() -> None:
    centre = Volume.load(bundled_ct_path(), check=False).center
    points = centre + torch.tensor(
        [[0.0, 0.0, 0.0], [60.0, 20.0, -40.0], [0.0, -5000.0, 0.0]], dtype=torch.float64
    )  # 3rd: behind the source
    dataset = small(landmarks=points, poses=PoseDistribution(translation_mm=(0, 0)))
    item = dataset[3]
    p = dataset.parameters(3)
    torch.testing.assert_close(item["P"], item["K"] @ torch.cat([item["R"], item["t"][:, None]], 1))
    homogeneous = torch.cat([points, torch.ones(3, 1)], 1).double() @ item["P"].T
    uv = homogeneous[:, :2] / homogeneous[:, 2:]
    torch.testing.assert_close(item["landmarks_2d"].double(), uv, rtol=1e-5, atol=1e-3)
    # The isocenter (the CT centre here) projects to the principal point; a point behind the source is not visible.
    torch.testing.assert_close(dataset.drr(0).volume_center, centre)
    camera = Camera.from_carm(p.primary_deg, p.secondary_deg, centre, sod_mm=p.sod_mm, sdd_mm=p.sdd_mm, height=SIZE,
                              width=SIZE + 4, pixel_spacing_mm=(12.0, 12.0))  # fmt: skip
    torch.testing.assert_close(
        camera.project(centre[None])[0, 0], torch.tensor([(SIZE + 3) / 2, (SIZE - 1) / 2]).double()
    )
    assert bool(item["landmarks_visible"][0]) and not bool(item["landmarks_visible"][2])


def test_images_follow_the_sample_physics() -> None:
    """An item equals a DRR built with that sample's spectrum and dose, rendered with the sample's noise seed."""
    dataset = small(physics=PhysicsDistribution(kvp=(60, 120), noise_probability=1.0))
    p = dataset.parameters(4)
    volume = Volume.load(bundled_ct_path(), fix_padding=True)
    from torchdrr.physics import spectrum

    reference = DRR(volume, spectrum=spectrum(p.kvp, p.filtration_mm_al), noise=dataset.noise,
                    photons_behind_patient=p.photons_behind_patient)  # fmt: skip
    camera = dataset.camera(p)
    expected = reference(camera, generator=torch.Generator().manual_seed(p.noise_seed))
    torch.testing.assert_close(dataset[4]["image"], expected[0], rtol=1e-5, atol=1e-5)
    quiet = small(physics=PhysicsDistribution(noise_probability=0.0))
    q = quiet.parameters(4)
    assert not q.noisy
    assert not torch.equal(quiet[4]["image"], dataset[4]["image"])
    expected = DRR(
        volume, spectrum=spectrum(q.kvp, q.filtration_mm_al), photons_behind_patient=q.photons_behind_patient
    )
    torch.testing.assert_close(quiet[4]["image"], expected(quiet.camera(q))[0], rtol=1e-5, atol=1e-5)


def test_worker_loading_matches_the_main_process() -> None:
    dataset = small(length=6)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)
    direct = dataset.render_batch(range(6))
    assert torch.equal(torch.cat([b["image"] for b in batches]), direct["image"])


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: PoseDistribution(primary_deg=(10, -10)), ValueError, "min must be <= max"),
        (lambda: PoseDistribution(sdd_mm=(-5, 100)), ValueError, "sdd_mm must be >="),
        (lambda: PoseDistribution(sod_mm=(900, 1100)), ValueError, "sod_mm must stay below sdd_mm"),
        (lambda: PoseDistribution(distribution="cauchy"), ValueError, "distribution must be one of"),
        (lambda: PhysicsDistribution(kvp=(30, 90)), ValueError, "tabulated"),
        (lambda: PhysicsDistribution(noise_probability=1.5), ValueError, "noise_probability"),
        (lambda: small(cts=["/nonexistent/ct.nii.gz"]), FileNotFoundError, "CT not found"),
        (lambda: small(ct_weights=[1.0, 2.0]), ValueError, "one per CT"),
        (lambda: small(length=-1), ValueError, "length"),
        (lambda: small(landmarks=torch.zeros(4, 2)), ValueError, r"\[L, 3\]"),
        (lambda: small(output="photons"), ValueError, "not available from this detector"),
        (lambda: small(drr_options={"spectrum": "90kVp"}), ValueError, "must not set 'spectrum'"),
        (lambda: small()[12], IndexError, "out of range"),
    ],
)
def test_bad_settings_are_rejected(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()

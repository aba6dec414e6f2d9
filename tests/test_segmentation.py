"""HU-to-density conversion and material decomposition (torchdrr.physics.density / segmentation)."""

from __future__ import annotations

import pytest
import torch

from torchdrr.io import Volume, bundled_ct_path
from torchdrr.physics.density import AIR_DENSITY, check_density, hu_to_density
from torchdrr.physics.materials import attenuation_table
from torchdrr.physics.segmentation import (
    LabelMapSegmentation,
    ProbabilityMapSegmentation,
    SoftThresholdSegmentation,
    ThresholdSegmentation,
)


@pytest.fixture(scope="module")
def chest_hu() -> torch.Tensor:
    return Volume.load(bundled_ct_path(), fix_padding=True).data


def test_two_line_density() -> None:
    hu = torch.tensor([-3024.0, -2048.0, -1500.0, -1024.0, -1000.0, -500.0, 0.0, 500.0, 1000.0], dtype=torch.float64)
    want = torch.tensor(
        [
            AIR_DENSITY,
            AIR_DENSITY,
            AIR_DENSITY,
            0.0,  # 1.030 - 1.053696 < 0, clipped
            1.030 - 1.029,
            1.030 - 0.5145,
            1.030,
            1.030 + 0.2943,
            1.030 + 0.5886,
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(hu_to_density(hu), want, rtol=0, atol=1e-12)


def test_density_gradient_is_slope() -> None:
    hu = torch.tensor([-2000.0, -1010.0, -400.0, 200.0], dtype=torch.float64, requires_grad=True)
    hu_to_density(hu).sum().backward()
    assert torch.allclose(hu.grad, torch.tensor([0.0, 0.0, 0.001029, 0.0005886], dtype=torch.float64))


def test_density_bad_input() -> None:
    with pytest.raises(TypeError, match="hu"):
        hu_to_density(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="model"):
        hu_to_density(torch.zeros(2), model="schneider")
    with pytest.raises(ValueError, match="density must be >= 0"):
        check_density(torch.tensor([1.0, -0.1]))


def test_hard_thresholds_small_volume() -> None:
    hu = torch.tensor([-1000.0, -800.0, -799.0, 0.0, 350.0, 351.0, 1500.0, -900.0]).view(2, 2, 2)
    seg = ThresholdSegmentation()
    dens, names = seg(hu)
    assert names == ("air", "soft tissue", "cortical bone")
    assert dens.shape == (3, 2, 2, 2)
    labels = dens.flatten(1).argmax(0)
    member = seg.memberships(hu).flatten(1)
    assert member.sum(0).eq(1).all()
    assert member.argmax(0).tolist() == [0, 0, 1, 1, 1, 2, 2, 0]
    assert torch.allclose(dens.sum(0), hu_to_density(hu))
    assert labels[6] == 2
    # User-set thresholds and materials.
    seg4 = ThresholdSegmentation((-900, -200, 300), ("air", "lung", "soft tissue", "cortical bone"))
    assert seg4.memberships(hu).flatten(1).argmax(0).tolist() == [0, 1, 1, 2, 3, 3, 3, 0]


@pytest.mark.parametrize("cls", [ThresholdSegmentation, SoftThresholdSegmentation])
def test_threshold_errors(cls: type) -> None:
    with pytest.raises(ValueError, match="thresholds must be strictly increasing"):
        cls((350, -800))
    with pytest.raises(ValueError, match="thresholds: need"):
        cls((-800,))
    with pytest.raises(ValueError, match="valid materials are"):
        cls((-800, 350), ("air", "soft tissue", "bone marrow"))
    with pytest.raises(ValueError, match="hu must have shape"):
        cls()(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="density must be >= 0"):
        cls()(torch.zeros(2, 2, 2), density=-torch.ones(2, 2, 2))


def test_chest_ct_fractions(chest_hu: torch.Tensor) -> None:
    member = ThresholdSegmentation().memberships(chest_hu)
    fractions = (member.sum((1, 2, 3)) / chest_hu.numel()).tolist()
    print("chest CT volume fractions air/soft/bone:", [round(f, 4) for f in fractions])
    air, soft, bone = fractions
    assert abs(sum(fractions) - 1) < 1e-6
    # Chest CT field of view: lots of air (outside the body and lungs), mostly soft tissue inside, a few % bone.
    assert 0.3 < air < 0.8 and 0.15 < soft < 0.65 and 0.003 < bone < 0.1


def test_soft_tends_to_hard(chest_hu: torch.Tensor) -> None:
    hu = chest_hu[40:120, 40:120, 60:70].double()
    hard = ThresholdSegmentation().memberships(hu)
    # Integer HU exactly on a threshold get 1/2 from the sigmoid; compare elsewhere.
    away = ((hu + 800).abs() > 0.5) & ((hu - 350).abs() > 0.5)
    errors = []
    for temperature in (50.0, 5.0, 0.5, 0.01):
        soft = SoftThresholdSegmentation(temperature=temperature).memberships(hu)
        assert torch.allclose(soft.sum(0), torch.ones_like(hu))
        errors.append(float((soft.detach() - hard).abs()[:, away].max()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12, errors
    assert errors[0] > 0.1  # the soft version really is soft at a wide temperature


def test_soft_gradcheck(chest_hu: torch.Tensor) -> None:
    # Small crop straddling lung, soft tissue and bone; +0.37 HU keeps voxels off the density kinks at 0 HU.
    crop = chest_hu[80:83, 60:63, 64:68].double() + 0.37
    crop = torch.cat([crop.flatten(), torch.tensor([-805.37, -780.0, 340.0, 360.0], dtype=torch.float64)]).view(
        -1, 2, 2
    )
    seg = SoftThresholdSegmentation(temperature=20.0)
    hu = crop.clone().requires_grad_(True)

    def fn(volume: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # Route the thresholds through the module's parameter functionally.
        return torch.func.functional_call(seg, {"thresholds": thresholds}, (volume,)).densities

    thresholds = torch.tensor([-800.0, 350.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (hu, thresholds))
    dens = fn(hu, thresholds)
    dens.sum().backward()
    # Total density does not depend on the thresholds (memberships sum to 1), so weight channels instead.
    thresholds.grad = None
    mu = attenuation_table(["air", "soft tissue", "cortical bone"], torch.tensor([60.0]))[:, 0]
    (fn(hu, thresholds) * mu.view(-1, 1, 1, 1)).sum().backward()
    assert (thresholds.grad.abs() > 0).all()


def test_label_map() -> None:
    labels = torch.tensor([[[0, 1], [2, 1]]])
    seg = LabelMapSegmentation({0: "air", 1: "muscle", 2: "titanium"})
    dens, names = seg(labels)
    assert names == ("air", "muscle", "titanium") and dens.shape == (3, 1, 2, 2)
    assert dens[2, 0, 1, 0] == pytest.approx(4.506) and dens[1, 0, 0, 1] == pytest.approx(1.05)
    assert dens[:, 0, 0, 0].tolist() == pytest.approx([0.0012050, 0.0, 0.0], abs=1e-7)
    hu = torch.tensor([[[-1000.0, 40.0], [3000.0, 60.0]]])
    dens_hu, _ = seg(labels, hu=hu)
    assert torch.allclose(dens_hu.sum(0), hu_to_density(hu))
    with pytest.raises(ValueError, match="not in label_names"):
        seg(torch.tensor([[[0, 7]]]))
    with pytest.raises(ValueError, match="valid materials are"):
        LabelMapSegmentation({0: "air", 1: "mithril"})
    with pytest.raises(TypeError, match="integer"):
        seg(labels.float())
    with pytest.raises(ValueError, match="density must be >= 0"):
        seg(labels, density=-torch.ones(1, 2, 2))


def test_probability_map() -> None:
    hu = torch.tensor([[[-900.0, 50.0], [700.0, 0.0]]], dtype=torch.float64)
    probs = torch.softmax(torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0)
    probs.requires_grad_(True)
    seg = ProbabilityMapSegmentation(["air", "soft tissue", "cortical bone"])
    dens, names = seg(probs, hu)
    assert torch.allclose(dens.sum(0), hu_to_density(hu))
    dens.sum().backward()
    assert probs.grad is not None
    with pytest.raises(ValueError, match="probabilities must have shape"):
        seg(torch.ones(2, 1, 2, 2), hu)
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\]"):
        seg(torch.full((3, 1, 2, 2), 1.5), hu)


def test_schneider2000_density_matches_the_published_table() -> None:
    """Knots of the Schneider 2000 calibration as tabulated by Geant4/GATE (HU -> g/cm^3)."""
    from torchdrr.physics.density import hu_to_density

    hu = torch.tensor([-1000.0, -98.0, 14.0, 23.0, 100.0, 101.0, 1600.0, 3000.0, -2048.0], dtype=torch.float64)
    expected = torch.tensor([1.21e-3, 0.930, 1.0305, 1.03, 1.1199, 1.0768, 1.9642, 2.793, 0.0012], dtype=torch.float64)
    torch.testing.assert_close(hu_to_density(hu, model="schneider2000"), expected, atol=1.5e-3, rtol=0)
    # Differentiable, with the segment slopes as gradients.
    x = torch.tensor([-500.0, 0.0, 50.0, 500.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(hu_to_density(x, model="schneider2000").sum(), x)
    torch.testing.assert_close(grad, torch.tensor([1.0297e-3, 0.893e-3, 1.169e-3, 0.592e-3], dtype=torch.float64))
    with pytest.raises(ValueError, match="model must be one of"):
        hu_to_density(x, model="linear")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decomposition_and_attenuation_on_cuda_match_the_cpu() -> None:
    from torchdrr.physics import SoftThresholdSegmentation, ThresholdSegmentation, spectrum_preset

    hu = Volume.load(bundled_ct_path(), fix_padding=True).data[60:90, 60:90, 50:70]
    for module in (ThresholdSegmentation(), SoftThresholdSegmentation(temperature=20.0)):
        on_cpu = module(hu)
        on_gpu = module.to("cuda")(hu.cuda())
        assert on_gpu.densities.is_cuda and on_gpu.materials == on_cpu.materials
        torch.testing.assert_close(on_gpu.densities.cpu(), on_cpu.densities, rtol=1e-5, atol=1e-6)
    energy, _ = spectrum_preset()
    table = attenuation_table(("water", "cortical bone"), energy.cuda())
    assert table.is_cuda
    torch.testing.assert_close(table.cpu(), attenuation_table(("water", "cortical bone"), energy))

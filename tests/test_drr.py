"""The DRR module: analytic slabs, beam hardening, detectors, exposure control, gradients and bad input.

The expected values are computed directly from the physics (mass attenuation from ``mass_attenuation``, spectra from
``spectrum_preset``, chord lengths from the slab geometry), not through the DRR's own code path.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchdrr.drr import DRR
from torchdrr.geometry import Camera, intrinsic_matrix
from torchdrr.physics import (
    MaterialChannels,
    SoftThresholdSegmentation,
    mass_attenuation,
    spectrum_preset,
)
from torchdrr.physics.detector import EnergyIntegratingDetector, PhotonCountingDetector
from torchdrr.physics.noise import Noise

from .conftest import cuda_ready

F64 = torch.float64
SDD = 1000.0


def axial_camera(height: int = 3, width: int = 3, pitch: float = 1.0, batch: int = 1) -> Camera:
    """Source at z = -500 mm looking along +z (camera frame = world frame), detector at z = +500 mm."""
    rotation = torch.eye(3, dtype=F64).expand(batch, 3, 3)
    translation = torch.tensor([0.0, 0.0, 500.0], dtype=F64).expand(batch, 3)
    return Camera(intrinsic_matrix(SDD, height, width, (pitch, pitch)), rotation, translation, height, width, SDD)


def slab(
    thicknesses_mm: list[float], materials: tuple[str, ...], densities: list[float]
) -> tuple[MaterialChannels, torch.Tensor]:
    """Slabs stacked along z around the origin, one voxel each (k = 0, 1, ...), one material channel each, 40 mm wide
    in x and y. The central ray crosses every slab perpendicularly: chord = thickness. Unequal thicknesses use a
    voxel per slab of the largest thickness with the density scaled (same mass thickness rho * t)."""
    n = len(thicknesses_mm)
    dz = max(max(thicknesses_mm), 1.0)
    values = torch.zeros(len(materials), 3, 3, n, dtype=F64)
    for k, (t, rho) in enumerate(zip(thicknesses_mm, densities, strict=True)):
        values[k, :, :, k] = rho * t / dz
    affine = torch.diag(torch.tensor([40.0, 40.0, dz, 1.0], dtype=F64))
    affine[:3, 3] = torch.tensor([-40.0, -40.0, -(n - 1) * dz / 2])
    return MaterialChannels(values, materials), affine


def centre(image: torch.Tensor) -> torch.Tensor:
    return image[..., image.shape[-2] // 2, image.shape[-1] // 2]


# --------------------------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------------------------
def test_monoenergetic_slab_gives_beer_lambert() -> None:
    channels, affine = slab([37.0], ("water",), [1.0])
    drr = DRR(channels, affine, spectrum=60.0, dtype=F64)
    got = centre(drr(axial_camera(), output="line_integral")).item()
    expected = float(mass_attenuation("water", 60.0)) * 1.0 * 3.7
    assert got == pytest.approx(expected, rel=1e-12)
    flat = centre(drr(axial_camera(), output="flat_field")).item()
    assert flat == pytest.approx(math.exp(-expected), rel=1e-12)
    intensity = centre(drr(axial_camera(), output="intensity")).item()
    assert intensity == pytest.approx(1e4 * 60.0 * math.exp(-expected), rel=1e-12)


@pytest.mark.parametrize("preset", ["60kVp", "90kVp", "120kVp"])
def test_beam_hardening_matches_the_direct_spectral_sum(preset: str) -> None:
    """Behind growing water thicknesses the mean energy rises and mu_eff falls, as the direct sum says (1e-6)."""
    energy, photons = spectrum_preset(preset)
    mu = mass_attenuation("water", energy)  # cm^2/g, rho = 1
    mean_energies, mu_effs = [], []
    for t_mm in [5.0, 20.0, 50.0, 100.0, 200.0, 300.0]:
        channels, affine = slab([t_mm], ("water",), [1.0])
        transmitted = photons * torch.exp(-mu * t_mm / 10.0)
        expected_mean = float((transmitted * energy).sum() / transmitted.sum())
        expected_mu = -math.log(float((transmitted * energy).sum() / (photons * energy).sum())) / (t_mm / 10.0)

        energy_drr = DRR(channels, affine, spectrum=preset, dtype=F64)
        count_drr = DRR(channels, affine, spectrum=preset, detector=PhotonCountingDetector([1.0]), dtype=F64)
        deposited = centre(energy_drr(axial_camera(), output="intensity")).item()
        counted = centre(count_drr(axial_camera(), output="photons")).item()
        mean_energy = deposited / counted
        mu_eff = centre(energy_drr(axial_camera(), output="line_integral")).item() / (t_mm / 10.0)
        assert mean_energy == pytest.approx(expected_mean, rel=1e-6)
        assert mu_eff == pytest.approx(expected_mu, rel=1e-6)
        mean_energies.append(mean_energy)
        mu_effs.append(mu_eff)
    assert all(b > a for a, b in zip(mean_energies[:-1], mean_energies[1:], strict=True)), mean_energies
    assert all(b < a for a, b in zip(mu_effs[:-1], mu_effs[1:], strict=True)), mu_effs


def test_thick_metal_does_not_underflow() -> None:
    """exp(-mu A) underflows float32 far before the log-space line integral does."""
    channels, affine = slab([60.0], ("lead",), [11.35])
    energy, photons = spectrum_preset("90kVp")
    transmitted = photons * energy * torch.exp(-mass_attenuation("lead", energy) * 11.35 * 6.0)
    expected = -math.log(float(transmitted.sum() / (photons * energy).sum()))
    assert expected > 100  # exp(-expected) is below float32's smallest number
    drr = DRR(channels, affine, dtype=torch.float32)
    got = centre(drr(axial_camera(), output="line_integral")).item()
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------------------------------
def test_photon_counting_bins_sum_to_the_total_and_match_their_energies() -> None:
    channels, affine = slab([40.0, 8.0], ("soft tissue", "cortical bone"), [1.06, 1.92])
    energy, photons = spectrum_preset("120kVp")
    log_t = -(
        mass_attenuation("soft tissue", energy) * 1.06 * 4.0 + mass_attenuation("cortical bone", energy) * 1.92 * 0.8
    )
    transmitted = 1e4 * photons * torch.exp(log_t)
    thresholds = [1.0, 30.0, 50.0, 70.0]
    bins = DRR(channels, affine, spectrum="120kVp", detector=PhotonCountingDetector(thresholds), dtype=F64)
    counts = centre(bins(axial_camera(), output="photons"))[0]  # [K]
    edges = [*thresholds, math.inf]
    for k in range(len(thresholds)):
        inside = (energy >= edges[k]) & (energy < edges[k + 1])
        assert counts[k].item() == pytest.approx(float(transmitted[inside].sum()), rel=1e-10)
    assert counts.sum().item() == pytest.approx(float(transmitted.sum()), rel=1e-10)


def test_csi_efficiency_is_one_minus_exp_and_weights_the_signal() -> None:
    xraydb = pytest.importorskip("xraydb")
    from torchdrr.physics.detector import absorption_efficiency

    energies = torch.tensor([20.0, 33.0, 34.0, 60.0, 100.0], dtype=F64)  # across iodine's and caesium's K edges
    got = absorption_efficiency(energies, "CsI", 0.6)
    mu_per_cm = torch.tensor([xraydb.material_mu("CsI", 1000.0 * float(e), density=4.51) for e in energies])
    torch.testing.assert_close(got, 1.0 - torch.exp(-mu_per_cm * 0.06), rtol=1e-9, atol=0.0)
    assert got[2] > got[1]  # the Cs K edge (36 keV) and I K edge (33.2 keV) raise absorption

    channels, affine = slab([1.0], ("water",), [0.0])  # empty: the flat field
    energy, photons = spectrum_preset("90kVp")
    drr = DRR(channels, affine, detector=EnergyIntegratingDetector(0.6), dtype=F64)
    flat = centre(drr(axial_camera(), output="intensity")).item()
    expected = 1e4 * float((photons * absorption_efficiency(energy, "CsI", 0.6) * energy).sum())
    assert flat == pytest.approx(expected, rel=1e-12)


def test_flat_field_falls_as_cos_cubed() -> None:
    channels, affine = slab([1.0], ("water",), [0.0])
    camera = axial_camera(height=9, width=11, pitch=60.0)  # corners about 25 degrees off axis
    drr = DRR(channels, affine, detector=EnergyIntegratingDetector(falloff=True), spectrum=60.0, dtype=F64)
    image = drr(camera, output="intensity")[0, 0]
    sources, targets = camera.rays()
    rays = (targets - sources)[0]
    normal = camera.rotation[0].T @ torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    cos = (rays @ normal) / rays.norm(dim=-1)
    torch.testing.assert_close(image.reshape(-1) / (1e4 * 60.0), cos**3, rtol=1e-12, atol=0.0)
    assert float(cos.min()) < 0.94  # the test covers real obliquity (about 21 degrees)
    # I / I0 divides the falloff out.
    torch.testing.assert_close(drr(camera, output="flat_field"), torch.ones_like(image).view(1, 1, 9, 11))


def test_exposure_control_sets_the_photons_behind_the_body() -> None:
    hu = torch.full((8, 8, 8), -1000.0, dtype=F64)
    hu[2:6, 1:7, 2:6] = 40.0
    affine = torch.diag(torch.tensor([20.0, 20.0, 20.0, 1.0], dtype=F64))
    affine[:3, 3] = -70.0
    camera = axial_camera(height=13, width=13, pitch=20.0)
    drr = DRR(hu, affine, detector=PhotonCountingDetector([1.0]), photons_behind_patient=1000.0, dtype=F64)
    photons = drr(camera, output="photons")[0, 0].reshape(-1)
    body = drr.material_line_integrals(camera)[0].sum(-1) >= 1.0
    assert 0 < int(body.sum()) < body.numel()
    assert photons[body].mean().item() == pytest.approx(1000.0, rel=1e-9)
    # Fixed exposure instead: the flat-field photons are N0.
    fixed = DRR(hu, affine, detector=PhotonCountingDetector([1.0]), photons_per_pixel=500.0, dtype=F64)
    torch.testing.assert_close(fixed(camera, output="photons"), 500.0 * fixed(camera, output="flat_field"))


# --------------------------------------------------------------------------------------------------------------------
# The module: layout, batching, supersampling, noise wiring, devices
# --------------------------------------------------------------------------------------------------------------------
def chest_like(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    hu = torch.empty(12, 10, 9, dtype=dtype).uniform_(-1000.0, 1400.0, generator=generator)
    affine = torch.diag(torch.tensor([6.0, 7.0, 8.0, 1.0], dtype=F64))
    affine[:3, 3] = torch.tensor([-33.0, -31.5, -32.0], dtype=F64)
    return hu, affine


def carm(primary, height=6, width=5, pitch=30.0, dtype=F64) -> Camera:
    primary = torch.as_tensor(primary, dtype=dtype)
    return Camera.from_carm(
        primary, torch.zeros_like(primary), torch.zeros(3, dtype=dtype), sod_mm=300.0, sdd_mm=600.0,
        height=height, width=width, pixel_spacing_mm=(pitch, pitch),
    )  # fmt: skip


def test_material_volume_is_channels_last_padded_and_cached() -> None:
    hu, affine = chest_like()
    drr = DRR(hu, affine)
    volume = drr.material_volume()
    assert volume.shape == (4, 12, 10, 9) and volume.stride(0) == 1
    assert torch.equal(volume[3], torch.zeros_like(volume[3]))
    assert drr.material_volume() is volume  # cached
    drr.hu.add_(1.0)  # an in-place change of the CT invalidates the cache
    assert drr.material_volume() is not volume


def test_batched_poses_match_single_renders() -> None:
    hu, affine = chest_like()
    drr = DRR(hu, affine, dtype=F64)
    angles = [0.0, 30.0, 95.0]
    batch = drr(carm(angles))
    for i, angle in enumerate(angles):
        torch.testing.assert_close(batch[i : i + 1], drr(carm([angle])), rtol=1e-12, atol=1e-12)
    assert batch.std() > 0.1


def test_supersampling_averages_intensities_of_the_finer_detector() -> None:
    hu, affine = chest_like()
    fine = carm([20.0], height=8, width=6, pitch=15.0)
    coarse = fine.binned(2)
    expected = DRR(hu, affine, dtype=F64)(fine, output="intensity")
    expected = expected.reshape(1, 1, 4, 2, 3, 2).mean((3, 5))
    got = DRR(hu, affine, supersample=2, dtype=F64)(coarse, output="intensity")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)


def test_output_modes_are_consistent() -> None:
    hu, affine = chest_like()
    drr = DRR(hu, affine, dtype=F64)
    camera = carm([10.0])
    line = drr(camera, output="line_integral")
    torch.testing.assert_close(drr(camera, output="flat_field"), torch.exp(-line))
    display = drr(camera, output="display")
    assert display.min() >= 0 and display.max() <= 1 and display.max() == 1
    # Brighter where attenuation is higher: display is a monotone map of the line integral.
    order = torch.argsort(line.reshape(-1))
    assert bool((display.reshape(-1)[order].diff() >= 0).all())


def test_noise_is_seeded_and_unbiased() -> None:
    hu, affine = chest_like()
    drr = DRR(hu, affine, noise=Noise("compound", electronic_std_photons=2.0), photons_behind_patient=30.0, dtype=F64)
    camera = carm([0.0])
    a = drr(camera, output="intensity", generator=torch.Generator().manual_seed(5))
    b = drr(camera, output="intensity", generator=torch.Generator().manual_seed(5))
    c = drr(camera, output="intensity", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected = drr(camera, output="intensity", noisy=False)
    draws = torch.stack(
        [drr(camera, output="intensity", generator=torch.Generator().manual_seed(s)) for s in range(200)]
    )
    # About 30 photons per pixel behind the body (no blur): the mean of 200 draws is within 5 standard errors.
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((draws.mean(0) - expected).abs() < 5 * standard_error + 1e-9).all())


def test_learned_volume_and_thresholds_are_registered() -> None:
    hu, affine = chest_like(F64)
    drr = DRR(nn.Parameter(hu), affine, segmentation=SoftThresholdSegmentation(), learn_spectrum=True, dtype=F64)
    names = {name for name, _ in drr.named_parameters()}
    assert names == {"hu", "segmentation.thresholds", "spectrum_weights"}
    loss = drr(carm([15.0])).sum()
    loss.backward()
    for name, parameter in drr.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    if not cuda_ready():
        pytest.skip("needs a CUDA device and a CUDA build of torchdrr")
    hu, affine = chest_like()
    for detector in (EnergyIntegratingDetector(0.5, falloff=True), PhotonCountingDetector([20.0, 50.0])):
        cpu = DRR(hu, affine, detector=detector)
        gpu = DRR(hu, affine, detector=detector).to("cuda")
        output = "photons" if isinstance(detector, PhotonCountingDetector) else "intensity"
        torch.testing.assert_close(gpu(carm([0.0, 40.0]), output=output).cpu(), cpu(carm([0.0, 40.0]), output=output),
                                   rtol=1e-4, atol=1e-3)  # fmt: skip
    noisy = DRR(hu, affine, noise="radiography").to("cuda")
    a = noisy(carm([0.0]), generator=torch.Generator("cuda").manual_seed(1))
    b = noisy(carm([0.0]), generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Gradients (float64, CPU): pose, intrinsics, volume, soft thresholds, spectrum weights
# --------------------------------------------------------------------------------------------------------------------
def small_drr(**kwargs) -> DRR:
    hu, affine = chest_like(F64)
    return DRR(hu, affine, energy_bin_keV=5, dtype=F64, **kwargs)


def test_gradcheck_pose_and_intrinsics() -> None:
    drr = small_drr(detector=EnergyIntegratingDetector(0.5, falloff=True))

    def render(primary, secondary, focal):
        camera = Camera.from_carm(primary, secondary, torch.zeros(3, dtype=F64), sod_mm=300.0, sdd_mm=600.0,
                                  height=4, width=3, pixel_spacing_mm=(30.0, 30.0))  # fmt: skip
        intrinsics = camera.intrinsics.clone()
        intrinsics[1, 1] = focal
        camera = Camera(intrinsics, camera.rotation, camera.translation, 4, 3, 600.0)
        return drr(camera, output="line_integral")

    inputs = (
        torch.tensor([12.3], dtype=F64, requires_grad=True),
        torch.tensor([-4.1], dtype=F64, requires_grad=True),
        torch.tensor(21.0, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["hu", "segmentation.thresholds", "spectrum_weights"])
def test_gradcheck_volume_thresholds_and_spectrum(name: str) -> None:
    drr = small_drr(segmentation=SoftThresholdSegmentation(temperature=150.0))
    camera = carm([25.0], height=3, width=4)
    value = dict(drr.named_parameters(), **dict(drr.named_buffers()))[name].detach().clone()
    if name == "spectrum_weights":
        value = value.clamp_min(1e-3)  # finite differences must not step below zero photons
    value.requires_grad_(True)

    def render(x):
        return torch.func.functional_call(drr, {name: x}, (camera,), {"output": "line_integral"})

    assert render(value).abs().sum() > 0
    assert torch.autograd.gradcheck(render, (value,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gaussian_noise_mode_is_differentiable() -> None:
    drr = small_drr(noise=Noise("gaussian", electronic_std_photons=1.0), photons_per_pixel=200.0)
    primary = torch.tensor([7.0], dtype=F64, requires_grad=True)

    def render(angle):
        return drr(carm(angle, height=3, width=3), output="intensity", generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(render, (primary,), eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------
def test_nan_and_inf_voxels_are_reported_with_their_count() -> None:
    hu, affine = chest_like()
    hu[0, 0, 0] = float("nan")
    hu[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="holds 2 NaN or Inf voxels"):
        DRR(hu, affine)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(spectrum=(torch.tensor([50.0, 60.0]), torch.tensor([1.0, -0.5]))), ValueError, "must be >= 0"),
        (dict(spectrum=(torch.arange(1.0, 6.0), torch.ones(4))), ValueError, "two 1-D tensors of one length"),
        (dict(spectrum=(torch.tensor([60.0, 50.0]), torch.ones(2))), ValueError, "strictly increasing"),
        (dict(spectrum=-3.0), ValueError, "positive energy"),
        (dict(spectrum="200kVp"), ValueError, "unknown spectrum preset"),
        (dict(output="photons"), ValueError, "records deposited energy, not photon counts"),
        (dict(detector=PhotonCountingDetector([20.0]), output="intensity"), ValueError, "use 'photons'"),
        (dict(detector=PhotonCountingDetector([200.0])), ValueError, "records no part of the spectrum"),
        (dict(photons_per_pixel=-5.0), ValueError, "positive number of photons"),
        (dict(photons_per_pixel=5.0, photons_behind_patient=3.0), ValueError, "not both"),
        (dict(noise="dental"), ValueError, "radiography"),
        (dict(supersample=0), ValueError, "supersample"),
        (dict(dtype=torch.float16), TypeError, "float32 or torch.float64"),
    ],
)
def test_bad_settings_are_rejected(kwargs, error, message) -> None:
    hu, affine = chest_like()
    with pytest.raises(error, match=message):
        DRR(hu, affine, **kwargs)


def test_bad_calls_are_rejected() -> None:
    hu, affine = chest_like()
    drr = DRR(hu, affine)
    with pytest.raises(ValueError, match="needs a noise model"):
        drr(carm([0.0]), noisy=True)
    with pytest.raises(TypeError, match="Camera"):
        drr("PA")
    with pytest.raises(ValueError, match="output must be one of"):
        drr(carm([0.0]), output="negative")
    learned = DRR(hu, affine, learn_spectrum=True)
    with torch.no_grad():
        learned.spectrum_weights[10] = -1.0
    with pytest.raises(ValueError, match="must be >= 0 per bin"):
        learned(carm([0.0]))


def test_detect_with_per_call_spectrum_and_exposure_matches_a_module_built_with_them() -> None:
    hu, affine = chest_like()
    camera = carm([10.0, 50.0])
    base = DRR(hu, affine, spectrum="120kVp", dtype=F64)
    integrals = base.material_line_integrals(camera)
    energy, photons120 = spectrum_preset("120kVp")
    e90, p90 = spectrum_preset("90kVp")
    override = torch.zeros_like(photons120)
    override[: e90.numel()] = p90  # the 90 kVp spectrum on the 120 kVp grid
    got = base.detect(integrals, camera, output="intensity", spectrum_weights=override, photons_per_pixel=321.0)
    expected = DRR(hu, affine, spectrum="90kVp", photons_per_pixel=321.0, dtype=F64)(camera, output="intensity")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)
    automatic = base.detect(integrals, camera, output="line_integral", photons_behind_patient=50.0)
    torch.testing.assert_close(automatic, base(camera, output="line_integral"))  # exposure cancels in -log(I/I0)
    with pytest.raises(ValueError, match="spectrum_weights must be a"):
        base.detect(integrals, camera, spectrum_weights=torch.ones(5))
    with pytest.raises(ValueError, match="integrals must be"):
        base.detect(integrals[:1], camera)

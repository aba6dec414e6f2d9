"""Detector noise (torchdrr.physics.noise): moments against the compound-Poisson model, blur, electronic noise,
reproducibility, gradients and validation.

Statistical checks treat each pixel of a flat field as one independent draw and compare sample moments with the model
within 3 standard errors (SE of the mean sqrt(var / n); SE of the variance from the sample 4th central moment). Every
sample uses a fixed seed, so the tests are deterministic; a wrong moment of more than a few SE fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import DEVICES, cuda_ready
from torchdrr.physics import spectrum_preset
from torchdrr.physics.noise import NOISE_METHODS, NOISE_PRESETS, Noise, NoisePreset

N0 = 1000.0  # photons per pixel in the flat field
H = W = 128  # 16384 independent draws per flat field


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def spectrum_bins(n0: float = N0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(energy_keV [E], lambda_E [E], S_E = E lambda_E [E]) of the 90 kVp preset (1 keV bins), float64."""
    e, p = spectrum_preset("90kVp")
    lam = n0 * p
    return e, lam, e * lam


def grouped(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sums of consecutive runs of ``width`` bins (the last run may be shorter)."""
    return torch.stack([chunk.sum() for chunk in values.split(width)])


def flat_field(
    lam: torch.Tensor, s: torch.Tensor | None, batch: int = 1, h: int = H, w: int = W
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[batch, 1, G, h, w] counts (and energies) equal in every pixel."""
    shape = (batch, 1, lam.numel(), h, w)
    counts = lam.view(1, 1, -1, 1, 1).expand(shape).contiguous()
    energy = None if s is None else s.view(1, 1, -1, 1, 1).expand(shape).contiguous()
    return counts, energy


def moments(x: torch.Tensor) -> tuple[float, float, float, float]:
    """Sample mean, unbiased variance, SE of the mean and SE of the variance of the flattened samples."""
    x = x.detach().double().flatten()
    n = x.numel()
    mean = x.mean()
    d = x - mean
    var = (d**2).sum() / (n - 1)
    m4 = (d**4).mean()
    se_mean = math.sqrt(float(var) / n)
    se_var = math.sqrt(float(m4 - var**2 * (n - 3) / (n - 1)) / n)
    return float(mean), float(var), se_mean, se_var


def assert_moments(x: torch.Tensor, mean: float, var: float) -> None:
    m, v, se_m, se_v = moments(x)
    assert abs(m - mean) < 3 * se_m, f"sample mean {m:.6g} vs model {mean:.6g} (SE {se_m:.3g})"
    assert abs(v - var) < 3 * se_v, f"sample variance {v:.6g} vs model {var:.6g} (SE {se_v:.3g})"


def gen(seed: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------------------------------------
def test_compound_moments_match_the_spectrum():
    e, lam, s = spectrum_bins()
    counts, energy = flat_field(lam, s)
    noise = Noise("compound")
    mean, var = float((e * lam).sum()), float((e**2 * lam).sum())
    torch.testing.assert_close(noise.expected(counts, energy), torch.full((1, 1, H, W), mean, dtype=torch.float64))
    torch.testing.assert_close(noise.variance(counts, energy), torch.full((1, 1, H, W), var, dtype=torch.float64))
    out = noise(counts, energy, gen(1))
    assert out.shape == (1, 1, H, W) and out.dtype == torch.float64
    assert_moments(out, mean, var)


@pytest.mark.parametrize("n0", [N0, 30.0])
def test_electronic_noise_adds_its_variance(n0):
    e, lam, s = spectrum_bins(n0)
    counts, energy = flat_field(lam, s)
    photon_energy = float(s.sum() / lam.sum())  # mean detected energy of the flat field, keV
    sigma = 3.0 * photon_energy
    quantum = float((e**2 * lam).sum())
    noise = Noise("compound", electronic_std_photons=3.0)
    torch.testing.assert_close(
        noise.variance(counts, energy, photon_energy_keV=photon_energy),
        torch.full((1, 1, H, W), quantum + sigma**2, dtype=torch.float64),
    )
    noisy = noise(counts, energy, gen(2), photon_energy_keV=torch.tensor(photon_energy))
    assert_moments(noisy, float(s.sum()), quantum + sigma**2)
    # The electronic noise is drawn after the quantum noise, so with the same seed the difference from the sample
    # without electronic noise is the electronic noise alone: N(0, sigma^2) (resolves sigma^2 even where it is only 1%
    # of the total variance, as at n0 = 1000).
    quantum_only = Noise("compound")(counts, energy, gen(2))
    assert_moments(noisy - quantum_only, 0.0, sigma**2)


def test_gaussian_has_the_compound_moments():
    e, lam, s = spectrum_bins()
    counts, energy = flat_field(lam, s)
    noise = Noise("gaussian")
    var = float((e**2 * lam).sum())
    torch.testing.assert_close(noise.variance(counts, energy), torch.full((1, 1, H, W), var, dtype=torch.float64))
    assert_moments(noise(counts, energy, gen(3)), float(s.sum()), var)


def test_fast_has_the_exact_mean_and_a_smaller_variance():
    e, lam, s = spectrum_bins()
    counts, energy = flat_field(lam, s)
    total = float(lam.sum())
    ebar = float(s.sum()) / total
    fast_var = ebar**2 * total
    compound_var = float((e**2 * lam).sum())
    assert fast_var < compound_var  # 0.915 x compound for this spectrum
    torch.testing.assert_close(
        Noise("fast").variance(counts, energy), torch.full((1, 1, H, W), fast_var, dtype=torch.float64)
    )
    out = Noise("fast")(counts, energy, gen(4))
    assert_moments(out, float(s.sum()), fast_var)
    _, v, _, se_v = moments(out)
    assert abs(v - compound_var) > 3 * se_v  # the sample resolves the approximation's missing variance
    # Every pixel is a whole number of photons times the mean energy.
    n = out / ebar
    torch.testing.assert_close(n, n.round(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", NOISE_METHODS)
def test_photon_counting_is_poisson(method):
    e, lam, _ = spectrum_bins()
    low, high = lam[e < 50], lam[e >= 50]  # two detector channels (energy thresholds at 50 keV)
    g = max(low.numel(), high.numel())
    per_group = torch.zeros(2, g, dtype=torch.float64)
    per_group[0, : low.numel()] = low
    per_group[1, : high.numel()] = high
    counts = per_group.view(1, 2, g, 1, 1).expand(1, 2, g, H, W).contiguous()
    noise = Noise(method)
    expected = per_group.sum(dim=1).view(1, 2, 1, 1).expand(1, 2, H, W)
    torch.testing.assert_close(noise.expected(counts), expected)
    torch.testing.assert_close(noise.variance(counts), expected)
    out = noise(counts, generator=gen(5))
    assert out.shape == (1, 2, H, W)
    for k in range(2):
        lam_k = float(per_group[k].sum())
        assert_moments(out[:, k], lam_k, lam_k)
    if method != "gaussian":
        assert torch.equal(out, out.round())  # whole photon counts
        other = Noise("fast" if method == "compound" else "compound")(counts, generator=gen(5))
        assert torch.equal(out, other)  # "fast" is exact for photon counting


def test_groups_of_ten_bins_keep_the_mean_and_nearly_the_variance():
    e, lam, s = spectrum_bins()
    lam_g, s_g = grouped(lam, 10), grouped(s, 10)
    assert lam_g.numel() == 9
    exact_counts, exact_energy = flat_field(lam, s, h=1, w=1)
    group_counts, group_energy = flat_field(lam_g, s_g)
    noise = Noise("compound")
    torch.testing.assert_close(noise.expected(group_counts, group_energy)[0, 0, 0, 0], s.sum())
    exact_var = noise.variance(exact_counts, exact_energy).item()
    group_var = noise.variance(group_counts, group_energy)[0, 0, 0, 0].item()
    # Measured: grouping into 10 keV groups lowers the variance by 0.300% (the spread of energies inside each group is
    # dropped); 5 keV groups: 0.074%, 2 keV groups: 0.009%, 20 keV groups: 1.13%.
    assert group_var < exact_var
    assert abs(group_var / exact_var - 1) < 0.005
    assert_moments(noise(group_counts, group_energy, gen(6)), float(s.sum()), exact_var)


@pytest.mark.parametrize(("sigma", "electronic"), [(1.0, 0.0), (0.5, 0.0), (1.0, 3.0)])
def test_blur_scales_the_variance_by_the_squared_kernel_weights(sigma, electronic):
    kornia_filters = pytest.importorskip("kornia.filters")
    _, lam, s = spectrum_bins()
    lam_g, s_g = grouped(lam, 10), grouped(s, 10)
    counts, energy = flat_field(lam_g, s_g, batch=16)
    photon_energy = float(s.sum() / lam.sum())
    unblurred = Noise("compound").variance(counts[:1, :, :, :1, :1], energy[:1, :, :, :1, :1]).item()
    radius = math.ceil(3 * sigma)
    size = 2 * radius + 1
    kernel = kornia_filters.get_gaussian_kernel2d((size, size), (sigma, sigma), dtype=torch.float64)
    assert kernel.sum().item() == pytest.approx(1.0)
    var = unblurred * float((kernel**2).sum()) + (electronic * photon_energy) ** 2
    out = Noise("compound", electronic_std_photons=electronic, blur_sigma_px=sigma)(
        counts, energy, gen(7), photon_energy_keV=photon_energy
    )
    assert out.shape == (16, 1, H, W)
    # Pixels `size` apart share no input pixel, so they are independent; skip the reflected borders.
    samples = out[:, :, radius : H - radius : size, radius : W - radius : size]
    assert_moments(samples, float(s.sum()), var)


def test_blur_is_applied_to_the_quantum_noise_before_the_electronic_noise():
    kornia_filters = pytest.importorskip("kornia.filters")
    counts, energy = _small_inputs()
    counts, energy = counts.repeat(1, 1, 1, 2, 2), energy.repeat(1, 1, 1, 2, 2)  # [2, 2, 3, 12, 14]
    for method in NOISE_METHODS:
        quantum = Noise(method)(counts, energy, gen(8))
        blurred = Noise(method, blur_sigma_px=1.2)(counts, energy, gen(8))  # same seed: same quantum draws
        reference = kornia_filters.gaussian_blur2d(quantum, (9, 9), (1.2, 1.2), border_type="reflect")
        torch.testing.assert_close(blurred, reference, rtol=1e-12, atol=1e-9)
        noise = Noise(method, electronic_std_photons=2.0, blur_sigma_px=1.2)
        electronic = noise(counts, energy, gen(8), photon_energy_keV=50.0) - blurred  # drawn after the quantum noise
        assert_moments(electronic, 0.0, (2.0 * 50.0) ** 2)
        # Not blurred: neighbours are uncorrelated (SE of the lag-1 correlation ~0.04; blurred noise would give
        # exp(-1 / (4 sigma^2)) = 0.84).
        lag1 = (electronic[..., 1:] * electronic[..., :-1]).mean() / electronic.var()
        assert abs(lag1.item()) < 0.2


# --------------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------------
def _small_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(10)
    counts = 1.0 + 9.0 * torch.rand(2, 2, 3, 6, 7, generator=g, dtype=dtype)
    energy = counts * (20.0 + 60.0 * torch.rand(2, 2, 3, 6, 7, generator=g, dtype=dtype))
    return counts, energy


@pytest.mark.parametrize(("electronic", "blur"), [(0.0, 0.0), (2.0, 0.7)])
def test_gaussian_gradcheck(electronic, blur):
    counts, energy = _small_inputs()
    counts, energy = counts[:1, :1, :2, :5].contiguous(), energy[:1, :1, :2, :5].contiguous()  # keep gradcheck fast
    noise = Noise("gaussian", electronic_std_photons=electronic, blur_sigma_px=blur)

    def integrating(c, s):
        return noise(c, s, gen(11), photon_energy_keV=50.0)

    def counting(c):
        return noise(c, generator=gen(11))

    assert torch.autograd.gradcheck(integrating, (counts.requires_grad_(), energy.requires_grad_()))
    assert torch.autograd.gradcheck(counting, (counts.detach().requires_grad_(),))


def test_gaussian_gradients_are_finite_where_the_variance_is_zero():
    counts, energy = _small_inputs()
    counts[0, 0] = 0.0  # every group empty in these pixels: variance 0
    energy[0, 0] = 0.0
    counts[1, 1, 0] = 0.0  # one empty group next to full ones
    counts.requires_grad_()
    energy.requires_grad_()
    out = Noise("gaussian")(counts, energy, gen(12))
    out.sum().backward()
    assert torch.isfinite(counts.grad).all() and torch.isfinite(energy.grad).all()
    assert (energy.grad[1, 0] != 0).any()  # the gradient really flows


@pytest.mark.parametrize("method", ["compound", "fast"])
def test_poisson_methods_carry_no_gradient(method):
    counts, energy = _small_inputs()
    counts.requires_grad_()
    out = Noise(method, electronic_std_photons=1.0)(counts, energy, gen(13), photon_energy_keV=50.0)
    assert not out.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", NOISE_METHODS)
def test_same_seed_same_output(device, method):
    counts, energy = _small_inputs(torch.float32)
    counts, energy = counts.to(device), energy.to(device)
    noise = Noise(method, electronic_std_photons=2.0, blur_sigma_px=0.5)
    a = noise(counts, energy, gen(20, device), photon_energy_keV=50.0)
    b = noise(counts, energy, gen(20, device), photon_energy_keV=50.0)
    c = noise(counts, energy, gen(21, device), photon_energy_keV=50.0)
    assert a.dtype == torch.float32 and a.device == counts.device and a.shape == (2, 2, 6, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    pc = noise(counts, generator=gen(20, device))
    assert torch.equal(pc, noise(counts, generator=gen(20, device)))
    assert not torch.equal(pc, noise(counts, generator=gen(21, device)))


def test_default_generator_works():
    counts, energy = _small_inputs(torch.float32)
    out = Noise()(counts, energy)
    assert out.shape == (2, 2, 6, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------------
def test_presets():
    assert NOISE_PRESETS["radiography"] == NoisePreset(1000.0, 2.0, 0.5, "compound")
    assert NOISE_PRESETS["fluoroscopy"] == NoisePreset(30.0, 2.0, 0.5, "compound")
    for name, preset in NOISE_PRESETS.items():
        noise = Noise.from_preset(name)
        assert noise.method == preset.method
        assert noise.electronic_std_photons == preset.electronic_std_photons
        assert noise.blur_sigma_px == preset.blur_sigma_px
    with pytest.raises(ValueError, match=r"unknown noise preset name 'ct'; valid names: \['fluoroscopy', 'radio"):
        Noise.from_preset("ct")
    with pytest.raises(AttributeError):
        NOISE_PRESETS["radiography"].blur_sigma_px = 1.0  # frozen


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def test_constructor_validation():
    with pytest.raises(ValueError, match=r"unknown noise method 'exact'; valid methods: \['compound', 'fast', 'gau"):
        Noise("exact")
    with pytest.raises(ValueError, match=r"electronic_std_photons must be finite and >= 0, got -1"):
        Noise(electronic_std_photons=-1.0)
    with pytest.raises(ValueError, match=r"electronic_std_photons must be finite and >= 0, got nan"):
        Noise(electronic_std_photons=float("nan"))
    with pytest.raises(ValueError, match=r"blur_sigma_px must be finite and >= 0, got -0.5"):
        Noise(blur_sigma_px=-0.5)
    with pytest.raises(TypeError, match=r"blur_sigma_px must be a real number, got str"):
        Noise(blur_sigma_px="wide")


@pytest.mark.parametrize("method", NOISE_METHODS)
def test_input_validation(method):
    noise = Noise(method)
    counts, energy = _small_inputs()
    bad = counts.clone()
    bad[0, 0, 0, 0, :2] = torch.tensor([-3.5, -1.0])
    with pytest.raises(ValueError, match=r"counts must be >= 0: 2 of 504 values are negative \(most negative -3.5\)"):
        noise(bad, energy)
    with pytest.raises(ValueError, match=r"energy \(keV\) must be >= 0: 1 of 504 values are negative"):
        noise(counts, -energy.clamp(max=1.0) * (energy == energy.max()))
    bad = counts.clone()
    bad[0, 0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with pytest.raises(ValueError, match=r"counts must be finite: 3 of 504 values are NaN or Inf \(1 NaN\)"):
        noise(bad, energy)
    with pytest.raises(ValueError, match=r"counts must be finite"):
        noise.expected(bad)
    with pytest.raises(ValueError, match=r"counts must be finite"):
        noise.variance(bad)
    bad = energy.clone()
    bad[1, 1, 2, 5, 6] = float("inf")
    with pytest.raises(ValueError, match=r"energy \(keV\) must be finite: 1 of 504 values"):
        noise(counts, bad)
    with pytest.raises(ValueError, match=r"counts must have shape \[B, K, G, H, W\] \(5 dims\), got \(2, 3, 6, 7\)"):
        noise(counts[0])
    with pytest.raises(ValueError, match=r"energy must have the shape of counts \(2, 2, 3, 6, 7\), got \(2, 2, 2"):
        noise(counts, energy[:, :, :2])
    with pytest.raises(TypeError, match=r"counts must be float32 or float64, got torch.int64"):
        noise(counts.long())
    with pytest.raises(TypeError, match=r"energy must have the dtype of counts \(torch.float64\), got torch.float32"):
        noise(counts, energy.float())
    with pytest.raises(TypeError, match=r"counts must be a torch.Tensor, got list"):
        noise([1.0, 2.0])
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        noise(counts, energy, 0)


def test_generator_on_another_device():
    counts = torch.ones(1, 1, 1, 4, 4, device="meta")  # a second device without needing a GPU
    with pytest.raises(ValueError, match=r"generator must be on the device of counts \(meta\), got a generator on cpu"):
        Noise()(counts, generator=gen(0))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
def test_cpu_generator_with_cuda_counts():
    counts = torch.ones(1, 1, 1, 4, 4, device="cuda")
    with pytest.raises(ValueError, match=r"device of counts \(cuda:0\), got a generator on cpu"):
        Noise()(counts, generator=gen(0))


def test_photon_energy_validation():
    counts, energy = _small_inputs()
    noise = Noise(electronic_std_photons=2.0)
    with pytest.raises(ValueError, match=r"photon_energy_keV \(the mean detected photon energy .* got None"):
        noise(counts, energy)
    with pytest.raises(ValueError, match=r"photon_energy_keV .* is required"):
        noise.variance(counts, energy)
    with pytest.raises(ValueError, match=r"photon_energy_keV must be finite and > 0 keV, got 0.0"):
        noise(counts, energy, photon_energy_keV=0.0)
    with pytest.raises(ValueError, match=r"photon_energy_keV must be a float or a 0-d tensor, got shape \(2,\)"):
        noise(counts, energy, photon_energy_keV=torch.tensor([50.0, 60.0]))
    # Not needed without electronic noise, nor for photon counting.
    assert Noise()(counts, energy).shape == (2, 2, 6, 7)
    assert noise(counts).shape == (2, 2, 6, 7)
    torch.testing.assert_close(noise.variance(counts), counts.sum(dim=2) + 4.0)


def test_blur_wider_than_the_image():
    counts, energy = _small_inputs()
    with pytest.raises(ValueError, match=r"blur_sigma_px=2 needs a kernel radius of 6 px.*got H, W = \(6, 7\)"):
        Noise(blur_sigma_px=2.0)(counts, energy)


# --------------------------------------------------------------------------------------------------------------------
# Many images, each from its own seed (training data)
# --------------------------------------------------------------------------------------------------------------------
SAMPLE_EACH_CASES = [
    ("compound", True, 2.0, 0.7),
    ("fast", True, 2.0, 0.0),
    ("gaussian", True, 0.0, 0.7),
    ("compound", False, 1.5, 0.5),  # photon counting
]


@pytest.mark.parametrize(("method", "integrating", "electronic", "blur"), SAMPLE_EACH_CASES)
def test_sample_each_does_not_depend_on_the_batch_and_matches_forward(device, method, integrating, electronic, blur):
    """Image i is bit-identical alone or in any batch, and equals forward() with a generator seeded seeds[i]."""
    generator = torch.Generator().manual_seed(5)
    counts = (200 * torch.rand(5, 2, 3, 12, 14, generator=generator, dtype=torch.float64)).to(device)
    counts[1, :, 0] = 0  # an empty group
    energy = counts * torch.linspace(30, 70, 3, dtype=torch.float64, device=device).view(1, 1, 3, 1, 1)
    energy = energy if integrating else None
    photon_energy = torch.tensor([40.0, 50, 45, 60, 55], dtype=torch.float64, device=device)
    seeds = [11, 12, 13, 14, 15]
    noise = Noise(method, electronic_std_photons=electronic, blur_sigma_px=blur)
    batch = noise.sample_each(counts, energy, seeds, photon_energy if integrating else None)
    assert batch.shape == (5, 2, 12, 14)
    for i in (0, 1, 4):
        pick = [i]
        alone = noise.sample_each(counts[pick], None if energy is None else energy[pick], [seeds[i]],
                                  photon_energy[pick] if integrating else None)  # fmt: skip
        assert torch.equal(alone[0], batch[i])
        reference = noise(counts[pick], None if energy is None else energy[pick],
                          generator=torch.Generator(device=device).manual_seed(seeds[i]),
                          photon_energy_keV=photon_energy[i] if integrating else None)  # fmt: skip
        torch.testing.assert_close(batch[i], reference[0], rtol=1e-12, atol=1e-9)
    # Different seeds give different images (the draws really come from each image's own stream).
    assert not torch.equal(batch[0], noise.sample_each(counts[:1], None if energy is None else energy[:1], [99],
                                                       photon_energy[:1] if integrating else None)[0])  # fmt: skip


def test_sample_each_needs_one_seed_per_image():
    with pytest.raises(ValueError, match=r"one seed per image \(2\), got 1"):
        Noise().sample_each(torch.ones(2, 1, 1, 4, 4), torch.ones(2, 1, 1, 4, 4), [3], torch.ones(2))

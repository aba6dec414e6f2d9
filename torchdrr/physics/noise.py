"""Detector noise: compound-Poisson quantum noise, scintillator blur and Gaussian electronic noise.

Photons reach a detector pixel as independent Poisson counts per energy bin. An energy-integrating detector records
the deposited energy sum_E E * N_E (keV) -- a compound Poisson variable with mean sum_E E * lambda_E and variance
sum_E E^2 * lambda_E; a photon-counting detector records the counts sum_E N_E, which are exactly Poisson.

The caller groups the energy bins into G groups (one group per 1 keV bin is exact) and passes, per image, detector
channel, group and pixel, the expected photon count ``counts`` = lambda_g and the expected deposited energy
``energy`` = S_g = sum over the group's bins of E * lambda_E (keV). Each group is treated as mono-energetic at its mean
energy Ebar_g = S_g / lambda_g (0 where lambda_g = 0), which neglects the spread of energies inside a group (for
10 keV groups of a 90 kVp spectrum the variance is about 0.3% low; see tests/test_noise.py).

The noisy signal is built in this order: quantum noise (``method``), then the optional Gaussian blur of the
scintillator's light spread (``blur_sigma_px``), then additive Gaussian electronic noise (``electronic_std_photons``).
Every random number comes from the optional ``torch.Generator``; the same seed gives bit-identical output on the same
device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batch_invariant import ordered_sum

__all__ = ["NOISE_METHODS", "NOISE_PRESETS", "Noise", "NoisePreset"]

NOISE_METHODS = ("compound", "fast", "gaussian")


@dataclass(frozen=True)
class NoisePreset:
    """Exposure and detector-noise settings of one imaging mode.

    Attributes:
        photons_behind_patient: Exposure target (detected photons per pixel behind the patient) that the DRR's
            automatic exposure scales the flat field to. Not used by :class:`Noise` itself.
        electronic_std_photons: Standard deviation of the additive electronic noise, in photon equivalents.
        blur_sigma_px: Standard deviation (pixels) of the Gaussian light spread of the scintillator; 0 = off.
        method: Quantum-noise method, one of :data:`NOISE_METHODS`.
    """

    photons_behind_patient: float
    electronic_std_photons: float
    blur_sigma_px: float
    method: str = "compound"


#: Imaging modes. ``photons_behind_patient`` follows the design doc: about 10^3 detected photons per pixel behind the
#: patient for radiography and about 30 for (low-dose, per-frame) fluoroscopy. The electronic noise (2 photon
#: equivalents rms) and blur (0.5 px) are typical flat-panel magnitudes, *not* calibrated to any particular device.
NOISE_PRESETS: dict[str, NoisePreset] = {
    "radiography": NoisePreset(1000.0, 2.0, 0.5),
    "fluoroscopy": NoisePreset(30.0, 2.0, 0.5),
}


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def _check_nonnegative_float(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def _check_method(method: str) -> str:
    if method not in NOISE_METHODS:
        raise ValueError(f"unknown noise method {method!r}; valid methods: {list(NOISE_METHODS)}")
    return method


def _check_values(x: Tensor, name: str) -> None:
    """``x`` must be finite and >= 0 (reports how many entries are bad, and the most negative value)."""
    x = x.detach()
    n_bad = int((~torch.isfinite(x)).sum())
    if n_bad:
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(f"{name} must be finite: {n_bad} of {x.numel()} values are NaN or Inf ({n_nan} NaN)")
    negative = x < 0
    n_neg = int(negative.sum())
    if n_neg:
        raise ValueError(
            f"{name} must be >= 0: {n_neg} of {x.numel()} values are negative (most negative {float(x.min()):.6g})"
        )


def _check_inputs(counts: Tensor, energy: Tensor | None, generator: torch.Generator | None = None) -> None:
    if not isinstance(counts, Tensor):
        raise TypeError(f"counts must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"counts must be float32 or float64, got {counts.dtype}")
    if counts.dim() != 5:
        raise ValueError(f"counts must have shape [B, K, G, H, W] (5 dims), got {tuple(counts.shape)}")
    if energy is not None:
        if not isinstance(energy, Tensor):
            raise TypeError(f"energy must be a torch.Tensor or None, got {type(energy).__name__}")
        if energy.shape != counts.shape:
            raise ValueError(f"energy must have the shape of counts {tuple(counts.shape)}, got {tuple(energy.shape)}")
        if energy.dtype != counts.dtype:
            raise TypeError(f"energy must have the dtype of counts ({counts.dtype}), got {energy.dtype}")
        if energy.device != counts.device:
            raise ValueError(f"energy must be on the device of counts ({counts.device}), got {energy.device}")
    check_generator(generator, counts.device)
    _check_values(counts, "counts")
    if energy is not None:
        _check_values(energy, "energy (keV)")


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Raises unless ``generator`` is None or a ``torch.Generator`` on ``device`` ("cuda" matches "cuda:0")."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        gen_device = torch.device(generator.device)
        if gen_device.type != device.type or (
            gen_device.index is not None and device.index is not None and gen_device.index != device.index
        ):
            raise ValueError(f"generator must be on the device of counts ({device}), got a generator on {gen_device}")


def _photon_energy(photon_energy_keV: float | Tensor | None, like: Tensor) -> Tensor:
    """``photon_energy_keV`` as a 0-d tensor with the dtype and device of ``like`` (finite, > 0)."""
    if photon_energy_keV is None:
        raise ValueError(
            "photon_energy_keV (the mean detected photon energy of the flat field, keV) is required for electronic "
            "noise on an energy-integrating detector (electronic_std_photons > 0 and energy given), got None"
        )
    if not isinstance(photon_energy_keV, Tensor):  # a number: checked without touching the device
        value = float(photon_energy_keV)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"photon_energy_keV must be finite and > 0 keV, got {value!r}")
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    e = torch.as_tensor(photon_energy_keV).to(device=like.device, dtype=like.dtype)
    if e.dim() != 0:
        raise ValueError(f"photon_energy_keV must be a float or a 0-d tensor, got shape {tuple(e.shape)}")
    value = float(e.detach())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"photon_energy_keV must be finite and > 0 keV, got {value!r}")
    return e


# --------------------------------------------------------------------------------------------------------------------
# Noise module
# --------------------------------------------------------------------------------------------------------------------
class Noise(nn.Module):
    """Detector noise for a stack of expected photon counts (and deposited energies) per energy group.

    Methods (``method``):

    * ``"compound"`` (default): signal = sum_g Ebar_g * Poisson(lambda_g). Mean sum_g S_g, variance
      sum_g S_g^2 / lambda_g (= sum_E E^2 lambda_E exactly when each group is one energy bin).
    * ``"fast"`` (approximation): one Poisson draw of the total count, Poisson(Lambda) with Lambda = sum_g lambda_g,
      times the mean energy Ebar = sum_g S_g / Lambda. The mean is exact but the variance is Ebar^2 * Lambda, which
      *underestimates* the compound variance by the spread of the photon energies (sum E^2 lambda >= Ebar^2 Lambda;
      about 9% low for the 90 kVp preset). One Poisson draw per pixel instead of G.
    * ``"gaussian"`` (differentiable): signal = mean + sqrt(var) * eps, eps ~ N(0, 1), with the compound mean and
      variance. Reparameterised, so gradients flow to ``counts`` and ``energy`` (the square root is guarded: no NaN
      gradient where the variance is 0). Values can be negative where the counts are small.

    Poisson sampling is not differentiable: ``"compound"`` and ``"fast"`` return a tensor without gradient (computed
    under ``torch.no_grad``); use ``"gaussian"`` to optimise through the noise.

    With ``energy=None`` the detector counts photons: the counts of a detector channel (summed over its G groups) are
    exactly Poisson(sum_g lambda_g), so ``"fast"`` equals ``"compound"`` (same draws), and ``"gaussian"`` is
    Lambda + sqrt(Lambda) * eps.

    ``blur_sigma_px`` > 0 blurs the quantum-noisy image of each image and channel with a Gaussian of that standard
    deviation (pixels; kernel size 2 * ceil(3 sigma) + 1, reflected borders; needs kornia) before the electronic
    noise, which is Gaussian with standard deviation ``electronic_std_photons`` * ``photon_energy_keV`` (keV) for an
    energy-integrating detector or ``electronic_std_photons`` (counts) for photon counting.

    Args:
        method: One of :data:`NOISE_METHODS`.
        electronic_std_photons: Electronic noise standard deviation in photon equivalents (>= 0; 0 = off).
        blur_sigma_px: Scintillator blur standard deviation in pixels (>= 0; 0 = off).
    """

    def __init__(self, method: str = "compound", electronic_std_photons: float = 0.0, blur_sigma_px: float = 0.0):
        super().__init__()
        self.method = _check_method(method)
        self.electronic_std_photons = _check_nonnegative_float(electronic_std_photons, "electronic_std_photons")
        self.blur_sigma_px = _check_nonnegative_float(blur_sigma_px, "blur_sigma_px")

    @classmethod
    def from_preset(cls, name: str) -> Noise:
        """The noise of a :data:`NOISE_PRESETS` imaging mode ("radiography" or "fluoroscopy")."""
        if name not in NOISE_PRESETS:
            raise ValueError(f"unknown noise preset name {name!r}; valid names: {sorted(NOISE_PRESETS)}")
        p = NOISE_PRESETS[name]
        return cls(method=p.method, electronic_std_photons=p.electronic_std_photons, blur_sigma_px=p.blur_sigma_px)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, electronic_std_photons={self.electronic_std_photons:g}, "
            f"blur_sigma_px={self.blur_sigma_px:g}"
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Moments
    # ---------------------------------------------------------------------------------------------------------------
    def expected(self, counts: Tensor, energy: Tensor | None = None) -> Tensor:
        """[B, K, H, W] mean signal without blur: sum_g S_g (keV), or sum_g lambda_g (counts) if ``energy`` is None.

        Energy in groups with zero expected count is ignored (such a group deposits nothing).
        """
        _check_inputs(counts, energy)
        return _mean(counts, energy)

    def variance(
        self, counts: Tensor, energy: Tensor | None = None, photon_energy_keV: float | Tensor | None = None
    ) -> Tensor:
        """[B, K, H, W] model variance of ``method`` without blur, electronic noise included (keV^2 or counts^2).

        compound / gaussian: sum_g S_g^2 / lambda_g; fast: (sum_g S_g)^2 / sum_g lambda_g; photon counting (``energy``
        None): sum_g lambda_g; plus ``electronic_std_photons``^2 (times ``photon_energy_keV``^2 if ``energy`` given).
        """
        _check_inputs(counts, energy)
        var = _quantum_variance(counts, energy, self.method)
        std = self._electronic_std(counts, energy, photon_energy_keV)
        return var if std is None else var + std**2

    def _electronic_std(
        self, counts: Tensor, energy: Tensor | None, photon_energy_keV: float | Tensor | None, validate: bool = True
    ) -> Tensor | float | None:
        if self.electronic_std_photons == 0:
            return None
        if energy is None:
            return self.electronic_std_photons
        if not validate and photon_energy_keV is not None:  # trusted caller: no host round trip for the check
            return self.electronic_std_photons * photon_energy_keV
        return self.electronic_std_photons * _photon_energy(photon_energy_keV, counts)

    # ---------------------------------------------------------------------------------------------------------------
    # Sampling
    # ---------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        counts: Tensor,
        energy: Tensor | None = None,
        generator: torch.Generator | None = None,
        photon_energy_keV: float | Tensor | None = None,
        validate: bool = True,
    ) -> Tensor:
        """Sample a noisy detector image.

        Args:
            counts: [B, K, G, H, W] expected photon counts per energy group (float32/float64, finite, >= 0).
            energy: [B, K, G, H, W] expected deposited energy per group (keV, finite, >= 0, same dtype and device), or
                None for a photon-counting detector.
            generator: Source of every random number; must be on the device of ``counts``.
            photon_energy_keV: Mean detected photon energy of the flat field (keV, float or 0-d tensor); converts the
                electronic noise from photon equivalents to keV. Required when ``electronic_std_photons`` > 0 and
                ``energy`` is given; ignored otherwise.
            validate: scan ``counts`` and ``energy`` for negative, NaN and Inf values (a device sync). ``DRR`` passes
                False: its expectations are exponentials of finite log-values, non-negative by construction.

        Returns:
            [B, K, H, W] noisy signal (keV for energy-integrating, counts for photon counting), dtype and device of
            ``counts``. Differentiable only for ``method="gaussian"``.
        """
        if validate:
            _check_inputs(counts, energy, generator)
        electronic_std = self._electronic_std(counts, energy, photon_energy_keV, validate)
        if self.blur_sigma_px > 0:
            _check_blur_size(self.blur_sigma_px, counts.shape[-2:])
        if self.method == "gaussian":
            signal = _sample_gaussian(counts, energy, generator)
            return self._finish(signal, electronic_std, generator)
        with torch.no_grad():
            signal = _sample_poisson(counts, energy, self.method, generator)
            return self._finish(signal, electronic_std, generator)

    def sample_each(
        self, counts: Tensor, energy: Tensor | None, seeds: Sequence[int], photon_energy_keV: Tensor | None = None
    ) -> Tensor:
        """Noisy images of B independent samples, image ``i`` drawn from a generator seeded with ``seeds[i]``.

        Image ``i`` comes out bit-identical whatever the other images of the batch (training data must not depend
        on how samples were batched): only the random draws run per image (a quantum draw, then the electronic
        draw, from that image's own stream); the arithmetic runs once for the batch, with sums in a fixed order
        (``batch_invariant``). The values match ``forward`` on that image alone with
        ``torch.Generator(device).manual_seed(seeds[i])`` up to the order of the sum over groups (float rounding).
        Inputs are not validated (the ``DRR`` module's are valid by construction).

        Args:
            counts, energy: ``[B, K, G, H, W]`` as in ``forward``.
            seeds: B integer seeds.
            photon_energy_keV: ``[B]`` mean detected photon energy of each image's flat field (keV); needed for
                electronic noise on an energy-integrating detector.

        Returns:
            ``[B, K, H, W]`` noisy signal.
        """
        b = counts.shape[0]
        if len(seeds) != b:
            raise ValueError(f"seeds must hold one seed per image ({b}), got {len(seeds)}")
        if self.blur_sigma_px > 0:
            _check_blur_size(self.blur_sigma_px, counts.shape[-2:])
        compound = energy is not None and self.method != "fast"
        gaussian = self.method == "gaussian"
        electronic = self.electronic_std_photons > 0
        if energy is not None and electronic and photon_energy_keV is None:
            raise ValueError("photon_energy_keV [B] is required for electronic noise on an energy-integrating detector")
        total = None if (compound and not gaussian) else ordered_sum(counts, 2)  # [B, K, H, W]
        draw_like = counts if (compound and not gaussian) else total
        quantum = torch.empty_like(draw_like)
        eps = torch.empty(counts.shape[:2] + counts.shape[3:], dtype=counts.dtype, device=counts.device)
        generator = torch.Generator(device=counts.device)
        with torch.no_grad():
            for i, seed in enumerate(seeds):  # the only per-image work: the draws, in forward's order
                generator.manual_seed(int(seed))
                if gaussian:
                    quantum[i].normal_(generator=generator)
                else:
                    quantum[i] = torch.poisson(draw_like[i], generator=generator)
                if electronic:
                    eps[i].normal_(generator=generator)
        if gaussian:
            mean = total if energy is None else ordered_sum(_masked_energy(counts, energy), 2)
            var = total if energy is None else ordered_sum(_safe_divide(energy**2, counts), 2)
            positive = var > 0
            std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), 0.0)
            signal = mean + std * quantum
        elif energy is None:
            signal = quantum
        elif compound:
            mean_energy = torch.div(energy, counts).masked_fill_(counts <= 0, 0.0)
            signal = ordered_sum(quantum.mul_(mean_energy), 2)
        else:  # fast: one draw of the total count times the mean energy
            signal = quantum.mul_(_safe_divide(ordered_sum(_masked_energy(counts, energy), 2), total))
        if self.blur_sigma_px > 0:
            signal = _blur(signal, self.blur_sigma_px)
        if electronic:
            std = self.electronic_std_photons
            if energy is not None:
                std = photon_energy_keV.to(counts.dtype).view(b, 1, 1, 1) * std
            signal = signal + std * eps
        return signal

    def _finish(
        self, signal: Tensor, electronic_std: Tensor | float | None, generator: torch.Generator | None
    ) -> Tensor:
        if self.blur_sigma_px > 0:
            signal = _blur(signal, self.blur_sigma_px)
        if electronic_std is not None:
            eps = torch.randn(signal.shape, generator=generator, dtype=signal.dtype, device=signal.device)
            signal = signal + electronic_std * eps
        return signal


# --------------------------------------------------------------------------------------------------------------------
# Kernels (pure PyTorch)
# --------------------------------------------------------------------------------------------------------------------
def _masked_energy(counts: Tensor, energy: Tensor) -> Tensor:
    """S_g where lambda_g > 0, else 0."""
    return torch.where(counts > 0, energy, torch.zeros_like(energy))


def _mean(counts: Tensor, energy: Tensor | None) -> Tensor:
    if energy is None:
        return counts.sum(dim=2)
    return _masked_energy(counts, energy).sum(dim=2)


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0, with finite gradients everywhere."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def _quantum_variance(counts: Tensor, energy: Tensor | None, method: str) -> Tensor:
    if energy is None:
        return counts.sum(dim=2)
    if method == "fast":
        total = counts.sum(dim=2)
        return _safe_divide(_masked_energy(counts, energy).sum(dim=2) ** 2, total)
    return _safe_divide(energy**2, counts).sum(dim=2)  # compound and gaussian


def _sample_poisson(counts: Tensor, energy: Tensor | None, method: str, generator: torch.Generator | None) -> Tensor:
    if energy is None or method == "fast":
        total = counts.sum(dim=2)
        n = torch.poisson(total, generator=generator)
        if energy is None:
            return n
        return n.mul_(_safe_divide(_masked_energy(counts, energy).sum(dim=2), total))
    # compound: one Poisson draw per group, weighted by the group's mean energy (in place to bound the memory; no
    # gradient here, so the division needs no guard beyond masking the empty groups).
    n = torch.poisson(counts, generator=generator)
    mean_energy = torch.div(energy, counts).masked_fill_(counts <= 0, 0.0)
    return n.mul_(mean_energy).sum(dim=2)


def _sample_gaussian(counts: Tensor, energy: Tensor | None, generator: torch.Generator | None) -> Tensor:
    mean = _mean(counts, energy)
    var = _quantum_variance(counts, energy, "gaussian")
    positive = var > 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + std * eps


def _blur_radius(sigma: float) -> int:
    return math.ceil(3.0 * sigma)


def _check_blur_size(sigma: float, hw: torch.Size) -> None:
    radius = _blur_radius(sigma)
    if radius >= min(hw):
        raise ValueError(
            f"blur_sigma_px={sigma:g} needs a kernel radius of {radius} px, which reflected borders allow only for "
            f"images larger than {radius} px in both H and W; got H, W = {tuple(hw)}"
        )


@functools.lru_cache(maxsize=16)
def _blur_taps(sigma: float) -> tuple[float, ...]:
    """The normalised 1-D Gaussian (kornia's, size 2 ceil(3 sigma) + 1) as Python floats."""
    try:
        from kornia.filters import get_gaussian_kernel1d
    except ImportError as exc:  # kornia is optional: only the detector blur needs it
        raise ImportError("Noise(blur_sigma_px > 0) needs kornia: pip install kornia") from exc
    size = 2 * _blur_radius(sigma) + 1
    return tuple(get_gaussian_kernel1d(size, sigma, dtype=torch.float64).reshape(-1).tolist())


def _blur(image: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of each [H, W] image of a [B, K, H, W] tensor (kernel 2 ceil(3 sigma) + 1, reflected borders).

    Equal to ``kornia.filters.gaussian_blur2d(image, (size, size), (sigma, sigma), border_type="reflect")`` (tested),
    computed as two 1-D passes of shifted, weighted copies added in a fixed order. Why not a convolution: the
    algorithm a GPU convolution picks (and so its rounding) may change with the batch size, and an image must not
    depend on its batch (see ``batch_invariant``); the detector's blur is a few pixels wide, so the passes are cheap.
    Why not kornia's function: it rebuilds the kernel from a host tensor on every call (1.5 ms per 1240 x 960 image
    on an H100, about a quarter of a whole render).
    """
    taps = _blur_taps(float(sigma))
    radius = len(taps) // 2
    b, k, h, w = image.shape
    x = torch.nn.functional.pad(image.reshape(b * k, 1, h, w), (radius, radius, radius, radius), mode="reflect")
    rows = x[..., 0:w] * taps[0]  # along each row: [B K, 1, H + 2r, W]
    for j in range(1, len(taps)):
        rows.add_(x[..., j : j + w], alpha=taps[j])
    out = rows[..., 0:h, :] * taps[0]  # then along each column: [B K, 1, H, W]
    for j in range(1, len(taps)):
        out.add_(rows[..., j : j + h, :], alpha=taps[j])
    return out.reshape(b, k, h, w)

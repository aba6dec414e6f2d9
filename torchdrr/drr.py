"""The ``DRR`` module: CT -> materials -> ray casting -> polychromatic attenuation -> detector -> scatter -> noise.

This is the calibrated X-ray of design.md §4 in one differentiable ``nn.Module``:

1. The CT (HU) is split into per-material density channels by a segmentation module (DeepDRR's thresholds by
   default), laid out channels-last so the ray caster reads a voxel's channels in one load.
2. One ``raycast`` call integrates every channel along every ray: mass thicknesses ``A_m`` in g/cm^2.
3. ``log_weighted_transmission`` attenuates the spectrum per energy bin, ``T(E) = exp(-sum_m mu/rho_m(E) A_m)``,
   and sums it against the detector response in log space (no underflow behind thick bone or metal).
4. The detector turns photons into a signal (deposited energy or counts per bin), with the exposure ``N0`` (photons
   per pixel in the flat field) fixed or set per image by automatic exposure control.
5. An optional scatter module adds scatter; an optional noise module draws quantum and electronic noise.

Gradients reach the pose and intrinsics (through the camera), the volume (if it is an ``nn.Parameter``), learnable
segmentation thresholds and the spectrum weights (``learn_spectrum=True``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .geometry import Camera
from .io import Volume, volume_center
from .learned.scatter import ScatterCNN, check_training_range, spectrum_scalars
from .memory import AUTO_BUDGET_FRACTION, RenderPlan, available_bytes, plan_chunks
from .ops import camera_raycast, log_weighted_transmission, raycast, with_contiguous_axis
from .physics.batch_invariant import fixed_point_mean, ordered_mean, ordered_sum
from .physics.density import check_density
from .physics.detector import EnergyIntegratingDetector, PhotonCountingDetector, falloff_factor
from .physics.materials import attenuation_table
from .physics.montecarlo import MonteCarloScatter
from .physics.noise import NOISE_PRESETS, Noise, check_generator
from .physics.segmentation import MaterialChannels, ThresholdSegmentation
from .physics.spectra import spectrum_preset

__all__ = ["DEEPDRR_PHOTONS_PER_PIXEL", "DRR", "OUTPUT_MODES", "display_image"]

#: Every output mode; which ones a detector can produce is in ``DETECTOR_OUTPUTS``.
OUTPUT_MODES = ("intensity", "photons", "flat_field", "line_integral", "display")
#: DeepDRR's ``Projector(photon_count=10000)``: flat-field photons per pixel, our default exposure.
DEEPDRR_PHOTONS_PER_PIXEL = 1.0e4
#: Rays whose summed mass thickness reaches this (g/cm^2, 1 cm of water) see the body, for exposure control.
BODY_MASS_THICKNESS = 1.0


def display_image(line_integral: Tensor, low_percentile: float = 0.5, high_percentile: float = 99.5) -> Tensor:
    """A display image in [0, 1] (bright = attenuating, as on film) of line integrals ``[..., H, W]``.

    Each image is windowed between the given percentiles of its pixels that saw the object (line integral above
    0.01). Not differentiable (a picture, not a measurement).
    """
    images = line_integral.detach()
    flat = images.reshape(-1, images.shape[-2] * images.shape[-1]).to(torch.float32)
    out = torch.zeros_like(flat)
    q = torch.tensor([low_percentile / 100.0, high_percentile / 100.0], device=flat.device)
    for i, image in enumerate(flat):
        seen = image[image > 0.01]
        if seen.numel() == 0:
            continue
        if seen.numel() > 1 << 24:  # torch.quantile's input limit; a strided subsample estimates it well
            seen = seen[:: math.ceil(seen.numel() / (1 << 24))]
        low, high = torch.quantile(seen, q)
        out[i] = ((image - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)
    return out.reshape(images.shape).to(line_integral.dtype)


def _as_spectrum(spectrum: str | float | tuple, energy_bin_keV: int) -> tuple[Tensor, Tensor]:
    if isinstance(spectrum, str):
        return spectrum_preset(spectrum, energy_bin_keV=energy_bin_keV)
    if isinstance(spectrum, (int, float)) and not isinstance(spectrum, bool):
        if not (math.isfinite(spectrum) and spectrum > 0):
            raise ValueError(f"a monoenergetic spectrum needs a positive energy in keV, got {spectrum!r}")
        return torch.tensor([float(spectrum)], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    if isinstance(spectrum, (tuple, list)) and len(spectrum) == 2:
        energy = torch.as_tensor(spectrum[0], dtype=torch.float64).detach().cpu()
        photons = torch.as_tensor(spectrum[1], dtype=torch.float64).detach().cpu()
        if energy.dim() != 1 or energy.numel() == 0 or photons.shape != energy.shape:
            raise ValueError(
                f"spectrum (energy_keV, photons) must be two 1-D tensors of one length, got shapes "
                f"{tuple(energy.shape)} and {tuple(photons.shape)}"
            )
        if not bool(torch.isfinite(energy).all()) or bool((energy <= 0).any()):
            raise ValueError("spectrum energies must be finite and > 0 keV")
        if energy.numel() > 1 and bool((energy[1:] <= energy[:-1]).any()):
            raise ValueError("spectrum energies must be strictly increasing")
        return energy, photons
    raise TypeError(
        f"spectrum must be a preset name, a monoenergetic energy in keV or (energy_keV, photons), got {spectrum!r}"
    )


def _check_photons(photons: Tensor) -> None:
    with torch.no_grad():
        if not bool(torch.isfinite(photons).all()):
            raise ValueError("spectrum photons must be finite")
        if bool((photons < 0).any()):
            raise ValueError(f"spectrum photons must be >= 0 per bin, got minimum {float(photons.min()):g}")
        if not bool(photons.sum() > 0):
            raise ValueError("spectrum photons must not all be zero")


def _check_finite_volume(values: Tensor, name: str) -> None:
    with torch.no_grad():
        bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ValueError(
            f"{name} holds {bad} NaN or Inf voxel{'s' if bad != 1 else ''} of {values.numel()}; fix the data "
            "(e.g. torch.nan_to_num) before rendering"
        )


def _check_budget(budget: int | None) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"memory_budget_bytes must be a positive whole number of bytes or None, got {budget!r}")
    return int(budget)


# Per-ray memory model of ``DRR.memory_plan``, in words of the module's dtype (a word: 4 bytes for float32). Terms
# are the per-energy-group log transmissions (rows x groups); channels (4 or 8) are added where the padded material
# volume's channels are. Measured: see benchmarks/memory.py and benchmarks/RESULTS.md.
TRANSIENT_WORDS_PER_RAY = 14  # ray endpoints and their intermediates, line integrals, per-pixel physics
TRANSIENT_WORDS_PER_TERM = 3  # log terms, the falloff-shifted copy, the noise draw's expected counts
SUPERSAMPLE_WORDS_PER_RAY = 8  # with s > 1: per-sub-ray falloff and the log-mean-exp over each pixel's sub-rays
OUTPUT_COPIES = 2  # the output per pixel and channel, and its last intermediate
SAVED_WORDS_PER_RAY = 12  # with gradients: ray endpoints and integrals autograd saves
SAVED_WORDS_PER_TERM = 2  # with gradients: the log terms autograd saves

#: Renders estimated below this (bytes) skip the automatic budget: asking the device what it can spare costs a driver
#: call per render, and such a render fits any device torchdrr runs on.
AUTO_BUDGET_CHECK_BYTES = 256 * 2**20


def _place(result: Tensor | None, piece: Tensor, shape: tuple[int, ...], images: slice, rows: slice | None) -> Tensor:
    """Writes one chunk of a render into the full result (allocated on the first chunk, in the piece's dtype)."""
    if result is None:
        result = piece.new_empty(shape)
    if rows is None:
        result[images] = piece
    else:
        result[images, :, rows] = piece
    return result


class DRR(nn.Module):
    """A calibrated, differentiable X-ray of a CT.

    Args:
        volume: the CT: a :class:`~torchdrr.io.Volume` or ``[I, J, K]`` tensor of HU (pass an ``nn.Parameter`` to
            optimise it), or precomputed :class:`~torchdrr.physics.MaterialChannels` (densities ``[M, I, J, K]``
            in g/cm^3, e.g. from a label map or a segmentation network).
        affine: ``[4, 4]`` voxel -> world mm; taken from the Volume when ``volume`` is one.
        segmentation: HU -> material channels (default ``ThresholdSegmentation()``: DeepDRR's air / soft tissue /
            bone at -800 and 350 HU). ``SoftThresholdSegmentation`` makes the thresholds learnable.
        materials: how the CT is split into materials: "thresholds" (default: ``segmentation``) or "network": the
            shipped 3D material network (``torchdrr.learned``; air, lung, soft tissue, bone, iodinated contrast,
            titanium), run once here on the CPU; its probabilities become the material channels.
        spectrum: a preset name ("60kVp", "90kVp" default, "120kVp": DeepDRR's), a monoenergetic energy in keV, or
            ``(energy_keV [E], photons [E])``. Photons are relative fluence per bin, normalised internally.
        energy_bin_keV: width of the preset spectra's bins in keV (1 = the tables' resolution).
        learn_spectrum: make the spectrum weights an ``nn.Parameter`` (they must stay >= 0).
        detector: ``EnergyIntegratingDetector()`` (default, ideal, DeepDRR's) or ``PhotonCountingDetector(...)``.
        noise: None (expected values), a preset name ("radiography", "fluoroscopy": noise settings and automatic
            exposure to their photon target) or a :class:`~torchdrr.physics.noise.Noise`.
        photons_per_pixel: fixed exposure N0, photons per pixel in the flat field at the principal point.
        photons_behind_patient: automatic exposure control: per image, N0 is set so that the mean number of
            detected photons per pixel behind the body (rays through at least 1 g/cm^2) is this value.
            Default: the noise preset's target, else a fixed N0 of 10^4 (DeepDRR's photon_count).
        noise_group_keV: compound-Poisson noise of an energy-integrating detector draws one Poisson count per group
            of this many keV (1 = every spectrum bin, exact; 10, the default, changes the noise variance by under
            0.1 % for diagnostic spectra and draws 10x fewer numbers).
        scatter: None (no scatter), "montecarlo" (``MonteCarloScatter()``: Monte Carlo transport through the
            material volume; a ``MonteCarloScatter`` sets its photons, binning and grid), "cnn" (``ScatterCNN()``:
            the shipped scatter network, fast and differentiable; energy-integrating detector, no grid), or a module
            ``scatter(primary=[B, K, H, W], material_integrals=[B, M, H, W] g/cm^2, camera=Camera) -> [B, K, H, W]``.
            The expected scatter signal is added to the primary before noise (its energy mix is taken as the
            primary's).
        output: default output mode (see ``forward``).
        mode: ray integration, "siddon" (exact voxel intersections) or "trilinear".
        step: trilinear step in mm.
        supersample: ``s x s`` rays per pixel; intensities (not line integrals) are averaged.
        dtype: float32 (default, fast) or float64 (gradient checks) for the volume and the rays.
        memory_budget_bytes: the most memory (bytes) one ``forward`` call may allocate beyond the resident volume.
            A render that would need more runs in chunks of images or detector rows (same expected values; noise
            is drawn per chunk) or is refused with ``MemoryBudgetError`` before allocating. Default None: 80 % of
            what the device can spare at the time of the call, checked only for renders estimated above
            ``AUTO_BUDGET_CHECK_BYTES`` (so that small renders never query the device).
        contiguous_axis: the index axis (0 = i, 1 = j, 2 = k) the material volume stores contiguously on CUDA
            (``torchdrr.ops.with_contiguous_axis``; the CPU keeps k, its kernels' best). None (default) keeps k. The
            images do not change, only the speed: for Siddon renders the axis along the rays
            (``torchdrr.ops.ray_axis``) is fastest, j for AP views of a RAS CT (the 4-channel walk 1.19 -> 0.95 ms
            at 1240 x 960 on an H100).
    """

    def __init__(
        self,
        volume: Volume | Tensor | MaterialChannels,
        affine: Tensor | np.ndarray | None = None,
        *,
        segmentation: nn.Module | None = None,
        materials: str = "thresholds",
        spectrum: str | float | tuple[Tensor, Tensor] = "90kVp",
        energy_bin_keV: int = 1,
        learn_spectrum: bool = False,
        detector: EnergyIntegratingDetector | PhotonCountingDetector | None = None,
        noise: Noise | str | None = None,
        photons_per_pixel: float | None = None,
        photons_behind_patient: float | None = None,
        noise_group_keV: int = 10,
        scatter: str | nn.Module | None = None,
        output: str = "line_integral",
        mode: str = "siddon",
        step: float | None = None,
        supersample: int = 1,
        dtype: torch.dtype = torch.float32,
        memory_budget_bytes: int | None = None,
        contiguous_axis: int | None = None,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype

        # --- the volume -------------------------------------------------------------------------------------------
        if materials not in ("thresholds", "network"):
            raise ValueError(f"materials must be 'thresholds' or 'network', got {materials!r}")
        if materials == "network":
            if segmentation is not None or isinstance(volume, MaterialChannels):
                raise ValueError("materials='network' makes the material channels: give a CT, not segmentation= "
                                 "or MaterialChannels")  # fmt: skip
            from .learned.inference import network_material_channels

            ct = volume if isinstance(volume, Volume) else Volume(volume, affine)
            affine = ct.affine
            volume, _ = network_material_channels(ct)
        if isinstance(volume, Volume):
            affine = volume.affine if affine is None else affine
            volume = volume.data
        if affine is None:
            raise ValueError("affine is required when volume is a tensor or MaterialChannels")
        affine = torch.as_tensor(affine).detach()
        if tuple(affine.shape) != (4, 4) or not affine.is_floating_point():
            raise ValueError(f"affine must be a [4, 4] floating-point matrix, got shape {tuple(affine.shape)}")
        # A plain attribute, not a buffer: the op reads it on the host, so it must never move to the GPU.
        self.affine = affine.to("cpu", torch.float64)
        if isinstance(volume, MaterialChannels):
            densities = volume.densities
            if not isinstance(densities, Tensor) or densities.dim() != 4 or densities.shape[0] != len(volume.materials):
                raise ValueError("MaterialChannels.densities must be [M, I, J, K] with one channel per material")
            _check_finite_volume(densities, "the material densities")
            check_density(densities, "MaterialChannels.densities")
            self.materials = tuple(volume.materials)
            self.segmentation = None
            self._register_volume("densities", densities)
            self.hu = None
        else:
            if not isinstance(volume, Tensor) or volume.dim() != 3 or not volume.is_floating_point():
                shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
                raise ValueError(
                    f"volume must be a Volume, an [I, J, K] float tensor of HU or MaterialChannels, got {shape}"
                )
            _check_finite_volume(volume, "the CT volume")
            self.segmentation = segmentation if segmentation is not None else ThresholdSegmentation()
            self.materials = tuple(self.segmentation.materials)
            self._register_volume("hu", volume)
            self.densities = None
        if not 1 <= len(self.materials) <= 8:
            raise ValueError(f"the DRR supports 1 to 8 materials, got {len(self.materials)}")

        # --- the beam and the detector ----------------------------------------------------------------------------
        energy, photons = _as_spectrum(spectrum, energy_bin_keV)
        _check_photons(photons)
        self.register_buffer("energy_keV", energy)
        self._bin_width_keV = float(energy[1] - energy[0]) if energy.numel() > 1 else 1.0
        if learn_spectrum:
            self.spectrum_weights = nn.Parameter(photons.clone())
        else:
            self.register_buffer("spectrum_weights", photons.clone())
        self.register_buffer("mass_attenuation", attenuation_table(self.materials, energy))  # [M, E] cm^2/g
        self.detector = detector if detector is not None else EnergyIntegratingDetector()
        if not isinstance(self.detector, (EnergyIntegratingDetector, PhotonCountingDetector)):
            raise TypeError(
                f"detector must be an EnergyIntegratingDetector or PhotonCountingDetector, got {detector!r}"
            )
        self.register_buffer("efficiency", self.detector.efficiency(energy))
        self._host_energy, self._host_efficiency = energy.clone(), self.efficiency.clone()  # for host-side sums
        self.channel_bins = self.detector.channel_bins(energy)
        for k, (start, end) in enumerate(self.channel_bins):
            if end <= start:
                raise ValueError(
                    f"detector channel {k} records no part of the spectrum ({float(energy[0]):g}-{float(energy[-1]):g}"
                    f" keV); lower its threshold"
                )

        # --- exposure and noise -----------------------------------------------------------------------------------
        target = None
        if isinstance(noise, str):
            if noise not in NOISE_PRESETS:
                raise ValueError(f"noise must be None, a Noise module or one of {sorted(NOISE_PRESETS)}, got {noise!r}")
            target = NOISE_PRESETS[noise].photons_behind_patient
            noise = Noise.from_preset(noise)
        if noise is not None and not isinstance(noise, Noise):
            raise TypeError(f"noise must be None, a preset name or a Noise module, got {type(noise).__name__}")
        self.noise = noise
        for name, value in (
            ("photons_per_pixel", photons_per_pixel),
            ("photons_behind_patient", photons_behind_patient),
        ):
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive number of photons, got {value!r}")
        if photons_per_pixel is not None and photons_behind_patient is not None:
            raise ValueError("give photons_per_pixel (fixed exposure) or photons_behind_patient (automatic), not both")
        if photons_per_pixel is not None:
            target = None
        elif photons_behind_patient is not None:
            target = float(photons_behind_patient)
        self.photons_per_pixel = (
            float(photons_per_pixel) if photons_per_pixel is not None else DEEPDRR_PHOTONS_PER_PIXEL
        )
        self.photons_behind_patient = target
        if isinstance(noise_group_keV, bool) or int(noise_group_keV) != noise_group_keV or noise_group_keV < 1:
            raise ValueError(f"noise_group_keV must be a whole number of keV >= 1, got {noise_group_keV!r}")
        self.noise_group_keV = int(noise_group_keV)
        if isinstance(scatter, str):
            if scatter == "montecarlo":
                scatter = MonteCarloScatter()
            elif scatter == "cnn":
                scatter = ScatterCNN()
            else:
                raise ValueError(f"scatter must be None, 'montecarlo', 'cnn' or a module, got {scatter!r}")
        if scatter is not None and not isinstance(scatter, nn.Module):
            raise TypeError(f"scatter must be None, 'montecarlo', 'cnn' or an nn.Module, got {type(scatter).__name__}")
        if isinstance(scatter, MonteCarloScatter) and not isinstance(self.detector, EnergyIntegratingDetector):
            raise ValueError("Monte Carlo scatter is tallied for an EnergyIntegratingDetector only")
        if isinstance(scatter, ScatterCNN):
            if not isinstance(self.detector, EnergyIntegratingDetector):
                raise ValueError("the scatter CNN was trained for an EnergyIntegratingDetector only")
            # Its spectrum range is checked once, here: per call the spectrum stays on the device.
            kvp, mean_energy = spectrum_scalars(self.energy_keV, self.spectrum_weights)
            check_training_range(kvp=kvp, mean_energy_keV=mean_energy)
        self.scatter = scatter

        # --- ray casting ------------------------------------------------------------------------------------------
        self.output = self._check_output(output)
        if mode not in ("siddon", "trilinear"):
            raise ValueError(f"mode must be 'siddon' or 'trilinear', got {mode!r}")
        self.mode, self.step = mode, step
        if isinstance(supersample, bool) or int(supersample) != supersample or supersample < 1:
            raise ValueError(f"supersample must be a whole number >= 1, got {supersample!r}")
        self.supersample = int(supersample)
        self.memory_budget_bytes = _check_budget(memory_budget_bytes)
        if contiguous_axis is not None and (isinstance(contiguous_axis, bool) or contiguous_axis not in (0, 1, 2)):
            raise ValueError(f"contiguous_axis must be None, 0 (i), 1 (j) or 2 (k), got {contiguous_axis!r}")
        self.contiguous_axis = contiguous_axis
        self._cache: tuple[tuple, Tensor] | None = None
        self._mean_energy_cache: tuple[tuple, float] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------------------
    def _register_volume(self, name: str, values: Tensor) -> None:
        if isinstance(values, nn.Parameter):
            setattr(self, name, values)  # registered as a parameter: gradients reach the volume
        else:
            self.register_buffer(name, values.detach().to(self.dtype))

    def _check_output(self, output: str) -> str:
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
        if output not in self.detector.outputs:
            if output == "photons":
                why = "an energy-integrating detector records deposited energy, not photon counts: use 'intensity' or "
                why += "a PhotonCountingDetector"
            else:
                why = "a photon-counting detector records counts per energy bin: use 'photons'"
            raise ValueError(f"output {output!r} is not available from this detector ({why})")
        return output

    @property
    def device(self) -> torch.device:
        return self.energy_keV.device

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """``(I, J, K)`` voxels."""
        source = self.hu if self.hu is not None else self.densities
        return tuple(source.shape[-3:])

    @property
    def volume_center(self) -> Tensor:
        """``[3]`` world point (mm, float64, CPU) at the centre of the volume's outer box: the default isocenter."""
        return volume_center(self.affine, self.volume_shape)

    def _volume_state(self) -> tuple[bool, tuple]:
        """Whether the material volume needs gradients now, and the key of the state it is built from."""
        source = self.hu if self.hu is not None else self.densities
        state = [source, *(self.segmentation.parameters() if self.segmentation is not None else ())]
        if self.segmentation is not None:
            state += list(self.segmentation.buffers())
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in state)
        return needs_grad, tuple((id(t), t._version, t.device, t.dtype) for t in state)

    def material_volume(self) -> Tensor:
        """The per-material densities the rays integrate: ``[C, I, J, K]`` g/cm^3, channels-last, padded to C = 4 or
        8 channels for vector loads (``C >= M``, the extra channels zero). Cached while the volume and segmentation
        are unchanged and need no gradient."""
        needs_grad, key = self._volume_state()
        if not needs_grad and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if self.hu is not None:
            if self.hu.requires_grad:
                _check_finite_volume(self.hu, "the CT volume")
            densities = self.segmentation(self.hu.to(self.dtype)).densities.to(self.dtype)
        else:
            densities = self.densities.to(self.dtype)
        m = densities.shape[0]
        padded = 4 if m <= 4 else 8
        channels_last = densities.permute(1, 2, 3, 0)
        if padded > m:
            zeros = channels_last.new_zeros((*channels_last.shape[:3], padded - m))
            channels_last = torch.cat([channels_last, zeros], dim=-1)
        volume = channels_last.contiguous().permute(3, 0, 1, 2)
        if self.contiguous_axis is not None and volume.is_cuda:
            volume = with_contiguous_axis(volume, self.contiguous_axis)  # channels stay innermost
        if needs_grad:
            self._cache = None
            return volume
        volume = volume.detach()
        self._cache = (key, volume)
        return volume

    def _weights(self, override: Tensor | None = None, check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised spectrum p [E], the count row p*eta [E] and the energy row p*eta*E [E] (float64)."""
        if override is not None:
            if not isinstance(override, Tensor) or tuple(override.shape) != tuple(self.energy_keV.shape):
                got = tuple(override.shape) if isinstance(override, Tensor) else type(override).__name__
                raise ValueError(
                    f"spectrum_weights must be a [E] = [{self.energy_keV.numel()}] tensor on the module's energy grid "
                    f"({float(self.energy_keV[0]):g}-{float(self.energy_keV[-1]):g} keV), got {got}"
                )
            if check:
                _check_photons(override)  # on the caller's device (CPU tensors: no device sync)
            photons = override.to(self.device, torch.float64, non_blocking=True)
        else:
            photons = self.spectrum_weights.to(torch.float64)
            if self.spectrum_weights.requires_grad:
                _check_photons(photons)
        p = photons / photons.sum()
        counts = p * self.efficiency
        return p, counts, counts * self.energy_keV

    def _groups(self, noisy: bool) -> tuple[list[int], int]:
        """Group boundaries over the spectrum bins (G + 1 indices) and the number of groups of each channel.

        A channel is one group, except for compound-Poisson noise on an energy-integrating detector (one channel),
        which draws one count per ``noise_group_keV`` of spectrum. Channels own consecutive groups."""
        # Both the compound draw and its differentiable Gaussian stand-in need the per-group energies.
        split = noisy and self.detector.kind == "energy-integrating" and self.noise.method in ("compound", "gaussian")
        per_group = max(1, round(self.noise_group_keV / self._bin_width_keV)) if split else None
        starts = []
        for start, end in self.channel_bins:
            starts += list(range(start, end, per_group)) if per_group else [start]
        starts.append(self.channel_bins[-1][1])
        return starts, (len(starts) - 1) // len(self.channel_bins)

    # ------------------------------------------------------------------------------------------------------------
    # Rendering
    # ------------------------------------------------------------------------------------------------------------
    def material_line_integrals(self, camera: Camera) -> Tensor:
        """Per-material mass thicknesses along every sub-ray: ``[B, H * W * s * s, M]`` in g/cm^2."""
        if not isinstance(camera, Camera):
            raise TypeError(f"camera must be a torchdrr.geometry.Camera, got {type(camera).__name__}")
        camera = camera.to(device=self.device)
        # In the module's dtype straight from the op, so that cast_camera's .to(device, dtype) is a no-op.
        sources, ray_matrices = camera.ray_parameters(dtype=self.dtype)
        return self.cast_camera(sources, ray_matrices, camera.height, camera.width)

    def cast_camera(self, sources: Tensor, ray_matrices: Tensor, height: int, width: int) -> Tensor:
        """Per-material mass thicknesses (g/cm^2) along the pixel rays of B cameras given as ``sources [B, 3]`` and
        ``ray_matrices [B, 3, 3]`` (``torchdrr.ops.camera_raycast``; ``Camera.ray_parameters``), with the module's
        supersampling: ``[B, H * W * s * s, M]``. The camera op makes each pixel's ray in the kernel, so no
        ``[B, H * W, 3]`` endpoint tensors are made (``cast`` along ``pixel_rays`` gives the same integrals)."""
        integrals = camera_raycast(
            self.material_volume(), self.affine, sources.to(self.device, self.dtype),
            ray_matrices.to(self.device, self.dtype), height, width, mode=self.mode, step=self.step,
            supersample=self.supersample,
        )  # fmt: skip
        return integrals[..., : len(self.materials)] / 10.0  # density x mm -> g/cm^2

    def cast(self, sources: Tensor, targets: Tensor) -> Tensor:
        """Per-material mass thicknesses (g/cm^2) along rays ``sources [..., 3]`` -> ``targets [..., 3]`` (world mm,
        broadcast as in ``torchdrr.raycast``): ``[..., M]``, one ray-cast call for every material."""
        volume = self.material_volume()
        integrals = raycast(
            volume, self.affine, sources.to(self.device, self.dtype), targets.to(self.device, self.dtype),
            mode=self.mode, step=self.step,
        )  # fmt: skip
        return integrals[..., : len(self.materials)] / 10.0  # density x mm -> g/cm^2

    def forward(
        self,
        camera: Camera,
        output: str | None = None,
        generator: torch.Generator | None = None,
        noisy: bool | None = None,
        memory_budget_bytes: int | None = None,
    ) -> Tensor:
        """Renders the X-ray images seen by a batch of cameras.

        Args:
            camera: B poses sharing one detector (``Camera``; its tensors may require grad).
            output: "intensity" (energy-integrating: deposited energy, keV per pixel), "photons" (photon counting:
                counts per bin), "flat_field" (I / I0), "line_integral" (-log(I / I0), dimensionless) or "display"
                ([0, 1], bright = attenuating). Default: the module's ``output``.
            generator: random source of the noise (seed it for reproducible images).
            noisy: draw noise (default: when the module has a noise model); False gives expected values.
            memory_budget_bytes: this call's memory budget (default: the module's ``memory_budget_bytes``). A render
                over budget runs in chunks (see ``memory_plan``).

        Returns:
            ``[B, K, H, W]`` in the module's dtype, K = 1 for an energy-integrating detector or the number of
            photon-counting bins.

        Raises:
            MemoryBudgetError: the render does not fit the budget even in chunks (nothing was allocated).
        """
        plan = self.memory_plan(camera, output=output, noisy=noisy, memory_budget_bytes=memory_budget_bytes)
        if plan.whole:
            integrals = self.material_line_integrals(camera)  # [B, R, M]
            return self.detect(integrals, camera, output=output, generator=generator, noisy=noisy)
        return self._render_chunks(camera, plan, output, generator, noisy)

    def memory_plan(
        self,
        camera: Camera,
        output: str | None = None,
        noisy: bool | None = None,
        memory_budget_bytes: int | None = None,
    ) -> RenderPlan:
        """How ``forward`` would split this render to fit the memory budget (nothing is rendered).

        The estimate counts, per ray, the memory of one chunk in flight (ray endpoints, line integrals, the
        per-energy-group terms of the spectrum and the detector) and the memory that stays for the call (the output
        and, when gradients are needed, the tensors autograd saves), plus the material volume when it is not cached.
        Its constants were measured (peak RSS on the CPU, peak allocated memory on CUDA; benchmarks/RESULTS.md).

        Args:
            camera: the cameras to render.
            output, noisy: as in ``forward``.
            memory_budget_bytes: as in ``forward``.

        Returns:
            The :class:`~torchdrr.memory.RenderPlan`.

        Raises:
            MemoryBudgetError: the render does not fit even in chunks of one image (or one detector row).
        """
        if not isinstance(camera, Camera):
            raise TypeError(f"camera must be a torchdrr.geometry.Camera, got {type(camera).__name__}")
        output = self._check_output(output) if output is not None else self.output
        noisy = self.noise is not None if noisy is None else bool(noisy)
        transient, kept, fixed = self._memory_per_ray(camera, output, noisy)
        s2 = self.supersample**2
        rays = camera.batch_size * camera.height * camera.width * s2
        budget = _check_budget(memory_budget_bytes) or self.memory_budget_bytes
        source = "memory_budget_bytes"
        if budget is None:
            if fixed + (transient + kept) * rays <= AUTO_BUDGET_CHECK_BYTES:
                budget, source = sys.maxsize, "no budget needed (a small render)"
            else:
                spare, where = available_bytes(self.device)
                budget = int(spare * AUTO_BUDGET_FRACTION) if spare < sys.maxsize else spare
                source = f"{AUTO_BUDGET_FRACTION:.0%} of the {where}"
        rows_allowed = None
        if self.scatter is not None:
            rows_allowed = "the scatter module needs the whole image"
        elif noisy and self.noise is not None and self.noise.blur_sigma_px > 0:
            rows_allowed = "the noise model's scintillator blur spreads across rows"
        return plan_chunks(
            camera.batch_size, camera.height, camera.width * s2, transient, kept, fixed, budget, source, rows_allowed
        )

    def _memory_per_ray(self, camera: Camera, output: str, noisy: bool) -> tuple[float, float, float]:
        """Estimated bytes per ray: (freed after the ray's chunk, kept for the call) and fixed bytes per call."""
        item = torch.finfo(self.dtype).bits // 8
        m = len(self.materials)
        channels = 4 if m <= 4 else 8
        counting = self.detector.kind == "photon-counting"
        rows = 1 if counting or not (noisy or self.photons_behind_patient is not None) else 2
        starts, _ = self._groups(noisy and self.noise is not None)
        terms = rows * (len(starts) - 1)  # per-energy-group log terms of one ray
        k, s2 = self.detector.channels, self.supersample**2
        transient = item * (TRANSIENT_WORDS_PER_RAY + channels + TRANSIENT_WORDS_PER_TERM * terms)
        if s2 > 1:
            transient += item * SUPERSAMPLE_WORDS_PER_RAY
        kept = item * (k * OUTPUT_COPIES) / s2
        source = self.hu if self.hu is not None else self.densities
        needs_grad = torch.is_grad_enabled() and (
            camera.rotation.requires_grad
            or camera.translation.requires_grad
            or camera.intrinsics.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or source.requires_grad
        )
        if needs_grad:
            kept += item * (SAVED_WORDS_PER_RAY + channels + SAVED_WORDS_PER_TERM * terms)
        # A material volume not cached yet is built by this call: channels plus the segmentation's M densities.
        volume_grad, key = self._volume_state()
        cached = not volume_grad and self._cache is not None and self._cache[0] == key
        fixed = 0.0 if cached else float(item * (channels + m) * math.prod(source.shape[-3:]))
        return float(transient), float(kept), fixed

    def _render_chunks(
        self,
        camera: Camera,
        plan: RenderPlan,
        output: str | None,
        generator: torch.Generator | None,
        noisy: bool | None,
    ) -> Tensor:
        """``forward`` in the pieces of ``plan``: groups of whole images, or row bands of single images."""
        output = self._check_output(output) if output is not None else self.output
        piece_output = "line_integral" if output == "display" else output  # display windows the whole image
        b, h, w = camera.batch_size, camera.height, camera.width
        result: Tensor | None = None
        for start in range(0, b, plan.images_per_chunk):
            images = camera[start : start + plan.images_per_chunk]
            if plan.rows_per_chunk >= h:
                integrals = self.material_line_integrals(images)
                piece = self.detect(integrals, images, output=piece_output, generator=generator, noisy=noisy)
                result = _place(result, piece, (b, piece.shape[1], h, w), slice(start, start + piece.shape[0]), None)
                continue
            tops = range(0, h, plan.rows_per_chunk)
            bands = [(top, images.crop(top, 0, min(h, top + plan.rows_per_chunk) - top, w)) for top in tops]
            log_n0 = None
            if self.photons_behind_patient is not None:
                # Exposure control looks at the whole image: a first pass sums its statistics band by band.
                sums = sum(
                    self.detect(self.material_line_integrals(band), band, output=piece_output, noisy=noisy,
                                _exposure_sums=True)
                    for _, band in bands
                )  # fmt: skip
                log_n0 = self._log_n0_from_sums(sums, self.photons_behind_patient)
            for top, band in bands:
                end = top + band.height
                piece = self.detect(
                    self.material_line_integrals(band), band, output=piece_output, generator=generator, noisy=noisy,
                    _log_n0=log_n0,
                )  # fmt: skip
                result = _place(result, piece, (b, piece.shape[1], h, w), slice(start, start + 1), slice(top, end))
        if output == "display":
            result = display_image(result)
        return result

    def detect(
        self,
        integrals: Tensor,
        camera: Camera,
        output: str | None = None,
        generator: torch.Generator | None = None,
        noisy: bool | None = None,
        spectrum_weights: Tensor | None = None,
        photons_per_pixel: float | None = None,
        photons_behind_patient: float | Tensor | None = None,
        flat_mean_energy_keV: float | Tensor | None = None,
        check_inputs: bool = True,
        _log_n0: Tensor | None = None,
        _exposure_sums: bool = False,
    ) -> Tensor:
        """The physics after the ray cast: attenuation, detector, scatter and noise (``forward`` = cast + detect).

        Args:
            integrals: ``[B, H * W * s * s, M]`` mass thicknesses from ``material_line_integrals(camera)`` (or
                ``cast`` on ``camera.rays``), g/cm^2.
            camera: the cameras the integrals were cast for.
            output, generator, noisy: as in ``forward``.
            spectrum_weights: ``[E]`` photon fluence per bin on this module's energy grid (``energy_keV``) for this
                call only (e.g. a random kVp per sample: zero the bins above it); default the module's spectrum.
            photons_per_pixel: fixed exposure N0 for this call only.
            photons_behind_patient: automatic-exposure target for this call only (a number, or a 0-d tensor on the
                module's device).
            flat_mean_energy_keV: the mean detected energy of the flat field for this call's spectrum (converts the
                electronic noise from photons to keV); computed on the host when not given.
            check_inputs: validate the per-call spectrum and exposure. ``DRRDataset`` passes False with values it
                made valid itself, so that rendering never waits for the device.
            _log_n0, _exposure_sums: for renders split into row bands (``forward``): the exposure ``log N0`` per
                image ``[B]`` found from the whole image; or return only this band's exposure-control sums ``[B, 4]``.

        Returns:
            ``[B, K, H, W]``; see ``forward``.
        """
        output = self._check_output(output) if output is not None else self.output
        noisy = self.noise is not None if noisy is None else bool(noisy)
        if noisy and self.noise is None:
            raise ValueError("noisy=True needs a noise model: DRR(..., noise='radiography' or Noise(...))")
        if not isinstance(camera, Camera):
            raise TypeError(f"camera must be a torchdrr.geometry.Camera, got {type(camera).__name__}")
        camera = camera.to(device=self.device)
        b, h, w, s2 = camera.batch_size, camera.height, camera.width, self.supersample**2
        if tuple(integrals.shape) != (b, h * w * s2, len(self.materials)):
            raise ValueError(
                f"integrals must be [B, H * W * s * s, M] = {(b, h * w * s2, len(self.materials))} for this camera, "
                f"got {tuple(integrals.shape)}"
            )
        k = self.detector.channels
        counting = self.detector.kind == "photon-counting"
        for name, value in (
            ("photons_per_pixel", photons_per_pixel),
            ("photons_behind_patient", photons_behind_patient),
        ):
            if check_inputs and value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive number of photons, got {value!r}")
        if photons_per_pixel is not None and photons_behind_patient is not None:
            raise ValueError("give photons_per_pixel (fixed exposure) or photons_behind_patient (automatic), not both")
        if photons_per_pixel is not None:
            fixed_n0, target = float(photons_per_pixel), None
        elif photons_behind_patient is not None:
            fixed_n0 = self.photons_per_pixel
            target = photons_behind_patient
            if not isinstance(target, Tensor):
                target = float(target)
        else:
            fixed_n0, target = self.photons_per_pixel, self.photons_behind_patient
        exposure_control = target is not None

        p, count_row, energy_row = self._weights(spectrum_weights, check=check_inputs)
        rows = [count_row] if counting else ([count_row, energy_row] if (noisy or exposure_control) else [energy_row])
        measure = 0 if counting else len(rows) - 1  # the row the detector reads
        starts, groups = self._groups(noisy)
        weights = torch.stack(rows).to(self.dtype)
        mu = self.mass_attenuation.to(self.dtype)
        # The tables are valid by construction (registry data; weights checked above): skip the op's value scan.
        log_terms = log_weighted_transmission(integrals, mu, weights, starts, check_values=False)  # [B, R, Q, G]

        # Per sub-ray log factor: falloff of the flat field.
        falloff = None
        if self.detector.falloff:
            falloff = falloff_factor(camera.intrinsics.to(self.device), h, w, self.supersample).to(self.dtype)
            log_terms = log_terms + falloff.log().view(1, -1, 1, 1)

        pixel_integrals = integrals.reshape(b, h * w, s2, -1).mean(2)  # [B, H*W, M]
        if _exposure_sums:
            return self._exposure_statistics(log_terms, pixel_integrals, b, h * w, s2, groups)
        if _log_n0 is not None:
            log_n0 = _log_n0
        else:
            log_n0 = self._log_exposure(log_terms, pixel_integrals, b, h * w, s2, groups, fixed_n0, target)  # [B]

        # Flat field per channel (no object): log N0 + log mean falloff + log sum of the channel's weights.
        measure_row = weights[measure].to(torch.float64)
        flat_channels = torch.stack([measure_row[a:e].sum() for a, e in self.channel_bins]).log().to(self.dtype)
        mean_falloff = (
            falloff.view(h * w, s2).mean(1).log()
            if falloff is not None
            else torch.zeros(h * w, dtype=self.dtype, device=self.device)
        )
        log_flat = log_n0.view(b, 1, 1) + flat_channels.view(1, k, 1) + mean_falloff.view(1, 1, h * w)  # [B, K, HW]

        # Expected signal per pixel and channel, in log space: logmeanexp over sub-rays of the channel's groups. A
        # noisy render without scatter does not need it (the noise draws from the groups directly).
        log_signal = None
        if not noisy or self.scatter is not None:
            log_meas = self._per_channel(log_terms[..., measure, :], groups)  # [B, R, K]
            log_meas = log_meas.reshape(b, h * w, s2, k)
            log_signal = log_meas[:, :, 0] if s2 == 1 else torch.logsumexp(log_meas, dim=2) - math.log(s2)
            log_signal = log_signal.transpose(1, 2) + log_n0.view(b, 1, 1)  # [B, K, HW]

        scatter_ratio = None
        if self.scatter is not None:
            primary = log_signal.exp().reshape(b, k, h, w)
            if isinstance(self.scatter, ScatterCNN):
                flat = log_flat.exp().reshape(b, k, h, w)
                material_integrals = pixel_integrals.transpose(1, 2).reshape(b, -1, h, w)
                spectrum = (self.energy_keV, p)
                scatter = self.scatter(primary, flat, material_integrals, camera, spectrum, self.volume_center)
            elif isinstance(self.scatter, MonteCarloScatter):
                scatter = self.scatter.estimate(
                    self.material_volume().detach()[: len(self.materials)], self.affine, self.materials, camera,
                    (self.energy_keV, p.detach()), self.detector, log_n0.detach().exp(),
                ).to(primary.dtype)  # fmt: skip
            else:
                material_integrals = pixel_integrals.transpose(1, 2).reshape(b, -1, h, w)
                scatter = self.scatter(primary=primary, material_integrals=material_integrals, camera=camera)
            if not isinstance(scatter, Tensor) or scatter.shape != primary.shape:
                got = tuple(scatter.shape) if isinstance(scatter, Tensor) else type(scatter).__name__
                raise ValueError(f"scatter must return the primary's shape {tuple(primary.shape)}, got {got}")
            total = primary + scatter
            tiny = torch.finfo(total.dtype).tiny
            scatter_ratio = total / primary.clamp_min(tiny)
            log_signal = total.clamp_min(tiny).log().reshape(b, k, h * w)

        if not noisy:
            signal_log = log_signal
            line_integral = log_flat - signal_log
            signal = None
        else:
            photon_energy = None
            if not counting:
                photon_energy = flat_mean_energy_keV
                if photon_energy is None:
                    photon_energy = self._flat_mean_energy(p, cached=spectrum_weights is None)
            signal = self._draw(
                log_terms, log_n0, groups, (b, h, w, s2, k), counting, scatter_ratio, photon_energy, generator
            )
            floor = 0.5 if counting else 0.5 * photon_energy
            line_integral = log_flat - signal.reshape(b, k, h * w).clamp_min(floor).log()

        if output == "line_integral":
            result = line_integral
        elif output == "flat_field":
            result = (-line_integral).exp() if signal is None else signal.reshape(b, k, h * w) / log_flat.exp()
        elif output in ("intensity", "photons"):
            result = log_signal.exp() if signal is None else signal.reshape(b, k, h * w)
        else:
            result = display_image(line_integral.reshape(b, k, h, w))
        return result.reshape(b, k, h, w)

    @staticmethod
    def _per_channel(log_groups: Tensor, groups: int) -> Tensor:
        """logsumexp over each channel's consecutive groups: ``[..., K * groups]`` -> ``[..., K]``."""
        if groups == 1:
            return log_groups
        return torch.logsumexp(log_groups.unflatten(-1, (-1, groups)), dim=-1)

    def _log_exposure(
        self,
        log_terms: Tensor,
        pixel_integrals: Tensor,
        b: int,
        hw: int,
        s2: int,
        groups: int,
        fixed_n0: float,
        target: float | Tensor | None,
    ) -> Tensor:
        """log N0 per image ``[B]``: fixed, or from automatic exposure control (detached: a machine setting).

        Exposure control averages the detected photons per unit N0 over the pixels behind the body (rays through at
        least 1 g/cm^2); a view in which no ray crosses that much is averaged over all its pixels instead (decided on
        the device: no host round trip)."""
        if target is None:
            return torch.full((b,), math.log(fixed_n0), dtype=self.dtype, device=self.device)
        return self._log_n0_from_sums(self._exposure_statistics(log_terms, pixel_integrals, b, hw, s2, groups), target)

    def _exposure_statistics(
        self, log_terms: Tensor, pixel_integrals: Tensor, b: int, hw: int, s2: int, groups: int
    ) -> Tensor:
        """Exposure control's sums over pixels, per image ``[B, 4]``: detected photons per unit N0 summed behind the
        body, the number of body pixels, the same sum over all pixels, and the number of pixels. Sums (not means),
        so that the bands of a split image add up."""
        with torch.no_grad():
            detected = self._per_channel(log_terms[..., 0, :], groups)  # count row
            per_pixel = torch.logsumexp(detected, dim=-1).exp().reshape(b, hw, s2).mean(2)  # photons per unit N0
            body = pixel_integrals.sum(-1) >= BODY_MASS_THICKNESS  # [B, HW]
            pixels = torch.full_like(per_pixel[:, 0], hw)
            return torch.stack([(per_pixel * body).sum(1), body.sum(1).to(per_pixel), per_pixel.sum(1), pixels], 1)

    def _log_n0_from_sums(self, sums: Tensor, target: float | Tensor) -> Tensor:
        """log N0 per image ``[B]`` that brings the mean detected photons behind the body (in a view where no ray
        crosses the body: over all pixels) to ``target``; decided on the device, with no host round trip."""
        with torch.no_grad():
            behind_body = sums[:, 0] / sums[:, 1].clamp_min(1)
            mean_detected = torch.where(sums[:, 1] > 0, behind_body, sums[:, 2] / sums[:, 3])
            # A view whose every ray is fully attenuated detects 0 photons per unit N0 (exp underflows): the exposure
            # then saturates, as a real exposure control does, instead of log(0). The ceiling is the fourth root of
            # the dtype's largest value (4.3e9 photons a pixel in float32, far above any tube's output), not the
            # largest value itself: a ray that misses the body detects N0 times its flat-field signal, and the noise
            # models square such signals; both must stay finite (at the float32 maximum the image was inf, at its
            # square root the Gaussian noise's variance; found by the numerical-health property test on the H100).
            mean_detected = mean_detected.clamp_min(torch.finfo(mean_detected.dtype).tiny)
            log_target = target.log() if isinstance(target, Tensor) else math.log(target)
            log_n0_ceiling = 0.25 * math.log(torch.finfo(self.dtype).max)
            return (log_target - mean_detected.log()).clamp(max=log_n0_ceiling).to(self.dtype)

    def _flat_mean_energy(self, p: Tensor, cached: bool = True) -> float:
        """Mean energy (keV) of the photons the detector absorbs from the flat field of the normalised spectrum
        ``p``, summed on the host. Cached per version of the module's spectrum (``cached``), so that rendering does
        not wait for the device to hand back a number."""
        if not cached:
            return self._host_mean_energy(p)
        key = (id(self.spectrum_weights), self.spectrum_weights._version, self.spectrum_weights.device)
        if self._mean_energy_cache is None or self._mean_energy_cache[0] != key:
            self._mean_energy_cache = (key, self._host_mean_energy(p))
        return self._mean_energy_cache[1]

    def _host_mean_energy(self, p: Tensor) -> float:
        counts = p.detach().cpu() * self._host_efficiency
        return float((counts * self._host_energy).sum() / counts.sum())

    def _draw(
        self,
        log_terms: Tensor,
        log_n0: Tensor,
        groups: int,
        sizes: tuple[int, int, int, int, int],
        counting: bool,
        scatter_ratio: Tensor | None,
        photon_energy: float | Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Noisy signal ``[B, K, H, W]`` from the expected photons (and energies) per group of each pixel."""
        b, h, w, s2, k = sizes
        if log_terms.requires_grad:
            expected = (log_terms + log_n0.view(b, 1, 1, 1)).exp()  # [B, R, Q, G]
        else:  # log_terms is not needed after this: reuse its memory (two passes fewer over B x R x Q x G)
            expected = log_terms.add_(log_n0.view(b, 1, 1, 1)).exp_()
        q = expected.shape[-2]
        expected = expected.reshape(b, h * w, s2, q, k * groups)
        expected = expected[:, :, 0] if s2 == 1 else expected.mean(2)  # [B, HW, Q, G]
        expected = expected.permute(0, 2, 3, 1).reshape(b, q, k, groups, h, w)
        counts = expected[:, 0]
        energy = None if counting else expected[:, 1]
        if scatter_ratio is not None:
            # Scatter is drawn as more photons with the primary's energy mix (Compton's energy loss is ignored).
            ratio = scatter_ratio.unsqueeze(2)
            counts = counts * ratio
            energy = energy * ratio if energy is not None else None
        check_generator(generator, counts.device)  # validate=False below skips the noise module's own checks
        return self.noise(counts, energy, generator=generator, photon_energy_keV=photon_energy, validate=False)

    # ------------------------------------------------------------------------------------------------------------
    # Many samples with their own physics (training data)
    # ------------------------------------------------------------------------------------------------------------
    def sample_rows(self, spectrum_weights: Tensor) -> tuple[Tensor, Tensor, float]:
        """Host-side (CPU float64) physics of one sample's spectrum for ``detect_samples``.

        Args:
            spectrum_weights: ``[E]`` photon fluence per bin on this module's energy grid (non-negative, CPU).

        Returns:
            ``rows`` ``[Q, E]`` (photon counts per bin and, for an energy-integrating detector, energy per bin, after
            the absorber), ``flat_log`` ``[K]`` (log of each channel's flat-field signal per unit N0) and the mean
            detected energy of the flat field (keV).
        """
        photons = spectrum_weights.detach().to("cpu", torch.float64)
        _check_photons(photons)
        p = photons / photons.sum()
        counts = p * self._host_efficiency
        rows = [counts] if self.detector.kind == "photon-counting" else [counts, counts * self._host_energy]
        measure = rows[-1]
        flat = torch.stack([measure[a:e].sum() for a, e in self.channel_bins]).log()
        return torch.stack(rows), flat, self._host_mean_energy(p)

    def detect_samples(
        self,
        integrals: Tensor,
        intrinsics: Tensor,
        height: int,
        width: int,
        rows: Tensor,
        flat_log: Tensor,
        photons_behind_patient: Tensor,
        flat_mean_energy_keV: Tensor,
        noise_seeds: Sequence[int] | None,
        output: str | None = None,
    ) -> Tensor:
        """``detect`` for B samples that each bring their own spectrum, dose and noise stream, vectorised.

        A sample's image does not depend on the other samples of the batch, bit for bit: the spectral op takes one
        weight table per image, exposure control averages in fixed point, sums over sub-rays and groups run in a
        fixed order (``physics.batch_invariant``), and only the noise draws run per sample, each from its own seed.
        Exposure is automatic (``photons_behind_patient``). No scatter module.

        Args:
            integrals: ``[B, H * W * s * s, M]`` mass thicknesses (g/cm^2) from ``cast``.
            intrinsics: ``[B, 3, 3]`` K of each sample (for the falloff).
            height, width: detector pixels.
            rows, flat_log: ``[B, Q, E]`` and ``[B, K]`` from ``sample_rows``, on the module's device.
            photons_behind_patient: ``[B]`` exposure targets.
            flat_mean_energy_keV: ``[B]`` from ``sample_rows`` (electronic noise in keV).
            noise_seeds: one noise seed per sample, or None for expected values.
            output: "line_integral", "flat_field", "intensity" or "photons" (per the detector).

        Returns:
            ``[B, K, H, W]``.
        """
        if self.scatter is not None:
            raise ValueError("detect_samples does not run scatter modules: use detect per sample")
        output = self._check_output(output) if output is not None else self.output
        noisy = noise_seeds is not None
        if noisy and self.noise is None:
            raise ValueError("noise_seeds were given but the DRR has no noise model")
        b, hw, s2 = integrals.shape[0], height * width, self.supersample**2
        k = self.detector.channels
        counting = self.detector.kind == "photon-counting"
        measure = 0 if counting else 1
        starts, groups = self._groups(noisy)
        mu = self.mass_attenuation.to(self.dtype)
        # One op call for the batch, each image with its own weight table: [B, R, Q, G].
        log_terms = log_weighted_transmission(integrals, mu, rows.to(self.dtype), starts, check_values=False)
        log_flat = flat_log.to(self.dtype).view(b, k, 1)
        if self.detector.falloff:
            falloff = torch.stack([falloff_factor(intrinsics[i], height, width, self.supersample) for i in range(b)])
            falloff = falloff.to(self.dtype)
            log_terms = log_terms + falloff.log().view(b, -1, 1, 1)
            log_flat = log_flat + ordered_mean(falloff.view(b, hw, s2), 2).log().view(b, 1, hw)

        # Exposure control per sample: the photons detected per unit N0 (count row, summed over groups and averaged
        # over sub-rays), averaged behind the body of that sample's image only.
        with torch.no_grad():
            detected = ordered_sum(log_terms[..., 0, :].exp(), 2)  # [B, R]
            detected = ordered_mean(detected.view(b, hw, s2), 2)
            pixel_integrals = ordered_mean(integrals.view(b, hw, s2, -1), 2)
            body = ordered_sum(pixel_integrals, 2) >= BODY_MASS_THICKNESS  # [B, HW]
            mean_detected = fixed_point_mean(detected, body).to(self.dtype)
            mean_detected = mean_detected.clamp_min(torch.finfo(self.dtype).tiny)  # fully attenuated: see above
            log_n0 = photons_behind_patient.to(self.dtype).log() - mean_detected.log()  # [B]
        log_flat = log_flat + log_n0.view(b, 1, 1)  # [B, K, 1 or HW]

        if not noisy:
            log_meas = log_terms[..., measure, :].reshape(b, hw, s2, k)  # one group per channel without noise
            if s2 > 1:  # log of the mean over sub-rays, summed in a fixed order
                peak = log_meas.amax(2, keepdim=True)
                log_meas = ordered_mean((log_meas - peak).exp(), 2).log() + peak.squeeze(2)
            log_signal = log_meas.reshape(b, hw, k).transpose(1, 2) + log_n0.view(b, 1, 1)
            line_integral = log_flat - log_signal
            signal = None
        else:
            expected = log_terms.add_(log_n0.view(b, 1, 1, 1)).exp_()  # [B, R, Q, G]
            q = expected.shape[-2]
            expected = ordered_mean(expected.view(b, hw, s2, q, k * groups), 2)  # [B, HW, Q, K G]
            expected = expected.permute(0, 2, 3, 1).reshape(b, q, k, groups, height, width)
            energy = None if counting else expected[:, 1]
            signal = self.noise.sample_each(expected[:, 0], energy, noise_seeds, flat_mean_energy_keV)
            signal = signal.reshape(b, k, hw)
            floor = 0.5 if counting else 0.5 * flat_mean_energy_keV.to(self.dtype).view(b, 1, 1)
            line_integral = log_flat - signal.clamp_min(floor).log()
            log_signal = None
        if output == "line_integral":
            result = line_integral
        elif output == "flat_field":
            result = (-line_integral).exp() if signal is None else signal / log_flat.exp()
        elif output in ("intensity", "photons"):
            result = log_signal.exp() if signal is None else signal
        else:
            result = display_image(line_integral.reshape(b, k, height, width))
        return result.reshape(b, k, height, width)

    def extra_repr(self) -> str:
        exposure = (
            f"photons_behind_patient={self.photons_behind_patient:g}"
            if self.photons_behind_patient is not None
            else f"photons_per_pixel={self.photons_per_pixel:g}"
        )
        e = self.energy_keV
        return (
            f"materials={self.materials}, spectrum={float(e[0]):g}-{float(e[-1]):g} keV in {e.numel()} bins, "
            f"{exposure}, output={self.output!r}, mode={self.mode!r}, supersample={self.supersample}, "
            f"dtype={self.dtype}"
        )

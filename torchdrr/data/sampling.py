"""Random C-arm poses and X-ray physics for training sets.

Every sample's parameters are a pure function of ``(seed, index)`` (a NumPy ``SeedSequence`` per sample), so a sample
is the same whatever the batch it falls in, the worker that renders it or the number of ranks that share the work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["PhysicsDistribution", "PoseDistribution", "SampleParameters", "sample_parameters"]

DISTRIBUTIONS = ("uniform", "normal")


def _check_range(name: str, value: Sequence[float], minimum: float | None = None) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low > high:
        raise ValueError(f"{name}: min must be <= max, got ({low:g}, {high:g})")
    if minimum is not None and low < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got ({low:g}, {high:g})")
    return low, high


@dataclass(frozen=True)
class PoseDistribution:
    """Where the C-arm may stand, as (min, max) ranges.

    Attributes:
        primary_deg: primary angle (LAO positive), degrees. Default ±45° about PA.
        secondary_deg: secondary angle (cranial positive), degrees.
        inplane_deg: in-plane rotation of the detector, degrees.
        translation_mm: offset of the isocenter from the CT's centre along each world axis, mm.
        sdd_mm: source-to-detector (source-to-image) distance, mm.
        sod_mm: source-to-isocenter distance, mm (below the SDD).
        distribution: "uniform" over each range, or "normal" centred on it with a standard deviation of a quarter of
            its width, clipped to the range.
    """

    primary_deg: tuple[float, float] = (-45.0, 45.0)
    secondary_deg: tuple[float, float] = (-20.0, 20.0)
    inplane_deg: tuple[float, float] = (0.0, 0.0)
    translation_mm: tuple[float, float] = (-20.0, 20.0)
    sdd_mm: tuple[float, float] = (1020.0, 1020.0)
    sod_mm: tuple[float, float] = (850.0, 850.0)
    distribution: str = "uniform"

    def __post_init__(self) -> None:
        for name in ("primary_deg", "secondary_deg", "inplane_deg", "translation_mm"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))
        object.__setattr__(self, "sdd_mm", _check_range("sdd_mm", self.sdd_mm, minimum=1e-9))
        object.__setattr__(self, "sod_mm", _check_range("sod_mm", self.sod_mm, minimum=1e-9))
        if self.sod_mm[1] >= self.sdd_mm[0]:
            raise ValueError(
                f"sod_mm must stay below sdd_mm (the isocenter lies between source and detector), got sod_mm "
                f"{self.sod_mm} and sdd_mm {self.sdd_mm}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")


@dataclass(frozen=True)
class PhysicsDistribution:
    """The X-ray physics of each sample, as (min, max) ranges.

    Attributes:
        kvp: tube voltage, kVp (within the tabulated 40-150).
        filtration_mm_al: added aluminium filtration, mm.
        photons_behind_patient: dose: mean detected photons per pixel behind the body (automatic exposure), drawn
            log-uniformly (30 is fluoroscopy, 1000 radiography).
        noise_probability: fraction of samples with quantum and electronic noise (the others are noise-free
            expectations).
    """

    kvp: tuple[float, float] = (70.0, 120.0)
    filtration_mm_al: tuple[float, float] = (2.5, 4.0)
    photons_behind_patient: tuple[float, float] = (30.0, 1000.0)
    noise_probability: float = 1.0

    def __post_init__(self) -> None:
        from torchdrr.physics.spectra import KVP_RANGE

        kvp = _check_range("kvp", self.kvp)
        if kvp[0] < KVP_RANGE[0] or kvp[1] > KVP_RANGE[1]:
            raise ValueError(f"kvp must lie within the tabulated {KVP_RANGE[0]:g}-{KVP_RANGE[1]:g} kVp, got {kvp}")
        object.__setattr__(self, "kvp", kvp)
        object.__setattr__(self, "filtration_mm_al", _check_range("filtration_mm_al", self.filtration_mm_al, 0.0))
        photons = _check_range("photons_behind_patient", self.photons_behind_patient, 1e-9)
        object.__setattr__(self, "photons_behind_patient", photons)
        p = float(self.noise_probability)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise_probability must lie in [0, 1], got {self.noise_probability!r}")
        object.__setattr__(self, "noise_probability", p)


@dataclass(frozen=True)
class SampleParameters:
    """Everything that makes one sample: where the C-arm stands, the beam, the dose, the noise seed."""

    index: int
    ct_index: int
    primary_deg: float
    secondary_deg: float
    inplane_deg: float
    translation_mm: tuple[float, float, float]
    sdd_mm: float
    sod_mm: float
    kvp: float
    filtration_mm_al: float
    photons_behind_patient: float
    noisy: bool
    noise_seed: int
    extra: dict = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict:
        """Plain Python values (JSON-ready)."""
        out = asdict(self)
        out.pop("extra")
        out["translation_mm"] = list(self.translation_mm)
        return out


def _draw(rng: np.random.Generator, bounds: tuple[float, float], distribution: str, size: int | None = None):
    low, high = bounds
    if low == high:
        return np.full(size, low) if size else low
    if distribution == "uniform":
        return rng.uniform(low, high, size)
    centre, std = 0.5 * (low + high), 0.25 * (high - low)
    return np.clip(rng.normal(centre, std, size), low, high)


def sample_parameters(
    seed: int,
    index: int,
    ct_weights: Sequence[float],
    poses: PoseDistribution,
    physics: PhysicsDistribution,
) -> SampleParameters:
    """The parameters of sample ``index`` of the set made with ``seed``: a pure function of its arguments.

    Args:
        seed: the dataset's seed (an integer >= 0).
        index: the sample's index (>= 0).
        ct_weights: relative weight of each CT (the CT is drawn with these probabilities).
        poses: the pose ranges.
        physics: the physics ranges.
    """
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if isinstance(index, bool) or int(index) != index or index < 0:
        raise ValueError(f"index must be a whole number >= 0, got {index!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    weights = np.asarray(ct_weights, dtype=np.float64)
    ct_index = int(rng.choice(weights.size, p=weights / weights.sum())) if weights.size > 1 else 0
    kind = poses.distribution
    low, high = math.log(physics.photons_behind_patient[0]), math.log(physics.photons_behind_patient[1])
    return SampleParameters(
        index=int(index),
        ct_index=ct_index,
        primary_deg=float(_draw(rng, poses.primary_deg, kind)),
        secondary_deg=float(_draw(rng, poses.secondary_deg, kind)),
        inplane_deg=float(_draw(rng, poses.inplane_deg, kind)),
        translation_mm=tuple(float(v) for v in _draw(rng, poses.translation_mm, kind, 3)),
        sdd_mm=float(_draw(rng, poses.sdd_mm, kind)),
        sod_mm=float(_draw(rng, poses.sod_mm, kind)),
        kvp=float(rng.uniform(*physics.kvp)),
        filtration_mm_al=float(rng.uniform(*physics.filtration_mm_al)),
        photons_behind_patient=float(math.exp(rng.uniform(low, high))),
        noisy=bool(rng.uniform() < physics.noise_probability),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )

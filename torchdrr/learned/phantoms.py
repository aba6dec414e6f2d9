"""Procedural torso CT phantoms with known materials, for training a learned material decomposition.

Each phantom is a torso-like section along the third axis (K): air, a body with a subcutaneous fat layer, muscle
and organ blobs, two lungs with thin vessels, a spine of vertebral bodies with posterior elements, ribs, an optional
contrast-filled aorta with branches, and optional titanium pedicle screws. The anatomy is drawn at ``supersample``
times the final resolution, the HU are averaged down (partial volume) and the labels taken by majority; then blur,
cupping, beam-hardening streaks and noise are applied to the HU only. The labels stay the truth.

The HU ranges are chosen so that the usual thresholds (air < -800 < soft tissue < 350 < bone, the defaults of
``torchdrr.physics.segmentation.ThresholdSegmentation``) fail in the ways they fail on real scans: osteoporotic
trabecular bone below 350 HU, iodinated contrast above 350 HU, lung parenchyma straddling -800 HU, thin ribs that
partial volume pulls below 350 HU, and metal streaks. Typical CT numbers used here (rough, from standard radiology
references, e.g. Hounsfield-unit tables in Bushberg et al., "The Essential Physics of Medical Imaging", and the
clinical literature on each tissue):

- air -1000; aerated lung -900..-700 (emphysema lower, dependent lung higher); fat -120..-80; CSF ~10;
  blood 30-50; muscle 40-60; liver 50-70; spleen ~45; kidney ~30; intervertebral disc 70-100;
- trabecular (cancellous) vertebral bone 150-400 in healthy adults, below ~110-160 in osteoporosis (QCT studies
  of L1 attenuation report osteoporotic values down to a few tens of HU);
- cortical bone 800-1600 (up to ~1900 in dense cortex); whole thin ribs 400-1200 before partial volume;
- iodinated contrast in arteries 150-600 depending on phase and dose (CT angiography typically 250-500);
- titanium: mu ~ 1.8 /cm at 70 keV against 0.19 /cm for water, i.e. ~8000 HU on an extended scale; clinical
  scanners clip at 3071 (12-bit), so metal and its blooming read 2500-3071 HU.

The anatomy is defined for a nominal 360 mm field of view and scaled to the volume's in-plane extent, so that the
torso always fills the volume whatever the spacing (a 96^3 volume at 2 mm holds a torso scaled by ~0.53).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MATERIAL_CLASSES", "Phantom", "PhantomOptions", "class_fractions", "make_phantom"]

#: Class index = position. These are names in ``torchdrr.physics.materials`` (``material_names()``).
MATERIAL_CLASSES = ("air", "lung", "soft tissue", "cortical bone", "iodinated contrast", "titanium")
AIR, LUNG, SOFT, BONE, CONTRAST, METAL = range(6)

_NOMINAL_FOV_MM = 360.0


@dataclass(frozen=True)
class PhantomOptions:
    """Probabilities and HU ranges of the phantom generator. Ranges are (low, high) and drawn uniformly per phantom.

    Set a range to (0, 0) to switch an acquisition effect off (blur, noise, streaks, cupping).
    """

    p_osteoporotic: float = 0.4  #: probability that the vertebral interiors are osteoporotic
    p_contrast: float = 0.6  #: probability that the aorta and its branches hold iodinated contrast
    p_metal: float = 0.3  #: probability of one or two titanium pedicle screws
    p_correlated_noise: float = 0.5  #: probability that the noise is slightly blurred (correlated)
    supersample: int = 2  #: anatomy is drawn at this many times the final resolution (partial volume)
    air_hu: tuple[float, float] = (-1010.0, -990.0)
    fat_hu: tuple[float, float] = (-120.0, -80.0)
    soft_hu: tuple[float, float] = (20.0, 70.0)
    lung_hu: tuple[float, float] = (-900.0, -700.0)
    cortical_hu: tuple[float, float] = (800.0, 1600.0)
    trabecular_hu: tuple[float, float] = (150.0, 400.0)
    osteoporotic_hu: tuple[float, float] = (30.0, 180.0)
    rib_hu: tuple[float, float] = (400.0, 1200.0)
    contrast_hu: tuple[float, float] = (150.0, 600.0)
    metal_hu: tuple[float, float] = (6000.0, 9000.0)  #: true titanium CT number, before the scanner's clip
    clip_hu: tuple[float, float] = (-1024.0, 3071.0)  #: the scanner's HU range (12-bit), applied last
    blur_sigma_vox: tuple[float, float] = (0.4, 1.0)  #: Gaussian blur sigma, in final voxels
    noise_hu: tuple[float, float] = (5.0, 40.0)  #: noise standard deviation, HU
    streak_hu: tuple[float, float] = (50.0, 200.0)  #: metal streak amplitude, HU (bone streaks are ~1/5 of it)
    cupping_hu: tuple[float, float] = (10.0, 50.0)  #: HU drop at the body centre

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_"):
                if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"PhantomOptions.{f.name} must be a probability in [0, 1], got {value!r}")
            elif f.name == "supersample":
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
                    raise ValueError(f"PhantomOptions.supersample must be an integer in [1, 4], got {value!r}")
            else:
                if (
                    not isinstance(value, (tuple, list))
                    or len(value) != 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                    or value[0] > value[1]
                ):
                    raise ValueError(f"PhantomOptions.{f.name} must be a finite (low, high) pair with low <= high")
                if f.name in ("blur_sigma_vox", "noise_hu", "streak_hu", "cupping_hu") and value[0] < 0:
                    raise ValueError(f"PhantomOptions.{f.name} must be non-negative, got {value!r}")
        if self.clip_hu[1] <= 2500.0:
            raise ValueError(f"PhantomOptions.clip_hu must reach above 2500 HU, got {self.clip_hu!r}")
        if self.metal_hu[0] <= 2500.0:
            # Titanium must stay above every other class, or its label would be indistinguishable by design.
            raise ValueError(f"PhantomOptions.metal_hu must be above 2500 HU, got {self.metal_hu!r}")


class Phantom(NamedTuple):
    """A generated phantom.

    ``hu``: float32 [I, J, K] Hounsfield units with acquisition effects; ``labels``: int64 [I, J, K] indices into
    ``MATERIAL_CLASSES``; ``spacing_mm``: voxel size (mm) along I, J, K. The flags say which random options fired.
    """

    hu: Tensor
    labels: Tensor
    spacing_mm: tuple[float, float, float]
    osteoporotic: bool
    contrast: bool
    metal: bool


def class_fractions(labels: Tensor, num_classes: int = len(MATERIAL_CLASSES)) -> Tensor:
    """Fraction of voxels of each class: float32 [C] summing to 1, from integer ``labels`` of any shape."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes]
    return counts.float() / max(labels.numel(), 1)


class _Rng:
    """Scalar and tensor draws from one CPU generator, so a seed gives the same phantom on every device."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))

    def u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def rng(self, pair: tuple[float, float]) -> float:
        return self.u(pair[0], pair[1])

    def bern(self, p: float) -> bool:
        return float(torch.rand((), generator=self.gen)) < p

    def int(self, lo: int, hi: int) -> int:
        """Integer in [lo, hi]."""
        return int(torch.randint(lo, hi + 1, (), generator=self.gen))

    def randn(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.randn(shape, generator=self.gen).to(device)


class _Canvas:
    """HU and label volumes at the drawing resolution, with mm coordinates in the body frame.

    x, y, z are the voxel-centre coordinates (mm, centred on the volume) along I, J, K; (u, v) is the in-plane
    body frame: u lateral, v antero-posterior with posterior at negative v.
    """

    def __init__(self, shape, spacing, theta, centre, air_hu, device) -> None:
        self.shape = shape
        self.spacing = spacing
        self.coords = [
            (torch.arange(n, device=device, dtype=torch.float32) + 0.5 - n / 2) * s
            for n, s in zip(shape, spacing, strict=True)
        ]
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        self.centre = centre
        dx = self.coords[0][:, None] - centre[0]
        dy = self.coords[1][None, :] - centre[1]
        self.u = (self.cos * dx + self.sin * dy)[:, :, None]
        self.v = (-self.sin * dx + self.cos * dy)[:, :, None]
        self.z = self.coords[2][None, None, :]
        self.hu = torch.full(shape, air_hu, device=device, dtype=torch.float32)
        self.lab = torch.zeros(shape, device=device, dtype=torch.uint8)

    def box(self, u: float, v: float, z: float, r_inplane: float, r_z: float) -> tuple[slice, slice, slice]:
        """Index slices covering a box of half-size r_inplane (in-plane, any rotation) and r_z around (u, v, z)."""
        x = self.centre[0] + self.cos * u - self.sin * v
        y = self.centre[1] + self.sin * u + self.cos * v
        out = []
        for axis, (c, r) in enumerate(((x, r_inplane), (y, r_inplane), (z, r_z))):
            n, s = self.shape[axis], self.spacing[axis]
            lo = max(0, math.floor((c - r) / s + n / 2 - 1))
            hi = min(n, math.ceil((c + r) / s + n / 2 + 1))
            out.append(slice(lo, max(lo, hi)))
        return tuple(out)

    def sub(self, sl: tuple[slice, slice, slice]) -> tuple[Tensor, Tensor, Tensor]:
        """The (u, v, z) coordinates of a box: [a, b, 1], [a, b, 1], [1, 1, c]."""
        return self.u[sl[0], sl[1]], self.v[sl[0], sl[1]], self.z[:, :, sl[2]]

    def paint(self, sl: tuple[slice, slice, slice], mask: Tensor, label: int, value: float | Tensor) -> None:
        """Set HU and label where ``mask`` (broadcastable to the box) holds; later paints overwrite earlier ones."""
        hu, lab = self.hu[sl], self.lab[sl]
        mask = mask.expand(hu.shape)
        if isinstance(value, Tensor):
            hu.copy_(torch.where(mask, value, hu))
        else:
            hu.masked_fill_(mask, value)
        lab.masked_fill_(mask, label)

    def ellipsoid(self, centre, axes, label, value) -> None:
        sl = self.box(*centre, max(axes[0], axes[1]), axes[2])
        u, v, z = self.sub(sl)
        q = ((u - centre[0]) / axes[0]) ** 2 + ((v - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2
        self.paint(sl, q <= 1.0, label, value)

    def capsule(self, p0, p1, radius, label, value) -> None:
        """A tube of ``radius`` mm around the segment p0 -> p1 (body-frame (u, v, z) in mm), with round ends."""
        mid = [(a + b) / 2 for a, b in zip(p0, p1, strict=True)]
        half = math.dist(p0, p1) / 2
        sl = self.box(*mid, half + radius, abs(p1[2] - p0[2]) / 2 + radius)
        u, v, z = self.sub(sl)
        e = [b - a for a, b in zip(p0, p1, strict=True)]
        ee = max(sum(c * c for c in e), 1e-9)
        du, dv, dz = u - p0[0], v - p0[1], z - p0[2]
        t = ((du * e[0] + dv * e[1] + dz * e[2]) / ee).clamp(0.0, 1.0)
        d2 = (du - t * e[0]) ** 2 + (dv - t * e[1]) ** 2 + (dz - t * e[2]) ** 2
        self.paint(sl, d2 <= radius * radius, label, value)


def _smooth_field(rng: _Rng, shape: tuple[int, ...], cells: tuple[int, ...], device: torch.device) -> Tensor:
    """A smooth random field of ``shape``, unit standard deviation, with ~``cells`` correlation cells per axis."""
    coarse = rng.randn((1, 1, *[c + 1 for c in cells]), device)
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def _gaussian_blur(volume: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a [I, J, K] volume, sigma in voxels, edges replicated."""
    if sigma <= 0:
        return volume
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=volume.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out[0, 0]


def _band(du: Tensor, dv: Tensor, direction: float, width: float, length: float, one_sided: bool) -> Tensor:
    """Weight in [0, 1] of a streak band: a line through (0, 0) along ``direction`` (radians, in the u-v plane),
    Gaussian profile of ``width`` mm across, fading over ``length`` mm along; ``one_sided`` makes it a ray."""
    eu, ev = math.cos(direction), math.sin(direction)
    along = du * eu + dv * ev
    across = -du * ev + dv * eu
    w = torch.exp(-0.5 * (across / width) ** 2) * torch.exp(-along.abs() / length)
    if one_sided:
        w = w * torch.sigmoid(along / max(width, 1e-3))
    return w


def make_phantom(
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    seed: int = 0,
    device: str | torch.device = "cpu",
    options: PhantomOptions | None = None,
) -> Phantom:
    """Generate one random torso phantom.

    Args:
        shape: (I, J, K) voxels; K is the cranio-caudal axis of the torso section.
        spacing_mm: voxel size along I, J, K in mm.
        seed: the phantom is a deterministic function of (shape, spacing, seed, options) on every device.
        device: where the volumes are built and returned.
        options: probabilities and HU ranges; ``PhantomOptions()`` by default.

    Returns:
        ``Phantom`` with ``hu`` float32 [I, J, K] (HU, with partial volume, blur, cupping, streaks and noise) and
        ``labels`` int64 [I, J, K] (indices into ``MATERIAL_CLASSES``, the truth without acquisition effects).
    """
    opt = options if options is not None else PhantomOptions()
    if not isinstance(opt, PhantomOptions):
        raise ValueError(f"options must be a PhantomOptions, got {type(opt).__name__}")
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be three positive sizes, got {spacing_mm}")
    device = torch.device(device)
    rng = _Rng(seed)
    f = opt.supersample
    fov = [n * s for n, s in zip(shape, spacing, strict=True)]
    sc = min(fov[0], fov[1]) / _NOMINAL_FOV_MM  # anatomy scale: lengths below are mm at the nominal 360 mm FOV
    zlen = fov[2]

    osteoporotic = rng.bern(opt.p_osteoporotic)
    contrast = rng.bern(opt.p_contrast)
    metal = rng.bern(opt.p_metal)

    # Body pose: rotated in-plane, off-centre, lying within the field of view.
    theta = math.radians(rng.u(-20.0, 20.0))
    centre = (rng.u(-12.0, 12.0) * sc, rng.u(-12.0, 12.0) * sc)
    fine_shape, fine_spacing = tuple(n * f for n in shape), tuple(s / f for s in spacing)
    cv = _Canvas(fine_shape, fine_spacing, theta, centre, rng.rng(opt.air_hu), device)
    u, v = cv.u, cv.v

    # Body: an elliptic cylinder whose semi-axes vary smoothly along z.
    a0, b0 = rng.u(135.0, 160.0) * sc, rng.u(90.0, 115.0) * sc
    amp_a, amp_b = rng.u(0.0, 0.08), rng.u(0.0, 0.08)
    freq, ph_a, ph_b = rng.u(0.3, 1.2), rng.u(0, 2 * math.pi), rng.u(0, 2 * math.pi)
    zz = cv.coords[2]
    a_z = (a0 * (1 + amp_a * torch.sin(2 * math.pi * freq * zz / zlen + ph_a)))[None, None, :]
    b_z = (b0 * (1 + amp_b * torch.sin(2 * math.pi * freq * zz / zlen + ph_b)))[None, None, :]
    fat = rng.u(6.0, 25.0) * sc
    full = (slice(None), slice(None), slice(None))
    cv.paint(full, (u / a_z) ** 2 + (v / b_z) ** 2 <= 1.0, SOFT, rng.rng(opt.fat_hu))
    ai, bi = a_z - fat, b_z - fat  # muscle wall and everything inside it
    cv.paint(full, (u / ai) ** 2 + (v / bi) ** 2 <= 1.0, SOFT, rng.rng(opt.soft_hu))
    a_in, b_in = a0 - fat, b0 - fat

    # Organ blobs (liver-, spleen-, kidney-like) with their own HU; one may be fatty (mesenteric fat).
    for _ in range(rng.int(2, 4)):
        hu = rng.rng(opt.soft_hu) if not rng.bern(0.2) else rng.u(-110.0, -60.0)
        axes = (rng.u(25, 60) * sc, rng.u(20, 45) * sc, rng.u(30, 80) * sc)
        c = (rng.u(-0.6, 0.6) * a_in, rng.u(-0.2, 0.5) * b_in, rng.u(-0.5, 0.5) * zlen)
        cv.ellipsoid(c, axes, SOFT, hu)
    # With contrast, kidney-like organs enhance (cortex 150-300 HU in the nephrographic phase): iodinated blood in
    # tissue, labelled contrast, never bone, although it overlaps trabecular bone's HU.
    if contrast:
        for side in (-1.0, 1.0) if rng.bern(0.6) else ():
            axes = (rng.u(22, 32) * sc, rng.u(18, 26) * sc, rng.u(40, 60) * sc)
            c = (side * rng.u(0.35, 0.5) * a_in, -rng.u(0.2, 0.45) * b_in, rng.u(-0.6, -0.1) * zlen)
            cv.ellipsoid(c, axes, CONTRAST, rng.u(150.0, 300.0))
    # The patient table under the back: a curved carbon-fibre and foam plate (about -200 to 250 HU), in most scans.
    if rng.bern(0.7):
        gap, thick = rng.u(2.0, 15.0) * sc, rng.u(6.0, 16.0) * sc
        curve = rng.u(0.0, 0.004) / max(sc, 1e-3)
        plate = -(b0 + gap + thick / 2) + curve * u**2
        couch = ((v - plate).abs() <= thick / 2) & (u.abs() <= rng.u(0.8, 1.2) * a0)
        cv.paint(full, couch, SOFT, rng.u(-200.0, 250.0))

    # Spine geometry (needed by lungs, aorta and screws).
    rv_u, rv_v = rng.u(19.0, 26.0) * sc, rng.u(15.0, 21.0) * sc  # vertebral body semi-axes (thoracolumbar)
    vb_v = -b_in + rng.u(45.0, 60.0) * sc  # vertebral body centre, posterior
    canal_r = rng.u(7.0, 10.0) * sc
    canal_v = vb_v - rv_v - canal_r * 0.9
    height, disc = rng.u(18.0, 26.0) * sc, rng.u(5.0, 9.0) * sc
    pitch = height + disc
    z0 = rng.u(0.0, pitch)

    # Lungs: two ellipsoids in the upper part of the section, inside the ribs, beside the spine and heart.
    lung_top = rng.u(0.6, 1.0) * zlen / 2 + 40.0 * sc
    lung_zlen = rng.u(0.5, 0.9) * zlen
    lz = lung_top - lung_zlen / 2
    lung_hu = rng.rng(opt.lung_hu)
    lungs = []
    for side in (-1.0, 1.0):
        au, av = rng.u(0.30, 0.40) * a_in, rng.u(0.55, 0.70) * b_in
        cu = side * (rng.u(0.42, 0.52) * a_in)
        c = (cu, rng.u(-0.05, 0.10) * b_in, lz)
        lungs.append((c, (au, av, lung_zlen / 2)))
        cv.ellipsoid(c, (au, av, lung_zlen / 2), LUNG, lung_hu + rng.u(-30, 30))
    # Heart between the lungs (blood and myocardium, soft tissue); lower end in the lung z range.
    heart_c = (rng.u(-15, 15) * sc, rng.u(0.15, 0.35) * b_in, lz - rng.u(0.1, 0.3) * lung_zlen)
    heart_axes = (rng.u(40, 55) * sc, rng.u(35, 50) * sc, rng.u(40, 60) * sc)
    cv.ellipsoid(heart_c, heart_axes, SOFT, rng.u(30.0, 50.0))
    if contrast:  # the chambers' blood pool enhances like the aorta; the myocardium stays soft tissue
        for _ in range(rng.int(1, 3)):
            offset = tuple(rng.u(-0.35, 0.35) * a for a in heart_axes)
            chamber = tuple(rng.u(0.3, 0.5) * a for a in heart_axes)
            centre_c = tuple(c + o for c, o in zip(heart_c, offset, strict=True))
            cv.ellipsoid(centre_c, chamber, CONTRAST, rng.rng(opt.contrast_hu))

    # Lung vessels: the intersection of the zero sets of two smooth random fields is a network of thin curved tubes.
    for c, axes in lungs:
        sl = cv.box(*c, max(axes[:2]), axes[2])
        box_shape = tuple(s.stop - s.start for s in sl)
        if min(box_shape) < 2:
            continue
        cells = tuple(max(2, round(n * cv.spacing[i] / (28.0 * sc))) for i, n in enumerate(box_shape))
        f1 = _smooth_field(rng, box_shape, cells, device)
        f2 = _smooth_field(rng, box_shape, cells, device)
        t = rng.u(0.22, 0.32)
        vessels = (f1.abs() < t) & (f2.abs() < t) & (cv.lab[sl] == LUNG)
        cv.paint(sl, vessels, SOFT, rng.u(30.0, 50.0))

    # Vertebrae: a column of elliptic bodies separated by discs, with an arch, a spinous and transverse processes.
    zmod = torch.remainder(cv.z - z0, pitch)
    in_vert = zmod < height
    sl = cv.box(0.0, (vb_v + canal_v) / 2 - 10 * sc, 0.0, 60.0 * sc + rv_u, zlen)
    su, sv, sz = cv.sub(sl)
    zin = in_vert[:, :, sl[2]]
    zm = zmod[:, :, sl[2]]
    q_body = (su / rv_u) ** 2 + ((sv - vb_v) / rv_v) ** 2
    cv.paint(sl, (q_body <= 1.0) & ~zin, SOFT, rng.u(70.0, 100.0))  # intervertebral discs
    shell = rng.u(1.2, 2.5) * max(sc, 0.7)  # cortical thickness (mm); kept near real size, it is already thin
    if osteoporotic:
        shell *= rng.u(0.6, 1.0)  # osteoporosis also thins the cortex
    interior_hu = rng.rng(opt.osteoporotic_hu if osteoporotic else opt.trabecular_hu)
    cortical_hu = rng.rng(opt.cortical_hu)
    inner = (
        ((su / (rv_u - shell)) ** 2 + ((sv - vb_v) / (rv_v - shell)) ** 2 <= 1.0) & (zm > shell) & (zm < height - shell)
    )
    cv.paint(sl, (q_body <= 1.0) & zin, BONE, cortical_hu)
    cv.paint(sl, inner & zin, BONE, interior_hu)
    # Posterior elements are thin and mostly cortical, with a lower mean than the cortex itself.
    post_hu = rng.u(0.45, 0.75) * cortical_hu
    r_canal = torch.sqrt(su**2 + (sv - canal_v) ** 2)
    arch_t = rng.u(4.0, 6.0) * sc
    arch = (r_canal >= canal_r) & (r_canal <= canal_r + arch_t) & (sv <= vb_v - rv_v * 0.5)
    spinous = (su.abs() <= 3.0 * sc) & (sv <= canal_v - canal_r) & (sv >= canal_v - canal_r - rng.u(25, 40) * sc)
    trans_len = rng.u(20, 30) * sc
    transverse = (su.abs() >= canal_r) & (su.abs() <= canal_r + trans_len) & ((sv - canal_v).abs() <= 3.5 * sc)
    pz = zin & (zm > 0.15 * height) & (zm < 0.85 * height)
    cv.paint(sl, (arch | spinous | transverse) & pz, BONE, post_hu)
    cv.paint(sl, (r_canal < canal_r) & pz, SOFT, rng.u(10.0, 35.0))  # spinal canal: CSF and cord

    # Ribs: thin tubes on an ellipse inside the muscle wall, one every ``rib_pitch`` mm, descending anteriorly.
    rib_pitch = rng.u(26.0, 34.0) * sc
    rib_drop = rng.u(20.0, 45.0) * sc
    rib_r, rib_h = rng.u(2.5, 4.0) * sc, rng.u(4.0, 6.5) * sc  # radial half-thickness, cranio-caudal half-height
    inset = rng.u(4.0, 10.0) * sc + rib_r
    rib_z = (lz - lung_zlen / 2 - 20 * sc, lz + lung_zlen / 2 + 10 * sc)
    k0 = max(0, math.floor((rib_z[0] + zlen / 2) / cv.spacing[2]))
    k1 = min(cv.shape[2], math.ceil((rib_z[1] + zlen / 2) / cv.spacing[2]))
    if k1 > k0:
        slr = (slice(None), slice(None), slice(k0, k1))
        ar, br = ai[:, :, k0:k1] - inset, bi[:, :, k0:k1] - inset
        rho = torch.sqrt((u / ar) ** 2 + (v / br) ** 2)
        radial = (rho - 1.0) * (ar + br) / 2
        phi = torch.atan2(u, -v).abs()  # 0 at the spine, pi at the sternum
        zeta = cv.z[:, :, k0:k1] + rib_drop * phi / math.pi - rng.u(0.0, rib_pitch)
        dz = torch.remainder(zeta + rib_pitch / 2, rib_pitch) - rib_pitch / 2
        ribs = ((radial / rib_r) ** 2 + (dz / rib_h) ** 2 <= 1.0) & (phi > 0.25) & (phi < rng.u(2.2, 2.6))
        cv.paint(slr, ribs, BONE, rng.rng(opt.rib_hu))

    # Flat and tubular bones of the chest wall, which a section often cuts (the first trained network missed the
    # chest CT's scapulae and clavicles): sternum (anterior midline), scapulae (thin plates behind the ribs, upper
    # half), clavicles (tubes at the top, running laterally and back). Cortical HU lowered by their thinness.
    if rng.bern(0.8):
        zs = rng.u(-0.5, 0.2) * zlen
        cv.capsule((0.0, b_in - 9.0 * sc, zs), (0.0, b_in - 9.0 * sc, zs + rng.u(0.4, 0.9) * zlen),
                   rng.u(5.0, 8.0) * sc, BONE, rng.u(250.0, 700.0))  # fmt: skip
    for side in (-1.0, 1.0):
        if rng.bern(0.6):
            centre_s = (side * rng.u(0.45, 0.62) * a_in, -rng.u(0.55, 0.75) * b0, rng.u(0.0, 0.5) * zlen)
            cv.ellipsoid(centre_s, (rng.u(30, 45) * sc, rng.u(3.0, 6.0) * sc, rng.u(45, 70) * sc), BONE,
                         rng.u(300.0, 900.0))  # fmt: skip
        if rng.bern(0.4):
            z_top = rng.u(0.25, 0.5) * zlen
            start = (side * rng.u(8.0, 15.0) * sc, rng.u(0.55, 0.75) * b_in, z_top)
            end = (side * rng.u(0.7, 0.85) * a_in, rng.u(0.0, 0.3) * b_in, z_top + rng.u(-10.0, 10.0) * sc)
            cv.capsule(start, end, rng.u(5.0, 8.0) * sc, BONE, rng.u(500.0, 1100.0))

    # Aorta left-anterior of the spine, wobbling along z, with a few branches; contrast-filled or plain blood.
    vessel_label, vessel_hu = (CONTRAST, rng.rng(opt.contrast_hu)) if contrast else (SOFT, rng.u(30.0, 50.0))
    ra = rng.u(10.0, 15.0) * sc
    au0, av0 = rng.u(0.2, 0.8) * rv_u, vb_v + rv_v + ra + rng.u(1.0, 6.0) * sc
    wob, wph = rng.u(2.0, 6.0) * sc, rng.u(0, 2 * math.pi)
    sl = cv.box(au0, av0, 0.0, ra + wob + 1.0, zlen)
    su, sv, sz = cv.sub(sl)
    cu_z = au0 + wob * torch.sin(2 * math.pi * sz / zlen + wph)
    cv.paint(sl, (su - cu_z) ** 2 + (sv - av0) ** 2 <= ra * ra, vessel_label, vessel_hu)
    for _ in range(rng.int(2, 5)):
        zb = rng.u(-0.4, 0.4) * zlen
        ang = rng.u(-0.3 * math.pi, 1.3 * math.pi)  # anterior and lateral, not into the spine
        length = rng.u(30.0, 70.0) * sc
        start = (au0 + wob * math.sin(2 * math.pi * zb / zlen + wph), av0, zb)
        end = (start[0] + length * math.cos(ang), start[1] + length * math.sin(ang), zb + rng.u(-20, 20) * sc)
        cv.capsule(start, end, rng.u(2.5, 5.0) * sc, vessel_label, vessel_hu)

    # Titanium pedicle screws: through the pedicles into a vertebral body, converging anteriorly, in one axial plane.
    rods = []
    if metal:
        # A vertebra well inside the section, so that the screws are not cut by the volume's ends.
        k_lo = math.ceil((-0.3 * zlen - z0) / pitch)
        k = rng.int(k_lo, max(k_lo, math.floor((0.3 * zlen - z0 - height) / pitch)))
        zm_mid = z0 + k * pitch + height / 2
        r_rod = rng.u(2.5, 3.5)  # screws are 5-7 mm in diameter; kept at real size
        metal_hu = rng.rng(opt.metal_hu)
        sides = (-1.0, 1.0) if rng.bern(0.7) else ((-1.0,) if rng.bern(0.5) else (1.0,))
        conv = math.radians(rng.u(8.0, 20.0))
        length = rng.u(0.8, 1.0) * (vb_v + rv_v * 0.6 - (canal_v - canal_r))
        for side in sides:
            p0 = (side * (canal_r + arch_t * 0.6), canal_v - canal_r, zm_mid)
            p1 = (p0[0] - side * length * math.sin(conv), p0[1] + length * math.cos(conv), zm_mid)
            cv.capsule(p0, p1, r_rod, METAL, metal_hu)
            rods.append((p0, p1, r_rod))

    # Partial volume: average the HU of each f^3 block; the label is the block's majority (ties to the denser class).
    n0, n1, n2 = shape
    hu = F.avg_pool3d(cv.hu[None, None], f)[0, 0]
    labels = _majority(cv.lab, f)
    del cv

    # Acquisition effects on the HU only, at the final resolution.
    fu, fv = _final_uv(shape, spacing, theta, centre, device)
    fz = ((torch.arange(n2, device=device, dtype=torch.float32) + 0.5 - n2 / 2) * spacing[2])[None, None, :]
    fa = a0 * (1 + amp_a * torch.sin(2 * math.pi * freq * fz / zlen + ph_a))
    fb = b0 * (1 + amp_b * torch.sin(2 * math.pi * freq * fz / zlen + ph_b))
    rho2 = (fu / fa) ** 2 + (fv / fb) ** 2
    body = rho2 <= 1.0

    # Tissue texture: slow inhomogeneity in soft tissue, stronger in the lung (dependent density, fibrosis).
    tex = _smooth_field(
        rng, shape, tuple(max(2, round(n * s / 40.0)) for n, s in zip(shape, spacing, strict=True)), device
    )
    hu = hu + tex * (rng.u(3.0, 10.0) * (labels == SOFT) + rng.u(25.0, 55.0) * (labels == LUNG))
    hu = _gaussian_blur(hu, rng.rng(opt.blur_sigma_vox))

    # Cupping: beam hardening darkens the centre of the body by a few tens of HU.
    hu = hu - rng.rng(opt.cupping_hu) * (1.0 - rho2).clamp_min(0.0)

    # Beam-hardening streaks. Bone: a faint dark band joining the vertebral body and the transverse processes /
    # ribs, in the slices of the vertebrae. Metal: a dark band between two screws and dark and bright rays.
    streak_amp = rng.rng(opt.streak_hu)
    streak = torch.zeros_like(hu)
    du, dv = fu, fv - vb_v
    in_vert_f = (torch.remainder(fz - z0, pitch) < height).float()
    streak = streak - 0.2 * streak_amp * _band(du, dv, rng.u(-0.15, 0.15), 2.0 * sc + 1.0, a0, False) * in_vert_f
    for i, (p0, p1, r_rod) in enumerate(rods):
        mu, mv = (p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2
        wz = torch.exp(-0.5 * ((fz - p0[2]) / (1.5 * r_rod + spacing[2])) ** 2)
        axis = math.atan2(p1[1] - p0[1], p1[0] - p0[0])
        ray = -0.6 * _band(fu - mu, fv - mv, axis, 2.0, 3 * a0, False)
        for _ in range(rng.int(2, 4)):
            ray = ray + rng.u(-0.8, 0.6) * _band(fu - mu, fv - mv, rng.u(0, 2 * math.pi), rng.u(1.5, 3.0), a0, True)
        streak = streak + streak_amp * ray * wz
        if i == 1:
            (q0, q1, _), (o0, o1, _) = rods
            ou, ov = (q0[0] + q1[0]) / 2, (q0[1] + q1[1]) / 2
            gap = math.hypot(mu - ou, mv - ov)
            w = _band(fu - (mu + ou) / 2, fv - (mv + ov) / 2, math.atan2(mv - ov, mu - ou), r_rod + 1.0, gap, False)
            streak = streak - streak_amp * w * wz
    hu = hu + streak * body

    # Quantum noise, optionally correlated by a small blur (the reconstruction kernel), rescaled to its std.
    sigma_n = rng.rng(opt.noise_hu)
    noise = rng.randn(shape, device)
    if rng.bern(opt.p_correlated_noise):
        noise = _gaussian_blur(noise, rng.u(0.5, 0.8))
        noise = noise / noise.std().clamp_min(1e-6)
    hu = hu + sigma_n * noise
    # Last, the scanner's range: metal (and its partial-volume halo) saturates at the top, air at the bottom.
    hu = hu.clamp(opt.clip_hu[0], opt.clip_hu[1])

    return Phantom(
        hu=hu.contiguous().float(),
        labels=labels.long(),
        spacing_mm=spacing,
        osteoporotic=osteoporotic,
        contrast=contrast,
        metal=bool(rods),
    )


def _majority(lab: Tensor, f: int) -> Tensor:
    """Majority label of each f^3 block of a uint8 [fI, fJ, fK] map: int64 [I, J, K]; ties go to the higher class.

    Each class is coded as a base-16 digit (16^c), so one pooled sum holds every class's count at once; the sums are
    exact in float32 for 6 classes and f = 2 (8 * 16^5 = 2^23), and in float64 otherwise.
    """
    n = len(MATERIAL_CLASSES)
    if f == 1:
        return lab.long()
    base = 1 << (f**3).bit_length()  # a power of two above f^3, so that a digit holds any count
    dtype = torch.float32 if base ** (n - 1) * f**3 <= 2**24 else torch.float64
    digits = torch.tensor([float(base) ** c for c in range(n)], device=lab.device, dtype=dtype)
    sums = F.avg_pool3d(digits[lab.int()][None, None], f, divisor_override=1)[0, 0].to(torch.int64)
    shift = base.bit_length() - 1
    best = torch.zeros_like(sums)
    best_count = torch.full_like(sums, -1)
    for c in range(n):
        count = (sums >> (shift * c)) & (base - 1)
        better = count >= best_count  # >= : ties go to the later (denser, rarer) class
        best = torch.where(better, c, best)
        best_count = torch.where(better, count, best_count)
    return best


def _final_uv(shape, spacing, theta, centre, device) -> tuple[Tensor, Tensor]:
    """Body-frame in-plane coordinates (mm) of the final voxel centres: [I, J, 1] each."""
    x = (torch.arange(shape[0], device=device, dtype=torch.float32) + 0.5 - shape[0] / 2) * spacing[0] - centre[0]
    y = (torch.arange(shape[1], device=device, dtype=torch.float32) + 0.5 - shape[1] / 2) * spacing[1] - centre[1]
    c, s = math.cos(theta), math.sin(theta)
    return (c * x[:, None] + s * y[None, :])[:, :, None], (-s * x[:, None] + c * y[None, :])[:, :, None]

"""On-the-fly DRR training data: a map-style ``Dataset`` of random C-arm views with random physics.

Each item is rendered from its own parameters (``torchdrr.data.sampling``), so it does not depend on the batch, the
worker or the rank that renders it. Two ways to use it:

* **CPU rendering in DataLoader workers**: ``DataLoader(DRRDataset(..., device="cpu"), num_workers=n)``. Each worker
  loads the CTs itself, the first time it needs them.
* **GPU rendering in the main process** (fast): let the loader yield indices and call ``render_batch(indices)`` on
  the GPU, which casts the rays of a whole batch of poses in one op call per CT (``DRRDataModule`` does this in
  ``on_after_batch_transfer``). Never render on CUDA inside forked workers: CUDA cannot be re-initialised after a
  fork, and ``__getitem__`` refuses it with an explanation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from torchdrr.drr import DRR
from torchdrr.geometry import Camera, carm_extrinsics, intrinsic_matrix
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.physics.noise import Noise
from torchdrr.physics.spectra import spectrum

from .sampling import PhysicsDistribution, PoseDistribution, SampleParameters, sample_parameters

__all__ = ["DRRDataset"]

#: Default detector field (rows, columns) in mm at the detector.
DEFAULT_FIELD_MM = (300.0, 300.0)


class DRRDataset(torch.utils.data.Dataset):
    """Random C-arm DRRs of one or more CTs.

    Args:
        cts: CT files (NIfTI, NRRD, DICOM folder) or ``Volume`` objects; default the bundled chest CT.
        length: number of samples.
        seed: the set's seed; sample ``i`` is a pure function of ``(seed, i)``.
        ct_weights: relative sampling weight of each CT (default equal).
        poses: C-arm pose ranges.
        physics: beam, dose and noise ranges.
        height, width: detector pixels.
        pixel_spacing_mm: (row, column) pitch in mm; default a 300 x 300 mm field.
        landmarks: 3D points to project, world mm: one ``[L, 3]`` tensor per CT (same L for every CT), or one tensor
            for a single CT, or None.
        output: the DRR output mode ("line_integral" default, "intensity", "flat_field").
        device: where ``__getitem__`` and ``render_batch`` render.
        dtype: float32 (default) or float64.
        noise: the noise model of noisy samples (default compound Poisson per 10 keV group, 2 photons of electronic
            noise, 0.5 px blur: the radiography/fluoroscopy presets' detector).
        drr_options: more ``DRR`` keyword arguments (segmentation, detector, mode, supersample, ...).

    Items are dicts: ``image`` ``[K, H, W]`` float32; the geometry ``K`` ``[3, 3]``, ``R`` ``[3, 3]``, ``t`` ``[3]``,
    ``P`` ``[3, 4]`` (float64; ``P = K [R | t]``); ``landmarks_2d`` ``[L, 2]`` (u = column, v = row, pixels) and
    ``landmarks_visible`` ``[L]``; and the sample's parameters (``index``, ``ct_index``, angles, ``translation_mm``,
    ``sdd_mm``, ``sod_mm``, ``kvp``, ``filtration_mm_al``, ``photons_behind_patient``, ``noisy``, ``noise_seed``).
    """

    def __init__(
        self,
        cts: Sequence[str | Path | Volume] | str | Path | Volume | None = None,
        *,
        length: int = 1000,
        seed: int = 0,
        ct_weights: Sequence[float] | None = None,
        poses: PoseDistribution | None = None,
        physics: PhysicsDistribution | None = None,
        height: int = 256,
        width: int = 256,
        pixel_spacing_mm: tuple[float, float] | None = None,
        landmarks: Sequence[Tensor] | Tensor | None = None,
        output: str = "line_integral",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        noise: Noise | None = None,
        drr_options: dict | None = None,
    ) -> None:
        super().__init__()
        if cts is None:
            cts = [bundled_ct_path()]
        elif isinstance(cts, (str, Path, Volume)):
            cts = [cts]
        self.cts = list(cts)
        if not self.cts:
            raise ValueError("cts must name at least one CT")
        for ct in self.cts:
            if not isinstance(ct, (str, Path, Volume)):
                raise TypeError(f"cts must be paths or Volume objects, got {type(ct).__name__}")
            if not isinstance(ct, Volume) and not Path(ct).exists():
                raise FileNotFoundError(f"CT not found: {ct}")
        if isinstance(length, bool) or int(length) != length or length < 0:
            raise ValueError(f"length must be a whole number >= 0, got {length!r}")
        self.length = int(length)
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        self.seed = int(seed)
        weights = [1.0] * len(self.cts) if ct_weights is None else [float(w) for w in ct_weights]
        if (
            len(weights) != len(self.cts)
            or any(not (math.isfinite(w) and w >= 0) for w in weights)
            or sum(weights) <= 0
        ):
            raise ValueError(
                f"ct_weights must be {len(self.cts)} non-negative numbers (one per CT), not all zero, "
                f"got {ct_weights!r}"
            )
        self.ct_weights = weights
        self.poses = poses if poses is not None else PoseDistribution()
        self.physics = physics if physics is not None else PhysicsDistribution()
        if not isinstance(self.poses, PoseDistribution) or not isinstance(self.physics, PhysicsDistribution):
            raise TypeError("poses must be a PoseDistribution and physics a PhysicsDistribution")
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"height and width must be >= 1 pixel, got {height} x {width}")
        self.height, self.width = int(height), int(width)
        if pixel_spacing_mm is None:
            pixel_spacing_mm = (DEFAULT_FIELD_MM[0] / self.height, DEFAULT_FIELD_MM[1] / self.width)
        spacing = tuple(float(v) for v in pixel_spacing_mm)
        if len(spacing) != 2 or any(not (math.isfinite(v) and v > 0) for v in spacing):
            raise ValueError(f"pixel_spacing_mm must be two positive pitches in mm, got {pixel_spacing_mm!r}")
        self.pixel_spacing_mm = spacing
        self.landmarks = self._check_landmarks(landmarks)
        self.output = output
        self.device = torch.device(device)
        self.dtype = dtype
        self.noise = noise if noise is not None else Noise("compound", electronic_std_photons=2.0, blur_sigma_px=0.5)
        self.drr_options = dict(drr_options or {})
        for reserved in ("spectrum", "noise", "photons_per_pixel", "photons_behind_patient", "dtype", "output"):
            if reserved in self.drr_options:
                raise ValueError(f"drr_options must not set {reserved!r}: the dataset sets it per sample")
        self._drrs: dict[int, DRR] = {}
        self._host_drrs: dict[int, DRR] = {}
        # One energy grid for every kVp of the range: the spectrum at the highest kVp fixes it.
        self._grid_kvp = math.ceil(self.physics.kvp[1])
        self._grid_bins = spectrum(self._grid_kvp)[0].numel()
        self._validate_options()

    # ----------------------------------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------------------------------
    def _check_landmarks(self, landmarks) -> list[Tensor] | None:
        if landmarks is None:
            return None
        if isinstance(landmarks, Tensor):
            landmarks = [landmarks]
        points = [torch.as_tensor(p, dtype=torch.float64) for p in landmarks]
        if len(points) != len(self.cts):
            raise ValueError(f"landmarks: give one [L, 3] tensor per CT ({len(self.cts)}), got {len(points)}")
        counts = {p.shape[0] if p.dim() == 2 else -1 for p in points}
        if any(p.dim() != 2 or p.shape[1] != 3 for p in points) or len(counts) != 1:
            raise ValueError(
                f"landmarks must be [L, 3] world points in mm with the same L for every CT, got shapes "
                f"{[tuple(p.shape) for p in points]}"
            )
        if any(not bool(torch.isfinite(p).all()) for p in points):
            raise ValueError("landmarks must be finite")
        return points

    def _validate_options(self) -> None:
        """Builds a DRR on a tiny volume with the user's options, so that bad options fail now, not in a worker."""
        self._make_drr(Volume(torch.full((2, 2, 2), -1000.0), torch.eye(4, dtype=torch.float64), source="probe"))

    def _make_drr(self, volume: Volume) -> DRR:
        return DRR(
            volume,
            spectrum=spectrum(self._grid_kvp),  # the energy grid; each sample brings its own weights
            noise=self.noise,
            dtype=self.dtype,
            output=self.output,
            **self.drr_options,
        )

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_drrs"] = {}  # workers load their own CTs (no GPU tensors or big buffers through pickling)
        state["_host_drrs"] = {}
        return state

    def drr(self, ct_index: int, host_only: bool = False) -> DRR:
        """The DRR module of one CT on the dataset's device (loaded on first use in each process). ``host_only``:
        any copy will do (``prepare_batch`` only reads its host-side values), e.g. a worker's CPU copy."""
        if host_only and ct_index not in self._drrs and ct_index in self._host_drrs:
            return self._host_drrs[ct_index]
        if ct_index not in self._drrs:
            ct = self.cts[ct_index]
            volume = ct if isinstance(ct, Volume) else Volume.load(ct, fix_padding=True)
            drr = self._make_drr(volume)
            if host_only and self.device.type != "cpu":
                self._host_drrs[ct_index] = drr  # a worker preparing batches for a GPU: keep the CT on the CPU
                return drr
            self._drrs[ct_index] = drr.to(self.device)
        return self._drrs[ct_index]

    # ----------------------------------------------------------------------------------------------------------------
    # Samples
    # ----------------------------------------------------------------------------------------------------------------
    def parameters(self, index: int) -> SampleParameters:
        """The parameters of sample ``index`` (no rendering)."""
        if isinstance(index, Tensor):
            index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of {self.length} samples")
        return sample_parameters(self.seed, index, self.ct_weights, self.poses, self.physics)

    def camera(self, params: SampleParameters) -> Camera:
        """The camera of one sample (float64, on the dataset's device), from the same host geometry the renders use."""
        host = self._host_values(params, self.drr(params.ct_index, host_only=True))
        camera = Camera(host["K"], host["R"][None], host["t"][None], self.height, self.width, params.sdd_mm)
        return camera.to(self.device)

    def spectrum_weights(self, params: SampleParameters) -> Tensor:
        """The sample's tube spectrum on the dataset's energy grid ``[E]`` (float64, CPU)."""
        _, photons = spectrum(params.kvp, filtration_mm_al=params.filtration_mm_al)
        weights = torch.zeros(self._grid_bins, dtype=torch.float64)
        weights[: photons.numel()] = photons
        return weights

    def __getitem__(self, index: int) -> dict:
        if self.device.type == "cuda" and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "DRRDataset(device='cuda') cannot render in DataLoader workers (CUDA cannot start in a forked "
                "process): render on the CPU in workers, or load indices and call render_batch on the GPU in the "
                "main process (DRRDataModule(render_on='cuda') does this)"
            )
        return self.render_batch([index], stack=False)[0]

    def render_batch(self, indices: Sequence[int] | Tensor, stack: bool = True) -> dict | list[dict]:
        """Renders several samples with one ray-cast call per CT: ``render_prepared(prepare_batch(indices))``.

        Each sample gets exactly the values ``self[i]`` gives, whatever the batch: its geometry is computed on the
        host in float64, its rays with element-wise arithmetic only, and its physics and noise stream are its own.

        Args:
            indices: sample indices.
            stack: return one dict of stacked tensors (``image`` ``[B, K, H, W]`` ...) instead of a list of dicts.
        """
        return self.render_prepared(self.prepare_batch(indices), stack=stack)

    def prepare_batch(self, indices: Sequence[int] | Tensor) -> dict:
        """The host half of ``render_batch``: every sample's parameters, geometry, landmarks and spectrum, in CPU
        tensors (everything of the batch but the images).

        Cheap to pickle, so DataLoader workers can prepare batches in parallel while the main process renders on
        the GPU (``DRRDataModule(render_on="cuda")`` does this). Returns ``{"prepared": True, "params": [plain dict
        per sample], "geometry": {stacked tensors: translation_mm, K, R, t, P, landmarks}, "groups": [{"ct_index",
        "members", "seeds" (noise seeds, or None), "packed" [b, 33 + K + Q * E] float64}]}``.
        """
        if isinstance(indices, Tensor):
            indices = indices.reshape(-1).tolist()
        params = [self.parameters(int(i)) for i in indices]
        geometry: list[dict | None] = [None] * len(params)
        groups = []
        for ct_index in sorted({p.ct_index for p in params}):
            drr = self.drr(ct_index, host_only=True)
            for noisy in (False, True):  # noise changes the energy groups: one vectorised pass per kind
                members = [j for j, p in enumerate(params) if p.ct_index == ct_index and p.noisy == noisy]
                if not members:
                    continue
                host = [self._host_values(params[j], drr) for j in members]
                for j, h in zip(members, host, strict=True):
                    geometry[j] = h
                groups.append({
                    "ct_index": ct_index,
                    "members": members,
                    "seeds": [params[j].noise_seed for j in members] if noisy else None,
                    "packed": torch.stack([h["packed"] for h in host]),
                })  # fmt: skip
        # Plain dicts and tensors, not dataclasses: Lightning's batch transfer rebuilds containers and cannot set the
        # fields of a frozen dataclass.
        return {
            "prepared": True,
            "params": [p.as_dict() for p in params],
            "geometry": _stack([self._geometry(p, g) for p, g in zip(params, geometry, strict=True)]),
            "groups": groups,
        }

    def render_prepared(self, prepared: dict, stack: bool = True) -> dict | list[dict]:
        """The device half of ``render_batch``: the images (``render_images``) with the fields of ``prepared``."""
        images = self.render_images(prepared)
        params, geometry = prepared["params"], prepared["geometry"]
        if stack:
            return {**_stack(params), **geometry, "image": images}
        items = []
        for j, p in enumerate(params):
            items.append({**p, **{key: value[j] for key, value in geometry.items()}, "image": images[j]})
        return items

    def render_images(self, prepared: dict) -> Tensor:
        """The images of a prepared batch, ``[B, K, H, W]`` float32 on ``self.device``: rays, one ray cast per CT
        and the physics.

        On a GPU the host values travel in one pinned copy per group and nothing waits for the device, so the CPU
        queues work while the GPU renders."""
        groups = prepared["groups"]
        count = sum(len(group["members"]) for group in groups)
        images = None
        for group in groups:
            drr = self.drr(group["ct_index"])
            members, packed = group["members"], group["packed"]
            if self.device.type == "cuda" and packed.device.type == "cpu":
                packed = packed.pin_memory().to(self.device, non_blocking=True)
            else:
                packed = packed.to(self.device)
            k_inv, rotation, translation = packed[:, 0:9], packed[:, 9:18], packed[:, 18:21]
            sdd, intrinsics = packed[:, 21:22], packed[:, 22:31].reshape(-1, 3, 3)
            target, mean_energy = packed[:, 31], packed[:, 32]
            channels = drr.detector.channels
            flat_log = packed[:, 33 : 33 + channels]
            rows = packed[:, 33 + channels :].reshape(len(members), -1, self._grid_bins)
            sources, ray_matrices = self._ray_parameters(k_inv, rotation, translation, sdd)
            with torch.no_grad():
                integrals = drr.cast_camera(sources, ray_matrices, self.height, self.width)  # one op call per group
                rendered = drr.detect_samples(
                    integrals, intrinsics, self.height, self.width, rows, flat_log, target, mean_energy, group["seeds"]
                ).to(torch.float32)
            if len(groups) == 1:  # the common case: every sample in one group, in order
                images = rendered
                break
            if images is None:
                images = rendered.new_empty((count, *rendered.shape[1:]))
            images[torch.tensor(members, device=self.device)] = rendered
        return images

    def _host_values(self, params: SampleParameters, drr: DRR) -> dict:
        """A sample's geometry and physics, computed on the host in float64 (per sample, so batch-independent)."""
        isocenter = drr.volume_center + torch.tensor(params.translation_mm, dtype=torch.float64)
        rotation, translation = carm_extrinsics(
            params.primary_deg, params.secondary_deg, params.sod_mm, isocenter, params.inplane_deg
        )
        intrinsics = intrinsic_matrix(params.sdd_mm, self.height, self.width, self.pixel_spacing_mm)
        rows, flat_log, mean_energy = drr.sample_rows(self.spectrum_weights(params))
        packed = torch.cat([
            torch.linalg.inv(intrinsics).reshape(9), rotation.reshape(9), translation.reshape(3),
            torch.tensor([params.sdd_mm], dtype=torch.float64), intrinsics.reshape(9),
            torch.tensor([params.photons_behind_patient, mean_energy], dtype=torch.float64), flat_log, rows.reshape(-1),
        ])  # fmt: skip
        return {"packed": packed, "K": intrinsics, "R": rotation[0], "t": translation[0]}

    def _ray_parameters(self, k_inv: Tensor, rotation: Tensor, translation: Tensor, sdd: Tensor):
        """Sources ``[b, 3]`` (``-R^T t``) and ray matrices ``[b, 3, 3]`` (``SDD R^T K^-1``, world mm) of ``b`` samples
        for ``torchdrr.ops.camera_raycast``, computed element-wise (products then a sum over a dimension of 3, no
        batched matrix product) so that a sample's rays do not depend on the other samples in the batch."""
        r = rotation.reshape(-1, 3, 3)  # R[i, j]
        k = k_inv.reshape(-1, 3, 3)  # K^-1[i, c]
        # (R^T K^-1)[j, c] = sum_i R[i, j] K^-1[i, c]
        ray_matrices = sdd.reshape(-1, 1, 1) * (r.unsqueeze(-1) * k.unsqueeze(-2)).sum(1)
        sources = -(r * translation.unsqueeze(-1)).sum(1)  # (R^T t)[j] = sum_i R[i, j] t[i]
        return sources, ray_matrices

    def _geometry(self, params: SampleParameters, host: dict) -> dict:
        """A sample's tensor fields but its image: translation, K, R, t, P and the landmarks' projections."""
        item = {"translation_mm": torch.tensor(params.translation_mm, dtype=torch.float64)}
        item["K"], item["R"], item["t"] = host["K"], host["R"], host["t"]
        item["P"] = host["K"] @ torch.cat([host["R"], host["t"][:, None]], dim=1)
        if self.landmarks is not None:
            points = self.landmarks[params.ct_index]
            homogeneous = points @ item["P"][:, :3].T + item["P"][:, 3]
            uv = homogeneous[:, :2] / homogeneous[:, 2:]
            depth = points @ item["R"].T + item["t"]  # camera frame: in front of the source when z > 0
            inside = (uv[:, 0] >= -0.5) & (uv[:, 0] <= self.width - 0.5) & (uv[:, 1] >= -0.5)
            inside &= (uv[:, 1] <= self.height - 0.5) & (depth[:, 2] > 0)
            item["landmarks_2d"] = uv.to(torch.float32)
            item["landmarks_visible"] = inside
        return item


def _stack(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out

"""Lightning data layer: ``DRRDataModule`` serves on-the-fly DRRs (``DRRDataset``) to a ``pl.Trainer``.

Two ways to render, chosen by ``render_on``:

* ``"cpu"``: the DataLoader's workers render on the CPU. Each batch is rendered by one ``render_batch`` call in a
  worker (one ray-cast call per CT), so the batch equals ``DRRDataset.render_batch(indices)`` exactly. Workers are
  forked (the default start method on Linux), which is fine for CPU work; CUDA must never be initialised in a
  forked worker (it cannot start after a fork), which is why this path renders on the CPU only.
* ``"cuda"``: rendering runs on the trainer's device in the main process, in ``on_after_batch_transfer``: a
  batched GPU "augmentation transform" that casts the rays of the whole batch in one op call per CT. With
  ``num_workers > 0`` the workers prepare each batch's host half (``DRRDataset.prepare_batch``: parameters, geometry,
  spectra, CPU only, no CUDA in the workers) and the main process only renders (``render_prepared``); with no
  workers the loader yields index batches (``IndexDataset``) rendered by ``RenderIndices``. ``"main"`` does
  the same on any device (``device`` or the trainer's, else the CPU), e.g. to test the GPU path on a CPU machine.
  ``"auto"`` picks ``"cuda"`` when a GPU and CUDA kernels are available, else ``"cpu"``.

Batches are dicts of stacked tensors (see ``DRRDataset``: ``image`` ``[B, K, H, W]``, ``K``, ``R``, ``t``, ``P``,
``landmarks_2d`` ``[B, L, 2]``, ``landmarks_visible`` ``[B, L]``, the sample parameters).

Seeds: the training set uses seed ``2 * seed`` and the validation set ``2 * seed + 1``, so the two never share a
sample stream (and no two DataModule seeds share a set). Every sample is a pure function of its set's seed and its
index, so batches do not depend on workers or on the render path. The shuffled training order is drawn by a
``torch.Generator`` seeded with ``seed`` (fresh for each ``train_dataloader()`` call; under distributed training
Lightning substitutes its own ``DistributedSampler``, whose order comes from the trainer's seed).

The rendering hook is the DataModule's ``on_after_batch_transfer``: Lightning only calls it if the LightningModule
does not override ``on_after_batch_transfer`` itself, and only when the DataModule is given as
``trainer.fit(model, datamodule=dm)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from torchdrr.io import Volume, bundled_ct_path
from torchdrr.physics.noise import Noise

from .dataset import DRRDataset
from .sampling import PhysicsDistribution, PoseDistribution

__all__ = ["DRRDataModule", "IndexDataset", "RenderIndices", "box_landmarks"]

RENDER_ON = ("cpu", "cuda", "auto", "main")
SPLITS = ("train", "val")


def box_landmarks(volume: Volume, fraction: float | Sequence[float] = 0.2) -> Tensor:
    """Eight 3D landmarks inside a CT: the corners of a box about the centre of its voxel grid.

    Corner ``(a, b, c)`` with signs in ``{-1, +1}`` (in ``itertools.product`` order: the k sign varies fastest) lies at
    voxel index ``centre + (a f_i (I - 1), b f_j (J - 1), c f_k (K - 1))`` with ``centre = ((I - 1) / 2, ...)``,
    mapped to world mm by the affine. ``fraction`` 0.2 (default) puts the corners 40 % of the way from the centre to
    the faces of the volume, inside the body for a chest CT.

    Returns:
        ``[8, 3]`` float64 world mm (RAS+).
    """
    f = torch.as_tensor(fraction, dtype=torch.float64).expand(3)
    if not bool(((f >= 0) & (f <= 0.5)).all()):
        raise ValueError(f"fraction must lie in [0, 0.5] (inside the volume), got {fraction!r}")
    extent = torch.tensor([n - 1 for n in volume.shape], dtype=torch.float64)
    centre = extent / 2
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)), dtype=torch.float64)  # [8, 3]
    return volume.voxel_to_world(centre + signs * f * extent)


class IndexDataset(Dataset):
    """A tiny dataset of indices ``0 .. length - 1`` for main-process rendering.

    Items are ``{"index": i, "split": s}`` (``s`` 0 for training, 1 for validation), so the default collate gives
    ``{"index": LongTensor[B], "split": LongTensor[B]}`` and the rendering hook knows which set a batch comes from.
    """

    def __init__(self, length: int, split: int = 0) -> None:
        self.length = int(length)
        self.split = int(split)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} samples")
        return {"index": index, "split": self.split}


class RenderIndices:
    """Renders a batch of sample indices of a ``DRRDataset`` on the dataset's device: a batched GPU transform.

    ``RenderIndices(dataset)(indices)`` equals ``dataset.render_batch(indices)`` with every tensor moved to
    ``dataset.device``. ``indices`` may be a sequence of ints, a tensor (on any device) or an ``IndexDataset``
    batch dict (``{"index": ...}``). Use it without Lightning, e.g.::

        dataset = DRRDataset(..., device="cuda")
        render = RenderIndices(dataset)
        for indices in DataLoader(range(len(dataset)), batch_size=32, shuffle=True):
            batch = render(indices)  # rendered on the GPU in the main process

    Rendering runs without autograd (the images are training inputs, not differentiable outputs).
    """

    def __init__(self, dataset: DRRDataset) -> None:
        if not isinstance(dataset, DRRDataset):
            raise TypeError(f"RenderIndices needs a DRRDataset, got {type(dataset).__name__}")
        self.dataset = dataset

    @property
    def device(self) -> torch.device:
        return self.dataset.device

    def __call__(self, indices: Sequence[int] | Tensor | dict) -> dict:
        if isinstance(indices, dict):
            indices = indices["index"]
        if isinstance(indices, Tensor):
            indices = indices.detach().reshape(-1).cpu().tolist()
        batch = self.dataset.render_batch([int(i) for i in indices])
        return {
            key: value.to(self.device, non_blocking=True) if isinstance(value, Tensor) else value
            for key, value in batch.items()
        }


class _BatchRenderer(Dataset):
    """Wraps a ``DRRDataset`` so that a DataLoader worker renders each batch with one ``render_batch`` call.

    PyTorch's fetcher calls ``__getitems__`` with the batch's indices when it exists; ``_keep_batch`` (the collate
    function) then passes the already stacked batch through.
    """

    def __init__(self, dataset: DRRDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> dict:
        return self.dataset.render_batch(indices)


class _BatchPreparer(Dataset):
    """Wraps a CPU ``DRRDataset`` so that DataLoader workers run ``prepare_batch`` (the host half of rendering:
    parameters, geometry, spectra) in parallel, and the main process only renders on the GPU."""

    def __init__(self, dataset: DRRDataset, split: int) -> None:
        self.dataset = dataset
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        prepared = self.dataset.prepare_batch(indices)
        prepared["split"] = self.split
        return prepared


def _keep_batch(batch: dict) -> dict:
    """Collate function of ``_BatchRenderer``: the batch is already stacked (module level, so workers can pickle)."""
    return batch


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    import torchdrr

    return bool(torchdrr.build_info().get("cuda_kernels", False))


class DRRDataModule(pl.LightningDataModule):
    """On-the-fly random C-arm DRRs for a ``pl.Trainer``: training and validation ``DRRDataset`` s.

    Args:
        cts: CT files or ``Volume`` objects (default the bundled chest CT).
        train_length, val_length: samples per epoch of each set (``val_length`` 0: no validation loader).
        seed: the DataModule's seed (training set ``2 * seed``, validation set ``2 * seed + 1``, shuffle order
            ``seed``).
        batch_size: samples per batch.
        num_workers: DataLoader workers (``render_on="cpu"``: they render; main-process paths: they only load
            indices, 0 is best).
        render_on: "cpu" (workers render on the CPU), "cuda" (main process renders on the trainer's GPU in
            ``on_after_batch_transfer``), "main" (main process renders on ``device``, the trainer's device or the
            CPU) or "auto" ("cuda" if available, else "cpu").
        device: the rendering device of the main-process paths (default the trainer's root device; standalone,
            "cuda" for ``render_on="cuda"`` and "cpu" for "main").
        shuffle: shuffle the training set (seeded); validation is never shuffled.
        drop_last: drop the last incomplete training batch.
        pin_memory: pin CPU-rendered batches (default: when CUDA is available and the workers render).
        height, width, pixel_spacing_mm, poses, physics, landmarks, output, noise, drr_options, ct_weights, dtype:
            ``DRRDataset`` options, shared by both sets.
    """

    def __init__(
        self,
        cts: Sequence[str | Path | Volume] | str | Path | Volume | None = None,
        *,
        train_length: int = 1000,
        val_length: int = 64,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        render_on: str = "auto",
        device: torch.device | str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool | None = None,
        height: int = 256,
        width: int = 256,
        pixel_spacing_mm: tuple[float, float] | None = None,
        poses: PoseDistribution | None = None,
        physics: PhysicsDistribution | None = None,
        landmarks: Sequence[Tensor] | Tensor | None = None,
        output: str = "line_integral",
        noise: Noise | None = None,
        drr_options: dict | None = None,
        ct_weights: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if render_on not in RENDER_ON:
            raise ValueError(f"render_on must be one of {RENDER_ON}, got {render_on!r}")
        if render_on == "auto":
            render_on = "cuda" if _cuda_ready() else "cpu"
        self.render_on = render_on
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        self.seed = int(seed)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.num_workers = int(num_workers)
        self.device = None if device is None else torch.device(device)
        if self.render_on == "cpu" and self.device is not None and self.device.type != "cpu":
            raise ValueError("render_on='cpu' renders in DataLoader workers on the CPU; device must be None or 'cpu'")
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if pin_memory is None:
            pin_memory = self.render_on == "cpu" and torch.cuda.is_available()
        self.pin_memory = bool(pin_memory)
        self.lengths = {"train": int(train_length), "val": int(val_length)}
        self.dataset_options = dict(
            cts=cts,
            ct_weights=ct_weights,
            poses=poses,
            physics=physics,
            height=height,
            width=width,
            pixel_spacing_mm=pixel_spacing_mm,
            landmarks=landmarks,
            output=output,
            dtype=dtype,
            noise=noise,
            drr_options=drr_options,
        )
        # The CPU datasets (render_on="cpu": workers render them; they also validate the options now).
        self.datasets: dict[str, DRRDataset] = {split: self._make_dataset(split, "cpu") for split in SPLITS}
        self._renderers: dict[tuple[str, torch.device], RenderIndices] = {}

    # ----------------------------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_bundled(cls, *, landmark_fraction: float | Sequence[float] = 0.2, **kwargs) -> DRRDataModule:
        """A DataModule of the bundled chest CT with its eight ``box_landmarks`` (corners of a box about the centre
        of the CT, ``landmark_fraction`` of the volume's extent from it along each voxel axis). Other keyword
        arguments are ``DRRDataModule``'s."""
        if "cts" in kwargs or "landmarks" in kwargs:
            raise TypeError("from_bundled sets cts and landmarks itself")
        volume = Volume.load(bundled_ct_path(), fix_padding=True)
        return cls(volume, landmarks=box_landmarks(volume, landmark_fraction), **kwargs)

    @staticmethod
    def split_seed(seed: int, split: str) -> int:
        """The ``DRRDataset`` seed of a split: ``2 * seed`` for "train", ``2 * seed + 1`` for "val"."""
        return 2 * int(seed) + SPLITS.index(split)

    def _make_dataset(self, split: str, device: torch.device | str) -> DRRDataset:
        return DRRDataset(
            length=self.lengths[split], seed=self.split_seed(self.seed, split), device=device, **self.dataset_options
        )

    @property
    def train_dataset(self) -> DRRDataset:
        return self.datasets["train"]

    @property
    def val_dataset(self) -> DRRDataset:
        return self.datasets["val"]

    # ----------------------------------------------------------------------------------------------------------------
    # Loaders
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def renders_in_main(self) -> bool:
        """Whether batches are rendered in the main process (``render_on`` "cuda" or "main")."""
        return self.render_on in ("cuda", "main")

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        generator = torch.Generator().manual_seed(self.seed) if (train and self.shuffle) else None
        if self.render_on == "cuda" and self.num_workers > 0:
            # Workers prepare the host half of each batch; the main process renders it on the GPU.
            dataset = _BatchPreparer(self._make_dataset(split, "cpu"), SPLITS.index(split))
            collate_fn = _keep_batch
            pin_memory = True
        elif self.renders_in_main:
            dataset = IndexDataset(self.lengths[split], SPLITS.index(split))
            collate_fn = None  # default collate: {"index": [B], "split": [B]}
            pin_memory = False  # index batches are a few bytes
        else:
            dataset = _BatchRenderer(self.datasets[split])
            collate_fn = _keep_batch
            pin_memory = self.pin_memory
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and self.shuffle,
            generator=generator,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        if self.lengths["val"] == 0:
            return []
        return self._loader("val")

    # ----------------------------------------------------------------------------------------------------------------
    # Main-process rendering
    # ----------------------------------------------------------------------------------------------------------------
    def render_device(self) -> torch.device:
        """Where the main-process paths render: ``device``, else the trainer's root device, else "cuda" for
        ``render_on="cuda"`` and "cpu" for "main"."""
        if self.device is not None:
            device = self.device
        elif self.trainer is not None:
            device = self.trainer.strategy.root_device
        else:
            device = torch.device("cuda" if self.render_on == "cuda" else "cpu")
        if self.render_on == "cuda" and device.type != "cuda":
            raise RuntimeError(
                f"render_on='cuda' but the rendering device is {device} (the trainer's device unless `device` is "
                "given): train on a GPU, or use render_on='cpu' (workers) or 'main'"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def renderer(self, split: str = "train") -> RenderIndices:
        """The ``RenderIndices`` transform of a split on ``render_device()`` (its dataset is built on first use)."""
        device = self.render_device()
        key = (split, device)
        if key not in self._renderers:
            self._renderers[key] = RenderIndices(self._make_dataset(split, device))
        return self._renderers[key]

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Main-process paths: renders an index batch (already on the device) with ``RenderIndices``; the
        CPU-worker path returns the batch unchanged."""
        if not self.renders_in_main:
            return batch
        if isinstance(batch, dict) and batch.get("prepared"):  # prepared by the workers: render it here
            renderer = self.renderer(SPLITS[int(batch["split"])])
            rendered = renderer.dataset.render_prepared(batch)
            return {
                key: value.to(renderer.device, non_blocking=True) if isinstance(value, Tensor) else value
                for key, value in rendered.items()
            }
        if not (isinstance(batch, dict) and "index" in batch and "split" in batch):
            return batch
        splits = batch["split"].reshape(-1).unique().tolist()
        if len(splits) != 1:
            raise RuntimeError(f"an index batch mixes samples of several splits: {splits}")
        return self.renderer(SPLITS[int(splits[0])])(batch["index"])

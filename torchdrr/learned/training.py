"""Training the material network on procedural phantoms, with PyTorch Lightning.

The phantoms are generated on the training device inside each step (``make_phantom`` is vectorised torch code), so
the data pipeline costs no worker processes and never limits a GPU. Every phantom comes from its own seed: training
seeds count up from 0, validation seeds start at ``VALIDATION_SEED`` and test seeds at ``TEST_SEED``, so the three
sets never share a phantom.

Reproduce the shipped weights (``torchdrr/assets/material_net.pt``)::

    python -m torchdrr.learned.training --device cuda --steps 20000 --max-minutes 6 --validate-every 400

which writes Lightning checkpoints and CSV logs under ``--log-dir`` and the final weights (float16) to ``--out``
(default: the shipped file). The time budget ends the run (about 3,950 steps on an H100) and its schedule.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .network import MaterialUNet, NetworkSegmentation
from .phantoms import MATERIAL_CLASSES, make_phantom

__all__ = [
    "TEST_SEED",
    "VALIDATION_SEED",
    "MaterialSegmentationModule",
    "PhantomDataModule",
    "PhantomSeeds",
    "dice_per_class",
    "main",
    "train",
]

VALIDATION_SEED = 1_000_000
TEST_SEED = 2_000_000
#: Cross-entropy weights per class (air, lung, soft tissue, bone, contrast, titanium): the small classes (bone about
#: 2 %, contrast 0.3 %, titanium 0.005 % of phantom voxels) would otherwise barely move the loss.
CLASS_WEIGHTS = (1.0, 1.0, 1.0, 2.0, 4.0, 4.0)


class PhantomSeeds(Dataset):
    """Phantom seeds ``first .. first + count - 1``: the phantoms themselves are made on the device in the step."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = int(first), int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.first + index


class PhantomDataModule(pl.LightningDataModule):
    """The phantom seeds of training (0 ..), validation (``VALIDATION_SEED`` ..) and test (``TEST_SEED`` ..), in
    batches; the module turns them into phantoms on its device.

    Args:
        train_phantoms: training seeds (one per sample: crops of a phantom share consecutive seeds' batch slots).
        validation_phantoms: validation seeds.
        test_phantoms: test seeds.
        batch_size: seeds per batch.
    """

    def __init__(self, train_phantoms: int, validation_phantoms: int = 8, test_phantoms: int = 16,
                 batch_size: int = 4) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("train_phantoms", train_phantoms), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.train_phantoms, self.validation_phantoms = int(train_phantoms), int(validation_phantoms)
        self.test_phantoms, self.batch_size = int(test_phantoms), int(batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(PhantomSeeds(0, self.train_phantoms), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(PhantomSeeds(VALIDATION_SEED, self.validation_phantoms), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(PhantomSeeds(TEST_SEED, self.test_phantoms), batch_size=self.batch_size)


def dice_per_class(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Dice coefficient of each class ``[C]`` between two label maps of one shape (1 where a class is absent from
    both: nothing to find and nothing found)."""
    dice = torch.ones(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        p, t = predicted == c, labels == c
        total = int(p.sum()) + int(t.sum())
        if total:
            dice[c] = 2.0 * int((p & t).sum()) / total
    return dice


def _soft_dice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """1 - mean soft Dice over the classes present in the batch (absent classes would reward predicting nothing)."""
    probabilities = logits.softmax(1)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    present = one_hot.sum(dims) > 0
    dice = (2 * intersection + 1.0) / (total + 1.0)
    return 1.0 - dice[present].mean()


class MaterialSegmentationModule(pl.LightningModule):
    """A ``MaterialUNet`` trained on phantoms: cross-entropy plus soft Dice, AdamW with a cosine schedule.

    Args:
        patch: training crop size (voxels, each divisible by 8), cut at random from each phantom.
        spacing_mm: phantom voxel size (mm); the network then sees CTs resampled near it.
        phantom_shape: whole phantoms (voxels): a torso section of full size at ``spacing_mm`` (176 x 2 mm = 352 mm,
            a typical field of view), so the anatomy has its real size in voxels.
        crops_per_phantom: crops cut from each phantom (a phantom costs more to make than a crop to train on).
        batch_size: phantoms per step.
        learning_rate: AdamW's peak learning rate (warm-up over the first 5 % of steps, then cosine to 0).
        total_steps: the schedule's length.
        network_options: ``MaterialUNet`` keyword arguments.
        max_minutes: a time budget: the schedule's progress is the larger of the step fraction and the elapsed
            fraction of this budget (so a run stopped by the budget still ends its cosine decay), None for none.
    """

    def __init__(
        self,
        patch: Sequence[int] = (96, 96, 64),
        spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
        batch_size: int = 4,
        learning_rate: float = 2e-3,
        total_steps: int = 3000,
        network_options: dict | None = None,
        max_minutes: float | None = None,
        phantom_shape: Sequence[int] = (176, 176, 64),
        crops_per_phantom: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.patch = tuple(int(n) for n in patch)
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.phantom_shape = tuple(int(n) for n in phantom_shape)
        if any(p > n for p, n in zip(self.patch, self.phantom_shape, strict=True)):
            raise ValueError(f"patch {self.patch} must fit in phantom_shape {self.phantom_shape}")
        self.crops_per_phantom = int(crops_per_phantom)
        self.network = MaterialUNet(num_classes=len(MATERIAL_CLASSES), **(network_options or {}))

    def forward(self, hu: Tensor) -> Tensor:
        return self.network(hu)

    def _phantoms(self, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """HU ``[B, 1, D, H, W]`` and labels ``[B, D, H, W]`` of random crops of the seeds' phantoms (made on this
        module's device; ``crops_per_phantom`` crops from every ``crops_per_phantom``-th seed's phantom, the crop
        positions drawn from the seed too, so a batch is a function of its seeds)."""
        hu, labels = [], []
        for i, seed in enumerate(seeds.tolist()):
            if i % self.crops_per_phantom == 0:
                phantom = make_phantom(self.phantom_shape, self.spacing_mm, seed=int(seed), device=self.device)
            generator = torch.Generator().manual_seed(int(seed))
            starts = [int(torch.randint(0, n - p + 1, (1,), generator=generator))
                      for n, p in zip(self.phantom_shape, self.patch, strict=True)]  # fmt: skip
            box = tuple(slice(a, a + p) for a, p in zip(starts, self.patch, strict=True))
            hu.append(phantom.hu[box])
            labels.append(phantom.labels[box])
        return torch.stack(hu).unsqueeze(1), torch.stack(labels)

    def training_step(self, seeds: Tensor, batch_index: int) -> Tensor:
        hu, labels = self._phantoms(seeds)
        logits = self(hu)
        weights = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=logits.dtype)
        cross_entropy = F.cross_entropy(logits, labels, weight=weights)
        dice = _soft_dice_loss(logits, labels)
        loss = cross_entropy + dice
        self.log_dict({"train/loss": loss, "train/cross_entropy": cross_entropy, "train/dice_loss": dice},
                      prog_bar=True, batch_size=len(seeds))  # fmt: skip
        return loss

    def validation_step(self, seeds: Tensor, batch_index: int) -> None:
        hu, labels = self._phantoms(seeds)
        predicted = self(hu).argmax(1)
        dice = dice_per_class(predicted.cpu(), labels.cpu(), len(MATERIAL_CLASSES))
        for name, value in zip(MATERIAL_CLASSES, dice.tolist(), strict=True):
            self.log(f"val/dice_{name.replace(' ', '_')}", value, batch_size=len(seeds))
        self.log("val/dice_mean", float(dice.mean()), prog_bar=True, batch_size=len(seeds))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate, weight_decay=1e-4)
        total = max(1, int(self.hparams.total_steps))
        schedule = warmup_cosine_schedule(optimizer, total, max(1, total // 20), self.hparams.max_minutes)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warm_up: int, max_minutes: float | None = None
) -> dict:
    """Lightning's ``lr_scheduler`` entry (stepped every step): a linear warm-up over ``warm_up`` steps, then a cosine
    decay to zero over the remaining steps or over ``max_minutes`` of wall time, whichever runs out first (so a run
    stopped by its time budget still ends at a low learning rate)."""
    budget_s = 60.0 * max_minutes if max_minutes else None
    started: list[float] = []  # the wall time of the first step after the warm-up

    def factor(step: int) -> float:
        if step < warm_up:
            return (step + 1) / warm_up
        progress = (step - warm_up) / max(1, total_steps - warm_up)
        if budget_s is not None:
            if not started:
                started.append(time.perf_counter())
            progress = max(progress, (time.perf_counter() - started[0]) / budget_s)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


def train(
    out: Path,
    steps: int = 3000,
    batch_size: int = 4,
    patch: Sequence[int] = (96, 96, 64),
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    learning_rate: float = 2e-3,
    device: str = "cuda",
    log_dir: Path = Path("lightning_logs/material_net"),
    validation_phantoms: int = 8,
    validate_every: int = 500,
    network_options: dict | None = None,
    progress: bool = True,
    max_minutes: float | None = None,
    phantom_shape: Sequence[int] = (176, 176, 64),
) -> MaterialSegmentationModule:
    """Trains the material network and writes its weights (float16, with its config) to ``out``.

    Args:
        out: the shipped checkpoint (``NetworkSegmentation.save_checkpoint``), written atomically.
        steps: optimisation steps (each ``batch_size`` new phantoms).
        batch_size, patch, spacing_mm, learning_rate, network_options: see ``MaterialSegmentationModule``.
        device: "cuda" or "cpu".
        log_dir: Lightning's CSV logs and checkpoints.
        validation_phantoms: phantoms per validation (seeds from ``VALIDATION_SEED``).
        validate_every: steps between validations.
        progress: Lightning's progress bar.
        max_minutes: stop after this many minutes of training (the learning-rate schedule follows the budget).
        phantom_shape: whole phantoms the crops come from (voxels).

    Returns:
        The trained module.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if len(set(spacing_mm)) != 1:
        raise ValueError(f"spacing_mm must be isotropic (one voxel size is stored), got {tuple(spacing_mm)}")
    if any(int(n) % 8 for n in patch):
        raise ValueError(f"patch sizes must be divisible by 8 (three 2x poolings), got {tuple(patch)}")
    module = MaterialSegmentationModule(
        patch, spacing_mm, batch_size, learning_rate, steps, network_options, max_minutes, phantom_shape
    )
    data = PhantomDataModule(steps * batch_size, validation_phantoms, batch_size=batch_size)
    trainer = pl.Trainer(
        max_steps=steps,
        max_time={"minutes": max_minutes} if max_minutes else None,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision="bf16-mixed" if device.startswith("cuda") else "32-true",
        logger=pl.loggers.CSVLogger(str(log_dir), name=""),
        callbacks=[pl.callbacks.ModelCheckpoint(monitor="val/dice_mean", mode="max", save_last=True)],
        val_check_interval=min(validate_every, steps),
        check_val_every_n_epoch=None,
        enable_progress_bar=progress,
        log_every_n_steps=max(1, min(50, steps // 10)),
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    network = module.network.float().eval().cpu()
    segmentation = NetworkSegmentation(network, MATERIAL_CLASSES, patch=patch, spacing_mm=float(spacing_mm[0]))
    segmentation.save_checkpoint(out, half=True)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torchdrr.learned.training",
        description="Train the material network on procedural phantoms and write the shipped weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("torchdrr/assets/material_net.pt"), help="weights file")
    parser.add_argument("--steps", type=int, default=3000, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=4, help="phantoms per step")
    parser.add_argument("--patch", type=int, nargs=3, default=(96, 96, 64), help="training crop size in voxels")
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=(176, 176, 64), help="phantom size in voxels")
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 2.0), help="phantom voxel size (mm)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-dir", type=Path, default=Path("lightning_logs/material_net"))
    parser.add_argument("--validate-every", type=int, default=500, help="steps between validations")
    parser.add_argument("--max-minutes", type=float, default=None, help="time budget of the training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch_size, args.patch, args.spacing, args.lr, args.device, args.log_dir,
          validate_every=args.validate_every, progress=not args.no_progress, max_minutes=args.max_minutes,
          phantom_shape=args.phantom_shape)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

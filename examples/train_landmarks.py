"""Train a small landmark-heatmap network on on-the-fly DRRs of the bundled chest CT.

Every training sample is a fresh random C-arm view with random physics (``DRRDataModule.from_bundled``): the eight
``box_landmarks`` of the CT are projected into the image, and the network (a tiny U-Net) learns to put a Gaussian
heatmap on each visible one. The loss is the mean squared error between predicted and target heatmaps over the
visible landmarks' channels (landmarks outside the image are masked out).

    python examples/train_landmarks.py --steps 20 --size 64                         # CPU, seconds
    python examples/train_landmarks.py --steps 2000 --size 256 --device cuda --render-on cuda

At the end it prints the throughput (rendered samples / wall time of the fit) and the mean GPU utilisation sampled
during training (``torch.cuda.utilization()``, "n/a" without a GPU or without pynvml).
"""

from __future__ import annotations

import argparse
import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdrr.data.datamodule import DRRDataModule


def heatmaps(landmarks_2d: Tensor, visible: Tensor, height: int, width: int, sigma_px: float) -> Tensor:
    """Target heatmaps ``[B, L, H, W]``: a unit-peak Gaussian at each landmark (u = column, v = row), zero for
    landmarks that are not visible."""
    rows = torch.arange(height, device=landmarks_2d.device, dtype=torch.float32)
    cols = torch.arange(width, device=landmarks_2d.device, dtype=torch.float32)
    u = landmarks_2d[..., 0, None, None].float()
    v = landmarks_2d[..., 1, None, None].float()
    d2 = (cols[None, None, None, :] - u) ** 2 + (rows[None, None, :, None] - v) ** 2
    return torch.exp(-d2 / (2 * sigma_px**2)) * visible[..., None, None].float()


def soft_argmax(logits: Tensor) -> Tensor:
    """Expected (u, v) pixel position ``[B, L, 2]`` under a softmax over each heatmap ``[B, L, H, W]``."""
    b, n, h, w = logits.shape
    p = torch.softmax(logits.reshape(b, n, h * w), dim=-1).reshape(b, n, h, w)
    cols = torch.arange(w, device=logits.device, dtype=logits.dtype)
    rows = torch.arange(h, device=logits.device, dtype=logits.dtype)
    return torch.stack([(p.sum(2) * cols).sum(-1), (p.sum(3) * rows).sum(-1)], dim=-1)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(4, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(4, c_out),
        nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """Two-level U-Net: ``[B, C, H, W]`` image -> ``[B, L, H, W]`` heatmaps (H and W divisible by 4)."""

    def __init__(self, in_channels: int, landmarks: int, width: int = 16) -> None:
        super().__init__()
        self.enc1 = _block(in_channels, width)
        self.enc2 = _block(width, 2 * width)
        self.mid = _block(2 * width, 4 * width)
        self.dec2 = _block(4 * width + 2 * width, 2 * width)
        self.dec1 = _block(2 * width + width, width)
        self.head = nn.Conv2d(width, landmarks, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="bilinear"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear"), e1], 1))
        return self.head(d1)


class LandmarkModel(pl.LightningModule):
    """Heatmap regression of the projected landmarks; logs ``train_loss`` (heatmap MSE) and ``train_px_error``
    (soft-argmax error in pixels over visible landmarks)."""

    def __init__(self, landmarks: int, in_channels: int = 1, lr: float = 2e-3, sigma_px: float = 2.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyUNet(in_channels, landmarks)
        self.losses: list[float] = []
        self.samples = 0
        self.gpu_utilisation: list[float] = []

    @staticmethod
    def normalise(image: Tensor) -> Tensor:
        """Per-image standardisation (line integrals and intensities vary by pose, dose and kVp)."""
        mean = image.mean(dim=(-3, -2, -1), keepdim=True)
        std = image.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-6)
        return (image - mean) / std

    def _step(self, batch: dict) -> tuple[Tensor, Tensor]:
        image = self.normalise(batch["image"].float())
        logits = self.net(image)
        visible = batch["landmarks_visible"]
        target = heatmaps(batch["landmarks_2d"], visible, image.shape[-2], image.shape[-1], self.hparams.sigma_px)
        mask = visible[..., None, None].float()  # only the visible landmarks' channels count
        loss = (((torch.sigmoid(logits) - target) ** 2) * mask).sum() / (mask.sum() * image.shape[-2] * image.shape[-1])
        error = (soft_argmax(logits) - batch["landmarks_2d"]).norm(dim=-1)
        px_error = (error * visible).sum() / visible.sum().clamp_min(1)
        self.samples += image.shape[0]
        return loss * 100.0, px_error  # x100: heatmap MSE is small (the Gaussians cover few pixels)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, px_error = self._step(batch)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("train_px_error", px_error, prog_bar=True, batch_size=batch["image"].shape[0])
        if torch.cuda.is_available() and batch_idx % 5 == 0:
            try:
                self.gpu_utilisation.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # no pynvml / NVML: report n/a
                pass
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, px_error = self._step(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("val_px_error", px_error, batch_size=batch["image"].shape[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--size", type=int, default=128, help="detector pixels (square, divisible by 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="trainer accelerator: cpu, cuda or auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (they render with --render-on cpu)")
    parser.add_argument("--render-on", default="auto", choices=["cpu", "cuda", "auto", "main"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-length", type=int, default=0, help="validation samples (0: no validation)")
    parser.add_argument("--log-dir", default="lightning_logs", help="CSV logs go here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains; returns ``{"losses": [...], "drrs_per_s": float, "gpu_utilisation": str, "samples": int}``."""
    args = parse_args(argv)
    if args.size % 4:
        raise SystemExit("--size must be divisible by 4 (two 2x poolings)")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    accelerator = args.device
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    render_on = args.render_on
    if render_on == "auto":
        render_on = "cuda" if accelerator == "gpu" else "cpu"

    datamodule = DRRDataModule.from_bundled(
        train_length=args.steps * args.batch_size,  # one epoch of exactly --steps batches
        val_length=args.val_length,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.workers,
        render_on=render_on,
        height=args.size,
        width=args.size,
    )
    landmarks = datamodule.train_dataset.landmarks[0].shape[0]
    model = LandmarkModel(landmarks=landmarks, lr=args.lr, sigma_px=max(1.0, args.size / 32))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        logger=pl.loggers.CSVLogger(args.log_dir, name="train_landmarks"),
        log_every_n_steps=max(1, min(10, args.steps // 5)),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    drrs_per_s = model.samples / wall if wall > 0 else math.nan
    utilisation = f"{sum(model.gpu_utilisation) / len(model.gpu_utilisation):.0f} %" if model.gpu_utilisation else "n/a"
    losses = model.losses
    k = max(1, min(3, len(losses)))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"steps {len(losses)}, loss {first:.4f} (mean of first {k}) -> {last:.4f} (last {k}); "
        f"render_on={render_on}, accelerator={accelerator}"
    )
    print(f"DRRs/s: {drrs_per_s:.1f} ({model.samples} samples in {wall:.2f} s of fit)")
    print(f"GPU utilisation: {utilisation}")
    return {"losses": losses, "drrs_per_s": drrs_per_s, "gpu_utilisation": utilisation, "samples": model.samples}


if __name__ == "__main__":
    main()

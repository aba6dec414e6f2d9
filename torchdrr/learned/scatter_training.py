"""Training and evaluating the scatter CNN on Monte Carlo cases (``torchdrr.learned.scatter_data``).

The loss of an image is its squared relative RMSE over the irradiated field, ``sum (S_pred - S_mc)^2 / sum S_mc^2``
(the acceptance metric squared; the Monte Carlo noise of the targets adds a constant to it and no bias), plus the
mean squared error of the log ratio per bin, plus the squared relative error of the mean scatter-to-primary ratio
behind the body (the second acceptance metric). Training mirrors and transposes the images at random (a mirrored
scene scatters the mirrored way; the bins are square, so a transposed scene is a mirrored one too). A tenth of the
training cases validates (the held-out cases are never looked at until the end).
``torchdrr/assets/make_scatter_net.sh`` has the commands that made the shipped weights.

    python -m torchdrr.learned.scatter_training --data data/scatter --out torchdrr/assets/scatter_net.pt
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from .scatter import _LINE_INTEGRAL_SCALE, ScatterCNN, ScatterUNet, network_inputs, predict_ratio, save_network
from .scatter_data import CANVAS, load_cases
from .training import warmup_cosine_schedule

__all__ = ["ScatterModule", "case_tensors", "evaluate_cases", "train"]

#: Scatter-to-flat ratios are floored here before their log (a bin with no tallied scatter is not -inf).
_LOG_FLOOR = 1e-4


def case_tensors(cases: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs [N, 7, CANVAS, CANVAS], targets [N, CANVAS, CANVAS], mask [N, CANVAS, CANVAS])`` of loaded cases."""
    n = cases["transmission"].shape[0]
    rows, cols = cases["field"][:, 0], cases["field"][:, 1]
    index = torch.arange(CANVAS)
    mask = (index[None, :, None] < rows[:, None, None]) & (index[None, None, :] < cols[:, None, None])
    inputs, _ = network_inputs(cases["transmission"].float(), cases["mass_thickness"].float(),
                               cases["scalars"].float(), grid=(CANVAS, CANVAS))  # fmt: skip
    inputs[:, :3] *= mask[:, None]  # the maps are zero outside the field, as on a padded grid at inference
    return inputs, cases["scatter_ratio"].float() * mask, mask.float().reshape(n, CANVAS, CANVAS)


def relative_rmse(predicted: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``[N]`` sqrt(sum mask (p - t)^2 / sum mask t^2) per image."""
    error = ((predicted - target) ** 2 * mask).sum((-2, -1))
    return (error / (target**2 * mask).sum((-2, -1)).clamp_min(1e-30)).sqrt()


#: Bins whose primary transmission is below this are "behind the body" for the mean-SPR figures.
BODY_TRANSMISSION = 0.9


def mean_spr(ratio: Tensor, transmission: Tensor, mask: Tensor) -> Tensor:
    """``[N]`` mean scatter-to-primary ratio over the bins behind the body (field bins with ``T < 0.9``).

    ``ratio``: scatter / flat field ``[N, h, w]``; ``transmission``: primary / flat field; ``mask``: the field."""
    body = mask * (transmission < BODY_TRANSMISSION).to(mask.dtype)
    spr = ratio / transmission.clamp_min(1e-7)
    return (spr * body).sum((-2, -1)) / body.sum((-2, -1)).clamp_min(1.0)


class ScatterModule(pl.LightningModule):
    """Lightning module of the scatter CNN (``ScatterUNet``), trained on the squared relative RMSE."""

    def __init__(
        self,
        widths: tuple[int, ...] = (24, 48, 96, 128),
        learning_rate: float = 2e-3,
        total_steps: int = 10_000,
        weight_decay: float = 1e-5,
        max_minutes: float | None = None,
        spr_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = ScatterUNet(tuple(widths))

    def forward(self, inputs: Tensor) -> Tensor:
        """Scatter-to-flat ratio ``[N, CANVAS, CANVAS]``."""
        return self.network(inputs)[:, 0].clamp(max=5.0).exp()

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_index: int) -> Tensor:
        inputs, targets, mask = batch
        # One of the eight symmetries of the square grid, drawn on the host (no device read in the step).
        flips = [dims for dims, draw in (((-1,), random.random()), ((-2,), random.random())) if draw < 0.5]
        for dims in flips:
            inputs, targets, mask = inputs.flip(dims), targets.flip(dims), mask.flip(dims)
        if random.random() < 0.5:
            inputs, targets, mask = inputs.transpose(-2, -1), targets.transpose(-2, -1), mask.transpose(-2, -1)
        log_predicted = self.network(inputs)[:, 0].clamp(max=5.0)
        predicted = log_predicted.exp()
        relative = (relative_rmse(predicted, targets, mask) ** 2).mean()
        # The log-space term keeps the gradient alive where the prediction is far below the target (the relative
        # MSE's gradient through exp() vanishes there) and weighs the dim bins too.
        log_error = ((log_predicted - targets.clamp_min(_LOG_FLOOR).log()) ** 2 * mask).sum() / mask.sum()
        transmission = (-_LINE_INTEGRAL_SCALE * inputs[:, 0]).exp()
        spr_mc = mean_spr(targets, transmission, mask)
        spr_error = ((mean_spr(predicted, transmission, mask) / spr_mc.clamp_min(1e-6) - 1.0) ** 2).mean()
        loss = relative + log_error + self.hparams.spr_weight * spr_error
        self.log_dict({"train/loss": loss, "train/relative_mse": relative, "train/log_mse": log_error,
                       "train/mean_spr_mse": spr_error}, prog_bar=True)  # fmt: skip
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_index: int) -> None:
        inputs, targets, mask = batch
        self.log("val/relative_rmse", relative_rmse(self(inputs), targets, mask).mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)  # fmt: skip
        total = max(1, int(self.hparams.total_steps))
        schedule = warmup_cosine_schedule(optimizer, total, max(1, total // 50), self.hparams.max_minutes)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


@torch.no_grad()
def evaluate_cases(
    network: ScatterUNet, cases: dict, device: str | torch.device = "cpu", flip_average: bool = False
) -> dict:
    """Per-case and summary figures of the network on Monte Carlo cases.

    Returns a dict with, per case: ``relative_rmse`` of the scatter image; ``mc_noise`` (the target's own relative
    standard error, sqrt(sum err^2 / sum S^2)); ``mean_spr_error`` (relative error of the mean scatter-to-primary
    ratio over the bins behind the body, T < 0.9); ``mean_abs_spr_error`` (sum over those bins of
    |SPR_pred - SPR_mc| / sum of SPR_mc); and the medians, means and maxima of each.
    """
    inputs, targets, mask = case_tensors(cases)
    network = network.to(device).eval()
    predicted = torch.cat([predict_ratio(network, x.to(device), flip_average)[:, 0].cpu()
                           for x in inputs.split(32)])  # fmt: skip
    errors = cases["scatter_ratio_error"].float() * mask
    transmission = cases["transmission"].float()
    body = mask * (transmission < BODY_TRANSMISSION).float()
    spr_pred = predicted / transmission.clamp_min(1e-7)
    spr_mc = targets / transmission.clamp_min(1e-7)
    mean_pred, mean_mc = mean_spr(predicted, transmission, mask), mean_spr(targets, transmission, mask)
    per_case = {
        "relative_rmse": relative_rmse(predicted, targets, mask),
        "mc_noise": ((errors**2).sum((-2, -1)) / (targets**2).sum((-2, -1)).clamp_min(1e-30)).sqrt(),
        "mean_spr_error": (mean_pred - mean_mc).abs() / mean_mc.clamp_min(1e-30),
        "mean_abs_spr_error": ((spr_pred - spr_mc).abs() * body).sum((-2, -1)) / (spr_mc * body).sum((-2, -1)),
        "mean_spr_mc": mean_mc,
        "mean_spr_predicted": mean_pred,
    }
    summary = {"cases": int(inputs.shape[0])}
    for name, values in per_case.items():
        summary[name] = {"median": float(values.median()), "mean": float(values.mean()), "max": float(values.max())}
    summary["per_case"] = {k: [round(float(v), 5) for v in values] for k, values in per_case.items()}
    summary["kvp"] = [round(float(v), 2) for v in cases["scalars"][:, 0]]
    summary["source"] = [p["source"] for p in cases["parameters"]]
    return summary


def train(
    data: Path,
    out: Path,
    epochs: int = 300,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    widths: tuple[int, ...] = (24, 48, 96, 128),
    device: str = "cuda",
    max_minutes: float | None = None,
    log_dir: Path = Path("lightning_logs/scatter_net"),
    seed: int = 0,
    progress: bool = True,
    init: Path | None = None,
    spr_weight: float = 1.0,
) -> dict:
    """Trains the scatter CNN on ``data/train-*.npz`` and evaluates it on ``data/heldout-*.npz``.

    Args:
        data: the folder of the shards (``torchdrr.learned.scatter_data``).
        out: the weights file (float16), written atomically, with the training record in its metadata.
        epochs, batch_size, learning_rate, widths: the optimisation and the network's channel widths.
        device: "cuda" or "cpu".
        max_minutes: stop training after this many minutes.
        log_dir: Lightning's CSV logs.
        seed: seed of the initialisation, the split and the batches.
        progress: Lightning's progress bar.
        init: start from these weights (a checkpoint written by ``save_network``, e.g. an earlier run's) instead
            of a random initialisation.
        spr_weight: weight of the mean-SPR term of the loss.

    Returns:
        The record written into the weights' metadata: training time, the validation and held-out figures.
    """
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    for name, value in (("learning_rate", learning_rate), ("max_minutes", max_minutes)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(spr_weight) and spr_weight >= 0):
        raise ValueError(f"spr_weight must be a number >= 0, got {spr_weight!r}")
    pl.seed_everything(seed, workers=True)
    train_files = sorted(Path(data).glob("train-*.npz"))
    heldout_files = sorted(Path(data).glob("heldout-*.npz"))
    if not train_files:
        raise FileNotFoundError(f"no training shards (train-*.npz) in {data}")
    cases = load_cases(train_files)
    inputs, targets, mask = case_tensors(cases)
    n = inputs.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, n // 10)
    val, fit = order[:n_val], order[n_val:]
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    # The cases fit in GPU memory (about 130 kB each): keep them there and index whole batches at once, so a step
    # costs no host-to-device copy and no per-case collation.
    place = (lambda x: x.to(device)) if accelerator == "gpu" else (lambda x: x)  # noqa: E731
    fit_set = TensorDataset(place(inputs[fit]), place(targets[fit]), place(mask[fit]))
    val_set = TensorDataset(place(inputs[val]), place(targets[val]), place(mask[val]))
    steps = epochs * (len(fit_set) // batch_size)
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(fit_set)} training cases")
    module = ScatterModule(tuple(widths), learning_rate, steps, max_minutes=max_minutes, spr_weight=spr_weight)
    initialised_from, lineage = None, []
    if init is not None:
        start = ScatterCNN(init)  # read once: its weights and the record of how they were made
        module.network.load_state_dict(start.network.state_dict())
        initialised_from = {"file": Path(init).name, "training_seconds": start.metadata.get("training_seconds"),
                            "training_cases": start.metadata.get("training_cases")}  # fmt: skip
        lineage = list(start.metadata.get("lineage", []))
    trainer = pl.Trainer(
        max_epochs=epochs, max_time={"minutes": max_minutes} if max_minutes else None, accelerator=accelerator,
        devices=1, logger=pl.loggers.CSVLogger(str(log_dir), name=""), enable_checkpointing=False,
        enable_progress_bar=progress, log_every_n_steps=10, num_sanity_val_steps=0, gradient_clip_val=1.0,
        check_val_every_n_epoch=max(1, epochs // 20),
    )  # fmt: skip
    started = time.perf_counter()
    shuffled = RandomSampler(fit_set, generator=torch.Generator().manual_seed(seed))
    fit_batches = BatchSampler(shuffled, batch_size, drop_last=True)
    val_batches = BatchSampler(SequentialSampler(val_set), 64, drop_last=False)
    trainer.fit(module, DataLoader(fit_set, batch_size=None, sampler=fit_batches),
                DataLoader(val_set, batch_size=None, sampler=val_batches))  # fmt: skip
    seconds = time.perf_counter() - started
    network = module.network.float().eval().cpu()
    record = {
        "training_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if accelerator == "gpu" else "cpu",
        "torch": torch.__version__,
        "epochs_run": int(trainer.current_epoch),
        "steps_run": int(trainer.global_step),
        "training_cases": int(len(fit)),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "spr_weight": float(spr_weight),
        "initialised_from": initialised_from,
        "validation_cases": int(n_val),
        "validation": evaluate_cases(
            network, {k: (v[val] if isinstance(v, Tensor) else [v[i] for i in val]) for k, v in cases.items()}
        ),  # fmt: skip
    }
    record["validation"].pop("per_case")
    indices = [int(p["index"]) for p in cases["parameters"]]
    # Every training run that led to these weights, oldest first (a fine-tuning run extends its start's list).
    record["lineage"] = lineage + [{
        "device": record["device"], "training_seconds": record["training_seconds"], "steps": record["steps_run"],
        "case_indices": [min(indices), max(indices)], "training_cases": record["training_cases"],
        "batch_size": int(batch_size), "learning_rate": float(learning_rate), "spr_weight": float(spr_weight),
    }]  # fmt: skip
    if heldout_files:
        record["heldout"] = evaluate_cases(network, load_cases(heldout_files))
    save_network(network, out, metadata=record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torchdrr.learned.scatter_training",
        description="Train the scatter CNN on Monte Carlo cases and write the shipped weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of train-*.npz and heldout-*.npz shards")
    parser.add_argument("--out", type=Path, default=Path("torchdrr/assets/scatter_net.pt"), help="weights file")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--widths", type=int, nargs=4, default=(24, 48, 96, 128), help="channels per level")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, default=None, help="time budget of the training")
    parser.add_argument("--log-dir", type=Path, default=Path("lightning_logs/scatter_net"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=None, help="also write the record as JSON here")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (default: random)")
    parser.add_argument("--spr-weight", type=float, default=1.0, help="weight of the mean-SPR term of the loss")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        record = train(args.data, args.out, args.epochs, args.batch_size, args.lr, tuple(args.widths), args.device,
                       args.max_minutes, args.log_dir, args.seed, not args.no_progress, args.init,
                       args.spr_weight)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:  # a bad argument or missing data: one line, no traceback
        parser.error(str(error))
    text = json.dumps({k: v for k, v in record.items() if k != "heldout"} | {
        "heldout": {k: v for k, v in record.get("heldout", {}).items() if k != "per_case"}}, indent=1)  # fmt: skip
    print(text)
    if args.report is not None:
        args.report.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

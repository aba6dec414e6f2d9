"""Training-data throughput: full-physics DRRs per second through ``DRRDataModule``.

Renders random C-arm views of the bundled chest CT with the default random physics (three materials, a polychromatic
spectrum per sample, compound Poisson + electronic noise, automatic exposure) at 256 x 256 and at 1240 x 960
(width x height) pixels, and prints a Markdown table.

* With a GPU (and CUDA kernels): ``render_on="cuda"``: ``--workers`` DataLoader workers (default 8) prepare each
  batch's host half (parameters, geometry, spectra: ``DRRDataset.prepare_batch``) and this process renders it on the
  GPU in ``DRRDataModule.on_after_batch_transfer``. The timer covers the whole loop: fetching the prepared batch,
  rendering it; one ``torch.cuda.synchronize()`` after the last batch stops the clock. (No synchronisation per batch:
  a training loop lets the CPU queue the next batch while the GPU renders, and so does this loop.)
* Otherwise: ``render_on="cpu"``: the DataLoader's workers render (``--workers``, default 0: this process); the timer
  covers fetching rendered batches from the loader.

Warm-up batches run first (CT loading, kernel selection, first allocations); only the following batches are timed.

    python benchmarks/data_throughput.py                     # defaults per device
    python benchmarks/data_throughput.py --batch-256 128 --batch-full 8 --batches 20
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from torchdrr.data.datamodule import DRRDataModule, _cuda_ready

RESOLUTIONS = {"256x256": (256, 256), "1240x960": (960, 1240)}  # name -> (height, width)


def measure(
    height: int, width: int, batch_size: int, batches: int, warmup: int, render_on: str, workers: int
) -> tuple[float, float]:
    """Returns (DRRs/s, seconds per batch) over ``batches`` timed batches after ``warmup`` ones."""
    datamodule = DRRDataModule.from_bundled(
        train_length=(warmup + batches) * batch_size,
        val_length=0,
        seed=0,
        batch_size=batch_size,
        num_workers=workers,
        render_on=render_on,
        height=height,
        width=width,
    )
    loader = iter(datamodule.train_dataloader())
    cuda = render_on == "cuda"
    device = torch.device("cuda") if cuda else torch.device("cpu")

    def next_batch() -> dict:
        batch = next(loader)
        if cuda:
            if not batch.get("prepared"):  # index batches (no workers): move them as Lightning would
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            batch = datamodule.on_after_batch_transfer(batch, 0)  # prepared batches: render_prepared copies them
        return batch

    for _ in range(warmup):
        next_batch()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += next_batch()["image"].shape[0]
    if cuda:  # the clock stops when the GPU has finished every timed batch
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return samples / elapsed, elapsed / batches


def main(argv: list[str] | None = None) -> None:
    gpu = _cuda_ready()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-256", type=int, default=64 if gpu else 4, help="batch size at 256 x 256")
    parser.add_argument("--batch-full", type=int, default=4 if gpu else 1, help="batch size at 1240 x 960")
    parser.add_argument("--batches", type=int, default=10 if gpu else 2, help="timed batches per resolution")
    parser.add_argument("--warmup", type=int, default=3 if gpu else 1, help="untimed warm-up batches")
    parser.add_argument(
        "--workers",
        type=int,
        default=8 if gpu else 0,
        help="DataLoader workers: on the CPU path they render; on the GPU path they prepare batches (host half)",
    )
    parser.add_argument("--render-on", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    render_on = args.render_on if args.render_on != "auto" else ("cuda" if gpu else "cpu")

    if render_on == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    for name, (height, width) in RESOLUTIONS.items():
        batch = args.batch_256 if name == "256x256" else args.batch_full
        rate, per_batch = measure(height, width, batch, args.batches, args.warmup, render_on, args.workers)
        rows.append(f"| {name} | {batch} | {render_on} | {rate:.1f} | {per_batch * 1000:.1f} |")
        print(f"{name}: {rate:.1f} DRRs/s", flush=True)

    print()
    print(f"## DRRDataModule throughput: {device_name}, {datetime.date.today().isoformat()}")
    print()
    print(
        f"torch {torch.__version__}; full physics (3 materials, per-sample spectrum 70-120 kVp, noise, automatic "
        f"exposure), bundled chest CT; {args.warmup} warm-up + {args.batches} timed batches; "
        f"workers {args.workers} ({'render' if render_on == 'cpu' else 'prepare batches'})."
    )
    print()
    print("| resolution (W x H) | batch | render_on | DRRs/s | ms/batch |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()

"""Equal-budget ablation: does the object-to-detector distance input help the scatter CNN?

    python benchmarks/scatter_cnn_gap_ablation.py --data DIR --minutes 40 [--without-gap]

Trains a ``ScatterUNet`` from random weights for ``--minutes`` of wall time (plain loop, one CPU thread, batch 16, the
training module's loss, flips and warm-up + cosine schedule) on ``DIR/train-*.npz``, with the fifth number (the
object-to-detector distance) or with it zeroed (``--without-gap``), and prints the held-out figures on
``tests/data/scatter_heldout.npz`` as JSON. Run both variants side by side for the comparison in RESULTS.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchdrr.learned.scatter import ScatterUNet, predict_ratio  # noqa: E402
from torchdrr.learned.scatter_data import load_cases  # noqa: E402
from torchdrr.learned.scatter_training import _LOG_FLOOR, case_tensors, relative_rmse  # noqa: E402

HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "scatter_heldout.npz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of train-*.npz shards")
    parser.add_argument("--minutes", type=float, default=40.0, help="training wall time")
    parser.add_argument("--without-gap", action="store_true", help="zero the object-to-detector distance input")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, t, m = case_tensors(load_cases(sorted(args.data.glob("train-*.npz"))))
    xh, th, mh = case_tensors(held := load_cases(HELDOUT))
    if args.without_gap:
        x[:, 7], xh[:, 7] = 0.0, 0.0
    net = ScatterUNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    start, step = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < 60 * args.minutes:
        for group in optimizer.param_groups:
            group["lr"] = (
                1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / (60 * args.minutes)))
            )
        i = torch.randint(0, x.shape[0], (16,))
        xb, tb, mb = x[i], t[i], m[i]
        for dim in (-1, -2):
            if torch.rand(()) < 0.5:
                xb, tb, mb = xb.flip(dim), tb.flip(dim), mb.flip(dim)
        log_ratio = net(xb)[:, 0].clamp(max=5.0)
        loss = (relative_rmse(log_ratio.exp(), tb, mb) ** 2).mean()
        loss = loss + (((log_ratio - tb.clamp_min(_LOG_FLOOR).log()) ** 2) * mb).sum() / mb.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step += 1
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([predict_ratio(net, chunk, False)[:, 0] for chunk in xh.split(16)])
    rmse = relative_rmse(predicted, th, mh)
    transmission = held["transmission"].float().clamp_min(1e-7)
    body = mh * (held["transmission"].float() < 0.9)
    spr_cnn = (predicted / transmission * body).sum((1, 2)) / body.sum((1, 2))
    spr_mc = (th / transmission * body).sum((1, 2)) / body.sum((1, 2))
    spr_error = (spr_cnn - spr_mc).abs() / spr_mc
    print(json.dumps({"gap": not args.without_gap, "steps": step, "relative_rmse_median": float(rmse.median()),
                      "relative_rmse_mean": float(rmse.mean()), "mean_spr_error_median": float(spr_error.median()),
                      "mean_spr_error_mean": float(spr_error.mean())}))  # fmt: skip


if __name__ == "__main__":
    main()

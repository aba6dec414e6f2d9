"""End-to-end check of ``DRR(scatter="cnn")`` against the Monte Carlo on views the CNN never saw.

    python benchmarks/scatter_cnn_vs_mc.py [--ct CT] [--photons 2e4] [--device cpu|cuda] [--json out.json]

For each view (named view, spectrum preset) of the CT at the render command's default geometry (512 x 512, 0.85 mm,
SDD 1020 mm, SOD 850 mm), the Monte Carlo tallies the scatter in 8 x 8 pixel bins (``transport``), and the CNN's
scatter (the DRR's ``scatter="cnn"`` image minus its primary) is averaged into the same bins. Both are divided by
the flat field. Prints and writes the relative RMSE of the scatter, the error of the mean SPR behind the body
(T < 0.9) and the Monte Carlo's own noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchdrr import DRR  # noqa: E402
from torchdrr.geometry import Camera  # noqa: E402
from torchdrr.io import Volume  # noqa: E402
from torchdrr.io.volume import bundled_ct_path  # noqa: E402
from torchdrr.io.writers import atomic_write  # noqa: E402
from torchdrr.physics import spectrum_preset, transport  # noqa: E402

VIEWS = (("PA", 0.0, "90kVp"), ("lateral 90", 90.0, "90kVp"), ("PA", 0.0, "60kVp"), ("LAO 30", 30.0, "120kVp"))
SIZE, PITCH, BIN = 512, 0.85, 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=None, help="CT (default: the bundled downsampled chest CT)")
    parser.add_argument("--photons", type=float, default=2e4, help="Monte Carlo flat-field photons per bin")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    ct = Volume.load(args.ct or bundled_ct_path(), fix_padding=True)
    rows = []
    for name, primary_deg, preset in VIEWS:
        kwargs = {"spectrum": preset, "output": "intensity", "photons_per_pixel": 1.0}
        plain = DRR(ct, **kwargs).to(args.device)
        learned = DRR(ct, scatter="cnn", **kwargs).to(args.device)
        camera = Camera.from_carm(
            torch.tensor([primary_deg], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
            plain.volume_center, sod_mm=850.0, sdd_mm=1020.0, height=SIZE, width=SIZE, pixel_spacing_mm=(PITCH, PITCH),
        ).to(args.device)  # fmt: skip
        with torch.no_grad():
            primary = plain(camera)
            transmission = plain(camera, output="flat_field")
            scatter_cnn = learned(camera) - primary
        flat = primary / transmission  # the flat field at N0 = 1 (keV per pixel)
        bins = lambda x: F.avg_pool2d(x.double(), BIN)[0, 0].cpu()  # noqa: E731
        cnn_ratio, t_bins, flat_bins = bins(scatter_cnn / flat), bins(transmission), bins(flat)
        result = transport(
            plain.material_volume().detach()[: len(plain.materials)], plain.affine, plain.materials,
            camera.binned(BIN), spectrum_preset(preset), photons_per_pixel=args.photons, detector=plain.detector,
            seed=17,
        )  # fmt: skip
        mc_ratio = result.scatter[0].cpu() / flat_bins
        mc_error = result.scatter_error[0].cpu() / flat_bins
        body = t_bins < 0.9
        spr_cnn, spr_mc = (cnn_ratio / t_bins)[body].mean(), (mc_ratio / t_bins)[body].mean()
        row = {
            "view": name,
            "spectrum": preset,
            "relative_rmse": float(((cnn_ratio - mc_ratio) ** 2).sum().sqrt() / (mc_ratio**2).sum().sqrt()),
            "mc_noise": float((mc_error**2).sum().sqrt() / (mc_ratio**2).sum().sqrt()),
            "mean_spr_mc": float(spr_mc),
            "mean_spr_cnn": float(spr_cnn),
            "mean_spr_error": float((spr_cnn - spr_mc).abs() / spr_mc),
            "mc_seconds": result.seconds,
        }
        rows.append(row)
        print(
            f"{name:>12} {preset:>6}: relative RMSE {row['relative_rmse']:.3f} (MC noise {row['mc_noise']:.3f}), "
            f"mean SPR behind the body MC {row['mean_spr_mc']:.3f} CNN {row['mean_spr_cnn']:.3f} "
            f"(error {row['mean_spr_error']:.3f}); MC {row['mc_seconds']:.0f} s",
            flush=True,
        )
    if args.json is not None:
        text = json.dumps({"ct": str(args.ct or "bundled"), "photons_per_bin": args.photons, "views": rows}, indent=1)
        atomic_write(args.json, lambda handle: handle.write(text.encode()))


if __name__ == "__main__":
    main()

"""Monte Carlo transport benchmark: photons per second, chest SPR maps, water-slab SPR table and TG-195 Case 2.

    python benchmarks/montecarlo.py [--device cuda] [--out benchmarks/out/montecarlo.json] [--quick]

Cases (all 90 kVp DeepDRR preset unless named, ideal energy-integrating detector, no grid unless named):

* ``chest``: the full-resolution LIDC-IDRI-0001 chest CT (``../shared/data/chest-ct``; the bundled small copy when it
  is absent), threshold materials, PA view, DeepDRR's 1240 x 960 detector (0.301 mm) read out in 10 x 10 bins
  (124 x 96), 10^4 flat-field photons per bin: time, photons/s, SPR percentiles and SPR over the lungs and the
  mediastinum. The SPR map is saved as ``<out stem>_chest_spr.npy`` (with the primary and scatter).
* ``slab``: SPR in the central 3 x 3 cm behind a 40 x 40 cm water slab of 10, 20 and 30 cm, for square fields of 10,
  20 and 30 cm at the detector, 3 cm air gap, SDD 1150 mm, with and without a 10:1 focused grid.
* ``tg195``: TG-195 Case 2 at 56.4 keV: energy deposited in the soft-tissue box per photon (tests/test_montecarlo.py).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_montecarlo import TG195_CASE2_MONO_EV, _axial_camera, _slab, _tg195_case2  # noqa: E402
from torchdrr import DRR  # noqa: E402
from torchdrr.geometry import Camera  # noqa: E402
from torchdrr.io import Volume, bundled_ct_path  # noqa: E402
from torchdrr.physics import AntiScatterGrid, spectrum_preset, transport  # noqa: E402
from torchdrr.physics.scatter_data import majorant, transport_tables  # noqa: E402

FULL_CT = ROOT.parent / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"


def chest(device: str, photons_per_pixel: float, out_stem: pathlib.Path) -> dict:
    path = FULL_CT if FULL_CT.exists() else bundled_ct_path()
    ct = Volume.load(path, fix_padding=True)
    drr = DRR(ct, output="intensity").to(device)
    camera = Camera.from_carm(torch.tensor([0.0]), torch.tensor([0.0]), ct.center).to(device)
    binned = camera.binned(10)
    densities = drr.material_volume().detach()[: len(drr.materials)]
    energy, photons = spectrum_preset("90kVp")
    tables = transport_tables(drr.materials, float(energy.max()))
    start = time.perf_counter()
    volume_majorant = majorant(densities, tables.total)
    if device == "cuda":
        torch.cuda.synchronize()
    majorant_seconds = time.perf_counter() - start
    args = dict(tables=tables, volume_majorant=volume_majorant, progress=False)
    transport(densities, drr.affine, drr.materials, binned, (energy, photons), photons_per_pixel=10, **args)  # warm
    result = transport(densities, drr.affine, drr.materials, binned, (energy, photons),
                       photons_per_pixel=photons_per_pixel, seed=1, **args)  # fmt: skip
    spr = result.scatter_to_primary[0].cpu()
    spr = torch.where(result.primary[0].cpu() > 0, spr, torch.nan)  # no primary photon reached the bin
    h, w = spr.shape
    rows = slice(int(0.35 * h), int(0.65 * h))
    mediastinum = spr[rows, int(0.47 * w) : int(0.53 * w)]
    lungs = torch.cat([spr[rows, int(0.22 * w) : int(0.32 * w)], spr[rows, int(0.68 * w) : int(0.78 * w)]], dim=1)
    relative = (result.scatter_error / result.scatter)[0].cpu()
    maps = pathlib.Path(f"{out_stem}_chest_spr.pt")
    tmp = maps.with_suffix(".tmp")
    torch.save({"spr": spr, "primary": result.primary[0].cpu(), "scatter": result.scatter[0].cpu(),
                "single": result.single[0].cpu()}, tmp)  # fmt: skip
    tmp.replace(maps)
    return {
        "ct": str(path.name),
        "ct_shape": list(ct.data.shape),
        "detector_bins": [h, w],
        "photons": result.photons,
        "seconds": result.seconds,
        "photons_per_second": result.photons_per_second,
        "majorant_seconds": majorant_seconds,
        "spr_percentiles": {q: float(spr.flatten().nanquantile(q / 100)) for q in (5, 25, 50, 75, 95)},
        "spr_lungs_median": float(lungs.nanmedian()),
        "spr_mediastinum_median": float(mediastinum.nanmedian()),
        "single_fraction_of_scatter": float(result.single.sum() / result.scatter.sum()),
        "scatter_relative_error_median": float(relative.nanmedian()),
    }


def slab(device: str, photons_per_pixel: float) -> list[dict]:
    rows = []
    camera = _axial_camera(1150.0, 41, 10.0, device)
    for thickness in (100.0, 200.0, 300.0):
        densities, affine = _slab(thickness, 400.0, 1120.0 - thickness, voxel_mm=20.0)
        for field in (100.0, 200.0, 300.0):
            half = field / 20.0
            bounds = (20.0 - half, 20.0 + half, 20.0 - half, 20.0 + half)
            for grid in (None, AntiScatterGrid(ratio=10.0)):
                result = transport(densities.to(device), affine, ["water"], camera, spectrum_preset("90kVp"),
                                   photons_per_pixel=photons_per_pixel, field=bounds, grid=grid, seed=2,
                                   progress=False)  # fmt: skip
                centre = slice(19, 22)
                scatter = float(result.scatter[0, centre, centre].sum())
                primary = float(result.primary[0, centre, centre].sum())
                error = float(result.scatter_error[0, centre, centre].pow(2).sum().sqrt())
                rows.append({"thickness_mm": thickness, "field_mm": field, "grid": grid is not None,
                             "spr": scatter / primary, "spr_error": error / primary,
                             "photons_per_second": result.photons_per_second})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "out" / "montecarlo.json")
    parser.add_argument("--quick", action="store_true", help="100x fewer photons (a smoke test on a CPU)")
    args = parser.parse_args()
    scale = 0.01 if args.quick else 1.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    report["chest"] = chest(args.device, 1e4 * scale, args.out.with_suffix(""))
    print(json.dumps(report["chest"], indent=1), flush=True)
    deposited, error = _tg195_case2(args.device, 2e5 * scale)
    reference = sum(TG195_CASE2_MONO_EV.values()) / len(TG195_CASE2_MONO_EV)
    report["tg195_case2_56keV"] = {"ours_eV": deposited, "ours_error_eV": error, "tg195_codes_eV": TG195_CASE2_MONO_EV,
                                   "ratio_to_mean": deposited / reference}  # fmt: skip
    print(json.dumps(report["tg195_case2_56keV"]), flush=True)
    report["slab"] = slab(args.device, 2e5 * scale)
    print("| thickness | field | SPR no grid | SPR 10:1 grid |")
    print("|---|---|---|---|")
    for a, b in zip(report["slab"][::2], report["slab"][1::2], strict=True):
        print(f"| {a['thickness_mm']:.0f} mm | {a['field_mm']:.0f} mm | {a['spr']:.3f} ± {a['spr_error']:.3f} | "
              f"{b['spr']:.3f} ± {b['spr_error']:.3f} |")  # fmt: skip
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    if not math.isfinite(report["chest"]["photons_per_second"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

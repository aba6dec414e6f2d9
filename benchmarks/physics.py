"""Cost of the full physics: the ``DRR`` module against the single-channel line-integral render, same run.

    python benchmarks/physics.py                                   # CPU, 200x200
    python benchmarks/physics.py --device cuda --sizes 1240x960    # the issue's acceptance case

Geometry as benchmarks/run.py (chest CT, AP, SOD 850 mm, SDD 1020 mm, a 373 x 289 mm field). Rows:

* ``line integral (1 channel)``: pose -> rays -> one ray cast of mu = 0.02/mm (1 + HU/1000): run.py's forward.
* ``DRR ...``: pose -> rays -> one ray cast of 3 material channels (air, soft tissue, bone; DeepDRR thresholds) ->
  polychromatic attenuation over the 90 kVp spectrum in 1 keV bins (89 bins) -> energy-integrating detector ->
  noise as labelled. The material volume is built once (the module caches it while the CT is unchanged), as in
  training or registration loops.

Each row is the median of ``--repeats`` timed renders after warm-up; "x line" is its ratio to the line-integral row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import AP_PRIMARY_DEG, FIELD_MM, FULL_CT, SDD_MM, SOD_MM, render  # noqa: E402

from torchdrr import DRR, Camera  # noqa: E402
from torchdrr.io import Volume, bundled_ct_path, volume_center  # noqa: E402
from torchdrr.physics import Noise  # noqa: E402
from torchdrr.render import hu_to_mu  # noqa: E402


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cases(volume: Volume, device: torch.device, height: int, width: int):
    """(label, render function) pairs; the first is the baseline."""
    hu = volume.data.to(device)
    mu = hu_to_mu(hu)
    affine = volume.affine
    isocenter = volume_center(affine, hu.shape).to(device)
    primary = torch.tensor([AP_PRIMARY_DEG], dtype=torch.float64, device=device)
    spacing = (FIELD_MM[0] / height, FIELD_MM[1] / width)
    camera = Camera.from_carm(
        primary, 0.0, isocenter, sod_mm=SOD_MM, sdd_mm=SDD_MM, height=height, width=width, pixel_spacing_mm=spacing
    )
    generator = torch.Generator(device=device).manual_seed(0)
    yield "line integral (1 channel)", lambda: render(mu, affine, isocenter, primary, height, width, "siddon", None)
    materials = DRR(volume).to(device).material_volume()  # [4, I, J, K] channels-last: 3 materials + 1 zero channel
    planar = materials[:3].contiguous()
    yield (
        "ray cast only, 3 materials [3, I, J, K] contiguous",
        lambda: render(planar, affine, isocenter, primary, height, width, "siddon", None),
    )
    yield (
        "ray cast only, 3 materials packed channels-last (4 ch)",
        lambda: render(materials, affine, isocenter, primary, height, width, "siddon", None),
    )
    variants = [
        ("DRR 90 kVp, no noise", dict()),
        ("DRR 90 kVp + radiography noise (compound, 10 keV groups, blur)", dict(noise="radiography")),
        ("DRR 90 kVp + compound noise per 1 keV bin (exact)", dict(noise=Noise("compound", 2.0), noise_group_keV=1)),
        ("DRR 90 kVp + fast noise", dict(noise=Noise("fast", 2.0))),
        ("DRR 90 kVp + gaussian (differentiable) noise", dict(noise=Noise("gaussian", 2.0))),
    ]
    for label, kwargs in variants:
        if isinstance(kwargs.get("noise"), Noise):
            kwargs["photons_behind_patient"] = 1000.0  # the radiography exposure target
        drr = DRR(volume, spectrum="90kVp", **kwargs).to(device)
        drr.material_volume()  # build the cached material volume once
        yield label, (lambda d=drr: d(camera, generator=generator))

    def pose_gradient():
        angles = primary.clone().requires_grad_(True)
        cam = Camera.from_carm(
            angles, 0.0, isocenter, sod_mm=SOD_MM, sdd_mm=SDD_MM, height=height, width=width, pixel_spacing_mm=spacing
        )
        drr_gauss(cam, generator=generator).sum().backward()

    drr_gauss = DRR(volume, spectrum="90kVp", noise=Noise("gaussian", 2.0), photons_behind_patient=1000.0).to(device)
    yield "DRR 90 kVp + gaussian noise, fwd+bwd pose", pose_gradient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=None, help="CT file (default: the full chest CT if present)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=None, help="HxW (default 1240x960 on CUDA, 200x200 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed renders per row (default 20 CUDA, 3 CPU)")
    parser.add_argument("--profile", default=None, help="print torch.profiler's top kernels for rows containing this")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ct = args.ct or (FULL_CT if FULL_CT.exists() else bundled_ct_path())
    volume = Volume.load(ct, fix_padding=True)
    sizes = args.sizes or (["1240x960"] if device.type == "cuda" else ["200x200"])
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, CT {ct.name} {volume.shape}")
    print("| case | size | median ms | x line |")
    print("|---|---|---|---|")
    profiled = []
    for size in sizes:
        height, width = (int(x) for x in size.lower().split("x"))
        baseline = None
        for label, fn in cases(volume, device, height, width):
            with torch.no_grad() if "bwd" not in label else torch.enable_grad():
                ms = timed(fn, device, repeats)
            baseline = baseline or ms
            print(f"| {label} | {size} | {ms:.2f} | {ms / baseline:.2f} |", flush=True)
            if args.profile and args.profile in label:
                profiled.append((label, fn))
    for label, fn in profiled:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            for _ in range(5):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"\nprofile of '{label}' (5 renders):")
        print(profile.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

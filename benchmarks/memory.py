"""Memory budgets on a real device: a render far over device memory, and the estimate against measured peaks.

1. ``--huge``: B images of N x N pixels (default 16 x 4096 x 4096 = 268 M rays) of the full chest CT with the
   automatic budget. Reports the plan (chunks), the time, the peak allocated memory and checks two corners of the
   result against unsplit renders of those corners.
2. The per-ray memory model of ``DRR.memory_plan`` against the measured peak of unsplit renders, per physics setting
   (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak resident memory through /proc/self/clear_refs).

Usage:
    python benchmarks/memory.py --device cuda              # both parts, JSON to benchmarks/out/memory.json
    python benchmarks/memory.py --device cpu --no-huge     # the model check only (needs MALLOC_MMAP_THRESHOLD_ set)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchdrr import DRR  # noqa: E402
from torchdrr.geometry import Camera  # noqa: E402
from torchdrr.io import Volume, bundled_ct_path  # noqa: E402
from torchdrr.memory import format_bytes  # noqa: E402

FULL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"
F64 = torch.float64


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_tracker(device: str):
    """Returns (start, peak) functions measuring the peak memory allocated between them (bytes)."""
    if device == "cuda":

        def start() -> int:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak(base: int) -> int:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base

        return start, peak

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def cpu_start() -> int:
        Path("/proc/self/clear_refs").write_text("5")
        return status("VmRSS:")

    def cpu_peak(base: int) -> int:
        return status("VmHWM:") - base

    return cpu_start, cpu_peak


def cameras(drr: DRR, batch: int, size: int, pitch_mm: float) -> Camera:
    angles = torch.linspace(-40.0, 40.0, batch, dtype=F64)
    return Camera.from_carm(angles, torch.zeros(batch, dtype=F64), drr.volume_center, height=size, width=size,
                            pixel_spacing_mm=(pitch_mm, pitch_mm)).to(drr.device)  # fmt: skip


def huge_render(volume: Volume, device: str, batch: int, size: int, budget: int | None, noise: str | None) -> dict:
    drr = DRR(volume, noise=noise).to(device)
    camera = cameras(drr, batch, size, 0.301 * 4096 / size * 0.35)
    drr(camera[:1].crop(0, 0, 8, 8))  # builds the material volume (resident, outside the budget)
    plan = drr.memory_plan(camera, memory_budget_bytes=budget)
    start, peak = peak_tracker(device)
    base = start()
    began = time.perf_counter()
    with torch.no_grad():
        image = drr(camera, memory_budget_bytes=budget, generator=torch.Generator(device).manual_seed(0))
    synchronize(device)
    seconds = time.perf_counter() - began
    used = peak(base)
    finite = bool(torch.isfinite(image).all())
    # Two corners against unsplit renders of just those pixels (a crop of the same cameras).
    checks = []
    if noise is not None:  # noise draws differ between splits: compare the expected values instead
        with torch.no_grad():
            image = drr(camera, memory_budget_bytes=budget, noisy=False)
    for index, (top, left) in ((0, (0, 0)), (batch - 1, (size - 64, size - 64))):
        crop = camera[index].crop(top, left, 64, 64)
        with torch.no_grad():
            direct = drr(crop, memory_budget_bytes=2**62, noisy=False)
        piece = image[index : index + 1, :, top : top + 64, left : left + 64]
        checks.append(float(((piece - direct).abs() / direct.abs().clamp_min(1e-6)).max()))
    return {
        "noise": noise,
        "images": batch,
        "size": size,
        "rays": batch * size * size,
        "plan": {
            "images_per_chunk": plan.images_per_chunk,
            "rows_per_chunk": plan.rows_per_chunk,
            "chunks": plan.chunks,
            "estimated_bytes": plan.estimated_bytes,
            "budget_bytes": plan.budget_bytes,
            "budget_source": plan.budget_source,
        },  # fmt: skip
        "seconds": seconds,
        "rays_per_second": batch * size * size / seconds,
        "peak_allocated_bytes": used,
        "output_bytes": image.numel() * image.element_size(),
        "finite": finite,
        "corner_max_relative_difference": max(checks),
        "unsplit_estimate_bytes": drr.memory_plan(camera, memory_budget_bytes=2**62).estimated_bytes,
    }


SETTINGS = {
    "line integral": dict(options={}, output="line_integral", grad=False),
    "intensity, exposure control": dict(options={"photons_behind_patient": 3000.0}, output="intensity", grad=False),
    "radiography noise": dict(options={"noise": "radiography"}, output="line_integral", grad=False),
    "photon counting": dict(options={"detector": "counting"}, output="photons", grad=False),
    "supersample 2": dict(options={"supersample": 2}, output="line_integral", grad=False),
    "line integral, pose gradient": dict(options={}, output="line_integral", grad=True),
    "float64": dict(options={"dtype": F64}, output="line_integral", grad=False),
}


def model_check(volume: Volume, device: str, batch: int, size: int) -> list[dict]:
    from torchdrr.physics.detector import PhotonCountingDetector

    rows = []
    for name, setting in SETTINGS.items():
        options = dict(setting["options"])
        if options.get("detector") == "counting":
            options["detector"] = PhotonCountingDetector((25.0, 50.0))
        drr = DRR(volume, **options).to(device)
        n = size // 2 if options.get("supersample") else size
        camera = cameras(drr, batch, n, 0.301 * 1024 / n)
        shift = torch.zeros(3, dtype=F64, device=device, requires_grad=setting["grad"])
        camera = Camera(camera.intrinsics, camera.rotation, camera.translation + shift, n, n, camera.sdd_mm)
        drr(camera[:1].crop(0, 0, 8, 8))
        with torch.set_grad_enabled(setting["grad"]):
            estimate = drr.memory_plan(camera, output=setting["output"], memory_budget_bytes=2**62).estimated_bytes
            start, peak = peak_tracker(device)
            base = start()
            image = drr(camera, output=setting["output"])
            if setting["grad"]:
                image.sum().backward()
            used = peak(base)
        del image
        rows.append({"setting": name, "rays": batch * n * n * drr.supersample**2, "estimate_bytes": estimate,
                     "measured_bytes": used, "measured_over_estimate": used / estimate})  # fmt: skip
        print(f"  {name:32s} estimate {format_bytes(estimate):>10s}  measured {format_bytes(used):>10s}  "
              f"ratio {used / estimate:.2f}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-huge", action="store_true", help="skip the huge render")
    parser.add_argument("--huge-batch", type=int, default=16)
    parser.add_argument("--huge-size", type=int, default=4096)
    parser.add_argument("--huge-budget-gib", type=float, default=4.0, help="the explicit budget of the second run")
    parser.add_argument("--model-batch", type=int, default=4)
    parser.add_argument("--model-size", type=int, default=1024)
    parser.add_argument("--ct", type=Path, default=FULL_CT if FULL_CT.exists() else bundled_ct_path())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/memory.json"))
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = Volume.load(args.ct, fix_padding=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "ct": str(args.ct), "volume_shape": list(volume.shape)}  # fmt: skip
    print(f"memory model on {result['device']}, {args.model_batch} x {args.model_size}^2:")
    result["model"] = model_check(volume, args.device, args.model_batch, args.model_size)
    runs = [(None, None), (int(args.huge_budget_gib * 2**30), None), (None, "radiography")]
    result["huge"] = []
    for budget, noise in [] if args.no_huge else runs:
        huge = huge_render(volume, args.device, args.huge_batch, args.huge_size, budget, noise)
        result["huge"].append(huge)
        plan = huge["plan"]
        print(f"huge render, noise {noise}, {huge['images']} x {huge['size']}^2 ({huge['rays'] / 1e6:.0f} M rays): "
              f"{plan['chunks']} chunks of {plan['images_per_chunk']} image(s) x {plan['rows_per_chunk']} rows, "
              f"{huge['seconds']:.2f} s ({huge['rays_per_second'] / 1e9:.2f} G rays/s), peak "
              f"{format_bytes(huge['peak_allocated_bytes'])} (output {format_bytes(huge['output_bytes'])}; unsplit "
              f"estimate {format_bytes(huge['unsplit_estimate_bytes'])}; budget {format_bytes(plan['budget_bytes'])} "
              f"= {plan['budget_source']}), finite {huge['finite']}, corners vs unsplit "
              f"{huge['corner_max_relative_difference']:.1e}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

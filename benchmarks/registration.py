"""2D/3D registration benchmark: recover the pose of simulated X-rays of the chest CT from perturbed starts.

    python benchmarks/registration.py                          # CPU: 20 cases, 128 x 128 detector
    python benchmarks/registration.py --device cuda --cases 50 --size 256 --peers
    python benchmarks/registration.py --quick                  # the small version CI runs (bundled CT)

Cases (a seeded random stream of its own, ``--seed``; the tests use other seeds):

* **Target X-rays**: the chest CT seen by a C-arm at a random pose: primary angle uniform in ±30° and secondary in
  ±20° about the volume centre, and the CT shifted by up to ±10 mm along each axis. Rendered with *other physics than
  the model*: a 60 or 120 kVp spectrum (alternating; the model uses 90 kVp), quantum (Poisson) and electronic noise
  and detector blur ("radiography" preset: automatic exposure to 1000 photons per pixel behind the patient), read out
  as detected intensity. Registration gets them as ``xray_kind="intensity"``.
* **Starts**: the true pose perturbed by a rotation of the CT about the isocenter (the volume centre) uniform in
  ±10° about each axis, and a translation uniform in ±20 mm along each axis.
* **Errors**: mean target registration error (mTRE) over 100 landmarks drawn in the body (HU > -500) through the
  whole volume; success = final mTRE < 1 mm (``--success-mm``).
* **Peers** (``--peers``): nanodrr 0.1.7 and DiffDRR 0.6.1 run their own registration (their documented loss and
  optimiser; ``benchmarks/peers/register_peers.py``) on the same target images (as line integrals) and starts, with
  the same number of renders as torchdrr used on that case.

Output: a Markdown table on stdout and ``benchmarks/out/registration-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

from run import FULL_CT  # noqa: E402

from torchdrr import DRR  # noqa: E402
from torchdrr.geometry import Camera  # noqa: E402
from torchdrr.io import Volume, bundled_ct_path, volume_center  # noqa: E402
from torchdrr.registration import offset_camera, register, registration_errors, volume_landmarks  # noqa: E402

FIELD_MM = 373.0  # detector field (square), as wide as the peers.md benchmark's
SOD_MM, SDD_MM = 850.0, 1020.0
TARGET_SPECTRA = ("120kVp", "60kVp")  # the model renders with 90 kVp
MODEL_SPECTRUM = "90kVp"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_cases(
    volume: Volume, count: int, size: int, seed: int, device: torch.device, rotation_deg: float = 10.0,
    translation_mm: float = 20.0,
) -> list[dict]:  # fmt: skip
    """Targets (true cameras, noisy X-rays with other physics) and perturbed starts, from one seeded stream."""
    generator = torch.Generator().manual_seed(seed)
    center = volume_center(volume.affine, volume.data.shape)
    body = volume.data > -500.0
    pitch = FIELD_MM / size
    targets = {kvp: DRR(volume, spectrum=kvp, noise="radiography").to(device) for kvp in TARGET_SPECTRA}
    cases = []
    for index in range(count):

        def uniform(low: float, high: float, n: int = 1) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

        primary, secondary = float(uniform(-30, 30)), float(uniform(-20, 20))
        base = Camera.from_carm(
            torch.tensor([primary], dtype=torch.float64), secondary, center, sod_mm=SOD_MM, sdd_mm=SDD_MM,
            height=size, width=size, pixel_spacing_mm=(pitch, pitch),
        )  # fmt: skip
        shift = torch.cat([torch.zeros(3, dtype=torch.float64), uniform(-10, 10, 3)])
        true_camera = offset_camera(base, shift[None], center)
        perturbation = torch.cat([uniform(-rotation_deg, rotation_deg, 3), uniform(-translation_mm, translation_mm, 3)])
        start_camera = offset_camera(true_camera, perturbation[None], center)
        kvp = TARGET_SPECTRA[index % len(TARGET_SPECTRA)]
        noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        landmark_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.no_grad():
            xray = targets[kvp](
                true_camera.to(device), output="intensity", generator=torch.Generator(device).manual_seed(noise_seed)
            )[0, 0]
        cases.append(
            {
                "index": index,
                "primary_deg": primary,
                "secondary_deg": secondary,
                "kvp": kvp,
                "perturbation": perturbation,
                "true": true_camera,
                "start": start_camera,
                "xray": xray.to("cpu", torch.float64).clamp_min(1e-6),
                "landmarks": volume_landmarks(
                    volume.data.shape, volume.affine, count=100, seed=landmark_seed, mask=body
                ),  # fmt: skip
            }
        )
    return cases


def registration_settings(size: int) -> dict:
    """torchdrr's settings: ``register``'s defaults, with three levels down to the full detector (the coarsest about
    32 to 64 pixels a side)."""
    levels = [f for f in (8, 4, 2, 1) if size // f >= 32 and size % f == 0][-3:]
    return {"levels": tuple(levels)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarise(name: str, rows: list[dict], success_mm: float) -> dict:
    mtre = [r["mtre_mm"] for r in rows]
    return {
        "method": name,
        "cases": len(rows),
        "success_rate": sum(m < success_mm for m in mtre) / max(1, len(rows)),
        "median_mtre_mm": median(mtre),
        "median_seconds": median([r["seconds"] for r in rows]),
        "median_renders": median([r["renders"] for r in rows]),
        "median_rotation_deg": median([r["rotation_deg"] for r in rows]),
        "median_translation_mm": median([r["translation_mm"] for r in rows]),
    }


def errors_row(estimate: Camera, case: dict, seconds: float, renders: int) -> dict:
    errors = registration_errors(estimate.to("cpu"), case["true"], case["landmarks"])
    return {
        "case": case["index"],
        "mtre_mm": float(errors.mtre_mm[0]),
        "rotation_deg": float(errors.rotation_deg[0]),
        "translation_mm": float(errors.translation_mm[0]),
        "reprojection_px": float(errors.reprojection_px[0]),
        "seconds": seconds,
        "renders": renders,
    }


def run_torchdrr(model: DRR, cases: list[dict], settings: dict, device: torch.device, verbose: bool) -> list[dict]:
    rows = []
    # One untimed warm-up registration: CUDA context, kernels and allocator caches.
    warm = cases[0]
    register(model, warm["xray"], warm["start"], xray_kind="intensity", **settings)
    for case in cases:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = register(model, case["xray"], case["start"], xray_kind="intensity", **settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        row = errors_row(result.camera, case, seconds, result.renders)
        row["start_mtre_mm"] = float(registration_errors(case["start"], case["true"], case["landmarks"]).mtre_mm[0])
        row["iterations"] = result.iterations
        rows.append(row)
        if verbose:
            print(
                f"  torchdrr case {case['index']:3d} ({case['kvp']}): mTRE {row['start_mtre_mm']:6.1f} -> "
                f"{row['mtre_mm']:7.3f} mm, {seconds:6.2f} s, {result.renders} renders",
                file=sys.stderr,
                flush=True,
            )
    return rows


def run_peer_methods(ct_path: Path, cases: list[dict], rows: list[dict], device: torch.device, python: str | None,
                     peers: list[str]) -> dict[str, list[dict]]:  # fmt: skip
    from peer_registration import run_peer_registrations

    starts = [case["start"] for case in cases]
    # The peers get the X-ray as line integrals (-log of the normalised intensity), bright where the body attenuates.
    targets = torch.stack([-torch.log(case["xray"] / case["xray"].max()) for case in cases])
    renders = [int(row["renders"]) for row in rows]
    outcome = run_peer_registrations(ct_path, starts, targets, renders, peers=tuple(peers), python=python,
                                     device=device.type)  # fmt: skip
    results = {}
    for peer, record in outcome.items():
        if record.get("error") or record.get("cameras") is None:
            print(f"  {peer}: {record.get('error')}", file=sys.stderr)
            continue
        cameras = record["cameras"]
        results[peer] = [
            errors_row(
                Camera(
                    cameras.intrinsics,
                    cameras.rotation[i : i + 1],
                    cameras.translation[i : i + 1],
                    cameras.height,
                    cameras.width,
                    cameras.sdd_mm,
                ),
                case,
                float(record["seconds"][i]),
                int(record["renders"][i]),
            )  # fmt: skip
            for i, case in enumerate(cases)
        ]
    return results


def markdown(summaries: list[dict], reference: dict) -> str:
    lines = [
        "| method | cases | success (mTRE < 1 mm) | median mTRE (mm) | median time (s) | median renders | time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ratio = s["median_seconds"] / reference["median_seconds"] if reference["median_seconds"] > 0 else math.nan
        lines.append(
            f"| {s['method']} | {s['cases']} | {100 * s['success_rate']:.0f} % | {s['median_mtre_mm']:.3f} | "
            f"{s['median_seconds']:.2f} | {s['median_renders']:.0f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cases", type=int, default=20, help="number of registrations")
    parser.add_argument("--size", type=int, default=128, help="detector pixels (square), field 373 mm")
    parser.add_argument("--ct", type=Path, default=None, help="CT (default: the full chest CT when present)")
    parser.add_argument("--seed", type=int, default=20261124, help="seed of the cases' random stream")
    parser.add_argument("--rotation-deg", type=float, default=10.0, help="start perturbation: ± degrees per axis")
    parser.add_argument("--translation-mm", type=float, default=20.0, help="start perturbation: ± mm per axis")
    parser.add_argument("--success-mm", type=float, default=1.0, help="success threshold on the final mTRE (mm)")
    parser.add_argument("--peers", action="store_true", help="also run nanodrr / DiffDRR registration")
    parser.add_argument("--peer-list", default="nanodrr,diffdrr", help="which peers (comma-separated)")
    parser.add_argument("--peers-python", default=None, help="interpreter with the peers installed")
    parser.add_argument("--quick", action="store_true", help="CI version: bundled CT, 64 x 64, 3 cases")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/out/...)")
    parser.add_argument("--quiet", action="store_true", help="no per-case lines")
    tuning = parser.add_argument_group("torchdrr settings (default: registration_settings)")
    tuning.add_argument("--loss", default=None, help="loss, or comma-separated losses per level")
    tuning.add_argument("--levels", default=None, help="comma-separated binning factors")
    tuning.add_argument("--iterations", default=None, help="comma-separated maximum steps per level")
    tuning.add_argument("--learning-rate", default=None, help="comma-separated Adam step sizes per level")
    tuning.add_argument("--patience", type=int, default=None, help="steps without improvement before a level stops")
    tuning.add_argument("--plateau-halvings", type=int, default=None, help="step-size halvings per level")
    tuning.add_argument("--starts", type=int, default=None, help="multi-start count")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    if args.quick:
        args.ct, args.size, args.cases = args.ct or bundled_ct_path(), 64, min(args.cases, 3)
    ct_path = args.ct or (FULL_CT if FULL_CT.exists() else bundled_ct_path())
    volume = Volume.load(ct_path, fix_padding=True)
    print(f"CT {ct_path.name} {tuple(volume.data.shape)}, detector {args.size}^2, {args.cases} cases on {device}",
          file=sys.stderr)  # fmt: skip
    cases = make_cases(volume, args.cases, args.size, args.seed, device, args.rotation_deg, args.translation_mm)
    model = DRR(volume, spectrum=MODEL_SPECTRUM).to(device)
    settings = registration_settings(args.size)
    overrides = {
        "loss": None if args.loss is None else tuple(args.loss.split(",")),
        "levels": None if args.levels is None else tuple(int(v) for v in args.levels.split(",")),
        "iterations": None if args.iterations is None else tuple(int(v) for v in args.iterations.split(",")),
        "learning_rate": None if args.learning_rate is None else tuple(float(v) for v in args.learning_rate.split(",")),
        "patience": args.patience,
        "plateau_halvings": args.plateau_halvings,
        "starts": args.starts,
    }
    settings.update({key: value for key, value in overrides.items() if value is not None})
    if isinstance(settings.get("loss"), tuple) and len(settings["loss"]) == 1:
        settings["loss"] = settings["loss"][0]
    rows = run_torchdrr(model, cases, settings, device, verbose=not args.quiet)
    summaries = [summarise("torchdrr", rows, args.success_mm)]
    peer_rows: dict[str, list[dict]] = {}
    if args.peers:
        peer_rows = run_peer_methods(ct_path, cases, rows, device, args.peers_python, args.peer_list.split(","))
        summaries += [summarise(peer, peer_rows[peer], args.success_mm) for peer in peer_rows]
    table = markdown(summaries, summaries[0])
    print(table)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "ct": str(ct_path),
        "size": args.size,
        "perturbation": {"rotation_deg": args.rotation_deg, "translation_mm": args.translation_mm},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "summaries": summaries,
        "torchdrr": rows,
        "peers": peer_rows,
        "table": table,
    }
    out = args.out or HERE / "out" / f"registration-{device.type}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(record, handle, indent=1)
    os.replace(handle.name, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Times torchdrr's ray casting on the chest CT, and the peers on the same geometry, in one command.

    python benchmarks/run.py                       # CPU (and CUDA when present), peers when installed
    python benchmarks/run.py --devices cuda --sizes 1240x960 --batches 1 8

Geometry (benchmarks/README.md, ../shared/docs/peers.md): isocenter at the volume's centre, source 850 mm from it,
source-to-detector 1020 mm, a detector field of 373 x 289 mm (W x H) whatever the pixel count, the AP view; a batch
of b poses spreads the primary angle evenly over +-15 degrees. Each timing is a full render of the image: ray
generation from the pose, ray casting and, for the backward rows, the backward pass.

Passes: ``fwd`` (forward), ``fwd+bwd volume`` (gradient to the attenuation volume: back-projection) and
``fwd+bwd pose`` (gradient to the C-arm angles and isocenter through the ray endpoints).

Peers (DiffDRR Siddon, nanodrr) run in their own interpreter (``--peers-python``, default ``.venv-peers/bin/python``
when it exists; see benchmarks/peers/README.md) on the same CT, detector and poses, and are reported as ratios.
Results go to stdout as a Markdown table and to ``benchmarks/out/results-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

import torchdrr
from torchdrr.geometry import carm_extrinsics, intrinsic_matrix, pixel_rays
from torchdrr.io import bundled_ct_path, load_nifti, volume_center
from torchdrr.render import hu_to_mu

ROOT = Path(__file__).resolve().parents[1]
FULL_CT = ROOT.parent / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"
FIELD_MM = (289.0, 373.0)  # detector field (rows, columns)
SOD_MM, SDD_MM = 850.0, 1020.0
AP_PRIMARY_DEG = 180.0


def poses(batch: int) -> torch.Tensor:
    """Primary angles (degrees) of a batch: b poses spread evenly over +-15 degrees around AP."""
    if batch == 1:
        return torch.tensor([AP_PRIMARY_DEG], dtype=torch.float64)
    return AP_PRIMARY_DEG + torch.linspace(-15.0, 15.0, batch, dtype=torch.float64)


def render(mu, affine, isocenter, primary, height, width, mode, step):
    """Full render: pose -> rays -> line integrals ``[B, H * W]``."""
    secondary = torch.zeros_like(primary)
    rotation, translation = carm_extrinsics(primary, secondary, SOD_MM, isocenter)
    spacing = (FIELD_MM[0] / height, FIELD_MM[1] / width)
    intrinsics = intrinsic_matrix(SDD_MM, height, width, spacing).to(mu.device)
    sources, targets = pixel_rays(intrinsics, rotation, translation, height, width, SDD_MM)
    return torchdrr.raycast(mu, affine, sources.to(mu.dtype), targets.to(mu.dtype), mode=mode, step=step)


def time_case(mu, affine, device, height, width, batch, mode, step, grad, repeats, warmup):
    """Median and min milliseconds of one case, and peak CUDA memory above the volume (MB)."""
    isocenter = volume_center(affine, mu.shape).to(device)
    primary = poses(batch).to(device)
    volume = mu.detach().clone().requires_grad_(grad == "volume")

    def once():
        angles = primary.clone().requires_grad_(grad == "pose")
        centre = isocenter.clone().requires_grad_(grad == "pose")
        image = render(volume, affine, centre, angles, height, width, mode, step)
        if grad == "volume":
            image.sum().backward()
        elif grad == "pose":
            torch.autograd.grad(image.sum(), (angles, centre))
        return image

    cuda = device.type == "cuda"
    for _ in range(warmup):
        once()
        volume.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            once()
            samples.append((time.perf_counter() - t0) * 1e3)
        volume.grad = None
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else None
    return statistics.median(samples), min(samples), peak


def run_peers(python: str, ct: Path, height: int, width: int, batch: int, device: str, backend: str, repeats: int):
    """Runs benchmarks/peers/run_peers.py in the peers' interpreter; returns its JSON rows (or an error row)."""
    command = [
        python,
        str(ROOT / "benchmarks" / "peers" / "run_peers.py"),
        "--ct",
        str(ct),
        "--height",
        str(height),
        "--width",
        str(width),
        "--batch",
        str(batch),
        "--repeats",
        str(repeats),
        "--device",
        device,
        "--nanodrr-backend",
        backend,
        "--json",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else [{"error": done.stderr.strip()[-300:]}]
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as error:
        return [{"error": f"{type(error).__name__}: {error}"}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=None, help="NIfTI CT (default: the full chest CT if present)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if any)")
    parser.add_argument("--sizes", nargs="+", default=None, help="HxW list (default: 200x200 512x512, +1240x960 GPU)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--modes", nargs="+", default=["siddon", "trilinear"])
    parser.add_argument("--step", type=float, default=None, help="trilinear step mm (default: half a voxel)")
    parser.add_argument("--passes", nargs="+", default=["fwd", "volume", "pose"], help="fwd, volume, pose")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5 CPU, 20 CUDA)")
    parser.add_argument("--peers-python", default=None, help="interpreter with diffdrr + nanodrr ('' to skip)")
    parser.add_argument("--peer-sizes", nargs="+", default=["200x200"], help="sizes at which to run the peers")
    args = parser.parse_args(argv)

    ct = args.ct or (FULL_CT if FULL_CT.exists() else bundled_ct_path())
    hu, affine = load_nifti(ct)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    header = (
        f"torchdrr {torchdrr.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, CT {ct.name} {tuple(hu.shape)}, {date.today()}"
    )
    print(header, flush=True)
    for device_name in devices:
        device = torch.device(device_name)
        gpu = device.type == "cuda"
        if gpu:
            header += f", GPU {torch.cuda.get_device_name()}"
        mu = hu_to_mu(hu).to(device)
        sizes = args.sizes or (["200x200", "512x512", "1240x960"] if gpu else ["200x200", "512x512"])
        repeats = args.repeats or (20 if gpu else 5)
        peers_python = args.peers_python
        if peers_python is None:
            venv = ROOT / ".venv-peers" / "bin" / "python"
            peers_python = str(venv) if venv.exists() and not gpu else (sys.executable if gpu else "")
        for size in sizes:
            height, width = (int(x) for x in size.lower().split("x"))
            for batch in args.batches:
                for mode in args.modes:
                    for grad in args.passes:
                        label = {"fwd": "fwd", "volume": "fwd+bwd volume", "pose": "fwd+bwd pose"}[grad]
                        median, best, peak = time_case(
                            mu, affine, device, height, width, batch, mode, args.step, grad, repeats, 3 if gpu else 1
                        )
                        row = dict(
                            renderer=f"torchdrr {mode}", device=device_name, size=size, batch=batch, pass_=label,
                            median_ms=median, min_ms=best, peak_mb=peak,
                        )  # fmt: skip
                        rows.append(row)
                        print(f"  {row['renderer']:<20} {device_name:<5} {size:>9} b{batch:<3} {label:<15} "
                              f"{median:10.2f} ms", flush=True)  # fmt: skip
                # The peers right after our rows at this size, so that both see the machine in the same state.
                if peers_python and size in args.peer_sizes:
                    backend = "auto" if gpu else "torch"
                    for peer in run_peers(peers_python, ct, height, width, batch, device_name, backend, repeats):
                        peer_row = dict(
                            renderer=peer.get("renderer", "peers"), device=device_name, size=size, batch=batch,
                            pass_="fwd", median_ms=peer.get("median_ms"), min_ms=peer.get("min_ms"),
                            peak_mb=peer.get("peak_mem_mb"), error=peer.get("error"),
                        )  # fmt: skip
                        rows.append(peer_row)
                        print(f"  {peer_row['renderer']:<20} {device_name:<5} {size:>9} b{batch:<3} fwd "
                              f"{peer_row['median_ms'] or peer_row['error']}", flush=True)  # fmt: skip

    print()
    print(markdown_table(rows, header))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results-{platform.node() or 'host'}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"header": header, "command": " ".join(sys.argv), "rows": rows}, indent=1))
    os.replace(tmp, path)
    return 0


def markdown_table(rows: list[dict], header: str) -> str:
    """Rows with, for each torchdrr row, the ratio of every peer's forward time at that size to ours."""
    lines = [header, "", "| renderer | device | size | batch | pass | median ms | min ms | peak MB | peer / ours |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    peers = [r for r in rows if not r["renderer"].startswith("torchdrr")]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['renderer']} | {r['device']} | {r['size']} | {r['batch']} | {r['pass_']} | error: "
                         f"{str(r['error'])[:60]} | | | |")  # fmt: skip
            continue
        ratios = ""
        if r["renderer"].startswith("torchdrr") and r["pass_"] == "fwd":
            same = [p for p in peers if (p["device"], p["size"], p["batch"]) == (r["device"], r["size"], r["batch"])]
            ratios = ", ".join(
                f"{p['renderer']} {p['median_ms'] / r['median_ms']:.1f}x" for p in same if p.get("median_ms")
            )
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else ""
        lines.append(f"| {r['renderer']} | {r['device']} | {r['size']} | {r['batch']} | {r['pass_']} | "
                     f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {peak} | {ratios} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

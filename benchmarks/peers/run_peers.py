#!/usr/bin/env python3
"""Time the peer DRR renderers (DiffDRR 0.6.1, nanodrr 0.1.7) on the benchmark geometry of
``shared/docs/peers.md``.

Run it with the peers' own interpreter (see ``benchmarks/peers/README.md``)::

    .venv-peers/bin/python benchmarks/peers/run_peers.py --ct CT.nii.gz --height 200 --width 200 \
        --repeats 5 [--batch 1] [--backward] [--device cpu|cuda] [--nanodrr-backend auto|triton|torch] [--json]

This file only *calls* the peers' public APIs; none of their code is copied here.

Geometry (identical rays in every peer; the script checks it and reports the ray endpoints):

* world frame: the CT's RAS+ world frame (mm), shifted so the volume centre is the origin. The volume
  centre ("isocenter") is ``affine @ ((shape - 1) / 2)``, the centre of the voxel-centre grid
  (torchio ``Image.get_center()``).
* pose b: ZXY Euler angles (degrees) ``(theta_b, 0, 0)`` and camera translation ``(0, 850, 0)``,
  in each peer's "AP" frame. ``theta`` is 0 for one pose and ``linspace(-15, 15, b)`` for a batch.
  At theta = 0 the source sits 850 mm anterior of the volume centre (+y in RAS) and the beam runs
  along -y to the detector centre 170 mm posterior of it (SDD 1020 mm).
* detector: H rows x W columns, pitch ``delx = 373 / W`` mm along a row (columns),
  ``dely = 289 / H`` mm between rows, principal point at the detector centre, pixel centres at
  half-integer offsets.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"


def _install_stubs() -> list[str]:
    """Put the SimpleITK stand-in on sys.path only where the real SimpleITK is missing.

    torchio imports SimpleITK at import time and falls back to NiBabel when SimpleITK's reader raises,
    so the stand-in (whose every class raises RuntimeError) is enough to read NIfTI files.
    ``PEERS_FORCE_SIMPLEITK_STUB=1`` forces it even where SimpleITK is installed (to test the fallback).
    """
    force = os.environ.get("PEERS_FORCE_SIMPLEITK_STUB") == "1"
    if not force and importlib.util.find_spec("SimpleITK") is not None:
        return []
    if force:
        sys.path.insert(0, str(STUBS))
    else:
        sys.path.append(str(STUBS))  # after site-packages: a real SimpleITK always wins
    warnings.filterwarnings("ignore", message="Error loading image with SimpleITK")
    return ["SimpleITK"]


STUBS_USED = _install_stubs()

import torch  # noqa: E402

# Benchmark geometry (shared/docs/peers.md)
SDD_MM = 1020.0  # source-to-detector distance
SOURCE_TO_ISO_MM = 850.0  # source to the volume centre
FIELD_W_MM = 373.0  # detector field across the W columns
FIELD_H_MM = 289.0  # detector field across the H rows
ANGLE_SPREAD_DEG = 15.0  # a batch spreads the first Euler angle over +-15 degrees

RENDERERS = ("diffdrr-siddon", "diffdrr-trilinear", "nanodrr")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pose_parameters(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ZXY Euler angles in degrees (B, 3) and camera translations in mm (B, 3)."""
    if batch == 1:
        angles = torch.zeros(1, dtype=torch.float64)
    else:
        angles = torch.linspace(-ANGLE_SPREAD_DEG, ANGLE_SPREAD_DEG, batch, dtype=torch.float64)
    rotation = torch.zeros(batch, 3, dtype=torch.float32)
    rotation[:, 0] = angles.to(torch.float32)
    translation = torch.tensor([[0.0, SOURCE_TO_ISO_MM, 0.0]], dtype=torch.float32).repeat(batch, 1)
    return rotation.to(device), translation.to(device)


class DiffDRRPeer:
    """DiffDRR 0.6.1: ``diffdrr.drr.DRR`` with the Siddon or trilinear renderer."""

    def __init__(self, kind: str, args, device: torch.device, cache: dict):
        from diffdrr.data import read
        from diffdrr.drr import DRR

        self.kind = kind
        if "diffdrr_subject" not in cache:
            # orientation="AP" (default) and center_volume=True (default): RAS world, volume centre at 0
            cache["diffdrr_subject"] = read(args.ct, orientation="AP")
        subject = cache["diffdrr_subject"]
        self.drr = DRR(
            subject,
            sdd=SDD_MM,
            height=args.height,
            delx=FIELD_W_MM / args.width,
            width=args.width,
            dely=FIELD_H_MM / args.height,
            renderer=kind,
        ).to(device)
        self.render_kwargs = {"n_points": args.trilinear_points} if kind == "trilinear" else {}
        self.label = f"diffdrr-{kind}"
        self.details = {"renderer_kwargs": dict(self.render_kwargs)} if self.render_kwargs else {}

    def __call__(self, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        return self.drr(
            rotation,
            translation,
            parameterization="euler_angles",
            convention="ZXY",
            degrees=True,
            **self.render_kwargs,
        )

    def rays(self, rotation, translation):
        """Source (3,) and pixel-centre targets (H*W, 3), row-major, world mm relative to the volume centre."""
        from diffdrr.pose import convert

        pose = convert(rotation, translation, parameterization="euler_angles", convention="ZXY", degrees=True)
        source, target = self.drr.detector(pose, None)  # read() already centred the volume at the origin
        return source[0, 0], target[0]


class NanoDRRPeer:
    """nanodrr 0.1.7: ``nanodrr.drr.DRR`` with poses from ``nanodrr.camera.make_rt_inv(orientation="AP")``."""

    def __init__(self, args, device: torch.device, cache: dict):
        from nanodrr.camera import make_k_inv
        from nanodrr.data import Subject
        from nanodrr.drr import DRR

        self.subject = Subject.from_filepath(args.ct).to(device=device, dtype=torch.float32)
        k_inv = make_k_inv(
            SDD_MM, FIELD_W_MM / args.width, FIELD_H_MM / args.height, 0.0, 0.0, args.height, args.width
        ).to(device=device, dtype=torch.float32)
        sdd = torch.tensor([SDD_MM], device=device, dtype=torch.float32)
        self.drr = DRR(k_inv, sdd, args.height, args.width).to(device)
        self.n_samples = args.nanodrr_samples
        self.backend = self._resolve_backend(args.nanodrr_backend, args, device)
        self.label = f"nanodrr-{self.backend}"
        self.details = {"n_samples": self.n_samples, "backend_requested": args.nanodrr_backend}

    def _resolve_backend(self, requested: str, args, device: torch.device) -> str:
        """Resolve "auto" the way nanodrr's render() does, so the row names the backend that ran."""
        if requested != "auto":
            return requested
        from nanodrr.drr import backends

        rotation, translation = pose_parameters(args.batch, device)
        rt_inv = self._rt_inv(rotation, translation)
        return backends.pick_fused_backend(self.subject, rt_inv, self.drr.tgt, args.height, args.width) or "torch"

    def _rt_inv(self, rotation, translation):
        from nanodrr.camera import make_rt_inv

        return make_rt_inv(rotation, translation, orientation="AP", isocenter=self.subject.isocenter)

    def __call__(self, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        rt_inv = self._rt_inv(rotation, translation)
        return self.drr(self.subject, rt_inv, n_samples=self.n_samples, backend=self.backend)

    def rays(self, rotation, translation):
        """Source (3,) and pixel-centre targets (H*W, 3), row-major, world mm relative to the volume centre."""
        from nanodrr.geometry import transform_point

        rt_inv = self._rt_inv(rotation, translation)[:1]
        iso = self.subject.isocenter
        source = transform_point(rt_inv, self.drr.src[:1].expand(1, 1, 3))[0, 0] - iso
        target = transform_point(rt_inv, self.drr.tgt[:1])[0] - iso
        return source, target


def make_peer(name: str, args, device: torch.device, cache: dict):
    if name == "diffdrr-siddon":
        return DiffDRRPeer("siddon", args, device, cache)
    if name == "diffdrr-trilinear":
        return DiffDRRPeer("trilinear", args, device, cache)
    if name == "nanodrr":
        return NanoDRRPeer(args, device, cache)
    raise ValueError(f"unknown renderer {name!r}; expected one of {', '.join(RENDERERS)}")


def time_peer(peer, rotation, translation, backward: bool, device, warmup: int, repeats: int, inner: int):
    """Median and min wall time of one full render (pose -> rays -> image [-> backward to the pose])."""

    def once():
        if backward:
            rot = rotation.detach().clone().requires_grad_(True)
            tra = translation.detach().clone().requires_grad_(True)
            img = peer(rot, tra)
            img.sum().backward()
            return img.detach(), (rot.grad, tra.grad)
        with torch.no_grad():
            return peer(rotation, translation), None

    for _ in range(warmup):
        once()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    samples, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            out = once()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return samples, out, peak


def _rays_summary(source: torch.Tensor, target: torch.Tensor, height: int, width: int) -> dict:
    def r(v):
        return [round(float(x), 4) for x in v]

    t = target.detach().double().reshape(height, width, 3)
    return {
        "frame": "CT RAS+ world mm, origin at the volume centre; pose 0 of the batch",
        "source": r(source.detach().double()),
        "pixel_row0_col0": r(t[0, 0]),
        "pixel_row0_colLast": r(t[0, -1]),
        "pixel_rowLast_col0": r(t[-1, 0]),
        "detector_centre": r(t.reshape(-1, 3).mean(0)),
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ct", required=True, help="CT volume (NIfTI), e.g. shared/data/chest-ct/lidc-idri-0001.nii.gz")
    p.add_argument("--height", type=int, default=200, help="detector rows H (pitch 289/H mm)")
    p.add_argument("--width", type=int, default=200, help="detector columns W (pitch 373/W mm)")
    p.add_argument("--batch", type=int, default=1, help="poses per render; angle 1 spread over +-15 deg")
    p.add_argument("--repeats", type=int, default=5, help="timed samples (median and min are reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--inner", type=int, default=None, help="renders per timed sample (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--backward", action="store_true", help="time forward + backward to the pose parameters")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--renderers", default=",".join(RENDERERS), help=f"comma list from {','.join(RENDERERS)}")
    p.add_argument(
        "--nanodrr-backend",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="auto: Triton on CUDA when eligible, else the pure-PyTorch grid_sample path",
    )
    p.add_argument("--nanodrr-samples", type=int, default=500, help="samples a ray (nanodrr default 500)")
    p.add_argument("--trilinear-points", type=int, default=500, help="DiffDRR trilinear points a ray (default 500)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--json", action="store_true", help="print only the JSON list of rows on stdout")
    args = p.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    inner = args.inner if args.inner is not None else (10 if device.type == "cuda" else 1)
    names = [n.strip() for n in args.renderers.split(",") if n.strip()]

    versions = {"torch": torch.__version__, "diffdrr": _version("diffdrr"), "nanodrr": _version("nanodrr")}
    if device.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    common = {
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
        "pass": "forward+backward" if args.backward else "forward",
        "repeats": args.repeats,
        "device": args.device,
        "versions": versions,
    }
    geometry = {
        "sdd_mm": SDD_MM,
        "source_to_isocenter_mm": SOURCE_TO_ISO_MM,
        "delx_mm": FIELD_W_MM / args.width,
        "dely_mm": FIELD_H_MM / args.height,
        "field_mm": [FIELD_W_MM, FIELD_H_MM],
        "pose": "ZXY Euler deg (theta, 0, 0), translation (0, 850, 0), peer's AP frame",
        "angles_deg": None,
    }

    rows, images, rays = [], {}, {}
    cache: dict = {}
    for name in names:
        row = {"renderer": name, **common}
        log = sys.stderr
        peer = img = grads = None
        try:
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available in this torch build / on this machine")
            rotation, translation = pose_parameters(args.batch, device)
            geometry["angles_deg"] = [round(float(a), 6) for a in rotation[:, 0].cpu()]
            t0 = time.perf_counter()
            peer = make_peer(name, args, device, cache)
            setup_s = time.perf_counter() - t0
            row["renderer"] = peer.label
            print(
                f"[run_peers] {peer.label}: set up in {setup_s:.1f} s; timing {warmup} warm-up + "
                f"{args.repeats} x {inner} {row['pass']} at {args.height}x{args.width} b{args.batch} on {args.device}",
                file=log,
                flush=True,
            )
            samples, (img, grads), peak = time_peer(
                peer, rotation, translation, args.backward, device, warmup, args.repeats, inner
            )
            img0 = img[0, 0].detach().float().cpu()
            row.update(
                {
                    "median_ms": round(statistics.median(samples), 3),
                    "min_ms": round(min(samples), 3),
                    "samples_ms": [round(s, 3) for s in samples],
                    "warmup": warmup,
                    "inner": inner,
                    "threads": torch.get_num_threads(),
                    "device_name": device_name,
                    "setup_s": round(setup_s, 2),
                    "peak_mem_mb": round(peak, 1) if peak is not None else None,
                    "image_shape": list(img.shape),
                    "image_mean": float(img.float().mean()),
                    "image_max": float(img.float().max()),
                    **peer.details,
                }
            )
            if grads is not None:
                g_rot, g_tra = grads
                row["grad_norm"] = {
                    "rotation": None if g_rot is None else float(g_rot.norm()),
                    "translation": None if g_tra is None else float(g_tra.norm()),
                }
            src, tgt = peer.rays(rotation, translation)
            row["geometry"] = {**geometry, "rays_pose0": _rays_summary(src, tgt, args.height, args.width)}
            images[peer.label] = img0
            rays[peer.label] = (src.detach().double().cpu(), tgt.detach().double().cpu())
            print(
                f"[run_peers] {peer.label}: median {row['median_ms']:.1f} ms, min {row['min_ms']:.1f} ms, "
                f"image mean {row['image_mean']:.4g} max {row['image_max']:.4g}",
                file=log,
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 -- one failing peer must not stop the others
            msg = f"{type(e).__name__}: {e}".strip()
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
                msg = "out of memory: " + msg
            row["error"] = msg[:2000]
            print(f"[run_peers] {name}: FAILED {msg[:300]}", file=log, flush=True)
            if os.environ.get("PEERS_TRACEBACK") == "1":
                traceback.print_exc(file=log)
        finally:
            peer = img = grads = None  # free this renderer's volume and buffers before the next one
            gc.collect()
            if device.type == "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        if STUBS_USED:
            row["stubs"] = list(STUBS_USED)
        rows.append(row)

    # Same-scene check: rays and images of every renderer against the first one that ran
    ok = [r for r in rows if "error" not in r]
    if ok:
        ref = ok[0]["renderer"]
        for r in ok:
            name = r["renderer"]
            src_d = float((rays[name][0] - rays[ref][0]).abs().max())
            tgt_d = float((rays[name][1] - rays[ref][1]).abs().max())
            r["check"] = {
                "reference": ref,
                "max_ray_endpoint_diff_mm": round(max(src_d, tgt_d), 6),
                # intensity units differ (DiffDRR: normalised density; nanodrr: mu in 1/mm), so compare shape
                "pearson_r_image_pose0": round(_pearson(images[name], images[ref]), 6),
            }

    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'renderer':<20} {'size':>11} {'b':>3} {'pass':<17} {'median ms':>11} {'min ms':>11}  mean / max / r")
        for r in rows:
            size = f"{r['height']}x{r['width']}"
            if "error" in r:
                print(f"{r['renderer']:<20} {size:>11} {r['batch']:>3} {r['pass']:<17} ERROR {r['error'][:80]}")
                continue
            c = r.get("check", {})
            print(
                f"{r['renderer']:<20} {size:>11} {r['batch']:>3} {r['pass']:<17} {r['median_ms']:>11.1f} "
                f"{r['min_ms']:>11.1f}  {r['image_mean']:.4g} / {r['image_max']:.4g} / {c.get('pearson_r_image_pose0')}"
            )
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

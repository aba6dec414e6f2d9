"""The GPU-speed benchmark: torchdrr, nanodrr (Triton) and DiffDRR in one process, on one CT, detector and device.

    python benchmarks/speed.py                                   # CUDA when present: every case, peers when importable
    python benchmarks/speed.py --cases b1-fwd b1-pose --repeats 50
    python benchmarks/speed.py --device cpu --small --no-peers   # smoke run on the CPU in seconds

Geometry (benchmarks/README.md, ../shared/docs/peers.md): the chest CT (512 x 512 x 133; the bundled small CT when
it is missing), isocenter at the volume's centre, source 850 mm from it, source-to-detector 1020 mm, a detector field
of 373 x 289 mm (W x H) whatever the pixel count, the AP view (primary angle 180 degrees); a batch of b poses spreads
the primary angle evenly over +-15 degrees. Every timing is a full render from the pose: ray parameters from the
C-arm angles and isocenter (one ``torchdrr.ops.carm_ray_parameters`` launch after the angles are stacked: computed in
float64, written in the volume's dtype), one ``torchdrr.ops.camera_raycast`` launch and, where stated, the backward
pass. K is built once per detector size and device and kept there.

Cases (``--cases``; the targets are for one H100 at full size):

  b1-fwd     1240 x 960, batch 1, forward, Siddon                         target <= 1.0 ms
  b1-pose    1240 x 960, batch 1, forward + backward to the pose          target <= 2.5 ms
             (gradient w.r.t. the primary angles and the isocenter)
  b1-volume  1240 x 960, batch 1, forward + backward to the volume        reported, no target
             (back-projection)
  b8-fwd     1240 x 960, batch 8, forward, Siddon                         target <= 6 ms
  b64-small  200 x 200, batch 64, forward, Siddon (throughput)            target >= 20,000 DRR/s
  trilinear  1240 x 960, batch 1, forward, trilinear, step 0.7 mm         target <= 1.5 ms
             (reading the volume's voxel quads, ``torchdrr.ops.trilinear_quads``: 2 loads a sample instead of 8,
             the same image to the bit, 4x the volume's memory, built once before timing)
  trilinear-plain  the same, reading the volume itself (no quads)          reported, no target
  memory     peak GPU memory of b1-pose above the resident volume         target <= 128 MB
  poly       DRR module: 3 material channels, 90 kVp polychromatic,       target <= 1.5x the 1-channel render
             no noise, vs the single-channel line integral, 1240 x 960 b1
  b1-fwd-graph, trilinear-graph, b8-fwd-graph: those cases replayed as CUDA graphs (``torchdrr.cuda_graphed``: the
             poses copied into the graph's input, one replay, the image cloned out), which removes most of the
             0.07-0.23 ms of host work that an eager single render waits for; eager on the CPU

Peers (unless ``--no-peers``; they need nanodrr and diffdrr importable in this interpreter, as on the GPU machine):
nanodrr with backend "auto" (Triton on CUDA) and its default 500 samples a ray at b1-fwd (also the trilinear
comparison), b1-pose, b8-fwd and b64-small; DiffDRR Siddon and trilinear (500 points) at b1-fwd and b64-small. They
are built by benchmarks/peers/run_peers.py (imported as a module) and timed by the same timer as torchdrr. A peer that
fails or runs out of memory gives an "error: ..." row.

Timing: warm-up renders (3 on CUDA, 1 on CPU), then ``--repeats`` timed renders (CUDA events around each render on
CUDA, perf_counter on CPU); median and min are reported. Peak memory (CUDA): ``max_memory_allocated()`` over the
timed renders minus ``memory_allocated()`` before them (the volume is resident in that baseline).

``--small`` shrinks every detector tenfold per side (1240 x 960 -> 124 x 96), 200 x 200 to 40 x 40 and the batches
(8 -> 2, 64 -> 4), for a CPU smoke run; its rows are not comparable with the targets ("met" says n/a).

Output: progress lines, then a Markdown table (last); all rows as JSON in ``benchmarks/out/speed-<host>.json``.
The header names TORCHDRR_WARP_TILE_WIDTH when it is set (the CUDA kernel reads it, for tuning).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import torchdrr
from torchdrr.geometry import Camera, carm_ray_parameters, intrinsic_matrix
from torchdrr.io import bundled_ct_path, load_nifti, volume_center
from torchdrr.ops import camera_raycast, contiguous_axis, ray_axis, row_axis, trilinear_quads, with_contiguous_axis
from torchdrr.render import hu_to_mu

ROOT = Path(__file__).resolve().parents[1]
FULL_CT = ROOT.parent / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"
RUN_PEERS = ROOT / "benchmarks" / "peers" / "run_peers.py"
FIELD_MM = (289.0, 373.0)  # detector field (rows, columns) in mm
SOD_MM, SDD_MM = 850.0, 1020.0
AP_PRIMARY_DEG = 180.0
TRILINEAR_STEP_MM = 0.7
MEMORY_TARGET_MB = 128.0
POLY_TARGET_RATIO = 1.5
PEER_POINTS = 500  # nanodrr's default samples a ray; DiffDRR trilinear points a ray
PEER_MODULES = ("nanodrr", "diffdrr")


@dataclass(frozen=True)
class Case:
    """One benchmark case at full size: detector, batch, mode, gradient and target."""

    name: str
    height: int
    width: int
    batch: int
    mode: str = "siddon"
    step: float | None = None
    grad: str | None = None  # None (forward), "pose" or "volume"
    target_ms: float | None = None
    target_drr_per_s: float | None = None
    peers: tuple[str, ...] = ()  # run_peers.py renderer names timed at this case
    description: str = ""
    graph: bool = False  # replayed as a CUDA graph (torchdrr.cuda_graphed) on CUDA; eager on the CPU
    layout: str | None = None  # fast_layouts key of the volume: "rays" or "rows" (default: by mode)
    quads: bool = False  # trilinear: read the volume's voxel quads (torchdrr.ops.trilinear_quads)

    @property
    def volume_key(self) -> str:
        """Which of fast_layouts' copies this case renders: the one given, else "rays" for Siddon, "rows" for
        trilinear."""
        return self.layout or ("rows" if self.mode == "trilinear" else "rays")

    def scaled(self, small: bool) -> Case:
        """The case with the --small detector and batch (unchanged when ``small`` is False)."""
        if not small:
            return self
        if (self.height, self.width) == (200, 200):
            height, width = 40, 40
        else:
            height, width = max(1, self.height // 10), max(1, self.width // 10)
        batch = {8: 2, 64: 4}.get(self.batch, self.batch)
        return replace(self, height=height, width=width, batch=batch)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pass_(self) -> str:
        return {None: "fwd", "pose": "fwd+bwd pose", "volume": "fwd+bwd volume"}[self.grad]


ALL_PEERS = ("nanodrr", "diffdrr-siddon", "diffdrr-trilinear")
CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("b1-fwd", 960, 1240, 1, target_ms=1.0, peers=ALL_PEERS, description="1240x960 b1 forward, Siddon"),
        Case("b1-pose", 960, 1240, 1, grad="pose", target_ms=2.5, peers=("nanodrr",),
             description="1240x960 b1 forward + backward to the pose"),
        Case("b1-volume", 960, 1240, 1, grad="volume", description="1240x960 b1 forward + backward to the volume"),
        Case("b8-fwd", 960, 1240, 8, target_ms=6.0, peers=("nanodrr",), description="1240x960 b8 forward, Siddon"),
        Case("b64-small", 200, 200, 64, target_drr_per_s=20000.0, peers=ALL_PEERS, layout="rows",
             description="200x200 b64 forward, Siddon (throughput)"),
        Case("trilinear", 960, 1240, 1, mode="trilinear", step=TRILINEAR_STEP_MM, target_ms=1.5, quads=True,
             description="1240x960 b1 forward, trilinear step 0.7 mm (voxel quads)"),
        Case("trilinear-plain", 960, 1240, 1, mode="trilinear", step=TRILINEAR_STEP_MM,
             description="1240x960 b1 forward, trilinear step 0.7 mm, reading the volume (no quads)"),
        Case("memory", 960, 1240, 1, grad="pose", description="peak memory of 1240x960 b1 forward + backward to pose"),
        Case("poly", 960, 1240, 1, description="3-material 90 kVp DRR vs the 1-channel line integral, 1240x960 b1"),
        Case("b1-fwd-graph", 960, 1240, 1, target_ms=1.0, graph=True,
             description="1240x960 b1 forward, Siddon, replayed as a CUDA graph (torchdrr.cuda_graphed)"),
        Case("trilinear-graph", 960, 1240, 1, mode="trilinear", step=TRILINEAR_STEP_MM, target_ms=1.5, graph=True,
             quads=True, description="1240x960 b1 forward, trilinear step 0.7 mm (voxel quads), replayed as a CUDA "
             "graph"),
        Case("b8-fwd-graph", 960, 1240, 8, target_ms=6.0, graph=True,
             description="1240x960 b8 forward, Siddon, replayed as a CUDA graph"),
    )
}  # fmt: skip
# Peer rows measured at one case that the torchdrr rows of other cases are compared with (nanodrr's 500 samples and
# DiffDRR's trilinear renderer are the trilinear comparison; the memory row compares peaks of the pose gradient).
PEER_SOURCE_CASE = {
    "trilinear": "b1-fwd", "trilinear-plain": "b1-fwd", "memory": "b1-pose", "b1-fwd-graph": "b1-fwd",
    "trilinear-graph": "b1-fwd", "b8-fwd-graph": "b8-fwd",
}  # fmt: skip
TRILINEAR_CASES = ("trilinear", "trilinear-plain", "trilinear-graph")  # compared with the sampling peers only


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    case: str
    renderer: str
    height: int
    width: int
    batch: int
    pass_: str
    median_ms: float | None = None
    min_ms: float | None = None
    peak_mb: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    target: str = ""
    met: str = ""
    peer_ratio: str = ""
    error: str | None = None
    note: str = ""

    @property
    def drr_per_s(self) -> float | None:
        return self.batch * 1e3 / self.median_ms if self.median_ms else None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "pass": self.pass_, "drr_per_s": self.drr_per_s}


def poses(batch: int) -> Tensor:
    """Primary angles (degrees, float64) of a batch: b poses spread evenly over +-15 degrees around AP."""
    if batch == 1:
        return torch.tensor([AP_PRIMARY_DEG], dtype=torch.float64)
    return AP_PRIMARY_DEG + torch.linspace(-15.0, 15.0, batch, dtype=torch.float64)


def intrinsics_for(height: int, width: int, device: torch.device | str) -> Tensor:
    """K ``[3, 3]`` (float64) of the benchmark detector: SDD 1020 mm and a 373 x 289 mm field at any pixel count.

    Cached per (height, width, device), so that a timed render makes no host-to-device copy of K; the tensor is
    shared between calls: do not modify it in place.
    """
    return _cached_intrinsics(height, width, torch.device(device))


@functools.cache
def _cached_intrinsics(height: int, width: int, device: torch.device) -> Tensor:
    return intrinsic_matrix(SDD_MM, height, width, (FIELD_MM[0] / height, FIELD_MM[1] / width)).to(device)


def render(
    mu: Tensor,
    affine: Tensor,
    isocenter: Tensor,
    primary: Tensor,
    height: int,
    width: int,
    mode: str = "siddon",
    step: float | None = None,
    quads: Tensor | None = None,
) -> Tensor:
    """Full render: C-arm pose (float64) -> ray parameters in ``mu``'s dtype (one ``carm_ray_parameters`` launch)
    -> one ``camera_raycast`` (reading ``quads``, ``trilinear_quads(mu)``, when given) -> ``[B, H * W]``."""
    sources, ray_matrices = carm_ray_parameters(
        primary, 0.0, SOD_MM, isocenter, intrinsics_for(height, width, mu.device), SDD_MM, dtype=mu.dtype
    )
    return camera_raycast(mu, affine, sources, ray_matrices, height, width, mode=mode, step=step, quads=quads)


def fast_layouts(volume: Tensor, affine: Tensor) -> dict[str, Tensor]:
    """``volume`` stored for the fastest CUDA renders of the AP view (``torchdrr.ops.layout``; copies, same values):
    "rays", the index axis along the rays contiguous (Siddon at 1240 x 960, where neighbouring rays are 0.36 voxels
    apart), and "rows", the one along the detector's rows (trilinear, and Siddon at 200 x 200, whose rays are 2.2
    voxels apart: 28,961 against 22,579 DRR/s with "rays", benchmarks/NOTES.md v26c)."""
    isocenter = volume_center(affine, volume.shape[-3:]).to(volume.device)
    _, ray_matrices = carm_ray_parameters(
        poses(1).to(volume.device), 0.0, SOD_MM, isocenter, intrinsics_for(960, 1240, volume.device), SDD_MM,
        dtype=torch.float64,
    )  # fmt: skip
    siddon = with_contiguous_axis(volume, ray_axis(affine, ray_matrices, 960, 1240))
    return {"rays": siddon, "rows": with_contiguous_axis(volume, row_axis(affine, ray_matrices))}


def time_fn(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> tuple[list[float], float | None]:
    """Times ``fn`` (one full render): per-render milliseconds and peak CUDA memory above the baseline (MB)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if cuda else None
    return samples, peak


def torchdrr_render_fn(mu: Tensor, affine: Tensor, case: Case) -> Callable[[], object]:
    """One full torchdrr render of ``case`` (with its backward pass, if any), as a closure. The cases that read
    voxel quads (``Case.quads``) get ``trilinear_quads(mu)`` built here, once, before any timing."""
    device = mu.device
    quads = trilinear_quads(mu) if case.quads else None
    isocenter = volume_center(affine, mu.shape).to(device)
    primary = poses(case.batch).to(device)
    if case.graph and device.type == "cuda":
        if case.grad is not None:
            raise ValueError(f"case {case.name}: CUDA graph cases are forward only")

        def render_angles(angles: Tensor) -> Tensor:
            return render(mu, affine, isocenter, angles, case.height, case.width, case.mode, case.step, quads)

        replay = torchdrr.cuda_graphed(render_angles, primary)

        def once() -> object:
            return replay(primary)  # the poses copied into the graph's input, one replay, the image cloned out

    elif case.grad is None:

        def once() -> object:
            with torch.no_grad():
                return render(mu, affine, isocenter, primary, case.height, case.width, case.mode, case.step, quads)

    elif case.grad == "pose":

        def once() -> object:
            angles = primary.clone().requires_grad_(True)
            centre = isocenter.clone().requires_grad_(True)
            image = render(mu, affine, centre, angles, case.height, case.width, case.mode, case.step)
            return torch.autograd.grad(image.sum(), (angles, centre))

    else:
        volume = mu.detach().requires_grad_(True)

        def once() -> object:
            image = render(volume, affine, isocenter, primary, case.height, case.width, case.mode, case.step)
            return torch.autograd.grad(image.sum(), volume)

    return once


def poly_render_fns(
    hu: Tensor, affine: Tensor, mu: Tensor, case: Case, contiguous_axis: int | None = None
) -> tuple[Callable[[], object], Callable[[], object]]:
    """The poly case: (a) the 1-channel line integral of ``mu`` and (b) the DRR module, 3 materials, 90 kVp, no
    noise, its material volume stored with ``contiguous_axis`` contiguous (``DRR(contiguous_axis=...)``)."""
    device = mu.device
    isocenter = volume_center(affine, mu.shape).to(device)
    primary = poses(case.batch).to(device)
    spacing = (FIELD_MM[0] / case.height, FIELD_MM[1] / case.width)
    camera = Camera.from_carm(
        primary, 0.0, isocenter, sod_mm=SOD_MM, sdd_mm=SDD_MM, height=case.height, width=case.width,
        pixel_spacing_mm=spacing,
    )  # fmt: skip
    drr = torchdrr.DRR(hu.to(device), affine, spectrum="90kVp", contiguous_axis=contiguous_axis).to(device)
    drr.material_volume()  # built once and cached, as in training and registration loops

    def line() -> object:
        with torch.no_grad():
            return render(mu, affine, isocenter, primary, case.height, case.width)

    def poly() -> object:
        with torch.no_grad():
            return drr(camera, output="line_integral", noisy=False)

    return line, poly


# --------------------------------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------------------------------
def load_run_peers() -> ModuleType | str:
    """benchmarks/peers/run_peers.py as a module, or why the peers cannot run in this interpreter."""
    missing = [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not importable in {sys.executable}"
    spec = importlib.util.spec_from_file_location("torchdrr_benchmark_run_peers", RUN_PEERS)
    if spec is None or spec.loader is None:
        return f"cannot load {RUN_PEERS}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs the SimpleITK stand-in only where SimpleITK is missing
    return module


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peers (None when absent)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PEER_MODULES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _error_text(error: BaseException) -> str:
    message = f"{type(error).__name__}: {error}".strip()
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message.lower():
        return "out of memory"
    return "error: " + message.replace("\n", " ")[:200]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_peer(
    run_peers: ModuleType,
    name: str,
    case: Case,
    ct: Path,
    device: torch.device,
    repeats: int,
    warmup: int,
    cache: dict,
) -> Row:
    """Times one peer at ``case`` (forward, or forward + backward to its pose parameters) with ``time_fn``."""
    row = Row(case.name, name, case.height, case.width, case.batch, case.pass_)
    peer = None
    try:
        args = argparse.Namespace(
            ct=str(ct), height=case.height, width=case.width, batch=case.batch, nanodrr_backend="auto",
            nanodrr_samples=PEER_POINTS, trilinear_points=PEER_POINTS,
        )  # fmt: skip
        rotation, translation = run_peers.pose_parameters(case.batch, device)
        peer = run_peers.make_peer(name, args, device, cache)
        row.renderer = peer.label
        backward = case.grad == "pose"

        def once() -> object:
            if backward:
                rot = rotation.detach().clone().requires_grad_(True)
                tra = translation.detach().clone().requires_grad_(True)
                return torch.autograd.grad(peer(rot, tra).sum(), (rot, tra))
            with torch.no_grad():
                return peer(rotation, translation)

        samples, peak = time_fn(once, device, repeats, warmup)
        row.samples_ms, row.peak_mb = samples, peak
        row.median_ms, row.min_ms = statistics.median(samples), min(samples)
        if name == "nanodrr" or name == "diffdrr-trilinear":
            row.note = f"{PEER_POINTS} samples a ray"
    except Exception as error:  # noqa: BLE001 -- one failing peer must not stop the benchmark
        row.error = _error_text(error)
    finally:
        peer = None
        _free(device)
    return row


# --------------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ratio(value: float) -> str:
    """A ratio as "40x", "3.1x" or "0.55x"."""
    return f"{value:.0f}x" if value >= 10 else f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


def judge(row: Row, case: Case, comparable: bool, volume_mb: float) -> None:
    """Fills a torchdrr row's target and met (met is n/a when the run is not the CUDA full-size setting)."""
    if case.name == "memory":
        row.target = f"<= {MEMORY_TARGET_MB:.0f} MB above the volume ({volume_mb:.0f} MB)"
        if row.peak_mb is not None and comparable:
            row.met = "yes" if row.peak_mb <= MEMORY_TARGET_MB else "no"
        else:
            row.met = "n/a"
    elif case.target_ms is not None:
        row.target = f"<= {case.target_ms:g} ms"
        row.met = ("yes" if row.median_ms <= case.target_ms else "no") if comparable and row.median_ms else "n/a"
    elif case.target_drr_per_s is not None:
        row.target = f">= {case.target_drr_per_s:,.0f} DRR/s"
        rate = row.drr_per_s
        row.met = ("yes" if rate >= case.target_drr_per_s else "no") if comparable and rate else "n/a"


def peer_ratios(rows: list[Row]) -> None:
    """For each torchdrr row: every peer's median (peak memory for the memory row) at its case over ours."""
    peers = [r for r in rows if not r.renderer.startswith("torchdrr") and r.error is None]
    for row in rows:
        if not row.renderer.startswith("torchdrr") or row.error is not None or row.case == "poly":
            continue
        source = PEER_SOURCE_CASE.get(row.case, row.case)
        same = [p for p in peers if p.case == source]
        if row.case in TRILINEAR_CASES:  # compared with the sampling renderers only
            same = [p for p in same if p.renderer != "diffdrr-siddon"]
        parts = []
        for p in same:
            if row.case == "memory":
                if p.peak_mb is not None and row.peak_mb:
                    parts.append(f"{p.renderer} {_ratio(p.peak_mb / row.peak_mb)}")
            elif p.median_ms is not None and row.median_ms:
                parts.append(f"{p.renderer} {_ratio(p.median_ms / row.median_ms)}")
        row.peer_ratio = ", ".join(parts)


def markdown_table(rows: list[Row], header: list[str]) -> str:
    """The report: header lines, then | case | renderer | median ms | min ms | DRR/s | peak MB | target | met | ..."""
    lines = [*header, ""]
    lines.append("| case | renderer | size | batch | pass | median ms | min ms | DRR/s | peak MB | target | met | "
                 "peer / ours |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r.width}x{r.height}"
        if r.error is not None:
            lines.append(f"| {r.case} | {r.renderer} | {size} | {r.batch} | {r.pass_} | {r.error[:120]} | | | | "
                         f"{r.target} | {r.met} | |")  # fmt: skip
            continue
        rate = r.drr_per_s
        lines.append(
            f"| {r.case} | {r.renderer} | {size} | {r.batch} | {r.pass_} | {_fmt(r.median_ms, 3)} | "
            f"{_fmt(r.min_ms, 3)} | {'' if rate is None else f'{rate:,.0f}'} | {_fmt(r.peak_mb, 1)} | {r.target} | "
            f"{r.met} | {r.peer_ratio} |"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` atomically: a temporary file next to ``path``, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where every renderer runs (default: cuda when available)")  # fmt: skip
    parser.add_argument("--ct", type=Path, default=None,
                        help=f"NIfTI CT (default: {FULL_CT} when present, else the bundled small CT)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timed renders per row (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed renders first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                        help=f"subset of cases to run, from: {' '.join(CASES)} (default: all)")  # fmt: skip
    parser.add_argument("--layout", choices=["fast", "as-loaded"], default="fast",
                        help="memory layout of torchdrr's volumes on CUDA: 'fast' (default) stores the index axis "
                             "along the AP rays contiguous for Siddon at 1240x960 and the DRR module "
                             "(torchdrr.ops.ray_axis) and the one along the detector's rows for trilinear and the "
                             "200x200 Siddon case (row_axis), copies made once at setup; "
                             "'as-loaded' keeps k contiguous as torchdrr.io returns it (the CPU always does: its "
                             "kernels prefer it)")  # fmt: skip
    parser.add_argument("--no-peers", action="store_true", help="skip nanodrr and DiffDRR")
    parser.add_argument("--small", action="store_true",
                        help="CPU smoke mode: 124x96 instead of 1240x960, 40x40 instead of 200x200, batches "
                             "8 -> 2 and 64 -> 4")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/out/speed-<hostname>.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def header_lines(args: argparse.Namespace, device: torch.device, ct: Path, shape: tuple[int, ...], argv: list[str]):
    """The header: versions, device, date, CT, command line (and the tuning knob when set)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"torchdrr {torchdrr.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}, device {name}, "
        f"{datetime.now().isoformat(timespec='seconds')}",
        f"CT {ct.name} {tuple(shape)}; command: {shlex.join([Path(sys.argv[0]).name, *argv])}",
    ]
    tile = os.environ.get("TORCHDRR_WARP_TILE_WIDTH")
    if tile is not None:
        lines.append(f"TORCHDRR_WARP_TILE_WIDTH={tile}")
    if args.small:
        lines.append("--small: reduced detectors and batches; the targets (H100, full size) do not apply")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    repeats = args.repeats or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    ct = args.ct or (FULL_CT if FULL_CT.exists() else bundled_ct_path())
    hu, affine = load_nifti(ct)
    mu = hu_to_mu(hu).to(device)
    volumes = fast_layouts(mu, affine) if args.layout == "fast" and cuda else {"rays": mu, "rows": mu}
    del mu
    volume_mb = volumes["rays"].numel() * volumes["rays"].element_size() / 2**20
    header = header_lines(args, device, ct, tuple(hu.shape), argv)
    axes = ", ".join(f"{key} {'ijk'[contiguous_axis(v)]}" for key, v in volumes.items())
    header.append(f"volume (mu, float32) {volume_mb:.1f} MB; contiguous index axis: {axes}; "
                  f"timing: {warmup} warm-up + {repeats} timed renders")  # fmt: skip
    for line in header:
        print(line, flush=True)

    run_peers: ModuleType | str | None = None
    if not args.no_peers:
        run_peers = load_run_peers()
        if isinstance(run_peers, str):
            print(f"peers skipped: {run_peers}", flush=True)
        else:
            header.append(f"peers: {', '.join(f'{k} {v}' for k, v in peer_versions().items())}")
    peer_cache: dict = {}
    comparable = cuda and not args.small
    rows: list[Row] = []
    results: dict[str, Row] = {}  # torchdrr's row of each case, by case name

    def add(row: Row) -> None:
        rows.append(row)
        text = row.error or f"median {row.median_ms:.3f} ms, min {row.min_ms:.3f} ms"
        if row.peak_mb is not None and row.error is None:
            text += f", peak {row.peak_mb:.1f} MB"
        print(f"  {row.case:<10} {row.renderer:<28} {row.width}x{row.height} b{row.batch:<3} {row.pass_:<15} {text}",
              flush=True)  # fmt: skip

    for name in [n for n in CASES if n in args.cases]:
        case = CASES[name].scaled(args.small)
        if name == "poly":
            line_row = Row(name, "torchdrr siddon, 1 channel", case.height, case.width, case.batch, case.pass_)
            poly_row = Row(name, "torchdrr DRR 3 materials 90 kVp", case.height, case.width, case.batch, case.pass_)
            try:
                volume = volumes["rays"]
                axis = contiguous_axis(volume) if args.layout == "fast" and cuda else None
                line, poly = poly_render_fns(hu, affine, volume, case, contiguous_axis=axis)
                for row, fn in ((line_row, line), (poly_row, poly)):
                    row.samples_ms, row.peak_mb = time_fn(fn, device, repeats, warmup)
                    row.median_ms, row.min_ms = statistics.median(row.samples_ms), min(row.samples_ms)
                ratio = poly_row.median_ms / line_row.median_ms
                poly_row.target = f"<= {POLY_TARGET_RATIO:g}x 1 channel (is {ratio:.2f}x)"
                poly_row.met = ("yes" if ratio <= POLY_TARGET_RATIO else "no") if comparable else "n/a"
                poly_row.note = f"ratio to the 1-channel render {ratio:.3f}; polychromatic, no noise, line_integral"
            except Exception as error:  # noqa: BLE001 -- report it in the table
                poly_row.error = _error_text(error)
                if line_row.median_ms is None:
                    line_row.error = poly_row.error
            finally:
                line = poly = None  # drop the DRR module and its material volume before the next case
                _free(device)
            add(line_row)
            add(poly_row)
            continue
        if name == "memory" and "b1-pose" in results and results["b1-pose"].error is None:
            source = results["b1-pose"]
            row = Row(name, source.renderer, case.height, case.width, case.batch, case.pass_, source.median_ms,
                      source.min_ms, source.peak_mb, source.samples_ms, note="the b1-pose measurement")  # fmt: skip
        else:
            renderer = f"torchdrr {case.mode}" + (", voxel quads" if case.quads else "")
            if case.graph:
                renderer += ", CUDA graph" if cuda else " (eager: CUDA graphs need a GPU)"
            row = Row(name, renderer, case.height, case.width, case.batch, case.pass_)
            try:
                fn = torchdrr_render_fn(volumes[case.volume_key], affine, case)
                row.samples_ms, row.peak_mb = time_fn(fn, device, repeats, warmup)
                row.median_ms, row.min_ms = statistics.median(row.samples_ms), min(row.samples_ms)
                if case.step is not None:
                    row.note = f"step {case.step} mm"
            except Exception as error:  # noqa: BLE001 -- report it in the table
                row.error = _error_text(error)
            finally:
                _free(device)
        if name == "memory" and row.error is None:
            row.note = (row.note + f"; volume {volume_mb:.1f} MB").lstrip("; ")
        judge(row, case, comparable, volume_mb)
        results[name] = row
        add(row)

        # The peers right after our row, so that both see the machine in the same state.
        if isinstance(run_peers, ModuleType):
            wanted = list(case.peers)
            source_case = PEER_SOURCE_CASE.get(name)
            if source_case is not None and source_case not in args.cases and not case.graph:
                # the comparison rows come from another case that is not being run: measure them here
                wanted = [
                    p for p in CASES[source_case].peers if not (name in TRILINEAR_CASES and p == "diffdrr-siddon")
                ]
                case = CASES[source_case].scaled(args.small)
            for peer_name in wanted:
                add(run_peer(run_peers, peer_name, case, ct, device, repeats, warmup, peer_cache))
    peer_cache.clear()

    peer_ratios(rows)
    out = args.out or ROOT / "benchmarks" / "out" / f"speed-{platform.node() or 'host'}.json"
    payload = {
        "header": header,
        "command": shlex.join([Path(sys.argv[0]).name, *argv]),
        "device": args.device,
        "small": args.small,
        "repeats": repeats,
        "warmup": warmup,
        "ct": {"path": str(ct), "shape": list(hu.shape), "volume_mb": volume_mb},
        "warp_tile_width": os.environ.get("TORCHDRR_WARP_TILE_WIDTH"),
        "versions": {"torchdrr": torchdrr.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     **peer_versions()},
        "cases": {n: CASES[n].description for n in args.cases},
        "rows": [r.as_dict() for r in rows],
    }  # fmt: skip
    write_json(out, payload)
    print(f"wrote {out}\n")
    print(markdown_table(rows, header))
    return 0 if all(r.error is None for r in rows if r.renderer.startswith("torchdrr")) else 1


if __name__ == "__main__":
    sys.exit(main())

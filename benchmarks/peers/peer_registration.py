"""Run the peers' own 2D/3D registration (DiffDRR 0.6.1, nanodrr 0.1.7) on torchdrr cases; get torchdrr cameras back.

torchdrr side (our venv). It writes the cases to ``CASES.npz`` in a temporary folder, runs
``benchmarks/peers/register_peers.py`` with the peers' interpreter as a subprocess (the peers and torchdrr need
different torch builds here; on the GPU machine one interpreter holds all three), reads ``RESULT.json`` and converts
every final pose back to a :class:`torchdrr.geometry.Camera` with the public functions of
:mod:`torchdrr.geometry.peer_poses`. No peer is imported here. Example::

    from benchmarks.peers.peer_registration import run_peer_registrations  # or load the file by path
    out = run_peer_registrations(ct_path, start_cameras, targets, [100] * n, device="cuda")
    out["nanodrr"]["cameras"], out["nanodrr"]["seconds"], out["diffdrr"]["error"]

Frames (see ``peer_poses``): both peers use their ``"AP"`` orientation; DiffDRR keeps ``reverse_x_axis=True`` (its
default). The targets are mapped into each peer's image orientation (column flips) before they are written, and the
detector is K's: principal point at the centre, ``delx = SDD / |K[0, 0]|`` (columns), ``dely = SDD / K[1, 1]``
(rows).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchdrr.geometry import Camera
from torchdrr.geometry.peer_poses import (
    from_diffdrr,
    from_nanodrr_rt_inv,
    peer_intrinsics,
    to_diffdrr,
    to_nanodrr,
    torchdrr_image_to_diffdrr,
    torchdrr_image_to_nanodrr,
)
from torchdrr.io.volume import volume_center

__all__ = ["PEER_NAMES", "default_python", "peers_available", "run_peer_registrations", "write_cases"]

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "register_peers.py"
REPO = HERE.parents[1]
PEER_NAMES = ("nanodrr", "diffdrr")
NANODRR_ORIENTATION = "AP"
DIFFDRR_ORIENTATION = "AP"
DIFFDRR_REVERSE_X_AXIS = True


def default_python() -> str:
    """The peers' interpreter: ``$PEERS_PYTHON``, else ``<repo>/.venv-peers/bin/python`` if it exists, else this one
    (on the GPU machine one interpreter holds torchdrr and both peers)."""
    env = os.environ.get("PEERS_PYTHON")
    if env:
        return env
    venv = REPO / ".venv-peers" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# ------------------------------------------------------------------------------------------------------ geometry
def _batched_camera(initial: Camera | Sequence[Camera]) -> Camera:
    if isinstance(initial, Camera):
        return initial
    cams = list(initial)
    if not cams:
        raise ValueError("initial must hold at least one camera")
    first = cams[0]
    for cam in cams[1:]:
        same = (cam.height, cam.width, float(cam.sdd_mm)) == (first.height, first.width, float(first.sdd_mm))
        if not same or not torch.allclose(cam.intrinsics.double().cpu(), first.intrinsics.double().cpu(), atol=1e-9):
            raise ValueError("all initial cameras must share one detector (K, height, width, sdd_mm)")
    rotation = torch.cat([c.rotation.detach().double().cpu() for c in cams])
    translation = torch.cat([c.translation.detach().double().cpu() for c in cams])
    return Camera(first.intrinsics.detach().double().cpu(), rotation, translation, first.height, first.width,
                  float(first.sdd_mm))  # fmt: skip


def peer_detector(camera: Camera) -> tuple[int, int, float, float, float]:
    """``(height, width, sdd_mm, delx_mm, dely_mm)`` of a torchdrr camera whose K the peers can express (centred
    principal point, mirrored columns as ``intrinsic_matrix(mirror=True)`` builds it); ValueError otherwise."""
    k = camera.intrinsics.detach().double().cpu()
    height, width, sdd = int(camera.height), int(camera.width), float(camera.sdd_mm)
    delx, dely = sdd / abs(float(k[0, 0])), sdd / abs(float(k[1, 1]))
    expected = peer_intrinsics(sdd, height, width, delx, dely)
    if not torch.allclose(k, expected, rtol=1e-9, atol=1e-6):
        raise ValueError(
            "the peers take a centred detector with torchdrr's default (mirrored) K, as built by "
            f"intrinsic_matrix(..., mirror=True); got K = {k.tolist()}"
        )
    return height, width, sdd, delx, dely


def ct_geometry(ct_path: str | Path) -> tuple[Tensor, tuple[int, int, int]]:
    """The NIfTI CT's ``[4, 4]`` RAS+ affine (float64) and voxel shape, from its header (the data is not read)."""
    import nibabel as nib

    image = nib.load(str(ct_path))
    if len(image.shape) != 3:
        raise ValueError(f"{ct_path} must hold a 3D volume, got shape {image.shape}")
    return torch.as_tensor(np.asarray(image.affine, dtype=np.float64)), tuple(int(n) for n in image.shape)


def write_cases(
    path: str | Path, ct_path: str | Path, camera: Camera, targets: Tensor, renders: Sequence[int]
) -> dict[str, np.ndarray]:
    """Writes ``CASES.npz`` for ``register_peers.py`` (keys: see its docstring) and returns what was written."""
    height, width, sdd, delx, dely = peer_detector(camera)
    n = camera.batch_size
    images = torch.as_tensor(targets).detach().to("cpu", torch.float64)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() == 2:
        images = images.unsqueeze(0)
    if tuple(images.shape) != (n, height, width):
        raise ValueError(f"targets must be [N, H, W] = [{n}, {height}, {width}], got {tuple(targets.shape)}")
    budget = [int(r) for r in renders]
    if len(budget) != n or any(r < 1 for r in budget):
        raise ValueError(f"renders must hold {n} positive budgets, got {list(renders)}")
    affine, shape = ct_geometry(ct_path)
    iso = volume_center(affine, shape)
    rotation = camera.rotation.detach().to("cpu", torch.float64)
    translation = camera.translation.detach().to("cpu", torch.float64)
    nano_rot, nano_xyz = to_nanodrr(rotation, translation, orientation=NANODRR_ORIENTATION, isocenter=iso)
    diff_rot, diff_xyz = to_diffdrr(
        rotation, translation, "euler_angles", "ZXY", degrees=False, affine=affine, shape=shape,
        orientation=DIFFDRR_ORIENTATION, reverse_x_axis=DIFFDRR_REVERSE_X_AXIS,
    )  # fmt: skip
    record = {
        "ct_path": np.array(str(Path(ct_path).resolve())),
        "height": np.array(height),
        "width": np.array(width),
        "sdd_mm": np.array(sdd),
        "delx_mm": np.array(delx),
        "dely_mm": np.array(dely),
        "renders": np.array(budget, dtype=np.int64),
        "target_nanodrr": torchdrr_image_to_nanodrr(images, NANODRR_ORIENTATION).numpy(),
        "target_diffdrr": torchdrr_image_to_diffdrr(images, DIFFDRR_ORIENTATION, DIFFDRR_REVERSE_X_AXIS).numpy(),
        "nanodrr_orientation": np.array(NANODRR_ORIENTATION),
        "nanodrr_isocenter": iso.numpy(),
        "nanodrr_rotation_deg": nano_rot.numpy(),
        "nanodrr_translation_mm": nano_xyz.numpy(),
        "diffdrr_orientation": np.array(DIFFDRR_ORIENTATION),
        "diffdrr_reverse_x_axis": np.array(DIFFDRR_REVERSE_X_AXIS),
        "diffdrr_rotation_rad": diff_rot.numpy(),
        "diffdrr_translation_mm": diff_xyz.numpy(),
    }
    np.savez(path, **record)
    return record


def _camera_from_result(name: str, cases: list[dict], initial: Camera, affine: Tensor, shape) -> Camera:
    if len(cases) != initial.batch_size:
        raise ValueError(f"{name} returned {len(cases)} poses for {initial.batch_size} cases")
    if name == "nanodrr":
        rt_inv = torch.tensor([c["rt_inv"] for c in cases], dtype=torch.float64)
        rotation, translation = from_nanodrr_rt_inv(rt_inv, orientation=NANODRR_ORIENTATION)
    elif name == "diffdrr":
        conventions = {(c.get("parameterization"), c.get("convention"), bool(c.get("degrees"))) for c in cases}
        if len(conventions) != 1:
            raise ValueError(f"diffdrr returned mixed pose conventions {conventions}")
        parameterization, convention, degrees = conventions.pop()
        rotation, translation = from_diffdrr(
            torch.tensor([c["rotation"] for c in cases], dtype=torch.float64),
            torch.tensor([c["translation"] for c in cases], dtype=torch.float64),
            parameterization, convention, degrees, affine=affine, shape=shape,
            orientation=DIFFDRR_ORIENTATION, reverse_x_axis=DIFFDRR_REVERSE_X_AXIS,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown peer {name!r}")
    return Camera(initial.intrinsics.detach().double().cpu(), rotation, translation, initial.height, initial.width,
                  float(initial.sdd_mm))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- subprocess
def _run_subprocess(cmd: list[str], timeout_s: float | None) -> tuple[int | None, str]:
    """Runs ``cmd``, echoing its stderr (the runner's progress) live; returns (exit code or None on timeout, the last
    stderr lines). Tests replace this function."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO))

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    reader.join(timeout=5)
    return rc, "\n".join(tail)


def _entry(error: str | None, version: Any = None, n: int = 0) -> dict[str, Any]:
    return {
        "cameras": None,
        "seconds": [None] * n,
        "renders": [0] * n,
        "error": error,
        "version": version,
        "backend": None,
        "loss_initial": [None] * n,
        "loss_best": [None] * n,
        "converged": [False] * n,
        "case_errors": [error] * n,
    }


def run_peer_registrations(
    ct_path: str | Path,
    initial: Camera | Sequence[Camera],
    targets: Tensor,
    renders: Sequence[int] | int,
    *,
    peers: Sequence[str] = PEER_NAMES,
    python: str | None = None,
    device: str = "cpu",
    timeout_s: float | None = None,
    nanodrr_backend: str = "auto",
    workdir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Each peer's own registration from ``initial`` toward ``targets``, ``renders[i]`` forward renders for case i.

    Args:
        ct_path: the CT (NIfTI; both peers read it; torchdrr's world is its RAS+ affine).
        initial: a Camera of N poses (or a list of N one-pose Cameras sharing one detector): the starting poses.
        targets: ``[N, H, W]`` fixed images in torchdrr's orientation, line-integral sense (bright where the body
            attenuates); the peers' NCC losses ignore the scale.
        renders: the render budget of each case (an int applies to all).
        peers: any of ``"nanodrr"``, ``"diffdrr"``.
        python: the interpreter that runs ``register_peers.py`` (default: :func:`default_python`).
        device: ``"cpu"`` or ``"cuda"``.
        timeout_s: kill the runner after this long (peers still running then get an error entry).
        nanodrr_backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        workdir: keep CASES.npz and RESULT.json there instead of a temporary folder.

    Returns:
        ``{peer: {"cameras": Camera of N poses (same K, height, width, sdd as ``initial``) or None, "seconds": [N],
        "renders": [N] (used; < budget when the peer's NCC > 0.999 stop fired), "error": str | None, "version",
        "backend", "loss_initial": [N], "loss_best": [N] (the peers' NCC), "converged": [N], "case_errors": [N]}}``.
        A peer that cannot run (not installed, CUDA missing, runner crash) gets ``cameras=None`` and ``error``; a
        single failed case keeps its initial pose and names its error in ``case_errors``. Never raises for a peer's
        failure; raises ValueError for inconsistent inputs.
    """
    camera = _batched_camera(initial)
    n = camera.batch_size
    budget = [int(renders)] * n if isinstance(renders, int) else [int(r) for r in renders]
    names = [str(p) for p in peers]
    unknown = [p for p in names if p not in PEER_NAMES]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; expected any of {PEER_NAMES}")
    python = python or default_python()

    with tempfile.TemporaryDirectory(prefix="peer_registration_") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        cases_path, result_path = folder / "CASES.npz", folder / "RESULT.json"
        result_path.unlink(missing_ok=True)
        write_cases(cases_path, ct_path, camera, targets, budget)
        cmd = [
            python, str(RUNNER), "--cases", str(cases_path), "--out", str(result_path), "--peers", ",".join(names),
            "--device", device, "--nanodrr-backend", nanodrr_backend,
        ]  # fmt: skip
        try:
            rc, tail = _run_subprocess(cmd, timeout_s)
        except OSError as e:  # the interpreter does not exist or cannot run
            return {name: _entry(f"could not start {python}: {e}", n=n) for name in names}
        result: dict[str, Any] = {}
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError) as e:
                tail = f"unreadable RESULT.json: {e}\n{tail}"
        why = "timed out" if rc is None else f"exited with code {rc}"
        failure = f"register_peers.py {why}; last stderr:\n{tail[-1500:]}"

        affine, shape = ct_geometry(ct_path)
        out: dict[str, dict[str, Any]] = {}
        peer_results = result.get("peers", {}) if isinstance(result, dict) else {}
        for name in names:
            got = peer_results.get(name)
            if not isinstance(got, dict):
                out[name] = _entry(f"no result from {name}: {failure}", n=n)
                continue
            if got.get("error") or "cases" not in got:
                out[name] = _entry(str(got.get("error") or "no cases in the result"), got.get("version"), n)
                continue
            cases = got["cases"]
            entry = _entry(None, got.get("version"), n)
            try:
                entry["cameras"] = _camera_from_result(name, cases, camera, affine, shape)
            except (KeyError, TypeError, ValueError) as e:
                out[name] = _entry(f"could not read {name}'s poses: {type(e).__name__}: {e}", got.get("version"), n)
                continue
            entry.update(
                {
                    "backend": got.get("backend"),
                    "seconds": [c.get("seconds") for c in cases],
                    "renders": [int(c.get("renders") or 0) for c in cases],
                    "loss_initial": [c.get("loss_initial") for c in cases],
                    "loss_best": [c.get("loss_best") for c in cases],
                    "converged": [bool(c.get("converged")) for c in cases],
                    "case_errors": [c.get("error") for c in cases],
                    "setup_s": got.get("setup_s"),
                    "recipe": got.get("recipe"),
                    "device": result.get("device"),
                    "device_name": result.get("device_name"),
                    "stubs": result.get("stubs"),
                }
            )
            out[name] = entry
        return out


def peers_available(python: str | None = None, timeout_s: float = 300.0) -> dict[str, bool]:
    """Whether each peer's registration modules import under ``python`` (default: :func:`default_python`), with the
    runner's stand-ins; False for all when the interpreter cannot run."""
    python = python or default_python()
    try:
        proc = subprocess.run(
            [python, str(RUNNER), "--check"], capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO)
        )
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        return {name: bool(found.get(name)) for name in PEER_NAMES}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return dict.fromkeys(PEER_NAMES, False)

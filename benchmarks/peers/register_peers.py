#!/usr/bin/env python3
"""Run the peer renderers' OWN 2D/3D registration (DiffDRR 0.6.1, nanodrr 0.1.7) on cases written by torchdrr.

Run it with the peers' interpreter (it must not import torchdrr)::

    .venv-peers/bin/python benchmarks/peers/register_peers.py --cases CASES.npz --out RESULT.json \
        [--peers nanodrr,diffdrr] [--device cpu|cuda] [--nanodrr-backend auto|torch|triton]

``benchmarks/peers/peer_registration.py`` (torchdrr side) writes CASES.npz, runs this script as a subprocess and
converts RESULT.json back to torchdrr cameras. This file only *calls* the peers' public APIs; none of their code is
copied here (both peers are MIT-licensed, installed from PyPI).

Each peer runs the recipe of its own registration tutorial, unchanged except for the number of iterations, which is
the case's render budget (one forward render per iteration; a batch of k counts as k):

* nanodrr (``tutorials/optim.ipynb`` of nanodrr): ``nanodrr.registration.Registration(subject, rt_inv, k_inv, sdd,
  height, width)`` (an so(3)-log + translation perturbation about the volume centre), loss
  ``nanodrr.metrics.NormalizedCrossCorrelation2d()`` maximised by ``torch.optim.Adam`` with lr 5e-2 for ``_rot``
  (radians) and 1e1 for ``_xyz`` (mm); stop once NCC > 0.999.
* DiffDRR (tutorial "2D/3D registration", ``notebooks/tutorials/registration.ipynb``):
  ``diffdrr.registration.Registration(drr, rotation, translation, parameterization="euler_angles",
  convention="ZXY")`` with ``DRR(..., stop_gradients_through_grid_sample=True)`` (Siddon), loss
  ``diffdrr.metrics.NormalizedCrossCorrelation2d()`` maximised by ``torch.optim.Adam`` with lr 1e-1 for the
  rotation (radians) and 5e0 for the translation (mm); stop once NCC > 0.999.

As a fair user would, the pose with the best NCC seen is kept (the NCC of a render belongs to the pose it was
rendered from, i.e. before that iteration's optimizer step). Wall time covers the registration loop only (not the CT
load or module set-up), with CUDA synchronised at both ends; on CUDA one untimed forward + backward at the initial
pose comes first (``--warmup``), so that Triton's compilation is not timed.

CASES.npz keys: ``ct_path`` (str), ``height``, ``width``, ``sdd_mm``, ``delx_mm`` (column pitch), ``dely_mm`` (row
pitch), ``renders [N]``, ``target_nanodrr [N, H, W]``, ``target_diffdrr [N, H, W]`` (each already in that peer's
image orientation), ``nanodrr_orientation`` (str), ``nanodrr_isocenter [3]`` (mm, the point given to
``make_rt_inv``), ``nanodrr_rotation_deg [N, 3]`` (ZXY), ``nanodrr_translation_mm [N, 3]``,
``diffdrr_orientation`` (str), ``diffdrr_reverse_x_axis`` (bool), ``diffdrr_rotation_rad [N, 3]`` (ZXY),
``diffdrr_translation_mm [N, 3]``.

RESULT.json: ``{"format", "device", "device_name", "stubs", "versions", "peers": {name: {...}}}``; each peer holds
``version``, ``backend``, ``recipe``, ``setup_s`` and ``cases`` (one dict per case: ``seconds``, ``renders``,
``loss_initial``, ``loss_best``, ``loss_last``, ``best_render``, ``converged``, ``error`` (None or a message; then the
initial pose is reported) and the final pose: nanodrr ``rt_inv`` (camera -> world 4x4, for
``peer_poses.from_nanodrr_rt_inv``), DiffDRR ``rotation`` / ``translation`` (for ``peer_poses.from_diffdrr`` with
``parameterization``, ``convention``, ``degrees``)), or just ``{"error": ...}`` when the peer cannot run. The file is
written atomically. The script exits 0 once its arguments parse.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMAT = "torchdrr-peer-registration/1"
CONVERGED_NCC = 0.999  # both tutorials stop once the NCC exceeds this


def _unavailable(qualname: str):
    def raiser(*args, **kwargs):
        raise RuntimeError(f"{qualname} is a stand-in (the real package is not importable here)")

    raiser.__name__ = qualname.rsplit(".", 1)[-1]
    return raiser


def _ensure_module(module: str, names: tuple[str, ...]) -> bool:
    """Import ``module``; if that fails, put stand-in modules (whose ``names`` raise when called) in its place.

    DiffDRR's ``registration`` module imports timm at module level (for ``PoseRegressor`` only) and its ``metrics``
    module imports torchvision and kornia (for the Sobel and mutual-information losses only); none of them is used by
    ``Registration`` or ``NormalizedCrossCorrelation2d``. Returns True when a stand-in was installed.
    """
    try:
        importlib.import_module(module)
        return False
    except Exception:  # noqa: BLE001 -- missing, or present but broken beside this torch build
        top = module.split(".")[0]
        for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
            del sys.modules[key]
    parts = module.split(".")
    parent = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        mod = types.ModuleType(name)
        mod.__dict__["__stand_in__"] = True
        sys.modules[name] = mod
        if parent is not None:
            setattr(parent, parts[i], mod)
        parent = mod
    for attr in names:
        setattr(parent, attr, _unavailable(f"{module}.{attr}"))
    return True


sys.path.insert(0, str(HERE))
from run_peers import STUBS_USED, _sync, _version  # noqa: E402  (run_peers installs the SimpleITK stand-in)

# Fallback package folders (peerlib/fallback of pack_for_device.sh) go after site-packages: installed copies win.
for _extra in filter(None, os.environ.get("PEERS_EXTRA_PATH", "").split(os.pathsep)):
    if _extra not in sys.path:
        sys.path.append(_extra)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _str(value) -> str:
    return str(np.asarray(value).item()) if np.asarray(value).shape == () else str(value)


def load_cases(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        cases = {k: f[k] for k in f.files}
    n = len(cases["renders"])
    for key in ("target_nanodrr", "target_diffdrr"):
        if key in cases and cases[key].shape[0] != n:
            raise ValueError(f"{key} holds {cases[key].shape[0]} images for {n} cases")
    return cases


# ----------------------------------------------------------------------------------------------------------- loop
def optimize(reg, optimizer, criterion, target, budget: int, render, snapshot, device: torch.device) -> dict:
    """The tutorials' loop (render, NCC, backward, Adam step; stop once NCC > 0.999) for ``budget`` renders, keeping
    the best-NCC pose. ``render()`` returns the moving image; ``snapshot()`` the current pose (detached copy)."""
    best, best_pose, best_render, first, last, used = -float("inf"), snapshot(), 0, None, None, 0
    _sync(device)
    t0 = time.perf_counter()
    for i in range(budget):
        optimizer.zero_grad()
        moving = render()
        loss = criterion(target, moving)
        used += 1
        value = float(loss.detach().mean())
        if first is None:
            first = value
        last = value
        if value > best:  # this NCC belongs to the pose before the step below
            best, best_pose, best_render = value, snapshot(), i + 1
        if value > CONVERGED_NCC:
            break
        loss.mean().backward()
        optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "pose": best_pose,
        "seconds": seconds,
        "renders": used,
        "loss_initial": first,
        "loss_best": best if used else None,
        "loss_last": last,
        "best_render": best_render,
        "converged": bool(used and best > CONVERGED_NCC),
    }


def _target(image: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(image, dtype=np.float32), device=device).reshape(1, 1, *image.shape[-2:])


def _warm(reg, render, criterion, target) -> None:
    loss = criterion(target, render())
    loss.mean().backward()
    reg.zero_grad(set_to_none=True)


# -------------------------------------------------------------------------------------------------------- nanodrr
NANODRR_RECIPE = {
    "source": "nanodrr tutorials/optim.ipynb (https://vivekg.dev/nanodrr/tutorials/optim)",
    "module": "nanodrr.registration.Registration (so3_log rotation + translation perturbation about the isocenter)",
    "loss": "nanodrr.metrics.NormalizedCrossCorrelation2d()",
    "optimizer": "torch.optim.Adam(maximize=True)",
    "lr_rotation": 5e-2,
    "lr_translation": 1e1,
    "stop": f"NCC > {CONVERGED_NCC}",
}


def run_nanodrr(cases: dict, args, device: torch.device, log) -> dict:
    from nanodrr.camera import make_k_inv, make_rt_inv
    from nanodrr.data import Subject
    from nanodrr.drr import DRR
    from nanodrr.metrics import NormalizedCrossCorrelation2d
    from nanodrr.registration import Registration

    out: dict = {"version": _version("nanodrr"), "recipe": dict(NANODRR_RECIPE), "n_samples": args.nanodrr_samples}
    height, width = int(cases["height"]), int(cases["width"])
    sdd_mm = float(cases["sdd_mm"])
    t0 = time.perf_counter()
    subject = Subject.from_filepath(_str(cases["ct_path"])).to(device=device, dtype=torch.float32)
    k_inv = make_k_inv(
        sdd_mm, float(cases["delx_mm"]), float(cases["dely_mm"]), 0.0, 0.0, height, width, dtype=torch.float32
    ).to(device)
    sdd = torch.tensor([sdd_mm], dtype=torch.float32, device=device)
    orientation = _str(cases["nanodrr_orientation"])
    orientation = None if orientation == "None" else orientation
    iso = torch.as_tensor(np.asarray(cases["nanodrr_isocenter"], dtype=np.float64))
    rot = torch.as_tensor(np.asarray(cases["nanodrr_rotation_deg"], dtype=np.float64))
    xyz = torch.as_tensor(np.asarray(cases["nanodrr_translation_mm"], dtype=np.float64))
    rt_inv_all = make_rt_inv(rot, xyz, orientation=orientation, isocenter=iso)  # float64, [N, 4, 4]
    backend = args.nanodrr_backend
    if backend == "auto":  # resolve it as render() would, so the result names the backend that ran
        from nanodrr.drr import backends

        probe = DRR(k_inv, sdd, height, width).to(device)
        rt0 = rt_inv_all[:1].to(device=device, dtype=torch.float32)
        backend = backends.pick_fused_backend(subject, rt0, probe.tgt, height, width) or "torch"
        del probe
    out["backend"] = backend
    out["setup_s"] = round(time.perf_counter() - t0, 3)
    criterion = NormalizedCrossCorrelation2d()

    results = []
    n = len(cases["renders"])
    for i in range(n):
        budget = int(cases["renders"][i])
        rt_inv0 = rt_inv_all[i : i + 1].to(device=device, dtype=torch.float32)
        case: dict = {"error": None}
        try:
            torch.manual_seed(0)  # Registration starts its perturbation at eps * randn
            reg = Registration(subject, rt_inv0, k_inv, sdd, height, width)
            target = _target(cases["target_nanodrr"][i], device)
            optimizer = torch.optim.Adam(
                [
                    {"params": [reg._rot], "lr": NANODRR_RECIPE["lr_rotation"]},
                    {"params": [reg._xyz], "lr": NANODRR_RECIPE["lr_translation"]},
                ],
                maximize=True,
            )

            def render(reg=reg):
                img = reg(n_samples=args.nanodrr_samples, backend=backend)
                return img if img.shape[1] == 1 else img.sum(dim=1, keepdim=True)

            def snapshot(reg=reg):
                with torch.no_grad():
                    return reg.pose.detach().to("cpu", torch.float64).clone()

            if args.warmup > 0:
                for _ in range(args.warmup):
                    _warm(reg, render, criterion, target)
            res = optimize(reg, optimizer, criterion, target, budget, render, snapshot, device)
            case.update({k: v for k, v in res.items() if k != "pose"})
            case["rt_inv"] = res["pose"][0].tolist()
        except Exception as e:  # noqa: BLE001 -- one failing case must not stop the others
            case.update({"error": _message(e), "rt_inv": rt_inv_all[i].tolist(), "renders": 0, "seconds": None})
            if os.environ.get("PEERS_TRACEBACK") == "1":
                traceback.print_exc(file=log)
        results.append(case)
        _progress(log, "nanodrr", i, n, budget, case)
        reg = optimizer = target = None
        _free(device)
    out["cases"] = results
    return out


# -------------------------------------------------------------------------------------------------------- DiffDRR
DIFFDRR_RECIPE = {
    "source": "DiffDRR tutorial '2D/3D registration' (notebooks/tutorials/registration.ipynb, "
    "https://vivekg.dev/DiffDRR/tutorials/registration.html)",
    "module": "diffdrr.registration.Registration(parameterization='euler_angles', convention='ZXY')",
    "renderer": "siddon, stop_gradients_through_grid_sample=True",
    "loss": "diffdrr.metrics.NormalizedCrossCorrelation2d()",
    "optimizer": "torch.optim.Adam(maximize=True)",
    "lr_rotation": 1e-1,
    "lr_translation": 5e0,
    "stop": f"NCC > {CONVERGED_NCC}",
}


def run_diffdrr(cases: dict, args, device: torch.device, log) -> dict:
    stand_ins = []
    if _ensure_module("timm", ("create_model",)):
        stand_ins.append("timm")
    if _ensure_module("torchvision.transforms.functional", ("gaussian_blur",)):
        stand_ins.append("torchvision")
    if _ensure_module("kornia.enhance.histogram", ("marginal_pdf", "joint_pdf")):
        stand_ins.append("kornia")
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.metrics import NormalizedCrossCorrelation2d
    from diffdrr.registration import Registration

    out: dict = {"version": _version("diffdrr"), "recipe": dict(DIFFDRR_RECIPE), "backend": "siddon"}
    if stand_ins:
        out["stand_ins"] = stand_ins  # imported by diffdrr modules but unused by Registration and NCC
    height, width = int(cases["height"]), int(cases["width"])
    orientation = _str(cases["diffdrr_orientation"])
    orientation = None if orientation == "None" else orientation
    reverse_x_axis = bool(np.asarray(cases["diffdrr_reverse_x_axis"]).item())
    t0 = time.perf_counter()
    subject = read(_str(cases["ct_path"]), orientation=orientation)  # center_volume=True (default)
    drr = DRR(
        subject,
        sdd=float(cases["sdd_mm"]),
        height=height,
        delx=float(cases["delx_mm"]),
        width=width,
        dely=float(cases["dely_mm"]),
        reverse_x_axis=reverse_x_axis,
        stop_gradients_through_grid_sample=True,
    ).to(device)
    out["setup_s"] = round(time.perf_counter() - t0, 3)
    criterion = NormalizedCrossCorrelation2d()
    rot_all = np.asarray(cases["diffdrr_rotation_rad"], dtype=np.float64)
    xyz_all = np.asarray(cases["diffdrr_translation_mm"], dtype=np.float64)

    results = []
    n = len(cases["renders"])
    for i in range(n):
        budget = int(cases["renders"][i])
        case: dict = {"error": None, "parameterization": "euler_angles", "convention": "ZXY", "degrees": False}
        try:
            rotation = torch.tensor(rot_all[i : i + 1], dtype=torch.float32, device=device)
            translation = torch.tensor(xyz_all[i : i + 1], dtype=torch.float32, device=device)
            reg = Registration(drr, rotation, translation, parameterization="euler_angles", convention="ZXY")
            target = _target(cases["target_diffdrr"][i], device)
            optimizer = torch.optim.Adam(
                [
                    {"params": [reg._rotation], "lr": DIFFDRR_RECIPE["lr_rotation"]},
                    {"params": [reg._translation], "lr": DIFFDRR_RECIPE["lr_translation"]},
                ],
                maximize=True,
            )

            def snapshot(reg=reg):
                with torch.no_grad():
                    r = reg.rotation.detach().to("cpu", torch.float64).clone()
                    t = reg.translation.detach().to("cpu", torch.float64).clone()
                return r, t

            if args.warmup > 0:
                for _ in range(args.warmup):
                    _warm(reg, reg, criterion, target)
            res = optimize(reg, optimizer, criterion, target, budget, reg, snapshot, device)
            case.update({k: v for k, v in res.items() if k != "pose"})
            case["rotation"], case["translation"] = res["pose"][0][0].tolist(), res["pose"][1][0].tolist()
        except Exception as e:  # noqa: BLE001
            case.update(
                {
                    "error": _message(e),
                    "rotation": rot_all[i].tolist(),
                    "translation": xyz_all[i].tolist(),
                    "renders": 0,
                    "seconds": None,
                }
            )
            if os.environ.get("PEERS_TRACEBACK") == "1":
                traceback.print_exc(file=log)
        results.append(case)
        _progress(log, "diffdrr", i, n, budget, case)
        reg = optimizer = target = None
        _free(device)
    out["cases"] = results
    return out


# ----------------------------------------------------------------------------------------------------------- main
def _message(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
        msg = "out of memory: " + msg
    return msg[:2000]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress(log, peer: str, i: int, n: int, budget: int, case: dict) -> None:
    if case.get("error"):
        print(f"[register_peers] {peer} case {i + 1}/{n}: FAILED {case['error'][:200]}", file=log, flush=True)
        return
    print(
        f"[register_peers] {peer} case {i + 1}/{n}: {case['renders']}/{budget} renders in {case['seconds']:.2f} s, "
        f"NCC {case['loss_initial']:.4f} -> best {case['loss_best']:.4f} (render {case['best_render']})"
        + (" converged" if case["converged"] else ""),
        file=log,
        flush=True,
    )


def write_json_atomic(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PEERS = {"nanodrr": run_nanodrr, "diffdrr": run_diffdrr}


def check_imports() -> dict[str, bool]:
    """Whether each peer's registration modules import here (with the stand-ins the runs would use)."""
    found = {}
    for name, modules in {
        "nanodrr": ("nanodrr.camera", "nanodrr.data", "nanodrr.drr", "nanodrr.metrics", "nanodrr.registration"),
        "diffdrr": ("diffdrr.data", "diffdrr.drr", "diffdrr.metrics", "diffdrr.registration"),
    }.items():
        try:
            if name == "diffdrr":
                _ensure_module("timm", ("create_model",))
                _ensure_module("torchvision.transforms.functional", ("gaussian_blur",))
                _ensure_module("kornia.enhance.histogram", ("marginal_pdf", "joint_pdf"))
            for module in modules:
                importlib.import_module(module)
            found[name] = True
        except Exception as e:  # noqa: BLE001
            print(f"[register_peers] {name} not importable: {_message(e)[:300]}", file=sys.stderr, flush=True)
            found[name] = False
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="CASES.npz written by peer_registration.py")
    p.add_argument("--out", help="RESULT.json to write (atomically)")
    p.add_argument("--check", action="store_true", help="print {peer: importable} as JSON on stdout and exit")
    p.add_argument("--peers", default="nanodrr,diffdrr", help="comma list from nanodrr,diffdrr")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nanodrr-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--nanodrr-samples", type=int, default=500, help="samples a ray (nanodrr's default, 500)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed forward+backward calls per case (default: 1 on CUDA, 0 CPU)"
    )
    args = p.parse_args(argv)
    if args.check:
        print(json.dumps(check_imports()))
        return 0
    if not args.cases or not args.out:
        p.error("--cases and --out are required (unless --check)")
    device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = 1 if device.type == "cuda" else 0
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    log = sys.stderr

    if device.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    result: dict = {
        "format": FORMAT,
        "device": args.device,
        "device_name": device_name,
        "warmup": args.warmup,
        "stubs": list(STUBS_USED),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffdrr": _version("diffdrr"),
            "nanodrr": _version("nanodrr"),
        },
        "peers": {},
    }
    try:
        cases = load_cases(args.cases)
    except Exception as e:  # noqa: BLE001
        msg = f"could not read {args.cases}: {_message(e)}"
        print(f"[register_peers] {msg}", file=log, flush=True)
        result["peers"] = {name: {"error": msg} for name in names}
        write_json_atomic(args.out, result)
        return 0

    for name in names:
        try:
            if name not in PEERS:
                raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(PEERS)}")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available in this torch build / on this machine")
            print(f"[register_peers] {name}: {len(cases['renders'])} cases on {args.device}", file=log, flush=True)
            result["peers"][name] = PEERS[name](cases, args, device, log)
        except Exception as e:  # noqa: BLE001 -- a peer that cannot run gets an error entry
            result["peers"][name] = {"error": _message(e), "version": _version(name)}
            print(f"[register_peers] {name}: FAILED {_message(e)[:300]}", file=log, flush=True)
            if os.environ.get("PEERS_TRACEBACK") == "1":
                traceback.print_exc(file=log)
        finally:
            _free(device)
        write_json_atomic(args.out, result)  # after every peer, so a crash later keeps what finished
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

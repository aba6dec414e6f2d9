"""benchmarks/peers/peer_registration.py without the peers: CASES.npz contents and the pose round trip.

The runner subprocess is replaced by a fake that reads CASES.npz and answers with the starting poses, expressed the
way each peer reports them (nanodrr: camera -> world ``rt_inv``; DiffDRR: its Euler ZXY parameters).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from torchdrr.geometry import Camera
from torchdrr.geometry.peer_poses import (
    from_nanodrr,
    torchdrr_image_to_diffdrr,
    torchdrr_image_to_nanodrr,
)
from torchdrr.io.volume import volume_center
from torchdrr.registration import offset_camera

MODULE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "peer_registration.py"


@pytest.fixture(scope="module")
def pr():
    spec = importlib.util.spec_from_file_location("peer_registration_under_test", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ct_path(tmp_path: Path) -> Path:
    affine = np.array(
        [[-0.8, 0.0, 0.0, 40.0], [0.0, -0.7, 0.05, 30.0], [0.0, 0.0, 2.5, -100.0], [0.0, 0.0, 0.0, 1.0]]
    )  # LPS-like axes, a slight shear: the centre must come from the affine, not the origin
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 9, 7), dtype=np.int16), affine), str(path))
    return path


def _cameras(ct_path: Path) -> Camera:
    image = nib.load(str(ct_path))
    center = volume_center(torch.as_tensor(image.affine, dtype=torch.float64), image.shape)
    cam = Camera.from_carm(
        torch.tensor([15.0], dtype=torch.float64), -10.0, center, height=12, width=16, pixel_spacing_mm=(3.1, 2.3)
    )
    offsets = torch.tensor([[4.0, -3.0, 2.0, 8.0, -6.0, 5.0], [-20.0, 7.0, -1.0, -3.0, 12.0, 0.5]], dtype=torch.float64)
    return offset_camera(cam, offsets, center)


def _fake_runner(missing: tuple[str, ...] = (), seen: dict | None = None):
    """A stand-in for the runner subprocess: every peer returns its starting pose."""

    def run(cmd: list[str], timeout_s):
        args = dict(zip(cmd[2::2], cmd[3::2], strict=False))
        with np.load(args["--cases"], allow_pickle=False) as f:
            cases = {k: f[k] for k in f.files}
        if seen is not None:
            seen.update(cases)
            seen["cmd"] = cmd
        peers = {}
        for name in args["--peers"].split(","):
            if name in missing:
                peers[name] = {"error": f"ModuleNotFoundError: No module named '{name}'", "version": None}
            elif name == "nanodrr":
                r, t = from_nanodrr(
                    torch.as_tensor(cases["nanodrr_rotation_deg"]),
                    torch.as_tensor(cases["nanodrr_translation_mm"]),
                    orientation=str(cases["nanodrr_orientation"]),
                    isocenter=torch.as_tensor(cases["nanodrr_isocenter"]),
                )
                rt_inv = torch.eye(4, dtype=torch.float64).repeat(len(r), 1, 1)
                rt_inv[:, :3, :3] = r.transpose(-1, -2)  # camera -> world; "AP" needs no reflection
                rt_inv[:, :3, 3] = -(r.transpose(-1, -2) @ t.unsqueeze(-1)).squeeze(-1)
                peers[name] = {
                    "version": "0.1.7",
                    "backend": "torch",
                    "cases": [
                        {
                            "rt_inv": m.tolist(),
                            "seconds": 0.5,
                            "renders": int(b),
                            "loss_initial": 0.5,
                            "loss_best": 0.9,
                            "converged": False,
                            "error": None,
                        }
                        for m, b in zip(rt_inv, cases["renders"], strict=True)
                    ],
                }
            else:
                peers[name] = {
                    "version": "0.6.1",
                    "backend": "siddon",
                    "cases": [
                        {
                            "rotation": r.tolist(),
                            "translation": t.tolist(),
                            "parameterization": "euler_angles",
                            "convention": "ZXY",
                            "degrees": False,
                            "seconds": 1.0,
                            "renders": int(b),
                            "error": None,
                        }
                        for r, t, b in zip(
                            cases["diffdrr_rotation_rad"],
                            cases["diffdrr_translation_mm"],
                            cases["renders"],
                            strict=True,
                        )
                    ],
                }
        Path(args["--out"]).write_text(json.dumps({"format": "torchdrr-peer-registration/1", "peers": peers}))
        return 0, ""

    return run


def test_cases_and_round_trip(pr, ct_path, monkeypatch):
    cams = _cameras(ct_path)
    targets = torch.rand(2, 12, 16, dtype=torch.float64)
    seen: dict = {}
    monkeypatch.setattr(pr, "_run_subprocess", _fake_runner(seen=seen))
    out = pr.run_peer_registrations(ct_path, cams, targets, [7, 9], python="fake-python", device="cuda")

    # CASES.npz: detector, budgets, targets in each peer's orientation, and the command line
    assert seen["cmd"][0] == "fake-python" and seen["cmd"][seen["cmd"].index("--device") + 1] == "cuda"
    assert (int(seen["height"]), int(seen["width"])) == (12, 16)
    assert float(seen["sdd_mm"]) == pytest.approx(1020.0)
    assert float(seen["delx_mm"]) == pytest.approx(2.3) and float(seen["dely_mm"]) == pytest.approx(3.1)
    assert seen["renders"].tolist() == [7, 9]
    assert str(seen["ct_path"]) == str(ct_path.resolve())
    np.testing.assert_array_equal(seen["target_nanodrr"], torchdrr_image_to_nanodrr(targets, "AP").numpy())
    np.testing.assert_array_equal(seen["target_diffdrr"], torchdrr_image_to_diffdrr(targets, "AP", True).numpy())
    assert seen["target_nanodrr"].dtype == np.float64 and seen["nanodrr_rotation_deg"].shape == (2, 3)

    for name in ("nanodrr", "diffdrr"):
        entry = out[name]
        assert entry["error"] is None, entry["error"]
        got = entry["cameras"]
        assert got.batch_size == 2 and (got.height, got.width, got.sdd_mm) == (12, 16, 1020.0)
        torch.testing.assert_close(got.intrinsics, cams.intrinsics, rtol=0, atol=0)
        torch.testing.assert_close(got.rotation, cams.rotation, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.translation, cams.translation, rtol=0, atol=1e-9)
        assert entry["renders"] == [7, 9] and len(entry["seconds"]) == 2
    assert out["nanodrr"]["backend"] == "torch" and out["diffdrr"]["version"] == "0.6.1"


def test_list_of_cameras_and_int_budget(pr, ct_path, monkeypatch):
    cams = _cameras(ct_path)
    single = [Camera(cams.intrinsics, cams.rotation[i], cams.translation[i], 12, 16, 1020.0) for i in range(2)]
    monkeypatch.setattr(pr, "_run_subprocess", _fake_runner())
    out = pr.run_peer_registrations(ct_path, single, torch.rand(2, 1, 12, 16), 5, peers=("diffdrr",), python="x")
    assert set(out) == {"diffdrr"} and out["diffdrr"]["renders"] == [5, 5]
    torch.testing.assert_close(out["diffdrr"]["cameras"].translation, cams.translation, rtol=0, atol=1e-9)


def test_missing_peer_is_an_error_entry(pr, ct_path, monkeypatch):
    cams = _cameras(ct_path)
    monkeypatch.setattr(pr, "_run_subprocess", _fake_runner(missing=("diffdrr",)))
    out = pr.run_peer_registrations(ct_path, cams, torch.rand(2, 12, 16), [3, 3], python="x")
    assert out["diffdrr"]["cameras"] is None and "No module named 'diffdrr'" in out["diffdrr"]["error"]
    assert out["nanodrr"]["error"] is None and out["nanodrr"]["cameras"].batch_size == 2


def test_runner_failures_do_not_raise(pr, ct_path, monkeypatch):
    cams = _cameras(ct_path)
    monkeypatch.setattr(pr, "_run_subprocess", lambda cmd, timeout_s: (None, "still rendering"))
    out = pr.run_peer_registrations(ct_path, cams, torch.rand(2, 12, 16), [3, 3], python="x", timeout_s=1.0)
    for entry in out.values():
        assert entry["cameras"] is None and "timed out" in entry["error"] and "still rendering" in entry["error"]
    monkeypatch.undo()
    out = pr.run_peer_registrations(ct_path, cams, torch.rand(2, 12, 16), [3, 3], python="/nonexistent/python")
    assert all(e["cameras"] is None and "could not start" in e["error"] for e in out.values())
    assert pr.peers_available(python="/nonexistent/python") == {"nanodrr": False, "diffdrr": False}


def test_bad_inputs_raise(pr, ct_path):
    cams = _cameras(ct_path)
    with pytest.raises(ValueError, match="targets"):
        pr.run_peer_registrations(ct_path, cams, torch.rand(2, 12, 15), [3, 3], python="x")
    with pytest.raises(ValueError, match="unknown peers"):
        pr.run_peer_registrations(ct_path, cams, torch.rand(2, 12, 16), [3, 3], peers=("deepdrr",), python="x")
    shifted = Camera(cams.intrinsics + torch.tensor([[0, 0, 1.5], [0, 0, 0], [0, 0, 0]]), cams.rotation,
                     cams.translation, 12, 16, 1020.0)  # fmt: skip
    with pytest.raises(ValueError, match="centred detector"):
        pr.run_peer_registrations(ct_path, shifted, torch.rand(2, 12, 16), [3, 3], python="x")

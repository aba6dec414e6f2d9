"""benchmarks/speed.py: the CPU smoke run, the image it renders, and its handling of peers (with a stand-in)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import torchdrr
from torchdrr.geometry import carm_extrinsics, pixel_rays
from torchdrr.io import bundled_ct_path, load_nifti, volume_center
from torchdrr.render import hu_to_mu

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("torchdrr_speed_benchmark", SPEED)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _table(stdout: str) -> list[list[str]]:
    """The Markdown table rows (cells) after the header row, which must come last in the output."""
    lines = stdout.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| case | renderer |"))
    body = lines[start + 2 :]
    assert body and all(line.startswith("|") for line in body), "the table must be printed last"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in body]


def test_cpu_small_run(speed, tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--small", "--no-peers", "--repeats", "1", "--ct", str(bundled_ct_path())]
    assert speed.main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "torchdrr 0.1" in stdout or f"torchdrr {torchdrr.__version__}" in stdout
    table = _table(stdout)
    cases = {row[0] for row in table}
    assert cases == set(speed.CASES)

    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {r["case"] for r in rows} == set(speed.CASES)
    assert payload["small"] is True and payload["ct"]["shape"] == [170, 170, 133]
    for r in rows:
        assert r["renderer"].startswith("torchdrr"), r
        assert r["error"] is None, r
        assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["drr_per_s"] > 0, r
    by_case = {r["case"]: r for r in rows}
    assert (by_case["b1-fwd"]["height"], by_case["b1-fwd"]["width"]) == (96, 124)
    assert (by_case["b64-small"]["height"], by_case["b64-small"]["batch"]) == (40, 4)
    assert by_case["trilinear"]["pass"] == "fwd" and "0.7" in by_case["trilinear"]["note"]
    assert "is " in [r for r in rows if r["case"] == "poly"][-1]["target"]
    assert not list(tmp_path.glob("*.tmp")), "the JSON is written through a temporary file"


def test_render_matches_per_ray_raycast(speed) -> None:
    """The benchmark's camera_raycast render is the image of torchdrr.raycast along pixel_rays, same geometry."""
    hu, affine = load_nifti(bundled_ct_path())
    mu = hu_to_mu(hu)
    height, width = 12, 16
    isocenter = volume_center(affine, mu.shape)
    primary = speed.poses(3)
    image = speed.render(mu, affine, isocenter, primary, height, width)

    rotation, translation = carm_extrinsics(primary, torch.zeros_like(primary), speed.SOD_MM, isocenter)
    intrinsics = speed.intrinsics_for(height, width, "cpu")
    sources, targets = pixel_rays(intrinsics, rotation, translation, height, width, speed.SDD_MM)
    expected = torchdrr.raycast(mu, affine, sources.float(), targets.float())
    assert image.shape == expected.shape == (3, height * width)
    assert expected.max() > 1.0  # the rays cross the body
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_peer_rows_and_ratios(speed, tmp_path, capsys, monkeypatch) -> None:
    """Peers run in-process through run_peers' API; a failure or an out-of-memory becomes a row, not a crash."""

    class FakePeer:
        def __init__(self, name: str, args) -> None:
            self.label = "nanodrr-triton" if name == "nanodrr" else name
            self.shape = (args.batch, 1, args.height, args.width)

        def __call__(self, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
            return torch.ones(self.shape) * (rotation.sum() + translation.sum())

    def make_peer(name: str, args, device, cache):
        if name == "diffdrr-siddon":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        if name == "diffdrr-trilinear":
            raise ValueError("no such thing")
        return FakePeer(name, args)

    def pose_parameters(batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(batch, 3), torch.tensor([[0.0, 850.0, 0.0]]).repeat(batch, 1)

    fake = types.ModuleType("fake_run_peers")
    fake.make_peer, fake.pose_parameters = make_peer, pose_parameters
    monkeypatch.setattr(speed, "load_run_peers", lambda: fake)
    out = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--small", "--repeats", "1", "--cases", "b1-fwd", "b1-pose", "trilinear"]
    assert speed.main([*argv, "--ct", str(bundled_ct_path()), "--out", str(out)]) == 0
    table = _table(capsys.readouterr().out)
    rows = json.loads(out.read_text())["rows"]
    peers = [r for r in rows if not r["renderer"].startswith("torchdrr")]
    assert {(r["case"], r["renderer"]) for r in peers} == {
        ("b1-fwd", "nanodrr-triton"),
        ("b1-fwd", "diffdrr-siddon"),
        ("b1-fwd", "diffdrr-trilinear"),
        ("b1-pose", "nanodrr-triton"),
    }
    errors = {r["renderer"]: r["error"] for r in peers}
    assert errors["diffdrr-siddon"] == "out of memory"
    assert errors["diffdrr-trilinear"].startswith("error: ValueError")
    assert errors["nanodrr-triton"] is None
    ours = {r["case"]: r for r in rows if r["renderer"].startswith("torchdrr")}
    for case in ("b1-fwd", "b1-pose", "trilinear"):
        assert ours[case]["peer_ratio"].startswith("nanodrr-triton "), ours[case]
    assert any(row[5] == "out of memory" for row in table)

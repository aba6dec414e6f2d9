"""``torchdrr generate`` / ``torchdrr.data.generate``: layout, checksums, resume, ranks, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchdrr.cli import main
from torchdrr.data import DRRDataset
from torchdrr.data.generate import PNG16_SCALES, DatasetError, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--size", "32", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def landmarks() -> torch.Tensor:
    centre = DRRDataset(length=1, height=8, width=8).drr(0).volume_center.to(torch.float64)
    offsets = torch.tensor([[0.0, 0.0, 0.0], [40.0, -30.0, 20.0], [0.0, 5000.0, 0.0]], dtype=torch.float64)
    return centre + offsets


@pytest.fixture(scope="module")
def dataset(landmarks) -> DRRDataset:
    return DRRDataset(length=5, seed=7, height=32, width=32, landmarks=landmarks)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metadata(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def _check_manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_sha256"] == _sha(out / "config.json")
    for name, entry in manifest["files"].items():
        assert _sha(out / name) == entry["sha256"] and (out / name).stat().st_size == entry["bytes"], name
    assert not (out / ".parts").exists()
    return manifest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "torchdrr", "generate", *args],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ----------------------------------------------------------------------------------------------------------------------
# A complete dataset
# ----------------------------------------------------------------------------------------------------------------------
def test_png16_and_tiff_datasets_are_complete_and_match_the_dataset(tmp_path, dataset):
    summary = generate_dataset(tmp_path / "png", dataset, batch_size=2, progress=False)
    assert summary["rendered"] == 5 and summary["skipped"] == 0 and not summary["already_complete"]
    generate_dataset(tmp_path / "tif", dataset, image_format="tiff", batch_size=3, progress=False)
    scale = PNG16_SCALES["line_integral"]
    config = json.loads((tmp_path / "png" / "config.json").read_text())
    assert config["png16"]["scale"] == scale and config["count"] == 5 and config["seed"] == 7
    assert len(config["cts"][0]["sha256"]) == 64 and "time" not in json.dumps(config)

    for fmt, suffix in (("png", ".png"), ("tif", ".tiff")):
        out = tmp_path / fmt
        manifest = _check_manifest(out)
        names = sorted(p.name for p in (out / "images").iterdir())
        assert names == [f"{i:06d}{suffix}" for i in range(5)]
        assert set(manifest["files"]) == {f"images/{n}" for n in names} | {"metadata.jsonl"}
        records = _metadata(out)
        assert [r["index"] for r in records] == list(range(5))
        for record in records:
            item = dataset[record["index"]]
            K, R, t, P = (torch.tensor(record[k], dtype=torch.float64) for k in "KRtP")
            torch.testing.assert_close(P, K @ torch.cat([R, t[:, None]], 1), rtol=1e-12, atol=1e-9)
            for key, value in item.items():
                if key == "image":
                    continue
                expected = value.tolist() if isinstance(value, torch.Tensor) else value
                assert record[key] == expected, key
            assert len(record["landmarks_2d"]) == 3 and record["landmarks_visible"][2] is False
            image = item["image"].numpy()
            path = out / record["file"]
            if fmt == "png":
                levels = np.asarray(Image.open(path)).astype(np.float64)
                assert levels.shape == (32, 32)
                np.testing.assert_allclose(levels / scale, np.clip(image[0], 0, 65535 / scale), atol=0.5 / scale + 1e-9)
            else:
                np.testing.assert_array_equal(np.asarray(Image.open(path)), image[0])

    again = generate_dataset(tmp_path / "png", dataset, progress=False)
    assert again["already_complete"] and again["rendered"] == 0


def test_hdf5_shards_hold_the_float_images(tmp_path, dataset):
    h5py = pytest.importorskip("h5py")
    generate_dataset(tmp_path, dataset, image_format="hdf5", shard_size=3, batch_size=4, progress=False)
    manifest = _check_manifest(tmp_path)
    assert sorted(manifest["files"]) == ["images/shard_000.h5", "images/shard_001.h5", "metadata.jsonl"]
    images = []
    for shard, rows in ((0, [0, 1, 2]), (1, [3, 4])):
        with h5py.File(tmp_path / "images" / f"shard_{shard:03d}.h5", "r") as handle:
            assert handle["index"][()].tolist() == rows
            assert handle["images"].dtype == np.float32 and handle["images"].shape == (len(rows), 1, 32, 32)
            images.append(handle["images"][()])
    expected = torch.stack([item["image"] for item in dataset.render_batch(range(5), stack=False)]).numpy()
    np.testing.assert_array_equal(np.concatenate(images), expected)
    records = _metadata(tmp_path)
    assert [(r["file"], r["shard_row"]) for r in records] == [
        ("images/shard_000.h5", 0), ("images/shard_000.h5", 1), ("images/shard_000.h5", 2),
        ("images/shard_001.h5", 0), ("images/shard_001.h5", 1),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Ranks and resuming
# ----------------------------------------------------------------------------------------------------------------------
def test_two_ranks_write_the_same_files_as_one(tmp_path, landmarks):
    points = tmp_path / "landmarks.npy"
    np.save(points, landmarks.numpy())
    args = ["--count", "6", "--seed", "3", "--format", "tiff", "--landmarks", str(points), *SIZE]
    port = str(_free_port())
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    ranks = [
        _cli(str(tmp_path / "two"), *args, "--batch-size", "2", env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(2)
    ]
    assert main(["generate", str(tmp_path / "one"), *args, "--batch-size", "4"]) == 0
    for process in ranks:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two) and "manifest.json" in one and "config.json" in one
    for name in one:
        assert one[name] == two[name], name


def test_a_killed_run_resumes_to_the_same_files(tmp_path):
    args = ["--count", "40", "--seed", "11", *SIZE]
    killed = tmp_path / "killed"
    process = _cli(str(killed), *args, "--batch-size", "1")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if (killed / "images").is_dir() and len(list((killed / "images").glob("*.png"))) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    finals = list((killed / "images").glob("[0-9]*.png"))
    assert finals
    for path in finals:  # every visible image is whole
        assert np.asarray(Image.open(path)).shape == (32, 32)
    stray = killed / "images" / ".000039.png.abc123.tmp"
    stray.write_bytes(b"half an image")

    assert main(["generate", str(killed), *args]) == 0
    assert main(["generate", str(tmp_path / "whole"), *args, "--batch-size", "16"]) == 0
    assert not stray.exists()
    resumed, whole = _files(killed), _files(tmp_path / "whole")
    assert sorted(resumed) == sorted(whole)
    for name in whole:
        assert resumed[name] == whole[name], name
    _check_manifest(killed)


@pytest.mark.parametrize("image_format", ["png16", "hdf5"])
def test_a_resume_renders_again_what_no_longer_verifies(tmp_path, dataset, monkeypatch, image_format):
    """An interrupted run's damaged image (or hdf5 chunk) is found by its checksum and rendered again."""
    import torchdrr.data.generate as generate

    if image_format == "hdf5":
        pytest.importorskip("h5py")
    stopped = tmp_path / "stopped"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed after rendering, before the dataset was finished

    with monkeypatch.context() as patch:
        patch.setattr(generate, "_finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate_dataset(stopped, dataset, image_format=image_format, batch_size=2, progress=False)
    parts = sorted((stopped / ".parts").glob("batch-*.json"))
    assert len(parts) == 3  # batches of 2, 2 and 1 samples
    if image_format == "png16":
        damaged = stopped / "images" / "000003.png"
    else:
        damaged = next((stopped / ".parts").glob("chunk-000004-*.npy"))
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    summary = generate_dataset(stopped, dataset, image_format=image_format, batch_size=2, progress=False)
    assert summary["rendered"] == (2 if image_format == "png16" else 1)  # the damaged sample's batch only
    generate_dataset(tmp_path / "whole", dataset, image_format=image_format, batch_size=4, progress=False)
    resumed, whole = _files(stopped), _files(tmp_path / "whole")
    assert sorted(resumed) == sorted(whole)
    for name in whole:
        assert resumed[name] == whole[name], name


# ----------------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------------
def test_a_different_dataset_in_the_folder_is_refused(tmp_path, capsys):
    out = str(tmp_path / "set")
    assert main(["generate", out, "--count", "2", *SIZE]) == 0
    before = _files(tmp_path / "set")
    capsys.readouterr()
    assert main(["generate", out, "--count", "3", "--seed", "1", "--kvp", "60", "90", *SIZE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different dataset" in err
    assert "count" in err and "seed" in err and "physics.kvp" in err
    assert _files(tmp_path / "set") == before

    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    assert main(["generate", str(foreign), "--count", "2", *SIZE]) == 2
    assert "not a dataset made by torchdrr generate" in capsys.readouterr().err
    assert not (foreign / "config.json").exists()


def test_unwritable_or_bad_folders_are_refused(tmp_path, dataset, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        generate_dataset(afile, dataset, progress=False)
    with pytest.raises(DatasetError, match="cannot create output folder"):
        generate_dataset(afile / "set", dataset, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(DatasetError, match="not writable"):
            generate_dataset(tmp_path / "set", dataset, progress=False)
    assert not (tmp_path / "set" / "config.json").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(DatasetError, match="cannot create output folder|not writable"):
            generate_dataset(locked / "set", dataset, progress=False)
        with pytest.raises(DatasetError, match="not writable"):
            generate_dataset(locked, dataset, progress=False)
    finally:
        locked.chmod(0o700)


def test_not_enough_disk_is_refused_before_rendering(tmp_path, dataset, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DatasetError, match="not enough free disk space"):
        generate_dataset(tmp_path / "set", dataset, progress=False)
    assert not (tmp_path / "set" / "config.json").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--primary", "10", "-10"], "--primary: min must be <= max"),
        (["--sdd", "-5", "10"], "--sdd must be >= "),
        (["--sod", "900", "1100"], "--sod must stay below --sdd"),
        (["--kvp", "10", "20"], "kvp must lie within"),
        (["--noise-probability", "2"], "--noise-probability must lie in [0, 1]"),
        (["--ct", "missing.nii.gz"], "CT not found"),
        (["--output", "intensity"], "png16 has a fixed mapping"),
        (["--count", "-1"], "--count must be >= 0"),
    ],
)
def test_bad_options_fail_early_on_one_line(tmp_path, capsys, args, words):
    out = tmp_path / "set"
    assert main(["generate", str(out), "--count", "3", *SIZE, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdrr: error: ") and err.count("\n") == 1 and words in err, err
    assert not (out / "config.json").exists()

"""``torchdrr register``: an X-ray file and an initial pose in, the pose, an overlay and an animation out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchdrr.cli import main
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.registration import registration_errors, volume_landmarks


def _camera(path: Path) -> Camera:
    with np.load(path) as data:
        return Camera(torch.tensor(data["K"]), torch.tensor(data["R"]), torch.tensor(data["t"]), int(data["height"]),
                      int(data["width"]), float(data["sdd_mm"]))  # fmt: skip


@pytest.fixture(scope="module")
def xray_case(tmp_path_factory) -> Path:
    """A noisy 64 x 64 intensity X-ray at C-arm angles (5, -4) degrees, with its true geometry."""
    folder = tmp_path_factory.mktemp("register")
    status = main(["render", "--angles", "5", "-4", "--size", "64", "64", "--pixel-spacing", "5.8", "5.8", "--noise",
                   "radiography", "--output", "intensity", "--out", str(folder / "xray.tif"),
                   str(folder / "truth.npz")])  # fmt: skip
    assert status == 0
    return folder


def test_register_recovers_the_pose_and_writes_its_pictures(xray_case: Path, capsys) -> None:
    out = xray_case
    status = main(["register", str(out / "xray.tif"), "--angles", "0", "0", "--pixel-spacing", "5.8", "5.8",
                   "--quiet", "--pose", str(out / "pose.npz"), "--overlay", str(out / "overlay.png"),
                   "--animation", str(out / "steps.gif"), "--loss-curve", str(out / "loss.png")])  # fmt: skip
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["xray_kind"] == "intensity" and summary["renders"] > 10
    volume = Volume.load(bundled_ct_path(), fix_padding=True)
    landmarks = volume_landmarks(volume.data.shape, volume.affine, count=50, seed=11)
    truth = _camera(out / "truth.npz")
    before = registration_errors(Camera.from_carm(torch.tensor([0.0], dtype=torch.float64), 0.0, volume.center,
                                 height=64, width=64, pixel_spacing_mm=(5.8, 5.8)), truth, landmarks)  # fmt: skip
    after = registration_errors(_camera(out / "pose.npz"), truth, landmarks)
    assert float(before.mtre_mm[0]) > 5
    assert float(after.mtre_mm[0]) < 1.5, after
    overlay = Image.open(out / "overlay.png")
    assert overlay.width > 2 * 64 and overlay.height >= 64
    with Image.open(out / "steps.gif") as gif:
        assert gif.n_frames > 1
    assert Image.open(out / "loss.png").size[0] > 100
    # The pose file starts a second registration (--initial): the same detector, already at the optimum.
    status = main(["register", str(out / "xray.tif"), "--initial", str(out / "pose.npz"), "--quiet", "--iterations",
                   "5", "--pose", str(out / "again.npz"), "--overlay", str(out / "again.png"), "--animation",
                   str(out / "again_strip.png")])  # fmt: skip
    assert status == 0
    assert float(registration_errors(_camera(out / "again.npz"), truth, landmarks).mtre_mm[0]) < 2.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--pixel-spacing is required"),
        (["--pixel-spacing", "2.0", "2.0", "--initial", "MISSING.npz"], "--initial MISSING.npz: no such file"),
        (["--pixel-spacing", "5.8", "5.8", "--overlay", "o.jpg"], "--overlay"),
        (["--pixel-spacing", "5.8", "5.8", "--animation", "a.mp4"], "--animation"),
        (["--pixel-spacing", "5.8", "5.8", "--starts", "0"], "--starts must be >= 1, got 0"),
        (["--pixel-spacing", "5.8", "5.8", "--sod", "2000"], "--sod (2000 mm) must be positive and less than --sdd"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message_and_write_nothing(xray_case: Path, capsys, extra, message) -> None:
    before = sorted(p.name for p in xray_case.iterdir())
    start = [] if "--initial" in extra else ["--angles", "0", "0"]
    status = main(["register", str(xray_case / "xray.tif"), *start, "--quiet", *extra])
    assert status == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in xray_case.iterdir()) == before


def test_a_constant_image_and_a_detector_mismatch_are_refused(xray_case: Path, tmp_path: Path, capsys) -> None:
    flat = tmp_path / "flat.npy"
    np.save(flat, np.full((64, 64), 7.0))
    assert main(["register", str(flat), "--angles", "0", "0", "--pixel-spacing", "5.8", "5.8", "--quiet"]) == 2
    assert "constant" in capsys.readouterr().err
    small = tmp_path / "small.npy"
    np.save(small, np.random.default_rng(0).random((32, 48)) + 1)
    status = main(["register", str(small), "--initial", str(xray_case / "truth.npz"), "--quiet"])
    assert status == 2
    assert "is a 64 x 64 detector but the X-ray is 32 x 48 pixels" in capsys.readouterr().err


def test_a_dicom_whose_pitch_differs_from_the_camera_is_refused(xray_case: Path, tmp_path: Path, capsys) -> None:
    from tests.test_xray_io import _write_dicom

    image = np.load(xray_case / "truth.npz")["image"][0, 0]
    stored = np.clip(image / image.max() * 4000, 1, 4095).astype(np.uint16)
    dicom = _write_dicom(tmp_path / "xray.dcm", stored, ImagerPixelSpacing=[0.5, 0.5])
    status = main(["register", str(dicom), "--angles", "0", "0", "--pixel-spacing", "5.8", "5.8", "--quiet",
                   "--pose", str(tmp_path / "p.npz")])  # fmt: skip
    assert status == 2
    assert "has pixel spacing 0.5 x 0.5 mm (row, column) but the camera's is 5.8 x 5.8 mm" in capsys.readouterr().err
    assert not (tmp_path / "p.npz").exists()

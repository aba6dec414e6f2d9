"""The command line never shows a traceback for a user error: one line ``torchdrr: error: ...`` and exit status 2.

Every sub-command is run in-process (``torchdrr.cli.main``) on a table of bad inputs; each case must exit with 2,
print exactly one line on stderr (naming the file at fault where there is one), no traceback, and create no file.
Bugs (an unexpected exception type) give one ``torchdrr: internal error:`` line and status 1, Ctrl-C gives 130,
``--debug`` lets the exception through, and Python warnings print as one line. Two cases run the real entry point
(``python -m torchdrr``) in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchdrr.cli as cli
import torchdrr.io.writers as writers
from torchdrr.cli import main
from torchdrr.errors import MemoryBudgetError
from torchdrr.geometry import Camera
from torchdrr.io.writers import save_geometry

RENDER = ["render", "--size", "8", "8", "--pixel-spacing", "40", "40", "--device", "cpu"]
# A frontal view with 1 mm pixels: the initial pose of most register cases.
AP_1MM = ["--angles", "0", "0", "--pixel-spacing", "1", "1"]
REGISTER_OUT = [
    "--quiet",
    "--device",
    "cpu",
    "--pose",
    "{out}/pose.npz",
    "--overlay",
    "{out}/overlay.png",
    "--animation",
    "{out}/steps.gif",
]
GENERATE = ["--count", "2", "--size", "8", "8", "--device", "cpu", "--no-progress"]


def run(argv: list[str]) -> int:
    """main()'s exit status, also for argparse's own errors (which exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code)


def listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (hidden temporary files included), relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad (and a few good) input files, shared by the cases; the cases must leave this folder as it is."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name in ("garbage.nii.gz", "garbage.nii", "garbage.nrrd", "garbage.png", "garbage.npz"):
        (folder / name).write_bytes(garbage)
    (folder / "empty_dicom").mkdir()
    (folder / "a_folder.png").mkdir()
    np.save(folder / "xray16.npy", rng.random((16, 16)) + 1.0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "xray16.png")
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(folder / "flat.png")
    np.save(folder / "mask8.npy", np.ones((8, 8)))
    camera = Camera.from_carm(
        torch.zeros(1, dtype=torch.float64),
        0.0,
        torch.zeros(3, dtype=torch.float64),
        sod_mm=850.0,
        sdd_mm=1020.0,
        height=32,
        width=32,
        pixel_spacing_mm=(5.0, 5.0),
    )
    save_geometry(folder / "geometry32.npz", camera)
    (folder / "not_a_dataset").mkdir()
    (folder / "not_a_dataset" / "config.json").write_text("{}")
    return folder


CASES = [
    # --- render: the CT
    ("render missing CT", [*RENDER, "--ct", "{in}/missing.nii.gz"], "missing.nii.gz"),
    ("render random .nii.gz", [*RENDER, "--ct", "{in}/garbage.nii.gz"], "garbage.nii.gz"),
    ("render random .nii", [*RENDER, "--ct", "{in}/garbage.nii"], "garbage.nii"),
    ("render random .nrrd", [*RENDER, "--ct", "{in}/garbage.nrrd"], "garbage.nrrd"),
    ("render empty DICOM folder", [*RENDER, "--ct", "{in}/empty_dicom"], "empty_dicom"),
    # --- render: numbers
    ("render non-numeric size", [*RENDER, "--size", "abc", "8"], "abc"),
    ("render negative size", [*RENDER, "--size", "-4", "8"], "--size"),
    ("render zero size", [*RENDER, "--size", "0", "8"], "--size"),
    ("render NaN spacing", [*RENDER, "--pixel-spacing", "nan", "1"], "--pixel-spacing"),
    ("render zero spacing", [*RENDER, "--pixel-spacing", "0", "1"], "--pixel-spacing"),
    ("render negative spacing", [*RENDER, "--pixel-spacing", "-1", "1"], "--pixel-spacing"),
    ("render infinite spacing", [*RENDER, "--pixel-spacing", "inf", "1"], "--pixel-spacing"),
    ("render non-numeric angle", [*RENDER, "--angles", "x", "0"], "'x'"),
    ("render NaN angle", [*RENDER, "--angles", "nan", "0"], "--angles"),
    ("render infinite angle", [*RENDER, "--angles", "0", "inf"], "--angles"),
    ("render NaN sdd", [*RENDER, "--sdd", "nan"], "--sdd"),
    ("render zero sod", [*RENDER, "--sod", "0"], "--sod"),
    ("render zero batch", [*RENDER, "--batch-size", "0"], "--batch-size"),
    ("render unknown view", [*RENDER, "--view", "oblique"], "oblique"),
    ("render unknown device", [*RENDER, "--device", "tpu"], "--device"),
    # --- render: outputs
    ("render output is a folder", [*RENDER, "--out", "{in}/a_folder.png"], "a_folder.png"),
    ("render output folder missing", [*RENDER, "--out", "{out}/missing/drr.png"], "missing"),
    ("render output suffix", [*RENDER, "--out", "{out}/drr.jpg"], "drr.jpg"),
    # --- register
    (
        "register missing X-ray",
        ["register", "{in}/none.png", *AP_1MM, *REGISTER_OUT],
        "none.png",
    ),
    (
        "register corrupt PNG",
        ["register", "{in}/garbage.png", *AP_1MM, *REGISTER_OUT],
        "garbage.png",
    ),
    (
        "register X-ray of the wrong size",
        ["register", "{in}/xray16.npy", "--initial", "{in}/geometry32.npz", *REGISTER_OUT],
        "geometry32.npz",
    ),
    (
        "register constant X-ray",
        ["register", "{in}/flat.png", *AP_1MM, *REGISTER_OUT],
        "flat.png",
    ),
    (
        "register mask of the wrong shape",
        [
            "register",
            "{in}/xray16.png",
            *AP_1MM,
            "--mask",
            "{in}/mask8.npy",
            *REGISTER_OUT,
        ],
        "mask8.npy",
    ),
    (
        "register missing mask",
        [
            "register",
            "{in}/xray16.png",
            *AP_1MM,
            "--mask",
            "{in}/nomask.npy",
            *REGISTER_OUT,
        ],
        "nomask.npy",
    ),
    (
        "register no pixel spacing",
        ["register", "{in}/xray16.npy", "--angles", "0", "0", *REGISTER_OUT],
        "--pixel-spacing",
    ),
    (
        "register NaN spacing",
        ["register", "{in}/xray16.npy", "--angles", "0", "0", "--pixel-spacing", "nan", "1", *REGISTER_OUT],
        "--pixel-spacing",
    ),
    (
        "register NaN angle",
        ["register", "{in}/xray16.npy", "--angles", "nan", "0", "--pixel-spacing", "1", "1", *REGISTER_OUT],
        "--angles",
    ),
    (
        "register missing initial",
        ["register", "{in}/xray16.npy", "--initial", "{in}/none.npz", *REGISTER_OUT],
        "none.npz",
    ),
    (
        "register corrupt initial",
        ["register", "{in}/xray16.npy", "--initial", "{in}/garbage.npz", *REGISTER_OUT],
        "garbage.npz",
    ),
    (
        "register random CT",
        [
            "register",
            "{in}/xray16.npy",
            *AP_1MM,
            "--ct",
            "{in}/garbage.nii.gz",
            *REGISTER_OUT,
        ],
        "garbage.nii.gz",
    ),
    (
        "register pose is a folder",
        [
            "register",
            "{in}/xray16.npy",
            *AP_1MM,
            *REGISTER_OUT,
            "--overlay",
            "{in}/a_folder.png",
        ],
        "a_folder.png",
    ),
    ("register unknown view", ["register", "{in}/xray16.npy", "--view", "oblique", *REGISTER_OUT], "oblique"),
    # --- generate
    ("generate negative count", ["generate", "{out}/set", *GENERATE, "--count", "-1"], "--count"),
    ("generate non-numeric count", ["generate", "{out}/set", *GENERATE, "--count", "many"], "many"),
    ("generate bad format", ["generate", "{out}/set", *GENERATE, "--format", "jpeg"], "jpeg"),
    ("generate zero size", ["generate", "{out}/set", *GENERATE, "--size", "0", "8"], "--size"),
    ("generate NaN kVp", ["generate", "{out}/set", *GENERATE, "--kvp", "nan", "90"], "--kvp"),
    ("generate missing CT", ["generate", "{out}/set", *GENERATE, "--ct", "{in}/missing.nii.gz"], "missing.nii.gz"),
    ("generate random CT", ["generate", "{out}/set", *GENERATE, "--ct", "{in}/garbage.nii.gz"], "garbage.nii.gz"),
    ("generate output is a file", ["generate", "{in}/garbage.nrrd", *GENERATE], "garbage.nrrd"),
    ("generate output holds another dataset", ["generate", "{in}/not_a_dataset", *GENERATE], "config.json"),
    # --- sketch
    ("sketch random CT", ["sketch", "--ct", "{in}/garbage.nii.gz", "--out", "{out}/scene.png"], "garbage.nii.gz"),
    ("sketch missing CT", ["sketch", "--ct", "{in}/missing.nrrd", "--out", "{out}/scene.png"], "missing.nrrd"),
    ("sketch output suffix", ["sketch", "--out", "{out}/scene.jpg"], "scene.jpg"),
    ("sketch output is a folder", ["sketch", "--out", "{in}/a_folder.png"], "a_folder.png"),
    ("sketch NaN angle", ["sketch", "--angles", "nan", "0", "--out", "{out}/scene.png"], "--angles"),
]


@pytest.mark.parametrize(("argv", "named"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_user_error_is_one_line_and_writes_nothing(inputs: Path, tmp_path: Path, capsys, argv, named) -> None:
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(tmp_path)) for a in argv]
    if argv[0] == "render" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "drr.png"), str(tmp_path / "drr.npz")]
    before = listing(inputs)
    status = run(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("torchdrr: error:"), captured.err
    assert named in lines[0], lines[0]
    assert listing(tmp_path) == [] and listing(inputs) == before


def test_unwritable_output_folder_is_refused_before_the_ct_is_loaded(tmp_path: Path, capsys, monkeypatch) -> None:
    """Checked with os.access (the tests may run as root, who may write anywhere)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    loaded = []
    monkeypatch.setattr(cli, "_reading", lambda *a: loaded.append(a))  # the CT load is never reached
    assert run([*RENDER, "--out", str(tmp_path / "drr.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdrr: error: --out") and "not writable" in err and err.count("\n") == 1
    assert loaded == [] and listing(tmp_path) == []


def boom(exception: BaseException):
    """A stand-in for a function inside a command that raises ``exception``."""

    def raise_it(*args, **kwargs):
        raise exception

    return raise_it


@pytest.mark.parametrize(
    ("exception", "named"),
    [
        (ValueError("ct.nii: the affine\n[[1. 0. 0.]\n [0. 0. 0.]\n [0. 0. 1.]]\nis singular"), "ct.nii"),
        (MemoryBudgetError("the render needs 9 GiB, more than the 2 GiB budget", 9 << 30, 2 << 30), "--batch-size"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has ..."), "--batch-size"),
        (PermissionError(13, "Permission denied", "/root/ct.nii"), "/root/ct.nii"),
        (TypeError("--angles must be numbers"), "--angles"),
    ],
)
def test_user_error_raised_inside_a_command_is_one_line(tmp_path, capsys, monkeypatch, exception, named) -> None:
    monkeypatch.setattr(cli, "_build_drr", boom(exception))
    assert run([*RENDER, "--out", str(tmp_path / "drr.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdrr: error:") and err.count("\n") == 1 and named in err, err


def test_a_bug_is_an_internal_error_on_one_line_and_debug_shows_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "_build_drr", boom(KeyError("materials")))
    argv = [*RENDER, "--out", str(tmp_path / "drr.png")]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        "torchdrr: internal error: KeyError: 'materials' (run with --debug for the traceback; please report it)\n"
    )
    with pytest.raises(KeyError, match="materials"):
        main(["--debug", *argv])
    with pytest.raises(KeyError, match="materials"):
        main([*argv, "--debug"])
    monkeypatch.setattr(cli, "_build_drr", boom(RuntimeError("index out of range in the kernel")))
    assert run(argv) == 1 and "internal error: RuntimeError" in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_ctrl_c_while_writing_leaves_no_file(tmp_path, capsys, monkeypatch) -> None:
    """The PNG is written before the TIFF is interrupted: it must be gone too, and no temporary file left."""
    monkeypatch.setattr(writers, "save_tiff", boom(KeyboardInterrupt()))
    argv = [*RENDER, "--out", str(tmp_path / "a.png"), str(tmp_path / "a.tif")]
    assert run(argv) == 130
    captured = capsys.readouterr()
    assert captured.err == "torchdrr: interrupted\n" and "Traceback" not in captured.out
    assert listing(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--debug"])
    assert listing(tmp_path) == []


def test_ctrl_c_while_register_writes_leaves_no_file(inputs, tmp_path, capsys, monkeypatch) -> None:
    import torchdrr.registration.report as report

    monkeypatch.setattr(report, "save_optimisation_animation", boom(KeyboardInterrupt()))
    argv = [
        "register",
        str(inputs / "xray16.png"),
        "--angles",
        "0",
        "0",
        "--pixel-spacing",
        "20",
        "20",
        "--levels",
        "1",
        "--iterations",
        "1",
    ]
    argv += [a.replace("{out}", str(tmp_path)) for a in REGISTER_OUT]
    assert run(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "torchdrr: interrupted"
    assert listing(tmp_path) == []


def test_a_warning_prints_as_one_line(tmp_path, capsys, monkeypatch) -> None:
    real = cli._build_drr

    def warn_then_build(*args, **kwargs):
        warnings.warn("the CT has padding\nread as air", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "_build_drr", warn_then_build)
    shown = warnings.showwarning
    assert run([*RENDER, "--out", str(tmp_path / "drr.png")]) == 0
    assert warnings.showwarning is shown  # restored for whoever runs main() next
    err = capsys.readouterr().err
    assert err == "torchdrr: warning: the CT has padding read as air\n", err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["render", "--ct", "missing.nii.gz", "--size", "8", "8", "--device", "cpu"], "missing.nii.gz"),
        (["render", "--size", "8", "eight"], "invalid int value: 'eight'"),
    ],
)
def test_the_entry_point_exits_2_with_one_line(tmp_path, argv, message) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torchdrr", *argv, "--out", str(tmp_path / "drr.png")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchdrr: error:") and message in lines[0], done.stderr
    assert listing(tmp_path) == []

"""The ``torchdrr render`` command line and the atomic writers behind it (torchdrr.io.writers)."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from torchdrr.cli import _parser, main
from torchdrr.drr import DRR
from torchdrr.geometry import NAMED_VIEWS, Camera
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.io.writers import save_geometry, save_png, save_tiff
from torchdrr.physics.detector import EnergyIntegratingDetector, PhotonCountingDetector
from torchdrr.physics.spectra import spectrum
from torchdrr.render import hu_to_mu, render_carm

ROWS, COLS, PITCH = 32, 40, 12.0
SMALL = ["--size", str(ROWS), str(COLS), "--pixel-spacing", str(PITCH), str(PITCH), "--device", "cpu"]


@pytest.fixture(scope="module")
def volume() -> Volume:
    return Volume.load(bundled_ct_path(), fix_padding=True)


def camera_for(volume: Volume, primary, secondary, sod=850.0, sdd=1020.0) -> Camera:
    return Camera.from_carm(
        torch.tensor(primary, dtype=torch.float64).reshape(-1),
        torch.tensor(secondary, dtype=torch.float64).reshape(-1),
        volume.center,
        sod_mm=sod,
        sdd_mm=sdd,
        height=ROWS,
        width=COLS,
        pixel_spacing_mm=(PITCH, PITCH),
    )


def run(argv: list[str]) -> int:
    """main()'s exit status, also for argparse's own errors (which exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code)


def read_tiff(path) -> np.ndarray:
    """All pages of a TIFF as ``[K, H, W]``."""
    image = Image.open(path)
    pages = []
    for k in range(getattr(image, "n_frames", 1)):
        image.seek(k)
        assert image.mode == "F"
        pages.append(np.array(image))
    return np.stack(pages)


# ----------------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------------
def test_save_png_bit_depths_and_input_types(tmp_path) -> None:
    ramp = np.linspace(0.0, 1.0, 6 * 7).reshape(6, 7)
    eight = np.array(Image.open(save_png(ramp, tmp_path / "a.png")))
    assert eight.dtype == np.uint8 and eight.shape == (6, 7) and eight.min() == 0 and eight.max() == 255
    image16 = Image.open(save_png(torch.from_numpy(ramp).float(), tmp_path / "b.png", bit_depth=16))
    sixteen = np.array(image16)
    assert image16.mode.startswith("I") and sixteen.dtype.itemsize >= 2 and sixteen.max() == 65535
    np.testing.assert_allclose(sixteen / 65535.0, ramp, atol=1e-5)
    np.testing.assert_array_equal(
        np.array(Image.open(save_png(eight, tmp_path / "c.png", bit_depth=16))), eight.astype(np.uint16) * 257
    )
    np.testing.assert_array_equal(np.array(Image.open(save_png(sixteen.astype(np.uint16), tmp_path / "d.png"))), eight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]  # no temporary files


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda d: save_png(np.zeros((2, 2)), d / "x.jpg"), ValueError, "must end in .png"),
        (lambda d: save_png(np.zeros((2, 2)), d / "missing" / "x.png"), FileNotFoundError, "folder does not exist"),
        (lambda d: save_png(np.full((2, 2), 1.5), d / "x.png"), ValueError, r"in \[0, 1\]"),
        (lambda d: save_png(np.full((2, 2), np.nan), d / "x.png"), ValueError, "finite"),
        (lambda d: save_png(np.zeros((2, 2, 2)), d / "x.png"), ValueError, r"\[H, W\]"),
        (lambda d: save_png(np.zeros((2, 2)), d / "x.png", bit_depth=12), ValueError, "bit_depth"),
        (lambda d: save_png(np.zeros((2, 2), dtype=np.int32), d / "x.png"), TypeError, "uint8 or uint16"),
        (lambda d: save_tiff(np.zeros((2, 2)), d / "x.png"), ValueError, "must end in .tif or .tiff"),
        (lambda d: save_tiff(np.zeros((1, 2, 2, 2)), d / "x.tif"), ValueError, r"\[K, H, W\]"),
        (lambda d: save_tiff(np.zeros((2, 2)), d / "missing" / "x.tif"), FileNotFoundError, "folder does not exist"),
    ],
)
def test_writers_refuse_bad_input_and_write_nothing(tmp_path, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_tiff_single_and_multipage(tmp_path) -> None:
    values = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float64) * 1e3
    np.testing.assert_array_equal(read_tiff(save_tiff(values, tmp_path / "m.tiff")), values.astype(np.float32))
    np.testing.assert_array_equal(read_tiff(save_tiff(torch.from_numpy(values[1]), tmp_path / "s.tif")), values[1:2]
                                  .astype(np.float32))  # fmt: skip


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_save_geometry_keys(tmp_path, suffix) -> None:
    origin = torch.zeros(3, dtype=torch.float64)
    camera = Camera.from_carm(torch.tensor([10.0, -20.0]), torch.tensor([5.0, 0.0]), origin, height=6, width=8,
                              pixel_spacing_mm=(1.5, 2.0))  # fmt: skip
    image = torch.rand(2, 1, 6, 8, dtype=torch.float64)
    path = save_geometry(tmp_path / f"g{suffix}", camera, image, spectrum="90kVp", angles=[10.0, -20.0], seed=3)
    data = dict(np.load(path)) if suffix == ".npz" else torch.load(path, weights_only=True)
    as_np = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in data.items()}
    np.testing.assert_allclose(as_np["P"], camera.projection_matrix().numpy())
    np.testing.assert_allclose(as_np["K"], camera.intrinsics.numpy())
    np.testing.assert_allclose(as_np["pixel_spacing_mm"], [1.5, 2.0])
    assert as_np["image"].dtype == np.float32 and as_np["image"].shape == (2, 1, 6, 8)
    assert int(as_np["height"]) == 6 and int(as_np["width"]) == 8 and float(as_np["sdd_mm"]) == 1020.0
    assert str(as_np["spectrum"]) == "90kVp" and int(as_np["seed"]) == 3
    np.testing.assert_allclose(as_np["angles"], [10.0, -20.0])
    with pytest.raises(ValueError, match="reserved"):
        save_geometry(tmp_path / f"h{suffix}", camera, P="x")
    with pytest.raises(ValueError, match="image must be"):
        save_geometry(tmp_path / f"h{suffix}", camera, torch.zeros(3, 1, 6, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"g{suffix}"]


# ----------------------------------------------------------------------------------------------------------------------
# torchdrr render
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_render_writes_the_picture(tmp_path, capsys) -> None:
    out = tmp_path / "drr.png"
    assert main(["render", *SMALL, "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (COLS, ROWS) and image.mode == "L"
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"rendered 1 view of 32x40 px .* in \d+ ms", lines[0])
    assert lines[1:] == [f"wrote {out} (8-bit display image 32x40, PA)"]


def test_cli_png_8_and_16_bit(tmp_path) -> None:
    assert main(["render", *SMALL, "--out", str(tmp_path / "a.png")]) == 0
    assert main(["render", *SMALL, "--bit-depth", "16", "--out", str(tmp_path / "b.png")]) == 0
    eight, sixteen = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert eight.mode == "L" and sixteen.mode.startswith("I;16")
    a, b = np.array(eight), np.array(sixteen).astype(np.int64)
    assert a.dtype == np.uint8 and a.min() == 0 and a.max() == 255
    assert b.min() == 0 and b.max() == 65535 and len(np.unique(b)) > 256  # finer than 8 bits
    assert np.abs(np.round(b / 257.0) - a).max() <= 1
    # Bright = attenuating: the spine (centre columns) is brighter than the lungs beside it.
    assert a[10:22, 18:22].mean() > a[10:22, 8:14].mean()


@pytest.mark.parametrize(
    ("argv", "drr_kwargs", "output"),
    [
        ([], {}, "line_integral"),
        (
            ["--kvp", "100", "--filtration", "3", "--csi", "0.6", "--falloff", "--output", "intensity"],
            {"spectrum": spectrum(100.0, 3.0), "detector": EnergyIntegratingDetector(0.6, falloff=True)},
            "intensity",
        ),
        (
            ["--mono", "60", "--thresholds", "-700", "300", "--output", "flat_field", "--photons", "5000"],
            {"spectrum": 60.0, "photons_per_pixel": 5000.0},
            "flat_field",
        ),
        (
            ["--spectrum", "120kVp", "--supersample", "2", "--mode", "trilinear", "--step", "3"],
            {"spectrum": "120kVp", "supersample": 2, "mode": "trilinear", "step": 3.0},
            "line_integral",
        ),  # fmt: skip
        (["--scatter", "cnn", "--output", "intensity"], {"scatter": "cnn"}, "intensity"),
    ],
    ids=["default", "custom kVp intensity", "mono flat field", "trilinear supersampled", "cnn scatter"],
)
def test_cli_tiff_holds_the_drr_values(tmp_path, volume, argv, drr_kwargs, output) -> None:
    out = tmp_path / "x.tif"
    assert main(["render", *SMALL, "--angles", "20", "-10", *argv, "--out", str(out)]) == 0
    if "--thresholds" in argv:
        from torchdrr.physics.segmentation import ThresholdSegmentation

        drr_kwargs = {**drr_kwargs, "segmentation": ThresholdSegmentation((-700.0, 300.0))}
    expected = DRR(volume, **drr_kwargs)(camera_for(volume, 20.0, -10.0), output=output)
    got = read_tiff(out)
    assert got.dtype == np.float32 and got.shape == (1, ROWS, COLS)
    torch.testing.assert_close(torch.from_numpy(got), expected[0].float(), rtol=1e-5, atol=1e-6)
    assert float(expected.std()) > 0  # a real image, not a constant


def test_cli_scatter_adds_signal_and_refuses_what_it_cannot_model(tmp_path, capsys) -> None:
    plain, learned = tmp_path / "plain.tif", tmp_path / "cnn.tif"
    assert main(["render", *SMALL, "--output", "intensity", "--out", str(plain)]) == 0
    assert main(["render", *SMALL, "--output", "intensity", "--scatter", "cnn", "--out", str(learned)]) == 0
    assert "scatter cnn" in capsys.readouterr().out
    assert (read_tiff(learned) > read_tiff(plain)).all()
    assert run(["render", *SMALL, "--scatter", "cnn", "--detector", "photon-counting", "--out", "x.png"]) == 2
    assert "--scatter cnn needs --detector energy-integrating" in capsys.readouterr().err
    assert run(["render", *SMALL, "--scatter", "montecarlo", "--physics", "line-integral", "--out", "x.png"]) == 2
    assert "drop --scatter" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.png"))


def test_cli_photon_counting_two_bins_gives_two_pages(tmp_path, volume) -> None:
    out = tmp_path / "counts.tiff"
    argv = [
        "--detector",
        "photon-counting",
        "--bins-keV",
        "25",
        "50",
        "--csi",
        "1.5",
        "--out",
        str(out),
        str(tmp_path / "c.png"),
    ]
    assert main(["render", *SMALL, *argv]) == 0
    pages = read_tiff(out)
    assert pages.shape == (2, ROWS, COLS)
    detector = PhotonCountingDetector((25.0, 50.0), absorber_thickness_mm=1.5)
    expected = DRR(volume, detector=detector)(camera_for(volume, 0.0, 0.0), output="photons")
    torch.testing.assert_close(torch.from_numpy(pages), expected[0].float(), rtol=1e-5, atol=1e-3)
    assert Image.open(tmp_path / "c.png").size == (COLS, ROWS)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_cli_geometry_file(tmp_path, volume, suffix) -> None:
    out = tmp_path / f"geometry{suffix}"
    angles = [(20.0, -10.0), (-35.0, 15.0)]
    argv = ["--angles", "20", "-10", "-35", "15", "--sod", "800", "--sdd", "1100", "--out", str(out)]
    assert main(["render", *SMALL, *argv]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    data = dict(np.load(out)) if suffix == ".npz" else torch.load(out, weights_only=True)
    t = {k: torch.as_tensor(v) for k, v in data.items() if k in ("K", "R", "t", "P", "image", "primary_deg")}
    torch.testing.assert_close(t["P"], t["K"] @ torch.cat([t["R"], t["t"][..., None]], dim=-1))
    camera = camera_for(volume, [a for a, _ in angles], [b for _, b in angles], sod=800.0, sdd=1100.0)
    torch.testing.assert_close(t["P"], camera.projection_matrix())
    torch.testing.assert_close(t["primary_deg"], torch.tensor([20.0, -35.0], dtype=torch.float64))
    assert t["image"].dtype == torch.float32 and t["image"].shape == (2, 1, ROWS, COLS)
    expected = DRR(volume)(camera)
    torch.testing.assert_close(t["image"], expected.float(), rtol=1e-5, atol=1e-6)
    assert int(data["height"]) == ROWS and int(data["width"]) == COLS and float(data["sdd_mm"]) == 1100.0
    assert str(data["output"]) == "line_integral" and str(data["spectrum"]) == "90kVp"
    assert str(data["physics"]) == "full" and str(data["ct"]).endswith("chest_ct_small.nii.gz")


def test_cli_several_views_and_batches(tmp_path, capsys) -> None:
    names = ["pa", "left-lateral", "ap"]
    argv = ["render", *SMALL, "--view", *names, "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "v.png"), str(tmp_path / "v.tif"), str(tmp_path / "v.npz")]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["v.npz", "v_000.png", "v_000.tif", "v_001.png", "v_001.tif", "v_002.png", "v_002.tif"]
    out = capsys.readouterr().out
    assert out.count("wrote ") == 7 and "rendered 3 views" in out
    data = np.load(tmp_path / "v.npz")
    assert data["image"].shape == (3, 1, ROWS, COLS)
    assert list(data["views"]) == ["PA", "left lateral", "AP"]
    np.testing.assert_array_equal(data["primary_deg"], [NAMED_VIEWS[v][0] for v in ("PA", "left lateral", "AP")])
    for i in range(3):
        np.testing.assert_array_equal(read_tiff(tmp_path / f"v_{i:03d}.tif")[0], data["image"][i, 0])
    # One batch of all views gives the same images.
    assert main(["render", *SMALL, "--view", *names, "--out", str(tmp_path / "one.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npz")["image"], data["image"], rtol=1e-6, atol=1e-6)


def test_cli_line_integral_physics_matches_render_carm(tmp_path, volume) -> None:
    out = tmp_path / "li.tif"
    assert main(["render", *SMALL, "--physics", "line-integral", "--angles", "30", "10", "--out", str(out)]) == 0
    expected = render_carm(hu_to_mu(volume.data), volume.affine, 30.0, 10.0, ROWS, COLS, (PITCH, PITCH))
    torch.testing.assert_close(torch.from_numpy(read_tiff(out)), expected[0].float())
    assert float(expected.max()) > 3


def test_cli_seed_reproducibility(tmp_path) -> None:
    def render(name: str, *extra: str) -> tuple[bytes, bytes]:
        paths = [tmp_path / f"{name}.png", tmp_path / f"{name}.tif"]
        assert main(["render", *SMALL, "--noise", "fluoroscopy", *extra, "--out", *map(str, paths)]) == 0
        return paths[0].read_bytes(), paths[1].read_bytes()

    first, again, other = render("a", "--seed", "7"), render("b", "--seed", "7"), render("c", "--seed", "8")
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    assert render("d")[1] == render("e", "--seed", "0")[1]  # the default seed is 0
    # The PNG shows the same noisy image the TIFF holds, also when the TIFF holds another quantity.
    assert main(["render", *SMALL, "--noise", "fluoroscopy", "--seed", "7", "--output", "flat_field",
                 "--out", str(tmp_path / "f.png"), str(tmp_path / "f.tif")]) == 0  # fmt: skip
    assert (tmp_path / "f.png").read_bytes() == first[0]
    flat = read_tiff(tmp_path / "f.tif")
    assert not np.array_equal(flat, read_tiff(tmp_path / "a.tif")) and float(flat.max()) <= 2.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ct", "missing.nii.gz"], "CT file or folder not found"),
        (["--size", "0", "10"], "--size must be two positive"),
        (["--pixel-spacing", "0", "1"], "--pixel-spacing must be"),
        (["--mode", "trilinear", "--step", "-1"], "step must be a positive"),
        (["--step", "1"], "--step applies to --mode trilinear"),
        (["--sdd", "-5"], "--sdd must be a positive"),
        (["--sod", "1100"], "--sod (1100 mm) must be less than --sdd"),
        (["--device", "tpu"], "--device must be"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--supersample", "0"], "--supersample must be"),
        (["--bins-keV", "20", "40"], "--bins-keV sets photon-counting thresholds"),
        (["--detector", "photon-counting", "--bins-keV", "50", "20"], "--bins-keV must increase"),
        (["--output", "photons"], "--output photons needs --detector photon-counting"),
        (["--detector", "photon-counting", "--output", "intensity"], "--output intensity needs"),
        (["--physics", "line-integral", "--noise", "radiography"], "drop --noise"),
        (["--physics", "line-integral", "--mono", "60", "--falloff"], "drop --mono, --falloff"),
        (["--filtration", "2"], "--filtration sets the filtration of a --kvp"),
        (["--kvp", "200"], "--kvp must lie in 40-150 kVp"),
        (["--mono", "-3"], "--mono must be a positive energy"),
        (["--csi", "0"], "--csi must be a positive"),
        (["--photons", "-1"], "--photons must be a positive"),
        (["--thresholds", "350", "-800"], "--thresholds must increase"),
        (["--angles", "0", "0", "5"], "--angles takes pairs"),
        (["--view", "pa", "--angles", "0", "0"], "not allowed with argument --view"),
        (["--view", "oblique"], "unknown view 'oblique'"),
        (["--photons", "100", "--photons-behind-patient", "10"], "not allowed with argument --photons"),
        (["--noise", "loud"], "invalid choice: 'loud'"),
        (["--out", "{dir}/x.jpg"], "the suffix must be one of"),
        (["--out", "{dir}/ok.png", "{dir}/missing/x.png"], "output folder does not exist"),
        (["--out", "{dir}/a.png", "{dir}/a.png"], "twice"),
        (["--view", "pa", "ap", "--out", "{dir}/a.tif", "{dir}/./a.tif"], "twice"),
    ],
)
def test_cli_user_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message) -> None:
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "drr.png"), str(tmp_path / "drr.tif"), str(tmp_path / "drr.npz")]
    assert run(["render", *SMALL, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchdrr: error:") and message in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_failure_while_writing_leaves_nothing(tmp_path, monkeypatch) -> None:
    """A file that fails to write takes the ones written before it with it (they are renamed into place last)."""
    import torchdrr.io.writers as writers

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers, "save_geometry", broken)
    out = [str(tmp_path / "a.png"), str(tmp_path / "a.tif"), str(tmp_path / "a.npz")]
    assert run(["render", *SMALL, "--out", *out]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    render = next(
        action.choices["render"] for action in _parser()._actions if isinstance(action, argparse._SubParsersAction)
    )
    options = [o for action in render._actions for o in action.option_strings if o.startswith("--")]
    for option in ["--ct", "--series-uid", "--view", "--angles", "--size", "--pixel-spacing", "--sdd", "--sod",
                   "--supersample", "--mode", "--step", "--physics", "--spectrum", "--kvp", "--filtration", "--mono",
                   "--thresholds", "--soft-thresholds", "--detector", "--bins-keV", "--csi", "--falloff", "--noise",
                   "--photons", "--photons-behind-patient", "--seed", "--output", "--device", "--batch-size", "--out",
                   "--bit-depth"]:  # fmt: skip
        assert option in options and option in text
    for action in render._actions:
        if action.option_strings and action.option_strings[0] != "-h":
            assert action.help and len(action.help) > 15, action.option_strings  # every option is explained
    for default in ["512 512", "0.85 0.85", "1020", "850", "90kVp", "-800 350", "energy-integrating", "none", "0",
                    "auto", "8", "drr.png", "full", "siddon"]:  # fmt: skip
        assert f"(default: {default})" in flat
    assert "bundled LIDC-IDRI-0001" in flat and "keV" in flat
    assert text.count("\n  torchdrr render ") == 3  # three examples


def test_cli_soft_thresholds_change_the_image(tmp_path) -> None:
    hard, soft = tmp_path / "hard.tif", tmp_path / "soft.tif"
    assert main(["render", *SMALL, "--out", str(hard)]) == 0
    assert main(["render", *SMALL, "--soft-thresholds", "--out", str(soft)]) == 0
    a, b = read_tiff(hard), read_tiff(soft)
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.2 * a.max()

"""``torchdrr register``: the C-arm pose of an X-ray from its CT, on the command line.

The X-ray (PNG, TIFF, DICOM or .npy) and an initial pose (C-arm angles, or a geometry file written by ``torchdrr
render --out ....npz``) go in; the estimated pose (a geometry file), an overlay of the DRR's edges on the X-ray
before and after, and a GIF (or PNG strip) of the optimisation come out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_register_parser", "run_register"]

_DESCRIPTION = """\
Registers an X-ray to a CT: finds the C-arm pose under which a DRR of the CT best matches the X-ray, by gradient
descent on a similarity loss (coarse to fine over detector resolutions, optionally from several starts).

The detector must be the X-ray's: its size is the image's, and its pixel pitch is --pixel-spacing (or the DICOM's
ImagerPixelSpacing; a mismatch between the two is an error). The initial pose is either C-arm angles about the CT's
centre (--angles, --view, --sod) or a geometry file from `torchdrr render --out views.npz` (--initial).
"""

_EPILOG = """\
examples:
  torchdrr render --angles 10 5 --size 256 256 --pixel-spacing 1.46 1.46 --noise radiography --output intensity \\
      --out xray.tif
  torchdrr register xray.tif --angles 0 0 --pixel-spacing 1.46 1.46 --xray-kind intensity
  torchdrr register image.dcm --ct ct_folder/ --view pa --starts 8 --animation steps.png

outputs: --pose (default registered.npz: K, R, t, P as `torchdrr render` writes them, plus the loss, time and
renders), --overlay (default registration.png: initial | final DRR edges on the X-ray), --animation (default
registration.gif, or a .png strip) and a JSON summary on stdout.
"""


def add_register_parser(commands: Any, formatter: type[argparse.HelpFormatter], view_type: Any) -> None:
    """Adds the ``register`` sub-command to ``commands`` (an argparse sub-parsers object)."""
    from .losses import LOSSES
    from .optimize import XRAY_KINDS

    parser = commands.add_parser(
        "register",
        help="find the C-arm pose of an X-ray (PNG/TIFF/DICOM) from its CT by gradient descent",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser.add_argument("xray", type=Path, help="the X-ray: .png, .tif/.tiff, .dcm (or a DICOM file), .npy")
    scene = parser.add_argument_group("CT and initial pose")
    scene.add_argument("--ct", type=Path, default=None, help="CT: NIfTI, NRRD or DICOM (default: the bundled chest CT)")
    scene.add_argument("--series-uid", default=None, help="SeriesInstanceUID when a DICOM folder holds several")
    start = scene.add_mutually_exclusive_group()
    start.add_argument(
        "--angles", nargs=2, type=float, default=None, metavar=("PRIMARY", "SECONDARY"),
        help="initial C-arm angles in degrees about the CT's centre (primary: LAO positive; secondary: cranial "
        "positive; 0 0 is PA)",
    )  # fmt: skip
    start.add_argument("--view", type=view_type, default=None, help="initial named view: pa, ap, left-lateral, ...")
    start.add_argument(
        "--initial", type=Path, default=None, metavar="GEOMETRY",
        help="initial camera from a .npz/.pt geometry file (`torchdrr render --out x.npz`; its first view)",
    )  # fmt: skip
    scene.add_argument("--sod", type=float, default=850.0, metavar="MM", help="source to CT centre, mm (--angles)")
    scene.add_argument("--sdd", type=float, default=1020.0, metavar="MM", help="source to detector, mm (--angles)")
    scene.add_argument(
        "--pixel-spacing", nargs=2, type=float, default=None, metavar=("ROW_MM", "COL_MM"),
        help="detector pixel pitch in mm (default: the DICOM's ImagerPixelSpacing; required for other formats "
        "unless --initial gives it)",
    )  # fmt: skip

    image = parser.add_argument_group("X-ray")
    image.add_argument(
        "--xray-kind", choices=("auto", *XRAY_KINDS), default="auto",
        help="how the values relate to attenuation: intensity (detected signal; its log is taken), display (dark "
        "where the body attenuates; inverted), line_integral (bright where it attenuates); auto guesses from the file",
    )  # fmt: skip
    image.add_argument(
        "--mask", type=Path, default=None,
        help="valid pixels (an image or .npy of the X-ray's size; nonzero = valid), e.g. inside the collimator",
    )  # fmt: skip

    search = parser.add_argument_group("optimisation")
    search.add_argument(
        "--loss", nargs="+", choices=sorted(LOSSES), default=None,
        help="similarity loss, or one per level (default: gncc on the coarse levels, ncc on the finest)",
    )  # fmt: skip
    search.add_argument(
        "--levels", nargs="+", type=int, default=None, metavar="BIN",
        help="detector binning factors, coarse to fine (default: down to about 32 pixels, e.g. 4 2 1 for 128^2)",
    )  # fmt: skip
    search.add_argument("--starts", type=int, default=1, help="multi-start: poses tried together on the coarsest level")
    search.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam", help="optimiser")
    search.add_argument(
        "--iterations", type=int, default=None, help="maximum steps per level (default: 100, 60, ..., 40)"
    )
    search.add_argument(
        "--patience", type=int, default=10,
        help="steps without improvement before a level halves its step size (twice) and then stops",
    )  # fmt: skip
    search.add_argument("--optimize-intrinsics", action="store_true", help="also fit focal length and principal point")
    search.add_argument("--fit-contrast", action="store_true", help="also fit a contrast exponent of the DRR")
    search.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")

    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--pose", type=Path, default=Path("registered.npz"), help="estimated camera: .npz or .pt")
    outputs.add_argument("--overlay", type=Path, default=Path("registration.png"), help="overlay picture (.png)")
    outputs.add_argument(
        "--animation", type=Path, default=Path("registration.gif"),
        help="optimisation as an animated .gif or a .png strip of thumbnails",
    )  # fmt: skip
    outputs.add_argument("--loss-curve", type=Path, default=None, help="optional loss-curve picture (.png)")
    outputs.add_argument("--quiet", action="store_true", help="no progress bar")


def _initial_from_file(args: argparse.Namespace, height: int, width: int):
    """The initial Camera of --initial (checked against the X-ray's size), or None when the pose is given by angles.

    Needs no CT, so that a bad --initial is reported before the CT is loaded.
    """
    import numpy as np
    import torch

    from ..geometry import Camera

    if args.initial is None:
        return None
    if not args.initial.is_file():
        raise FileNotFoundError(f"--initial {args.initial}: no such file")
    try:
        if args.initial.suffix.lower() == ".npz":
            with np.load(args.initial) as data:
                record = {key: data[key] for key in ("K", "R", "t", "height", "width", "sdd_mm") if key in data}
        else:
            record = torch.load(args.initial, weights_only=True)
    except (ValueError, OSError, EOFError, RuntimeError, KeyError) as error:
        # np.load and torch.load raise all of these for a file that is not what its suffix says.
        raise ValueError(f"--initial {args.initial}: not a readable .npz/.pt geometry file ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"--initial {args.initial}: not a torchdrr geometry file (not a dictionary)")
    missing = [key for key in ("K", "R", "t", "height", "width", "sdd_mm") if key not in record]
    if missing:
        raise ValueError(f"--initial {args.initial}: not a torchdrr geometry file (missing {', '.join(missing)})")
    rotation = torch.as_tensor(np.asarray(record["R"]), dtype=torch.float64).reshape(-1, 3, 3)[:1]
    translation = torch.as_tensor(np.asarray(record["t"]), dtype=torch.float64).reshape(-1, 3)[:1]
    intrinsics = torch.as_tensor(np.asarray(record["K"]), dtype=torch.float64).reshape(3, 3)
    size = (int(record["height"]), int(record["width"]))
    if size != (height, width):
        raise ValueError(f"--initial {args.initial} is a {size[0]} x {size[1]} detector but the X-ray is "
                         f"{height} x {width} pixels ({args.xray})")  # fmt: skip
    return Camera(intrinsics, rotation, translation, height, width, float(record["sdd_mm"]))


def _check_angles_pose(args: argparse.Namespace, spacing: tuple[float, float] | None) -> None:
    """Checks the options of a pose given by angles (--angles/--view, --sod, --sdd, --pixel-spacing)."""
    if spacing is None:
        raise ValueError(
            f"--pixel-spacing is required: the X-ray {args.xray} does not record its pixel pitch (give ROW_MM COL_MM)"
        )
    if not (math.isfinite(args.sod) and math.isfinite(args.sdd) and 0 < args.sod < args.sdd):
        raise ValueError(f"--sod ({args.sod:g} mm) must be positive and less than --sdd ({args.sdd:g} mm)")
    if args.angles is not None and not all(math.isfinite(a) for a in args.angles):
        raise ValueError("--angles must be finite numbers of degrees")


def _initial_camera(args: argparse.Namespace, height: int, width: int, spacing: tuple[float, float], center):
    """The initial Camera from --angles/--view about ``center`` with the detector of the X-ray."""
    import torch

    from ..cli import _VIEW_ALIASES
    from ..geometry import NAMED_VIEWS, Camera

    if args.angles is not None:
        primary, secondary = args.angles
    else:
        primary, secondary = NAMED_VIEWS[_VIEW_ALIASES[args.view or "pa"]]
    return Camera.from_carm(
        torch.tensor([float(primary)], dtype=torch.float64), float(secondary), center, sod_mm=args.sod,
        sdd_mm=args.sdd, height=height, width=width, pixel_spacing_mm=spacing,
    )  # fmt: skip


def _read_mask(path: Path, height: int, width: int):
    import torch

    from ..io.xray import read_xray

    if not path.is_file():
        raise FileNotFoundError(f"--mask {path}: no such file")
    if path.suffix.lower() == ".npy":
        import numpy as np

        try:
            values = torch.as_tensor(np.load(path, allow_pickle=False)).to(torch.float64)
        except (ValueError, OSError, EOFError, TypeError) as error:
            raise ValueError(f"--mask {path}: not a readable .npy array ({error})") from None
    else:
        try:
            values = read_xray(path).pixels
        except ValueError as error:
            if "constant" not in str(error):
                raise
            raise ValueError(f"--mask {path}: the mask is constant; leave --mask out to use every pixel") from None
    if tuple(values.shape) != (height, width):
        raise ValueError(f"--mask {path} is {tuple(values.shape)} pixels but the X-ray is ({height}, {width})")
    return values != 0


def _default_levels(height: int, width: int) -> list[int]:
    """Binning factors 8, 4, 2, 1 that divide the detector and keep the coarsest level at >= 32 pixels a side."""
    levels = [f for f in (8, 4, 2, 1) if height % f == 0 and width % f == 0 and min(height, width) // f >= 32]
    return levels[-3:] or [1]


def run_register(args: argparse.Namespace) -> dict:
    """Runs ``torchdrr register``; returns (and prints as JSON) the summary."""
    import torch

    from ..cli import _check_writable, _device, _reading, _StagedOutputs
    from ..drr import DRR
    from ..io import Volume, bundled_ct_path
    from ..io.writers import check_output_path, save_geometry
    from ..io.xray import read_xray, xray_kind_auto
    from .metrics import rotation_error_deg
    from .optimize import _prepare_xray, register
    from .report import comparison_figure, loss_curve_png, save_optimisation_animation, save_overlay_png

    device = _device(args.device)
    # Check every output path before the work starts: a bad path must not cost a registration.
    outputs = [(args.pose, (".npz", ".pt"), "--pose"), (args.overlay, (".png",), "--overlay"),
               (args.animation, (".gif", ".png"), "--animation")]  # fmt: skip
    if args.loss_curve is not None:
        outputs.append((args.loss_curve, (".png",), "--loss-curve"))
    for path, suffixes, option in outputs:
        check_output_path(path, suffixes, option)
        _check_writable(path, option)
    if len({path.resolve() for path, _, _ in outputs}) != len(outputs):
        raise ValueError("--pose, --overlay, --animation and --loss-curve must name different files")
    if args.loss is not None and len(args.loss) > 1 and (args.levels is None or len(args.loss) != len(args.levels)):
        raise ValueError(f"--loss takes one loss or one per level of --levels, got {len(args.loss)} losses")
    for name in ("starts", "iterations", "patience"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.pixel_spacing is not None and not all(math.isfinite(s) and s > 0 for s in args.pixel_spacing):
        raise ValueError(f"--pixel-spacing must be two positive pitches in mm, got {args.pixel_spacing}")
    if args.levels is not None and any(level < 1 for level in args.levels):
        raise ValueError(f"--levels must be binning factors >= 1, got {' '.join(map(str, args.levels))}")
    # Everything that does not need the CT is read and checked before it is loaded.
    with _reading("X-ray", args.xray):
        xray = read_xray(args.xray)
    height, width = xray.pixels.shape
    spacing = tuple(args.pixel_spacing) if args.pixel_spacing is not None else xray.pixel_spacing_mm
    kind = xray_kind_auto(xray) if args.xray_kind == "auto" else args.xray_kind
    initial = _initial_from_file(args, height, width)
    if initial is None:
        _check_angles_pose(args, spacing)
    mask = None
    if args.mask is not None:
        with _reading("--mask", args.mask):
            mask = _read_mask(args.mask, height, width)

    ct_path = args.ct if args.ct is not None else bundled_ct_path()
    with _reading("--ct", Path(ct_path)):
        volume = Volume.load(ct_path, series_uid=args.series_uid, fix_padding=True)
    drr = DRR(volume).to(device)
    camera = initial if initial is not None else _initial_camera(args, height, width, spacing, drr.volume_center.cpu())
    levels = args.levels if args.levels is not None else _default_levels(height, width)

    loss = None if args.loss is None else (args.loss[0] if len(args.loss) == 1 else args.loss)
    progress_bar = None
    if not args.quiet:
        from tqdm import tqdm

        progress_bar = tqdm(total=None, unit="step", desc="register", file=sys.stderr,
                            disable=None, leave=False)  # fmt: skip

    def progress(level: str, step: int, loss: float) -> None:
        if progress_bar is not None:
            progress_bar.set_postfix_str(f"{level}, loss {loss:.4f}", refresh=False)
            progress_bar.update(1)

    try:
        result = register(
            drr, xray.pixels, camera, loss=loss, mask=mask, xray_kind=kind,
            xray_pixel_spacing_mm=xray.pixel_spacing_mm, levels=levels, starts=args.starts, optimizer=args.optimizer,
            iterations=args.iterations, patience=args.patience, optimize_intrinsics=args.optimize_intrinsics,
            fit_contrast=args.fit_contrast, record_every=1, progress=progress,
        )  # fmt: skip
    finally:
        if progress_bar is not None:
            progress_bar.close()  # also on Ctrl-C: the one-line message must not land inside a half-drawn bar

    with torch.no_grad():
        before = drr(camera.to(device), output="line_integral", noisy=False)[0, 0].cpu()
        after = drr(result.camera.to(device), output="line_integral", noisy=False)[0, 0].cpu()
    fixed = _prepare_xray(xray.pixels, kind)[0, 0]  # as register() saw it: bright where the body attenuates
    picture = comparison_figure(fixed, before, after, mask=mask)
    offset = [float(v) for v in result.offset]
    loss_name = ",".join(args.loss) if args.loss else ",".join(["gncc"] * (len(levels) - 1) + ["ncc"])
    # The outputs are written under temporary names and renamed into place together: an error or Ctrl-C while
    # writing leaves none of them (not an overlay without its pose).
    with _StagedOutputs() as staged:
        save_overlay_png(picture, staged.path(args.overlay))
        save_optimisation_animation(result.frames, fixed, staged.path(args.animation), losses=result.losses)
        if args.loss_curve is not None:
            loss_curve_png(result.losses, result.level_ends, staged.path(args.loss_curve))
        save_geometry(
            staged.path(args.pose), result.camera, loss=result.loss, seconds=result.seconds, renders=result.renders,
            iterations=result.iterations, offset_deg_mm=offset, xray=str(args.xray), ct=str(ct_path),
            loss_name=loss_name,
        )  # fmt: skip
        staged.commit()
    summary = {
        "pose": str(args.pose),
        "overlay": str(args.overlay),
        "animation": str(args.animation),
        "loss": result.loss,
        "loss_name": loss_name,
        "seconds": round(result.seconds, 3),
        "renders": result.renders,
        "iterations": result.iterations,
        "levels": levels,
        "xray_kind": kind,
        "offset_rotation_deg": offset[:3],
        "offset_translation_mm": offset[3:],
        "rotation_change_deg": float(rotation_error_deg(result.camera.rotation.cpu(), camera.rotation.cpu())[0]),
        "device": str(device),
    }
    if result.intrinsics_offset is not None:
        summary["focal_change_percent"] = float(result.intrinsics_offset[0])
        summary["principal_point_shift_px"] = [float(v) for v in result.intrinsics_offset[1:]]
    if result.contrast_gamma is not None:
        summary["contrast_gamma"] = result.contrast_gamma
    print(json.dumps(summary, indent=2))
    return summary

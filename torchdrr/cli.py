"""The ``torchdrr`` command line (also ``python -m torchdrr``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

_VIEW_ALIASES = {"pa": "PA", "ap": "AP", "left-lateral": "left lateral", "right-lateral": "right lateral"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchdrr",
        description="torchdrr: differentiable X-ray simulation (DRRs) from CT, for PyTorch.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = commands.add_parser(
        "render",
        help="render a DRR of a CT to a PNG",
        description=(
            "Render a line-integral DRR of a CT (NIfTI; default: the bundled LIDC-IDRI-0001 chest CT) seen by a "
            "C-arm, and write it as an 8-bit PNG (bright = more attenuation). Attenuation is a rough water-based "
            "mu = 0.02/mm * (1 + HU/1000); the calibrated physics comes with the DRR module."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    render.add_argument(
        "--ct",
        type=Path,
        default=None,
        help="CT: NIfTI or NRRD file, DICOM series folder or enhanced DICOM file (default: the bundled chest CT)",
    )
    render.add_argument("--series-uid", default=None, help="the DICOM series to read when a folder holds several")
    view = render.add_mutually_exclusive_group()
    view.add_argument(
        "--view",
        default="PA",
        type=str.lower,
        choices=sorted(_VIEW_ALIASES),
        help="named C-arm view: PA (detector anterior), AP, left-lateral, right-lateral",
    )
    view.add_argument(
        "--angles",
        nargs=2,
        type=float,
        metavar=("PRIMARY", "SECONDARY"),
        help="C-arm angles in degrees (primary: LAO positive; secondary: cranial positive); overrides --view",
    )
    render.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("ROWS", "COLS"))
    render.add_argument("--pixel-spacing", nargs=2, type=float, default=(0.85, 0.85), metavar=("ROW_MM", "COL_MM"))
    render.add_argument("--sdd", type=float, default=1020.0, help="source-to-detector distance, mm")
    render.add_argument("--sod", type=float, default=850.0, help="source-to-isocenter distance, mm")
    render.add_argument("--mode", choices=["siddon", "trilinear"], default="siddon")
    render.add_argument("--step", type=float, default=None, help="trilinear step in mm (default: half a voxel)")
    render.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    render.add_argument("--out", type=Path, default=Path("drr.png"), help="output PNG")

    sketch = commands.add_parser(
        "sketch",
        help="draw the C-arm scene (volume box, patient axes, source, detector) to a PNG",
        description="Draw a 3D sketch of the scene of one C-arm pose: the CT's outer box, the patient axes R/A/S from "
        "its centre, the source, the detector with pixel (0, 0) marked, and the corner rays. It is drawn from the same "
        "camera code that casts the rays.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sketch.add_argument("--ct", type=Path, default=None, help="CT file or DICOM folder (default: the bundled chest CT)")
    sketch.add_argument("--view", default="PA", type=str.lower, choices=sorted(_VIEW_ALIASES), help="named view")
    sketch.add_argument("--angles", nargs=2, type=float, metavar=("PRIMARY", "SECONDARY"), help="overrides --view")
    sketch.add_argument("--out", type=Path, default=Path("scene.png"), help="output PNG")

    commands.add_parser("info", help="print how torchdrr was built and what it sees (JSON)")
    return parser


def _render(args: argparse.Namespace) -> None:
    import torch

    from .io import Volume, bundled_ct_path
    from .render import hu_to_mu, render_carm, save_png, to_display

    primary, secondary, label = _angles(args)
    rows, cols = args.size
    if rows < 1 or cols < 1:
        raise ValueError(f"--size must be two positive pixel counts, got {rows} {cols}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    if device is None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    ct_path = args.ct if args.ct is not None else bundled_ct_path()
    # Scanner padding outside the reconstruction circle is air (design.md §4).
    volume = Volume.load(ct_path, series_uid=args.series_uid, fix_padding=True)
    hu, affine = volume.data, volume.affine
    mu = hu_to_mu(hu).to(device)
    start = time.perf_counter()
    image = render_carm(
        mu,
        affine,
        primary,
        secondary,
        height=rows,
        width=cols,
        pixel_spacing_mm=tuple(args.pixel_spacing),
        sdd_mm=args.sdd,
        sod_mm=args.sod,
        mode=args.mode,
        step=args.step,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    out = save_png(to_display(image[0, 0]), args.out)
    print(
        f"wrote {out} ({rows}x{cols}, {label}, {args.mode}) from {ct_path.name} "
        f"{tuple(hu.shape)} on {device} in {elapsed * 1000:.0f} ms"
    )


def _angles(args: argparse.Namespace) -> tuple[float, float, str]:
    if args.angles is not None:
        primary, secondary = args.angles
        return primary, secondary, f"angles ({primary:g}, {secondary:g})"
    from .geometry import NAMED_VIEWS

    name = _VIEW_ALIASES[args.view]
    return (*NAMED_VIEWS[name], f"view {name}")


def _sketch(args: argparse.Namespace) -> None:
    import numpy as np

    from .geometry.sketch import sketch_carm_scene
    from .io import Volume, bundled_ct_path
    from .render import save_png

    ct_path = args.ct if args.ct is not None else bundled_ct_path()
    volume = Volume.load(ct_path, check=False)
    primary, secondary, label = _angles(args)
    picture = sketch_carm_scene(
        tuple(volume.shape),
        volume.affine,
        primary,
        secondary,
        title=f"{label}: primary {primary:g} deg, secondary {secondary:g} deg; SOD 850 mm, SDD 1020 mm",
    )
    out = save_png(np.asarray(picture), args.out)
    print(f"wrote {out} ({label})")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 success, 2 user error, 1 unexpected failure)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "render":
            _render(args)
        elif args.command == "sketch":
            _sketch(args)
        elif args.command == "info":
            from . import build_info

            print(json.dumps(build_info(), indent=2))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"torchdrr: error: {error}", file=sys.stderr)
        return 2
    return 0

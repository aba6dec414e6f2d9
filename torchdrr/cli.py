"""The ``torchdrr`` command line (also ``python -m torchdrr``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main"]

_VIEW_ALIASES = {"pa": "PA", "ap": "AP", "left-lateral": "left lateral", "right-lateral": "right lateral"}


class _Parser(argparse.ArgumentParser):
    """Reports usage errors on one line, ``torchdrr: error: ...``, and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"torchdrr: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torchdrr",
        description="torchdrr: differentiable X-ray simulation (DRRs) from CT, for PyTorch.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_render_parser(commands)
    _add_generate_parser(commands)
    from .learned.command import add_segment_parser
    from .registration.command import add_register_parser

    add_register_parser(commands, _HelpFormatter, _view_name)
    add_segment_parser(commands, _HelpFormatter)

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


# --------------------------------------------------------------------------------------------------------------------
# torchdrr render
# --------------------------------------------------------------------------------------------------------------------
_OUTPUT_UNITS = {
    "line_integral": "-log(I/I0), dimensionless",
    "intensity": "deposited energy, keV per pixel",
    "photons": "detected photons per pixel and bin",
    "flat_field": "I/I0, dimensionless",
}
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
_ALL_SUFFIXES = (".png", ".tif", ".tiff", ".npz", ".pt")
_DEFAULT_THRESHOLDS = (-800.0, 350.0)
_DEFAULT_FILTRATION_MM_AL = 2.5

_RENDER_DESCRIPTION = """\
Render digitally reconstructed radiographs (DRRs) of a CT seen by a C-arm.

By default the full physics of torchdrr.DRR is used: the CT (HU) is split into air / soft tissue / bone by HU
thresholds, every material is integrated along every ray (mass thickness, g/cm^2), a tungsten-anode tube spectrum is
attenuated bin by bin with tabulated mass attenuation coefficients, and an energy-integrating (flat panel) or
photon-counting detector records the result, optionally with quantum and electronic noise. --physics line-integral
instead renders the old rough water-based model, mu = 0.02/mm * (1 + HU/1000), with no spectrum.

The CT defaults to the bundled LIDC-IDRI-0001 chest CT (downsampled); scanner padding (<= -1500 HU) is read as air.
The isocenter is the centre of the CT. Each --out path's suffix picks its format: .png is a display image (bright =
attenuating, windowed between the 0.5 and 99.5 percentiles of the pixels that see the body), .tif/.tiff holds the
calibrated --output values as float32 (one page per detector channel), .npz/.pt holds the camera geometry
(K, R, t, P = K [R | t]) of all views with their --output images (float32 [B, K, H, W]) and the settings. With several
views, PNG and TIFF files get a _000, _001, ... suffix per view. Nothing is written unless every view rendered."""

_RENDER_EPILOG = """\
examples:
  torchdrr render --noise radiography --out chest.png
      a PA chest radiograph (90 kVp, automatic exposure to 1000 photons per pixel behind the patient, with noise)
  torchdrr render --ct scan.nii.gz --angles 0 0 30 0 60 0 --spectrum 120kVp --out run.tif run.npz
      three views: run_000.tif .. run_002.tif (float32 line integrals) and run.npz (geometry and the 3 images)
  torchdrr render --detector photon-counting --bins-keV 20 50 --csi 2 --output photons --out counts.tiff counts.pt
      a 2-bin photon-counting image behind 2 mm of CdTe: a 2-page TIFF of counts and a .pt with the geometry"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default, except None and False (the help text says what leaving the option out means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        values = default if isinstance(default, (list, tuple)) else [default]
        text = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        return f"{action.help} (default: {text.replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never break inside hyphenated words: option names and values such as energy-integrating stay whole.
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def _view_name(text: str) -> str:
    key = text.strip().lower().replace(" ", "-").replace("_", "-")
    if key not in _VIEW_ALIASES:
        raise argparse.ArgumentTypeError(f"unknown view {text!r}; choose from {', '.join(sorted(_VIEW_ALIASES))}")
    return key


def _add_render_parser(commands) -> None:
    render = commands.add_parser(
        "render",
        help="render DRRs of a CT (full physics by default) to PNG, float32 TIFF and geometry files",
        description=_RENDER_DESCRIPTION,
        epilog=_RENDER_EPILOG,
        formatter_class=_HelpFormatter,
    )
    render.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )

    geometry = render.add_argument_group("geometry")
    geometry.add_argument(
        "--ct",
        type=Path,
        default=None,
        help="CT: NIfTI (.nii, .nii.gz) or NRRD file, DICOM series folder or enhanced DICOM file, in HU (default: the "
        "bundled LIDC-IDRI-0001 chest CT)",
    )
    geometry.add_argument(
        "--series-uid", default=None, help="SeriesInstanceUID to read when a DICOM folder holds several series"
    )
    views = geometry.add_mutually_exclusive_group()
    views.add_argument(
        "--view",
        nargs="+",
        type=_view_name,
        default=None,
        metavar="VIEW",
        help="one or more named C-arm views: pa (detector anterior), ap, left-lateral, right-lateral (default: pa)",
    )
    views.add_argument(
        "--angles",
        nargs="+",
        type=float,
        default=None,
        metavar="DEG",
        help="one or more pairs of C-arm angles in degrees, PRIMARY SECONDARY [PRIMARY SECONDARY ...] (primary: LAO "
        "positive, secondary: cranial positive; 0 0 is PA); replaces --view",
    )
    geometry.add_argument(
        "--size", nargs=2, type=int, default=(512, 512), metavar=("ROWS", "COLS"), help="detector size in pixels"
    )
    geometry.add_argument(
        "--pixel-spacing",
        nargs=2,
        type=float,
        default=(0.85, 0.85),
        metavar=("ROW_MM", "COL_MM"),
        help="detector pixel pitch in mm (row, column)",
    )
    geometry.add_argument("--sdd", type=float, default=1020.0, metavar="MM", help="source-to-detector distance, mm")
    geometry.add_argument(
        "--sod", type=float, default=850.0, metavar="MM", help="source-to-isocenter (CT centre) distance, mm"
    )
    geometry.add_argument(
        "--supersample",
        type=int,
        default=1,
        metavar="S",
        help="S x S rays per pixel (full physics averages their intensities, line-integral their line integrals)",
    )
    geometry.add_argument(
        "--mode",
        choices=["siddon", "trilinear"],
        default="siddon",
        help="ray integration: siddon (exact voxel intersections) or trilinear (interpolated samples every --step)",
    )
    geometry.add_argument(
        "--step", type=float, default=None, metavar="MM", help="trilinear sample step in mm (default: half a voxel)"
    )

    physics = render.add_argument_group("physics")
    physics.add_argument(
        "--physics",
        choices=["full", "line-integral"],
        default="full",
        help="full: materials, spectrum, detector and noise (torchdrr.DRR); line-integral: the rough water model "
        "mu = 0.02/mm * (1 + HU/1000), with no spectrum, material, detector or noise options",
    )
    physics.add_argument(
        "--spectrum",
        choices=list(_spectrum_presets()),
        default="90kVp",
        help="tube spectrum preset (DeepDRR's: 60 kVp + 3.5 mm Al, 90 kVp + 4 mm Al, 120 kVp + 4.3 mm Al)",
    )
    physics.add_argument(
        "--kvp",
        type=float,
        default=None,
        metavar="KVP",
        help="custom tungsten-anode spectrum at this tube voltage (40-150 kVp); replaces --spectrum",
    )
    physics.add_argument(
        "--filtration",
        type=float,
        default=None,
        metavar="MM_AL",
        help=f"added aluminium filtration of the --kvp spectrum, mm (default: {_DEFAULT_FILTRATION_MM_AL:g} mm; "
        "needs --kvp)",
    )
    physics.add_argument(
        "--mono",
        type=float,
        default=None,
        metavar="KEV",
        help="monoenergetic beam at this energy in keV; replaces --spectrum and --kvp",
    )
    physics.add_argument(
        "--thresholds",
        nargs=2,
        type=float,
        default=_DEFAULT_THRESHOLDS,
        metavar=("AIR_SOFT", "SOFT_BONE"),
        help="HU thresholds between air and soft tissue, and soft tissue and cortical bone",
    )
    physics.add_argument(
        "--soft-thresholds",
        action="store_true",
        help="sigmoid (soft) material memberships of width 25 HU around --thresholds instead of hard thresholds",
    )
    physics.add_argument(
        "--materials",
        choices=["thresholds", "network"],
        default="thresholds",
        help="material decomposition: HU --thresholds, or the 3D material network (air, lung, soft tissue, bone, "
        "iodinated contrast, titanium; see `torchdrr segment`)",
    )
    physics.add_argument(
        "--detector",
        choices=["energy-integrating", "photon-counting"],
        default="energy-integrating",
        help="energy-integrating: a flat panel recording deposited energy (one channel); photon-counting: counts per "
        "energy bin (one channel per bin)",
    )
    physics.add_argument(
        "--bins-keV",
        nargs="+",
        type=float,
        default=None,
        metavar="T",
        dest="bins_keV",
        help="photon-counting energy thresholds in keV, increasing; bin k counts photons from T_k to T_k+1, the last "
        "bin everything above (default: one bin above 20 keV; needs --detector photon-counting)",
    )
    physics.add_argument(
        "--csi",
        type=float,
        default=None,
        metavar="MM",
        help="absorber thickness in mm: the CsI scintillator of an energy-integrating detector, the CdTe sensor of a "
        "photon-counting one (default: an ideal detector that absorbs every photon)",
    )
    physics.add_argument(
        "--falloff",
        action="store_true",
        help="apply the flat field's inverse-square and obliquity falloff (cos^3 of the ray's angle to the detector "
        "normal)",
    )
    physics.add_argument(
        "--noise",
        choices=["none", "radiography", "fluoroscopy"],
        default="none",
        help="none: expected values; radiography / fluoroscopy: quantum (Poisson) and electronic noise and detector "
        "blur, with automatic exposure to 1000 / 30 detected photons per pixel behind the patient",
    )
    physics.add_argument(
        "--scatter",
        choices=["none", "cnn", "montecarlo"],
        default="none",
        help="add scatter to the primary: cnn (the shipped scatter network, fast; about 5 %% error against Monte "
        "Carlo) or montecarlo (photon transport, accurate, slow on a CPU); energy-integrating detector only",
    )
    exposure = physics.add_mutually_exclusive_group()
    exposure.add_argument(
        "--photons",
        type=float,
        default=None,
        metavar="N0",
        help="fixed exposure: photons per pixel in the flat field (no object) at the detector centre (default: the "
        "--noise preset's automatic exposure, else 10000, DeepDRR's)",
    )
    exposure.add_argument(
        "--photons-behind-patient",
        type=float,
        default=None,
        metavar="N",
        help="automatic exposure: per view, scale the exposure so that the pixels behind the body (rays through >= "
        "1 g/cm^2) detect N photons on average",
    )
    physics.add_argument(
        "--seed", type=int, default=0, help="seed of the noise's random generator (the same seed gives the same images)"
    )
    physics.add_argument(
        "--output",
        choices=list(_OUTPUT_UNITS),
        default=None,
        help="the calibrated quantity written to .tif/.npz/.pt: line_integral (-log(I/I0)), intensity (keV per pixel, "
        "energy-integrating), photons (counts per pixel and bin, photon-counting) or flat_field (I/I0) (default: "
        "line_integral for energy-integrating, photons for photon-counting)",
    )

    hardware = render.add_argument_group("device")
    hardware.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    hardware.add_argument("--batch-size", type=int, default=8, metavar="N", help="views rendered per DRR call")

    outputs = render.add_argument_group("outputs")
    outputs.add_argument(
        "--out",
        nargs="+",
        type=Path,
        default=[Path("drr.png")],
        metavar="PATH",
        help="output files; the suffix picks the format: .png (display image), .tif/.tiff (float32 --output), "
        ".npz/.pt (geometry, --output images and settings). The folders must exist",
    )
    outputs.add_argument("--bit-depth", type=int, choices=[8, 16], default=8, help="PNG bits per pixel")


def _spectrum_presets() -> dict:
    from .physics.spectra import PRESETS

    return PRESETS


@dataclass
class _Job:
    """A checked render request: everything needed to render and write, decided before any work is done."""

    poses: list[tuple[float, float, str]]
    files: list[tuple[Path, str, int | None]]  # (path, format, view index or None for all views)
    device: Any
    output: str
    spectrum: Any
    spectrum_label: str


def _positive(value: float | None, option: str, what: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be a positive {what}, got {value:g}")


def _poses(args: argparse.Namespace) -> list[tuple[float, float, str]]:
    from .geometry import NAMED_VIEWS

    if args.angles is not None:
        if len(args.angles) % 2:
            raise ValueError(
                f"--angles takes pairs of degrees, PRIMARY SECONDARY [PRIMARY SECONDARY ...], got {len(args.angles)} "
                "numbers"
            )
        if not all(math.isfinite(a) for a in args.angles):
            raise ValueError("--angles must be finite numbers of degrees")
        pairs = list(zip(args.angles[::2], args.angles[1::2], strict=True))
        return [(p, s, f"angles ({p:g}, {s:g})") for p, s in pairs]
    names = args.view if args.view is not None else ["pa"]
    return [(*NAMED_VIEWS[_VIEW_ALIASES[n]], _VIEW_ALIASES[n]) for n in names]


def _output_files(paths: list[Path], views: int) -> list[tuple[Path, str, int | None]]:
    from .io.writers import check_output_path

    files: list[tuple[Path, str, int | None]] = []
    for path in paths:
        suffix = path.suffix.lower()
        if suffix not in _ALL_SUFFIXES:
            raise ValueError(f"--out {path}: the suffix must be one of {', '.join(_ALL_SUFFIXES)}")
        kind = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".npz": "geometry", ".pt": "geometry"}[suffix]
        if kind == "geometry" or views == 1:
            targets = [(path, None if kind == "geometry" else 0)]
        else:
            targets = [(path.with_name(f"{path.stem}_{i:03d}{path.suffix}"), i) for i in range(views)]
        for target, view in targets:
            check_output_path(target, _ALL_SUFFIXES)
            _check_writable(target, "--out")
            files.append((target, kind, view))
    seen: set[Path] = set()
    for target, _, _ in files:
        key = target.resolve()
        if key in seen:
            raise ValueError(f"--out would write {target} twice")
        seen.add(key)
    return files


def _check_writable(path: Path, option: str) -> None:
    """Raises PermissionError when the folder of ``path`` (which exists) cannot be written, before any work is done."""
    folder = path.parent
    if not os.access(folder if str(folder) else Path("."), os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: the folder {folder} is not writable")


_DECODER_MODULES = ("nibabel", "pydicom", "nrrd", "PIL", "tifffile", "zlib", "gzip", "h5py")


@contextlib.contextmanager
def _reading(option: str, path: Path) -> Iterator[None]:
    """Makes every error met while reading the user's file ``path`` a user error that names the file.

    The loaders raise torchdrr.errors.FileFormatError (which names the file); this also covers a decoder library's
    own exception types (EOFError, nibabel's ImageFileError, ...) that a corrupt file can raise from deep inside it, so
    that a bad file never reads as a bug of torchdrr.
    """
    from .errors import FileFormatError

    try:
        yield
    except FileFormatError:
        raise
    except (ValueError, OSError, EOFError) as error:
        if str(path) in str(error) or path.name in str(error):
            raise
        raise FileFormatError(f"{option} {path}: {error}", path) from error
    except Exception as error:
        module = type(error).__module__.split(".")[0]
        if module not in _DECODER_MODULES:
            raise
        raise FileFormatError(f"{option} {path}: cannot read it: {type(error).__name__}: {error}", path) from error


class _StagedOutputs:
    """Output files written under temporary names next to their destinations and renamed into place together.

    Used as a context manager: ``path(destination)`` gives the name to write to, ``commit()`` renames every file into
    place once all are written. Whatever ends the block early (an error, Ctrl-C), the temporary files are removed,
    so that an interrupted command leaves neither half-written files nor only some of its outputs.
    """

    def __init__(self) -> None:
        self._pairs: list[tuple[Path, Path]] = []

    def path(self, destination: Path) -> Path:
        """The temporary name to write ``destination`` under (same folder and suffix: writers check the suffix)."""
        temporary = destination.with_name(f".{destination.stem}.{os.getpid()}.partial{destination.suffix}")
        self._pairs.append((temporary, destination))
        return temporary

    def commit(self) -> None:
        """Renames every file into place; if one rename fails, the ones already renamed are removed again."""
        renamed: list[Path] = []
        try:
            for temporary, destination in self._pairs:
                os.replace(temporary, destination)
                renamed.append(destination)
        except BaseException:
            for destination in renamed:
                destination.unlink(missing_ok=True)
            raise

    def __enter__(self) -> _StagedOutputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for temporary, _ in self._pairs:
            temporary.unlink(missing_ok=True)


def _device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        from ._extension import has_cuda_kernels

        # Checked here, not at the first render: the CT would be loaded for nothing.
        if not has_cuda_kernels():
            raise ValueError(f"--device {text}: this torchdrr build has no CUDA kernels (use --device cpu, or "
                             "reinstall torchdrr on a machine with a CUDA torch and nvcc)")  # fmt: skip
    return device


def _check_render_args(args: argparse.Namespace) -> _Job:
    """Validates every option and combination; raises ValueError with a message naming the option."""
    rows, cols = args.size
    if rows < 1 or cols < 1:
        raise ValueError(f"--size must be two positive pixel counts, got {rows} {cols}")
    if not all(math.isfinite(s) and s > 0 for s in args.pixel_spacing):
        raise ValueError(f"--pixel-spacing must be two positive pitches in mm, got {args.pixel_spacing[0]:g} "
                         f"{args.pixel_spacing[1]:g}")  # fmt: skip
    _positive(args.sdd, "--sdd", "distance in mm")
    _positive(args.sod, "--sod", "distance in mm")
    if args.sod >= args.sdd:
        raise ValueError(f"--sod ({args.sod:g} mm) must be less than --sdd ({args.sdd:g} mm): the isocenter lies "
                         "between the source and the detector")  # fmt: skip
    if args.supersample < 1:
        raise ValueError(f"--supersample must be a whole number >= 1, got {args.supersample}")
    _positive(args.step, "--step", "distance in mm")
    if args.step is not None and args.mode != "trilinear":
        raise ValueError("--step applies to --mode trilinear only")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")

    full = args.physics == "full"
    if not full:
        given = [
            flag
            for flag, used in (
                ("--spectrum", args.spectrum != "90kVp"),
                ("--kvp", args.kvp is not None),
                ("--filtration", args.filtration is not None),
                ("--mono", args.mono is not None),
                ("--thresholds", tuple(args.thresholds) != _DEFAULT_THRESHOLDS),
                ("--soft-thresholds", args.soft_thresholds),
                ("--materials", args.materials != "thresholds"),
                ("--detector", args.detector != "energy-integrating"),
                ("--bins-keV", args.bins_keV is not None),
                ("--csi", args.csi is not None),
                ("--falloff", args.falloff),
                ("--noise", args.noise != "none"),
                ("--scatter", args.scatter != "none"),
                ("--photons", args.photons is not None),
                ("--photons-behind-patient", args.photons_behind_patient is not None),
                ("--output", args.output not in (None, "line_integral")),
            )
            if used
        ]
        if given:
            raise ValueError(
                f"--physics line-integral has no spectrum, materials, detector or noise: drop {', '.join(given)} (or "
                "use --physics full)"
            )
    counting = args.detector == "photon-counting"
    if args.bins_keV is not None:
        if not counting:
            raise ValueError("--bins-keV sets photon-counting thresholds: it needs --detector photon-counting")
        if not all(math.isfinite(t) and t > 0 for t in args.bins_keV):
            raise ValueError("--bins-keV must be positive energies in keV")
        if any(b <= a for a, b in zip(args.bins_keV[:-1], args.bins_keV[1:], strict=True)):
            raise ValueError(f"--bins-keV must increase, got {' '.join(f'{t:g}' for t in args.bins_keV)}")
    if counting and args.scatter != "none":
        raise ValueError(f"--scatter {args.scatter} needs --detector energy-integrating (photon-counting scatter is "
                         "not modelled)")  # fmt: skip
    output = args.output or ("photons" if counting else "line_integral")
    if output == "photons" and not counting:
        raise ValueError("--output photons needs --detector photon-counting (an energy-integrating detector records "
                         "deposited energy: use --output intensity)")  # fmt: skip
    if output == "intensity" and counting:
        raise ValueError("--output intensity needs an energy-integrating detector (a photon-counting detector "
                         "records counts: use --output photons)")  # fmt: skip

    spectrum: Any = args.spectrum
    label = args.spectrum
    if args.filtration is not None and args.kvp is None:
        raise ValueError("--filtration sets the filtration of a --kvp spectrum: give --kvp too")
    if args.kvp is not None:
        from .physics.spectra import KVP_RANGE
        from .physics.spectra import spectrum as tube_spectrum

        if not (math.isfinite(args.kvp) and KVP_RANGE[0] <= args.kvp <= KVP_RANGE[1]):
            raise ValueError(f"--kvp must lie in {KVP_RANGE[0]:g}-{KVP_RANGE[1]:g} kVp, got {args.kvp:g}")
        filtration = _DEFAULT_FILTRATION_MM_AL if args.filtration is None else args.filtration
        if not (math.isfinite(filtration) and filtration >= 0):
            raise ValueError(f"--filtration must be >= 0 mm of aluminium, got {filtration:g}")
        if args.mono is None:
            spectrum = tube_spectrum(args.kvp, filtration_mm_al=filtration)
            label = f"{args.kvp:g} kVp + {filtration:g} mm Al"
    if args.mono is not None:
        _positive(args.mono, "--mono", "energy in keV")
        spectrum, label = float(args.mono), f"{args.mono:g} keV"
    if not full:
        label = "none"
    if not args.thresholds[0] < args.thresholds[1]:
        raise ValueError(f"--thresholds must increase (AIR_SOFT < SOFT_BONE), got {args.thresholds[0]:g} "
                         f"{args.thresholds[1]:g}")  # fmt: skip
    _positive(args.csi, "--csi", "thickness in mm")
    _positive(args.photons, "--photons", "number of photons per pixel")
    _positive(args.photons_behind_patient, "--photons-behind-patient", "number of photons per pixel")

    poses = _poses(args)
    files = _output_files(list(args.out), len(poses))
    device = _device(args.device)
    return _Job(poses, files, device, output, spectrum, label)


def _build_drr(args: argparse.Namespace, job: _Job, volume):
    from .drr import DRR
    from .physics.detector import EnergyIntegratingDetector, PhotonCountingDetector
    from .physics.segmentation import SoftThresholdSegmentation, ThresholdSegmentation

    thresholds = tuple(args.thresholds)
    if args.materials == "network":
        if args.soft_thresholds or thresholds != _DEFAULT_THRESHOLDS:
            raise ValueError("--materials network replaces --thresholds/--soft-thresholds; give one or the other")
        segmentation = None
    elif args.soft_thresholds:
        segmentation = SoftThresholdSegmentation(thresholds=thresholds, temperature=25.0)
    else:
        segmentation = ThresholdSegmentation(thresholds=thresholds)
    if args.detector == "photon-counting":
        bins = tuple(args.bins_keV) if args.bins_keV is not None else (20.0,)
        detector = PhotonCountingDetector(bins, absorber_thickness_mm=args.csi, falloff=args.falloff)
    else:
        detector = EnergyIntegratingDetector(absorber_thickness_mm=args.csi, falloff=args.falloff)
    drr = DRR(
        volume,
        segmentation=segmentation,
        materials=args.materials,
        spectrum=job.spectrum,
        detector=detector,
        noise=None if args.noise == "none" else args.noise,
        scatter=None if args.scatter == "none" else args.scatter,
        photons_per_pixel=args.photons,
        photons_behind_patient=args.photons_behind_patient,
        output=job.output,
        mode=args.mode,
        step=args.step,
        supersample=args.supersample,
    )
    return drr.to(job.device)


def _render(args: argparse.Namespace) -> None:
    import torch

    from .drr import display_image
    from .geometry import Camera
    from .io import Volume, bundled_ct_path
    from .io.writers import save_geometry, save_png, save_tiff
    from .render import hu_to_mu, render_line_integrals

    job = _check_render_args(args)
    device = job.device
    ct_path = args.ct if args.ct is not None else bundled_ct_path()
    # Scanner padding outside the reconstruction circle is air (design.md §4).
    with _reading("--ct", Path(ct_path)):
        volume = Volume.load(ct_path, series_uid=args.series_uid, fix_padding=True)
    affine64 = volume.affine.to(torch.float64)
    isocenter = volume.center  # cameras are built on the CPU; the DRR moves them to its device
    rows, cols = args.size
    full = args.physics == "full"
    if full:
        drr = _build_drr(args, job, volume)
        generator = torch.Generator(device=device).manual_seed(args.seed)
    else:
        mu = hu_to_mu(volume.data).to(device)
    need_display = any(kind == "png" for _, kind, _ in job.files)
    need_values = any(kind != "png" for _, kind, _ in job.files)

    def cameras(first: int, last: int) -> Camera:
        angles = torch.tensor([(p, s) for p, s, _ in job.poses[first:last]], dtype=torch.float64)
        return Camera.from_carm(
            angles[:, 0],
            angles[:, 1],
            isocenter,
            sod_mm=args.sod,
            sdd_mm=args.sdd,
            height=rows,
            width=cols,
            pixel_spacing_mm=tuple(args.pixel_spacing),
        )

    n = len(job.poses)
    batches = [(i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    values: list[torch.Tensor] = []
    line_integrals: list[torch.Tensor] = []
    progress = _progress(total=n, show=len(batches) > 1 or n > 1)
    start = time.perf_counter()
    with torch.no_grad():
        for first, last in batches:
            camera = cameras(first, last)
            if not full:
                image = render_line_integrals(mu, camera, affine64, mode=args.mode, step=args.step,
                                              supersample=args.supersample)  # fmt: skip
                values.append(image.float().cpu())
                line_integrals.append(image.float().cpu())
            else:
                state = generator.get_state()
                if need_values or job.output == "line_integral":
                    values.append(drr(camera, output=job.output, generator=generator).float().cpu())
                if need_display:
                    if job.output == "line_integral" and values:
                        line_integrals.append(values[-1])
                    else:
                        generator.set_state(state)  # the same noise draws as the --output images
                        line_integrals.append(drr(camera, output="line_integral", generator=generator).float().cpu())
            progress.update(last - first)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    progress.close()

    what = (
        "line-integral (water model)"
        if not full
        else f"{job.spectrum_label}, {args.detector}, scatter {args.scatter}, noise {args.noise}"
    )
    print(
        f"rendered {n} view{'s' if n != 1 else ''} of {rows}x{cols} px ({what}) from {Path(ct_path).name} "
        f"{tuple(volume.shape)} on {device} in {elapsed * 1000:.0f} ms"
    )

    images = torch.cat(values) if values else None
    pictures = None
    if need_display:
        li = torch.cat(line_integrals)
        pictures = display_image(li.mean(1))  # [B, H, W]; several photon-counting bins: their mean line integral
    # Every file is first written under a temporary name next to its destination; only when all are written are
    # they renamed into place, so a failure (or Ctrl-C) leaves none of them behind.
    lines: list[str] = []
    with _StagedOutputs() as staged:
        for path, kind, view in job.files:
            temporary = staged.path(path)
            label = job.poses[view][2] if view is not None else f"{n} view{'s' if n != 1 else ''}"
            if kind == "png":
                save_png(pictures[view], temporary, bit_depth=args.bit_depth)
                detail = f"{args.bit_depth}-bit display image {rows}x{cols}, {label}"
            elif kind == "tiff":
                save_tiff(images[view], temporary)
                channels = images.shape[1]
                pages = f", {channels} pages" if channels > 1 else ""
                detail = f"float32 {job.output} [{_OUTPUT_UNITS[job.output]}]{pages}, {label}"
            else:
                save_geometry(temporary, cameras(0, n), images, **_metadata(args, job, ct_path))
                detail = f"geometry K, R, t, P and {job.output} images {list(images.shape)}, {label}"
            lines.append(f"wrote {path} ({detail})")
        staged.commit()
    for line in lines:
        print(line)


def _metadata(args: argparse.Namespace, job: _Job, ct_path: Path) -> dict[str, Any]:
    full = args.physics == "full"
    counting = args.detector == "photon-counting"
    return {
        "physics": args.physics,
        "output": job.output,
        "output_units": _OUTPUT_UNITS[job.output],
        "spectrum": job.spectrum_label,
        "detector": args.detector if full else None,
        "bins_keV": (tuple(args.bins_keV) if args.bins_keV is not None else (20.0,)) if full and counting else None,
        "absorber_thickness_mm": args.csi,
        "falloff": args.falloff if full else None,
        "noise": args.noise if full else None,
        "scatter": args.scatter if full else None,
        "photons_per_pixel": args.photons,
        "photons_behind_patient": args.photons_behind_patient,
        "thresholds_hu": tuple(args.thresholds) if full else None,
        "soft_thresholds": args.soft_thresholds if full else None,
        "seed": args.seed if full else None,
        "views": [label for _, _, label in job.poses],
        "primary_deg": [p for p, _, _ in job.poses],
        "secondary_deg": [s for _, s, _ in job.poses],
        "sod_mm": args.sod,
        "ct": str(ct_path),
        "series_uid": args.series_uid,
        "mode": args.mode,
        "step_mm": args.step,
        "supersample": args.supersample,
    }


def _progress(total: int, show: bool):
    """A tqdm bar on stderr (hidden when stderr is not a terminal), or a stand-in when tqdm is missing or not wanted."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    if tqdm is None or not show:
        return _NoProgress()
    return tqdm(total=total, unit="view", desc="render", file=sys.stderr, disable=None, leave=False)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


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
    from .io.writers import check_output_path
    from .render import save_png

    # The output and the angles are checked before the CT is loaded: a typo must not cost the load.
    check_output_path(args.out, (".png",), "--out")
    _check_writable(args.out, "--out")
    if args.angles is not None and not all(math.isfinite(a) for a in args.angles):
        raise ValueError("--angles must be finite numbers of degrees")
    ct_path = args.ct if args.ct is not None else bundled_ct_path()
    with _reading("--ct", Path(ct_path)):
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


# --------------------------------------------------------------------------------------------------------------------
# torchdrr generate
# --------------------------------------------------------------------------------------------------------------------
_GENERATE_DESCRIPTION = """\
Render a training set of random C-arm DRRs (torchdrr.data.DRRDataset) to OUT_DIR.

Sample i is a pure function of (--seed, i): its CT, pose, tube spectrum, dose and noise. OUT_DIR gets config.json
(everything that defines the set, with the sha256 of every CT), images/ (000000.png ... for png16, 000000.tiff ... for
tiff, shard_000.h5 ... for hdf5), metadata.jsonl (one line per sample: parameters, K, R, t, P = K [R | t], landmark
projections, image file) and, last, manifest.json (sha256 of every file; its presence means the set is complete).

png16 stores level = round(clip(value * scale, 0, 65535)) with a fixed scale (4096 for line_integral, i.e. 0-16 in
steps of 1/4096; 32768 for flat_field, i.e. 0-2), recorded in config.json: value = level / scale. tiff and hdf5 store
float32 values as rendered. A killed run resumes where it stopped when run again with the same options; a different
dataset in OUT_DIR is refused, a complete one is left as it is. Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set) each rank renders every WORLD_SIZE-th sample; the files are the same whatever the number of ranks."""

_GENERATE_EPILOG = """\
examples:
  torchdrr generate data/chest --count 1000 --size 256 256
      1000 random views of the bundled chest CT as 16-bit PNG line integrals
  torchdrr generate data/set --ct a.nii.gz b.nii.gz --ct-weights 2 1 --count 50000 --format hdf5 --kvp 60 120
  torchrun --nproc-per-node 4 -m torchdrr generate data/set --count 100000 --device cuda"""


def _add_generate_parser(commands) -> None:
    from .data.sampling import PhysicsDistribution, PoseDistribution

    poses, physics = PoseDistribution(), PhysicsDistribution()
    generate = commands.add_parser(
        "generate",
        help="render a random-view DRR training set to a folder (images, metadata.jsonl, manifest), resumable",
        description=_GENERATE_DESCRIPTION,
        epilog=_GENERATE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    generate.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    generate.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset folder (created if needed)")

    data = generate.add_argument_group("data")
    data.add_argument(
        "--ct",
        nargs="+",
        type=Path,
        default=None,
        metavar="CT",
        help="CTs in HU: NIfTI, NRRD, DICOM folder (default: the bundled LIDC-IDRI-0001 chest CT)",
    )
    data.add_argument(
        "--ct-weights", nargs="+", type=float, default=None, metavar="W", help="relative sampling weight per CT "
        "(default: equal)"
    )  # fmt: skip
    data.add_argument("--count", type=int, required=True, metavar="N", help="number of samples (required)")
    data.add_argument("--seed", type=int, default=0, metavar="S", help="the dataset's seed (whole number >= 0)")
    data.add_argument(
        "--landmarks",
        nargs="+",
        type=Path,
        default=None,
        metavar="FILE",
        help="3D landmarks to project, one .csv (x,y,z per line; a header line is skipped) or .npy [L, 3] file per "
        "CT, world mm; the same L for every CT",
    )

    detector = generate.add_argument_group("detector and output")
    detector.add_argument(
        "--size", nargs=2, type=int, default=(256, 256), metavar=("ROWS", "COLS"), help="detector size in pixels"
    )
    detector.add_argument(
        "--pixel-spacing",
        nargs=2,
        type=float,
        default=None,
        metavar=("ROW_MM", "COL_MM"),
        help="detector pixel pitch in mm (default: a 300 x 300 mm field, 300/ROWS x 300/COLS)",
    )
    detector.add_argument(
        "--output",
        choices=["line_integral", "intensity", "flat_field"],
        default="line_integral",
        help="the stored quantity: line_integral (-log(I/I0)), intensity (keV per pixel; tiff or hdf5 only) or "
        "flat_field (I/I0)",
    )
    detector.add_argument(
        "--format",
        choices=["png16", "tiff", "hdf5"],
        default="png16",
        help="png16: 16-bit PNG with the fixed mapping above; tiff: float32, one page per channel; hdf5: float32 "
        "shards of --shard-size samples (needs h5py)",
    )
    detector.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per hdf5 shard")

    pose = generate.add_argument_group("pose ranges (MIN MAX; a sample draws each value in its range)")

    def pair(group, flag: str, default: tuple[float, float], text: str) -> None:
        group.add_argument(flag, nargs=2, type=float, default=tuple(default), metavar=("MIN", "MAX"), help=text)

    pair(pose, "--primary", poses.primary_deg, "primary C-arm angle, degrees (LAO positive; 0 0 is PA)")
    pair(pose, "--secondary", poses.secondary_deg, "secondary C-arm angle, degrees (cranial positive)")
    pair(pose, "--inplane", poses.inplane_deg, "in-plane detector rotation, degrees")
    pair(pose, "--translation", poses.translation_mm, "isocenter offset from the CT centre along each axis, mm")
    pair(pose, "--sdd", poses.sdd_mm, "source-to-detector distance, mm")
    pair(pose, "--sod", poses.sod_mm, "source-to-isocenter distance, mm (below the SDD)")
    pose.add_argument(
        "--distribution",
        choices=["uniform", "normal"],
        default=poses.distribution,
        help="uniform over each range, or normal centred on it (std = a quarter of its width, clipped to it)",
    )

    beam = generate.add_argument_group("physics ranges (MIN MAX)")
    pair(beam, "--kvp", physics.kvp, "tube voltage, kVp (within 40-150)")
    pair(beam, "--filtration", physics.filtration_mm_al, "added aluminium filtration, mm")
    pair(
        beam,
        "--photons",
        physics.photons_behind_patient,
        "dose: mean detected photons per pixel behind the patient, drawn log-uniformly (30 fluoroscopy, 1000 "
        "radiography)",
    )
    beam.add_argument(
        "--noise-probability",
        type=float,
        default=physics.noise_probability,
        metavar="P",
        help="fraction of samples with quantum and electronic noise (the others are noise-free expectations)",
    )

    hardware = generate.add_argument_group("device")
    hardware.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N; under torchrun, cuda means cuda:LOCAL_RANK",
    )
    hardware.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples rendered per DRR call")
    hardware.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _load_landmarks(path: Path):
    import numpy as np
    import torch

    if not path.is_file():
        raise ValueError(f"--landmarks {path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            points = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            try:
                float(lines[0].split(",")[0]) if lines else None
            except ValueError:
                lines = lines[1:]  # a header
            points = np.array([[float(v) for v in line.split(",")] for line in lines], dtype=np.float64)
        else:
            raise ValueError("the suffix must be .csv or .npy")
    except (ValueError, OSError) as error:
        raise ValueError(f"--landmarks {path}: {error}") from None
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"--landmarks {path}: expected [L, 3] world points in mm, got shape {points.shape}")
    return torch.from_numpy(points)


def _remove_if_no_samples(folder: Path) -> None:
    """Removes ``folder`` if the only file in it is a dataset's config.json (empty sub-folders aside)."""
    import shutil

    if not folder.is_dir():
        return
    files = [path for path in folder.rglob("*") if not path.is_dir()]
    if all(path == folder / "config.json" for path in files):
        shutil.rmtree(folder, ignore_errors=True)


def _generate(args: argparse.Namespace) -> None:
    from .data import DRRDataset, PhysicsDistribution, PoseDistribution
    from .data.generate import generate_dataset

    if args.count < 0:
        raise ValueError(f"--count must be >= 0, got {args.count}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    rows, cols = args.size
    if rows < 1 or cols < 1:
        raise ValueError(f"--size must be two positive pixel counts, got {rows} {cols}")
    names = {"primary_deg": "--primary", "secondary_deg": "--secondary", "inplane_deg": "--inplane",
             "translation_mm": "--translation", "sdd_mm": "--sdd", "sod_mm": "--sod", "kvp": "--kvp",
             "filtration_mm_al": "--filtration", "photons_behind_patient": "--photons",
             "noise_probability": "--noise-probability"}  # fmt: skip
    try:
        poses = PoseDistribution(
            primary_deg=tuple(args.primary),
            secondary_deg=tuple(args.secondary),
            inplane_deg=tuple(args.inplane),
            translation_mm=tuple(args.translation),
            sdd_mm=tuple(args.sdd),
            sod_mm=tuple(args.sod),
            distribution=args.distribution,
        )
        physics = PhysicsDistribution(
            kvp=tuple(args.kvp),
            filtration_mm_al=tuple(args.filtration),
            photons_behind_patient=tuple(args.photons),
            noise_probability=args.noise_probability,
        )
    except ValueError as error:
        message = str(error)
        for field, flag in names.items():
            message = message.replace(field, flag)
        raise ValueError(message) from None
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"OUT_DIR {args.out_dir} is a file, not a folder")
    cts = list(args.ct) if args.ct is not None else None
    for ct in cts or []:
        if not ct.exists():
            raise ValueError(f"--ct {ct}: CT not found")
    landmarks = None
    if args.landmarks is not None:
        if len(args.landmarks) != (len(cts) if cts else 1):
            raise ValueError(f"--landmarks needs one file per CT ({len(cts) if cts else 1}), got {len(args.landmarks)}")
        landmarks = [_load_landmarks(p) for p in args.landmarks]
    device = _device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        import torch

        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dataset = DRRDataset(
        cts,
        length=args.count,
        seed=args.seed,
        ct_weights=args.ct_weights,
        poses=poses,
        physics=physics,
        height=rows,
        width=cols,
        pixel_spacing_mm=tuple(args.pixel_spacing) if args.pixel_spacing is not None else None,
        landmarks=landmarks,
        output=args.output,
        device=device,
    )
    created = not args.out_dir.exists()
    try:
        summary = generate_dataset(
            args.out_dir,
            dataset,
            image_format=args.format,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            shard_size=args.shard_size,
        )
    except BaseException:
        # A CT is read only once rendering starts, after config.json (with the CTs' hashes) is written: a bad CT
        # would leave a folder that a corrected rerun refuses as a different dataset. Remove what this run created,
        # but only while it holds no sample (an interrupted long run must stay resumable) and only on a single rank
        # (other ranks may still be writing).
        if created and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            _remove_if_no_samples(args.out_dir)
        raise
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = summary["out_dir"]
    if summary["already_complete"]:
        print(f"{out} already holds the complete dataset ({summary['count']} samples): nothing rendered")
        return
    ranks = f" on {summary['world_size']} ranks" if summary["world_size"] > 1 else ""
    print(
        f"wrote {summary['count']} samples of {rows}x{cols} px ({args.format}, {args.output}) to {out}: "
        f"{summary['rendered']} rendered{ranks}, {summary['skipped']} already there, in {summary['seconds']:.1f} s "
        f"({summary['samples_per_second']:.2f} samples/s)"
    )
    phases = summary.get("phase_seconds")
    if phases and summary["rendered"]:
        print(
            f"  rank 0: {summary['rendering_samples_per_second']:.1f} samples/s while rendering and writing; start-up "
            f"{phases['setup'] + phases['first_batch']:.1f} s, finishing {phases['finishing']:.1f} s"
        )


_MAX_MESSAGE = 600  # characters of an error message shown; the rest is cut (a printed tensor can be huge)

_MEMORY_HINTS = {
    "render": "try a smaller --batch-size or detector (--size), or --device cpu",
    "generate": "try a smaller --batch-size or detector (--size), or --device cpu",
    "register": "try a smaller X-ray (bin it), fewer --starts or --device cpu",
    "sketch": "try a smaller CT",
}


def _one_line(text: str) -> str:
    """``text`` on one line: its lines joined (a message may print a matrix over several), cut to a sane length."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(line) > _MAX_MESSAGE:
        line = line[: _MAX_MESSAGE - 5].rstrip() + " ..."
    return line


def _is_out_of_memory(error: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA or CPU allocator) and Python's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)  # torch's CPU allocator


def _user_error_message(error: BaseException, command: str | None) -> str | None:
    """The one-line message of a user error (bad input, missing file, no memory), or None for a bug.

    User errors are what the user can fix: ValueError (torchdrr's FileFormatError, MemoryBudgetError and
    DatasetError among them), TypeError from a bad value, OSError (a missing or unwritable file), a missing optional
    package, and running out of memory (with a hint on what to make smaller).
    """
    from .errors import MemoryBudgetError

    hint = _MEMORY_HINTS.get(command or "", "try a smaller problem")
    if _is_out_of_memory(error):
        first = _one_line(str(error)).split(". ")[0] or type(error).__name__
        return f"out of memory: {first}; {hint}"
    if isinstance(error, MemoryBudgetError):
        return f"{_one_line(str(error))}; {hint}"
    if isinstance(error, ImportError) and not (error.name or "").startswith("torchdrr"):
        return _one_line(str(error))  # an optional package that is not installed
    if isinstance(error, (ValueError, TypeError, OSError)):
        message = _one_line(str(error))
        if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
            message = f"{error.filename}: {message}"
        return message or type(error).__name__
    return None


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the command line: one line, ``torchdrr: warning: ...``, no source location."""
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"torchdrr: warning: {_one_line(str(message))}\n")
    except OSError:  # stderr closed: a warning must not turn into an error
        pass


def _run(args: argparse.Namespace) -> None:
    if args.command == "render":
        _render(args)
    elif args.command == "sketch":
        _sketch(args)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "register":
        from .registration.command import run_register

        run_register(args)
    elif args.command == "segment":
        from .learned.command import run_segment

        run_segment(args)
    elif args.command == "info":
        from . import build_info

        print(json.dumps(build_info(), indent=2))


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    0: success. 2: a user error (bad option, unreadable file, out of memory), reported on one line,
    ``torchdrr: error: ...``. 1: an internal error (a bug), reported on one line that names its type. 130: Ctrl-C.
    ``--debug`` (before or after the command) lets every exception through with its full traceback, and leaves
    Python's warnings in their usual form; otherwise a warning prints as one line, ``torchdrr: warning: ...``.
    argparse's own usage errors exit through SystemExit (status 2, one line; see _Parser).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Known for sure only once parsed; until then (building the parser imports torch) trust a plain look.
    debug = "--debug" in argv
    command: str | None = None
    previous_showwarning = warnings.showwarning
    # Restored on the way out: tests, and programs that embed the command line, call main() in-process.
    if not debug:
        warnings.showwarning = _show_warning
    try:
        args = _parser().parse_args(argv)
        debug, command = bool(args.debug), args.command
        warnings.showwarning = previous_showwarning if debug else _show_warning
        _run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("torchdrr: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        message = _user_error_message(error, command)
        if message is not None:
            print(f"torchdrr: error: {message}", file=sys.stderr)
            return 2
        detail = _one_line(str(error))
        what = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        print(
            f"torchdrr: internal error: {what} (run with --debug for the traceback; please report it)", file=sys.stderr
        )
        return 1
    finally:
        warnings.showwarning = previous_showwarning
    return 0

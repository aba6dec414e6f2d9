"""``torchdrr segment``: material labels (and probabilities) of a CT from the material network."""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["add_segment_parser", "run_segment", "slice_overlay"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def add_segment_parser(commands: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Adds the ``segment`` sub-command to ``commands`` (an argparse sub-parsers object)."""
    parser = commands.add_parser(
        "segment",
        help="label a CT's materials (air, lung, soft tissue, bone, contrast, metal) with the material network",
        description="Segment a CT into materials with the 3D material network (trained on procedural phantoms; "
        "torchdrr.learned). The CT is resampled to the network's 2 mm voxels, segmented with an overlapping sliding "
        "window, and the class probabilities are interpolated back onto the CT's voxels. Writes a label map (uint8 "
        "class indices, the CT's affine), optionally the probabilities and a picture of three orthogonal slices "
        "with the bone overlaid.",
        formatter_class=formatter,
    )
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser.add_argument("ct", type=Path, nargs="?", default=None, help="CT: NIfTI, NRRD or DICOM (default: bundled)")
    parser.add_argument("--out", type=Path, default=Path("labels.nii.gz"), help="label map (.nii or .nii.gz)")
    parser.add_argument("--probabilities", type=Path, default=None, help="also write the probabilities [I, J, K, C]")
    parser.add_argument("--picture", type=Path, default=None, help="PNG of three slices with the bone overlaid")
    parser.add_argument("--weights", type=Path, default=None, help="network weights (default: the shipped ones)")
    parser.add_argument("--series-uid", default=None, help="SeriesInstanceUID when a DICOM folder holds several")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6) if compress else data


def slice_overlay(hu: torch.Tensor, bone: torch.Tensor, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """An RGB picture ``[H, W, 3]`` uint8 of three orthogonal slices through the centre of the bone (axial,
    coronal, sagittal, at their physical aspect), CT in gray (-1000 to 1500 HU) with the bone probability in orange.

    Args:
        hu: ``[I, J, K]`` CT (HU), RAS-like axes (i: left-right, j: posterior-anterior, k: inferior-superior).
        bone: ``[I, J, K]`` bone probability in [0, 1].
        spacing_mm: voxel size per axis (mm).
    """
    from PIL import Image

    weights = bone.double()
    total = weights.sum().clamp_min(1e-9)
    centre = [int((weights.sum(dim=[d for d in range(3) if d != a]) * torch.arange(hu.shape[a])).sum() / total)
              for a in range(3)]  # fmt: skip
    gray = ((hu.float() + 1000.0) / 2500.0).clamp(0, 1)
    panels = []
    for axis in (2, 1, 0):  # axial (k fixed), coronal (j fixed), sagittal (i fixed)
        g = gray.select(axis, centre[axis])
        b = bone.float().select(axis, centre[axis]).clamp(0, 1)
        rows_axis, cols_axis = [a for a in range(3) if a != axis]
        # Display: first remaining axis across, second up (superior / anterior at the top).
        g, b = g.T.flip(0), b.T.flip(0)
        rgb = torch.stack([g, g, g], -1)
        orange = torch.tensor([1.0, 0.55, 0.0])
        rgb = rgb * (1 - 0.6 * b[..., None]) + 0.6 * b[..., None] * orange
        picture = Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))
        height_mm = picture.height * spacing_mm[cols_axis]
        width_mm = picture.width * spacing_mm[rows_axis]
        scale = 300.0 / max(height_mm, width_mm)
        panels.append(picture.resize((max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 10 * (len(panels) - 1), max(p.height for p in panels)))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 10
    return np.asarray(canvas)


def run_segment(args: argparse.Namespace) -> dict:
    """Runs ``torchdrr segment``; returns a summary."""
    from ..io import Volume, bundled_ct_path
    from ..io.writers import atomic_write, check_output_path
    from .inference import load_network, segment_volume

    check_output_path(args.out, _NIFTI_SUFFIXES, "--out")
    if args.probabilities is not None:
        check_output_path(args.probabilities, _NIFTI_SUFFIXES, "--probabilities")
    if args.picture is not None:
        check_output_path(args.picture, (".png",), "--picture")
    network = load_network(args.weights, device=args.device)
    ct_path = args.ct if args.ct is not None else bundled_ct_path()
    volume = Volume.load(ct_path, series_uid=args.series_uid, fix_padding=True)
    started = time.perf_counter()
    probabilities = segment_volume(volume, network, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    labels = probabilities.argmax(0).to(torch.uint8).numpy()
    affine = volume.affine.numpy()
    atomic_write(args.out, lambda h: h.write(_nifti_bytes(labels, affine, args.out.name.endswith(".gz"))))
    if args.probabilities is not None:
        stacked = probabilities.permute(1, 2, 3, 0).numpy().astype(np.float32)
        compress = args.probabilities.name.endswith(".gz")
        atomic_write(args.probabilities, lambda h: h.write(_nifti_bytes(stacked, affine, compress)))
    if args.picture is not None:
        from PIL import Image

        bone = probabilities[list(network.materials).index("cortical bone")]
        spacing = tuple(float(s) for s in volume.spacing)
        picture = Image.fromarray(slice_overlay(volume.data, bone, spacing))
        atomic_write(args.picture, lambda h: picture.save(h, format="PNG"))
    counts = np.bincount(labels.reshape(-1), minlength=len(network.materials))
    fractions = {name: float(c) / labels.size for name, c in zip(network.materials, counts, strict=True)}
    print(f"segmented {Path(ct_path).name} {tuple(volume.shape)} in {seconds:.1f} s on {args.device}; wrote {args.out}")
    print("  " + ", ".join(f"{name} {100 * f:.1f} %" for name, f in fractions.items()))
    return {"seconds": seconds, "fractions": fractions}

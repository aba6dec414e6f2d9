"""Regenerates the bundled demo CT from the full-resolution LIDC-IDRI-0001 scan.

Usage: ``python -m torchdrr.assets.regenerate SOURCE.nii.gz`` (the repository's tests and benchmarks use
``../shared/data/chest-ct/lidc-idri-0001.nii.gz``). Writes ``torchdrr/assets/chest_ct_small.nii.gz``.

Each output voxel is the mean HU of a 3 x 3 x 1 block of input voxels (in-plane 0.70 -> 2.11 mm, slices stay
2.5 mm), ignoring the scanner's padding value (-2048, outside the reconstruction circle). A block made only of
padding stays -2048, so the small copy keeps the same padding convention as the original. The affine is updated
so that every output voxel centre is the centre of its block: world positions are unchanged.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

PADDING_HU = -2048
BLOCK = (3, 3, 1)
OUTPUT = Path(__file__).with_name("chest_ct_small.nii.gz")


def downsample(hu: np.ndarray, affine: np.ndarray, block: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Block-averages an int16 HU volume ``[I, J, K]`` while ignoring padding; returns (hu, affine)."""
    shape = tuple(n // b for n, b in zip(hu.shape, block, strict=True))
    cropped = hu[: shape[0] * block[0], : shape[1] * block[1], : shape[2] * block[2]].astype(np.float64)
    blocks = cropped.reshape(shape[0], block[0], shape[1], block[1], shape[2], block[2])
    padding = blocks == PADDING_HU
    total = np.where(padding, 0.0, blocks).sum(axis=(1, 3, 5))
    count = (~padding).sum(axis=(1, 3, 5))
    out = np.where(count > 0, np.round(total / np.maximum(count, 1)), PADDING_HU).astype(np.int16)
    scale = np.array(block, dtype=np.float64)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale  # column a scales with block[a]
    new_affine[:3, 3] = affine[:3, :3] @ ((scale - 1) / 2) + affine[:3, 3]
    return out, new_affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="full-resolution lidc-idri-0001.nii.gz")
    parser.add_argument("--out", type=Path, default=OUTPUT, help=f"output NIfTI (default {OUTPUT})")
    args = parser.parse_args()
    image = nib.load(args.source)
    hu, affine = downsample(np.asarray(image.dataobj).astype(np.int16), image.affine, BLOCK)
    small = nib.Nifti1Image(hu, affine)
    small.header.set_xyzt_units("mm")
    small.header["descrip"] = b"LIDC-IDRI-0001 3x3x1 block mean HU, CC BY 3.0"
    # Write atomically: a temporary file in the same folder, then rename.
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=args.out.parent)
    os.close(fd)
    try:
        nib.save(small, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {args.out}: shape {hu.shape}, spacing {np.linalg.norm(affine[:3, :3], axis=0).round(3)} mm")


if __name__ == "__main__":
    main()

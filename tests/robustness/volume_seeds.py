"""Small valid CT files, built in code, that the fuzzers damage (shared by the hypothesis tests and atheris).

Every builder is deterministic (fixed UIDs, no timestamps), so a saved crasher replays against the same neighbours.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from pydicom.dataset import Dataset

from tests.io_fixtures import _base_dataset, _set_pixels, stored_values, write_enhanced_ct
from torchdrr.io import Volume

SHAPE = (6, 5, 4)
SLOPE, INTERCEPT = 2.0, -1024.0
SERIES_UID = "1.2.826.0.1.3680043.8.498.77"
ORIENTATION = np.array([0.8, 0.6, 0.0, -0.6, 0.8, 0.0])  # oblique, orthonormal rows
PIXEL_SPACING = (0.7, 0.9)
SLICE_STEP_MM = 1.5
SERIES_SLICES = 4


def oblique_affine() -> np.ndarray:
    """A real (rotated, anisotropic, shifted) voxel -> RAS+ mm affine."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-12.0, 30.5, 101.0]
    return affine


def hu_volume(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Deterministic HU values from air to bone, exactly representable with ``SLOPE``/``INTERCEPT``."""
    values = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    return (-1000.0 + (values * 74.0) % 2400.0).astype(np.float32)


def nifti_bytes(gz: bool = False) -> bytes:
    """A ``.nii`` (or ``.nii.gz``) of ``SHAPE`` int16 voxels with a slope/intercept and both qform and sform set."""
    stored = np.round((hu_volume() - INTERCEPT) / SLOPE).astype(np.int16)
    image = nib.Nifti1Image(stored, oblique_affine())
    image.header.set_slope_inter(SLOPE, INTERCEPT)
    image.set_qform(oblique_affine(), code=1)
    image.set_sform(oblique_affine(), code=2)
    raw = image.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


NRRD_FIELDS = {
    "type": "float",
    "dimension": "3",
    "space": "left-posterior-superior",
    "sizes": "6 5 4",
    "space directions": "(0.8,0,0) (0,0.9,0) (0,0.3,2.5)",
    "endian": "little",
    "encoding": "raw",
    "space origin": "(12,-30.5,101)",
}


def nrrd_header(fields: dict[str, str | None] | None = None) -> bytes:
    """NRRD header text (magic line, ``key: value`` lines, blank line); ``None`` values drop a field."""
    merged = dict(NRRD_FIELDS, **(fields or {}))
    lines = ["NRRD0004"] + [f"{key}: {value}" for key, value in merged.items() if value is not None]
    return ("\n".join(lines) + "\n\n").encode("ascii", errors="replace")


def nrrd_payload(encoding: str = "raw") -> bytes:
    """``SHAPE`` float32 little-endian voxels in NRRD order (first axis fastest), raw or gzip-compressed."""
    raw = hu_volume().astype("<f4").tobytes(order="F")
    return gzip.compress(raw, mtime=0) if encoding == "gzip" else raw


def nrrd_bytes(encoding: str = "raw") -> bytes:
    """An attached-header ``.nrrd``."""
    return nrrd_header({"encoding": encoding}) + nrrd_payload(encoding)


NHDR_DATA_NAME = "volume.raw"


def nhdr_pair() -> tuple[bytes, bytes]:
    """A detached ``volume.nhdr`` header and its raw data file ``volume.raw``."""
    return nrrd_header({"data file": NHDR_DATA_NAME}), nrrd_payload("raw")


def series_positions() -> list[np.ndarray]:
    """LPS positions of the series' slices, ``SLICE_STEP_MM`` apart along the orientation's normal."""
    normal = np.cross(ORIENTATION[:3], ORIENTATION[3:])
    return [np.array([-40.0, 12.0, 300.0]) + normal * SLICE_STEP_MM * k for k in range(SERIES_SLICES)]


def series_dataset(index: int) -> Dataset:
    """Slice ``index`` of a classic single-frame CT series (rows 5, columns 6)."""
    ds = _base_dataset("1.2.840.10008.5.1.4.1.1.2", SERIES_UID)
    ds.SOPInstanceUID = f"{SERIES_UID}.{index + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [f"{v:.6f}" for v in series_positions()[index]]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in ORIENTATION]
    ds.PixelSpacing = [f"{v:g}" for v in PIXEL_SPACING]
    ds.RescaleSlope = f"{SLOPE:g}"
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    _set_pixels(ds, stored_values(hu_volume((SERIES_SLICES, 5, 6))[index], SLOPE, INTERCEPT))
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def series_bytes() -> list[bytes]:
    """The series' slice files, in spatial order."""
    return [dataset_bytes(series_dataset(index)) for index in range(SERIES_SLICES)]


def write_series(folder: Path, slices: list[bytes]) -> Path:
    """Writes ``slices`` as ``slice<k>.dcm`` into ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(slices):
        (folder / f"slice{index}.dcm").write_bytes(data)
    return folder


def enhanced_bytes(folder: Path) -> bytes:
    """An enhanced (multi-frame) CT file of 3 frames of 5 x 6 pixels (fixed UIDs)."""
    hu = hu_volume((3, 5, 6))
    path = folder / "seed-enhanced.dcm"
    write_enhanced_ct(path, list(hu), series_positions()[:3], ORIENTATION, PIXEL_SPACING, SLOPE, INTERCEPT)
    data = path.read_bytes()
    path.unlink()
    return data


def check_volume(max_voxels: int):
    """A ``validate`` for ``check_loader``: a sane CT volume of at most ``max_voxels`` voxels (what a file of that
    size can hold), else ``AssertionError`` (silent garbage)."""

    def validate(volume: object) -> None:
        assert isinstance(volume, Volume), f"got {type(volume).__name__}, not a Volume"
        data = volume.data
        assert data.dim() == 3 and min(data.shape) >= 1, f"data shape {tuple(data.shape)} is not a 3D volume"
        assert data.dtype == torch.float32, f"data dtype {data.dtype}"
        assert data.numel() <= max_voxels, f"{data.numel()} voxels from a file that holds at most {max_voxels}"
        assert bool(torch.isfinite(data).all()), f"{int((~torch.isfinite(data)).sum())} non-finite voxels"
        affine = volume.affine.numpy()
        assert affine.shape == (4, 4) and np.all(np.isfinite(affine)), f"bad affine {affine}"
        determinant = np.linalg.det(affine[:3, :3])
        assert np.isfinite(determinant) and determinant != 0.0, f"singular affine {affine}"
        assert np.all(np.isfinite(np.linalg.inv(affine))), f"affine without a finite inverse {affine}"

    return validate

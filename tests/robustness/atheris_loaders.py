"""Coverage-guided fuzzing (atheris / libFuzzer) of every torchdrr file loader, under the same outcome rules as the
hypothesis fuzz tests (``fuzzing.check_loader``): a sane result, or a ``FileFormatError`` naming the file, in time.

Usage (from the repository root)::

    python tests/robustness/atheris_loaders.py LOADER [libFuzzer options, e.g. -runs=2000 -max_total_time=60]

LOADER is one of ``LOADERS``, or ``all`` (one process for every loader: an input's first byte picks it). Each input
is written to a temporary file with the loader's suffix (for ``dicom_series``, it replaces one slice of an otherwise
valid series folder) and loaded. The fuzzer starts from a small valid seed file built in code. A broken rule raises
``AssertionError``: libFuzzer then stops, prints the traceback and writes the input as ``crash-<sha1>`` (and, with
``TORCHDRR_FUZZ_SAVE=1``, into ``tests/robustness/corpus/<LOADER>/`` for the regression replay).
"""

from __future__ import annotations

import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make `tests` importable

# Only the parsers are instrumented for coverage (numpy and torch would make every run slow).
with atheris.instrument_imports(include=["torchdrr.io", "nrrd", "nibabel", "pydicom", "PIL"]):
    import nibabel  # noqa: F401
    import nrrd  # noqa: F401
    import PIL.Image
    import pydicom  # noqa: F401

    from torchdrr.io import read_xray
    from torchdrr.io.volume import Volume

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.io_fixtures import _base_dataset, _set_pixels  # noqa: E402
from tests.robustness.fuzzing import ATHERIS_LOADERS, check_loader, scratch_dir  # noqa: E402
from tests.robustness.volume_seeds import (  # noqa: E402
    NHDR_DATA_NAME,
    check_volume,
    dataset_bytes,
    enhanced_bytes,
    nhdr_pair,
    nifti_bytes,
    nrrd_bytes,
    series_bytes,
    write_series,
)

MAX_VOXELS = 4 * 6 * 5 * 4 + 4096  # libFuzzer may grow inputs (-max_len), so allow for a few kB of extra voxels


def _xray_image() -> np.ndarray:
    return (np.arange(48, dtype=np.uint16).reshape(6, 8) * 997) % 4096


def _png_seed() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(_xray_image()).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff_seed() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(_xray_image().astype(np.float32) / 7.0).save(buffer, format="TIFF")
    return buffer.getvalue()


def _xray_dicom_seed() -> bytes:
    ds = _base_dataset("1.2.840.10008.5.1.4.1.1.1.1", "1.2.826.0.1.3680043.8.498.78", modality="DX")
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.78.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImagerPixelSpacing = ["0.15", "0.15"]
    _set_pixels(ds, _xray_image())
    return dataset_bytes(ds)


def _npy_seed() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, _xray_image().astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def _check_xray(image: object) -> None:
    pixels = getattr(image, "pixels", None)
    assert isinstance(pixels, torch.Tensor), f"read_xray returned {type(image).__name__} without a pixel tensor"
    assert pixels.dim() == 2 and min(pixels.shape) >= 1, f"pixels of shape {tuple(pixels.shape)}"
    assert pixels.numel() <= 1 << 22, f"{pixels.numel()} pixels from a fuzz input of a few kB"
    assert bool(torch.isfinite(pixels).all()), "non-finite pixels"


def _load_volume(path: Path) -> Volume:
    return Volume.load(path, check=False)


SERIES = series_bytes()
NHDR_HEADER, NHDR_DATA = nhdr_pair()


def _file_target(kind: str, name: str, load: Callable[[Path], object], validate: Callable[[object], None]):
    suffix = name[name.index(".") :]

    def target(data: bytes) -> None:
        with scratch_dir() as folder:
            path = folder / name
            path.write_bytes(data)
            check_loader(kind, load, path, validate, crasher=(data, suffix))

    return target


def _nhdr_target(data: bytes) -> None:
    with scratch_dir() as folder:
        (folder / "volume.nhdr").write_bytes(data)
        (folder / NHDR_DATA_NAME).write_bytes(NHDR_DATA)
        check_loader("nhdr_header", _load_volume, folder / "volume.nhdr", check_volume(MAX_VOXELS), (data, ".nhdr"))


def _series_target(data: bytes) -> None:
    index = 1  # an inner slice: its loss or displacement must be noticed, not just shorten the volume
    slices = list(SERIES)
    slices[index] = data
    with scratch_dir() as folder:
        path = write_series(folder / "series", slices)
        check_loader("dicom_series", _load_volume, path, check_volume(MAX_VOXELS), crasher=(data, f".slice{index}.dcm"))


def _seeds() -> dict[str, tuple[bytes, Callable[[bytes], None]]]:
    volume = check_volume(MAX_VOXELS)
    with scratch_dir() as folder:
        enhanced = enhanced_bytes(folder)
    return {
        "nifti": (nifti_bytes(), _file_target("nifti", "volume.nii", _load_volume, volume)),
        "nifti_gz": (nifti_bytes(gz=True), _file_target("nifti_gz", "volume.nii.gz", _load_volume, volume)),
        "nrrd": (nrrd_bytes("raw"), _file_target("nrrd", "volume.nrrd", _load_volume, volume)),
        "nrrd_gzip": (nrrd_bytes("gzip"), _file_target("nrrd_gzip", "volume.nrrd", _load_volume, volume)),
        "nhdr_header": (NHDR_HEADER, _nhdr_target),
        "dicom_file": (enhanced, _file_target("dicom_file", "volume.dcm", _load_volume, volume)),
        "dicom_series": (SERIES[1], _series_target),
        "xray_png": (_png_seed(), _file_target("xray_png", "image.png", read_xray, _check_xray)),
        "xray_tiff": (_tiff_seed(), _file_target("xray_tiff", "image.tiff", read_xray, _check_xray)),
        "xray_dicom": (_xray_dicom_seed(), _file_target("xray_dicom", "image.dcm", read_xray, _check_xray)),
        "xray_npy": (_npy_seed(), _file_target("xray_npy", "image.npy", read_xray, _check_xray)),
    }


LOADERS = ATHERIS_LOADERS


def _all_loaders(seeds: dict[str, tuple[bytes, Callable[[bytes], None]]]) -> tuple[list[bytes], Callable]:
    """One target for every loader (a single process start, for CI): the input's first byte picks the loader."""
    targets = [seeds[name][1] for name in LOADERS]

    def target(data: bytes) -> None:
        if data:
            targets[data[0] % len(targets)](data[1:])

    return [bytes([index]) + seeds[name][0] for index, name in enumerate(LOADERS)], target


def main(argv: list[str]) -> None:
    """Fuzzes the loader named by ``argv[1]`` (or ``all`` of them); the remaining arguments go to libFuzzer."""
    if len(argv) < 2 or argv[1] not in (*LOADERS, "all"):
        sys.exit(f"usage: {argv[0]} {{{','.join(LOADERS)},all}} [libFuzzer options]")
    seeds = _seeds()
    if argv[1] == "all":
        seed_files, target = _all_loaders(seeds)
    else:
        seed_files, target = [seeds[argv[1]][0]], seeds[argv[1]][1]
    corpus = Path(tempfile.mkdtemp(prefix=f"torchdrr-atheris-{argv[1]}-"))
    for index, seed in enumerate(seed_files):
        (corpus / f"seed{index}").write_bytes(seed)
        target(seed)  # every seed itself must pass, or the findings would be meaningless
    atheris.Setup([argv[0], *argv[2:], str(corpus)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

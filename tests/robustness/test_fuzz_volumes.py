"""Fuzzing the CT volume loaders (NIfTI, NRRD attached/detached, DICOM file and series) through ``Volume.load``.

Each test damages a small valid file built in code (truncations, bit flips, overwrites, splices; see ``fuzzing.py``)
or writes a header that contradicts itself on purpose, then requires a sane volume or a ``VolumeFormatError`` naming
the file, within the hang limit. ``test_corpus_replays`` re-runs every crasher committed under ``corpus/<kind>/``.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.encaps
import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchdrr.io import Volume

from .fuzzing import FUZZ_SETTINGS, check_loader, corpus_cases, mutations, scratch_dir, watchdog
from .volume_seeds import (
    NHDR_DATA_NAME,
    SERIES_SLICES,
    check_volume,
    dataset_bytes,
    enhanced_bytes,
    nhdr_pair,
    nifti_bytes,
    nrrd_bytes,
    nrrd_header,
    nrrd_payload,
    oblique_affine,
    series_bytes,
    series_dataset,
    write_series,
)

# Seeds, built once per session (pure functions of the code, so derandomized runs are reproducible).
NIFTI = nifti_bytes()
NIFTI_GZ = nifti_bytes(gz=True)
NRRD_RAW = nrrd_bytes("raw")
NRRD_GZIP = nrrd_bytes("gzip")
NHDR_HEADER, NHDR_DATA = nhdr_pair()
SERIES = series_bytes()
with scratch_dir() as _folder:
    ENHANCED = enhanced_bytes(_folder)

# A damaged file can never yield more voxels than it has bytes (1 byte per voxel at least); compressed files are
# bounded by their seed's uncompressed size plus what a splice can duplicate.
MAX_VOXELS = 4 * 6 * 5 * 4 + 64


def load(path: Path) -> Volume:
    """The dispatcher under test, without the HU warnings (fuzzed values trip them constantly)."""
    return Volume.load(path, check=False)


def _check_file(kind: str, data: bytes, name: str) -> str:
    suffix = name[name.index(".") :]
    with scratch_dir() as folder:
        path = folder / name
        path.write_bytes(data)
        return check_loader(kind, load, path, check_volume(MAX_VOXELS), crasher=(data, suffix))


def _check_nhdr(kind: str, header: bytes, data: bytes) -> str:
    with scratch_dir() as folder:
        (folder / "volume.nhdr").write_bytes(header)
        (folder / NHDR_DATA_NAME).write_bytes(data)
        saved = (header, ".nhdr") if kind == "nhdr_header" else (data, ".raw")
        return check_loader(kind, load, folder / "volume.nhdr", check_volume(MAX_VOXELS), crasher=saved)


def _check_series(kind: str, index: int, damaged: bytes) -> str:
    slices = list(SERIES)
    slices[index] = damaged
    with scratch_dir() as folder:
        path = write_series(folder / "series", slices)
        return check_loader(kind, load, path, check_volume(MAX_VOXELS), crasher=(damaged, f".slice{index}.dcm"))


# ---------------------------------------------------------------------------------------------------------------
# Random damage
# ---------------------------------------------------------------------------------------------------------------
@FUZZ_SETTINGS
@given(data=mutations(NIFTI, header=352))
def test_fuzz_nifti(data: bytes) -> None:
    _check_file("nifti", data, "volume.nii")


@FUZZ_SETTINGS
@given(data=mutations(NIFTI_GZ))
def test_fuzz_nifti_gz(data: bytes) -> None:
    _check_file("nifti_gz", data, "volume.nii.gz")


@FUZZ_SETTINGS
@given(data=mutations(NIFTI, header=352))
def test_fuzz_nifti_gz_content(data: bytes) -> None:
    """Damage inside a well-formed gzip stream (random bytes in the compressed stream mostly break its CRC)."""
    _check_file("nifti_gz", gzip.compress(data, mtime=0), "volume.nii.gz")


@FUZZ_SETTINGS
@given(data=mutations(NRRD_RAW, header=len(nrrd_header())))
def test_fuzz_nrrd_raw(data: bytes) -> None:
    _check_file("nrrd", data, "volume.nrrd")


@FUZZ_SETTINGS
@given(data=mutations(NRRD_GZIP, header=len(nrrd_header({"encoding": "gzip"}))))
def test_fuzz_nrrd_gzip(data: bytes) -> None:
    _check_file("nrrd_gzip", data, "volume.nrrd")


@FUZZ_SETTINGS
@given(data=mutations(NHDR_HEADER))
def test_fuzz_nhdr_header(data: bytes) -> None:
    _check_nhdr("nhdr_header", data, NHDR_DATA)


@FUZZ_SETTINGS
@given(data=mutations(NHDR_DATA))
def test_fuzz_nhdr_data(data: bytes) -> None:
    _check_nhdr("nhdr_data", NHDR_HEADER, data)


@FUZZ_SETTINGS
@given(data=mutations(ENHANCED, header=1024))
def test_fuzz_dicom_file(data: bytes) -> None:
    _check_file("dicom_file", data, "volume.dcm")


@FUZZ_SETTINGS
@given(
    case=st.integers(0, SERIES_SLICES - 1).flatmap(lambda k: mutations(SERIES[k], header=1024).map(lambda b: (k, b)))
)
def test_fuzz_dicom_series(case: tuple[int, bytes]) -> None:
    _check_series("dicom_series", *case)


# ---------------------------------------------------------------------------------------------------------------
# Headers that contradict themselves on purpose
# ---------------------------------------------------------------------------------------------------------------
# NIfTI-1 header fields: (byte offset, struct format) and values that break them.
_NIFTI_FIELDS: dict[str, tuple[int, str, list]] = {
    "dim0": (40, "<h", [0, -1, 2, 4, 5, 8, 32767]),
    "dim1": (42, "<h", [0, -6, 1, 7, 255, 32767]),
    "dim2": (44, "<h", [0, -5, 1, 6, 32767]),
    "dim3": (46, "<h", [0, -4, 3, 5, 32767]),
    "dim4": (48, "<h", [0, -1, 2, 32767]),
    "datatype": (70, "<h", [0, 1, 2, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 2304, 999, -1]),
    "bitpix": (72, "<h", [0, 1, 8, 32, 64, 999]),
    "pixdim0": (76, "<f", [0.0, -1.0, 2.0, float("nan")]),
    "pixdim1": (80, "<f", [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")]),
    "pixdim3": (88, "<f", [0.0, -2.5, float("nan")]),
    "vox_offset": (108, "<f", [0.0, 1.0, 348.0, 351.5, 356.0, 400.0, 1e9, -352.0, float("nan"), float("inf")]),
    "scl_slope": (112, "<f", [0.0, -1.0, 1e38, 3e38, float("nan"), float("inf")]),
    "scl_inter": (116, "<f", [1e38, 3e38, float("nan"), float("-inf")]),
    "qform_code": (252, "<h", [0, 1, 5, -3]),
    "sform_code": (254, "<h", [0, 1, 7, -1]),
    "quatern_b": (256, "<f", [0.0, 1.0, 2.0, -7.0, float("nan")]),
    "quatern_c": (260, "<f", [1.0, float("inf")]),
    "qoffset_x": (268, "<f", [1e38, float("nan")]),
    "srow_x0": (280, "<f", [0.0, float("nan"), 1e38]),
    "srow_y1": (300, "<f", [0.0, float("inf")]),
    "srow_z2": (320, "<f", [0.0, -1e-30]),
    "srow_z3": (324, "<f", [float("nan")]),
    "sizeof_hdr": (0, "<i", [0, 540, 12345]),
    "magic": (344, "4s", [b"ni1\x00", b"n+2\x00", b"xxxx"]),
}


def _nifti_edits() -> st.SearchStrategy[list[tuple[str, object]]]:
    field = st.sampled_from(sorted(_NIFTI_FIELDS))
    edit = field.flatmap(lambda name: st.sampled_from(_NIFTI_FIELDS[name][2]).map(lambda value: (name, value)))
    return st.lists(edit, min_size=1, max_size=4)


def _edited_nifti(edits: list[tuple[str, object]]) -> bytes:
    data = bytearray(NIFTI)
    for name, value in edits:
        offset, fmt, _ = _NIFTI_FIELDS[name]
        struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@FUZZ_SETTINGS
@given(edits=_nifti_edits(), gz=st.booleans())
def test_nifti_header_nonsense(edits: list[tuple[str, object]], gz: bool) -> None:
    data = _edited_nifti(edits)
    if gz:
        _check_file("nifti_header", gzip.compress(data, mtime=0), "volume.nii.gz")
    else:
        _check_file("nifti_header", data, "volume.nii")


_NRRD_VALUES: dict[str, list[str | None]] = {
    "sizes": ["6 5", "6 5 4 2", "0 5 4", "-1 5 4", "6 5 40", "60 50 40", "4000000 4000000 4000000", "6 5 x", "", None],
    "dimension": ["2", "4", "0", "-3", "x", None],
    "type": ["int16", "uint8", "double", "int64", "block", "junk", None],
    "encoding": ["gzip", "ascii", "bzip2", "hex", "junk", None],
    "endian": ["big", "middle", None],
    "space": ["ras", "scanner-xyz", "3", "", None],
    "space directions": [
        "(1,0,0) (0,1,0)",
        "none (1,0,0) (0,1,0)",
        "(nan,0,0) (0,1,0) (0,0,1)",
        "(inf,0,0) (0,1,0) (0,0,1)",
        "(0,0,0) (0,0,0) (0,0,0)",
        "(1,0,0) (1,0,0) (0,0,1)",
        "(1,0) (0,1) (0,0)",
        "(1e308,0,0) (0,1e308,0) (0,0,1e308)",
        "junk",
        None,
    ],
    "space origin": ["(0,0)", "(nan,0,0)", "(1,2,3,4)", "junk", None],
    "byte skip": ["-1", "-2", "1", "100000", "x"],
    "line skip": ["1", "-1", "1000000"],
    "data file": ["missing.raw", "/", ".", "LIST"],
}


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.sampled_from(sorted(_NRRD_VALUES)).flatmap(
            lambda key: st.sampled_from(_NRRD_VALUES[key]).map(lambda value: (key, value))
        ),
        min_size=1,
        max_size=3,
    ),
    encoding=st.sampled_from(["raw", "gzip"]),
)
def test_nrrd_header_nonsense(edits: list[tuple[str, str | None]], encoding: str) -> None:
    fields: dict[str, str | None] = {"encoding": encoding}
    fields.update(edits)
    data = nrrd_header(fields) + nrrd_payload(encoding)
    _check_file("nrrd_header", data, "volume.nrrd")


_DICOM_VALUES: dict[str, list[object]] = {
    "Rows": [0, 1, 4, 6, 65535],
    "Columns": [0, 1, 5, 7, 65535],
    "BitsAllocated": [1, 8, 12, 32, 64],
    "BitsStored": [0, 8, 17],
    "HighBit": [0, 16],
    "PixelRepresentation": [1, 2],
    "SamplesPerPixel": [0, 3],
    "PhotometricInterpretation": ["RGB", "PALETTE COLOR", "JUNK"],
    "NumberOfFrames": ["0", "2", "1000000000"],
    "PixelSpacing": [["0", "1"], ["-1", "1"], ["nan", "1"], ["1"], ["1", "1", "1"], ["1e308", "1e308"], ["0.8", "0.9"]],
    "ImageOrientationPatient": [
        ["0", "0", "0", "0", "0", "0"],
        ["1", "0", "0", "1", "0", "0"],
        ["1", "0", "0", "0", "1", "0"],
        ["nan", "0", "0", "0", "1", "0"],
        ["1", "0", "0", "0", "1"],
        ["2", "0", "0", "0", "2", "0"],
    ],
    "ImagePositionPatient": [
        ["-40", "12", "300"],
        ["nan", "0", "0"],
        ["1e308", "0", "0"],
        ["0", "0"],
        ["-40", "12", "1e6"],
    ],
    "RescaleSlope": ["0", "1e300", "-1e38", "nan", "inf"],
    "RescaleIntercept": ["1e300", "nan", "-inf"],
    "SeriesInstanceUID": ["1.2.3"],
    "TransferSyntaxUID": ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.3.4"],
    "PixelData": [b"", b"\x00\x01", b"\x00" * 1000],
}


def _edited_slice(index: int, edits: list[tuple[str, object]]) -> bytes:
    ds = series_dataset(index)
    ds.preamble = b"\x00" * 128  # save_as without enforce_file_format writes a preamble only when one is set
    with pydicom.config.disable_value_validation():
        for name, value in edits:
            if name == "TransferSyntaxUID":
                ds.file_meta.TransferSyntaxUID = value
            elif value is None:
                if name in ds:
                    delattr(ds, name)
            else:
                setattr(ds, name, value)
        syntax = ds.file_meta.TransferSyntaxUID
        encapsulated = syntax != "1.2.3.4" and syntax.is_compressed
        if "PixelData" in ds:
            if encapsulated:  # pydicom writes compressed syntaxes only encapsulated (even-length fragments)
                pixels = bytes(ds.PixelData)
                ds.PixelData = pydicom.encaps.encapsulate([pixels + b"\x00" * (len(pixels) % 2) or b"\x00\x00"])
            ds["PixelData"].VR = "OB" if encapsulated else "OW"  # its VR depends on BitsAllocated: maybe removed
        buffer = io.BytesIO()
        # Not enforce_file_format: a nonsense TransferSyntaxUID must reach the file as written.
        ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


_DICOM_EDITS = st.lists(
    st.sampled_from(sorted(_DICOM_VALUES)).flatmap(
        lambda key: st.sampled_from([*_DICOM_VALUES[key], None]).map(lambda value: (key, value))
    ),
    min_size=1,
    max_size=3,
)


@FUZZ_SETTINGS
@given(index=st.integers(0, SERIES_SLICES - 1), edits=_DICOM_EDITS)
def test_dicom_series_header_nonsense(index: int, edits: list[tuple[str, object]]) -> None:
    """One slice of the series contradicts the others (or itself)."""
    if any(name == "TransferSyntaxUID" and value is None for name, value in edits):
        edits = [edit for edit in edits if edit[0] != "TransferSyntaxUID"] or [("Rows", 0)]
    _check_series("dicom_header", index, _edited_slice(index, edits))


def test_seeds_load() -> None:
    """The undamaged seeds are valid (otherwise every fuzz case would be a trivial rejection)."""
    validate = check_volume(MAX_VOXELS)
    with scratch_dir() as folder:
        for name, data in (("a.nii", NIFTI), ("b.nii.gz", NIFTI_GZ), ("c.nrrd", NRRD_RAW), ("d.nrrd", NRRD_GZIP)):
            (folder / name).write_bytes(data)
            validate(load(folder / name))
        (folder / "volume.nhdr").write_bytes(NHDR_HEADER)
        (folder / NHDR_DATA_NAME).write_bytes(NHDR_DATA)
        validate(load(folder / "volume.nhdr"))
        (folder / "e.dcm").write_bytes(ENHANCED)
        validate(load(folder / "e.dcm"))
        validate(load(write_series(folder / "series", SERIES)))
        assert load(folder / "series").shape == (6, 5, SERIES_SLICES)
        for index in range(SERIES_SLICES):  # the header editor itself keeps a valid slice valid
            slices = list(SERIES)
            slices[index] = _edited_slice(index, [("PixelSpacing", ["0.7", "0.9"])])
            validate(load(write_series(folder / f"edited{index}", slices)))
        assert dataset_bytes(series_dataset(0)) == SERIES[0]


# ---------------------------------------------------------------------------------------------------------------
# Committed crashers
# ---------------------------------------------------------------------------------------------------------------
_FILE_KINDS = {
    "nifti": "volume.nii",
    "nifti_gz": "volume.nii.gz",
    "nifti_header": None,  # suffix from the saved name (.nii or .nii.gz)
    "nrrd": "volume.nrrd",
    "nrrd_gzip": "volume.nrrd",
    "nrrd_header": "volume.nrrd",
    "dicom_file": "volume.dcm",
}
_CORPUS = [
    (kind, case)
    for kind in [*_FILE_KINDS, "nhdr_header", "nhdr_data", "dicom_series", "dicom_header"]
    for case in corpus_cases(kind)
]


@pytest.mark.parametrize(("kind", "case"), _CORPUS, ids=[f"{kind}/{case.name}" for kind, case in _CORPUS])
def test_corpus_replays(kind: str, case: Path) -> None:
    data = case.read_bytes()
    if kind in _FILE_KINDS:
        _check_file(kind, data, _FILE_KINDS[kind] or "volume" + case.name[case.name.index(".") :])
    elif kind == "nhdr_header":
        _check_nhdr(kind, data, NHDR_DATA)
    elif kind == "nhdr_data":
        _check_nhdr(kind, NHDR_HEADER, data)
    else:  # a damaged slice saved as <hash>.slice<k>.dcm, replayed among the seed series' other slices
        index = int(case.name.split(".slice")[1].split(".")[0])
        _check_series(kind, index, data)


def test_nan_voxels_are_refused_with_a_count() -> None:
    """The decision for non-finite voxels: refused, counted, with the nan_to_num way out named."""
    values = np.zeros((6, 5, 4), dtype="<f4")
    values[0, 0, :3] = np.nan
    values[1, 1, 1] = np.inf
    data = nrrd_header() + values.tobytes(order="F")
    with scratch_dir() as folder:
        path = folder / "nan.nrrd"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"nan\.nrrd.*4 of 120 voxels.*nan_to_num"):
            load(path)


def test_nifti2_dims_whose_product_overflows_int64_are_refused() -> None:
    """NIfTI-2 stores dims as int64: 2^21 per axis claims 2^63 voxels, which wraps negative in int64 arithmetic."""
    image = nib.Nifti2Image(np.zeros((6, 5, 4), dtype=np.int16), oblique_affine())
    data = bytearray(image.to_bytes())
    struct.pack_into("<3q", data, 16 + 8, *(1 << 21,) * 3)  # dim[1..3]; dim[0] (= 3) stays
    with scratch_dir() as folder:
        path = folder / "huge.nii"
        path.write_bytes(bytes(data))
        assert check_loader("nifti", load, path, check_volume(MAX_VOXELS)) == "rejected"
        with pytest.raises(ValueError, match=r"huge\.nii.*header claims 2097152 x 2097152 x 2097152 voxels"):
            load(path)


def test_series_slice_named_dcm_but_not_dicom_is_refused() -> None:
    """A damaged slice (here: its 'DICM' marker overwritten) used to be skipped as "not DICOM", silently making the
    volume one slice shorter; a file named ``*.dcm`` must be DICOM."""
    damaged = bytearray(SERIES[0])
    damaged[128:132] = b"XXXX"
    with scratch_dir() as folder:
        path = write_series(folder / "series", [bytes(damaged), *SERIES[1:]])
        with pytest.raises(ValueError, match=r"slice0\.dcm: has a DICOM file name but is not a DICOM file"):
            load(path)
        (path / "slice0.dcm").rename(path / "notes.txt")  # other files are still skipped
        assert load(path).shape == (6, 5, SERIES_SLICES - 1)


def test_resampling_absurd_slice_positions_is_refused_not_attempted() -> None:
    """One ImagePositionPatient 1 km off would make resample=True build ~700000 slices (a hang)."""
    slices = list(SERIES)
    slices[3] = _edited_slice(3, [("ImagePositionPatient", ["-40", "12", "1e6"])])
    with scratch_dir() as folder:
        path = write_series(folder / "series", slices)
        with watchdog(5.0), pytest.raises(ValueError, match=r"series: resampling 4 slices .* would make \d+ slices"):
            Volume.load(path, resample=True, check=False)

"""Fuzzing ``torchdrr.io.read_xray``: damaged and header-inconsistent PNG, TIFF, DICOM and ``.npy`` files must either
read as a sane image or raise :class:`~torchdrr.errors.XRayFormatError` naming the file (see ``fuzzing.py``).

Seeds are small valid files built here; ``mutations`` damages them at random, and the ``*_header`` tests write
headers whose fields (sizes, bit depths, frame counts, spacing strings, ...) disagree with the data on purpose.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import time
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests.test_xray_io import _levels, _write_dicom
from torchdrr.errors import XRayFormatError
from torchdrr.io.writers import encode_tiff
from torchdrr.io.xray import MAX_XRAY_PIXELS, XRayImage, read_xray

from .fuzzing import FUZZ_SETTINGS, check_loader, corpus_cases, mutations, scratch_dir

# Damaged files make Pillow and pydicom warn (skipped tags, invalid values): expected here, and noise.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ---------------------------------------------------------------------------------------------------------------------
# Seeds: small valid files, built once


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pillow_tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def _dicom(stored: np.ndarray, **attributes: object) -> bytes:
    with scratch_dir() as folder:
        return _write_dicom(folder / "seed.dcm", stored, **attributes).read_bytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@cache
def _seeds() -> dict[str, tuple[bytes, str, int | None]]:
    """name -> (file bytes, suffix, frame to read)."""
    rng = np.random.default_rng(0)
    return {
        "png8": (_png(_levels((8, 10), 255).astype(np.uint8)), ".png", None),
        "png16": (_png(_levels((7, 9), 65535, seed=1).astype(np.uint16)), ".png", None),
        "tiff16": (_pillow_tiff(_levels((6, 9), 65535, seed=2).astype(np.uint16)), ".tif", None),
        "tiff_float": (encode_tiff(rng.normal(size=(7, 8)).astype(np.float32)), ".tif", None),
        "tiff_pages": (encode_tiff(rng.normal(size=(3, 5, 6)).astype(np.float32)), ".tiff", 1),
        "dicom": (_dicom(_levels((8, 10), 4095, seed=3).astype(np.uint16)), ".dcm", None),
        "dicom_frames": (
            _dicom(np.stack([_levels((5, 6), 4095, seed=s) for s in range(3)]).astype(np.uint16), Modality="XA"),
            ".dcm",
            1,
        ),
        "npy_float": (_npy(rng.normal(size=(6, 7))), ".npy", None),
        "npy_uint16": (_npy(_levels((5, 8), 65535, seed=4).astype(np.uint16)), ".npy", None),
    }


# ---------------------------------------------------------------------------------------------------------------------
# What a successful read must look like


def _header_shape(path: Path, frame: int | None) -> tuple[int, int] | None:
    """The image size the file's header claims, read independently of ``read_xray`` (None: not parseable here)."""
    data = path.read_bytes()
    suffix = path.suffix
    if suffix == ".png" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if suffix == ".npy":
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = reader(handle)[0]
        return int(shape[0]), int(shape[1])
    if suffix == ".dcm":
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return int(dataset.Rows), int(dataset.Columns)
    if suffix in (".tif", ".tiff"):
        with Image.open(path) as picture:
            if frame:
                picture.seek(frame)
            width, height = picture.size
        return height, width
    return None


def _validate(path: Path, frame: int | None) -> Callable[[XRayImage], None]:
    def check(image: XRayImage) -> None:
        pixels = image.pixels
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.float64, f"pixels {pixels.dtype}"
        assert pixels.ndim == 2 and pixels.numel() > 0, f"shape {tuple(pixels.shape)}"
        assert bool(torch.isfinite(pixels).all()), "non-finite pixels"
        assert not bool((pixels == pixels.reshape(-1)[0]).all()), "constant pixels"
        header = _header_shape(path, frame)
        assert header is None or tuple(pixels.shape) == header, f"shape {tuple(pixels.shape)} but header {header}"
        spacing = image.pixel_spacing_mm
        assert spacing is None or (
            len(spacing) == 2 and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in spacing)
        ), f"spacing {spacing!r}"
        assert str(path) in image.source

    return check


def _fuzz_case(kind: str, data: bytes, suffix: str, frame: int | None) -> str:
    with scratch_dir() as folder:
        path = folder / f"xray{suffix}"
        path.write_bytes(data)
        return check_loader(
            kind, lambda p: read_xray(p, frame=frame), path, _validate(path, frame), crasher=(data, suffix)
        )


def _kind(suffix: str) -> str:
    return {".png": "xray_png", ".tif": "xray_tiff", ".tiff": "xray_tiff", ".dcm": "xray_dicom"}.get(suffix, "xray_npy")


# ---------------------------------------------------------------------------------------------------------------------
# Random damage to valid files


def _mutation_test(prefix: str) -> Callable[..., None]:
    names = sorted(name for name in _seeds() if name.startswith(prefix))

    @FUZZ_SETTINGS
    @given(data=st.data())
    def test(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(names), label="seed")
        seed, suffix, frame = _seeds()[name]
        damaged = data.draw(mutations(seed), label="damaged")
        _fuzz_case(_kind(suffix), damaged, suffix, frame)

    return test


test_png_mutations = _mutation_test("png")
test_tiff_mutations = _mutation_test("tiff")
test_dicom_mutations = _mutation_test("dicom")
test_npy_mutations = _mutation_test("npy")


def test_seeds_are_valid(tmp_path: Path) -> None:
    """The undamaged seeds read (otherwise the mutation tests would only ever see rejections)."""
    for name, (seed, suffix, frame) in _seeds().items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(seed)
        assert check_loader("xray_seed", lambda p, f=frame: read_xray(p, frame=f), path, _validate(path, frame)) == "ok"


def _some_wrong(fields: dict[str, tuple[Any, st.SearchStrategy[Any]]]) -> st.SearchStrategy[dict[str, Any]]:
    """Header fields: each ``name -> (correct value, strategy of odd values)``; up to three of them, chosen at random,
    drawn from their strategy and the others correct, so that each inconsistency is met alone as well as combined
    (all fields drawn at once would almost never leave a readable file)."""

    @st.composite
    def draw(draw_from: st.DrawFn) -> dict[str, Any]:
        odd = draw_from(st.sets(st.sampled_from(sorted(fields)), max_size=3))
        return {name: draw_from(strategy) if name in odd else correct for name, (correct, strategy) in fields.items()}

    return draw()


# ---------------------------------------------------------------------------------------------------------------------
# PNG: IHDR fields that disagree with the image data

_SIZES = st.one_of(st.integers(0, 20), st.sampled_from([2**15, 2**16, 10**5, 2**31 - 1, 2**31, 2**32 - 1]))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_ihdr(png: bytes, width: int, height: int, depth: int, colour: int, interlace: int = 0) -> bytes:
    """``png`` with its IHDR replaced (a correct CRC, so only the fields are wrong)."""
    body = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return png[:8] + _png_chunk(b"IHDR", body) + png[33:]


@FUZZ_SETTINGS
@given(
    values=_some_wrong(
        {
            "seed": ("png8", st.sampled_from(["png8", "png16"])),
            "width": (10, _SIZES),
            "height": (8, _SIZES),
            "depth": (8, st.sampled_from([0, 1, 2, 4, 8, 16, 3, 32, 255])),
            "colour": (0, st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7])),
            "interlace": (0, st.sampled_from([0, 0, 1, 2])),
        }
    )
)
def test_png_header(values: dict[str, Any]) -> None:
    _png_header_case(**values)


def _png_header_case(seed: str, width: int, height: int, depth: int, colour: int, interlace: int) -> None:
    _fuzz_case("xray_png", _with_ihdr(_seeds()[seed][0], width, height, depth, colour, interlace), ".png", None)


def test_png_claiming_a_huge_size_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_with_ihdr(_seeds()["png16"][0], 100_000, 90_000, 16, 0))
    started = time.perf_counter()
    with pytest.raises(XRayFormatError, match=r"claims 90000 x 100000 pixels") as caught:
        read_xray(path)
    assert caught.value.path == path and time.perf_counter() - started < 1.0
    # Below the pixel limit but far more than a 100-byte file can hold, even deflated.
    path.write_bytes(_with_ihdr(_seeds()["png8"][0], 4000, 4000, 8, 0))
    with pytest.raises(XRayFormatError, match=r"claims 4000 x 4000 pixels \(16000000 bytes.*truncated"):
        read_xray(path)


# ---------------------------------------------------------------------------------------------------------------------
# TIFF: tags that disagree with the data, written by a minimal little-endian TIFF writer

_SHORT, _LONG = 3, 4


def _tiff_bytes(tags: dict[int, tuple[int, list[int]]], data: bytes) -> bytes:
    """A one-page little-endian TIFF: the header, ``data`` at offset 8, then the IFD of ``tags`` (tag -> (type,
    values); values that do not fit in 4 bytes follow the IFD)."""
    ifd_offset = 8 + len(data) + (len(data) % 2)
    entries, extra = [], b""
    extra_offset = ifd_offset + 2 + 12 * len(tags) + 4
    for tag in sorted(tags):
        kind, values = tags[tag]
        packed = b"".join(struct.pack("<H" if kind == _SHORT else "<I", v) for v in values)
        if len(packed) <= 4:
            entries.append(struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0"))
        else:
            entries.append(struct.pack("<HHII", tag, kind, len(values), extra_offset + len(extra)))
            extra += packed
    ifd = struct.pack("<H", len(tags)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_offset) + data + b"\0" * (len(data) % 2) + ifd + extra


@FUZZ_SETTINGS
@given(
    values=_some_wrong(
        {
            "width": (5, _SIZES),
            "height": (4, _SIZES),
            "bits": ([16], st.sampled_from([[16], [8], [32], [64], [1], [12], [0], [16, 16], [8, 8, 8]])),
            "sample_format": (1, st.sampled_from([None, 1, 2, 3, 4, 7])),
            "samples": (1, st.sampled_from([None, 1, 2, 3, 4, 0])),
            "compression": (1, st.sampled_from([1, 1, 5, 8, 32773, 7, 99])),
            "photometric": (1, st.sampled_from([1, 0, 2, 3, 5, 32844])),
            "rows_per_strip": (4, st.one_of(st.none(), st.integers(0, 20), st.just(2**32 - 1))),
            "offset": (8, st.one_of(st.just(8), st.integers(0, 400), st.just(2**32 - 1))),
            "byte_count": (None, st.one_of(st.none(), st.integers(0, 400), st.just(2**32 - 1))),
            "data_length": (40, st.integers(0, 300)),
        }
    )
)
def test_tiff_header(values: dict[str, Any]) -> None:
    _tiff_header_case(**values)


def _tiff_header_case(
    width: int,
    height: int,
    bits: list[int],
    sample_format: int | None,
    samples: int | None,
    compression: int,
    photometric: int,
    rows_per_strip: int | None,
    offset: int,
    byte_count: int | None,
    data_length: int,
) -> None:
    data = np.random.default_rng(data_length).integers(0, 256, data_length, dtype=np.uint8).tobytes()
    tags: dict[int, tuple[int, list[int]]] = {
        256: (_LONG, [width]),
        257: (_LONG, [height]),
        258: (_SHORT, bits),
        259: (_SHORT, [compression]),
        262: (_SHORT, [photometric]),
        273: (_LONG, [offset]),
        279: (_LONG, [data_length if byte_count is None else byte_count]),
    }
    if sample_format is not None:
        tags[339] = (_SHORT, [sample_format])
    if samples is not None:
        tags[277] = (_SHORT, [samples])
    if rows_per_strip is not None:
        tags[278] = (_LONG, [rows_per_strip])
    _fuzz_case("xray_tiff", _tiff_bytes(tags, data), ".tif", None)


def test_tiff_writer_makes_readable_files(tmp_path: Path) -> None:
    """The hand-written TIFF of the header test reads when its tags are right, so the test exercises the tags."""
    values = _levels((4, 5), 65535, seed=5).astype("<u2")
    tags = {256: (_LONG, [5]), 257: (_LONG, [4]), 258: (_SHORT, [16]), 259: (_SHORT, [1]), 262: (_SHORT, [1])}
    tags |= {273: (_LONG, [8]), 279: (_LONG, [values.nbytes]), 277: (_SHORT, [1]), 278: (_LONG, [4])}
    path = tmp_path / "hand.tif"
    path.write_bytes(_tiff_bytes(tags, values.tobytes()))
    assert torch.equal(read_xray(path).pixels, torch.from_numpy(values.astype(np.float64)))


# ---------------------------------------------------------------------------------------------------------------------
# DICOM: size attributes that disagree with the pixel data, and malformed decimal strings


def _replace_string(data: bytes, group: int, element: int, text: bytes | None, vr: bytes = b"DS") -> bytes:
    """``data`` (an explicit-VR LE DICOM file) with the string element (group, element) of VR ``vr`` holding raw
    ``text``, padded to even length (None: as is). pydicom would refuse to write malformed values itself."""
    if text is None:
        return data
    start = data.index(struct.pack("<HH", group, element) + vr)
    (length,) = struct.unpack("<H", data[start + 6 : start + 8])
    text = text + b" " * (len(text) % 2)
    element_bytes = struct.pack("<HH", group, element) + vr + struct.pack("<H", len(text)) + text
    return data[:start] + element_bytes + data[start + 8 + length :]


_DS_TEXTS = st.one_of(
    st.none(),
    st.sampled_from(
        [b"0.2\\0.2", b"0.2", b"0.2\\0.2\\0.2", b"", b"abc\\1", b"nan\\1", b"inf\\0.3", b"-0.2\\0.2", b"0\\0.1",
         b"1e400\\1", b"1e-320\\1", b"0.2\\\\", b"\\", b" ", b"0x10\\1", b"1,5\\2", b"\x00\x00", b"\xff\xfe"]
    ),
    st.binary(max_size=12),
)  # fmt: skip


@FUZZ_SETTINGS
@given(
    values=_some_wrong(
        {
            "rows": (8, st.sampled_from([0, 1, 4, 5, 8, 10, 20, 65535])),
            "columns": (10, st.sampled_from([0, 1, 5, 6, 8, 10, 65535])),
            "frames": (
                None,
                st.sampled_from([None, b"1", b"2", b"3", b"0", b"-1", b"4", b"99999999", b"x", b"1.5", b""]),
            ),
            "bits_allocated": (16, st.sampled_from([16, 8, 32, 1, 12, 0, 64])),
            "bits_stored": (12, st.sampled_from([12, 16, 8, 0, 33])),
            "samples": (1, st.sampled_from([1, 3, 2, 0])),
            "representation": (0, st.sampled_from([0, 1, 2])),
            "photometric": (
                "MONOCHROME2",
                st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", ""]),
            ),
            "pixel_bytes": (160, st.sampled_from([0, 1, 60, 80, 90, 160, 161, 240, 480])),
            "imager_spacing": (None, _DS_TEXTS),
            "pixel_spacing": (None, _DS_TEXTS),
            "slope": (None, _DS_TEXTS),
            "frame": (None, st.sampled_from([None, 0, 1, 2])),
        }
    )
)
def test_dicom_header(values: dict[str, Any]) -> None:
    _dicom_header_case(**values)


def _dicom_header_case(
    rows: int,
    columns: int,
    frames: bytes | None,
    bits_allocated: int,
    bits_stored: int,
    samples: int,
    representation: int,
    photometric: str,
    pixel_bytes: int,
    imager_spacing: bytes | None,
    pixel_spacing: bytes | None,
    slope: bytes | None,
    frame: int | None,
) -> None:
    stored = _levels((1, pixel_bytes // 2), 4095, seed=pixel_bytes).astype(np.uint16) if pixel_bytes > 1 else None
    attributes: dict[str, object] = {
        "BitsAllocated": bits_allocated,
        "BitsStored": bits_stored,
        "HighBit": max(0, bits_stored - 1),
        "SamplesPerPixel": samples,
        "PixelRepresentation": representation,
        "PhotometricInterpretation": photometric or None,
    }
    if frames is not None:
        attributes["NumberOfFrames"] = 1  # a placeholder, for _replace_string
    data = _dicom(stored if stored is not None else np.zeros((1, 1), np.uint16), **attributes)
    data = _dicom_set_us(data, 0x0010, rows)
    data = _dicom_set_us(data, 0x0011, columns)
    if pixel_bytes <= 1:  # PixelData of 0 or 1 byte (the writer above cannot make them)
        start = data.index(b"\xe0\x7f\x10\x00O")  # OW, or OB for 8 bits
        data = data[:start + 8] + struct.pack("<I", pixel_bytes) + b"\x07" * pixel_bytes  # fmt: skip
    data = _replace_string(data, 0x0028, 0x0008, frames, b"IS")
    data = _replace_string(data, 0x0018, 0x1164, imager_spacing)
    data = _replace_string(data, 0x0028, 0x0030, pixel_spacing)
    data = _replace_string(data, 0x0028, 0x1053, slope)
    _fuzz_case("xray_dicom", data, ".dcm", frame)


def _dicom_set_us(data: bytes, element: int, value: int) -> bytes:
    """``data`` with the US element (0028, element) set to ``value``."""
    start = data.index(struct.pack("<HH", 0x0028, element) + b"US\x02\x00")
    return data[: start + 8] + struct.pack("<H", value) + data[start + 10 :]


def test_dicom_header_helpers_edit_what_they_say(tmp_path: Path) -> None:
    data = _dicom(_levels((4, 6), 4095).astype(np.uint16))
    data = _replace_string(_dicom_set_us(_dicom_set_us(data, 0x0010, 6), 0x0011, 4), 0x0028, 0x0030, b"0.7\\0.8")
    path = tmp_path / "edited.dcm"
    path.write_bytes(data)
    dataset = pydicom.dcmread(path)
    assert (dataset.Rows, dataset.Columns, [float(v) for v in dataset.PixelSpacing]) == (6, 4, [0.7, 0.8])
    assert read_xray(path).height == 6


def test_dicom_data_longer_than_the_header_says_is_refused(tmp_path: Path) -> None:
    """3 frames of pixel data under a header without NumberOfFrames: read as 1 frame it would silently drop data."""
    stored = np.stack([_levels((5, 6), 4095, seed=s) for s in range(3)]).astype(np.uint16)
    path = tmp_path / "frames.dcm"
    path.write_bytes(_dicom(stored, NumberOfFrames=None))
    with pytest.raises(XRayFormatError, match=r"180 bytes but PixelData holds 180|60 bytes but PixelData holds 180"):
        read_xray(path)


# ---------------------------------------------------------------------------------------------------------------------
# .npy: a header that disagrees with the data, odd dtypes, and pickles


def _npy_bytes(header: str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    text = header.encode("latin1")
    size_format = "<H" if version == (1, 0) else "<I"
    prefix = 10 if version == (1, 0) else 12
    text += b" " * ((-(prefix + len(text) + 1)) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(size_format, len(text)) + text + data


@FUZZ_SETTINGS
@given(
    values=_some_wrong(
        {
            "descr": (
                "<f8",
                st.sampled_from(
                    ["<f8", "<u2", "|u1", ">f4", "<f2", "|O", "<c8", "|b1", "<U3", "|V8", "<M8[s]", "zz", "<i8"]
                ),
            ),
            "fortran": (False, st.booleans()),
            "shape": (
                (6, 7),
                st.one_of(
                    st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple),
                    st.sampled_from([(-1, 5), (2**40, 2**40), (2**62, 3), (10**6, 10**6), (4, -4)]),
                ),
            ),
            "data_length": (336, st.sampled_from([0, 1, 7, 8, 63, 64, 96, 192, 384])),
            "version": ((1, 0), st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)])),
            "mangle": (None, st.sampled_from([None, "shape", "descr", "keys", "syntax", "deep"])),
        }
    )
)
def test_npy_header(values: dict[str, Any]) -> None:
    _npy_header_case(**values)


def _npy_header_case(
    descr: str,
    fortran: bool,
    shape: tuple[int, ...],
    data_length: int,
    version: tuple[int, int],
    mangle: str | None,
) -> None:
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    if mangle == "shape":
        header = header.replace(str(shape), "'x'")
    elif mangle == "descr":
        header = header.replace(repr(descr), "[('a', '<f8')]")
    elif mangle == "keys":
        header = header.replace("'fortran_order'", "'order'")
    elif mangle == "syntax":
        header = header[:-3]
    elif mangle == "deep":
        header = header.replace(str(shape), "(" * 150 + ")" * 150)
    data = np.random.default_rng(data_length).normal(size=data_length // 8 + 1).tobytes()[:data_length]
    _fuzz_case("xray_npy", _npy_bytes(header, data, version), ".npy", None)


def test_npy_huge_shape_in_a_tiny_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (5000, 5000), }", b"\0" * 64))
    with pytest.raises(XRayFormatError, match=r"claims shape \(5000, 5000\) of float64 \(200000000 bytes.*holds 64"):
        read_xray(path)
    side = int(math.isqrt(MAX_XRAY_PIXELS)) + 1
    path.write_bytes(_npy_bytes(f"{{'descr': '<u2', 'fortran_order': False, 'shape': ({side}, {side}), }}", b""))
    with pytest.raises(XRayFormatError, match=rf"claims {side} x {side} pixels"):
        read_xray(path)


class _Marker:
    """Unpickling this touches a file: the proof that a loader unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_npy_pickle_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(np.array([[_Marker(marker), 1.0], [2.0, 3.0]], dtype=object), protocol=2)
    path = tmp_path / "pickle.npy"
    path.write_bytes(_npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (2, 2), }", payload))
    with pytest.raises(XRayFormatError, match="Python objects"):
        read_xray(path)
    path.write_bytes(payload)  # a bare pickle named .npy
    with pytest.raises(XRayFormatError, match=r"not a readable \.npy"):
        read_xray(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The crashers found so far, replayed


@pytest.mark.parametrize(
    "case",
    [p for kind in ("xray_png", "xray_tiff", "xray_dicom", "xray_npy") for p in corpus_cases(kind)],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_corpus(case: Path) -> None:
    for frame in (None, 1):  # a crasher may have come from a single-image seed or a multi-frame one
        with scratch_dir() as folder:
            path = folder / case.name
            path.write_bytes(case.read_bytes())
            check_loader(case.parent.name, lambda p, f=frame: read_xray(p, frame=f), path, _validate(path, frame))

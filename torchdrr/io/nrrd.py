"""NRRD reading (pynrrd): data in the file's axis order plus a voxel -> world RAS+ mm affine.

The header is read and checked first (3D, known type and encoding, sizes the file can hold, an existing data file),
so that a damaged header is refused with a precise message before pynrrd allocates or decompresses anything.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from .errors import VolumeFormatError
from .volume import check_claimed_size, require_finite

__all__ = ["read_nrrd"]

# Sign flips taking each supported NRRD 'space' to RAS+ (+x to the patient's right, +y anterior, +z superior).
_SPACE_TO_RAS_SIGNS: dict[str, tuple[float, float, float]] = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}

# Bytes per value of every NRRD scalar type name (the NRRD format spec's synonyms); 'block' is not a CT.
_TYPE_BYTES: dict[str, int] = {}
for _names, _size in (
    (("signed char", "int8", "int8_t"), 1),
    (("uchar", "unsigned char", "uint8", "uint8_t"), 1),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), 2),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    (("int", "signed int", "int32", "int32_t"), 4),
    (("uint", "unsigned int", "uint32", "uint32_t"), 4),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"), 8),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), 8),
    (("float",), 4),
    (("double",), 8),
):
    _TYPE_BYTES.update(dict.fromkeys(_names, _size))

# NRRD encoding names -> the check_claimed_size category of their size bound.
_ENCODINGS = {
    "raw": "raw",
    "gzip": "gzip",
    "gz": "gzip",
    "bzip2": "bzip2",
    "bz2": "bzip2",
    "ascii": "ascii",
    "text": "ascii",
    "txt": "ascii",
}


def _checked_header(header: dict, path: Path, header_bytes: int) -> tuple[Path, int]:
    """Checks the fields that decide what pynrrd would allocate; returns the data file and its usable byte count."""
    dimension, sizes = header.get("dimension"), header.get("sizes")
    if sizes is None or dimension is None:
        raise VolumeFormatError("NRRD header lacks the required 'dimension' or 'sizes' field", path)
    sizes = [int(n) for n in np.asarray(sizes).reshape(-1)]
    if int(dimension) != 3 or len(sizes) != 3:
        raise VolumeFormatError(
            f"must hold a 3D scalar volume, but its header has dimension {dimension} and sizes {sizes}", path
        )
    if min(sizes) < 1:
        raise VolumeFormatError(f"NRRD 'sizes' must all be at least 1, got {sizes}", path)
    type_name = str(header.get("type", "")).strip().lower()
    if type_name not in _TYPE_BYTES:
        raise VolumeFormatError(f"NRRD 'type' {header.get('type')!r} is not a supported scalar type", path)
    encoding = str(header.get("encoding", "")).strip().lower()
    if encoding not in _ENCODINGS:
        raise VolumeFormatError(
            f"NRRD 'encoding' {header.get('encoding')!r} is not supported; expected one of {sorted(_ENCODINGS)}", path
        )
    data_name = header.get("data file", header.get("datafile"))
    if data_name is None:
        data_path, available, where = path, path.stat().st_size - header_bytes, "follow the header"
    else:
        if not isinstance(data_name, str) or data_name.startswith("LIST") or "%" in data_name:
            raise VolumeFormatError(f"NRRD 'data file' {data_name!r}: only a single data file is supported", path)
        data_path = Path(data_name) if Path(data_name).is_absolute() else path.parent / data_name
        if not data_path.is_file():
            raise VolumeFormatError(f"NRRD 'data file' names {data_path}, which is not an existing file", path)
        available, where = data_path.stat().st_size, f"are in data file {data_path.name}"
    for field in ("byte skip", "byteskip", "line skip", "lineskip"):
        if field in header:
            skip = int(header[field])
            if skip < (-1 if "byte" in field else 0) or skip > available:
                raise VolumeFormatError(f"NRRD '{field}' {skip} is outside -1 .. {available} (the data's bytes)", path)
            if "byte" in field and skip > 0:
                available -= skip
    count = math.prod(sizes)
    what = f"sizes {' x '.join(map(str, sizes))} of {type_name} ({encoding})"
    category = _ENCODINGS[encoding]
    if category == "ascii":  # every value takes one character at least
        check_claimed_size(count, available, "raw", path, what, where)
    else:
        check_claimed_size(count * _TYPE_BYTES[type_name], available, category, path, what, where)
    return data_path, available


def _geometry(header: dict, path: Path) -> np.ndarray:
    """The RAS+ voxel -> world affine from ``space``, ``space directions`` and ``space origin``."""
    space = str(header.get("space", "")).strip().lower()
    if not space:
        raise VolumeFormatError("NRRD header has no 'space' field, so its patient orientation is unknown", path)
    if space not in _SPACE_TO_RAS_SIGNS:
        supported = sorted(name for name in _SPACE_TO_RAS_SIGNS if "-" in name)
        raise VolumeFormatError(
            f"uses NRRD space {space!r}, which is not a patient space; supported: {supported}", path
        )
    if "space directions" not in header or "space origin" not in header:
        raise VolumeFormatError(
            "NRRD header lacks 'space directions' or 'space origin', so voxel positions are unknown", path
        )
    try:
        directions = np.asarray(header["space directions"], dtype=np.float64)
        origin = np.asarray(header["space origin"], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise VolumeFormatError(f"NRRD 'space directions'/'space origin' are not numeric: {error}", path) from error
    if directions.shape != (3, 3) or origin.shape != (3,):
        raise VolumeFormatError(
            f"NRRD 'space directions' has shape {directions.shape} and 'space origin' shape {origin.shape}; "
            "expected (3, 3) and (3,)",
            path,
        )
    if not (np.all(np.isfinite(directions)) and np.all(np.isfinite(origin))):
        raise VolumeFormatError(
            f"NRRD 'space directions' {directions.tolist()} or 'space origin' {origin.tolist()} has non-finite "
            "entries (a 'none' axis is not a spatial axis)",
            path,
        )
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # NRRD lists one direction vector per axis; the affine wants them as columns
    affine[:3, 3] = origin
    signs = np.diag(list(_SPACE_TO_RAS_SIGNS[space]) + [1.0])
    return signs @ affine


def read_nrrd(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a 3D NRRD (``.nrrd`` or detached ``.nhdr``) volume.

    Args:
        path: the file.

    Returns:
        ``data`` ``[I, J, K]`` float32 values as stored (NRRD's axis order: the first axis varies fastest in the file)
        and ``affine`` ``[4, 4]`` float64, voxel index -> world mm in RAS+, built from ``space directions`` (one
        column per axis) and ``space origin``, converted from the file's ``space``.

    Raises:
        VolumeFormatError: unreadable file, not 3D, sizes the file cannot hold, a missing data file, NaN/Inf values,
            or a missing/unsupported ``space`` or geometry field. The message names the file.
    """
    import nrrd  # imported here so NIfTI/DICOM users do not need pynrrd

    path = Path(path)
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pynrrd warns about odd fields it then ignores; errors come below
            header = nrrd.read_header(handle)
            header_bytes = handle.tell()
    except Exception as error:  # pynrrd raises NRRDError, ValueError, IndexError, ... for damaged headers
        raise VolumeFormatError(f"could not read the NRRD header: {type(error).__name__}: {error}", path) from error
    try:
        _checked_header(header, path, header_bytes)
    except VolumeFormatError:
        raise
    except (TypeError, ValueError, OverflowError) as error:  # a field of the wrong kind (e.g. sizes as text)
        raise VolumeFormatError(f"NRRD header field of the wrong kind: {error}", path) from error
    affine = _geometry(header, path)
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nrrd.read_header(handle)
            data = nrrd.read_data(header, handle, str(path))
    except Exception as error:  # short or corrupt data: pynrrd raises NRRDError, ValueError, zlib.error, OSError...
        raise VolumeFormatError(f"could not read the NRRD data: {type(error).__name__}: {error}", path) from error
    if data.shape != tuple(int(n) for n in header["sizes"]):
        raise VolumeFormatError(f"NRRD data has shape {data.shape}, but 'sizes' says {header['sizes'].tolist()}", path)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range becomes inf, refused below
        values = np.asarray(data, dtype=np.float32)
    return require_finite(values, path), affine

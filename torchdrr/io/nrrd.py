"""NRRD reading (pynrrd): data in the file's axis order plus a voxel -> world RAS+ mm affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import VolumeFormatError

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


def read_nrrd(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a 3D NRRD (``.nrrd`` or detached ``.nhdr``) volume.

    Args:
        path: the file.

    Returns:
        ``data`` ``[I, J, K]`` float32 values as stored (NRRD's axis order: the first axis varies fastest in the file)
        and ``affine`` ``[4, 4]`` float64, voxel index -> world mm in RAS+, built from ``space directions`` (one
        column per axis) and ``space origin``, converted from the file's ``space``.

    Raises:
        VolumeFormatError: unreadable file, not 3D, or a missing/unsupported ``space`` or geometry field.
    """
    import nrrd  # imported here so NIfTI/DICOM users do not need pynrrd

    path = Path(path)
    try:
        data, header = nrrd.read(str(path))
    except Exception as error:  # pynrrd raises NRRDError, ValueError, OSError, ... for damaged files
        raise VolumeFormatError(f"could not read {path} as NRRD: {error}") from error
    if data.ndim != 3:
        raise VolumeFormatError(f"{path} must hold a 3D scalar volume, got data of shape {data.shape}")
    space = str(header.get("space", "")).strip().lower()
    if not space:
        raise VolumeFormatError(f"{path} has no 'space' field, so its patient orientation is unknown")
    if space not in _SPACE_TO_RAS_SIGNS:
        supported = sorted(name for name in _SPACE_TO_RAS_SIGNS if "-" in name)
        raise VolumeFormatError(
            f"{path} uses NRRD space {space!r}, which is not a patient space; supported: {supported}"
        )
    if "space directions" not in header or "space origin" not in header:
        raise VolumeFormatError(f"{path} lacks 'space directions' or 'space origin', so voxel positions are unknown")
    directions = np.asarray(header["space directions"], dtype=np.float64)
    origin = np.asarray(header["space origin"], dtype=np.float64)
    if directions.shape != (3, 3) or origin.shape != (3,):
        raise VolumeFormatError(
            f"{path} has 'space directions' of shape {directions.shape} and 'space origin' of shape {origin.shape}; "
            "expected (3, 3) and (3,)"
        )
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # NRRD lists one direction vector per axis; the affine wants them as columns
    affine[:3, 3] = origin
    signs = np.diag(list(_SPACE_TO_RAS_SIGNS[space]) + [1.0])
    return np.asarray(data, dtype=np.float32), signs @ affine

"""DICOM CT reading (pydicom): classic single-frame series in a folder, and enhanced (multi-frame) CT files.

Both paths collect one :class:`_Slice` per 2D image and assemble them the same way: slices are ordered by their position
along the slice normal (never by file name or InstanceNumber), rescaled to HU, and stacked so that
``data[i, j, k]`` is column ``i``, row ``j`` of the ``k``-th slice in spatial order. The LPS+ DICOM geometry is turned
into a RAS+ affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import VolumeFormatError
from .volume import MAX_STORED_BYTES, require_finite

__all__ = ["read_dicom_file", "read_dicom_series"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORIENTATION_TOLERANCE = 1e-4  # direction cosines are stored with ~6 digits
_SPACING_RELATIVE_TOLERANCE = 0.01
_SPACING_ABSOLUTE_TOLERANCE_MM = 0.01
_AIR_HU = -1000.0  # value given to resampled voxels that fall outside the acquired slices in-plane (tilt)
# Compressed pixel data (JPEG, RLE, ...) cannot be bounded like deflate; a header may announce at most this many times
# the file's size in decoded pixels before the decoder is asked to allocate them.
_MAX_DECODED_PER_FILE_BYTE = 1 << 16
# Resampling an irregular series makes at most this many times as many slices as were acquired: more means a damaged
# ImagePositionPatient (a 1e6 mm jump at 1 mm steps would otherwise ask for a million slices).
_MAX_RESAMPLED_SLICE_FACTOR = 16
# File names that claim to be DICOM: a folder's other files may be skipped when they are not DICOM, these may not.
_DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class _Slice:
    """One 2D image: ``hu`` ``[rows, columns]``, ``position`` (LPS mm of the first pixel's centre), ``orientation``
    (row then column direction cosines, LPS), ``pixel_spacing`` (row spacing, column spacing, mm)."""

    hu: np.ndarray
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    source: str


def _floats(value: object, count: int, what: str, source: str) -> np.ndarray:
    """Parses a multi-valued DICOM attribute into ``count`` finite floats, or raises naming the attribute."""
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as error:
        raise VolumeFormatError(f"{source}: {what} is missing or not numeric ({value!r})") from error
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise VolumeFormatError(f"{source}: {what} must hold {count} finite numbers, got {value!r}")
    return array


def _pixels(dataset: object, source: str, path: str) -> np.ndarray:
    """Decoded stored pixel values (pydicom honours PixelRepresentation, so unsigned data stays unsigned).

    Before decoding, the size the header announces (Rows x Columns x frames x samples x bits) is checked against the
    file, so a damaged header cannot make a decoder allocate gigabytes.
    """
    ds = dataset
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)  # type: ignore[attr-defined]
        frames = int(ds.get("NumberOfFrames", 1) or 1)  # type: ignore[attr-defined]
        samples = int(ds.get("SamplesPerPixel", 1))  # type: ignore[attr-defined]
        bits = int(ds.BitsAllocated)  # type: ignore[attr-defined]
    except Exception as error:  # missing or non-numeric image pixel attributes
        raise VolumeFormatError(
            f"{source}: Rows, Columns, BitsAllocated, SamplesPerPixel or NumberOfFrames missing or not a number "
            f"({type(error).__name__}: {error})",
            path,
        ) from error
    if min(rows, columns, frames, samples, bits) < 1:
        raise VolumeFormatError(
            f"{source}: Rows {rows}, Columns {columns}, NumberOfFrames {frames}, SamplesPerPixel {samples} and "
            f"BitsAllocated {bits} must all be at least 1",
            path,
        )
    claimed = rows * columns * frames * samples * bits // 8
    file_bytes = Path(path).stat().st_size if Path(path).is_file() else 0
    if claimed > min(MAX_STORED_BYTES, _MAX_DECODED_PER_FILE_BYTE * max(file_bytes, 1)):
        raise VolumeFormatError(
            f"{source}: header claims {frames} frame(s) of {rows} x {columns} x {samples} samples at {bits} bits "
            f"= {claimed} bytes, impossible for a file of {file_bytes} bytes (damaged header?)",
            path,
        )
    try:
        return np.asarray(ds.pixel_array)  # type: ignore[attr-defined]
    except Exception as error:  # pydicom raises many types for truncated or undecodable pixel data
        raise VolumeFormatError(
            f"{source}: could not decode the pixel data: {type(error).__name__}: {error}", path
        ) from error


def _rescale(pixels: np.ndarray, slope: object, intercept: object, source: str) -> np.ndarray:
    """Stored values -> HU as float32 (float64 arithmetic, so uint16 data plus a negative intercept cannot wrap).

    Values beyond float32's range become inf and are refused (with a count) by ``require_finite`` afterwards.
    """
    try:
        slope_value = 1.0 if slope is None else float(slope)  # type: ignore[arg-type]
        intercept_value = 0.0 if intercept is None else float(intercept)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise VolumeFormatError(
            f"{source}: RescaleSlope {slope!r} / RescaleIntercept {intercept!r} are not numbers"
        ) from error
    if not (np.isfinite(slope_value) and np.isfinite(intercept_value)):
        raise VolumeFormatError(
            f"{source}: RescaleSlope {slope_value} / RescaleIntercept {intercept_value} are not finite"
        )
    if pixels.dtype.kind not in "iub" or pixels.dtype.itemsize > 4:
        raise VolumeFormatError(f"{source}: pixel data of type {pixels.dtype} is not CT stored values (integers)")
    with np.errstate(over="ignore", invalid="ignore"):
        return (pixels.astype(np.float64) * slope_value + intercept_value).astype(np.float32)


def _single_frame_slice(dataset: object, source: str) -> _Slice:
    """A classic CT Image Storage dataset -> one slice."""
    ds = dataset
    pixels = _pixels(ds, source, source)
    if pixels.ndim != 2:
        raise VolumeFormatError(f"{source}: expected a single-frame grayscale image, got pixel array {pixels.shape}")
    return _Slice(
        hu=_rescale(pixels, ds.get("RescaleSlope"), ds.get("RescaleIntercept"), source),  # type: ignore[attr-defined]
        position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", source),  # type: ignore[attr-defined]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", source),  # type: ignore[attr-defined]
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", source),  # type: ignore[attr-defined]
        source=source,
    )


def _functional_item(frame_group: object, shared_group: object, sequence: str) -> object | None:
    """The first item of a functional group macro, per-frame first (it overrides the shared one)."""
    for group in (frame_group, shared_group):
        if group is not None and sequence in group and len(group[sequence].value) > 0:  # type: ignore[operator,index]
            return group[sequence].value[0]  # type: ignore[index]
    return None


def _enhanced_slices(dataset: object, source: str) -> list[_Slice]:
    """An enhanced (multi-frame) CT dataset -> one slice per frame, geometry from the functional groups."""
    ds = dataset
    frames = _pixels(ds, source, source)
    frame_count = int(ds.get("NumberOfFrames", 1) or 1)  # type: ignore[attr-defined]
    if frames.ndim == 2 and frame_count == 1:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[0] != frame_count:
        raise VolumeFormatError(f"{source}: pixel array {frames.shape} does not match NumberOfFrames={frame_count}")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")  # type: ignore[attr-defined]
    if per_frame is None or len(per_frame) != frame_count:
        raise VolumeFormatError(f"{source}: PerFrameFunctionalGroupsSequence must have one item per frame")
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")  # type: ignore[attr-defined]
    shared = shared_sequence[0] if shared_sequence else None
    slices = []
    for index, frame_group in enumerate(per_frame):
        frame_source = f"{source} frame {index + 1}"
        position = _functional_item(frame_group, shared, "PlanePositionSequence")
        orientation = _functional_item(frame_group, shared, "PlaneOrientationSequence")
        measures = _functional_item(frame_group, shared, "PixelMeasuresSequence")
        rescale = _functional_item(frame_group, shared, "PixelValueTransformationSequence")
        if position is None or orientation is None or measures is None:
            raise VolumeFormatError(
                f"{frame_source}: missing PlanePositionSequence, PlaneOrientationSequence or PixelMeasuresSequence"
            )
        slope = rescale.get("RescaleSlope") if rescale is not None else ds.get("RescaleSlope")  # type: ignore[attr-defined]
        intercept = rescale.get("RescaleIntercept") if rescale is not None else ds.get("RescaleIntercept")  # type: ignore[attr-defined]
        slices.append(
            _Slice(
                hu=_rescale(frames[index], slope, intercept, frame_source),
                position=_floats(position.get("ImagePositionPatient"), 3, "ImagePositionPatient", frame_source),  # type: ignore[attr-defined]
                orientation=_floats(
                    orientation.get("ImageOrientationPatient"),
                    6,
                    "ImageOrientationPatient",
                    frame_source,  # type: ignore[attr-defined]
                ),
                pixel_spacing=_floats(measures.get("PixelSpacing"), 2, "PixelSpacing", frame_source),  # type: ignore[attr-defined]
                source=frame_source,
            )
        )
    return slices


def _is_enhanced(dataset: object) -> bool:
    return "PerFrameFunctionalGroupsSequence" in dataset  # type: ignore[operator]


def _dataset_slices(dataset: object, source: str) -> list[_Slice]:
    """One dataset -> its slices; any failure while reading its attributes becomes a VolumeFormatError naming the file.

    pydicom parses element values lazily, so a damaged element (wrong VR, odd length, bad text) raises only when it is
    first read, with whatever exception its converter throws.
    """
    try:
        return _enhanced_slices(dataset, source) if _is_enhanced(dataset) else [_single_frame_slice(dataset, source)]
    except VolumeFormatError as error:
        if error.path is None:
            raise VolumeFormatError(str(error), source) from error
        raise
    except Exception as error:  # noqa: BLE001 - lazily parsed attributes fail with any exception type
        raise VolumeFormatError(f"damaged DICOM attributes: {type(error).__name__}: {error}", source) from error


def _shift_slice(hu: np.ndarray, shift_columns: float, shift_rows: float) -> torch.Tensor:
    """Bilinear sample of ``hu`` ``[rows, columns]`` at (column + shift_columns, row + shift_rows); outside -> air."""
    rows, columns = hu.shape
    image = torch.from_numpy(hu.astype(np.float64) - _AIR_HU)[None, None]  # zero padding then means air
    column_coords = torch.arange(columns, dtype=torch.float64) + shift_columns
    row_coords = torch.arange(rows, dtype=torch.float64) + shift_rows
    # align_corners=True maps -1/+1 to the first/last pixel centres.
    x = 2.0 * column_coords / max(columns - 1, 1) - 1.0
    y = 2.0 * row_coords / max(rows - 1, 1) - 1.0
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij")[::-1], dim=-1)[None]
    sampled = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[0, 0] + _AIR_HU


def _assemble(slices: list[_Slice], source: str, resample: bool) -> tuple[np.ndarray, np.ndarray]:
    """Orders, checks and stacks slices; returns ``data`` ``[I, J, K]`` float32 HU and a RAS+ ``affine`` ``[4, 4]``."""
    if not slices:
        raise VolumeFormatError("no image frames", source)
    first = slices[0]
    for other in slices[1:]:
        if not np.allclose(other.orientation, first.orientation, atol=_ORIENTATION_TOLERANCE):
            raise VolumeFormatError(
                f"{source}: slices differ in ImageOrientationPatient: {other.orientation.tolist()} in "
                f"{other.source}, {first.orientation.tolist()} in {first.source}"
            )
        if other.hu.shape != first.hu.shape:
            raise VolumeFormatError(
                f"{source}: slices differ in Rows x Columns: {other.hu.shape} in {other.source}, "
                f"{first.hu.shape} in {first.source}"
            )
        if not np.allclose(other.pixel_spacing, first.pixel_spacing, rtol=1e-5):
            raise VolumeFormatError(
                f"{source}: slices differ in PixelSpacing: {other.pixel_spacing.tolist()} in {other.source}, "
                f"{first.pixel_spacing.tolist()} in {first.source}"
            )
    row_direction, column_direction = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_direction, column_direction)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise VolumeFormatError(f"{source}: ImageOrientationPatient {first.orientation} is not two orthonormal vectors")
    normal /= np.linalg.norm(normal)
    with np.errstate(over="ignore", invalid="ignore"):
        distances = np.array([s.position @ normal for s in slices])
    if not np.all(np.isfinite(distances)) or np.max(np.abs(distances)) > 1e7:
        raise VolumeFormatError(
            f"{source}: ImagePositionPatient values are absurd (beyond 10 km from the origin along the slice normal)"
        )
    order = np.argsort(distances, kind="stable")
    slices = [slices[k] for k in order]
    distances = distances[order]
    row_spacing, column_spacing = first.pixel_spacing  # DICOM PixelSpacing = [between rows, between columns]
    if row_spacing <= 0 or column_spacing <= 0:
        raise VolumeFormatError(f"{source}: PixelSpacing must be positive, got {first.pixel_spacing}")
    in_plane = np.column_stack([row_direction * column_spacing, column_direction * row_spacing])  # [3, 2] LPS mm

    if len(slices) == 1:
        raise VolumeFormatError(f"{source}: only one slice, so the slice spacing is unknown")
    steps = np.diff(distances)
    if np.any(steps < _SPACING_ABSOLUTE_TOLERANCE_MM):
        raise VolumeFormatError(f"{source}: two or more slices share a position along the slice normal")
    step = float(np.median(steps))
    tolerance = max(_SPACING_RELATIVE_TOLERANCE * step, _SPACING_ABSOLUTE_TOLERANCE_MM)
    offsets = np.stack([s.position - slices[0].position for s in slices])  # [K, 3]
    lateral = offsets - np.outer(offsets @ normal, normal)  # in-plane drift: non-zero means gantry tilt
    problems = []
    if np.max(np.abs(steps - step)) > tolerance:
        problems.append(
            f"unequal slice spacing (steps from {steps.min():.4g} to {steps.max():.4g} mm: missing slices?)"
        )
    if np.max(np.linalg.norm(lateral, axis=1)) > _SPACING_ABSOLUTE_TOLERANCE_MM:
        problems.append("slice positions drift off the slice normal (gantry tilt)")
    if problems and not resample:
        raise VolumeFormatError(f"{source}: {'; '.join(problems)}. Pass resample=True to resample onto a regular grid")

    affine = np.eye(4)
    affine[:3, :2] = in_plane
    affine[:3, 3] = slices[0].position
    if not problems:
        stacked = np.stack([s.hu.T for s in slices], axis=-1)  # hu is [row, column]; data wants [column, row, slice]
        # The mean step vector (not just normal * step) keeps positions exact for any residual drift within tolerance.
        affine[:3, 2] = offsets[-1] / (len(slices) - 1)
        return require_finite(np.ascontiguousarray(stacked, dtype=np.float32), source), _LPS_TO_RAS @ affine

    # Regular grid: the first slice's in-plane grid, repeated every `step` mm along the normal up to the last slice.
    # Each target slice linearly interpolates the two acquired slices that bracket it along the normal, each sampled
    # (bilinearly, air outside) at the in-plane points of the target grid, which undoes the tilt's in-plane drift.
    target_count = int(np.floor((distances[-1] - distances[0]) / step + 1e-6)) + 1
    if target_count > _MAX_RESAMPLED_SLICE_FACTOR * len(slices):
        raise VolumeFormatError(
            f"{source}: resampling {len(slices)} slices at their median step {step:.4g} mm would make {target_count} "
            "slices; the slice positions are too irregular (damaged ImagePositionPatient?)"
        )
    pseudo_inverse = np.linalg.pinv(in_plane)  # [2, 3]: LPS offset -> (column, row) index offset
    target_slices = []
    for target in range(target_count):
        target_distance = distances[0] + target * step
        upper = int(np.clip(np.searchsorted(distances, target_distance), 1, len(slices) - 1))
        lower = upper - 1
        weight = (target_distance - distances[lower]) / (distances[upper] - distances[lower])
        target_origin = slices[0].position + normal * (target * step)
        blended = 0.0
        for index, slice_weight in ((lower, 1.0 - weight), (upper, weight)):
            shift_columns, shift_rows = pseudo_inverse @ (target_origin - slices[index].position)
            blended = blended + slice_weight * _shift_slice(slices[index].hu, shift_columns, shift_rows)
        target_slices.append(blended.T)  # type: ignore[union-attr]
    affine[:3, 2] = normal * step
    data = torch.stack(target_slices, dim=-1).to(torch.float32).numpy()
    return require_finite(np.ascontiguousarray(data), source), _LPS_TO_RAS @ affine


def _assembled(slices: list[_Slice], path: Path, resample: bool) -> tuple[np.ndarray, np.ndarray]:
    """``_assemble`` with its errors carrying ``path`` (the folder or file) as their ``path`` attribute."""
    try:
        return _assemble(slices, str(path), resample)
    except VolumeFormatError as error:
        if error.path is not None:
            raise
        raise VolumeFormatError(str(error), path) from error


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None, resample: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a CT series (one DICOM file per slice, or one enhanced multi-frame file) from a folder.

    Args:
        folder: the folder; files that are not DICOM are skipped, subfolders are searched too.
        series_uid: which SeriesInstanceUID to read when the folder holds several series.
        resample: when the slices are unequally spaced, have gaps, or drift off the slice normal (gantry tilt), resample
            them onto a regular grid along the normal (linear between slices, bilinear in-plane) instead of refusing.

    Returns:
        ``data`` ``[I, J, K]`` float32 HU (column, row, slice in spatial order) and ``affine`` ``[4, 4]`` float64,
        voxel index -> world RAS+ mm.

    Raises:
        VolumeFormatError: no image in the folder, several series and no ``series_uid``, unreadable files, or
            irregular geometry without ``resample``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    images: dict[str, list[tuple[object, str]]] = {}
    without_pixels: list[str] = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            dataset = pydicom.dcmread(str(file), force=False)
        except InvalidDicomError as error:
            if file.suffix.lower() in _DICOM_SUFFIXES:  # named as a slice: skipping it would silently drop a slice
                raise VolumeFormatError(f"has a DICOM file name but is not a DICOM file: {error}", file) from error
            continue  # not a DICOM file (README, thumbnails, DICOMDIR-less junk): skip it
        except Exception as error:  # truncated or damaged DICOM
            raise VolumeFormatError(
                f"could not read DICOM file {file}: {type(error).__name__}: {error}", file
            ) from error
        try:  # pydicom converts values lazily: a damaged element raises only here, with any exception type
            if "PixelData" not in dataset:
                without_pixels.append(f"{file.name} ({dataset.get('Modality', 'unknown modality')})")
                continue
            series = str(dataset.get("SeriesInstanceUID", ""))
        except Exception as error:  # noqa: BLE001
            raise VolumeFormatError(
                f"damaged DICOM attributes (Modality/SeriesInstanceUID): {type(error).__name__}: {error}", file
            ) from error
        images.setdefault(series, []).append((dataset, str(file)))
    if not images:
        detail = f"; DICOM files without pixel data: {', '.join(without_pixels[:5])}" if without_pixels else ""
        raise VolumeFormatError(f"no DICOM images (datasets with PixelData) found in {folder}{detail}", folder)
    if series_uid is None and len(images) > 1:
        listing = "; ".join(
            f"{uid} ({members[0][0].get('SeriesDescription', 'no description')!s}, {len(members)} files)"  # type: ignore[attr-defined]
            for uid, members in images.items()
        )
        raise VolumeFormatError(f"{folder} holds {len(images)} series; pick one with series_uid=: {listing}", folder)
    if series_uid is not None and series_uid not in images:
        raise VolumeFormatError(f"{folder} has no series {series_uid!r}; it holds {sorted(images)}", folder)
    members = images[series_uid if series_uid is not None else next(iter(images))]
    slices: list[_Slice] = []
    for dataset, source in members:
        slices.extend(_dataset_slices(dataset, source))
    return _assembled(slices, folder, resample)


def read_dicom_file(path: str | Path, resample: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reads one enhanced (multi-frame) CT DICOM file; same returns and errors as :func:`read_dicom_series`."""
    import pydicom

    path = Path(path)
    try:
        dataset = pydicom.dcmread(str(path), force=False)
    except Exception as error:  # InvalidDicomError for non-DICOM, others for truncated files
        raise VolumeFormatError(f"could not read {path} as DICOM: {type(error).__name__}: {error}", path) from error
    try:
        has_pixels, modality = "PixelData" in dataset, str(dataset.get("Modality", ""))
    except Exception as error:  # noqa: BLE001 - lazily converted values fail with any exception type
        raise VolumeFormatError(f"damaged DICOM attributes: {type(error).__name__}: {error}", path) from error
    if not has_pixels:
        raise VolumeFormatError(f"{path} is a DICOM {modality} object without image pixel data", path)
    if not _is_enhanced(dataset):
        raise VolumeFormatError(
            f"{path} is a single-frame DICOM image; pass the folder holding the whole series instead"
        )
    return _assembled(_dataset_slices(dataset, str(path)), path, resample)

"""Small writers for the CT-reading tests: DICOM slices and enhanced CT files built in memory with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def _base_dataset(sop_class_uid: str, series_uid: str, modality: str = "CT") -> Dataset:
    """A dataset with the file meta and identifying attributes every object needs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    """Uncompressed 16-bit unsigned grayscale pixels ``[frames?, rows, columns]``."""
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0  # unsigned: HU must come from the intercept, not from a signed cast
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()


def stored_values(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU -> uint16 stored values for ``slope``/``intercept`` (the HU must be exactly representable)."""
    stored = np.round((hu - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 65536, "HU out of the uint16 range for this rescale"
    return stored.astype(np.uint16)


def write_ct_series(
    folder: Path,
    slices_hu: list[np.ndarray],
    positions_lps: list[np.ndarray],
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    series_uid: str,
    description: str = "test series",
    slope: float = 1.0,
    intercept: float = -1024.0,
    seed: int = 0,
) -> None:
    """Writes one CT Image Storage file per slice (``slices_hu[k]`` is ``[rows, columns]``) with scrambled file
    names and InstanceNumbers, so a reader relying on either would misorder the slices."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    instance_numbers = rng.permutation(len(slices_hu)) + 1
    for k in rng.permutation(len(slices_hu)):
        ds = _base_dataset(CT_IMAGE_STORAGE, series_uid)
        ds.SeriesDescription = description
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions_lps[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        _set_pixels(ds, stored_values(slices_hu[k], slope, intercept))
        ds.save_as(folder / f"{rng.integers(1 << 40):x}.dcm", enforce_file_format=True)


def write_enhanced_ct(
    path: Path,
    slices_hu: list[np.ndarray],
    positions_lps: list[np.ndarray],
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    slope: float = 1.0,
    intercept: float = -1024.0,
    per_frame_rescale: bool = False,
) -> None:
    """Writes one enhanced CT file, frames in reverse spatial order, geometry in the functional group sequences
    (the rescale in the shared group, or in every frame's group with ``per_frame_rescale``)."""
    order = list(range(len(slices_hu)))[::-1]
    ds = _base_dataset(ENHANCED_CT_IMAGE_STORAGE, generate_uid())
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    plane_orientation = Dataset()
    plane_orientation.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    measures = Dataset()
    measures.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    measures.SliceThickness = "1"
    rescale = Dataset()
    rescale.RescaleSlope = f"{slope:g}"
    rescale.RescaleIntercept = f"{intercept:g}"
    rescale.RescaleType = "HU"
    shared.PlaneOrientationSequence = [plane_orientation]
    shared.PixelMeasuresSequence = [measures]
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        position = Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in positions_lps[k]]
        frame = Dataset()
        frame.PlanePositionSequence = [position]
        if per_frame_rescale:
            frame.PixelValueTransformationSequence = [rescale]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    _set_pixels(ds, np.stack([stored_values(slices_hu[k], slope, intercept) for k in order]))
    ds.save_as(path, enforce_file_format=True)


def write_rtstruct(path: Path) -> None:
    """A DICOM object with no pixel data (an RT structure set stub)."""
    ds = _base_dataset(RT_STRUCTURE_SET_STORAGE, generate_uid(), modality="RTSTRUCT")
    ds.StructureSetLabel = "contours"
    ds.save_as(path, enforce_file_format=True)

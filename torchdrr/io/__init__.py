"""Layer 3: reading CT volumes (HU data plus a voxel -> world affine in RAS+ mm)."""

from .dicom import read_dicom_file, read_dicom_series
from .errors import VolumeFormatError
from .nrrd import read_nrrd
from .volume import HUReport, Volume, bundled_ct_path, check_hu, crop, load_nifti, resample, volume_center

__all__ = [
    "HUReport",
    "Volume",
    "VolumeFormatError",
    "bundled_ct_path",
    "check_hu",
    "crop",
    "load_nifti",
    "read_dicom_file",
    "read_dicom_series",
    "read_nrrd",
    "resample",
    "volume_center",
]

"""Layer 3: reading CT volumes (HU data plus a voxel -> world affine in RAS+ mm) and X-ray images."""

from .dicom import read_dicom_file, read_dicom_series
from .errors import FileFormatError, VolumeFormatError, XRayFormatError
from .nrrd import read_nrrd
from .volume import HUReport, Volume, bundled_ct_path, check_hu, crop, load_nifti, resample, volume_center
from .xray import XRAY_SUFFIXES, XRayImage, check_pixel_spacing, check_xray_against_camera, read_xray, xray_kind_auto

__all__ = [
    "FileFormatError",
    "HUReport",
    "XRAY_SUFFIXES",
    "XRayFormatError",
    "XRayImage",
    "Volume",
    "VolumeFormatError",
    "bundled_ct_path",
    "check_hu",
    "check_pixel_spacing",
    "check_xray_against_camera",
    "crop",
    "load_nifti",
    "read_dicom_file",
    "read_dicom_series",
    "read_nrrd",
    "read_xray",
    "resample",
    "volume_center",
    "xray_kind_auto",
]

"""Minimal CT reading: NIfTI files and the bundled demo CT. The scene issue extends this (DICOM, NRRD, HU checks)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

__all__ = ["bundled_ct_path", "load_nifti", "volume_center"]


def bundled_ct_path() -> Path:
    """Path of the bundled demo CT: LIDC-IDRI-0001 downsampled to 170 x 170 x 133 (see assets/ATTRIBUTION.md)."""
    return Path(str(resources.files("torchdrr.assets").joinpath("chest_ct_small.nii.gz")))


def load_nifti(path: str | Path) -> tuple[Tensor, Tensor]:
    """Reads a NIfTI CT.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``hu`` ``[I, J, K]`` float32 values as stored after the header's scaling (HU for CT), indexed like the file's
        data array, and ``affine`` ``[4, 4]`` float64, voxel index -> world mm (RAS+, NIfTI's frame).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT file not found: {path}")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for unreadable files
        raise ValueError(f"could not read {path} as NIfTI: {error}") from error
    if len(image.shape) != 3:
        raise ValueError(f"{path} must hold a 3D volume, got shape {image.shape}")
    data = np.asarray(image.get_fdata(dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(np.asarray(image.affine, dtype=np.float64))


def volume_center(affine: Tensor, shape: tuple[int, int, int] | torch.Size) -> Tensor:
    """World position (mm) ``[3]`` of the centre of a volume of ``shape`` ``(I, J, K)`` voxels."""
    centre = torch.tensor([(n - 1) / 2.0 for n in shape] + [1.0], dtype=affine.dtype, device=affine.device)
    return (affine @ centre)[:3]

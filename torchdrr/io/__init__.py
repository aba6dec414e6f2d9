"""Layer 3: reading CT volumes (HU data plus a voxel -> world affine in RAS+ mm)."""

from .volume import bundled_ct_path, load_nifti, volume_center

__all__ = ["bundled_ct_path", "load_nifti", "volume_center"]

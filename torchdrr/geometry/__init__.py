"""Layer 3: cameras, C-arm poses and the rays they cast (conventions in README.md and design.md §3)."""

from .camera import intrinsic_matrix, pixel_rays
from .carm import NAMED_VIEWS, carm_extrinsics, detector_direction

__all__ = ["NAMED_VIEWS", "carm_extrinsics", "detector_direction", "intrinsic_matrix", "pixel_rays"]

"""Layer 2: the Python side of the compiled ops (validation, fake kernels, autograd) and their pure-PyTorch
references."""

from .camera_raycast import camera_pixel_grid, camera_raycast
from .carm_ray_parameters import carm_ray_parameters
from .layout import contiguous_axis, ray_axis, row_axis, trilinear_quads, with_contiguous_axis
from .raycast import RAYCAST_MODES, raycast
from .reference import camera_raycast_reference, default_step, log_weighted_transmission_reference, raycast_reference
from .spectral import MAX_MATERIALS, MAX_WEIGHT_ROWS, log_weighted_transmission

__all__ = [
    "MAX_MATERIALS",
    "MAX_WEIGHT_ROWS",
    "RAYCAST_MODES",
    "camera_pixel_grid",
    "camera_raycast",
    "camera_raycast_reference",
    "carm_ray_parameters",
    "contiguous_axis",
    "default_step",
    "log_weighted_transmission",
    "log_weighted_transmission_reference",
    "raycast",
    "ray_axis",
    "raycast_reference",
    "row_axis",
    "trilinear_quads",
    "with_contiguous_axis",
]

"""Layer 2: the Python side of the compiled ops (validation, fake kernels, autograd) and their pure-PyTorch
references."""

from .raycast import RAYCAST_MODES, raycast
from .reference import default_step, log_weighted_transmission_reference, raycast_reference
from .spectral import MAX_MATERIALS, MAX_WEIGHT_ROWS, log_weighted_transmission

__all__ = [
    "MAX_MATERIALS",
    "MAX_WEIGHT_ROWS",
    "RAYCAST_MODES",
    "default_step",
    "log_weighted_transmission",
    "log_weighted_transmission_reference",
    "raycast",
    "raycast_reference",
]

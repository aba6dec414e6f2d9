"""Layer 2: the Python side of the compiled ops (validation, fake kernels, autograd) and their pure-PyTorch
references."""

from .raycast import RAYCAST_MODES, raycast
from .reference import default_step, raycast_reference

__all__ = ["RAYCAST_MODES", "default_step", "raycast", "raycast_reference"]

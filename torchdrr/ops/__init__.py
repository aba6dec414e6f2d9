"""Layer 2: the Python side of the compiled ops (validation, fake kernels, autograd) and their pure-PyTorch
references."""

from .raycast import RAYCAST_MODES, raycast

__all__ = ["RAYCAST_MODES", "raycast"]

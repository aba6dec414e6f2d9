"""torchdrr: differentiable, physics-based X-ray simulation (DRRs) for PyTorch.

The core is ``torchdrr.raycast``, a C++/CUDA custom op that integrates a CT volume along rays, with gradients to the
volume and to the ray endpoints. See README.md for the conventions.
"""

__version__ = "0.1.0"

from ._extension import build_info
from .drr import DRR
from .geometry import Camera
from .io import Volume
from .ops import raycast

__all__ = ["DRR", "Camera", "Volume", "__version__", "build_info", "raycast"]

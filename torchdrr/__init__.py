"""torchdrr: differentiable, physics-based X-ray simulation (DRRs) for PyTorch.

The core is ``torchdrr.raycast``, a C++/CUDA custom op that integrates a CT volume along rays, with gradients to the
volume and to the ray endpoints. See README.md for the conventions.
"""

__version__ = "0.1.0"

from ._extension import build_info
from .cuda_graph import cuda_graphed
from .drr import DRR
from .errors import FileFormatError, MemoryBudgetError, VolumeFormatError, XRayFormatError
from .geometry import Camera
from .io import Volume
from .ops import raycast

__all__ = [
    "DRR",
    "Camera",
    "FileFormatError",
    "MemoryBudgetError",
    "Volume",
    "VolumeFormatError",
    "XRayFormatError",
    "__version__",
    "build_info",
    "cuda_graphed",
    "raycast",
]

"""2D/3D registration: similarity losses, pose offsets, the optimiser and error metrics (issue 6, in progress)."""

from .losses import LOSSES, get_loss
from .metrics import RegistrationErrors, registration_errors, volume_landmarks
from .optimize import XRAY_KINDS, RegistrationResult, register, start_offsets
from .pose import apply_offset, offset_camera

__all__ = [
    "LOSSES",
    "XRAY_KINDS",
    "RegistrationErrors",
    "RegistrationResult",
    "apply_offset",
    "get_loss",
    "offset_camera",
    "register",
    "registration_errors",
    "start_offsets",
    "volume_landmarks",
]

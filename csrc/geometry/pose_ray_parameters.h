// Host-side pieces of torchdrr::pose_ray_parameters shared by the CPU and CUDA implementations: input checks and the
// strided view of the inputs the kernels read. The per-pose math is in pose_math.h; the out_dtype and gradient checks,
// the dtype dispatch and the incoming-gradient view are carm_ray_parameters.h's (the two ops' outputs have one
// layout).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "carm_ray_parameters.h"
#include "pose_math.h"

namespace torchdrr {

// All validation lives in pose_ray_parameters_host.cpp, compiled by the C++ compiler only: error messages that
// format integers must not be instantiated in a .cu object (see raycast/raycast.h for the crash this avoids).

// Checks the forward's contract for direct callers of torch.ops.torchdrr.pose_ray_parameters (the Python wrapper
// validates user input first): rotation [B, 3, 3], translation [B, 3], intrinsics [3, 3] or [B, 3, 3], all float32 or
// float64 of one dtype on one device of type `device`; sdd_mm finite and > 0. K's values are not scanned (that would
// make the host wait for the device); a zero on its diagonal gives inf.
void check_pose_inputs(const at::Tensor& intrinsics, const at::Tensor& rotation, const at::Tensor& translation,
                       double sdd_mm, c10::DeviceType device);

// The kernels' strided view of the (checked) inputs; a shared K gets batch stride 0.
template <typename T>
PoseInputs<T> make_pose_inputs(const at::Tensor& intrinsics, const at::Tensor& rotation, const at::Tensor& translation,
                               double sdd_mm) {
  PoseInputs<T> in;
  in.rotation = rotation.const_data_ptr<T>();
  for (int d = 0; d < 3; ++d) in.rotation_stride[d] = rotation.stride(d);
  in.translation = translation.const_data_ptr<T>();
  in.translation_stride[0] = translation.stride(0);
  in.translation_stride[1] = translation.stride(1);
  in.intrinsics = intrinsics.const_data_ptr<T>();
  const bool shared_intrinsics = intrinsics.dim() == 2;
  in.intrinsics_stride[0] = shared_intrinsics ? 0 : intrinsics.stride(0);
  in.intrinsics_stride[1] = intrinsics.stride(-2);
  in.intrinsics_stride[2] = intrinsics.stride(-1);
  in.sdd_mm = static_cast<T>(sdd_mm);
  in.batch = rotation.size(0);
  return in;
}

}  // namespace torchdrr

// CPU implementation of torchdrr::carm_ray_parameters and carm_ray_parameters_backward: poses are spread over threads
// with at::parallel_for; each pose is computed by the shared per-pose code in carm_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "carm_ray_parameters.h"

namespace torchdrr {
namespace {

// Poses per task: one pose is about a hundred flops and six sin/cos, so only large batches are worth threads.
constexpr int64_t kPoseGrain = 2048;

std::tuple<at::Tensor, at::Tensor> carm_ray_parameters_cpu(const at::Tensor& angles, const at::Tensor& isocenter,
                                                           const at::Tensor& intrinsics, double sod_mm, double sdd_mm,
                                                           at::ScalarType out_dtype, double secondary_deg,
                                                           double inplane_deg) {
  check_carm_inputs(angles, isocenter, intrinsics, sod_mm, sdd_mm, secondary_deg, inplane_deg,
                    c10::DeviceType::CPU);
  check_ray_parameters_out_dtype("carm_ray_parameters", out_dtype);
  const int64_t batch = angles.size(0);
  const at::TensorOptions options = angles.options().dtype(out_dtype);
  at::Tensor sources = at::empty({batch, 3}, options);
  at::Tensor ray_matrices = at::empty({batch, 3, 3}, options);
  dispatch_carm_dtype(angles.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      const CarmInputs<T> in = make_carm_inputs<T>(angles, isocenter, intrinsics, sod_mm, sdd_mm,
                                                        secondary_deg, inplane_deg);
      O* source_out = sources.mutable_data_ptr<O>();
      O* matrix_out = ray_matrices.mutable_data_ptr<O>();
      at::parallel_for(0, batch, kPoseGrain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) carm_ray_parameters_at(in, b, source_out, matrix_out);
      });
    });
  });
  return {sources, ray_matrices};
}

std::tuple<at::Tensor, at::Tensor> carm_ray_parameters_backward_cpu(const at::Tensor& grad_sources,
                                                                    const at::Tensor& grad_ray_matrices,
                                                                    const at::Tensor& angles,
                                                                    const at::Tensor& isocenter,
                                                                    const at::Tensor& intrinsics, double sod_mm,
                                                                    double sdd_mm, double secondary_deg,
                                                                    double inplane_deg) {
  check_carm_inputs(angles, isocenter, intrinsics, sod_mm, sdd_mm, secondary_deg, inplane_deg,
                    c10::DeviceType::CPU);
  check_ray_parameters_grads("carm_ray_parameters", grad_sources, grad_ray_matrices, angles, "the angles'");
  const int64_t batch = angles.size(0);
  const bool shared_isocenter = isocenter.dim() == 1;
  at::Tensor grad_angles = at::empty({batch, angles.size(1)}, angles.options());  // shaped like angles
  at::Tensor grad_isocenter = at::empty(isocenter.sizes(), isocenter.options());
  dispatch_carm_dtype(angles.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(grad_sources.scalar_type(), [&](auto grad_tag) {
      using G = decltype(grad_tag);
      const CarmInputs<T> in = make_carm_inputs<T>(angles, isocenter, intrinsics, sod_mm, sdd_mm,
                                                        secondary_deg, inplane_deg);
      const CarmGrads<G> grads = make_carm_grads<G>(grad_sources, grad_ray_matrices);
      T* angles_out = grad_angles.mutable_data_ptr<T>();
      T* isocenter_out = grad_isocenter.mutable_data_ptr<T>();
      at::parallel_for(0, batch, kPoseGrain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          T pose_grad_angles[3], pose_grad_isocenter[3];
          carm_ray_parameters_backward_at(in, grads, b, pose_grad_angles, pose_grad_isocenter);
          for (int i = 0; i < 3; ++i) {
            if (i < in.angle_count) angles_out[b * in.angle_count + i] = pose_grad_angles[i];
            if (!shared_isocenter) isocenter_out[b * 3 + i] = pose_grad_isocenter[i];
          }
        }
      });
      if (shared_isocenter) {
        // dL/disocenter of a pose is its dL/dsource: the shared isocenter's gradient is their sum over the batch, in
        // pose order (deterministic).
        T total[3] = {T(0), T(0), T(0)};
        for (int64_t b = 0; b < batch; ++b) {
          T grad_source[3], grad_matrix[3][3];
          load_carm_grads(grads, b, grad_source, grad_matrix);
          for (int i = 0; i < 3; ++i) total[i] += grad_source[i];
        }
        for (int i = 0; i < 3; ++i) isocenter_out[i] = total[i];
      }
    });
  });
  return {grad_angles, grad_isocenter};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CPU, m) {
  m.impl("carm_ray_parameters", &carm_ray_parameters_cpu);
  m.impl("carm_ray_parameters_backward", &carm_ray_parameters_backward_cpu);
}

}  // namespace torchdrr

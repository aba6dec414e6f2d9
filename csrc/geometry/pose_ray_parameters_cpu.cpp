// CPU implementation of torchdrr::pose_ray_parameters and pose_ray_parameters_backward: poses are spread over threads
// with at::parallel_for; each pose is computed by the shared per-pose code in pose_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "pose_ray_parameters.h"

namespace torchdrr {
namespace {

// Poses per task: one pose is about fifty flops and no transcendental, so only large batches are worth threads.
constexpr int64_t kPoseGrain = 4096;

std::tuple<at::Tensor, at::Tensor> pose_ray_parameters_cpu(const at::Tensor& intrinsics, const at::Tensor& rotation,
                                                           const at::Tensor& translation, double sdd_mm,
                                                           at::ScalarType out_dtype) {
  check_pose_inputs(intrinsics, rotation, translation, sdd_mm, c10::DeviceType::CPU);
  check_ray_parameters_out_dtype("pose_ray_parameters", out_dtype);
  const int64_t batch = rotation.size(0);
  const at::TensorOptions options = rotation.options().dtype(out_dtype);
  at::Tensor sources = at::empty({batch, 3}, options);
  at::Tensor ray_matrices = at::empty({batch, 3, 3}, options);
  dispatch_carm_dtype(rotation.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      const PoseInputs<T> in = make_pose_inputs<T>(intrinsics, rotation, translation, sdd_mm);
      O* source_out = sources.mutable_data_ptr<O>();
      O* matrix_out = ray_matrices.mutable_data_ptr<O>();
      at::parallel_for(0, batch, kPoseGrain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) pose_ray_parameters_at(in, b, source_out, matrix_out);
      });
    });
  });
  return {sources, ray_matrices};
}

std::tuple<at::Tensor, at::Tensor> pose_ray_parameters_backward_cpu(const at::Tensor& grad_sources,
                                                                    const at::Tensor& grad_ray_matrices,
                                                                    const at::Tensor& intrinsics,
                                                                    const at::Tensor& rotation,
                                                                    const at::Tensor& translation, double sdd_mm) {
  check_pose_inputs(intrinsics, rotation, translation, sdd_mm, c10::DeviceType::CPU);
  check_ray_parameters_grads("pose_ray_parameters", grad_sources, grad_ray_matrices, rotation, "the rotation's");
  const int64_t batch = rotation.size(0);
  at::Tensor grad_rotation = at::empty({batch, 3, 3}, rotation.options());
  at::Tensor grad_translation = at::empty({batch, 3}, translation.options());
  dispatch_carm_dtype(rotation.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(grad_sources.scalar_type(), [&](auto grad_tag) {
      using G = decltype(grad_tag);
      const PoseInputs<T> in = make_pose_inputs<T>(intrinsics, rotation, translation, sdd_mm);
      const CarmGrads<G> grads = make_carm_grads<G>(grad_sources, grad_ray_matrices);
      T* rotation_out = grad_rotation.mutable_data_ptr<T>();
      T* translation_out = grad_translation.mutable_data_ptr<T>();
      at::parallel_for(0, batch, kPoseGrain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          pose_ray_parameters_backward_at(in, grads, b, rotation_out, translation_out);
        }
      });
    });
  });
  return {grad_rotation, grad_translation};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CPU, m) {
  m.impl("pose_ray_parameters", &pose_ray_parameters_cpu);
  m.impl("pose_ray_parameters_backward", &pose_ray_parameters_backward_cpu);
}

}  // namespace torchdrr

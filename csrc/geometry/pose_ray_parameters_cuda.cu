// CUDA implementation of torchdrr::pose_ray_parameters and pose_ray_parameters_backward: one thread per pose, the
// per-pose math shared with the CPU kernel (pose_math.h).
//
// Why a kernel for fifty flops a pose: on the GPU the composite camera_ray_parameters (eye, solve_triangular, two
// bmm, neg, mul, then the DRR module's two casts) launched about 8 small kernels per render, solve_triangular alone
// ~150 us of host time on the H100. Here the forward is one launch and the backward one launch: inputs are read
// through their strides (no .contiguous() copies) and the output dtype is written directly (no cast kernels). Every
// gradient belongs to one pose (K gets none), so the backward needs no reduction.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "pose_ray_parameters.h"

namespace torchdrr {
namespace {

constexpr int kThreads = 128;

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    pose_forward_kernel(const PoseInputs<T> in, O* __restrict__ sources, O* __restrict__ ray_matrices) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= in.batch) return;
  pose_ray_parameters_at(in, b, sources, ray_matrices);
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    pose_backward_kernel(const PoseInputs<T> in, const CarmGrads<G> grads, T* __restrict__ grad_rotation,
                         T* __restrict__ grad_translation) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= in.batch) return;
  pose_ray_parameters_backward_at(in, grads, b, grad_rotation, grad_translation);
}

unsigned blocks_for(int64_t batch) { return static_cast<unsigned>((batch + kThreads - 1) / kThreads); }

std::tuple<at::Tensor, at::Tensor> pose_ray_parameters_cuda(const at::Tensor& intrinsics, const at::Tensor& rotation,
                                                            const at::Tensor& translation, double sdd_mm,
                                                            at::ScalarType out_dtype) {
  check_pose_inputs(intrinsics, rotation, translation, sdd_mm, c10::DeviceType::CUDA);
  check_ray_parameters_out_dtype("pose_ray_parameters", out_dtype);
  const c10::cuda::CUDAGuard device_guard(rotation.device());
  const int64_t batch = rotation.size(0);
  const at::TensorOptions options = rotation.options().dtype(out_dtype);
  at::Tensor sources = at::empty({batch, 3}, options);
  at::Tensor ray_matrices = at::empty({batch, 3, 3}, options);
  if (batch == 0) return {sources, ray_matrices};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_carm_dtype(rotation.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      const PoseInputs<T> in = make_pose_inputs<T>(intrinsics, rotation, translation, sdd_mm);
      pose_forward_kernel<T, O><<<blocks_for(batch), kThreads, 0, stream>>>(in, sources.mutable_data_ptr<O>(),
                                                                            ray_matrices.mutable_data_ptr<O>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {sources, ray_matrices};
}

std::tuple<at::Tensor, at::Tensor> pose_ray_parameters_backward_cuda(const at::Tensor& grad_sources,
                                                                     const at::Tensor& grad_ray_matrices,
                                                                     const at::Tensor& intrinsics,
                                                                     const at::Tensor& rotation,
                                                                     const at::Tensor& translation, double sdd_mm) {
  check_pose_inputs(intrinsics, rotation, translation, sdd_mm, c10::DeviceType::CUDA);
  check_ray_parameters_grads("pose_ray_parameters", grad_sources, grad_ray_matrices, rotation, "the rotation's");
  const c10::cuda::CUDAGuard device_guard(rotation.device());
  const int64_t batch = rotation.size(0);
  at::Tensor grad_rotation = at::empty({batch, 3, 3}, rotation.options());
  at::Tensor grad_translation = at::empty({batch, 3}, translation.options());
  if (batch == 0) return {grad_rotation, grad_translation};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_carm_dtype(rotation.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(grad_sources.scalar_type(), [&](auto grad_tag) {
      using G = decltype(grad_tag);
      const PoseInputs<T> in = make_pose_inputs<T>(intrinsics, rotation, translation, sdd_mm);
      const CarmGrads<G> grads = make_carm_grads<G>(grad_sources, grad_ray_matrices);
      pose_backward_kernel<T, G><<<blocks_for(batch), kThreads, 0, stream>>>(
          in, grads, grad_rotation.mutable_data_ptr<T>(), grad_translation.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_rotation, grad_translation};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CUDA, m) {
  m.impl("pose_ray_parameters", &pose_ray_parameters_cuda);
  m.impl("pose_ray_parameters_backward", &pose_ray_parameters_backward_cuda);
}

}  // namespace torchdrr

// CUDA implementation of torchdrr::carm_ray_parameters and carm_ray_parameters_backward: one thread per pose, the
// per-pose math shared with the CPU kernel (carm_math.h).
//
// Why a kernel for a few hundred flops: on the GPU the composite path (carm_extrinsics, camera_ray_parameters and
// two casts) launched about 35 tiny kernels per render, ~0.7 ms of host time before the ray cast. Here the forward is
// one launch and the backward one launch: inputs are read through their strides (no .contiguous() copies), the
// output dtype is written directly (no cast kernels), and a shared isocenter's gradient is summed over the batch
// inside the kernel.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "carm_ray_parameters.h"

namespace torchdrr {
namespace {

constexpr int kForwardThreads = 128;
// The backward with a shared isocenter runs as one block that loops over the batch and reduces the isocenter
// gradient in shared memory: deterministic (no atomics) and still one launch. A pose is a few hundred flops, so even
// 65536 poses are only 256 loop iterations a thread.
constexpr int kBackwardThreads = 256;

template <typename T, typename O>
__global__ void __launch_bounds__(kForwardThreads)
    carm_forward_kernel(const CarmInputs<T> in, O* __restrict__ sources, O* __restrict__ ray_matrices) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= in.batch) return;
  carm_ray_parameters_at(in, b, sources, ray_matrices);
}

// kShared: the isocenter is one [3] for the whole batch (launched as a single block), else [B, 3] (one thread a pose).
template <typename T, typename G, bool kShared>
__global__ void __launch_bounds__(kBackwardThreads)
    carm_backward_kernel(const CarmInputs<T> in, const CarmGrads<G> grads, T* __restrict__ grad_angles,
                         T* __restrict__ grad_isocenter) {
  T total[3] = {T(0), T(0), T(0)};
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = kShared ? blockDim.x : in.batch;  // non-shared: each thread takes at most one pose
  for (int64_t b = first; b < in.batch; b += stride) {
    T pose_angles[3], pose_isocenter[3];
    carm_ray_parameters_backward_at(in, grads, b, pose_angles, pose_isocenter);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      if (i < in.angle_count) grad_angles[b * in.angle_count + i] = pose_angles[i];
      if (kShared) {
        total[i] += pose_isocenter[i];
      } else {
        grad_isocenter[b * 3 + i] = pose_isocenter[i];
      }
    }
  }
  if constexpr (kShared) {
    // Tree reduction of the per-thread sums in a fixed order, so that repeated runs give the same bits.
    __shared__ T partial[3][kBackwardThreads];
#pragma unroll
    for (int i = 0; i < 3; ++i) partial[i][threadIdx.x] = total[i];
    __syncthreads();
    for (int half = kBackwardThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) {
#pragma unroll
        for (int i = 0; i < 3; ++i) partial[i][threadIdx.x] += partial[i][threadIdx.x + half];
      }
      __syncthreads();
    }
    if (threadIdx.x < 3) grad_isocenter[threadIdx.x] = partial[threadIdx.x][0];
  }
}

unsigned blocks_for(int64_t batch, int threads) { return static_cast<unsigned>((batch + threads - 1) / threads); }

std::tuple<at::Tensor, at::Tensor> carm_ray_parameters_cuda(const at::Tensor& angles, const at::Tensor& isocenter,
                                                            const at::Tensor& intrinsics, double sod_mm, double sdd_mm,
                                                            at::ScalarType out_dtype, double secondary_deg,
                                                            double inplane_deg) {
  check_carm_inputs(angles, isocenter, intrinsics, sod_mm, sdd_mm, secondary_deg, inplane_deg,
                    c10::DeviceType::CUDA);
  check_ray_parameters_out_dtype("carm_ray_parameters", out_dtype);
  const c10::cuda::CUDAGuard device_guard(angles.device());
  const int64_t batch = angles.size(0);
  const at::TensorOptions options = angles.options().dtype(out_dtype);
  at::Tensor sources = at::empty({batch, 3}, options);
  at::Tensor ray_matrices = at::empty({batch, 3, 3}, options);
  if (batch == 0) return {sources, ray_matrices};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_carm_dtype(angles.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      const CarmInputs<T> in = make_carm_inputs<T>(angles, isocenter, intrinsics, sod_mm, sdd_mm,
                                                        secondary_deg, inplane_deg);
      carm_forward_kernel<T, O><<<blocks_for(batch, kForwardThreads), kForwardThreads, 0, stream>>>(
          in, sources.mutable_data_ptr<O>(), ray_matrices.mutable_data_ptr<O>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {sources, ray_matrices};
}

std::tuple<at::Tensor, at::Tensor> carm_ray_parameters_backward_cuda(const at::Tensor& grad_sources,
                                                                     const at::Tensor& grad_ray_matrices,
                                                                     const at::Tensor& angles,
                                                                     const at::Tensor& isocenter,
                                                                     const at::Tensor& intrinsics, double sod_mm,
                                                                     double sdd_mm, double secondary_deg,
                                                                     double inplane_deg) {
  check_carm_inputs(angles, isocenter, intrinsics, sod_mm, sdd_mm, secondary_deg, inplane_deg,
                    c10::DeviceType::CUDA);
  check_ray_parameters_grads("carm_ray_parameters", grad_sources, grad_ray_matrices, angles, "the angles'");
  const c10::cuda::CUDAGuard device_guard(angles.device());
  const int64_t batch = angles.size(0);
  const bool shared_isocenter = isocenter.dim() == 1;
  at::Tensor grad_angles = at::empty({batch, angles.size(1)}, angles.options());  // shaped like angles
  // A shared isocenter's gradient is a sum over the batch: 0 for an empty batch, which launches nothing.
  at::Tensor grad_isocenter = batch == 0 ? at::zeros(isocenter.sizes(), isocenter.options())
                                         : at::empty(isocenter.sizes(), isocenter.options());
  if (batch == 0) return {grad_angles, grad_isocenter};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_carm_dtype(angles.scalar_type(), [&](auto in_tag) {
    using T = decltype(in_tag);
    dispatch_carm_dtype(grad_sources.scalar_type(), [&](auto grad_tag) {
      using G = decltype(grad_tag);
      const CarmInputs<T> in = make_carm_inputs<T>(angles, isocenter, intrinsics, sod_mm, sdd_mm,
                                                        secondary_deg, inplane_deg);
      const CarmGrads<G> grads = make_carm_grads<G>(grad_sources, grad_ray_matrices);
      T* angles_out = grad_angles.mutable_data_ptr<T>();
      T* isocenter_out = grad_isocenter.mutable_data_ptr<T>();
      if (shared_isocenter) {
        carm_backward_kernel<T, G, true><<<1, kBackwardThreads, 0, stream>>>(in, grads, angles_out, isocenter_out);
      } else {
        carm_backward_kernel<T, G, false><<<blocks_for(batch, kBackwardThreads), kBackwardThreads, 0, stream>>>(
            in, grads, angles_out, isocenter_out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_angles, grad_isocenter};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CUDA, m) {
  m.impl("carm_ray_parameters", &carm_ray_parameters_cuda);
  m.impl("carm_ray_parameters_backward", &carm_ray_parameters_backward_cuda);
}

}  // namespace torchdrr

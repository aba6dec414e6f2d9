// CUDA implementation of torchdrr::raycast_forward and torchdrr::raycast_backward: one thread per ray, on the
// current stream, with the per-ray code shared with the CPU kernel (ray_math.h).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_scatter.cuh"
#include "raycast.h"

namespace torchdrr {
namespace {

constexpr int kThreadsPerBlock = 256;

inline unsigned int blocks_for(int64_t n_rays) {
  return static_cast<unsigned int>((n_rays + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

template <typename T, int MaxC, bool Packed>
__global__ void __launch_bounds__(kThreadsPerBlock)
    raycast_forward_kernel(const VolumeGeometry<T> geometry, const T* __restrict__ volume, int64_t channels,
                           const T* __restrict__ sources, const T* __restrict__ targets, int64_t n_rays,
                           bool trilinear, T step_mm, T* __restrict__ out) {
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n_rays) return;
  const T s[3] = {sources[3 * ray], sources[3 * ray + 1], sources[3 * ray + 2]};
  const T t[3] = {targets[3 * ray], targets[3 * ray + 1], targets[3 * ray + 2]};
  for (int64_t c0 = 0; c0 < channels; c0 += MaxC) {
    const int chunk = static_cast<int>(channels - c0 < MaxC ? channels - c0 : MaxC);
    raycast_ray_forward<T, MaxC, Packed, /*Steps=*/true>(geometry, volume + c0 * geometry.channel_stride, chunk, s, t, trilinear,
                                         step_mm, out + ray * channels + c0);
  }
}

template <typename T, int MaxC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    raycast_backward_kernel(const VolumeGeometry<T> geometry, const T* __restrict__ volume, int64_t channels,
                            const T* __restrict__ sources, const T* __restrict__ targets, int64_t n_rays,
                            bool trilinear, T step_mm, const T* __restrict__ grad_output, T* __restrict__ grad_volume,
                            T* __restrict__ grad_sources, T* __restrict__ grad_targets) {
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n_rays) return;
  const T s[3] = {sources[3 * ray], sources[3 * ray + 1], sources[3 * ray + 2]};
  const T t[3] = {targets[3 * ray], targets[3 * ray + 1], targets[3 * ray + 2]};
  const bool want_volume = grad_volume != nullptr, want_rays = grad_sources != nullptr;
  T gs_total[3] = {T(0), T(0), T(0)}, gt_total[3] = {T(0), T(0), T(0)};
  for (int64_t c0 = 0; c0 < channels; c0 += MaxC) {
    const int chunk = static_cast<int>(channels - c0 < MaxC ? channels - c0 : MaxC);
    AtomicScatter<T> scatter{want_volume ? grad_volume + c0 * geometry.channel_stride : nullptr};
    T gs[3], gt[3];
    raycast_ray_backward<T, MaxC, /*Steps=*/true>(geometry, volume + c0 * geometry.channel_stride, chunk, s, t, trilinear, step_mm,
                                  grad_output + ray * channels + c0, want_volume, scatter, want_rays, gs, gt);
    if (want_rays) {
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        gs_total[a] += gs[a];
        gt_total[a] += gt[a];
      }
    }
  }
  if (want_rays) {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      grad_sources[3 * ray + a] = gs_total[a];
      grad_targets[3 * ray + a] = gt_total[a];
    }
  }
}

at::Tensor raycast_forward_cuda(const at::Tensor& volume_in, const at::Tensor& affine, const at::Tensor& sources_in,
                                const at::Tensor& targets_in, int64_t mode, double step) {
  check_raycast_inputs(volume_in, affine, sources_in, targets_in, mode, step, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(volume_in.device());
  const at::Tensor volume = dense_volume(volume_in);
  check_int32_span(volume);
  const at::Tensor sources = sources_in.contiguous(), targets = targets_in.contiguous();
  const int64_t n_rays = sources.size(0), channels = volume.size(0);
  at::Tensor out = at::empty({n_rays, channels}, volume.options());
  if (n_rays == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "raycast_forward_cuda", [&] {
    const VolumeGeometry<scalar_t> geometry = make_geometry<scalar_t>(volume, affine);
    dispatch_channels(channels, [&](auto max_channels) {
      constexpr int kMaxC = decltype(max_channels)::value;
      const auto launch = [&](auto packed) {
        raycast_forward_kernel<scalar_t, kMaxC, decltype(packed)::value>
            <<<blocks_for(n_rays), kThreadsPerBlock, 0, stream>>>(
                geometry, volume.const_data_ptr<scalar_t>(), channels, sources.const_data_ptr<scalar_t>(),
                targets.const_data_ptr<scalar_t>(), n_rays, mode == kTrilinear,
                static_cast<scalar_t>(trilinear_step_mm(affine, step)), out.mutable_data_ptr<scalar_t>());
      };
      if (has_packed_channels(volume, kMaxC)) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> raycast_backward_cuda(const at::Tensor& grad_output_in,
                                                                     const at::Tensor& volume_in,
                                                                     const at::Tensor& affine,
                                                                     const at::Tensor& sources_in,
                                                                     const at::Tensor& targets_in, int64_t mode,
                                                                     double step, bool volume_grad, bool rays_grad) {
  check_raycast_inputs(volume_in, affine, sources_in, targets_in, mode, step, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(volume_in.device());
  const at::Tensor volume = dense_volume(volume_in);
  check_int32_span(volume);
  const at::Tensor sources = sources_in.contiguous(), targets = targets_in.contiguous();
  const int64_t n_rays = sources.size(0), channels = volume.size(0);
  check_grad_output(grad_output_in, volume, n_rays);
  const at::Tensor grad_output = grad_output_in.contiguous();
  at::Tensor grad_volume = volume_grad ? at::zeros_like(volume) : at::empty({0}, volume.options());
  at::Tensor grad_sources = rays_grad ? at::empty({n_rays, 3}, volume.options()) : at::empty({0}, volume.options());
  at::Tensor grad_targets = rays_grad ? at::empty({n_rays, 3}, volume.options()) : at::empty({0}, volume.options());
  if (n_rays == 0 || (!volume_grad && !rays_grad)) return {grad_volume, grad_sources, grad_targets};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "raycast_backward_cuda", [&] {
    const VolumeGeometry<scalar_t> geometry = make_geometry<scalar_t>(volume, affine);
    dispatch_channels(channels, [&](auto max_channels) {
      constexpr int kMaxC = decltype(max_channels)::value;
      raycast_backward_kernel<scalar_t, kMaxC><<<blocks_for(n_rays), kThreadsPerBlock, 0, stream>>>(
          geometry, volume.const_data_ptr<scalar_t>(), channels, sources.const_data_ptr<scalar_t>(),
          targets.const_data_ptr<scalar_t>(), n_rays, mode == kTrilinear, static_cast<scalar_t>(trilinear_step_mm(affine, step)),
          grad_output.const_data_ptr<scalar_t>(), volume_grad ? grad_volume.mutable_data_ptr<scalar_t>() : nullptr,
          rays_grad ? grad_sources.mutable_data_ptr<scalar_t>() : nullptr,
          rays_grad ? grad_targets.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_volume, grad_sources, grad_targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CUDA, m) {
  m.impl("raycast_forward", &raycast_forward_cuda);
  m.impl("raycast_backward", &raycast_backward_cuda);
}

}  // namespace torchdrr

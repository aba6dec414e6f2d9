// CUDA implementation of torchdrr::log_weighted_transmission_forward and _backward: one thread per ray, on the
// current stream, with the per-ray code shared with the CPU kernel (spectral_math.h). Every ray reads the whole
// attenuation and weight tables, so each block first stages them in shared memory when they fit.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "spectral.h"

namespace torchdrr {
namespace {

constexpr int kThreadsPerBlock = 256;
// Dynamic shared memory every CUDA device grants without opting in; larger tables are read from global memory.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

inline unsigned int blocks_for(int64_t n_rays) {
  return static_cast<unsigned int>((n_rays + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

// Points mu and w at the tables of this block's rays: shared-memory copies when use_shared, else global memory.
// use_shared is only set when every block's rays use one weight table (one [Q, E] table, or runs of rays_per_set
// that are whole multiples of the block size), so a block stages its attenuation table and its one weight table.
// All threads of the block must call it (it ends with a barrier when staging).
template <typename T>
__device__ __forceinline__ void stage_tables(const T* __restrict__ attenuation, const T* __restrict__ weights,
                                             int materials, int rows, int64_t bins, int64_t rays_per_set,
                                             bool use_shared, const T*& mu, const T*& w) {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  const int64_t first_ray = static_cast<int64_t>(blockIdx.x) * blockDim.x;
  if (!use_shared) {
    mu = attenuation;
    w = weights;  // per ray: weight_set_of(w, ray, ...)
    return;
  }
  const T* block_weights = weight_set_of(weights, first_ray, rays_per_set, rows, bins);
  T* shared = reinterpret_cast<T*>(shared_raw);
  const int64_t mu_count = static_cast<int64_t>(materials) * bins, w_count = static_cast<int64_t>(rows) * bins;
  for (int64_t i = threadIdx.x; i < mu_count; i += blockDim.x) shared[i] = attenuation[i];
  for (int64_t i = threadIdx.x; i < w_count; i += blockDim.x) shared[mu_count + i] = block_weights[i];
  __syncthreads();
  mu = shared;
  w = shared + mu_count;
}

// The weight table of `ray`: the staged one, or its own set in global memory.
template <typename T>
__device__ __forceinline__ const T* ray_weights(const T* w, int64_t ray, int64_t rays_per_set, int rows,
                                                int64_t bins, bool use_shared) {
  return use_shared ? w : weight_set_of(w, ray, rays_per_set, rows, bins);
}

template <typename T, int MaxQ>
__global__ void __launch_bounds__(kThreadsPerBlock)
    spectral_forward_kernel(const T* __restrict__ mass_thickness, const T* __restrict__ attenuation,
                            const T* __restrict__ weights, const int64_t* __restrict__ starts, int materials,
                            int rows, int64_t bins, int64_t groups, int64_t n_rays, int64_t rays_per_set,
                            bool use_shared, T* __restrict__ out) {
  const T* mu;
  const T* w;
  // Every thread of the block takes part in staging (and its barrier) before threads past the last ray leave.
  stage_tables(attenuation, weights, materials, rows, bins, rays_per_set, use_shared, mu, w);
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n_rays) return;
  T a[kMaxMaterials];
  load_ray(mass_thickness, ray, materials, a);
  spectral_ray_forward<T, MaxQ>(a, materials, mu, ray_weights(w, ray, rays_per_set, rows, bins, use_shared), rows,
                                bins, starts, groups, out + ray * rows * groups);
}

template <typename T, int MaxQ>
__global__ void __launch_bounds__(kThreadsPerBlock)
    spectral_backward_kernel(const T* __restrict__ mass_thickness, const T* __restrict__ attenuation,
                             const T* __restrict__ weights, const int64_t* __restrict__ starts, int materials,
                             int rows, int64_t bins, int64_t groups, int64_t n_rays, int64_t rays_per_set,
                             bool use_shared, const T* __restrict__ output, const T* __restrict__ grad_output,
                             T* __restrict__ grad_mass_thickness) {
  const T* mu;
  const T* w;
  stage_tables(attenuation, weights, materials, rows, bins, rays_per_set, use_shared, mu, w);
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n_rays) return;
  T a[kMaxMaterials];
  load_ray(mass_thickness, ray, materials, a);
  const int64_t offset = ray * rows * groups;
  spectral_ray_backward<T, MaxQ>(a, materials, mu, ray_weights(w, ray, rays_per_set, rows, bins, use_shared), rows,
                                 bins, starts, groups, output + offset, grad_output + offset,
                                 grad_mass_thickness + ray * materials);
}

// Bytes of dynamic shared memory for a block's tables, or 0 for global reads: when they do not fit, or when a
// block's rays could use two weight tables (runs of rays_per_set that are not whole blocks).
inline size_t shared_bytes_for(int64_t materials, int64_t rows, int64_t bins, size_t element_size, int64_t sets,
                               int64_t rays_per_set) {
  if (sets > 1 && rays_per_set % kThreadsPerBlock != 0) return 0;
  const int64_t bytes = (materials + rows) * bins * static_cast<int64_t>(element_size);
  return bytes <= kMaxSharedBytes ? static_cast<size_t>(bytes) : 0;
}

at::Tensor log_weighted_transmission_forward_cuda(const at::Tensor& mass_thickness_in,
                                                  const at::Tensor& attenuation_in, const at::Tensor& weights_in,
                                                  c10::IntArrayRef group_starts) {
  check_spectral_inputs(mass_thickness_in, attenuation_in, weights_in, group_starts, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(mass_thickness_in.device());
  const at::Tensor mass_thickness = mass_thickness_in.contiguous();
  const at::Tensor attenuation = attenuation_in.contiguous(), weights = weights_in.contiguous();
  const int64_t n_rays = mass_thickness.size(0), bins = attenuation.size(1);
  const int materials = static_cast<int>(attenuation.size(0)), rows = static_cast<int>(weights.size(-2));
  const int64_t sets = weights.dim() == 3 ? weights.size(0) : 1;
  const int64_t rays_per_set = rays_per_weight_set(mass_thickness, weights);
  const int64_t groups = static_cast<int64_t>(group_starts.size()) - 1;
  at::Tensor out = at::empty({n_rays, rows, groups}, mass_thickness.options());
  if (n_rays == 0) return out;
  const at::Tensor starts = group_starts_tensor(group_starts, mass_thickness.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mass_thickness.scalar_type(), "log_weighted_transmission_forward_cuda", [&] {
    const size_t shared = shared_bytes_for(materials, rows, bins, sizeof(scalar_t), sets, rays_per_set);
    dispatch_weight_rows(rows, [&](auto max_rows) {
      constexpr int kMaxQ = decltype(max_rows)::value;
      spectral_forward_kernel<scalar_t, kMaxQ><<<blocks_for(n_rays), kThreadsPerBlock, shared, stream>>>(
          mass_thickness.const_data_ptr<scalar_t>(), attenuation.const_data_ptr<scalar_t>(),
          weights.const_data_ptr<scalar_t>(), starts.const_data_ptr<int64_t>(), materials, rows, bins, groups,
          n_rays, rays_per_set, shared > 0, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor log_weighted_transmission_backward_cuda(const at::Tensor& grad_output_in, const at::Tensor& output_in,
                                                   const at::Tensor& mass_thickness_in,
                                                   const at::Tensor& attenuation_in, const at::Tensor& weights_in,
                                                   c10::IntArrayRef group_starts) {
  check_spectral_inputs(mass_thickness_in, attenuation_in, weights_in, group_starts, c10::DeviceType::CUDA);
  const int64_t groups = static_cast<int64_t>(group_starts.size()) - 1;
  check_spectral_grad(grad_output_in, output_in, mass_thickness_in, weights_in.size(-2), groups);
  const c10::cuda::CUDAGuard device_guard(mass_thickness_in.device());
  const at::Tensor mass_thickness = mass_thickness_in.contiguous();
  const at::Tensor attenuation = attenuation_in.contiguous(), weights = weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous(), output = output_in.contiguous();
  const int64_t n_rays = mass_thickness.size(0), bins = attenuation.size(1);
  const int materials = static_cast<int>(attenuation.size(0)), rows = static_cast<int>(weights.size(-2));
  const int64_t sets = weights.dim() == 3 ? weights.size(0) : 1;
  const int64_t rays_per_set = rays_per_weight_set(mass_thickness, weights);
  at::Tensor grad_mass_thickness = at::empty({n_rays, materials}, mass_thickness.options());
  if (n_rays == 0) return grad_mass_thickness;
  const at::Tensor starts = group_starts_tensor(group_starts, mass_thickness.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mass_thickness.scalar_type(), "log_weighted_transmission_backward_cuda", [&] {
    const size_t shared = shared_bytes_for(materials, rows, bins, sizeof(scalar_t), sets, rays_per_set);
    dispatch_weight_rows(rows, [&](auto max_rows) {
      constexpr int kMaxQ = decltype(max_rows)::value;
      spectral_backward_kernel<scalar_t, kMaxQ><<<blocks_for(n_rays), kThreadsPerBlock, shared, stream>>>(
          mass_thickness.const_data_ptr<scalar_t>(), attenuation.const_data_ptr<scalar_t>(),
          weights.const_data_ptr<scalar_t>(), starts.const_data_ptr<int64_t>(), materials, rows, bins, groups,
          n_rays, rays_per_set, shared > 0, output.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
          grad_mass_thickness.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_mass_thickness;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CUDA, m) {
  m.impl("log_weighted_transmission_forward", &log_weighted_transmission_forward_cuda);
  m.impl("log_weighted_transmission_backward", &log_weighted_transmission_backward_cuda);
}

}  // namespace torchdrr

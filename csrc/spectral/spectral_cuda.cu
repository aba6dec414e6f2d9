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

// Points mu and w at the tables of this block's rays: shared-memory copies when UseShared, else global memory.
// UseShared is only chosen when every block's rays use one weight table (one [Q, E] table, or runs of rays_per_set
// that are whole multiples of the block size), so a block stages its attenuation table and its one weight table.
// All threads of the block must call it (it ends with a barrier when staging). UseShared is a template parameter
// so that the compiler knows which memory the tables are in: chosen at run time, every table read was a generic
// load with 64-bit address arithmetic.
template <typename T, bool UseShared>
__device__ __forceinline__ void stage_tables(const T* __restrict__ attenuation, const T* __restrict__ weights,
                                             int materials, int rows, int64_t bins, int64_t rays_per_set,
                                             const T*& mu, const T*& w) {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  if constexpr (!UseShared) {
    mu = attenuation;
    w = weights;  // per ray: weight_set_of(w, ray, ...)
  } else {
    const int64_t first_ray = static_cast<int64_t>(blockIdx.x) * blockDim.x;
    const T* block_weights = weight_set_of(weights, first_ray, rays_per_set, rows, bins);
    T* shared = reinterpret_cast<T*>(shared_raw);
    const int64_t mu_count = static_cast<int64_t>(materials) * bins, w_count = static_cast<int64_t>(rows) * bins;
    for (int64_t i = threadIdx.x; i < mu_count; i += blockDim.x) shared[i] = attenuation[i];
    for (int64_t i = threadIdx.x; i < w_count; i += blockDim.x) shared[mu_count + i] = block_weights[i];
    __syncthreads();
    mu = shared;
    w = shared + mu_count;
  }
}

// The weight table of `ray`: the staged one, or its own set in global memory.
template <typename T, bool UseShared>
__device__ __forceinline__ const T* ray_weights(const T* w, int64_t ray, int64_t rays_per_set, int rows,
                                                int64_t bins) {
  if constexpr (UseShared) {
    return w;
  } else {
    return weight_set_of(w, ray, rays_per_set, rows, bins);
  }
}

template <typename T, int MaxQ, int MaxM, bool UseShared>
__global__ void __launch_bounds__(kThreadsPerBlock)
    spectral_forward_kernel(const T* __restrict__ mass_thickness, const T* __restrict__ attenuation,
                            const T* __restrict__ weights, const int64_t* __restrict__ starts, int materials,
                            int rows, int64_t bins, int64_t groups, int64_t n_rays, int64_t rays_per_set,
                            T* __restrict__ out) {
  const T* mu;
  const T* w;
  // Every thread of the block takes part in staging (and its barrier) before threads past the last ray leave.
  stage_tables<T, UseShared>(attenuation, weights, materials, rows, bins, rays_per_set, mu, w);
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n_rays) return;
  T a[kMaxMaterials];
  load_ray(mass_thickness, ray, materials, a);
  spectral_ray_forward<T, MaxQ, MaxM>(a, materials, mu, ray_weights<T, UseShared>(w, ray, rays_per_set, rows, bins),
                                      rows, bins, starts, groups, out + ray * rows * groups);
}

template <typename T, int MaxQ, int MaxM, bool UseShared>
__global__ void __launch_bounds__(kThreadsPerBlock)
    spectral_backward_kernel(const T* __restrict__ mass_thickness, const T* __restrict__ attenuation,
                             const T* __restrict__ weights, const int64_t* __restrict__ starts, int materials,
                             int rows, int64_t bins, int64_t groups, int64_t n_rays, int64_t rays_per_set,
                             const T* __restrict__ output, const T* __restrict__ grad_output,
                             T* __restrict__ grad_mass_thickness) {
  const T* mu;
  const T* w;
  stage_tables<T, UseShared>(attenuation, weights, materials, rows, bins, rays_per_set, mu, w);
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n_rays) return;
  T a[kMaxMaterials];
  load_ray(mass_thickness, ray, materials, a);
  const int64_t offset = ray * rows * groups;
  spectral_ray_backward<T, MaxQ, MaxM>(a, materials, mu,
                                       ray_weights<T, UseShared>(w, ray, rays_per_set, rows, bins), rows, bins,
                                       starts, groups, output + offset, grad_output + offset,
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

// Calls f(max_rows, max_materials, use_shared) with the three compile-time choices of a launch.
template <typename F>
void dispatch_spectral_launch(int64_t rows, int64_t materials, bool use_shared, F&& f) {
  dispatch_spectral_bounds(rows, materials, [&](auto max_rows, auto max_materials) {
    if (use_shared) {
      f(max_rows, max_materials, std::true_type{});
    } else {
      f(max_rows, max_materials, std::false_type{});
    }
  });
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
    dispatch_spectral_launch(rows, materials, shared > 0, [&](auto max_rows, auto max_materials, auto use_shared) {
      spectral_forward_kernel<scalar_t, decltype(max_rows)::value, decltype(max_materials)::value,
                              decltype(use_shared)::value><<<blocks_for(n_rays), kThreadsPerBlock, shared, stream>>>(
          mass_thickness.const_data_ptr<scalar_t>(), attenuation.const_data_ptr<scalar_t>(),
          weights.const_data_ptr<scalar_t>(), starts.const_data_ptr<int64_t>(), materials, rows, bins, groups,
          n_rays, rays_per_set, out.mutable_data_ptr<scalar_t>());
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
    dispatch_spectral_launch(rows, materials, shared > 0, [&](auto max_rows, auto max_materials, auto use_shared) {
      spectral_backward_kernel<scalar_t, decltype(max_rows)::value, decltype(max_materials)::value,
                               decltype(use_shared)::value><<<blocks_for(n_rays), kThreadsPerBlock, shared, stream>>>(
          mass_thickness.const_data_ptr<scalar_t>(), attenuation.const_data_ptr<scalar_t>(),
          weights.const_data_ptr<scalar_t>(), starts.const_data_ptr<int64_t>(), materials, rows, bins, groups,
          n_rays, rays_per_set, output.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
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

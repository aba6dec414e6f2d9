// CUDA implementation of torchdrr::montecarlo_transport: one thread per photon (a grid-stride loop over all cameras'
// photons), on the current stream, with the per-photon history shared with the CPU kernel (transport_math.h). The
// tallies are float64 atomics: a photon adds to one pixel once, so contention is low, and float64 sums of 10^9
// deposits keep their precision. The order of the atomics varies, so repeated runs agree to rounding, not bits.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "montecarlo.h"

namespace torchdrr {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kBlocksPerSM = 8;  // resident photons enough to hide the voxel reads' latency

constexpr int64_t kAbsorbedSlots = 256;  // accumulators of the absorbed energy per camera (spread the atomics)

struct AtomicDeposit {
  double* tally;     // [B, 6, H, W]
  double* absorbed_sums;  // [B, M, 2, kAbsorbedSlots]
  int materials;
  int64_t height, width;
  TDRR_HD void absorbed(int camera, int material, float value) const {
#if defined(__CUDA_ARCH__)
    const double v = value;
    const int64_t slot = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) % kAbsorbedSlots;
    double* at = absorbed_sums + (static_cast<int64_t>(camera) * materials + material) * 2 * kAbsorbedSlots + slot;
    atomicAdd(at, v);
    atomicAdd(at + kAbsorbedSlots, v * v);
#endif
  }
  TDRR_HD void detected(int camera, int which, int64_t row, int64_t column, float value) const {
#if defined(__CUDA_ARCH__)
    const int64_t plane = height * width;
    double* at = tally + (static_cast<int64_t>(camera) * 2 * mc::kTallies + which) * plane + row * width + column;
    const double v = value;
    atomicAdd(at, v);
    atomicAdd(at + mc::kTallies * plane, v * v);
#endif
  }
};

__global__ void __launch_bounds__(kThreadsPerBlock)
    transport_kernel(const mc::TransportScene scene, int64_t photons, int64_t total, AtomicDeposit deposit) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total; index += stride) {
    const int camera = static_cast<int>(index / photons);
    mc::transport_photon(scene, camera, scene.first_photon + index % photons, deposit);
  }
}

std::tuple<at::Tensor, at::Tensor> montecarlo_transport_cuda(const at::Tensor& densities, const at::Tensor& affine, const at::Tensor& sources,
                                     const at::Tensor& ray_matrices, int64_t height, int64_t width,
                                     c10::ArrayRef<double> field, const at::Tensor& spectrum_energy,
                                     const at::Tensor& spectrum_cdf, double grid_start, double grid_step,
                                     const at::Tensor& interaction, const at::Tensor& majorant,
                                     const at::Tensor& efficiency, double energy_cutoff, const at::Tensor& compton_sf,
                                     double compton_x_step, const at::Tensor& rayleigh_icdf,
                                     const at::Tensor& rayleigh_fraction, int64_t photons, int64_t seed,
                                     int64_t first_photon, double grid_ratio, double grid_transmission,
                                     bool falloff) {
  const c10::cuda::CUDAGuard guard(densities.device());
  const TransportArgs args{densities,    affine,        sources,     ray_matrices,      height,     width,
                           field,        spectrum_energy, spectrum_cdf, grid_start,     grid_step,  interaction,
                           majorant,     efficiency,    energy_cutoff, compton_sf,     compton_x_step, rayleigh_icdf,
                           rayleigh_fraction, photons,  seed,        first_photon,      grid_ratio, grid_transmission,
                           falloff};
  const PreparedTransport prepared = prepare_transport(args, c10::DeviceType::CUDA);
  at::Tensor out = empty_tally(prepared, densities);
  at::Tensor absorbed = empty_absorbed(prepared, densities, kAbsorbedSlots);
  const int64_t total = prepared.cameras * photons;
  if (total == 0) return {out, absorbed.sum(-1)};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, densities.device().index()));
  const int64_t needed = (total + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(needed, int64_t{sms} * kBlocksPerSM));
  const AtomicDeposit deposit{out.mutable_data_ptr<double>(), absorbed.mutable_data_ptr<double>(),
                              prepared.scene.materials, height, width};
  transport_kernel<<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(prepared.scene, photons, total,
                                                                                         deposit);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, absorbed.sum(-1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CUDA, m) { m.impl("montecarlo_transport", &montecarlo_transport_cuda); }

}  // namespace torchdrr

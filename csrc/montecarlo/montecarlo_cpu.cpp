// CPU implementation of torchdrr::montecarlo_transport: the photons are split into one contiguous range per task;
// each task tallies into its own buffer (no atomics), and the buffers are summed in task order, so a run is
// reproducible for a given thread count. Every photon is the shared history of transport_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "montecarlo.h"

namespace torchdrr {
namespace {

// At least this many photons per task: fewer would spend more time clearing and summing tallies than transporting.
constexpr int64_t kMinPhotonsPerTask = 4096;

struct BufferDeposit {
  double* tally;     // [B, 6, H, W]
  double* absorbed_sums;  // [B, M, 2]
  int materials;
  int64_t height, width;
  void absorbed(int camera, int material, float value) const {
    const double v = value;
    double* at = absorbed_sums + 2 * (static_cast<int64_t>(camera) * materials + material);
    at[0] += v;
    at[1] += v * v;
  }
  void detected(int camera, int which, int64_t row, int64_t column, float value) const {
    const int64_t plane = height * width;
    double* at = tally + (static_cast<int64_t>(camera) * 2 * mc::kTallies + which) * plane + row * width + column;
    const double v = value;
    at[0] += v;
    at[mc::kTallies * plane] += v * v;
  }
};

std::tuple<at::Tensor, at::Tensor> montecarlo_transport_cpu(const at::Tensor& densities, const at::Tensor& affine, const at::Tensor& sources,
                                    const at::Tensor& ray_matrices, int64_t height, int64_t width,
                                    c10::ArrayRef<double> field, const at::Tensor& spectrum_energy,
                                    const at::Tensor& spectrum_cdf, double grid_start, double grid_step,
                                    const at::Tensor& interaction, const at::Tensor& majorant,
                                    const at::Tensor& efficiency, double energy_cutoff, const at::Tensor& compton_sf,
                                    double compton_x_step, const at::Tensor& rayleigh_icdf,
                                    const at::Tensor& rayleigh_fraction, int64_t photons, int64_t seed,
                                    int64_t first_photon, double grid_ratio, double grid_transmission, bool falloff) {
  const TransportArgs args{densities,    affine,        sources,     ray_matrices,      height,     width,
                           field,        spectrum_energy, spectrum_cdf, grid_start,     grid_step,  interaction,
                           majorant,     efficiency,    energy_cutoff, compton_sf,     compton_x_step, rayleigh_icdf,
                           rayleigh_fraction, photons,  seed,        first_photon,      grid_ratio, grid_transmission,
                           falloff};
  const PreparedTransport prepared = prepare_transport(args, c10::DeviceType::CPU);
  at::Tensor out = empty_tally(prepared, densities);
  at::Tensor absorbed = empty_absorbed(prepared, densities, 1).squeeze(-1);
  const int64_t total = prepared.cameras * photons;
  if (total == 0) return {out, absorbed};
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (total + kMinPhotonsPerTask - 1) / kMinPhotonsPerTask));
  const int64_t per_task = out.numel() + absorbed.numel();  // a task's tally, then its absorbed sums
  at::Tensor buffers = at::zeros({tasks, per_task}, out.options());
  double* base = buffers.mutable_data_ptr<double>();
  const mc::TransportScene scene = prepared.scene;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      double* buffer = base + task * per_task;
      const BufferDeposit deposit{buffer, buffer + out.numel(), scene.materials, height, width};
      const int64_t first = total * task / tasks, last = total * (task + 1) / tasks;
      for (int64_t index = first; index < last; ++index) {
        const int camera = static_cast<int>(index / photons);
        mc::transport_photon(scene, camera, first_photon + index % photons, deposit);
      }
    }
  });
  // Summed one buffer after another, in task order: the same tally for the same thread count.
  for (int64_t task = 0; task < tasks; ++task) {
    out.view(-1).add_(buffers[task].slice(0, 0, out.numel()));
    absorbed.view(-1).add_(buffers[task].slice(0, out.numel()));
  }
  return {out, absorbed};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CPU, m) { m.impl("montecarlo_transport", &montecarlo_transport_cpu); }

}  // namespace torchdrr

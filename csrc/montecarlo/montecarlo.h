// Host-side pieces of the Monte Carlo transport op shared by the CPU and CUDA implementations: input checks and the
// scene the kernels read. The per-photon physics is in transport_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "transport_math.h"

namespace torchdrr {

// The op's arguments, as the schema in csrc/ops.cpp lists them.
struct TransportArgs {
  const at::Tensor& densities;
  const at::Tensor& affine;
  const at::Tensor& sources;
  const at::Tensor& ray_matrices;
  int64_t height, width;
  c10::ArrayRef<double> field;
  const at::Tensor& spectrum_energy;
  const at::Tensor& spectrum_cdf;
  double grid_start, grid_step;
  const at::Tensor& interaction;
  const at::Tensor& majorant;
  const at::Tensor& efficiency;
  double energy_cutoff;
  const at::Tensor& compton_sf;
  double compton_x_step;
  const at::Tensor& rayleigh_icdf;
  const at::Tensor& rayleigh_fraction;
  int64_t photons, seed, first_photon;
  double grid_ratio, grid_transmission;
  bool falloff;
};

// A checked scene and the contiguous float32 tensors its pointers read (keep it alive while a kernel runs).
struct PreparedTransport {
  mc::TransportScene scene;
  int64_t cameras;
  std::vector<at::Tensor> keep;
};

// Checks every argument (ValueError/TypeError naming it; values are not scanned, which would make the host wait
// for the GPU) and builds the scene on `device`. Validation lives in montecarlo_host.cpp, compiled by the C++
// compiler only (see raycast.h for why messages that format numbers stay out of .cu objects).
PreparedTransport prepare_transport(const TransportArgs& args, c10::DeviceType device);

// The tally the op returns: [B, 6, H, W] float64 zeros (primary, single, multiple; then their squares).
at::Tensor empty_tally(const PreparedTransport& prepared, const at::Tensor& like);

// [B, M, 2, slots] float64 zeros for the energy absorbed in each material (sum, sum of squares over photons), spread
// over `slots` accumulators so that GPU atomics do not all hit one address; the op returns its sum over slots.
at::Tensor empty_absorbed(const PreparedTransport& prepared, const at::Tensor& like, int64_t slots);

}  // namespace torchdrr

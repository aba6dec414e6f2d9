// Host-side pieces of the log-weighted-transmission ops shared by the CPU and CUDA implementations: input checks and
// the compile-time dispatch on the number of weight rows. The per-ray math is in spectral_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "spectral_math.h"

namespace torchdrr {

// All validation lives in spectral_host.cpp, compiled by the C++ compiler only: error messages that format integers
// must not be instantiated in a .cu object (see raycast.h for the crash this avoids).

// Checks the forward's contract for direct callers of torch.ops.torchdrr.log_weighted_transmission_forward (the
// Python wrapper validates user input with friendlier messages first): mass_thickness [N, M], attenuation [M, E],
// weights [Q, E] or [S, Q, E] with N divisible by S, float32/float64, one dtype and one device of type `device`, 1 <= M, Q <= 8, E >= 1, and
// group_starts G + 1 >= 2 non-decreasing values in [0, E]. Weight values are not scanned here (that would need a
// device sync on CUDA); the kernels ignore non-positive weights, so bad values cannot cause out-of-bounds reads.
void check_spectral_inputs(const at::Tensor& mass_thickness, const at::Tensor& attenuation, const at::Tensor& weights,
                           c10::IntArrayRef group_starts, c10::DeviceType device);

// Checks the backward's grad_output and output: both [N, Q, G] with mass_thickness's dtype and device.
void check_spectral_grad(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& mass_thickness,
                         int64_t rows, int64_t groups);

// Rays per weight table: N / S for [S, Q, E] weights (S = 1 for [Q, E]); at least 1, so that it can divide.
int64_t rays_per_weight_set(const at::Tensor& mass_thickness, const at::Tensor& weights);

// group_starts as an int64 tensor on `device`, for kernels that cannot read the host list.
at::Tensor group_starts_tensor(c10::IntArrayRef group_starts, const c10::Device& device);

// Calls f(std::integral_constant<int, MaxQ>) with the smallest register bound MaxQ in {1, 2, 4, 8} >= rows.
template <typename F>
void dispatch_weight_rows(int64_t rows, F&& f) {
  if (rows <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (rows <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (rows <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, kMaxWeightRows>{});
  }
}

// Calls f(std::integral_constant<int, MaxM>) with MaxM = materials for 1 to 4 materials (an exact count: no run-time
// guards in the per-bin loop) and the bound kMaxMaterials above that.
template <typename F>
void dispatch_materials(int64_t materials, F&& f) {
  switch (materials) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    default:
      f(std::integral_constant<int, kMaxMaterials>{});
  }
}

// Calls f(max_rows, max_materials) with both compile-time bounds (dispatch_weight_rows, dispatch_materials).
template <typename F>
void dispatch_spectral_bounds(int64_t rows, int64_t materials, F&& f) {
  dispatch_weight_rows(rows, [&](auto max_rows) {
    dispatch_materials(materials, [&](auto max_materials) { f(max_rows, max_materials); });
  });
}

}  // namespace torchdrr

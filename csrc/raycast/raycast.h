// Host-side pieces of the raycast ops shared by the CPU and CUDA implementations: input checks, the volume geometry
// built from the affine, and the compile-time channel dispatch. The per-ray math is in ray_math.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "ray_math.h"

namespace torchdrr {

// Matches the integer codes the Python wrapper passes (torchdrr/ops/raycast.py).
enum RaycastMode : int64_t { kSiddon = 0, kTrilinear = 1 };

// Checks the op's own contract. The Python wrapper validates user input with friendlier messages first; these
// checks protect direct callers of torch.ops.torchdrr.* from crashes. TORCH_CHECK_VALUE raises ValueError and
// TORCH_CHECK_TYPE raises TypeError in Python.
inline void check_raycast_inputs(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                                 const at::Tensor& targets, int64_t mode, double step, c10::DeviceType device) {
  TORCH_CHECK_VALUE(volume.dim() == 4, "raycast: volume must be [C, I, J, K], got shape ", volume.sizes());
  TORCH_CHECK_VALUE(volume.size(0) >= 1 && volume.size(1) >= 1 && volume.size(2) >= 1 && volume.size(3) >= 1,
                    "raycast: volume must have at least one channel and one voxel per axis, got shape ",
                    volume.sizes());
  TORCH_CHECK_TYPE(volume.scalar_type() == at::kFloat || volume.scalar_type() == at::kDouble,
                   "raycast: volume must be float32 or float64, got ", volume.scalar_type());
  TORCH_CHECK_TYPE(sources.scalar_type() == volume.scalar_type() && targets.scalar_type() == volume.scalar_type(),
                   "raycast: sources and targets must have the volume's dtype ", volume.scalar_type(), ", got ",
                   sources.scalar_type(), " and ", targets.scalar_type());
  TORCH_CHECK_VALUE(sources.dim() == 2 && sources.size(1) == 3 && targets.sizes() == sources.sizes(),
                    "raycast: sources and targets must both be [N, 3], got ", sources.sizes(), " and ",
                    targets.sizes());
  TORCH_CHECK_VALUE(volume.device().type() == device && sources.device() == volume.device() &&
                        targets.device() == volume.device(),
                    "raycast: volume, sources and targets must be on one ", c10::DeviceTypeName(device),
                    " device, got ", volume.device(), ", ", sources.device(), " and ", targets.device());
  TORCH_CHECK_VALUE(affine.dim() == 2 && affine.size(0) == 4 && affine.size(1) == 4,
                    "raycast: affine must be [4, 4], got ", affine.sizes());
  TORCH_CHECK_VALUE(affine.device().is_cpu() && affine.scalar_type() == at::kDouble,
                    "raycast: the op takes the affine as a float64 CPU tensor, got ", affine.scalar_type(), " on ",
                    affine.device());
  TORCH_CHECK_VALUE(mode == kSiddon || mode == kTrilinear, "raycast: mode must be 0 (siddon) or 1 (trilinear), got ",
                    mode);
  TORCH_CHECK_VALUE(mode == kSiddon || (std::isfinite(step) && step >= 0.0),
                    "raycast: trilinear step must be a positive finite number of mm (0 for the default), got ", step);
}

// The volume in the layout the kernels read: any dense strides (contiguous or channels-last) are used as they are.
inline at::Tensor dense_volume(const at::Tensor& volume) {
  return volume.is_non_overlapping_and_dense() ? volume : volume.contiguous();
}

// Inverts the affine (in float64) and records sizes and strides. Rejects affines that are not finite, not affine
// (last row other than 0 0 0 1) or singular.
template <typename T>
VolumeGeometry<T> make_geometry(const at::Tensor& volume, const at::Tensor& affine) {
  const at::Tensor a = affine.contiguous();
  const double* m = a.data_ptr<double>();
  for (int e = 0; e < 16; ++e) {
    TORCH_CHECK_VALUE(std::isfinite(m[e]), "raycast: affine must be finite, got ", affine);
  }
  TORCH_CHECK_VALUE(m[12] == 0.0 && m[13] == 0.0 && m[14] == 0.0 && m[15] == 1.0,
                    "raycast: affine's last row must be [0, 0, 0, 1], got ", affine);
  // Inverse of the 3x3 linear part by cofactors.
  const double a00 = m[0], a01 = m[1], a02 = m[2], a10 = m[4], a11 = m[5], a12 = m[6], a20 = m[8], a21 = m[9],
               a22 = m[10];
  const double c00 = a11 * a22 - a12 * a21, c01 = a12 * a20 - a10 * a22, c02 = a10 * a21 - a11 * a20;
  const double det = a00 * c00 + a01 * c01 + a02 * c02;
  double scale = 0.0;
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) scale = std::max(scale, std::abs(m[4 * r + c]));
  TORCH_CHECK_VALUE(std::abs(det) > 1e-12 * scale * scale * scale && scale > 0.0,
                    "raycast: affine's 3x3 part must be invertible, got ", affine);
  const double inv[3][3] = {
      {c00 / det, (a02 * a21 - a01 * a22) / det, (a01 * a12 - a02 * a11) / det},
      {c01 / det, (a00 * a22 - a02 * a20) / det, (a02 * a10 - a00 * a12) / det},
      {c02 / det, (a01 * a20 - a00 * a21) / det, (a00 * a11 - a01 * a10) / det},
  };
  VolumeGeometry<T> g;
  for (int r = 0; r < 3; ++r) {
    double offset = 0.0;
    for (int c = 0; c < 3; ++c) {
      g.world_to_index[r][c] = static_cast<T>(inv[r][c]);
      offset -= inv[r][c] * m[4 * c + 3];
    }
    g.index_offset[r] = static_cast<T>(offset);
    g.size[r] = volume.size(r + 1);
    g.voxel_stride[r] = volume.stride(r + 1);
  }
  g.channel_stride = volume.stride(0);
  return g;
}

// The trilinear step in mm: the requested one, or for 0 the default, half the smallest voxel spacing (the norms of
// the affine's first three columns). Computed here rather than in Python so that torch.compile needs no .item().
inline double trilinear_step_mm(const at::Tensor& affine, double requested) {
  if (requested > 0.0) return requested;
  const at::Tensor a = affine.contiguous();
  const double* m = a.data_ptr<double>();
  double smallest = INFINITY;
  for (int c = 0; c < 3; ++c) {
    smallest = std::min(smallest, std::sqrt(m[c] * m[c] + m[4 + c] * m[4 + c] + m[8 + c] * m[8 + c]));
  }
  return 0.5 * smallest;
}

// Calls f(std::integral_constant<int, MaxC>) with the smallest register bound MaxC in {1, 2, 4, 8} that holds
// min(channels, kMaxChannelsPerWalk) channels, so that one walk of a ray serves up to 8 channels.
template <typename F>
void dispatch_channels(int64_t channels, F&& f) {
  if (channels <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (channels <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (channels <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, kMaxChannelsPerWalk>{});
  }
}

}  // namespace torchdrr

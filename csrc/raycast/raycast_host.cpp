// Host-side validation and setup of the raycast ops (see raycast.h for why this is not in the .cu file).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "raycast.h"

namespace torchdrr {

// TORCH_CHECK_VALUE raises ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
void check_raycast_inputs(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
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
  // The kernels take the neighbour along index axis 2 as a constant offset from a voxel's address when that axis is
  // the contiguous one (the trilinear sample's second load, `UnitK`). A volume stored with another axis contiguous
  // (i fastest, as NIfTI and DICOM store it, or j) has that axis relabelled as axis 2 here: the rows of the
  // world -> index map, the offsets, sizes and strides move together, so every ray and every result is the same.
  int contiguous = 2;
  for (int r = 0; r < 2; ++r) {
    if (g.size[r] > 1 && (g.size[contiguous] == 1 || g.voxel_stride[r] < g.voxel_stride[contiguous])) contiguous = r;
  }
  if (contiguous != 2) {
    for (int c = 0; c < 3; ++c) std::swap(g.world_to_index[contiguous][c], g.world_to_index[2][c]);
    std::swap(g.index_offset[contiguous], g.index_offset[2]);
    std::swap(g.size[contiguous], g.size[2]);
    std::swap(g.voxel_stride[contiguous], g.voxel_stride[2]);
  }
  return g;
}

int64_t check_channel_chunks(int64_t channels, int64_t max_channels) {
  const int64_t chunks = (channels + max_channels - 1) / max_channels;
  TORCH_CHECK_VALUE(chunks <= 65535, "camera_raycast: the GPU kernels take at most ", 65535 * max_channels,
                    " channels, got ", channels);
  return chunks;
}

void check_int32_span(const at::Tensor& volume) {
  int64_t span = 1;
  for (int d = 0; d < volume.dim(); ++d) span += (volume.size(d) - 1) * volume.stride(d);
  TORCH_CHECK_VALUE(span < (int64_t(1) << 31), "raycast: on the GPU a volume must span fewer than 2^31 elements, got ",
                    span, " (shape ", volume.sizes(), "); split the channels or render on the CPU");
}

bool has_packed_channels(const at::Tensor& volume, int64_t max_channels) {
  if (volume.size(0) != max_channels || volume.stride(0) != 1) return false;
  for (int d = 1; d < 4; ++d) {
    if (volume.size(d) > 1 && volume.stride(d) % max_channels != 0) return false;
  }
  const int64_t bytes = max_channels * static_cast<int64_t>(volume.element_size());
  return bytes % 16 == 0 && reinterpret_cast<std::uintptr_t>(volume.const_data_ptr()) % 16 == 0;
}

double trilinear_step_mm(const at::Tensor& affine, double requested) {
  if (requested > 0.0) return requested;
  const at::Tensor a = affine.contiguous();
  const double* m = a.data_ptr<double>();
  double smallest = INFINITY;
  for (int c = 0; c < 3; ++c) {
    smallest = std::min(smallest, std::sqrt(m[c] * m[c] + m[4 + c] * m[4 + c] + m[8 + c] * m[8 + c]));
  }
  return 0.5 * smallest;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& volume, int64_t n_rays) {
  const int64_t channels = volume.size(0);
  TORCH_CHECK_VALUE(grad_output.dim() == 2 && grad_output.size(0) == n_rays && grad_output.size(1) == channels &&
                        grad_output.device() == volume.device() && grad_output.scalar_type() == volume.scalar_type(),
                    "raycast_backward: grad_output must be [N, C] = [", n_rays, ", ", channels,
                    "] with the volume's dtype and device, got ", grad_output.sizes());
}

void check_camera_inputs(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                         const at::Tensor& ray_matrices, int64_t height, int64_t width, int64_t supersample,
                         int64_t mode, double step, c10::DeviceType device) {
  // The volume, affine, mode and step checks are raycast's; a stand-in [1, 3] ray pair passes its ray checks.
  TORCH_CHECK_VALUE(sources.dim() == 2 && sources.size(1) == 3 && sources.size(0) >= 1 && sources.size(0) <= 65535,
                    "camera_raycast: sources must be [B, 3] with 1 <= B <= 65535, got ", sources.sizes());
  TORCH_CHECK_VALUE(ray_matrices.dim() == 3 && ray_matrices.size(0) == sources.size(0) && ray_matrices.size(1) == 3 &&
                        ray_matrices.size(2) == 3,
                    "camera_raycast: ray_matrices must be [B, 3, 3] with the B of sources, got ", ray_matrices.sizes());
  TORCH_CHECK_TYPE(ray_matrices.scalar_type() == sources.scalar_type(),
                   "camera_raycast: ray_matrices must have the dtype of sources, got ", ray_matrices.scalar_type());
  TORCH_CHECK_VALUE(ray_matrices.device() == sources.device(),
                    "camera_raycast: ray_matrices must be on the device of sources, got ", ray_matrices.device());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && supersample >= 1 &&
                        height * width * supersample * supersample < (int64_t(1) << 31),
                    "camera_raycast: need height, width, supersample >= 1 and fewer than 2^31 rays an image, got ",
                    height, " x ", width, " x ", supersample);
  check_raycast_inputs(volume, affine, sources.narrow(0, 0, 1), sources.narrow(0, 0, 1), mode, step, device);
}

void check_voxel_quads(const at::Tensor& volume, const std::optional<at::Tensor>& quads, int64_t mode) {
  if (!quads.has_value()) return;
  const at::Tensor& q = *quads;
  TORCH_CHECK_VALUE(mode == kTrilinear, "camera_raycast: quads serve trilinear renders only, got mode ", mode);
  TORCH_CHECK_TYPE(volume.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat,
                   "camera_raycast: quads need a float32 volume and float32 quads, got ", volume.scalar_type(),
                   " and ", q.scalar_type());
  TORCH_CHECK_VALUE(volume.size(0) == 1, "camera_raycast: quads serve one-channel volumes, got ", volume.size(0),
                    " channels");
  TORCH_CHECK_VALUE(volume.is_non_overlapping_and_dense(),
                    "camera_raycast: quads need a dense volume (non-overlapping strides), got strides ",
                    volume.strides());
  TORCH_CHECK_VALUE(q.device() == volume.device(), "camera_raycast: quads must be on the volume's device ",
                    volume.device(), ", got ", q.device());
  bool layout = q.dim() == 5 && q.size(0) == 1 && q.size(4) == 4 && q.stride(4) == 1 &&
                reinterpret_cast<std::uintptr_t>(q.const_data_ptr()) % 16 == 0;
  for (int d = 1; layout && d < 4; ++d) {
    layout = q.size(d) == volume.size(d) && (volume.size(d) == 1 || q.stride(d) == 4 * volume.stride(d));
  }
  TORCH_CHECK_VALUE(layout, "camera_raycast: quads must be torchdrr.ops.trilinear_quads(volume): [1, ",
                    volume.size(1), ", ", volume.size(2), ", ", volume.size(3), ", 4] with strides 4x the volume's ",
                    volume.strides(), ", got shape ", q.sizes(), " and strides ", q.strides());
}

void check_camera_grad_output(const at::Tensor& grad_output, const at::Tensor& volume, int64_t batch, int64_t rays) {
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == batch && grad_output.size(1) == rays &&
                        grad_output.size(2) == volume.size(0) && grad_output.device() == volume.device() &&
                        grad_output.scalar_type() == volume.scalar_type(),
                    "camera_raycast_backward: grad_output must be [B, R, C] = [", batch, ", ", rays, ", ",
                    volume.size(0), "] with the volume's dtype and device, got ", grad_output.sizes());
}

void check_camera_jacobian(const at::Tensor& grad_output, const at::Tensor& jacobian, int64_t height, int64_t width,
                           int64_t supersample, c10::DeviceType device) {
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && supersample >= 1 &&
                        height * width * supersample * supersample < (int64_t(1) << 31),
                    "camera_raycast_pose_from_jacobian: need height, width, supersample >= 1 and fewer than 2^31 rays "
                    "an image, got ",
                    height, " x ", width, " x ", supersample);
  const int64_t rays = height * width * supersample * supersample;
  TORCH_CHECK_VALUE(jacobian.dim() == 4 && jacobian.size(0) >= 1 && jacobian.size(0) <= 65535 &&
                        jacobian.size(1) == rays && jacobian.size(2) >= 1 && jacobian.size(3) == 6,
                    "camera_raycast_pose_from_jacobian: jacobian must be [B, R, C, 6] with 1 <= B <= 65535 and R = ",
                    rays, " rays (", height, " x ", width, " x ", supersample, "^2), got ", jacobian.sizes());
  TORCH_CHECK_TYPE(jacobian.scalar_type() == at::kFloat || jacobian.scalar_type() == at::kDouble,
                   "camera_raycast_pose_from_jacobian: jacobian must be float32 or float64, got ",
                   jacobian.scalar_type());
  TORCH_CHECK_VALUE(jacobian.device().type() == device, "camera_raycast_pose_from_jacobian: jacobian must be on a ",
                    c10::DeviceTypeName(device), " device, got ", jacobian.device());
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == jacobian.size(0) &&
                        grad_output.size(1) == rays && grad_output.size(2) == jacobian.size(2) &&
                        grad_output.device() == jacobian.device() &&
                        grad_output.scalar_type() == jacobian.scalar_type(),
                    "camera_raycast_pose_from_jacobian: grad_output must be [B, R, C] = [", jacobian.size(0), ", ",
                    rays, ", ", jacobian.size(2), "] with the jacobian's dtype and device, got ", grad_output.sizes(),
                    " ", grad_output.scalar_type(), " on ", grad_output.device());
}

template VolumeGeometry<float> make_geometry<float>(const at::Tensor&, const at::Tensor&);
template VolumeGeometry<double> make_geometry<double>(const at::Tensor&, const at::Tensor&);

}  // namespace torchdrr

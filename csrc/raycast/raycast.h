// Host-side pieces of the raycast ops shared by the CPU and CUDA implementations: input checks, the volume geometry
// built from the affine, and the compile-time channel dispatch. The per-ray math is in ray_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "ray_math.h"

namespace torchdrr {

// Matches the integer codes the Python wrapper passes (torchdrr/ops/raycast.py).
enum RaycastMode : int64_t { kSiddon = 0, kTrilinear = 1 };

// Host-side validation and setup live in raycast_host.cpp, compiled by the C++ compiler only. Why: error messages
// format integers through std::ostream, and when nvcc's host pass instantiates those libstdc++ templates in the .cu
// object, the linker can bind every caller in the extension to that copy, which crashed on torch 2.11 + CUDA 13
// (seen on the H100). Keeping all formatting out of .cu files avoids it.

// Checks the op's own contract. The Python wrapper validates user input with friendlier messages first; these checks
// protect direct callers of torch.ops.torchdrr.* from crashes. They raise ValueError/TypeError in Python.
void check_raycast_inputs(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                          const at::Tensor& targets, int64_t mode, double step, c10::DeviceType device);

// Number of chunks of max_channels channels, which the camera kernels take as gridDim.z: at most 65535.
int64_t check_channel_chunks(int64_t channels, int64_t max_channels);

// Checks dLoss/dout of the backward: [N, C] with the volume's dtype and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& volume, int64_t n_rays);

// The volume in the layout the kernels read: any dense strides (contiguous or channels-last) are used as they are.
inline at::Tensor dense_volume(const at::Tensor& volume) {
  return volume.is_non_overlapping_and_dense() ? volume : volume.contiguous();
}

// The GPU walk (siddon_steps) keeps element offsets in 32 bits: checks that the volume spans fewer than 2^31
// elements (8 GiB of float32), with a clear error otherwise.
void check_int32_span(const at::Tensor& volume);

// True when the volume is channels-last ([C, I, J, K] viewed from a contiguous [I, J, K, C]) with exactly
// max_channels channels and 16-byte-aligned voxels, so the CUDA forward can read a voxel's channels with vector
// loads (ray_math.h, load_voxel). The DRR module lays its material densities out this way.
bool has_packed_channels(const at::Tensor& volume, int64_t max_channels);

// Inverts the affine (in float64) and records sizes and strides. Rejects affines that are not finite, not affine
// (last row other than 0 0 0 1) or singular. Instantiated for float and double.
template <typename T>
VolumeGeometry<T> make_geometry(const at::Tensor& volume, const at::Tensor& affine);

// The trilinear step in mm: the requested one, or for 0 the default, half the smallest voxel spacing (the norms of
// the affine's first three columns). Computed here rather than in Python so that torch.compile needs no .item().
double trilinear_step_mm(const at::Tensor& affine, double requested);

// The CPU ops (raycast_cpu.cpp), also the building blocks of the CPU camera op (camera_raycast_cpu.cpp).
at::Tensor raycast_forward_cpu(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                               const at::Tensor& targets, int64_t mode, double step);
std::tuple<at::Tensor, at::Tensor, at::Tensor> raycast_backward_cpu(const at::Tensor& grad_output,
                                                                    const at::Tensor& volume,
                                                                    const at::Tensor& affine,
                                                                    const at::Tensor& sources,
                                                                    const at::Tensor& targets, int64_t mode,
                                                                    double step, bool volume_grad, bool rays_grad);
// The forward together with each ray's Jacobian (ray_math.h, ray_forward_jacobian): (out [N, C], jacobian [N, C, 6]
// = (dF_c/ds, dF_c/dt) in world mm). What the CPU camera_raycast_forward_jacobian casts its pixel rays with.
std::tuple<at::Tensor, at::Tensor> raycast_forward_jacobian_cpu(const at::Tensor& volume, const at::Tensor& affine,
                                                              const at::Tensor& sources, const at::Tensor& targets,
                                                              int64_t mode, double step);

// Checks the camera op's own contract (camera_raycast_{cpu.cpp,cuda.cu}): sources [B, 3], ray_matrices [B, 3, 3]
// with the volume's dtype and device, a positive detector size, B <= 65535, fewer than 2^31 rays an image.
void check_camera_inputs(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                         const at::Tensor& ray_matrices, int64_t height, int64_t width, int64_t supersample,
                         int64_t mode, double step, c10::DeviceType device);

// Checks the voxel quads the trilinear camera forward may read (ray_math.h, VoxelQuad; torchdrr.ops.trilinear_quads):
// none, or, for a trilinear render of a dense one-channel float32 volume [1, I, J, K], a float32 [1, I, J, K, 4] on
// its device whose spatial strides are 4x the volume's, 16-byte aligned. Their values are the caller's promise.
void check_voxel_quads(const at::Tensor& volume, const std::optional<at::Tensor>& quads, int64_t mode);

// Checks dLoss/dout of the camera backward: [B, R, C] with the volume's dtype and device.
void check_camera_grad_output(const at::Tensor& grad_output, const at::Tensor& volume, int64_t batch, int64_t rays);

// Checks the inputs of camera_raycast_pose_from_jacobian: jacobian [B, R, C, 6] float32/float64 on a `device` device
// with 1 <= B <= 65535 and R = height * width * supersample^2 rays (fewer than 2^31), and grad_output [B, R, C] with
// its dtype and device.
void check_camera_jacobian(const at::Tensor& grad_output, const at::Tensor& jacobian, int64_t height, int64_t width,
                           int64_t supersample, c10::DeviceType device);

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

// CPU implementation of torchdrr::camera_raycast_forward and camera_raycast_backward. The CPU gains nothing from
// making rays inside the kernel (its cost is the voxel walk, and its locality sort needs the rays anyway), so this
// builds each camera's pixel rays and runs the CPU raycast op on them; the backward then reduces the per-ray
// endpoint gradients to the pose gradients: d/d source = sum(g_s + g_t), d/d ray_matrix = sum g_t (u, v, 1)^T.
#include <torch/library.h>

#include "raycast.h"

namespace torchdrr {
namespace {

// Homogeneous image coordinates (u, v, 1) of every ray in the op's order: row, column, sub-row, sub-column.
at::Tensor pixel_grid(int64_t height, int64_t width, int64_t supersample, const at::TensorOptions& options) {
  const double s = static_cast<double>(supersample);
  const at::Tensor sub = (at::arange(supersample, options) + 0.5) / s - 0.5;                  // [s]
  const at::Tensor rows = at::arange(height, options).view({height, 1, 1, 1}) + sub.view({1, 1, supersample, 1});
  const at::Tensor cols = at::arange(width, options).view({1, width, 1, 1}) + sub.view({1, 1, 1, supersample});
  const std::vector<int64_t> shape = {height, width, supersample, supersample};
  const at::Tensor u = cols.expand(shape).reshape({-1}), v = rows.expand(shape).reshape({-1});
  return at::stack({u, v, at::ones_like(u)}, 1);  // [R, 3]
}

// Sources and targets [B * R, 3] of all rays.
std::pair<at::Tensor, at::Tensor> camera_rays(const at::Tensor& sources, const at::Tensor& ray_matrices,
                                              const at::Tensor& pixels) {
  const int64_t batch = sources.size(0), rays = pixels.size(0);
  const at::Tensor directions = at::matmul(pixels.unsqueeze(0), ray_matrices.transpose(1, 2));  // [B, R, 3]
  const at::Tensor targets = sources.unsqueeze(1) + directions;
  return {sources.unsqueeze(1).expand({batch, rays, 3}).reshape({-1, 3}), targets.reshape({-1, 3})};
}

at::Tensor camera_raycast_forward_cpu(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                                      const at::Tensor& ray_matrices, int64_t height, int64_t width,
                                      int64_t supersample, int64_t mode, double step) {
  check_camera_inputs(volume, affine, sources, ray_matrices, height, width, supersample, mode, step,
                      c10::DeviceType::CPU);
  const at::Tensor pixels = pixel_grid(height, width, supersample, sources.options());
  const auto [ray_sources, ray_targets] = camera_rays(sources.contiguous(), ray_matrices.contiguous(), pixels);
  const at::Tensor out = raycast_forward_cpu(volume, affine, ray_sources, ray_targets, mode, step);
  return out.view({sources.size(0), pixels.size(0), volume.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> camera_raycast_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
    const at::Tensor& ray_matrices, int64_t height, int64_t width, int64_t supersample, int64_t mode, double step,
    bool volume_grad, bool pose_grad) {
  check_camera_inputs(volume, affine, sources, ray_matrices, height, width, supersample, mode, step,
                      c10::DeviceType::CPU);
  const int64_t batch = sources.size(0);
  const at::Tensor pixels = pixel_grid(height, width, supersample, sources.options());
  check_camera_grad_output(grad_output, volume, batch, pixels.size(0));
  const auto [ray_sources, ray_targets] = camera_rays(sources.contiguous(), ray_matrices.contiguous(), pixels);
  auto [grad_volume, grad_ray_sources, grad_ray_targets] =
      raycast_backward_cpu(grad_output.reshape({-1, volume.size(0)}), volume, affine, ray_sources, ray_targets, mode,
                           step, volume_grad, pose_grad);
  if (!pose_grad) return {grad_volume, at::empty({0}, volume.options()), at::empty({0}, volume.options())};
  const at::Tensor grad_t = grad_ray_targets.view({batch, -1, 3});
  const at::Tensor grad_sources = (grad_ray_sources.view({batch, -1, 3}) + grad_t).sum(1);
  const at::Tensor grad_matrices = at::matmul(grad_t.transpose(1, 2), pixels.unsqueeze(0));  // [B, 3, 3]
  return {grad_volume, grad_sources, grad_matrices};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CPU, m) {
  m.impl("camera_raycast_forward", &camera_raycast_forward_cpu);
  m.impl("camera_raycast_backward", &camera_raycast_backward_cpu);
}

}  // namespace torchdrr

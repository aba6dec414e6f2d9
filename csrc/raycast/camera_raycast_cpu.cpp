// CPU implementation of torchdrr::camera_raycast_forward, camera_raycast_backward, camera_raycast_forward_jacobian
// and camera_raycast_pose_from_jacobian. The CPU gains nothing from making rays inside the kernel (its cost is the
// voxel walk, and its locality sort needs the rays anyway), so this builds each camera's pixel rays and runs the CPU
// raycast ops on them; the backward then reduces the per-ray endpoint gradients to the pose gradients:
// d/d source = sum(g_s + g_t), d/d ray_matrix = sum g_t (u, v, 1)^T. The Jacobian pair does the same from the
// per-ray, per-channel (dF/ds, dF/dt) that the forward saved, without walking the rays again.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// quads: checked, then not read (the CPU's trilinear loop reads the volume; the quads would give the same image).
at::Tensor camera_raycast_forward_cpu(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                                      const at::Tensor& ray_matrices, int64_t height, int64_t width,
                                      int64_t supersample, int64_t mode, double step,
                                      const std::optional<at::Tensor>& quads) {
  check_camera_inputs(volume, affine, sources, ray_matrices, height, width, supersample, mode, step,
                      c10::DeviceType::CPU);
  check_voxel_quads(volume, quads, mode);
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

std::tuple<at::Tensor, at::Tensor> camera_raycast_forward_jacobian_cpu(
    const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources, const at::Tensor& ray_matrices,
    int64_t height, int64_t width, int64_t supersample, int64_t mode, double step) {
  check_camera_inputs(volume, affine, sources, ray_matrices, height, width, supersample, mode, step,
                      c10::DeviceType::CPU);
  const at::Tensor pixels = pixel_grid(height, width, supersample, sources.options());
  const auto [ray_sources, ray_targets] = camera_rays(sources.contiguous(), ray_matrices.contiguous(), pixels);
  const auto [out, jacobian] = raycast_forward_jacobian_cpu(volume, affine, ray_sources, ray_targets, mode, step);
  const int64_t batch = sources.size(0), rays = pixels.size(0), channels = volume.size(0);
  return {out.view({batch, rays, channels}), jacobian.view({batch, rays, channels, 6})};
}

// Rays per partial sum of the pose reduction. Fixed, so that the order of the float64 sums, and so the result, does
// not depend on the number of threads.
constexpr int64_t kPoseChunk = 4096;

std::tuple<at::Tensor, at::Tensor> camera_raycast_pose_from_jacobian_cpu(const at::Tensor& grad_output_in,
                                                                         const at::Tensor& jacobian_in,
                                                                         int64_t height, int64_t width,
                                                                         int64_t supersample) {
  check_camera_jacobian(grad_output_in, jacobian_in, height, width, supersample, c10::DeviceType::CPU);
  const at::Tensor grad_output = grad_output_in.contiguous(), jacobian = jacobian_in.contiguous();
  const int64_t batch = jacobian.size(0), rays = jacobian.size(1), channels = jacobian.size(2);
  const int64_t chunks = (rays + kPoseChunk - 1) / kPoseChunk;
  // partials[b, chunk] = [sum g (J_s + J_t) (3), sum g J_t (u, v, 1)^T (9, row-major)], as the CUDA blocks.
  std::vector<double> partials(static_cast<size_t>(batch * chunks * 12));
  AT_DISPATCH_FLOATING_TYPES(jacobian.scalar_type(), "camera_raycast_pose_from_jacobian_cpu", [&] {
    // The image coordinates the forward made its rays with, in its dtype.
    const at::Tensor pixels = pixel_grid(height, width, supersample, jacobian.options());
    const scalar_t* px = pixels.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* jac = jacobian.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, first = (task % chunks) * kPoseChunk;
        const int64_t last = std::min(rays, first + kPoseChunk);
        double parts[12] = {};
        for (int64_t ray = first; ray < last; ++ray) {
          const int64_t row = (b * rays + ray) * channels;
          double gs[3] = {0.0, 0.0, 0.0}, gt[3] = {0.0, 0.0, 0.0};
          for (int64_t c = 0; c < channels; ++c) {
            const double g = static_cast<double>(go[row + c]);
            const scalar_t* j = jac + (row + c) * 6;
            for (int a = 0; a < 3; ++a) {
              gs[a] += g * static_cast<double>(j[a]);
              gt[a] += g * static_cast<double>(j[3 + a]);
            }
          }
          const double u = static_cast<double>(px[3 * ray]), v = static_cast<double>(px[3 * ray + 1]);
          for (int a = 0; a < 3; ++a) {
            parts[a] += gs[a] + gt[a];
            parts[3 + 3 * a] += gt[a] * u;
            parts[4 + 3 * a] += gt[a] * v;
            parts[5 + 3 * a] += gt[a];
          }
        }
        std::copy(parts, parts + 12, partials.begin() + task * 12);
      }
    });
  });
  at::Tensor totals = at::zeros({batch, 12}, jacobian.options().dtype(at::kDouble));
  double* total = totals.mutable_data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int k = 0; k < 12; ++k) total[b * 12 + k] += partials[(b * chunks + chunk) * 12 + k];
    }
  }
  const at::Tensor cast = totals.to(jacobian.scalar_type());
  // Fresh contiguous tensors (storage offset 0), as the fake kernel promises.
  return {cast.narrow(1, 0, 3).clone(at::MemoryFormat::Contiguous),
          cast.narrow(1, 3, 9).reshape({batch, 3, 3}).clone(at::MemoryFormat::Contiguous)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CPU, m) {
  m.impl("camera_raycast_forward", &camera_raycast_forward_cpu);
  m.impl("camera_raycast_backward", &camera_raycast_backward_cpu);
  m.impl("camera_raycast_forward_jacobian", &camera_raycast_forward_jacobian_cpu);
  m.impl("camera_raycast_pose_from_jacobian", &camera_raycast_pose_from_jacobian_cpu);
}

}  // namespace torchdrr

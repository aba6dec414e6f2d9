// CPU implementation of torchdrr::log_weighted_transmission_forward and _backward: rays are spread over threads with
// at::parallel_for; each ray is processed by the shared per-ray code in spectral_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "spectral.h"

namespace torchdrr {
namespace {

// Rays per task: one ray costs about (2M + Q) E operations, tens to a few hundred per bin table.
constexpr int64_t kRayGrain = 256;

at::Tensor log_weighted_transmission_forward_cpu(const at::Tensor& mass_thickness_in, const at::Tensor& attenuation_in,
                                                 const at::Tensor& weights_in, c10::IntArrayRef group_starts) {
  check_spectral_inputs(mass_thickness_in, attenuation_in, weights_in, group_starts, c10::DeviceType::CPU);
  const at::Tensor mass_thickness = mass_thickness_in.contiguous();
  const at::Tensor attenuation = attenuation_in.contiguous(), weights = weights_in.contiguous();
  const int64_t n_rays = mass_thickness.size(0), bins = attenuation.size(1);
  const int materials = static_cast<int>(attenuation.size(0)), rows = static_cast<int>(weights.size(-2));
  const int64_t rays_per_set = rays_per_weight_set(mass_thickness, weights);
  const int64_t groups = static_cast<int64_t>(group_starts.size()) - 1;
  at::Tensor out = at::empty({n_rays, rows, groups}, mass_thickness.options());
  if (n_rays == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(mass_thickness.scalar_type(), "log_weighted_transmission_forward_cpu", [&] {
    const scalar_t* thickness = mass_thickness.const_data_ptr<scalar_t>();
    const scalar_t* mu = attenuation.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    const int64_t* starts = group_starts.data();
    dispatch_spectral_bounds(rows, materials, [&](auto max_rows, auto max_materials) {
      constexpr int kMaxQ = decltype(max_rows)::value;
      constexpr int kMaxM = decltype(max_materials)::value;
      at::parallel_for(0, n_rays, kRayGrain, [&](int64_t begin, int64_t end) {
        for (int64_t ray = begin; ray < end; ++ray) {
          scalar_t a[kMaxMaterials];
          load_ray(thickness, ray, materials, a);
          spectral_ray_forward<scalar_t, kMaxQ, kMaxM>(a, materials, mu,
                                                weight_set_of(w, ray, rays_per_set, rows, bins), rows, bins, starts, groups,
                                                result + ray * rows * groups);
        }
      });
    });
  });
  return out;
}

at::Tensor log_weighted_transmission_backward_cpu(const at::Tensor& grad_output_in, const at::Tensor& output_in,
                                                  const at::Tensor& mass_thickness_in,
                                                  const at::Tensor& attenuation_in, const at::Tensor& weights_in,
                                                  c10::IntArrayRef group_starts) {
  check_spectral_inputs(mass_thickness_in, attenuation_in, weights_in, group_starts, c10::DeviceType::CPU);
  const int64_t groups = static_cast<int64_t>(group_starts.size()) - 1;
  check_spectral_grad(grad_output_in, output_in, mass_thickness_in, weights_in.size(-2), groups);
  const at::Tensor mass_thickness = mass_thickness_in.contiguous();
  const at::Tensor attenuation = attenuation_in.contiguous(), weights = weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous(), output = output_in.contiguous();
  const int64_t n_rays = mass_thickness.size(0), bins = attenuation.size(1);
  const int materials = static_cast<int>(attenuation.size(0)), rows = static_cast<int>(weights.size(-2));
  const int64_t rays_per_set = rays_per_weight_set(mass_thickness, weights);
  at::Tensor grad_mass_thickness = at::empty({n_rays, materials}, mass_thickness.options());
  if (n_rays == 0) return grad_mass_thickness;
  AT_DISPATCH_FLOATING_TYPES(mass_thickness.scalar_type(), "log_weighted_transmission_backward_cpu", [&] {
    const scalar_t* thickness = mass_thickness.const_data_ptr<scalar_t>();
    const scalar_t* mu = attenuation.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    const scalar_t* out = output.const_data_ptr<scalar_t>();
    const scalar_t* gout = grad_output.const_data_ptr<scalar_t>();
    scalar_t* grad = grad_mass_thickness.mutable_data_ptr<scalar_t>();
    const int64_t* starts = group_starts.data();
    dispatch_spectral_bounds(rows, materials, [&](auto max_rows, auto max_materials) {
      constexpr int kMaxQ = decltype(max_rows)::value;
      constexpr int kMaxM = decltype(max_materials)::value;
      at::parallel_for(0, n_rays, kRayGrain, [&](int64_t begin, int64_t end) {
        for (int64_t ray = begin; ray < end; ++ray) {
          scalar_t a[kMaxMaterials];
          load_ray(thickness, ray, materials, a);
          const int64_t offset = ray * rows * groups;
          spectral_ray_backward<scalar_t, kMaxQ, kMaxM>(a, materials, mu, weight_set_of(w, ray, rays_per_set, rows, bins),
                                                 rows, bins, starts, groups, out + offset, gout + offset,
                                                 grad + ray * materials);
        }
      });
    });
  });
  return grad_mass_thickness;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CPU, m) {
  m.impl("log_weighted_transmission_forward", &log_weighted_transmission_forward_cpu);
  m.impl("log_weighted_transmission_backward", &log_weighted_transmission_backward_cpu);
}

}  // namespace torchdrr

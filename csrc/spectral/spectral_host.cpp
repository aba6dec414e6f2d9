// Host-side validation of the log-weighted-transmission ops (see spectral.h for why this is not in the .cu file).
#include <algorithm>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "spectral.h"

namespace torchdrr {

// TORCH_CHECK_VALUE raises ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
void check_spectral_inputs(const at::Tensor& mass_thickness, const at::Tensor& attenuation, const at::Tensor& weights,
                           c10::IntArrayRef group_starts, c10::DeviceType device) {
  TORCH_CHECK_TYPE(mass_thickness.scalar_type() == at::kFloat || mass_thickness.scalar_type() == at::kDouble,
                   "log_weighted_transmission: mass_thickness must be float32 or float64, got ",
                   mass_thickness.scalar_type());
  TORCH_CHECK_TYPE(attenuation.scalar_type() == mass_thickness.scalar_type() &&
                       weights.scalar_type() == mass_thickness.scalar_type(),
                   "log_weighted_transmission: attenuation and weights must have mass_thickness's dtype ",
                   mass_thickness.scalar_type(), ", got ", attenuation.scalar_type(), " and ", weights.scalar_type());
  TORCH_CHECK_VALUE(mass_thickness.dim() == 2, "log_weighted_transmission: mass_thickness must be [N, M], got shape ",
                    mass_thickness.sizes());
  TORCH_CHECK_VALUE(attenuation.dim() == 2, "log_weighted_transmission: attenuation must be [M, E], got shape ",
                    attenuation.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 2 || weights.dim() == 3,
                    "log_weighted_transmission: weights must be [Q, E] or [S, Q, E], got shape ", weights.sizes());
  const int64_t materials = attenuation.size(0), bins = attenuation.size(1), rows = weights.size(-2);
  TORCH_CHECK_VALUE(mass_thickness.size(1) == materials,
                    "log_weighted_transmission: mass_thickness [N, M] and attenuation [M, E] disagree on M: ",
                    mass_thickness.sizes(), " and ", attenuation.sizes());
  TORCH_CHECK_VALUE(weights.size(-1) == bins,
                    "log_weighted_transmission: weights [..., Q, E] and attenuation [M, E] disagree on E: ",
                    weights.sizes(), " and ", attenuation.sizes());
  if (weights.dim() == 3) {
    const int64_t sets = weights.size(0);
    TORCH_CHECK_VALUE(sets >= 1 && mass_thickness.size(0) % sets == 0,
                      "log_weighted_transmission: weights [S, Q, E] need N rays in S equal runs, got N = ",
                      mass_thickness.size(0), " and S = ", sets);
  }
  TORCH_CHECK_VALUE(materials >= 1 && materials <= kMaxMaterials, "log_weighted_transmission: M must be in [1, ",
                    kMaxMaterials, "], got ", materials);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kMaxWeightRows, "log_weighted_transmission: Q must be in [1, ",
                    kMaxWeightRows, "], got ", rows);
  TORCH_CHECK_VALUE(bins >= 1, "log_weighted_transmission: E must be at least 1, got ", bins);
  TORCH_CHECK_VALUE(mass_thickness.device().type() == device && attenuation.device() == mass_thickness.device() &&
                        weights.device() == mass_thickness.device(),
                    "log_weighted_transmission: mass_thickness, attenuation and weights must be on one ",
                    c10::DeviceTypeName(device), " device, got ", mass_thickness.device(), ", ",
                    attenuation.device(), " and ", weights.device());
  TORCH_CHECK_VALUE(group_starts.size() >= 2,
                    "log_weighted_transmission: group_starts must hold G + 1 >= 2 bin indices, got ",
                    group_starts.size());
  for (size_t g = 0; g < group_starts.size(); ++g) {
    TORCH_CHECK_VALUE(group_starts[g] >= 0 && group_starts[g] <= bins &&
                          (g == 0 || group_starts[g] >= group_starts[g - 1]),
                      "log_weighted_transmission: group_starts must be non-decreasing within [0, E = ", bins,
                      "], got ", group_starts);
  }
}

void check_spectral_grad(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& mass_thickness,
                         int64_t rows, int64_t groups) {
  const int64_t n_rays = mass_thickness.size(0);
  for (const at::Tensor* t : {&grad_output, &output}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == n_rays && t->size(1) == rows && t->size(2) == groups &&
                          t->device() == mass_thickness.device() &&
                          t->scalar_type() == mass_thickness.scalar_type(),
                      "log_weighted_transmission_backward: grad_output and output must be [N, Q, G] = [", n_rays,
                      ", ", rows, ", ", groups, "] with mass_thickness's dtype and device, got ", grad_output.sizes(),
                      " and ", output.sizes());
  }
}

int64_t rays_per_weight_set(const at::Tensor& mass_thickness, const at::Tensor& weights) {
  const int64_t sets = weights.dim() == 3 ? weights.size(0) : 1;
  return std::max<int64_t>(mass_thickness.size(0) / sets, 1);
}

at::Tensor group_starts_tensor(c10::IntArrayRef group_starts, const c10::Device& device) {
  const std::vector<int64_t> values(group_starts.begin(), group_starts.end());
  if (device.is_cpu()) return at::tensor(values, at::TensorOptions().dtype(at::kLong));
  // One device copy per (device, list), made once and kept for the life of the process: the lists are few (one per
  // energy grid and grouping, a few hundred bytes each), so a render copies nothing, and a CUDA graph that captured
  // a kernel reading the list stays valid (a per-call copy would be captured reading a host buffer that is then
  // freed). The map is never destroyed, so that no tensor is freed after CUDA has shut down at exit.
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, std::vector<int64_t>>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(device.index()), values);
  const auto found = cache->find(key);
  if (found != cache->end()) return found->second;
  // From pinned memory, without blocking: a copy from pageable memory would make the host wait until the GPU has
  // finished all the work queued before it (e.g. the ray cast), which serialised the CPU and the GPU.
  at::Tensor host = at::tensor(values, at::TensorOptions().dtype(at::kLong));
  at::Tensor on_device = host.pin_memory().to(device, /*non_blocking=*/true);
  cache->emplace(key, on_device);
  return on_device;
}

}  // namespace torchdrr

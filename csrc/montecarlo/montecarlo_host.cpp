// Host-side validation of the Monte Carlo transport op and the scene its kernels read (see montecarlo.h).
#include <cmath>

#include "montecarlo.h"

namespace torchdrr {
namespace {

constexpr const char* kOp = "montecarlo_transport";

// A float32 contiguous copy (or the tensor itself) on the op's device, with the expected shape.
at::Tensor float_table(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const at::Device& device,
                       std::vector<at::Tensor>& keep) {
  TORCH_CHECK_TYPE(t.is_floating_point(), kOp, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, kOp, ": ", name, " must be on the densities' device ", device, ", got ",
                    t.device());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || t.size(d) == shape[d];
  TORCH_CHECK_VALUE(ok, kOp, ": ", name, " must have shape ", c10::IntArrayRef(shape), " (-1: any), got ", t.sizes());
  keep.push_back(t.to(at::kFloat).contiguous());
  return keep.back();
}

}  // namespace

PreparedTransport prepare_transport(const TransportArgs& a, c10::DeviceType device_type) {
  PreparedTransport out;
  mc::TransportScene& s = out.scene;
  TORCH_CHECK_TYPE(a.densities.scalar_type() == at::kFloat, kOp, ": densities must be float32, got ",
                   a.densities.scalar_type());
  TORCH_CHECK_VALUE(a.densities.dim() == 4, kOp, ": densities must be [M, I, J, K], got ", a.densities.sizes());
  TORCH_CHECK_VALUE(a.densities.device().type() == device_type, kOp, ": densities must be on a ",
                    c10::DeviceTypeName(device_type), " device, got ", a.densities.device());
  const int64_t materials = a.densities.size(0);
  TORCH_CHECK_VALUE(materials >= 1 && materials <= mc::kMaxMaterials, kOp, ": densities must have 1 to ",
                    mc::kMaxMaterials, " material channels, got ", materials);
  for (int d = 1; d < 4; ++d) {
    TORCH_CHECK_VALUE(a.densities.size(d) >= 1, kOp, ": densities must not be empty, got ", a.densities.sizes());
  }
  const at::Device device = a.densities.device();
  // Channels-last: a Woodcock step reads every material of one voxel, so they sit side by side.
  out.keep.push_back(a.densities.permute({1, 2, 3, 0}).contiguous());
  s.densities = out.keep.back().const_data_ptr<float>();
  s.materials = static_cast<int>(materials);
  for (int d = 0; d < 3; ++d) s.size[d] = a.densities.size(d + 1);

  TORCH_CHECK_VALUE(a.affine.dim() == 2 && a.affine.size(0) == 4 && a.affine.size(1) == 4 && a.affine.is_cpu(), kOp,
                    ": affine must be a [4, 4] tensor on the CPU, got ", a.affine.sizes(), " on ", a.affine.device());
  const at::Tensor affine = a.affine.to(at::kDouble);
  TORCH_CHECK_VALUE(at::isfinite(affine).all().item<bool>(), kOp, ": affine must be finite");
  const at::Tensor linear = affine.slice(0, 0, 3).slice(1, 0, 3);
  const double det = at::linalg_det(linear).item<double>();
  TORCH_CHECK_VALUE(std::isfinite(det) && std::abs(det) > 1e-12, kOp,
                    ": affine's 3 x 3 part must be invertible, got determinant ", det);
  const at::Tensor inverse = at::linalg_inv(affine).contiguous();
  const double* inv = inverse.const_data_ptr<double>();
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 4; ++c) s.world_to_index[4 * r + c] = static_cast<float>(inv[4 * r + c]);
  }

  TORCH_CHECK_VALUE(a.sources.dim() == 2 && a.sources.size(1) == 3, kOp, ": sources must be [B, 3], got ",
                    a.sources.sizes());
  const int64_t cameras = a.sources.size(0);
  TORCH_CHECK_VALUE(cameras >= 1, kOp, ": sources must hold at least one camera, got ", a.sources.sizes());
  s.sources = float_table(a.sources, "sources", {cameras, 3}, device, out.keep).const_data_ptr<float>();
  s.ray_matrices =
      float_table(a.ray_matrices, "ray_matrices", {cameras, 3, 3}, device, out.keep).const_data_ptr<float>();
  out.cameras = cameras;
  TORCH_CHECK_VALUE(a.height >= 1 && a.width >= 1 && a.height <= (1 << 20) && a.width <= (1 << 20), kOp,
                    ": height and width must be 1 to 2^20 pixels, got ", a.height, " x ", a.width);
  s.height = static_cast<int>(a.height);
  s.width = static_cast<int>(a.width);
  TORCH_CHECK_VALUE(a.field.size() == 4, kOp, ": field must be [u_min, u_max, v_min, v_max], got ", a.field.size(),
                    " values");
  TORCH_CHECK_VALUE(std::isfinite(a.field[0]) && std::isfinite(a.field[1]) && std::isfinite(a.field[2]) &&
                        std::isfinite(a.field[3]) && a.field[0] < a.field[1] && a.field[2] < a.field[3],
                    kOp, ": field must be finite with u_min < u_max and v_min < v_max, got ", a.field);
  for (int c = 0; c < 4; ++c) s.field[c] = static_cast<float>(a.field[c]);

  const int64_t bins = a.spectrum_energy.dim() == 1 ? a.spectrum_energy.size(0) : -1;
  TORCH_CHECK_VALUE(bins >= 1, kOp, ": spectrum_energy must be [S] with S >= 1, got ", a.spectrum_energy.sizes());
  s.spectrum_energy = float_table(a.spectrum_energy, "spectrum_energy", {bins}, device, out.keep).const_data_ptr<float>();
  s.spectrum_cdf = float_table(a.spectrum_cdf, "spectrum_cdf", {bins}, device, out.keep).const_data_ptr<float>();
  s.spectrum_bins = static_cast<int>(bins);

  const int64_t points = a.interaction.dim() == 3 ? a.interaction.size(0) : -1;
  TORCH_CHECK_VALUE(points >= 2, kOp, ": interaction must be [G, M, 3] with G >= 2, got ", a.interaction.sizes());
  TORCH_CHECK_VALUE(std::isfinite(a.grid_start) && std::isfinite(a.grid_step) && a.grid_step > 0, kOp,
                    ": the energy grid needs a finite grid_start and grid_step > 0, got ", a.grid_start, " and ",
                    a.grid_step);
  s.grid_start = static_cast<float>(a.grid_start);
  s.grid_inv_step = static_cast<float>(1.0 / a.grid_step);
  s.grid_points = static_cast<int>(points);
  s.interaction = float_table(a.interaction, "interaction", {points, materials, mc::kInteractionKinds}, device,
                              out.keep)
                      .const_data_ptr<float>();
  s.majorant = float_table(a.majorant, "majorant", {points}, device, out.keep).const_data_ptr<float>();
  s.efficiency = float_table(a.efficiency, "efficiency", {points}, device, out.keep).const_data_ptr<float>();
  TORCH_CHECK_VALUE(std::isfinite(a.energy_cutoff) && a.energy_cutoff >= 0, kOp,
                    ": energy_cutoff must be a finite energy >= 0 keV, got ", a.energy_cutoff);
  s.energy_cutoff = static_cast<float>(a.energy_cutoff);

  const int64_t x_points = a.compton_sf.dim() == 2 ? a.compton_sf.size(1) : -1;
  TORCH_CHECK_VALUE(x_points >= 2, kOp, ": compton_sf must be [M, X] with X >= 2, got ", a.compton_sf.sizes());
  s.compton_sf = float_table(a.compton_sf, "compton_sf", {materials, x_points}, device, out.keep).const_data_ptr<float>();
  s.compton_points = static_cast<int>(x_points);
  TORCH_CHECK_VALUE(std::isfinite(a.compton_x_step) && a.compton_x_step > 0, kOp,
                    ": compton_x_step must be > 0 (1/Å), got ", a.compton_x_step);
  s.compton_inv_step = static_cast<float>(1.0 / a.compton_x_step);
  const int64_t u_points = a.rayleigh_icdf.dim() == 2 ? a.rayleigh_icdf.size(1) : -1;
  TORCH_CHECK_VALUE(u_points >= 2, kOp, ": rayleigh_icdf must be [M, U] with U >= 2, got ", a.rayleigh_icdf.sizes());
  s.rayleigh_icdf =
      float_table(a.rayleigh_icdf, "rayleigh_icdf", {materials, u_points}, device, out.keep).const_data_ptr<float>();
  s.rayleigh_points = static_cast<int>(u_points);
  s.rayleigh_fraction = float_table(a.rayleigh_fraction, "rayleigh_fraction", {materials, points}, device, out.keep)
                            .const_data_ptr<float>();

  TORCH_CHECK_VALUE(a.photons >= 0 && a.first_photon >= 0, kOp, ": photons and first_photon must be >= 0, got ",
                    a.photons, " and ", a.first_photon);
  TORCH_CHECK_VALUE(std::isfinite(a.grid_ratio) && a.grid_ratio >= 0, kOp,
                    ": grid_ratio must be >= 0 (0 = no grid), got ", a.grid_ratio);
  TORCH_CHECK_VALUE(a.grid_transmission > 0 && a.grid_transmission <= 1, kOp,
                    ": grid_transmission must be in (0, 1], got ", a.grid_transmission);
  s.grid_ratio = static_cast<float>(a.grid_ratio);
  s.grid_transmission = static_cast<float>(a.grid_transmission);
  s.falloff = a.falloff;
  s.seed = static_cast<uint64_t>(a.seed);
  s.first_photon = a.first_photon;
  return out;
}

at::Tensor empty_tally(const PreparedTransport& prepared, const at::Tensor& like) {
  return at::zeros({prepared.cameras, 2 * mc::kTallies, prepared.scene.height, prepared.scene.width},
                   like.options().dtype(at::kDouble));
}

at::Tensor empty_absorbed(const PreparedTransport& prepared, const at::Tensor& like, int64_t slots) {
  return at::zeros({prepared.cameras, prepared.scene.materials, 2, slots}, like.options().dtype(at::kDouble));
}

}  // namespace torchdrr

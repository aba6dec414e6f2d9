// Schemas of torchdrr's custom ops and the Python module that loads them. Kernels register themselves per device in
// csrc/<folder>/<op>_{cpu.cpp,cuda.cu} (raycast/raycast, raycast/camera_raycast, spectral/spectral,
// montecarlo/montecarlo); fake (meta) kernels and autograd are registered in
// torchdrr/ops/{raycast,camera_raycast,spectral,montecarlo}.py.
#include <Python.h>
#include <torch/library.h>

#ifndef TORCHDRR_WITH_CUDA
#define TORCHDRR_WITH_CUDA 0
#endif
#ifndef TORCHDRR_CUDA_ARCHS
#define TORCHDRR_CUDA_ARCHS ""
#endif
#ifndef TORCHDRR_TORCH_VERSION
#define TORCHDRR_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(torchdrr, m) {
  // Integrals along rays: volume [C, I, J, K], affine [4, 4] float64 on the CPU, sources/targets [N, 3] world mm,
  // mode 0 = siddon, 1 = trilinear, step in mm (trilinear only). Returns [N, C].
  m.def(
      "raycast_forward(Tensor volume, Tensor affine, Tensor sources, Tensor targets, int mode, float step) -> Tensor");
  // Gradients of raycast_forward given dLoss/dout [N, C]. Each requested gradient is computed only when its flag is
  // set; one not requested comes back as an empty tensor. Returns (grad_volume, grad_sources, grad_targets).
  m.def(
      "raycast_backward(Tensor grad_output, Tensor volume, Tensor affine, Tensor sources, Tensor targets, int mode, "
      "float step, bool volume_grad, bool rays_grad) -> (Tensor, Tensor, Tensor)");
  // Integrals along the pixel rays of B pinhole cameras: ray (b, pixel at image coordinates (u, v)) runs from
  // sources[b] ([B, 3] world mm) to sources[b] + ray_matrices[b] @ (u, v, 1) ([B, 3, 3]), over an H x W detector
  // with s x s sub-pixel rays per pixel. Returns [B, H * W * s * s, C] (rows, columns, sub-rows, sub-columns).
  // quads (trilinear, one float32 channel): the volume's voxel quads (ray_math.h, VoxelQuad), which the GPU's
  // interior samples read instead of the volume; the same image either way. The CPU checks and ignores them.
  m.def(
      "camera_raycast_forward(Tensor volume, Tensor affine, Tensor sources, Tensor ray_matrices, int height, "
      "int width, int supersample, int mode, float step, Tensor? quads=None) -> Tensor");
  // Gradients of camera_raycast_forward given dLoss/dout [B, R, C]: (grad_volume, grad_sources [B, 3],
  // grad_ray_matrices [B, 3, 3]); the pose gradients are summed over each camera's rays inside the kernel.
  m.def(
      "camera_raycast_backward(Tensor grad_output, Tensor volume, Tensor affine, Tensor sources, "
      "Tensor ray_matrices, int height, int width, int supersample, int mode, float step, bool volume_grad, "
      "bool pose_grad) -> (Tensor, Tensor, Tensor)");
  // camera_raycast_forward's image together with each ray's Jacobian: jacobian [B, R, C, 6] = (dF_c/ds, dF_c/dt) in
  // world mm (s, t the ray's source and target; the volume's dtype). Non-finite endpoints give NaN, rays that miss
  // the volume 0. What autograd saves when the pose needs a gradient, so that its backward walks no ray again.
  m.def(
      "camera_raycast_forward_jacobian(Tensor volume, Tensor affine, Tensor sources, Tensor ray_matrices, "
      "int height, int width, int supersample, int mode, float step) -> (Tensor, Tensor)");
  // The pose gradients from that Jacobian and dLoss/dout [B, R, C]: (grad_sources [B, 3] = sum g (J_s + J_t),
  // grad_ray_matrices [B, 3, 3] = sum g J_t (u, v, 1)^T), summed over rays and channels in float64 in a fixed order.
  m.def(
      "camera_raycast_pose_from_jacobian(Tensor grad_output, Tensor jacobian, int height, int width, "
      "int supersample) -> (Tensor, Tensor)");
  // Log of spectrally weighted, grouped transmission: mass_thickness [N, M] g/cm^2, attenuation [M, E] cm^2/g,
  // weights [Q, E] >= 0, group_starts G + 1 non-decreasing bin indices in [0, E]. Returns [N, Q, G]:
  // out[n, q, g] = log(sum_{e in group g} weights[q, e] exp(-sum_m attenuation[m, e] mass_thickness[n, m])).
  m.def(
      "log_weighted_transmission_forward(Tensor mass_thickness, Tensor attenuation, Tensor weights, "
      "int[] group_starts) -> Tensor");
  // dLoss/dmass_thickness [N, M] given dLoss/dout and the forward's output (both [N, Q, G]).
  m.def(
      "log_weighted_transmission_backward(Tensor grad_output, Tensor output, Tensor mass_thickness, "
      "Tensor attenuation, Tensor weights, int[] group_starts) -> Tensor");
  // Monte Carlo X-ray transport (csrc/montecarlo): `photons` histories per camera, numbered from first_photon, through
  // the material densities [M, I, J, K] (g/cm^3; affine as above) toward the detectors of camera_raycast's cameras
  // (sources [B, 3], ray_matrices [B, 3, 3], height x width pixels; field = [u_min, u_max, v_min, v_max], the
  // irradiated rectangle in image coordinates). Tables from torchdrr/physics/scatter_data.py: spectrum (energy [S]
  // keV, cumulative [S]); on the energy grid grid_start + g grid_step (G points): interaction [G, M, 3]
  // (photoelectric, Compton, Rayleigh per mm per g/cm^3), majorant [G] per mm, detector efficiency [G]; compton_sf
  // [M, X] (S(x) / Z, x step in 1/Å), rayleigh_icdf [M, U] (x^2 by cumulative F^2), rayleigh_fraction [M, G].
  // Optional focused linear grid (ratio 0 = none). Returns (tally [B, 6, H, W] float64: the detected energy (keV) of
  // primary, single-scatter and multiple-scatter photons, then the sums of their squares; absorbed [B, M, 2] float64:
  // the energy (keV) the photons left in each material, and the sum over photons of its square).
  m.def(
      "montecarlo_transport(Tensor densities, Tensor affine, Tensor sources, Tensor ray_matrices, int height, "
      "int width, float[] field, Tensor spectrum_energy, Tensor spectrum_cdf, float grid_start, float grid_step, "
      "Tensor interaction, Tensor majorant, Tensor efficiency, float energy_cutoff, Tensor compton_sf, "
      "float compton_x_step, Tensor rayleigh_icdf, Tensor rayleigh_fraction, int photons, int seed, "
      "int first_photon, float grid_ratio, float grid_transmission, bool falloff) -> (Tensor, Tensor)");
}

extern "C" {
// A plain module, so that `import torchdrr._C` loads the library and runs the registrations above; it also records
// how the library was built, for torchdrr.build_info().
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "torchdrr's compiled ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", TORCHDRR_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", TORCHDRR_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", TORCHDRR_TORCH_VERSION) < 0 ||
#ifdef _OPENMP
      PyModule_AddIntConstant(module, "OPENMP", 1) < 0
#else
      PyModule_AddIntConstant(module, "OPENMP", 0) < 0
#endif
  ) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

// Schemas of torchdrr::carm_ray_parameters and its backward: the pinhole ray parameters that camera_raycast takes,
// made from C-arm angles in one kernel launch (csrc/geometry/carm_ray_parameters_{cpu.cpp,cuda.cu}; fake kernels and
// autograd in torchdrr/ops/carm_ray_parameters.py). A fragment beside csrc/ops.cpp's TORCH_LIBRARY, so that this op
// is declared next to its kernels.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torchdrr, m) {
  // angles [B, 3] degrees (primary, secondary, in-plane), or [B, 1] (the primary angle; secondary_deg and
  // inplane_deg then hold the other two for every pose, so that the common call needs no kernel to stack them),
  // isocenter [3] or [B, 3] world mm, intrinsics [3, 3] or [B, 3, 3] (upper triangular K; only its upper triangle
  // is read), all of one float dtype and device; sod_mm and sdd_mm > 0. Computes in the inputs' dtype and returns
  // (sources [B, 3] mm, ray_matrices [B, 3, 3] = SDD R^T K^-1) in out_dtype: what carm_extrinsics followed by
  // camera_ray_parameters gives.
  m.def(
      "carm_ray_parameters(Tensor angles, Tensor isocenter, Tensor intrinsics, float sod_mm, float sdd_mm, "
      "ScalarType out_dtype, float secondary_deg=0., float inplane_deg=0.) -> (Tensor, Tensor)");
  // Gradients given dLoss/dsources [B, 3] and dLoss/dray_matrices [B, 3, 3] (float32 or float64): (grad_angles
  // shaped like angles, per degree, grad_isocenter shaped like isocenter, summed over the batch for a shared [3]),
  // in the inputs' dtype. K gets no gradient.
  m.def(
      "carm_ray_parameters_backward(Tensor grad_sources, Tensor grad_ray_matrices, Tensor angles, Tensor isocenter, "
      "Tensor intrinsics, float sod_mm, float sdd_mm, float secondary_deg=0., float inplane_deg=0.) -> "
      "(Tensor, Tensor)");
}

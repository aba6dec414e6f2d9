// Schemas of torchdrr::pose_ray_parameters and its backward: the pinhole ray parameters that camera_raycast takes,
// made from extrinsics (R, t) and K in one kernel launch (csrc/geometry/pose_ray_parameters_{cpu.cpp,cuda.cu}; fake
// kernels and autograd in torchdrr/ops/pose_ray_parameters.py). A fragment beside csrc/ops.cpp's TORCH_LIBRARY, so
// that this op is declared next to its kernels.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torchdrr, m) {
  // intrinsics [3, 3] or [B, 3, 3] (upper triangular K; only its upper triangle is read), rotation [B, 3, 3] (world
  // -> camera), translation [B, 3] mm, all of one float dtype and device; sdd_mm > 0. Computes in the inputs' dtype
  // and returns (sources [B, 3] = -R^T t, ray_matrices [B, 3, 3] = SDD R^T K^-1) in out_dtype: what
  // torchdrr.geometry.camera_ray_parameters' composite path gives.
  m.def(
      "pose_ray_parameters(Tensor intrinsics, Tensor rotation, Tensor translation, float sdd_mm, "
      "ScalarType out_dtype) -> (Tensor, Tensor)");
  // Gradients given dLoss/dsources [B, 3] and dLoss/dray_matrices [B, 3, 3] (float32 or float64): (grad_rotation
  // [B, 3, 3], grad_translation [B, 3]) in the inputs' dtype. K gets no gradient.
  m.def(
      "pose_ray_parameters_backward(Tensor grad_sources, Tensor grad_ray_matrices, Tensor intrinsics, "
      "Tensor rotation, Tensor translation, float sdd_mm) -> (Tensor, Tensor)");
}

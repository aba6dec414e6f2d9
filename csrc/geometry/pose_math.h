// Per-pose math of torchdrr::pose_ray_parameters, shared by the CPU and CUDA kernels (the kernels only decide how
// poses are spread over threads). It reuses carm_math.h's closed-form K^-1 and incoming-gradient layout.
//
// One pose: a world -> camera rotation R, a translation t (mm), an upper triangular pinhole K and the
// source-to-detector distance SDD. It reproduces torchdrr.geometry.camera_ray_parameters (design.md §3):
//   source     = -R^T t              (the camera centre in world mm)
//   ray_matrix = SDD R^T K^-1        (ray_matrix[i][k] = SDD sum_j R[j][i] K^-1[j][k])
//
// Backward, given gs = dL/dsource [3] and G = dL/dray_matrix [3, 3]:
//   dL/dR[j][i] = SDD sum_k K^-1[j][k] G[i][k] - t[j] gs[i]     i.e. dL/dR = SDD K^-1 G^T - t gs^T
//   dL/dt[j]    = -sum_i R[j][i] gs[i]                           i.e. dL/dt = -R gs
// K gets no gradient (the Python wrapper takes the composite path when it needs one).
#pragma once

#include <cstdint>

#include "../common/hd.h"
#include "carm_math.h"

namespace torchdrr {

// Where one batch of poses lives: element pointers and element strides, so that the kernels read any layout without
// a .contiguous() copy (another launch). A batch stride of 0 shares K between all poses.
template <typename T>
struct PoseInputs {
  const T* rotation;  // [B, 3, 3] world -> camera
  int64_t rotation_stride[3];
  const T* translation;  // [B, 3] mm
  int64_t translation_stride[2];
  const T* intrinsics;  // [B, 3, 3] (batch stride 0 for a shared [3, 3]); only the upper triangle is read
  int64_t intrinsics_stride[3];
  T sdd_mm;
  int64_t batch;
};

// The inputs of pose b: R (row-major), t and K^-1.
template <typename T>
TDRR_HD void load_pose(const PoseInputs<T>& in, int64_t b, T rotation[3][3], T translation[3], T k_inv[3][3]) {
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    translation[j] = in.translation[b * in.translation_stride[0] + j * in.translation_stride[1]];
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      rotation[j][i] =
          in.rotation[b * in.rotation_stride[0] + j * in.rotation_stride[1] + i * in.rotation_stride[2]];
    }
  }
  const T* k = in.intrinsics + b * in.intrinsics_stride[0];
  const int64_t r = in.intrinsics_stride[1], c = in.intrinsics_stride[2];
  upper_triangular_inverse(k[0], k[c], k[2 * c], k[r + c], k[r + 2 * c], k[2 * r + 2 * c], k_inv);
}

// Forward of one pose: source [3] (world mm) and ray_matrix [3][3] (row-major, mm per pixel).
template <typename T>
TDRR_HD void pose_ray_parameters_pose(const T rotation[3][3], const T translation[3], const T k_inv[3][3], T sdd_mm,
                                      T source[3], T ray_matrix[3][3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    T s = T(0);
#pragma unroll
    for (int j = 0; j < 3; ++j) s += rotation[j][i] * translation[j];
    source[i] = -s;
    // K^-1 is upper triangular: only j <= k contributes.
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      T sum = T(0);
#pragma unroll
      for (int j = 0; j <= k; ++j) sum += rotation[j][i] * k_inv[j][k];
      ray_matrix[i][k] = sdd_mm * sum;
    }
  }
}

// Backward of one pose: dL/dR [3][3] (row-major) and dL/dt [3] from grad_source [3] and grad_ray_matrix [3][3].
template <typename T>
TDRR_HD void pose_ray_parameters_pose_backward(const T rotation[3][3], const T translation[3], const T k_inv[3][3],
                                               T sdd_mm, const T grad_source[3], const T grad_ray_matrix[3][3],
                                               T grad_rotation[3][3], T grad_translation[3]) {
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    T gt = T(0);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      T sum = T(0);
#pragma unroll
      for (int k = j; k < 3; ++k) sum += k_inv[j][k] * grad_ray_matrix[i][k];
      grad_rotation[j][i] = sdd_mm * sum - translation[j] * grad_source[i];
      gt += rotation[j][i] * grad_source[i];
    }
    grad_translation[j] = -gt;
  }
}

// Pose b of a batch, what the CPU loop and the CUDA kernel each run per pose: the forward reads its inputs and writes
// its source and ray matrix into contiguous [B, 3] and [B, 3, 3] outputs of dtype O; the backward reads its inputs
// and incoming gradients and writes dL/dR and dL/dt into contiguous [B, 3, 3] and [B, 3] outputs.
template <typename T, typename O>
TDRR_HD void pose_ray_parameters_at(const PoseInputs<T>& in, int64_t b, O* sources, O* ray_matrices) {
  T rotation[3][3], translation[3], k_inv[3][3], source[3], matrix[3][3];
  load_pose(in, b, rotation, translation, k_inv);
  pose_ray_parameters_pose(rotation, translation, k_inv, in.sdd_mm, source, matrix);
  store_ray_parameters(source, matrix, b, sources, ray_matrices);
}

template <typename T, typename G>
TDRR_HD void pose_ray_parameters_backward_at(const PoseInputs<T>& in, const CarmGrads<G>& grads, int64_t b,
                                             T* grad_rotation, T* grad_translation) {
  T rotation[3][3], translation[3], k_inv[3][3], grad_source[3], grad_matrix[3][3];
  T pose_grad_rotation[3][3], pose_grad_translation[3];
  load_pose(in, b, rotation, translation, k_inv);
  load_carm_grads(grads, b, grad_source, grad_matrix);
  pose_ray_parameters_pose_backward(rotation, translation, k_inv, in.sdd_mm, grad_source, grad_matrix,
                                    pose_grad_rotation, pose_grad_translation);
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    grad_translation[b * 3 + j] = pose_grad_translation[j];
#pragma unroll
    for (int i = 0; i < 3; ++i) grad_rotation[b * 9 + j * 3 + i] = pose_grad_rotation[j][i];
  }
}

}  // namespace torchdrr

// Per-pose math of torchdrr::carm_ray_parameters, shared by the CPU and CUDA kernels (written once, so that the two
// cannot drift apart; the kernels only decide how poses are spread over threads).
//
// One pose: C-arm angles in degrees (primary a, secondary b, in-plane c), the isocenter p (world mm), an upper
// triangular pinhole K, the source-to-isocenter distance SOD and the source-to-detector distance SDD. It reproduces
// torchdrr.geometry.carm_extrinsics followed by camera_ray_parameters (design.md §3):
//   col_x = (ca, sa, 0),  col_y = (-sa sb, ca sb, -cb),  col_z = (-sa cb, ca cb, sb)   (columns of Rz(a) Rx(b) F)
//   R     = rows (cc col_x - sc col_y,  sc col_x + cc col_y,  col_z)                  (world -> camera)
//   source     = p - SOD col_z                  (= -R^T t with t = -R source, without the round trip through t)
//   ray_matrix = SDD R^T K^-1                   (R^T's columns are R's rows)
//
// Backward, given gs = dL/dsource [3] and G = dL/dray_matrix [3, 3]:
//   dL/d(row j of R) = SDD sum_k K^-1[j][k] G[:, k]                  (from ray_matrix = SDD sum_j row_j K^-1[j, :])
//   dL/dcol_x = cc g0 + sc g1,  dL/dcol_y = -sc g0 + cc g1,  dL/dcol_z = g2 - SOD gs
//   dL/dc = -g0 . row_1 + g1 . row_0                                 (d row_0/dc = -row_1, d row_1/dc = row_0)
//   dL/da = gx . (-sa, ca, 0) + gy . (-ca sb, -sa sb, 0) + gz . (-ca cb, -sa cb, 0)
//   dL/db = gy . col_z - gz . col_y                                  (d col_y/db = col_z, d col_z/db = -col_y)
//   dL/dp = gs
// The angle gradients are returned per degree (times pi / 180), as the op takes degrees.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/hd.h"

namespace torchdrr {

#if !defined(__CUDA_ARCH__)
using std::cos;
using std::sin;
#endif

// pi / 180 in double, as torch.deg2rad multiplies by it: the angles in radians then round as in the composite path.
constexpr double kDegreesToRadians = 3.14159265358979323846 / 180.0;

// Where one batch of poses lives: element pointers and element strides, so that the kernels read any layout (an
// expanded or transposed input needs no copy, which would be another kernel launch). A batch stride of 0 shares the
// isocenter or K between all poses.
template <typename T>
struct CarmInputs {
  const T* angles;         // [B, angle_count] degrees: primary, secondary, in-plane (or the primary only)
  int64_t angles_stride[2];
  int64_t angle_count;     // 3, or 1: secondary and in-plane are fixed_angles for every pose
  T fixed_angles[2];       // degrees
  const T* isocenter;      // [B, 3] (batch stride 0 for a shared [3]) world mm
  int64_t isocenter_stride[2];
  const T* intrinsics;     // [B, 3, 3] (batch stride 0 for a shared [3, 3]); only the upper triangle is read
  int64_t intrinsics_stride[3];
  T sod_mm;
  T sdd_mm;
  int64_t batch;
};

// Where the backward's incoming gradients live (in the outputs' dtype G, which may differ from the inputs' T):
// dL/dsources [B, 3] and dL/dray_matrices [B, 3, 3], strided like CarmInputs (autograd often hands in expanded
// gradients, e.g. of a sum).
template <typename G>
struct CarmGrads {
  const G* sources;
  int64_t sources_stride[2];
  const G* ray_matrices;
  int64_t ray_matrices_stride[3];
};

// The rotation of one pose and the frame it is built from.
template <typename T>
struct CarmFrame {
  T ca, sa, cb, sb, cc, sc;  // cos and sin of the three angles
  T col_x[3], col_y[3], col_z[3];
  T rows[3][3];  // R, world -> camera
};

template <typename T>
TDRR_HD CarmFrame<T> carm_frame(T primary_deg, T secondary_deg, T inplane_deg) {
  CarmFrame<T> f;
  const T a = primary_deg * T(kDegreesToRadians), b = secondary_deg * T(kDegreesToRadians),
          c = inplane_deg * T(kDegreesToRadians);
  f.ca = cos(a);
  f.sa = sin(a);
  f.cb = cos(b);
  f.sb = sin(b);
  f.cc = cos(c);
  f.sc = sin(c);
  f.col_x[0] = f.ca;
  f.col_x[1] = f.sa;
  f.col_x[2] = T(0);
  f.col_y[0] = -f.sa * f.sb;
  f.col_y[1] = f.ca * f.sb;
  f.col_y[2] = -f.cb;
  f.col_z[0] = -f.sa * f.cb;
  f.col_z[1] = f.ca * f.cb;
  f.col_z[2] = f.sb;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    f.rows[0][i] = f.cc * f.col_x[i] - f.sc * f.col_y[i];
    f.rows[1][i] = f.sc * f.col_x[i] + f.cc * f.col_y[i];
    f.rows[2][i] = f.col_z[i];
  }
  return f;
}

// K^-1 of an upper triangular K = [[k00, k01, k02], [0, k11, k12], [0, 0, k22]] in closed form (back substitution
// written out); the lower triangle of k_inv is set to 0 and that of K is never read.
template <typename T>
TDRR_HD void upper_triangular_inverse(T k00, T k01, T k02, T k11, T k12, T k22, T k_inv[3][3]) {
  const T i00 = T(1) / k00, i11 = T(1) / k11, i22 = T(1) / k22;
  k_inv[0][0] = i00;
  k_inv[0][1] = -k01 * i00 * i11;
  k_inv[0][2] = (k01 * k12 - k02 * k11) * i00 * i11 * i22;
  k_inv[1][0] = T(0);
  k_inv[1][1] = i11;
  k_inv[1][2] = -k12 * i11 * i22;
  k_inv[2][0] = T(0);
  k_inv[2][1] = T(0);
  k_inv[2][2] = i22;
}

// The inputs of pose b: angles (degrees), isocenter and K^-1.
template <typename T>
TDRR_HD void load_carm_pose(const CarmInputs<T>& in, int64_t b, T angles[3], T isocenter[3], T k_inv[3][3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    angles[i] = (i == 0 || in.angle_count == 3) ? in.angles[b * in.angles_stride[0] + i * in.angles_stride[1]]
                                                : in.fixed_angles[i - 1];
    isocenter[i] = in.isocenter[b * in.isocenter_stride[0] + i * in.isocenter_stride[1]];
  }
  const T* k = in.intrinsics + b * in.intrinsics_stride[0];
  const int64_t r = in.intrinsics_stride[1], c = in.intrinsics_stride[2];
  upper_triangular_inverse(k[0], k[c], k[2 * c], k[r + c], k[r + 2 * c], k[2 * r + 2 * c], k_inv);
}

// The incoming gradients of pose b, converted to the compute type T.
template <typename T, typename G>
TDRR_HD void load_carm_grads(const CarmGrads<G>& g, int64_t b, T grad_source[3], T grad_ray_matrix[3][3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    grad_source[i] = static_cast<T>(g.sources[b * g.sources_stride[0] + i * g.sources_stride[1]]);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      grad_ray_matrix[i][k] = static_cast<T>(g.ray_matrices[b * g.ray_matrices_stride[0] +
                                                            i * g.ray_matrices_stride[1] + k * g.ray_matrices_stride[2]]);
    }
  }
}

// Writes pose b's source and ray matrix into contiguous [B, 3] and [B, 3, 3] outputs of dtype O (both ray-parameter
// ops, CPU and CUDA).
template <typename T, typename O>
TDRR_HD void store_ray_parameters(const T source[3], const T matrix[3][3], int64_t b, O* sources, O* ray_matrices) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    sources[b * 3 + i] = static_cast<O>(source[i]);
#pragma unroll
    for (int k = 0; k < 3; ++k) ray_matrices[b * 9 + i * 3 + k] = static_cast<O>(matrix[i][k]);
  }
}

// Forward of one pose: source [3] (world mm) and ray_matrix [3][3] (row-major, mm per pixel).
template <typename T>
TDRR_HD void carm_ray_parameters_pose(const T angles[3], const T isocenter[3], const T k_inv[3][3], T sod_mm,
                                      T sdd_mm, T source[3], T ray_matrix[3][3]) {
  const CarmFrame<T> f = carm_frame(angles[0], angles[1], angles[2]);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    source[i] = isocenter[i] - sod_mm * f.col_z[i];
    // ray_matrix[i][k] = SDD sum_j R[j][i] K^-1[j][k], K^-1 upper triangular (j <= k).
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      T sum = T(0);
#pragma unroll
      for (int j = 0; j <= k; ++j) sum += f.rows[j][i] * k_inv[j][k];
      ray_matrix[i][k] = sdd_mm * sum;
    }
  }
}

// Backward of one pose: dL/dangles [3] (per degree) and dL/disocenter [3] from grad_source [3] and
// grad_ray_matrix [3][3] (row-major).
template <typename T>
TDRR_HD void carm_ray_parameters_pose_backward(const T angles[3], const T k_inv[3][3], T sod_mm, T sdd_mm,
                                               const T grad_source[3], const T grad_ray_matrix[3][3],
                                               T grad_angles[3], T grad_isocenter[3]) {
  const CarmFrame<T> f = carm_frame(angles[0], angles[1], angles[2]);
  T g_rows[3][3];  // dL/d(row j of R), component i
#pragma unroll
  for (int j = 0; j < 3; ++j) {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      T sum = T(0);
#pragma unroll
      for (int k = j; k < 3; ++k) sum += k_inv[j][k] * grad_ray_matrix[i][k];
      g_rows[j][i] = sdd_mm * sum;
    }
  }
  T gx[3], gy[3], gz[3];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    gx[i] = f.cc * g_rows[0][i] + f.sc * g_rows[1][i];
    gy[i] = -f.sc * g_rows[0][i] + f.cc * g_rows[1][i];
    gz[i] = g_rows[2][i] - sod_mm * grad_source[i];
    grad_isocenter[i] = grad_source[i];
  }
  // col_x[2] and the third components of the a-derivatives are 0: those terms are left out.
  const T d_primary = gx[0] * -f.sa + gx[1] * f.ca + gy[0] * (-f.ca * f.sb) + gy[1] * (-f.sa * f.sb) +
                      gz[0] * (-f.ca * f.cb) + gz[1] * (-f.sa * f.cb);
  T d_secondary = T(0), d_inplane = T(0);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    d_secondary += gy[i] * f.col_z[i] - gz[i] * f.col_y[i];
    d_inplane += g_rows[1][i] * f.rows[0][i] - g_rows[0][i] * f.rows[1][i];
  }
  grad_angles[0] = d_primary * T(kDegreesToRadians);
  grad_angles[1] = d_secondary * T(kDegreesToRadians);
  grad_angles[2] = d_inplane * T(kDegreesToRadians);
}

// Pose b of a batch, what the CPU loop and the CUDA kernels each run per pose: the forward reads its inputs and writes
// its source and ray matrix into contiguous [B, 3] and [B, 3, 3] outputs of dtype O; the backward reads its inputs
// and incoming gradients and gives its dL/dangles and dL/disocenter (the callers store or sum them: a shared
// isocenter's gradient is the sum over the batch).
template <typename T, typename O>
TDRR_HD void carm_ray_parameters_at(const CarmInputs<T>& in, int64_t b, O* sources, O* ray_matrices) {
  T angles[3], isocenter[3], k_inv[3][3], source[3], matrix[3][3];
  load_carm_pose(in, b, angles, isocenter, k_inv);
  carm_ray_parameters_pose(angles, isocenter, k_inv, in.sod_mm, in.sdd_mm, source, matrix);
  store_ray_parameters(source, matrix, b, sources, ray_matrices);
}

template <typename T, typename G>
TDRR_HD void carm_ray_parameters_backward_at(const CarmInputs<T>& in, const CarmGrads<G>& grads, int64_t b,
                                             T grad_angles[3], T grad_isocenter[3]) {
  T angles[3], isocenter[3], k_inv[3][3], grad_source[3], grad_matrix[3][3];
  load_carm_pose(in, b, angles, isocenter, k_inv);
  load_carm_grads(grads, b, grad_source, grad_matrix);
  carm_ray_parameters_pose_backward(angles, k_inv, in.sod_mm, in.sdd_mm, grad_source, grad_matrix, grad_angles,
                                    grad_isocenter);
}

}  // namespace torchdrr

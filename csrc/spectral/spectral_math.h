// Per-ray math of the log-weighted-transmission ops, shared by the CPU and CUDA kernels (written once, so that the
// two cannot drift apart; the kernels only decide how rays are spread over threads and where the tables live).
//
// For one ray with mass thicknesses a[m] (g/cm^2), a mass-attenuation table mu[m, e] (cm^2/g, [M, E] row-major)
// and weights w[q, e] >= 0 ([Q, E] row-major; the ops accept [S, Q, E], one table per run of rays, and pass each ray
// its own table):
//   L[e]      = -sum_m mu[m, e] a[m]                                  (log-transmission in energy bin e)
//   out[q, g] = log(sum_{e in g} w[q, e] exp(L[e]))                   (group g = bins [starts[g], starts[g+1]))
//   d out[q, g] / d a[m] = -sum_{e in g} w[q, e] exp(L[e] - out[q, g]) mu[m, e]
//
// Numerics: the sum is shifted by its largest term. The shift is the max of L over the bins of the group where
// w[q, e] > 0, taken per weight row q. Why per row and over weighted bins only: a bin with zero weight contributes
// nothing, and if it held the group's largest L (e.g. a dual-energy row whose spectrum is zero at the least
// attenuated energies) a shift by it could make every weighted term underflow to 0 and give -inf instead of the
// finite answer. With this shift the largest term is w * exp(0) = w > 0, so the sum never underflows to 0.
// The forward finds the shift and the sum in one pass (the sum rescaled whenever the shift rises).
//
// Results: -inf where the group is empty or all its weights are 0 (or every weighted bin is fully opaque,
// L = -inf); NaN where some L in the group is NaN (NaN mass thickness in, NaN out).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/hd.h"

namespace torchdrr {

#if !defined(__CUDA_ARCH__)
using std::exp;
using std::log;
#endif

// Limits of the ops: one ray keeps its mass thicknesses and, per group, one shift and one sum per weight row in
// registers. 8 covers decompositions into a few basis materials and a few detector channels.
constexpr int kMaxMaterials = 8;
constexpr int kMaxWeightRows = 8;

// Whether material m is used: MaxM is the exact count for up to kExactMaterials materials (dispatch_materials), so
// the test is then decided at compile time; above it MaxM = kMaxMaterials is a bound and the test runs.
constexpr int kExactMaterials = 4;
template <int MaxM>
TDRR_HD constexpr bool material_used(int m, int materials) {
  return MaxM <= kExactMaterials ? m < MaxM : m < materials;
}

// L[e] = -sum_m mu[m, e] a[m] for one bin, given mu_bin = mu + e (rows `bins` apart). a holds kMaxMaterials
// entries of which the first `materials` are used. Why MaxM is a template parameter: unrolled to kMaxMaterials with
// run-time guards, the loop issued 8 guarded loads and multiply-adds a bin for 3 materials.
template <typename T, int MaxM>
TDRR_HD T log_transmission_at(const T* a, int materials, const T* __restrict__ mu_bin, int64_t bins) {
  T l = T(0);
#pragma unroll
  for (int m = 0; m < MaxM; ++m) {
    if (material_used<MaxM>(m, materials)) l -= mu_bin[m * bins] * a[m];
  }
  return l;
}

// exp(x) of the forward's shifted terms, x <= 0 (or NaN). In float32 on the GPU it is the hardware exp2 (__expf),
// 2 instructions instead of about 10: its error grows with |x| (about 2 + 1.2 |x| ulp), but the term it scales
// falls as exp(x) and |x| exp(x) <= 1/e, so every term's error stays within a few ulp of the sum's largest term.
template <typename T>
TDRR_HD T exp_nonpositive(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return __expf(x);
#endif
  return exp(x);
}

// Copies one ray's mass thicknesses into a fixed-size array (what the per-ray code reads); unused entries are 0.
template <typename T>
TDRR_HD void load_ray(const T* __restrict__ mass_thickness, int64_t ray, int materials, T* a) {
#pragma unroll
  for (int m = 0; m < kMaxMaterials; ++m) a[m] = m < materials ? mass_thickness[ray * materials + m] : T(0);
}

// The weight table of one ray: weights are [S, Q, E] (S = 1 for a [Q, E] table); rays are in S consecutive runs of
// rays_per_set, run s using table s (e.g. one spectrum per image of a batch).
template <typename T>
TDRR_HD const T* weight_set_of(const T* weights, int64_t ray, int64_t rays_per_set, int rows, int64_t bins) {
  return weights + (ray / rays_per_set) * rows * bins;
}

// Forward of one ray: out[q * groups + g] for q < rows, g < groups. MaxQ >= rows and MaxM >= materials are the
// register and unroll bounds.
template <typename T, int MaxQ, int MaxM>
TDRR_HD void spectral_ray_forward(const T* a, int materials, const T* __restrict__ mu, const T* __restrict__ w,
                                  int rows, int64_t bins, const int64_t* __restrict__ starts, int64_t groups,
                                  T* __restrict__ out) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = starts[g], end = starts[g + 1];
    // One pass, with the shift raised as larger terms arrive (the sum so far rescaled to the new shift): one exp a
    // bin and row, and L computed once a bin. Why not two passes (the shift first, then the sum): that computed L
    // twice, and the 3-material polychromatic DRR spent as long in this op as in a third of its ray cast (H100).
    // Attenuation falls with energy, so in practice each bin raises the shift and every lane takes the same branch.
    T shift[MaxQ], sum[MaxQ];
    bool saw_nan = false;
#pragma unroll
    for (int q = 0; q < MaxQ; ++q) {
      shift[q] = -INFINITY;
      sum[q] = T(0);
    }
    // Pointers to bin e, advanced each bin, so that a table read is one load at a loop-invariant offset.
    const T* mu_bin = mu + begin;
    const T* w_bin = w + begin;
    for (int64_t e = begin; e < end; ++e, ++mu_bin, ++w_bin) {
      const T l = log_transmission_at<T, MaxM>(a, materials, mu_bin, bins);
      saw_nan = saw_nan || (l != l);
#pragma unroll
      for (int q = 0; q < MaxQ; ++q) {
        const T weight = (q == 0 || q < rows) ? w_bin[q * bins] : T(0);  // rows >= 1
        if (!(weight > T(0))) continue;
        if (l > shift[q]) {
          // exp(-inf - l) = 0 for the first weighted bin, so the sum starts at its weight.
          sum[q] = sum[q] * exp_nonpositive(shift[q] - l) + weight;
          shift[q] = l;
        } else if (shift[q] > T(-INFINITY)) {  // a row whose shift is still -inf has no finite weighted term yet
          sum[q] += weight * exp_nonpositive(l - shift[q]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < MaxQ; ++q) {
      if (q >= rows) continue;
      T result;
      if (saw_nan) {
        result = T(NAN);
      } else if (shift[q] > T(-INFINITY)) {
        result = shift[q] + log(sum[q]);
      } else {
        result = T(-INFINITY);
      }
      out[q * groups + g] = result;
    }
  }
}

// Backward of one ray: grad_a[m] = sum_{q, g} grad_out[q, g] d out[q, g] / d a[m] for m < materials, given the
// forward's output. Terms with out = -inf (no transmitted weight) contribute 0, as do bins with zero weight: their
// exp(L - out) may overflow, and 0 * inf would be NaN. MaxQ and MaxM as in spectral_ray_forward.
template <typename T, int MaxQ, int MaxM>
TDRR_HD void spectral_ray_backward(const T* a, int materials, const T* __restrict__ mu, const T* __restrict__ w,
                                   int rows, int64_t bins, const int64_t* __restrict__ starts, int64_t groups,
                                   const T* __restrict__ out, const T* __restrict__ grad_out, T* __restrict__ grad_a) {
  T acc[kMaxMaterials];
#pragma unroll
  for (int m = 0; m < kMaxMaterials; ++m) acc[m] = T(0);
  for (int64_t g = 0; g < groups; ++g) {
    T o[MaxQ], go[MaxQ];
    bool active[MaxQ];
    bool any = false;
#pragma unroll
    for (int q = 0; q < MaxQ; ++q) {
      o[q] = q < rows ? out[q * groups + g] : T(-INFINITY);
      go[q] = q < rows ? grad_out[q * groups + g] : T(0);
      active[q] = !(o[q] == T(-INFINITY));  // NaN stays active, so that NaN in gives NaN out
      any = any || active[q];
    }
    if (!any) continue;
    for (int64_t e = starts[g]; e < starts[g + 1]; ++e) {
      const T l = log_transmission_at<T, MaxM>(a, materials, mu + e, bins);
      T coefficient = T(0);  // sum_q go[q] w[q, e] exp(L[e] - out[q, g])
#pragma unroll
      for (int q = 0; q < MaxQ; ++q) {
        const T weight = q < rows ? w[q * bins + e] : T(0);
        if (active[q] && weight > T(0)) coefficient += go[q] * weight * exp(l - o[q]);
      }
#pragma unroll
      for (int m = 0; m < MaxM; ++m) {
        if (material_used<MaxM>(m, materials)) acc[m] -= coefficient * mu[m * bins + e];
      }
    }
  }
  for (int m = 0; m < materials; ++m) grad_a[m] = acc[m];
}

}  // namespace torchdrr

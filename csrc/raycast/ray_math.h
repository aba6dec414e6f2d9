// Ray math shared by the CPU and CUDA ray-casting kernels.
//
// Everything here is a plain function of one ray, written once and compiled for both the host and the device,
// so that the two kernels cannot drift apart. The kernels only decide how rays are distributed over threads.
//
// Conventions (design.md §2):
//  * Voxel (i, j, k) is the box [i-1/2, i+1/2) x [j-1/2, j+1/2) x [k-1/2, k+1/2) in index space; the volume is zero
//    outside [-1/2, I-1/2] x [-1/2, J-1/2] x [-1/2, K-1/2].
//  * A ray is the segment x(a) = s + a (t - s), a in [0, 1], with s, t in index space. Its world length |t_w - s_w|
//    converts index-space parameter lengths into millimetres.
//  * Siddon: F_c = |t_w - s_w| * sum_k v_c[k] (a_{k+1} - a_k), exact intersection lengths.
//  * Trilinear: the part inside the outer box is cut into N equal pieces sampled at their midpoints,
//    F_c = |t_w - s_w| * (a_max - a_min) / N * sum_n V_c(x(b_n)), with V_c the edge-clamped trilinear interpolant.
//
// Gradients (design.md §2): w = sum_c g_c v_c is the volume weighted by the incoming gradient, so one walk serves
// every channel. A crossing of the plane x_a = p at a_c moves with the endpoints as
//   d a_c / d s_a = (a_c - 1) / d_a,   d a_c / d t_a = -a_c / d_a,
// and contributes (w_before - w_after) times that derivative.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/hd.h"

namespace torchdrr {

#if !defined(__CUDA_ARCH__)
using std::ceil;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::sqrt;
#endif

// Unroll factor of the GPU's Siddon walk loop (siddon_steps); overridable at build time for tuning.
#ifndef TORCHDRR_SIDDON_UNROLL
#define TORCHDRR_SIDDON_UNROLL 2
#endif

// Largest number of channels one walk accumulates in registers; more channels are processed in chunks.
constexpr int kMaxChannelsPerWalk = 8;

// World -> index-space map of a volume, plus what the kernels need to read it. Passed by value to kernels.
template <typename T>
struct VolumeGeometry {
  T world_to_index[3][3];   // inverse of the affine's linear part
  T index_offset[3];        // index = world_to_index * world + index_offset
  int64_t size[3];          // I, J, K
  int64_t voxel_stride[3];  // element strides of i, j, k
  int64_t channel_stride;   // element stride between channels
};

template <typename T>
struct Vec3 {
  T x[3];
};

template <typename T>
TDRR_HD Vec3<T> to_index_space(const VolumeGeometry<T>& g, const T* world) {
  Vec3<T> p;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    p.x[a] = g.world_to_index[a][0] * world[0] + g.world_to_index[a][1] * world[1] +
             g.world_to_index[a][2] * world[2] + g.index_offset[a];
  }
  return p;
}

// grad_world = M^T grad_index, the chain rule through index = M world + b.
template <typename T>
TDRR_HD void index_grad_to_world(const VolumeGeometry<T>& g, const T* grad_index, T* grad_world) {
#pragma unroll
  for (int b = 0; b < 3; ++b) {
    grad_world[b] = g.world_to_index[0][b] * grad_index[0] + g.world_to_index[1][b] * grad_index[1] +
                    g.world_to_index[2][b] * grad_index[2];
  }
}

template <typename T>
TDRR_HD bool all_finite(const T* p) {
  return isfinite(p[0]) && isfinite(p[1]) && isfinite(p[2]);
}

template <typename T>
TDRR_HD T world_length(const T* s_world, const T* t_world) {
  const T dx = t_world[0] - s_world[0], dy = t_world[1] - s_world[1], dz = t_world[2] - s_world[2];
  return sqrt(dx * dx + dy * dy + dz * dz);
}

// One ray in index space with the part of it that lies inside the outer box.
template <typename T>
struct ClippedRay {
  T s[3];          // source, index space
  T d[3];          // t - s, index space
  T inv_d[3];      // 1 / d (0 where d == 0: that axis is never crossed)
  T alpha_min;     // entry parameter
  T alpha_max;     // exit parameter
  int axis_min;    // axis whose face gives alpha_min, -1 when the source is inside (alpha_min = 0)
  int axis_max;    // axis whose face gives alpha_max, -1 when the target is inside (alpha_max = 1)
  bool hit;        // alpha_min < alpha_max
};

// Parameter of the plane x_a = p. Both the clip and the walk use this exact expression, so that the walk's last
// crossing and alpha_max round identically.
template <typename T>
TDRR_HD T plane_alpha(T p, T s, T inv_d) {
  return (p - s) * inv_d;
}

template <typename T>
TDRR_HD ClippedRay<T> clip_ray(const VolumeGeometry<T>& g, const Vec3<T>& s, const Vec3<T>& t) {
  ClippedRay<T> r;
  r.alpha_min = T(0);
  r.alpha_max = T(1);
  r.axis_min = -1;
  r.axis_max = -1;
  bool inside_slabs = true;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    r.s[a] = s.x[a];
    r.d[a] = t.x[a] - s.x[a];
    const T lo = T(-0.5), hi = T(g.size[a]) - T(0.5);
    if (r.d[a] != T(0)) {
      r.inv_d[a] = T(1) / r.d[a];
      const T a_lo = plane_alpha(lo, r.s[a], r.inv_d[a]);
      const T a_hi = plane_alpha(hi, r.s[a], r.inv_d[a]);
      const T enter = a_lo < a_hi ? a_lo : a_hi;
      const T leave = a_lo < a_hi ? a_hi : a_lo;
      if (enter > r.alpha_min) {
        r.alpha_min = enter;
        r.axis_min = a;
      }
      if (leave < r.alpha_max) {
        r.alpha_max = leave;
        r.axis_max = a;
      }
    } else {
      r.inv_d[a] = T(0);
      // A ray parallel to the faces of axis a is inside only if it runs within the slab (half-open, like voxels).
      inside_slabs = inside_slabs && (r.s[a] >= lo) && (r.s[a] < hi);
    }
  }
  r.hit = inside_slabs && (r.alpha_min < r.alpha_max);
  return r;
}

// Spreads the low 16 bits of v so that bit b lands at bit 2b (for Morton codes).
TDRR_HD uint64_t spread_bits_16(uint64_t v) {
  v &= 0xFFFFu;
  v = (v | (v << 8)) & 0x00FF00FFu;
  v = (v | (v << 4)) & 0x0F0F0F0Fu;
  v = (v | (v << 2)) & 0x33333333u;
  v = (v | (v << 1)) & 0x55555555u;
  return v;
}

// Index of the voxel a ray enters at parameter `alpha` along axis a, resolving a point that lies on a face in the
// direction of travel (the voxel after the face), and clamped into the grid.
template <typename T>
TDRR_HD int64_t entry_voxel(T x, T d, int64_t n) {
  int64_t i = d < T(0) ? static_cast<int64_t>(ceil(x + T(0.5))) - 1 : static_cast<int64_t>(floor(x + T(0.5)));
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// Reads the first `channels` (<= MaxC) channel values of the voxel at element `offset` into v[0..MaxC) (zeros past
// `channels`). Packed: the volume is channels-last with exactly MaxC channels, so a voxel's channels are MaxC
// adjacent elements starting at a 16-byte boundary (the host checks this); the GPU then reads them with 16-byte
// vector loads. Why: with one scalar load per channel a multi-channel walk issued 3-4x the memory instructions of a
// one-channel walk and took 1.7x its time on the chest CT; the channels of one voxel share a 32-byte sector anyway.
template <typename T, int MaxC, bool Packed>
TDRR_HD void load_voxel(const T* __restrict__ volume, int64_t offset, int64_t channel_stride, int channels, T* v) {
#if defined(__CUDA_ARCH__)
  if constexpr (Packed && std::is_same<T, float>::value && (MaxC == 4 || MaxC == 8)) {
#pragma unroll
    for (int q = 0; q < MaxC / 4; ++q) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(volume + offset) + q);
      v[4 * q] = x.x;
      v[4 * q + 1] = x.y;
      v[4 * q + 2] = x.z;
      v[4 * q + 3] = x.w;
    }
    return;
  } else if constexpr (Packed && std::is_same<T, double>::value && MaxC >= 2) {
#pragma unroll
    for (int q = 0; q < MaxC / 2; ++q) {
      const double2 x = __ldg(reinterpret_cast<const double2*>(volume + offset) + q);
      v[2 * q] = x.x;
      v[2 * q + 1] = x.y;
    }
    return;
  }
  // Channel 0 always exists (channels >= 1): without that known, the one-channel GPU walk re-derived `channels`
  // and compared it for every voxel (7 of its 44 instructions a voxel, SASS on the H100).
#pragma unroll
  for (int c = 0; c < MaxC; ++c) {
    v[c] = (c == 0 || c < channels) ? __ldg(volume + offset + c * channel_stride) : T(0);
  }
#else
#pragma unroll
  for (int c = 0; c < MaxC; ++c) v[c] = c < channels ? volume[offset + c * channel_stride] : T(0);
#endif
}

// The Siddon segments of one ray whose largest index-space direction component is on axis M, in order, walked as
// runs of whole voxels along M between the crossings of the two other axes. Why: inside such a run every voxel's
// segment has the same parameter length |1/d_M|, so a visitor's inner loop is a strided sum whose loads do not depend
// on each other (a CPU overlaps their cache misses, a GPU keeps them in flight) instead of a chain of per-voxel plane
// comparisons. The partial voxels at the ends of a run use the same plane expressions as the clip (plane_alpha).
//
// The visitor gets every voxel the ray crosses, once, through one of:
//   visit.partial(offset, a0, a1, entry_axis): the voxel at element `offset`, crossed over [a0, a1] (a1 >= a0),
//       entered at a0 through a face of `entry_axis` (-1 when the ray starts inside the volume);
//   visit.run(offset, offset_step, n, a_first, delta, M): n >= 1 whole voxels along M, voxel q at
//       offset + q * offset_step, entered at a_first + q * delta through a face of M, each crossed over `delta`.
// The exit at r.alpha_max (through a face of r.axis_max) is the caller's to handle.
template <typename T, int M, typename Visitor>
TDRR_HD void siddon_runs(const VolumeGeometry<T>& g, const ClippedRay<T>& r, Visitor& visit) {
  constexpr int kA = (M + 1) % 3, kB = (M + 2) % 3;
  if (!r.hit) return;
  // Indices and steps in 32 bits (sizes are far below 2^31) to keep the walk's state in fewer GPU registers.
  int idx[3], step[3];
  int64_t offset = 0;
  T next[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const T x = r.s[a] + r.alpha_min * r.d[a];
    idx[a] = static_cast<int>(entry_voxel(x, r.d[a], g.size[a]));
    offset += idx[a] * g.voxel_stride[a];
    step[a] = r.d[a] > T(0) ? 1 : (r.d[a] < T(0) ? -1 : 0);
    next[a] = step[a] == 0 ? T(INFINITY) : plane_alpha(T(idx[a]) + T(0.5) * T(step[a]), r.s[a], r.inv_d[a]);
  }
  const T delta_m = r.inv_d[M] < T(0) ? -r.inv_d[M] : r.inv_d[M];  // parameter length of one voxel along M
  const int64_t offset_step_m = step[M] * g.voxel_stride[M];
  T alpha = r.alpha_min;
  int entry_axis = r.axis_min;
  // The current voxel's part [alpha, end] (never negative: rounding can order two crossings a hair apart).
  auto partial = [&](T end) { visit.partial(offset, alpha, end > alpha ? end : alpha, entry_axis); };
  // Every pass crosses at least one plane or ends the ray, and indices only move toward the grid's edges.
  const int64_t max_passes = g.size[0] + g.size[1] + g.size[2] + 3;
  for (int64_t pass = 0; pass < max_passes; ++pass) {
    const T side = next[kA] < next[kB] ? next[kA] : next[kB];
    const T limit = side < r.alpha_max ? side : r.alpha_max;
    if (next[M] < limit) {
      // Cross the planes of M that come before `limit`, staying inside the grid.
      const int left = step[M] > 0 ? static_cast<int>(g.size[M]) - 1 - idx[M] : idx[M];
      if (left <= 0) {  // only rounding puts the outer face before alpha_max
        partial(next[M] < r.alpha_max ? next[M] : r.alpha_max);
        return;
      }
      // Compared as floating point first: a huge or NaN count (a degenerate ray) must not overflow the int.
      const T wanted = ceil((limit - next[M]) / delta_m);
      const int n = !(wanted < T(left)) ? left : (wanted < T(1) ? 1 : static_cast<int>(wanted));
      partial(next[M]);
      offset += offset_step_m;
      if (n > 1) {
        visit.run(offset, offset_step_m, n - 1, next[M], delta_m, M);
        offset += (n - 1) * offset_step_m;
      }
      idx[M] += n * step[M];
      alpha = plane_alpha(T(idx[M]) - T(0.5) * T(step[M]), r.s[M], r.inv_d[M]);
      next[M] = plane_alpha(T(idx[M]) + T(0.5) * T(step[M]), r.s[M], r.inv_d[M]);
      entry_axis = M;
      continue;
    }
    if (!(side < r.alpha_max)) {  // nothing crossed before the exit
      partial(r.alpha_max);
      return;
    }
    // A face of one of the two other axes comes next.
    partial(side);
    alpha = side > alpha ? side : alpha;
    if (next[kA] <= next[kB]) {
      idx[kA] += step[kA];
      if (idx[kA] < 0 || idx[kA] >= g.size[kA]) return;
      offset += step[kA] * g.voxel_stride[kA];
      next[kA] = plane_alpha(T(idx[kA]) + T(0.5) * T(step[kA]), r.s[kA], r.inv_d[kA]);
      entry_axis = kA;
    } else {
      idx[kB] += step[kB];
      if (idx[kB] < 0 || idx[kB] >= g.size[kB]) return;
      offset += step[kB] * g.voxel_stride[kB];
      next[kB] = plane_alpha(T(idx[kB]) + T(0.5) * T(step[kB]), r.s[kB], r.inv_d[kB]);
      entry_axis = kB;
    }
  }
}

// The axis of a clipped ray's largest direction component (what siddon_runs and ray_locality_key use).
template <typename T>
TDRR_HD int main_axis(const ClippedRay<T>& r) {
  const T ad0 = r.d[0] < T(0) ? -r.d[0] : r.d[0], ad1 = r.d[1] < T(0) ? -r.d[1] : r.d[1];
  const T ad2 = r.d[2] < T(0) ? -r.d[2] : r.d[2];
  return (ad0 >= ad1 && ad0 >= ad2) ? 0 : (ad1 >= ad2 ? 1 : 2);
}

// A sort key that puts rays which touch the same voxels next to each other: the ray's main index-space axis, then
// the Morton code (1-voxel cells) of its clipped midpoint across the two other axes. Rays that miss sort last.
// Why: a ray reads one cache line per voxel step, and neighbouring rays read the same lines only when they are
// processed close together in time; the caller's ray order (e.g. image rows) often walks the slowest memory axis.
template <typename T>
TDRR_HD uint64_t ray_locality_key(const ClippedRay<T>& r) {
  if (!r.hit) return ~uint64_t(0);
  const int axis = main_axis(r);
  const T mid = T(0.5) * (r.alpha_min + r.alpha_max);
  uint64_t cell[2];
  int n = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    if (a == axis) continue;
    T x = r.s[a] + mid * r.d[a] + T(0.5);
    x = x < T(0) ? T(0) : (x > T(65535) ? T(65535) : x);
    cell[n++] = static_cast<uint64_t>(x);
  }
  return (static_cast<uint64_t>(axis) << 40) | (spread_bits_16(cell[0]) << 1) | spread_bits_16(cell[1]);
}

// The Siddon segments of one ray as one voxel per loop iteration, with no branch that depends on the ray: the
// GPU's walk. Why not siddon_runs on the GPU: in a cone beam most rays cross a side plane every few voxels (at the
// detector's edge about every 5 voxels of the chest CT), so the 32 rays of a warp sit in different phases of
// "run / side crossing" and half the lanes idle (measured: 15 of 32 threads active, ncu, H100). Here every lane
// executes the same instructions each iteration; the axis crossed next is a selection, not a branch.
//
// Plane k of axis a (counted from the first one crossed) is at parameter fma(k, |1/d_a|, first_a): one rounding,
// like plane_alpha's, and the counts of the axes not crossed add 0, so that no result needs a selection. (A walk
// specialised on the main axis, with an inner loop for the side crossings, was slower on the H100: 1.39 against
// 1.25 ms, its lanes diverging; benchmarks/NOTES.md.) The loop ends at the exit or when
// the walk leaves the grid, with no step counter: each step crosses a plane, and a degenerate ray whose crossings
// stop advancing in floating point (a source ~1e30 mm away) then keeps crossing the same axis, whose monotone
// offset leaves the grid's range.
//
// Calls visit.segment(offset, in_range, a0, a1, entry_axis) for each voxel, as siddon_runs' partial(), then
// visit.finish(). Visitor::kExitTestFirst picks one of two loop shapes that visit the same segments (the faster
// one differs between visitors). `in_range` is false for a step past the grid (only rounding at the exit face causes
// one, with a zero-length segment): the visitor must not read that offset. The visit-first shape ends its walk
// before any such step (walk_end below), so it always passes true.
template <typename T, typename Visitor>
TDRR_HD void siddon_steps(const VolumeGeometry<T>& g, const ClippedRay<T>& r, Visitor& visit) {
  if (!r.hit) return;
  // 32-bit element offsets (the CUDA ops check that a volume spans fewer than 2^31 elements): a 64-bit multiply
  // or compare is several instructions, and this loop runs once per voxel.
  int offset = 0, last_offset = 0, offset_step[3];
  T first[3], delta[3], crossed[3], next[3];
  T leave = r.alpha_max;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const T x = r.s[a] + r.alpha_min * r.d[a];
    const int idx = static_cast<int>(entry_voxel(x, r.d[a], g.size[a]));
    offset += idx * static_cast<int>(g.voxel_stride[a]);
    last_offset += static_cast<int>((g.size[a] - 1) * g.voxel_stride[a]);
    const int step = r.d[a] > T(0) ? 1 : (r.d[a] < T(0) ? -1 : 0);
    offset_step[a] = step * static_cast<int>(g.voxel_stride[a]);
    // The next plane crossed on axis a is idx + step / 2 (exact in floating point).
    first[a] = step == 0 ? T(INFINITY) : plane_alpha(T(idx) + T(0.5) * T(step), r.s[a], r.inv_d[a]);
    delta[a] = r.inv_d[a] < T(0) ? -r.inv_d[a] : r.inv_d[a];
    crossed[a] = T(0);
    // Not before the entry: rounding can put the first plane a hair before alpha_min. With that, every crossing is
    // at or after the one before it (each is the least of the next planes, and a plane's parameter only grows), so
    // a segment needs no clamp to its start.
    next[a] = fmax(first[a], r.alpha_min);
    // The crossing that would take the walk out of the grid on this axis (crossing n moves the index from idx + n
    // step to idx + (n + 1) step), computed exactly as the loop will compute it.
    if (step != 0) {
      const int inside = step > 0 ? static_cast<int>(g.size[a]) - 1 - idx : idx;
      leave = fmin(leave, inside == 0 ? next[a] : fma(T(inside), delta[a], first[a]));
    }
  }
  // The walk of the visit-first shape ends at the first of the exit and the crossings that leave the grid: every
  // crossing before it is of a plane inside the grid (a plane's parameter grows with n), so that loop needs no
  // offset test per voxel (a kernel-parameter load and a compare: 51 -> 48 SASS instructions for two voxels, b8's
  // kernel 6.11 -> 5.72 ms on the H100, same call; benchmarks/NOTES.md v29). Where a leaving crossing precedes the
  // exit (rounding at the exit face), the exit-test-first walk visits the rest as out of range, adding nothing;
  // ending there adds the same.
  const T walk_end = fmax(leave, r.alpha_min);
  T alpha = r.alpha_min;
  int entry_axis = r.axis_min;
  // The next crossing: the least of the next planes, and which axis it is on.
  bool first_before_second, third;
  const auto next_crossing = [&]() -> T {
    first_before_second = next[0] <= next[1];
    const T nearest01 = first_before_second ? next[0] : next[1];
    third = next[2] < nearest01;
    return third ? next[2] : nearest01;
  };
  // One unsigned compare covers both ends (a negative offset wraps to a huge one).
  const auto in_grid = [&]() { return static_cast<unsigned>(offset) <= static_cast<unsigned>(last_offset); };
  // Passed zero-extended: inside the range the offset is non-negative, and the GPU then forms the load address in
  // one instruction instead of a sign extension and two.
  const auto visit_voxel = [&](bool in_range, T end) {
    visit.segment(static_cast<int64_t>(static_cast<uint32_t>(offset)), in_range, alpha, end, entry_axis);
  };
  // Into the voxel after the crossing just visited. No if/else chain on the crossed axis (the compiler turned one
  // into divergent branches), and no array indexed by the axis (it would live in local memory on the GPU). The count
  // moves on the crossed axis only; the three fused multiply-adds then need no selection (an axis not crossed gets
  // its own value back). The counts move under `if`, which the GPU runs as one predicated add each; the form
  // `count += crossed ? 1 : 0` took a select and an add (kernel 0.90 -> 0.83 ms, 655 M -> 593 M instructions,
  // H100). (Crossing every axis whose next plane equals the minimum, with min instructions instead of the compare
  // chain, was slower on the H100: 0.96 against 0.90 ms, 675 M against 655 M instructions.)
  const auto advance = [&]() {
    const bool cross0 = !third && first_before_second, cross1 = !third && !first_before_second;
    if (cross0) crossed[0] += T(1);
    if (cross1) crossed[1] += T(1);
    if (third) crossed[2] += T(1);
#pragma unroll
    for (int a = 0; a < 3; ++a) next[a] = fma(crossed[a], delta[a], first[a]);
    offset += third ? offset_step[2] : (cross0 ? offset_step[0] : offset_step[1]);
    entry_axis = third ? 2 : (cross0 ? 0 : 1);
  };
  if constexpr (Visitor::kExitTestFirst) {
    // The exit test before the visit, and the exit's segment visited after the loop: no segment inside needs a
    // clamp. The Jacobian visitor's kernel took 1.57 ms in this shape against 1.78 ms in the other (IPC 2.96 against
    // 2.45, H100); the one-channel forward was slower in it (0.87 against 0.80 ms: the compiler carried its offset
    // zero-extended in 64 bits and formed each load address in two instructions).
    T crossing;
    bool in_range;
    for (;;) {
      crossing = next_crossing();
      in_range = in_grid();
      if (!(crossing < r.alpha_max) || !in_range) break;
      visit_voxel(true, crossing);
      alpha = crossing;
      advance();
    }
    visit_voxel(in_range, fmax(fmin(crossing, r.alpha_max), alpha));
  } else {
    // One voxel; false once the walk has left the volume. The segment's end: crossings never go back (above), so
    // one min instruction (a clamp to the start as well took a second per voxel).
    const auto step = [&]() -> bool {
      const T crossing = next_crossing();
      const T end = fmin(crossing, walk_end);
      visit_voxel(true, end);
      if (!(crossing < walk_end)) return false;
      alpha = end;
      advance();
      return true;
    };
    // Two voxels an iteration (TORCHDRR_SIDDON_UNROLL=1 for one): a copy's segment end is the next copy's start in
    // the same register, which saves the register copy alpha = end of a one-voxel loop. Measured on the H100 with
    // the 32-register cap of the one-channel forward (where it spills 16 bytes): b8 6.24 -> 6.00 ms, 200 x 200 b64
    // 26,158 -> 28,347 DRR/s. Not with a 38-register cap (6 blocks): the kernel fell to IPC 2.2 and b8 to 7.5 ms.
    // (#pragma unroll does not unroll a loop with no trip count.)
    for (;;) {
      if (!step()) break;
#if TORCHDRR_SIDDON_UNROLL >= 2
      if (!step()) break;
#endif
    }
  }
  visit.finish();
}

// Walks a hit ray with siddon_runs specialised on its main axis.
template <typename T, typename Visitor>
TDRR_HD void siddon_visit(const VolumeGeometry<T>& g, const ClippedRay<T>& r, Visitor& visit) {
  const int axis = main_axis(r);
  if (axis == 0) {
    siddon_runs<T, 0>(g, r, visit);
  } else if (axis == 1) {
    siddon_runs<T, 1>(g, r, visit);
  } else {
    siddon_runs<T, 2>(g, r, visit);
  }
}

// Number of trilinear samples: ceil(L / step) for the world length L inside the outer box (at least 1 on a hit).
template <typename T>
TDRR_HD int64_t trilinear_sample_count(const ClippedRay<T>& r, T length_world, T step_mm) {
  if (!r.hit) return 0;
  const T inside = (r.alpha_max - r.alpha_min) * length_world;
  const int64_t n = static_cast<int64_t>(ceil(inside / step_mm));
  return n < 1 ? 1 : n;
}

// Per axis a of the index-space point x: the offsets lo[a] and hi[a] of the grid planes at and above floor(x_a),
// clamped into the grid (so that the interpolant is constant between an edge voxel's centre and the outer face) and
// times the axis' stride, and the fraction f[a] = x_a - floor(x_a). Index: the offsets' integer type.
template <typename T, typename Index>
TDRR_HD void clamped_trilinear_corners(const VolumeGeometry<T>& g, const T* x, Index* lo, Index* hi, T* f) {
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const T fl = floor(x[a]);
    const Index i0 = static_cast<Index>(fl);
    f[a] = x[a] - fl;
    const Index last = static_cast<Index>(g.size[a] - 1), stride = static_cast<Index>(g.voxel_stride[a]);
    lo[a] = (i0 < 0 ? 0 : (i0 > last ? last : i0)) * stride;
    hi[a] = (i0 + 1 < 0 ? 0 : (i0 + 1 > last ? last : i0 + 1)) * stride;
  }
}

// The 8 voxels around a point and their trilinear weights, with indices clamped to the grid so that the value is
// constant between an edge voxel's centre and the outer face. dweight[a][corner] = d weight / d x_a.
template <typename T>
struct TrilinearStencil {
  int64_t offset[8];
  T weight[8];
  T dweight[3][8];
};

template <typename T>
TDRR_HD TrilinearStencil<T> trilinear_stencil(const VolumeGeometry<T>& g, const T* x) {
  int64_t lo[3], hi[3];
  T frac[3];
  clamped_trilinear_corners(g, x, lo, hi, frac);
  TrilinearStencil<T> st;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int bi = (c >> 2) & 1, bj = (c >> 1) & 1, bk = c & 1;
    const T wi = bi ? frac[0] : T(1) - frac[0];
    const T wj = bj ? frac[1] : T(1) - frac[1];
    const T wk = bk ? frac[2] : T(1) - frac[2];
    const T si = bi ? T(1) : T(-1), sj = bj ? T(1) : T(-1), sk = bk ? T(1) : T(-1);
    st.offset[c] = (bi ? hi[0] : lo[0]) + (bj ? hi[1] : lo[1]) + (bk ? hi[2] : lo[2]);
    st.weight[c] = wi * wj * wk;
    st.dweight[0][c] = si * wj * wk;
    st.dweight[1][c] = wi * sj * wk;
    st.dweight[2][c] = wi * wj * sk;
  }
  return st;
}

// d alpha / d s_a and d alpha / d t_a of a face crossing on axis a at parameter alpha (index space).
template <typename T>
TDRR_HD void crossing_derivative(const ClippedRay<T>& r, int axis, T alpha, T weight, T* grad_s, T* grad_t) {
  if (axis < 0) return;
  grad_s[axis] += weight * (alpha - T(1)) * r.inv_d[axis];
  grad_t[axis] += weight * (-alpha) * r.inv_d[axis];
}

// Turns dS/ds, dS/dt in index space (S the parameter-space integral of w) into the gradients of F = length * S with
// respect to the world endpoints.
template <typename T>
TDRR_HD void endpoint_gradients(const VolumeGeometry<T>& g, const T* s_world, const T* t_world, T length, T integral,
                                const T* dS_ds_index, const T* dS_dt_index, T* grad_s_world, T* grad_t_world) {
  T gs[3], gt[3];
  index_grad_to_world(g, dS_ds_index, gs);
  index_grad_to_world(g, dS_dt_index, gt);
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const T unit = (t_world[a] - s_world[a]) / length;  // d length / d t_a = -d length / d s_a
    grad_s_world[a] = length * gs[a] - integral * unit;
    grad_t_world[a] = length * gt[a] + integral * unit;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-ray drivers. `MaxC` is the compile-time bound on channels in registers, `channels` <= MaxC the real count.
// ---------------------------------------------------------------------------------------------------------------

// Siddon forward as a siddon_runs visitor: acc[c] = sum over the ray's voxels of value_c x parameter length.
template <typename T, int MaxC, bool Packed>
struct SiddonForwardVisitor {
  static constexpr bool kExitTestFirst = false;  // siddon_steps' loop shape
  const T* __restrict__ volume;
  int64_t channel_stride;
  int channels;
  T acc[MaxC];

  TDRR_HD void partial(int64_t offset, T a0, T a1, int /*entry_axis*/) {
    T v[MaxC];
    load_voxel<T, MaxC, Packed>(volume, offset, channel_stride, channels, v);
    const T length = a1 - a0;
#pragma unroll
    for (int c = 0; c < MaxC; ++c) acc[c] += v[c] * length;
  }

  // siddon_steps' interface, software-pipelined: each call adds the previous voxel and only issues this voxel's
  // load, whose value is first used one iteration later. Why: a value used right after its load made warps wait
  // on the L1 latency (69 % of the stall cycles of the GPU forward, ncu on the H100).
  T pending[MaxC];  // the previous voxel's values (zero before the first)
  T pending_length;
  TDRR_HD void segment(int64_t offset, bool in_range, T a0, T a1, int /*entry_axis*/) {
    if (!in_range) return;
#pragma unroll
    for (int c = 0; c < MaxC; ++c) acc[c] += pending[c] * pending_length;
    load_voxel<T, MaxC, Packed>(volume, offset, channel_stride, channels, pending);
    pending_length = a1 - a0;
  }
  TDRR_HD void finish() {
#pragma unroll
    for (int c = 0; c < MaxC; ++c) acc[c] += pending[c] * pending_length;
    pending_length = T(0);
  }

  TDRR_HD void run(int64_t offset, int64_t offset_step, int64_t n, T /*a_first*/, T delta, int /*axis*/) {
    T sum[MaxC];
#pragma unroll
    for (int c = 0; c < MaxC; ++c) sum[c] = T(0);
    for (int64_t q = 0; q < n; ++q, offset += offset_step) {
      T v[MaxC];
      load_voxel<T, MaxC, Packed>(volume, offset, channel_stride, channels, v);
#pragma unroll
      for (int c = 0; c < MaxC; ++c) sum[c] += v[c];
    }
#pragma unroll
    for (int c = 0; c < MaxC; ++c) acc[c] += sum[c] * delta;
  }
};

// The trilinear blend of the 8 voxels around a point, as 4 + 2 + 1 linear interpolations (k, then j, then i) with
// the fractions f: load(bi, bj, v0, v1) reads the corners (bi, bj, 0) into v0 and (bi, bj, 1) into v1 (MaxC
// channels each). Shared by the clamped and the interior samples, so that the two give the same value.
template <typename T, int MaxC, typename Load>
TDRR_HD void trilinear_blend(const T* f, const Load& load, T* value) {
  T along_i[2][MaxC];
#pragma unroll
  for (int bi = 0; bi < 2; ++bi) {
    T along_j[2][MaxC];
#pragma unroll
    for (int bj = 0; bj < 2; ++bj) {
      T v0[MaxC], v1[MaxC];
      load(bi, bj, v0, v1);
#pragma unroll
      for (int c = 0; c < MaxC; ++c) along_j[bj][c] = v0[c] + f[2] * (v1[c] - v0[c]);
    }
#pragma unroll
    for (int c = 0; c < MaxC; ++c) along_i[bi][c] = along_j[0][c] + f[1] * (along_j[1][c] - along_j[0][c]);
  }
#pragma unroll
  for (int c = 0; c < MaxC; ++c) value[c] = along_i[0][c] + f[0] * (along_i[1][c] - along_i[0][c]);
}

// Adds the edge-clamped trilinear interpolant of the first `channels` channels at the index-space point x to acc,
// as 4 + 2 + 1 linear interpolations (k, then j, then i) of the 8 surrounding voxels. Index: the integer type of the
// offsets (int where the caller has checked that the volume spans fewer than 2^31 elements, as the GPU kernels do:
// 64-bit offsets cost registers and instructions there).
template <typename T, int MaxC, bool Packed, typename Index = int64_t>
TDRR_HD void add_trilinear_sample(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels, const T* x,
                                  T* acc) {
  Index lo[3], hi[3];
  T f[3];
  clamped_trilinear_corners(g, x, lo, hi, f);
  T value[MaxC];
  trilinear_blend<T, MaxC>(
      f,
      [&](int bi, int bj, T* v0, T* v1) {
        const Index base = (bi ? hi[0] : lo[0]) + (bj ? hi[1] : lo[1]);
        load_voxel<T, MaxC, Packed>(volume, base + lo[2], g.channel_stride, channels, v0);
        load_voxel<T, MaxC, Packed>(volume, base + hi[2], g.channel_stride, channels, v1);
      },
      value);
#pragma unroll
  for (int c = 0; c < MaxC; ++c) acc[c] += value[c];
}

// floor(x) for 0 <= x < 2^22 as an unsigned code, floor(x) + floor_code_offset<T>() (mod 2^32), with fl = floor(x)
// as a T. On the GPU: one add rounded down, x + 2^23 (2^52 for double), puts floor(x) in the low mantissa bits, so
// the code is those bits and a subtraction recovers fl. Why: the float-to-int and int-to-float conversions this
// replaces run at a quarter of the rate of adds on the H100, and a trilinear sample needs three of each. The
// caller folds the offset into one constant per ray instead of subtracting it per axis.
template <typename T>
TDRR_HD constexpr uint32_t floor_code_offset() {
#if defined(__CUDA_ARCH__)
  return std::is_same<T, float>::value ? 0x4B000000u : 0u;  // the bits of 2^23; 2^52's low 32 bits are 0
#else
  return 0u;
#endif
}

template <typename T>
TDRR_HD uint32_t floor_code(T x, T& fl) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) {
    const float y = __fadd_rd(x, 8388608.0f);  // 2^23 + floor(x), exact
    fl = y - 8388608.0f;
    return __float_as_uint(y);
  } else {
    const double y = __dadd_rd(x, 4503599627370496.0);  // 2^52 + floor(x), exact
    fl = y - 4503599627370496.0;
    return static_cast<uint32_t>(__double2loint(y));
  }
#else
  fl = floor(x);
  return static_cast<uint32_t>(fl);
#endif
}

// The trilinear samples [k_begin, k_end) of a ray (sample k at beta = alpha_min + (k + 1/2) h) whose 8 stencil
// voxels are all in the grid, so that they need no clamping: every coordinate in [0, size - 1). The range is
// conservative: a margin in x larger than the rounding of x = s + beta d, and one sample at each end for the
// rounding of this estimate; samples outside it take the clamped path, which is right everywhere.
template <typename T>
TDRR_HD void interior_trilinear_samples(const VolumeGeometry<T>& g, const ClippedRay<T>& r, T h, int64_t n,
                                        int64_t& k_begin, int64_t& k_end) {
  constexpr T kEpsilon = std::is_same<T, float>::value ? T(1.1920929e-7) : T(2.220446049250313e-16);
  T lo = T(0), hi = T(n);  // sample numbers k, as T
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const T abs_s = r.s[a] < T(0) ? -r.s[a] : r.s[a], abs_d = r.d[a] < T(0) ? -r.d[a] : r.d[a];
    const T margin = T(16) * kEpsilon * (abs_s + abs_d + T(g.size[a]));
    const T x_low = margin, x_high = T(g.size[a] - 1) - margin;
    const T x_first = r.s[a] + (r.alpha_min + T(0.5) * h) * r.d[a];  // x_a of sample 0
    const T per_sample = h * r.d[a];
    if (per_sample == T(0)) {
      if (!(x_first >= x_low && x_first <= x_high)) hi = T(-1);  // never inside: no interior samples
      continue;
    }
    T k0 = (x_low - x_first) / per_sample, k1 = (x_high - x_first) / per_sample;
    if (per_sample < T(0)) {
      const T swap = k0;
      k0 = k1;
      k1 = swap;
    }
    lo = fmax(lo, k0);
    hi = fmin(hi, k1);
  }
  // Clamped into [-1, n + 1] before the conversion (a near-parallel axis gives huge or infinite bounds).
  lo = fmin(fmax(lo, T(-1)), T(n + 1));
  hi = fmin(fmax(hi, T(-1)), T(n + 1));
  // Samples inside: ceil(lo) <= k <= floor(hi). Kept: one fewer at each end, so [ceil(lo) + 1, floor(hi)).
  k_begin = static_cast<int64_t>(ceil(lo)) + 1;
  k_end = static_cast<int64_t>(floor(hi));
  k_begin = k_begin < 0 ? 0 : (k_begin > n ? n : k_begin);
  k_end = k_end < k_begin ? k_begin : (k_end > n ? n : k_end);
}

// The offset of the lowest corner of the interior point x's stencil (bias + sum floor(x_a) stride[a], with bias as
// below) and the fractions f[a] = x_a - floor(x_a): shared by the volume's and the quads' interior samples.
template <typename T>
TDRR_HD uint32_t interior_stencil_base(const uint32_t* stride, uint32_t bias, const T* x, T* f) {
  uint32_t base = bias;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    T fl;
    base += floor_code(x[a], fl) * stride[a];
    f[a] = x[a] - fl;
  }
  return base;
}

// The trilinear interpolant at x, as add_trilinear_sample's, for a point whose 8 stencil voxels are all in the grid
// (interior_trilinear_samples): no clamps, 32-bit offsets (the CUDA ops check that a volume spans fewer than 2^31
// elements), and each corner's address one multiply-add from another's. bias = -floor_code_offset<T>()
// (stride[0] + stride[1] + stride[2]). UnitK: the neighbour along k is the next voxel in memory (stride[2] is 1, or
// MaxC when Packed), a constant offset the load instruction carries.
template <typename T, int MaxC, bool Packed, bool UnitK>
TDRR_HD void interior_trilinear_value(const T* __restrict__ volume, const uint32_t* stride, uint32_t bias,
                                      int64_t channel_stride, int channels, const T* x, T* value) {
  T f[3];
  const uint32_t base = interior_stencil_base(stride, bias, x, f);
  const uint32_t along_k = UnitK ? uint32_t(Packed ? MaxC : 1) : stride[2];
  const T* corner_i0 = volume + base;
  const T* corner_i1 = corner_i0 + stride[0];
  trilinear_blend<T, MaxC>(
      f,
      [&](int bi, int bj, T* v0, T* v1) {
        const T* corner = bi ? corner_i1 : corner_i0;
        if (bj) corner += stride[1];
        load_voxel<T, MaxC, Packed>(corner, 0, channel_stride, channels, v0);
        load_voxel<T, MaxC, Packed>(corner, static_cast<int64_t>(along_k), channel_stride, channels, v1);
      },
      value);
}

// Four voxels of a one-channel float32 volume in one 16-byte load: at the offset o of voxel (i, j, k) of the
// geometry (make_geometry's axes: axis 2 the contiguous one), (v[o], v[o + 1], v[o + s1], v[o + s1 + 1]) with s1 the
// stride of axis 1, neighbours past the last voxel clamped (torchdrr.ops.trilinear_quads builds them). A trilinear
// interior sample then reads 2 of these instead of 8 voxels.
struct alignas(16) VoxelQuad {
  float v[4];
};

// interior_trilinear_value from quads (VoxelQuad): the same 4 + 2 + 1 interpolations of the same voxel values, so
// the same value to the bit. Why: 2 loads and 2 addresses a sample instead of 8 and 7 took the H100's interior
// sample loop from 111 to 80 SASS instructions for two samples and the trilinear kernel from 1.39 to 1.15 ms (ncu,
// chest CT, 1240 x 960, 0.7 mm; benchmarks/NOTES.md v31), for 4x the volume's memory.
template <typename T>
TDRR_HD void interior_quad_value(const VoxelQuad* __restrict__ quads, const uint32_t* stride, uint32_t bias,
                                 const T* x, T* value) {
  static_assert(std::is_same<T, float>::value, "voxel quads hold float32 voxels");
  T f[3];
  const uint32_t base = interior_stencil_base(stride, bias, x, f);
#if defined(__CUDA_ARCH__)
  const float4 q0 = __ldg(reinterpret_cast<const float4*>(quads + base));
  const float4 q1 = __ldg(reinterpret_cast<const float4*>(quads + (base + stride[0])));
  const float lower[4] = {q0.x, q0.y, q0.z, q0.w}, upper[4] = {q1.x, q1.y, q1.z, q1.w};
#else
  const float* lower = quads[base].v;
  const float* upper = quads[base + stride[0]].v;
#endif
  trilinear_blend<T, 1>(
      f,
      [&](int bi, int bj, T* v0, T* v1) {
        const float* q = bi ? upper : lower;
        v0[0] = q[2 * bj];
        v1[0] = q[2 * bj + 1];
      },
      value);
}

// The interior samples [k_begin, k_end) of trilinear_samples_steps, added to acc in order. Quads: read the voxels
// from `quads` (interior_quad_value; one float32 channel, UnitK) instead of `volume`.
template <typename T, int MaxC, bool Packed, bool UnitK, bool Quads = false>
TDRR_HD void add_interior_trilinear_samples(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels,
                                            const ClippedRay<T>& r, int64_t k_begin, int64_t k_end, T h, T* acc,
                                            const VoxelQuad* __restrict__ quads = nullptr) {
  uint32_t stride[3], bias = 0;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    stride[a] = static_cast<uint32_t>(g.voxel_stride[a]);
    bias -= floor_code_offset<T>() * stride[a];
  }
  // x = x_0 + (k + 1/2) h d, one multiply-add an axis (the clamped samples' s + beta d rounds differently, by an
  // ulp or so of the coordinates; interior_trilinear_samples' margin covers it).
  T x0[3], per_sample[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    x0[a] = r.s[a] + r.alpha_min * r.d[a];
    per_sample[a] = h * r.d[a];
  }
  const auto sample = [&](T half_k, T* value) {
    T x[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) x[a] = x0[a] + half_k * per_sample[a];
    if constexpr (Quads) {
      static_assert(MaxC == 1 && !Packed && UnitK, "voxel quads hold one channel, axis 2 contiguous");
      interior_quad_value<T>(quads, stride, bias, x, value);
    } else {
      interior_trilinear_value<T, MaxC, Packed, UnitK>(volume, stride, bias, g.channel_stride, channels, x, value);
    }
  };
  // Two samples an iteration, so that the 16 loads of both are in flight together: the loop waited on its loads
  // (long-scoreboard stalls, two thirds of its cycles, at 48 % occupancy; ncu, H100). k + 1/2 is kept as a T
  // (exact: n < 2^22), so that the loop needs no integer-to-float conversion.
  const int count = static_cast<int>(k_end - k_begin);
  T half_k = T(k_begin) + T(0.5);
  // (One sample an iteration at 8 blocks, and four at 5, were no faster on the H100: benchmarks/NOTES.md v27.)
  for (int pair = 0; pair < count / 2; ++pair) {
    T first[MaxC], second[MaxC];
    sample(half_k, first);
    sample(half_k + T(1), second);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) acc[c] = (acc[c] + first[c]) + second[c];
    half_k += T(2);
  }
  if (count & 1) {
    T last[MaxC];
    sample(half_k, last);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) acc[c] += last[c];
  }
}

// The n trilinear samples of a hit ray added to acc, the GPU's way: the samples whose stencil is inside the grid
// (most of them) without clamps (interior_trilinear_value), the few near the faces with them. The same sample
// positions (to rounding) and order of summation as the plain loop in ray_forward. Why: clamped 64-bit offsets made
// a sample about 150 instructions (ncu, H100, 0.7 mm steps through the chest CT); this one is 48. Quads: the
// interior samples read `quads` (interior_quad_value: 6 loads and 5 addresses fewer); the caller has checked that
// the volume is one dense float32 channel, so the geometry's axis 2 is contiguous.
template <typename T, int MaxC, bool Packed, bool Quads = false>
TDRR_HD void trilinear_samples_steps(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels,
                                     const ClippedRay<T>& r, int64_t n, T h, T* acc,
                                     const VoxelQuad* __restrict__ quads = nullptr) {
  int64_t k_begin, k_end;
  interior_trilinear_samples(g, r, h, n, k_begin, k_end);
  // Two passes: the clamped samples before the interior, the interior, then (second pass) the clamped samples after
  // it. A loop rather than two copies of the clamped code, which cost the GPU kernel registers.
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t first = pass == 0 ? 0 : k_end, last = pass == 0 ? k_begin : n;
    for (int64_t k = first; k < last; ++k) {
      const T beta = r.alpha_min + (T(k) + T(0.5)) * h;
      T x[3];
#pragma unroll
      for (int a = 0; a < 3; ++a) x[a] = r.s[a] + beta * r.d[a];
      add_trilinear_sample<T, MaxC, Packed, int>(g, volume, channels, x, acc);
    }
    if (pass == 1) break;
    if constexpr (Quads) {
      add_interior_trilinear_samples<T, MaxC, Packed, true, true>(g, volume, channels, r, k_begin, k_end, h, acc,
                                                                  quads);
    } else if (g.voxel_stride[2] == (Packed ? MaxC : 1)) {  // the same for every ray: no divergence
      add_interior_trilinear_samples<T, MaxC, Packed, true>(g, volume, channels, r, k_begin, k_end, h, acc);
    } else {
      add_interior_trilinear_samples<T, MaxC, Packed, false>(g, volume, channels, r, k_begin, k_end, h, acc);
    }
  }
}

// Forward of one ray: out[c] = integral of channel c along the segment (volume units x mm); NaN for non-finite
// endpoints.
// Steps: walk Siddon rays with siddon_steps (the GPU kernels) instead of siddon_runs (the CPU kernels).
// Quads (trilinear with Steps only): the interior samples read `quads` (VoxelQuad) instead of `volume`.
template <typename T, int MaxC, bool Packed, bool Trilinear, bool Steps = false, bool Quads = false>
TDRR_HD void ray_forward(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels, const T* s_world,
                         const T* t_world, T step_mm, T* out, const VoxelQuad* __restrict__ quads = nullptr) {
  if (!all_finite(s_world) || !all_finite(t_world)) {
    for (int c = 0; c < channels; ++c) out[c] = NAN;
    return;
  }
  const T length = world_length(s_world, t_world);
  const ClippedRay<T> r = clip_ray(g, to_index_space(g, s_world), to_index_space(g, t_world));
  T acc[MaxC];
#pragma unroll
  for (int c = 0; c < MaxC; ++c) acc[c] = T(0);
  if (r.hit) {
    if constexpr (!Trilinear) {
      SiddonForwardVisitor<T, MaxC, Packed> visit{volume, g.channel_stride, channels, {}, {}, T(0)};
#pragma unroll
      for (int c = 0; c < MaxC; ++c) visit.acc[c] = visit.pending[c] = T(0);
      if constexpr (Steps) {
        siddon_steps(g, r, visit);
      } else {
        siddon_visit(g, r, visit);
      }
#pragma unroll
      for (int c = 0; c < MaxC; ++c) acc[c] = visit.acc[c] * length;
    } else {
      const int64_t n = trilinear_sample_count(r, length, step_mm);
      const T h = (r.alpha_max - r.alpha_min) / T(n);
      if constexpr (Steps) {
        trilinear_samples_steps<T, MaxC, Packed, Quads>(g, volume, channels, r, n, h, acc, quads);
      } else {
        static_assert(!Quads, "voxel quads are read by the GPU's walk (Steps) only");
        for (int64_t k = 0; k < n; ++k) {
          const T beta = r.alpha_min + (T(k) + T(0.5)) * h;
          T x[3];
#pragma unroll
          for (int a = 0; a < 3; ++a) x[a] = r.s[a] + beta * r.d[a];
          add_trilinear_sample<T, MaxC, Packed>(g, volume, channels, x, acc);
        }
      }
#pragma unroll
      for (int c = 0; c < MaxC; ++c) acc[c] *= length * h;
    }
  }
  // Constant indices (unrolled to MaxC): a loop to the run-time `channels` indexes acc at run time, which put it in
  // local memory on the GPU (a 16-byte stack frame in the 4-channel kernel).
#pragma unroll
  for (int c = 0; c < MaxC; ++c) {
    if (c < channels) out[c] = acc[c];
  }
}

// ray_forward with the mode chosen at run time.
template <typename T, int MaxC, bool Packed = false, bool Steps = false>
TDRR_HD void raycast_ray_forward(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels,
                                 const T* s_world, const T* t_world, bool trilinear, T step_mm, T* out) {
  if (trilinear) {
    ray_forward<T, MaxC, Packed, true, Steps>(g, volume, channels, s_world, t_world, step_mm, out);
  } else {
    ray_forward<T, MaxC, Packed, false, Steps>(g, volume, channels, s_world, t_world, step_mm, out);
  }
}

// Siddon backward as a siddon_runs visitor. With w = sum_c g_c v_c (the volume weighted by the incoming gradient),
// it accumulates S = sum of w x parameter length and, per axis a, the sums over the crossings of that axis'
// planes of dw = w_before - w_after and of dw x alpha: then (ray_math.h header) dS/ds_a = (E_a - D_a) / d_a and
// dS/dt_a = -E_a / d_a. The back-projection adds g_c x length x parameter length to each voxel.
template <typename T, int MaxC, bool WantVolume, bool WantRays, typename ScatterAdd>
struct SiddonBackwardVisitor {
  static constexpr bool kExitTestFirst = false;  // siddon_steps' loop shape
  const T* __restrict__ volume;
  int64_t channel_stride;
  int channels;
  const T* go;     // [MaxC] dLoss/dF_c, zero past `channels`
  T length;        // world length of the segment (mm)
  ScatterAdd& scatter_add;
  T w_prev;        // w of the previous voxel; 0 outside the volume
  T integral;      // S
  T dw_sum[3];     // D_a
  T dw_alpha[3];   // E_a

  TDRR_HD T weighted(int64_t offset) const {
    T v[MaxC];
    load_voxel<T, MaxC, false>(volume, offset, channel_stride, channels, v);
    T w = T(0);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) w += go[c] * v[c];
    return w;
  }

  // Adds crossings of the planes of `axis` (-1: none, a source inside) with sum dw and sum dw x alpha. Branches
  // instead of dw_sum[axis]: a run-time index would move the arrays to local memory on the GPU.
  TDRR_HD void add_crossings(int axis, T dw, T dw_times_alpha) {
    if (axis == 0) {
      dw_sum[0] += dw;
      dw_alpha[0] += dw_times_alpha;
    } else if (axis == 1) {
      dw_sum[1] += dw;
      dw_alpha[1] += dw_times_alpha;
    } else if (axis == 2) {
      dw_sum[2] += dw;
      dw_alpha[2] += dw_times_alpha;
    }
  }

  TDRR_HD void project(int64_t offset, T parameter_length) {
#pragma unroll
    for (int c = 0; c < MaxC; ++c) {
      if (c < channels) scatter_add(offset + c * channel_stride, go[c] * length * parameter_length);
    }
  }

  TDRR_HD void partial(int64_t offset, T a0, T a1, int entry_axis) {
    if constexpr (WantRays) {
      const T w = weighted(offset);
      integral += w * (a1 - a0);
      add_crossings(entry_axis, w_prev - w, (w_prev - w) * a0);
      w_prev = w;
    }
    if constexpr (WantVolume) project(offset, a1 - a0);
  }

  // siddon_steps' interface, software-pipelined as in SiddonForwardVisitor: the ray-gradient terms of a voxel are
  // added one call later, when its weighted value w has arrived. The initial pending voxel (w = 0, no crossing) is a
  // no-op.
  T pending_w = T(0), pending_a0 = T(0), pending_a1 = T(0);
  int pending_axis = -1;
  TDRR_HD void add_pending() {
    integral += pending_w * (pending_a1 - pending_a0);
    add_crossings(pending_axis, w_prev - pending_w, (w_prev - pending_w) * pending_a0);
    w_prev = pending_w;
  }
  TDRR_HD void segment(int64_t offset, bool in_range, T a0, T a1, int entry_axis) {
    if (!in_range) return;
    if constexpr (WantRays) {
      add_pending();
      pending_w = weighted(offset);
      pending_a0 = a0;
      pending_a1 = a1;
      pending_axis = entry_axis;
    }
    if constexpr (WantVolume) project(offset, a1 - a0);
  }
  TDRR_HD void finish() {
    if constexpr (WantRays) {
      add_pending();
      pending_w = pending_a0 = pending_a1 = T(0);
      pending_axis = -1;
    }
  }

  TDRR_HD void run(int64_t offset, int64_t offset_step, int64_t n, T a_first, T delta, int axis) {
    if constexpr (WantRays) {
      T sum = T(0), dw_total = T(0), dw_alpha_total = T(0);
      int64_t o = offset;
      for (int64_t q = 0; q < n; ++q, o += offset_step) {
        const T w = weighted(o);
        const T dw = w_prev - w;
        sum += w;
        dw_total += dw;
        dw_alpha_total += dw * (a_first + T(q) * delta);
        w_prev = w;
      }
      integral += sum * delta;
      add_crossings(axis, dw_total, dw_alpha_total);
    }
    if constexpr (WantVolume) {
      for (int64_t q = 0; q < n; ++q) project(offset + q * offset_step, delta);
    }
  }
};

// The forward and the pose Jacobian of one ray in one walk, as a siddon_steps and a siddon_runs visitor: for every
// channel c at once, the integral S_c = sum v_c x parameter length and the crossing sums D_{c,a}, E_{c,a} of
// SiddonBackwardVisitor with w = v_c, i.e. that backward for the unit dLoss/dF_c of each channel. Why: the pose
// gradient of a camera is sum_c g_c dF_c/d(s, t), so with these six numbers per ray and channel saved by the forward,
// the backward needs no second walk (ray_forward_jacobian, camera_raycast_forward_jacobian). One walk serves all
// channels: the voxel loads are shared and only the adds grow with the channel count.
template <typename T, int MaxC, bool Packed>
struct SiddonJacobianVisitor {
  static constexpr bool kExitTestFirst = true;  // siddon_steps' loop shape (faster for this visitor, H100)
  const T* __restrict__ volume;
  int64_t channel_stride;
  int channels;
  T integral[MaxC];     // S_c
  T w_prev[MaxC];       // the previous voxel's values; 0 outside the volume
  T dw_sum[3][MaxC];    // D_{c,a}, by axis then channel
  T dw_alpha[3][MaxC];  // E_{c,a}
  // siddon_steps' pipeline (as in SiddonForwardVisitor): the voxel whose values were loaded by the previous call.
  T pending[MaxC];
  T pending_a0, pending_a1;
  int pending_axis;

  TDRR_HD void reset() {
#pragma unroll
    for (int c = 0; c < MaxC; ++c) {
      integral[c] = w_prev[c] = pending[c] = T(0);
#pragma unroll
      for (int a = 0; a < 3; ++a) dw_sum[a][c] = dw_alpha[a][c] = T(0);
    }
    pending_a0 = pending_a1 = T(0);
    pending_axis = -1;
  }

  // Adds crossings of the planes of `axis` (-1: none, a source inside) to the sums as multiply-adds by a mask (1 or
  // 0, alpha or 0 for E), the same for every channel. Why: an index by `axis` would move the arrays to local memory
  // on the GPU, per-axis `if`s compiled to a chain of divergent branches (the compiler knows the axes exclude each
  // other), and a select per sum and channel costs twice the instructions. Adding 0 x dw leaves a sum unchanged for
  // finite values, as not adding would.
  TDRR_HD void add_crossing_sums(int axis, const T* dw, const T* dw_x_alpha) {
    const T m0 = axis == 0 ? T(1) : T(0), m1 = axis == 1 ? T(1) : T(0), m2 = axis == 2 ? T(1) : T(0);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) {
      dw_sum[0][c] += m0 * dw[c];
      dw_sum[1][c] += m1 * dw[c];
      dw_sum[2][c] += m2 * dw[c];
      dw_alpha[0][c] += m0 * dw_x_alpha[c];
      dw_alpha[1][c] += m1 * dw_x_alpha[c];
      dw_alpha[2][c] += m2 * dw_x_alpha[c];
    }
  }

  // A crossing at parameter alpha through a face of `axis` into a voxel with values v (all zero: out of the volume).
  TDRR_HD void cross(int axis, T alpha, const T* v) {
    const T m0 = axis == 0 ? T(1) : T(0), m1 = axis == 1 ? T(1) : T(0), m2 = axis == 2 ? T(1) : T(0);
    const T am0 = axis == 0 ? alpha : T(0), am1 = axis == 1 ? alpha : T(0), am2 = axis == 2 ? alpha : T(0);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) {
      const T dw = w_prev[c] - v[c];
      dw_sum[0][c] += m0 * dw;
      dw_sum[1][c] += m1 * dw;
      dw_sum[2][c] += m2 * dw;
      dw_alpha[0][c] += am0 * dw;
      dw_alpha[1][c] += am1 * dw;
      dw_alpha[2][c] += am2 * dw;
      w_prev[c] = v[c];
    }
  }

  // One voxel with values v crossed over [a0, a1], entered through a face of entry_axis.
  TDRR_HD void add_voxel(const T* v, T a0, T a1, int entry_axis) {
    const T parameter_length = a1 - a0;
#pragma unroll
    for (int c = 0; c < MaxC; ++c) integral[c] += v[c] * parameter_length;
    cross(entry_axis, a0, v);
  }

  // siddon_runs' interface.
  TDRR_HD void partial(int64_t offset, T a0, T a1, int entry_axis) {
    T v[MaxC];
    load_voxel<T, MaxC, Packed>(volume, offset, channel_stride, channels, v);
    add_voxel(v, a0, a1, entry_axis);
  }

  TDRR_HD void run(int64_t offset, int64_t offset_step, int64_t n, T a_first, T delta, int axis) {
    T sum[MaxC], dw_total[MaxC], dw_alpha_total[MaxC];
#pragma unroll
    for (int c = 0; c < MaxC; ++c) sum[c] = dw_total[c] = dw_alpha_total[c] = T(0);
    for (int64_t q = 0; q < n; ++q, offset += offset_step) {
      T v[MaxC];
      load_voxel<T, MaxC, Packed>(volume, offset, channel_stride, channels, v);
      const T alpha = a_first + T(q) * delta;
#pragma unroll
      for (int c = 0; c < MaxC; ++c) {
        const T dw = w_prev[c] - v[c];
        sum[c] += v[c];
        dw_total[c] += dw;
        dw_alpha_total[c] += dw * alpha;
        w_prev[c] = v[c];
      }
    }
#pragma unroll
    for (int c = 0; c < MaxC; ++c) integral[c] += sum[c] * delta;
    add_crossing_sums(axis, dw_total, dw_alpha_total);
  }

  // siddon_steps' interface, software-pipelined: each call adds the previous voxel's terms and only issues this
  // voxel's loads, whose values are first used one call later (why: SiddonForwardVisitor). The initial pending
  // voxel (values 0, no crossing, zero length) adds nothing.
  TDRR_HD void segment(int64_t offset, bool in_range, T a0, T a1, int entry_axis) {
    if (!in_range) return;
    add_voxel(pending, pending_a0, pending_a1, pending_axis);
    load_voxel<T, MaxC, Packed>(volume, offset, channel_stride, channels, pending);
    pending_a0 = a0;
    pending_a1 = a1;
    pending_axis = entry_axis;
  }
  TDRR_HD void finish() {
    add_voxel(pending, pending_a0, pending_a1, pending_axis);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) pending[c] = T(0);
    pending_a0 = pending_a1 = T(0);
    pending_axis = -1;
  }

  // Leaving the volume at alpha through a face of `axis` (-1: the target is inside): the values drop to 0.
  TDRR_HD void leave_volume(int axis, T alpha) {
    T zero[MaxC];
#pragma unroll
    for (int c = 0; c < MaxC; ++c) zero[c] = T(0);
    cross(axis, alpha, zero);
  }
};

// Trilinear backward of one ray (see raycast_ray_backward). The sample positions move with the clipped part's ends.
template <typename T, int MaxC, typename ScatterAdd>
TDRR_HD void trilinear_ray_backward(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels,
                                    const ClippedRay<T>& r, T length, T step_mm, const T* go, bool want_volume,
                                    ScatterAdd& scatter_add, bool want_rays, T& integral, T* dS_ds, T* dS_dt) {
  const int64_t n = trilinear_sample_count(r, length, step_mm);
  const T h = (r.alpha_max - r.alpha_min) / T(n);
  T sum_w = T(0);
  T grad_from_s[3] = {T(0), T(0), T(0)}, grad_from_t[3] = {T(0), T(0), T(0)};
  T q_min = T(0), q_max = T(0);  // sum of (grad w . d) weighted by how each sample moves with alpha_min/max
  for (int64_t k = 0; k < n; ++k) {
    const T u = (T(k) + T(0.5)) / T(n);
    const T beta = r.alpha_min + (T(k) + T(0.5)) * h;
    T x[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) x[a] = r.s[a] + beta * r.d[a];
    const TrilinearStencil<T> st = trilinear_stencil(g, x);
    T w = T(0), gw[3] = {T(0), T(0), T(0)};
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      T wq = T(0);
#pragma unroll
      for (int c = 0; c < MaxC; ++c) {
        if (c < channels) wq += go[c] * volume[st.offset[q] + c * g.channel_stride];
      }
      w += st.weight[q] * wq;
#pragma unroll
      for (int a = 0; a < 3; ++a) gw[a] += st.dweight[a][q] * wq;
      if (want_volume) {
#pragma unroll
        for (int c = 0; c < MaxC; ++c) {
          if (c < channels) scatter_add(st.offset[q] + c * g.channel_stride, go[c] * length * h * st.weight[q]);
        }
      }
    }
    if (want_rays) {
      sum_w += w;
      const T gd = gw[0] * r.d[0] + gw[1] * r.d[1] + gw[2] * r.d[2];
      q_min += gd * (T(1) - u);
      q_max += gd * u;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        grad_from_s[a] += gw[a] * (T(1) - beta);
        grad_from_t[a] += gw[a] * beta;
      }
    }
  }
  if (want_rays) {
    integral = h * sum_w;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      dS_ds[a] = h * grad_from_s[a];
      dS_dt[a] = h * grad_from_t[a];
    }
    // S = (alpha_max - alpha_min) / N * sum_n w(x_n): the endpoints of the clipped part move the samples and the
    // piece length together.
    const T inv_n = T(1) / T(n);
    crossing_derivative(r, r.axis_min, r.alpha_min, h * q_min - sum_w * inv_n, dS_ds, dS_dt);
    crossing_derivative(r, r.axis_max, r.alpha_max, h * q_max + sum_w * inv_n, dS_ds, dS_dt);
  }
}

// Backward of one ray. grad_out[c] is dLoss/dF_c. Adds dLoss/dvolume into the volume gradient through
// `scatter_add` when WantVolume, and writes dLoss/ds_world, dLoss/dt_world when WantRays.
template <typename T, int MaxC, bool Trilinear, bool WantVolume, bool WantRays, bool Steps, typename ScatterAdd>
TDRR_HD void ray_backward(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels, const T* s_world,
                          const T* t_world, T step_mm, const T* grad_out, ScatterAdd& scatter_add, T* grad_s_world,
                          T* grad_t_world) {
  if constexpr (WantRays) {
#pragma unroll
    for (int a = 0; a < 3; ++a) grad_s_world[a] = grad_t_world[a] = T(0);
  }
  if (!all_finite(s_world) || !all_finite(t_world)) {
    if constexpr (WantRays) {
#pragma unroll
      for (int a = 0; a < 3; ++a) grad_s_world[a] = grad_t_world[a] = NAN;
    }
    return;
  }
  const T length = world_length(s_world, t_world);
  const ClippedRay<T> r = clip_ray(g, to_index_space(g, s_world), to_index_space(g, t_world));
  if (!r.hit || !(length > T(0))) return;
  T go[MaxC];
#pragma unroll
  for (int c = 0; c < MaxC; ++c) go[c] = c < channels ? grad_out[c] : T(0);

  T integral = T(0);  // S = parameter-space integral of w = sum_c go_c v_c
  T dS_ds[3] = {T(0), T(0), T(0)}, dS_dt[3] = {T(0), T(0), T(0)};
  if constexpr (Trilinear) {
    trilinear_ray_backward<T, MaxC>(g, volume, channels, r, length, step_mm, go, WantVolume, scatter_add, WantRays,
                                    integral, dS_ds, dS_dt);
  } else {
    SiddonBackwardVisitor<T, MaxC, WantVolume, WantRays, ScatterAdd> visit{
        volume, g.channel_stride, channels, go, length, scatter_add, T(0), T(0), {T(0), T(0), T(0)},
        {T(0), T(0), T(0)}};
    if constexpr (Steps) {
      siddon_steps(g, r, visit);
    } else {
      siddon_visit(g, r, visit);
    }
    if constexpr (WantRays) {
      visit.add_crossings(r.axis_max, visit.w_prev, visit.w_prev * r.alpha_max);  // leaving the volume: w drops to 0
      integral = visit.integral;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        dS_ds[a] = (visit.dw_alpha[a] - visit.dw_sum[a]) * r.inv_d[a];
        dS_dt[a] = -visit.dw_alpha[a] * r.inv_d[a];
      }
    }
  }
  if constexpr (WantRays) {
    endpoint_gradients(g, s_world, t_world, length, integral, dS_ds, dS_dt, grad_s_world, grad_t_world);
  }
}

// ray_backward with the mode and the wanted gradients chosen at run time (at least one of them wanted).
template <typename T, int MaxC, bool Steps = false, typename ScatterAdd>
TDRR_HD void raycast_ray_backward(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels,
                                  const T* s_world, const T* t_world, bool trilinear, T step_mm, const T* grad_out,
                                  bool want_volume, ScatterAdd& scatter_add, bool want_rays, T* grad_s_world,
                                  T* grad_t_world) {
  const auto call = [&](auto tri, auto vol, auto rays) {
    ray_backward<T, MaxC, decltype(tri)::value, decltype(vol)::value, decltype(rays)::value, Steps>(
        g, volume, channels, s_world, t_world, step_mm, grad_out, scatter_add, grad_s_world, grad_t_world);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (trilinear) {
    if (want_volume && want_rays) call(Yes{}, Yes{}, Yes{});
    else if (want_volume) call(Yes{}, Yes{}, No{});
    else call(Yes{}, No{}, Yes{});
  } else {
    if (want_volume && want_rays) call(No{}, Yes{}, Yes{});
    else if (want_volume) call(No{}, Yes{}, No{});
    else call(No{}, No{}, Yes{});
  }
}

// The scatter-add of a backward that computes no volume gradient (never called).
struct NoScatter {
  template <typename T>
  TDRR_HD void operator()(int64_t /*offset*/, T /*value*/) const {}
};

// Forward of one ray together with its Jacobian: out[c] = F_c as ray_forward, and jac[6 c .. 6 c + 6) =
// (dF_c/ds_world, dF_c/dt_world) for c < channels, so that the gradient of a loss through the ray's endpoints is
// sum_c g_c jac_c. Non-finite endpoints give NaN in both; a ray that misses the volume gives 0 in both.
// Siddon: one walk for all channels (SiddonJacobianVisitor), with the same formulas as ray_backward. Trilinear: the
// forward, then ray_backward with a unit gradient per channel (channels + 1 walks).
template <typename T, int MaxC, bool Packed, bool Trilinear, bool Steps = false>
TDRR_HD void ray_forward_jacobian(const VolumeGeometry<T>& g, const T* __restrict__ volume, int channels,
                                  const T* s_world, const T* t_world, T step_mm, T* out, T* jac) {
  if constexpr (Trilinear) {
    ray_forward<T, MaxC, Packed, true, Steps>(g, volume, channels, s_world, t_world, step_mm, out);
    NoScatter none;
    const T one = T(1);
    for (int c = 0; c < channels; ++c) {
      ray_backward<T, 1, /*Trilinear=*/true, /*WantVolume=*/false, /*WantRays=*/true, Steps>(
          g, volume + c * g.channel_stride, 1, s_world, t_world, step_mm, &one, none, jac + 6 * c, jac + 6 * c + 3);
    }
  } else {
    if (!all_finite(s_world) || !all_finite(t_world)) {
      for (int c = 0; c < channels; ++c) {
        out[c] = NAN;
        for (int k = 0; k < 6; ++k) jac[6 * c + k] = NAN;
      }
      return;
    }
    const T length = world_length(s_world, t_world);
    const ClippedRay<T> r = clip_ray(g, to_index_space(g, s_world), to_index_space(g, t_world));
    SiddonJacobianVisitor<T, MaxC, Packed> visit{volume, g.channel_stride, channels};
    visit.reset();
    if (r.hit) {
      if constexpr (Steps) {
        siddon_steps(g, r, visit);
      } else {
        siddon_visit(g, r, visit);
      }
      visit.leave_volume(r.axis_max, r.alpha_max);
    }
    // A zero-length ray integrates to 0 and, like ray_backward, gets a zero gradient (its direction is undefined).
    const bool differentiable = r.hit && length > T(0);
#pragma unroll
    for (int c = 0; c < MaxC; ++c) {
      if (c < channels) {
        out[c] = r.hit ? visit.integral[c] * length : T(0);  // as ray_forward, also for an overflowing length
        T dS_ds[3], dS_dt[3];
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          dS_ds[a] = (visit.dw_alpha[a][c] - visit.dw_sum[a][c]) * r.inv_d[a];
          dS_dt[a] = -visit.dw_alpha[a][c] * r.inv_d[a];
        }
        T* jc = jac + 6 * c;
        if (differentiable) {
          endpoint_gradients(g, s_world, t_world, length, visit.integral[c], dS_ds, dS_dt, jc, jc + 3);
        } else {
#pragma unroll
          for (int k = 0; k < 6; ++k) jc[k] = T(0);
        }
      }
    }
  }
}

}  // namespace torchdrr

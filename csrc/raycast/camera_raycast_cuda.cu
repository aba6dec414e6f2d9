// CUDA implementation of torchdrr::camera_raycast_forward and camera_raycast_backward: one thread per pixel ray,
// the ray made from the camera inside the kernel, the per-ray math shared with every other kernel (ray_math.h).
// Also camera_raycast_forward_jacobian (the forward that saves each ray's (dF/ds, dF/dt)) and
// camera_raycast_pose_from_jacobian (the pose gradient reduced from it): the pose backward without a second walk.
//
// Why a camera kernel beside the per-ray one (raycast_cuda.cu): (1) a warp casts a compact tile of pixels instead
// of 32 pixels of one image row; neighbouring rays cross neighbouring voxels, so a tile touches fewer cache sectors
// per step than a row whose rays spread along one axis of the volume; (2) no [B * H * W, 3] endpoint tensors are
// read or written; (3) the backward sums the pose gradient over each block's rays in the kernel and writes one
// [12] partial per block (the sum over blocks is a small deterministic reduction), instead of [B * H * W, 6]
// endpoint gradients that autograd would then reduce through the ray generation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>

#include "cuda_scatter.cuh"
#include "raycast.h"

namespace torchdrr {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTallTileWidth = 2;  // warp tiles 2 pixels wide, 16 tall (camera_tile_shape)
constexpr int kWideTileWidth = 8;  // 8 wide, 4 tall
// Register caps through __launch_bounds__ (blocks of 256 threads per SM): 4 for the forward (64 registers; the
// one-channel Siddon forward is capped at 8 blocks, 32 registers, at its definition) and 3 for the backward (80
// registers). Uncapped, an earlier forward took 128 registers (25 % occupancy) and 1.3x its capped time on the H100
// (benchmarks/NOTES.md). Overridable at build time for tuning.
#ifndef TORCHDRR_FORWARD_MIN_BLOCKS
#define TORCHDRR_FORWARD_MIN_BLOCKS 4
#endif
#ifndef TORCHDRR_BACKWARD_MIN_BLOCKS
#define TORCHDRR_BACKWARD_MIN_BLOCKS 3
#endif
// The forward with the Jacobian (camera_forward_jacobian_kernel) keeps 8 sums per channel instead of the forward's
// 1: 4 blocks (64 registers) for one channel, whose Siddon walk takes 55 (sm_90, float32, no spills); 2 blocks (128)
// for 2 and 4 channels, which take 68 and 83-89.
#ifndef TORCHDRR_JACOBIAN_MIN_BLOCKS_1
#define TORCHDRR_JACOBIAN_MIN_BLOCKS_1 4
#endif
#ifndef TORCHDRR_JACOBIAN_MIN_BLOCKS_N
#define TORCHDRR_JACOBIAN_MIN_BLOCKS_N 2
#endif
constexpr int kForwardMinBlocks = TORCHDRR_FORWARD_MIN_BLOCKS;
constexpr int kBackwardMinBlocks = TORCHDRR_BACKWARD_MIN_BLOCKS;
constexpr int jacobian_min_blocks(int max_channels) {
  return max_channels == 1 ? TORCHDRR_JACOBIAN_MIN_BLOCKS_1 : TORCHDRR_JACOBIAN_MIN_BLOCKS_N;
}

// How the threads of a block tile the image: a warp covers tile_width x (32 / tile_width) sub-pixels, a block 2 x 4
// warp tiles.
struct TileShape {
  int tile_shift;     // log2 of the warp tile's width
  int block_columns;  // 2 * tile width
  int block_rows;     // 4 * 32 / tile width
  int blocks_across;  // blocks per sub-pixel row band
};

// The sub-pixel grid of one image and its two tilings (tall and wide warp tiles; each camera's kernel picks one,
// camera_tile_shape); blockIdx.y is the camera.
struct CameraGrid {
  int width;          // W (pixels)
  int supersample;    // s
  int columns;        // W * s sub-pixel columns
  int rows;           // H * s sub-pixel rows
  TileShape shapes[2];  // [0]: tiles kTallTileWidth wide, [1]: kWideTileWidth wide
  int blocks;         // blocks per image: enough for either tiling
  int64_t rays;       // H * W * s * s rays per image
};

// TORCHDRR_WARP_TILE_WIDTH (a power of two, 1..32) forces one warp tile width for every camera, for tuning; 0 when
// unset (each camera picks tall or wide tiles, camera_tile_shape).
int forced_tile_width() {
  static const int forced = [] {
    const char* text = std::getenv("TORCHDRR_WARP_TILE_WIDTH");
    const int value = text ? std::atoi(text) : 0;
    return (value >= 1 && value <= 32 && (value & (value - 1)) == 0) ? value : 0;
  }();
  return forced;
}

CameraGrid make_camera_grid(int64_t height, int64_t width, int64_t supersample) {
  CameraGrid cam;
  cam.width = static_cast<int>(width);
  cam.supersample = static_cast<int>(supersample);
  cam.columns = static_cast<int>(width * supersample);
  cam.rows = static_cast<int>(height * supersample);
  cam.blocks = 0;
  const int forced = forced_tile_width();
  for (int k = 0; k < 2; ++k) {
    const int tile_width = forced ? forced : (k == 0 ? kTallTileWidth : kWideTileWidth);
    TileShape& shape = cam.shapes[k];
    shape.tile_shift = __builtin_ctz(static_cast<unsigned>(tile_width));
    shape.block_columns = 2 * tile_width;
    shape.block_rows = 4 * (32 / tile_width);
    shape.blocks_across = (cam.columns + shape.block_columns - 1) / shape.block_columns;
    const int blocks = shape.blocks_across * ((cam.rows + shape.block_rows - 1) / shape.block_rows);
    cam.blocks = blocks > cam.blocks ? blocks : cam.blocks;
  }
  cam.rays = height * width * supersample * supersample;
  return cam;
}

// Image coordinate (pixels) of the centre of sub-pixel column or row `index` with s sub-pixels a pixel: one expression
// for the forward's rays and the pose reduction's (u, v), whose gradients are only right if the two agree.
template <typename T>
__device__ __forceinline__ T subpixel_centre(int index, int s) {
  return (T(index) + T(0.5)) / T(s) - T(0.5);
}

// Which tiling camera b's threads use: wide warp tiles (1) when the volume's contiguous index axis (axis 2 of the
// geometry, make_geometry) is the one the detector's rows run along, so that a warp's neighbouring rays read
// neighbouring memory; tall tiles (0) otherwise. Why: with the contiguous axis along the rows, tiles 8 wide were
// fastest; with it along the detector's columns (k for a C-arm) or along the rays, tiles 2 wide (H100, chest CT, AP
// at 1240 x 960: trilinear with i contiguous 1.76 -> 1.52 ms, the 4-channel walk with j contiguous 1.18 -> 0.95 ms;
// benchmarks/NOTES.md). The rows' direction is column 0 of the ray matrix (world mm a pixel), here in voxels.
template <typename T>
__device__ __forceinline__ int camera_tile_shape(const VolumeGeometry<T>& g, const T* __restrict__ matrices, int b) {
  T along[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    along[a] = g.world_to_index[a][0] * matrices[9 * b] + g.world_to_index[a][1] * matrices[9 * b + 3] +
               g.world_to_index[a][2] * matrices[9 * b + 6];
    along[a] = along[a] < T(0) ? -along[a] : along[a];
  }
  return (along[2] >= along[0] && along[2] >= along[1]) ? 1 : 0;
}

// This thread's ray in tiling `shape` (camera_tile_shape): its index in the image (row, column, sub-row, sub-column
// order) and the image coordinates (u, v) of its sub-pixel centre. False for threads past the image's edge.
template <typename T>
__device__ __forceinline__ bool thread_ray(const CameraGrid& cam, int shape_index, int64_t& ray, T& u, T& v) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Selected field by field: indexing the parameter array with a run-time index copied it to local memory.
  const TileShape& tall = cam.shapes[0];
  const TileShape& wide = cam.shapes[1];
  const int tile_shift = shape_index ? wide.tile_shift : tall.tile_shift;
  const int blocks_across = shape_index ? wide.blocks_across : tall.blocks_across;
  const int block_columns = shape_index ? wide.block_columns : tall.block_columns;
  const int block_rows = shape_index ? wide.block_rows : tall.block_rows;
  const int tile_width = 1 << tile_shift;
  const int block_x = blockIdx.x % blocks_across, block_y = blockIdx.x / blocks_across;
  const int col = block_x * block_columns + (warp & 1) * tile_width + (lane & (tile_width - 1));
  const int row = block_y * block_rows + (warp >> 1) * (32 >> tile_shift) + (lane >> tile_shift);
  if (col >= cam.columns || row >= cam.rows) return false;
  const int s = cam.supersample;
  const int pixel_row = row / s, pixel_col = col / s;
  ray = ((static_cast<int64_t>(pixel_row) * cam.width + pixel_col) * s + (row - pixel_row * s)) * s +
        (col - pixel_col * s);
  u = subpixel_centre<T>(col, s);
  v = subpixel_centre<T>(row, s);
  return true;
}

// The world endpoints of camera b's ray through (u, v): source, and source + A (u, v, 1).
template <typename T>
__device__ __forceinline__ void camera_endpoints(const T* __restrict__ sources, const T* __restrict__ matrices, int b,
                                                 T u, T v, T* s, T* t) {
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    s[a] = sources[3 * b + a];
    const T* row = matrices + 9 * b + 3 * a;
    t[a] = s[a] + row[0] * u + row[1] * v + row[2];
  }
}

// The pointer p, hidden from the optimiser: it cannot split `base + chunk offset` back into two terms and add
// them again at every voxel load inside the walk (it did, in 64-bit integer instructions).
template <typename T>
__device__ __forceinline__ const T* opaque(const T* p) {
  asm("" : "+l"(p));
  return p;
}

// Blocks per SM of the forward. The one-channel Siddon walk fits in 32 registers (8 blocks of 256 threads an SM: full
// occupancy; unrolled twice it spills 16 bytes there, and is still faster than with 6 blocks and 38 registers). The
// one-channel trilinear walk waits on its loads (two thirds of its stall cycles, ncu, H100): 6 blocks (40 registers,
// 100 bytes of spills) took 1.48 ms at 1240 x 960 (volume stored i fastest) against 1.77 ms with 4 (64 registers),
// one build each on the same machine; 7 (which ptxas fits in 32 registers, so 8 blocks are resident, 136 bytes of
// spills) took 1.47 ms against 1.57 with 6 in one call (session 22, benchmarks/NOTES.md v27). The trilinear walk of
// 4 or 8 channels needs more than 64 registers (3 blocks: 80), having its clamped and its interior sample loops
// (trilinear_samples_steps). The others take kForwardMinBlocks. All overridable at build time for tuning.
#ifndef TORCHDRR_SIDDON_MIN_BLOCKS
#define TORCHDRR_SIDDON_MIN_BLOCKS 8
#endif
#ifndef TORCHDRR_TRILINEAR_MIN_BLOCKS
#define TORCHDRR_TRILINEAR_MIN_BLOCKS 7
#endif
constexpr int forward_min_blocks(int max_channels, bool trilinear) {
  if (!trilinear) return max_channels == 1 ? TORCHDRR_SIDDON_MIN_BLOCKS : kForwardMinBlocks;
  return max_channels == 1 ? TORCHDRR_TRILINEAR_MIN_BLOCKS : (max_channels >= 4 ? 3 : kForwardMinBlocks);
}

// Quads: the trilinear interior samples read the volume's voxel quads (ray_math.h, VoxelQuad; one float32 channel).
template <typename T, int MaxC, bool Packed, bool Trilinear, bool Quads = false>
__global__ void __launch_bounds__(kThreads, forward_min_blocks(MaxC, Trilinear))
    camera_forward_kernel(const VolumeGeometry<T> geometry, const T* __restrict__ volume, int64_t channels,
                          const T* __restrict__ sources, const T* __restrict__ matrices, const CameraGrid cam,
                          T step_mm, T* __restrict__ out, const VoxelQuad* __restrict__ quads = nullptr) {
  const int b = blockIdx.y;
  int64_t ray;
  T u, v;
  if (!thread_ray(cam, camera_tile_shape(geometry, matrices, b), ray, u, v)) return;
  T s[3], t[3];
  camera_endpoints(sources, matrices, b, u, v, s, t);
  // blockIdx.z picks the chunk of MaxC channels, so the walk sees one fixed base pointer. Why not a loop over the
  // chunks: the compiler merged it with the one-chunk case, held 64 registers instead of 38, and recomputed
  // base + chunk x channel stride in 64 bits for every voxel load (10 instructions a load in the SASS, H100).
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * MaxC;
  const int chunk = static_cast<int>(channels - c0 < MaxC ? channels - c0 : MaxC);
  ray_forward<T, MaxC, Packed, Trilinear, /*Steps=*/true, Quads>(
      geometry, opaque(volume + c0 * geometry.channel_stride), chunk, s, t, step_mm,
      out + (b * cam.rays + ray) * channels + c0, quads);
}

// Sums x[0..N) over the block; thread 0 gets the totals in out[0..N) (N <= kThreads).
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&x)[N], double* __restrict__ out) {
  __shared__ T warp_sums[kWarps][N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x[k] += __shfl_down_sync(0xffffffffu, x[k], offset);
    if (lane == 0) warp_sums[warp][k] = x[k];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    T total = T(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    out[threadIdx.x] = static_cast<double>(total);
  }
}

// Pose gradients per block: pose_partials[b, block, 0:3] = sum (g_s + g_t) (d/d source) and [3:12] = sum g_t (u,
// v, 1)^T (d/d ray matrix, row-major), in float64.
template <typename T, int MaxC, bool Trilinear, bool WantVolume, bool WantPose>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks)
    camera_backward_kernel(const VolumeGeometry<T> geometry, const T* __restrict__ volume, int64_t channels,
                           const T* __restrict__ sources, const T* __restrict__ matrices, const CameraGrid cam,
                           T step_mm, const T* __restrict__ grad_output, T* __restrict__ grad_volume,
                           double* __restrict__ pose_partials) {
  const int b = blockIdx.y;
  int64_t ray = 0;
  T u = T(0), v = T(0);
  // no early return: the whole block joins the reduction
  const bool valid = thread_ray(cam, camera_tile_shape(geometry, matrices, b), ray, u, v);
  T gs[3] = {T(0), T(0), T(0)}, gt[3] = {T(0), T(0), T(0)};
  if (valid) {
    T s[3], t[3];
    camera_endpoints(sources, matrices, b, u, v, s, t);
    const T* go = grad_output + (b * cam.rays + ray) * channels;
    for (int64_t c0 = 0; c0 < channels; c0 += MaxC) {
      const int chunk = static_cast<int>(channels - c0 < MaxC ? channels - c0 : MaxC);
      AtomicScatter<T> scatter{WantVolume ? grad_volume + c0 * geometry.channel_stride : nullptr};
      T cs[3], ct[3];
      ray_backward<T, MaxC, Trilinear, WantVolume, WantPose, /*Steps=*/true>(geometry, volume + c0 * geometry.channel_stride, chunk,
                                                             s, t, step_mm, go + c0, scatter, cs, ct);
      if constexpr (WantPose) {
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          gs[a] += cs[a];
          gt[a] += ct[a];
        }
      }
    }
  }
  if constexpr (WantPose) {
    T parts[12] = {gs[0] + gt[0], gs[1] + gt[1], gs[2] + gt[2], gt[0] * u, gt[0] * v, gt[0],
                   gt[1] * u,     gt[1] * v,     gt[1],         gt[2] * u, gt[2] * v, gt[2]};
    block_sum(parts, pose_partials + (static_cast<int64_t>(b) * gridDim.x + blockIdx.x) * 12);
  }
}

// camera_forward_kernel's image, plus jacobian[b, ray, c, 0:6] = (dF_c/ds, dF_c/dt) from the same walk
// (ray_forward_jacobian; Siddon on siddon_steps like the forward).
template <typename T, int MaxC, bool Packed, bool Trilinear>
__global__ void __launch_bounds__(kThreads, jacobian_min_blocks(MaxC))
    camera_forward_jacobian_kernel(const VolumeGeometry<T> geometry, const T* __restrict__ volume, int64_t channels,
                                   const T* __restrict__ sources, const T* __restrict__ matrices,
                                   const CameraGrid cam, T step_mm, T* __restrict__ out, T* __restrict__ jacobian) {
  const int b = blockIdx.y;
  int64_t ray;
  T u, v;
  if (!thread_ray(cam, camera_tile_shape(geometry, matrices, b), ray, u, v)) return;
  T s[3], t[3];
  camera_endpoints(sources, matrices, b, u, v, s, t);
  // blockIdx.z picks the chunk of MaxC channels, as in camera_forward_kernel (and for the same reason).
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * MaxC;
  const int chunk = static_cast<int>(channels - c0 < MaxC ? channels - c0 : MaxC);
  const int64_t first = (b * cam.rays + ray) * channels + c0;
  ray_forward_jacobian<T, MaxC, Packed, Trilinear, /*Steps=*/true>(
      geometry, opaque(volume + c0 * geometry.channel_stride), chunk, s, t, step_mm, out + first, jacobian + 6 * first);
}

// Rays per thread of the pose reduction from the Jacobian, kThreads apart so that a warp reads consecutive rays.
constexpr int kPoseRaysPerThread = 4;

// The image coordinates (u, v) of ray `ray` of an image (row, column, sub-row, sub-column order): thread_ray's, so
// that they are the ones the forward made the ray with.
template <typename T>
__device__ __forceinline__ void ray_image_coordinates(const CameraGrid& cam, int ray, T& u, T& v) {
  const int s = cam.supersample;
  const int sub_col = ray % s, rest = ray / s;
  const int sub_row = rest % s, pixel = rest / s;
  const int col = (pixel % cam.width) * s + sub_col, row = (pixel / cam.width) * s + sub_row;
  u = subpixel_centre<T>(col, s);
  v = subpixel_centre<T>(row, s);
}

// Pose gradients from the saved Jacobian, per block as camera_backward_kernel's: pose_partials[b, block] =
// [sum g (J_s + J_t) (3), sum g J_t (u, v, 1)^T (9, row-major)] over the block's rays and all channels, in float64
// from the products on (the sum over blocks is then a fixed-order reduction: deterministic).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    camera_pose_from_jacobian_kernel(const T* __restrict__ grad_output, const T* __restrict__ jacobian,
                                     int64_t channels, const CameraGrid cam, double* __restrict__ pose_partials) {
  const int b = blockIdx.y;
  double parts[12];
#pragma unroll
  for (int k = 0; k < 12; ++k) parts[k] = 0.0;
#pragma unroll
  for (int k = 0; k < kPoseRaysPerThread; ++k) {
    const int64_t ray = (static_cast<int64_t>(blockIdx.x) * kPoseRaysPerThread + k) * kThreads + threadIdx.x;
    if (ray >= cam.rays) break;  // no early return: the whole block joins the reduction
    const int64_t row = (b * cam.rays + ray) * channels;
    double gs[3] = {0.0, 0.0, 0.0}, gt[3] = {0.0, 0.0, 0.0};
    for (int64_t c = 0; c < channels; ++c) {
      const double g = static_cast<double>(grad_output[row + c]);
      const T* j = jacobian + 6 * (row + c);
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        gs[a] += g * static_cast<double>(j[a]);
        gt[a] += g * static_cast<double>(j[3 + a]);
      }
    }
    T u, v;
    ray_image_coordinates(cam, static_cast<int>(ray), u, v);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      parts[a] += gs[a] + gt[a];
      parts[3 + 3 * a] += gt[a] * static_cast<double>(u);
      parts[4 + 3 * a] += gt[a] * static_cast<double>(v);
      parts[5 + 3 * a] += gt[a];
    }
  }
  block_sum(parts, pose_partials + (static_cast<int64_t>(b) * gridDim.x + blockIdx.x) * 12);
}

// Launch grid of the forward kernels: (blocks of an image, cameras, chunks of max_channels channels).
dim3 chunked_grid(const CameraGrid& cam, int64_t batch, int64_t channels, int max_channels) {
  const int64_t chunks = check_channel_chunks(channels, max_channels);
  return dim3(static_cast<unsigned>(cam.blocks), static_cast<unsigned>(batch), static_cast<unsigned>(chunks));
}

// Calls f(std::integral_constant<int, MaxC>) with MaxC in {1, 2, 4}: the camera kernels walk up to 4 channels at a
// time (the DRR's materials are 3 or 4 channels), which halves their compile time against dispatch_channels.
template <typename F>
void dispatch_camera_channels(int64_t channels, F&& f) {
  if (channels <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (channels <= 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

// The forward and the forward with the pose Jacobian share their setup and launch; WithJacobian picks the kernel
// and whether the [B, R, C, 6] Jacobian is made (an empty tensor otherwise). quads: the volume's voxel quads for
// the trilinear forward (check_voxel_quads), or none.
template <bool WithJacobian>
std::tuple<at::Tensor, at::Tensor> camera_forward_cuda(const at::Tensor& volume_in, const at::Tensor& affine,
                                                       const at::Tensor& sources_in, const at::Tensor& matrices_in,
                                                       int64_t height, int64_t width, int64_t supersample,
                                                       int64_t mode, double step,
                                                       const std::optional<at::Tensor>& quads = std::nullopt) {
  check_camera_inputs(volume_in, affine, sources_in, matrices_in, height, width, supersample, mode, step,
                      c10::DeviceType::CUDA);
  check_voxel_quads(volume_in, quads, mode);
  const c10::cuda::CUDAGuard device_guard(volume_in.device());
  const at::Tensor volume = dense_volume(volume_in);
  check_int32_span(volume);
  const at::Tensor sources = sources_in.contiguous(), matrices = matrices_in.contiguous();
  const int64_t batch = sources.size(0), channels = volume.size(0);
  const CameraGrid cam = make_camera_grid(height, width, supersample);
  at::Tensor out = at::empty({batch, cam.rays, channels}, volume.options());
  at::Tensor jacobian = WithJacobian ? at::empty({batch, cam.rays, channels, 6}, volume.options())
                                     : at::empty({0}, volume.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "camera_raycast_forward_cuda", [&] {
    const VolumeGeometry<scalar_t> geometry = make_geometry<scalar_t>(volume, affine);
    const scalar_t step_mm = static_cast<scalar_t>(trilinear_step_mm(affine, step));
    dispatch_camera_channels(channels, [&](auto max_channels) {
      constexpr int kMaxC = decltype(max_channels)::value;
      const dim3 grid = chunked_grid(cam, batch, channels, kMaxC);
      const auto launch = [&](auto packed, auto trilinear) {
        constexpr bool kPacked = decltype(packed)::value, kTrilinear = decltype(trilinear)::value;
        const scalar_t* volume_data = volume.const_data_ptr<scalar_t>();
        const scalar_t* source_data = sources.const_data_ptr<scalar_t>();
        const scalar_t* matrix_data = matrices.const_data_ptr<scalar_t>();
        if constexpr (WithJacobian) {
          camera_forward_jacobian_kernel<scalar_t, kMaxC, kPacked, kTrilinear><<<grid, kThreads, 0, stream>>>(
              geometry, volume_data, channels, source_data, matrix_data, cam, step_mm,
              out.mutable_data_ptr<scalar_t>(), jacobian.mutable_data_ptr<scalar_t>());
        } else if constexpr (std::is_same<scalar_t, float>::value && kMaxC == 1 && !kPacked && kTrilinear) {
          if (quads.has_value()) {  // checked: one float32 channel, dense, so geometry axis 2 has stride 1
            camera_forward_kernel<scalar_t, kMaxC, kPacked, kTrilinear, true><<<grid, kThreads, 0, stream>>>(
                geometry, volume_data, channels, source_data, matrix_data, cam, step_mm,
                out.mutable_data_ptr<scalar_t>(), reinterpret_cast<const VoxelQuad*>(quads->const_data_ptr()));
          } else {
            camera_forward_kernel<scalar_t, kMaxC, kPacked, kTrilinear><<<grid, kThreads, 0, stream>>>(
                geometry, volume_data, channels, source_data, matrix_data, cam, step_mm,
                out.mutable_data_ptr<scalar_t>());
          }
        } else {
          camera_forward_kernel<scalar_t, kMaxC, kPacked, kTrilinear><<<grid, kThreads, 0, stream>>>(
              geometry, volume_data, channels, source_data, matrix_data, cam, step_mm,
              out.mutable_data_ptr<scalar_t>());
        }
      };
      const bool packed = has_packed_channels(volume, kMaxC);
      if (mode == kTrilinear) {
        packed ? launch(std::true_type{}, std::true_type{}) : launch(std::false_type{}, std::true_type{});
      } else {
        packed ? launch(std::true_type{}, std::false_type{}) : launch(std::false_type{}, std::false_type{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, jacobian};
}

at::Tensor camera_raycast_forward_cuda(const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources,
                                       const at::Tensor& matrices, int64_t height, int64_t width,
                                       int64_t supersample, int64_t mode, double step,
                                       const std::optional<at::Tensor>& quads) {
  return std::get<0>(
      camera_forward_cuda<false>(volume, affine, sources, matrices, height, width, supersample, mode, step, quads));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> camera_raycast_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& volume_in, const at::Tensor& affine,
    const at::Tensor& sources_in, const at::Tensor& matrices_in, int64_t height, int64_t width, int64_t supersample,
    int64_t mode, double step, bool volume_grad, bool pose_grad) {
  check_camera_inputs(volume_in, affine, sources_in, matrices_in, height, width, supersample, mode, step,
                      c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(volume_in.device());
  const at::Tensor volume = dense_volume(volume_in);
  check_int32_span(volume);
  const at::Tensor sources = sources_in.contiguous(), matrices = matrices_in.contiguous();
  const int64_t batch = sources.size(0), channels = volume.size(0);
  const CameraGrid cam = make_camera_grid(height, width, supersample);
  check_camera_grad_output(grad_output_in, volume, batch, cam.rays);
  const at::Tensor grad_output = grad_output_in.contiguous();
  // The volume gradient shares the volume's strides so that voxel offsets mean the same thing in both.
  at::Tensor grad_volume = volume_grad ? at::zeros_like(volume) : at::empty({0}, volume.options());
  at::Tensor partials = pose_grad ? at::empty({batch, cam.blocks, 12}, volume.options().dtype(at::kDouble))
                                  : at::empty({0}, volume.options().dtype(at::kDouble));
  if (!volume_grad && !pose_grad) {
    return {grad_volume, at::empty({0}, volume.options()), at::empty({0}, volume.options())};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(cam.blocks), static_cast<unsigned>(batch));
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "camera_raycast_backward_cuda", [&] {
    const VolumeGeometry<scalar_t> geometry = make_geometry<scalar_t>(volume, affine);
    const scalar_t step_mm = static_cast<scalar_t>(trilinear_step_mm(affine, step));
    dispatch_camera_channels(channels, [&](auto max_channels) {
      constexpr int kMaxC = decltype(max_channels)::value;
      const auto launch = [&](auto trilinear, auto want_volume, auto want_pose) {
        camera_backward_kernel<scalar_t, kMaxC, decltype(trilinear)::value, decltype(want_volume)::value,
                               decltype(want_pose)::value><<<grid, kThreads, 0, stream>>>(
            geometry, volume.const_data_ptr<scalar_t>(), channels, sources.const_data_ptr<scalar_t>(),
            matrices.const_data_ptr<scalar_t>(), cam, step_mm, grad_output.const_data_ptr<scalar_t>(),
            volume_grad ? grad_volume.mutable_data_ptr<scalar_t>() : nullptr,
            pose_grad ? partials.mutable_data_ptr<double>() : nullptr);
      };
      const auto with_mode = [&](auto trilinear) {
        if (volume_grad && pose_grad) {
          launch(trilinear, std::true_type{}, std::true_type{});
        } else if (volume_grad) {
          launch(trilinear, std::true_type{}, std::false_type{});
        } else {
          launch(trilinear, std::false_type{}, std::true_type{});
        }
      };
      mode == kTrilinear ? with_mode(std::true_type{}) : with_mode(std::false_type{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!pose_grad) return {grad_volume, at::empty({0}, volume.options()), at::empty({0}, volume.options())};
  const at::Tensor totals = partials.sum(1).to(volume.scalar_type());  // [B, 12]
  // Fresh tensors (storage offset 0), as the fake kernel promises.
  return {grad_volume, totals.narrow(1, 0, 3).clone(), totals.narrow(1, 3, 9).reshape({batch, 3, 3}).clone()};
}

std::tuple<at::Tensor, at::Tensor> camera_raycast_forward_jacobian_cuda(
    const at::Tensor& volume, const at::Tensor& affine, const at::Tensor& sources, const at::Tensor& matrices,
    int64_t height, int64_t width, int64_t supersample, int64_t mode, double step) {
  return camera_forward_cuda<true>(volume, affine, sources, matrices, height, width, supersample, mode, step);
}

std::tuple<at::Tensor, at::Tensor> camera_raycast_pose_from_jacobian_cuda(const at::Tensor& grad_output_in,
                                                                          const at::Tensor& jacobian_in,
                                                                          int64_t height, int64_t width,
                                                                          int64_t supersample) {
  check_camera_jacobian(grad_output_in, jacobian_in, height, width, supersample, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(jacobian_in.device());
  const at::Tensor grad_output = grad_output_in.contiguous(), jacobian = jacobian_in.contiguous();
  const int64_t batch = jacobian.size(0), channels = jacobian.size(2);
  const CameraGrid cam = make_camera_grid(height, width, supersample);
  const int64_t rays_per_block = int64_t(kThreads) * kPoseRaysPerThread;
  const int64_t blocks = (cam.rays + rays_per_block - 1) / rays_per_block;
  at::Tensor partials = at::empty({batch, blocks, 12}, jacobian.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
  AT_DISPATCH_FLOATING_TYPES(jacobian.scalar_type(), "camera_raycast_pose_from_jacobian_cuda", [&] {
    camera_pose_from_jacobian_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), jacobian.const_data_ptr<scalar_t>(), channels, cam,
        partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor totals = partials.sum(1).to(jacobian.scalar_type());  // [B, 12]
  // Fresh contiguous tensors (storage offset 0), as the fake kernel promises.
  return {totals.narrow(1, 0, 3).clone(at::MemoryFormat::Contiguous),
          totals.narrow(1, 3, 9).reshape({batch, 3, 3}).clone(at::MemoryFormat::Contiguous)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchdrr, CUDA, m) {
  m.impl("camera_raycast_forward", &camera_raycast_forward_cuda);
  m.impl("camera_raycast_backward", &camera_raycast_backward_cuda);
  m.impl("camera_raycast_forward_jacobian", &camera_raycast_forward_jacobian_cuda);
  m.impl("camera_raycast_pose_from_jacobian", &camera_raycast_pose_from_jacobian_cuda);
}

}  // namespace torchdrr

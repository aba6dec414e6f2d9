// TDRR_HD marks the per-ray functions that are compiled for both the host (CPU kernels) and the device (CUDA
// kernels), so that each op's math is written once and shared by both.
#pragma once

#if defined(__CUDACC__)
#define TDRR_HD __host__ __device__ __forceinline__
#else
#define TDRR_HD inline
#endif

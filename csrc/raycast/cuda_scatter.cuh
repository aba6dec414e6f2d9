// The back-projection's scatter-add on the GPU, shared by the CUDA raycast kernels: rays of different threads
// cross the same voxels, so each contribution is an atomic add.
#pragma once

#include <cstdint>

namespace torchdrr {

template <typename T>
struct AtomicScatter {
  T* grad_volume;
  __device__ __forceinline__ void operator()(int64_t offset, T value) const { atomicAdd(grad_volume + offset, value); }
};

}  // namespace torchdrr

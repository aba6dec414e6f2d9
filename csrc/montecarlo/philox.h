// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-based generator,
// so every photon owns an independent stream addressed by (seed, camera, photon index) and the result does not
// depend on how photons are spread over threads, blocks or launches. Written from the paper's round function; the
// same code runs on the CPU and the GPU, so both draw the same numbers for the same photon.
#pragma once

#include <cstdint>

#include "../common/hd.h"

namespace torchdrr {
namespace mc {

TDRR_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One photon's random stream: counter (photon low, photon high, camera, block), key = the seed's two halves. Each
// block of the counter gives four 32-bit numbers.
struct PhiloxStream {
  uint32_t counter[4];
  uint32_t key[2];
  uint32_t block[4];
  int used;

  TDRR_HD PhiloxStream(uint64_t seed, uint32_t camera, uint64_t photon) {
    counter[0] = static_cast<uint32_t>(photon);
    counter[1] = static_cast<uint32_t>(photon >> 32);
    counter[2] = camera;
    counter[3] = 0;
    key[0] = static_cast<uint32_t>(seed);
    key[1] = static_cast<uint32_t>(seed >> 32);
    used = 4;
  }

  TDRR_HD void next_block() {
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
    constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
    uint32_t x0 = counter[0], x1 = counter[1], x2 = counter[2], x3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int round = 0; round < 10; ++round) {
      const uint32_t hi0 = philox_mulhi(kM0, x0), lo0 = kM0 * x0;
      const uint32_t hi1 = philox_mulhi(kM1, x2), lo1 = kM1 * x2;
      const uint32_t y0 = hi1 ^ x1 ^ k0, y1 = lo1, y2 = hi0 ^ x3 ^ k1, y3 = lo0;
      x0 = y0;
      x1 = y1;
      x2 = y2;
      x3 = y3;
      k0 += kW0;
      k1 += kW1;
    }
    block[0] = x0;
    block[1] = x1;
    block[2] = x2;
    block[3] = x3;
    ++counter[3];
    used = 0;
  }

  TDRR_HD uint32_t next_u32() {
    if (used == 4) next_block();
    return block[used++];
  }

  // Uniform in the open interval (0, 1): 24 random bits plus half a step, so log(u) is always finite.
  TDRR_HD float uniform() {
    return (static_cast<float>(next_u32() >> 8) + 0.5f) * (1.0f / 16777216.0f);
  }
};

}  // namespace mc
}  // namespace torchdrr

// IEEE half-precision to f32, exactly, for every build of the kernels.
//
// One function for the GGUF's f16 block scales (portable.h) and for an f16 KV cache
// (attention.cc's portable branch). Each compiler path converts exactly, so every build
// reads the same values:
// - ARM: GCC's C++ has no _Float16 on aarch64; __fp16 is its half type (one fcvt, and
//   vector conversions inside loops).
// - x86 compilers with _Float16 (GCC 12+, Clang 15+): vcvtph2ps where the CPU has F16C,
//   and loops of it vectorize.
// - elsewhere: the bits rebuilt by hand (subnormals as mantissa * 2^-24).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

namespace swarm_cpu {

inline float HalfToFloat(uint16_t h) {
#if defined(__aarch64__)
  __fp16 half;
  std::memcpy(&half, &h, sizeof(half));
  return half;
#elif defined(__x86_64__) && defined(__FLT16_MAX__)
  return static_cast<float>(std::bit_cast<_Float16>(h));
#else
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // 2^-24 units
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 0x1F ? sign | 0x7F800000u | mantissa << 13 : sign | (exponent + 112) << 23 | mantissa << 13;
  return std::bit_cast<float>(bits);
#endif
}

}  // namespace swarm_cpu

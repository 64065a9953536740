// IEEE half-precision to f32, exactly, and f32 to half rounded to nearest even, for
// every build of the kernels.
//
// One pair of functions for the GGUF's f16 block scales (portable.h) and for an f16 KV
// cache (attention.cc). Each compiler path converts as IEEE says, so every build reads
// and writes the same values:
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

// f32 to half, rounded to nearest even (overflow to infinity, NaN stays NaN): what XLA's
// convert gives.
inline uint16_t FloatToHalf(float f) {
#if defined(__aarch64__)
  const __fp16 half = static_cast<__fp16>(f);
  uint16_t h;
  std::memcpy(&h, &half, sizeof(h));
  return h;
#elif defined(__x86_64__) && defined(__FLT16_MAX__)
  return std::bit_cast<uint16_t>(static_cast<_Float16>(f));
#else
  const uint32_t bits = std::bit_cast<uint32_t>(f), sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // 65520 and up round to infinity
  if (magnitude < 0x38800000u) {
    // A subnormal half (or zero): the value in units of 2^-24, rounded to nearest even
    // (2^-24 scaling is exact; 1024 units make the smallest normal half, as encoded).
    const float units = std::bit_cast<float>(magnitude) * 16777216.0f;
    const uint32_t whole = static_cast<uint32_t>(units), rest_half = units - static_cast<float>(whole) > 0.5f ||
                                                                     (units - static_cast<float>(whole) == 0.5f && (whole & 1u));
    return static_cast<uint16_t>(sign | (whole + rest_half));
  }
  // A normal half: rebias the exponent, then round the 13 dropped bits to nearest even
  // (a carry into the exponent is the right encoding).
  return static_cast<uint16_t>(sign | ((magnitude - 0x38000000u + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13));
#endif
}

}  // namespace swarm_cpu

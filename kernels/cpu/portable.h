// The quantized matmul for CPUs without AVX-512 VNNI: AVX2 and AVX-VNNI x86 machines,
// ARM (NEON, dot-product extensions) and anything else a C++20 compiler targets.
//
// The integer scheme of the AVX-512 kernel (gemm.h, panel.h): activation rows are
// quantized to 8-bit blocks of 32 as ggml's quantize_row_q8_0 does, each weight row is
// decoded block by block into 8-bit codes with one f32 scale (and minimum, for the
// affine formats) per group, and every group's integer dot product is scaled into f32
// sums. The integer sums are the AVX-512 kernel's; how the f32 sums are grouped differs
// per build (last bits only), and within a build every row count and every position of a
// row runs the same steps, so a batched row keeps its lone run's bits.
//
// Rows, not panels: each task decodes a run of weight rows (GGUF rows layout) and
// multiplies activation rows with each while its codes are in registers.
// - AVX2 (and AVX-VNNI): two weight rows at a time, up to 8 activation rows per pass,
//   with ggml's sign-trick product (`vpmaddubsw`, `vpmaddwd`; `vpdpbusd` with AVX-VNNI).
// - elsewhere: plain C++ over a decoded row, the signed-times-signed 8-bit dot that
//   compilers turn into `sdot` (ARM's dot-product extension) or their own vector code.
//
// Bit layouts follow the `dequantize_row_*` functions of ggml-quants.c, as
// kernels/dequant.py does.

#ifndef SWARM_KERNELS_CPU_PORTABLE_H_
#define SWARM_KERNELS_CPU_PORTABLE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "half.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace swarm_cpu::portable {

// IEEE half (little-endian bytes at `at`) as f32, exactly.
inline float ReadHalf(const uint8_t* at) {
  return HalfToFloat(static_cast<uint16_t>(at[0] | at[1] << 8));
}

// a * b + c, fused where the CPU has the instruction (then the same rounding as the
// AVX-512 kernel's vfmadd); a plain multiply-add elsewhere, where a library fma would
// cost more than the dot products.
inline float MulAdd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}


// --- The formats -------------------------------------------------------------
// Each has kBlock elements in kBlockBytes bytes and kGroup elements per scale.
// Decode(block, codes, scale, minimum) writes the block's kBlock signed codes (the
// symmetric formats' offset taken out), and per group its f32 scale and, for the
// kAffine formats (element = scale * code + minimum), its minimum: the values the
// AVX-512 decoders (panel.h) produce.

struct Q4_0 {
  static constexpr int kType = 2, kBlock = 32, kBlockBytes = 18, kGroup = 32;
  static constexpr bool kAffine = false;
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float*) {
    const uint8_t* qs = block + 2;
    for (int j = 0; j < 16; ++j) {
      codes[j] = static_cast<int8_t>((qs[j] & 15) - 8);
      codes[j + 16] = static_cast<int8_t>((qs[j] >> 4) - 8);
    }
    scale[0] = ReadHalf(block);
  }
};

struct Q4_1 {
  static constexpr int kType = 3, kBlock = 32, kBlockBytes = 20, kGroup = 32;
  static constexpr bool kAffine = true;
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float* minimum) {
    const uint8_t* qs = block + 4;
    for (int j = 0; j < 16; ++j) {
      codes[j] = static_cast<int8_t>(qs[j] & 15);
      codes[j + 16] = static_cast<int8_t>(qs[j] >> 4);
    }
    scale[0] = ReadHalf(block);
    minimum[0] = ReadHalf(block + 2);
  }
};

// Q5_0/Q5_1: nibbles as Q4_*, plus bit e of the little-endian u32 qh as element e's fifth bit.
inline void FiveBitCodes(const uint8_t* qh_bytes, const uint8_t* qs, int offset, int8_t* codes) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, sizeof(qh));
  for (int j = 0; j < 16; ++j) {
    codes[j] = static_cast<int8_t>(((qs[j] & 15) | ((qh >> j) & 1) << 4) - offset);
    codes[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - offset);
  }
}

struct Q5_0 {
  static constexpr int kType = 6, kBlock = 32, kBlockBytes = 22, kGroup = 32;
  static constexpr bool kAffine = false;
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float*) {
    FiveBitCodes(block + 2, block + 6, 16, codes);
    scale[0] = ReadHalf(block);
  }
};

struct Q5_1 {
  static constexpr int kType = 7, kBlock = 32, kBlockBytes = 24, kGroup = 32;
  static constexpr bool kAffine = true;
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float* minimum) {
    FiveBitCodes(block + 4, block + 8, 0, codes);
    scale[0] = ReadHalf(block);
    minimum[0] = ReadHalf(block + 2);
  }
};

struct Q8_0 {
  static constexpr int kType = 8, kBlock = 32, kBlockBytes = 34, kGroup = 32;
  static constexpr bool kAffine = false;
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float*) {
    std::memcpy(codes, block + 2, 32);
    scale[0] = ReadHalf(block);
  }
};

// get_scale_min_k4 of Q4_K/Q5_K: the scale (d * sc) and minimum (-dmin * m) of each of
// the block's 8 sub-blocks of 32, from {f16 d, dmin; u8 scales[12]}.
inline void KQuantScales(const uint8_t* block, float* scale, float* minimum) {
  const float d = ReadHalf(block), negative_dmin = 0.0f - ReadHalf(block + 2);
  const uint8_t* q = block + 4;
  for (int s = 0; s < 8; ++s) {
    const int sc = s < 4 ? q[s] & 63 : (q[s + 4] & 15) | (q[s - 4] >> 6) << 4;
    const int m = s < 4 ? q[s + 4] & 63 : (q[s + 4] >> 4) | (q[s] >> 6) << 4;
    scale[s] = d * static_cast<float>(sc);
    minimum[s] = negative_dmin * static_cast<float>(m);
  }
}

struct Q4_K {
  static constexpr int kType = 12, kBlock = 256, kBlockBytes = 144, kGroup = 32;
  static constexpr bool kAffine = true;
  // Sub-block 2c + h holds nibble h of qs[32c + l].
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float* minimum) {
    KQuantScales(block, scale, minimum);
    const uint8_t* qs = block + 16;
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        codes[64 * c + l] = static_cast<int8_t>(qs[32 * c + l] & 15);
        codes[64 * c + 32 + l] = static_cast<int8_t>(qs[32 * c + l] >> 4);
      }
    }
  }
};

struct Q5_K {
  static constexpr int kType = 13, kBlock = 256, kBlockBytes = 176, kGroup = 32;
  static constexpr bool kAffine = true;
  // As Q4_K, plus bit s of qh[l] as the fifth bit of element l of sub-block s.
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float* minimum) {
    KQuantScales(block, scale, minimum);
    const uint8_t *qh = block + 16, *qs = block + 48;
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        codes[64 * c + l] = static_cast<int8_t>((qs[32 * c + l] & 15) | ((qh[l] >> (2 * c)) & 1) << 4);
        codes[64 * c + 32 + l] = static_cast<int8_t>((qs[32 * c + l] >> 4) | ((qh[l] >> (2 * c + 1)) & 1) << 4);
      }
    }
  }
};

struct Q6_K {
  static constexpr int kType = 14, kBlock = 256, kBlockBytes = 210, kGroup = 16;
  static constexpr bool kAffine = false;
  // {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: element 128h + 32p + l is nibble p / 2
  // of ql[64h + 32(p % 2) + l] | bit pair p of qh[32h + l] << 4, minus 32, times
  // d * scales[8h + 2p + l / 16].
  static void Decode(const uint8_t* block, int8_t* codes, float* scale, float*) {
    const float d = ReadHalf(block + 208);
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = block + 64 * h, *qh = block + 128 + 32 * h;
      for (int p = 0; p < 4; ++p) {
        for (int l = 0; l < 32; ++l) {
          const int low = (ql[32 * (p % 2) + l] >> (4 * (p / 2))) & 15, high = (qh[l] >> (2 * p)) & 3;
          codes[128 * h + 32 * p + l] = static_cast<int8_t>((low | high << 4) - 32);
        }
      }
    }
    for (int g = 0; g < 16; ++g) scale[g] = d * static_cast<float>(static_cast<int8_t>(block[192 + g]));
  }
};

// --- Activations and the product ---------------------------------------------

// Activation rows quantized per 32 elements: codes i8[m][k], scale f32[m][k / 32], and
// for the affine formats `weighted` f32[m][k / 32]: scale times the block's code sum.
struct Activations {
  int64_t cols = 0;
  int8_t* codes = nullptr;
  float* scale = nullptr;
  float* weighted = nullptr;
};

// quantize_row_q8_0 of one row: d = max|x| / 127, codes round(x * 127 / max|x|) to
// nearest even (the CPU's rounding mode, as the AVX-512 kernel's vcvtps2dq).  A NaN in a
// block makes its scale NaN, so the outputs are NaN as the reference's are.
inline void QuantizeRow(const float* x, int64_t k, int8_t* codes, float* scale, float* weighted) {
  for (int64_t block = 0; block < k / 32; ++block) {
    const float* v = x + 32 * block;
    float amax = 0.0f;
    bool nan = false;
    for (int j = 0; j < 32; ++j) {
      amax = std::max(amax, std::fabs(v[j]));
      nan |= v[j] != v[j];
    }
    const float d = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
    const float inverse = amax != 0.0f && !nan ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      // A NaN (or an infinite value times 0) takes -128, as vcvtps2dq's saturated result does.
      const float t = v[j] * inverse;
      const int32_t q = t != t ? -128 : std::clamp(static_cast<int32_t>(std::nearbyint(t)), -128, 127);
      codes[32 * block + j] = static_cast<int8_t>(q);
      sum += q;
    }
    scale[block] = d;
    if (weighted != nullptr) weighted[block] = d * static_cast<float>(sum);
  }
}

template <int kLength>
inline int32_t Dot(const int8_t* a, const int8_t* b) {
  int32_t sum = 0;
  for (int i = 0; i < kLength; ++i) sum += static_cast<int16_t>(a[i]) * static_cast<int16_t>(b[i]);
  return sum;
}

// One weight row, decoded: codes i8[k], and per group its scale (and minimum).
struct DecodedRow {
  std::vector<int8_t> codes;
  std::vector<float> scale, minimum;
};

template <class F>
void DecodeRow(const uint8_t* row, int64_t k, DecodedRow& decoded) {
  constexpr int kGroups = F::kBlock / F::kGroup;
  const int64_t blocks = k / F::kBlock;
  decoded.codes.resize(k);
  decoded.scale.resize(blocks * kGroups);
  decoded.minimum.resize(blocks * kGroups);
  for (int64_t b = 0; b < blocks; ++b) {
    F::Decode(row + b * F::kBlockBytes, decoded.codes.data() + b * F::kBlock, decoded.scale.data() + b * kGroups,
              decoded.minimum.data() + b * kGroups);
  }
}

// Activation row `row` times the decoded weight row (the plain C++ path): the f32 sum,
// group after group, of integer dot * (weight scale * activation scale) (+ minimum *
// weighted sum).
template <class F>
inline float RowDot(const DecodedRow& w, const Activations& act, int64_t row) {
  constexpr int G = F::kGroup;
  const int64_t k = act.cols, groups = k / G;
  const int8_t* codes = act.codes + row * k;
  const float* scale = act.scale + row * (k / 32);
  const float* weighted = act.weighted + row * (k / 32);
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t dot = Dot<G>(w.codes.data() + g * G, codes + g * G);
    acc = MulAdd(static_cast<float>(dot), w.scale[g] * scale[g * G / 32], acc);
    if constexpr (F::kAffine) acc = MulAdd(w.minimum[g], weighted[g], acc);
  }
  return acc;
}

#if defined(__AVX2__) && defined(__FMA__)
#define SWARM_PORTABLE_AVX2 1

// --- AVX2 ---------------------------------------------------------------------
// Units<F>::Each(block, fn) decodes a block 32 elements (a unit) at a time into one
// register of signed codes and calls fn(unit, codes, scale, scale of the second 16
// (Q6_K's groups of 16; else unused), minimum): the codes never leave the registers.

#define SWARM_PORTABLE_INLINE inline __attribute__((always_inline))

// The low nibbles of 16 bytes, then their high nibbles, minus `offset`.
SWARM_PORTABLE_INLINE __m256i Nibbles32(const uint8_t* packed, int offset) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)), mask = _mm_set1_epi8(15);
  const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
  return offset == 0 ? codes : _mm256_sub_epi8(codes, _mm256_set1_epi8(static_cast<char>(offset)));
}

// Nibbles32 plus 16 where bit e of the little-endian u32 at `high` is set (Q5_0, Q5_1):
// byte e of the broadcast picks byte e / 8 of it, then keeps bit e % 8 (ggml's
// bytes_from_bits_32).
SWARM_PORTABLE_INLINE __m256i FiveBits32(const uint8_t* high, const uint8_t* packed, int offset) {
  uint32_t qh;
  std::memcpy(&qh, high, sizeof(qh));
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(qh)),
                                             _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                               0x0101010101010101, 0x0000000000000000));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                        _mm256_set1_epi64x(-1));
  const __m256i codes = _mm256_or_si256(Nibbles32(packed, 0), _mm256_and_si256(set, _mm256_set1_epi8(16)));
  return offset == 0 ? codes : _mm256_sub_epi8(codes, _mm256_set1_epi8(static_cast<char>(offset)));
}

// Bit `bit` of each of 32 bytes, moved to bit `to`.
SWARM_PORTABLE_INLINE __m256i BitOfEachByte(__m256i v, int bit, int to) {
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(v, bit), _mm256_set1_epi8(1)), to);
}

SWARM_PORTABLE_INLINE __m256i Load32(const uint8_t* at) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
}

template <class F>
struct Units;

template <>
struct Units<Q4_0> {
  static constexpr int kPerBlock = 1;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    fn(0, Nibbles32(block + 2, 8), ReadHalf(block), 0.0f, 0.0f);
  }
};

template <>
struct Units<Q4_1> {
  static constexpr int kPerBlock = 1;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    fn(0, Nibbles32(block + 4, 0), ReadHalf(block), 0.0f, ReadHalf(block + 2));
  }
};

template <>
struct Units<Q5_0> {
  static constexpr int kPerBlock = 1;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    fn(0, FiveBits32(block + 2, block + 6, 16), ReadHalf(block), 0.0f, 0.0f);
  }
};

template <>
struct Units<Q5_1> {
  static constexpr int kPerBlock = 1;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    fn(0, FiveBits32(block + 4, block + 8, 0), ReadHalf(block), 0.0f, ReadHalf(block + 2));
  }
};

template <>
struct Units<Q8_0> {
  static constexpr int kPerBlock = 1;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    fn(0, Load32(block + 2), ReadHalf(block), 0.0f, 0.0f);
  }
};

template <>
struct Units<Q4_K> {
  static constexpr int kPerBlock = 8;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    float scale[8], minimum[8];
    KQuantScales(block, scale, minimum);
    const __m256i mask = _mm256_set1_epi8(15);
    for (int c = 0; c < 4; ++c) {
      const __m256i bytes = Load32(block + 16 + 32 * c);
      fn(2 * c, _mm256_and_si256(bytes, mask), scale[2 * c], 0.0f, minimum[2 * c]);
      fn(2 * c + 1, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), scale[2 * c + 1], 0.0f, minimum[2 * c + 1]);
    }
  }
};

template <>
struct Units<Q5_K> {
  static constexpr int kPerBlock = 8;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    float scale[8], minimum[8];
    KQuantScales(block, scale, minimum);
    const __m256i mask = _mm256_set1_epi8(15), high = Load32(block + 16);
    for (int c = 0; c < 4; ++c) {
      const __m256i bytes = Load32(block + 48 + 32 * c);
      fn(2 * c, _mm256_or_si256(_mm256_and_si256(bytes, mask), BitOfEachByte(high, 2 * c, 4)), scale[2 * c], 0.0f,
         minimum[2 * c]);
      fn(2 * c + 1,
         _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), BitOfEachByte(high, 2 * c + 1, 4)),
         scale[2 * c + 1], 0.0f, minimum[2 * c + 1]);
    }
  }
};

template <>
struct Units<Q6_K> {
  static constexpr int kPerBlock = 8;
  template <class Fn>
  SWARM_PORTABLE_INLINE static void Each(const uint8_t* block, Fn&& fn) {
    const float d = ReadHalf(block + 208);
    const __m256i mask = _mm256_set1_epi8(15), two = _mm256_set1_epi8(3), offset = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      const __m256i high = Load32(block + 128 + 32 * h);
      for (int p = 0; p < 4; ++p) {
        const __m256i bytes = Load32(block + 64 * h + 32 * (p % 2));
        const __m256i low = _mm256_and_si256(p / 2 ? _mm256_srli_epi16(bytes, 4) : bytes, mask);
        const __m256i top = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * p), two), 4);
        const int g = 8 * h + 2 * p;
        fn(4 * h + p, _mm256_sub_epi8(_mm256_or_si256(low, top), offset),
           d * static_cast<float>(static_cast<int8_t>(block[192 + g])),
           d * static_cast<float>(static_cast<int8_t>(block[192 + g + 1])), 0.0f);
      }
    }
  }
};

// Activation rows first .. first + C - 1 times two packed weight rows, a and b, into
// out_a[c * out_stride] and out_b[c * out_stride] (plus add_*[c * out_stride] when
// given; out_b null: row a alone, b then only a stand-in). Each unit is decoded once for
// the C rows, and each activation unit is loaded once for both weight rows.
//
// A unit's dot with a row is ggml's AVX2 product: |w| (unsigned) times q with w's sign,
// summed in pairs to i16 (at most 2 * 128 * 127, never saturated) and in fours to i32
// lanes (one `vpdpbusd` with AVX-VNNI); the affine formats' codes are unsigned already
// (at most 31). Rows a and b's lanes are then folded into one register, a's in the even
// lanes and b's in the odd ones (integer adds, exact), so one conversion, one scale
// product and one fused multiply-add serve both rows. Lanes 0..3 hold elements 0..15 of
// a unit, lanes 4..7 elements 16..31: Q6_K's two groups.
//
// Both slots run the same arithmetic on their own lanes and sum them in the same order,
// so a row's values depend neither on its partner nor on how many activation rows share
// the pass: a batched row keeps its lone run's bits.
template <class F, int C>
void RowPairProduct(const uint8_t* row_a, const uint8_t* row_b, const Activations& act, int64_t first,
                    float* out_a, float* out_b, int64_t out_stride, const float* add_a, const float* add_b) {
  constexpr int kUnits = Units<F>::kPerBlock;
  const int64_t k = act.cols, blocks = k / F::kBlock;
  const int8_t* codes[C];
  const float *scales[C], *weighted[C];
  __m256 acc[C];
  __m128 minimum_acc[C];
  for (int c = 0; c < C; ++c) {
    codes[c] = act.codes + (first + c) * k;
    scales[c] = act.scale + (first + c) * (k / 32);
    weighted[c] = F::kAffine ? act.weighted + (first + c) * (k / 32) : nullptr;
    acc[c] = _mm256_setzero_ps();
    minimum_acc[c] = _mm_setzero_ps();
  }
#if !defined(__AVXVNNI__)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i codes_a[kUnits];
    float scale_a[kUnits], high_a[kUnits], minimum_a[kUnits];
    Units<F>::Each(row_a + b * F::kBlockBytes, [&](int u, __m256i w, float scale, float scale_high, float minimum) {
      codes_a[u] = w;
      scale_a[u] = scale;
      high_a[u] = F::kGroup == 32 ? scale : scale_high;
      minimum_a[u] = minimum;
    });
    Units<F>::Each(row_b + b * F::kBlockBytes, [&](int u, __m256i w_b, float scale_b, float scale_high, float minimum_b) {
      const int64_t unit = b * kUnits + u;
      const __m256i w_a = codes_a[u];
      const __m256i magnitude_a = F::kAffine ? w_a : _mm256_sign_epi8(w_a, w_a);
      const __m256i magnitude_b = F::kAffine ? w_b : _mm256_sign_epi8(w_b, w_b);
      const float high_b = F::kGroup == 32 ? scale_b : scale_high;
      const __m256 weight_scale =
          _mm256_setr_ps(scale_a[u], scale_b, scale_a[u], scale_b, high_a[u], high_b, high_a[u], high_b);
      const __m128 weight_minimum = _mm_setr_ps(minimum_a[u], minimum_b, 0.0f, 0.0f);
      for (int c = 0; c < C; ++c) {
        const __m256i q = Load32(reinterpret_cast<const uint8_t*>(codes[c] + 32 * unit));
        const __m256i signed_a = F::kAffine ? q : _mm256_sign_epi8(q, w_a);
        const __m256i signed_b = F::kAffine ? q : _mm256_sign_epi8(q, w_b);
#if defined(__AVXVNNI__)
        const __m256i dot_a = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), magnitude_a, signed_a);
        const __m256i dot_b = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), magnitude_b, signed_b);
#else
        const __m256i dot_a = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude_a, signed_a), ones);
        const __m256i dot_b = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude_b, signed_b), ones);
#endif
        // [a0+a2, b0+b2, a1+a3, b1+b3 | a4+a6, b4+b6, a5+a7, b5+b7]
        const __m256i dots = _mm256_add_epi32(_mm256_unpacklo_epi32(dot_a, dot_b), _mm256_unpackhi_epi32(dot_a, dot_b));
        const __m256 factor = _mm256_mul_ps(weight_scale, _mm256_broadcast_ss(scales[c] + unit));
        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), factor, acc[c]);
        if constexpr (F::kAffine) {
          minimum_acc[c] = _mm_fmadd_ps(weight_minimum, _mm_broadcast_ss(weighted[c] + unit), minimum_acc[c]);
        }
      }
    });
  }
  for (int c = 0; c < C; ++c) {
    // [(a0+a4) + (a2+a6), (b1+b5) + (b3+b7), ...]: the same order for both slots.
    __m128 sums = _mm_add_ps(_mm256_castps256_ps128(acc[c]), _mm256_extractf128_ps(acc[c], 1));
    sums = _mm_add_ps(_mm_add_ps(sums, _mm_movehl_ps(sums, sums)), minimum_acc[c]);
    const float sum_a = _mm_cvtss_f32(sums), sum_b = _mm_cvtss_f32(_mm_shuffle_ps(sums, sums, 1));
    out_a[c * out_stride] = add_a == nullptr ? sum_a : sum_a + add_a[c * out_stride];
    if (out_b != nullptr) out_b[c * out_stride] = add_b == nullptr ? sum_b : sum_b + add_b[c * out_stride];
  }
}
#endif  // AVX2

}  // namespace swarm_cpu::portable

#endif  // SWARM_KERNELS_CPU_PORTABLE_H_

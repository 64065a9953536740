// The quantized matmul for CPUs with neither AVX-512 VNNI nor AVX2 (which run the
// panels kernels, gemm.h and gemm_avx2.h): ARM (NEON, dot-product extensions), older
// x86 and anything else a C++20 compiler targets.
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
// multiplies every activation row with each, in plain C++ over the decoded row: the
// signed-times-signed 8-bit dot that compilers turn into `sdot` (ARM's dot-product
// extension) or their own vector code.
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
}  // namespace swarm_cpu::portable

#endif  // SWARM_KERNELS_CPU_PORTABLE_H_

// gemm.h's product on AVX2 CPUs: the same activation tiles, the same panels, half a
// panel (8 output features, V256) per register.
//
// Activations are quantized into gemm.h's tiles with the same IEEE operations (the same
// codes, scales and sums).  A decoded group of a half panel is G / 4 registers whose
// i32 lane n holds four codes of row n, so one activation dword broadcast to all lanes
// multiplies 8 output features at once, as `vpdpbusd` does on AVX-512:
//
// - with AVX-VNNI, `vpdpbusd` on 256 bits, the AVX-512 kernel's instruction;
// - on plain AVX2, `vpmaddubsw` (unsigned codes times signed activations, pairs summed
//   to i16) whose results add up in i16 over as many registers as cannot overflow
//   (RunLength), then `vpmaddwd` by ones to i32.  Q8_0's codes are signed: ggml's sign
//   trick (|q| times the activation with q's sign), one `vpmaddwd` per register.
//
// Either way a group's integer sum is exact, so it equals the AVX-512 kernel's, and the
// float part (the scale product, the conversion and the fused multiply-adds, in that
// order) is the same per lane: the AVX2 build gives the AVX-512 build's bits, and a
// row's bits do not depend on the rows beside it or on the path.

#ifndef SWARM_KERNELS_CPU_GEMM_AVX2_H_
#define SWARM_KERNELS_CPU_GEMM_AVX2_H_

#include <cstdint>
#include <cstring>
#include <limits>

#include <immintrin.h>

#include "gemm.h"
#include "panel.h"

namespace swarm_cpu {

// Quantizes blocks [begin, end) of row `row` of x (f32[k]) into its tile (end < 0: to
// the last), as gemm.h's QuantizeRow does (the same operations per block: the maximum
// magnitude, d = max / 127, codes of x * (127 / max) rounded to nearest even and
// saturated, their integer sums).
inline void QuantizeRow8(const float* x, int64_t row, const Activations& act, int group, int offset, bool affine,
                         int64_t begin = 0, int64_t end = -1) {
  const int64_t stride = act.tile_rows, tile = row / stride, lane = row % stride;
  int32_t* codes = act.TileCodes(tile) + lane;
  float* scale = act.TileScale(tile) + lane;
  int32_t* aux = act.TileAux(tile, group) + lane;
  const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t blocks = end < 0 ? act.cols / 32 : end;
  for (int64_t block = begin; block < blocks; ++block) {
    const float* at = x + 32 * block;
    __m256 v[4];
    __m256 magnitude = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(at + 8 * i);
      magnitude = _mm256_max_ps(magnitude, _mm256_and_ps(v[i], magnitude_mask));
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
    }
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(magnitude), _mm256_extractf128_ps(magnitude, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
    const float amax = _mm_cvtss_f32(half);
    // A NaN in a block makes its scale NaN, so the output is NaN as the reference's is.
    const bool nan = _mm256_movemask_ps(unordered) != 0;
    const float d = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
    const float inverse = amax != 0.0f && !nan ? 127.0f / amax : 0.0f;
    const __m256 factor = _mm256_set1_ps(inverse);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], factor));
    // Saturated to i16, then to i8 (as one saturation to i8); the packs interleave
    // 128-bit lanes, which the permutation undoes.
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    alignas(32) int32_t words[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(words), bytes);
    for (int j = 0; j < 8; ++j) codes[(8 * block + j) * stride] = words[j];
    // The codes' sums over elements 0..15 and 16..31 (Q6_K's two groups), of the i32
    // codes before saturation and with wrapping adds, as gemm.h's QuantizeRow takes them.
    const __m256i pairs = _mm256_hadd_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    const __m256i quads = _mm256_hadd_epi32(pairs, pairs);  // lanes 0, 4: low; 1, 5: high
    const __m128i halves = _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
    const int32_t low_sum = _mm_cvtsi128_si32(halves), high_sum = _mm_extract_epi32(halves, 1);
    const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(halves, _mm_srli_si128(halves, 4)));
    StoreBlockSums(scale, aux, stride, block, d, low_sum, high_sum, sum, group, offset, affine);
  }
}

// The largest code of format F, which bounds its i16 sums on plain AVX2.
template <class F>
constexpr int MaxCode() {
  if constexpr (F::kType == Q4_0::kType || F::kType == Q4_1::kType || F::kType == Q4_K::kType) return 15;
  if constexpr (F::kType == Q5_0::kType || F::kType == Q5_1::kType || F::kType == Q5_K::kType) return 31;
  if constexpr (F::kType == Q6_K::kType) return 63;
  return 255;
}

// Code registers whose `vpmaddubsw` results add up in i16 without overflow: each is at
// most 2 * 128 * MaxCode per lane (|activation| <= 128), so 8 for 4-bit codes, 4 for
// 5-bit, 2 for 6-bit.
template <class F>
constexpr int RunLength() {
  const int run = 32767 / (2 * 128 * MaxCode<F>());
  return run < F::kGroup / 4 ? run : F::kGroup / 4;
}

// Bytes one decoded group of format F takes in a half-panel buffer: the codes, the
// scales, the minima.
template <class F>
constexpr int64_t HalfGroupBytes() {
  return 8 * F::kGroup + 32 + (F::kAffine ? 32 : 0);
}

// Accumulates one decoded group of a half panel (`weights`: G / 4 registers of codes,
// `scale`, `minimum`) into C rows' f32[8] sums, as gemm.h's AccumulateGroup does on 16
// lanes.  `codes`, `scales`, `aux`: the rows' first lane in their tile, whose rows are
// kStride apart (Activations).
template <class F, int C, int kStride>
SWARM_INLINE void AccumulateGroup8(int64_t g, const __m256i* weights, __m256 scale, __m256 minimum, const int32_t* codes,
                                   const float* scales, const int32_t* aux, __m256 acc[C]) {
  constexpr int G = F::kGroup, J = G / 4;
  const int32_t* group_codes = codes + g * J * kStride;
  const int32_t* group_aux = aux + g * kStride;
  const auto activation = [&](int j, int c) { return _mm256_set1_epi32(group_codes[j * kStride + c]); };
  __m256i sum[C];
#if defined(__AVXVNNI__)
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) sum[c] = F::kAffine ? _mm256_setzero_si256() : _mm256_set1_epi32(group_aux[c]);
  SWARM_UNROLL
  for (int j = 0; j < J; ++j) {
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) sum[c] = _mm256_dpbusd_avx_epi32(sum[c], weights[j], activation(j, c));
  }
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (MaxCode<F>() > 127) {
    // Q8_0: the codes are q + 128; |q| times the activation with q's sign is q * a, its
    // pairs at most 2 * 128 * 128 (reached only by NaN blocks, whose output is NaN).
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) sum[c] = _mm256_setzero_si256();
    SWARM_UNROLL
    for (int j = 0; j < J; ++j) {
      const __m256i q = _mm256_xor_si256(weights[j], _mm256_set1_epi8(char(0x80)));
      const __m256i magnitude = _mm256_abs_epi8(q);
      SWARM_UNROLL
      for (int c = 0; c < C; ++c) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(activation(j, c), q));
        sum[c] = _mm256_add_epi32(sum[c], _mm256_madd_epi16(pairs, ones));
      }
    }
  } else {
    constexpr int kRun = RunLength<F>();
    static_assert(J % kRun == 0, "whole runs per group");
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) sum[c] = F::kAffine ? _mm256_setzero_si256() : _mm256_set1_epi32(group_aux[c]);
    SWARM_UNROLL
    for (int first = 0; first < J; first += kRun) {
      __m256i pairs[C];
      SWARM_UNROLL
      for (int j = first; j < first + kRun; ++j) {
        SWARM_UNROLL
        for (int c = 0; c < C; ++c) {
          const __m256i product = _mm256_maddubs_epi16(weights[j], activation(j, c));
          pairs[c] = j == first ? product : _mm256_add_epi16(pairs[c], product);
        }
      }
      SWARM_UNROLL
      for (int c = 0; c < C; ++c) sum[c] = _mm256_add_epi32(sum[c], _mm256_madd_epi16(pairs[c], ones));
    }
  }
#endif
  const float* group_scale = scales + (g * G / 32) * kStride;
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) {
    acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[c]), _mm256_mul_ps(scale, _mm256_set1_ps(group_scale[c])), acc[c]);
  }
  if constexpr (F::kAffine) {
    const float* weighted_sums = reinterpret_cast<const float*>(group_aux);
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(weighted_sums[c]), acc[c]);
  }
}

// Lanes 0..valid - 1 set: the half panel's real rows.
SWARM_INLINE __m256i LaneMask(int valid) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Stores C rows of 8 sums at out + c * out_stride, masked, plus the rows at
// add + c * out_stride when `add` is set.
template <int C>
SWARM_INLINE void StoreRows8(const __m256 acc[C], float* out, int64_t out_stride, __m256i mask, const float* add) {
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) {
    const __m256 sum = add == nullptr ? acc[c] : _mm256_add_ps(acc[c], _mm256_maskload_ps(add + c * out_stride, mask));
    _mm256_maskstore_ps(out + c * out_stride, mask, sum);
  }
}

// Decode sink that multiplies each group at once with the C rows of tile 0 (m <= C).
template <class F, int C>
struct RowsProduct8 {
  const int32_t* codes;
  const float* scales;
  const int32_t* aux;
  __m256 acc[C];

  explicit RowsProduct8(const Activations& act, int64_t tile = 0)
      : codes(act.TileCodes(tile)), scales(act.TileScale(tile)), aux(act.TileAux(tile, F::kGroup)) {
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  }
  SWARM_INLINE void Group(int64_t g, const __m256i* weights, __m256 scale, __m256 minimum) {
    AccumulateGroup8<F, C, C>(g, weights, scale, minimum, codes, scales, aux, acc);
  }
  void Store(float* out, int64_t out_stride, __m256i mask, const float* add) const {
    StoreRows8<C>(acc, out, out_stride, mask, add);
  }
};

// Decode sink that stores groups first_group, first_group + 1, ... of a half panel into
// a buffer (HalfGroupBytes<F>() each), for every pass of rows over them.
template <class F>
struct HalfPanelStore {
  uint8_t* panel;
  int64_t first_group;
  SWARM_INLINE void Group(int64_t g, const __m256i* weights, __m256 scale, __m256 minimum) const {
    uint8_t* at = panel + (g - first_group) * HalfGroupBytes<F>();
    for (int j = 0; j < F::kGroup / 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(at + 32 * j), weights[j]);
    _mm256_store_ps(reinterpret_cast<float*>(at + 8 * F::kGroup), scale);
    if constexpr (F::kAffine) _mm256_store_ps(reinterpret_cast<float*>(at + 8 * F::kGroup + 32), minimum);
  }
};

// C activation rows (tile rows kTileRows apart) times groups [first_group, end_group) of
// a stored half panel (HalfPanelStore from first_group on), added to (or, for the first
// groups, stored into) the f32 rows at out + c * out_stride; with `add` (the last
// groups only), stored plus the rows at add + c * out_stride.  AccumulateGroup8 as on the
// register path: the same bits.
template <class F, int C>
void HalfTileProduct(const uint8_t* panel, int64_t first_group, int64_t end_group, const int32_t* codes,
                     const float* scales, const int32_t* aux, float* out, int64_t out_stride, __m256i mask,
                     const float* add) {
  constexpr int G = F::kGroup;
  __m256 acc[C];
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) {
    acc[c] = first_group == 0 ? _mm256_setzero_ps() : _mm256_maskload_ps(out + c * out_stride, mask);
  }
  for (int64_t g = first_group; g < end_group; ++g) {
    const uint8_t* at = panel + (g - first_group) * HalfGroupBytes<F>();
    __m256i weights[G / 4];
    SWARM_UNROLL
    for (int j = 0; j < G / 4; ++j) weights[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(at + 32 * j));
    const __m256 scale = _mm256_load_ps(reinterpret_cast<const float*>(at + 8 * G));
    const __m256 minimum = F::kAffine ? _mm256_load_ps(reinterpret_cast<const float*>(at + 8 * G + 32))
                                      : _mm256_setzero_ps();
    AccumulateGroup8<F, C, kTileRows>(g, weights, scale, minimum, codes, scales, aux, acc);
  }
  StoreRows8<C>(acc, out, out_stride, mask, add);
}

}  // namespace swarm_cpu

#endif  // SWARM_KERNELS_CPU_GEMM_AVX2_H_

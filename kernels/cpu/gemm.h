// Activations quantized to 8 bits, and the product of one panel with them.
//
// Activation rows are quantized per 32 elements as ggml's quantize_row_q8_0 does
// (d = max|x| / 127, q = round-to-nearest-even(x * 127 / max|x|)), with d kept in
// f32, and the integer sum of each weight group's activation codes kept beside
// them: the symmetric formats subtract offset * sum inside the integer product,
// the affine ones (y = d * u + m) add m * d_x * sum (the `s` field of block_q8_1).
//
// Rows are packed in tiles of R rows, interleaved per 4 elements (`codes[k / 4][R]`
// dwords) so that the product broadcasts each row's dword with one address; R is
// min(m, kTileRows) and the last tile may be partial.

#ifndef SWARM_KERNELS_CPU_GEMM_H_
#define SWARM_KERNELS_CPU_GEMM_H_

#include <cstdint>
#include <cstring>
#include <limits>

#include <immintrin.h>

#include "panel.h"

namespace swarm_cpu {

constexpr int kTileRows = 8;

struct Activations {
  int64_t rows = 0;       // m
  int64_t cols = 0;       // k
  int64_t tile_rows = 0;  // R
  int64_t tiles = 0;
  int32_t* codes = nullptr;  // i32[tiles][k / 4][R]: four i8 codes each
  float* scale = nullptr;    // f32[tiles][k / 32][R]
  int32_t* aux = nullptr;    // [tiles][k / G][R]: i32 -offset * sum, or f32 d * sum (affine)

  int32_t* TileCodes(int64_t tile) const { return codes + tile * (cols / 4) * tile_rows; }
  float* TileScale(int64_t tile) const { return scale + tile * (cols / 32) * tile_rows; }
  int32_t* TileAux(int64_t tile, int group) const { return aux + tile * (cols / group) * tile_rows; }
};

// Stores block `block`'s scale d and what its weight groups take from the code sums
// (Activations::aux) at the rows' lane pointers `scale` and `aux` (rows `stride` apart):
// -offset * sum per group (groups of 16: `low` and `high`, the sums of the block's two
// halves; else `sum`, the whole block's), or d * sum for the affine formats.
SWARM_INLINE void StoreBlockSums(float* scale, int32_t* aux, int64_t stride, int64_t block, float d, int32_t low,
                                 int32_t high, int32_t sum, int group, int offset, bool affine) {
  scale[block * stride] = d;
  if (group == 16) {
    aux[2 * block * stride] = -offset * low;
    aux[(2 * block + 1) * stride] = -offset * high;
  } else if (affine) {
    const float weighted = d * static_cast<float>(sum);
    std::memcpy(aux + block * stride, &weighted, sizeof(float));
  } else {
    aux[block * stride] = -offset * sum;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

// v[i] (i < 16) reduced to one vector whose lane i is op over v[i]'s lanes: 30 shuffles,
// 15 ops and a permutation, where 16 separate reductions take about 130 instructions in
// 16 chains.  `op` must be exact whatever the order (max, integer add on the lanes'
// bits); v is overwritten.
template <class Op>
SWARM_INLINE __m512 ReduceSixteen(__m512 v[16], Op op) {
  // 256-bit halves: v[i] lanes 0..7 hold partials of source 2i, lanes 8..15 of 2i + 1.
  for (int i = 0; i < 8; ++i) {
    v[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  // 128-bit lanes: v[i] lane L holds 4 partials of source 4i + L.
  for (int i = 0; i < 4; ++i) {
    v[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  }
  // Within each 128-bit lane L: v[i] holds 2 partials of source 8i + L, then 2 of 8i + 4 + L.
  for (int i = 0; i < 2; ++i) {
    v[i] = op(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  }
  // Lane 4L + j: the whole of source 4j + L; the permutation puts source i in lane i.
  const __m512 whole = op(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), whole);
}

// Quantizes blocks [begin, end) of row `row` of x (f32[k]) into its tile (end < 0: to
// the last).  `group`, `offset`, `affine` are the weight format's (what the sums are
// for).  Blocks go 16 at a time: their maxima and code sums are reduced together
// (ReduceSixteen), and their scales computed as one vector, with the same IEEE
// operations per block as one at a time.
inline void QuantizeRow(const float* x, int64_t row, const Activations& act, int group, int offset, bool affine,
                        int64_t begin = 0, int64_t end = -1) {
  const int64_t stride = act.tile_rows, tile = row / stride, lane = row % stride;
  int32_t* codes = act.TileCodes(tile) + lane;
  float* scale = act.TileScale(tile) + lane;
  int32_t* aux = act.TileAux(tile, group) + lane;
  const __m512 magnitude_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const auto max = [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); };
  const auto add = [](__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  };
  const int64_t blocks = end < 0 ? act.cols / 32 : end;
  for (int64_t first = begin; first < blocks; first += 16) {
    const int count = static_cast<int>(blocks - first < 16 ? blocks - first : 16);
    const float* at = x + 32 * first;
    __m512 magnitudes[16];
    uint32_t nan = 0;  // bit b: block first + b holds a NaN
    for (int b = 0; b < 16; ++b) {
      if (b >= count) {
        magnitudes[b] = _mm512_setzero_ps();
        continue;
      }
      const __m512 low = _mm512_loadu_ps(at + 32 * b), high = _mm512_loadu_ps(at + 32 * b + 16);
      magnitudes[b] = _mm512_max_ps(_mm512_and_ps(low, magnitude_mask), _mm512_and_ps(high, magnitude_mask));
      const __mmask16 unordered = _mm512_cmp_ps_mask(low, low, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(high, high, _CMP_UNORD_Q);
      nan |= static_cast<uint32_t>(unordered != 0) << b;
    }
    const __m512 amax = ReduceSixteen(magnitudes, max);
    // A NaN in a block makes its scale NaN, so the output is NaN as the reference's is.
    const __mmask16 is_nan = static_cast<__mmask16>(nan);
    const __m512 d = _mm512_mask_mov_ps(_mm512_div_ps(amax, _mm512_set1_ps(127.0f)), is_nan,
                                        _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    const __mmask16 finite = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_NEQ_UQ) & ~is_nan;
    const __m512 inverse = _mm512_maskz_div_ps(finite, _mm512_set1_ps(127.0f), amax);
    alignas(64) float inverses[16];
    _mm512_store_ps(inverses, inverse);
    __m512 low_sums[16], high_sums[16];  // the codes' i32 bits
    for (int b = 0; b < 16; ++b) {
      if (b >= count) {
        low_sums[b] = high_sums[b] = _mm512_setzero_ps();
        continue;
      }
      const __m512 factor = _mm512_set1_ps(inverses[b]);
      const __m512i q_low = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(at + 32 * b), factor));
      const __m512i q_high = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(at + 32 * b + 16), factor));
      alignas(32) int32_t words[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm512_cvtsepi32_epi8(q_low));
      _mm_store_si128(reinterpret_cast<__m128i*>(words + 4), _mm512_cvtsepi32_epi8(q_high));
      for (int j = 0; j < 8; ++j) codes[(8 * (first + b) + j) * stride] = words[j];
      low_sums[b] = _mm512_castsi512_ps(q_low);
      high_sums[b] = _mm512_castsi512_ps(q_high);
    }
    alignas(64) float scales[16];
    alignas(64) int32_t low[16], high[16];
    _mm512_store_ps(scales, d);
    if (group == 16) {
      _mm512_store_ps(reinterpret_cast<float*>(low), ReduceSixteen(low_sums, add));
      _mm512_store_ps(reinterpret_cast<float*>(high), ReduceSixteen(high_sums, add));
    } else {
      for (int b = 0; b < 16; ++b) low_sums[b] = add(low_sums[b], high_sums[b]);
      _mm512_store_ps(reinterpret_cast<float*>(low), ReduceSixteen(low_sums, add));
    }
    // low: the halves' sums for groups of 16, else the whole block's.
    for (int b = 0; b < count; ++b) {
      StoreBlockSums(scale, aux, stride, first + b, scales[b], low[b], high[b], low[b], group, offset, affine);
    }
  }
}

// Bytes one decoded group of format F takes in a stored panel.
template <class F>
constexpr int64_t GroupBytes() {
  return 16 * F::kGroup + 64 + (F::kAffine ? 64 : 0);
}

// sum + the u8 x i8 dot products of `weights` with the activation dword at `code`,
// which the instruction reads and broadcasts itself ({1to16}).  GCC would load each
// dword into a register with a vpbroadcastd of its own first: on Zen 4 that made a
// group of 8 rows about 6 % slower (64 broadcasts beside the 64 products).
SWARM_INLINE __m512i DotBroadcast(__m512i sum, __m512i weights, const int32_t* code) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(sum) : "v"(weights), "m"(*code));
  return sum;
}

// Accumulates one decoded group into C rows' f32[16] sums: the integer dot product of
// the group's codes with each row's activation codes, minus offset * (code sum), is
// scaled by the weight scale times the activation block scale; affine formats add
// minimum * (activation scale * code sum).  `codes`: i32[G / 4][R] of this tile,
// `scales`: f32[k / 32][R], `aux`: [k / G][R] (see Activations); R = C here, as the
// register path runs only for m <= kTileRows (a compile-time stride: every activation
// is then one constant offset from one pointer, where a stride in a register costs an
// address register per row, more than x86 has).
template <class F, int C>
SWARM_INLINE void AccumulateGroup(int64_t g, const __m512i* weights, __m512 scale, __m512 minimum, const int32_t* codes,
                            const float* scales, const int32_t* aux, __m512 acc[C]) {
  constexpr int64_t stride = C;
  constexpr int G = F::kGroup;
  const int32_t* group_codes = codes + g * (G / 4) * stride;
  const int32_t* group_aux = aux + g * stride;
  __m512i sum[C];
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) sum[c] = F::kAffine ? _mm512_setzero_si512() : _mm512_set1_epi32(group_aux[c]);
  SWARM_UNROLL
  for (int j = 0; j < G / 4; ++j) {
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) {
      sum[c] = DotBroadcast(sum[c], weights[j], group_codes + j * stride + c);
    }
  }
  const float* group_scale = scales + (g * G / 32) * stride;
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) {
    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[c]), _mm512_mul_ps(scale, _mm512_set1_ps(group_scale[c])),
                             acc[c]);
  }
  if constexpr (F::kAffine) {
    const float* weighted_sums = reinterpret_cast<const float*>(group_aux);
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(weighted_sums[c]), acc[c]);
  }
}

// Stores C rows of 16 sums at out + c * out_stride, masked to the panel's real rows,
// plus the rows at add + c * out_stride when `add` is set (a residual: the same f32
// sums as adding afterwards).
template <int C>
SWARM_INLINE void StoreRows(const __m512 acc[C], float* out, int64_t out_stride, __mmask16 mask, const float* add) {
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) {
    const __m512 sum = add == nullptr ? acc[c] : _mm512_add_ps(acc[c], _mm512_maskz_loadu_ps(mask, add + c * out_stride));
    _mm512_mask_storeu_ps(out + c * out_stride, mask, sum);
  }
}

// Decode sink that multiplies each group at once with the C rows of tile 0 (m <= C):
// the decoded panel never leaves the registers.
template <class F, int C>
struct RowsProduct {
  const int32_t* codes;
  const float* scales;
  const int32_t* aux;
  __m512 acc[C];

  explicit RowsProduct(const Activations& act, int64_t tile = 0)
      : codes(act.TileCodes(tile)), scales(act.TileScale(tile)), aux(act.TileAux(tile, F::kGroup)) {
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  }
  SWARM_INLINE void Group(int64_t g, const __m512i* weights, __m512 scale, __m512 minimum) {
    AccumulateGroup<F, C>(g, weights, scale, minimum, codes, scales, aux, acc);
  }
  void Store(float* out, int64_t out_stride, __mmask16 mask, const float* add) const {
    StoreRows<C>(acc, out, out_stride, mask, add);
  }
};

// Decode sink that stores groups first_group, first_group + 1, ... into a panel buffer
// (GroupBytes<F>() each), for reuse by every activation tile when m is large.
template <class F>
struct PanelStore {
  uint8_t* panel;
  int64_t first_group;
  SWARM_INLINE void Group(int64_t g, const __m512i* weights, __m512 scale, __m512 minimum) const {
    uint8_t* at = panel + (g - first_group) * GroupBytes<F>();
    for (int j = 0; j < F::kGroup / 4; ++j) _mm512_store_si512(at + 64 * j, weights[j]);
    _mm512_store_ps(at + 16 * F::kGroup, scale);
    if constexpr (F::kAffine) _mm512_store_ps(at + 16 * F::kGroup + 64, minimum);
  }
};

// Panels the buffered product multiplies together, and activation rows per pass over
// them: each broadcast activation dword feeds kTilePanels `vpdpbusd` and each decoded
// register kSubTileRows, so loads and float work per multiply-add are fewer than one
// panel's 8-row pass takes (measured on the inner loop alone: 282 GMAC/s on one
// thread for 4 x 3, 228 for 8 x 1, 259 for 8 x 2, of a 388 peak).
constexpr int kTilePanels = 3;
constexpr int kSubTileRows = 4;
static_assert(kTileRows % kSubTileRows == 0, "a tile splits into whole passes");

// C (<= kSubTileRows) activation rows times groups [first_group, end_group) of
// kTilePanels stored panels (PanelStore buffers from first_group on), added to (or, for
// the first groups, stored into) f32 rows of 16 per panel: panel p's sums for row c at
// out + c * out_stride + 16 p, masked by masks[p] (0: no such panel; its buffer is read
// but nothing is stored).  `codes`, `scales` and `aux` point at the rows' first lane in
// their tile (Activations, rows kTileRows apart: m > kTileRows).  With `add` (the last groups only), the
// finished sums are stored plus the rows at add + c * out_stride + 16 p.  Each sum takes
// the same operations in the same order as RowsProduct's, so its bits do not depend on
// the path or on the other rows.
template <class F, int C>
void TileProduct(const uint8_t* const panels[kTilePanels], int64_t first_group, int64_t end_group,
                 const int32_t* codes, const float* scales, const int32_t* aux, float* out, int64_t out_stride,
                 const __mmask16 masks[kTilePanels], const float* add) {
  constexpr int G = F::kGroup, P = kTilePanels;
  constexpr int64_t stride = kTileRows;
  __m512 acc[C][P];
  SWARM_UNROLL
  for (int c = 0; c < C; ++c) {
    SWARM_UNROLL
    for (int p = 0; p < P; ++p) {
      acc[c][p] = first_group == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[p], out + c * out_stride + 16 * p);
    }
  }
  for (int64_t g = first_group; g < end_group; ++g) {
    const int64_t offset = (g - first_group) * GroupBytes<F>();
    const int32_t* group_codes = codes + g * (G / 4) * stride;
    const int32_t* group_aux = aux + g * stride;
    __m512i sum[C][P];
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m512i init = F::kAffine ? _mm512_setzero_si512() : _mm512_set1_epi32(group_aux[c]);
      SWARM_UNROLL
      for (int p = 0; p < P; ++p) sum[c][p] = init;
    }
    SWARM_UNROLL
    for (int j = 0; j < G / 4; ++j) {
      __m512i weights[P];
      SWARM_UNROLL
      for (int p = 0; p < P; ++p) weights[p] = _mm512_load_si512(panels[p] + offset + 64 * j);
      SWARM_UNROLL
      for (int c = 0; c < C; ++c) {
        const __m512i activation = _mm512_set1_epi32(group_codes[j * stride + c]);
        SWARM_UNROLL
        for (int p = 0; p < P; ++p) sum[c][p] = _mm512_dpbusd_epi32(sum[c][p], weights[p], activation);
      }
    }
    const float* group_scale = scales + (g * G / 32) * stride;
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m512 row_scale = _mm512_set1_ps(group_scale[c]);
      SWARM_UNROLL
      for (int p = 0; p < P; ++p) {
        const __m512 scale = _mm512_load_ps(panels[p] + offset + 16 * G);
        acc[c][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[c][p]), _mm512_mul_ps(scale, row_scale), acc[c][p]);
      }
    }
    if constexpr (F::kAffine) {
      const float* weighted_sums = reinterpret_cast<const float*>(group_aux);
      SWARM_UNROLL
      for (int c = 0; c < C; ++c) {
        const __m512 weighted = _mm512_set1_ps(weighted_sums[c]);
        SWARM_UNROLL
        for (int p = 0; p < P; ++p) {
          acc[c][p] = _mm512_fmadd_ps(_mm512_load_ps(panels[p] + offset + 16 * G + 64), weighted, acc[c][p]);
        }
      }
    }
  }
  SWARM_UNROLL
  for (int p = 0; p < P; ++p) {
    if (masks[p] == 0) continue;
    __m512 rows[C];
    SWARM_UNROLL
    for (int c = 0; c < C; ++c) rows[c] = acc[c][p];
    StoreRows<C>(rows, out + 16 * p, out_stride, masks[p], add == nullptr ? nullptr : add + 16 * p);
  }
}

#endif  // AVX-512

}  // namespace swarm_cpu

#endif  // SWARM_KERNELS_CPU_GEMM_H_

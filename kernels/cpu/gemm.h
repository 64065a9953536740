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

// Quantizes row `row` of x (f32[k]) into its tile.  `group`, `offset`, `affine` are the
// weight format's (what the sums are for).
inline void QuantizeRow(const float* x, int64_t row, const Activations& act, int group, int offset, bool affine) {
  const int64_t stride = act.tile_rows, tile = row / stride, lane = row % stride;
  int32_t* codes = act.TileCodes(tile) + lane;
  float* scale = act.TileScale(tile) + lane;
  int32_t* aux = act.TileAux(tile, group) + lane;
  const __m512 magnitude_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t block = 0; block < act.cols / 32; ++block) {
    const __m512 low = _mm512_loadu_ps(x + 32 * block), high = _mm512_loadu_ps(x + 32 * block + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(low, magnitude_mask), _mm512_and_ps(high, magnitude_mask)));
    // A NaN in the block makes its scale NaN, so the output is NaN as the reference's is.
    const bool nan = (_mm512_cmp_ps_mask(low, low, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(high, high, _CMP_UNORD_Q)) != 0;
    const float d = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
    const float inverse = amax != 0.0f && !nan ? 127.0f / amax : 0.0f;
    const __m512i q_low = _mm512_cvtps_epi32(_mm512_mul_ps(low, _mm512_set1_ps(inverse)));
    const __m512i q_high = _mm512_cvtps_epi32(_mm512_mul_ps(high, _mm512_set1_ps(inverse)));
    alignas(32) int32_t words[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm512_cvtsepi32_epi8(q_low));
    _mm_store_si128(reinterpret_cast<__m128i*>(words + 4), _mm512_cvtsepi32_epi8(q_high));
    for (int j = 0; j < 8; ++j) codes[(8 * block + j) * stride] = words[j];
    scale[block * stride] = d;
    const int32_t sum_low = _mm512_reduce_add_epi32(q_low), sum_high = _mm512_reduce_add_epi32(q_high);
    if (group == 16) {
      aux[2 * block * stride] = -offset * sum_low;
      aux[(2 * block + 1) * stride] = -offset * sum_high;
    } else if (affine) {
      const float weighted = d * static_cast<float>(sum_low + sum_high);
      std::memcpy(aux + block * stride, &weighted, sizeof(float));
    } else {
      aux[block * stride] = -offset * (sum_low + sum_high);
    }
  }
}

// Bytes one decoded group of format F takes in a stored panel.
template <class F>
constexpr int64_t GroupBytes() {
  return 16 * F::kGroup + 64 + (F::kAffine ? 64 : 0);
}

// Accumulates one decoded group into C rows' f32[16] sums: the integer dot product of
// the group's codes with each row's activation codes, minus offset * (code sum), is
// scaled by the weight scale times the activation block scale; affine formats add
// minimum * (activation scale * code sum).  `codes`: i32[G / 4][R] of this tile,
// `scales`: f32[k / 32][R], `aux`: [k / G][R] (see Activations).
template <class F, int C>
SWARM_INLINE void AccumulateGroup(int64_t g, const __m512i* weights, __m512 scale, __m512 minimum, const int32_t* codes,
                            const float* scales, const int32_t* aux, int64_t stride, __m512 acc[C]) {
  constexpr int G = F::kGroup;
  const int32_t* group_codes = codes + g * (G / 4) * stride;
  const int32_t* group_aux = aux + g * stride;
  __m512i sum[C];
  for (int c = 0; c < C; ++c) sum[c] = F::kAffine ? _mm512_setzero_si512() : _mm512_set1_epi32(group_aux[c]);
  for (int j = 0; j < G / 4; ++j) {
    for (int c = 0; c < C; ++c) {
      sum[c] = _mm512_dpbusd_epi32(sum[c], weights[j], _mm512_set1_epi32(group_codes[j * stride + c]));
    }
  }
  const float* group_scale = scales + (g * G / 32) * stride;
  for (int c = 0; c < C; ++c) {
    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[c]), _mm512_mul_ps(scale, _mm512_set1_ps(group_scale[c])),
                             acc[c]);
  }
  if constexpr (F::kAffine) {
    const float* weighted_sums = reinterpret_cast<const float*>(group_aux);
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(weighted_sums[c]), acc[c]);
  }
}

// Stores C rows of 16 sums at out + c * out_stride, masked to the panel's real rows,
// plus the rows at add + c * out_stride when `add` is set (a residual: the same f32
// sums as adding afterwards).
template <int C>
SWARM_INLINE void StoreRows(const __m512 acc[C], float* out, int64_t out_stride, __mmask16 mask, const float* add) {
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
  int64_t stride;
  __m512 acc[C];

  explicit RowsProduct(const Activations& act)
      : codes(act.TileCodes(0)), scales(act.TileScale(0)), aux(act.TileAux(0, F::kGroup)), stride(act.tile_rows) {
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  }
  SWARM_INLINE void Group(int64_t g, const __m512i* weights, __m512 scale, __m512 minimum) {
    AccumulateGroup<F, C>(g, weights, scale, minimum, codes, scales, aux, stride, acc);
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

// The C rows of `tile` times groups [first_group, end_group) of a stored panel, added to
// (or, for the first groups, stored into) f32 rows of 16 at out + c * out_stride,
// masked to the panel's real rows.  With `add` (the last groups only), the finished
// sums are stored plus the rows at add + c * out_stride.
template <class F, int C>
void TileProduct(const PanelStore<F>& panel, int64_t end_group, const Activations& act, int64_t tile, float* out,
                 int64_t out_stride, __mmask16 mask, const float* add) {
  constexpr int G = F::kGroup;
  const int32_t* codes = act.TileCodes(tile);
  const float* scales = act.TileScale(tile);
  const int32_t* aux = act.TileAux(tile, G);
  __m512 acc[C];
  for (int c = 0; c < C; ++c) {
    acc[c] = panel.first_group == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, out + c * out_stride);
  }
  for (int64_t g = panel.first_group; g < end_group; ++g) {
    const uint8_t* at = panel.panel + (g - panel.first_group) * GroupBytes<F>();
    const __m512 scale = _mm512_load_ps(at + 16 * G);
    const __m512 minimum = F::kAffine ? _mm512_load_ps(at + 16 * G + 64) : _mm512_setzero_ps();
    AccumulateGroup<F, C>(g, reinterpret_cast<const __m512i*>(at), scale, minimum, codes, scales, aux,
                          act.tile_rows, acc);
  }
  StoreRows<C>(acc, out, out_stride, mask, add);
}

}  // namespace swarm_cpu

#endif  // SWARM_KERNELS_CPU_GEMM_H_

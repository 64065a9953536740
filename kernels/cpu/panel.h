// Weight panels: 16 packed GGUF rows decoded into the layout the VNNI product reads.
//
// A panel is 16 output features (GGUF rows).  Every block of a row splits into
// groups of G elements (G = 32, or 16 for Q6_K whose scales cover 16 elements),
// and a group of the panel decodes into
//
//   u8  codes[G / 4][16][4]   // register j, lane n: elements 4j..4j+3 of row n
//   f32 scale[16]             // row n's element = scale * (u - offset), or
//   f32 minimum[16]           // scale * u + minimum for the affine formats
//
// so that `vpdpbusd` with one activation dword broadcast to all lanes yields 16
// output features at once: lanes are rows, not k, so no horizontal sums.  The
// codes `u` are the unsigned values the formats store; signed formats carry an
// offset (Q4_0: 8, Q5_0: 16, Q6_K: 32; Q8_0 is flipped to u = q + 128) that the
// activation block sums take out (gemm.h).  Bit layouts follow the
// `dequantize_row_*` functions of ggml-quants.c, as kernels/dequant.py does.
//
// Decoders read a block's fields through a source, in either weight layout:
//
//   RowsSource    the GGUF's own rows: the packed bytes are transposed (16 rows x 16
//                 bytes into 4 registers of row lanes) and unpacked in place;
//   PanelsSource  the panels layout (kernels/qtensor.py, PANEL_FIELDS), which the
//                 loader stores for this kernel: every field is already in row
//                 lanes, so a read is a plain load, and a panel is one stream.
//
// Either way the unpacking is the same per-lane arithmetic as ggml's row-wise decoders.
//
// AVX2 CPUs read the same panels layout half a panel at a time (HalfPanelsSource: 8
// rows, the low or high 32 bytes of each 64-byte unit), through the same decoders on
// 256-bit registers (V256), so both builds decode the same codes and scales.

#ifndef SWARM_KERNELS_CPU_PANEL_H_
#define SWARM_KERNELS_CPU_PANEL_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

// The decoders, sinks and group products are small and called once per group from
// the per-panel loops: inlined, their registers (the decoded codes, the C rows'
// accumulators) never go through memory.  GCC leaves the bigger instantiations out of
// line without this.
#define SWARM_INLINE inline __attribute__((always_inline))
// Loops over a tile's registers (rows, panels, a group's code words) are unrolled
// whole, so each array element stays a register: left to its heuristics, GCC keeps
// some of them as loops over stack arrays, depending on what the function holds
// around them (measured: an 8-row decode product 40 % slower).
#define SWARM_UNROLL _Pragma("GCC unroll 64")

namespace swarm_cpu {

constexpr int kPanelRows = 16;

// The i32 word of the Q5 fifth-bit test (AddFifthBits below): for codes register j
// (elements 4j..4j+3), byte b tests bit 4 * (j % 2) + b of the byte it picked.
constexpr int32_t FifthBitsMask(int j) {
  const int first = (j % 2) * 4;
  return (1 << first) | (2 << first) << 8 | (4 << first) << 16 | (8 << first) << 24;
}

// The decoders below are written once for either register width: V512 (16 rows per
// register, the whole panel) and V256 (8 rows, half a panel, for AVX2 CPUs) name the
// few integer and float operations they take, lane for lane the same.

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct V512 {
  using I = __m512i;
  using F = __m512;
  static SWARM_INLINE I And(I a, I b) { return _mm512_and_si512(a, b); }
  static SWARM_INLINE I Or(I a, I b) { return _mm512_or_si512(a, b); }
  static SWARM_INLINE I Xor(I a, I b) { return _mm512_xor_si512(a, b); }
  static SWARM_INLINE I ShiftRight(I v, int n) { return _mm512_srli_epi32(v, n); }  // per i32 lane
  static SWARM_INLINE I ShiftLeft(I v, int n) { return _mm512_slli_epi32(v, n); }
  static SWARM_INLINE I ShiftRightSigned(I v, int n) { return _mm512_srai_epi32(v, n); }
  static SWARM_INLINE I Bytes(char c) { return _mm512_set1_epi8(c); }
  static SWARM_INLINE I Words(int32_t w) { return _mm512_set1_epi32(w); }
  static SWARM_INLINE F ToFloat(I v) { return _mm512_cvtepi32_ps(v); }
  static SWARM_INLINE F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static SWARM_INLINE F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static SWARM_INLINE F Zero() { return _mm512_setzero_ps(); }

  // Fifth bits of Q5_0/Q5_1: lane n of `high` is the little-endian u32 qh of row n, whose
  // bit e belongs to element e.  Adds 16 to the elements 4j..4j+3 whose bit is set.
  static SWARM_INLINE I AddFifthBits(I codes, I high, int j) {
    // Every byte of dword p (of each 128-bit lane) picks byte j / 2 of that dword, then
    // tests its own bit 4 * (j % 2) + (byte index).
    const I dword_base = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0);
    const I bytes = _mm512_shuffle_epi8(high, _mm512_add_epi8(dword_base, _mm512_set1_epi8(char(j / 2))));
    return _mm512_mask_add_epi8(codes, _mm512_test_epi8_mask(bytes, Words(FifthBitsMask(j))), codes, Bytes(16));
  }
};

// Byte addresses of the 16 rows of a panel; rows past the matrix repeat its last
// row (their outputs are masked off), so every load stays inside the buffer.
struct PanelRows {
  const uint8_t* row[kPanelRows];

  PanelRows(const uint8_t* weights, int64_t row_bytes, int64_t first, int64_t rows) {
    for (int n = 0; n < kPanelRows; ++n) row[n] = weights + (first + n < rows ? first + n : rows - 1) * row_bytes;
  }

  // i32 lane n: the 4 bytes at row n + offset.  Scalar loads through the stack are no
  // slower than vpgatherdd on Zen 4 and leave the vector pipes to the unpacking.
  __m512i Gather(int64_t offset) const {
    alignas(64) uint32_t words[kPanelRows];
    for (int n = 0; n < kPanelRows; ++n) std::memcpy(words + n, row[n] + offset, 4);
    return _mm512_load_si512(words);
  }

  // t[j] lane n: bytes 4j..4j+3 of the 16 bytes at row n + offset.
  void Transpose16(int64_t offset, __m512i t[4]) const {
    // quad[q] 128-bit lane L holds row q + 4L: broadcast loads with merge masks, so
    // placing rows costs no shuffles; then a 4x4 dword transpose inside each lane.
    __m512i quad[4];
    for (int q = 0; q < 4; ++q) {
      __m512i v = _mm512_broadcast_i32x4(Load(q, offset));
      v = _mm512_mask_broadcast_i32x4(v, 0x00F0, Load(q + 4, offset));
      v = _mm512_mask_broadcast_i32x4(v, 0x0F00, Load(q + 8, offset));
      quad[q] = _mm512_mask_broadcast_i32x4(v, 0xF000, Load(q + 12, offset));
    }
    const __m512i rows01_low = _mm512_unpacklo_epi32(quad[0], quad[1]);
    const __m512i rows01_high = _mm512_unpackhi_epi32(quad[0], quad[1]);
    const __m512i rows23_low = _mm512_unpacklo_epi32(quad[2], quad[3]);
    const __m512i rows23_high = _mm512_unpackhi_epi32(quad[2], quad[3]);
    t[0] = _mm512_unpacklo_epi64(rows01_low, rows23_low);
    t[1] = _mm512_unpackhi_epi64(rows01_low, rows23_low);
    t[2] = _mm512_unpacklo_epi64(rows01_high, rows23_high);
    t[3] = _mm512_unpackhi_epi64(rows01_high, rows23_high);
  }

 private:
  __m128i Load(int n, int64_t offset) const {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[n] + offset));
  }
};

// A format's fields for 16 rows in the GGUF's rows layout.  Words<C>(block, field, unit)
// gives C registers whose i32 lane n holds bytes field + 4 (unit + j) .. + 3 of that
// block of row n; Half(block, field) the f16 at `field` of each row, as f32.
template <class F>
struct RowsSource {
  using V = V512;
  PanelRows rows;

  template <int kCount>
  SWARM_INLINE void Words(int64_t block, int field, int unit, __m512i* out) const {
    const int64_t at = block * F::kBlockBytes + field + 4 * unit;
    if constexpr (kCount == 1) {
      out[0] = rows.Gather(at);
    } else if constexpr (kCount % 4 == 0) {
      for (int q = 0; q < kCount / 4; ++q) rows.Transpose16(at + 16 * q, out + 4 * q);
    } else {
      static_assert(kCount < 4, "reads are 1, 2, 3 or a multiple of 4 words");
      __m512i words[4];
      rows.Transpose16(at, words);
      for (int j = 0; j < kCount; ++j) out[j] = words[j];
    }
  }
  __m512 Half(int64_t block, int field) const;
};

// The same reads in the panels layout, whose panel starts at `panel`: block b of the
// panel is 16 * kBlockBytes bytes, and the field at byte `field` of a block starts at
// 16 * field within them, its 16 rows' units side by side.
template <class F>
struct PanelsSource {
  using V = V512;
  const uint8_t* panel;

  template <int kCount>
  SWARM_INLINE void Words(int64_t block, int field, int unit, __m512i* out) const {
    const uint8_t* at = panel + block * (kPanelRows * F::kBlockBytes) + kPanelRows * field + 64 * unit;
    for (int j = 0; j < kCount; ++j) out[j] = _mm512_loadu_si512(at + 64 * j);
  }
  SWARM_INLINE __m512 Half(int64_t block, int field) const {
    const uint8_t* at = panel + block * (kPanelRows * F::kBlockBytes) + kPanelRows * field;
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
  }
};

// ggml_fp16_t in the low (high) half of every i32 lane, as f32.
SWARM_INLINE __m512 LowHalfF16(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }
SWARM_INLINE __m512 HighHalfF16(__m512i v) { return LowHalfF16(_mm512_srli_epi32(v, 16)); }

template <class F>
__m512 RowsSource<F>::Half(int64_t block, int field) const {
  const int64_t at = block * F::kBlockBytes + field;
  // A field in the block's last two bytes: the dword that ends there, so the load stays
  // inside the block.
  return field + 4 <= F::kBlockBytes ? LowHalfF16(rows.Gather(at)) : HighHalfF16(rows.Gather(at - 2));
}
#endif  // AVX-512

#if defined(__AVX2__) && defined(__F16C__)
struct V256 {
  using I = __m256i;
  using F = __m256;
  static SWARM_INLINE I And(I a, I b) { return _mm256_and_si256(a, b); }
  static SWARM_INLINE I Or(I a, I b) { return _mm256_or_si256(a, b); }
  static SWARM_INLINE I Xor(I a, I b) { return _mm256_xor_si256(a, b); }
  static SWARM_INLINE I ShiftRight(I v, int n) { return _mm256_srli_epi32(v, n); }
  static SWARM_INLINE I ShiftLeft(I v, int n) { return _mm256_slli_epi32(v, n); }
  static SWARM_INLINE I ShiftRightSigned(I v, int n) { return _mm256_srai_epi32(v, n); }
  static SWARM_INLINE I Bytes(char c) { return _mm256_set1_epi8(c); }
  static SWARM_INLINE I Words(int32_t w) { return _mm256_set1_epi32(w); }
  static SWARM_INLINE F ToFloat(I v) { return _mm256_cvtepi32_ps(v); }
  static SWARM_INLINE F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static SWARM_INLINE F Sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static SWARM_INLINE F Zero() { return _mm256_setzero_ps(); }

  // V512::AddFifthBits on 8 rows: the same byte picks, the bit test by comparison.
  static SWARM_INLINE I AddFifthBits(I codes, I high, int j) {
    const I dword_base = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808,
                                           0x0C0C0C0C);
    const I bytes = _mm256_shuffle_epi8(high, _mm256_add_epi8(dword_base, Bytes(char(j / 2))));
    const I bits = Words(FifthBitsMask(j));
    const I set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bits), bits);
    return _mm256_add_epi8(codes, _mm256_and_si256(set, Bytes(16)));
  }
};

// Half a panel, rows 8 * half .. 8 * half + 7, in the panels layout (PanelsSource):
// each field's unit is 64 bytes of 16 rows, of which these rows are the low or high 32.
template <class F>
struct HalfPanelsSource {
  using V = V256;
  const uint8_t* panel;
  int half;

  template <int kCount>
  SWARM_INLINE void Words(int64_t block, int field, int unit, __m256i* out) const {
    const uint8_t* at = panel + block * (kPanelRows * F::kBlockBytes) + kPanelRows * field + 64 * unit + 32 * half;
    for (int j = 0; j < kCount; ++j) out[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 64 * j));
  }
  SWARM_INLINE __m256 Half(int64_t block, int field) const {
    const uint8_t* at = panel + block * (kPanelRows * F::kBlockBytes) + kPanelRows * field + 16 * half;
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  }
};

// The same 8 rows in the GGUF's rows layout, read a word of each row at a time (the
// engine stores its weights as panels; this serves weights of other shapes).  Rows
// past the matrix repeat its last row, as PanelRows does.
template <class F>
struct HalfRowsSource {
  using V = V256;
  const uint8_t* row[8];

  HalfRowsSource(const uint8_t* weights, int64_t row_bytes, int64_t first, int64_t rows) {
    for (int n = 0; n < 8; ++n) row[n] = weights + (first + n < rows ? first + n : rows - 1) * row_bytes;
  }
  template <int kCount>
  SWARM_INLINE void Words(int64_t block, int field, int unit, __m256i* out) const {
    const int64_t at = block * F::kBlockBytes + field + 4 * unit;
    for (int j = 0; j < kCount; ++j) {
      alignas(32) uint32_t words[8];
      for (int n = 0; n < 8; ++n) std::memcpy(words + n, row[n] + at + 4 * j, 4);
      out[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(words));
    }
  }
  SWARM_INLINE __m256 Half(int64_t block, int field) const {
    alignas(16) uint16_t halves[8];
    for (int n = 0; n < 8; ++n) std::memcpy(halves + n, row[n] + block * F::kBlockBytes + field, 2);
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(halves)));
  }
};
#endif  // AVX2

// The low (high) nibble of every byte.
template <class V>
SWARM_INLINE typename V::I Nibbles(typename V::I v, int high) {
  return V::And(high ? V::ShiftRight(v, 4) : v, V::Bytes(0x0F));
}

// Byte `index` (0..3) of every i32 lane, unsigned, as f32.
template <class V>
SWARM_INLINE typename V::F ByteAsFloat(typename V::I v, int index) {
  return V::ToFloat(V::And(V::ShiftRight(v, 8 * index), V::Words(0xFF)));
}

// --- The formats -------------------------------------------------------------
// Each has kBlock elements in kBlockBytes bytes, kGroup elements per scale, and
// kAffine (element = scale * u + minimum) or not (scale * (u - kOffset)).
// Decode(source, block, sink) hands every group of the block, in element order, to
// sink.Group(group index in the row, codes[kGroup / 4], scale, minimum); the sink
// stores the panel (gemm.h, PanelStore) or multiplies at once (gemm.h, RowsProduct).
// The field offsets read here are those of kernels/qtensor.py's PANEL_FIELDS.

struct Q4_0 {
  static constexpr int kType = 2, kBlock = 32, kBlockBytes = 18, kGroup = 32, kOffset = 8;
  static constexpr bool kAffine = false;
  // block_q4_0 {f16 d; u8 qs[16]}: element j < 16 is qs[j] & 15, element j + 16 is qs[j] >> 4.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    typename V::I packed[4], codes[8];
    source.template Words<4>(block, 2, 0, packed);
    for (int j = 0; j < 4; ++j) {
      codes[j] = Nibbles<V>(packed[j], 0);
      codes[j + 4] = Nibbles<V>(packed[j], 1);
    }
    sink.Group(block, codes, source.Half(block, 0), V::Zero());
  }
};

struct Q4_1 {
  static constexpr int kType = 3, kBlock = 32, kBlockBytes = 20, kGroup = 32, kOffset = 0;
  static constexpr bool kAffine = true;
  // block_q4_1 {f16 d, m; u8 qs[16]}: y = d * q + m, nibbles as Q4_0.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    typename V::I packed[4], codes[8];
    source.template Words<4>(block, 4, 0, packed);
    for (int j = 0; j < 4; ++j) {
      codes[j] = Nibbles<V>(packed[j], 0);
      codes[j + 4] = Nibbles<V>(packed[j], 1);
    }
    sink.Group(block, codes, source.Half(block, 0), source.Half(block, 2));
  }
};

struct Q5_0 {
  static constexpr int kType = 6, kBlock = 32, kBlockBytes = 22, kGroup = 32, kOffset = 16;
  static constexpr bool kAffine = false;
  // block_q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: element e = nibble | (bit e of qh) << 4.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    typename V::I packed[4], codes[8], high;
    source.template Words<4>(block, 6, 0, packed);
    source.template Words<1>(block, 2, 0, &high);
    for (int j = 0; j < 4; ++j) {
      codes[j] = V::AddFifthBits(Nibbles<V>(packed[j], 0), high, j);
      codes[j + 4] = V::AddFifthBits(Nibbles<V>(packed[j], 1), high, j + 4);
    }
    sink.Group(block, codes, source.Half(block, 0), V::Zero());
  }
};

struct Q5_1 {
  static constexpr int kType = 7, kBlock = 32, kBlockBytes = 24, kGroup = 32, kOffset = 0;
  static constexpr bool kAffine = true;
  // block_q5_1 {f16 d, m; u8 qh[4]; u8 qs[16]}: y = d * q5 + m.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    typename V::I packed[4], codes[8], high;
    source.template Words<4>(block, 8, 0, packed);
    source.template Words<1>(block, 4, 0, &high);
    for (int j = 0; j < 4; ++j) {
      codes[j] = V::AddFifthBits(Nibbles<V>(packed[j], 0), high, j);
      codes[j + 4] = V::AddFifthBits(Nibbles<V>(packed[j], 1), high, j + 4);
    }
    sink.Group(block, codes, source.Half(block, 0), source.Half(block, 2));
  }
};

struct Q8_0 {
  static constexpr int kType = 8, kBlock = 32, kBlockBytes = 34, kGroup = 32, kOffset = 128;
  static constexpr bool kAffine = false;
  // block_q8_0 {f16 d; i8 qs[32]}: u = q + 128 (the sign bit flipped) is what vpdpbusd multiplies.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    typename V::I codes[8];
    source.template Words<8>(block, 2, 0, codes);
    const typename V::I sign = V::Bytes(char(0x80));
    for (int j = 0; j < 8; ++j) codes[j] = V::Xor(codes[j], sign);
    sink.Group(block, codes, source.Half(block, 0), V::Zero());
  }
};

// get_scale_min_k4 of Q4_K/Q5_K, for all 8 sub-blocks of 16 rows at once, from the
// block's {f16 d, dmin} and the 3 words of its u8 scales[12].
template <class V>
struct KQuantScales {
  typename V::F d, negative_dmin;
  typename V::I scale_low, min_low, scale_high, min_high;  // byte s: sub-block s (low) or s + 4 (high)

  template <class Source>
  KQuantScales(const Source& source, int64_t block) {
    typename V::I words[3];
    source.template Words<3>(block, 4, 0, words);
    d = source.Half(block, 0);
    negative_dmin = V::Sub(V::Zero(), source.Half(block, 2));
    const typename V::I low6 = V::Bytes(0x3F), low4 = V::Bytes(0x0F), top2 = V::Bytes(0x30);
    // Sub-blocks 0..3: low 6 bits of scales[0..3] and scales[4..7].
    scale_low = V::And(words[0], low6);
    min_low = V::And(words[1], low6);
    // Sub-blocks 4..7: nibbles of scales[8..11], top bits from the high 2 bits of scales[0..7].
    scale_high = V::Or(V::And(words[2], low4), V::And(V::ShiftRight(words[0], 2), top2));
    min_high = V::Or(V::And(V::ShiftRight(words[2], 4), low4), V::And(V::ShiftRight(words[1], 2), top2));
  }
  typename V::F Scale(int s) const { return V::Mul(d, ByteAsFloat<V>(s < 4 ? scale_low : scale_high, s % 4)); }
  typename V::F Minimum(int s) const {
    return V::Mul(negative_dmin, ByteAsFloat<V>(s < 4 ? min_low : min_high, s % 4));
  }
};

struct Q4_K {
  static constexpr int kType = 12, kBlock = 256, kBlockBytes = 144, kGroup = 32, kOffset = 0;
  static constexpr bool kAffine = true;
  // block_q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}: sub-block 2c + h holds nibble h
  // of qs[32c + l], y = d * scale * q - dmin * min.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    const KQuantScales<V> scales(source, block);
    for (int chunk = 0; chunk < 4; ++chunk) {
      typename V::I packed[8], codes[8];
      source.template Words<8>(block, 16, 8 * chunk, packed);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * chunk + h;
        for (int j = 0; j < 8; ++j) codes[j] = Nibbles<V>(packed[j], h);
        sink.Group(8 * block + s, codes, scales.Scale(s), scales.Minimum(s));
      }
    }
  }
};

struct Q5_K {
  static constexpr int kType = 13, kBlock = 256, kBlockBytes = 176, kGroup = 32, kOffset = 0;
  static constexpr bool kAffine = true;
  // block_q5_K {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K, plus bit s
  // of qh[l] as the fifth bit of element l of sub-block s.
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    const KQuantScales<V> scales(source, block);
    typename V::I high[8];
    source.template Words<8>(block, 16, 0, high);
    const typename V::I one = V::Bytes(1);
    for (int chunk = 0; chunk < 4; ++chunk) {
      typename V::I packed[8], codes[8];
      source.template Words<8>(block, 48, 8 * chunk, packed);
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * chunk + h;
        for (int j = 0; j < 8; ++j) {
          const typename V::I bit = V::And(V::ShiftRight(high[j], s), one);
          codes[j] = V::Or(Nibbles<V>(packed[j], h), V::ShiftLeft(bit, 4));
        }
        sink.Group(8 * block + s, codes, scales.Scale(s), scales.Minimum(s));
      }
    }
  }
};

struct Q6_K {
  static constexpr int kType = 14, kBlock = 256, kBlockBytes = 210, kGroup = 16, kOffset = 32;
  static constexpr bool kAffine = false;
  // block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: element 128h + 32p + l is
  // nibble p / 2 of ql[64h + 32(p % 2) + l] | bit pair p of qh[32h + l] << 4, minus 32,
  // times d * scales[8h + 2p + l / 16].
  template <class Source, class Sink>
  SWARM_INLINE static void Decode(const Source& source, int64_t block, Sink& sink) {
    using V = typename Source::V;
    const typename V::F d = source.Half(block, 208);
    typename V::I scales[4];
    source.template Words<4>(block, 192, 0, scales);
    const typename V::I two_bits = V::Bytes(0x03);
    for (int h = 0; h < 2; ++h) {
      typename V::I low[2][8], high[8];
      source.template Words<8>(block, 0, 16 * h, low[0]);
      source.template Words<8>(block, 0, 16 * h + 8, low[1]);
      source.template Words<8>(block, 128, 8 * h, high);
      for (int p = 0; p < 4; ++p) {
        typename V::I codes[8];
        for (int j = 0; j < 8; ++j) {
          const typename V::I top = V::And(V::ShiftRight(high[j], 2 * p), two_bits);
          codes[j] = V::Or(Nibbles<V>(low[p % 2][j], p / 2), V::ShiftLeft(top, 4));
        }
        for (int half = 0; half < 2; ++half) {
          const int g = 8 * h + 2 * p + half;
          // Sign-extend byte g % 4 of the lane: scales are i8.
          const typename V::I scale = V::ShiftRightSigned(V::ShiftLeft(scales[g / 4], 24 - 8 * (g % 4)), 24);
          sink.Group(16 * block + g, codes + 4 * half, V::Mul(d, V::ToFloat(scale)),
                     V::Zero());
        }
      }
    }
  }
};

}  // namespace swarm_cpu

#endif  // SWARM_KERNELS_CPU_PANEL_H_

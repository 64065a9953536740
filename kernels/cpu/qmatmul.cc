// XLA FFI handler: x f32[m, k] times packed GGUF rows u8[n_j, row_bytes] -> f32[m, n_j],
// for one or more weights j of one type (a layer's q, k and v, or its gate and up, in
// one call: the activations are quantized once and one pool run covers every panel).
// The weight bytes are in the GGUF's rows layout or in the panels layout that the
// model loader stores for this kernel (panel.h; kernels/qtensor.py, PANEL_FIELDS).
//
// The CPU scheme of llama.cpp's ggml-cpu (quantize_row_q8_*, ggml_vec_dot_*_q8_*):
// activation rows are quantized to 8-bit blocks of 32 once per call, and the
// products are integer dot products (AVX-512 VNNI `vpdpbusd`) scaled per block.
// Unlike ggml's row-by-row dot, weights are decoded 16 rows at a time into a
// panel whose lanes are output features (panel.h), and every activation row is
// multiplied against the decoded panel (gemm.h): decoding is paid once per call
// whatever m is, and no horizontal sums are needed.
//
// Two paths: up to 8 activation rows (decode) multiply each decoded group of a panel
// straight from the registers, and so do whole tiles of 8 rows, one tile after another
// (prompt chunks, batches of 16 or 32: up to 512 rows, 32 on AVX2); other counts of more
// rows decode 512 columns of three panels at a time into L1-sized buffers and run the
// rows over them four at a time (gemm.h, TileProduct).  Panels are spread over a
// persistent thread pool (thread_pool.h) in runs of consecutive panels, each
// prefetching the next one's bytes while it decodes.
// With `add`, each product is stored plus an f32[m, n_j] addend (a residual
// connection): the same f32 sum as adding afterwards, without another pass.
//
// Built by kernels/cpu/build.py for the machine it runs on (-march=native).  On a
// CPU without AVX-512 BW/VL/VNNI but with AVX2 the same panels product runs on 256-bit
// registers, half a panel at a time (gemm_avx2.h), with the same bits; elsewhere (ARM
// included) the handler runs the portable kernel (portable.h, plain C++) on the GGUF's
// rows layout.  swarm_qmatmul_simd() says whether the AVX-512 build runs,
// swarm_qmatmul_panels() whether the matmul reads panels.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define SWARM_QMATMUL_SIMD 1
#else
#define SWARM_QMATMUL_SIMD 0
#endif
// AVX2 CPUs (with FMA and F16C: every one since 2013) run the panels product on 256-bit
// registers (gemm_avx2.h).
#if !SWARM_QMATMUL_SIMD && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SWARM_QMATMUL_AVX2 1
#else
#define SWARM_QMATMUL_AVX2 0
#endif

#include "thread_pool.h"

namespace swarm_cpu {
namespace {

// Weights one call multiplies at most (a layer's q, k and v take three).
constexpr int kMaxMatrices = 8;

// One weight of a call and the output it fills.
struct Matrix {
  const uint8_t* weights;  // u8[n, row_bytes]
  int64_t n;
  float* out;        // f32[m, n]
  const float* add;  // f32[m, n] added to the product, or null
};

// Activation rows one pass over a weight panel or row multiplies at most.
constexpr int kRowsPerTile = 8;

// Calls fn(std::integral_constant<int, C>{}) with C = rows, for rows in 1..kRowsPerTile.
template <typename Fn>
void WithRows(int64_t rows, Fn&& fn) {
  static_assert(kRowsPerTile == 8, "one case per tile height");
  switch (rows) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// Calls fn(matrix, first) for every run of `rows` consecutive output rows of the weights
// (a panel, or a portable task's rows), numbered through the weights in order, over the
// pool: a task is a few consecutive runs, two tasks per thread, which still balances the
// load when another process takes a core. Each task is claimed across cores, and what a
// thread computes is read by the others afterwards: four tasks per thread were measured
// 3-10 % slower (two threads, SmolLM2's products at 1, 8 and 128 rows).
constexpr int64_t kTasksPerThread = 2;

template <typename Fn>
void ForEachRun(const Matrix* matrices, int count, int64_t rows, Fn&& fn) {
  // Weight j holds runs [starts[j], starts[j + 1]).
  int64_t starts[kMaxMatrices + 1] = {0};
  for (int j = 0; j < count; ++j) starts[j + 1] = starts[j] + (matrices[j].n + rows - 1) / rows;
  const int64_t total = starts[count];
  const int64_t per_task = std::max<int64_t>(1, total / (kTasksPerThread * Pool().threads()));
  auto task = [&](int index) {
    const int64_t end = std::min(total, (index + 1) * per_task);
    for (int64_t run = index * per_task, j = 0; run < end; ++run) {
      while (run >= starts[j + 1]) ++j;
      fn(matrices[j], (run - starts[j]) * rows);
    }
  };
  Pool().Run(static_cast<int>((total + per_task - 1) / per_task), task);
}

// Rows per panel of the panels layout (panel.h's kPanelRows).
constexpr int64_t kLayoutPanelRows = 16;

}  // namespace
}  // namespace swarm_cpu

#if SWARM_QMATMUL_SIMD || SWARM_QMATMUL_AVX2

#include "gemm.h"
#include "panel.h"
#if SWARM_QMATMUL_AVX2
#include "gemm_avx2.h"
#endif

namespace swarm_cpu {
namespace {

// Quantizing activations is spread over the pool only when there are this many: by
// tiles, or, for one tile (a decode step's rows), by ranges of its blocks from
// kSplitQuantizeElements on.
constexpr int64_t kParallelQuantizeElements = 1 << 16;
constexpr int64_t kSplitQuantizeElements = 1 << 12;

// A grow-only, 64-byte aligned scratch buffer (one per thread, reused across calls).
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  // At least `bytes` bytes, or nullptr if they cannot be allocated.
  uint8_t* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      const size_t size = (bytes + 4095) / 4096 * 4096;
      data_ = static_cast<uint8_t*>(std::aligned_alloc(64, size));
      size_ = data_ != nullptr ? size : 0;
    }
    return data_;
  }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

static_assert(kTileRows == kRowsPerTile, "WithRows covers a tile");

// Whether m activation rows take the register path: one tile of them at most, or whole
// tiles, up to `tiled_max_rows`, one tile after another.  Other counts take the
// buffered path.
inline bool RegisterPath(int64_t m, int64_t tiled_max_rows) {
  return m <= kTileRows || (m % kTileRows == 0 && m <= tiled_max_rows);
}
// The buffered paths decode this many elements of each panel's rows at a time (AVX-512:
// 16 rows x 512 elements take at most 10 KiB decoded, 640 bytes per 32 elements,
// GroupBytes; 30 KiB for three panels, inside L1 beside a tile's activations; 256
// measured no faster).
constexpr int64_t kChunkElements = 512;

// One panel's share of the next panel's bytes, fetched while this one decodes: the
// hardware prefetchers do not follow 16 interleaved row streams far enough ahead, nor a
// panels-layout panel (one sequential stream) once the products slow its reading down.
struct NextPanel {
  const uint8_t* bytes = nullptr;
  int64_t size = 0, per_block = 0;

  NextPanel() = default;  // prefetches nothing

  NextPanel(const uint8_t* weights, int64_t row_bytes, int64_t first, int64_t rows, int64_t blocks) {
    if (first >= rows) return;
    bytes = weights + first * row_bytes;
    size = (rows - first < kPanelRows ? rows - first : kPanelRows) * row_bytes;
    per_block = (size / blocks + 63) / 64 * 64;
  }
  void Prefetch(int64_t block) const {
    const int64_t end = (block + 1) * per_block < size ? (block + 1) * per_block : size;
    for (int64_t at = block * per_block; at < end; at += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(bytes + at), _MM_HINT_T0);
    }
  }
};

// Blocks of format F a buffered path decodes at a time (kChunkElements elements, at
// least one block).
template <class F>
constexpr int64_t ChunkBlocks() {
  return kChunkElements / F::kBlock > 0 ? kChunkElements / F::kBlock : 1;
}

// Activations for the product: x's m rows quantized into tiles (gemm.h) of
// min(m, kTileRows) rows in the thread's scratch buffer.
template <class F>
ffi::Error QuantizeActivations(const float* x, int64_t m, int64_t k, Activations& act) {
  act.rows = m;
  act.cols = k;
  act.tile_rows = m < kTileRows ? m : kTileRows;
  act.tiles = (m + act.tile_rows - 1) / act.tile_rows;
  const int64_t slots = act.tiles * act.tile_rows;
  const size_t code_bytes = slots * k, scale_bytes = slots * (k / 32) * 4, aux_bytes = slots * (k / F::kGroup) * 4;
  static thread_local Scratch act_scratch;
  uint8_t* base = act_scratch.Get(code_bytes + scale_bytes + aux_bytes);
  if (base == nullptr) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "qmatmul: out of memory");
  act.codes = reinterpret_cast<int32_t*>(base);
  act.scale = reinterpret_cast<float*>(base + code_bytes);
  act.aux = reinterpret_cast<int32_t*>(base + code_bytes + scale_bytes);

  // Rows [first, end) of blocks [begin, stop) (stop < 0: to the last).
  auto rows = [&](int64_t first, int64_t end, int64_t begin, int64_t stop) {
    for (int64_t row = first; row < end; ++row) {
#if SWARM_QMATMUL_SIMD
      QuantizeRow(x + row * k, row, act, F::kGroup, F::kOffset, F::kAffine, begin, stop);
#else
      QuantizeRow8(x + row * k, row, act, F::kGroup, F::kOffset, F::kAffine, begin, stop);
#endif
    }
  };
  // A tile's rows share cache lines (their codes interleave per dword), so a task
  // quantizes whole tiles, or in one tile a range of an even number of blocks, whole
  // lines of its codes, scales and sums (8 rows of two blocks' f32 scales fill one):
  // threads writing lanes of one line would trade it back and forth.  One tile alone
  // (a decode step's rows) left the other threads waiting while the caller quantized.
  const int64_t blocks = k / 32;
  const int parts = static_cast<int>(std::min<int64_t>(Pool().threads(), blocks / 2));
  if (act.tiles == 1 && m * k >= kSplitQuantizeElements && parts > 1) {
    auto range = [&](int part) {
      const int64_t begin = blocks * part / parts / 2 * 2;
      rows(0, m, begin, part + 1 == parts ? blocks : blocks * (part + 1) / parts / 2 * 2);
    };
    Pool().Run(parts, range);
    return ffi::Error::Success();
  }
  auto quantize = [&](int tile) {
    const int64_t first = tile * act.tile_rows;
    rows(first, std::min(m, first + act.tile_rows), 0, -1);
  };
  Pool().RunIf(m * k >= kParallelQuantizeElements, static_cast<int>(act.tiles), quantize);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace swarm_cpu

#endif  // SWARM_QMATMUL_SIMD || SWARM_QMATMUL_AVX2

#if SWARM_QMATMUL_SIMD

namespace swarm_cpu {
namespace {

// Up to one tile of activation rows multiplies each decoded group straight from the
// registers, and whole tiles do so one after another (RegisterPath); other counts of
// more rows decode kTilePanels panels into buffers once and reuse them for every tile.
constexpr int64_t kFusedMaxRows = kTileRows;
// Whole tiles of rows, up to this many, take the register path one tile after another,
// each decoding the panel again from L1.  Measured on SmolLM2's layers (Q4_1) on two
// cores, against the buffered path: 16 rows 7.0-8.6 ms against 9.8-10.3, 32 rows 14.5
// against 17.3, 64 rows 27.0 against 29.0, 128 rows 48.4-48.8 against 51.3-51.6, 256
// rows 94.7-95.7 against 97.6 and more, 512 rows 189-192 against 197 and more; on
// Gemma 3's (K-quants, Q5_0, Q8_0) 128 to 512 rows alike.  Other row counts above a
// tile keep the buffered path.
constexpr int64_t kTiledFusedMaxRows = 512;
constexpr int64_t kPanelBufferBytes = kChunkElements / 32 * 640;

template <class F>
ffi::Error Product(const float* x, int64_t m, int64_t k, const Matrix* matrices, int count, bool panels) {
  constexpr int64_t kGroupsPerBlock = F::kBlock / F::kGroup;
  constexpr int64_t kChunkBlocks = ChunkBlocks<F>();
  const int64_t row_bytes = k / F::kBlock * F::kBlockBytes;
  const int64_t blocks = k / F::kBlock;

  Activations act;
  if (ffi::Error error = QuantizeActivations<F>(x, m, k, act); error.failure()) {
    return error;
  }

  if (RegisterPath(m, kTiledFusedMaxRows)) {
    // The panel of rows [first, first + 16) of a weight with n rows, read through
    // `source`: each group multiplies a tile's rows straight from the registers it
    // decodes into; a later tile decodes the panel again, from L1 now (only the first
    // pass asks ahead for the next panel).
    auto product = [&](const auto& source, const NextPanel& next, int64_t first, int64_t n, float* out,
                       const float* add) {
      const int64_t valid = n - first < kPanelRows ? n - first : kPanelRows;
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      WithRows(std::min<int64_t>(m, kTileRows), [&](auto rows_constant) {
        for (int64_t tile = 0; tile < act.tiles; ++tile) {
          RowsProduct<F, decltype(rows_constant)::value> sink(act, tile);
          for (int64_t block = 0; block < blocks; ++block) {
            if (tile == 0) next.Prefetch(block);
            F::Decode(source, block, sink);
          }
          const int64_t at = tile * kTileRows * n + first;
          sink.Store(out + at, n, mask, add == nullptr ? nullptr : add + at);
        }
      });
    };
    // Panels run in order (in the rows layout each prefetches the next).
    ForEachRun(matrices, count, kPanelRows, [&](const Matrix& matrix, int64_t first) {
      if (panels) {
        // One row streams at memory speed on the hardware prefetchers alone; with more, the
        // products take as long as the loads and the prefetchers fall behind, so the next
        // panel is asked for ahead (measured: 9 % faster at 8 rows, 5 % slower at 1).
        const NextPanel next = m > 1 ? NextPanel(matrix.weights, row_bytes, first + kPanelRows, matrix.n, blocks)
                                     : NextPanel();
        product(PanelsSource<F>{matrix.weights + first * row_bytes}, next, first, matrix.n, matrix.out,
                matrix.add);
      } else {
        product(RowsSource<F>{PanelRows(matrix.weights, row_bytes, first, matrix.n)},
                NextPanel(matrix.weights, row_bytes, first + kPanelRows, matrix.n, blocks), first, matrix.n,
                matrix.out, matrix.add);
      }
    });
    return ffi::Error::Success();
  }

  // More rows (prefill, big batches): runs of kTilePanels panels.  k goes in chunks whose
  // decoded panels stay in L1 while every tile's rows run over them, kSubTileRows at a time.
  static_assert(kChunkBlocks * kGroupsPerBlock * GroupBytes<F>() <= kPanelBufferBytes);
  static_assert(kFusedMaxRows >= kTileRows, "here every tile but the last is full: TileProduct's stride");
  alignas(64) static thread_local uint8_t buffers[kTilePanels][kPanelBufferBytes];
  ForEachRun(matrices, count, kPanelRows * kTilePanels, [&](const Matrix& matrix, int64_t first) {
    const int64_t n = matrix.n;
    const uint8_t* decoded[kTilePanels];
    __mmask16 masks[kTilePanels];
    int present = 0;
    for (int p = 0; p < kTilePanels; ++p) {
      const int64_t rows = std::clamp<int64_t>(n - first - p * kPanelRows, 0, kPanelRows);
      masks[p] = static_cast<__mmask16>((1u << rows) - 1);
      present += rows > 0;
      decoded[p] = buffers[rows > 0 ? p : 0];
    }
    for (int64_t chunk = 0; chunk < blocks; chunk += kChunkBlocks) {
      const int64_t end = std::min(blocks, chunk + kChunkBlocks);
      for (int p = 0; p < present; ++p) {
        // Panels in order, each asking ahead for the next one's bytes of this chunk.
        const int64_t at = first + p * kPanelRows;
        const PanelStore<F> sink{buffers[p], chunk * kGroupsPerBlock};
        const NextPanel next(matrix.weights, row_bytes, at + kPanelRows, n, blocks);
        auto decode = [&](const auto& source) {
          for (int64_t block = chunk; block < end; ++block) {
            next.Prefetch(block);
            F::Decode(source, block, sink);
          }
        };
        if (panels) {
          decode(PanelsSource<F>{matrix.weights + at * row_bytes});
        } else {
          decode(RowsSource<F>{PanelRows(matrix.weights, row_bytes, at, n)});
        }
      }
      for (int64_t row = 0; row < m; row += kSubTileRows) {
        const int64_t tile = row / act.tile_rows, lane = row % act.tile_rows;
        const float* add = matrix.add != nullptr && end == blocks ? matrix.add + row * n + first : nullptr;
        WithRows(std::min<int64_t>(kSubTileRows, m - row), [&](auto rows_constant) {
          constexpr int kRows = decltype(rows_constant)::value;
          if constexpr (kRows <= kSubTileRows) {
            TileProduct<F, kRows>(decoded, chunk * kGroupsPerBlock, end * kGroupsPerBlock,
                                  act.TileCodes(tile) + lane, act.TileScale(tile) + lane,
                                  act.TileAux(tile, F::kGroup) + lane, matrix.out + row * n + first, n, masks, add);
          }
        });
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace swarm_cpu

namespace formats = swarm_cpu;

#elif SWARM_QMATMUL_AVX2

namespace swarm_cpu {
namespace {

// Up to a tile of activation rows (8) multiply each decoded group of a half panel
// straight from the registers (measured against the buffered path at 8 rows: SmolLM2's
// head 1.95 ms against 2.4-2.5, its layers' products 2-10 % faster), and whole tiles do
// so one after another (RegisterPath); other counts of more rows decode a panel's two
// halves into buffers (kChunkElements of them at a time) and run over them
// kHalfTileRows at a time.
constexpr int64_t kRegisterRows = kTileRows;
// Whole tiles of rows, up to this many, take the register path one tile after another.
// Measured with the AVX2 build on two cores, against the buffered path: SmolLM2's
// layers (Q4_1) 16 rows 13.3 ms against 16.4-20.3, 32 rows 26-31 against 30-37; Gemma
// 3's (K-quants, Q5_0, Q8_0) 16 rows 14.2-14.4 against 14.7-16.7, 32 rows alike, but 64
// rows 51.5-59.5 against 47.4-56.6 and 128 rows 100 against 87-90 (decoding a K-quant
// half panel again per tile costs more than the buffers save), where SmolLM2's still
// gained (64 rows 51-61 against 56-70).
constexpr int64_t kTiledRegisterMaxRows = 32;
constexpr int kHalfTileRows = 4;
constexpr int64_t kHalfBufferBytes = kChunkElements / 32 * 320;

template <class F>
ffi::Error Product(const float* x, int64_t m, int64_t k, const Matrix* matrices, int count, bool panels) {
  constexpr int64_t kGroupsPerBlock = F::kBlock / F::kGroup;
  constexpr int64_t kChunkBlocks = ChunkBlocks<F>();
  const int64_t row_bytes = k / F::kBlock * F::kBlockBytes;
  const int64_t blocks = k / F::kBlock;

  Activations act;
  // The buffered path reads whole tiles of kTileRows rows (a compile-time stride).
  static_assert(kRegisterRows >= kTileRows);
  if (ffi::Error error = QuantizeActivations<F>(x, m, k, act); error.failure()) {
    return error;
  }
  // Rows [start, start + 8) of a weight with n rows (a half panel; start < n), read
  // through the panels or the rows layout.
  auto with_half = [&](const Matrix& matrix, int64_t first, int half, auto&& fn) {
    if (panels) {
      fn(HalfPanelsSource<F>{matrix.weights + first * row_bytes, half});
    } else {
      fn(HalfRowsSource<F>(matrix.weights, row_bytes, first + 8 * half, matrix.n));
    }
  };

  if (RegisterPath(m, kTiledRegisterMaxRows)) {
    ForEachRun(matrices, count, kPanelRows, [&](const Matrix& matrix, int64_t first) {
      // The next panel is asked for ahead even for one row, unlike on AVX-512: the
      // hardware prefetchers alone left a SmolLM2 decode step's products (weights from
      // DRAM) at 6.6-7.0 ms, against 3.0-3.6 ms with it.  It is asked for over both halves'
      // passes: over the first alone, the memory bus idled while the second computed from
      // the cache (Gemma 3's decode step 11.9-14.0 ms, against 10.8-11.5 over both).
      const int halves = matrix.n - first > 8 ? 2 : 1;
      const NextPanel next(matrix.weights, row_bytes, first + kPanelRows, matrix.n, halves * blocks);
      for (int half = 0; half < halves; ++half) {
        const int64_t start = first + 8 * half;
        const __m256i mask = LaneMask(static_cast<int>(std::min<int64_t>(8, matrix.n - start)));
        with_half(matrix, first, half, [&](const auto& source) {
          WithRows(std::min<int64_t>(m, kTileRows), [&](auto rows_constant) {
            constexpr int kRows = decltype(rows_constant)::value;
            if constexpr (kRows <= kRegisterRows) {
              for (int64_t tile = 0; tile < act.tiles; ++tile) {
                RowsProduct8<F, kRows> sink(act, tile);
                for (int64_t block = 0; block < blocks; ++block) {
                  if (tile == 0) next.Prefetch(half * blocks + block);
                  F::Decode(source, block, sink);
                }
                const int64_t at = tile * kTileRows * matrix.n + start;
                sink.Store(matrix.out + at, matrix.n, mask, matrix.add == nullptr ? nullptr : matrix.add + at);
              }
            }
          });
        });
      }
    });
    return ffi::Error::Success();
  }

  static_assert(kChunkBlocks * kGroupsPerBlock * HalfGroupBytes<F>() <= kHalfBufferBytes);
  alignas(64) static thread_local uint8_t buffers[2][kHalfBufferBytes];
  ForEachRun(matrices, count, kPanelRows, [&](const Matrix& matrix, int64_t first) {
    const int64_t n = matrix.n;
    const int halves = n - first > 8 ? 2 : 1;
    const NextPanel next(matrix.weights, row_bytes, first + kPanelRows, n, blocks);
    __m256i masks[2];
    for (int half = 0; half < halves; ++half) {
      masks[half] = LaneMask(static_cast<int>(std::min<int64_t>(8, n - first - 8 * half)));
    }
    for (int64_t chunk = 0; chunk < blocks; chunk += kChunkBlocks) {
      const int64_t end = std::min(blocks, chunk + kChunkBlocks);
      for (int half = 0; half < halves; ++half) {
        const HalfPanelStore<F> sink{buffers[half], chunk * kGroupsPerBlock};
        with_half(matrix, first, half, [&](const auto& source) {
          for (int64_t block = chunk; block < end; ++block) {
            if (half == 0) next.Prefetch(block);
            F::Decode(source, block, sink);
          }
        });
      }
      for (int64_t row = 0; row < m; row += kHalfTileRows) {
        const int64_t tile = row / kTileRows, lane = row % kTileRows;
        WithRows(std::min<int64_t>(kHalfTileRows, m - row), [&](auto rows_constant) {
          constexpr int kRows = decltype(rows_constant)::value;
          if constexpr (kRows <= kHalfTileRows) {
            for (int half = 0; half < halves; ++half) {
              const int64_t at = row * n + first + 8 * half;
              const float* add = matrix.add != nullptr && end == blocks ? matrix.add + at : nullptr;
              HalfTileProduct<F, kRows>(buffers[half], chunk * kGroupsPerBlock, end * kGroupsPerBlock,
                                        act.TileCodes(tile) + lane, act.TileScale(tile) + lane,
                                        act.TileAux(tile, F::kGroup) + lane, matrix.out + at, n, masks[half], add);
            }
          }
        });
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace swarm_cpu

namespace formats = swarm_cpu;

#else  // no AVX-512 VNNI: the portable kernel (portable.h)

#include "portable.h"

namespace swarm_cpu {
namespace {

// Weight rows a task decodes and multiplies, one after another.
constexpr int64_t kRowsPerRun = 16;
// Quantizing activations is spread over the pool only when there are this many.
constexpr int64_t kParallelQuantizeElements = 1 << 16;

template <class F>
ffi::Error Product(const float* x, int64_t m, int64_t k, const Matrix* matrices, int count, bool panels) {
  if (panels) {
    return ffi::Error::InvalidArgument(
        "qmatmul: the panels layout needs the AVX-512 or AVX2 kernel; pass the GGUF's rows");
  }
  static thread_local std::vector<int8_t> codes;
  static thread_local std::vector<float> scales, weighted;
  codes.resize(m * k);
  scales.resize(m * (k / 32));
  if (F::kAffine) weighted.resize(m * (k / 32));
  const portable::Activations act{k, codes.data(), scales.data(), F::kAffine ? weighted.data() : nullptr};
  auto quantize = [&](int row) {
    portable::QuantizeRow(x + row * k, k, act.codes + row * k, act.scale + row * (k / 32),
                          F::kAffine ? act.weighted + row * (k / 32) : nullptr);
  };
  Pool().RunIf(m * k >= kParallelQuantizeElements, static_cast<int>(m), quantize);

  const int64_t row_bytes = k / F::kBlock * F::kBlockBytes;
  ForEachRun(matrices, count, kRowsPerRun, [&](const Matrix& matrix, int64_t first) {
    const int64_t n = matrix.n, end = std::min(n, first + kRowsPerRun);
    static thread_local portable::DecodedRow decoded;
    for (int64_t r = first; r < end; ++r) {
      portable::DecodeRow<F>(matrix.weights + r * row_bytes, k, decoded);
      for (int64_t c = 0; c < m; ++c) {
        const float sum = portable::RowDot<F>(decoded, act, c);
        matrix.out[c * n + r] = matrix.add == nullptr ? sum : sum + matrix.add[c * n + r];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace swarm_cpu

namespace formats = swarm_cpu::portable;

#endif  // SWARM_QMATMUL_SIMD, SWARM_QMATMUL_AVX2

namespace swarm_cpu {
namespace {

template <class F>
ffi::Error Checked(const float* x, int64_t m, int64_t k, const Matrix* matrices, const int64_t* row_bytes, int count,
                   bool panels) {
  for (int j = 0; j < count; ++j) {
    if (k % F::kBlock != 0 || row_bytes[j] != k / F::kBlock * F::kBlockBytes) {
      return ffi::Error::InvalidArgument("qmatmul: x has " + std::to_string(k) + " columns but weight rows hold " +
                                         std::to_string(row_bytes[j]) + " bytes of GGML type " +
                                         std::to_string(F::kType));
    }
    if (panels && matrices[j].n % kLayoutPanelRows != 0) {
      return ffi::Error::InvalidArgument("qmatmul: the panels layout needs a multiple of 16 rows; got " +
                                         std::to_string(matrices[j].n));
    }
  }
  if (m == 0) return ffi::Error::Success();
  return Product<F>(x, m, k, matrices, count, panels);
}

// The product of `count` weights of GGML type `qtype` with x f32[m, k], checked.
ffi::Error QMatmulOfType(int32_t qtype, const float* x, int64_t m, int64_t k, const Matrix* matrices,
                         const int64_t* row_bytes, int count, bool panels) {
  using namespace formats;
  switch (qtype) {
    case Q4_0::kType: return Checked<Q4_0>(x, m, k, matrices, row_bytes, count, panels);
    case Q4_1::kType: return Checked<Q4_1>(x, m, k, matrices, row_bytes, count, panels);
    case Q5_0::kType: return Checked<Q5_0>(x, m, k, matrices, row_bytes, count, panels);
    case Q5_1::kType: return Checked<Q5_1>(x, m, k, matrices, row_bytes, count, panels);
    case Q8_0::kType: return Checked<Q8_0>(x, m, k, matrices, row_bytes, count, panels);
    case Q4_K::kType: return Checked<Q4_K>(x, m, k, matrices, row_bytes, count, panels);
    case Q5_K::kType: return Checked<Q5_K>(x, m, k, matrices, row_bytes, count, panels);
    case Q6_K::kType: return Checked<Q6_K>(x, m, k, matrices, row_bytes, count, panels);
    default: return ffi::Error::InvalidArgument("qmatmul: unsupported GGML type " + std::to_string(qtype));
  }
}

}  // namespace
}  // namespace swarm_cpu

static ffi::Error QMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets outs,
                              int32_t qtype, int32_t layout, int32_t add) {
  using namespace swarm_cpu;
  if (layout != 0 && layout != 1) {
    return ffi::Error::InvalidArgument("qmatmul: layout must be 0 (rows) or 1 (panels); got " +
                                       std::to_string(layout));
  }
  const bool panels = layout == 1;
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("qmatmul: x must be f32[m, k]");
  const int64_t m = x_dims[0], k = x_dims[1];
  if (add != 0 && add != 1) return ffi::Error::InvalidArgument("qmatmul: add must be 0 or 1");
  // The weights, then (with add) as many f32[m, n_j] to add to the products.
  const int count = static_cast<int>(outs.size());
  if (count < 1 || count > kMaxMatrices || static_cast<int>(args.size()) != count * (1 + add)) {
    return ffi::Error::InvalidArgument("qmatmul: 1 to 8 weights, each with its output (and its addend)");
  }
  Matrix matrices[kMaxMatrices];
  int64_t row_bytes[kMaxMatrices];
  for (int j = 0; j < count; ++j) {
    auto w = args.get<ffi::Buffer<ffi::U8>>(j);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("qmatmul: weights u8, outputs f32");
    const auto w_dims = w->dimensions(), out_dims = (*out)->dimensions();
    if (w_dims.size() != 2 || out_dims.size() != 2) {
      return ffi::Error::InvalidArgument("qmatmul: x, weights and outputs must be 2-D");
    }
    if (out_dims[0] != m || out_dims[1] != w_dims[0]) {
      return ffi::Error::InvalidArgument("qmatmul: each output must be f32[m, n] of its weight");
    }
    const float* addend = nullptr;
    if (add) {
      auto extra = args.get<ffi::Buffer<ffi::F32>>(count + j);
      if (!extra.has_value() || extra->dimensions().size() != 2 || extra->dimensions()[0] != m ||
          extra->dimensions()[1] != w_dims[0]) {
        return ffi::Error::InvalidArgument("qmatmul: each addend must be f32[m, n] of its weight");
      }
      addend = extra->typed_data();
    }
    matrices[j] = Matrix{w->typed_data(), w_dims[0], (*out)->typed_data(), addend};
    row_bytes[j] = w_dims[1];
  }
  return QMatmulOfType(qtype, x.typed_data(), m, k, matrices, row_bytes, count, panels);
}

extern "C" int swarm_qmatmul_threads() { return swarm_cpu::Pool().threads(); }

// 1: the AVX-512 VNNI kernel (and the attention, norm and SwiGLU kernels beside it);
// 0: the portable kernel, on which only the matmul runs.
extern "C" int swarm_qmatmul_simd() { return SWARM_QMATMUL_SIMD; }

// 1: the matmul reads the panels layout (the AVX-512 VNNI or the AVX2 kernel); 0: the
// portable kernel, which reads the GGUF's rows.
extern "C" int swarm_qmatmul_panels() { return SWARM_QMATMUL_SIMD || SWARM_QMATMUL_AVX2; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwarmQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x f32[m, k]
                                  .RemainingArgs()  // weights u8[n_j, row_bytes], one type; with add, then f32[m, n_j]
                                  .RemainingRets()  // outputs f32[m, n_j]: x . w_j (+ addend j)
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("layout")  // 0: GGUF rows, 1: panels
                                  .Attr<int32_t>("add"));   // 1: an f32[m, n_j] addend follows the weights

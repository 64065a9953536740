// XLA FFI handler: each row's greedy token, computed where the logits are made.
//
//   logits f32[..., v]   rows of v scores
//   out    i32[...]      per row, numpy's argmax: the first index of the largest value,
//                        or the first NaN's if the row holds one
//
// A decode step's vocabulary head writes its logits on both cores; this reads them back
// at once, while they are still in the cores' caches, where the host's argmax read
// them from memory later on one core (8 rows of Gemma 3's 262K logits: 8 MB).  A row
// is split over the pool when there are fewer rows than threads; the parts are merged
// in index order, so the result is the one pass's.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)

#include <immintrin.h>

#include "thread_pool.h"

namespace swarm_cpu {
namespace {

// Rows are spread over the pool only when there are this many values.
constexpr int64_t kParallelValues = 1 << 14;

// What part of a row holds: its largest value and that value's first index, or its
// first NaN's index (nan) if it holds one.
struct Best {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
  bool nan = false;
};

Best RangeBest(const float* x, int64_t begin, int64_t end) {
  Best best;
  if (begin >= end) return best;
  // Pass 1: the largest value, and whether any lane is NaN.
  __m512 high = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 unordered = 0;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    high = _mm512_max_ps(high, v);
  }
  if (i < end) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (end - i)) - 1u);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), mask, x + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    high = _mm512_max_ps(high, v);
  }
  // Pass 2: the first index holding it (or the first NaN).
  best.nan = unordered != 0;
  best.value = best.nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(high);
  const __m512 target = _mm512_set1_ps(best.value);
  for (i = begin; i < end; i += 16) {
    const __mmask16 valid = end - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (end - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(valid, x + i);
    const __mmask16 hit =
        (best.nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ)) & valid;
    if (hit != 0) {
      best.index = i + __builtin_ctz(hit);
      return best;
    }
  }
  return best;  // not reached: the largest value (or the NaN) is in the range
}

// A later part replaces `into` only with a NaN (when `into` has none) or a strictly
// larger value: the first index wins, as in one pass.
void Merge(Best& into, const Best& part) {
  if (part.index < 0 || into.nan) return;
  if (into.index < 0 || part.nan || part.value > into.value) into = part;
}

}  // namespace
}  // namespace swarm_cpu

static ffi::Error ArgmaxImpl(ffi::Buffer<ffi::F32> logits, ffi::ResultBuffer<ffi::S32> out) {
  using namespace swarm_cpu;
  const auto dims = logits.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("argmax: need logits f32[..., v]");
  const int64_t v = dims.back();
  if (v < 1 || v > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("argmax: need 1 to 2^31 - 1 values per row");
  }
  const int64_t rows = static_cast<int64_t>(logits.element_count()) / v;
  if (static_cast<int64_t>(out->element_count()) != rows) {
    return ffi::Error::InvalidArgument("argmax: the output needs one entry per row");
  }
  if (rows == 0) return ffi::Error::Success();
  const float* x = logits.typed_data();
  int32_t* result = out->typed_data();
  // Fewer rows than threads: each row in one part per thread (of 4096 values at least).
  const int64_t threads = Pool().threads();
  const int64_t split = rows >= threads ? 1 : std::min<int64_t>(threads, (v + 4095) / 4096);
  std::vector<Best> bests(static_cast<size_t>(rows * split));
  auto task = [&](int index) {
    const int64_t row = index / split, part = index % split;
    const int64_t begin = v * part / split, end = v * (part + 1) / split;
    bests[index] = RangeBest(x + row * v, begin, end);
  };
  Pool().RunIf(rows * v >= kParallelValues, static_cast<int>(rows * split), task);
  for (int64_t row = 0; row < rows; ++row) {
    Best best;
    for (int64_t part = 0; part < split; ++part) Merge(best, bests[row * split + part]);
    result[row] = static_cast<int32_t>(best.index);
  }
  return ffi::Error::Success();
}

#else  // no AVX-512: a handler that only reports why

static ffi::Error ArgmaxImpl(ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::S32>) {
  return ffi::Error::Internal("argmax was built for a CPU without AVX-512");
}

#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwarmArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits f32[..., v]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // out i32[...]

// XLA FFI handler: attention read straight from a many-layer, many-session KV cache,
// for decode steps (T = 1) and prompt chunks alike.
//
//   q        f32[B, T, Hq, D]            T queries per sequence
//   keys     f16|f32[L, R, C, Hkv, D]    the whole cache (every layer and row)
//   values   f16|f32[L, R, C, Hkv, Dv]
//   layer, first_row, window  i32[]      sequence b is cache row first_row + b
//   positions i32[B, T], kv_length i32[B]
//   out      f32[B, T, Hq, Dv]
//
// Query (b, t) at position p sees key j iff j < kv_length[b], j <= p, p - j < window and
// j < bound (the rule of kernels/attention.py, whose jnp reference this equals up to
// float rounding).  A query that sees no key, or whose position is past the cache (a
// padding row of a batch window, whose write was dropped), gets zeros.
//
// Unlike the XLA reference, which slices a power-of-two window of the cache, converts
// it to f32 and scores every slot under a mask, this reads only the visible keys and
// values, converting f16 as it loads them.  Work is split over (query, kv head) pairs
// (or whole queries) on the persistent pool of thread_pool.h: each pair scores its group
// of query heads against every visible key (one pass over the keys), takes the softmax with a
// vectorized exp, and accumulates the values (one pass per 64 output features).
//
// Built with qmatmul.cc by kernels/cpu/build.py.  Without AVX-512 the same handler
// runs a portable version (plain C++ the compiler vectorizes: AVX2, ARM, ...) of the
// same passes, with libm's exp; either way each query's result depends on its own
// keys only, whatever else shares the call.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#include "half.h"
#include "thread_pool.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace swarm_cpu {
namespace {

struct Problem {
  const float* q;
  const void* keys;
  const void* values;
  const int32_t* positions;
  const int32_t* kv_length;
  float* out;
  int64_t batch, steps, q_heads, kv_heads, head_dim, value_dim, rows, capacity;
  int64_t layers, layer, first_row, window, bound;
  float scale, softcap;
};

// Where query `query` (step query % T of sequence query / T) reads for kv head h: its
// visible keys' and values' first slot and how many there are (0: none, or a padding
// row), its group of query heads and their output.
template <typename T>
struct Span {
  int64_t count = 0;
  const T* key = nullptr;
  const T* value = nullptr;
  const float* q = nullptr;
  float* out = nullptr;
};

template <typename T>
Span<T> Locate(const Problem& p, int64_t query, int64_t h) {
  const int64_t group = p.q_heads / p.kv_heads, b = query / p.steps;
  Span<T> span;
  span.out = p.out + (query * p.q_heads + h * group) * p.value_dim;
  const int64_t row = p.first_row + b;
  const int64_t position = p.positions[query];
  const int64_t end = std::min({static_cast<int64_t>(p.kv_length[b]), position + 1, p.bound, p.capacity});
  const int64_t begin = std::max<int64_t>(0, position - p.window + 1);
  if (row < 0 || row >= p.rows || position >= p.capacity || begin >= end) return span;
  span.count = end - begin;
  const int64_t slot = (p.layer * p.rows + row) * p.capacity + begin;
  span.key = static_cast<const T*>(p.keys) + (slot * p.kv_heads + h) * p.head_dim;
  span.value = static_cast<const T*>(p.values) + (slot * p.kv_heads + h) * p.value_dim;
  span.q = p.q + (query * p.q_heads + h * group) * p.head_dim;
  return span;
}

// exp(x) for x <= 0 (scores minus their maximum), as the AVX-512 and AVX2 passes take it:
// Cephes' expf polynomial on r = x - n ln2 (ln2 in two parts), scaled by 2^n; relative
// error about 1e-7. x is clamped at kExpFloor first.
constexpr float kExpFloor = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
// p(r), highest power first: exp(r) = 1 + r + r^2 p(r).
constexpr int kExpTerms = 6;
constexpr float kExpPolynomial[kExpTerms] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

}  // namespace
}  // namespace swarm_cpu

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)

#include <immintrin.h>

#include <cmath>

namespace swarm_cpu {
namespace {

// Query heads scored together against each loaded key (their accumulators stay in
// registers), and output features accumulated together per pass over the values.
constexpr int kHeadBlock = 4;
constexpr int kFeatureVectors = 4;
// Keys and values are read at a stride of Hkv heads per position: the hardware
// prefetchers follow such a stream only so far ahead, so loads ask for the key or
// value this many positions on.
constexpr int64_t kPrefetchAhead = 8;
constexpr int64_t kFourKeyMaxDim = 128;

template <typename T>
inline void PrefetchRow(const T* at, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(at);
  for (int64_t offset = 0; offset < elements * static_cast<int64_t>(sizeof(T)); offset += 64) {
    _mm_prefetch(bytes + offset, _MM_HINT_T0);
  }
}

// The records a thread reads after this query's (the next query's, or the next layer's
// first), asked for into L2 a few lines at every position the passes take, so that
// they arrive while this query computes.  Without it the reads and the arithmetic
// hardly overlapped: 8 decode rows of SmolLM2 took about as long as reading their
// cache plus computing on it from L2.  Measured with it: that attention 15-26 % faster,
// the whole 8-row step 0-7 % (in-process A/B on a shared machine).  Two streams, the
// keys and the values, taken in turn.
struct Feed {
  const char* at[2] = {nullptr, nullptr};
  int64_t left[2] = {0, 0};
  int lines = 0;  // per Step
  int turn = 0;

  void Step() {
    for (int k = 0; k < lines; ++k, turn ^= 1) {
      if (left[turn] <= 0) continue;
      _mm_prefetch(at[turn], _MM_HINT_T1);
      at[turn] += 64;
      left[turn] -= 64;
    }
  }
};

// Feed::Step at `feed`, where there is one.
inline void FeedStep(Feed* feed) {
  if (feed != nullptr) feed->Step();
}

// exp(x) for x <= 0 on 16 lanes (kExpPolynomial), 2^n applied by vscalefps.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpPolynomial[0]);
  for (int i = 1; i < kExpTerms; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPolynomial[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// 16 lanes (fewer under `mask`, the rest zero) of f16 or f32 values, as f32.
inline __m512 Load(const uint16_t* at, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at));
}
inline __m512 Load(const float* at, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, at); }

inline __mmask16 LaneMask(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1u);
}


// The sums of four vectors' lanes, in lanes 0, 4, 8 and 12 (the others hold copies):
// 13 instructions where four separate reductions take about 32.
inline __m512 Sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // [a.lo256 + a.hi256 | b.lo256 + b.hi256], and the same for c, d.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // One 128-bit lane per vector: a in lane 0, b in 1, c in 2, d in 3.
  __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  sums = _mm512_add_ps(sums, _mm512_permute_ps(sums, 0x4E));
  return _mm512_add_ps(sums, _mm512_permute_ps(sums, 0xB1));
}

// q_g . key for `kHeads` query heads (16 lanes each, to be summed).  Here and below,
// kDim > 0 is the head width known at compile time (64, 128, 256: the loops unroll
// and loads go unmasked); 0 reads it from the problem.
template <typename T, int kHeads>
inline void Dot(const float* q, const T* key, int64_t dim, __m512* acc) {
  for (int g = 0; g < kHeads; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 mask = LaneMask(dim - d);
    const __m512 k = Load(key + d, mask);
    for (int g = 0; g < kHeads; ++g) {
      acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + g * dim + d), k, acc[g]);
    }
  }
}

// scores[g * score_stride + i] = scale * q_g . key(first + i) for `kHeads` query heads.
// Narrow heads (64, 128) score four keys at a time and reduce them together, as the
// reductions would cost as much as the products; wide ones (Gemma's 256) do not gain
// from it (measured: 25 % slower) and go one key at a time.
// What a pass over a sequence's positions asks for ahead of its reads: `key_elements`
// of the key record at each position (its own head's, or every head's), and as much
// of the value record when `values` is set.
template <typename T>
struct Ahead {
  int64_t key_elements;
  const T* values = nullptr;
  int64_t value_stride = 0, value_elements = 0;

  void Fetch(const T* key, int64_t key_stride, int64_t i) const {
    PrefetchRow(key + kPrefetchAhead * key_stride, key_elements);
    if (values != nullptr) PrefetchRow(values + (i + kPrefetchAhead) * value_stride, value_elements);
  }
};

template <typename T, int kHeads, int kDim>
void Score(const Problem& p, const float* q, const T* key, int64_t stride, int64_t count, float* scores,
           int64_t score_stride, const Ahead<T>& ahead, Feed* feed = nullptr) {
  const int64_t dim = kDim > 0 ? kDim : p.head_dim;
  const __m512i spread = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  const __m128 scale = _mm_set1_ps(p.scale);
  int64_t i = 0;
  for (; dim <= kFourKeyMaxDim && i + 4 <= count; i += 4, key += 4 * stride) {
    if (i + kPrefetchAhead + 4 <= count) {
      for (int j = 0; j < 4; ++j) ahead.Fetch(key + j * stride, stride, i + j);
    }
    __m512 acc[4][kHeads];
    FeedStep(feed);
    for (int j = 0; j < 4; ++j) Dot<T, kHeads>(q, key + j * stride, dim, acc[j]);
    for (int g = 0; g < kHeads; ++g) {
      const __m512 sums = Sum4(acc[0][g], acc[1][g], acc[2][g], acc[3][g]);
      const __m128 four = _mm512_castps512_ps128(_mm512_permutexvar_ps(spread, sums));
      _mm_storeu_ps(scores + g * score_stride + i, _mm_mul_ps(four, scale));
    }
  }
  for (; i < count; ++i, key += stride) {
    if (i + kPrefetchAhead < count) ahead.Fetch(key, stride, i);
    FeedStep(feed);
    __m512 acc[kHeads];
    Dot<T, kHeads>(q, key, dim, acc);
    for (int g = 0; g < kHeads; ++g) scores[g * score_stride + i] = _mm512_reduce_add_ps(acc[g]) * p.scale;
  }
}

// out[g] += sum_i weights[g * count + i] * value(first + i), features [d, d + 64).
template <typename T, int kHeads, int kDim>
void Accumulate(const Problem& p, const float* weights, int64_t weight_stride, const T* value, int64_t stride,
                int64_t count, float* out, Feed* feed = nullptr) {
  const int64_t dim = kDim > 0 ? kDim : p.value_dim;
  for (int64_t d = 0; d < dim; d += 16 * kFeatureVectors) {
    __m512 acc[kHeads][kFeatureVectors];
    for (int g = 0; g < kHeads; ++g) {
      for (int v = 0; v < kFeatureVectors; ++v) acc[g][v] = _mm512_setzero_ps();
    }
    const T* row = value + d;
    for (int64_t i = 0; i < count; ++i, row += stride) {
      if (i + kPrefetchAhead < count) PrefetchRow(row + kPrefetchAhead * stride, std::min<int64_t>(dim - d, 16 * kFeatureVectors));
      __m512 lanes[kFeatureVectors];
      FeedStep(feed);
      for (int v = 0; v < kFeatureVectors; ++v) {
        const int64_t at = d + 16 * v;
        lanes[v] = at < dim ? Load(row + 16 * v, LaneMask(dim - at)) : _mm512_setzero_ps();
      }
      for (int g = 0; g < kHeads; ++g) {
        const __m512 w = _mm512_set1_ps(weights[g * weight_stride + i]);
        for (int v = 0; v < kFeatureVectors; ++v) acc[g][v] = _mm512_fmadd_ps(w, lanes[v], acc[g][v]);
      }
    }
    for (int g = 0; g < kHeads; ++g) {
      for (int v = 0; v < kFeatureVectors; ++v) {
        const int64_t at = d + 16 * v;
        if (at < dim) _mm512_mask_storeu_ps(out + g * dim + at, LaneMask(dim - at), acc[g][v]);
      }
    }
  }
}

// Softmax of scores[0, count) in place (after the soft cap, if any); returns 1 / sum.
float Softmax(float* scores, int64_t count, float softcap) {
  if (softcap > 0.0f) {
    for (int64_t i = 0; i < count; ++i) scores[i] = softcap * std::tanh(scores[i] / softcap);
  }
  __m512 high = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < count; i += 16) {
    high = _mm512_max_ps(high, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), LaneMask(count - i), scores + i));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(high));
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = LaneMask(count - i);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + i), top));
    _mm512_mask_storeu_ps(scores + i, mask, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
  }
  return 1.0f / _mm512_reduce_add_ps(total);
}

template <typename T, int kHeads, int kDim>
void HeadBlock(const Problem& p, const float* q, const T* key, const T* value, int64_t count, float* scores,
               float* out, const Ahead<T>& ahead, Feed* feed) {
  const int64_t key_stride = p.kv_heads * p.head_dim;
  Score<T, kHeads, kDim>(p, q, key, key_stride, count, scores, count, ahead, feed);
  for (int g = 0; g < kHeads; ++g) {
    const float inverse = Softmax(scores + g * count, count, p.softcap);
    float* weights = scores + g * count;
    for (int64_t i = 0; i < count; ++i) weights[i] *= inverse;
  }
  Accumulate<T, kHeads, kDim>(p, scores, count, value, p.kv_heads * p.value_dim, count, out, feed);
}

// Query heads of kv head h of query `query` (step query % T of sequence query / T).
// `whole`: this task goes on to the query's other kv heads, so the first pass over its
// keys asks for the whole key and value record of every position (all kv heads side by
// side): the sequence then streams from memory once, in order, and the other heads'
// passes find it in cache.
// `feed`: the next records to ask for meanwhile (RunDecode), or none.
template <typename T, int kDim>
void PairOf(const Problem& p, int64_t query, int64_t h, bool whole, Feed* feed) {
  const int64_t group = p.q_heads / p.kv_heads;
  const Span<T> span = Locate<T>(p, query, h);
  float* out = span.out;
  if (span.count == 0) {
    std::memset(out, 0, sizeof(float) * group * p.value_dim);
    return;
  }
  const int64_t count = span.count;
  const T *key = span.key, *value = span.value;
  const float* q = span.q;
  thread_local std::vector<float> scores;
  if (scores.size() < static_cast<size_t>(kHeadBlock * count)) scores.resize(kHeadBlock * count);
  for (int64_t g = 0; g < group; g += kHeadBlock) {
    const float* qg = q + g * p.head_dim;
    float* og = out + g * p.value_dim;
    Ahead<T> ahead{p.head_dim};
    if (whole && h == 0 && g == 0) {
      ahead = Ahead<T>{p.kv_heads * p.head_dim, value, p.kv_heads * p.value_dim, p.kv_heads * p.value_dim};
    }
    switch (std::min<int64_t>(kHeadBlock, group - g)) {
      case 1: HeadBlock<T, 1, kDim>(p, qg, key, value, count, scores.data(), og, ahead, feed); break;
      case 2: HeadBlock<T, 2, kDim>(p, qg, key, value, count, scores.data(), og, ahead, feed); break;
      case 3: HeadBlock<T, 3, kDim>(p, qg, key, value, count, scores.data(), og, ahead, feed); break;
      default: HeadBlock<T, 4, kDim>(p, qg, key, value, count, scores.data(), og, ahead, feed); break;
    }
  }
}

template <typename T>
void Pair(const Problem& p, int64_t query, int64_t h, bool whole = false, Feed* feed = nullptr) {
  if (p.head_dim == p.value_dim) {
    switch (p.head_dim) {
      case 64: return PairOf<T, 64>(p, query, h, whole, feed);
      case 128: return PairOf<T, 128>(p, query, h, whole, feed);
      case 256: return PairOf<T, 256>(p, query, h, whole, feed);
      default: break;
    }
  }
  PairOf<T, 0>(p, query, h, whole, feed);
}

// A decode step's queries (one per sequence, every kv head each), split between the
// threads into runs of consecutive queries with about equal numbers of visible keys.
// A run's first query is asked for whole as its first pass goes (it comes cold from
// memory); while each query computes, the next one's records are fed into L2, and the
// last one feeds the first of the same run in the next layer, which the next call's
// thread reads from L2 or L3 (the layer's matmuls in between stream their weights
// through L2, not all of L3).
template <typename T>
void RunDecode(const Problem& p) {
  const int64_t queries = p.batch;
  const int threads = Pool().threads();
  std::vector<int64_t> counts(queries), starts(threads + 1, queries);
  int64_t total = 0;
  for (int64_t query = 0; query < queries; ++query) total += counts[query] = Locate<T>(p, query, 0).count;
  starts[0] = 0;
  for (int64_t query = 0, seen = 0, run = 1; query < queries && run < threads; ++query) {
    seen += counts[query];
    while (run < threads && seen * threads >= total * run) starts[run++] = query + 1;
  }
  // The lines of a query's records, and the feed steps its passes take per position, in
  // quarters (each block of query heads scores four keys a step where heads are narrow,
  // else one, and accumulates one position a step per 64 value features): the lines
  // per step that feed the next query's records over the passes.
  const int64_t record_bytes = p.kv_heads * (p.head_dim + p.value_dim) * static_cast<int64_t>(sizeof(T));
  const int64_t group_blocks = (p.q_heads / p.kv_heads + kHeadBlock - 1) / kHeadBlock;
  const int64_t score_quarters = p.head_dim <= kFourKeyMaxDim ? 1 : 4;
  const int64_t quarters = p.kv_heads * group_blocks * (score_quarters + 4 * ((p.value_dim + 63) / 64));
  auto task = [&](int run) {
    const int64_t first = starts[run], last = starts[run + 1];
    Feed feed;
    for (int64_t query = first; query < last; ++query) {
      Problem later = p;
      int64_t next = query + 1;
      if (next == last) {
        later.layer += 1;
        next = first;
      }
      const Span<T> span = later.layer < p.layers ? Locate<T>(later, next, 0) : Span<T>{};
      feed.at[0] = reinterpret_cast<const char*>(span.key);
      feed.at[1] = reinterpret_cast<const char*>(span.value);
      feed.left[0] = span.count * p.kv_heads * p.head_dim * static_cast<int64_t>(sizeof(T));
      feed.left[1] = span.count * p.kv_heads * p.value_dim * static_cast<int64_t>(sizeof(T));
      const int64_t steps = std::max<int64_t>(1, counts[query] * quarters / 4);
      feed.lines = static_cast<int>(std::min<int64_t>(8, (span.count * record_bytes / 64 + steps - 1) / steps));
      for (int64_t h = 0; h < p.kv_heads; ++h) Pair<T>(p, query, h, query == first, &feed);
    }
  };
  Pool().Run(threads, task);
}

template <typename T>
void Run(const Problem& p) {
  // With queries enough to keep every thread busy, a task is one query (a decode step's,
  // a run of them: RunDecode): the kv heads interleave in each cached position, so one
  // thread reading them all streams that sequence's rows once instead of several threads
  // reading every kv_heads-th slice.  Only a decode step's rows come cold from memory
  // and are asked for ahead: a prompt chunk's queries read the same rows, in cache
  // after the first of them.
  const int64_t queries = p.batch * p.steps;
  if (p.steps == 1 && queries >= 2 * Pool().threads()) return RunDecode<T>(p);
  if (p.kv_heads > 1 && queries >= 2 * Pool().threads()) {
    auto task = [&](int query) {
      for (int64_t h = 0; h < p.kv_heads; ++h) Pair<T>(p, query, h);
    };
    Pool().Run(static_cast<int>(queries), task);
    return;
  }
  const int tasks = static_cast<int>(queries * p.kv_heads);
  auto task = [&](int index) { Pair<T>(p, index / p.kv_heads, index % p.kv_heads); };
  Pool().Run(tasks, task);
}

}  // namespace
}  // namespace swarm_cpu

#else  // no AVX-512: the portable passes

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace swarm_cpu {
namespace {

// f32 partial sums kept per lane: the loops below vectorize without reassociating.
constexpr int kLanes = 8;

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t h) { return HalfToFloat(h); }

template <typename T>
inline void ToFloats(const T* from, int64_t count, float* to) {
  for (int64_t i = 0; i < count; ++i) to[i] = ToFloat(from[i]);
}

// a . b over `dim` elements, in kLanes partial sums added pairwise at the end.
inline float DotLanes(const float* a, const float* b, int64_t dim) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  }
  for (int l = 0; d + l < dim; ++l) lanes[l] += a[d + l] * b[d + l];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Softmax of scores[0, count) in place (after the soft cap, if any), normalized.
void Softmax(float* scores, int64_t count, float softcap) {
  if (softcap > 0.0f) {
    for (int64_t i = 0; i < count; ++i) scores[i] = softcap * std::tanh(scores[i] / softcap);
  }
  float top = -INFINITY;
  for (int64_t i = 0; i < count; ++i) top = std::max(top, scores[i]);
  float total = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    scores[i] = std::exp(scores[i] - top);
    total += scores[i];
  }
  const float inverse = 1.0f / total;
  for (int64_t i = 0; i < count; ++i) scores[i] *= inverse;
}

// Every query head of kv head h of query `query`: scores against each visible key (each
// key converted once for the group), softmax, then the weighted values summed.
template <typename T>
void GenericPair(const Problem& p, int64_t query, int64_t h) {
  const int64_t group = p.q_heads / p.kv_heads, dim = p.head_dim, value_dim = p.value_dim;
  const Span<T> span = Locate<T>(p, query, h);
  std::fill(span.out, span.out + group * value_dim, 0.0f);
  if (span.count == 0) return;
  const int64_t count = span.count;
  thread_local std::vector<float> scores, row;
  scores.resize(group * count);
  row.resize(std::max(dim, value_dim));
  const int64_t key_stride = p.kv_heads * dim, value_stride = p.kv_heads * value_dim;
  for (int64_t i = 0; i < count; ++i) {
    ToFloats(span.key + i * key_stride, dim, row.data());
    for (int64_t g = 0; g < group; ++g) scores[g * count + i] = DotLanes(span.q + g * dim, row.data(), dim) * p.scale;
  }
  for (int64_t g = 0; g < group; ++g) Softmax(scores.data() + g * count, count, p.softcap);
  for (int64_t i = 0; i < count; ++i) {
    ToFloats(span.value + i * value_stride, value_dim, row.data());
    for (int64_t g = 0; g < group; ++g) {
      const float weight = scores[g * count + i];
      float* out = span.out + g * value_dim;
      for (int64_t d = 0; d < value_dim; ++d) out[d] += weight * row[d];
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// --- AVX2 (with F16C and FMA): the same passes on 8 lanes, keys and values converted
// once per 8 features for every query head of the group, and exp as the AVX-512 build's.

inline __m256 Load8(const uint16_t* at) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
}
inline __m256 Load8(const float* at) { return _mm256_loadu_ps(at); }

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) for x <= 0 on 8 lanes (kExpPolynomial), 2^n put in the exponent bits (x is
// clamped at kExpFloor, so n >= -126 and 2^n is a normal float).
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpFloor));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 poly = _mm256_set1_ps(kExpPolynomial[0]);
  for (int i = 1; i < kExpTerms; ++i) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(kExpPolynomial[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

// Softmax of scores[0, count) in place (after the soft cap, if any), normalized.
void Softmax8(float* scores, int64_t count, float softcap) {
  if (softcap > 0.0f) {
    for (int64_t i = 0; i < count; ++i) scores[i] = softcap * std::tanh(scores[i] / softcap);
  }
  float top = -INFINITY;
  for (int64_t i = 0; i < count; ++i) top = std::max(top, scores[i]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), shift));
    _mm256_storeu_ps(scores + i, e);
    total = _mm256_add_ps(total, e);
  }
  if (i < count) {
    alignas(32) float tail[8];
    for (int j = 0; j < 8; ++j) tail[j] = i + j < count ? scores[i + j] - top : -INFINITY;
    const __m256 e = Exp8(_mm256_load_ps(tail));
    _mm256_store_ps(tail, e);
    for (int j = 0; i + j < count; ++j) scores[i + j] = tail[j];
    total = _mm256_add_ps(total, _mm256_blendv_ps(_mm256_setzero_ps(), e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                                                          _mm256_set1_epi32(static_cast<int>(count - i)),
                                                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))));
  }
  const float inverse = 1.0f / Sum8(total);
  for (int64_t j = 0; j < count; ++j) scores[j] *= inverse;
}

// The sums of four vectors' 8 lanes, in lanes 0..3.
inline __m128 Sum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

// acc[j][g]: the 8 lane partials of q_g . key j for kKeys keys `stride` apart and
// kHeads query heads, the heads' query features held in registers per 8 features.
template <typename T, int kHeads, int kKeys>
inline void KeyDots8(const float* q, const T* key, int64_t stride, int64_t dim, __m256 acc[kKeys][kHeads]) {
  for (int j = 0; j < kKeys; ++j) {
    for (int g = 0; g < kHeads; ++g) acc[j][g] = _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < dim; d += 8) {
    __m256 queries[kHeads];
    for (int g = 0; g < kHeads; ++g) queries[g] = _mm256_loadu_ps(q + g * dim + d);
    for (int j = 0; j < kKeys; ++j) {
      const __m256 k = Load8(key + j * stride + d);
      for (int g = 0; g < kHeads; ++g) acc[j][g] = _mm256_fmadd_ps(queries[g], k, acc[j][g]);
    }
  }
}

// scores[g * count + i] = scale * q_g . key(i) for kHeads query heads from `q`.  Up to
// three heads score four keys per pass (four heads two), and the keys' sums are reduced
// together; the last keys go one at a time.  Which way a key goes depends on its index
// and count only, so a query's scores are the same in every call.
template <typename T, int kHeads>
void Scores8(const float* q, const T* key, int64_t stride, int64_t count, int64_t dim, float scale, float* scores) {
  int64_t i = 0;
  if constexpr (kHeads <= 3) {
    const __m128 scale4 = _mm_set1_ps(scale);
    for (; i + 4 <= count; i += 4, key += 4 * stride) {
      __m256 acc[4][kHeads];
      KeyDots8<T, kHeads, 4>(q, key, stride, dim, acc);
      for (int g = 0; g < kHeads; ++g) {
        _mm_storeu_ps(scores + g * count + i, _mm_mul_ps(Sum4x8(acc[0][g], acc[1][g], acc[2][g], acc[3][g]), scale4));
      }
    }
  }
  if constexpr (kHeads == 4) {
    for (; i + 2 <= count; i += 2, key += 2 * stride) {
      __m256 acc[2][kHeads];
      KeyDots8<T, kHeads, 2>(q, key, stride, dim, acc);
      for (int g = 0; g < kHeads; ++g) {
        const __m256 pairs = _mm256_hadd_ps(acc[0][g], acc[1][g]);
        __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
        sums = _mm_hadd_ps(sums, sums);
        scores[g * count + i] = _mm_cvtss_f32(sums) * scale;
        scores[g * count + i + 1] = _mm_cvtss_f32(_mm_movehdup_ps(sums)) * scale;
      }
    }
  }
  for (; i < count; ++i, key += stride) {
    __m256 acc[1][kHeads];
    KeyDots8<T, kHeads, 1>(q, key, stride, dim, acc);
    for (int g = 0; g < kHeads; ++g) scores[g * count + i] = Sum8(acc[0][g]) * scale;
  }
}

// out[g] = sum_i weights[g * count + i] * value(i) for kHeads heads, 8 * kVectors
// features per pass over the values.
template <typename T, int kHeads, int kVectors>
void ValuesPass8(const float* weights, const T* value, int64_t stride, int64_t count, int64_t dim, int64_t d,
                 float* out) {
  __m256 acc[kHeads][kVectors];
  for (int g = 0; g < kHeads; ++g) {
    for (int v = 0; v < kVectors; ++v) acc[g][v] = _mm256_setzero_ps();
  }
  const T* row = value + d;
  for (int64_t i = 0; i < count; ++i, row += stride) {
    __m256 lanes[kVectors];
    for (int v = 0; v < kVectors; ++v) lanes[v] = Load8(row + 8 * v);
    for (int g = 0; g < kHeads; ++g) {
      const __m256 w = _mm256_broadcast_ss(weights + g * count + i);
      for (int v = 0; v < kVectors; ++v) acc[g][v] = _mm256_fmadd_ps(w, lanes[v], acc[g][v]);
    }
  }
  for (int g = 0; g < kHeads; ++g) {
    for (int v = 0; v < kVectors; ++v) _mm256_storeu_ps(out + g * dim + d + 8 * v, acc[g][v]);
  }
}

// All of out[g]'s features: 32 per pass for up to three heads (their accumulators and a
// value's four vectors fill the 16 registers), else 16.
template <typename T, int kHeads>
void Values8(const float* weights, const T* value, int64_t stride, int64_t count, int64_t dim, float* out) {
  int64_t d = 0;
  if constexpr (kHeads <= 3) {
    for (; d + 32 <= dim; d += 32) ValuesPass8<T, kHeads, 4>(weights, value, stride, count, dim, d, out);
  }
  for (; d < dim; d += 16) ValuesPass8<T, kHeads, 2>(weights, value, stride, count, dim, d, out);
}

template <typename T, int kHeads>
void HeadBlock8(const Problem& p, const Span<T>& span, int64_t g, float* scores) {
  const int64_t count = span.count;
  Scores8<T, kHeads>(span.q + g * p.head_dim, span.key, p.kv_heads * p.head_dim, count, p.head_dim, p.scale, scores);
  for (int j = 0; j < kHeads; ++j) Softmax8(scores + j * count, count, p.softcap);
  Values8<T, kHeads>(scores, span.value, p.kv_heads * p.value_dim, count, p.value_dim, span.out + g * p.value_dim);
}

// Every query head of kv head h of query `query`, four heads per pass over the keys and values.
template <typename T>
void Pair(const Problem& p, int64_t query, int64_t h) {
  if (p.head_dim % 8 != 0 || p.value_dim % 16 != 0) return GenericPair<T>(p, query, h);
  const int64_t group = p.q_heads / p.kv_heads;
  const Span<T> span = Locate<T>(p, query, h);
  if (span.count == 0) {
    std::fill(span.out, span.out + group * p.value_dim, 0.0f);
    return;
  }
  thread_local std::vector<float> scores;
  scores.resize(4 * span.count);
  for (int64_t g = 0; g < group; g += 4) {
    switch (std::min<int64_t>(4, group - g)) {
      case 1: HeadBlock8<T, 1>(p, span, g, scores.data()); break;
      case 2: HeadBlock8<T, 2>(p, span, g, scores.data()); break;
      case 3: HeadBlock8<T, 3>(p, span, g, scores.data()); break;
      default: HeadBlock8<T, 4>(p, span, g, scores.data()); break;
    }
  }
}

#else

template <typename T>
void Pair(const Problem& p, int64_t query, int64_t h) {
  GenericPair<T>(p, query, h);
}

#endif

template <typename T>
void Run(const Problem& p) {
  // One task per query when there are enough to keep every thread busy (its kv heads
  // interleave in each cached position), else one per (query, kv head).
  const int64_t queries = p.batch * p.steps;
  if (p.kv_heads > 1 && queries >= 2 * Pool().threads()) {
    auto task = [&](int query) {
      for (int64_t h = 0; h < p.kv_heads; ++h) Pair<T>(p, query, h);
    };
    Pool().Run(static_cast<int>(queries), task);
    return;
  }
  auto task = [&](int index) { Pair<T>(p, index / p.kv_heads, index % p.kv_heads); };
  Pool().Run(static_cast<int>(queries * p.kv_heads), task);
}

}  // namespace
}  // namespace swarm_cpu

#endif

namespace swarm_cpu {
namespace {

int64_t Scalar(ffi::Buffer<ffi::S32> buffer) { return buffer.typed_data()[0]; }

// Fills `p` from the handler's arguments, checked: q f32[B, T, Hq, D], caches
// [L, R, C, Hkv, D] and [L, R, C, Hkv, Dv] of one type (f16 or f32), out f32[B, T, Hq, Dv].
ffi::Error Describe(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> layer,
                    ffi::Buffer<ffi::S32> first_row, ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> positions,
                    ffi::Buffer<ffi::S32> kv_length, ffi::ResultBuffer<ffi::F32>& out, float scale,
                    float softcap, int64_t bound, Problem& p) {
  const auto q_dims = q.dimensions(), k_dims = keys.dimensions(), v_dims = values.dimensions();
  const auto out_dims = out->dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 5 || v_dims.size() != 5 || out_dims.size() != 4) {
    return ffi::Error::InvalidArgument("cache_attention: need q f32[B, T, Hq, D] and caches [L, R, C, Hkv, D]");
  }
  if (keys.element_type() != values.element_type() ||
      (keys.element_type() != ffi::DataType::F16 && keys.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("cache_attention: the caches must both be f16 or both f32");
  }
  p = Problem{};
  p.batch = q_dims[0];
  p.steps = q_dims[1];
  p.q_heads = q_dims[2];
  p.head_dim = q_dims[3];
  p.layers = k_dims[0];
  p.rows = k_dims[1];
  p.capacity = k_dims[2];
  p.kv_heads = k_dims[3];
  p.value_dim = v_dims[4];
  if (k_dims[4] != p.head_dim || v_dims[0] != k_dims[0] || v_dims[1] != p.rows || v_dims[2] != p.capacity ||
      v_dims[3] != p.kv_heads || p.kv_heads == 0 || p.q_heads % p.kv_heads != 0 || out_dims[0] != p.batch ||
      out_dims[1] != p.steps || out_dims[2] != p.q_heads || out_dims[3] != p.value_dim ||
      positions.element_count() != p.batch * p.steps || kv_length.element_count() != p.batch) {
    return ffi::Error::InvalidArgument("cache_attention: q, caches, positions and output do not fit together");
  }
  p.layer = Scalar(layer);
  if (p.layer < 0 || p.layer >= k_dims[0]) {
    return ffi::Error::InvalidArgument("cache_attention: layer " + std::to_string(p.layer) + " is not in the cache");
  }
  p.first_row = Scalar(first_row);
  p.window = Scalar(window);
  p.bound = bound;
  p.scale = scale;
  p.softcap = softcap;
  p.q = q.typed_data();
  p.keys = keys.untyped_data();
  p.values = values.untyped_data();
  p.positions = positions.typed_data();
  p.kv_length = kv_length.typed_data();
  p.out = out->typed_data();
  return ffi::Error::Success();
}

ffi::Error Attend(const Problem& p, bool half) {
  if (p.batch == 0 || p.steps == 0 || p.q_heads == 0) return ffi::Error::Success();
  if (half) {
    Run<uint16_t>(p);
  } else {
    Run<float>(p);
  }
  return ffi::Error::Success();
}

// Rotary embedding of `heads` vectors of `width` features from `from` into `to`: the
// first `dims` features in pairs (2i, 2i + 1), or (i, i + dims / 2) for `neox`, by the
// angles whose cosines and sines are cos[i], sin[i]; the rest copied.  Each pair is
// (fma(a, c, -(b s)), fma(a, s, b c)), the operations XLA's fusion of the jnp rotation
// in kernels' callers (swarm/model.py, rope) runs on this CPU.
void Rotate(const float* from, float* to, int64_t heads, int64_t width, const float* cos, const float* sin,
            int64_t dims, bool neox) {
  const int64_t half = dims / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* x = from + h * width;
    float* y = to + h * width;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t first = neox ? i : 2 * i, second = neox ? i + half : 2 * i + 1;
      const float a = x[first], b = x[second], c = cos[i], s = sin[i];
      y[first] = std::fma(a, c, -(b * s));
      y[second] = std::fma(a, s, b * c);
    }
    for (int64_t d = dims; d < width; ++d) y[d] = x[d];
  }
}

inline void Store(const float* from, int64_t count, float* to) { std::memcpy(to, from, count * sizeof(float)); }
// As f16, rounded to nearest even as FloatToHalf does: 16 or 8 at a time where the CPU
// converts vectors, the rest one by one.  One at a time, a decode step's 2-byte stores
// into cold cache lines filled the store buffer and stalled each row's write (measured
// on a step of 8 rows, with WriteAll's prefetch: the write's share of the step's CPU
// time fell from 1.7 % to 0.6 %, time in which the other threads wait).
inline void Store(const float* from, int64_t count, uint16_t* to) {
  int64_t i = 0;
#if defined(__F16C__) || defined(__AVX512F__)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + i), _mm512_cvtps_ph(_mm512_loadu_ps(from + i), kRound));
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= count; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i), _mm256_cvtps_ph(_mm256_loadu_ps(from + i), kRound));
  }
#endif
  for (; i < count; ++i) to[i] = FloatToHalf(from[i]);
}

// The cache slot query (b, t) writes: its position in cache row first_row + b of the
// layer, or -1 for a row or position outside the cache (a padding row).
inline int64_t WriteSlot(const Problem& p, int64_t query) {
  const int64_t row = p.first_row + query / p.steps, position = p.positions[query];
  if (row < 0 || row >= p.rows || position < 0 || position >= p.capacity) return -1;
  return (p.layer * p.rows + row) * p.capacity + position;
}

// Writes query (b, t)'s rotated keys and its values at its position in cache row
// first_row + b of the layer (nothing for a row or position outside the cache: a
// padding row), and its rotated query heads into `queries`.
template <typename T>
void Write(const Problem& p, int64_t query, const float* q, const float* k, const float* v, const float* cos,
           const float* sin, int64_t dims, bool neox, float* queries) {
  const int64_t half = dims / 2;
  cos += query * half;
  sin += query * half;
  Rotate(q + query * p.q_heads * p.head_dim, queries + query * p.q_heads * p.head_dim, p.q_heads, p.head_dim, cos,
         sin, dims, neox);
  const int64_t slot = WriteSlot(p, query);
  if (slot < 0) return;
  thread_local std::vector<float> rotated;
  rotated.resize(p.kv_heads * p.head_dim);
  Rotate(k + query * p.kv_heads * p.head_dim, rotated.data(), p.kv_heads, p.head_dim, cos, sin, dims, neox);
  Store(rotated.data(), p.kv_heads * p.head_dim,
        static_cast<T*>(const_cast<void*>(p.keys)) + slot * p.kv_heads * p.head_dim);
  Store(v + query * p.kv_heads * p.value_dim, p.kv_heads * p.value_dim,
        static_cast<T*>(const_cast<void*>(p.values)) + slot * p.kv_heads * p.value_dim);
}

// Prompt chunks write this many queries or more on the pool; decode steps on the caller.
constexpr int64_t kParallelWrites = 32;

// Write for every query of `p` into its f16 (`half`) or f32 caches: the rotated queries
// go to `rotated` (f32[B, T, Hq, D]).
void WriteAll(const Problem& p, bool half, const float* q, const float* k, const float* v, const float* cos,
              const float* sin, int64_t dims, bool neox, float* rotated) {
  const int64_t queries = p.batch * p.steps;
  if (queries < kParallelWrites) {
    // A decode step's rows land in cache lines no one has read lately: ask for them
    // all (for writing) before the rotations, so that their fetches overlap.
    const size_t element = half ? sizeof(uint16_t) : sizeof(float);
    for (int64_t query = 0; query < queries; ++query) {
      const int64_t slot = WriteSlot(p, query);
      if (slot < 0) continue;
      const char* key = static_cast<const char*>(p.keys) + slot * p.kv_heads * p.head_dim * element;
      const char* value = static_cast<const char*>(p.values) + slot * p.kv_heads * p.value_dim * element;
      for (size_t at = 0; at < p.kv_heads * p.head_dim * element; at += 64) __builtin_prefetch(key + at, 1);
      for (size_t at = 0; at < p.kv_heads * p.value_dim * element; at += 64) __builtin_prefetch(value + at, 1);
    }
  }
  auto write = [&](int query) {
    if (half) {
      Write<uint16_t>(p, query, q, k, v, cos, sin, dims, neox, rotated);
    } else {
      Write<float>(p, query, q, k, v, cos, sin, dims, neox, rotated);
    }
  };
  Pool().RunIf(queries >= kParallelWrites, static_cast<int>(queries), write);
}

}  // namespace
}  // namespace swarm_cpu

static ffi::Error CacheAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys, ffi::AnyBuffer values,
                                      ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> first_row,
                                      ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> positions,
                                      ffi::Buffer<ffi::S32> kv_length, ffi::ResultBuffer<ffi::F32> out, float scale,
                                      float softcap, int64_t bound) {
  using namespace swarm_cpu;
  Problem p;
  const ffi::Error error =
      Describe(q, keys, values, layer, first_row, window, positions, kv_length, out, scale, softcap, bound, p);
  if (error.failure()) return error;
  return Attend(p, keys.element_type() == ffi::DataType::F16);
}

// The step's keys and values written into the cache (rotated keys, as f16 or f32), then
// attention over it with the rotated queries: what a layer otherwise runs as XLA's
// rotation, conversion and two scatters before `CacheAttentionImpl`.  The caches come
// back as results aliased to the cache arguments (XLA hands over one buffer for both).
static ffi::Error CacheWriteAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                           ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                           ffi::Buffer<ffi::S32> table, ffi::AnyBuffer keys_in,
                                           ffi::AnyBuffer values_in,
                                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> first_row,
                                           ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::S32> positions,
                                           ffi::Buffer<ffi::S32> kv_length, ffi::ResultBuffer<ffi::F32> out,
                                           ffi::Result<ffi::AnyBuffer> keys, ffi::Result<ffi::AnyBuffer> values,
                                           float scale, float softcap, int64_t bound, int32_t neox) {
  using namespace swarm_cpu;
  if (keys->untyped_data() != keys_in.untyped_data() || values->untyped_data() != values_in.untyped_data() ||
      keys->element_type() != keys_in.element_type() || values->element_type() != values_in.element_type()) {
    return ffi::Error::InvalidArgument("cache_write_attention: the caches must be aliased to their results");
  }
  Problem p;
  const ffi::Error error =
      Describe(q, *keys, *values, layer, first_row, window, positions, kv_length, out, scale, softcap, bound, p);
  if (error.failure()) return error;
  const auto k_dims = k.dimensions(), v_dims = v.dimensions(), c_dims = cos.dimensions();
  if (k_dims.size() != 4 || v_dims.size() != 4 || c_dims.size() != 4 || k_dims[0] != p.batch ||
      k_dims[1] != p.steps || k_dims[2] != p.kv_heads || k_dims[3] != p.head_dim || v_dims[0] != p.batch ||
      v_dims[1] != p.steps || v_dims[2] != p.kv_heads || v_dims[3] != p.value_dim || c_dims[1] != p.batch ||
      c_dims[2] != p.steps || 2 * c_dims[3] > p.head_dim || sin.dimensions().size() != 4 ||
      sin.element_count() != cos.element_count() || (neox != 0 && neox != 1)) {
    return ffi::Error::InvalidArgument(
        "cache_write_attention: need k f32[B, T, Hkv, D], v f32[B, T, Hkv, Dv], cos and sin "
        "f32[tables, B, T, <= D / 2], neox 0 or 1");
  }
  const int64_t which = Scalar(table);
  if (which < 0 || which >= c_dims[0]) {
    return ffi::Error::InvalidArgument("cache_write_attention: table " + std::to_string(which) + " of " +
                                       std::to_string(c_dims[0]));
  }
  const int64_t queries = p.batch * p.steps, dims = 2 * c_dims[3];
  const float* cos_table = cos.typed_data() + which * queries * c_dims[3];
  const float* sin_table = sin.typed_data() + which * queries * c_dims[3];
  // The caller's buffer, passed by its address: a pool task naming it would get its own
  // thread's (thread_local storage is not captured).
  thread_local std::vector<float> rotated;
  rotated.resize(queries * p.q_heads * p.head_dim);
  const bool half = keys->element_type() == ffi::DataType::F16;
  WriteAll(p, half, q.typed_data(), k.typed_data(), v.typed_data(), cos_table, sin_table, dims, neox == 1,
           rotated.data());
  p.q = rotated.data();
  return Attend(p, half);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwarmCacheAttention, CacheAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q f32[B, T, Hq, D]
                                  .Arg<ffi::AnyBuffer>()         // keys f16|f32[L, R, C, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()         // values f16|f32[L, R, C, Hkv, Dv]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer i32[]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // first_row i32[]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window i32[]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions i32[B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_length i32[B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out f32[B, T, Hq, Dv]
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("bound"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwarmCacheWriteAttention, CacheWriteAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q f32[B, T, Hq, D], before the rotation
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k f32[B, T, Hkv, D], before the rotation
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v f32[B, T, Hkv, Dv]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos f32[tables, B, T, dims / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin f32[tables, B, T, dims / 2]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table i32[]: the layer's
                                  .Arg<ffi::AnyBuffer>()         // keys f16|f32[L, R, C, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()         // values f16|f32[L, R, C, Hkv, Dv]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer i32[]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // first_row i32[]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window i32[]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions i32[B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_length i32[B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out f32[B, T, Hq, Dv]
                                  .Ret<ffi::AnyBuffer>()         // keys, the argument's buffer
                                  .Ret<ffi::AnyBuffer>()         // values, the argument's buffer
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("bound")
                                  .Attr<int32_t>("neox"));  // 0: pairs (2i, 2i + 1); 1: (i, i + dims / 2)

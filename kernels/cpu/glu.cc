// XLA FFI handler: SwiGLU, silu(gate) * up, as llama.cpp's CPU backend computes it.
//
//   gate, up  f32[..., n]
//   out       f32[..., n]   out = silu(gate) * up, silu(x) = x / (1 + exp(-x))
//
// Like ggml_vec_swiglu_f32 built for AVX-512 (what llama.cpp runs on the machines this
// library builds for): 16 lanes at a time with ggml's vector exp (ggml_v_expf: an
// FMA-evaluated polynomial on x - n ln2, scaled by 2^n) and an IEEE division, and the
// last n % 16 elements one by one with libm's expf.  So a layer's feed-forward input is
// the very f32 values llama.cpp quantizes for its down projection, where XLA's own
// logistic rounds differently.  Each element depends on its own inputs only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)

#include <immintrin.h>

#include "thread_pool.h"

namespace swarm_cpu {
namespace {

// Elements are spread over the pool only when there are this many.
constexpr int64_t kParallelElements = 1 << 15;
constexpr int64_t kTaskElements = 1 << 13;

// exp(x) in 16 lanes, ggml's ggml_v_expf (ARM's optimized-routines expf): n = round(x /
// ln2) by the 1.5 * 2^23 shift, b = x - n ln2 in two parts, exp(b) as a degree-5
// polynomial, then scaled by 2^n; past |n| > 192, inf or 0.
inline __m512 Exp(__m512 x) {
  const __m512 shift = _mm512_set1_ps(0x1.8p23f);
  const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), shift);
  const __m512 n = _mm512_sub_ps(z, shift);
  const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
  const __mmask16 huge = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192), _CMP_GT_OQ);
  const __m512 u = _mm512_mul_ps(b, b);
  const __m512 j = _mm512_fmadd_ps(
      _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f)), u,
                      _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f))),
      u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f)));
  const __m512 result = _mm512_scalef_ps(j, n);
  if (_mm512_kortestz(huge, huge)) return result;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 limit =
      _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, zero, _CMP_LE_OQ), _mm512_set1_ps(INFINITY), zero);
  return _mm512_mask_blend_ps(huge, result, limit);
}

// x / (1 + exp(-x)), ggml_v_silu.
inline __m512 Silu(__m512 x) {
  const __m512 negated = _mm512_sub_ps(_mm512_setzero_ps(), x);
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), Exp(negated)));
}

// Elements [begin, end) of a row of n (the scalar tail is each row's last n % 16).
void Range(const float* gate, const float* up, float* out, int64_t n, int64_t begin, int64_t end) {
  for (int64_t at = begin; at < end;) {
    const int64_t row = at / n, row_end = std::min(end, (row + 1) * n);
    const int64_t vector_end = row * n + (n / 16) * 16;
    int64_t i = at;
    for (; i + 16 <= std::min(row_end, vector_end); i += 16) {
      _mm512_storeu_ps(out + i, _mm512_mul_ps(Silu(_mm512_loadu_ps(gate + i)), _mm512_loadu_ps(up + i)));
    }
    for (; i < row_end; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    at = row_end;
  }
}

}  // namespace
}  // namespace swarm_cpu

static ffi::Error SwiGluImpl(ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up, ffi::ResultBuffer<ffi::F32> out) {
  using namespace swarm_cpu;
  const auto dims = gate.dimensions(), up_dims = up.dimensions();
  if (dims.size() < 1 || dims.size() != up_dims.size() || !std::equal(dims.begin(), dims.end(), up_dims.begin()) ||
      out->element_count() != gate.element_count()) {
    return ffi::Error::InvalidArgument("swiglu: gate, up and the output must be f32 of one shape [..., n]");
  }
  const int64_t n = dims.back(), total = static_cast<int64_t>(gate.element_count());
  if (n == 0 || total == 0) return ffi::Error::Success();
  const float* g = gate.typed_data();
  const float* u = up.typed_data();
  float* y = out->typed_data();
  // Tasks start on multiples of 16 within a row only where rows are whole vectors;
  // otherwise a task is whole rows, so every row's tail stays scalar as in ggml.
  const int64_t step = n % 16 == 0 ? kTaskElements : std::max<int64_t>(1, kTaskElements / n) * n;
  const int tasks = static_cast<int>((total + step - 1) / step);
  auto task = [&](int index) { Range(g, u, y, n, index * step, std::min(total, (index + 1) * step)); };
  Pool().RunIf(total >= kParallelElements, tasks, task);
  return ffi::Error::Success();
}

#else  // no AVX-512: a handler that only reports why

static ffi::Error SwiGluImpl(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("swiglu was built for a CPU without AVX-512");
}

#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwarmSwiGlu, SwiGluImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate f32[..., n]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up f32[..., n]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out f32[..., n]

// XLA FFI handler: RMS norm of each row, times a weight, as llama.cpp's CPU backend
// computes it.
//
//   x      f32[..., d]   rows of d features
//   weight f32[d]
//   out    f32[..., d]   out = (x * scale) * weight, scale = 1 / sqrt(mean(x^2) + eps)
//
// Like ggml_compute_forward_rms_norm_f32 followed by ggml_mul: each square is rounded
// to f32 and summed in f64, the mean is rounded to f32, and the scale is 1.0f /
// sqrtf(mean + eps).  The f64 sum runs in 8 lanes rather than in order; its rounding
// to the f32 mean is the same except in the rare sums within 2^-29 of a rounding
// boundary.  Each row depends on itself only, so a sequence gets the same bits whichever
// rows share the call.
//
// One pass over the row for the sum and one for the product, where XLA's jnp
// version (kernels/norm.py) pads the squares to a power of two and sums them in
// halving passes through memory.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)

#include <immintrin.h>

#include "thread_pool.h"

namespace swarm_cpu {
namespace {

// Rows are spread over the pool only when there are this many elements.
constexpr int64_t kParallelElements = 1 << 15;
constexpr int64_t kRowsPerTask = 8;

inline __mmask16 Lanes(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1u);
}

void NormRow(const float* x, const float* weight, int64_t d, float eps, float* out) {
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  for (int64_t i = 0; i < d; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(Lanes(d - i), x + i);
    const __m512 square = _mm512_mul_ps(v, v);  // rounded to f32, as ggml's x[i] * x[i]
    low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(square)));
    high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(square), 1))));
  }
  const double sum = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
  const float mean = static_cast<float>(sum / static_cast<double>(d));
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 mask = Lanes(d - i);
    const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), scale);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(scaled, _mm512_maskz_loadu_ps(mask, weight + i)));
  }
}

}  // namespace
}  // namespace swarm_cpu

static ffi::Error RmsNormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> out,
                              float eps) {
  using namespace swarm_cpu;
  const auto dims = x.dimensions();
  if (dims.size() < 1 || weight.dimensions().size() != 1 || weight.dimensions()[0] != dims.back()) {
    return ffi::Error::InvalidArgument("rms_norm: need x f32[..., d] and weight f32[d]");
  }
  if (out->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("rms_norm: the output must have x's shape");
  }
  const int64_t d = dims.back();
  if (d == 0) return ffi::Error::Success();
  const int64_t rows = static_cast<int64_t>(x.element_count()) / d;
  const float* xs = x.typed_data();
  const float* w = weight.typed_data();
  float* ys = out->typed_data();
  auto task = [&](int index) {
    const int64_t end = std::min(rows, (index + 1) * kRowsPerTask);
    for (int64_t row = index * kRowsPerTask; row < end; ++row) NormRow(xs + row * d, w, d, eps, ys + row * d);
  };
  const int tasks = static_cast<int>((rows + kRowsPerTask - 1) / kRowsPerTask);
  Pool().RunIf(rows * d >= kParallelElements, tasks, task);
  return ffi::Error::Success();
}

#else  // no AVX-512: a handler that only reports why

static ffi::Error RmsNormImpl(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>, float) {
  return ffi::Error::Internal("rms_norm was built for a CPU without AVX-512");
}

#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwarmRmsNorm, RmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x f32[..., d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight f32[d]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out f32[..., d]
                                  .Attr<float>("eps"));

// The library's cache attention (kernels/cpu/attention.cc) behind a plain function, for main.cc.
#include <cstdio>

#include "attention.cc"

namespace {

// Fields as attention.cc's Problem.
swarm_cpu::Problem MakeProblem(const int64_t* shape, const float* q, const void* keys, const void* values,
                               const int32_t* positions, const int32_t* kv_length, float* out, float scale,
                               float softcap) {
  swarm_cpu::Problem p{};
  p.batch = shape[0];
  p.steps = shape[1];
  p.q_heads = shape[2];
  p.head_dim = shape[3];
  p.value_dim = shape[4];
  p.rows = shape[5];
  p.capacity = shape[6];
  p.kv_heads = shape[7];
  p.layer = shape[8];
  p.first_row = shape[9];
  p.window = shape[10];
  p.bound = shape[11];
  p.scale = scale;
  p.softcap = softcap;
  p.q = q;
  p.keys = keys;
  p.values = values;
  p.positions = positions;
  p.kv_length = kv_length;
  p.out = out;
  return p;
}

}  // namespace

// `half`: the caches are f16 (else f32).
void DriverAttention(const int64_t* shape, const float* q, const void* keys, const void* values,
                     const int32_t* positions, const int32_t* kv_length, float* out, float scale, float softcap,
                     bool half) {
  swarm_cpu::Attend(MakeProblem(shape, q, keys, values, positions, kv_length, out, scale, softcap), half);
}

// As CacheWriteAttentionImpl: q and k rotated by cos, sin f32[B, T, dims / 2], k and v
// written into the caches (updated in place), then the attention of the rotated q.
void DriverWriteAttention(const int64_t* shape, const float* q, const float* k, const float* v, const float* cos,
                          const float* sin, int64_t dims, bool neox, void* keys, void* values,
                          const int32_t* positions, const int32_t* kv_length, float* out, float scale, float softcap,
                          bool half) {
  swarm_cpu::Problem p = MakeProblem(shape, q, keys, values, positions, kv_length, out, scale, softcap);
  std::vector<float> rotated(static_cast<size_t>(p.batch * p.steps * p.q_heads * p.head_dim));
  swarm_cpu::WriteAll(p, half, q, k, v, cos, sin, dims, neox, rotated.data());
  p.q = rotated.data();
  swarm_cpu::Attend(p, half);
}

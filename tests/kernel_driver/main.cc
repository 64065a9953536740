// Runs the CPU kernels on requests read from a file, without XLA: how the tests run the
// library's ARM build under an emulator (tests/test_kernels_arm.py).
//
//   driver REQUESTS OUTPUTS
//
// REQUESTS holds records, little-endian, each starting with an i64 kind:
//   1, a matmul:    i64 qtype, m, k, n, row_bytes; f32 x[m * k]; u8 w[n * row_bytes]
//   2, attention:   i64 batch, steps, q_heads, head_dim, value_dim, rows, capacity,
//                   kv_heads, layer, first_row, window, bound, layers, half;
//                   f32 scale, softcap; f32 q[batch * steps * q_heads * head_dim];
//                   keys and values (f16 if half, else f32) [layers, rows, capacity,
//                   kv_heads, head_dim or value_dim]; i32 positions[batch * steps];
//                   i32 kv_length[batch]
//   3, the step written into the cache, then attention: as 2, then i64 dims, neox;
//                   f32 k[batch * steps * kv_heads * head_dim], v[... * value_dim],
//                   cos[batch * steps * dims / 2], sin[the same]
// OUTPUTS gets, per record, an i64 status: 0 and the f32 result (matmul f32[m, n],
// attention f32[batch, steps, q_heads, value_dim]; for 3, then the keys and values as
// written), or 1, an i64 length and the kernel's error message.  Malformed requests end
// the run with exit status 2.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

int DriverMatmul(int qtype, const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t row_bytes,
                 float* out, char* error, int64_t error_size);
void DriverAttention(const int64_t* shape, const float* q, const void* keys, const void* values,
                     const int32_t* positions, const int32_t* kv_length, float* out, float scale, float softcap,
                     bool half);
void DriverWriteAttention(const int64_t* shape, const float* q, const float* k, const float* v, const float* cos,
                          const float* sin, int64_t dims, bool neox, void* keys, void* values,
                          const int32_t* positions, const int32_t* kv_length, float* out, float scale, float softcap,
                          bool half);

namespace {

constexpr int64_t kMaxElements = int64_t{1} << 28;

struct Reader {
  std::FILE* file;
  bool Read(void* into, int64_t bytes) {
    return bytes == 0 || std::fread(into, 1, static_cast<size_t>(bytes), file) == static_cast<size_t>(bytes);
  }
  template <typename T>
  bool Array(std::vector<T>& into, int64_t count) {
    if (count < 0 || count > kMaxElements) return false;
    into.resize(static_cast<size_t>(count));
    return Read(into.data(), count * static_cast<int64_t>(sizeof(T)));
  }
};

void Write(std::FILE* out, const void* data, int64_t bytes) { std::fwrite(data, 1, static_cast<size_t>(bytes), out); }

int Fail(const char* what) {
  std::fprintf(stderr, "driver: %s\n", what);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return Fail("usage: driver REQUESTS OUTPUTS");
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (in == nullptr || out == nullptr) return Fail("cannot open the files");
  Reader reader{in};
  int64_t kind;
  while (reader.Read(&kind, sizeof(kind))) {
    if (kind == 1) {
      int64_t head[5];
      std::vector<float> x;
      std::vector<uint8_t> w;
      if (!reader.Read(head, sizeof(head))) return Fail("short matmul header");
      const int64_t qtype = head[0], m = head[1], k = head[2], n = head[3], row_bytes = head[4];
      if (m < 0 || n < 0 || !reader.Array(x, m * k) || !reader.Array(w, n * row_bytes)) {
        return Fail("bad matmul arrays");
      }
      std::vector<float> result(static_cast<size_t>(m * n));
      char error[512] = {0};
      const int64_t status = DriverMatmul(static_cast<int>(qtype), x.data(), m, k, w.data(), n, row_bytes,
                                          result.data(), error, sizeof(error));
      Write(out, &status, sizeof(status));
      if (status == 0) {
        Write(out, result.data(), m * n * 4);
      } else {
        const int64_t length = static_cast<int64_t>(std::strlen(error));
        Write(out, &length, sizeof(length));
        Write(out, error, length);
      }
    } else if (kind == 2 || kind == 3) {
      int64_t shape[14];
      float scalars[2];
      if (!reader.Read(shape, sizeof(shape)) || !reader.Read(scalars, sizeof(scalars))) {
        return Fail("short attention header");
      }
      const int64_t batch = shape[0], steps = shape[1], q_heads = shape[2], head_dim = shape[3];
      const int64_t value_dim = shape[4], rows = shape[5], capacity = shape[6], kv_heads = shape[7];
      const int64_t layers = shape[12], width = shape[13] ? 2 : 4;
      const int64_t slots = layers * rows * capacity * kv_heads;
      std::vector<float> q;
      std::vector<uint8_t> keys, values;
      std::vector<int32_t> positions, kv_length;
      if (!reader.Array(q, batch * steps * q_heads * head_dim) || !reader.Array(keys, slots * head_dim * width) ||
          !reader.Array(values, slots * value_dim * width) || !reader.Array(positions, batch * steps) ||
          !reader.Array(kv_length, batch)) {
        return Fail("bad attention arrays");
      }
      std::vector<float> result(static_cast<size_t>(batch * steps * q_heads * value_dim));
      if (kind == 2) {
        DriverAttention(shape, q.data(), keys.data(), values.data(), positions.data(), kv_length.data(),
                        result.data(), scalars[0], scalars[1], shape[13] != 0);
      } else {
        int64_t rope[2];
        std::vector<float> k, v, cos, sin;
        if (!reader.Read(rope, sizeof(rope)) || rope[0] < 0 || rope[0] / 2 * 2 > head_dim ||
            !reader.Array(k, batch * steps * kv_heads * head_dim) ||
            !reader.Array(v, batch * steps * kv_heads * value_dim) || !reader.Array(cos, batch * steps * (rope[0] / 2)) ||
            !reader.Array(sin, batch * steps * (rope[0] / 2))) {
          return Fail("bad write-attention arrays");
        }
        DriverWriteAttention(shape, q.data(), k.data(), v.data(), cos.data(), sin.data(), rope[0], rope[1] != 0,
                             keys.data(), values.data(), positions.data(), kv_length.data(), result.data(),
                             scalars[0], scalars[1], shape[13] != 0);
      }
      const int64_t status = 0;
      Write(out, &status, sizeof(status));
      Write(out, result.data(), static_cast<int64_t>(result.size()) * 4);
      if (kind == 3) {
        Write(out, keys.data(), static_cast<int64_t>(keys.size()));
        Write(out, values.data(), static_cast<int64_t>(values.size()));
      }
    } else {
      return Fail("unknown record kind");
    }
  }
  return std::fclose(out) == 0 ? 0 : Fail("cannot write the outputs");
}

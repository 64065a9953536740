// The library's matmul (kernels/cpu/qmatmul.cc) behind a plain function, for main.cc.
#include "qmatmul.cc"

// out f32[m, n] = x f32[m, k] . w.T for GGUF rows w u8[n, row_bytes] of GGML type
// `qtype`; 0, or 1 with the kernel's error message in `error` (`error_size` bytes).
int DriverMatmul(int qtype, const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t row_bytes,
                 float* out, char* error, int64_t error_size) {
  using namespace swarm_cpu;
  using namespace formats;
  Matrix matrix{w, n, out, nullptr};
  ffi::Error result = ffi::Error::InvalidArgument("unsupported GGML type " + std::to_string(qtype));
  switch (qtype) {
    case Q4_0::kType: result = Checked<Q4_0>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q4_1::kType: result = Checked<Q4_1>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q5_0::kType: result = Checked<Q5_0>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q5_1::kType: result = Checked<Q5_1>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q8_0::kType: result = Checked<Q8_0>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q4_K::kType: result = Checked<Q4_K>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q5_K::kType: result = Checked<Q5_K>(x, m, k, &matrix, &row_bytes, 1, false); break;
    case Q6_K::kType: result = Checked<Q6_K>(x, m, k, &matrix, &row_bytes, 1, false); break;
    default: break;
  }
  if (result.success()) return 0;
  std::snprintf(error, error_size, "%s", result.message().c_str());
  return 1;
}

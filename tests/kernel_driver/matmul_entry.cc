// The library's matmul (kernels/cpu/qmatmul.cc) behind a plain function, for main.cc.
#include "qmatmul.cc"

// out f32[m, n] = x f32[m, k] . w.T for GGUF rows w u8[n, row_bytes] of GGML type
// `qtype`; 0, or 1 with the kernel's error message in `error` (`error_size` bytes).
int DriverMatmul(int qtype, const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t row_bytes,
                 float* out, char* error, int64_t error_size) {
  const swarm_cpu::Matrix matrix{w, n, out, nullptr};
  const ffi::Error result = swarm_cpu::QMatmulOfType(qtype, x, m, k, &matrix, &row_bytes, 1, false);
  if (result.success()) return 0;
  std::snprintf(error, error_size, "%s", result.message().c_str());
  return 1;
}

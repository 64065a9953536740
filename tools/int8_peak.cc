// The machine's peak rate of the 8-bit dot products the CPU kernels are built on, for
// tools/bench_kernels.py: every thread runs independent chains of the instruction the
// library's build uses (AVX-512 VNNI `vpdpbusd` on 512 bits, AVX-VNNI on 256, or AVX2's
// `vpmaddubsw` + `vpmaddwd`), and the total is printed as JSON in multiply-adds per second.
//
//   int8_peak THREADS SECONDS

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 16;  // independent accumulators: more than latency x throughput

#if defined(__AVX512VNNI__)
constexpr const char* kInstruction = "vpdpbusd zmm";
constexpr int kMacs = 64;
int64_t Spin(int64_t rounds) {
  __m512i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
  for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  int64_t sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_epi32(acc[i]);
  return sum;
}
#elif defined(__AVXVNNI__)
constexpr const char* kInstruction = "vpdpbusd ymm (AVX-VNNI)";
constexpr int kMacs = 32;
int64_t Spin(int64_t rounds) {
  __m256i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
  for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_dpbusd_avx_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  int64_t sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm256_extract_epi32(acc[i], 0);
  return sum;
}
#elif defined(__AVX2__)
constexpr const char* kInstruction = "vpmaddubsw + vpmaddwd ymm";
constexpr int kMacs = 32;
int64_t Spin(int64_t rounds) {
  __m256i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) {
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    }
    __asm__ volatile("" : "+v"(a));
  }
  int64_t sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm256_extract_epi32(acc[i], 0);
  return sum;
}
#else
constexpr const char* kInstruction = "";
constexpr int kMacs = 0;
int64_t Spin(int64_t) { return 0; }
#endif

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 1.0;
  if (threads < 1 || !(seconds > 0)) {
    std::fprintf(stderr, "usage: int8_peak THREADS SECONDS\n");
    return 2;
  }
  // Rounds per thread that take about `seconds`, from a short calibration run.
  const auto start = std::chrono::steady_clock::now();
  std::atomic<int64_t> sink{Spin(1 << 16)};
  const double per_round =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / (1 << 16);
  const int64_t rounds = per_round > 0 ? static_cast<int64_t>(seconds / per_round) : 1;
  const auto begin = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) workers.emplace_back([&] { sink += Spin(rounds); });
  for (auto& worker : workers) worker.join();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  const double macs = static_cast<double>(rounds) * kChains * kMacs * threads;
  std::printf("{\"instruction\": \"%s\", \"threads\": %d, \"gmac_s\": %.3f, \"check\": %lld}\n", kInstruction, threads,
              kMacs > 0 ? macs / elapsed / 1e9 : 0.0, static_cast<long long>(sink.load() & 1));
  return 0;
}

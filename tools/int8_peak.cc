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
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 16;  // independent accumulators: more than latency x throughput

// Per build: the vector type, its multiply-adds per instruction, and one dot step.
#if defined(__AVX512VNNI__)
constexpr const char* kInstruction = "vpdpbusd zmm";
constexpr int kMacs = 64;
using Vector = __m512i;
Vector Splat(int value) { return _mm512_set1_epi32(value); }
Vector Dot(Vector acc, Vector a, Vector b) { return _mm512_dpbusd_epi32(acc, a, b); }
#elif defined(__AVXVNNI__)
constexpr const char* kInstruction = "vpdpbusd ymm (AVX-VNNI)";
constexpr int kMacs = 32;
using Vector = __m256i;
Vector Splat(int value) { return _mm256_set1_epi32(value); }
Vector Dot(Vector acc, Vector a, Vector b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
#elif defined(__AVX2__)
constexpr const char* kInstruction = "vpmaddubsw + vpmaddwd ymm";
constexpr int kMacs = 32;
using Vector = __m256i;
Vector Splat(int value) { return _mm256_set1_epi32(value); }
Vector Dot(Vector acc, Vector a, Vector b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
#endif

#if defined(__AVX2__)
int64_t Spin(int64_t rounds) {
  Vector acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = Splat(i);
  Vector a = Splat(0x03030303), b = Splat(0x05050505);
  for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = Dot(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  // a new value each round: nothing is hoisted
  }
  int64_t sum = 0;
  for (int i = 0; i < kChains; ++i) {
    int32_t lane;
    std::memcpy(&lane, &acc[i], sizeof(lane));
    sum += lane;
  }
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

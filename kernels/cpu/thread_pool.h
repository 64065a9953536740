// A persistent pool of worker threads for the quantized matmul.
//
// One `Run(tasks, fn)` at a time hands out task indices to the calling thread and
// the workers; it returns once every task has finished.  Between runs a worker
// polls (a decode step calls hundreds of small matmuls back to back), yields its
// core to other threads after a while, and sleeps on a futex (C++20 atomic wait)
// after a few milliseconds, so an idle process costs no CPU.
//
// A task is claimed by a compare-and-swap on one word holding (run epoch, next
// task): a worker that wakes late for a finished run cannot claim a task of the
// next one, so the caller never waits for a sleeping worker to wake.

#ifndef SWARM_KERNELS_CPU_THREAD_POOL_H_
#define SWARM_KERNELS_CPU_THREAD_POOL_H_

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace swarm_cpu {

// A hint to the core that this thread spins on a flag (x86 `pause`, ARM `yield`).
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield");
#endif
}

// CPUs this process may run on (the affinity mask, which containers narrow, where the
// OS has one).
inline int UsableCpuCount() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
#endif
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

class ThreadPool {
 public:
  using TaskFn = void (*)(void* context, int task);

  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() {
    stop_.store(true);
    epoch_.fetch_add(1);
    epoch_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Run(tasks, fn) when `parallel` (work enough to pay for waking the workers), else
  // every task in order on the calling thread.
  template <typename Fn>
  void RunIf(bool parallel, int tasks, Fn& fn) {
    if (parallel) return Run(tasks, fn);
    for (int task = 0; task < tasks; ++task) fn(task);
  }

  // Runs fn(task) for every task in [0, tasks); returns when all have finished.
  // A second concurrent caller (another XLA thread) runs its tasks inline.
  template <typename Fn>
  void Run(int tasks, Fn& fn) {
    const TaskFn invoke = [](void* context, int task) { (*static_cast<Fn*>(context))(task); };
    std::unique_lock<std::mutex> lock(run_mutex_, std::try_to_lock);
    if (!lock.owns_lock() || tasks <= 1 || workers_.empty()) {
      for (int task = 0; task < tasks; ++task) fn(task);
      return;
    }
    const uint32_t epoch = epoch_.load(std::memory_order_relaxed) + 1;
    // The claim word moves to the new epoch first, and the fields are released after
    // it: a worker still on the last run that reads a new field cannot claim a task.
    claim_.store(static_cast<uint64_t>(epoch) << 32, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    fn_.store(invoke, std::memory_order_release);
    context_.store(&fn, std::memory_order_release);
    tasks_.store(tasks, std::memory_order_release);
    epoch_.store(epoch, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) epoch_.notify_all();
    while (TryRunOne(epoch, tasks, invoke, &fn)) {
    }
    AwaitTasks(tasks);
  }

 private:
  // The caller's wait for the tasks other threads are still running: out of line, so a
  // profile counts it as the pool's waiting rather than as the kernel that called Run
  // (inlined there, it was most of what `perf` gave the activation quantizer).
  __attribute__((noinline)) void AwaitTasks(int tasks) {
    while (done_.load(std::memory_order_acquire) != tasks) CpuRelax();
  }

  // After a run, a worker polls for the next one (pausing) for kSpin, then keeps
  // polling but yields the core to other runnable threads until kYield, then sleeps.
  // Decode steps issue a matmul every few tens of microseconds; a sleeping worker
  // takes longer than that to wake, especially on a loaded machine.
  static constexpr std::chrono::microseconds kSpin{50};
  static constexpr std::chrono::microseconds kYield{5000};

  bool TryRunOne(uint32_t epoch, int tasks, TaskFn fn, void* context) {
    uint64_t claim = claim_.load(std::memory_order_relaxed);
    while (true) {
      if (static_cast<uint32_t>(claim >> 32) != epoch) return false;
      const int task = static_cast<int>(static_cast<uint32_t>(claim));
      if (task >= tasks) return false;
      if (claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
        fn(context, task);
        done_.fetch_add(1, std::memory_order_release);
        return true;
      }
    }
  }

  uint32_t WaitForEpoch(uint32_t seen) {
    const auto start = std::chrono::steady_clock::now();
    for (int polls = 1;; ++polls) {
      const uint32_t epoch = epoch_.load(std::memory_order_acquire);
      if (epoch != seen) return epoch;
      if (polls % 64 != 0) {
        CpuRelax();
        continue;
      }
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited > kYield) break;
      if (waited > kSpin) sched_yield();
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint32_t epoch = epoch_.load(std::memory_order_seq_cst);
    while (epoch == seen) {
      epoch_.wait(seen, std::memory_order_seq_cst);
      epoch = epoch_.load(std::memory_order_seq_cst);
    }
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return epoch;
  }

  void WorkerLoop() {
    uint32_t seen = 0;
    while (true) {
      seen = WaitForEpoch(seen);
      if (stop_.load()) return;
      // These reads may belong to a later run; the claim's epoch check rejects them then.
      const TaskFn fn = fn_.load(std::memory_order_acquire);
      void* context = context_.load(std::memory_order_acquire);
      const int tasks = tasks_.load(std::memory_order_acquire);
      while (TryRunOne(seen, tasks, fn, context)) {
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  // The words every thread writes during a run each have a cache line of their own: the
  // caller spinning on done_ while workers claim tasks on the same line would take it
  // from them on every poll (measured: a matmul of 4 panels and 8 rows took 4.7 us on
  // two threads against 2.4 us on one).  The run's fields, written once per run, share one.
  alignas(64) std::atomic<uint32_t> epoch_{0};
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<int> done_{0};
  alignas(64) std::atomic<int> tasks_{0};
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> context_{nullptr};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
};

// The process's one pool, shared by every kernel of the library (one translation unit
// each): inline, so all of them get the same instance. Never destroyed: workers sleep
// on a futex, and process exit ends them.
inline ThreadPool& Pool() {
  static ThreadPool* pool = new ThreadPool(UsableCpuCount());
  return *pool;
}

}  // namespace swarm_cpu

#endif  // SWARM_KERNELS_CPU_THREAD_POOL_H_

#include "common/thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ls {
namespace {

// How a thread waits before it blocks: kPauseIterations polls with a pause instruction (on the
// order of 100-500 microseconds on current x86 cores: enough to cover the gaps between the ops of
// a forward step and the short serial work between steps, so a decode step never pays for waking
// a sleeping worker; 256 polls measured ~1.5 % slower batch-1 decode), then polls that yield the
// CPU, so that when there are more runnable threads than cores (a loaded machine, a test run in
// parallel) the thread we wait for gets to run, then sleep.
constexpr int kPauseIterations = 4096;
constexpr int kSpinIterations = kPauseIterations + 64;

inline void CpuRelax(int iteration) {
#if defined(__x86_64__) || defined(__i386__)
  if (iteration < kPauseIterations) {
    _mm_pause();
    return;
  }
#endif
  (void)iteration;
  std::this_thread::yield();
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(num_threads < 1 ? 1 : num_threads) {
  workers_.reserve(num_threads_ - 1);
  for (int t = 1; t < num_threads_; ++t) {
    workers_.emplace_back([this, t] { WorkerLoop(t); });
  }
}

ThreadPool::~ThreadPool() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  work_cv_.SignalAll();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunRange(int thread_index) {
  if (thread_index >= job_parts_) return;
  const int64_t begin = RangeBegin(job_n_, job_parts_, thread_index);
  const int64_t end = RangeBegin(job_n_, job_parts_, thread_index + 1);
  (*job_fn_)(begin, end, thread_index);
}

void ThreadPool::ParallelFor(int64_t n, RangeFn fn) {
  if (n <= 0) return;
  const int parts = n < num_threads_ ? static_cast<int>(n) : num_threads_;
  if (parts == 1) {
    fn(0, n, 0);
    return;
  }
  job_fn_ = &fn;
  job_n_ = n;
  job_parts_ = parts;
  // Every worker acknowledges every generation, including those with no range this time, so that
  // none of them can still be reading job_* when the next call rewrites them.
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    MutexLock lock(&mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_cv_.SignalAll();

  RunRange(0);

  for (int i = 0; i < kSpinIterations; ++i) {
    if (pending_.load(std::memory_order_acquire) == 0) return;
    CpuRelax(i);
  }
  MutexLock lock(&mu_);
  while (pending_.load(std::memory_order_acquire) != 0) done_cv_.Wait(&mu_);
}

void ThreadPool::WorkerLoop(int thread_index) {
  uint64_t seen = 0;
  while (true) {
    uint64_t generation = generation_.load(std::memory_order_acquire);
    for (int i = 0; generation == seen && i < kSpinIterations; ++i) {
      CpuRelax(i);
      generation = generation_.load(std::memory_order_acquire);
    }
    if (generation == seen) {
      MutexLock lock(&mu_);
      while ((generation = generation_.load(std::memory_order_acquire)) == seen && !stop_) {
        work_cv_.Wait(&mu_);
      }
      if (generation == seen) return;  // stop_ with no job pending
    }
    seen = generation;
    RunRange(thread_index);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Taking the lock orders this signal after the caller's check of pending_ under the lock,
      // so the wake-up cannot be lost.
      MutexLock lock(&mu_);
      done_cv_.Signal();
    }
  }
}

}  // namespace ls

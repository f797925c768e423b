// A fixed pool of threads for data-parallel loops inside one op (the CPU backend's kernels).
//
// The pool holds `num_threads - 1` worker threads, created once; the thread that calls
// ParallelFor is the remaining participant (thread index 0). Work is split by a static,
// deterministic partition: thread t always gets the same range for a given (n, num_threads),
// so which thread computes what never depends on timing. Callers that want results independent
// of the thread count too (the kernels do) must make each item's result independent of the
// range it falls in.
//
// Cost per call: no allocation; workers spin briefly on an atomic generation counter after a
// call so that back-to-back calls (the ops of one forward step) wake them without a syscall,
// then block on a condition variable so an idle pool burns no CPU.
//
// Thread safety: ParallelFor is called from one thread at a time (the engine thread); it is not
// reentrant (a body must not call ParallelFor on the same pool). The pool may be destroyed only
// when no ParallelFor is running.
#ifndef LORASERVE_COMMON_THREAD_POOL_H_
#define LORASERVE_COMMON_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "common/mutex.h"

namespace ls {

class ThreadPool {
 public:
  // The body of a loop: processes items [begin, end) on thread `thread_index`
  // (0 <= thread_index < num_threads(); 0 is the calling thread).
  using RangeFn = absl::FunctionRef<void(int64_t begin, int64_t end, int thread_index)>;

  // Starts `num_threads - 1` workers (values below 1 are taken as 1: the caller alone).
  explicit ThreadPool(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs fn over [0, n) split into min(n, num_threads()) contiguous ranges, range t being
  // [Begin(n, T, t), Begin(n, T, t + 1)) with T = min(n, num_threads()), run by thread t; returns
  // when all ranges are done. Does nothing for n <= 0. With T == 1 the caller runs the whole range
  // itself without waking the workers.
  void ParallelFor(int64_t n, RangeFn fn);

  // The start of range t when n items are split into `parts` ranges: floor(n * t / parts).
  // Sizes differ by at most one.
  static int64_t RangeBegin(int64_t n, int parts, int t) {
    return (n / parts) * t + (n % parts) * t / parts;
  }

 private:
  void WorkerLoop(int thread_index);
  void RunRange(int thread_index);

  const int num_threads_;

  // The current job. Written by the caller before it publishes a new generation (release) and
  // read by workers after they observe it (acquire); the caller does not touch them again until
  // every worker has acknowledged the generation through pending_.
  const RangeFn* job_fn_ = nullptr;
  int64_t job_n_ = 0;
  int job_parts_ = 0;

  // Incremented (under mu_, so sleepers cannot miss it) once per job that needs the workers.
  std::atomic<uint64_t> generation_{0};
  // Workers that have not yet finished the current generation; the last one to finish signals
  // done_cv_ (under mu_).
  std::atomic<int> pending_{0};

  Mutex mu_;
  CondVar work_cv_;                         // workers wait here for a new generation or stop_
  CondVar done_cv_;                         // the caller waits here for pending_ == 0
  bool stop_ ABSL_GUARDED_BY(mu_) = false;  // set once, by the destructor

  std::vector<std::thread> workers_;
};

}  // namespace ls

#endif  // LORASERVE_COMMON_THREAD_POOL_H_

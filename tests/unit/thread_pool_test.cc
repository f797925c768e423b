// ThreadPool: every item covered exactly once, the partition is the documented static one (so
// results never depend on timing), many back-to-back calls (the spin and the sleep paths), fewer
// items than threads, and n = 0. Runs under TSan (label `concurrency`).
#include "common/thread_pool.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace ls {
namespace {

struct Range {
  int64_t begin = -1;
  int64_t end = -1;
  int calls = 0;
};

// Runs one ParallelFor and records, per thread index, the range it got.
std::vector<Range> RecordRanges(ThreadPool& pool, int64_t n) {
  std::vector<Range> ranges(pool.num_threads());
  pool.ParallelFor(n, [&](int64_t begin, int64_t end, int thread_index) {
    Range& r = ranges[thread_index];
    r.begin = begin;
    r.end = end;
    ++r.calls;
  });
  return ranges;
}

TEST(ThreadPool, NumThreads) {
  EXPECT_EQ(ThreadPool(1).num_threads(), 1);
  EXPECT_EQ(ThreadPool(3).num_threads(), 3);
  EXPECT_EQ(ThreadPool(0).num_threads(), 1);
  EXPECT_EQ(ThreadPool(-2).num_threads(), 1);
}

TEST(ThreadPool, EveryItemExactlyOnce) {
  for (int threads : {1, 2, 3, 4, 7}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 3, 5, 7, 8, 64, 1000, 4097}) {
      std::vector<std::atomic<int>> hits(n);
      for (auto& h : hits) h.store(0);
      pool.ParallelFor(n, [&](int64_t begin, int64_t end, int thread_index) {
        ASSERT_GE(thread_index, 0);
        ASSERT_LT(thread_index, threads);
        ASSERT_LE(0, begin);
        ASSERT_LT(begin, end);
        ASSERT_LE(end, n);
        for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
      });
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(hits[i].load(), 1) << "threads=" << threads << " n=" << n << " item " << i;
      }
    }
  }
}

TEST(ThreadPool, PartitionIsTheDocumentedStaticOne) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 3, 4, 5, 6, 10, 11, 100, 101}) {
      const int parts = n < threads ? static_cast<int>(n) : threads;
      // Several calls: the partition must be the same every time, whatever the timing.
      for (int rep = 0; rep < 20; ++rep) {
        const std::vector<Range> ranges = RecordRanges(pool, n);
        for (int t = 0; t < threads; ++t) {
          if (t < parts) {
            EXPECT_EQ(ranges[t].calls, 1) << "threads=" << threads << " n=" << n << " t=" << t;
            EXPECT_EQ(ranges[t].begin, ThreadPool::RangeBegin(n, parts, t));
            EXPECT_EQ(ranges[t].end, ThreadPool::RangeBegin(n, parts, t + 1));
          } else {
            EXPECT_EQ(ranges[t].calls, 0) << "threads=" << threads << " n=" << n << " t=" << t;
          }
        }
      }
    }
  }
}

TEST(ThreadPool, RangeBeginSplitsEvenly) {
  EXPECT_EQ(ThreadPool::RangeBegin(10, 3, 0), 0);
  EXPECT_EQ(ThreadPool::RangeBegin(10, 3, 1), 3);
  EXPECT_EQ(ThreadPool::RangeBegin(10, 3, 2), 6);
  EXPECT_EQ(ThreadPool::RangeBegin(10, 3, 3), 10);
  // No overflow for huge n.
  const int64_t big = int64_t{1} << 62;
  EXPECT_EQ(ThreadPool::RangeBegin(big, 4, 3), big / 4 * 3);
  EXPECT_EQ(ThreadPool::RangeBegin(big, 4, 4), big);
  for (int64_t n = 0; n < 50; ++n) {
    for (int parts = 1; parts < 9; ++parts) {
      for (int t = 0; t < parts; ++t) {
        const int64_t size =
            ThreadPool::RangeBegin(n, parts, t + 1) - ThreadPool::RangeBegin(n, parts, t);
        EXPECT_TRUE(size == n / parts || size == n / parts + 1);
      }
    }
  }
}

TEST(ThreadPool, CallerIsThreadZero) {
  ThreadPool pool(2);
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<std::thread::id> ids(2);
  pool.ParallelFor(2, [&](int64_t, int64_t, int thread_index) {
    ids[thread_index] = std::this_thread::get_id();
  });
  EXPECT_EQ(ids[0], caller);
  EXPECT_NE(ids[1], caller);
}

TEST(ThreadPool, ZeroAndNegativeItemsDoNothing) {
  ThreadPool pool(3);
  int calls = 0;
  pool.ParallelFor(0, [&](int64_t, int64_t, int) { ++calls; });
  pool.ParallelFor(-5, [&](int64_t, int64_t, int) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(ThreadPool, FewerItemsThanThreads) {
  ThreadPool pool(4);
  for (int64_t n = 1; n <= 3; ++n) {
    const std::vector<Range> ranges = RecordRanges(pool, n);
    for (int t = 0; t < 4; ++t) {
      if (t < n) {
        EXPECT_EQ(ranges[t].calls, 1);
        EXPECT_EQ(ranges[t].end - ranges[t].begin, 1);
        EXPECT_EQ(ranges[t].begin, t);
      } else {
        EXPECT_EQ(ranges[t].calls, 0);
      }
    }
  }
}

TEST(ThreadPool, ManyConsecutiveCalls) {
  ThreadPool pool(3);
  std::vector<int64_t> per_thread_sum(3, 0);  // each slot written by one thread only
  int64_t expected = 0;
  for (int call = 0; call < 20000; ++call) {
    const int64_t n = 1 + call % 37;
    pool.ParallelFor(n, [&](int64_t begin, int64_t end, int thread_index) {
      for (int64_t i = begin; i < end; ++i) per_thread_sum[thread_index] += i;
    });
    expected += n * (n - 1) / 2;
  }
  EXPECT_EQ(per_thread_sum[0] + per_thread_sum[1] + per_thread_sum[2], expected);
}

TEST(ThreadPool, WakesUpAfterWorkersWentToSleep) {
  ThreadPool pool(2);
  for (int round = 0; round < 5; ++round) {
    // Long enough for the workers to stop spinning and block on the condition variable.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::vector<int> seen(2, 0);
    pool.ParallelFor(2, [&](int64_t begin, int64_t, int thread_index) {
      seen[thread_index] = static_cast<int>(begin) + 1;
    });
    EXPECT_EQ(seen[0], 1);
    EXPECT_EQ(seen[1], 2);
  }
}

TEST(ThreadPool, ResultsSeenByCallerAfterReturn) {
  // Plain (non-atomic) writes by the workers must be visible to the caller once ParallelFor
  // returns; TSan checks the happens-before edge.
  ThreadPool pool(4);
  std::vector<double> out(1000, 0.0);
  for (int rep = 0; rep < 100; ++rep) {
    pool.ParallelFor(static_cast<int64_t>(out.size()), [&](int64_t begin, int64_t end, int) {
      for (int64_t i = begin; i < end; ++i) out[i] = static_cast<double>(i * rep);
    });
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<double>(i * rep));
  }
}

TEST(ThreadPool, DestroyWhileWorkersSpinOrSleep) {
  for (int rep = 0; rep < 50; ++rep) {
    ThreadPool pool(3);
    if (rep % 2 == 0) pool.ParallelFor(3, [](int64_t, int64_t, int) {});
  }
}

}  // namespace
}  // namespace ls

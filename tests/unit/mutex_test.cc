// The Mutex/CondVar wrapper under contention (runs under TSan, which must see the std::mutex
// underneath): a counter guarded by the mutex and a producer/consumer hand-off.
#include "common/mutex.h"

#include <deque>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace ls {
namespace {

TEST(Mutex, GuardsACounter) {
  Mutex mu;
  int64_t counter = 0;  // guarded by mu
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        MutexLock lock(&mu);
        ++counter;
      }
    });
  }
  for (auto& t : threads) t.join();
  MutexLock lock(&mu);
  EXPECT_EQ(counter, 40000);
}

TEST(CondVar, ProducerConsumer) {
  Mutex mu;
  CondVar cv;
  std::deque<int> queue;
  bool done = false;
  int64_t sum = 0;
  std::thread consumer([&] {
    MutexLock lock(&mu);
    while (true) {
      while (queue.empty() && !done) cv.Wait(&mu);
      if (queue.empty()) break;
      sum += queue.front();
      queue.pop_front();
    }
  });
  for (int i = 1; i <= 1000; ++i) {
    MutexLock lock(&mu);
    queue.push_back(i);
    cv.Signal();
  }
  {
    MutexLock lock(&mu);
    done = true;
    cv.SignalAll();
  }
  consumer.join();
  EXPECT_EQ(sum, 1000 * 1001 / 2);
}

TEST(CondVar, DeadlineExpires) {
  Mutex mu;
  CondVar cv;
  MutexLock lock(&mu);
  const absl::Time deadline = absl::Now() + absl::Milliseconds(10);
  while (cv.WaitWithDeadline(&mu, deadline)) {
  }
  EXPECT_GE(absl::Now(), deadline);
}

}  // namespace
}  // namespace ls

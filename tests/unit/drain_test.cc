// DrainGate under concurrent use: tickets issued before a drain keep running, none are issued
// after it, and WaitIdle returns exactly when the last ticket is released. Runs under TSan.
#include "server/drain.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace ls {
namespace {

TEST(DrainGate, RefusesAfterDrainStarts) {
  DrainGate gate;
  DrainGate::Ticket before = gate.Enter();
  EXPECT_TRUE(before);
  gate.StartDrain();
  DrainGate::Ticket after = gate.Enter();
  EXPECT_FALSE(after);
  EXPECT_EQ(gate.in_flight(), 1);
  EXPECT_FALSE(gate.WaitIdle(absl::Now() + absl::Milliseconds(20)));
  before.Release();
  EXPECT_TRUE(gate.WaitIdle(absl::Now()));
  EXPECT_EQ(gate.in_flight(), 0);
}

TEST(DrainGate, MovedTicketReleasesOnce) {
  DrainGate gate;
  DrainGate::Ticket a = gate.Enter();
  DrainGate::Ticket b = std::move(a);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(gate.in_flight(), 1);
  b = DrainGate::Ticket();
  EXPECT_EQ(gate.in_flight(), 0);
}

TEST(DrainGate, ConcurrentEntersAndDrain) {
  DrainGate gate;
  std::atomic<bool> stop{false};
  std::atomic<int> admitted_after_drain{0};
  std::atomic<bool> drained_flag{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < 8; ++t) {
    workers.emplace_back([&] {
      while (!stop.load()) {
        const bool drain_seen_before = drained_flag.load();
        DrainGate::Ticket ticket = gate.Enter();
        if (ticket && drain_seen_before) admitted_after_drain.fetch_add(1);
        std::this_thread::yield();
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  gate.StartDrain();
  drained_flag.store(true);
  EXPECT_TRUE(gate.WaitIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(gate.in_flight(), 0);
  stop.store(true);
  for (auto& w : workers) w.join();
  EXPECT_EQ(admitted_after_drain.load(), 0);
}

TEST(DrainGate, WaitIdleWakesWhenLastTicketLeaves) {
  DrainGate gate;
  std::vector<DrainGate::Ticket> tickets;
  for (int i = 0; i < 4; ++i) tickets.push_back(gate.Enter());
  gate.StartDrain();
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    tickets.clear();
  });
  const absl::Time start = absl::Now();
  EXPECT_TRUE(gate.WaitIdle(start + absl::Seconds(30)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(25));
  releaser.join();
}

}  // namespace
}  // namespace ls

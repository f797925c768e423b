// Scheduler (server/engine/scheduler.h): admission by KV budget, chunked prefill under
// max_step_tokens, decode + prefill mixing, rows grouped by adapter, non-resident adapters that
// wait without blocking others, max_loras_per_step with rotation, preemption of the newest
// request and its later completion, no starvation across adapters, and a seeded randomized
// simulation that checks the invariants after every step.
#include "server/engine/scheduler.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ls {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

bool AllResident(AdapterKey) { return true; }

std::unique_ptr<Scheduler> Make(int32_t blocks, int32_t block_size, int32_t max_step,
                                int32_t max_loras = 8, int32_t max_running = 0) {
  SchedulerConfig c;
  c.num_kv_blocks = blocks;
  c.kv_block_size = block_size;
  c.max_step_tokens = max_step;
  c.max_loras_per_step = max_loras;
  c.max_model_len = 4096;
  c.max_running = max_running;
  auto s = Scheduler::Create(c);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(s).value();
}

void AddReq(Scheduler& s, RequestId id, AdapterKey key, int32_t prompt, int32_t max_new) {
  ASSERT_TRUE(s.Add({id, key, prompt, max_new}).ok());
}

// Drives steps, checks per-step invariants, counts sampled tokens per id.
class Driver {
 public:
  explicit Driver(Scheduler& s) : s_(s) {}

  template <typename Resident>
  StepPlan Step(Resident resident) {
    const StepPlan& plan = s_.Schedule(resident);
    Check(plan);
    StepPlan copy = plan;
    for (const ScheduledSeq& q : plan.seqs) {
      if (q.samples) ++sampled_[q.id];
    }
    for (RequestId id : s_.CommitStep()) finished_.push_back(id);
    return copy;
  }
  StepPlan Step() { return Step(AllResident); }

  void Check(const StepPlan& plan) {
    const SchedulerConfig& c = s_.config();
    ASSERT_LE(plan.num_rows, c.max_step_tokens);
    ASSERT_GE(s_.num_free_blocks(), 0);
    ASSERT_LE(plan.num_adapters, c.max_loras_per_step);
    int32_t rows = 0;
    std::set<RequestId> ids;
    std::set<AdapterKey> keys;
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
      const ScheduledSeq& q = plan.seqs[i];
      ASSERT_TRUE(ids.insert(q.id).second) << "id twice in a step";
      ASSERT_EQ(q.row_begin, rows);
      ASSERT_GT(q.num_tokens, 0);
      rows += q.num_tokens;
      if (i > 0) {
        // Grouped by adapter key, deterministic (key, arrival) order.
        const ScheduledSeq& p = plan.seqs[i - 1];
        ASSERT_LE(p.adapter_key, q.adapter_key);
        if (p.adapter_key == q.adapter_key) {
          ASSERT_LT(s_.Find(p.id)->arrival, s_.Find(q.id)->arrival);
        }
      }
      if (q.adapter_key != kBaseAdapterKey) keys.insert(q.adapter_key);
      const RequestView* r = s_.Find(q.id);
      ASSERT_NE(r, nullptr);
      ASSERT_EQ(r->state, RequestState::kRunning);
      ASSERT_GE(int64_t{q.num_blocks} * c.kv_block_size, q.position + q.num_tokens);
      ASSERT_GE(q.num_new_blocks, 0);
    }
    ASSERT_EQ(rows, plan.num_rows);
    ASSERT_EQ(static_cast<int32_t>(keys.size()), plan.num_adapters);
    for (RequestId id : plan.preempted) {
      ASSERT_EQ(ids.count(id), 0u);
      ASSERT_EQ(s_.Find(id)->state, RequestState::kWaiting);
      ASSERT_EQ(s_.Find(id)->blocks, 0);
    }
    // Segments cover the rows, one per key run.
    int32_t end = 0;
    for (const AdapterSegment& seg : plan.segments) {
      ASSERT_EQ(seg.row_begin, end);
      ASSERT_GT(seg.row_end, seg.row_begin);
      end = seg.row_end;
    }
    ASSERT_EQ(end, plan.num_rows);
  }

  std::map<RequestId, int32_t> sampled_;
  std::vector<RequestId> finished_;

 private:
  Scheduler& s_;
};

TEST(SchedulerTest, RejectsBadRequests) {
  auto s = Make(4, 4, 64);
  EXPECT_EQ(s->Add({1, 0, 0, 4}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->Add({1, 0, 4000, 200}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->Add({1, 0, 16, 2}).code(), absl::StatusCode::kInvalidArgument);  // 17 > 16 slots
  EXPECT_TRUE(s->Add({1, 0, 16, 1}).ok());
  EXPECT_EQ(s->Add({1, 0, 4, 1}).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(s->Drop(99).status().code(), absl::StatusCode::kNotFound);
  SchedulerConfig bad;
  EXPECT_FALSE(Scheduler::Create(bad).ok());
}

TEST(SchedulerTest, AdmissionByKvBudget) {
  auto s = Make(/*blocks=*/3, /*block_size=*/4, /*max_step=*/64);
  AddReq(*s, 1, 0, 12, 1);  // 3 blocks: the whole pool.
  AddReq(*s, 2, 0, 4, 1);
  Driver d(*s);
  StepPlan p = d.Step();
  EXPECT_THAT(p.admitted, ElementsAre(1u));  // 2 waits: no block left for its first chunk.
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].num_new_blocks, 3);
  EXPECT_TRUE(p.seqs[0].samples);
  EXPECT_THAT(d.finished_, ElementsAre(1u));  // max_new 1: retired, blocks freed.
  EXPECT_EQ(s->num_free_blocks(), 3);
  EXPECT_EQ(s->Find(2)->state, RequestState::kWaiting);
  p = d.Step();
  EXPECT_THAT(p.admitted, ElementsAre(2u));
  EXPECT_THAT(d.finished_, ElementsAre(1u, 2u));
}

TEST(SchedulerTest, ChunkedPrefillOverSeveralSteps) {
  auto s = Make(64, 4, /*max_step=*/8);
  AddReq(*s, 1, 0, 20, 2);
  Driver d(*s);
  std::vector<int32_t> chunks;
  std::vector<bool> samples;
  while (d.finished_.empty()) {
    StepPlan p = d.Step();
    ASSERT_EQ(p.seqs.size(), 1u);
    chunks.push_back(p.seqs[0].num_tokens);
    samples.push_back(p.seqs[0].samples);
  }
  EXPECT_THAT(chunks, ElementsAre(8, 8, 4, 1));
  EXPECT_THAT(samples, ElementsAre(false, false, true, true));
  EXPECT_EQ(s->num_free_blocks(), 64);
}

TEST(SchedulerTest, DecodeRowsFirstThenPrefillChunks) {
  auto s = Make(64, 4, /*max_step=*/8);
  AddReq(*s, 1, 0, 4, 10);
  Driver d(*s);
  d.Step();  // Prefill of 1; it now decodes.
  AddReq(*s, 2, 0, 20, 1);
  StepPlan p = d.Step();
  ASSERT_EQ(p.seqs.size(), 2u);
  EXPECT_EQ(p.num_rows_decode, 1);
  EXPECT_EQ(p.num_rows_prefill, 7);
  EXPECT_EQ(p.seqs[0].id, 1u);
  EXPECT_FALSE(p.seqs[0].is_prefill);
  EXPECT_EQ(p.seqs[1].num_tokens, 7);
  p = d.Step();
  EXPECT_EQ(p.num_rows, 8);
  EXPECT_EQ(p.seqs[1].num_tokens, 7);
}

TEST(SchedulerTest, RowsGroupedByAdapterAndDeterministic) {
  auto run = [] {
    auto s = Make(256, 4, 256);
    const AdapterKey keys[] = {3, 1, 0, 3, 1, 2, 0, 3};
    for (RequestId id = 0; id < 8; ++id) AddReq(*s, id + 1, keys[id], 5 + int32_t(id), 3);
    Driver d(*s);
    std::vector<StepPlan> plans;
    for (int i = 0; i < 3; ++i) plans.push_back(d.Step());
    return plans;
  };
  std::vector<StepPlan> a = run(), b = run();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].seqs.size(), b[i].seqs.size());
    for (size_t j = 0; j < a[i].seqs.size(); ++j) {
      EXPECT_EQ(a[i].seqs[j].id, b[i].seqs[j].id);
      EXPECT_EQ(a[i].seqs[j].row_begin, b[i].seqs[j].row_begin);
    }
  }
  std::vector<AdapterKey> seg_keys;
  for (const AdapterSegment& seg : a[0].segments) seg_keys.push_back(seg.adapter_key);
  EXPECT_THAT(seg_keys, ElementsAre(0u, 1u, 2u, 3u));
  EXPECT_EQ(a[0].num_adapters, 3);
  EXPECT_EQ(a[0].seqs[0].id, 3u);  // Base key, oldest first.
  EXPECT_EQ(a[0].seqs[1].id, 7u);
}

TEST(SchedulerTest, NonResidentAdapterWaitsWithoutBlockingOthers) {
  auto s = Make(64, 4, 64);
  AddReq(*s, 1, 5, 4, 2);  // Oldest, but adapter 5 is still loading.
  AddReq(*s, 2, 0, 4, 2);
  AddReq(*s, 3, 6, 4, 2);
  AddReq(*s, 4, 5, 4, 2);
  Driver d(*s);
  bool loaded = false;
  auto resident = [&](AdapterKey k) { return k != 5 || loaded; };
  StepPlan p = d.Step(resident);
  EXPECT_THAT(p.admitted, ElementsAre(2u, 3u));
  EXPECT_THAT(p.adapters_to_load, ElementsAre(5u));
  EXPECT_EQ(s->Find(1)->state, RequestState::kWaiting);
  p = d.Step(resident);
  EXPECT_THAT(d.finished_, ElementsAre(2u, 3u));
  loaded = true;
  p = d.Step(resident);
  EXPECT_THAT(p.admitted, ElementsAre(1u, 4u));
  EXPECT_THAT(p.adapters_to_load, IsEmpty());
}

TEST(SchedulerTest, MaxLorasPerStepHonoredAndRotated) {
  auto s = Make(1024, 4, 64, /*max_loras=*/2, /*max_running=*/4);
  RequestId id = 1;
  for (int i = 0; i < 30; ++i) {
    for (AdapterKey k = 1; k <= 3; ++k) AddReq(*s, id++, k, 4, 4);
  }
  Driver d(*s);
  std::map<AdapterKey, int> first_step;
  for (int step = 0; step < 2000 && d.finished_.size() < 90; ++step) {
    StepPlan p = d.Step();
    EXPECT_LE(p.num_adapters, 2);
    for (const ScheduledSeq& q : p.seqs) first_step.emplace(q.adapter_key, step);
  }
  EXPECT_EQ(d.finished_.size(), 90u);
  ASSERT_EQ(first_step.size(), 3u);
  EXPECT_LE(first_step[3], 20);  // The third adapter rotates in while the others still wait.
}

TEST(SchedulerTest, PreemptsNewestUnderKvPressureThenCompletes) {
  // Two requests that each need 5 blocks of 4 tokens, a pool of 6.
  auto s = Make(/*blocks=*/6, /*block_size=*/4, /*max_step=*/64);
  AddReq(*s, 1, 0, 8, 12);
  AddReq(*s, 2, 0, 8, 12);
  Driver d(*s);
  std::vector<RequestId> preempted;
  int32_t generated_at_preemption = -1;
  for (int step = 0; step < 200 && d.finished_.size() < 2; ++step) {
    StepPlan p = d.Step();
    for (RequestId v : p.preempted) {
      preempted.push_back(v);
      if (generated_at_preemption < 0) {
        generated_at_preemption = s->Find(v)->generated;
        EXPECT_EQ(s->Find(v)->computed, 0);
      }
    }
  }
  ASSERT_FALSE(preempted.empty());
  for (RequestId v : preempted) EXPECT_EQ(v, 2u);  // Always the newest, never the oldest.
  EXPECT_GT(generated_at_preemption, 0);           // Its tokens were kept.
  EXPECT_THAT(d.finished_, ElementsAre(1u, 2u));
  EXPECT_EQ(d.sampled_[1], 12);
  EXPECT_EQ(d.sampled_[2], 12);  // No token lost or repeated across the recompute.
  EXPECT_EQ(s->num_free_blocks(), 6);
}

TEST(SchedulerTest, NoStarvationOfQuietAdapter) {
  for (int32_t max_loras : {1, 4}) {
    auto s = Make(256, 4, 32, max_loras, /*max_running=*/8);
    RequestId id = 1;
    for (int i = 0; i < 300; ++i) AddReq(*s, id++, /*A=*/7, 16, 16);
    Driver d(*s);
    for (int i = 0; i < 5; ++i) d.Step();
    const RequestId b = id++;
    AddReq(*s, b, /*B=*/9, 16, 4);
    int admitted_after = -1;
    int a_admitted_first = 0;  // A requests admitted after B arrived, before B.
    for (int step = 0; step < 100 && admitted_after < 0; ++step) {
      StepPlan p = d.Step();
      for (RequestId a : p.admitted) {
        if (a == b) {
          admitted_after = step;
          break;
        }
        ++a_admitted_first;
      }
    }
    ASSERT_GE(admitted_after, 0) << "max_loras " << max_loras;
    // Bounded by the running cap (an A request must finish, <= 17 steps), not by A's backlog
    // of 300; round robin gives B the next slot (at most one A admission goes first).
    EXPECT_LE(admitted_after, 20) << "max_loras " << max_loras;
    EXPECT_LE(a_admitted_first, 1) << "max_loras " << max_loras;
  }
}

TEST(SchedulerTest, HigherPriorityAdmittedFirstAcrossAndWithinKeys) {
  // One running slot: the admission order is the order requests start.
  auto s = Make(256, 4, 64, 8, /*max_running=*/1);
  auto add = [&](RequestId id, AdapterKey key, int32_t priority) {
    NewRequest r{id, key, 8, 1};
    r.priority = priority;
    ASSERT_TRUE(s->Add(r).ok());
  };
  add(1, 0, 0);   // base, normal
  add(2, 7, -5);  // A, low
  add(3, 7, 10);  // A, high: jumps ahead of 2 within A
  add(4, 9, 10);  // B, high
  add(5, 0, 50);  // base, highest
  add(6, 9, 0);   // B, normal
  Driver d(*s);
  std::vector<RequestId> order;
  for (int step = 0; step < 40 && order.size() < 6; ++step) {
    for (RequestId id : d.Step().admitted) order.push_back(id);
  }
  // 5 (50); then 3 and 4 (10; round robin between keys A and B); then 1 and 6 (0); then 2.
  ASSERT_EQ(order.size(), 6u);
  EXPECT_EQ(order[0], 5u);
  EXPECT_EQ(std::vector<RequestId>(order.begin() + 1, order.begin() + 3),
            (std::vector<RequestId>{3, 4}));
  std::vector<RequestId> normal(order.begin() + 3, order.begin() + 5);
  std::sort(normal.begin(), normal.end());
  EXPECT_EQ(normal, (std::vector<RequestId>{1, 6}));
  EXPECT_EQ(order[5], 2u);
}

TEST(SchedulerTest, DropFreesBlocks) {
  auto s = Make(16, 4, 64);
  AddReq(*s, 1, 0, 10, 5);
  AddReq(*s, 2, 0, 4, 5);
  Driver d(*s);
  d.Step();
  EXPECT_EQ(s->num_free_blocks(), 16 - 3 - 1);
  EXPECT_EQ(s->Drop(1).value(), 3);
  EXPECT_EQ(s->num_free_blocks(), 15);
  EXPECT_EQ(s->Find(1), nullptr);
  EXPECT_EQ(s->num_running(), 1);
}

TEST(SchedulerTest, RandomizedSimulationKeepsInvariants) {
  std::mt19937 rng(20261129);
  SchedulerConfig c;
  c.num_kv_blocks = 96;
  c.kv_block_size = 8;
  c.max_step_tokens = 64;
  c.max_loras_per_step = 3;
  c.max_model_len = 512;
  c.max_running = 16;
  auto s = std::move(Scheduler::Create(c)).value();
  Driver d(*s);
  std::set<AdapterKey> resident = {1, 2};
  std::map<RequestId, int32_t> max_new;
  std::set<RequestId> live, dropped;
  RequestId next_id = 1;
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto is_res = [&](AdapterKey k) { return resident.count(k) > 0; };
  int num_preempted = 0, step = 0;
  int32_t max_adapters = 0, max_rows = 0;
  for (; step < 3000 || !live.empty(); ++step) {
    ASSERT_LT(step, 20000) << "requests never finished: " << live.size();
    if (step < 3000 && uni(0, 99) < 45) {
      const int32_t prompt = uni(1, 200), mx = uni(1, 60);
      const AdapterKey key = uni(0, 99) < 20 ? 0 : static_cast<AdapterKey>(uni(1, 7));
      ASSERT_TRUE(s->Add({next_id, key, prompt, mx}).ok());
      max_new[next_id] = mx;
      live.insert(next_id++);
    }
    // Adapters load and get evicted; after the arrivals stop, everything becomes resident.
    if (step >= 3000) {
      for (AdapterKey k = 1; k <= 7; ++k) resident.insert(k);
    } else if (uni(0, 99) < 5) {
      const AdapterKey k = static_cast<AdapterKey>(uni(1, 7));
      if (resident.count(k)) {
        resident.erase(k);
      } else {
        resident.insert(k);
      }
    }
    if (!live.empty() && uni(0, 999) < 5) {  // Client cancel.
      auto it = live.begin();
      std::advance(it, uni(0, static_cast<int>(live.size()) - 1));
      ASSERT_TRUE(s->Drop(*it).ok());
      dropped.insert(*it);
      live.erase(it);
    }
    const size_t before = d.finished_.size();
    const StepPlan p = d.Step(is_res);
    num_preempted += static_cast<int>(p.preempted.size());
    max_adapters = std::max(max_adapters, p.num_adapters);
    max_rows = std::max(max_rows, p.num_rows);
    if (::testing::Test::HasFatalFailure()) return;
    for (size_t i = before; i < d.finished_.size(); ++i) live.erase(d.finished_[i]);
    // Blocks never over-committed: free + held == pool; running and waiting are disjoint.
    int32_t held = 0, running = 0, waiting = 0;
    for (RequestId id : live) {
      const RequestView* r = s->Find(id);
      ASSERT_NE(r, nullptr);
      held += r->blocks;
      if (r->state == RequestState::kRunning) {
        ++running;
      } else {
        ++waiting;
        ASSERT_EQ(r->blocks, 0);
        ASSERT_EQ(r->computed, 0);
      }
    }
    ASSERT_EQ(held + s->num_free_blocks(), c.num_kv_blocks);
    ASSERT_EQ(running, s->num_running());
    ASSERT_EQ(waiting, s->num_waiting());
    ASSERT_LE(running, c.max_running);
  }
  EXPECT_EQ(s->num_free_blocks(), c.num_kv_blocks);
  EXPECT_EQ(d.finished_.size() + dropped.size(), next_id - 1);
  for (RequestId id : d.finished_) EXPECT_EQ(d.sampled_[id], max_new[id]) << id;
  // The run exercised the limits it checks.
  EXPECT_GT(num_preempted, 0);
  EXPECT_EQ(max_adapters, c.max_loras_per_step);
  EXPECT_EQ(max_rows, c.max_step_tokens);
}

}  // namespace
}  // namespace ls

// The engine's scheduling policy: which requests run in the next step, how many tokens each
// feeds, in which row order, and whom to preempt when KV blocks run out. Pure bookkeeping: no
// model, no threads, no gRPC, no clock, so every decision is deterministic and unit-testable.
// docs/scheduler.md is the policy in prose; this header is the contract.
//
// Token accounting of one request. Its context is prompt_len + generated tokens; `computed`
// of them are in the KV cache. A request feeds context - computed tokens: more than one is a
// prefill (chunked across steps if needed), exactly one is a decode step (the last sampled
// token). When a step feeds the last token of the context, that row samples, and CommitStep
// counts the new token (generated += 1).
//
// KV blocks. The scheduler models the engine's KvCache as a counter of num_kv_blocks blocks of
// kv_block_size tokens; a request holding `blocks` covers blocks * kv_block_size tokens. The
// plan is the only allocator: the engine applies it to the real cache in this order — free
// every block of each id in StepPlan::preempted, then allocate ScheduledSeq::num_new_blocks for
// each scheduled sequence — and both sides always agree, so allocation never fails. Drop() and
// the requests CommitStep() retires free their blocks the same way.
//
// Thread safety: none. The engine thread owns the Scheduler and is the only caller.
#ifndef LORASERVE_SERVER_ENGINE_SCHEDULER_H_
#define LORASERVE_SERVER_ENGINE_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ls {

using RequestId = uint64_t;
// Identifies one adapter version; 0 is the base model (no adapter).
using AdapterKey = uint64_t;
inline constexpr AdapterKey kBaseAdapterKey = 0;

struct SchedulerConfig {
  int32_t num_kv_blocks = 0;       // Blocks in the KV pool.
  int32_t kv_block_size = 16;      // Tokens per block.
  int32_t max_step_tokens = 2048;  // --max_step_tokens: rows (tokens) per step.
  int32_t max_loras_per_step = 8;  // --max_loras_per_step: distinct non-base adapters per step.
  int32_t max_model_len = 4096;    // --max_model_len: prompt + max new tokens.
  // Requests running at once; 0 means max_step_tokens (so every decode row always fits).
  int32_t max_running = 0;
};

// What the engine tells the scheduler about a new request.
struct NewRequest {
  RequestId id = 0;
  AdapterKey adapter_key = kBaseAdapterKey;
  int32_t prompt_len = 0;
  int32_t max_new_tokens = 0;
  // Admission order: higher first (docs/scheduler.md, "Priority"). Never preempts.
  int32_t priority = 0;
};

enum class RequestState { kWaiting, kRunning };

// A read-only view of one request's bookkeeping.
struct RequestView {
  RequestId id = 0;
  uint64_t arrival = 0;  // Order of Add(); preemption and FIFO order use it.
  AdapterKey adapter_key = kBaseAdapterKey;
  int32_t prompt_len = 0;
  int32_t max_new_tokens = 0;
  int32_t priority = 0;
  int32_t generated = 0;  // Kept across preemption; re-prefilled as context.
  int32_t computed = 0;   // Tokens in KV.
  int32_t blocks = 0;     // KV blocks held.
  int32_t num_preemptions = 0;
  RequestState state = RequestState::kWaiting;
};

// One request's share of a step: rows [row_begin, row_begin + num_tokens) of the flat batch
// hold its context tokens [position, position + num_tokens).
struct ScheduledSeq {
  RequestId id = 0;
  AdapterKey adapter_key = kBaseAdapterKey;
  int32_t row_begin = 0;
  int32_t position = 0;
  int32_t num_tokens = 0;
  int32_t num_new_blocks = 0;  // Allocate these before running the step.
  int32_t num_blocks = 0;      // Blocks held after that allocation.
  bool is_prefill = false;     // More than one context token was left to feed.
  bool samples = false;        // The last row samples the next token.
};

// Rows [row_begin, row_end) share one adapter (SGMV segments).
struct AdapterSegment {
  AdapterKey adapter_key = kBaseAdapterKey;
  int32_t row_begin = 0;
  int32_t row_end = 0;
};

struct StepPlan {
  // Ordered by (adapter_key, arrival): each adapter's rows are contiguous.
  std::vector<ScheduledSeq> seqs;
  std::vector<AdapterSegment> segments;
  std::vector<RequestId> preempted;  // Free all their blocks first; they are waiting again.
  std::vector<RequestId> admitted;   // Moved from waiting to running in this step.
  // Keys that have waiting requests but were reported not resident: start their loads.
  std::vector<AdapterKey> adapters_to_load;
  int32_t num_rows = 0;
  int32_t num_rows_decode = 0;
  int32_t num_rows_prefill = 0;
  int32_t num_adapters = 0;  // Distinct non-base keys among seqs.
  bool empty() const { return seqs.empty(); }
};

class Scheduler {
 public:
  // INVALID_ARGUMENT when a size is not positive.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const SchedulerConfig& config);

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request (waiting). INVALID_ARGUMENT for non-positive lengths, prompt + max new
  // tokens over max_model_len, or a request whose full context would not fit the whole KV pool
  // (it could never finish); ALREADY_EXISTS for a known id.
  absl::Status Add(const NewRequest& request);

  // Forgets a request (finished, cancelled, deadline) and frees its blocks: the engine frees
  // the same blocks in its cache. Returns the number of blocks freed; NOT_FOUND if unknown.
  absl::StatusOr<int32_t> Drop(RequestId id);

  // Plans the next step. `is_resident(key)` says whether an adapter can run now (the base key
  // is always resident and is not asked). Applies the plan to the bookkeeping (blocks, computed,
  // waiting/running) at once; the returned reference is valid until the next call.
  const StepPlan& Schedule(absl::FunctionRef<bool(AdapterKey)> is_resident);

  // Records the step's sampled tokens (generated += 1 for each seq that samples). Requests that
  // reached max_new_tokens are retired like Drop(); their ids are returned (valid until the next
  // call). Ids dropped since Schedule() are skipped.
  absl::Span<const RequestId> CommitStep();

  const RequestView* Find(RequestId id) const;
  int32_t num_free_blocks() const { return num_free_blocks_; }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return num_waiting_; }
  const SchedulerConfig& config() const { return config_; }

 private:
  explicit Scheduler(const SchedulerConfig& config);

  int32_t BlocksFor(int64_t tokens) const;
  void Preempt(RequestView& r);
  void EnqueueWaiting(const RequestView& r);
  void RemoveRunning(RequestId id);
  void Emit(RequestView& r, int32_t num_tokens);
  void BuildRows();

  const SchedulerConfig config_;
  int32_t max_running_;
  uint64_t next_arrival_ = 0;
  uint64_t step_ = 0;
  int32_t num_free_blocks_;
  int32_t num_waiting_ = 0;
  absl::flat_hash_map<RequestId, RequestView> requests_;
  std::vector<RequestId> running_;  // Sorted by arrival.
  // Waiting requests per adapter key, each queue sorted by arrival.
  std::map<AdapterKey, std::deque<RequestId>> waiting_;
  // Non-base keys with running requests -> step they became active (lora-cap rotation).
  std::map<AdapterKey, uint64_t> active_since_;
  AdapterKey rr_cursor_ = 0;  // Last key admitted from; the next round starts after it.
  bool rr_started_ = false;
  StepPlan plan_;
  bool plan_committed_ = true;
  std::vector<RequestId> finished_;
  std::vector<RequestId> scratch_ids_;
  std::vector<AdapterKey> scratch_keys_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_ENGINE_SCHEDULER_H_

// The engine: one thread that owns the model, the paged KV cache and the backend, and runs
// generation steps for every request in flight. Other threads (gRPC handlers) validate and
// Submit(); the engine thread admits requests into the Scheduler (server/engine/scheduler.h),
// makes their adapters resident without ever waiting on disk, builds one flat batch per step
// (chunked prefill and decode rows, each adapter's rows contiguous), runs it, samples, streams
// tokens and text to each request's sink, and retires requests. docs/scheduler.md is the policy.
//
// One step, on the engine thread:
//   1. move submitted requests into the Scheduler (Add);
//   2. finish requests whose cancel flag is set or whose deadline passed (step boundary);
//   3. TryMakeResident for every adapter ref not yet resident (non-blocking; an error fails
//      that request); a key is resident for the Scheduler only when all its refs are;
//   4. Schedule; apply the plan to the KvCache: free each preempted request's blocks, then
//      allocate each scheduled sequence's new blocks;
//   5. build the ForwardBatch: context tokens (prompt + generated, so a preempted request
//      re-prefills what it had generated), positions, block tables, the sampling rows' logits,
//      row adapters in plan order; Forward;
//   6. sample each sampling row (SequenceSampler), feed the TextStreamer, call OnTokens;
//   7. finish requests (EOS, stop token, stop string, max tokens), CommitStep.
// A finished request's KV blocks are freed and its AdapterRef dropped before OnFinish runs.
//
// Thread safety: Submit, Stop, Stats, AdapterSets and the destructor may be called from any thread.
// Sinks are called on the engine thread only (or, for requests that never ran, on the thread
// calling Stop or the destructor), never with an engine lock held; they must not block for long.
#ifndef LORASERVE_SERVER_ENGINE_ENGINE_H_
#define LORASERVE_SERVER_ENGINE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/mutex.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/sampler.h"
#include "server/adapters/registry.h"
#include "server/engine/scheduler.h"
#include "tokenizer/detokenizer.h"
#include "tokenizer/stop_strings.h"

namespace ls {

struct EngineOptions {
  int32_t max_step_tokens = 2048;      // --max_step_tokens; <= the model's max_batch_rows.
  int32_t max_loras_per_step = 8;      // --max_loras_per_step
  int32_t max_model_len = 4096;        // --max_model_len: prompt + max new tokens.
  int32_t max_running = 0;             // 0: max_step_tokens (SchedulerConfig::max_running).
  int32_t max_queued_requests = 1024;  // --max_queued_requests: submitted, not yet running.
  // How long the engine thread sleeps when requests are in flight but none can run (their
  // adapters are loading); a Submit or Stop wakes it earlier.
  absl::Duration idle_poll = absl::Milliseconds(1);
};

// Why a request ended. Values follow loraserve.v1.FinishReason where it has one.
enum class EngineFinishReason : int32_t {
  kLength = 1,     // max_new_tokens generated.
  kEos = 2,        // an EOS token (not with ignore_eos).
  kStop = 3,       // a stop token id or a stop string.
  kCancelled = 4,  // the cancel flag, or Stop() without draining.
  kDeadline = 5,   // the deadline passed at a step boundary.
  kError = 6,      // status says why (adapter load failure, internal error).
};
absl::string_view EngineFinishReasonName(EngineFinishReason reason);

struct EngineUsage {
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t num_preemptions = 0;
};

struct EngineResult {
  EngineFinishReason reason = EngineFinishReason::kError;
  // OK for kLength, kEos, kStop; CANCELLED, DEADLINE_EXCEEDED, or the error otherwise.
  absl::Status status;
  EngineUsage usage;
  int stop_string_index = -1;   // kStop by a stop string: its index in the request's list.
  std::string adapter_id;       // "" for the base model.
  std::string adapter_version;  // empty for the base model or when never resident.
  // From Submit to the first step that scheduled the request (its first admission; a
  // preemption does not count again); InfiniteDuration when it never ran.
  absl::Duration queue_time = absl::InfiniteDuration();
};

// Receives one request's output. OnTokens runs once per sampled token (ids has one entry),
// with the text that became safe to send (complete UTF-8 with stop strings held back; empty
// without a Detokenizer), and possibly once more with no ids and the final flushed text. Then
// OnFinish runs exactly once. Both run on the engine thread (see the file comment). `sample` is
// the sampled token's result (logprob, rank, alternatives when the request asked for them) with
// the token, and null on the final flush.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void OnTokens(absl::Span<const int32_t> ids, absl::string_view text,
                        const SampleResult* sample) = 0;
  virtual void OnFinish(const EngineResult& result) = 0;
};

struct EngineRequest {
  std::vector<int32_t> prompt_token_ids;  // Non-empty, each in [0, vocab).
  // Sampling and the token stopping rules; max_new_tokens >= 1 must be resolved. eos_token_ids
  // is filled from the model config when empty.
  SamplingParams sampling;
  std::vector<std::string> stop_strings;  // Needs the engine's Detokenizer.
  bool skip_special_tokens = true;        // For the streamed text.
  AdapterRef adapter;                     // Base model when empty; released when finished.
  absl::Time deadline = absl::InfiniteFuture();
  // A request not yet admitted by then (waiting for KV room, a running slot or its adapter)
  // ends with RESOURCE_EXHAUSTED (max_queue_seconds). Once it has run a step it no longer applies.
  absl::Time queue_deadline = absl::InfiniteFuture();
  // Admission order among waiting requests: higher first (docs/scheduler.md, "Priority").
  int32_t priority = 0;
  // Set by the caller (any thread) to cancel; checked at every step boundary. May be null.
  std::shared_ptr<std::atomic<bool>> cancelled;
};

struct EngineStats {
  int64_t num_queued = 0;   // submitted, not yet admitted for the first time
  int64_t num_running = 0;  // in the scheduler, running
  // Submitted and not running now: never admitted, preempted, or waiting for an adapter.
  int64_t num_waiting = 0;
  int64_t num_in_flight = 0;
  uint64_t steps = 0;
  uint64_t tokens_generated = 0;
  uint64_t preemptions = 0;
  // Rows fed to the model: prefill rows (prompt chunks, and the context a preempted request
  // recomputes) and decode rows.
  uint64_t rows_prefill = 0;
  uint64_t rows_decode = 0;
  int32_t kv_used_blocks = 0;
  int32_t kv_total_blocks = 0;

  // Per-step distributions for metrics: counts per bucket (a step counts in the first bucket
  // whose bound is >= its value; the last bucket is +Inf), and the sum of the values.
  // Rows (tokens) per step.
  static constexpr int kNumStepRowsBuckets = 13;
  static constexpr double kStepRowsBounds[kNumStepRowsBuckets] = {
      1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
  uint64_t step_rows_buckets[kNumStepRowsBuckets + 1] = {};
  uint64_t step_rows_sum = 0;
  // Distinct adapters (versions, the base model not counted) per step.
  static constexpr int kNumStepAdaptersBuckets = 11;
  static constexpr double kStepAdaptersBounds[kNumStepAdaptersBuckets] = {0, 1, 2,  3,  4, 5,
                                                                          6, 8, 16, 32, 64};
  uint64_t step_adapters_buckets[kNumStepAdaptersBuckets + 1] = {};
  uint64_t step_adapters_sum = 0;
};

// The adapter ids of the requests in flight, each sorted and without duplicates; the base
// model is not listed. For the vllm:lora_requests_info gauge.
struct EngineAdapterSets {
  std::vector<std::string> running;  // ids with a running request
  std::vector<std::string> waiting;  // ids with a request not running now (see num_waiting)
};

class Engine {
 public:
  // `model`, `cache`, `registry` (null: base model only) and `detokenizer` (null: no text, no
  // stop strings) must outlive the engine; the backend behind `model` is used by the engine
  // thread only once Start() is called. INVALID_ARGUMENT for bad options (max_step_tokens above
  // the model's max_batch_rows, non-positive sizes).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options,
                                                        LlamaModel* model, KvCache* cache,
                                                        const ModelConfig& config,
                                                        AdapterRegistry* registry,
                                                        const Detokenizer* detokenizer);

  // Stop(absl::InfinitePast()): cancels what is in flight.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Starts the engine thread. Requests submitted before wait in the queue.
  absl::Status Start();

  // Refuses new requests (UNAVAILABLE), lets in-flight and queued ones run until
  // `drain_deadline`, cancels the rest (kCancelled, CANCELLED), and joins the thread.
  // Idempotent.
  void Stop(absl::Time drain_deadline = absl::InfiniteFuture());

  // Validates (INVALID_ARGUMENT: empty prompt or an id outside the vocabulary, sampling params,
  // prompt + max_new_tokens over max_model_len or the KV pool, stop strings without a
  // Detokenizer or invalid ones), allocates the request's sampler, and queues it. Any thread;
  // never waits for the engine. RESOURCE_EXHAUSTED when max_queued_requests are queued;
  // UNAVAILABLE after Stop(). On error the sink is not called and the request (its adapter ref)
  // is dropped.
  absl::Status Submit(EngineRequest request, std::shared_ptr<RequestSink> sink);

  EngineStats Stats() const;
  // Any thread; allocates the answer (for scrapes, not for the step path).
  EngineAdapterSets AdapterSets() const;

 private:
  struct Live;

  Engine(const EngineOptions& options, LlamaModel* model, KvCache* cache, const ModelConfig& config,
         AdapterRegistry* registry, const Detokenizer* detokenizer,
         std::unique_ptr<Scheduler> scheduler);

  void Run();
  // One step; false when nothing could run.
  bool Step();
  void AdmitSubmitted();
  void CheckCancellations(bool cancel_all);
  void UpdateResidency();
  void FailAll(const absl::Status& status);
  // Ends `id`: frees its KV blocks and adapter ref, calls OnFinish. `in_scheduler`: also Drop
  // it from the Scheduler (false when CommitStep retired it).
  void Finish(RequestId id, EngineFinishReason reason, absl::Status status, bool in_scheduler);
  static void FinishUnstarted(Live& live, absl::Status status);
  // Adds `delta` to `id`'s count in `counts` (one of the adapter maps; the base model, "", is
  // not counted), erasing it at zero. Call with mu_ held.
  static void CountAdapter(absl::flat_hash_map<std::string, int32_t>& counts, const std::string& id,
                           int32_t delta);

  const EngineOptions options_;
  LlamaModel* const model_;
  KvCache* const cache_;
  const ModelConfig config_;
  AdapterRegistry* const registry_;
  const Detokenizer* const detokenizer_;
  const int32_t vocab_;

  // Guards the submit queue and the shared counters.
  mutable Mutex mu_;
  CondVar wake_;  // Submit and Stop signal the engine thread.
  std::deque<std::unique_ptr<Live>> submitted_ ABSL_GUARDED_BY(mu_);
  int64_t num_queued_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time drain_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  EngineStats stats_ ABSL_GUARDED_BY(mu_);
  // Requests not running (num_waiting) and, per adapter id, the requests in flight that are
  // running / not running. Updated only when a request changes state (submitted, admitted,
  // preempted, finished), so a steady decode step does not touch them; an id's entry is
  // erased when its count drops to zero.
  int64_t num_waiting_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, int32_t> running_adapters_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int32_t> waiting_adapters_ ABSL_GUARDED_BY(mu_);

  Mutex thread_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // Serializes Start / Stop.
  std::thread thread_;
  bool started_ ABSL_GUARDED_BY(thread_mu_) = false;

  // Engine thread only (the scheduler, live requests and per-step scratch).
  std::unique_ptr<Scheduler> scheduler_;
  RequestId next_id_ = 1;
  absl::flat_hash_map<RequestId, std::unique_ptr<Live>> live_;
  absl::flat_hash_map<AdapterKey, bool> key_resident_;
  std::vector<std::unique_ptr<Live>> incoming_;
  std::vector<RequestId> scratch_ids_;
  std::vector<int32_t> token_ids_, positions_, block_tables_, logits_rows_;
  std::vector<const LoraGroupTable*> row_adapters_;
  std::vector<float> logits_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_ENGINE_ENGINE_H_

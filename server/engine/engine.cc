#include "server/engine/engine.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status.h"

namespace ls {

absl::string_view EngineFinishReasonName(EngineFinishReason reason) {
  switch (reason) {
    case EngineFinishReason::kLength:
      return "length";
    case EngineFinishReason::kEos:
      return "eos";
    case EngineFinishReason::kStop:
      return "stop";
    case EngineFinishReason::kCancelled:
      return "cancelled";
    case EngineFinishReason::kDeadline:
      return "deadline";
    case EngineFinishReason::kError:
      return "error";
  }
  return "unknown";
}

// One request in flight. Created by Submit (which does every allocation the request needs:
// the sampler's vocabulary-sized scratch, the context buffer reserved for the longest
// context), then owned by the engine thread.
struct Engine::Live {
  RequestId id = 0;
  EngineRequest request;        // prompt_token_ids moved into `tokens`
  std::vector<int32_t> tokens;  // the context: prompt, then generated tokens
  int32_t prompt_len = 0;
  std::unique_ptr<SequenceSampler> sampler;
  std::optional<TextStreamer> streamer;  // only with a Detokenizer
  std::shared_ptr<RequestSink> sink;
  std::vector<int32_t> table;  // KV block table in the engine's cache
  bool queued = true;          // counted in num_queued_ (never admitted yet)
  bool running = false;        // scheduled and not preempted since (else counted as waiting)
  absl::Time submitted;        // when Submit queued it
  absl::Time first_scheduled = absl::InfinitePast();
  int32_t num_preemptions = 0;
  int stop_string_index = -1;
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options,
                                                       LlamaModel* model, KvCache* cache,
                                                       const ModelConfig& config,
                                                       AdapterRegistry* registry,
                                                       const Detokenizer* detokenizer) {
  if (model == nullptr || cache == nullptr) {
    return absl::InvalidArgumentError("engine needs a model and a KV cache");
  }
  if (options.max_step_tokens <= 0 || options.max_step_tokens > model->max_batch_rows()) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_step_tokens must be in [1, ", model->max_batch_rows(),
                     "] (the model's batch rows), found ", options.max_step_tokens));
  }
  if (options.max_queued_requests <= 0 || options.max_model_len <= 0 || options.max_running < 0 ||
      options.max_loras_per_step <= 0) {
    return absl::InvalidArgumentError(
        "max_queued_requests, max_model_len and max_loras_per_step must be positive and "
        "max_running must not be negative");
  }
  SchedulerConfig sc;
  sc.num_kv_blocks = cache->num_blocks();
  sc.kv_block_size = cache->block_tokens();
  sc.max_step_tokens = options.max_step_tokens;
  sc.max_loras_per_step = options.max_loras_per_step;
  sc.max_model_len = options.max_model_len;
  sc.max_running = options.max_running;
  LS_ASSIGN_OR_RETURN(std::unique_ptr<Scheduler> scheduler, Scheduler::Create(sc));
  return std::unique_ptr<Engine>(
      new Engine(options, model, cache, config, registry, detokenizer, std::move(scheduler)));
}

Engine::Engine(const EngineOptions& options, LlamaModel* model, KvCache* cache,
               const ModelConfig& config, AdapterRegistry* registry, const Detokenizer* detokenizer,
               std::unique_ptr<Scheduler> scheduler)
    : options_(options),
      model_(model),
      cache_(cache),
      config_(config),
      registry_(registry),
      detokenizer_(detokenizer),
      vocab_(static_cast<int32_t>(config.vocab_size)),
      scheduler_(std::move(scheduler)) {
  const size_t rows = static_cast<size_t>(options.max_step_tokens);
  token_ids_.reserve(rows);
  positions_.reserve(rows);
  logits_rows_.reserve(rows);
  row_adapters_.reserve(rows);
}

Engine::~Engine() { Stop(absl::InfinitePast()); }

absl::Status Engine::Start() {
  MutexLock lock(&thread_mu_);
  if (started_) return absl::FailedPreconditionError("engine already started");
  {
    MutexLock l(&mu_);
    if (stopping_) return absl::FailedPreconditionError("engine stopped");
  }
  started_ = true;
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void Engine::Stop(absl::Time drain_deadline) {
  std::deque<std::unique_ptr<Live>> left;
  {
    MutexLock lock(&thread_mu_);
    {
      MutexLock l(&mu_);
      if (!stopping_ || drain_deadline < drain_deadline_) drain_deadline_ = drain_deadline;
      stopping_ = true;
      wake_.SignalAll();
    }
    if (thread_.joinable()) {
      thread_.join();
      return;
    }
    // Never started: nothing ran, so the queued requests are cancelled here (sinks are called
    // below, without the locks).
    MutexLock l(&mu_);
    left.swap(submitted_);
    num_queued_ = 0;
    num_waiting_ = 0;
    waiting_adapters_.clear();
  }
  for (std::unique_ptr<Live>& live : left) {
    FinishUnstarted(*live, absl::CancelledError("engine stopped"));
  }
}

void Engine::FinishUnstarted(Live& live, absl::Status status) {
  EngineResult result;
  result.reason = EngineFinishReason::kCancelled;
  result.status = std::move(status);
  result.usage.prompt_tokens = live.prompt_len;
  result.adapter_id = live.request.adapter.id();
  live.request.adapter.Reset();
  live.sink->OnFinish(result);
}

absl::Status Engine::Submit(EngineRequest request, std::shared_ptr<RequestSink> sink) {
  if (sink == nullptr) return absl::InvalidArgumentError("request has no sink");
  const std::vector<int32_t>& prompt = request.prompt_token_ids;
  if (prompt.empty()) return absl::InvalidArgumentError("prompt_token_ids is empty");
  const int64_t max_new = request.sampling.max_new_tokens;
  const int64_t context = static_cast<int64_t>(prompt.size()) + max_new;
  if (context > options_.max_model_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt.size(), " tokens) + max_new_tokens (", max_new,
                     ") must be at most max_model_len ", options_.max_model_len));
  }
  const int64_t block = cache_->block_tokens();
  if ((context + block - 1) / block > cache_->num_blocks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt + max_new_tokens (", context, " tokens) exceed the KV pool (",
                     int64_t{cache_->num_blocks()} * block, " tokens)"));
  }
  if (!request.adapter.is_base() && registry_ == nullptr) {
    return absl::InvalidArgumentError("adapter given to an engine without a registry");
  }
  if (!request.stop_strings.empty() && detokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer; this engine has none");
  }
  if (request.sampling.eos_token_ids.empty()) {
    request.sampling.eos_token_ids = config_.eos_token_ids;
  }
  auto live = std::make_unique<Live>();
  // Validates the sampling parameters and the prompt ids against the vocabulary.
  LS_ASSIGN_OR_RETURN(live->sampler, SequenceSampler::Create(request.sampling, prompt, vocab_));
  if (detokenizer_ != nullptr) {
    LS_ASSIGN_OR_RETURN(
        TextStreamer streamer,
        TextStreamer::Create(*detokenizer_, request.skip_special_tokens, request.stop_strings));
    live->streamer.emplace(std::move(streamer));
  }
  live->prompt_len = static_cast<int32_t>(prompt.size());
  live->tokens = std::move(request.prompt_token_ids);
  live->tokens.reserve(static_cast<size_t>(context));
  live->request = std::move(request);
  live->sink = std::move(sink);

  MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("engine is stopping");
  if (num_queued_ >= options_.max_queued_requests) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request queue full (", options_.max_queued_requests, " requests waiting)"));
  }
  ++num_queued_;
  ++num_waiting_;
  CountAdapter(waiting_adapters_, live->request.adapter.id(), 1);
  live->submitted = absl::Now();
  submitted_.push_back(std::move(live));
  wake_.Signal();
  return absl::OkStatus();
}

EngineStats Engine::Stats() const {
  MutexLock lock(&mu_);
  EngineStats stats = stats_;
  stats.num_queued = num_queued_;
  stats.kv_used_blocks = cache_->used_blocks();
  stats.kv_total_blocks = cache_->num_blocks();
  stats.num_waiting = num_waiting_;
  return stats;
}

EngineAdapterSets Engine::AdapterSets() const {
  EngineAdapterSets sets;
  {
    MutexLock lock(&mu_);
    sets.running.reserve(running_adapters_.size());
    for (const auto& [id, n] : running_adapters_) sets.running.push_back(id);
    sets.waiting.reserve(waiting_adapters_.size());
    for (const auto& [id, n] : waiting_adapters_) sets.waiting.push_back(id);
  }
  std::sort(sets.running.begin(), sets.running.end());
  std::sort(sets.waiting.begin(), sets.waiting.end());
  return sets;
}

void Engine::CountAdapter(absl::flat_hash_map<std::string, int32_t>& counts, const std::string& id,
                          int32_t delta) {
  if (id.empty()) return;
  auto it = counts.try_emplace(id, 0).first;
  it->second += delta;
  if (it->second <= 0) counts.erase(it);
}

void Engine::Run() {
  for (;;) {
    bool cancel_all = false;
    {
      MutexLock lock(&mu_);
      while (!stopping_ && submitted_.empty() && live_.empty()) wake_.Wait(&mu_);
      if (stopping_) {
        if (submitted_.empty() && live_.empty()) return;
        cancel_all = absl::Now() >= drain_deadline_;
      }
    }
    if (cancel_all) {
      AdmitSubmitted();
      CheckCancellations(/*cancel_all=*/true);
      continue;
    }
    if (!Step()) {
      // Requests are in flight but none can run (adapters loading): poll, waking early for a
      // new request or Stop.
      MutexLock lock(&mu_);
      if (submitted_.empty()) {
        wake_.WaitWithDeadline(&mu_, absl::Now() + options_.idle_poll);
      }
    }
  }
}

void Engine::AdmitSubmitted() {
  {
    MutexLock lock(&mu_);
    while (!submitted_.empty()) {
      incoming_.push_back(std::move(submitted_.front()));
      submitted_.pop_front();
    }
  }
  for (std::unique_ptr<Live>& live : incoming_) {
    live->id = next_id_++;
    NewRequest nr;
    nr.id = live->id;
    nr.adapter_key = live->request.adapter.key();
    nr.prompt_len = live->prompt_len;
    nr.max_new_tokens = static_cast<int32_t>(live->request.sampling.max_new_tokens);
    nr.priority = live->request.priority;
    const RequestId id = live->id;
    const absl::Status added = scheduler_->Add(nr);
    live_.emplace(id, std::move(live));
    if (!added.ok()) Finish(id, EngineFinishReason::kError, added, /*in_scheduler=*/false);
  }
  incoming_.clear();
}

void Engine::CheckCancellations(bool cancel_all) {
  const absl::Time now = absl::Now();
  scratch_ids_.clear();
  for (const auto& [id, live] : live_) {
    const bool cancelled = cancel_all || (live->request.cancelled != nullptr &&
                                          live->request.cancelled->load(std::memory_order_acquire));
    if (cancelled || now >= live->request.deadline ||
        (live->queued && now >= live->request.queue_deadline)) {
      scratch_ids_.push_back(id);
    }
  }
  for (RequestId id : scratch_ids_) {
    auto it = live_.find(id);
    const bool cancelled = cancel_all || (it->second->request.cancelled != nullptr &&
                                          it->second->request.cancelled->load());
    if (cancelled) {
      Finish(id, EngineFinishReason::kCancelled,
             absl::CancelledError(cancel_all ? "engine stopped" : "request cancelled"), true);
    } else if (now >= it->second->request.deadline) {
      Finish(id, EngineFinishReason::kDeadline,
             absl::DeadlineExceededError("request deadline exceeded"), true);
    } else {
      const Live& live = *it->second;
      Finish(id, EngineFinishReason::kError,
             absl::ResourceExhaustedError(
                 absl::StrCat("the request waited ", absl::FormatDuration(now - live.submitted),
                              " without being scheduled, past its max_queue_seconds (",
                              absl::FormatDuration(live.request.queue_deadline - live.submitted),
                              "); the server is saturated: retry later or on another replica")),
             true);
    }
  }
}

void Engine::UpdateResidency() {
  key_resident_.clear();
  scratch_ids_.clear();
  for (auto& [id, live] : live_) {
    AdapterRef& ref = live->request.adapter;
    if (ref.is_base()) continue;
    bool resident = ref.resident();
    if (!resident) {
      absl::StatusOr<bool> ready = registry_->TryMakeResident(ref, live->request.deadline);
      if (!ready.ok()) {
        scratch_ids_.push_back(id);
        continue;
      }
      resident = *ready;
    }
    auto [it, inserted] = key_resident_.try_emplace(ref.key(), resident);
    if (!inserted) it->second = it->second && resident;
  }
  for (RequestId id : scratch_ids_) {
    // Ask again for the status (the failed state is sticky); cheap, and only on failure.
    Live& live = *live_.at(id);
    absl::StatusOr<bool> ready =
        registry_->TryMakeResident(live.request.adapter, live.request.deadline);
    Finish(id, EngineFinishReason::kError,
           ready.ok() ? absl::InternalError("adapter residency failed") : ready.status(), true);
  }
}

bool Engine::Step() {
  AdmitSubmitted();
  CheckCancellations(/*cancel_all=*/false);
  UpdateResidency();
  const StepPlan& plan = scheduler_->Schedule([this](AdapterKey key) {
    auto it = key_resident_.find(key);
    return it != key_resident_.end() && it->second;
  });

  int64_t newly_running = 0;
  for (RequestId id : plan.preempted) {
    Live& live = *live_.at(id);
    cache_->Free(&live.table);
    ++live.num_preemptions;
  }
  const absl::Time now = plan.admitted.empty() ? absl::InfinitePast() : absl::Now();
  for (RequestId id : plan.admitted) {
    Live& live = *live_.at(id);
    if (live.queued) {
      live.queued = false;
      live.first_scheduled = now;
      ++newly_running;
    }
  }
  {
    MutexLock lock(&mu_);
    num_queued_ -= newly_running;
    // Preempted first: a request preempted and admitted again in one step ends up running.
    for (RequestId id : plan.preempted) {
      Live& live = *live_.at(id);
      if (!live.running) continue;
      live.running = false;
      ++num_waiting_;
      CountAdapter(running_adapters_, live.request.adapter.id(), -1);
      CountAdapter(waiting_adapters_, live.request.adapter.id(), 1);
    }
    for (RequestId id : plan.admitted) {
      Live& live = *live_.at(id);
      if (live.running) continue;
      live.running = true;
      --num_waiting_;
      CountAdapter(waiting_adapters_, live.request.adapter.id(), -1);
      CountAdapter(running_adapters_, live.request.adapter.id(), 1);
    }
    stats_.preemptions += plan.preempted.size();
    stats_.num_running = scheduler_->num_running();
    stats_.num_in_flight = static_cast<int64_t>(live_.size());
  }
  if (plan.empty()) return false;

  // KV blocks, as the plan says (they always fit: the scheduler counts the same pool).
  size_t stride = 1;
  for (const ScheduledSeq& seq : plan.seqs) {
    Live& live = *live_.at(seq.id);
    const absl::Status allocated = cache_->Allocate(seq.num_new_blocks, &live.table);
    if (!allocated.ok()) {
      FailAll(absl::InternalError(
          absl::StrCat("KV allocation disagrees with the plan: ", allocated.message())));
      return true;
    }
    stride = std::max(stride, live.table.size());
  }

  // The flat batch, rows in plan order.
  const size_t rows = static_cast<size_t>(plan.num_rows);
  token_ids_.resize(rows);
  positions_.resize(rows);
  row_adapters_.resize(rows);
  block_tables_.assign(rows * stride, -1);
  logits_rows_.clear();
  bool any_adapter = false;
  for (const ScheduledSeq& seq : plan.seqs) {
    const Live& live = *live_.at(seq.id);
    const LoraGroupTable* groups = live.request.adapter.groups();
    any_adapter = any_adapter || groups != nullptr;
    for (int32_t i = 0; i < seq.num_tokens; ++i) {
      const size_t row = static_cast<size_t>(seq.row_begin + i);
      const int32_t pos = seq.position + i;
      token_ids_[row] = live.tokens[static_cast<size_t>(pos)];
      positions_[row] = pos;
      row_adapters_[row] = groups;
      std::copy(live.table.begin(), live.table.end(), block_tables_.begin() + row * stride);
    }
    if (seq.samples) logits_rows_.push_back(seq.row_begin + seq.num_tokens - 1);
  }
  const size_t vocab = static_cast<size_t>(vocab_);
  if (logits_.size() < logits_rows_.size() * vocab) logits_.resize(logits_rows_.size() * vocab);

  ForwardBatch batch;
  batch.token_ids = token_ids_;
  batch.positions = positions_;
  batch.block_tables = block_tables_;
  batch.block_table_stride = static_cast<int64_t>(stride);
  batch.logits_rows = logits_rows_;
  if (any_adapter) batch.row_adapters = row_adapters_;
  const absl::Status forward = model_->Forward(batch, *cache_, logits_.data());
  if (!forward.ok()) {
    FailAll(forward);
    return true;
  }

  // Sample, stream, and note who ends (finished after the loop: Finish drops from the
  // scheduler, and CommitStep must still see this step's plan).
  struct Ending {
    RequestId id;
    EngineFinishReason reason;
    absl::Status status;
  };
  std::vector<Ending> endings;  // Usually empty: no allocation.
  size_t j = 0;
  uint64_t sampled = 0;
  for (const ScheduledSeq& seq : plan.seqs) {
    if (!seq.samples) continue;
    Live& live = *live_.at(seq.id);
    absl::StatusOr<SampleResult> result =
        live.sampler->Sample(absl::MakeConstSpan(logits_.data() + j * vocab, vocab));
    ++j;
    if (!result.ok()) {
      endings.push_back({seq.id, EngineFinishReason::kError, result.status()});
      continue;
    }
    ++sampled;
    const int32_t token = result->token_id;
    live.tokens.push_back(token);
    StreamChunk chunk;
    if (live.streamer.has_value()) chunk = live.streamer->Step(token);
    live.sink->OnTokens(absl::MakeConstSpan(&token, 1), chunk.text, &*result);
    if (chunk.stopped) {
      live.stop_string_index = chunk.stop_index;
      endings.push_back({seq.id, EngineFinishReason::kStop, absl::OkStatus()});
    } else if (result->finish_reason == FinishReason::kEos) {
      endings.push_back({seq.id, EngineFinishReason::kEos, absl::OkStatus()});
    } else if (result->finish_reason == FinishReason::kStopToken) {
      endings.push_back({seq.id, EngineFinishReason::kStop, absl::OkStatus()});
    } else if (result->finish_reason == FinishReason::kLength) {
      endings.push_back({seq.id, EngineFinishReason::kLength, absl::OkStatus()});
    }
  }
  for (Ending& e : endings) Finish(e.id, e.reason, std::move(e.status), /*in_scheduler=*/true);
  // Requests the scheduler retires at max_new_tokens were all ended above (the sampler counts
  // the same limit); this only guards against the two disagreeing.
  for (RequestId id : scheduler_->CommitStep()) {
    if (live_.contains(id)) Finish(id, EngineFinishReason::kLength, absl::OkStatus(), false);
  }
  MutexLock lock(&mu_);
  ++stats_.steps;
  stats_.tokens_generated += sampled;
  stats_.rows_prefill += static_cast<uint64_t>(plan.num_rows_prefill);
  stats_.rows_decode += static_cast<uint64_t>(plan.num_rows_decode);
  int bucket = 0;
  while (bucket < EngineStats::kNumStepRowsBuckets &&
         plan.num_rows > EngineStats::kStepRowsBounds[bucket]) {
    ++bucket;
  }
  ++stats_.step_rows_buckets[bucket];
  stats_.step_rows_sum += static_cast<uint64_t>(plan.num_rows);
  bucket = 0;
  while (bucket < EngineStats::kNumStepAdaptersBuckets &&
         plan.num_adapters > EngineStats::kStepAdaptersBounds[bucket]) {
    ++bucket;
  }
  ++stats_.step_adapters_buckets[bucket];
  stats_.step_adapters_sum += static_cast<uint64_t>(plan.num_adapters);
  stats_.num_running = scheduler_->num_running();
  stats_.num_in_flight = static_cast<int64_t>(live_.size());
  return true;
}

void Engine::FailAll(const absl::Status& status) {
  scratch_ids_.clear();
  for (const auto& [id, live] : live_) scratch_ids_.push_back(id);
  for (RequestId id : scratch_ids_) Finish(id, EngineFinishReason::kError, status, true);
}

void Engine::Finish(RequestId id, EngineFinishReason reason, absl::Status status,
                    bool in_scheduler) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  std::unique_ptr<Live> live = std::move(it->second);
  live_.erase(it);
  if (in_scheduler) scheduler_->Drop(id).IgnoreError();  // NOT_FOUND: Add had failed.
  cache_->Free(&live->table);
  {
    MutexLock lock(&mu_);
    if (live->queued) --num_queued_;
    if (live->running) {
      CountAdapter(running_adapters_, live->request.adapter.id(), -1);
    } else {
      --num_waiting_;
      CountAdapter(waiting_adapters_, live->request.adapter.id(), -1);
    }
    stats_.num_running = scheduler_->num_running();
    stats_.num_in_flight = static_cast<int64_t>(live_.size());
  }
  // The text still held back (a partial stop string, an incomplete character) is sent unless
  // a stop string already ended the text.
  if (live->streamer.has_value() && !live->streamer->stopped() &&
      reason != EngineFinishReason::kError) {
    StreamChunk chunk = live->streamer->Finish();
    if (!chunk.text.empty()) live->sink->OnTokens({}, chunk.text, nullptr);
    if (chunk.stopped &&
        (reason == EngineFinishReason::kEos || reason == EngineFinishReason::kLength)) {
      reason = EngineFinishReason::kStop;
      live->stop_string_index = chunk.stop_index;
    }
  }
  EngineResult result;
  result.reason = reason;
  result.status = std::move(status);
  result.usage.prompt_tokens = live->prompt_len;
  result.usage.completion_tokens = static_cast<int32_t>(live->tokens.size()) - live->prompt_len;
  result.usage.num_preemptions = live->num_preemptions;
  result.stop_string_index = live->stop_string_index;
  result.adapter_id = live->request.adapter.id();
  if (live->first_scheduled != absl::InfinitePast()) {
    result.queue_time = live->first_scheduled - live->submitted;
  }
  if (live->request.adapter.resident() && !live->request.adapter.is_base()) {
    result.adapter_version = live->request.adapter.version();
  }
  live->request.adapter.CountTokens(static_cast<uint64_t>(result.usage.completion_tokens));
  live->request.adapter.Reset();
  live->sink->OnFinish(result);
}

}  // namespace ls

#include "server/engine/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace ls {
namespace {

int32_t ContextLen(const RequestView& r) { return r.prompt_len + r.generated; }
int32_t ToFeed(const RequestView& r) { return ContextLen(r) - r.computed; }

}  // namespace

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const SchedulerConfig& config) {
  if (config.num_kv_blocks <= 0 || config.kv_block_size <= 0 || config.max_step_tokens <= 0 ||
      config.max_loras_per_step <= 0 || config.max_model_len <= 0 || config.max_running < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler sizes must be positive: num_kv_blocks=", config.num_kv_blocks,
        " kv_block_size=", config.kv_block_size, " max_step_tokens=", config.max_step_tokens,
        " max_loras_per_step=", config.max_loras_per_step, " max_model_len=", config.max_model_len,
        " max_running=", config.max_running));
  }
  return std::unique_ptr<Scheduler>(new Scheduler(config));
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config),
      // Decode rows come first and never exceed the step, so every running request advances.
      max_running_(config.max_running > 0 ? std::min(config.max_running, config.max_step_tokens)
                                          : config.max_step_tokens),
      num_free_blocks_(config.num_kv_blocks) {}

int32_t Scheduler::BlocksFor(int64_t tokens) const {
  return static_cast<int32_t>((tokens + config_.kv_block_size - 1) / config_.kv_block_size);
}

absl::Status Scheduler::Add(const NewRequest& request) {
  if (request.prompt_len <= 0 || request.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request ", request.id, ": prompt_len and max_new_tokens must be positive, got ",
        request.prompt_len, " and ", request.max_new_tokens));
  }
  const int64_t total = int64_t{request.prompt_len} + request.max_new_tokens;
  if (total > config_.max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request ", request.id, ": prompt (", request.prompt_len, ") + max new tokens (",
        request.max_new_tokens, ") exceeds max_model_len ", config_.max_model_len));
  }
  // The last sampled token is never fed, so the KV holds at most total - 1 tokens.
  if (BlocksFor(total - 1) > config_.num_kv_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("request ", request.id, ": needs ", BlocksFor(total - 1),
                     " KV blocks, the pool has ", config_.num_kv_blocks));
  }
  if (requests_.contains(request.id)) {
    return absl::AlreadyExistsError(absl::StrCat("request ", request.id, " is already queued"));
  }
  RequestView r;
  r.id = request.id;
  r.arrival = next_arrival_++;
  r.adapter_key = request.adapter_key;
  r.prompt_len = request.prompt_len;
  r.max_new_tokens = request.max_new_tokens;
  r.priority = request.priority;
  auto [it, inserted] = requests_.emplace(r.id, r);
  (void)inserted;
  EnqueueWaiting(it->second);
  return absl::OkStatus();
}

void Scheduler::EnqueueWaiting(const RequestView& r) {
  std::deque<RequestId>& q = waiting_[r.adapter_key];
  // Higher priority first, then arrival order (a preempted request goes back in its old place,
  // usually the front).
  auto pos = std::upper_bound(q.begin(), q.end(), r, [this](const RequestView& a, RequestId id) {
    const RequestView& b = requests_.at(id);
    if (a.priority != b.priority) return a.priority > b.priority;
    return a.arrival < b.arrival;
  });
  q.insert(pos, r.id);
  ++num_waiting_;
}

void Scheduler::RemoveRunning(RequestId id) {
  running_.erase(std::find(running_.begin(), running_.end(), id));
}

absl::StatusOr<int32_t> Scheduler::Drop(RequestId id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("request ", id, " is not scheduled"));
  }
  RequestView& r = it->second;
  if (r.state == RequestState::kRunning) {
    RemoveRunning(id);
  } else {
    auto q = waiting_.find(r.adapter_key);
    q->second.erase(std::find(q->second.begin(), q->second.end(), id));
    if (q->second.empty()) waiting_.erase(q);
    --num_waiting_;
  }
  const int32_t freed = r.blocks;
  num_free_blocks_ += freed;
  requests_.erase(it);
  return freed;
}

const RequestView* Scheduler::Find(RequestId id) const {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : &it->second;
}

void Scheduler::Preempt(RequestView& r) {
  num_free_blocks_ += r.blocks;
  r.blocks = 0;
  r.computed = 0;  // Recompute prompt + generated tokens later.
  r.state = RequestState::kWaiting;
  ++r.num_preemptions;
  RemoveRunning(r.id);
  EnqueueWaiting(r);
  plan_.preempted.push_back(r.id);
}

void Scheduler::Emit(RequestView& r, int32_t num_tokens) {
  ScheduledSeq s;
  s.id = r.id;
  s.adapter_key = r.adapter_key;
  s.position = r.computed;
  s.num_tokens = num_tokens;
  s.is_prefill = ToFeed(r) > 1;
  s.num_new_blocks = BlocksFor(int64_t{r.computed} + num_tokens) - r.blocks;
  r.blocks += s.num_new_blocks;
  num_free_blocks_ -= s.num_new_blocks;
  r.computed += num_tokens;
  s.num_blocks = r.blocks;
  s.samples = r.computed == ContextLen(r);
  plan_.seqs.push_back(s);
  plan_.num_rows += num_tokens;
  (s.is_prefill ? plan_.num_rows_prefill : plan_.num_rows_decode) += num_tokens;
}

const StepPlan& Scheduler::Schedule(absl::FunctionRef<bool(AdapterKey)> is_resident) {
  plan_.seqs.clear();
  plan_.segments.clear();
  plan_.preempted.clear();
  plan_.admitted.clear();
  plan_.adapters_to_load.clear();
  plan_.num_rows = plan_.num_rows_decode = plan_.num_rows_prefill = plan_.num_adapters = 0;
  plan_committed_ = false;
  ++step_;
  const int32_t bs = config_.kv_block_size;

  // 1. Decode rows are owed to every running request. If their blocks do not fit, preempt the
  // newest running request (by arrival) until they do. The oldest alone always fits (Add checked
  // that a whole request fits the pool), so the oldest running request always advances.
  int64_t need = 0;
  for (RequestId id : running_) {
    const RequestView& r = requests_.at(id);
    if (ToFeed(r) == 1) need += BlocksFor(int64_t{r.computed} + 1) - r.blocks;
  }
  while (need > num_free_blocks_ && !running_.empty()) {
    RequestView& victim = requests_.at(running_.back());
    if (ToFeed(victim) == 1) need -= BlocksFor(int64_t{victim.computed} + 1) - victim.blocks;
    Preempt(victim);
  }
  scratch_ids_.assign(running_.begin(), running_.end());
  for (RequestId id : scratch_ids_) {
    RequestView& r = requests_.at(id);
    if (ToFeed(r) == 1) Emit(r, 1);
  }

  // 2. Running prefills continue, oldest first, in chunks bounded by the step's rows and the free
  // blocks. An older prefill that cannot get even one token preempts newer prefills (never a
  // request already given rows this step).
  for (RequestId id : scratch_ids_) {
    auto it = requests_.find(id);
    RequestView& r = it->second;
    if (r.state != RequestState::kRunning || ToFeed(r) == 0) continue;
    const int32_t budget = config_.max_step_tokens - plan_.num_rows;
    if (budget <= 0) break;
    int64_t fit = int64_t{r.blocks + num_free_blocks_} * bs - r.computed;
    while (fit <= 0) {
      RequestView* victim = nullptr;
      for (auto v = running_.rbegin(); v != running_.rend(); ++v) {
        RequestView& c = requests_.at(*v);
        if (c.arrival <= r.arrival) break;
        if (ToFeed(c) > 0) {
          victim = &c;
          break;
        }
      }
      if (victim == nullptr) break;
      Preempt(*victim);
      fit = int64_t{r.blocks + num_free_blocks_} * bs - r.computed;
    }
    if (fit <= 0) continue;
    Emit(r, static_cast<int32_t>(std::min<int64_t>({ToFeed(r), budget, fit})));
  }

  // 3. Admission from leftover rows and blocks, never by preempting: round robin over adapter keys,
  // one request (the oldest of its key) per key per round, starting after the key admitted from
  // last.
  for (auto it = active_since_.begin(); it != active_since_.end();) {
    const bool active = std::any_of(running_.begin(), running_.end(), [&](RequestId id) {
      return requests_.at(id).adapter_key == it->first;
    });
    it = active ? std::next(it) : active_since_.erase(it);
  }
  for (RequestId id : running_) {
    const AdapterKey key = requests_.at(id).adapter_key;
    if (key != kBaseAdapterKey) active_since_.emplace(key, step_);
  }
  // Residency, asked once per key per step.
  scratch_keys_.clear();
  for (const auto& [key, q] : waiting_) {
    if (key == kBaseAdapterKey || is_resident(key)) {
      scratch_keys_.push_back(key);
    } else {
      plan_.adapters_to_load.push_back(key);
    }
  }
  // max_loras_per_step rotation: when a ready key is shut out by the cap, the key active the
  // longest stops taking new requests so it drains and frees its slot.
  const auto cap = static_cast<size_t>(config_.max_loras_per_step);
  bool has_draining = false;
  AdapterKey draining = 0;
  if (active_since_.size() >= cap) {
    const bool shut_out = std::any_of(
        scratch_keys_.begin(), scratch_keys_.end(),
        [&](AdapterKey k) { return k != kBaseAdapterKey && active_since_.count(k) == 0; });
    if (shut_out) {
      auto oldest =
          std::min_element(active_since_.begin(), active_since_.end(),
                           [](const auto& a, const auto& b) { return a.second < b.second; });
      has_draining = true;
      draining = oldest->first;
    }
  }
  // Rotate the ready keys so the round starts after the last key admitted from.
  if (rr_started_) {
    auto start = std::upper_bound(scratch_keys_.begin(), scratch_keys_.end(), rr_cursor_);
    std::rotate(scratch_keys_.begin(), start, scratch_keys_.end());
  }
  bool progressed = true;
  // Under KV pressure (someone was preempted this step) admit nothing: the freed blocks are for
  // the older running requests, and a preempted request never comes back in the same step.
  bool exhausted = !plan_.preempted.empty();
  // A key may admit now: not draining, and under the cap or already active.
  const auto may_admit = [&](AdapterKey key) {
    if (has_draining && key == draining) return false;
    const bool is_new_key = key != kBaseAdapterKey && active_since_.count(key) == 0;
    return !(is_new_key && active_since_.size() >= cap);
  };
  while (progressed && !exhausted) {
    progressed = false;
    // Priority: each round admits only from the keys whose oldest waiting request has the top
    // priority among the keys that may admit; lower priorities get the rounds after those run dry.
    bool any = false;
    int32_t top = 0;
    for (AdapterKey key : scratch_keys_) {
      auto q = waiting_.find(key);
      if (q == waiting_.end() || !may_admit(key)) continue;
      const int32_t p = requests_.at(q->second.front()).priority;
      top = any ? std::max(top, p) : p;
      any = true;
    }
    if (!any) break;
    for (AdapterKey key : scratch_keys_) {
      if (static_cast<int32_t>(running_.size()) >= max_running_ ||
          plan_.num_rows >= config_.max_step_tokens || num_free_blocks_ <= 0) {
        exhausted = true;
        break;
      }
      if (has_draining && key == draining) continue;
      const bool is_new_key = key != kBaseAdapterKey && active_since_.count(key) == 0;
      if (is_new_key && active_since_.size() >= cap) continue;
      auto q = waiting_.find(key);
      if (q == waiting_.end()) continue;
      if (requests_.at(q->second.front()).priority != top) continue;
      RequestView& r = requests_.at(q->second.front());
      q->second.pop_front();
      if (q->second.empty()) waiting_.erase(q);
      --num_waiting_;
      r.state = RequestState::kRunning;
      running_.insert(std::upper_bound(running_.begin(), running_.end(), r.arrival,
                                       [this](uint64_t arrival, RequestId id) {
                                         return arrival < requests_.at(id).arrival;
                                       }),
                      r.id);
      if (is_new_key) active_since_.emplace(key, step_);
      plan_.admitted.push_back(r.id);
      const int64_t budget = config_.max_step_tokens - plan_.num_rows;
      const int64_t fit = int64_t{num_free_blocks_} * bs - r.computed;
      Emit(r, static_cast<int32_t>(std::min<int64_t>({ToFeed(r), budget, fit})));
      rr_cursor_ = key;
      rr_started_ = true;
      progressed = true;
    }
  }

  BuildRows();
  return plan_;
}

void Scheduler::BuildRows() {
  std::sort(plan_.seqs.begin(), plan_.seqs.end(),
            [this](const ScheduledSeq& a, const ScheduledSeq& b) {
              if (a.adapter_key != b.adapter_key) return a.adapter_key < b.adapter_key;
              return requests_.at(a.id).arrival < requests_.at(b.id).arrival;
            });
  int32_t row = 0;
  for (ScheduledSeq& s : plan_.seqs) {
    s.row_begin = row;
    if (plan_.segments.empty() || plan_.segments.back().adapter_key != s.adapter_key) {
      plan_.segments.push_back({s.adapter_key, row, row});
      if (s.adapter_key != kBaseAdapterKey) ++plan_.num_adapters;
    }
    row += s.num_tokens;
    plan_.segments.back().row_end = row;
  }
}

absl::Span<const RequestId> Scheduler::CommitStep() {
  finished_.clear();
  if (plan_committed_) return finished_;
  plan_committed_ = true;
  for (const ScheduledSeq& s : plan_.seqs) {
    if (!s.samples) continue;
    auto it = requests_.find(s.id);
    if (it == requests_.end()) continue;  // Dropped since Schedule().
    RequestView& r = it->second;
    ++r.generated;
    if (r.generated >= r.max_new_tokens) {
      finished_.push_back(r.id);
      (void)Drop(r.id);
    }
  }
  return finished_;
}

}  // namespace ls

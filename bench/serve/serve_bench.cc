// serve_bench: a closed-loop gRPC load generator for loraserve (issue 6, "Must show" 11), after
// the S-LoRA and Punica serving evaluations.
//
// N clients (default 32) share one channel. Each sends a GenerateStream request, reads the stream
// to its end, and sends the next: a closed loop, so the server always has N requests. Request n
// of the trace (n counts requests in the order they are sent, over all clients) has a prompt of
// P token ids drawn from a generator seeded with (seed, n), and an adapter drawn from a second
// one: uniform or Zipf(alpha) over K ids `<prefix>NNNN`, or none (the base model). The trace is
// therefore the same sequence whatever the timing, and --trace_out writes it for the PEFT
// baseline (bench/serve/peft_baseline.py), which serves it one request at a time.
//
// Every request asks for greedy decoding, exactly max_tokens new tokens (ignore_eos) and the
// token ids, so the benchmark can count tokens as they arrive and check each response: a stream
// that ends with a status other than OK, or whose final chunk is not FINISH_REASON_LENGTH with
// max_tokens completion tokens, fails the run (exit 1, "errors" in the JSON).
//
// Measurement. The first --warmup_requests of every client are warm-up. The window opens when
// the last client has finished its warm-up and closes when the last client has finished its
// --measure_requests further requests; clients keep sending until then, so the load stays at N
// for the whole window, and the requests still running at its end are cancelled. Output
// throughput is the number of tokens received inside the window over its length (each token
// counted when its chunk arrives, whichever request it belongs to). Latencies come from the
// measured requests (each client's requests after its warm-up, up to --measure_requests):
// TTFT = first token received - request sent, TPOT = (last token - first token) / (tokens - 1),
// e2e = last token - sent, all on the client's steady clock; p50/p99 by linear interpolation
// between order statistics (numpy's default).
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "loraserve/v1/admin.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "loraserve gRPC address, host:port");
ABSL_FLAG(int, clients, 32, "Concurrent closed-loop clients");
ABSL_FLAG(int, prompt_tokens, 128, "Prompt length in token ids");
ABSL_FLAG(int, max_tokens, 64, "New tokens per request (exactly: greedy, ignore_eos)");
ABSL_FLAG(std::string, distribution, "uniform",
          "How adapters are drawn: uniform or zipf over --num_adapters ids, or base (none)");
ABSL_FLAG(int, num_adapters, 8, "K: adapter ids <prefix>0000 .. <prefix>{K-1}");
ABSL_FLAG(double, zipf_alpha, 1.0, "Zipf exponent: P(id i) is proportional to 1 / (i + 1)^alpha");
ABSL_FLAG(std::string, adapter_prefix, "ad", "Adapter id prefix (ids are prefix + 4 digits)");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the trace (prompts and adapter draws)");
ABSL_FLAG(int, vocab_size, 0,
          "Prompt ids are drawn from [3, vocab_size); 0 asks the server (GetModelInfo)");
ABSL_FLAG(int, warmup_requests, 1, "Warm-up requests per client before the window opens");
ABSL_FLAG(int, measure_requests, 1, "Measured requests per client after its warm-up");
ABSL_FLAG(absl::Duration, request_timeout, absl::Minutes(10), "Deadline of each request");
ABSL_FLAG(std::string, out, "", "Write the results as JSON to this file (also printed)");
ABSL_FLAG(std::string, label, "", "Free text stored in the JSON (e.g. the configuration)");
ABSL_FLAG(std::string, trace_out, "",
          "Only write the first --trace_requests requests of the trace as JSON and exit");
ABSL_FLAG(int, trace_requests, 64, "Requests written by --trace_out");

namespace {

namespace v1 = loraserve::v1;
using ls::MutexLock;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---- The trace -------------------------------------------------------------------------------

enum class Distribution { kBase, kUniform, kZipf };

struct TraceRequest {
  std::string adapter_id;  // empty: the base model
  std::vector<uint32_t> prompt;
};

class Trace {
 public:
  Trace(Distribution distribution, int num_adapters, double zipf_alpha, std::string prefix,
        uint64_t seed, int prompt_tokens, int vocab_size)
      : distribution_(distribution),
        num_adapters_(num_adapters),
        prefix_(std::move(prefix)),
        seed_(seed),
        prompt_tokens_(prompt_tokens),
        vocab_size_(vocab_size) {
    if (distribution == Distribution::kZipf) {
      cdf_.resize(static_cast<size_t>(num_adapters));
      double sum = 0;
      for (int i = 0; i < num_adapters; ++i) {
        sum += 1.0 / std::pow(static_cast<double>(i + 1), zipf_alpha);
        cdf_[static_cast<size_t>(i)] = sum;
      }
      for (double& c : cdf_) c /= sum;
    }
  }

  // Request n depends only on (seed, n): the same trace whatever order clients take it in.
  TraceRequest At(uint64_t n) const {
    TraceRequest r;
    std::seed_seq prompt_seq{seed_, n, uint64_t{1}};
    std::mt19937_64 prompt_rng(prompt_seq);
    // Ids 0..2 are <unk>, <s>, </s> in Llama tokenizers; ordinary tokens only.
    std::uniform_int_distribution<uint32_t> token(3, static_cast<uint32_t>(vocab_size_ - 1));
    r.prompt.resize(static_cast<size_t>(prompt_tokens_));
    for (uint32_t& id : r.prompt) id = token(prompt_rng);
    if (distribution_ == Distribution::kBase) return r;
    std::seed_seq adapter_seq{seed_, n, uint64_t{2}};
    std::mt19937_64 adapter_rng(adapter_seq);
    int index = 0;
    if (distribution_ == Distribution::kUniform) {
      index = std::uniform_int_distribution<int>(0, num_adapters_ - 1)(adapter_rng);
    } else {
      const double u = std::uniform_real_distribution<double>(0.0, 1.0)(adapter_rng);
      index = static_cast<int>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin());
      index = std::min(index, num_adapters_ - 1);
    }
    r.adapter_id = absl::StrFormat("%s%04d", prefix_, index);
    return r;
  }

 private:
  Distribution distribution_;
  int num_adapters_;
  std::string prefix_;
  uint64_t seed_;
  int prompt_tokens_;
  int vocab_size_;
  std::vector<double> cdf_;  // Zipf only
};

// ---- One request -----------------------------------------------------------------------------

struct RequestRecord {
  int client = 0;
  int client_seq = 0;  // 0-based index among this client's requests
  uint64_t trace_index = 0;
  std::string adapter_id;
  Clock::time_point sent;
  Clock::time_point first_token;
  Clock::time_point last_token;
  // (arrival, tokens) of every chunk that carried tokens.
  std::vector<std::pair<Clock::time_point, int>> arrivals;
  int tokens = 0;
  bool finished = false;  // a final chunk arrived
  v1::FinishReason finish_reason = v1::FINISH_REASON_UNSPECIFIED;
  uint32_t completion_tokens = 0;
  double server_ttft_seconds = 0;  // the server's own arrival -> first token
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string message;
  bool cancelled_by_bench = false;  // ended CANCELLED after the window closed
};

class Bench;

// One GenerateStream call through the callback API. The Bench owns it until the run is over,
// so it may be cancelled at any time without racing its completion.
class Call : public grpc::ClientReadReactor<v1::GenerateChunk> {
 public:
  Call(Bench* bench, v1::Inference::Stub* stub, v1::GenerateRequest request, RequestRecord record,
       absl::Duration timeout)
      : bench_(bench), request_(std::move(request)), record_(std::move(record)) {
    context_.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    stub->async()->GenerateStream(&context_, &request_, this);
  }

  void Start() {
    record_.sent = Clock::now();
    StartRead(&chunk_);
    StartCall();
  }

  void Cancel() { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const auto now = Clock::now();
    const int n = chunk_.token_ids_size();
    if (n > 0) {
      if (record_.tokens == 0) record_.first_token = now;
      record_.last_token = now;
      record_.tokens += n;
      record_.arrivals.emplace_back(now, n);
    }
    if (chunk_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      record_.finished = true;
      record_.finish_reason = chunk_.finish_reason();
      record_.completion_tokens = chunk_.usage().completion_tokens();
      record_.server_ttft_seconds = chunk_.timings().time_to_first_token_seconds();
    }
    StartRead(&chunk_);
  }

  void OnDone(const grpc::Status& status) override;

 private:
  Bench* bench_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateChunk chunk_;
  RequestRecord record_;
};

// ---- The closed loop -------------------------------------------------------------------------

class Bench {
 public:
  Bench(std::shared_ptr<grpc::Channel> channel, const Trace* trace, int clients, int max_tokens,
        int warmup, int measure, absl::Duration timeout)
      : stub_(v1::Inference::NewStub(std::move(channel))),
        trace_(trace),
        num_clients_(clients),
        max_tokens_(max_tokens),
        warmup_(warmup),
        measure_(measure),
        timeout_(timeout),
        done_per_client_(static_cast<size_t>(clients), 0),
        started_per_client_(static_cast<size_t>(clients), 0) {}

  // Starts every client and returns when the window has closed and no call is in flight.
  void Run() {
    start_ = Clock::now();
    for (int c = 0; c < num_clients_; ++c) {
      Call* call = nullptr;
      {
        MutexLock lock(&mu_);
        call = NewCallLocked(c);
      }
      call->Start();
    }
    MutexLock lock(&mu_);
    while (!window_closed_ || !in_flight_.empty() || finishing_ > 0) cv_.Wait(&mu_);
  }

  // Called by a Call in OnDone, on a gRPC callback thread. gRPC is only called after the lock is
  // released, since a reaction may run inline.
  void Finished(Call* call, RequestRecord record) {
    std::vector<Call*> to_cancel;
    Call* next = nullptr;
    {
      MutexLock lock(&mu_);
      ++finishing_;
      FinishedLocked(call, std::move(record), &to_cancel, &next);
    }
    for (Call* c : to_cancel) c->Cancel();
    if (next != nullptr) next->Start();
    // Run() may return (and the calls be freed) only once no callback uses them any more.
    MutexLock lock(&mu_);
    --finishing_;
    cv_.SignalAll();
  }

  nlohmann::json Results() const;
  bool ok() const {
    MutexLock lock(&mu_);
    return errors_.empty();
  }

 private:
  void FinishedLocked(Call* call, RequestRecord record, std::vector<Call*>* to_cancel, Call** next)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    in_flight_.erase(call);
    const int c = record.client;
    const auto now = Clock::now();
    // Calls still running when the window closes are cancelled by the bench, not failed.
    record.cancelled_by_bench = window_closed_ && record.code == grpc::StatusCode::CANCELLED;
    if (!record.cancelled_by_bench) {
      std::string problem;
      if (record.code != grpc::StatusCode::OK) {
        problem = absl::StrCat("status ", static_cast<int>(record.code), ": ", record.message);
      } else if (!record.finished || record.finish_reason != v1::FINISH_REASON_LENGTH) {
        problem = absl::StrCat("finish reason ", static_cast<int>(record.finish_reason),
                               ", expected FINISH_REASON_LENGTH (1)");
      } else if (record.tokens != max_tokens_ ||
                 record.completion_tokens != static_cast<uint32_t>(max_tokens_)) {
        problem = absl::StrCat(record.tokens, " token ids received and ", record.completion_tokens,
                               " completion tokens reported, expected ", max_tokens_);
      }
      if (!problem.empty()) {
        errors_.push_back(absl::StrCat("request ", record.trace_index, " (client ", c,
                                       ", adapter \"", record.adapter_id, "\"): ", problem));
        // A broken run is not worth finishing: close the window and stop.
        CloseWindowLocked(now, to_cancel);
      } else {
        ++done_per_client_[static_cast<size_t>(c)];
        if (!window_open_ && AllClientsDoneLocked(warmup_)) {
          window_open_ = true;
          window_start_ = now;
        }
        if (!window_closed_ && AllClientsDoneLocked(warmup_ + measure_)) {
          CloseWindowLocked(now, to_cancel);
        }
      }
    }
    records_.push_back(std::move(record));
    if (!window_closed_) *next = NewCallLocked(c);
    cv_.SignalAll();
  }

  bool AllClientsDoneLocked(int n) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return std::all_of(done_per_client_.begin(), done_per_client_.end(),
                       [n](int d) { return d >= n; });
  }

  void CloseWindowLocked(Clock::time_point now, std::vector<Call*>* to_cancel)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (window_closed_) return;
    window_closed_ = true;
    if (!window_open_) {  // only after an error: an empty window
      window_open_ = true;
      window_start_ = now;
    }
    window_end_ = now;
    // The window is over: what is still running is cancelled, not waited for.
    to_cancel->assign(in_flight_.begin(), in_flight_.end());
  }

  // The client's next request, registered as in flight; the caller starts it after unlocking.
  Call* NewCallLocked(int c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const uint64_t n = next_trace_index_++;
    TraceRequest t = trace_->At(n);
    v1::GenerateRequest request;
    request.set_request_id(absl::StrCat("bench-", n));
    request.set_adapter_id(t.adapter_id);
    request.mutable_token_ids()->mutable_ids()->Add(t.prompt.begin(), t.prompt.end());
    request.mutable_sampling()->set_temperature(0.0f);
    request.mutable_stopping()->set_max_new_tokens(static_cast<uint32_t>(max_tokens_));
    request.mutable_stopping()->set_ignore_eos(true);
    request.mutable_output()->set_return_token_ids(true);
    RequestRecord record;
    record.client = c;
    record.client_seq = started_per_client_[static_cast<size_t>(c)]++;
    record.trace_index = n;
    record.adapter_id = t.adapter_id;
    calls_.push_back(
        std::make_unique<Call>(this, stub_.get(), std::move(request), std::move(record), timeout_));
    Call* call = calls_.back().get();
    in_flight_.insert(call);
    return call;
  }

  std::unique_ptr<v1::Inference::Stub> stub_;
  const Trace* trace_;
  const int num_clients_;
  const int max_tokens_;
  const int warmup_;
  const int measure_;
  const absl::Duration timeout_;
  Clock::time_point start_;

  // Guards the loop's state; taken by the main thread and by gRPC callback threads.
  mutable ls::Mutex mu_;
  ls::CondVar cv_;
  // Every call of the run; freed with the Bench, after the last OnDone.
  std::vector<std::unique_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);
  std::set<Call*> in_flight_ ABSL_GUARDED_BY(mu_);
  std::vector<RequestRecord> records_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> errors_ ABSL_GUARDED_BY(mu_);
  std::vector<int> done_per_client_ ABSL_GUARDED_BY(mu_);
  std::vector<int> started_per_client_ ABSL_GUARDED_BY(mu_);
  uint64_t next_trace_index_ ABSL_GUARDED_BY(mu_) = 0;
  int finishing_ ABSL_GUARDED_BY(mu_) = 0;  // Finished() calls still using calls_
  bool window_open_ ABSL_GUARDED_BY(mu_) = false;
  bool window_closed_ ABSL_GUARDED_BY(mu_) = false;
  Clock::time_point window_start_ ABSL_GUARDED_BY(mu_);
  Clock::time_point window_end_ ABSL_GUARDED_BY(mu_);
};

void Call::OnDone(const grpc::Status& status) {
  record_.code = status.error_code();
  record_.message = status.error_message();
  bench_->Finished(this, std::move(record_));
}

// Linear interpolation between order statistics (numpy.percentile's default).
double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

nlohmann::json Summary(const std::vector<double>& v) {
  nlohmann::json j;
  j["n"] = v.size();
  if (v.empty()) return j;
  double sum = 0;
  for (double x : v) sum += x;
  j["mean"] = sum / static_cast<double>(v.size());
  j["p50"] = Percentile(v, 50);
  j["p99"] = Percentile(v, 99);
  j["min"] = *std::min_element(v.begin(), v.end());
  j["max"] = *std::max_element(v.begin(), v.end());
  return j;
}

nlohmann::json Bench::Results() const {
  MutexLock lock(&mu_);
  const double window = Seconds(window_end_ - window_start_);
  int64_t tokens_in_window = 0;
  int completed_in_window = 0, ok = 0, cancelled = 0;
  std::vector<double> ttft, tpot, e2e, server_ttft;
  std::set<std::string> adapters_measured, adapters_requested;
  for (const RequestRecord& r : records_) {
    adapters_requested.insert(r.adapter_id);
    for (const auto& [t, n] : r.arrivals) {
      if (t >= window_start_ && t <= window_end_) tokens_in_window += n;
    }
    if (r.cancelled_by_bench) {
      ++cancelled;
      continue;
    }
    if (r.code != grpc::StatusCode::OK) continue;
    ++ok;
    if (r.last_token >= window_start_ && r.last_token <= window_end_) ++completed_in_window;
    if (r.client_seq < warmup_ || r.client_seq >= warmup_ + measure_) continue;
    ttft.push_back(Seconds(r.first_token - r.sent));
    e2e.push_back(Seconds(r.last_token - r.sent));
    if (r.tokens > 1) tpot.push_back(Seconds(r.last_token - r.first_token) / (r.tokens - 1));
    server_ttft.push_back(r.server_ttft_seconds);
    adapters_measured.insert(r.adapter_id);
  }
  nlohmann::json j;
  j["ok"] = errors_.empty();
  j["errors"] = errors_;
  j["window_start_seconds"] = Seconds(window_start_ - start_);
  j["window_seconds"] = window;
  j["output_tokens_in_window"] = tokens_in_window;
  j["output_tokens_per_second"] = window > 0 ? static_cast<double>(tokens_in_window) / window : 0;
  j["requests_completed_in_window"] = completed_in_window;
  j["requests_per_second"] = window > 0 ? completed_in_window / window : 0;
  j["requests_started"] = records_.size();
  j["requests_ok"] = ok;
  j["requests_cancelled_at_end"] = cancelled;
  j["measured_requests"] = ttft.size();
  j["distinct_adapters_measured"] = adapters_measured.size();
  // Over every request sent: more than the resident pool holds means adapters were swapped.
  j["distinct_adapters_requested"] = adapters_requested.size();
  j["ttft_seconds"] = Summary(ttft);
  j["tpot_seconds"] = Summary(tpot);
  j["e2e_seconds"] = Summary(e2e);
  j["server_ttft_seconds"] = Summary(server_ttft);
  return j;
}

// Where the adapters are after the run (Admin.ListAdapters): how many ids are in each tier and
// how many requests they served. Evidence of swapping; an error is recorded, not fatal.
nlohmann::json AdapterTiers(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = v1::Admin::NewStub(channel);
  std::map<std::string, int> tiers;
  uint64_t served = 0;
  int listed = 0, used = 0;
  std::string token;
  do {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    v1::ListAdaptersRequest request;
    request.set_page_size(1000);
    request.set_page_token(token);
    v1::ListAdaptersResponse response;
    const grpc::Status s = stub->ListAdapters(&context, request, &response);
    if (!s.ok())
      return {{"error", absl::StrCat(static_cast<int>(s.error_code()), ": ", s.error_message())}};
    for (const v1::AdapterInfo& a : response.adapters()) {
      ++listed;
      ++tiers[v1::AdapterTier_Name(a.tier())];
      served += a.requests_served();
      if (a.requests_served() > 0) ++used;
    }
    token = response.next_page_token();
  } while (!token.empty());
  return {
      {"listed", listed}, {"tiers", tiers}, {"ids_that_served", used}, {"requests_served", served}};
}

int WriteTrace(const Trace& trace, int n, const std::string& path) {
  nlohmann::json requests = nlohmann::json::array();
  for (int i = 0; i < n; ++i) {
    const TraceRequest r = trace.At(static_cast<uint64_t>(i));
    requests.push_back({{"index", i}, {"adapter_id", r.adapter_id}, {"prompt", r.prompt}});
  }
  std::ofstream out(path);
  out << nlohmann::json{{"requests", requests}}.dump() << "\n";
  if (!out) {
    std::fprintf(stderr, "serve_bench: cannot write %s\n", path.c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "serve_bench [--address=HOST:PORT] [--clients=32] [--distribution=uniform|zipf|base] "
      "[--num_adapters=K] [--out=FILE]: closed-loop GenerateStream load against loraserve");
  absl::ParseCommandLine(argc, argv);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  const int max_tokens = absl::GetFlag(FLAGS_max_tokens);
  const int num_adapters = absl::GetFlag(FLAGS_num_adapters);
  const int warmup = absl::GetFlag(FLAGS_warmup_requests);
  const int measure = absl::GetFlag(FLAGS_measure_requests);
  const std::string dist_name = absl::GetFlag(FLAGS_distribution);
  Distribution dist;
  if (dist_name == "base") {
    dist = Distribution::kBase;
  } else if (dist_name == "uniform") {
    dist = Distribution::kUniform;
  } else if (dist_name == "zipf") {
    dist = Distribution::kZipf;
  } else {
    std::fprintf(stderr, "serve_bench: --distribution=%s, expected uniform, zipf or base\n",
                 dist_name.c_str());
    return 2;
  }
  if (clients < 1 || prompt_tokens < 1 || max_tokens < 1 || warmup < 0 || measure < 1 ||
      (dist != Distribution::kBase && (num_adapters < 1 || num_adapters > 10000))) {
    std::fprintf(stderr,
                 "serve_bench: expected --clients, --prompt_tokens, --max_tokens, "
                 "--measure_requests >= 1, --warmup_requests >= 0 and --num_adapters in "
                 "[1, 10000]\n");
    return 2;
  }

  int vocab_size = absl::GetFlag(FLAGS_vocab_size);
  nlohmann::json server;
  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_address), grpc::InsecureChannelCredentials());
  if (absl::GetFlag(FLAGS_trace_out).empty()) {
    auto stub = v1::Inference::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    v1::GetModelInfoResponse info;
    const grpc::Status s = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      std::fprintf(stderr, "serve_bench: GetModelInfo at %s: %s\n",
                   absl::GetFlag(FLAGS_address).c_str(), s.error_message().c_str());
      return 1;
    }
    if (vocab_size == 0) vocab_size = static_cast<int>(info.model().vocab_size());
    server = {{"version", info.server().version()},
              {"git_commit", info.server().git_commit()},
              {"model", info.model().name()},
              {"vocab_size", info.model().vocab_size()},
              {"backend", info.backend().description()},
              {"threads", info.backend().num_threads()},
              {"max_step_tokens", info.scheduler().max_step_tokens()},
              {"kv_cache_total_bytes", info.kv_cache().total_bytes()}};
  }
  if (vocab_size < 4) {
    std::fprintf(stderr, "serve_bench: vocabulary size %d, expected at least 4\n", vocab_size);
    return 2;
  }
  const Trace trace(dist, num_adapters, absl::GetFlag(FLAGS_zipf_alpha),
                    absl::GetFlag(FLAGS_adapter_prefix), absl::GetFlag(FLAGS_seed), prompt_tokens,
                    vocab_size);
  if (!absl::GetFlag(FLAGS_trace_out).empty()) {
    return WriteTrace(trace, absl::GetFlag(FLAGS_trace_requests), absl::GetFlag(FLAGS_trace_out));
  }

  Bench bench(channel, &trace, clients, max_tokens, warmup, measure,
              absl::GetFlag(FLAGS_request_timeout));
  const auto t0 = Clock::now();
  bench.Run();
  nlohmann::json result = bench.Results();
  if (dist != Distribution::kBase) result["adapters_after_run"] = AdapterTiers(channel);
  result["run_seconds"] = Seconds(Clock::now() - t0);
  result["label"] = absl::GetFlag(FLAGS_label);
  result["server"] = server;
  result["config"] = {{"clients", clients},
                      {"prompt_tokens", prompt_tokens},
                      {"max_tokens", max_tokens},
                      {"distribution", dist_name},
                      {"num_adapters", dist == Distribution::kBase ? 0 : num_adapters},
                      {"zipf_alpha", absl::GetFlag(FLAGS_zipf_alpha)},
                      {"seed", absl::GetFlag(FLAGS_seed)},
                      {"warmup_requests_per_client", warmup},
                      {"measure_requests_per_client", measure}};
  const std::string text = result.dump(1);
  std::printf("%s\n", text.c_str());
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    std::ofstream f(out);
    f << text << "\n";
    if (!f) {
      std::fprintf(stderr, "serve_bench: cannot write %s\n", out.c_str());
      return 1;
    }
  }
  if (!bench.ok()) {
    std::fprintf(stderr, "serve_bench: the run failed: %s\n", result["errors"].dump(1).c_str());
    return 1;
  }
  return 0;
}

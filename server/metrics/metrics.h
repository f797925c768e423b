// The Prometheus side of the server: one registry for every metric, exposed over HTTP on its
// own port at /metrics. docs/metrics.md lists every family. Two kinds:
//   - pushed: the gRPC layer records each RPC and each generation request as it ends (request
//     counters, latency histograms, token counters, adapter cache hits and misses);
//   - pulled: a collector reads Engine::Stats(), Engine::AdapterSets() and
//     AdapterRegistry::Stats() at scrape time (gauges, the engine's step histograms, adapter
//     loads and evictions), so the engine thread never touches Prometheus objects.
// Labels are bounded by construction: RPC methods come from a fixed list, codes from the gRPC
// code set, finish reasons and tiers from fixed sets; nothing is labelled per adapter or per
// request (vllm:lora_requests_info, one series whose labels list the ids, is the exception the
// Gateway API Inference Extension requires).
#ifndef LORASERVE_SERVER_METRICS_METRICS_H_
#define LORASERVE_SERVER_METRICS_METRICS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace ls {

class Engine;
class AdapterRegistry;

// One generation request (Generate or GenerateStream) as it ended.
struct GenerationRecord {
  int grpc_code = 0;  // the status the client got
  // length, eos, stop, cancelled, deadline, error (the engine's reasons), or rejected (refused
  // before reaching the engine: validation, unknown adapter, queue full, draining).
  absl::string_view finished_reason = "rejected";
  double e2e_seconds = 0;     // arrival to the end
  double ttft_seconds = -1;   // arrival to the first token; < 0 when none came
  double queue_seconds = -1;  // engine submit to first scheduled; < 0 when never scheduled
  int64_t prompt_tokens = 0;
  int64_t generation_tokens = 0;
};

// What the scrape-time collector needs besides the engine and registry.
struct ServingMetricsOptions {
  bool vllm_compat = true;  // --metrics_vllm_compat: also the vllm:* gauges
  int32_t max_loras = 0;    // the max_lora label (--max_loras_per_step)
};

// Thread-safe: prometheus-cpp metrics are atomic, and the exposer serves scrapes from its own
// threads.
class Metrics {
 public:
  // Registers the metric families (build info, process, gRPC requests). Does not listen yet.
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Starts serving /metrics on `address` ("host:port"; port 0 picks a free one). Returns the
  // bound port. UNAVAILABLE when the address cannot be bound.
  absl::StatusOr<int> Serve(const std::string& address);

  // Sets the methods counted under their own name ("/package.Service/Method"). Call before
  // serving; not thread-safe with RecordRpc.
  void SetKnownMethods(const std::vector<std::string>& full_methods);

  // Counts one finished RPC. Methods not in the known set (a client may call any name) are
  // counted as "other", so callers cannot grow the label set.
  void RecordRpc(absl::string_view full_method, int grpc_code);

  // Records one ended generation request: loraserve_requests_total{code,finished_reason}, the
  // e2e, TTFT and queue-time histograms (those that apply) and the token counters.
  void RecordGeneration(const GenerationRecord& record);
  // One gap between two consecutive tokens of a request (seconds). Called on the engine
  // thread for every token after the first: a mutex and a bucket search, no allocation.
  void ObserveInterTokenLatency(double seconds) { inter_token_->Observe(seconds); }
  // Where a request's adapter was just before the request took its reference: the resident
  // pool (a pool hit), the host cache (a pool miss and a host hit) or neither (a miss in both
  // tiers: it is read from disk).
  void RecordAdapterLookup(bool in_pool, bool in_host);

  // Starts reading `engine` and `registry` (either may be null) at every scrape. Both must stay
  // valid until DetachServing() returns; call that before destroying them. Any time, also
  // after Serve.
  void AttachServing(const Engine* engine, const AdapterRegistry* registry,
                     const ServingMetricsOptions& options);
  // Stops reading them; a scrape in progress finishes first.
  void DetachServing();

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_collector_;
  // Guards the serving collector's registration with the exposer (Attach/Detach/Serve).
  Mutex serving_mu_;
  std::shared_ptr<prometheus::Collectable> serving_collector_ ABSL_GUARDED_BY(serving_mu_);
  prometheus::Family<prometheus::Counter>* rpcs_ = nullptr;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Histogram* e2e_ = nullptr;
  prometheus::Histogram* ttft_ = nullptr;
  prometheus::Histogram* queue_time_ = nullptr;
  prometheus::Histogram* inter_token_ = nullptr;
  prometheus::Counter* prompt_tokens_ = nullptr;
  prometheus::Counter* generation_tokens_ = nullptr;
  prometheus::Counter* pool_hits_ = nullptr;
  prometheus::Counter* pool_misses_ = nullptr;
  prometheus::Counter* host_hits_ = nullptr;
  prometheus::Counter* host_misses_ = nullptr;
  absl::flat_hash_set<std::string> known_methods_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_METRICS_METRICS_H_

#include "server/metrics/metrics.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <exception>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "prometheus/gauge.h"
#include "prometheus/metric_family.h"
#include "server/adapters/registry.h"
#include "server/build_info.h"
#include "server/engine/engine.h"

namespace ls {
namespace {

// The standard process_* families (as the Go and Python clients export them), read from /proc
// at scrape time; prometheus-cpp has no process collector of its own.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    const long ticks = sysconf(_SC_CLK_TCK);
    const long page = sysconf(_SC_PAGESIZE);
    std::ifstream stat_file("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    // Fields after the command name, which is in parentheses and may contain spaces.
    const size_t paren = stat.rfind(')');
    if (paren != std::string::npos && ticks > 0) {
      std::vector<std::string> f = absl::StrSplit(stat.substr(paren + 2), ' ');
      // f[0] is field 3 (state): utime is field 14 -> f[11], stime f[12], starttime f[19],
      // vsize f[20], rss (pages) f[21].
      if (f.size() > 21) {
        const double cpu = (std::stod(f[11]) + std::stod(f[12])) / static_cast<double>(ticks);
        out.push_back(Family("process_cpu_seconds_total",
                             "Total user and system CPU time spent in seconds.",
                             prometheus::MetricType::Counter, cpu));
        out.push_back(Family("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                             prometheus::MetricType::Gauge, std::stod(f[20])));
        out.push_back(Family("process_resident_memory_bytes", "Resident memory size in bytes.",
                             prometheus::MetricType::Gauge,
                             std::stod(f[21]) * static_cast<double>(page)));
        const double boot = BootTimeSeconds();
        if (boot > 0) {
          out.push_back(Family("process_start_time_seconds",
                               "Start time of the process since unix epoch in seconds.",
                               prometheus::MetricType::Gauge,
                               boot + std::stod(f[19]) / static_cast<double>(ticks)));
        }
      }
    }
    out.push_back(Family("process_open_fds", "Number of open file descriptors.",
                         prometheus::MetricType::Gauge, OpenFds()));
    rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
      out.push_back(Family("process_max_fds", "Maximum number of open file descriptors.",
                           prometheus::MetricType::Gauge, static_cast<double>(lim.rlim_cur)));
    }
    return out;
  }

 private:
  static prometheus::MetricFamily Family(std::string name, std::string help,
                                         prometheus::MetricType type, double value) {
    prometheus::MetricFamily family;
    family.name = std::move(name);
    family.help = std::move(help);
    family.type = type;
    prometheus::ClientMetric m;
    if (type == prometheus::MetricType::Counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    family.metric.push_back(std::move(m));
    return family;
  }

  static double BootTimeSeconds() {
    std::ifstream in("/proc/stat");
    std::string line;
    while (std::getline(in, line)) {
      if (absl::StartsWith(line, "btime ")) return std::stod(line.substr(6));
    }
    return 0;
  }

  static double OpenFds() {
    DIR* dir = opendir("/proc/self/fd");
    if (dir == nullptr) return 0;
    double n = 0;
    while (dirent* e = readdir(dir)) {
      if (e->d_name[0] != '.') ++n;
    }
    closedir(dir);
    return n - 1;  // the descriptor opendir itself holds
  }
};

// Building blocks for collectors: one family, and its samples.
prometheus::MetricFamily MakeFamily(std::string name, std::string help,
                                    prometheus::MetricType type) {
  prometheus::MetricFamily family;
  family.name = std::move(name);
  family.help = std::move(help);
  family.type = type;
  return family;
}

void AddSample(prometheus::MetricFamily& family, double value,
               std::vector<prometheus::ClientMetric::Label> labels = {}) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  if (family.type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  family.metric.push_back(std::move(m));
}

prometheus::MetricFamily Scalar(std::string name, std::string help, prometheus::MetricType type,
                                double value) {
  prometheus::MetricFamily family = MakeFamily(std::move(name), std::move(help), type);
  AddSample(family, value);
  return family;
}

// A histogram from per-bucket counts (counts[i]: values <= bounds[i] and above the bound
// before; counts[n]: above every bound), as the engine and registry keep them.
prometheus::MetricFamily HistogramFamily(std::string name, std::string help, const double* bounds,
                                         int n, const uint64_t* counts, double sum) {
  prometheus::MetricFamily family =
      MakeFamily(std::move(name), std::move(help), prometheus::MetricType::Histogram);
  prometheus::ClientMetric m;
  uint64_t cumulative = 0;
  for (int i = 0; i <= n; ++i) {
    cumulative += counts[i];
    prometheus::ClientMetric::Bucket b;
    b.cumulative_count = cumulative;
    b.upper_bound = i < n ? bounds[i] : std::numeric_limits<double>::infinity();
    m.histogram.bucket.push_back(b);
  }
  m.histogram.sample_count = cumulative;
  m.histogram.sample_sum = sum;
  family.metric.push_back(std::move(m));
  return family;
}

// The families read from the engine and the adapter registry at scrape time (see the header).
class ServingCollector : public prometheus::Collectable {
 public:
  ServingCollector(const Engine* engine, const AdapterRegistry* registry,
                   const ServingMetricsOptions& options)
      : engine_(engine), registry_(registry), options_(options) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::MetricType;
    std::vector<prometheus::MetricFamily> out;
    EngineAdapterSets sets;
    if (engine_ != nullptr) {
      const EngineStats s = engine_->Stats();
      sets = engine_->AdapterSets();
      const double kv_ratio = s.kv_total_blocks > 0 ? static_cast<double>(s.kv_used_blocks) /
                                                          static_cast<double>(s.kv_total_blocks)
                                                    : 0.0;
      out.push_back(Scalar("loraserve_requests_running",
                           "Generation requests running now (scheduled, holding KV blocks).",
                           MetricType::Gauge, static_cast<double>(s.num_running)));
      out.push_back(Scalar("loraserve_requests_waiting",
                           "Generation requests submitted and not running now: not yet "
                           "admitted, preempted, or waiting for their adapter.",
                           MetricType::Gauge, static_cast<double>(s.num_waiting)));
      out.push_back(Scalar("loraserve_kv_cache_usage_ratio",
                           "Fraction of the KV cache blocks held by requests, 0 to 1.",
                           MetricType::Gauge, kv_ratio));
      out.push_back(Scalar("loraserve_kv_cache_used_blocks", "KV cache blocks held by requests.",
                           MetricType::Gauge, s.kv_used_blocks));
      out.push_back(Scalar("loraserve_kv_cache_capacity_blocks", "KV cache blocks in the pool.",
                           MetricType::Gauge, s.kv_total_blocks));
      out.push_back(Scalar("loraserve_engine_steps_total", "Forward steps the engine ran.",
                           MetricType::Counter, static_cast<double>(s.steps)));
      out.push_back(Scalar("loraserve_preemptions_total",
                           "Requests preempted under KV cache pressure (their blocks freed, "
                           "their context recomputed later).",
                           MetricType::Counter, static_cast<double>(s.preemptions)));
      prometheus::MetricFamily rows =
          MakeFamily("loraserve_step_rows_total",
                     "Rows (tokens) fed to forward steps, by phase: prefill (prompt chunks and "
                     "recomputed context) or decode.",
                     MetricType::Counter);
      AddSample(rows, static_cast<double>(s.rows_prefill), {{"phase", "prefill"}});
      AddSample(rows, static_cast<double>(s.rows_decode), {{"phase", "decode"}});
      out.push_back(std::move(rows));
      out.push_back(HistogramFamily("loraserve_step_tokens",
                                    "Tokens (prefill and decode rows) per forward step.",
                                    EngineStats::kStepRowsBounds, EngineStats::kNumStepRowsBuckets,
                                    s.step_rows_buckets, static_cast<double>(s.step_rows_sum)));
      out.push_back(HistogramFamily(
          "loraserve_step_adapters",
          "Distinct adapters (versions; the base model not counted) per forward step.",
          EngineStats::kStepAdaptersBounds, EngineStats::kNumStepAdaptersBuckets,
          s.step_adapters_buckets, static_cast<double>(s.step_adapters_sum)));
      if (options_.vllm_compat) {
        // The names the Gateway API Inference Extension reads (vLLM's); not lint-clean by design.
        out.push_back(Scalar("vllm:num_requests_running",
                             "Requests running (same as loraserve_requests_running).",
                             MetricType::Gauge, static_cast<double>(s.num_running)));
        out.push_back(Scalar("vllm:num_requests_waiting",
                             "Requests waiting (same as loraserve_requests_waiting).",
                             MetricType::Gauge, static_cast<double>(s.num_waiting)));
        out.push_back(Scalar("vllm:kv_cache_usage_perc",
                             "KV cache usage, 0 to 1 (same as loraserve_kv_cache_usage_ratio).",
                             MetricType::Gauge, kv_ratio));
      }
    }
    if (options_.vllm_compat) {
      // Exactly one series. The sets are read under the engine's lock at this scrape, so they
      // are current now: the value, the last-update time, is the scrape's.
      prometheus::MetricFamily lora =
          MakeFamily("vllm:lora_requests_info",
                     "Adapters with running and waiting requests (comma-separated ids); the "
                     "value is the unix time they were last updated.",
                     MetricType::Gauge);
      AddSample(lora, absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()),
                {{"max_lora", absl::StrCat(options_.max_loras)},
                 {"running_lora_adapters", absl::StrJoin(sets.running, ",")},
                 {"waiting_lora_adapters", absl::StrJoin(sets.waiting, ",")}});
      out.push_back(std::move(lora));
    }
    if (registry_ != nullptr) CollectAdapters(registry_->Stats(), out);
    return out;
  }

 private:
  static void CollectAdapters(const AdapterRegistryStats& s,
                              std::vector<prometheus::MetricFamily>& out) {
    using prometheus::MetricType;
    prometheus::MetricFamily loads = MakeFamily(
        "loraserve_adapter_loads_total",
        "Adapter loads from disk (read, validate, convert) by result.", MetricType::Counter);
    AddSample(loads, static_cast<double>(s.loads), {{"result", "success"}});
    AddSample(loads, static_cast<double>(s.load_failures), {{"result", "failure"}});
    out.push_back(std::move(loads));
    out.push_back(HistogramFamily(
        "loraserve_adapter_load_seconds", "Time to load an adapter from disk, retries included.",
        AdapterRegistryStats::kLatencyBucketBounds, AdapterRegistryStats::kNumLatencyBuckets,
        s.load_latency_buckets, s.load_seconds_sum));
    out.push_back(Scalar("loraserve_adapter_placements_total",
                         "Adapter copies into the resident pool.", MetricType::Counter,
                         static_cast<double>(s.placements)));
    prometheus::MetricFamily evictions =
        MakeFamily("loraserve_adapter_evictions_total",
                   "Adapters evicted (least recently used, unreferenced, unpinned) by tier.",
                   MetricType::Counter);
    AddSample(evictions, static_cast<double>(s.pool_evictions), {{"tier", "pool"}});
    AddSample(evictions, static_cast<double>(s.host_evictions), {{"tier", "host"}});
    out.push_back(std::move(evictions));
    out.push_back(Scalar("loraserve_adapter_wait_timeouts_total",
                         "Requests failed after waiting too long for their adapter to become "
                         "resident.",
                         MetricType::Counter, static_cast<double>(s.wait_timeouts)));
    prometheus::MetricFamily resident = MakeFamily(
        "loraserve_adapters_resident",
        "Adapter versions held by tier: pool (the memory the kernels read) or host (the host "
        "cache of loaded adapters).",
        MetricType::Gauge);
    AddSample(resident, static_cast<double>(s.resident_versions), {{"tier", "pool"}});
    AddSample(resident, static_cast<double>(s.host_versions), {{"tier", "host"}});
    out.push_back(std::move(resident));
    prometheus::MetricFamily bytes =
        MakeFamily("loraserve_adapter_resident_bytes",
                   "Packed bytes of the adapter versions held by tier.", MetricType::Gauge);
    AddSample(bytes, static_cast<double>(s.pool_bytes), {{"tier", "pool"}});
    AddSample(bytes, static_cast<double>(s.host_bytes), {{"tier", "host"}});
    out.push_back(std::move(bytes));
    prometheus::MetricFamily capacity = MakeFamily(
        "loraserve_adapter_capacity_bytes", "Capacity of each adapter tier.", MetricType::Gauge);
    AddSample(capacity, static_cast<double>(s.pool_capacity_bytes), {{"tier", "pool"}});
    AddSample(capacity, static_cast<double>(s.host_cache_capacity_bytes), {{"tier", "host"}});
    out.push_back(std::move(capacity));
    out.push_back(Scalar("loraserve_adapter_pool_used_page_bytes",
                         "Bytes of the pool's pages held by resident adapters (whole pages).",
                         MetricType::Gauge, static_cast<double>(s.pool_used_pages_bytes)));
    out.push_back(Scalar("loraserve_adapters_loading", "Adapter versions being loaded or placed.",
                         MetricType::Gauge, static_cast<double>(s.loading_versions)));
    out.push_back(Scalar("loraserve_adapter_references",
                         "References held by requests on adapter versions.", MetricType::Gauge,
                         static_cast<double>(s.refs)));
    out.push_back(Scalar("loraserve_adapters_pinned", "Adapter ids pinned by operators.",
                         MetricType::Gauge, static_cast<double>(s.pinned_ids)));
  }

  const Engine* const engine_;
  const AdapterRegistry* const registry_;
  const ServingMetricsOptions options_;
};

// Latency buckets: vLLM's (for dashboard parity), with finer ones below where a small model
// on a CPU lives.
constexpr double kTtftBuckets[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                   0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                   20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
constexpr double kInterTokenBuckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                                         0.15,  0.2,    0.3,   0.4,  0.5,   0.75, 1.0,   2.5,
                                         5.0,   7.5,    10.0,  20.0, 40.0,  80.0};
constexpr double kRequestBuckets[] = {0.001, 0.005, 0.01,  0.05,  0.1,   0.3,   0.5,    0.8,   1.0,
                                      1.5,   2.0,   2.5,   5.0,   10.0,  15.0,  20.0,   30.0,  40.0,
                                      50.0,  60.0,  120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

constexpr std::array<absl::string_view, 17> kCodeNames = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::BuildGauge()
      .Name("loraserve_build_info")
      .Help("Build of the running loraserve; the value is always 1.")
      .Register(*registry_)
      .Add({{"version", kVersion},
            {"git_commit", kGitCommit},
            {"build_type", kBuildType},
            {"cuda", kCudaBuilt ? "true" : "false"}})
      .Set(1);
  rpcs_ = &prometheus::BuildCounter()
               .Name("loraserve_grpc_requests_total")
               .Help("Finished gRPC calls by method and status code.")
               .Register(*registry_);
  requests_ = &prometheus::BuildCounter()
                   .Name("loraserve_requests_total")
                   .Help(
                       "Ended generation requests (Generate, GenerateStream) by status code and "
                       "finish reason (rejected: refused before generation started).")
                   .Register(*registry_);
  auto histogram = [this](const char* name, const char* help, const auto& bounds) {
    const std::vector<double> buckets(std::begin(bounds), std::end(bounds));
    return &prometheus::BuildHistogram()
                .Name(name)
                .Help(help)
                .Register(*registry_)
                .Add({}, buckets);
  };
  e2e_ = histogram(
      "loraserve_e2e_request_latency_seconds",
      "Generation request latency, from arrival to the end (the last token, or the error).",
      kRequestBuckets);
  ttft_ = histogram("loraserve_time_to_first_token_seconds",
                    "Time from a request's arrival to its first generated token.", kTtftBuckets);
  queue_time_ = histogram("loraserve_request_queue_time_seconds",
                          "Time a request waited from submission to its first scheduled step.",
                          kRequestBuckets);
  inter_token_ =
      histogram("loraserve_inter_token_latency_seconds",
                "Time between two consecutive generated tokens of a request.", kInterTokenBuckets);
  prompt_tokens_ = &prometheus::BuildCounter()
                        .Name("loraserve_prompt_tokens_total")
                        .Help("Prompt tokens of ended generation requests.")
                        .Register(*registry_)
                        .Add({});
  generation_tokens_ = &prometheus::BuildCounter()
                            .Name("loraserve_generation_tokens_total")
                            .Help("Tokens generated for ended generation requests.")
                            .Register(*registry_)
                            .Add({});
  auto& hits =
      prometheus::BuildCounter()
          .Name("loraserve_adapter_cache_hits_total")
          .Help("Requests whose adapter was in the tier just before they took their reference.")
          .Register(*registry_);
  auto& misses = prometheus::BuildCounter()
                     .Name("loraserve_adapter_cache_misses_total")
                     .Help(
                         "Requests whose adapter was not in the tier just before they took their "
                         "reference (host: it had to be read from disk).")
                     .Register(*registry_);
  pool_hits_ = &hits.Add({{"tier", "pool"}});
  host_hits_ = &hits.Add({{"tier", "host"}});
  pool_misses_ = &misses.Add({{"tier", "pool"}});
  host_misses_ = &misses.Add({{"tier", "host"}});
  process_collector_ = std::make_shared<ProcessCollector>();
}

Metrics::~Metrics() = default;

absl::StatusOr<int> Metrics::Serve(const std::string& address) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(process_collector_);
  {
    MutexLock lock(&serving_mu_);
    if (serving_collector_ != nullptr) exposer_->RegisterCollectable(serving_collector_);
  }
  const std::vector<int> ports = exposer_->GetListeningPorts();
  if (ports.empty()) return absl::InternalError("metrics exposer reports no listening port");
  return ports.front();
}

void Metrics::SetKnownMethods(const std::vector<std::string>& full_methods) {
  known_methods_.clear();
  known_methods_.insert(full_methods.begin(), full_methods.end());
}

void Metrics::RecordRpc(absl::string_view full_method, int grpc_code) {
  std::string method = "other";
  if (known_methods_.contains(full_method)) method = std::string(full_method.substr(1));
  const absl::string_view code = grpc_code >= 0 && grpc_code < static_cast<int>(kCodeNames.size())
                                     ? kCodeNames[grpc_code]
                                     : "UNKNOWN";
  rpcs_->Add({{"method", method}, {"code", std::string(code)}}).Increment();
}

}  // namespace ls

namespace ls {

void Metrics::RecordGeneration(const GenerationRecord& record) {
  const absl::string_view code =
      record.grpc_code >= 0 && record.grpc_code < static_cast<int>(kCodeNames.size())
          ? kCodeNames[record.grpc_code]
          : "UNKNOWN";
  requests_
      ->Add({{"code", std::string(code)}, {"finished_reason", std::string(record.finished_reason)}})
      .Increment();
  e2e_->Observe(record.e2e_seconds);
  if (record.ttft_seconds >= 0) ttft_->Observe(record.ttft_seconds);
  if (record.queue_seconds >= 0) queue_time_->Observe(record.queue_seconds);
  prompt_tokens_->Increment(static_cast<double>(record.prompt_tokens));
  generation_tokens_->Increment(static_cast<double>(record.generation_tokens));
}

void Metrics::RecordAdapterLookup(bool in_pool, bool in_host) {
  if (in_pool) {
    pool_hits_->Increment();
    return;
  }
  pool_misses_->Increment();
  (in_host ? host_hits_ : host_misses_)->Increment();
}

void Metrics::AttachServing(const Engine* engine, const AdapterRegistry* registry,
                            const ServingMetricsOptions& options) {
  DetachServing();
  MutexLock lock(&serving_mu_);
  serving_collector_ = std::make_shared<ServingCollector>(engine, registry, options);
  if (exposer_ != nullptr) exposer_->RegisterCollectable(serving_collector_);
}

void Metrics::DetachServing() {
  MutexLock lock(&serving_mu_);
  if (serving_collector_ == nullptr) return;
  // The exposer collects under its own lock, which RemoveCollectable takes too: once it
  // returns, no scrape reads the engine or the registry any more.
  if (exposer_ != nullptr) exposer_->RemoveCollectable(serving_collector_);
  serving_collector_.reset();
}

}  // namespace ls

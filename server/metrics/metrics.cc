#include "server/metrics/metrics.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <exception>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "prometheus/gauge.h"
#include "prometheus/metric_family.h"
#include "server/build_info.h"

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

// The Prometheus side of the server: one registry for every metric, exposed over HTTP on its
// own port at /metrics. Labels are bounded by construction: RPC methods come from a fixed list
// and codes from the gRPC code set; nothing is labelled per adapter or per request.
#ifndef LORASERVE_SERVER_METRICS_METRICS_H_
#define LORASERVE_SERVER_METRICS_METRICS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/registry.h"

namespace ls {

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

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_collector_;
  prometheus::Family<prometheus::Counter>* rpcs_ = nullptr;
  absl::flat_hash_set<std::string> known_methods_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_METRICS_METRICS_H_

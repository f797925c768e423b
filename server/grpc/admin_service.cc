#include "server/grpc/admin_service.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "google/protobuf/util/time_util.h"
#include "server/adapters/upload.h"
#include "server/grpc/auth.h"
#include "server/grpc/proto_types.h"
#include "server/grpc/reactors.h"
#include "server/grpc/rpc_status.h"
#include "server/grpc/status_mapping.h"

namespace ls {
namespace {

namespace v1 = ::loraserve::v1;

// Blocking admin work (loads wait for files, uploads fsync) runs here; a handful of threads is
// plenty for operator traffic, and a stuck load occupies one of these, not a gRPC thread.
constexpr int kAdminWorkerThreads = 4;
// List and Get only read the registry and the root's folder names; their own threads keep them
// answering while every mutation worker waits on a hung load.
constexpr int kAdminReaderThreads = 2;
constexpr uint32_t kDefaultPageSize = 100;
constexpr uint32_t kMaxPageSize = 1000;

absl::Time DeadlineOf(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

absl::string_view CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

google::protobuf::Timestamp ToProto(absl::Time t) {
  return google::protobuf::util::TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(t));
}

// The proto's module order (the forward pass): embed_tokens, q .. down, lm_head.
int ModuleOrder(LoraModule m) { return m == LoraModule::kEmbedTokens ? -1 : static_cast<int>(m); }

void FillGroups(const LoraAdapterReport& report,
                google::protobuf::RepeatedPtrField<v1::ModuleGroup>* out) {
  // (module order, rank, alpha) -> scale, layers
  std::map<std::tuple<int, int32_t, double>, std::pair<float, std::vector<uint32_t>>> groups;
  std::map<int, LoraModule> modules;
  for (const LoraModuleReport& m : report.modules) {
    const int order = ModuleOrder(m.module);
    modules[order] = m.module;
    auto& g = groups[{order, m.rank, m.alpha}];
    g.first = m.scale;
    if (m.layer >= 0) g.second.push_back(static_cast<uint32_t>(m.layer));
  }
  for (auto& [key, value] : groups) {
    v1::ModuleGroup* g = out->Add();
    g->set_module(std::string(LoraModuleName(modules[std::get<0>(key)])));
    g->set_rank(static_cast<uint32_t>(std::get<1>(key)));
    g->set_alpha(std::get<2>(key));
    g->set_scale(value.first);
    std::sort(value.second.begin(), value.second.end());
    g->set_num_layers(value.second.empty() ? 1 : static_cast<uint32_t>(value.second.size()));
    for (uint32_t layer : value.second) g->add_layers(layer);
  }
}

DType WidestDiskDType(const LoraAdapterReport& report) {
  DType widest = DType::kBF16;
  size_t widest_size = 0;
  for (DType d : report.disk_dtypes) {
    const size_t size = static_cast<size_t>(DTypeBits(d));
    if (size > widest_size || (size == widest_size && d == DType::kF16)) {
      widest = d;
      widest_size = size;
    }
  }
  return widest;
}

struct DiskFacts {
  uint64_t bytes = 0;
  absl::Time weights_mtime = absl::InfinitePast();
};

DiskFacts StatFiles(const AdapterStore& store, const std::string& id) {
  DiskFacts facts;
  absl::StatusOr<AdapterPaths> paths = store.Resolve(id);
  if (!paths.ok()) return facts;
  struct stat st;
  if (::stat(paths->config_path.c_str(), &st) == 0)
    facts.bytes += static_cast<uint64_t>(st.st_size);
  if (::stat(paths->weights_path.c_str(), &st) == 0) {
    facts.bytes += static_cast<uint64_t>(st.st_size);
    facts.weights_mtime = absl::TimeFromTimespec(st.st_mtim);
  }
  return facts;
}

v1::AdapterState ProtoState(const AdapterInfo& in) {
  switch (in.state) {
    case AdapterState::kDisabled:
      return v1::ADAPTER_STATE_DISABLED;
    case AdapterState::kFailed:
      return v1::ADAPTER_STATE_FAILED;
    case AdapterState::kLoading:
      return v1::ADAPTER_STATE_LOADING;
    case AdapterState::kHost:
    case AdapterState::kResident:
      return v1::ADAPTER_STATE_READY;
    case AdapterState::kOnDisk:
      // Loaded once and since evicted from every tier: still validated and enabled.
      return in.last_loaded_version.empty() ? v1::ADAPTER_STATE_AVAILABLE : v1::ADAPTER_STATE_READY;
  }
  return v1::ADAPTER_STATE_UNSPECIFIED;
}

void FillInfo(const AdapterInfo& in, const AdapterRegistry& registry, v1::AdapterInfo* out) {
  out->set_id(in.id);
  const std::string& version = in.version.empty() ? in.last_loaded_version : in.version;
  out->set_version(version);
  out->set_state(ProtoState(in));
  if (in.in_pool) {
    out->set_tier(v1::ADAPTER_TIER_DEVICE);
  } else if (in.in_host) {
    out->set_tier(v1::ADAPTER_TIER_HOST);
  } else if (!version.empty()) {
    out->set_tier(v1::ADAPTER_TIER_DISK);
  }
  out->set_pinned(in.pins > 0);
  if (in.report != nullptr) {
    const LoraAdapterReport& r = *in.report;
    out->set_rank(static_cast<uint32_t>(r.r));
    int32_t max_rank = 0;
    for (const LoraModuleReport& m : r.modules) max_rank = std::max(max_rank, m.rank);
    out->set_max_rank(static_cast<uint32_t>(max_rank));
    out->set_lora_alpha(r.lora_alpha);
    if (r.r > 0) {
      out->set_scale(r.use_rslora ? r.lora_alpha / std::sqrt(static_cast<double>(r.r))
                                  : r.lora_alpha / static_cast<double>(r.r));
    }
    out->set_use_rslora(r.use_rslora);
    out->add_target_modules(r.target_modules);
    out->set_num_matched_modules(static_cast<uint32_t>(r.modules.size()));
    FillGroups(r, out->mutable_module_groups());
    out->set_disk_dtype(ToProtoDType(WidestDiskDType(r)));
    out->set_base_model_name_or_path(r.base_model_name_or_path);
  }
  const DiskFacts disk = StatFiles(registry.store(), in.id);
  out->set_disk_bytes(disk.bytes);
  if (!version.empty() && disk.weights_mtime != absl::InfinitePast()) {
    *out->mutable_created_time() = ToProto(disk.weights_mtime);
  }
  if (in.in_pool) {
    out->set_pool_bytes(static_cast<uint64_t>(in.pool_run.count) * registry.options().page_bytes);
  }
  if (in.in_host) out->set_host_bytes(in.packed_bytes);
  for (const AdapterVersionInfo& v : in.versions) {
    if (v.current) {
      out->set_in_flight_requests(static_cast<uint32_t>(v.refs));
    } else if (v.refs > 0) {
      v1::RetiredVersion* r = out->add_retired_versions();
      r->set_version(v.version);
      r->set_in_flight_requests(static_cast<uint32_t>(v.refs));
      r->set_resident_bytes((v.in_pool ? v.packed_bytes : 0) + (v.in_host ? v.packed_bytes : 0));
    }
  }
  out->set_requests_served(in.requests_served);
  out->set_tokens_served(in.tokens_served);
  if (in.loaded_at != absl::InfinitePast()) *out->mutable_loaded_time() = ToProto(in.loaded_at);
  if (in.last_used != absl::InfinitePast()) *out->mutable_last_used_time() = ToProto(in.last_used);
  if (!in.status.ok()) {
    out->set_last_error(std::string(in.status.message()));
  } else if (in.last_load != nullptr && !in.last_load->status.ok()) {
    // The id still serves (a failed reload, a transient error), but its last load failed.
    out->set_last_error(std::string(in.last_load->status.message()));
  }
}

void FillReport(const LoraAdapterReport& r, const AdapterRegistry& registry, uint64_t disk_bytes,
                double seconds, v1::LoadReport* out) {
  out->set_version(r.version);
  FillGroups(r, out->mutable_module_groups());
  out->set_num_matched_modules(static_cast<uint32_t>(r.modules.size()));
  out->set_num_tensors(static_cast<uint32_t>(2 * r.modules.size()));
  out->set_disk_dtype(ToProtoDType(WidestDiskDType(r)));
  out->set_pool_dtype(ToProtoDType(r.dtype));
  out->set_disk_bytes(disk_bytes);
  out->set_weight_bytes(r.packed_bytes);
  const size_t page = registry.options().page_bytes;
  out->set_pool_pages(static_cast<uint32_t>((r.packed_bytes + page - 1) / page));
  out->set_load_seconds(seconds);
  for (const std::string& key : r.ignored_config_keys) {
    out->add_warnings(absl::StrCat(key, " in adapter_config.json is ignored at inference"));
  }
  if (r.disk_dtypes.size() > 1) {
    std::vector<std::string> names;
    for (DType d : r.disk_dtypes) names.emplace_back(DTypeName(d));
    out->add_warnings(absl::StrCat("tensors mix dtypes on disk: ", absl::StrJoin(names, ", ")));
  }
}

// GetAdapter's last_load_report: the registry's record of the id's last load, whoever asked for
// it. A failed load has no version (its error is AdapterInfo.last_error); when it read the files
// before failing (larger than the pool) the report still describes them.
void FillLoadRecord(const AdapterLoadRecord& record, const AdapterRegistry& registry,
                    uint64_t disk_bytes, v1::LoadReport* out) {
  if (record.report != nullptr) {
    FillReport(*record.report, registry, disk_bytes, record.seconds, out);
  }
  out->set_version(record.version);
  out->set_previous_version(record.previous_version);
  out->set_unchanged(record.unchanged);
  out->set_load_seconds(record.seconds);
}

grpc::Status Status(const absl::Status& s) { return ToGrpcStatus(s); }

// Page tokens: the filter they were issued for and the last id returned, base64. Opaque to
// clients; a token used with another filter is refused.
std::string FilterKey(const v1::ListAdaptersRequest& request) {
  std::vector<int> states(request.states().begin(), request.states().end());
  std::sort(states.begin(), states.end());
  return absl::StrCat(absl::StrJoin(states, ","), "|", request.id_prefix());
}

}  // namespace

// ---- Workers ---------------------------------------------------------------------------------

class AdminService::Workers {
 public:
  explicit Workers(int n) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { Main(); });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  void Post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  void Main() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping, and nothing left to finish
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// ---- Per-id turns ----------------------------------------------------------------------------

// Serializes the calls that change one id, in arrival order. Not a plain mutex: a call waiting
// for its turn must give up when its deadline passes or its client cancels (admin.proto: it
// then ends with DEADLINE_EXCEEDED and changes nothing), and std::mutex has no timed lock.
class AdminService::IdQueue {
 public:
  static std::string FormatMs(absl::Duration d) {
    return absl::FormatDuration(absl::Trunc(d, absl::Milliseconds(1)));
  }

  // Waits for the caller's turn. Not OK (its place given up, nothing done) when `context`'s
  // deadline passes or the call is cancelled first.
  grpc::Status Enter(const grpc::CallbackServerContext* context, absl::string_view rpc,
                     const std::string& id) {
    const absl::Time deadline = DeadlineOf(context);
    const absl::Time start = absl::Now();
    MutexLock lock(&mu_);
    const uint64_t ticket = next_ticket_++;
    queue_.push_back(ticket);
    while (true) {
      const absl::Time now = absl::Now();
      const bool turn = queue_.front() == ticket;
      // gRPC also cancels a call when its deadline passes, on its own clock, which may run a
      // little ahead of ours: a cancellation that close to the deadline is the deadline.
      const bool ended = now >= deadline || context->IsCancelled();
      const bool cancelled = ended && now < deadline - absl::Milliseconds(100);
      if (ended) {
        std::string why = cancelled ? "cancelled" : "the deadline passed";
        if (turn) {
          absl::StrAppend(&why, " before it started");
        } else {
          absl::StrAppend(&why, " after waiting ", FormatMs(now - start), " behind ",
                          holder_rpc_.empty() ? std::string("another call") : holder_rpc_,
                          " (running for ", FormatMs(now - holder_since_),
                          "), which changes the same id");
        }
        queue_.erase(std::find(queue_.begin(), queue_.end(), ticket));
        cv_.SignalAll();
        return grpc::Status(
            cancelled ? grpc::StatusCode::CANCELLED : grpc::StatusCode::DEADLINE_EXCEEDED,
            absl::StrCat(rpc, " of adapter \"", absl::CHexEscape(id), "\": ", why,
                         "; nothing was changed"));
      }
      if (turn) break;
      // Wakes at the deadline, and every 100 ms to notice a cancellation.
      cv_.WaitWithDeadline(&mu_, std::min(deadline, now + absl::Milliseconds(100)));
    }
    holder_rpc_ = std::string(rpc);
    holder_since_ = absl::Now();
    return grpc::Status::OK;
  }

  void Leave() {
    MutexLock lock(&mu_);
    queue_.pop_front();
    holder_rpc_.clear();
    cv_.SignalAll();
  }

 private:
  Mutex mu_;
  CondVar cv_;
  std::deque<uint64_t> queue_ ABSL_GUARDED_BY(mu_);  // tickets; the front one runs
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  std::string holder_rpc_ ABSL_GUARDED_BY(mu_);
  absl::Time holder_since_ ABSL_GUARDED_BY(mu_);
};

// The caller's turn on one id while it lives (RAII), if status() is OK.
class AdminService::IdTurn {
 public:
  IdTurn(IdQueue* queue, const grpc::CallbackServerContext* context, absl::string_view rpc,
         const std::string& id)
      : queue_(queue), status_(queue->Enter(context, rpc, id)) {}
  ~IdTurn() {
    if (status_.ok()) queue_->Leave();
  }
  IdTurn(const IdTurn&) = delete;
  IdTurn& operator=(const IdTurn&) = delete;
  const grpc::Status& status() const { return status_; }

 private:
  IdQueue* const queue_;
  const grpc::Status status_;
};

// ---- The service -----------------------------------------------------------------------------

AdminService::AdminService(ServerState* state, DrainGate* gate, const Authorizer* auth,
                           Metrics& metrics)
    : state_(state),
      gate_(gate),
      auth_(auth),
      workers_(std::make_unique<Workers>(kAdminWorkerThreads)),
      readers_(std::make_unique<Workers>(kAdminReaderThreads)) {
  upload_bytes_ = &prometheus::BuildCounter()
                       .Name("loraserve_adapter_upload_bytes_total")
                       .Help("Adapter file bytes received by UploadAdapter (any outcome)")
                       .Register(metrics.registry())
                       .Add({});
  uploads_ = &prometheus::BuildCounter()
                  .Name("loraserve_adapter_uploads_total")
                  .Help(
                      "UploadAdapter calls by result: ok, invalid, too_large, quota, "
                      "hash_mismatch, exists, cancelled, error")
                  .Register(metrics.registry());
  for (const char* result :
       {"ok", "invalid", "too_large", "quota", "hash_mismatch", "exists", "cancelled", "error"}) {
    uploads_->Add({{"result", result}});
  }
}

AdminService::~AdminService() = default;

AdapterRegistry* AdminService::registry() const {
  const LoadedModel* m = state_->model();
  return m != nullptr ? m->adapters.get() : nullptr;
}

grpc::Status AdminService::NoRegistryStatus() const {
  if (state_->model() == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "the server was started without a model (--model): there are no adapters");
  }
  return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                      "the server was started without --adapter_root: it serves the base model "
                      "only and has no adapters to manage");
}

void AdminService::CountUpload(absl::string_view result) {
  uploads_->Add({{"result", std::string(result)}}).Increment();
}

AdminService::IdQueue* AdminService::IdLock(const std::string& id) {
  MutexLock lock(&locks_mu_);
  std::unique_ptr<IdQueue>& queue = locks_[id];
  if (queue == nullptr) queue = std::make_unique<IdQueue>();
  return queue.get();
}

void AdminService::Audit(const std::string& who, absl::string_view rpc, const std::string& id,
                         const grpc::Status& status, const std::string& detail) const {
  std::string message = status.error_message();
  if (message.size() > 300) message = absl::StrCat(message.substr(0, 300), "...");
  LS_LOG(INFO) << "audit who=" << (who.empty() ? "-" : who) << " rpc=" << rpc << " id=\""
               << absl::CHexEscape(id.substr(0, 200))
               << "\" result=" << CodeName(status.error_code()) << (detail.empty() ? "" : " ")
               << detail
               << (message.empty() ? "" : " message=\"" + absl::CHexEscape(message) + "\"");
}

grpc::ServerUnaryReactor* AdminService::Run(grpc::CallbackServerContext* context,
                                            absl::string_view rpc, const std::string& id,
                                            bool mutation,
                                            std::function<grpc::Status(std::string*)> work) {
  std::string who;
  if (auth_ != nullptr) {
    grpc::Status allowed = auth_->CheckAdmin(*context, &who);
    if (!allowed.ok()) {
      Audit(who, rpc, id, allowed, "");
      return FinishUnary(context, allowed);
    }
  }
  auto ticket = std::make_shared<DrainGate::Ticket>(gate_->Enter());
  if (mutation && !*ticket) {
    Audit(who, rpc, id, DrainingStatus(), "");
    return FinishUnary(context, DrainingStatus());
  }
  if (registry() == nullptr) {
    Audit(who, rpc, id, NoRegistryStatus(), "");
    return FinishUnary(context, NoRegistryStatus());
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  (mutation ? workers_ : readers_)
      ->Post([this, reactor, ticket, who = std::move(who), rpc = std::string(rpc), id,
              work = std::move(work)] {
        std::string detail;
        grpc::Status status = work(&detail);
        Audit(who, rpc, id, status, detail);
        reactor->Finish(status);
      });
  return reactor;
}

// ---- Load / Unload / Delete / Pin / Unpin ------------------------------------------------------

grpc::ServerUnaryReactor* AdminService::LoadAdapter(grpc::CallbackServerContext* context,
                                                    const v1::LoadAdapterRequest* request,
                                                    v1::LoadAdapterResponse* response) {
  const std::string id = request->adapter_id();
  return Run(context, "LoadAdapter", id, true, [this, context, id, response](std::string* detail) {
    if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return Status(valid);
    AdapterRegistry& reg = *registry();
    IdTurn turn(IdLock(id), context, "LoadAdapter", id);
    if (!turn.status().ok()) return turn.status();
    const absl::Time start = absl::Now();
    absl::StatusOr<AdapterInfo> prior = reg.Get(id);
    if (!prior.ok()) return Status(prior.status());
    const bool was_ready = ProtoState(*prior) == v1::ADAPTER_STATE_READY;
    const std::string prior_version =
        prior->version.empty() ? prior->last_loaded_version : prior->version;
    AdapterInfo info;
    if (prior->state == AdapterState::kHost || prior->state == AdapterState::kResident) {
      // A version is in memory: read the files again and swap in a new version if they changed.
      absl::StatusOr<AdapterReloadResult> reloaded = reg.Reload(id, DeadlineOf(context));
      if (!reloaded.ok()) return Status(reloaded.status());
      info = std::move(reloaded->info);
    } else {
      // Nothing in memory: a plain load, whose failure the id keeps (state FAILED).
      absl::StatusOr<AdapterInfo> loaded = reg.Load(id, DeadlineOf(context));
      if (!loaded.ok()) return Status(loaded.status());
      info = *std::move(loaded);
    }
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    FillInfo(info, reg, response->mutable_adapter());
    v1::LoadReport* report = response->mutable_report();
    if (info.report != nullptr) {
      FillReport(*info.report, reg, response->adapter().disk_bytes(), seconds, report);
    }
    const std::string& version = response->adapter().version();
    report->set_version(version);
    if (was_ready && !prior_version.empty() && prior_version != version) {
      report->set_previous_version(prior_version);
    }
    report->set_unchanged(was_ready && prior_version == version);
    *detail =
        absl::StrCat("version=", version.substr(0, 12), report->unchanged() ? " unchanged" : "");
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* AdminService::UnloadAdapter(grpc::CallbackServerContext* context,
                                                      const v1::UnloadAdapterRequest* request,
                                                      v1::UnloadAdapterResponse* response) {
  const std::string id = request->adapter_id();
  const bool force = request->force();
  return Run(context, "UnloadAdapter", id, true,
             [this, context, id, force, response](std::string* detail) {
               if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return Status(valid);
               AdapterRegistry& reg = *registry();
               IdTurn turn(IdLock(id), context, "UnloadAdapter", id);
               if (!turn.status().ok()) return turn.status();
               if (absl::Status s = reg.Unload(id, force); !s.ok()) return Status(s);
               absl::StatusOr<AdapterInfo> info = reg.Get(id);
               if (!info.ok()) return Status(info.status());
               FillInfo(*info, reg, response->mutable_adapter());
               *detail = absl::StrCat("force=", force ? "true" : "false",
                                      " in_flight=", response->adapter().in_flight_requests());
               return grpc::Status::OK;
             });
}

grpc::ServerUnaryReactor* AdminService::DeleteAdapter(grpc::CallbackServerContext* context,
                                                      const v1::DeleteAdapterRequest* request,
                                                      v1::DeleteAdapterResponse* response) {
  const std::string id = request->adapter_id();
  const bool force = request->force();
  return Run(context, "DeleteAdapter", id, true,
             [this, context, id, force, response](std::string* detail) {
               if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return Status(valid);
               AdapterRegistry& reg = *registry();
               IdTurn turn(IdLock(id), context, "DeleteAdapter", id);
               if (!turn.status().ok()) return turn.status();
               // Described before the files go (disk bytes, created time).
               absl::StatusOr<AdapterInfo> before = reg.Get(id);
               if (!before.ok()) return Status(before.status());
               v1::AdapterInfo described;
               FillInfo(*before, reg, &described);
               absl::StatusOr<AdapterDeleteResult> deleted =
                   reg.Delete(id, force, DeadlineOf(context));
               if (!deleted.ok()) return Status(deleted.status());
               FillInfo(deleted->info, reg, response->mutable_adapter());
               response->mutable_adapter()->set_disk_bytes(described.disk_bytes());
               *response->mutable_adapter()->mutable_created_time() = described.created_time();
               response->set_freed_disk_bytes(deleted->freed_disk_bytes);
               *detail = absl::StrCat("force=", force ? "true" : "false",
                                      " freed_disk_bytes=", deleted->freed_disk_bytes);
               return grpc::Status::OK;
             });
}

grpc::ServerUnaryReactor* AdminService::PinAdapter(grpc::CallbackServerContext* context,
                                                   const v1::PinAdapterRequest* request,
                                                   v1::PinAdapterResponse* response) {
  const std::string id = request->adapter_id();
  return Run(context, "PinAdapter", id, true, [this, context, id, response](std::string*) {
    if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return Status(valid);
    AdapterRegistry& reg = *registry();
    IdTurn turn(IdLock(id), context, "PinAdapter", id);
    if (!turn.status().ok()) return turn.status();
    absl::StatusOr<AdapterInfo> info = reg.Get(id);
    if (!info.ok()) return Status(info.status());
    if (info->state == AdapterState::kDisabled || info->state == AdapterState::kFailed) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("adapter \"", id, "\" is ", AdapterStateName(info->state),
                                       ", not READY; LoadAdapter it first",
                                       info->status.ok() ? "" : ": ", info->status.message()));
    }
    absl::Status pinned = reg.Pin(id, DeadlineOf(context));
    if (absl::IsNotFound(pinned) && reg.Get(id).ok()) {
      // Registered but not served (--load_on_demand=false and never loaded).
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, std::string(pinned.message()));
    }
    if (!pinned.ok()) return Status(pinned);
    info = reg.Get(id);
    if (!info.ok()) return Status(info.status());
    FillInfo(*info, reg, response->mutable_adapter());
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* AdminService::UnpinAdapter(grpc::CallbackServerContext* context,
                                                     const v1::UnpinAdapterRequest* request,
                                                     v1::UnpinAdapterResponse* response) {
  const std::string id = request->adapter_id();
  return Run(context, "UnpinAdapter", id, true, [this, context, id, response](std::string*) {
    if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return Status(valid);
    AdapterRegistry& reg = *registry();
    IdTurn turn(IdLock(id), context, "UnpinAdapter", id);
    if (!turn.status().ok()) return turn.status();
    absl::StatusOr<AdapterInfo> info = reg.Get(id);
    if (!info.ok()) return Status(info.status());
    if (info->pins > 0) {
      absl::Status s = reg.Unpin(id);
      // Not pinned (any more) is success: unpinning is idempotent.
      if (!s.ok() && !absl::IsFailedPrecondition(s)) return Status(s);
      info = reg.Get(id);
      if (!info.ok()) return Status(info.status());
    }
    FillInfo(*info, reg, response->mutable_adapter());
    return grpc::Status::OK;
  });
}

// ---- List / Get --------------------------------------------------------------------------------

grpc::ServerUnaryReactor* AdminService::ListAdapters(grpc::CallbackServerContext* context,
                                                     const v1::ListAdaptersRequest* request,
                                                     v1::ListAdaptersResponse* response) {
  return Run(context, "ListAdapters", "", false, [this, request, response](std::string* detail) {
    const std::string filter = FilterKey(*request);
    std::string after;
    if (!request->page_token().empty()) {
      std::string decoded;
      const size_t nl = absl::WebSafeBase64Unescape(request->page_token(), &decoded)
                            ? decoded.find('\n')
                            : std::string::npos;
      if (nl == std::string::npos) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "page_token is not one this server issued (pass next_page_token "
                            "from the previous response unchanged)");
      }
      if (decoded.substr(0, nl) != filter) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "page_token was issued for a different filter (states, id_prefix); "
                            "start again without a page_token");
      }
      after = decoded.substr(nl + 1);
    }
    uint32_t page_size = request->page_size() == 0 ? kDefaultPageSize : request->page_size();
    page_size = std::min(page_size, kMaxPageSize);
    AdapterRegistry& reg = *registry();
    absl::StatusOr<std::vector<AdapterInfo>> all = reg.List();
    if (!all.ok()) return Status(all.status());
    uint32_t total = 0;
    std::string last;
    bool more = false;
    for (const AdapterInfo& info : *all) {
      if (!absl::StartsWith(info.id, request->id_prefix())) continue;
      if (!request->states().empty() &&
          std::find(request->states().begin(), request->states().end(), ProtoState(info)) ==
              request->states().end()) {
        continue;
      }
      ++total;
      if (!after.empty() && info.id <= after) continue;
      if (static_cast<uint32_t>(response->adapters_size()) == page_size) {
        more = true;
        continue;
      }
      FillInfo(info, reg, response->add_adapters());
      last = info.id;
    }
    response->set_total_size(total);
    if (more) response->set_next_page_token(absl::WebSafeBase64Escape(filter + "\n" + last));
    *detail = absl::StrCat("returned=", response->adapters_size(), " total=", total);
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* AdminService::GetAdapter(grpc::CallbackServerContext* context,
                                                   const v1::GetAdapterRequest* request,
                                                   v1::GetAdapterResponse* response) {
  const std::string id = request->adapter_id();
  return Run(context, "GetAdapter", id, false, [this, id, response](std::string*) {
    if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return Status(valid);
    AdapterRegistry& reg = *registry();
    absl::StatusOr<AdapterInfo> info = reg.Get(id);
    if (!info.ok()) return Status(info.status());
    FillInfo(*info, reg, response->mutable_adapter());
    if (info->last_load != nullptr) {
      FillLoadRecord(*info->last_load, reg, response->adapter().disk_bytes(),
                     response->mutable_last_load_report());
    }
    return grpc::Status::OK;
  });
}

// ---- Upload ----------------------------------------------------------------------------------

// One UploadAdapter call: the header and the commit run on the admin workers (disk walks,
// hashing, validation, fsync, the registry); chunks are written as they arrive. At most one
// read or one worker task is outstanding at any time, so the reactor's state needs no lock.
class AdminService::UploadReactor final : public grpc::ServerReadReactor<v1::UploadAdapterRequest> {
 public:
  UploadReactor(AdminService* service, grpc::CallbackServerContext* context,
                v1::UploadAdapterResponse* response, std::string who, DrainGate::Ticket ticket)
      : service_(service),
        context_(context),
        response_(response),
        who_(std::move(who)),
        ticket_(std::move(ticket)) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (context_->IsCancelled() || !have_header_) {
        End(context_->IsCancelled()
                ? grpc::Status(grpc::StatusCode::CANCELLED,
                               "the upload was cancelled or its stream broke; nothing was stored")
                : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                               "the upload stream ended before its header"),
            context_->IsCancelled() ? "cancelled" : "invalid");
        return;
      }
      service_->workers_->Post([this] { Commit(); });
      return;
    }
    if (!have_header_) {
      if (!request_.has_header()) {
        End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                         "the first message of an upload must be a header, got a chunk"),
            "invalid");
        return;
      }
      have_header_ = true;
      header_ = request_.header();
      service_->workers_->Post([this] { Begin(); });
      return;
    }
    if (!request_.has_chunk()) {
      End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                       "a second header in one upload (every message after the first is a chunk)"),
          "invalid");
      return;
    }
    const v1::UploadChunk& chunk = request_.chunk();
    if (chunk.file() != v1::ADAPTER_FILE_CONFIG && chunk.file() != v1::ADAPTER_FILE_WEIGHTS) {
      End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                       absl::StrCat("chunk names file ", static_cast<int>(chunk.file()),
                                    ", expected ADAPTER_FILE_CONFIG or ADAPTER_FILE_WEIGHTS")),
          "invalid");
      return;
    }
    service_->upload_bytes_->Increment(static_cast<double>(chunk.data().size()));
    const absl::Status written = upload_->Write(
        chunk.file() == v1::ADAPTER_FILE_CONFIG ? UploadFile::kConfig : UploadFile::kWeights,
        chunk.offset(), chunk.data());
    if (!written.ok()) {
      End(Status(written), absl::IsResourceExhausted(written) ? "quota"
                           : absl::IsInvalidArgument(written) ? "invalid"
                                                              : "error");
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  // The header: everything that can be refused before any data is read.
  void Begin() {
    const std::string& id = header_.adapter_id();
    if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) {
      End(Status(valid), "invalid");
      return;
    }
    UploadFileSpec specs[2];
    int seen[2] = {0, 0};
    for (const v1::UploadFileInfo& f : header_.files()) {
      if (f.file() != v1::ADAPTER_FILE_CONFIG && f.file() != v1::ADAPTER_FILE_WEIGHTS) {
        End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                         absl::StrCat("header declares file ", static_cast<int>(f.file()),
                                      ", expected ADAPTER_FILE_CONFIG or ADAPTER_FILE_WEIGHTS")),
            "invalid");
        return;
      }
      const int i = f.file() == v1::ADAPTER_FILE_CONFIG ? 0 : 1;
      ++seen[i];
      specs[i].size = f.size_bytes();
      specs[i].sha256 = f.sha256();
    }
    if (seen[0] != 1 || seen[1] != 1) {
      End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                       absl::StrCat("the header must declare adapter_config.json and "
                                    "adapter_model.safetensors once each; got ",
                                    seen[0], " and ", seen[1])),
          "invalid");
      return;
    }
    AdapterRegistry& reg = *service_->registry();
    const bool exists = reg.store().Resolve(id).ok();
    if (!header_.validate_only() && exists) {
      absl::StatusOr<AdapterVersion> stored = reg.store().Version(id);
      if (!header_.version().empty() && stored.ok() &&
          absl::AsciiStrToLower(header_.version()) == stored->sha256) {
        // A retry of an upload that already landed: success without the data.
        IdTurn turn(service_->IdLock(id), context_, "UploadAdapter", id);
        if (!turn.status().ok()) {
          End(turn.status(), "cancelled");
          return;
        }
        Unchanged(0);
        return;
      }
      // Without a declared version the content decides (an identical upload succeeds), so the
      // data must be read first; with one, a different version is refused now.
      if (!header_.replace_existing() && !header_.version().empty()) {
        End(grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                         absl::StrCat("adapter \"", id, "\" already exists",
                                      stored.ok() ? absl::StrCat(" with version ", stored->sha256)
                                                  : std::string(),
                                      "; set replace_existing to replace it")),
            "exists");
        return;
      }
    }
    const ServerOptions& options = service_->state_->options();
    UploadLimits limits;
    limits.max_upload_bytes = options.max_adapter_upload_bytes;
    limits.root_max_bytes = options.adapter_root_max_bytes;
    if (exists) limits.replaced_bytes = TreeBytes(absl::StrCat(reg.store().root(), "/", id));
    const bool over_cap = specs[0].size + specs[1].size > limits.max_upload_bytes;
    absl::StatusOr<std::unique_ptr<AdapterUpload>> upload =
        AdapterUpload::Begin(reg.store().root(), id, specs[0], specs[1], limits);
    if (!upload.ok()) {
      const absl::Status& s = upload.status();
      End(Status(s), !absl::IsResourceExhausted(s)
                         ? (absl::IsInvalidArgument(s) ? "invalid" : "error")
                     : over_cap ? "too_large"
                                : "quota");
      return;
    }
    upload_ = *std::move(upload);
    StartRead(&request_);
  }

  // An upload of the version the id already holds: enable it if asked. The caller holds the
  // id's lock.
  void Unchanged(uint64_t received_bytes) {
    const std::string& id = header_.adapter_id();
    AdapterRegistry& reg = *service_->registry();
    if (header_.load()) {
      absl::StatusOr<AdapterInfo> loaded = reg.Load(id, DeadlineOf(context_));
      if (!loaded.ok()) {
        End(Status(loaded.status()), "error");
        return;
      }
    }
    absl::StatusOr<AdapterInfo> info = reg.Get(id);
    if (!info.ok()) {
      End(Status(info.status()), "error");
      return;
    }
    FillInfo(*info, reg, response_->mutable_adapter());
    if (info->report != nullptr) {
      FillReport(*info->report, reg, response_->adapter().disk_bytes(), 0.0,
                 response_->mutable_report());
    }
    response_->mutable_report()->set_version(response_->adapter().version());
    response_->mutable_report()->set_unchanged(true);
    response_->set_received_bytes(received_bytes);
    detail_ = "unchanged";
    End(grpc::Status::OK, "ok");
  }

  // After the client's half-close: check, validate, publish, register.
  void Commit() {
    const std::string& id = header_.adapter_id();
    AdapterRegistry& reg = *service_->registry();
    const absl::Time start = absl::Now();
    if (absl::Status finished = upload_->Finish(); !finished.ok()) {
      End(Status(finished), absl::IsDataLoss(finished)            ? "hash_mismatch"
                            : absl::IsInvalidArgument(finished)   ? "invalid"
                            : absl::IsResourceExhausted(finished) ? "quota"
                                                                  : "error");
      return;
    }
    response_->set_received_bytes(upload_->received_bytes());
    absl::StatusOr<std::unique_ptr<AdapterStore>> staging =
        AdapterStore::Open(upload_->staging_root());
    if (!staging.ok()) {
      End(Status(staging.status()), "error");
      return;
    }
    absl::StatusOr<LoadedAdapter> loaded = reg.ValidateFrom(**staging, id);
    if (!loaded.ok()) {
      End(Status(loaded.status()),
          absl::IsResourceExhausted(loaded.status()) ? "too_large" : "invalid");
      return;
    }
    const std::string version = loaded->version.sha256;
    if (!header_.version().empty() && absl::AsciiStrToLower(header_.version()) != version) {
      End(grpc::Status(
              grpc::StatusCode::DATA_LOSS,
              absl::StrCat("the uploaded files have version ", version, " but the header declared ",
                           header_.version(), "; nothing was stored")),
          "hash_mismatch");
      return;
    }
    const LoraAdapterReport report = loaded->adapter->report();
    loaded->adapter.reset();
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (header_.validate_only()) {
      v1::AdapterInfo* info = response_->mutable_adapter();
      info->set_id(id);
      info->set_version(version);
      info->set_disk_bytes(upload_->declared_bytes());
      FillReport(report, reg, upload_->declared_bytes(), seconds, response_->mutable_report());
      detail_ = absl::StrCat("validate_only version=", version.substr(0, 12));
      End(grpc::Status::OK, "ok");
      return;
    }

    IdTurn turn(service_->IdLock(id), context_, "UploadAdapter", id);
    if (!turn.status().ok()) {
      End(turn.status(), "cancelled");
      return;
    }
    // Decided again under the id's lock: another call may have changed the id meanwhile.
    const std::string target = absl::StrCat(reg.store().root(), "/", id);
    struct stat st;
    const bool exists = ::lstat(target.c_str(), &st) == 0;
    bool stored_disabled = !header_.load();
    std::string previous;
    if (exists) {
      absl::StatusOr<AdapterVersion> stored = reg.store().Version(id);
      if (stored.ok()) previous = stored->sha256;
      if (previous == version) {
        upload_.reset();  // the same bytes are already there
        Unchanged(response_->received_bytes());
        return;
      }
      if (!header_.replace_existing()) {
        End(grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                         absl::StrCat("adapter \"", id, "\" already exists",
                                      previous.empty() ? "" : " with version ", previous,
                                      "; set replace_existing to replace it")),
            "exists");
        return;
      }
      // A replaced id keeps its enabled or disabled state unless `load` enables it.
      const bool was_disabled =
          ::stat(absl::StrCat(target, "/", kAdapterDisabledFile).c_str(), &st) == 0;
      stored_disabled = was_disabled && !header_.load();
    }
    if (absl::Status published = upload_->Publish(header_.replace_existing(), stored_disabled);
        !published.ok()) {
      End(Status(published), absl::IsResourceExhausted(published) ? "quota"
                             : absl::IsAlreadyExists(published)   ? "exists"
                                                                  : "error");
      return;
    }
    upload_.reset();  // removes the staging directory (and the replaced files)
    AdapterInfo info;
    if (stored_disabled) {
      if (absl::Status s = reg.Unload(id); !s.ok()) {
        End(Status(s), "error");
        return;
      }
      absl::StatusOr<AdapterInfo> got = reg.Get(id);
      if (!got.ok()) {
        End(Status(got.status()), "error");
        return;
      }
      info = *std::move(got);
    } else {
      // New requests get the new version from here on; requests admitted before keep theirs.
      absl::StatusOr<AdapterReloadResult> reloaded = reg.Reload(id, DeadlineOf(context_));
      if (!reloaded.ok()) {
        End(Status(reloaded.status()), "error");
        return;
      }
      info = std::move(reloaded->info);
    }
    FillInfo(info, reg, response_->mutable_adapter());
    if (stored_disabled) response_->mutable_adapter()->set_version(version);
    FillReport(report, reg, upload_bytes(), seconds, response_->mutable_report());
    if (!previous.empty()) response_->mutable_report()->set_previous_version(previous);
    detail_ = absl::StrCat("version=", version.substr(0, 12), " bytes=", upload_bytes(),
                           exists ? " replaced" : "", stored_disabled ? " disabled" : "");
    End(grpc::Status::OK, "ok");
  }

  uint64_t upload_bytes() const { return response_->received_bytes(); }

  void End(grpc::Status status, absl::string_view result) {
    service_->CountUpload(result);
    service_->Audit(
        who_, "UploadAdapter", header_.adapter_id(), status,
        absl::StrCat("upload_result=", result, detail_.empty() ? "" : " ", detail_,
                     " received_bytes=",
                     upload_ != nullptr ? upload_->received_bytes() : response_->received_bytes()));
    Finish(std::move(status));
  }

  AdminService* const service_;
  grpc::CallbackServerContext* const context_;
  v1::UploadAdapterResponse* const response_;
  const std::string who_;
  DrainGate::Ticket ticket_;
  v1::UploadAdapterRequest request_;
  bool have_header_ = false;
  v1::UploadHeader header_;
  std::unique_ptr<AdapterUpload> upload_;  // destroyed with the reactor: staging removed
  std::string detail_;
};

grpc::ServerReadReactor<v1::UploadAdapterRequest>* AdminService::UploadAdapter(
    grpc::CallbackServerContext* context, v1::UploadAdapterResponse* response) {
  std::string who;
  if (auth_ != nullptr) {
    grpc::Status allowed = auth_->CheckAdmin(*context, &who);
    if (!allowed.ok()) {
      Audit(who, "UploadAdapter", "", allowed, "");
      return new FinishedReadReactor<v1::UploadAdapterRequest>(allowed);
    }
  }
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) {
    Audit(who, "UploadAdapter", "", DrainingStatus(), "");
    return new FinishedReadReactor<v1::UploadAdapterRequest>(DrainingStatus());
  }
  if (registry() == nullptr) {
    Audit(who, "UploadAdapter", "", NoRegistryStatus(), "");
    return new FinishedReadReactor<v1::UploadAdapterRequest>(NoRegistryStatus());
  }
  return new UploadReactor(this, context, response, std::move(who), std::move(ticket));
}

}  // namespace ls

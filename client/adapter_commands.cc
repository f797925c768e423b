// adapters list|get|load|unload|delete|pin|unpin (upload is in upload.cc): one Admin RPC each,
// on --admin_server with the admin token.
#include <cstdio>
#include <string>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/commands.h"
#include "client/connection.h"
#include "client/output.h"
#include "loraserve/v1/admin.grpc.pb.h"

namespace loraserve::client {
namespace {

using loraserve::v1::AdapterInfo;
using loraserve::v1::LoadReport;

std::string StateName(loraserve::v1::AdapterState state) {
  return EnumSuffix(loraserve::v1::AdapterState_Name(state), "ADAPTER_STATE_");
}

std::string TierName(loraserve::v1::AdapterTier tier) {
  if (tier == loraserve::v1::ADAPTER_TIER_UNSPECIFIED) return "-";  // no version read yet
  return EnumSuffix(loraserve::v1::AdapterTier_Name(tier), "ADAPTER_TIER_");
}

std::string DTypeName(loraserve::v1::DType dtype) {
  return EnumSuffix(loraserve::v1::DType_Name(dtype), "DTYPE_");
}

// "0-3,7": ascending layer indices as ranges.
std::string LayerRanges(const google::protobuf::RepeatedField<uint32_t>& layers) {
  std::string out;
  for (int i = 0; i < layers.size();) {
    int j = i;
    while (j + 1 < layers.size() && layers[j + 1] == layers[j] + 1) ++j;
    absl::StrAppend(&out, out.empty() ? "" : ",", layers[i]);
    if (j > i) absl::StrAppend(&out, "-", layers[j]);
    i = j + 1;
  }
  return out;
}

void PrintModuleGroups(const google::protobuf::RepeatedPtrField<loraserve::v1::ModuleGroup>& g) {
  for (const auto& group : g) {
    std::printf("  %-10s rank %u, alpha %g, scale %g, layers %s\n", group.module().c_str(),
                group.rank(), group.alpha(), group.scale(), LayerRanges(group.layers()).c_str());
  }
}

void PrintAdapter(const AdapterInfo& a) {
  std::printf("id:          %s\n", a.id().c_str());
  std::printf("state:       %s\n", StateName(a.state()).c_str());
  std::printf("tier:        %s%s\n", TierName(a.tier()).c_str(), a.pinned() ? " (pinned)" : "");
  std::printf("version:     %s\n", a.version().empty() ? "-" : a.version().c_str());
  if (a.rank() > 0) {
    std::printf("rank:        %u (max %u), alpha %g, scale %g%s\n", a.rank(), a.max_rank(),
                a.lora_alpha(), a.scale(), a.use_rslora() ? ", rslora" : "");
    std::printf("targets:     %s (%u modules)\n", absl::StrJoin(a.target_modules(), ", ").c_str(),
                a.num_matched_modules());
    PrintModuleGroups(a.module_groups());
  }
  std::printf("disk:        %s%s\n", FormatBytes(a.disk_bytes()).c_str(),
              a.disk_dtype() == loraserve::v1::DTYPE_UNSPECIFIED
                  ? ""
                  : absl::StrCat(" (", DTypeName(a.disk_dtype()), ")").c_str());
  std::printf("memory:      pool %s, host %s\n", FormatBytes(a.pool_bytes()).c_str(),
              FormatBytes(a.host_bytes()).c_str());
  std::printf("requests:    %u in flight, %llu served\n", a.in_flight_requests(),
              static_cast<unsigned long long>(a.requests_served()));
  std::printf("created:     %s\n", FormatTime(a.created_time()).c_str());
  std::printf("loaded:      %s\n", FormatTime(a.loaded_time()).c_str());
  std::printf("last used:   %s\n", FormatTime(a.last_used_time()).c_str());
  if (!a.base_model_name_or_path().empty()) {
    std::printf("base model:  %s\n", a.base_model_name_or_path().c_str());
  }
  for (const auto& retired : a.retired_versions()) {
    std::printf("retired:     %s, %u requests, %s\n", ShortVersion(retired.version()).c_str(),
                retired.in_flight_requests(), FormatBytes(retired.resident_bytes()).c_str());
  }
  if (!a.last_error().empty()) std::printf("last error:  %s\n", a.last_error().c_str());
}

void PrintWarnings(const LoadReport& report) {
  for (const std::string& warning : report.warnings()) {
    std::fprintf(stderr, "warning: %s\n", warning.c_str());
  }
}

// Parses --states=ready,disabled (any case, with or without the ADAPTER_STATE_ prefix).
bool ParseStates(const std::string& flag, loraserve::v1::ListAdaptersRequest* request) {
  if (flag.empty()) return true;
  for (absl::string_view part : absl::StrSplit(flag, ',', absl::SkipWhitespace())) {
    std::string name = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(part));
    if (name.rfind("ADAPTER_STATE_", 0) != 0) name = "ADAPTER_STATE_" + name;
    loraserve::v1::AdapterState state;
    if (!loraserve::v1::AdapterState_Parse(name, &state) ||
        state == loraserve::v1::ADAPTER_STATE_UNSPECIFIED) {
      ReportError(absl::StrCat("--states: \"", part,
                               "\" is not a state; expected available, loading, ready, "
                               "disabled or failed"),
                  kExitUsage);
      return false;
    }
    request->add_states(state);
  }
  return true;
}

int List(loraserve::v1::Admin::Stub& stub, const Config& config) {
  loraserve::v1::ListAdaptersRequest request;
  request.set_id_prefix(config.admin.prefix);
  if (!ParseStates(config.admin.states, &request)) return kExitUsage;
  // Every page, gathered into one answer so --json prints a single document.
  loraserve::v1::ListAdaptersResponse all;
  while (true) {
    loraserve::v1::ListAdaptersResponse page;
    grpc::ClientContext context;
    PrepareContext(&context, config.connection, CallKind::kAdmin);
    const grpc::Status status = stub.ListAdapters(&context, request, &page);
    if (!status.ok()) return ReportRpcError(status);
    for (auto& a : *page.mutable_adapters()) *all.add_adapters() = std::move(a);
    all.set_total_size(page.total_size());
    if (page.next_page_token().empty()) break;
    request.set_page_token(page.next_page_token());
  }
  if (config.json) return PrintJson(all);
  if (all.adapters().empty()) {
    std::printf("no adapters\n");
    return kExitOk;
  }
  std::printf("%-32s %-9s %-7s %-4s %-12s %10s %9s %8s  %s\n", "ID", "STATE", "TIER", "RANK",
              "VERSION", "DISK", "IN-FLIGHT", "SERVED", "LAST USED");
  for (const AdapterInfo& a : all.adapters()) {
    std::printf("%-32s %-9s %-7s %-4s %-12s %10s %9u %8llu  %s\n", a.id().c_str(),
                StateName(a.state()).c_str(),
                (TierName(a.tier()) + (a.pinned() ? "*" : "")).c_str(),
                a.rank() > 0 ? absl::StrCat(a.rank()).c_str() : "-",
                ShortVersion(a.version()).c_str(), FormatBytes(a.disk_bytes()).c_str(),
                a.in_flight_requests(), static_cast<unsigned long long>(a.requests_served()),
                FormatTime(a.last_used_time()).c_str());
  }
  if (absl::c_any_of(all.adapters(), [](const AdapterInfo& a) { return a.pinned(); })) {
    std::printf("(* pinned)\n");
  }
  return kExitOk;
}

// Runs one single-id admin RPC and prints its answer with `human` unless --json.
template <typename Request, typename Response, typename Method, typename Human>
int Call(loraserve::v1::Admin::Stub& stub, const Config& config, Method method,
         const Request& request, Human human) {
  Response response;
  grpc::ClientContext context;
  PrepareContext(&context, config.connection, CallKind::kAdmin);
  const grpc::Status status = (stub.*method)(&context, request, &response);
  if (!status.ok()) return ReportRpcError(status);
  if (config.json) return PrintJson(response);
  human(response);
  return kExitOk;
}

constexpr const char* kAdaptersUsage =
    "adapters takes a subcommand: list | get ID | load ID | upload ID DIR | unload ID | "
    "delete ID | pin ID | unpin ID";

}  // namespace

int RunAdapters(const Config& config, const Args& args) {
  if (args.empty()) return ReportError(kAdaptersUsage, kExitUsage);
  const std::string& sub = args[0];
  const Args rest(args.begin() + 1, args.end());
  if (sub == "upload") return RunUpload(config, rest);
  static constexpr const char* kSingleId[] = {"get", "load", "unload", "delete", "pin", "unpin"};
  const bool is_list = sub == "list";
  if (!is_list && absl::c_find(kSingleId, sub) == std::end(kSingleId)) {
    return ReportError(absl::StrCat("unknown adapters subcommand \"", sub, "\"; ", kAdaptersUsage),
                       kExitUsage);
  }
  if (is_list && !rest.empty()) {
    return ReportError("adapters list takes no arguments (filter with --prefix, --states)",
                       kExitUsage);
  }
  if (!is_list && rest.size() != 1) {
    return ReportError(
        absl::StrCat("adapters ", sub, " takes one argument, the adapter id; got ", rest.size()),
        kExitUsage);
  }
  auto channel = MakeChannel(config.connection.admin_server, config.connection);
  if (!channel.ok()) return ReportError(channel.status().message(), kExitLocal);
  auto stub = loraserve::v1::Admin::NewStub(*channel);
  using A = loraserve::v1::Admin::Stub;
  namespace v1 = loraserve::v1;
  if (is_list) return List(*stub, config);
  const std::string& id = rest[0];
  if (sub == "get") {
    v1::GetAdapterRequest request;
    request.set_adapter_id(id);
    return Call<v1::GetAdapterRequest, v1::GetAdapterResponse>(
        *stub, config, &A::GetAdapter, request,
        [](const v1::GetAdapterResponse& r) { PrintAdapter(r.adapter()); });
  }
  if (sub == "load") {
    v1::LoadAdapterRequest request;
    request.set_adapter_id(id);
    return Call<v1::LoadAdapterRequest, v1::LoadAdapterResponse>(
        *stub, config, &A::LoadAdapter, request, [&](const v1::LoadAdapterResponse& r) {
          const LoadReport& report = r.report();
          std::printf("%s: %s version %s (%s; %u modules, %s in the pool, %.3f s)\n", id.c_str(),
                      report.unchanged() ? "already loaded, unchanged:" : "loaded",
                      r.adapter().version().c_str(), StateName(r.adapter().state()).c_str(),
                      report.num_matched_modules(), FormatBytes(report.weight_bytes()).c_str(),
                      report.load_seconds());
          if (!report.previous_version().empty() && !report.unchanged()) {
            std::printf("%s: replaced version %s\n", id.c_str(), report.previous_version().c_str());
          }
          PrintWarnings(report);
        });
  }
  if (sub == "unload") {
    v1::UnloadAdapterRequest request;
    request.set_adapter_id(id);
    request.set_force(config.admin.force);
    return Call<v1::UnloadAdapterRequest, v1::UnloadAdapterResponse>(
        *stub, config, &A::UnloadAdapter, request, [&](const v1::UnloadAdapterResponse& r) {
          std::printf("%s: %s (%u requests still running on it)\n", id.c_str(),
                      StateName(r.adapter().state()).c_str(), r.adapter().in_flight_requests());
        });
  }
  if (sub == "delete") {
    v1::DeleteAdapterRequest request;
    request.set_adapter_id(id);
    request.set_force(config.admin.force);
    return Call<v1::DeleteAdapterRequest, v1::DeleteAdapterResponse>(
        *stub, config, &A::DeleteAdapter, request, [&](const v1::DeleteAdapterResponse& r) {
          std::printf("%s: deleted (%s freed on disk)\n", id.c_str(),
                      FormatBytes(r.freed_disk_bytes()).c_str());
        });
  }
  if (sub == "pin") {
    v1::PinAdapterRequest request;
    request.set_adapter_id(id);
    return Call<v1::PinAdapterRequest, v1::PinAdapterResponse>(
        *stub, config, &A::PinAdapter, request, [&](const v1::PinAdapterResponse& r) {
          std::printf("%s: pinned (tier %s, %s in the pool)\n", id.c_str(),
                      TierName(r.adapter().tier()).c_str(),
                      FormatBytes(r.adapter().pool_bytes()).c_str());
        });
  }
  v1::UnpinAdapterRequest request;  // sub == "unpin"
  request.set_adapter_id(id);
  return Call<v1::UnpinAdapterRequest, v1::UnpinAdapterResponse>(
      *stub, config, &A::UnpinAdapter, request, [&](const v1::UnpinAdapterResponse& r) {
        std::printf("%s: unpinned (tier %s)\n", id.c_str(), TierName(r.adapter().tier()).c_str());
      });
}

}  // namespace loraserve::client

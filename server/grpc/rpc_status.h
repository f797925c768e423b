// The statuses every service gives for the same reasons, worded once.
#ifndef LORASERVE_SERVER_GRPC_RPC_STATUS_H_
#define LORASERVE_SERVER_GRPC_RPC_STATUS_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/build_info.h"

namespace ls {

inline grpc::Status DrainingStatus() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "server is draining for shutdown; retry on another replica");
}

// For an RPC whose machinery this version does not have yet: says which RPC and what it needs.
inline grpc::Status NotBuiltStatus(absl::string_view rpc, absl::string_view needs) {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                      absl::StrCat(rpc, " is not implemented in loraserve ", kVersion,
                                   ": it needs ", needs, ", which this version does not have yet"));
}

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_RPC_STATUS_H_

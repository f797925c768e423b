// absl::Status <-> grpc::Status. The codes share numbering (both follow google.rpc.Code), so the
// mapping is by value; the message passes through unchanged.
#ifndef LORASERVE_SERVER_GRPC_STATUS_MAPPING_H_
#define LORASERVE_SERVER_GRPC_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace ls {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

inline absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_STATUS_MAPPING_H_

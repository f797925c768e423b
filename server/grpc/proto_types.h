// Conversions from the project's types to the API's enums, shared by the services.
#ifndef LORASERVE_SERVER_GRPC_PROTO_TYPES_H_
#define LORASERVE_SERVER_GRPC_PROTO_TYPES_H_

#include "common/dtype.h"
#include "loraserve/v1/adapter.pb.h"

namespace ls {

inline loraserve::v1::DType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return loraserve::v1::DTYPE_F32;
    case DType::kF16:
      return loraserve::v1::DTYPE_F16;
    case DType::kBF16:
      return loraserve::v1::DTYPE_BF16;
    case DType::kF64:
      return loraserve::v1::DTYPE_F64;
    default:
      return loraserve::v1::DTYPE_UNSPECIFIED;
  }
}

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_PROTO_TYPES_H_

// Reactors for streaming calls that are answered with a status alone (refusals and RPCs that
// are not built yet). They finish at once and delete themselves when gRPC is done with them.
#ifndef LORASERVE_SERVER_GRPC_REACTORS_H_
#define LORASERVE_SERVER_GRPC_REACTORS_H_

#include <grpcpp/support/server_callback.h>

#include <utility>

namespace ls {

template <typename Response>
class FinishedWriteReactor final : public grpc::ServerWriteReactor<Response> {
 public:
  explicit FinishedWriteReactor(grpc::Status status) { this->Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

template <typename Request>
class FinishedReadReactor final : public grpc::ServerReadReactor<Request> {
 public:
  explicit FinishedReadReactor(grpc::Status status) { this->Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

// A unary reply of `status` through the context's default reactor.
inline grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                             grpc::Status status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(std::move(status));
  return reactor;
}

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_REACTORS_H_

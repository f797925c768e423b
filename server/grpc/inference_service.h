// loraserve.v1.Inference over the gRPC callback API. Handlers never block: each takes a drain
// ticket (UNAVAILABLE while draining; GetModelInfo answers in every state), answers from
// immutable server state, and returns.
#ifndef LORASERVE_SERVER_GRPC_INFERENCE_SERVICE_H_
#define LORASERVE_SERVER_GRPC_INFERENCE_SERVICE_H_

#include "loraserve/v1/inference.grpc.pb.h"
#include "server/drain.h"
#include "server/grpc/auth.h"
#include "server/metrics/metrics.h"
#include "server/server_state.h"

namespace ls {

// Thread-safe; `state`, `gate` and `auth` must outlive the service.
class InferenceService final : public loraserve::v1::Inference::CallbackService {
 public:
  // `auth` decides who may generate with which adapter (server/grpc/auth.h).
  InferenceService(const ServerState* state, DrainGate* gate, const Authorizer* auth)
      : state_(state), gate_(gate), auth_(auth) {}

  // Generation requests are recorded in `metrics` (must outlive the service); call before the
  // service is registered. Without it nothing is recorded.
  void SetMetrics(Metrics* metrics) { metrics_ = metrics; }

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const loraserve::v1::GenerateRequest* request,
                                     loraserve::v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<loraserve::v1::GenerateChunk>* GenerateStream(
      grpc::CallbackServerContext* context, const loraserve::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const loraserve::v1::TokenizeRequest* request,
                                     loraserve::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const loraserve::v1::DetokenizeRequest* request,
                                       loraserve::v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const loraserve::v1::GetModelInfoRequest* request,
                                         loraserve::v1::GetModelInfoResponse* response) override;

 private:
  // Limits of the Tokenize and Detokenize requests (see inference.proto).
  static constexpr size_t kMaxTokenizeTextBytes = size_t{1} << 20;
  static constexpr int kMaxDetokenizeIds = 1 << 20;

  absl::StatusOr<const Tokenizer*> TokenizerFor(absl::string_view rpc) const;

  const ServerState* state_;
  DrainGate* gate_;
  const Authorizer* auth_;
  Metrics* metrics_ = nullptr;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_INFERENCE_SERVICE_H_

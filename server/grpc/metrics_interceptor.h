// A server interceptor that counts every finished RPC in Metrics by method and status code.
#ifndef LORASERVE_SERVER_GRPC_METRICS_INTERCEPTOR_H_
#define LORASERVE_SERVER_GRPC_METRICS_INTERCEPTOR_H_

#include <grpcpp/support/server_interceptor.h>

#include "server/metrics/metrics.h"

namespace ls {

// `metrics` must outlive the server the factory is installed in.
class MetricsInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(Metrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  Metrics* metrics_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_METRICS_INTERCEPTOR_H_

// Status helpers shared by every layer. Errors cross module boundaries as absl::Status or
// absl::StatusOr<T>; these macros keep the early-return style short. Abseil 20220623 (Debian 12)
// ships no such macros, so they live here once.
#ifndef LORASERVE_COMMON_STATUS_H_
#define LORASERVE_COMMON_STATUS_H_

#include <utility>

#include "absl/base/optimization.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LS_STATUS_CONCAT_INNER_(a, b) a##b
#define LS_STATUS_CONCAT_(a, b) LS_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status or absl::StatusOr<T>) once and returns its status from the
// enclosing function when it is not OK.
#define LS_RETURN_IF_ERROR(expr)                                        \
  do {                                                                  \
    const ::absl::Status ls_status_ = ::ls::internal::ToStatus((expr)); \
    if (ABSL_PREDICT_FALSE(!ls_status_.ok())) return ls_status_;        \
  } while (false)

// `LS_ASSIGN_OR_RETURN(auto x, MakeX());` or `LS_ASSIGN_OR_RETURN(x_, MakeX());`: evaluates the
// StatusOr once; on error returns its status, otherwise moves the value into `lhs`.
#define LS_ASSIGN_OR_RETURN(lhs, rexpr) \
  LS_ASSIGN_OR_RETURN_IMPL_(LS_STATUS_CONCAT_(ls_statusor_, __LINE__), lhs, rexpr)

#define LS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)             \
  auto statusor = (rexpr);                                          \
  if (ABSL_PREDICT_FALSE(!statusor.ok())) return statusor.status(); \
  lhs = std::move(statusor).value()

namespace ls::internal {

inline const absl::Status& ToStatus(const absl::Status& status) { return status; }

template <typename T>
const absl::Status& ToStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

}  // namespace ls::internal

#endif  // LORASERVE_COMMON_STATUS_H_

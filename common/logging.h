// Minimal leveled logging to stderr. Abseil 20220623 has no logging library, and the server
// needs only this: one line per message, written with a single write(2) so lines from
// different threads never interleave.
//
//   LS_LOG(INFO) << "loaded " << n << " tensors";
//   LS_CHECK(ptr != nullptr) << "broken invariant";   // aborts: invariants only, never input
#ifndef LORASERVE_COMMON_LOGGING_H_
#define LORASERVE_COMMON_LOGGING_H_

#include <sstream>
#include "absl/strings/string_view.h"

namespace ls {

enum class LogLevel : int { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Messages below this level are dropped. Thread-safe.
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

namespace internal {

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  // Writes the line; aborts after a kFatal message.
  ~LogMessage();

  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

// Lets the macro below swallow the stream expression when the level is disabled.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace ls

#define LS_LOG_LEVEL_INFO ::ls::LogLevel::kInfo
#define LS_LOG_LEVEL_WARNING ::ls::LogLevel::kWarning
#define LS_LOG_LEVEL_ERROR ::ls::LogLevel::kError
#define LS_LOG_LEVEL_FATAL ::ls::LogLevel::kFatal

#define LS_LOG(level)                          \
  (LS_LOG_LEVEL_##level < ::ls::MinLogLevel()) \
      ? (void)0                                \
      : ::ls::internal::LogVoidify() &         \
            ::ls::internal::LogMessage(LS_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#define LS_CHECK(cond)                                                                         \
  (cond) ? (void)0                                                                             \
         : ::ls::internal::LogVoidify() &                                                      \
               ::ls::internal::LogMessage(::ls::LogLevel::kFatal, __FILE__, __LINE__).stream() \
                   << "Check failed: " #cond " "

#endif  // LORASERVE_COMMON_LOGGING_H_

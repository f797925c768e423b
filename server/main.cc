// loraserve: flags -> ServerOptions -> a running server; SIGTERM/SIGINT drain it and exit 0. A
// second signal during the drain cancels what still runs and exits 128 + the signal number, so
// a supervisor can tell a forced stop from a clean one.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "server/build_info.h"
#include "server/options.h"
#include "server/server.h"

namespace {

// Blocks the shutdown signals in this thread and (by inheritance) every thread started after
// it, so that they are only ever received by sigwait below, never by a gRPC or engine thread.
sigset_t BlockShutdownSignals() {
  // A parent may have left them ignored (background jobs of a non-interactive shell ignore
  // SIGINT); restore the default so they are delivered to sigwait.
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

const char* SignalName(int sig) { return sig == SIGTERM ? "SIGTERM" : "SIGINT"; }

}  // namespace

int main(int argc, char** argv) {
  // --help lists the server's flags, which live in server/options.cc rather than this file.
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view path) {
    return absl::StrContains(path, "server/options.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "serves one base language model and many LoRA adapters over gRPC.\n"
      "Usage: loraserve [--model=DIR] [--address=HOST:PORT] [--metrics_address=HOST:PORT] ...");
  absl::ParseCommandLine(argc, argv);  // unknown flags: message + exit 1
  auto options = ls::ServerOptionsFromFlags();
  if (!options.ok()) {
    std::fprintf(stderr, "loraserve: %s\n", std::string(options.status().message()).c_str());
    return 2;
  }
  LS_LOG(INFO) << "loraserve " << ls::kVersion << " (" << ls::kGitCommit << ", " << ls::kBuildType
               << (ls::kCudaBuilt ? ", cuda" : ", cpu only") << ")";
  LS_LOG(INFO) << "options: " << options->ToString();

  const sigset_t signals = BlockShutdownSignals();
  auto server = ls::LoraServer::Create(*options);
  if (!server.ok()) {
    LS_LOG(ERROR) << "start failed: " << server.status();
    return 1;
  }
  // Tests and scripts parse this line; the optional listeners are appended only when set.
  std::string ready = absl::StrCat("loraserve ready grpc=", (*server)->grpc_address(),
                                   " metrics=", (*server)->metrics_address());
  if (!(*server)->admin_address().empty()) {
    absl::StrAppend(&ready, " admin=", (*server)->admin_address());
  }
  if (!(*server)->health_address().empty()) {
    absl::StrAppend(&ready, " health=", (*server)->health_address());
  }
  std::printf("%s\n", ready.c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  LS_LOG(INFO) << SignalName(sig) << ": draining (up to "
               << absl::FormatDuration(options->drain_timeout) << "); signal again to stop now";
  (*server)->BeginDrain();

  // A second signal cuts the drain short; the drain itself runs on this helper thread.
  std::atomic<bool> drained{false};
  std::thread drainer([&] {
    (*server)->Shutdown(absl::Now() + options->drain_timeout);
    drained.store(true);
  });
  int exit_code = 0;
  while (!drained.load()) {
    const timespec poll = {0, 100 * 1000 * 1000};
    const int got = sigtimedwait(&signals, nullptr, &poll);
    if (got == SIGTERM || got == SIGINT) {
      LS_LOG(WARNING) << SignalName(got) << " again: cancelling in-flight RPCs and exiting";
      exit_code = 128 + got;
      (*server)->ForceShutdown();
      break;
    }
  }
  if (exit_code != 0) {
    // "At once": give the cancelled RPCs a moment to end cleanly, but never hang on them.
    const absl::Time limit = absl::Now() + absl::Seconds(5);
    while (!drained.load() && absl::Now() < limit) absl::SleepFor(absl::Milliseconds(10));
    if (!drained.load()) {
      LS_LOG(ERROR) << "shutdown did not finish within 5s of the second signal; exiting anyway";
      std::fflush(nullptr);
      _exit(exit_code);
    }
  }
  drainer.join();
  LS_LOG(INFO) << (exit_code == 0 ? "stopped" : "stopped (forced)");
  return exit_code;
}

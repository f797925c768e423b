// loractl's commands. Each takes the configuration and its positional arguments (after the
// command words) and returns an exit code (cli.h); errors are printed as one line on stderr.
#ifndef LORASERVE_CLIENT_COMMANDS_H_
#define LORASERVE_CLIENT_COMMANDS_H_

#include <string>
#include <vector>

#include "client/cli.h"

namespace loraserve::client {

using Args = std::vector<std::string>;

// health [SERVICE]: grpc.health.v1 Check on --server.
int RunHealth(const Config& config, const Args& args);

// model-info: Inference.GetModelInfo.
int RunModelInfo(const Config& config, const Args& args);

// generate PROMPT (or --token_ids): Inference.GenerateStream, text written as it arrives.
int RunGenerate(const Config& config, const Args& args);

// adapters SUBCOMMAND ...: the Admin service on --admin_server.
int RunAdapters(const Config& config, const Args& args);

// adapters upload ID DIR: Admin.UploadAdapter (upload.cc).
int RunUpload(const Config& config, const Args& args);

}  // namespace loraserve::client

#endif  // LORASERVE_CLIENT_COMMANDS_H_

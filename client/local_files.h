// Local files loractl reads: TLS material, tokens, and PEFT adapter folders with their SHA-256
// digests and adapter version.
#ifndef LORASERVE_CLIENT_LOCAL_FILES_H_
#define LORASERVE_CLIENT_LOCAL_FILES_H_

#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace loraserve::client {

// The whole file, refused (INVALID_ARGUMENT) when it is larger than `max_bytes`.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes);

// Lowercase hex SHA-256 of `bytes`.
std::string Sha256Hex(absl::string_view bytes);

// An adapter folder as PEFT's save_pretrained writes it, read for an upload: the config in
// memory, the weights by path (they may be large), with both digests and the version.
struct PeftFolder {
  std::string config_path;
  std::string weights_path;
  std::string config;          // bytes of adapter_config.json
  uint64_t weights_bytes = 0;  // size of adapter_model.safetensors
  std::string config_sha256;
  std::string weights_sha256;
  // The adapter version as the server computes it (adapter.proto):
  // sha256(config || 0x00 || weights), lowercase hex.
  std::string version;
};

// Reads `dir`/adapter_config.json (at most 1 MiB, as UploadFileInfo allows) and hashes
// `dir`/adapter_model.safetensors in one pass, calling `progress(bytes_hashed, total)` as it
// goes. A folder with only a pickle (adapter_model.bin) is refused with a hint to convert it.
absl::StatusOr<PeftFolder> ReadPeftFolder(const std::string& dir,
                                          absl::FunctionRef<void(uint64_t, uint64_t)> progress);

}  // namespace loraserve::client

#endif  // LORASERVE_CLIENT_LOCAL_FILES_H_

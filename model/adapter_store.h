// Adapters on disk: `--adapter_root/<id>/` holds one PEFT adapter (adapter_config.json and
// adapter_model.safetensors, as save_pretrained writes them). This module validates ids,
// resolves an id to its directory without leaving the root, gives each adapter a content
// version, and loads it. docs/adapters.md describes the layout for operators.
//
// Ids: 1 to 128 characters of [A-Za-z0-9._-], starting with a letter or digit (so never "." or
// "..", never hidden, never a path). Ids are case-sensitive, as the file system is.
//
// Version: the lowercase hex SHA-256 of adapter_config.json's bytes, one 0 byte, then
// adapter_model.safetensors' bytes. Two directories with the same files have the same version;
// any change to either file changes it. Hashing a large adapter takes a while, so the result is
// cached in `<id>/.loraserve-version.json` together with the size, mtime, ctime and inode of
// both files; the cache is used only while all of those still match, and is rewritten
// atomically (temporary file, fsync, rename). A file whose mtime or ctime is less than
// AdapterStoreOptions::racy_window_ns old when it is hashed is not cached: file timestamps tick
// coarsely (a jiffy on ext4), so a same-size rewrite right after could keep them (git's "racily
// clean" index entries). A cache that cannot be written (read-only root) only costs a rehash.
//
// Path safety: the root is resolved once (realpath). `<id>` and each file may be symlinks, but
// must resolve inside the root; the files must be regular files. An adapter whose weights are
// only pickles (adapter_model.bin / .pt / .pth) is refused with the way to convert it.
//
// Updating an adapter: write the new files elsewhere and rename them in (or replace the whole
// directory), never rewrite in place. A load that sees either file change while it reads them
// fails with ABORTED and can be retried.
//
// Thread safety: AdapterStore is immutable after Open; every method may be called from any
// number of threads (concurrent cache writers of one id write the same content; the last rename
// wins).
#ifndef LORASERVE_MODEL_ADAPTER_STORE_H_
#define LORASERVE_MODEL_ADAPTER_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "model/config.h"
#include "model/lora_adapter.h"

namespace ls {

inline constexpr absl::string_view kAdapterConfigFile = "adapter_config.json";
inline constexpr absl::string_view kAdapterWeightsFile = "adapter_model.safetensors";
inline constexpr absl::string_view kAdapterVersionFile = ".loraserve-version.json";
inline constexpr size_t kMaxAdapterIdBytes = 128;

// OK for a valid id; INVALID_ARGUMENT saying what is wrong otherwise (the id is escaped in the
// message).
absl::Status ValidateAdapterId(absl::string_view id);

// The version of an adapter whose files hold these bytes: hex SHA-256 of
// config || 0x00 || weights.
std::string AdapterVersionOfBytes(absl::Span<const uint8_t> config_bytes,
                                  absl::Span<const uint8_t> weights_bytes);

// Incremental SHA-256 (OpenSSL), for checking bytes as they stream in (uploads). Move-only.
class Sha256Hasher {
 public:
  Sha256Hasher();
  ~Sha256Hasher();
  Sha256Hasher(Sha256Hasher&& other) noexcept;
  Sha256Hasher& operator=(Sha256Hasher&& other) noexcept;
  Sha256Hasher(const Sha256Hasher&) = delete;
  Sha256Hasher& operator=(const Sha256Hasher&) = delete;

  void Update(absl::string_view bytes);
  // 64 lowercase hex digits; the hasher must not be updated afterwards.
  std::string FinalHex();

 private:
  void* ctx_ = nullptr;  // EVP_MD_CTX
};

// An adapter directory, resolved and checked.
struct AdapterPaths {
  std::string id;
  std::string dir;           // real path, inside the root
  std::string config_path;   // dir + "/adapter_config.json" (resolved)
  std::string weights_path;  // dir + "/adapter_model.safetensors" (resolved)
};

struct AdapterVersion {
  std::string sha256;       // 64 lowercase hex digits
  bool from_cache = false;  // read from .loraserve-version.json, no hashing
  bool cache_written = false;
};

struct LoadedAdapter {
  std::string id;
  AdapterVersion version;
  std::unique_ptr<LoraAdapter> adapter;  // report().version == version.sha256
};

struct AdapterStoreOptions {
  // Files changed this recently when hashed are not cached (see above).
  int64_t racy_window_ns = 2'000'000'000;
};

class AdapterStore {
 public:
  // `root` must be an existing directory (NOT_FOUND / FAILED_PRECONDITION otherwise).
  static absl::StatusOr<std::unique_ptr<AdapterStore>> Open(
      const std::string& root, const AdapterStoreOptions& options = {});

  AdapterStore(const AdapterStore&) = delete;
  AdapterStore& operator=(const AdapterStore&) = delete;

  // The root's real path.
  const std::string& root() const { return root_; }

  // Ids of the root's entries that are valid ids and directories (symlinks followed), sorted.
  // Whether each holds a loadable adapter is not checked.
  absl::StatusOr<std::vector<std::string>> List() const;

  // Resolves `id`: INVALID_ARGUMENT for a bad id or a pickle-only adapter, NOT_FOUND when the
  // directory or a file is missing, PERMISSION_DENIED when something resolves outside the root,
  // FAILED_PRECONDITION when a path is not a directory / regular file.
  absl::StatusOr<AdapterPaths> Resolve(absl::string_view id) const;

  // The adapter's version, from the cache when it is valid, else hashed (and cached).
  absl::StatusOr<AdapterVersion> Version(absl::string_view id) const;

  // Resolves, versions and loads `id` against `base` (options.name and options.version are set
  // here). The version is computed over the very files that are loaded.
  absl::StatusOr<LoadedAdapter> Load(absl::string_view id, const ModelConfig& base,
                                     LoraLoadOptions options) const;

 private:
  AdapterStore(std::string root, const AdapterStoreOptions& options)
      : root_(std::move(root)), options_(options) {}
  std::string root_;
  AdapterStoreOptions options_;
};

}  // namespace ls

#endif  // LORASERVE_MODEL_ADAPTER_STORE_H_

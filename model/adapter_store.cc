#include "model/adapter_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/json.h"
#include "common/mmap_file.h"
#include "common/status.h"
#include "model/safetensors.h"

namespace ls {
namespace {

constexpr size_t kMaxConfigBytes = 1 << 20;
constexpr size_t kMaxVersionFileBytes = 4096;
constexpr absl::string_view kVersionFormat = "loraserve-adapter-version-v1";
constexpr const char* kPickleNames[] = {"adapter_model.bin", "adapter_model.pt",
                                        "adapter_model.pth"};

std::string Quote(absl::string_view s) {
  return absl::StrCat("\"", absl::CEscape(s.substr(0, 200)), s.size() > 200 ? "\"..." : "\"");
}

absl::Status ErrnoStatus(int err, absl::string_view what) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(message);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(message);
    default:
      return absl::InternalError(message);
  }
}

// Identity of a file's content as far as stat can tell.
struct FileStamp {
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  uint64_t inode = 0;
  uint64_t device = 0;

  bool operator==(const FileStamp& o) const {
    return size == o.size && mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns && inode == o.inode &&
           device == o.device;
  }
  bool operator!=(const FileStamp& o) const { return !(*this == o); }
};

int64_t ToNs(const struct timespec& ts) {
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

absl::StatusOr<FileStamp> Stamp(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat ", path));
  FileStamp s;
  s.size = static_cast<uint64_t>(st.st_size);
  s.mtime_ns = ToNs(st.st_mtim);
  s.ctime_ns = ToNs(st.st_ctim);
  s.inode = static_cast<uint64_t>(st.st_ino);
  s.device = static_cast<uint64_t>(st.st_dev);
  return s;
}

// realpath(3); errors keep errno's meaning.
absl::StatusOr<std::string> RealPath(const std::string& path) {
  char* resolved = ::realpath(path.c_str(), nullptr);
  if (resolved == nullptr) return ErrnoStatus(errno, absl::StrCat("resolve ", path));
  std::string out(resolved);
  std::free(resolved);
  return out;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

// Reads a whole file of at most `max_bytes` bytes.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes,
                                          bool no_follow) {
  // O_NONBLOCK: should the path have become a FIFO since it was checked, opening it must not
  // wait for a writer (and the fstat below refuses it).
  const int fd =
      ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | (no_follow ? O_NOFOLLOW : 0));
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::FailedPreconditionError(absl::StrCat(path, " is not a regular file"));
  }
  std::string out;
  char buffer[65536];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(err, absl::StrCat("read ", path));
    }
    if (n == 0) break;
    out.append(buffer, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": larger than the limit of ", max_bytes, " bytes"));
    }
  }
  ::close(fd);
  return out;
}

std::string Hex(const unsigned char* digest, size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[digest[i] >> 4];
    out[2 * i + 1] = kDigits[digest[i] & 15];
  }
  return out;
}

Json StampJson(const FileStamp& s) {
  return Json{{"size", s.size},
              {"mtime_ns", s.mtime_ns},
              {"ctime_ns", s.ctime_ns},
              {"inode", s.inode},
              {"device", s.device}};
}

bool StampFromJson(const Json& j, FileStamp* s) {
  if (!j.is_object() || j.size() != 5) return false;
  for (const char* key : {"size", "inode", "device"}) {
    if (!j.contains(key) || !j[key].is_number_unsigned()) return false;
  }
  for (const char* key : {"mtime_ns", "ctime_ns"}) {
    if (!j.contains(key) || !j[key].is_number_integer()) return false;
  }
  s->size = j["size"].get<uint64_t>();
  s->inode = j["inode"].get<uint64_t>();
  s->device = j["device"].get<uint64_t>();
  s->mtime_ns = j["mtime_ns"].get<int64_t>();
  s->ctime_ns = j["ctime_ns"].get<int64_t>();
  return true;
}

bool IsHexDigest(absl::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// The cached version when the cache file exists, parses, and matches both stamps.
std::optional<std::string> ReadCachedVersion(const AdapterPaths& paths, const FileStamp& config,
                                             const FileStamp& weights) {
  const absl::StatusOr<std::string> text =
      ReadSmallFile(absl::StrCat(paths.dir, "/", kAdapterVersionFile), kMaxVersionFileBytes,
                    /*no_follow=*/true);
  if (!text.ok()) return std::nullopt;
  const absl::StatusOr<Json> json = ParseJsonStrict(*text, kAdapterVersionFile);
  if (!json.ok() || !json->is_object()) return std::nullopt;
  const auto format = json->find("format");
  const auto sha = json->find("sha256");
  const auto files = json->find("files");
  if (format == json->end() || !format->is_string() || *format != std::string(kVersionFormat) ||
      sha == json->end() || !sha->is_string() || !IsHexDigest(sha->get<std::string>()) ||
      files == json->end() || !files->is_object()) {
    return std::nullopt;
  }
  FileStamp cached_config, cached_weights;
  const std::string config_key(kAdapterConfigFile), weights_key(kAdapterWeightsFile);
  if (!files->contains(config_key) || !files->contains(weights_key) ||
      !StampFromJson((*files)[config_key], &cached_config) ||
      !StampFromJson((*files)[weights_key], &cached_weights)) {
    return std::nullopt;
  }
  if (cached_config != config || cached_weights != weights) return std::nullopt;
  return sha->get<std::string>();
}

// Writes the cache atomically. False (and no file left behind) on any failure.
bool WriteCachedVersion(const AdapterPaths& paths, const std::string& sha256,
                        const FileStamp& config, const FileStamp& weights) {
  static std::atomic<uint64_t> counter{0};
  const Json json{{"format", std::string(kVersionFormat)},
                  {"sha256", sha256},
                  {"files",
                   {{std::string(kAdapterConfigFile), StampJson(config)},
                    {std::string(kAdapterWeightsFile), StampJson(weights)}}}};
  const std::string text = json.dump(2) + "\n";
  const std::string final_path = absl::StrCat(paths.dir, "/", kAdapterVersionFile);
  const std::string temp_path =
      absl::StrCat(final_path, ".tmp-", ::getpid(), "-", counter.fetch_add(1));
  const int fd =
      ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return false;
  bool ok = true;
  size_t written = 0;
  while (ok && written < text.size()) {
    const ssize_t n = ::write(fd, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ok = false;
    } else {
      written += static_cast<size_t>(n);
    }
  }
  ok = ok && ::fsync(fd) == 0;
  ok = (::close(fd) == 0) && ok;
  ok = ok && ::rename(temp_path.c_str(), final_path.c_str()) == 0;
  if (!ok) {
    ::unlink(temp_path.c_str());
    return false;
  }
  const int dir_fd = ::open(paths.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return true;
}

int64_t NowNs() {
  struct timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ToNs(ts);
}

// SHA-256 over config || 0 || weights with a streaming context.
struct DigestCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

// Hashes the resolved files as they are now and caches the result unless racy. The files must
// still match the stamps afterwards (ABORTED otherwise).
absl::StatusOr<AdapterVersion> HashFiles(const AdapterPaths& paths, const FileStamp& config,
                                         const FileStamp& weights, absl::string_view config_text,
                                         int64_t racy_window_ns) {
  AdapterVersion version;
  const int64_t hashed_at = NowNs();
  LS_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mapped, MappedFile::Open(paths.weights_path));
  version.sha256 = AdapterVersionOfBytes(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(config_text.data()),
                                config_text.size()),
      mapped->bytes());
  LS_ASSIGN_OR_RETURN(const FileStamp config_after, Stamp(paths.config_path));
  LS_ASSIGN_OR_RETURN(const FileStamp weights_after, Stamp(paths.weights_path));
  if (config_after != config || weights_after != weights) {
    return absl::AbortedError(
        absl::StrCat("adapter ", Quote(paths.id), ": files changed while being hashed; retry"));
  }
  const int64_t newest =
      std::max({config.mtime_ns, config.ctime_ns, weights.mtime_ns, weights.ctime_ns});
  if (newest <= hashed_at - racy_window_ns) {
    version.cache_written = WriteCachedVersion(paths, version.sha256, config, weights);
  }
  return version;
}

// The cached version when valid, else HashFiles.
absl::StatusOr<AdapterVersion> VersionFiles(const AdapterPaths& paths, const FileStamp& config,
                                            const FileStamp& weights, absl::string_view config_text,
                                            int64_t racy_window_ns) {
  if (std::optional<std::string> cached = ReadCachedVersion(paths, config, weights)) {
    AdapterVersion version;
    version.sha256 = *std::move(cached);
    version.from_cache = true;
    return version;
  }
  return HashFiles(paths, config, weights, config_text, racy_window_ns);
}

}  // namespace

absl::Status ValidateAdapterId(absl::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("adapter id is empty");
  if (id.size() > kMaxAdapterIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("adapter id ", Quote(id), " is ", id.size(),
                                                   " bytes, more than ", kMaxAdapterIdBytes));
  }
  if (id == "." || id == "..") {
    return absl::InvalidArgumentError(absl::StrCat("adapter id ", Quote(id), " is not allowed"));
  }
  const auto alnum = [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
  };
  if (!alnum(id[0])) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter id ", Quote(id), " must start with a letter or digit"));
  }
  for (const char c : id) {
    if (!alnum(c) && c != '.' && c != '_' && c != '-') {
      return absl::InvalidArgumentError(absl::StrCat("adapter id ", Quote(id), " has character ",
                                                     Quote(absl::string_view(&c, 1)),
                                                     " (allowed: A-Z a-z 0-9 . _ -)"));
    }
  }
  return absl::OkStatus();
}

std::string AdapterVersionOfBytes(absl::Span<const uint8_t> config_bytes,
                                  absl::Span<const uint8_t> weights_bytes) {
  std::unique_ptr<EVP_MD_CTX, DigestCtxDeleter> ctx(EVP_MD_CTX_new());
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  const unsigned char zero = 0;
  // Failures here mean OpenSSL itself is broken (out of memory at most); no input can cause one.
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), config_bytes.data(), config_bytes.size()) != 1 ||
      EVP_DigestUpdate(ctx.get(), &zero, 1) != 1 ||
      EVP_DigestUpdate(ctx.get(), weights_bytes.data(), weights_bytes.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), digest, &length) != 1) {
    std::abort();
  }
  return Hex(digest, length);
}

Sha256Hasher::Sha256Hasher() {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  // As in AdapterVersionOfBytes: only a broken OpenSSL (out of memory) fails here.
  if (ctx == nullptr || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) std::abort();
  ctx_ = ctx;
}

Sha256Hasher::~Sha256Hasher() {
  if (ctx_ != nullptr) EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_));
}

Sha256Hasher::Sha256Hasher(Sha256Hasher&& other) noexcept : ctx_(other.ctx_) {
  other.ctx_ = nullptr;
}

Sha256Hasher& Sha256Hasher::operator=(Sha256Hasher&& other) noexcept {
  if (this != &other) {
    if (ctx_ != nullptr) EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_));
    ctx_ = other.ctx_;
    other.ctx_ = nullptr;
  }
  return *this;
}

void Sha256Hasher::Update(absl::string_view bytes) {
  if (EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), bytes.data(), bytes.size()) != 1) {
    std::abort();
  }
}

std::string Sha256Hasher::FinalHex() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), digest, &length) != 1) std::abort();
  return Hex(digest, length);
}

absl::StatusOr<std::unique_ptr<AdapterStore>> AdapterStore::Open(
    const std::string& root, const AdapterStoreOptions& options) {
  LS_ASSIGN_OR_RETURN(std::string real, RealPath(root));
  struct stat st;
  if (::stat(real.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat ", real));
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter root ", root, " is not a directory"));
  }
  return std::unique_ptr<AdapterStore>(new AdapterStore(std::move(real), options));
}

absl::StatusOr<std::vector<std::string>> AdapterStore::List() const {
  DIR* dir = ::opendir(root_.c_str());
  if (dir == nullptr) return ErrnoStatus(errno, absl::StrCat("opendir ", root_));
  std::vector<std::string> ids;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (!ValidateAdapterId(name).ok()) continue;
    struct stat st;
    if (::stat(absl::StrCat(root_, "/", name).c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      ids.push_back(name);
    }
  }
  ::closedir(dir);
  std::sort(ids.begin(), ids.end());
  return ids;
}

absl::StatusOr<AdapterPaths> AdapterStore::Resolve(absl::string_view id) const {
  LS_RETURN_IF_ERROR(ValidateAdapterId(id));
  AdapterPaths paths;
  paths.id = std::string(id);
  const std::string inside = root_ == "/" ? "/" : root_ + "/";
  const std::string link = absl::StrCat(root_, "/", id);
  if (!Exists(link)) {
    return absl::NotFoundError(
        absl::StrCat("adapter ", Quote(id), " not found: no directory ", link));
  }
  absl::StatusOr<std::string> real = RealPath(link);
  if (!real.ok()) {
    return absl::NotFoundError(absl::StrCat("adapter ", Quote(id), ": ", real.status().message()));
  }
  if (!absl::StartsWith(*real, inside) || real->size() == inside.size()) {
    return absl::PermissionDeniedError(absl::StrCat("adapter ", Quote(id), ": ", link,
                                                    " resolves to ", *real,
                                                    ", outside the adapter root ", root_));
  }
  struct stat st;
  if (::stat(real->c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter ", Quote(id), ": ", link, " is not a directory"));
  }
  paths.dir = *std::move(real);

  for (const absl::string_view name : {kAdapterConfigFile, kAdapterWeightsFile}) {
    const std::string path = absl::StrCat(paths.dir, "/", name);
    if (!Exists(path)) {
      if (name == kAdapterWeightsFile) {
        for (const char* pickle : kPickleNames) {
          if (Exists(absl::StrCat(paths.dir, "/", pickle))) {
            return absl::InvalidArgumentError(absl::StrCat(
                "adapter ", Quote(id), ": has ", pickle, " but no ", kAdapterWeightsFile,
                ". Pickle files are never loaded (unpickling can run arbitrary code). Convert "
                "it with PEFT: PeftModel.from_pretrained(base_model, dir)"
                ".save_pretrained(out_dir, safe_serialization=True)"));
          }
        }
      }
      return absl::NotFoundError(
          absl::StrCat("adapter ", Quote(id), ": no ", name, " in ", paths.dir));
    }
    absl::StatusOr<std::string> file = RealPath(path);
    if (!file.ok()) {
      return absl::NotFoundError(
          absl::StrCat("adapter ", Quote(id), ": ", file.status().message()));
    }
    if (!absl::StartsWith(*file, inside)) {
      return absl::PermissionDeniedError(absl::StrCat("adapter ", Quote(id), ": ", path,
                                                      " resolves to ", *file,
                                                      ", outside the adapter root ", root_));
    }
    if (::stat(file->c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat("adapter ", Quote(id), ": ", path, " is not a regular file"));
    }
    (name == kAdapterConfigFile ? paths.config_path : paths.weights_path) = *std::move(file);
  }
  return paths;
}

absl::StatusOr<AdapterVersion> AdapterStore::Version(absl::string_view id) const {
  LS_ASSIGN_OR_RETURN(const AdapterPaths paths, Resolve(id));
  LS_ASSIGN_OR_RETURN(const FileStamp config, Stamp(paths.config_path));
  LS_ASSIGN_OR_RETURN(const FileStamp weights, Stamp(paths.weights_path));
  // Only a cache miss reads the config; the weights are mapped, not read, on a miss.
  if (std::optional<std::string> cached = ReadCachedVersion(paths, config, weights)) {
    AdapterVersion version;
    version.sha256 = *std::move(cached);
    version.from_cache = true;
    return version;
  }
  LS_ASSIGN_OR_RETURN(const std::string config_text,
                      ReadSmallFile(paths.config_path, kMaxConfigBytes, /*no_follow=*/false));
  return HashFiles(paths, config, weights, config_text, options_.racy_window_ns);
}

absl::StatusOr<LoadedAdapter> AdapterStore::Load(absl::string_view id, const ModelConfig& base,
                                                 LoraLoadOptions options) const {
  LS_ASSIGN_OR_RETURN(const AdapterPaths paths, Resolve(id));
  LS_ASSIGN_OR_RETURN(const FileStamp config_stamp, Stamp(paths.config_path));
  LS_ASSIGN_OR_RETURN(const FileStamp weights_stamp, Stamp(paths.weights_path));
  const std::string name = absl::StrCat("adapter ", Quote(id));
  absl::StatusOr<std::string> config_text =
      ReadSmallFile(paths.config_path, kMaxConfigBytes, /*no_follow=*/false);
  if (!config_text.ok()) {
    return absl::Status(config_text.status().code(),
                        absl::StrCat(name, ": ", config_text.status().message()));
  }
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> weights =
      SafetensorsFile::Open(paths.weights_path);
  if (!weights.ok()) {
    return absl::Status(weights.status().code(),
                        absl::StrCat(name, ": ", weights.status().message()));
  }
  LS_ASSIGN_OR_RETURN(AdapterVersion version, VersionFiles(paths, config_stamp, weights_stamp,
                                                           *config_text, options_.racy_window_ns));
  options.name = name;
  options.version = version.sha256;
  LS_ASSIGN_OR_RETURN(std::unique_ptr<LoraAdapter> adapter,
                      LoadLoraAdapter(*config_text, **weights, base, options));
  // The files read above must be the ones the version describes.
  LS_ASSIGN_OR_RETURN(const FileStamp config_after, Stamp(paths.config_path));
  LS_ASSIGN_OR_RETURN(const FileStamp weights_after, Stamp(paths.weights_path));
  if (config_after != config_stamp || weights_after != weights_stamp) {
    return absl::AbortedError(absl::StrCat(name, ": files changed while being loaded; retry"));
  }
  LoadedAdapter loaded;
  loaded.id = paths.id;
  loaded.version = std::move(version);
  loaded.adapter = std::move(adapter);
  return loaded;
}

}  // namespace ls

#include "server/adapters/upload.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "server/adapters/registry.h"

namespace ls {
namespace {

constexpr absl::string_view kFileNames[2] = {kAdapterConfigFile, kAdapterWeightsFile};
// Held (flock) by the process receiving an upload for as long as the upload lives, so that a
// replica starting on a shared root does not remove an upload that is still in progress.
constexpr absl::string_view kUploadLockFile = ".lock";

// True when another live upload holds `staging`'s lock.
bool UploadInProgress(const std::string& staging) {
  const std::string lock = absl::StrCat(staging, "/", kUploadLockFile);
  const int fd = ::open(lock.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return false;
  const bool busy = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return busy;
}

// A file-system error as a status: a full disk or quota is RESOURCE_EXHAUSTED (the caller may
// retry after freeing space), anything else INTERNAL.
absl::Status FsError(int err, absl::string_view what) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) {
    return absl::ResourceExhaustedError(absl::StrCat(message, " (the disk is full)"));
  }
  return absl::InternalError(message);
}

absl::Status FsyncPath(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  if (fd < 0) return FsError(errno, absl::StrCat("open ", path));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return FsError(err, absl::StrCat("fsync ", path));
  return absl::OkStatus();
}

std::string RandomSuffix() {
  std::random_device random;
  return absl::StrCat(absl::Hex(random(), absl::kZeroPad8), absl::Hex(random(), absl::kZeroPad8));
}

bool IsHex64(absl::string_view s) {
  if (s.size() != 64) return false;
  for (const char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

uint64_t TreeBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    std::error_code entry_ec;
    if (it->is_symlink(entry_ec) || !it->is_regular_file(entry_ec)) continue;
    const uintmax_t size = it->file_size(entry_ec);
    if (!entry_ec) total += size;
  }
  return total;
}

std::vector<std::string> RemoveLeftovers(const std::string& root) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    if (!absl::StartsWith(name, kUploadDirPrefix) && !absl::StartsWith(name, kDeletedDirPrefix)) {
      continue;
    }
    if (absl::StartsWith(name, kUploadDirPrefix) && UploadInProgress(entry.path().string())) {
      continue;
    }
    std::error_code remove_ec;
    std::filesystem::remove_all(entry.path(), remove_ec);
    if (remove_ec) {
      LS_LOG(WARNING) << "cannot remove leftover " << entry.path().string() << ": "
                      << remove_ec.message();
    } else {
      removed.push_back(name);
    }
  }
  return removed;
}

absl::StatusOr<std::unique_ptr<AdapterUpload>> AdapterUpload::Begin(const std::string& root,
                                                                    absl::string_view id,
                                                                    const UploadFileSpec& config,
                                                                    const UploadFileSpec& weights,
                                                                    const UploadLimits& limits) {
  if (absl::Status valid = ValidateAdapterId(id); !valid.ok()) return valid;
  const UploadFileSpec* specs[2] = {&config, &weights};
  for (int f = 0; f < 2; ++f) {
    if (!IsHex64(specs[f]->sha256)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kFileNames[f], ": sha256 must be 64 hex characters, got \"",
                       absl::CHexEscape(specs[f]->sha256.substr(0, 80)), "\""));
    }
  }
  if (config.size < 1 || config.size > kMaxUploadConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat(kAdapterConfigFile, ": size_bytes must be 1 .. ",
                                                   kMaxUploadConfigBytes, ", got ", config.size));
  }
  if (weights.size < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        kAdapterWeightsFile, ": size_bytes must be >= 8 (the header length), got ", weights.size));
  }
  const uint64_t total = config.size + weights.size;
  if (total > limits.max_upload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("upload of adapter \"", id, "\" declares ", total,
                     " bytes, over --max_adapter_upload_bytes=", limits.max_upload_bytes));
  }
  if (limits.root_max_bytes != 0) {
    const uint64_t all = TreeBytes(root);
    const uint64_t used = all > limits.replaced_bytes ? all - limits.replaced_bytes : 0;
    if (used + total > limits.root_max_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("upload of adapter \"", id, "\" (", total,
                       " bytes) does not fit the adapter root's quota: ", used,
                       " bytes used of --adapter_root_max_bytes=", limits.root_max_bytes));
    }
  }

  std::unique_ptr<AdapterUpload> up(new AdapterUpload());
  up->root_ = root;
  up->id_ = std::string(id);
  up->staging_root_ = absl::StrCat(root, "/", kUploadDirPrefix, RandomSuffix());
  up->dir_ = absl::StrCat(up->staging_root_, "/", id);
  for (int f = 0; f < 2; ++f) {
    up->declared_[f] = specs[f]->size;
    up->sha256_[f] = absl::AsciiStrToLower(specs[f]->sha256);
  }
  if (::mkdir(up->staging_root_.c_str(), 0755) != 0) {
    const int err = errno;
    up->staging_root_.clear();  // nothing to remove
    return FsError(err, absl::StrCat("create ", root, "/", kUploadDirPrefix, "*"));
  }
  const std::string lock = absl::StrCat(up->staging_root_, "/", kUploadLockFile);
  up->lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (up->lock_fd_ < 0) return FsError(errno, absl::StrCat("create ", lock));
  if (::flock(up->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    return FsError(errno, absl::StrCat("lock ", lock));
  }
  if (::mkdir(up->dir_.c_str(), 0755) != 0) {
    return FsError(errno, absl::StrCat("create ", up->dir_));
  }
  for (int f = 0; f < 2; ++f) {
    const std::string path = absl::StrCat(up->dir_, "/", kFileNames[f]);
    up->fds_[f] = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (up->fds_[f] < 0) return FsError(errno, absl::StrCat("create ", path));
  }
  return up;
}

AdapterUpload::~AdapterUpload() {
  for (int& fd : fds_) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  if (!staging_root_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(staging_root_, ec);
    if (ec) LS_LOG(WARNING) << "cannot remove " << staging_root_ << ": " << ec.message();
  }
  if (lock_fd_ >= 0) ::close(lock_fd_);  // after the removal: the directory is never unlocked
}

absl::Status AdapterUpload::Write(UploadFile file, uint64_t offset, absl::string_view data) {
  const int f = static_cast<int>(file);
  if (f < 0 || f > 1) return absl::InvalidArgumentError("chunk names no file");
  if (fds_[f] < 0) return absl::FailedPreconditionError("upload already finished");
  if (offset != received_[f]) {
    return absl::InvalidArgumentError(absl::StrCat(kFileNames[f], ": chunk at offset ", offset,
                                                   ", expected ", received_[f],
                                                   " (chunks of a file come in order, no gaps)"));
  }
  if (data.empty() || data.size() > kMaxUploadChunkBytes) {
    return absl::InvalidArgumentError(absl::StrCat(kFileNames[f], ": chunk of ", data.size(),
                                                   " bytes, expected 1 .. ", kMaxUploadChunkBytes));
  }
  if (offset + data.size() > declared_[f]) {
    return absl::InvalidArgumentError(absl::StrCat(kFileNames[f], ": chunk ends at byte ",
                                                   offset + data.size(),
                                                   ", past the declared size ", declared_[f]));
  }
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::pwrite(fds_[f], data.data() + done, data.size() - done,
                               static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return FsError(errno, absl::StrCat("write ", dir_, "/", kFileNames[f]));
    }
    done += static_cast<size_t>(n);
  }
  hashers_[f].Update(data);
  received_[f] += data.size();
  return absl::OkStatus();
}

absl::Status AdapterUpload::Finish() {
  for (int f = 0; f < 2; ++f) {
    if (fds_[f] < 0) return absl::FailedPreconditionError("upload already finished");
    if (received_[f] != declared_[f]) {
      return absl::InvalidArgumentError(absl::StrCat(kFileNames[f], ": received ", received_[f],
                                                     " bytes of the declared ", declared_[f]));
    }
  }
  for (int f = 0; f < 2; ++f) {
    const std::string got = hashers_[f].FinalHex();
    if (got != sha256_[f]) {
      return absl::DataLossError(absl::StrCat(kFileNames[f], ": SHA-256 of the received bytes is ",
                                              got, " but the header declared ", sha256_[f],
                                              "; nothing was stored, upload again"));
    }
  }
  for (int f = 0; f < 2; ++f) {
    const int rc = ::fsync(fds_[f]);
    const int err = errno;
    ::close(fds_[f]);
    fds_[f] = -1;
    if (rc != 0) return FsError(err, absl::StrCat("fsync ", dir_, "/", kFileNames[f]));
  }
  return FsyncPath(dir_, /*directory=*/true);
}

absl::Status AdapterUpload::Publish(bool replace, bool disabled) {
  if (fds_[0] >= 0 || fds_[1] >= 0) return absl::FailedPreconditionError("Finish() first");
  if (published_) return absl::FailedPreconditionError("already published");
  if (disabled) {
    const std::string marker = absl::StrCat(dir_, "/", kAdapterDisabledFile);
    const int fd = ::open(marker.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return FsError(errno, absl::StrCat("create ", marker));
    ::close(fd);
    if (absl::Status s = FsyncPath(dir_, true); !s.ok()) return s;
  }
  const std::string target = absl::StrCat(root_, "/", id_);
  struct stat st;
  const bool exists = ::lstat(target.c_str(), &st) == 0;
  if (exists && !replace) {
    return absl::AlreadyExistsError(absl::StrCat("adapter \"", id_, "\" already exists (", target,
                                                 "); set replace_existing to replace it"));
  }
  if (exists) {
    // One atomic step: requests and loads see the old directory or the new one, never neither.
    if (::renameat2(AT_FDCWD, dir_.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS) {
        return FsError(errno, absl::StrCat("exchange ", dir_, " with ", target));
      }
      // A file system without RENAME_EXCHANGE: the old one moves aside first (a short window in
      // which the id has no directory; a load then fails and is retried by the next request).
      const std::string aside = absl::StrCat(staging_root_, "/old");
      if (::rename(target.c_str(), aside.c_str()) != 0) {
        return FsError(errno, absl::StrCat("move ", target, " aside"));
      }
      if (::rename(dir_.c_str(), target.c_str()) != 0) {
        const absl::Status error = FsError(errno, absl::StrCat("rename into ", target));
        (void)::rename(aside.c_str(), target.c_str());
        return error;
      }
    }
  } else if (::renameat2(AT_FDCWD, dir_.c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) != 0) {
    if (errno == EEXIST || errno == ENOTEMPTY) {
      return absl::AlreadyExistsError(
          absl::StrCat("adapter \"", id_, "\" was created by someone else during the upload"));
    }
    if (errno != EINVAL && errno != ENOSYS) {
      return FsError(errno, absl::StrCat("rename ", dir_, " to ", target));
    }
    if (::rename(dir_.c_str(), target.c_str()) != 0) {
      return FsError(errno, absl::StrCat("rename ", dir_, " to ", target));
    }
  }
  published_ = true;
  // Durable before the caller reports success; the old version (now in staging) goes with the
  // staging directory in the destructor.
  return FsyncPath(root_, /*directory=*/true);
}

}  // namespace ls

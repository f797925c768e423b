#include "client/local_files.h"

#include <openssl/evp.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace loraserve::client {
namespace {

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

struct DigestFree {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};
using Digest = std::unique_ptr<EVP_MD_CTX, DigestFree>;

absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  const std::string message = absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(err));
  return err == ENOENT ? absl::NotFoundError(message) : absl::InvalidArgumentError(message);
}

absl::StatusOr<File> OpenRegular(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  if (f == nullptr) return ErrnoError("open", path, errno);
  struct stat st;
  if (fstat(fileno(f.get()), &st) != 0) return ErrnoError("stat", path, errno);
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  return f;
}

absl::StatusOr<uint64_t> FileSize(std::FILE* f, const std::string& path) {
  struct stat st;
  if (fstat(fileno(f), &st) != 0) return ErrnoError("stat", path, errno);
  return static_cast<uint64_t>(st.st_size);
}

Digest NewSha256() {
  Digest ctx(EVP_MD_CTX_new());
  // Only allocation can fail here; loractl cannot do anything useful without SHA-256.
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    std::fprintf(stderr, "loractl: OpenSSL cannot initialise SHA-256\n");
    std::abort();
  }
  return ctx;
}

void Update(EVP_MD_CTX* ctx, const void* data, size_t n) { EVP_DigestUpdate(ctx, data, n); }

std::string FinalHex(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx, digest, &n);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), static_cast<size_t>(n)));
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

}  // namespace

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  auto f = OpenRegular(path);
  if (!f.ok()) return f.status();
  auto size = FileSize(f->get(), path);
  if (!size.ok()) return size.status();
  if (*size > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " has ", *size, " bytes; at most ", max_bytes, " are expected"));
  }
  std::string bytes(*size, '\0');
  if (*size > 0 && std::fread(bytes.data(), 1, bytes.size(), f->get()) != bytes.size()) {
    return ErrnoError("read", path, errno);
  }
  return bytes;
}

std::string Sha256Hex(absl::string_view bytes) {
  Digest ctx = NewSha256();
  Update(ctx.get(), bytes.data(), bytes.size());
  return FinalHex(ctx.get());
}

absl::StatusOr<PeftFolder> ReadPeftFolder(const std::string& dir,
                                          absl::FunctionRef<void(uint64_t, uint64_t)> progress) {
  PeftFolder folder;
  folder.config_path = absl::StrCat(dir, "/adapter_config.json");
  folder.weights_path = absl::StrCat(dir, "/adapter_model.safetensors");
  if (!Exists(folder.weights_path)) {
    for (const char* pickle : {"adapter_model.bin", "adapter_model.pt", "adapter_model.pth"}) {
      if (Exists(absl::StrCat(dir, "/", pickle))) {
        return absl::InvalidArgumentError(absl::StrCat(
            dir, " has ", pickle, " but no adapter_model.safetensors; loraserve never loads ",
            "pickles: save the adapter with PEFT's save_pretrained(..., "
            "safe_serialization=True)"));
      }
    }
  }
  // adapter_config.json is at most 1 MiB (UploadFileInfo).
  auto config = ReadSmallFile(folder.config_path, 1 << 20);
  if (!config.ok()) return config.status();
  folder.config = *std::move(config);
  folder.config_sha256 = Sha256Hex(folder.config);

  auto weights = OpenRegular(folder.weights_path);
  if (!weights.ok()) return weights.status();
  auto size = FileSize(weights->get(), folder.weights_path);
  if (!size.ok()) return size.status();
  folder.weights_bytes = *size;

  // One pass over the weights feeds both digests.
  Digest file_digest = NewSha256();
  Digest version_digest = NewSha256();
  Update(version_digest.get(), folder.config.data(), folder.config.size());
  const char zero = 0;
  Update(version_digest.get(), &zero, 1);
  std::vector<char> buffer(1 << 20);
  uint64_t done = 0;
  progress(0, folder.weights_bytes);
  while (true) {
    const size_t n = std::fread(buffer.data(), 1, buffer.size(), weights->get());
    if (n == 0) {
      if (std::ferror(weights->get())) return ErrnoError("read", folder.weights_path, errno);
      break;
    }
    Update(file_digest.get(), buffer.data(), n);
    Update(version_digest.get(), buffer.data(), n);
    done += n;
    progress(done, folder.weights_bytes);
  }
  if (done != folder.weights_bytes) {
    return absl::AbortedError(absl::StrCat(folder.weights_path,
                                           " changed while it was read: ", folder.weights_bytes,
                                           " bytes expected, ", done, " read"));
  }
  folder.weights_sha256 = FinalHex(file_digest.get());
  folder.version = FinalHex(version_digest.get());
  return folder;
}

}  // namespace loraserve::client

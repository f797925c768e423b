// AdapterUpload (server/adapters/upload.h): chunks written in order and hash-checked, every
// refusal (bad id, declared sizes, over the cap, over the root quota, out-of-order or oversized
// chunks, short files, a wrong SHA-256) leaving nothing in the root, publish of a new id and an
// atomic replace, ALREADY_EXISTS without replace, the disabled marker, and leftover staging
// directories removed at start. No model and no gRPC: runs in every sanitizer lane.
#include "server/adapters/upload.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/adapter_store.h"
#include "server/adapters/registry.h"

namespace ls {
namespace {

using ::testing::HasSubstr;

std::string FixtureAdapter() {
  const char* dir = std::getenv("LS_SOURCE_DIR");
  return absl::StrCat(dir != nullptr ? dir : ".",
                      "/tests/golden/fixtures/llama_gqa/adapters/attn_r4");
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

// Names in `dir`, sorted ("." and ".." left out).
std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string Sha256(const std::string& bytes) {
  Sha256Hasher h;
  h.Update(bytes);
  return h.FinalHex();
}

class AdapterUploadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/adapter_upload_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    config_ = ReadFile(FixtureAdapter() + "/adapter_config.json");
    weights_ = ReadFile(FixtureAdapter() + "/adapter_model.safetensors");
    ASSERT_FALSE(config_.empty());
    ASSERT_GT(weights_.size(), 1000u);
  }
  void TearDown() override { ::nftw(root_.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }

  UploadFileSpec ConfigSpec() const { return {config_.size(), Sha256(config_)}; }
  UploadFileSpec WeightsSpec() const { return {weights_.size(), Sha256(weights_)}; }

  absl::StatusOr<std::unique_ptr<AdapterUpload>> Begin(const std::string& id,
                                                       UploadLimits limits = {}) {
    return AdapterUpload::Begin(root_, id, ConfigSpec(), WeightsSpec(), limits);
  }

  // Streams both files in `chunk`-byte pieces, interleaved.
  static absl::Status WriteAll(AdapterUpload& up, const std::string& config,
                               const std::string& weights, size_t chunk) {
    size_t c = 0, w = 0;
    while (c < config.size() || w < weights.size()) {
      if (c < config.size()) {
        const size_t n = std::min(chunk, config.size() - c);
        if (absl::Status s = up.Write(UploadFile::kConfig, c, config.substr(c, n)); !s.ok()) {
          return s;
        }
        c += n;
      }
      if (w < weights.size()) {
        const size_t n = std::min(chunk, weights.size() - w);
        if (absl::Status s = up.Write(UploadFile::kWeights, w, weights.substr(w, n)); !s.ok()) {
          return s;
        }
        w += n;
      }
    }
    return absl::OkStatus();
  }

  std::string root_;
  std::string config_;
  std::string weights_;
};

TEST_F(AdapterUploadTest, PublishesANewIdWithTheExactBytesAndVersion) {
  auto up = Begin("new-one");
  ASSERT_TRUE(up.ok()) << up.status();
  // The staging directory is inside the root under a name that is not a valid id.
  const std::string staging = (*up)->staging_root();
  EXPECT_TRUE(absl::StartsWith(staging, root_ + "/.upload-")) << staging;
  EXPECT_FALSE(ValidateAdapterId(staging.substr(root_.size() + 1)).ok());
  ASSERT_TRUE(WriteAll(**up, config_, weights_, 777).ok());
  EXPECT_EQ((*up)->received_bytes(), config_.size() + weights_.size());
  ASSERT_TRUE((*up)->Finish().ok());
  // Nothing under the id until Publish; List does not see the staging directory.
  EXPECT_FALSE(Exists(root_ + "/new-one"));
  auto store = AdapterStore::Open(root_);
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE((*store)->List()->empty());
  ASSERT_TRUE((*up)->Publish(/*replace=*/false, /*disabled=*/false).ok());
  up->reset();
  EXPECT_EQ(Entries(root_), std::vector<std::string>{"new-one"});
  EXPECT_EQ(ReadFile(root_ + "/new-one/adapter_model.safetensors"), weights_);
  EXPECT_EQ(ReadFile(root_ + "/new-one/adapter_config.json"), config_);
  EXPECT_FALSE(Exists(absl::StrCat(root_, "/new-one/", kAdapterDisabledFile)));
  absl::StatusOr<AdapterVersion> version = (*store)->Version("new-one");
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(version->sha256,
            AdapterVersionOfBytes(
                absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(config_.data()),
                                          config_.size()),
                absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(weights_.data()),
                                          weights_.size())));
}

TEST_F(AdapterUploadTest, ExistingIdNeedsReplaceAndReplaceSwapsWholeDirectories) {
  {
    auto up = Begin("a");
    ASSERT_TRUE(up.ok());
    ASSERT_TRUE(WriteAll(**up, config_, weights_, 1 << 20).ok());
    ASSERT_TRUE((*up)->Finish().ok());
    ASSERT_TRUE((*up)->Publish(false, /*disabled=*/true).ok());
  }
  EXPECT_TRUE(Exists(absl::StrCat(root_, "/a/", kAdapterDisabledFile)));
  // Other content for the same id: refused without replace, nothing left behind.
  std::string other = config_;
  other.insert(other.find('{') + 1, "\"inference_mode\": true, ");
  const UploadFileSpec other_spec{other.size(), Sha256(other)};
  {
    auto up = AdapterUpload::Begin(root_, "a", other_spec, WeightsSpec(), {});
    ASSERT_TRUE(up.ok());
    ASSERT_TRUE(WriteAll(**up, other, weights_, 4096).ok());
    ASSERT_TRUE((*up)->Finish().ok());
    absl::Status refused = (*up)->Publish(/*replace=*/false, false);
    EXPECT_EQ(refused.code(), absl::StatusCode::kAlreadyExists) << refused;
  }
  EXPECT_EQ(Entries(root_), std::vector<std::string>{"a"});
  EXPECT_EQ(ReadFile(root_ + "/a/adapter_config.json"), config_);
  {
    auto up = AdapterUpload::Begin(root_, "a", other_spec, WeightsSpec(), {});
    ASSERT_TRUE(up.ok());
    ASSERT_TRUE(WriteAll(**up, other, weights_, 4096).ok());
    ASSERT_TRUE((*up)->Finish().ok());
    ASSERT_TRUE((*up)->Publish(/*replace=*/true, /*disabled=*/false).ok());
  }
  // The new files in place, the old directory (and its marker) gone with the staging dir.
  EXPECT_EQ(Entries(root_), std::vector<std::string>{"a"});
  EXPECT_EQ(ReadFile(root_ + "/a/adapter_config.json"), other);
  EXPECT_FALSE(Exists(absl::StrCat(root_, "/a/", kAdapterDisabledFile)));
}

TEST_F(AdapterUploadTest, RefusalsLeaveNothingBehind) {
  // Header-time refusals: nothing is even created.
  EXPECT_EQ(Begin("../x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Begin("a/b").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Begin(".hidden").status().code(), absl::StatusCode::kInvalidArgument);
  UploadLimits cap;
  cap.max_upload_bytes = weights_.size();  // both files do not fit
  absl::Status over = Begin("a", cap).status();
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.message(), HasSubstr("--max_adapter_upload_bytes"));
  UploadLimits quota;
  quota.root_max_bytes = config_.size() + weights_.size() - 1;
  absl::Status full = Begin("a", quota).status();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("--adapter_root_max_bytes"));
  EXPECT_EQ(AdapterUpload::Begin(root_, "a", {0, Sha256("")}, WeightsSpec(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      AdapterUpload::Begin(root_, "a", {config_.size(), "xyz"}, WeightsSpec(), {}).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Entries(root_).empty());

  // Chunk protocol errors, a short file and a wrong hash: refused, and the staging directory
  // goes with the upload object.
  {
    auto up = Begin("a");
    ASSERT_TRUE(up.ok());
    EXPECT_EQ((*up)->Write(UploadFile::kWeights, 5, weights_.substr(5, 10)).code(),
              absl::StatusCode::kInvalidArgument);  // gap
    EXPECT_EQ((*up)->Write(UploadFile::kWeights, 0, "").code(),
              absl::StatusCode::kInvalidArgument);  // empty
    EXPECT_EQ((*up)->Write(UploadFile::kWeights, 0, std::string((1 << 20) + 1, 'x')).code(),
              absl::StatusCode::kInvalidArgument);  // over 1 MiB
    EXPECT_EQ((*up)->Write(UploadFile::kConfig, 0, config_ + "x").code(),
              absl::StatusCode::kInvalidArgument);  // past the declared size
    ASSERT_TRUE((*up)->Write(UploadFile::kConfig, 0, config_).ok());
    absl::Status short_file = (*up)->Finish();
    EXPECT_EQ(short_file.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(short_file.message(), HasSubstr("received 0 bytes"));
    EXPECT_EQ(Entries(root_).size(), 1u);  // the staging directory, while the upload lives
  }
  EXPECT_TRUE(Entries(root_).empty());
  {
    std::string corrupt = weights_;
    corrupt[corrupt.size() / 2] ^= 1;
    auto up = Begin("a");
    ASSERT_TRUE(up.ok());
    ASSERT_TRUE(WriteAll(**up, config_, corrupt, 1000).ok());
    absl::Status mismatch = (*up)->Finish();
    EXPECT_EQ(mismatch.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(mismatch.message(), HasSubstr("SHA-256"));
    EXPECT_FALSE((*up)->Publish(false, false).ok());
  }
  EXPECT_TRUE(Entries(root_).empty());
}

TEST_F(AdapterUploadTest, LeftoversOfAnInterruptedProcessAreRemoved) {
  auto up = Begin("a");
  ASSERT_TRUE(up.ok());
  ASSERT_TRUE(WriteAll(**up, config_, weights_.substr(0, 100), 64).ok());
  const std::string staging = (*up)->staging_root();
  // What a crashed process leaves: staging and deleted directories nobody will clean up.
  ASSERT_EQ(::mkdir((root_ + "/.upload-deadbeef").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((root_ + "/.upload-deadbeef/a").c_str(), 0755), 0);
  std::ofstream(root_ + "/.upload-deadbeef/a/adapter_model.safetensors") << "partial";
  ASSERT_EQ(::mkdir((root_ + "/.deleted-b-0001").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((root_ + "/keep").c_str(), 0755), 0);
  // An upload still in progress (another replica's) is left alone.
  EXPECT_EQ(RemoveLeftovers(root_).size(), 2u);
  EXPECT_TRUE(Exists(staging));
  ASSERT_EQ(::mkdir((root_ + "/.upload-deadbeef").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((root_ + "/.upload-deadbeef/a").c_str(), 0755), 0);
  std::ofstream(root_ + "/.upload-deadbeef/a/adapter_model.safetensors") << "partial";
  ASSERT_EQ(::mkdir((root_ + "/.deleted-b-0001").c_str(), 0755), 0);
  up->reset();
  EXPECT_FALSE(Exists(staging));
  std::vector<std::string> removed = RemoveLeftovers(root_);
  std::sort(removed.begin(), removed.end());
  EXPECT_EQ(removed, (std::vector<std::string>{".deleted-b-0001", ".upload-deadbeef"}));
  EXPECT_EQ(Entries(root_), std::vector<std::string>{"keep"});
  EXPECT_EQ(TreeBytes(root_), 0u);
}

TEST_F(AdapterUploadTest, TreeBytesCountsRegularFilesOnly) {
  ASSERT_EQ(::mkdir((root_ + "/x").c_str(), 0755), 0);
  std::ofstream(root_ + "/x/f") << std::string(1000, 'a');
  std::ofstream(root_ + "/g") << std::string(24, 'b');
  ASSERT_EQ(::symlink("/etc/passwd", (root_ + "/x/link").c_str()), 0);
  EXPECT_EQ(TreeBytes(root_), 1024u);
  EXPECT_EQ(TreeBytes(root_ + "/missing"), 0u);
}

}  // namespace
}  // namespace ls

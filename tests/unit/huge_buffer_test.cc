#include "common/huge_buffer.h"

#include <cstdint>
#include <cstring>
#include <utility>

#include "gtest/gtest.h"

namespace ls {
namespace {

TEST(HugeBufferTest, AlignedZeroedAndWritable) {
  const size_t bytes = (size_t{5} << 20) + 123;  // not a multiple of the alignment
  absl::StatusOr<HugeBuffer> buffer = HugeBuffer::Allocate(bytes);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_EQ(buffer->size(), bytes);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer->data()) % HugeBuffer::kAlignment, 0u);
  const auto* p = static_cast<const unsigned char*>(buffer->data());
  for (size_t i = 0; i < bytes; i += 4093) ASSERT_EQ(p[i], 0) << i;
  EXPECT_EQ(p[bytes - 1], 0);
  std::memset(buffer->data(), 0xab, bytes);
  EXPECT_EQ(p[bytes - 1], 0xab);
}

TEST(HugeBufferTest, EmptyAndMove) {
  absl::StatusOr<HugeBuffer> empty = HugeBuffer::Allocate(0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->data(), nullptr);
  EXPECT_EQ(empty->size(), 0u);

  absl::StatusOr<HugeBuffer> a = HugeBuffer::Allocate(4096);
  ASSERT_TRUE(a.ok());
  void* data = a->data();
  static_cast<char*>(data)[7] = 42;
  HugeBuffer b = *std::move(a);
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(static_cast<char*>(b.data())[7], 42);
  HugeBuffer c;
  c = std::move(b);
  EXPECT_EQ(c.data(), data);
  EXPECT_EQ(b.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(b.size(), 0u);
}

TEST(HugeBufferTest, ImpossibleSizeIsAnError) {
  absl::StatusOr<HugeBuffer> buffer = HugeBuffer::Allocate(~size_t{0} - 10);
  EXPECT_EQ(buffer.status().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace ls

// ServerOptions validation and the host:port parser.
#include "server/options.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ls {
namespace {

using ::testing::HasSubstr;

TEST(ParseHostPort, AcceptsIpv4Ipv6AndNames) {
  auto a = ParseHostPort("127.0.0.1:0", "address");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 0);
  auto b = ParseHostPort("[::1]:50051", "address");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->host, "::1");
  EXPECT_EQ(b->port, 50051);
  auto c = ParseHostPort("localhost:65535", "address");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(FormatHostPort("::1", 7), "[::1]:7");
  EXPECT_EQ(FormatHostPort("0.0.0.0", 7), "0.0.0.0:7");
}

TEST(ParseHostPort, RejectsMalformed) {
  for (const char* bad : {"", "50051", "host:", ":50051", "host:65536", "host:-1", "host:12a",
                          "::1:50051", "[::1:50051", "host: 1"}) {
    auto r = ParseHostPort(bad, "address");
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("--address=")) << bad;
  }
}

TEST(ServerOptions, ValidateNamesTheFlag) {
  ServerOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.metrics_address = o.address;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--metrics_address"));
  o = ServerOptions();
  o.model_dir = "/nonexistent/model/dir";
  EXPECT_THAT(o.Validate().message(), HasSubstr("--model=/nonexistent/model/dir"));
  o = ServerOptions();
  o.drain_timeout = absl::Seconds(-1);
  EXPECT_THAT(o.Validate().message(), HasSubstr("--drain_timeout"));
  o = ServerOptions();
  o.kv_block_tokens = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--kv_block_tokens=0"));
  o = ServerOptions();
  o.threads = -1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--threads=-1"));
  o = ServerOptions();
  o.max_model_len = -5;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--max_model_len=-5"));
  o = ServerOptions();
  o.max_step_tokens = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--max_step_tokens=0"));
  o = ServerOptions();
  o.max_receive_message_bytes = 10;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--max_receive_message_bytes"));
  o = ServerOptions();
  o.adapter_root = "/nonexistent/adapters";
  EXPECT_THAT(o.Validate().message(), HasSubstr("--adapter_root=/nonexistent/adapters: not a"));
  o = ServerOptions();
  o.adapter_root = "/";
  EXPECT_THAT(o.Validate().message(), HasSubstr("adapters need a base model (--model)"));
  o = ServerOptions();
  o.max_lora_rank = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--max_lora_rank=0"));
  o = ServerOptions();
  o.adapter_page_bytes = 1000;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--adapter_page_bytes=1000"));
  o = ServerOptions();
  o.adapter_pool_bytes = 1024;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--adapter_pool_bytes=1024"));
  o = ServerOptions();
  o.adapter_wait_timeout = absl::Seconds(-1);
  EXPECT_THAT(o.Validate().message(), HasSubstr("--adapter_wait_timeout"));
  o = ServerOptions();
  o.max_loras_per_step = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--max_loras_per_step=0"));
  o = ServerOptions();
  o.max_queued_requests = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("--max_queued_requests=0"));
}

TEST(ServerOptions, ToStringListsEveryField) {
  const std::string s = ServerOptions().ToString();
  for (const char* field : {"address=",
                            "metrics_address=",
                            "enable_reflection=",
                            "model=",
                            "backend=",
                            "max_model_len=",
                            "kv_cache_bytes=",
                            "kv_block_tokens=",
                            "threads=",
                            "weights_dtype=",
                            "max_step_tokens=",
                            "drain_timeout=",
                            "max_receive_message_bytes=",
                            "adapter_root=",
                            "max_lora_rank=",
                            "adapter_pool_bytes=",
                            "adapter_page_bytes=",
                            "adapter_host_cache_bytes=",
                            "adapter_wait_timeout=",
                            "max_loras_per_step=",
                            "max_queued_requests="}) {
    EXPECT_THAT(s, HasSubstr(field));
  }
}

}  // namespace
}  // namespace ls

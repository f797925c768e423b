// main() for GPU tests: skips the whole binary (exit 77, which ctest reports as skipped) with
// the reason when no CUDA device is usable, so CI without a GPU stays green and says why.
#include <cstdio>

#include "gtest/gtest.h"
#include "kernels/devices.h"

int main(int argc, char** argv) {
  auto devices = ls::ListCudaDevices();
  if (!devices.ok()) {
    std::printf("SKIPPED: %s\n", std::string(devices.status().message()).c_str());
    return 77;
  }
  for (const auto& d : *devices) {
    std::printf("device %d: %s (sm_%d%d, %.1f GiB)\n", d.index, d.name.c_str(), d.compute_major,
                d.compute_minor, static_cast<double>(d.total_memory_bytes) / (1 << 30));
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}

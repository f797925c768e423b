// Pieces the CPU benchmarks share: the TinyLlama-1.1B-shaped random checkpoint, the read
// bandwidth probe they compare against, and machine facts for their reports.
#ifndef LORASERVE_BENCH_BENCH_UTIL_H_
#define LORASERVE_BENCH_BENCH_UTIL_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/cpu/isa.h"
#include "model/config.h"
#include "model/kv_cache.h"

namespace ls::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// config.json of a model with TinyLlama-1.1B's shapes (22 layers, hidden 2048, intermediate
// 5632, 32 heads / 4 KV heads, vocabulary 32000).
extern const char kTinyLlamaConfig[];

// Writes a random bf16 checkpoint with the config's tensor names into `dir` (in a child
// process, so that the generator's memory never counts toward the benchmark's peak RSS).
void WriteCheckpoint(const ModelConfig& c, const std::string& dir);

// Best read bandwidth (bytes/s) over a buffer of `bytes` with `threads` threads and the ISA's
// widest loads: best of 5 for each of two access patterns (see bench_util.cc).
double MeasureReadBandwidth(int threads, Isa isa, size_t bytes);

// The last-level cache size from sysfs, 0 when unknown.
uint64_t LastLevelCacheBytes();
// At least 1 GiB and 4x the last-level cache, so no part of it is served from cache.
size_t BandwidthBufferBytes();

// Fills every block of the cache with random K/V (a fixed seed): they stand in for prefilled
// context, since attention costs the same whatever the values.
void FillKvRandom(const KvCache& cache);

std::string CpuModel();
// The ISA-relevant CPU flags from /proc/cpuinfo, space-separated.
std::string CpuFlags();
int64_t PeakRssBytes();

}  // namespace ls::bench

#endif  // LORASERVE_BENCH_BENCH_UTIL_H_

// The instruction-set paths of the CPU backend and run-time detection of what this CPU offers.
// The build targets baseline x86-64; the AVX2 and AVX-512 kernels live in their own files,
// compiled with their own flags, and are only entered after IsaSupported() says the CPU (and the
// OS, which must save the wider registers) can run them.
#ifndef LORASERVE_KERNELS_CPU_ISA_H_
#define LORASERVE_KERNELS_CPU_ISA_H_

#include <cstdint>

#include "absl/strings/string_view.h"

namespace ls {

enum class Isa : uint8_t {
  kAuto,    // the best path this CPU supports (DetectIsa())
  kScalar,  // portable C++, std::fma; always available
  kAvx2,    // needs avx2 + fma + f16c
  kAvx512,  // needs avx512f + avx512bw + avx512vl + avx512dq (and the AVX2 set)
};

// "auto", "scalar", "avx2", "avx512".
absl::string_view IsaName(Isa isa);

// Whether this CPU can run `isa`'s kernels and this binary has them (the x86 paths are only
// compiled for x86-64). kAuto and kScalar are always supported. Thread-safe.
bool IsaSupported(Isa isa);

// The best supported path: kAvx512, else kAvx2, else kScalar (never kAuto). Thread-safe.
Isa DetectIsa();

}  // namespace ls

#endif  // LORASERVE_KERNELS_CPU_ISA_H_

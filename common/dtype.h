// Element types and the float conversions every backend shares. The names match the safetensors
// dtype tokens ("F32", "BF16", ...), which is also how they appear in messages and the API.
#ifndef LORASERVE_COMMON_DTYPE_H_
#define LORASERVE_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include "absl/strings/string_view.h"

namespace ls {

// Every dtype the safetensors format defines, so that the reader can name any tensor it meets;
// which of them a given op accepts is that op's business.
enum class DType : uint8_t {
  kBool,
  kU8,
  kI8,
  kU16,
  kI16,
  kF16,
  kBF16,
  kU32,
  kI32,
  kF32,
  kU64,
  kI64,
  kF64,
  kC64,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kF8E4M3Fnuz,
  kF8E5M2Fnuz,
  kF6E2M3,
  kF6E3M2,
  kF4,
};

// Bits per element (4 and 6 for the sub-byte float formats).
int DTypeBits(DType dtype);
// The safetensors token, e.g. "BF16".
absl::string_view DTypeName(DType dtype);
// Parses a safetensors token; nullopt for anything unknown (tokens are case-sensitive).
std::optional<DType> DTypeFromName(absl::string_view name);

// bfloat16: the top 16 bits of an IEEE float32. Rounding is to nearest, ties to even; NaN stays
// NaN (quiet) and keeps its sign.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// IEEE binary16, round to nearest even, with subnormals, infinities and NaN.
uint16_t FloatToFp16(float f);
float Fp16ToFloat(uint16_t h);

// Bulk conversions into float32; `n` elements, no aliasing.
void Bf16ToFloat(const uint16_t* src, float* dst, size_t n);
void Fp16ToFloat(const uint16_t* src, float* dst, size_t n);
void FloatToBf16(const float* src, uint16_t* dst, size_t n);
void FloatToFp16(const float* src, uint16_t* dst, size_t n);

}  // namespace ls

#endif  // LORASERVE_COMMON_DTYPE_H_

// Tests for common/dtype.h: dtype tokens and sizes, and the bf16/fp16 conversions, checked
// against independent reference roundings computed in double precision.
#include "common/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ls {
namespace {

uint32_t FloatBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

float BitsFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The value of a non-negative, finite fp16 pattern, from the IEEE definition; 0x7c00 (the first
// pattern past the largest finite) is treated as 2^16, the next power of two, which is what
// rounding compares against before it overflows to infinity.
double Fp16Value(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0) return std::ldexp(static_cast<double>(mant), -24);
  return std::ldexp(static_cast<double>(1024 + mant), exp - 25);
}

// Round-to-nearest-even float -> fp16 by search over the fp16 values.
uint16_t ReferenceFp16(float f) {
  const uint16_t sign = (FloatBits(f) >> 31) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  const double a = std::fabs(static_cast<double>(f));
  // Largest pattern in [0, 0x7c00] whose value is <= a.
  uint16_t lo = 0, hi = 0x7c00;
  if (a >= Fp16Value(0x7c00)) return sign | 0x7c00;
  while (hi - lo > 1) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    if (Fp16Value(mid) <= a) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const double below = a - Fp16Value(lo);
  const double above = Fp16Value(hi) - a;
  uint16_t r;
  if (below < above) {
    r = lo;
  } else if (above < below) {
    r = hi;
  } else {
    r = (lo & 1) ? hi : lo;
  }
  return sign | r;
}

// Round-to-nearest-even float -> bf16: the two candidates are the truncation and the next
// pattern (0x7f80, infinity, standing for 2^128).
uint16_t ReferenceBf16(float f) {
  const uint32_t bits = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  if (std::isnan(f)) return sign | 0x7fc0;
  if (std::isinf(f)) return sign | 0x7f80;
  const double a = std::fabs(static_cast<double>(f));
  const uint16_t lo = static_cast<uint16_t>((bits & 0x7fffffffu) >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double lo_value = static_cast<double>(BitsFloat(static_cast<uint32_t>(lo) << 16));
  const double hi_value =
      hi == 0x7f80 ? std::ldexp(1.0, 128) : static_cast<double>(BitsFloat(uint32_t{hi} << 16));
  const double below = a - lo_value;
  const double above = hi_value - a;
  uint16_t r;
  if (below < above) {
    r = lo;
  } else if (above < below) {
    r = hi;
  } else {
    r = (lo & 1) ? hi : lo;
  }
  return sign | r;
}

bool IsFp16Nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }

// ---- Tokens and sizes ----------------------------------------------------------------------

TEST(DTypeTest, NamesRoundTripAndBits) {
  int count = 0;
  for (int i = 0; i <= static_cast<int>(DType::kF4); ++i, ++count) {
    const DType d = static_cast<DType>(i);
    const std::optional<DType> parsed = DTypeFromName(DTypeName(d));
    ASSERT_TRUE(parsed.has_value()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(count, 22);  // every safetensors dtype
  EXPECT_EQ(DTypeBits(DType::kF4), 4);
  EXPECT_EQ(DTypeBits(DType::kF6E2M3), 6);
  EXPECT_EQ(DTypeBits(DType::kBool), 8);
  EXPECT_EQ(DTypeBits(DType::kBF16), 16);
  EXPECT_EQ(DTypeBits(DType::kC64), 64);
  EXPECT_EQ(DTypeName(DType::kF8E4M3Fnuz), "F8_E4M3FNUZ");
  EXPECT_FALSE(DTypeFromName("f32").has_value());
  EXPECT_FALSE(DTypeFromName("").has_value());
  EXPECT_FALSE(DTypeFromName("F32 ").has_value());
}

// ---- bf16 ----------------------------------------------------------------------------------

TEST(Bf16Test, RoundToNearestEven) {
  // 1 + 2^-8 lies halfway between 1 (even) and 1 + 2^-7: goes down.
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f808000u)), 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 0x3f81 (odd) and 0x3f82: goes up.
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f818000u)), 0x3f82);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(FloatToBf16(-1.0f), 0xbf80);
  EXPECT_EQ(FloatToBf16(3.0f), 0x4040);
  // The largest float rounds up to infinity.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
}

TEST(Bf16Test, SubnormalsInfNan) {
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00000001u)), 0x0000);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00008000u)), 0x0000);  // tie, to even
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00018000u)), 0x0002);  // tie, to even
  EXPECT_EQ(FloatToBf16(BitsFloat(0x00010000u)), 0x0001);
  EXPECT_EQ(FloatBits(Bf16ToFloat(0x0001)), 0x00010000u);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x80000000u)), 0x8000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_TRUE(std::isinf(Bf16ToFloat(0x7f80)));
  // A signalling NaN whose payload sits in the low bits must not truncate to infinity.
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(BitsFloat(0x7f800001u))));
  const uint16_t neg_nan = FloatToBf16(BitsFloat(0xffc00001u));
  EXPECT_TRUE(IsBf16Nan(neg_nan));
  EXPECT_EQ(neg_nan & 0x8000, 0x8000);
}

TEST(Bf16Test, EveryPatternRoundTripsThroughFloat) {
  for (uint32_t i = 0; i <= 0xffff; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = Bf16ToFloat(h);
    EXPECT_EQ(FloatBits(f), uint32_t{h} << 16);
    const uint16_t back = FloatToBf16(f);
    if (IsBf16Nan(h)) {
      ASSERT_TRUE(IsBf16Nan(back)) << std::hex << h;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << std::hex << h;
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(Bf16Test, MatchesReferenceRounding) {
  // Every tie, and its neighbours, for every finite bf16 pattern; then a sweep of all floats.
  for (uint32_t h = 0; h < 0x7f80; ++h) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const uint32_t mid = sign | (h << 16) | 0x8000u;
      for (uint32_t bits : {mid - 1, mid, mid + 1}) {
        const float f = BitsFloat(bits);
        ASSERT_EQ(FloatToBf16(f), ReferenceBf16(f)) << std::hex << bits;
      }
    }
  }
  for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 997) {
    const float f = BitsFloat(static_cast<uint32_t>(bits));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f), ReferenceBf16(f)) << std::hex << bits;
  }
}

// ---- fp16 ----------------------------------------------------------------------------------

TEST(Fp16Test, KnownValues) {
  EXPECT_EQ(FloatToFp16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToFp16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToFp16(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16(0.0f), 0x0000);
  EXPECT_EQ(FloatToFp16(-0.0f), 0x8000);
  EXPECT_EQ(Fp16ToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(Fp16ToFloat(0x7bff), 65504.0f);
}

TEST(Fp16Test, RoundToNearestEven) {
  // 1 + 2^-11 lies halfway between 1 (even) and 1 + 2^-10: goes down.
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3 * 2^-11 lies halfway between 0x3c01 (odd) and 0x3c02: goes up.
  EXPECT_EQ(FloatToFp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(FloatToFp16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3c01);
  // 65520 is halfway between 65504 (odd mantissa) and 65536: rounds to infinity.
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToFp16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(FloatToFp16(1e10f), 0x7c00);
  EXPECT_EQ(FloatToFp16(-1e10f), 0xfc00);
}

TEST(Fp16Test, Subnormals) {
  const float min_sub = std::ldexp(1.0f, -24);
  EXPECT_EQ(FloatToFp16(min_sub), 0x0001);
  EXPECT_EQ(Fp16ToFloat(0x0001), min_sub);
  EXPECT_EQ(FloatToFp16(min_sub / 2), 0x0000);      // tie, to even (0)
  EXPECT_EQ(FloatToFp16(min_sub * 0.75f), 0x0001);  // above the tie
  EXPECT_EQ(FloatToFp16(min_sub * 1.5f), 0x0002);   // tie between 1 and 2, to even
  EXPECT_EQ(FloatToFp16(min_sub * 2.5f), 0x0002);   // tie between 2 and 3, to even
  EXPECT_EQ(FloatToFp16(-min_sub), 0x8001);
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(Fp16ToFloat(0x03ff), 1023 * min_sub);  // largest subnormal
  EXPECT_EQ(Fp16ToFloat(0x0400), std::ldexp(1.0f, -14));
  // Halfway between the largest subnormal (odd) and the smallest normal: rounds to the normal.
  EXPECT_EQ(FloatToFp16(1023.5f * min_sub), 0x0400);
  // Float subnormals flush to zero in fp16.
  EXPECT_EQ(FloatToFp16(BitsFloat(0x00000001u)), 0x0000);
}

TEST(Fp16Test, InfAndNan) {
  EXPECT_EQ(FloatToFp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToFp16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_TRUE(std::isinf(Fp16ToFloat(0x7c00)));
  EXPECT_TRUE(std::isinf(Fp16ToFloat(0xfc00)));
  EXPECT_LT(Fp16ToFloat(0xfc00), 0.0f);
  EXPECT_TRUE(IsFp16Nan(FloatToFp16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload is below fp16's mantissa must stay NaN, not become infinity.
  EXPECT_TRUE(IsFp16Nan(FloatToFp16(BitsFloat(0x7f800001u))));
  const uint16_t neg = FloatToFp16(BitsFloat(0xffc00000u));
  EXPECT_TRUE(IsFp16Nan(neg));
  EXPECT_EQ(neg & 0x8000, 0x8000);
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0xfc01)));
}

TEST(Fp16Test, EveryPatternRoundTripsThroughFloat) {
  for (uint32_t i = 0; i <= 0xffff; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = Fp16ToFloat(h);
    const uint16_t back = FloatToFp16(f);
    if (IsFp16Nan(h)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_TRUE(IsFp16Nan(back)) << std::hex << h;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << std::hex << h;
      continue;
    }
    ASSERT_EQ(back, h) << std::hex << h;
    // And the float is the IEEE value of the pattern.
    const double magnitude =
        (h & 0x7fff) == 0x7c00 ? std::numeric_limits<double>::infinity() : Fp16Value(h & 0x7fff);
    ASSERT_EQ(static_cast<double>(f), (h & 0x8000) ? -magnitude : magnitude) << std::hex << h;
  }
}

TEST(Fp16Test, MatchesReferenceRounding) {
  // Every tie between neighbouring finite fp16 values (exact in float), and its neighbours.
  for (uint16_t h = 0; h < 0x7c00; ++h) {
    const float mid =
        static_cast<float>((Fp16Value(h) + Fp16Value(static_cast<uint16_t>(h + 1))) / 2);
    for (float f : {std::nextafter(mid, 0.0f), mid, std::nextafter(mid, 1e30f)}) {
      ASSERT_EQ(FloatToFp16(f), ReferenceFp16(f)) << f;
      ASSERT_EQ(FloatToFp16(-f), ReferenceFp16(-f)) << f;
    }
  }
  for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 997) {
    const float f = BitsFloat(static_cast<uint32_t>(bits));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToFp16(f), ReferenceFp16(f)) << std::hex << bits;
  }
}

TEST(DTypeTest, BulkConversionsMatchScalar) {
  std::vector<uint16_t> halves;
  for (uint32_t i = 0; i <= 0xffff; i += 7) halves.push_back(static_cast<uint16_t>(i));
  const size_t n = halves.size();
  std::vector<float> from_fp16(n), from_bf16(n);
  Fp16ToFloat(halves.data(), from_fp16.data(), n);
  Bf16ToFloat(halves.data(), from_bf16.data(), n);
  std::vector<uint16_t> to_fp16(n), to_bf16(n);
  FloatToFp16(from_bf16.data(), to_fp16.data(), n);
  FloatToBf16(from_fp16.data(), to_bf16.data(), n);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(FloatBits(from_fp16[i]), FloatBits(Fp16ToFloat(halves[i])));
    ASSERT_EQ(FloatBits(from_bf16[i]), FloatBits(Bf16ToFloat(halves[i])));
    ASSERT_EQ(to_fp16[i], FloatToFp16(from_bf16[i]));
    ASSERT_EQ(to_bf16[i], FloatToBf16(from_fp16[i]));
  }
}

}  // namespace
}  // namespace ls

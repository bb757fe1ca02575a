// 2^y for y <= 0 (or NaN) and e^d for d <= 0, without branches so that loops over them vectorise.
// On the device: the hardware exp2 approximation (ex2.approx.ftz) and __expf. On the host: y = n + f with n an
// integer and f in [-1/2, 1/2], 2^f by a degree-5 polynomial (relative error 1e-7 before rounding, about 3 ulp in
// all), 2^n put straight into the exponent bits; below y = -126.5 the result is exactly 0, as the device's
// flush-to-zero gives. e^d goes through 2^(d log2 e) with log2 e carried to ~2^-48 (same accuracy).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "config.h"

namespace softmask {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLog2eLow = 1.92596299e-8f;  // log2(e) - kLog2e
constexpr float kLn2 = 0.693147180559945309f;

SOFTMASK_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

SOFTMASK_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

#if !defined(__CUDA_ARCH__)
// 2^(y_high + y_low) for y_high <= 0 and |y_low| <= 2^-20 |y_high| (a correction term, 0 when y is exact).
SOFTMASK_HD float exp2_split(float y_high, float y_low) {
  constexpr float kRoundMagic = 12582912.0f;     // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  y_high = y_high < -127.0f ? -127.0f : y_high;  // -inf too; NaN stays NaN (comparisons are false)
  const float shifted = y_high + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const int32_t ni = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(kRoundMagic));
  const float f = (y_high - n) + y_low;  // y_high - n is exact
  float p = 1.32647227e-3f;
  p = p * f + 9.67151299e-3f;
  p = p * f + 5.55073358e-2f;
  p = p * f + 2.40222424e-1f;
  p = p * f + 6.93147004e-1f;
  p = p * f + 1.0f;
  // 2^n as a float: n in [-127, 0]; n = -127 (y below -126.5) gives the bit pattern of 0.
  const int32_t biased = ni + 127 > 0 ? ni + 127 : 0;
  return p * bits_to_float(static_cast<uint32_t>(biased) << 23);
}
#endif

SOFTMASK_HD float exp2_nonpositive(float y) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#else
  return exp2_split(y, 0.0f);
#endif
}

SOFTMASK_HD float exp_nonpositive(float d) {
#if defined(__CUDA_ARCH__)
  return __expf(d);
#else
  const float y = d * kLog2e;
  return exp2_split(y, std::fma(d, kLog2eLow, std::fma(d, kLog2e, -y)));
#endif
}

}  // namespace softmask

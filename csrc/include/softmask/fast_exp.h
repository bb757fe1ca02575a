// exp(d) for d in [kMinExponent, 0] (or NaN), without branches so that loops over it vectorise.
// On the device it is the hardware exp2 approximation; on the host a degree-6 polynomial on
// [-ln2/2, ln2/2] after the usual range reduction d = n ln2 + r (about 2 ulp on this domain).
#pragma once

#include <cstdint>
#include <cstring>

#include "config.h"

namespace softmask {

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

SOFTMASK_HD float exp_nonpositive(float d) {
#if defined(__CUDA_ARCH__)
  return __expf(d);
#else
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  const float shifted = d * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const int32_t ni = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(kRoundMagic));
  const float r = (d - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n lies in [-126, 0] on the clamped domain, so 2^n is a normal float; NaN in d stays NaN through p.
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return p * scale;
#endif
}

}  // namespace softmask

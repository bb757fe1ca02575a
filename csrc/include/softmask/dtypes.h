// Storage types of the 16-bit floats the kernels accept, as plain bit containers (torch-free). The binding
// layer reinterprets at::BFloat16 / at::Half buffers as these; CUDA code reinterprets them as __nv_bfloat16 / __half.
// Host conversions are branch-free bit manipulations so loops over them vectorise; the device uses its
// conversion instructions.
#pragma once

#include <cstdint>

#include "config.h"
#include "fast_exp.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace softmask {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};
static_assert(sizeof(bf16_t) == 2 && sizeof(f16_t) == 2, "16-bit storage types must be 2 bytes");

SOFTMASK_HD float to_float(float x) { return x; }
SOFTMASK_HD float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

SOFTMASK_HD float to_float(f16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7fffu;
  // Shift exponent and mantissa into place and rebias by multiplying with 2^112; this also normalises subnormals.
  const float scaled = bits_to_float(magnitude << 13) * 0x1p112f;
  // Exponent 31 (inf/NaN) must become exponent 255, keeping the mantissa (NaN payload).
  const uint32_t special = magnitude >= 0x7c00u ? 0x7f800000u : 0u;
  return bits_to_float(float_to_bits(scaled) | special | sign);
#endif
}

template <typename T>
SOFTMASK_HD T from_float(float x);

template <>
SOFTMASK_HD float from_float<float>(float x) {
  return x;
}

template <>
SOFTMASK_HD bf16_t from_float<bf16_t>(float x) {
#if defined(__CUDA_ARCH__)
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};
#endif
}

template <>
SOFTMASK_HD f16_t from_float<f16_t>(float x) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(x))};
#else
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // |x| >= 65536 (or inf/NaN): inf, or a quiet NaN.
  const uint32_t overflow = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |x| < 2^-14: adding 0.5 lines the half subnormal up with the float mantissa and rounds it (to nearest even).
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even; a carry may reach inf.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x47800000u ? overflow : (a < 0x38800000u ? subnormal : normal);
  return f16_t{static_cast<uint16_t>(h | sign)};
#endif
}

}  // namespace softmask

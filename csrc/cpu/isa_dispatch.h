// Runtime choice of the instruction set for the hot loops: the library is compiled for the portable x86-64
// baseline, and each hot function is also compiled for AVX2 and AVX-512 via target attributes; the best one the
// running CPU supports is chosen once. Other architectures use the baseline build only.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define SOFTMASK_X86_DISPATCH 1
#define SOFTMASK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#define SOFTMASK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512")))
#else
#define SOFTMASK_X86_DISPATCH 0
#endif

namespace softmask::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa detected_isa() {
#if SOFTMASK_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace softmask::cpu

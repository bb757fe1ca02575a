// Portability macros shared by the CPU and CUDA halves of the kernel core.
#pragma once

#if defined(__CUDACC__)
#define SOFTMASK_HD __host__ __device__ __forceinline__
#else
#define SOFTMASK_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__)
#define SOFTMASK_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define SOFTMASK_UNROLL _Pragma("clang loop unroll(full)")
#else
#define SOFTMASK_UNROLL _Pragma("GCC unroll 32")
#endif

// Small device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>
#include <cstring>

#include "softmask/dtypes.h"

namespace softmask::cuda {

// A device-side assert that stays on in release builds: bad indices must stop the kernel, not read out of bounds.
#define SOFTMASK_DEVICE_CHECK(cond, message)                           \
  do {                                                                 \
    if (!(cond)) __assert_fail(message, __FILE__, __LINE__, __func__); \
  } while (0)

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;

// Values of T in one 16-byte load.
template <typename T>
constexpr int kVectorWidth = kVectorBytes / static_cast<int>(sizeof(T));

// The kVectorWidth<T> values of a 16-byte word, converted to fp32.
template <typename T>
__device__ __forceinline__ void unpack_vector(const uint4& raw, float (&out)[kVectorWidth<T>]) {
  T values[kVectorWidth<T>];
  memcpy(values, &raw, sizeof raw);
#pragma unroll
  for (int j = 0; j < kVectorWidth<T>; ++j) out[j] = to_float(values[j]);
}

// One 16-byte load (p must be 16-byte aligned), converted to fp32.
template <typename T>
__device__ __forceinline__ void load_vector(const T* p, float (&out)[kVectorWidth<T>]) {
  unpack_vector<T>(__ldg(reinterpret_cast<const uint4*>(p)), out);
}

template <typename T>
__device__ __forceinline__ void store_vector(T* p, const float (&in)[kVectorWidth<T>]) {
  T values[kVectorWidth<T>];
#pragma unroll
  for (int j = 0; j < kVectorWidth<T>; ++j) values[j] = from_float<T>(in[j]);
  uint4 raw;
  memcpy(&raw, values, sizeof raw);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Workspace carving: each array starts on a 256-byte boundary.
constexpr size_t kWorkspaceAlignment = 256;
inline size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline unsigned int blocks_for(int64_t work, int per_block) {
  return static_cast<unsigned int>((work + per_block - 1) / per_block);
}

}  // namespace softmask::cuda

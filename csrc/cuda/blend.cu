// CUDA embedding blend. Forward: one block per output row, each thread gathers 16-byte vectors of the m table
// rows and accumulates them in fp32. Backward: grad_coeffs by one warp per (row, j); grad_weight either by fp32
// atomics (fp32 tables, non-deterministic mode) or by a stable radix sort of the ids followed by one block per run
// of equal ids that sums its grad_out rows in fp32 in position order (deterministic, any dtype).
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <type_traits>

#include "device_utils.cuh"
#include "softmask/cuda.h"

namespace softmask::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRowsInFlight = 8;  // table rows whose loads a thread issues before it accumulates them

// VEC values of T: one 16-byte word (VEC = kVectorWidth<T>), or one value (VEC = 1, the scalar path for shapes or
// pointers that are not 16-byte aligned).
template <typename T, int VEC>
struct Chunk {
  static_assert(VEC == 1 || VEC == kVectorWidth<T>, "a chunk is one value or one 16-byte word");
  std::conditional_t<VEC == 1, T, uint4> raw;

  __device__ __forceinline__ void load(const T* src) {
    if constexpr (VEC == 1) {
      raw = src[0];
    } else {
      raw = __ldg(reinterpret_cast<const uint4*>(src));
    }
  }

  __device__ __forceinline__ void accumulate(float c, float (&acc)[VEC]) const {
    float x[VEC];
    if constexpr (VEC == 1) {
      x[0] = to_float(raw);
    } else {
      unpack_vector<T>(raw, x);
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] += c * x[v];
  }
};

template <typename T, int VEC>
__device__ __forceinline__ void store(T* dst, const float (&acc)[VEC]) {
  if constexpr (VEC == 1) {
    dst[0] = from_float<T>(acc[0]);
  } else {
    store_vector(dst, acc);
  }
}

// out[row, :] for row = blockIdx.x. Each thread owns VEC columns at a time and takes the m table rows in groups of
// kRowsInFlight: the raw loads of a group are all issued before any is used, so a thread keeps up to
// kRowsInFlight 16-byte loads in flight. Accumulation is in fp32, in the order j = 0..m-1.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    blend_forward_kernel(const T* __restrict__ weight, int64_t vocab, int64_t dim, const int64_t* __restrict__ ids,
                         const float* __restrict__ coeffs, int64_t m, T* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int64_t* row_ids = ids + row * m;
  const float* row_coeffs = coeffs + row * m;
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < dim; d += static_cast<int64_t>(kThreads) * VEC) {
    float acc[VEC] = {};
    for (int64_t j0 = 0; j0 < m; j0 += kRowsInFlight) {
      Chunk<T, VEC> chunk[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        if (j0 + u < m) {
          const int64_t id = row_ids[j0 + u];
          SOFTMASK_DEVICE_CHECK(id >= 0 && id < vocab, "blend_embeddings: ids must lie in [0, V)");
          chunk[u].load(weight + id * dim + d);
        }
      }
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        if (j0 + u < m) chunk[u].accumulate(row_coeffs[j0 + u], acc);
      }
    }
    store<T, VEC>(out + row * dim + d, acc);
  }
}

// grad_coeffs[item] = <grad_out[item / m], weight[ids[item]]>, one warp per item.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_coeffs_kernel(const T* __restrict__ grad_out, const T* __restrict__ weight, int64_t vocab, int64_t dim,
                       const int64_t* __restrict__ ids, int64_t items, int64_t m, float* __restrict__ grad_coeffs) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (item >= items) return;
  const int64_t id = ids[item];
  SOFTMASK_DEVICE_CHECK(id >= 0 && id < vocab, "blend_embeddings_backward: ids must lie in [0, V)");
  const T* g = grad_out + (item / m) * dim;
  const T* w = weight + id * dim;
  float sum = 0.0f;
  for (int64_t d = lane; d < dim; d += kWarpSize) sum += to_float(g[d]) * to_float(w[d]);
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
  if (lane == 0) grad_coeffs[item] = sum;
}

// grad_weight[ids[item], :] += coeffs[item] * grad_out[item / m, :] with fp32 atomics, one block per item.
__global__ void __launch_bounds__(kThreads)
    grad_weight_atomic_kernel(const float* __restrict__ grad_out, int64_t dim, const int64_t* __restrict__ ids,
                              const float* __restrict__ coeffs, int64_t m, float* __restrict__ grad_weight) {
  const int64_t item = blockIdx.x;
  const float c = coeffs[item];
  const float* g = grad_out + (item / m) * dim;
  float* dst = grad_weight + ids[item] * dim;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) atomicAdd(dst + d, c * g[d]);
}

__global__ void iota_kernel(int32_t* __restrict__ out, int64_t items) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < items) out[i] = static_cast<int32_t>(i);
}

// After a stable sort of (id, position): the block of sorted item i owns table row sorted_ids[i] if i starts a run
// of equal ids, and writes that row's whole gradient, summed in fp32 in position order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_weight_sorted_kernel(const T* __restrict__ grad_out, int64_t dim, const int64_t* __restrict__ sorted_ids,
                              const int32_t* __restrict__ sorted_items, const float* __restrict__ coeffs, int64_t items,
                              int64_t m, T* __restrict__ grad_weight) {
  const int64_t start = blockIdx.x;
  const int64_t id = sorted_ids[start];
  if (start > 0 && sorted_ids[start - 1] == id) return;
  int64_t end = start + 1;
  while (end < items && sorted_ids[end] == id) ++end;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    float acc = 0.0f;
    for (int64_t i = start; i < end; ++i) {
      const int64_t item = sorted_items[i];
      acc += coeffs[item] * to_float(grad_out[(item / m) * dim + d]);
    }
    grad_weight[id * dim + d] = from_float<T>(acc);
  }
}

// Bits the radix sort must look at for ids in [0, vocab).
int id_bits(int64_t vocab) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < vocab) ++bits;
  return bits;
}

size_t sort_temp_bytes(int64_t items) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<int>(items));
  return bytes;
}

}  // namespace

template <typename T>
cudaError_t blend_forward(const T* weight, int64_t vocab, int64_t dim, const int64_t* ids, const float* coeffs,
                          int64_t n, int64_t m, T* out, cudaStream_t stream) {
  if (n == 0 || dim == 0) return cudaSuccess;
  constexpr int W = kVectorWidth<T>;
  const bool vectorised = dim % W == 0 && is_aligned(weight, kVectorBytes) && is_aligned(out, kVectorBytes);
  if (vectorised) {
    blend_forward_kernel<T, W>
        <<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(weight, vocab, dim, ids, coeffs, m, out);
  } else {
    blend_forward_kernel<T, 1>
        <<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(weight, vocab, dim, ids, coeffs, m, out);
  }
  return cudaGetLastError();
}

size_t blend_backward_workspace_bytes(int64_t items) {
  const size_t n = static_cast<size_t>(items);
  return align_up(n * sizeof(int64_t)) + 2 * align_up(n * sizeof(int32_t)) + align_up(sort_temp_bytes(items));
}

template <typename T>
cudaError_t blend_backward(const T* grad_out, const T* weight, int64_t vocab, int64_t dim, const int64_t* ids,
                           const float* coeffs, int64_t n, int64_t m, bool deterministic, void* workspace,
                           size_t workspace_bytes, T* grad_weight, float* grad_coeffs, cudaStream_t stream) {
  const int64_t items = n * m;
  if (items == 0 || dim == 0) return cudaSuccess;
  constexpr int kWarpsPerBlock = kThreads / kWarpSize;
  grad_coeffs_kernel<T><<<blocks_for(items, kWarpsPerBlock), kThreads, 0, stream>>>(grad_out, weight, vocab, dim, ids,
                                                                                    items, m, grad_coeffs);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (grad_weight == nullptr) return cudaSuccess;

  if constexpr (std::is_same_v<T, float>) {
    if (!deterministic) {
      grad_weight_atomic_kernel<<<static_cast<unsigned int>(items), kThreads, 0, stream>>>(grad_out, dim, ids, coeffs,
                                                                                           m, grad_weight);
      return cudaGetLastError();
    }
  }

  if (workspace_bytes < blend_backward_workspace_bytes(items)) return cudaErrorInvalidValue;
  char* cursor = static_cast<char*>(workspace);
  auto* sorted_ids = reinterpret_cast<int64_t*>(cursor);
  cursor += align_up(static_cast<size_t>(items) * sizeof(int64_t));
  auto* positions = reinterpret_cast<int32_t*>(cursor);
  cursor += align_up(static_cast<size_t>(items) * sizeof(int32_t));
  auto* sorted_positions = reinterpret_cast<int32_t*>(cursor);
  cursor += align_up(static_cast<size_t>(items) * sizeof(int32_t));
  size_t temp_bytes = sort_temp_bytes(items);

  iota_kernel<<<blocks_for(items, 256), 256, 0, stream>>>(positions, items);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  // LSD radix sort is stable: equal ids keep their position order, which fixes the summation order.
  if (cudaError_t err =
          cub::DeviceRadixSort::SortPairs(cursor, temp_bytes, ids, sorted_ids, positions, sorted_positions,
                                          static_cast<int>(items), 0, id_bits(vocab), stream);
      err != cudaSuccess) {
    return err;
  }
  grad_weight_sorted_kernel<T><<<static_cast<unsigned int>(items), kThreads, 0, stream>>>(
      grad_out, dim, sorted_ids, sorted_positions, coeffs, items, m, grad_weight);
  return cudaGetLastError();
}

#define SOFTMASK_INSTANTIATE(T)                                                                                       \
  template cudaError_t blend_forward<T>(const T*, int64_t, int64_t, const int64_t*, const float*, int64_t, int64_t,   \
                                        T*, cudaStream_t);                                                            \
  template cudaError_t blend_backward<T>(const T*, const T*, int64_t, int64_t, const int64_t*, const float*, int64_t, \
                                         int64_t, bool, void*, size_t, T*, float*, cudaStream_t);
SOFTMASK_INSTANTIATE(float)
SOFTMASK_INSTANTIATE(bf16_t)
SOFTMASK_INSTANTIATE(f16_t)
#undef SOFTMASK_INSTANTIATE

}  // namespace softmask::cuda

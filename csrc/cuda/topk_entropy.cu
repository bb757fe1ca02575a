// CUDA top-k + negative entropy: one thread block per row. Each thread streams its share of the row with 16-byte
// loads, keeping a top-K list in registers (K a compile-time bucket >= k) and an online entropy state. The states
// are merged with warp shuffles and shared memory using the same EntropyState::merge as the CPU; the lists are
// merged by k rounds of "pick the best head" (first within each warp, then across the warps' lists).
#include <cuda_runtime.h>

#include <cfloat>

#include "device_utils.cuh"
#include "softmask/cuda.h"
#include "softmask/online_entropy.h"
#include "softmask/topk.h"

namespace softmask::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

struct Candidate {
  float value;
  int32_t index;
};

__device__ __forceinline__ Candidate shfl_xor(Candidate c, int mask) {
  return {__shfl_xor_sync(0xffffffffu, c.value, mask), __shfl_xor_sync(0xffffffffu, c.index, mask)};
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    const Candidate other = shfl_xor(c, mask);
    if (ranks_before(other.value, other.index, c.value, c.index)) c = other;
  }
  return c;
}

__device__ __forceinline__ EntropyState warp_merge(EntropyState state) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    EntropyState other;
    other.m = __shfl_xor_sync(0xffffffffu, state.m, mask);
    other.s = __shfl_xor_sync(0xffffffffu, state.s, mask);
    other.t = __shfl_xor_sync(0xffffffffu, state.t, mask);
    state.merge(other);
  }
  return state;
}

template <int K>
struct ThreadState {
  TopK<K> top;
  EntropyState entropy;

  // One value at index i; indices reach a thread in increasing order.
  __device__ __forceinline__ void consume(float x, int32_t i, float inv_temperature) {
    const float y = x * inv_temperature;
    if (y > entropy.m) entropy.rescale_to(y);
    entropy.add(y);
    top.push(x, i);
  }

  // W consecutive values starting at index i0: one rescale and one top-k test for the whole vector.
  template <int W>
  __device__ __forceinline__ void consume_vector(const float (&x)[W], int32_t i0, float inv_temperature) {
    float vmax = x[0];
#pragma unroll
    for (int j = 1; j < W; ++j) vmax = x[j] > vmax ? x[j] : vmax;
    const float scaled_max = vmax * inv_temperature;
    if (scaled_max > entropy.m) entropy.rescale_to(scaled_max);
#pragma unroll
    for (int j = 0; j < W; ++j) entropy.add(x[j] * inv_temperature);
    // A tie with the threshold cannot enter: every value here has a higher index than the list's entries.
    if (vmax > top.threshold() || !top.full()) {
#pragma unroll
      for (int j = 0; j < W; ++j) top.push(x[j], i0 + j);
    }
  }
};

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) topk_entropy_kernel(const T* __restrict__ logits, int64_t row_stride,
                                                                 int64_t vocab, int64_t rows_total,
                                                                 const int64_t* __restrict__ rows, int k,
                                                                 float inv_temperature, int64_t* __restrict__ ids,
                                                                 float* __restrict__ probs,
                                                                 float* __restrict__ neg_entropy) {
  constexpr int W = kVectorWidth<T>;
  __shared__ float list_value[kWarps][K];
  __shared__ int32_t list_index[kWarps][K];
  __shared__ float final_value[K];
  __shared__ EntropyState warp_state[kWarps];

  const int64_t r = blockIdx.x;
  int64_t source = r;
  if (rows != nullptr) {
    source = rows[r];
    SOFTMASK_DEVICE_CHECK(source >= 0 && source < rows_total, "topk_entropy: rows must lie in [0, rows_total)");
  }
  const T* row = logits + source * row_stride;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  ThreadState<K> state;
  state.top.clear();
  state.entropy = EntropyState::empty();

  // Scalar head up to the first 16-byte boundary, vector body, scalar tail.
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % kVectorBytes) / sizeof(T);
  const int64_t head = misalignment == 0 ? 0 : (vocab < W - misalignment ? vocab : W - misalignment);
  const int64_t vectors = (vocab - head) / W;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) state.consume(to_float(row[i]), i, inv_temperature);
  const T* body = row + head;
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
    float x[W];
    load_vector(body + v * W, x);
    state.consume_vector(x, static_cast<int32_t>(head + v * W), inv_temperature);
  }
  for (int64_t i = head + vectors * W + threadIdx.x; i < vocab; i += kThreads) {
    state.consume(to_float(row[i]), static_cast<int32_t>(i), inv_temperature);
  }

  // Entropy state: warps, then the first warp over the warps' states.
  const EntropyState warp_total = warp_merge(state.entropy);
  if (lane == 0) warp_state[warp] = warp_total;

  // Top-k, stage 1: each warp picks its k best by k rounds of "best head"; the owner of the winner pops it.
  for (int round = 0; round < k; ++round) {
    const Candidate best = warp_best({state.top.value[0], state.top.index[0]});
    if (state.top.index[0] == best.index && state.top.value[0] == best.value) state.top.pop_front();
    if (lane == 0) {
      list_value[warp][round] = best.value;
      list_index[warp][round] = best.index;
    }
  }
  __syncthreads();

  // Stage 2: the first warp merges the warps' lists the same way, each lane walking one list.
  if (warp == 0) {
    int position = 0;
    EntropyState total = lane < kWarps ? warp_state[lane] : EntropyState::empty();
    total = warp_merge(total);
    for (int round = 0; round < k; ++round) {
      Candidate head_candidate{-INFINITY, kEmptyIndex};
      if (lane < kWarps && position < k) head_candidate = {list_value[lane][position], list_index[lane][position]};
      const Candidate best = warp_best(head_candidate);
      if (lane < kWarps && position < k && head_candidate.index == best.index && head_candidate.value == best.value) {
        ++position;
      }
      if (lane == 0) {
        final_value[round] = best.value;
        ids[r * k + round] = best.index == kEmptyIndex ? 0 : best.index;  // empty only in NaN rows
      }
    }
    if (lane == 0) {
      const float result = total.neg_entropy();
      neg_entropy[r] = result;
      topk_probs(final_value, k, !isnan(result), probs + r * k);
    }
  }
}

template <typename T, int K>
cudaError_t launch(const T* logits, int64_t row_stride, int64_t vocab, int64_t rows_total, const int64_t* rows,
                   int64_t num_rows, int k, float temperature, int64_t* ids, float* probs, float* neg_entropy,
                   cudaStream_t stream) {
  topk_entropy_kernel<T, K><<<static_cast<unsigned int>(num_rows), kThreads, 0, stream>>>(
      logits, row_stride, vocab, rows_total, rows, k, 1.0f / temperature, ids, probs, neg_entropy);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t topk_entropy(const T* logits, int64_t row_stride, int64_t vocab, int64_t rows_total, const int64_t* rows,
                         int64_t num_rows, int k, float temperature, int64_t* ids, float* probs, float* neg_entropy,
                         cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const auto run = [&](auto bucket) {
    return launch<T, decltype(bucket)::value>(logits, row_stride, vocab, rows_total, rows, num_rows, k, temperature,
                                              ids, probs, neg_entropy, stream);
  };
  if (k <= 1) return run(std::integral_constant<int, 1>{});
  if (k <= 2) return run(std::integral_constant<int, 2>{});
  if (k <= 4) return run(std::integral_constant<int, 4>{});
  if (k <= 8) return run(std::integral_constant<int, 8>{});
  if (k <= 16) return run(std::integral_constant<int, 16>{});
  return run(std::integral_constant<int, kMaxK>{});
}

#define SOFTMASK_INSTANTIATE(T)                                                                                  \
  template cudaError_t topk_entropy<T>(const T*, int64_t, int64_t, int64_t, const int64_t*, int64_t, int, float, \
                                       int64_t*, float*, float*, cudaStream_t);
SOFTMASK_INSTANTIATE(float)
SOFTMASK_INSTANTIATE(bf16_t)
SOFTMASK_INSTANTIATE(f16_t)
#undef SOFTMASK_INSTANTIATE

}  // namespace softmask::cuda

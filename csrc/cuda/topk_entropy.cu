// CUDA top-k + negative entropy in one read of each row.
//
// A row is split over `splits` thread blocks when there are too few rows to fill the card (splits = 1 otherwise).
// Each thread streams 16-byte vectors of its block's part of the row and keeps
//   - an online entropy state in base 2 (one FFMA, one ex2, one FADD, one FMNMX and one FFMA per value), converted
//     to the shared natural-log EntropyState before the merge, so threads, warps and blocks merge with the same
//     EntropyState::merge as the CPU;
//   - a top-K list in registers (K a compile-time bucket >= k), guarded by a threshold: a value enters only if it is
//     >= the block's current lower bound on its k-th largest value (the best lane's k-th entry, published through
//     shared memory every few rounds) and beats the lane's own K-th entry. After the first rounds almost no value
//     passes, so the per-value work is the entropy update plus one max, whatever k is.
// Lists are merged by k rounds of "pick the best head" (within each warp, then across the warps' lists); with
// splits > 1 each block writes its state and list to a workspace and a second kernel merges the blocks of a row.
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
constexpr int kUnroll = 4;          // 16-byte loads in flight per thread and round
constexpr int kMaxSplits = kWarpSize;  // the merge kernel gives one lane to each block's list
constexpr int kMinVectorsPerThread = 2 * kUnroll;
// Resident blocks per SM the compiler must allow for (it caps registers accordingly, without spilling): k = 1 fits
// in 48 registers per thread (5 blocks of 256 threads), lists up to 5 in 64 (4 blocks), 8 in 80 (3 blocks).
template <int K>
constexpr int kMinBlocksPerSm = K == 1 ? 5 : (K <= 5 ? 4 : (K <= 8 ? 3 : 1));
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kMinExponent2 = -126.0f;  // 2^-126: below it ex2.approx.ftz returns exactly 0

struct Candidate {
  float value;
  int32_t index;
};

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Order-preserving map of floats to ints (for atomicMax on a shared float bound); it is its own inverse.
__device__ __forceinline__ int ordered_key(float f) {
  const int i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float from_ordered_key(int key) { return __int_as_float(key >= 0 ? key : key ^ 0x7fffffff); }

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

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

// The k-th largest of the warp's 32 values (k <= 32), by a bitonic sort across the lanes (descending).
__device__ __forceinline__ float warp_kth_largest(float v, int k, int lane) {
#pragma unroll
  for (int size = 2; size <= kWarpSize; size *= 2) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, v, stride);
      const bool keep_max = ((lane & stride) == 0) == ((lane & size) == 0);
      v = keep_max ? fmaxf(v, other) : fminf(v, other);
    }
  }
  return __shfl_sync(0xffffffffu, v, k - 1);
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

// Entropy state of one thread in base 2: y = x * log2(e) / temperature, m = running max of y,
// s = sum 2^(y - m), t = sum 2^(y - m) (y - m). Same edge cases as EntropyState (see online_entropy.h): -inf adds
// nothing (ex2 gives 0 and the clamp keeps 0 * d finite), NaN or +inf poisons s through ex2.
struct Base2Entropy {
  float m = -FLT_MAX;
  float s = 0.0f;
  float t = 0.0f;

  __device__ __forceinline__ void rescale_to(float new_m) {
    const float d = fmaxf(m - new_m, kMinExponent2);
    const float e = ex2(m - new_m);
    t = (t + d * s) * e;
    s *= e;
    m = new_m;
  }

  __device__ __forceinline__ void add(float y_minus_m) {
    const float e = ex2(y_minus_m);
    s += e;
    t = fmaf(e, fmaxf(y_minus_m, kMinExponent2), t);
  }

  // The same softmax in natural-log units: e^(x - m ln2) = 2^(y - m), and (x - m ln2) = ln2 (y - m).
  __device__ __forceinline__ EntropyState natural() const {
    return {m == -FLT_MAX ? -FLT_MAX : m * kLn2, s, t * kLn2};
  }
};

// The k-th entry of a list sorted in descending order (k <= K, runtime k) as the minimum of its first k entries: a
// select by index would be compiled into a runtime-indexed access, which moves the list to local memory.
template <int K>
__device__ __forceinline__ float kth_value(const TopK<K>& top, int k) {
  float v = INFINITY;
#pragma unroll
  for (int j = 0; j < K; ++j) v = j < k ? fminf(v, top.value[j]) : v;
  return v;
}

template <int K>
struct RowScan {
  TopK<K> top;
  Base2Entropy entropy;
  float scale;      // log2(e) / temperature
  float bound;      // lower bound on the block's k-th largest value (only grows)
  float threshold;  // max(bound, the lane's K-th entry): what a value must reach to be looked at

  __device__ __forceinline__ RowScan(float scale_) : scale(scale_), bound(-INFINITY), threshold(-INFINITY) {
    top.clear();
  }

  // N consecutive values starting at index i0 (N = W for the body, 1 for the unaligned head and tail).
  template <int N>
  __device__ __forceinline__ void consume(const float (&x)[N], int32_t i0) {
    float vmax = x[0];
#pragma unroll
    for (int j = 1; j < N; ++j) vmax = fmaxf(vmax, x[j]);  // NaN is skipped here; it poisons s below
    const float scaled_max = vmax * scale;
    if (scaled_max > entropy.m) entropy.rescale_to(scaled_max);
    const float neg_m = -entropy.m;
#pragma unroll
    for (int j = 0; j < N; ++j) entropy.add(fmaf(x[j], scale, neg_m));
    if (vmax >= threshold) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (x[j] >= threshold && top.admits(x[j], i0 + j)) {
          top.insert(x[j], i0 + j);
          threshold = fmaxf(bound, top.threshold());
        }
      }
    }
  }

  // Raise the bound to what the warp can prove: k of its values reach both the best lane's k-th entry and the k-th
  // largest of the lanes' maxima (k different lanes). The latter is the sharper one while lists are short; for
  // k = 1 both are the warp's maximum. Then over the block through shared memory. The whole warp calls this.
  __device__ __forceinline__ void refresh_bound(int k, int* shared_bound_key, int lane) {
    float warp_bound = warp_max(kth_value(top, k));
    if (k > 1) warp_bound = fmaxf(warp_bound, warp_kth_largest(top.value[0], k, lane));
    if (lane == 0) atomicMax(shared_bound_key, ordered_key(warp_bound));
    __syncwarp();
    bound = fmaxf(warp_bound, from_ordered_key(*reinterpret_cast<volatile int*>(shared_bound_key)));
    threshold = fmaxf(bound, top.threshold());
  }
};

// Merge n_lists sorted lists of k entries (list i at values/indices + i * stride, shared or global memory) into
// their k best, written by lane 0 to out_values/out_indices. Run by one whole warp; n_lists <= 32.
__device__ void warp_merge_lists(int lane, int n_lists, const float* values, const int32_t* indices, int stride,
                                 int k, float* out_values, int32_t* out_indices) {
  int position = 0;
  for (int round = 0; round < k; ++round) {
    Candidate head{-INFINITY, kEmptyIndex};
    const bool owns_list = lane < n_lists && position < k;
    if (owns_list) head = {values[lane * stride + position], indices[lane * stride + position]};
    const Candidate best = warp_best(head);
    if (owns_list && head.index == best.index && head.value == best.value) ++position;
    if (lane == 0) {
      out_values[round] = best.value;
      out_indices[round] = best.index;
    }
  }
}

// Final outputs of row r from its merged list and entropy state (lane 0 only).
__device__ void write_row(int64_t r, int k, const float* values, const int32_t* indices, EntropyState total,
                          int64_t* ids, float* probs, float* neg_entropy) {
  const float result = total.neg_entropy();
  neg_entropy[r] = result;
  for (int j = 0; j < k; ++j) ids[r * k + j] = indices[j] == kEmptyIndex ? 0 : indices[j];  // empty only in NaN rows
  topk_probs(values, k, !isnan(result), probs + r * k);
}

// Per-block partial results when a row is split over several blocks.
struct Partials {
  EntropyState* states;  // [rows, splits]
  float* values;         // [rows, splits, k]
  int32_t* indices;      // [rows, splits, k]
};

struct Outputs {
  int64_t* ids;
  float* probs;
  float* neg_entropy;
};

// grid = (rows, splits). Block (r, s) scans vectors [s * per_split, (s + 1) * per_split) of its row's 16-byte
// aligned body; block s = 0 also takes the unaligned head and tail.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<K>)
    topk_entropy_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t vocab, int64_t rows_total,
                        const int64_t* __restrict__ rows, int k, float scale, int64_t vectors_per_split, Outputs out,
                        Partials partials) {
  constexpr int W = kVectorWidth<T>;
  __shared__ float list_value[kWarps][K];
  __shared__ int32_t list_index[kWarps][K];
  __shared__ float merged_value[K];
  __shared__ int32_t merged_index[K];
  __shared__ EntropyState warp_state[kWarps];
  __shared__ int bound_key;

  const int64_t r = blockIdx.x;
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  int64_t source = r;
  if (rows != nullptr) {
    source = rows[r];
    SOFTMASK_DEVICE_CHECK(source >= 0 && source < rows_total, "topk_entropy: rows must lie in [0, rows_total)");
  }
  const T* row = logits + source * row_stride;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x == 0) bound_key = ordered_key(-INFINITY);
  __syncthreads();

  RowScan<K> scan(scale);
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % kVectorBytes) / sizeof(T);
  const int64_t head = misalignment == 0 ? 0 : (vocab < W - misalignment ? vocab : W - misalignment);
  const int64_t vectors = (vocab - head) / W;
  if (split == 0) {
    for (int64_t i = threadIdx.x; i < head; i += kThreads) {
      scan.template consume<1>({to_float(row[i])}, static_cast<int32_t>(i));
    }
    for (int64_t i = head + vectors * W + threadIdx.x; i < vocab; i += kThreads) {
      scan.template consume<1>({to_float(row[i])}, static_cast<int32_t>(i));
    }
  }

  // Body: rounds of kUnroll vectors per thread, loads first. Rounds are uniform across the block, so every lane
  // reaches refresh_bound; it runs after rounds 0, 1, 3 and 7 (while the bound is still rising fast), then every 8th.
  const T* body = row + head;
  const int64_t begin = split * vectors_per_split;
  const int64_t end = begin + vectors_per_split < vectors ? begin + vectors_per_split : vectors;
  const int64_t rounds = end > begin ? (end - begin + kThreads * kUnroll - 1) / (kThreads * kUnroll) : 0;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t first = begin + round * kThreads * kUnroll + threadIdx.x;
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + u * kThreads;
      if (v < end) raw[u] = __ldg(reinterpret_cast<const uint4*>(body + v * W));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + u * kThreads;
      if (v < end) {
        float x[W];
        unpack_vector<T>(raw[u], x);
        scan.template consume<W>(x, static_cast<int32_t>(head + v * W));
      }
    }
    if (round < 2 || round == 3 || round % 8 == 7) scan.refresh_bound(k, &bound_key, lane);
  }

  // Entropy state: warps, then the first warp over the warps' states.
  const EntropyState warp_total = warp_merge(scan.entropy.natural());
  if (lane == 0) warp_state[warp] = warp_total;

  // Top-k, stage 1: each warp picks its k best by k rounds of "best head"; the owner of the winner pops it.
  for (int round = 0; round < k; ++round) {
    const Candidate best = warp_best({scan.top.value[0], scan.top.index[0]});
    if (scan.top.index[0] == best.index && scan.top.value[0] == best.value) scan.top.pop_front();
    if (lane == 0) {
      list_value[warp][round] = best.value;
      list_index[warp][round] = best.index;
    }
  }
  __syncthreads();

  // Stage 2: the first warp merges the warps' lists, into the outputs or into this block's partial result.
  if (warp == 0) {
    const EntropyState total = warp_merge(lane < kWarps ? warp_state[lane] : EntropyState::empty());
    if (splits == 1) {
      warp_merge_lists(lane, kWarps, &list_value[0][0], &list_index[0][0], K, k, merged_value, merged_index);
      __syncwarp();
      if (lane == 0) write_row(r, k, merged_value, merged_index, total, out.ids, out.probs, out.neg_entropy);
    } else {
      const int64_t slot = r * splits + split;
      warp_merge_lists(lane, kWarps, &list_value[0][0], &list_index[0][0], K, k, partials.values + slot * k,
                       partials.indices + slot * k);
      if (lane == 0) partials.states[slot] = total;
    }
  }
}

// One warp per row merges the row's `splits` partial results.
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(int64_t num_rows, int splits, int k,
                                                                 Partials partials, Outputs out) {
  extern __shared__ unsigned char scratch[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= num_rows) return;
  auto* merged_value = reinterpret_cast<float*>(scratch) + warp * k;
  auto* merged_index = reinterpret_cast<int32_t*>(scratch + kWarps * k * sizeof(float)) + warp * k;
  const int64_t first = r * splits;
  const EntropyState total = warp_merge(lane < splits ? partials.states[first + lane] : EntropyState::empty());
  warp_merge_lists(lane, splits, partials.values + first * k, partials.indices + first * k, k, k, merged_value,
                   merged_index);
  __syncwarp();
  if (lane == 0) write_row(r, k, merged_value, merged_index, total, out.ids, out.probs, out.neg_entropy);
}

template <int K>
struct Bucket {
  static constexpr int value = K;
};

template <typename F>
cudaError_t with_bucket(int k, F&& f) {
  if (k <= 1) return f(Bucket<1>{});
  if (k <= 2) return f(Bucket<2>{});
  if (k <= 3) return f(Bucket<3>{});
  if (k <= 4) return f(Bucket<4>{});
  if (k <= 5) return f(Bucket<5>{});
  if (k <= 8) return f(Bucket<8>{});
  if (k <= 16) return f(Bucket<16>{});
  return f(Bucket<kMaxK>{});
}

// Resident blocks per SM of one kernel instance (a property of the kernel and the card, computed once).
template <typename T, int K>
int blocks_per_sm() {
  static const int cached = [] {
    int n = 0;
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, topk_entropy_kernel<T, K>, kThreads, 0);
    return err == cudaSuccess && n > 0 ? n : 1;
  }();
  return cached;
}

// Blocks per row, chosen so that the grid fills whole waves of resident blocks (a last wave that is nearly empty
// costs as much as a full one) while each block stays long enough to amortise its merge: among 1..max splits (each
// thread keeping at least kMinVectorsPerThread vectors, at most kMaxSplits), the smallest that uses at least 90% of
// the slots of its waves, else the one that uses the most. Depends only on the shape, the dtype, k and the device.
template <typename T>
int splits_for(int64_t num_rows, int64_t vocab, int k) {
  int device = 0, sms = 0;
  if (num_rows < 1 || cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1;
  }
  int per_sm = 1;
  with_bucket(k, [&](auto bucket) {
    per_sm = blocks_per_sm<T, decltype(bucket)::value>();
    return cudaSuccess;
  });
  const int64_t wave = static_cast<int64_t>(sms) * per_sm;
  const int64_t by_length = vocab / kVectorWidth<T> / (int64_t{kThreads} * kMinVectorsPerThread);
  const int64_t most = by_length < kMaxSplits ? (by_length > 1 ? by_length : 1) : kMaxSplits;
  const auto efficiency = [&](int64_t splits) {
    const int64_t blocks = num_rows * splits;
    return static_cast<double>(blocks) / static_cast<double>((blocks + wave - 1) / wave * wave);
  };
  int64_t best = 1;
  for (int64_t splits = 1; splits <= most; ++splits) {
    if (efficiency(splits) >= 0.9) return static_cast<int>(splits);
    if (efficiency(splits) > efficiency(best)) best = splits;
  }
  return static_cast<int>(best);
}

// Where the partial results of num_rows * splits blocks lie in the workspace (byte offsets), and its size.
struct WorkspaceLayout {
  size_t values, indices, bytes;

  WorkspaceLayout(int64_t num_rows, int splits, int k) {
    const size_t slots = static_cast<size_t>(num_rows) * splits;
    values = align_up(slots * sizeof(EntropyState));
    indices = values + align_up(slots * k * sizeof(float));
    bytes = indices + slots * k * sizeof(int32_t);
  }

  Partials carve(void* workspace) const {
    char* base = static_cast<char*>(workspace);
    return {reinterpret_cast<EntropyState*>(base), reinterpret_cast<float*>(base + values),
            reinterpret_cast<int32_t*>(base + indices)};
  }
};

}  // namespace

template <typename T>
size_t topk_entropy_workspace_bytes(int64_t num_rows, int64_t vocab, int k) {
  const int splits = splits_for<T>(num_rows, vocab, k);
  return splits == 1 ? 0 : WorkspaceLayout(num_rows, splits, k).bytes;
}

template <typename T>
cudaError_t topk_entropy(const T* logits, int64_t row_stride, int64_t vocab, int64_t rows_total, const int64_t* rows,
                         int64_t num_rows, int k, float temperature, int64_t* ids, float* probs, float* neg_entropy,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const int splits = splits_for<T>(num_rows, vocab, k);
  Partials partials{};
  if (splits > 1) {
    const WorkspaceLayout layout(num_rows, splits, k);
    if (workspace_bytes < layout.bytes) return cudaErrorInvalidValue;
    partials = layout.carve(workspace);
  }
  const Outputs out{ids, probs, neg_entropy};
  const int64_t vectors = vocab / kVectorWidth<T>;  // an upper bound on every row's aligned body
  const int64_t per_split = (vectors + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned int>(num_rows), static_cast<unsigned int>(splits));
  const float scale = kLog2e / temperature;
  const cudaError_t launched = with_bucket(k, [&](auto bucket) {
    topk_entropy_kernel<T, decltype(bucket)::value><<<grid, kThreads, 0, stream>>>(
        logits, row_stride, vocab, rows_total, rows, k, scale, per_split, out, partials);
    return cudaGetLastError();
  });
  if (launched != cudaSuccess || splits == 1) return launched;
  const size_t scratch = kWarps * static_cast<size_t>(k) * (sizeof(float) + sizeof(int32_t));
  merge_splits_kernel<<<blocks_for(num_rows, kWarps), kThreads, scratch, stream>>>(num_rows, splits, k, partials, out);
  return cudaGetLastError();
}

#define SOFTMASK_INSTANTIATE(T)                                                                                  \
  template size_t topk_entropy_workspace_bytes<T>(int64_t, int64_t, int);                                        \
  template cudaError_t topk_entropy<T>(const T*, int64_t, int64_t, int64_t, const int64_t*, int64_t, int, float, \
                                       int64_t*, float*, float*, void*, size_t, cudaStream_t);
SOFTMASK_INSTANTIATE(float)
SOFTMASK_INSTANTIATE(bf16_t)
SOFTMASK_INSTANTIATE(f16_t)
#undef SOFTMASK_INSTANTIATE

}  // namespace softmask::cuda

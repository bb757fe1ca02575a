// CUDA top-k + negative entropy in one read of each row: the kernels of every TopKVariant and their launcher.
// Each variant is compiled in its own translation unit (topk_entropy_<variant>.cu) so the builds run in parallel;
// topk_entropy.cu holds the host entry points and dispatches on the variant.
//
// kBaseline:
// A row is split over `splits` thread blocks when there are too few rows to fill the card (splits = 1 otherwise).
// Each thread streams 16-byte vectors of its block's part of the row and keeps
//   - an online entropy state in base 2 (one FFMA, one ex2, one FADD, one FMNMX and one FFMA per value), converted
//     to the shared natural-log EntropyState before the merge, so threads, warps and blocks merge with the same
//     EntropyState::merge as the CPU;
//   - a top-K list in registers (K a compile-time bucket >= k), guarded by a threshold: a value enters only if it is
//     >= the block's current lower bound on its k-th largest value (the best lane's k-th entry, published through
//     shared memory every few rounds) and beats the lane's own K-th entry. After the first rounds almost no value
//     passes, so the per-value work is the entropy update plus one max, whatever k is.
// kExactBound: the same lists, but the bound is seeded in the first round, before any value is inserted, from the
// k-th largest of the block's 256 lane maxima of that round (k values at distinct positions, so a lower bound on the
// k-th largest), and each later refresh makes it exact: the k-th largest value the block has seen so far (the k-th of
// the union of the lanes' lists, through shared memory). Lists of K <= kMaxExactK only; larger K keep the baseline
// refresh after the seed (the copy of the list the exact refresh needs would not fit in registers).
// kFiltered (after FlashInfer's filtered top-k, which collects the values above a coarse threshold in shared memory
// and selects among those few): no per-lane lists at all, so every k has the register footprint (and occupancy) of
// k = 1 and the per-value work is the entropy update plus one compare. Values >= the block's bound are appended to
// their warp's candidate buffer in shared memory; when a buffer might overflow, the warp selects its k best, keeps
// only those, and raises the block's bound to its k-th value. The bound is seeded as in kExactBound.
// Ties: every variant compares values with >= against its bound and orders candidates by (value desc, index asc),
// so the lower index wins ties whatever the variant.
//
// Lists are merged by k rounds of "pick the best head" (within each warp, then across the warps' lists); with
// splits > 1 each block writes its state and list to a workspace and a second kernel merges the blocks of a row.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <type_traits>

#include "device_utils.cuh"
#include "softmask/cuda.h"
#include "softmask/online_entropy.h"
#include "softmask/topk.h"
#include "softmask/topk_variants.h"

namespace softmask::cuda::topk_impl {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread and round
constexpr int kMaxSplits = kWarpSize;  // the merge kernel gives one lane to each block's list
constexpr int kMinVectorsPerThread = 2 * kUnroll;
// Resident blocks per SM the compiler must allow for (it caps registers accordingly, without spilling): k = 1 fits
// in 48 registers per thread (5 blocks of 256 threads), lists up to 5 in 64 (4 blocks), 8 in 80 (3 blocks).
// kFiltered keeps no list in registers, so it fits in 64 registers (4 blocks) whatever K is; at 48 (5 blocks) its
// first-round seed and buffer trimming make ptxas spill.
template <int K, TopKVariant V>
constexpr int kMinBlocksPerSm = V == TopKVariant::kFiltered ? 4 : (K == 1 ? 5 : (K <= 5 ? 4 : (K <= 8 ? 3 : 1)));
constexpr int kMaxExactK = 8;  // kExactBound's exact refresh copies the list: only for lists up to this size

struct Candidate {
  float value;
  int32_t index;
};

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

// The warp's 32 values sorted in descending order across the lanes (lane 0 gets the largest), by a bitonic sort.
__device__ __forceinline__ float warp_sort_descending(float v, int lane) {
#pragma unroll
  for (int size = 2; size <= kWarpSize; size *= 2) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, v, stride);
      const bool keep_max = ((lane & stride) == 0) == ((lane & size) == 0);
      v = keep_max ? fmaxf(v, other) : fminf(v, other);
    }
  }
  return v;
}

// The k-th largest of the warp's 32 values (k <= 32).
__device__ __forceinline__ float warp_kth_largest(float v, int k, int lane) {
  return __shfl_sync(0xffffffffu, warp_sort_descending(v, lane), k - 1);
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

// The k-th entry of a list sorted in descending order (k <= K, runtime k) as the minimum of its first k entries: a
// select by index would be compiled into a runtime-indexed access, which moves the list to local memory.
template <int K>
__device__ __forceinline__ float kth_value(const TopK<K>& top, int k) {
  float v = INFINITY;
#pragma unroll
  for (int j = 0; j < K; ++j) v = j < k ? fminf(v, top.value[j]) : v;
  return v;
}

// Adds N values to a thread's entropy state (scale = log2(e) / temperature) and returns their maximum (NaN skipped;
// a NaN value poisons the state instead).
template <int N>
__device__ __forceinline__ float add_to_entropy(Base2Entropy& entropy, float scale, const float (&x)[N]) {
  float vmax = x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) vmax = fmaxf(vmax, x[j]);
  const float scaled_max = vmax * scale;
  if (scaled_max > entropy.m) entropy.rescale_to(scaled_max);
  const float neg_m = -entropy.m;
#pragma unroll
  for (int j = 0; j < N; ++j) entropy.add(fmaf(x[j], scale, neg_m));
  return vmax;
}

// Block-wide bounds of kExactBound and kFiltered, through shared memory: each warp writes its k largest values
// (descending) into lists[parity][warp], the block synchronises, and every warp reads the k-th largest of the
// union. Two buffers used in turn make one barrier per bound enough: a warp overwrites a buffer only after the next
// bound's barrier, which every warp reaches only after it has read that buffer.
template <int K>
struct BlockBound {
  float lists[2][kWarps][K];
};

// The k-th largest value of the union of kWarps descending lists of k values each (k <= K). The whole warp calls
// this; lane i walks list i, and ties between lists go to the lower lane, so exactly one list advances per round.
template <int K>
__device__ __forceinline__ float kth_of_warp_lists(const float (&lists)[kWarps][K], int k, int lane) {
  int position = 0;
  float kth = -INFINITY;
  for (int round = 0; round < k; ++round) {
    const bool owns = lane < kWarps && position < k;
    const Candidate best = warp_best({owns ? lists[lane][position] : -INFINITY, owns ? lane : kEmptyIndex});
    if (owns && best.index == lane) ++position;
    kth = best.value;
  }
  return kth;
}

// The k-th largest of the block's values when lane j < k of each warp holds its warp's (j+1)-th largest in `mine`.
// Every thread of the block calls this at the same point (it contains a barrier); parity alternates the buffers.
template <int K>
__device__ __forceinline__ float block_kth_largest(BlockBound<K>& shared, int& parity, float mine, int k, int warp,
                                                   int lane) {
  if (lane < k) shared.lists[parity][warp][lane] = mine;
  __syncthreads();
  const float kth = kth_of_warp_lists(shared.lists[parity], k, lane);
  parity ^= 1;
  return kth;
}

// Lane j < k gets the (j+1)-th largest entry of the union of the warp's lists (k rounds of "best head" on a copy).
template <int K>
__device__ __forceinline__ float warp_sorted_list_values(const TopK<K>& top, int k, int lane) {
  TopK<K> rest = top;
  float mine = -INFINITY;
  for (int round = 0; round < k; ++round) {
    const Candidate best = warp_best({rest.value[0], rest.index[0]});
    if (rest.index[0] == best.index && rest.value[0] == best.value) rest.pop_front();
    if (lane == round) mine = best.value;
  }
  return mine;
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
    const float vmax = add_to_entropy(entropy, scale, x);
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

  __device__ __forceinline__ void raise_bound(float lower_bound) {
    bound = fmaxf(bound, lower_bound);
    threshold = fmaxf(bound, top.threshold());
  }

  // kExactBound: the bound becomes the k-th largest value the block has seen (every value >= the bound went into
  // some lane's list, so the union of the lists holds the block's k largest). The whole block calls this.
  __device__ __forceinline__ void refresh_exact(BlockBound<K>& shared, int& parity, int k, int warp, int lane) {
    raise_bound(block_kth_largest(shared, parity, warp_sorted_list_values(top, k, lane), k, warp, lane));
  }
};

// A warp's candidates of kFiltered in shared memory; only the warp's own lanes touch it.
template <int Capacity>
struct CandidateBuffer {
  float value[Capacity];
  int32_t index[Capacity];
  int count;
};

// The warp's k best candidates, by k rounds of "best entry" (value desc, index asc): lane j < k gets the (j+1)-th
// (the empty slot when there are fewer). Lane l scans slots l, l + 32, ... only, and marks its taken entry with the
// empty slot, which ranks below every real entry (-inf ones included). The whole warp calls this.
template <int Capacity>
__device__ __forceinline__ Candidate warp_select_best(CandidateBuffer<Capacity>& buffer, int k, int lane) {
  __syncwarp();
  const int count = buffer.count;
  Candidate mine{-INFINITY, kEmptyIndex};
  for (int round = 0; round < k; ++round) {
    Candidate local{-INFINITY, kEmptyIndex};
    int local_slot = -1;
    for (int slot = lane; slot < count; slot += kWarpSize) {
      if (ranks_before(buffer.value[slot], buffer.index[slot], local.value, local.index)) {
        local = {buffer.value[slot], buffer.index[slot]};
        local_slot = slot;
      }
    }
    const Candidate best = warp_best(local);
    if (local_slot >= 0 && local.index == best.index && local.value == best.value) {
      buffer.value[local_slot] = -INFINITY;
      buffer.index[local_slot] = kEmptyIndex;
    }
    if (lane == round) mine = best;
  }
  __syncwarp();
  return mine;
}

// kFiltered's rare path: keep only the warp's k best candidates and publish the k-th of them (k values at distinct
// positions of this block's part) as a lower bound of the block. Returns the block's bound. The whole warp calls this.
template <int Capacity>
__device__ __forceinline__ float keep_warp_best(CandidateBuffer<Capacity>* buffer, int k, int lane,
                                                int* shared_bound_key) {
  const Candidate mine = warp_select_best(*buffer, k, lane);
  if (lane < k) {
    buffer->value[lane] = mine.value;  // slot `lane` is this lane's own: no other lane reads it meanwhile
    buffer->index[lane] = mine.index;
  }
  if (lane == 0) buffer->count = k;
  const float kth = __shfl_sync(0xffffffffu, mine.value, k - 1);
  if (lane == 0) atomicMax(shared_bound_key, ordered_key(kth));
  __syncwarp();
  return fmaxf(kth, from_ordered_key(*reinterpret_cast<volatile int*>(shared_bound_key)));
}

// kFiltered's state of one thread: its entropy, and the block's bound that a value must reach to be a candidate.
template <typename T>
struct FilteredScan {
  // One step appends at most one vector per lane, so k kept entries plus one step always fit.
  static constexpr int kCapacity = kMaxK + kWarpSize * kVectorWidth<T>;
  using Buffer = CandidateBuffer<kCapacity>;

  Base2Entropy entropy;
  float scale;  // log2(e) / temperature
  float bound;  // lower bound on the block's k-th largest value (only grows)
  Buffer* buffer;
  bool appended;  // whether this lane appended since the warp last checked its buffer's room

  __device__ __forceinline__ FilteredScan(float scale_, Buffer* buffer_)
      : scale(scale_), bound(-INFINITY), buffer(buffer_), appended(false) {}

  template <int N>
  __device__ __forceinline__ void consume(const float (&x)[N], int32_t i0) {
    const float vmax = add_to_entropy(entropy, scale, x);
    if (vmax >= bound) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (x[j] >= bound) {
          const int slot = atomicAdd(&buffer->count, 1);
          buffer->value[slot] = x[j];
          buffer->index[slot] = i0 + j;
          appended = true;
        }
      }
    }
  }

  __device__ __forceinline__ void raise_bound(float lower_bound) { bound = fmaxf(bound, lower_bound); }

  __device__ __forceinline__ void read_block_bound(int* shared_bound_key) {
    raise_bound(from_ordered_key(*reinterpret_cast<volatile int*>(shared_bound_key)));
  }

  // Before each step (the whole warp calls this): if the buffer might not hold one more step, keep only the warp's
  // k best and raise the bound.
  __device__ __forceinline__ void make_room(int k, int lane, int* shared_bound_key) {
    if (!__any_sync(0xffffffffu, appended)) return;
    appended = false;
    __syncwarp();
    if (buffer->count + kWarpSize * kVectorWidth<T> > kCapacity) {
      raise_bound(keep_warp_best(buffer, k, lane, shared_bound_key));
    }
  }
};

// Merge n_lists sorted lists of k entries (list i at values/indices + i * stride, shared or global memory) into
// their k best, written by lane 0 to out_values/out_indices. Run by one whole warp; n_lists <= 32.
static __device__ void warp_merge_lists(int lane, int n_lists, const float* values, const int32_t* indices, int stride,
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
static __device__ void write_row(int64_t r, int k, const float* values, const int32_t* indices, EntropyState total,
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

// Zeros for a kSkipRow entry of `rows` (the contract of the CPU kernel), one thread per output value.
static __device__ void write_skipped_row(int64_t r, int k, Outputs out) {
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    out.ids[r * k + j] = 0;
    out.probs[r * k + j] = 0.0f;
  }
  if (threadIdx.x == 0) out.neg_entropy[r] = 0.0f;
}

// Shared memory a variant does not use.
struct Unused {};

// grid = (rows, splits). Block (r, s) scans vectors [s * per_split, (s + 1) * per_split) of its row's 16-byte
// aligned body; block s = 0 also takes the unaligned head and tail. Every round is executed by every thread of the
// block (the loop bounds depend on the block only), so the barriers of the seeded variants are reached by all.
template <typename T, int K, TopKVariant V>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<K, V>)
    topk_entropy_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t vocab, int64_t rows_total,
                        const int64_t* __restrict__ rows, int k, float scale, int64_t vectors_per_split, Outputs out,
                        Partials partials) {
  constexpr int W = kVectorWidth<T>;
  constexpr bool kLists = V != TopKVariant::kFiltered;
  constexpr bool kSeeded = V != TopKVariant::kBaseline;
  using Scan = std::conditional_t<kLists, RowScan<K>, FilteredScan<T>>;
  __shared__ float list_value[kWarps][K];
  __shared__ int32_t list_index[kWarps][K];
  __shared__ float merged_value[K];
  __shared__ int32_t merged_index[K];
  __shared__ EntropyState warp_state[kWarps];
  __shared__ int bound_key;
  __shared__ std::conditional_t<kSeeded, BlockBound<K>, Unused> block_bound;
  __shared__ std::conditional_t<kLists, Unused, typename FilteredScan<T>::Buffer> candidates[kLists ? 1 : kWarps];

  const int64_t r = blockIdx.x;
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  int64_t source = r;
  if (rows != nullptr) {
    source = rows[r];
    SOFTMASK_DEVICE_CHECK(source == kSkipRow || (source >= 0 && source < rows_total),
                          "topk_entropy: rows must lie in [0, rows_total) or be -1");
    if (source == kSkipRow) {  // the whole block leaves before any barrier; the merge kernel skips the row too
      if (split == 0) write_skipped_row(r, k, out);
      return;
    }
  }
  const T* row = logits + source * row_stride;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x == 0) bound_key = ordered_key(-INFINITY);
  if constexpr (!kLists) {
    if (lane == 0) candidates[warp].count = 0;
  }
  __syncthreads();

  Scan scan = [&] {
    if constexpr (kLists) {
      return RowScan<K>(scale);
    } else {
      return FilteredScan<T>(scale, &candidates[warp]);
    }
  }();
  [[maybe_unused]] int parity = 0;  // which of block_bound's buffers the next block-wide bound uses
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
    if constexpr (kSeeded) {
      // Before the first value is inserted: the k-th largest of the block's lane maxima of this round.
      if (round == 0) {
        float lane_max = -INFINITY;  // NaN is skipped (fmaxf): it never enters a list
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (first + u * kThreads < end) {
            float x[W];
            unpack_vector<T>(raw[u], x);
#pragma unroll
            for (int j = 0; j < W; ++j) lane_max = fmaxf(lane_max, x[j]);
          }
        }
        const float seed = block_kth_largest(block_bound, parity, warp_sort_descending(lane_max, lane), k, warp, lane);
        scan.raise_bound(seed);
        if (lane == 0) atomicMax(&bound_key, ordered_key(seed));
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if constexpr (!kLists) scan.make_room(k, lane, &bound_key);
      const int64_t v = first + u * kThreads;
      if (v < end) {
        float x[W];
        unpack_vector<T>(raw[u], x);
        scan.template consume<W>(x, static_cast<int32_t>(head + v * W));
      }
    }
    if (round < 2 || round == 3 || round % 8 == 7) {
      if constexpr (V == TopKVariant::kFiltered) {
        scan.read_block_bound(&bound_key);
      } else if constexpr (V == TopKVariant::kExactBound && K <= kMaxExactK) {
        scan.refresh_exact(block_bound, parity, k, warp, lane);
      } else {
        scan.refresh_bound(k, &bound_key, lane);
      }
    }
  }

  // Entropy state: warps, then the first warp over the warps' states.
  const EntropyState warp_total = warp_merge(scan.entropy.natural());
  if (lane == 0) warp_state[warp] = warp_total;

  // Top-k, stage 1: each warp picks its k best by k rounds of "best head" (lists: the owner of the winner pops it;
  // kFiltered: the best entry of the warp's candidates).
  if constexpr (kLists) {
    for (int round = 0; round < k; ++round) {
      const Candidate best = warp_best({scan.top.value[0], scan.top.index[0]});
      if (scan.top.index[0] == best.index && scan.top.value[0] == best.value) scan.top.pop_front();
      if (lane == 0) {
        list_value[warp][round] = best.value;
        list_index[warp][round] = best.index;
      }
    }
  } else {
    const Candidate mine = warp_select_best(candidates[warp], k, lane);
    if (lane < k) {
      list_value[warp][lane] = mine.value;
      list_index[warp][lane] = mine.index;
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
static __global__ void __launch_bounds__(kThreads)
    merge_splits_kernel(int64_t num_rows, const int64_t* __restrict__ rows, int splits, int k, Partials partials,
                        Outputs out) {
  extern __shared__ unsigned char scratch[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= num_rows || (rows != nullptr && rows[r] == kSkipRow)) return;  // a skipped row has its zeros already
  auto* merged_value = reinterpret_cast<float*>(scratch) + warp * k;
  auto* merged_index = reinterpret_cast<int32_t*>(scratch + kWarps * k * sizeof(float)) + warp * k;
  const int64_t first = r * splits;
  const EntropyState total = warp_merge(lane < splits ? partials.states[first + lane] : EntropyState::empty());
  warp_merge_lists(lane, splits, partials.values + first * k, partials.indices + first * k, k, k, merged_value,
                   merged_index);
  __syncwarp();
  if (lane == 0) write_row(r, k, merged_value, merged_index, total, out.ids, out.probs, out.neg_entropy);
}

// Resident blocks per SM of one kernel instance (a property of the kernel and the card, computed once).
template <typename T, int K, TopKVariant V>
int blocks_per_sm() {
  static const int cached = [] {
    int n = 0;
    const cudaError_t err =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, topk_entropy_kernel<T, K, V>, kThreads, 0);
    return err == cudaSuccess && n > 0 ? n : 1;
  }();
  return cached;
}

// Blocks per row, chosen so that the grid fills whole waves of resident blocks (a last wave that is nearly empty
// costs as much as a full one) while each block stays long enough to amortise its merge: among 1..max splits (each
// thread keeping at least kMinVectorsPerThread vectors, at most kMaxSplits), the smallest that uses at least 90% of
// the slots of its waves, else the one that uses the most. Depends only on the shape, the dtype, k, the variant and
// the device.
template <typename T, TopKVariant V>
int splits_for(int64_t num_rows, int64_t vocab, int k) {
  int device = 0, sms = 0;
  if (num_rows < 1 || cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1;
  }
  const int per_sm = with_k_bucket(k, [](auto bucket) { return blocks_per_sm<T, decltype(bucket)::value, V>(); });
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

// One call of softmask::cuda::topk_entropy (see cuda.h for the arguments).
template <typename T>
struct TopKEntropyProblem {
  const T* logits;
  int64_t row_stride, vocab, rows_total;
  const int64_t* rows;
  int64_t num_rows;
  int k;
  float temperature;
  int64_t* ids;
  float* probs;
  float* neg_entropy;
};

// The host side of one variant: its workspace size and its launches. Each variant's instances are compiled in its
// own translation unit (SOFTMASK_TOPK_VARIANT_INSTANCES below).
template <typename T, TopKVariant V>
struct TopKEntropyLauncher {
  static size_t workspace_bytes(int64_t num_rows, int64_t vocab, int k) {
    const int splits = splits_for<T, V>(num_rows, vocab, k);
    return splits == 1 ? 0 : WorkspaceLayout(num_rows, splits, k).bytes;
  }

  static cudaError_t launch(const TopKEntropyProblem<T>& p, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
    if (p.num_rows == 0) return cudaSuccess;
    const int splits = splits_for<T, V>(p.num_rows, p.vocab, p.k);
    Partials partials{};
    if (splits > 1) {
      const WorkspaceLayout layout(p.num_rows, splits, p.k);
      if (workspace_bytes < layout.bytes) return cudaErrorInvalidValue;
      partials = layout.carve(workspace);
    }
    const Outputs out{p.ids, p.probs, p.neg_entropy};
    const int64_t vectors = p.vocab / kVectorWidth<T>;  // an upper bound on every row's aligned body
    const int64_t per_split = (vectors + splits - 1) / splits;
    const dim3 grid(static_cast<unsigned int>(p.num_rows), static_cast<unsigned int>(splits));
    const float scale = kLog2e / p.temperature;
    const cudaError_t launched = with_k_bucket(p.k, [&](auto bucket) {
      topk_entropy_kernel<T, decltype(bucket)::value, V><<<grid, kThreads, 0, stream>>>(
          p.logits, p.row_stride, p.vocab, p.rows_total, p.rows, p.k, scale, per_split, out, partials);
      return cudaGetLastError();
    });
    if (launched != cudaSuccess || splits == 1) return launched;
    const size_t scratch = kWarps * static_cast<size_t>(p.k) * (sizeof(float) + sizeof(int32_t));
    merge_splits_kernel<<<blocks_for(p.num_rows, kWarps), kThreads, scratch, stream>>>(p.num_rows, p.rows, splits, p.k,
                                                                                       partials, out);
    return cudaGetLastError();
  }
};

// Explicit instantiation definitions (`template`) or declarations (`extern template`) of one variant's launchers.
#define SOFTMASK_TOPK_VARIANT_INSTANCES(EXTERN, VARIANT)                              \
  EXTERN template struct TopKEntropyLauncher<float, TopKVariant::VARIANT>;            \
  EXTERN template struct TopKEntropyLauncher<softmask::bf16_t, TopKVariant::VARIANT>; \
  EXTERN template struct TopKEntropyLauncher<softmask::f16_t, TopKVariant::VARIANT>;

}  // namespace softmask::cuda::topk_impl

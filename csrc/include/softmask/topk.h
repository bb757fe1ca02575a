// Bounded top-K list kept sorted in registers: K is a compile-time constant so every index below is a
// constant after unrolling (no local-memory arrays on the GPU, no loads/stores through a runtime index on the CPU).
//
// Order: larger value first; equal values by lower index first. An empty slot is (-inf, kEmptyIndex) and ranks
// below every real entry, -inf ones included. NaN never enters (every comparison with it is false).
// This is a strict total order, so the merge of partial lists is the same whatever the split.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "config.h"

namespace softmask {

constexpr int32_t kEmptyIndex = INT32_MAX;
constexpr int kMaxK = 32;  // the largest k the kernels serve (exposed to Python as softmask_ext._C.MAX_K)
// A `rows` entry asking for no work: the output row gets zeros and no logits are read, so a caller that needs only some
// rows' statistics keeps fixed shapes (exposed to Python as softmask_ext._C.SKIP_ROW).
constexpr int64_t kSkipRow = -1;

// The list sizes the CPU and CUDA kernels are compiled for: k is served by the smallest bucket >= k. Small k get a
// bucket each (k = 1..5 are the common settings), larger k share a few, so the number of instances stays small.
template <int K>
using KBucket = std::integral_constant<int, K>;

namespace detail {
template <int First, int... Rest, typename F>
decltype(auto) with_bucket_from(int k, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    static_assert(First == kMaxK, "the last bucket must be kMaxK");
    return f(KBucket<First>{});
  } else {
    static_assert(First < kMaxK, "buckets must be below kMaxK, in increasing order");
    if (k <= First) return f(KBucket<First>{});
    return with_bucket_from<Rest...>(k, std::forward<F>(f));
  }
}
}  // namespace detail

// Calls f(KBucket<K>{}) for the bucket that serves k (1 <= k <= kMaxK; larger k get kMaxK) and returns its result;
// every instance of f must return the same type.
template <typename F>
decltype(auto) with_k_bucket(int k, F&& f) {
  return detail::with_bucket_from<1, 2, 3, 4, 5, 8, 16, kMaxK>(k, std::forward<F>(f));
}

SOFTMASK_HD bool ranks_before(float va, int32_t ia, float vb, int32_t ib) { return va > vb || (va == vb && ia < ib); }

template <int K>
struct TopK {
  float value[K];
  int32_t index[K];

  SOFTMASK_HD void clear() {
    SOFTMASK_UNROLL
    for (int j = 0; j < K; ++j) {
      value[j] = -INFINITY;
      index[j] = kEmptyIndex;
    }
  }

  SOFTMASK_HD bool full() const { return index[K - 1] != kEmptyIndex; }

  // Smallest value a newcomer must beat (with a higher index than every entry it might tie).
  SOFTMASK_HD float threshold() const { return value[K - 1]; }

  SOFTMASK_HD bool admits(float v, int32_t i) const { return ranks_before(v, i, value[K - 1], index[K - 1]); }

  // Insert (v, i), dropping the last entry; the caller has checked admits(v, i).
  SOFTMASK_HD void insert(float v, int32_t i) {
    value[K - 1] = v;
    index[K - 1] = i;
    SOFTMASK_UNROLL
    for (int j = K - 1; j > 0; --j) {
      if (ranks_before(value[j], index[j], value[j - 1], index[j - 1])) {
        const float tv = value[j];
        value[j] = value[j - 1];
        value[j - 1] = tv;
        const int32_t ti = index[j];
        index[j] = index[j - 1];
        index[j - 1] = ti;
      }
    }
  }

  SOFTMASK_HD void push(float v, int32_t i) {
    if (admits(v, i)) insert(v, i);
  }

  // Drop the head, shifting the rest up (used by the GPU's round-by-round merge).
  SOFTMASK_HD void pop_front() {
    SOFTMASK_UNROLL
    for (int j = 0; j + 1 < K; ++j) {
      value[j] = value[j + 1];
      index[j] = index[j + 1];
    }
    value[K - 1] = -INFINITY;
    index[K - 1] = kEmptyIndex;
  }

  SOFTMASK_HD void merge(const TopK& other) {
    SOFTMASK_UNROLL
    for (int j = 0; j < K; ++j) push(other.value[j], other.index[j]);
  }
};

// Renormalised probabilities of the k kept logits (softmax at temperature 1 over them), or NaN when the row is
// invalid. Slots beyond a row's valid entries cannot occur for valid rows (k <= V and -inf values do enter).
SOFTMASK_HD void topk_probs(const float* value, int k, bool row_valid, float* probs) {
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) sum += expf(value[j] - value[0]);
  for (int j = 0; j < k; ++j) probs[j] = row_valid ? expf(value[j] - value[0]) / sum : NAN;
}

}  // namespace softmask

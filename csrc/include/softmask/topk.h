// Bounded top-K list kept sorted in registers: K is a compile-time constant so every index below is a
// constant after unrolling (no local-memory arrays on the GPU, no loads/stores through a runtime index on the CPU).
//
// Order: larger value first; equal values by lower index first. An empty slot is (-inf, kEmptyIndex) and ranks
// below every real entry, -inf ones included. NaN never enters (every comparison with it is false).
// This is a strict total order, so the merge of partial lists is the same whatever the split.
#pragma once

#include <cmath>
#include <cstdint>

#include "config.h"

namespace softmask {

constexpr int32_t kEmptyIndex = INT32_MAX;
constexpr int kMaxK = 32;

SOFTMASK_HD bool ranks_before(float va, int32_t ia, float vb, int32_t ib) {
  return va > vb || (va == vb && ia < ib);
}

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

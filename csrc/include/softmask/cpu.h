// CPU entry points of the kernel core (torch-free). Pointers are to contiguous buffers unless a stride is given;
// T is float, bf16_t or f16_t. Each function parallelises with OpenMP over num_threads threads.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace softmask::cpu {

// For each of num_rows rows (row r is logits + (rows ? rows[r] : r) * row_stride, vocab values):
// ids[r, :k] the top-k indices in descending order (ties: lower index first), probs[r, :k] their softmax,
// neg_entropy[r] = sum p log p of softmax(row / temperature). One pass over each row. 1 <= k <= kMaxK.
// rows[r] == kSkipRow marks an output row with nothing to compute: no logits are read, its outputs are zeros.
template <typename T>
void topk_entropy(const T* logits, int64_t row_stride, int64_t vocab, const int64_t* rows, int64_t num_rows, int k,
                  float temperature, int64_t* ids, float* probs, float* neg_entropy, int num_threads);

// out[n, :] = sum_j coeffs[n, j] * weight[ids[n, j], :], fp32 accumulation. weight is [vocab, dim]; ids in range.
template <typename T>
void blend_forward(const T* weight, int64_t dim, const int64_t* ids, const float* coeffs, int64_t n, int64_t m, T* out,
                   int num_threads);

// Gradients of blend_forward: grad_coeffs[n, j] = <grad_out[n], weight[ids[n, j]]> and grad_weight (zeroed by
// the caller; null to skip it) += the coefficient-weighted rows of grad_out. Each touched row of grad_weight is summed
// in fp32 in a fixed order (sorted by id, then position), so the result is deterministic whatever the thread count.
template <typename T>
void blend_backward(const T* grad_out, const T* weight, int64_t dim, const int64_t* ids, const float* coeffs, int64_t n,
                    int64_t m, T* grad_weight, float* grad_coeffs, int num_threads);

// Name of the instruction set the hot loops use on this CPU: "avx512", "avx2" or "baseline".
const char* isa_name();

}  // namespace softmask::cpu

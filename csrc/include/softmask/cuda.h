// CUDA entry points of the kernel core (torch-free): raw device pointers, sizes, strides and a stream. T is float,
// bf16_t or f16_t. Every function only enqueues work on the stream (no host synchronisation, so calls can be
// captured in CUDA graphs) and returns the launch status. Out-of-range rows/ids trigger a device-side assert.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dtypes.h"
#include "topk_variants.h"

namespace softmask::cuda {

// Bytes of device workspace topk_entropy needs (0 when every row fits one thread block) on the current device.
template <typename T>
size_t topk_entropy_workspace_bytes(int64_t num_rows, int64_t vocab, int k, TopKVariant variant);

// Same contract as softmask::cpu::topk_entropy; rows (if not null) must lie in [0, rows_total) or be kSkipRow. When
// there are too few rows to fill the card, each row is split over several blocks whose partial results go to
// `workspace` (topk_entropy_workspace_bytes, queried on the same device and for the same variant) and are merged by a
// second kernel. Every variant gives the same ids and the same probs and neg_entropy up to rounding (topk_variants.h).
template <typename T>
cudaError_t topk_entropy(const T* logits, int64_t row_stride, int64_t vocab, int64_t rows_total, const int64_t* rows,
                         int64_t num_rows, int k, float temperature, int64_t* ids, float* probs, float* neg_entropy,
                         void* workspace, size_t workspace_bytes, TopKVariant variant, cudaStream_t stream);

// out[n, :] = sum_j coeffs[n, j] * weight[ids[n, j], :] (weight [vocab, dim] contiguous), fp32 accumulation.
template <typename T>
cudaError_t blend_forward(const T* weight, int64_t vocab, int64_t dim, const int64_t* ids, const float* coeffs,
                          int64_t n, int64_t m, T* out, cudaStream_t stream);

// Bytes of device workspace blend_backward needs for n * m ids.
size_t blend_backward_workspace_bytes(int64_t items);

// grad_coeffs[n, j] = <grad_out[n], weight[ids[n, j]]>; grad_weight (zeroed by the caller; null to skip it) gets the
// coefficient-weighted rows of grad_out. fp32 weights without `deterministic` use fp32 atomics; otherwise the ids
// are sorted (stably) and each touched row is summed in fp32 by one thread block in position order, which is
// deterministic and keeps fp32 accumulation for 16-bit tables.
template <typename T>
cudaError_t blend_backward(const T* grad_out, const T* weight, int64_t vocab, int64_t dim, const int64_t* ids,
                           const float* coeffs, int64_t n, int64_t m, bool deterministic, void* workspace,
                           size_t workspace_bytes, T* grad_weight, float* grad_coeffs, cudaStream_t stream);

}  // namespace softmask::cuda

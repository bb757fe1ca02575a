// Host entry points of the CUDA top-k + negative entropy: dispatch on the variant to its launcher. The kernels are
// in topk_entropy_kernel.cuh; the baseline's instances are compiled here, the other variants' in their own files.
#include <type_traits>

#include "topk_entropy_kernel.cuh"

namespace softmask::cuda {
namespace topk_impl {

SOFTMASK_TOPK_VARIANT_INSTANCES(, kBaseline)
SOFTMASK_TOPK_VARIANT_INSTANCES(extern, kExactBound)  // topk_entropy_exact_bound.cu
SOFTMASK_TOPK_VARIANT_INSTANCES(extern, kFiltered)    // topk_entropy_filtered.cu

// Calls f(std::integral_constant<TopKVariant, V>{}) for the variant.
template <typename F>
decltype(auto) with_variant(TopKVariant variant, F&& f) {
  switch (variant) {
    case TopKVariant::kExactBound:
      return f(std::integral_constant<TopKVariant, TopKVariant::kExactBound>{});
    case TopKVariant::kFiltered:
      return f(std::integral_constant<TopKVariant, TopKVariant::kFiltered>{});
    case TopKVariant::kBaseline:
      break;
  }
  return f(std::integral_constant<TopKVariant, TopKVariant::kBaseline>{});
}

}  // namespace topk_impl

template <typename T>
size_t topk_entropy_workspace_bytes(int64_t num_rows, int64_t vocab, int k, TopKVariant variant) {
  return topk_impl::with_variant(variant, [&](auto v) {
    return topk_impl::TopKEntropyLauncher<T, decltype(v)::value>::workspace_bytes(num_rows, vocab, k);
  });
}

template <typename T>
cudaError_t topk_entropy(const T* logits, int64_t row_stride, int64_t vocab, int64_t rows_total, const int64_t* rows,
                         int64_t num_rows, int k, float temperature, int64_t* ids, float* probs, float* neg_entropy,
                         void* workspace, size_t workspace_bytes, TopKVariant variant, cudaStream_t stream) {
  const topk_impl::TopKEntropyProblem<T> problem{logits, row_stride,  vocab, rows_total, rows,       num_rows,
                                                 k,      temperature, ids,   probs,      neg_entropy};
  return topk_impl::with_variant(variant, [&](auto v) {
    return topk_impl::TopKEntropyLauncher<T, decltype(v)::value>::launch(problem, workspace, workspace_bytes, stream);
  });
}

#define SOFTMASK_INSTANTIATE(T)                                                                                  \
  template size_t topk_entropy_workspace_bytes<T>(int64_t, int64_t, int, TopKVariant);                           \
  template cudaError_t topk_entropy<T>(const T*, int64_t, int64_t, int64_t, const int64_t*, int64_t, int, float, \
                                       int64_t*, float*, float*, void*, size_t, TopKVariant, cudaStream_t);
SOFTMASK_INSTANTIATE(float)
SOFTMASK_INSTANTIATE(bf16_t)
SOFTMASK_INSTANTIATE(f16_t)
#undef SOFTMASK_INSTANTIATE

}  // namespace softmask::cuda

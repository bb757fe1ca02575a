// CUDA implementations of the softmask_ext ops: checks, dtype dispatch, the current stream, and calls into the
// torch-free CUDA core. Nothing here synchronises with the host: index ranges are asserted on the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "dispatch.h"
#include "op_args.h"
#include "softmask/cuda.h"
#include "softmask/topk_variants.h"

namespace softmask_ext {
namespace {

// The top-k/entropy kernel variant named by SOFTMASK_TOPK_VARIANT (read at every call, so that tests and
// benchmarks can switch within one process), or the default when it is unset or empty.
softmask::TopKVariant topk_variant_from_env() {
  const char* name = std::getenv("SOFTMASK_TOPK_VARIANT");
  softmask::TopKVariant variant = softmask::kDefaultTopKVariant;
  if (name == nullptr || *name == '\0') return variant;
  TORCH_CHECK_VALUE(softmask::parse_topk_variant(name, &variant), "topk_entropy: SOFTMASK_TOPK_VARIANT=", name,
                    " is not a kernel variant; expected one of ", topk_variant_names());
  return variant;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_entropy_cuda(const at::Tensor& logits, int64_t k,
                                                                 const std::optional<at::Tensor>& rows,
                                                                 double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const TopKEntropyCall call = prepare_topk_entropy(logits, k, rows, temperature);
  const softmask::TopKVariant variant = topk_variant_from_env();
  if (call.num_rows > 0) {
    dispatch_float(logits.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const size_t workspace_bytes =
          softmask::cuda::topk_entropy_workspace_bytes<T>(call.num_rows, call.vocab, static_cast<int>(k), variant);
      const at::Tensor workspace =
          at::empty({static_cast<int64_t>(workspace_bytes)}, logits.options().dtype(at::kByte));
      C10_CUDA_CHECK(softmask::cuda::topk_entropy<T>(
          typed<const T>(call.flat), call.row_stride, call.vocab, call.flat.size(0), call.row_index(), call.num_rows,
          static_cast<int>(k), static_cast<float>(temperature), call.ids.data_ptr<int64_t>(),
          call.probs.data_ptr<float>(), call.neg_entropy.data_ptr<float>(), workspace.data_ptr(), workspace_bytes,
          variant, c10::cuda::getCurrentCUDAStream()));
    });
  }
  return {call.ids, call.probs, call.neg_entropy};
}

at::Tensor blend_embeddings_cuda(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& coeffs) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const BlendCall call = prepare_blend(weight, ids, coeffs);
  if (call.out.numel() == 0) return call.out;
  if (call.m() == 0) return call.out.zero_();
  dispatch_float(weight.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(softmask::cuda::blend_forward<T>(
        typed<const T>(call.weight), call.vocab(), call.dim(), call.ids.data_ptr<int64_t>(),
        call.coeffs.data_ptr<float>(), call.n(), call.m(), typed<T>(call.out), c10::cuda::getCurrentCUDAStream()));
  });
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> blend_embeddings_backward_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                                                  const at::Tensor& ids, const at::Tensor& coeffs,
                                                                  bool deterministic, bool weight_grad) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const BlendBackwardCall call = prepare_blend_backward(grad_out, weight, ids, coeffs, weight_grad);
  const BlendCall& in = call.inputs;
  if (in.ids.numel() > 0 && in.dim() > 0) {
    const size_t workspace_bytes = softmask::cuda::blend_backward_workspace_bytes(in.ids.numel());
    const at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, weight.options().dtype(at::kByte));
    dispatch_float(weight.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      C10_CUDA_CHECK(softmask::cuda::blend_backward<T>(
          typed<const T>(call.grad_out), typed<const T>(in.weight), in.vocab(), in.dim(), in.ids.data_ptr<int64_t>(),
          in.coeffs.data_ptr<float>(), in.n(), in.m(), deterministic, workspace.data_ptr(), workspace_bytes,
          call.weight_grad ? typed<T>(call.grad_weight) : nullptr, call.grad_coeffs.data_ptr<float>(),
          c10::cuda::getCurrentCUDAStream()));
    });
  }
  return {call.grad_weight, call.grad_coeffs.to(coeffs.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmask_ext, CUDA, m) {
  m.impl("topk_entropy", &topk_entropy_cuda);
  m.impl("blend_embeddings", &blend_embeddings_cuda);
  m.impl("blend_embeddings_backward", &blend_embeddings_backward_cuda);
}

}  // namespace softmask_ext

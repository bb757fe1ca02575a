// CPU implementations of the softmask_ext ops: checks, dtype dispatch, and calls into the torch-free core.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "dispatch.h"
#include "op_args.h"
#include "softmask/cpu.h"

namespace softmask_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_entropy_cpu(const at::Tensor& logits, int64_t k,
                                                                const std::optional<at::Tensor>& rows,
                                                                double temperature) {
  const TopKEntropyCall call = prepare_topk_entropy(logits, k, rows, temperature);
  if (call.rows.defined()) check_index_range("topk_entropy", "rows", call.rows, call.flat.size(0), softmask::kSkipRow);
  if (call.num_rows > 0) {
    dispatch_float(logits.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      softmask::cpu::topk_entropy<T>(typed<const T>(call.flat), call.row_stride, call.vocab, call.row_index(),
                                     call.num_rows, static_cast<int>(k), static_cast<float>(temperature),
                                     call.ids.data_ptr<int64_t>(), call.probs.data_ptr<float>(),
                                     call.neg_entropy.data_ptr<float>(), at::get_num_threads());
    });
  }
  return {call.ids, call.probs, call.neg_entropy};
}

at::Tensor blend_embeddings_cpu(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& coeffs) {
  const BlendCall call = prepare_blend(weight, ids, coeffs);
  check_index_range("blend_embeddings", "ids", call.ids, call.vocab());
  if (call.out.numel() == 0) return call.out;
  if (call.m() == 0) return call.out.zero_();
  dispatch_float(weight.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    softmask::cpu::blend_forward<T>(typed<const T>(call.weight), call.dim(), call.ids.data_ptr<int64_t>(),
                                    call.coeffs.data_ptr<float>(), call.n(), call.m(), typed<T>(call.out),
                                    at::get_num_threads());
  });
  return call.out;
}

// The CPU backward is deterministic whatever the flag (each table row is summed by one thread in a fixed order).
std::tuple<at::Tensor, at::Tensor> blend_embeddings_backward_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                                 const at::Tensor& ids, const at::Tensor& coeffs,
                                                                 bool /*deterministic*/, bool weight_grad) {
  const BlendBackwardCall call = prepare_blend_backward(grad_out, weight, ids, coeffs, weight_grad);
  const BlendCall& in = call.inputs;
  check_index_range("blend_embeddings_backward", "ids", in.ids, in.vocab());
  if (in.ids.numel() > 0 && in.dim() > 0) {
    dispatch_float(weight.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      softmask::cpu::blend_backward<T>(typed<const T>(call.grad_out), typed<const T>(in.weight), in.dim(),
                                       in.ids.data_ptr<int64_t>(), in.coeffs.data_ptr<float>(), in.n(), in.m(),
                                       call.weight_grad ? typed<T>(call.grad_weight) : nullptr,
                                       call.grad_coeffs.data_ptr<float>(), at::get_num_threads());
    });
  }
  return {call.grad_weight, call.grad_coeffs.to(coeffs.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmask_ext, CPU, m) {
  m.impl("topk_entropy", &topk_entropy_cpu);
  m.impl("blend_embeddings", &blend_embeddings_cpu);
  m.impl("blend_embeddings_backward", &blend_embeddings_backward_cpu);
}

}  // namespace softmask_ext

// Op schemas of the softmask_ext library and the Python module that loads them. The CPU and CUDA
// implementations are registered in cpu_ops.cpp and cuda_ops.cpp.
//
// blend_embeddings_backward returns (grad_weight [V, D] in weight's dtype, grad_coeffs in coeffs' dtype); with
// weight_grad=false (a frozen table) grad_weight is an empty [0, D] tensor, sparing a [V, D] allocation per step.
#include <torch/extension.h>

#include "softmask/cpu.h"
#include "softmask/topk.h"
#include "softmask/topk_variants.h"

TORCH_LIBRARY(softmask_ext, m) {
  m.def("topk_entropy(Tensor logits, int k, Tensor? rows=None, float temperature=1.0) -> (Tensor, Tensor, Tensor)");
  m.def("blend_embeddings(Tensor weight, Tensor ids, Tensor coeffs) -> Tensor");
  m.def(
      "blend_embeddings_backward(Tensor grad_out, Tensor weight, Tensor ids, Tensor coeffs, bool deterministic, "
      "bool weight_grad=True) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "softmask_ext kernels; the ops live in torch.ops.softmask_ext";
#ifdef SOFTMASK_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.attr("MAX_K") = softmask::kMaxK;
  module.attr("SKIP_ROW") = softmask::kSkipRow;
  // Variants of the CUDA top-k/entropy kernel; SOFTMASK_TOPK_VARIANT selects one at run time.
  pybind11::tuple variants(softmask::kNumTopKVariants);
  for (int i = 0; i < softmask::kNumTopKVariants; ++i) variants[i] = softmask::kTopKVariantNames[i];
  module.attr("TOPK_VARIANTS") = variants;
  module.attr("DEFAULT_TOPK_VARIANT") = softmask::kTopKVariantNames[static_cast<int>(softmask::kDefaultTopKVariant)];
  module.def("cpu_isa", &softmask::cpu::isa_name, "Instruction set the CPU kernels use on this machine");
}

// Argument checks and output allocation shared by the CPU and CUDA implementations of the ops. Messages name the
// op, the argument and what was expected, since they surface in Python as ValueError / TypeError / IndexError.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "softmask/topk.h"
#include "softmask/topk_variants.h"

namespace softmask_ext {

using softmask::kMaxK;

// "baseline, exact_bound, ..." for messages.
inline std::string topk_variant_names() {
  std::string names;
  for (int i = 0; i < softmask::kNumTopKVariants; ++i) {
    names += (i ? ", " : "");
    names += softmask::kTopKVariantNames[i];
  }
  return names;
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", dtype);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
                    like.device());
}

// topk_entropy's validated inputs (logits as [rows_total, V] with a row stride) and its allocated outputs.
struct TopKEntropyCall {
  at::Tensor flat;  // [rows_total, V], last dimension contiguous
  at::Tensor rows;  // contiguous int64 row indices, or undefined for every row
  int64_t num_rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;
  at::Tensor ids, probs, neg_entropy;

  const int64_t* row_index() const { return rows.defined() ? rows.data_ptr<int64_t>() : nullptr; }
};

inline TopKEntropyCall prepare_topk_entropy(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& rows,
                                            double temperature) {
  constexpr const char* op = "topk_entropy";
  check_float_dtype(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": logits must have at least one dimension (the vocabulary)");
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxK, op, ": k must be between 1 and ", kMaxK, ", got ", k);
  TORCH_CHECK_VALUE(k <= vocab, op, ": k=", k, " exceeds the vocabulary size V=", vocab);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be a positive finite number, got ", temperature);
  TORCH_CHECK_VALUE(logits.stride(-1) == 1 || vocab == 1, op,
                    ": the last (vocabulary) dimension of logits must be contiguous (stride 1), got stride ",
                    logits.stride(-1));
  TopKEntropyCall call;
  call.flat = logits.reshape({-1, vocab});
  call.vocab = vocab;
  call.row_stride = call.flat.size(0) > 1 ? call.flat.stride(0) : vocab;
  std::vector<int64_t> lead;
  if (rows.has_value()) {
    TORCH_CHECK_TYPE(rows->scalar_type() == at::kLong, op, ": rows must be int64, got ", rows->scalar_type());
    check_same_device(op, "rows", *rows, logits);
    call.rows = rows->contiguous();
    lead = rows->sizes().vec();
    call.num_rows = rows->numel();
  } else {
    lead = logits.sizes().slice(0, logits.dim() - 1).vec();
    call.num_rows = call.flat.size(0);
  }
  std::vector<int64_t> ids_shape = lead;
  ids_shape.push_back(k);
  call.ids = at::empty(ids_shape, logits.options().dtype(at::kLong));
  call.probs = at::empty(ids_shape, logits.options().dtype(at::kFloat));
  call.neg_entropy = at::empty(lead, logits.options().dtype(at::kFloat));
  return call;
}

inline void check_blend(const char* op, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& coeffs) {
  check_float_dtype(op, "weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [V, D], got shape ", weight.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2, op, ": ids must be [N, m], got shape ", ids.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(coeffs.scalar_type()), op, ": coeffs must be a floating tensor, got ",
                   coeffs.scalar_type());
  TORCH_CHECK_VALUE(coeffs.sizes() == ids.sizes(), op, ": coeffs must have the shape of ids ", ids.sizes(), ", got ",
                    coeffs.sizes());
  TORCH_CHECK_VALUE(ids.numel() < std::numeric_limits<int32_t>::max(), op, ": too many ids (", ids.numel(), ")");
  check_same_device(op, "ids", ids, weight);
  check_same_device(op, "coeffs", coeffs, weight);
}

// blend_embeddings' inputs in the layouts the kernels take (contiguous; coeffs in fp32) and its output.
struct BlendCall {
  at::Tensor weight, ids, coeffs, out;
  int64_t n() const { return ids.size(0); }
  int64_t m() const { return ids.size(1); }
  int64_t vocab() const { return weight.size(0); }
  int64_t dim() const { return weight.size(1); }
};

inline BlendCall prepare_blend(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& coeffs) {
  check_blend("blend_embeddings", weight, ids, coeffs);
  return {weight.contiguous(), ids.contiguous(), coeffs.to(at::kFloat).contiguous(),
          at::empty({ids.size(0), weight.size(1)}, weight.options())};
}

// blend_embeddings_backward's inputs (as above) and its outputs: grad_weight zeroed (or [0, D] when the table is
// frozen), grad_coeffs in fp32 (converted to coeffs' dtype on return).
struct BlendBackwardCall {
  BlendCall inputs;
  at::Tensor grad_out, grad_weight, grad_coeffs;
  bool weight_grad = true;
};

inline BlendBackwardCall prepare_blend_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                                const at::Tensor& ids, const at::Tensor& coeffs, bool weight_grad) {
  constexpr const char* op = "blend_embeddings_backward";
  check_blend(op, weight, ids, coeffs);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out must have weight's dtype ",
                   weight.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == ids.size(0) && grad_out.size(1) == weight.size(1), op,
                    ": grad_out must be [N, D] = [", ids.size(0), ", ", weight.size(1), "], got ", grad_out.sizes());
  check_same_device(op, "grad_out", grad_out, weight);
  BlendBackwardCall call;
  call.inputs = {weight.contiguous(), ids.contiguous(), coeffs.to(at::kFloat).contiguous(), at::Tensor()};
  call.grad_out = grad_out.contiguous();
  call.grad_weight = weight_grad ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                                 : at::empty({0, weight.size(1)}, weight.options());
  call.grad_coeffs = at::zeros(ids.sizes(), coeffs.options().dtype(at::kFloat));
  call.weight_grad = weight_grad;
  return call;
}

// Host-side range check (CPU tensors only: on CUDA the kernels assert on the device instead of syncing).
// index must lie in [lowest, bound); lowest is 0, or kSkipRow where the op accepts it.
inline void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t bound,
                              int64_t lowest = 0) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const int64_t lo_value = lo.item<int64_t>();
  const int64_t hi_value = hi.item<int64_t>();
  TORCH_CHECK_INDEX(lo_value >= lowest && hi_value < bound, op, ": ", name, " must lie in [", lowest, ", ", bound,
                    "), got values in [", lo_value, ", ", hi_value, "]");
}

}  // namespace softmask_ext

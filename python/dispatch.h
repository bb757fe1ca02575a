// dtype dispatch from torch tensors to the core's storage types (float, softmask::bf16_t, softmask::f16_t).
#pragma once

#include <torch/types.h>

#include "softmask/dtypes.h"

namespace softmask_ext {

// Calls fn with a typed null pointer (float*, softmask::bf16_t* or softmask::f16_t*) for the dtype.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      return;
    case at::kBFloat16:
      fn(static_cast<softmask::bf16_t*>(nullptr));
      return;
    case at::kHalf:
      fn(static_cast<softmask::f16_t*>(nullptr));
      return;
    default:
      TORCH_CHECK_TYPE(false, "softmask_ext: unsupported dtype ", dtype);
  }
}

// The tensor's data as the core's storage type (at::BFloat16 / at::Half have the same 2-byte layout).
template <typename T>
T* typed(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace softmask_ext

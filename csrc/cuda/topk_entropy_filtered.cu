// Instances of the kFiltered variant of the CUDA top-k + negative entropy (topk_entropy_kernel.cuh), compiled apart
// from the other variants so that the builds run in parallel.
#include "topk_entropy_kernel.cuh"

namespace softmask::cuda::topk_impl {

SOFTMASK_TOPK_VARIANT_INSTANCES(, kFiltered)

}  // namespace softmask::cuda::topk_impl

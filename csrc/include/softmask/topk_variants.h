// Implementations of the CUDA top-k/entropy kernel that can be chosen at run time (torch-free and CUDA-free, so the
// CPU-only build exposes the same names). The default is the one measured fastest on a GPU; the others are
// candidates kept selectable until a GPU run has compared them (see docs/kernels.md).
#pragma once

#include <cstring>

namespace softmask {

enum class TopKVariant : int {
  kBaseline = 0,    // per-lane top-k lists; a shared lower bound from the lanes' heads and lists
  kExactBound = 1,  // as kBaseline, with the bound seeded from the first round's lane maxima and made exact
  kFiltered = 2,    // no per-lane lists: values above the block's bound are collected in shared memory
};

constexpr const char* kTopKVariantNames[] = {"baseline", "exact_bound", "filtered"};
constexpr int kNumTopKVariants = sizeof(kTopKVariantNames) / sizeof(kTopKVariantNames[0]);
constexpr TopKVariant kDefaultTopKVariant = TopKVariant::kBaseline;

// The variant called `name`; false if there is none.
inline bool parse_topk_variant(const char* name, TopKVariant* variant) {
  for (int i = 0; i < kNumTopKVariants; ++i) {
    if (std::strcmp(name, kTopKVariantNames[i]) == 0) {
      *variant = static_cast<TopKVariant>(i);
      return true;
    }
  }
  return false;
}

}  // namespace softmask

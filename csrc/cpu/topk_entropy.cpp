// CPU top-k + negative entropy: one pass over each row in L1-sized chunks. Per chunk, while it is in cache: the
// maxima of its 64-value blocks, a scalar top-k scan of only those blocks that can hold a newcomer, and the
// exp-sums of the online entropy state. OpenMP over rows; the hot loops are compiled for the
// baseline, AVX2 and AVX-512 and chosen at run time.
#include <algorithm>
#include <type_traits>

#include "isa_dispatch.h"
#include "softmask/cpu.h"
#include "softmask/online_entropy.h"
#include "softmask/topk.h"

namespace softmask::cpu {
namespace {

constexpr int64_t kChunk = 1024;  // 4 KiB of fp32: the chunk stays in L1 between its passes
// 16 KiB of fp32 ahead: in a microbenchmark on Zen 4 this halved the time of a max pass over a DRAM-resident row.
constexpr int64_t kPrefetchDistance = 4 * kChunk;
template <typename T>
constexpr int64_t kLineElements = 64 / sizeof(T);
constexpr int kBlock = 64;
constexpr int kBlocksPerChunk = kChunk / kBlock;

struct RowOutput {
  int64_t* ids;
  float* probs;
  float* neg_entropy;
};

template <typename T, int K>
inline __attribute__((always_inline)) void process_row(const T* row, int64_t vocab, int k, float scale, RowOutput out) {
  TopK<K> top;
  top.clear();
  Base2Entropy state;
  // The state's reference in logit units: (x - reference) * scale is exactly 0 at the maximum (a fused x * scale - m
  // would leave the product's rounding error there), so a one-hot row has a negative entropy of exactly 0.
  float reference = -FLT_MAX;
  alignas(64) float converted[kChunk];

  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int n = static_cast<int>(std::min(kChunk, vocab - begin));
    // The exp pass keeps the core busy for long stretches without loads; prefetching ahead keeps the memory
    // stream going meanwhile.
    const int64_t ahead = begin + kPrefetchDistance;
    for (int64_t i = ahead; i < std::min(ahead + kChunk, vocab); i += kLineElements<T>) __builtin_prefetch(row + i);
    const float* x;
    if constexpr (std::is_same_v<T, float>) {
      x = row + begin;
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) converted[i] = to_float(row[begin + i]);
      x = converted;
    }

    // Maxima of 64-value blocks: the chunk maximum for the entropy state, and a filter so that the scalar top-k
    // scan visits only blocks that can hold a newcomer (few, once the list holds large values).
    alignas(64) float block_max[kBlocksPerChunk];
    const int blocks = (n + kBlock - 1) / kBlock;
    for (int b = 0; b < blocks; ++b) {
      const int end = std::min(n, (b + 1) * kBlock);
      float m = -INFINITY;  // NaN is skipped here; it reaches the state through the exp pass below
#pragma omp simd reduction(max : m)
      for (int i = b * kBlock; i < end; ++i) m = x[i] > m ? x[i] : m;
      block_max[b] = m;
    }
    float chunk_max = -INFINITY;
    for (int b = 0; b < blocks; ++b) chunk_max = block_max[b] > chunk_max ? block_max[b] : chunk_max;

    for (int b = 0; b < blocks; ++b) {
      if (block_max[b] > top.threshold() || !top.full()) {
        const int end = std::min(n, (b + 1) * kBlock);
        for (int i = b * kBlock; i < end; ++i) top.push(x[i], static_cast<int32_t>(begin + i));
      }
    }

    if (chunk_max > reference) {
      state.rescale_to(chunk_max * scale);
      reference = chunk_max;
    }
    const float m = reference;
    float s = 0.0f;
    float t = 0.0f;
#pragma omp simd reduction(+ : s, t)
    for (int i = 0; i < n; ++i) {
      float d;
      const float e = softmax_term2((x[i] - m) * scale, &d);
      s += e;
      t += e * d;
    }
    state.s += s;
    state.t += t;
  }

  const float neg_entropy = state.natural().neg_entropy();
  *out.neg_entropy = neg_entropy;
  topk_probs(top.value, k, !std::isnan(neg_entropy), out.probs);
  for (int j = 0; j < k; ++j) out.ids[j] = top.index[j] == kEmptyIndex ? 0 : top.index[j];  // only in NaN rows
}

template <typename T>
using RowFn = void (*)(const T*, int64_t, int, float, RowOutput);

template <typename T, int K>
void row_baseline(const T* row, int64_t vocab, int k, float scale, RowOutput out) {
  process_row<T, K>(row, vocab, k, scale, out);
}

#if SOFTMASK_X86_DISPATCH
template <typename T, int K>
SOFTMASK_TARGET_AVX2 void row_avx2(const T* row, int64_t vocab, int k, float scale, RowOutput out) {
  process_row<T, K>(row, vocab, k, scale, out);
}

template <typename T, int K>
SOFTMASK_TARGET_AVX512 void row_avx512(const T* row, int64_t vocab, int k, float scale, RowOutput out) {
  process_row<T, K>(row, vocab, k, scale, out);
}
#endif

template <typename T, int K>
RowFn<T> row_fn_for_isa() {
#if SOFTMASK_X86_DISPATCH
  switch (detected_isa()) {
    case Isa::kAvx512:
      return row_avx512<T, K>;
    case Isa::kAvx2:
      return row_avx2<T, K>;
    case Isa::kBaseline:
      break;
  }
#endif
  return row_baseline<T, K>;
}

// The list size is a compile-time bucket >= k, so the top-k list lives in registers.
template <typename T>
RowFn<T> row_fn(int k) {
  return with_k_bucket(k, [](auto bucket) { return row_fn_for_isa<T, decltype(bucket)::value>(); });
}

}  // namespace

const char* isa_name() {
  switch (detected_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      break;
  }
  return "baseline";
}

template <typename T>
void topk_entropy(const T* logits, int64_t row_stride, int64_t vocab, const int64_t* rows, int64_t num_rows, int k,
                  float temperature, int64_t* ids, float* probs, float* neg_entropy, int num_threads) {
  const RowFn<T> fn = row_fn<T>(k);
  const float scale = kLog2e / temperature;  // the entropy state works in base 2
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t source = rows ? rows[r] : r;
    if (source == kSkipRow) {
      std::fill_n(ids + r * k, k, int64_t{0});
      std::fill_n(probs + r * k, k, 0.0f);
      neg_entropy[r] = 0.0f;
      continue;
    }
    fn(logits + source * row_stride, vocab, k, scale, RowOutput{ids + r * k, probs + r * k, neg_entropy + r});
  }
}

template void topk_entropy<float>(const float*, int64_t, int64_t, const int64_t*, int64_t, int, float, int64_t*, float*,
                                  float*, int);
template void topk_entropy<bf16_t>(const bf16_t*, int64_t, int64_t, const int64_t*, int64_t, int, float, int64_t*,
                                   float*, float*, int);
template void topk_entropy<f16_t>(const f16_t*, int64_t, int64_t, const int64_t*, int64_t, int, float, int64_t*, float*,
                                  float*, int);

}  // namespace softmask::cpu

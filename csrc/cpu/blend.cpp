// CPU embedding blend: forward is a gather of m rows per output row with fp32 accumulation; backward sums each
// touched row of the table over the (sorted) positions that read it, so no two threads write the same row and
// the summation order is fixed. Work is split into (row, column block) tiles so that few rows still use all threads.
// These loops move few bytes per flop and are memory-bound, so they are compiled for the baseline ISA only.
#include <algorithm>
#include <numeric>
#include <vector>

#include "softmask/cpu.h"

namespace softmask::cpu {
namespace {

constexpr int64_t kColumnBlock = 512;
// Below this many multiply-adds a parallel region costs more than it saves (and, on a busy machine, a wait for a
// descheduled thread).
constexpr int64_t kParallelWork = int64_t{1} << 21;

int64_t column_blocks(int64_t dim) { return (dim + kColumnBlock - 1) / kColumnBlock; }

// acc[:width] += c * src[:width]
template <typename T>
inline __attribute__((always_inline)) void axpy(float* acc, float c, const T* src, int64_t width) {
#pragma omp simd
  for (int64_t d = 0; d < width; ++d) acc[d] += c * to_float(src[d]);
}

template <typename T>
inline __attribute__((always_inline)) void store(T* dst, const float* acc, int64_t width) {
#pragma omp simd
  for (int64_t d = 0; d < width; ++d) dst[d] = from_float<T>(acc[d]);
}

template <typename T>
inline __attribute__((always_inline)) float dot(const T* a, const T* b, int64_t width) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < width; ++d) sum += to_float(a[d]) * to_float(b[d]);
  return sum;
}

// One output tile: out[n, d0:d0+width].
template <typename T>
inline __attribute__((always_inline)) void forward_tile(const T* weight, int64_t dim, const int64_t* ids,
                                                        const float* coeffs, int64_t m, int64_t d0, int64_t width,
                                                        T* out) {
  alignas(64) float acc[kColumnBlock] = {};
  for (int64_t j = 0; j < m; ++j) axpy(acc, coeffs[j], weight + ids[j] * dim + d0, width);
  store(out + d0, acc, width);
}

// One table tile: grad_weight[id, d0:d0+width] = sum over the positions p that read row id.
template <typename T>
inline __attribute__((always_inline)) void backward_tile(const T* grad_out, int64_t dim, int64_t m, const float* coeffs,
                                                         const int32_t* positions, int64_t count, int64_t d0,
                                                         int64_t width, T* grad_row) {
  alignas(64) float acc[kColumnBlock] = {};
  for (int64_t p = 0; p < count; ++p) {
    const int64_t flat = positions[p];
    axpy(acc, coeffs[flat], grad_out + (flat / m) * dim + d0, width);
  }
  store(grad_row + d0, acc, width);
}

}  // namespace

template <typename T>
void blend_forward(const T* weight, int64_t dim, const int64_t* ids, const float* coeffs, int64_t n, int64_t m, T* out,
                   int num_threads) {
  const int64_t blocks = column_blocks(dim);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (n * m * dim >= kParallelWork)
  for (int64_t tile = 0; tile < n * blocks; ++tile) {
    const int64_t row = tile / blocks;
    const int64_t d0 = (tile % blocks) * kColumnBlock;
    forward_tile(weight, dim, ids + row * m, coeffs + row * m, m, d0, std::min(kColumnBlock, dim - d0),
                 out + row * dim);
  }
}

template <typename T>
void blend_backward(const T* grad_out, const T* weight, int64_t dim, const int64_t* ids, const float* coeffs, int64_t n,
                    int64_t m, T* grad_weight, float* grad_coeffs, int num_threads) {
  const int64_t items = n * m;
  const bool parallel = items * dim >= kParallelWork;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t flat = 0; flat < items; ++flat) {
    grad_coeffs[flat] = dot(grad_out + (flat / m) * dim, weight + ids[flat] * dim, dim);
  }
  if (grad_weight == nullptr) return;

  // Positions sorted by (id, position); each run of equal ids is one segment that owns one row of grad_weight.
  std::vector<int32_t> order(static_cast<size_t>(items));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [ids](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  std::vector<int64_t> segment_starts;
  for (int64_t i = 0; i < items; ++i) {
    if (i == 0 || ids[order[i]] != ids[order[i - 1]]) segment_starts.push_back(i);
  }
  const int64_t segments = static_cast<int64_t>(segment_starts.size());
  segment_starts.push_back(items);

  const int64_t blocks = column_blocks(dim);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t tile = 0; tile < segments * blocks; ++tile) {
    const int64_t segment = tile / blocks;
    const int64_t d0 = (tile % blocks) * kColumnBlock;
    const int64_t begin = segment_starts[segment];
    const int64_t count = segment_starts[segment + 1] - begin;
    backward_tile(grad_out, dim, m, coeffs, order.data() + begin, count, d0, std::min(kColumnBlock, dim - d0),
                  grad_weight + ids[order[begin]] * dim);
  }
}

#define SOFTMASK_INSTANTIATE(T)                                                                                    \
  template void blend_forward<T>(const T*, int64_t, const int64_t*, const float*, int64_t, int64_t, T*, int);      \
  template void blend_backward<T>(const T*, const T*, int64_t, const int64_t*, const float*, int64_t, int64_t, T*, \
                                  float*, int);
SOFTMASK_INSTANTIATE(float)
SOFTMASK_INSTANTIATE(bf16_t)
SOFTMASK_INSTANTIATE(f16_t)
#undef SOFTMASK_INSTANTIATE

}  // namespace softmask::cpu

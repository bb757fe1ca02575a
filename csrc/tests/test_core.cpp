// Unit tests of the torch-free kernel core (run by ctest): the shared math headers, then the CPU kernels against
// straightforward double-precision references.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "softmask/cpu.h"
#include "softmask/dtypes.h"
#include "softmask/online_entropy.h"
#include "softmask/topk.h"

namespace {

int failures = 0;

// Records a failure with a printf-style explanation and carries on, so one run reports every broken case.
#define CHECK(cond, ...)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ++failures;                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                            \
      std::fprintf(stderr, "\n");                                                   \
    }                                                                               \
  } while (0)

using namespace softmask;

void test_exp_accuracy() {
  float d_unused = 0.0f;
  double worst = 0.0;
  for (int i = 0; i <= 1000000; ++i) {
    const float d = -87.0f * static_cast<float>(i) / 1000000.0f;
    const double exact = std::exp(static_cast<double>(d));
    worst = std::max(worst, std::abs(exp_nonpositive(d) - exact) / exact);
  }
  CHECK(worst < 5e-7, "exp_nonpositive relative error %g", worst);
  CHECK(std::isnan(exp_nonpositive(NAN)), "NaN must propagate");
  worst = 0.0;
  for (int i = 0; i <= 1000000; ++i) {
    const float y = -126.0f * static_cast<float>(i) / 1000000.0f;
    const double exact = std::exp2(static_cast<double>(y));
    worst = std::max(worst, std::abs(exp2_nonpositive(y) - exact) / exact);
  }
  CHECK(worst < 5e-7, "exp2_nonpositive relative error %g", worst);
  CHECK(exp2_nonpositive(-127.0f) == 0.0f && exp2_nonpositive(-INFINITY) == 0.0f, "2^y flushes to 0 below -126.5");
  CHECK(std::isnan(exp2_nonpositive(NAN)), "NaN must propagate through 2^y");
  CHECK(softmax_term2(-INFINITY, &d_unused) == 0.0f && d_unused == kMinExponent2, "-inf gives an exactly zero term");
  CHECK(std::isnan(softmax_term2(NAN, &d_unused)), "NaN gives a NaN term in base 2");
  float d = 0.0f;
  CHECK(softmax_term(-INFINITY, &d) == 0.0f && d == kMinExponent, "-inf gives an exactly zero term");
  CHECK(std::isnan(softmax_term(NAN, &d)) && std::isnan(d), "NaN gives a NaN term");
}

double bf16_reference(float x) {  // nearest bf16 by exhaustive comparison of the two neighbours, ties to even
  const uint32_t u = float_to_bits(x);
  const uint32_t lo = u & 0xffff0000u;
  const uint32_t hi = lo + 0x10000u;
  const double dlo = std::abs(static_cast<double>(bits_to_float(lo)) - x);
  const double dhi = std::abs(static_cast<double>(bits_to_float(hi)) - x);
  if (dlo < dhi) return bits_to_float(lo);
  if (dhi < dlo) return bits_to_float(hi);
  return bits_to_float(((lo >> 16) & 1u) ? hi : lo);
}

void test_16bit_conversions() {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const f16_t half{static_cast<uint16_t>(h)};
    const float f = to_float(half);
    _Float16 native;
    std::memcpy(&native, &half, sizeof native);
    const float expected = static_cast<float>(native);
    CHECK((std::isnan(f) && std::isnan(expected)) || float_to_bits(f) == float_to_bits(expected) ||
              (f == 0.0f && expected == 0.0f),
          "f16 %04x decodes to %a, expected %a", h, f, expected);
    if (!std::isnan(f)) CHECK(from_float<f16_t>(f).bits == h, "f16 %04x does not round-trip", h);
    const bf16_t brain{static_cast<uint16_t>(h)};
    const float b = to_float(brain);
    if (!std::isnan(b)) CHECK(from_float<bf16_t>(b).bits == h, "bf16 %04x does not round-trip", h);
    else CHECK(std::isnan(to_float(from_float<bf16_t>(b))), "bf16 NaN must stay NaN");
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 2000000; ++i) {
    const float x = bits_to_float(any_bits(rng));
    if (std::isnan(x)) continue;
    const _Float16 expected_half = static_cast<_Float16>(x);
    const f16_t got = from_float<f16_t>(x);
    CHECK(std::memcmp(&got, &expected_half, 2) == 0, "f16 rounding of %a", x);
    if (std::abs(x) < 3.3e38f) CHECK(to_float(from_float<bf16_t>(x)) == bf16_reference(x), "bf16 rounding of %a", x);
  }
}

template <int K>
void test_topk_against_sort() {
  std::mt19937 rng(K);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 300);
    std::vector<float> x(n);
    for (auto& v : x) v = static_cast<float>(static_cast<int>(rng() % 7)) - 3.0f;  // many ties
    if (trial % 3 == 0) x[rng() % n] = -INFINITY;
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return x[a] > x[b]; });

    TopK<K> whole, left, right;
    whole.clear();
    left.clear();
    right.clear();
    for (int i = 0; i < n; ++i) whole.push(x[i], i);
    for (int i = n - 1; i >= 0; --i) (i % 2 ? left : right).push(x[i], i);  // any order, any split
    left.merge(right);
    for (int j = 0; j < std::min(K, n); ++j) {
      CHECK(whole.index[j] == order[j], "K=%d slot %d: %d, expected %d", K, j, whole.index[j], order[j]);
      CHECK(left.index[j] == order[j], "merged K=%d slot %d: %d, expected %d", K, j, left.index[j], order[j]);
    }
  }
}

double neg_entropy_reference(const std::vector<float>& x, double temperature) {
  double m = -INFINITY;
  for (float v : x) m = std::max(m, v / temperature);
  double s = 0.0;
  for (float v : x) s += std::exp(v / temperature - m);
  double h = 0.0;
  for (float v : x) {
    const double p = std::exp(v / temperature - m) / s;
    if (p > 0) h += p * std::log(p);
  }
  return h;
}

void test_k_buckets() {
  int previous = 0;
  for (int k = 1; k <= kMaxK; ++k) {
    const int bucket = with_k_bucket(k, [](auto b) { return decltype(b)::value; });
    CHECK(bucket >= k && bucket <= kMaxK, "k=%d is served by bucket %d", k, bucket);
    CHECK(bucket >= previous, "buckets must not shrink as k grows (k=%d: %d after %d)", k, bucket, previous);
    previous = bucket;
  }
  for (int k = 1; k <= 5; ++k) {
    CHECK(with_k_bucket(k, [](auto b) { return decltype(b)::value; }) == k, "k=%d must have a bucket of its own", k);
  }
  CHECK(with_k_bucket(kMaxK, [](auto b) { return decltype(b)::value; }) == kMaxK, "the last bucket is kMaxK");
}

void test_entropy_state_merge() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> x(5000);
  for (auto& v : x) v = normal(rng);
  x[10] = -INFINITY;
  EntropyState whole = EntropyState::empty();
  for (float v : x) {
    if (v > whole.m) whole.rescale_to(v);
    whole.add(v);
  }
  EntropyState parts[7];
  for (auto& p : parts) p = EntropyState::empty();
  for (size_t i = 0; i < x.size(); ++i) {
    EntropyState& p = parts[(i * 2654435761u) % 7];
    if (x[i] > p.m) p.rescale_to(x[i]);
    p.add(x[i]);
  }
  EntropyState merged = EntropyState::empty();
  for (const auto& p : parts) merged.merge(p);
  const double expected = neg_entropy_reference(x, 1.0);
  CHECK(std::abs(whole.neg_entropy() - expected) < 1e-5, "sequential %g vs %g", whole.neg_entropy(), expected);
  CHECK(std::abs(merged.neg_entropy() - expected) < 1e-5, "merged %g vs %g", merged.neg_entropy(), expected);

  EntropyState only_neg_inf = EntropyState::empty();
  only_neg_inf.add(-INFINITY);
  CHECK(std::isnan(only_neg_inf.neg_entropy()), "a row without finite values is NaN");
  EntropyState with_nan = whole;
  with_nan.add(NAN);
  CHECK(std::isnan(with_nan.neg_entropy()), "NaN poisons the state");
  EntropyState with_inf = whole;
  with_inf.rescale_to(INFINITY);
  with_inf.add(INFINITY);
  CHECK(std::isnan(with_inf.neg_entropy()), "+inf poisons the state");
}

template <typename T>
void test_cpu_topk_entropy(const char* name) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t vocab : {1, 63, 1024, 1025, 5000, 70001}) {
    const int64_t rows = 5;
    std::vector<T> logits(rows * vocab);
    for (auto& v : logits) v = from_float<T>(std::round(normal(rng) * 4.0f) / 4.0f);  // ties
    if (vocab > 1) logits[0] = from_float<T>(-INFINITY);  // a masked token, in a row that keeps finite values
    for (int k : {1, 3, 32}) {
      if (k > vocab) continue;
      for (double temperature : {1.0, 0.6}) {
        std::vector<int64_t> ids(rows * k), ids2(rows * k);
        std::vector<float> probs(rows * k), negh(rows), probs2(rows * k), negh2(rows);
        const int64_t selected[rows] = {4, 0, kSkipRow, 2, 3};
        cpu::topk_entropy<T>(logits.data(), vocab, vocab, selected, rows, k, static_cast<float>(temperature),
                             ids.data(), probs.data(), negh.data(), 1);
        cpu::topk_entropy<T>(logits.data(), vocab, vocab, selected, rows, k, static_cast<float>(temperature),
                             ids2.data(), probs2.data(), negh2.data(), 2);
        CHECK(ids == ids2 && probs == probs2 && negh == negh2, "%s: results depend on the thread count", name);
        for (int64_t r = 0; r < rows; ++r) {
          if (selected[r] == kSkipRow) {
            for (int j = 0; j < k; ++j) CHECK(ids[r * k + j] == 0 && probs[r * k + j] == 0.0f, "%s: skipped row", name);
            CHECK(negh[r] == 0.0f, "%s: skipped row's neg_entropy %g", name, negh[r]);
            continue;
          }
          std::vector<float> row(vocab);
          for (int64_t i = 0; i < vocab; ++i) row[i] = to_float(logits[selected[r] * vocab + i]);
          std::vector<int> order(vocab);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
          double sum = 0.0;
          for (int j = 0; j < k; ++j) sum += std::exp(static_cast<double>(row[order[j]]) - row[order[0]]);
          for (int j = 0; j < k; ++j) {
            CHECK(ids[r * k + j] == order[j], "%s V=%ld k=%d row %ld slot %d: id %ld, expected %d", name,
                  static_cast<long>(vocab), k, static_cast<long>(r), j, static_cast<long>(ids[r * k + j]), order[j]);
            const double p = std::exp(static_cast<double>(row[order[j]]) - row[order[0]]) / sum;
            CHECK(std::abs(probs[r * k + j] - p) < 1e-6, "%s prob %g vs %g", name, probs[r * k + j], p);
          }
          const double expected = neg_entropy_reference(row, temperature);
          CHECK(std::abs(negh[r] - expected) < 1e-4 * std::max(1.0, std::abs(expected)), "%s V=%ld negH %g vs %g", name,
                static_cast<long>(vocab), negh[r], expected);
        }
      }
    }
  }
}

template <typename T>
void test_cpu_blend(const char* name) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const int64_t vocab = 37, dim = 1031, n = 9, m = 4;
  std::vector<T> weight(vocab * dim), grad_out(n * dim), out(n * dim), grad_weight(vocab * dim);
  for (auto& v : weight) v = from_float<T>(normal(rng));
  for (auto& v : grad_out) v = from_float<T>(normal(rng));
  std::vector<int64_t> ids(n * m);
  std::vector<float> coeffs(n * m), grad_coeffs(n * m);
  for (auto& v : ids) v = rng() % 5;  // repeated rows
  for (auto& v : coeffs) v = normal(rng);
  cpu::blend_forward<T>(weight.data(), dim, ids.data(), coeffs.data(), n, m, out.data(), 2);
  std::fill(grad_weight.begin(), grad_weight.end(), from_float<T>(0.0f));
  cpu::blend_backward<T>(grad_out.data(), weight.data(), dim, ids.data(), coeffs.data(), n, m, grad_weight.data(),
                         grad_coeffs.data(), 2);
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < dim; ++d) {
      double expected = 0.0;
      for (int64_t j = 0; j < m; ++j) expected += coeffs[r * m + j] * to_float(weight[ids[r * m + j] * dim + d]);
      const float got = to_float(out[r * dim + d]);
      CHECK(std::abs(got - expected) <= tol * (1 + std::abs(expected)), "%s out %g vs %g", name, got, expected);
    }
    for (int64_t j = 0; j < m; ++j) {
      double expected = 0.0;
      for (int64_t d = 0; d < dim; ++d)
        expected += to_float(grad_out[r * dim + d]) * to_float(weight[ids[r * m + j] * dim + d]);
      CHECK(std::abs(grad_coeffs[r * m + j] - expected) <= 1e-4 * (1 + std::abs(expected)), "%s grad_coeffs", name);
    }
  }
  for (int64_t v = 0; v < vocab; ++v) {
    for (int64_t d = 0; d < dim; ++d) {
      double expected = 0.0;
      for (int64_t i = 0; i < n * m; ++i) {
        if (ids[i] == v) expected += coeffs[i] * to_float(grad_out[(i / m) * dim + d]);
      }
      const float got = to_float(grad_weight[v * dim + d]);
      CHECK(std::abs(got - expected) <= tol * (1 + std::abs(expected)), "%s grad_weight %g vs %g", name, got, expected);
    }
  }
}

}  // namespace

int main() {
  std::printf("CPU kernels use: %s\n", cpu::isa_name());
  test_exp_accuracy();
  test_16bit_conversions();
  test_topk_against_sort<1>();
  test_topk_against_sort<4>();
  test_topk_against_sort<32>();
  test_k_buckets();
  test_entropy_state_merge();
  test_cpu_topk_entropy<float>("f32");
  test_cpu_topk_entropy<bf16_t>("bf16");
  test_cpu_topk_entropy<f16_t>("f16");
  test_cpu_blend<float>("f32");
  test_cpu_blend<bf16_t>("bf16");
  test_cpu_blend<f16_t>("f16");
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all core tests passed\n");
  return 0;
}

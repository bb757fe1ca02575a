// Online state of a softmax over a stream of values: running reference m, s = sum e^(x-m), t = sum e^(x-m) (x-m).
// The negative entropy of softmax(x) is t/s - log s. States over disjoint parts of a row merge exactly (up to
// rounding) by rescaling both to the larger reference, so CPU chunks and GPU threads/warps/blocks share this code.
// The hot loops accumulate the same state in base 2 (Base2Entropy, below) and convert it.
//
// Edge cases, chosen so that no input makes a NaN out of nothing and no NaN is lost:
// - m starts at -FLT_MAX (finite), so differences of references never become inf - inf;
// - exponents are clamped below at kMinExponent, where the term is flushed to exactly 0: a -inf value contributes
//   nothing (instead of 0 * -inf = NaN), and so does any value more than 87 below the maximum (e^-87 ~ 1.6e-38);
// - the clamp and the flush keep NaN (comparisons, not fmaxf), so a NaN value or a +inf value (inf - inf)
//   poisons s;
// - a row with no finite value leaves m at -FLT_MAX and is reported as NaN.
#pragma once

#include <cfloat>
#include <cmath>

#include "config.h"
#include "fast_exp.h"

namespace softmask {

constexpr float kMinExponent = -87.0f;  // e^-87 ~ 1.6e-38, still a normal float

// One softmax term: *d = max(diff, kMinExponent) and e^*d, exactly 0 at the clamp. NaN stays NaN in both.
SOFTMASK_HD float softmax_term(float diff, float* d) {
  *d = diff < kMinExponent ? kMinExponent : diff;
  return *d == kMinExponent ? 0.0f : exp_nonpositive(*d);
}

struct EntropyState {
  float m;  // reference (running maximum of the finite values seen, at least -FLT_MAX)
  float s;  // sum of e^(x - m)
  float t;  // sum of e^(x - m) * (x - m)

  SOFTMASK_HD static EntropyState empty() { return {-FLT_MAX, 0.0f, 0.0f}; }

  // Move the reference up to new_m >= m.
  SOFTMASK_HD void rescale_to(float new_m) {
    float d;
    const float e = softmax_term(m - new_m, &d);
    t = (t + d * s) * e;
    s = s * e;
    m = new_m;
  }

  // Add one value; the reference must already be >= x (see rescale_to).
  SOFTMASK_HD void add(float x) {
    float d;
    const float e = softmax_term(x - m, &d);
    s += e;
    t += e * d;
  }

  SOFTMASK_HD void merge(EntropyState other) {
    const float new_m = m > other.m ? m : other.m;
    rescale_to(new_m);
    other.rescale_to(new_m);
    s += other.s;
    t += other.t;
  }

  // sum p log p of the softmax described by this state; NaN for a row with NaN, +inf, or no finite value.
  SOFTMASK_HD float neg_entropy() const {
    if (!(m > -FLT_MAX)) return NAN;
    return t / s - logf(s);
  }
};

constexpr float kMinExponent2 = -126.0f;  // 2^-126, the smallest normal float: exp2_nonpositive flushes below it

// One term in base 2: *d = max(y, kMinExponent2) and 2^y (exactly 0 below the normal range, so -inf adds nothing and
// 0 * d stays finite). A NaN y gives a NaN term.
SOFTMASK_HD float softmax_term2(float y, float* d) {
#if defined(__CUDA_ARCH__)
  *d = fmaxf(y, kMinExponent2);  // one FMNMX
#else
  *d = y < kMinExponent2 ? kMinExponent2 : y;  // a compare and a blend: host compilers vectorise it, not fmaxf
#endif
  return exp2_nonpositive(y);
}

// The state of a softmax in base 2, for the hot loops (y = x log2(e) / temperature costs no more than the natural
// scaling, and 2^y is cheaper than e^x): m = running maximum of y, s = sum 2^(y - m), t = sum 2^(y - m) (y - m). The
// edge cases are those of EntropyState; natural() converts it for merges and the result.
struct Base2Entropy {
  float m = -FLT_MAX;
  float s = 0.0f;
  float t = 0.0f;

  SOFTMASK_HD void rescale_to(float new_m) {
    float d;
    const float e = softmax_term2(m - new_m, &d);
    t = (t + d * s) * e;
    s *= e;
    m = new_m;
  }

  SOFTMASK_HD void add(float y_minus_m) {
    float d;
    const float e = softmax_term2(y_minus_m, &d);
    s += e;
    t = fmaf(e, d, t);
  }

  // The same softmax in natural-log units: e^(x - m ln2) = 2^(y - m), and (x - m ln2) = ln2 (y - m).
  SOFTMASK_HD EntropyState natural() const { return {m == -FLT_MAX ? -FLT_MAX : m * kLn2, s, t * kLn2}; }
};

}  // namespace softmask

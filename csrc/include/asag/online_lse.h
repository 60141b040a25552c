// Online log-sum-exp, shared by the CPU and CUDA kernels (no PyTorch dependency).
//
// A running LSE is kept as (m, s) with LSE = m + log(s): m is the largest value seen, s the sum of
// exp(x - m). Values may be given in natural-log or base-2 units (the kernels work in base 2 with
// log2(e) folded into the logit scale); the helpers below are unit-agnostic except where named.
// NaN propagates: once a NaN enters, m or s stays NaN. An all -inf stream gives m = -inf, s = 0,
// and lse() returns -inf.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define ASAG_HD __host__ __device__ __forceinline__
#else
#define ASAG_HD inline
#endif

namespace asag {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

struct OnlineLse {
  float m;  // running max (base-2 units when used with the *2 helpers)
  float s;  // sum of 2^(x - m) (or e^(x - m))
};

ASAG_HD OnlineLse lse_empty() { return {-std::numeric_limits<float>::infinity(), 0.0f}; }

// Rescale factor from an old max to a new max; exp2(-inf - -inf) would be NaN, so an empty
// state (old max -inf) contributes 0 whatever the new max is.
ASAG_HD float rescale2(float old_m, float new_m) {
  return old_m == -std::numeric_limits<float>::infinity() ? 0.0f : exp2f(old_m - new_m);
}

// Merge two base-2 running states (used to combine per-tile partial results in a fixed order).
ASAG_HD OnlineLse lse_merge2(OnlineLse a, OnlineLse b) {
  float m = fmaxf(a.m, b.m);
  if (a.m != a.m || b.m != b.m) m = a.m != a.m ? a.m : b.m;  // fmaxf drops NaN; keep it
  if (m == -std::numeric_limits<float>::infinity()) return lse_empty();
  return {m, a.s * rescale2(a.m, m) + b.s * rescale2(b.m, m)};
}

// Merge two natural-log running states. NaN in either makes both fields NaN; an empty state
// (m = -inf) leaves the other as it is.
ASAG_HD OnlineLse lse_merge(OnlineLse a, OnlineLse b) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (a.m != a.m || a.s != a.s || b.m != b.m || b.s != b.s) return {nan, nan};
  if (b.m == -std::numeric_limits<float>::infinity()) return a;
  if (a.m == -std::numeric_limits<float>::infinity()) return b;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// log2 of the running sum: m + log2(s).
ASAG_HD float lse_value2(OnlineLse a) {
  return a.m == -std::numeric_limits<float>::infinity() ? a.m : a.m + log2f(a.s);
}

}  // namespace asag

// Row primitives (see asag/cpu_rows.h): a portable version and an AVX2+FMA version compiled with a
// function-level target attribute, chosen once at load time from cpuid. The build itself uses no
// -march flag, so the extension runs on any x86-64 (or non-x86) machine.
#include "asag/cpu_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ASAG_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace asag {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Row sums are float32 lane sums over blocks of this many elements, added up in double: a plain
// float32 running sum of n same-sign terms drifts by up to ~n·ulp (7e-5 relative at n = 16384).
constexpr int64_t kSumBlock = 256;

// ---------------------------------------------------------------------------------------------
// Portable versions.

RowStats exp_row_generic(const float* x, const float* bias, float* e, int64_t n) {
  float m = kNegInf;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const float t = x[j] + (bias ? bias[j] : 0.0f);
    nan |= t != t;
    m = t > m ? t : m;
  }
  if (nan) m = std::numeric_limits<float>::quiet_NaN();
  double s = 0.0;  // a long float32 sum of same-sign terms drifts by ~n·ulp (see kSumBlock)
  for (int64_t j = 0; j < n; ++j) {
    const float t = std::exp(x[j] + (bias ? bias[j] : 0.0f) - m);
    e[j] = t;
    s += t;
  }
  return {m, float(s)};
}

void dot_rows_generic(const float* rows, int64_t ld, int64_t nrows, const float* x, int64_t n, float* out) {
  for (int64_t r = 0; r < nrows; ++r) {
    const float* row = rows + r * ld;
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) s += double(row[j]) * double(x[j]);
    out[r] = float(s);
  }
}

void accumulate_rows_generic(float* acc, const float* rows, int64_t ld, const float* w, int64_t nrows, int64_t n) {
  for (int64_t r = 0; r < nrows; ++r) {
    const float* row = rows + r * ld;
    const float c = w[r];
    for (int64_t j = 0; j < n; ++j) acc[j] += c * row[j];
  }
}

void exp_shifted_generic(const float* x, float shift, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::exp(x[j] - shift);
}

void scale_inplace_generic(float* x, float c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= c;
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA versions.
#ifdef ASAG_HAVE_AVX2_PATH
#define ASAG_AVX2 __attribute__((target("avx2,fma")))

// exp on 8 lanes: Cody-Waite range reduction x = n ln2 + r, a degree-6 polynomial for e^r, and 2^n
// built in the exponent bits. About 1 ulp on [-87.3, 88]; below -87.3 (where the result would be
// subnormal) it returns 0, and NaN stays NaN (min/max return their second operand on NaN).
ASAG_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.0f);
  const __m256 lo = _mm256_set1_ps(-87.33654475f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, x);
  x = _mm256_max_ps(lo, x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  __m256 y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(underflow, y);
}

ASAG_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

ASAG_AVX2 inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

ASAG_AVX2 inline __m256 load_sum(const float* x, const float* bias, int64_t j) {
  const __m256 v = _mm256_loadu_ps(x + j);
  return bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + j)) : v;
}

ASAG_AVX2 RowStats exp_row_avx2(const float* x, const float* bias, float* e, int64_t n) {
  // Pass 1: the row max. NaN need not survive here: it makes its own exp, hence the sum, NaN.
  __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    m0 = _mm256_max_ps(m0, load_sum(x, bias, j));
    m1 = _mm256_max_ps(m1, load_sum(x, bias, j + 8));
  }
  for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(m0, load_sum(x, bias, j));
  float m = hmax8(_mm256_max_ps(m0, m1));
  for (; j < n; ++j) {
    const float t = x[j] + (bias ? bias[j] : 0.0f);
    m = t > m ? t : m;
  }
  // Pass 2: exponentials and their sum; lane sums are flushed into a double every kSumBlock
  // elements, so the sum's rounding error stays that of a kSumBlock/16-term sum at any n.
  const __m256 vm = _mm256_set1_ps(m);
  double total = 0.0;
  j = 0;
  while (j + 16 <= n) {
    const int64_t block_end = std::min(n, j + kSumBlock);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    for (; j + 16 <= block_end; j += 16) {
      const __m256 e0 = exp8(_mm256_sub_ps(load_sum(x, bias, j), vm));
      const __m256 e1 = exp8(_mm256_sub_ps(load_sum(x, bias, j + 8), vm));
      _mm256_storeu_ps(e + j, e0);
      _mm256_storeu_ps(e + j + 8, e1);
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
    }
    total += hsum8(_mm256_add_ps(s0, s1));
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e0 = exp8(_mm256_sub_ps(load_sum(x, bias, j), vm));
    _mm256_storeu_ps(e + j, e0);
    total += hsum8(e0);
  }
  for (; j < n; ++j) {
    const float t = std::exp(x[j] + (bias ? bias[j] : 0.0f) - m);
    e[j] = t;
    total += t;
  }
  const float s = float(total);
  return {m, s};
}

ASAG_AVX2 void dot_rows_avx2(const float* rows, int64_t ld, int64_t nrows, const float* x, int64_t n, float* out) {
  // Lane sums flushed into doubles every kSumBlock elements (see exp_row_avx2).
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) {
    const float* p0 = rows + r * ld;
    const float* p1 = p0 + ld;
    const float* p2 = p1 + ld;
    const float* p3 = p2 + ld;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t j = 0;
    while (j + 16 <= n) {
      const int64_t block_end = std::min(n, j + kSumBlock);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (; j + 16 <= block_end; j += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + j), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + j), x0, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + j), x0, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + j), x0, a3);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + j + 8), x1, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + j + 8), x1, b1);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + j + 8), x1, b2);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + j + 8), x1, b3);
      }
      s0 += hsum8(_mm256_add_ps(a0, b0));
      s1 += hsum8(_mm256_add_ps(a1, b1));
      s2 += hsum8(_mm256_add_ps(a2, b2));
      s3 += hsum8(_mm256_add_ps(a3, b3));
    }
    for (; j < n; ++j) {
      s0 += p0[j] * x[j];
      s1 += p1[j] * x[j];
      s2 += p2[j] * x[j];
      s3 += p3[j] * x[j];
    }
    out[r] = float(s0);
    out[r + 1] = float(s1);
    out[r + 2] = float(s2);
    out[r + 3] = float(s3);
  }
  for (; r < nrows; ++r) {
    const float* p = rows + r * ld;
    double s = 0.0;
    int64_t j = 0;
    while (j + 16 <= n) {
      const int64_t block_end = std::min(n, j + kSumBlock);
      __m256 a = _mm256_setzero_ps(), b = a;
      for (; j + 16 <= block_end; j += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(x + j), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(p + j + 8), _mm256_loadu_ps(x + j + 8), b);
      }
      s += hsum8(_mm256_add_ps(a, b));
    }
    for (; j < n; ++j) s += p[j] * x[j];
    out[r] = float(s);
  }
}

ASAG_AVX2 void accumulate_rows_avx2(float* acc, const float* rows, int64_t ld, const float* w, int64_t nrows, int64_t n) {
  // Eight rows per sweep over acc, so acc is loaded and stored once per eight rows.
  for (int64_t r0 = 0; r0 < nrows; r0 += 8) {
    const int64_t nr = std::min<int64_t>(8, nrows - r0);
    const float* base = rows + r0 * ld;
    __m256 wv[8];
    for (int64_t r = 0; r < nr; ++r) wv[r] = _mm256_set1_ps(w[r0 + r]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 a = _mm256_loadu_ps(acc + j);
      for (int64_t r = 0; r < nr; ++r) a = _mm256_fmadd_ps(wv[r], _mm256_loadu_ps(base + r * ld + j), a);
      _mm256_storeu_ps(acc + j, a);
    }
    for (; j < n; ++j) {
      float a = acc[j];
      for (int64_t r = 0; r < nr; ++r) a = std::fma(w[r0 + r], base[r * ld + j], a);
      acc[j] = a;
    }
  }
}

ASAG_AVX2 void exp_shifted_avx2(const float* x, float shift, float* out, int64_t n) {
  const __m256 vs = _mm256_set1_ps(shift);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vs)));
  for (; j < n; ++j) out[j] = std::exp(x[j] - shift);
}

ASAG_AVX2 void scale_inplace_avx2(float* x, float c, int64_t n) {
  const __m256 vc = _mm256_set1_ps(c);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), vc));
  for (; j < n; ++j) x[j] *= c;
}
#endif  // ASAG_HAVE_AVX2_PATH

struct RowKernels {
  RowStats (*exp_row)(const float*, const float*, float*, int64_t);
  void (*dot_rows)(const float*, int64_t, int64_t, const float*, int64_t, float*);
  void (*accumulate_rows)(float*, const float*, int64_t, const float*, int64_t, int64_t);
  void (*exp_shifted)(const float*, float, float*, int64_t);
  void (*scale_inplace)(float*, float, int64_t);
  const char* isa;
};

RowKernels pick_kernels(bool allow_avx2) {
#ifdef ASAG_HAVE_AVX2_PATH
  __builtin_cpu_init();
  if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {exp_row_avx2, dot_rows_avx2, accumulate_rows_avx2, exp_shifted_avx2, scale_inplace_avx2, "avx2"};
  }
#endif
  (void)allow_avx2;
  return {exp_row_generic, dot_rows_generic, accumulate_rows_generic, exp_shifted_generic, scale_inplace_generic,
          "generic"};
}

RowKernels& kernels() {
  static RowKernels k = pick_kernels(true);
  return k;
}

}  // namespace

RowStats exp_row(const float* x, const float* bias, float* e, int64_t n) { return kernels().exp_row(x, bias, e, n); }

void dot_rows(const float* rows, int64_t ld, int64_t nrows, const float* x, int64_t n, float* out) {
  kernels().dot_rows(rows, ld, nrows, x, n, out);
}

void accumulate_rows(float* acc, const float* rows, int64_t ld, const float* w, int64_t nrows, int64_t n) {
  kernels().accumulate_rows(acc, rows, ld, w, nrows, n);
}

void exp_shifted(const float* x, float shift, float* out, int64_t n) { kernels().exp_shifted(x, shift, out, n); }

void scale_inplace(float* x, float c, int64_t n) { kernels().scale_inplace(x, c, n); }

const char* row_kernels_isa() { return kernels().isa; }

const char* select_row_kernels(bool allow_avx2) {
  kernels() = pick_kernels(allow_avx2);
  return kernels().isa;
}

}  // namespace cpu
}  // namespace asag

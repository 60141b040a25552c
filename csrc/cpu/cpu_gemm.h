// Row-major float32 operands and GEMMs on raw pointers for the CPU backend: BLAS sgemm where torch
// exports it (MKL/OpenBLAS), else at::mm. Shared by the fused solver and the per-pass building
// blocks (blocks_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cmath>
#include <initializer_list>
#include <limits>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace asag {
namespace cpu {

inline bool blas_dims_ok(std::initializer_list<int64_t> dims) {
  for (int64_t d : dims)
    if (d > INT_MAX) return false;
  return sgemm_ != nullptr;
}

// C[m×n] = alpha · A[m×k] · B[n×k]ᵀ
inline void gemm_abt(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B,
              int64_t ldb, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
    return;
  }
  if (blas_dims_ok({m, n, k, lda, ldb, ldc})) {
    const char tb = 'T', ta = 'N';
    const int M = int(n), N = int(m), K = int(k), LB = int(ldb), LA = int(lda), LC = int(ldc);
    const float beta = 0.0f;
    sgemm_(&tb, &ta, &M, &N, &K, &alpha, B, &LB, A, &LA, &beta, C, &LC);
    return;
  }
  auto a = at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, at::kFloat);
  auto b = at::from_blob(const_cast<float*>(B), {n, k}, {ldb, 1}, at::kFloat);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, at::kFloat);
  c.copy_(at::mm(a, b.t()).mul_(alpha));
}

// C[m×n] = A[m×k] · B[k×n]
inline void gemm_ab(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
    return;
  }
  if (blas_dims_ok({m, n, k, lda, ldb, ldc})) {
    const char t = 'N';
    const int M = int(n), N = int(m), K = int(k), LB = int(ldb), LA = int(lda), LC = int(ldc);
    const float one = 1.0f, beta = 0.0f;
    sgemm_(&t, &t, &M, &N, &K, &one, B, &LB, A, &LA, &beta, C, &LC);
    return;
  }
  auto a = at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, at::kFloat);
  auto b = at::from_blob(const_cast<float*>(B), {k, n}, {ldb, 1}, at::kFloat);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, at::kFloat);
  c.copy_(at::mm(a, b));
}

// A [n × width] float32 view with unit column stride usable as a GEMM operand, or a float32 copy.
struct RowMajor {
  at::Tensor holder;
  const float* ptr;
  int64_t ld;
};

inline RowMajor as_row_major_f32(const at::Tensor& t) {
  const int64_t n = t.size(0), width = t.size(1);
  at::Tensor x = t;
  const bool unit_cols = width <= 1 || x.stride(1) == 1;
  int64_t ld = n <= 1 ? std::max<int64_t>(width, 1) : x.stride(0);
  if (x.scalar_type() != at::kFloat || !unit_cols || ld < std::max<int64_t>(width, 1)) {
    x = t.to(at::kFloat).contiguous();
    ld = std::max<int64_t>(width, 1);
  }
  return {x, x.data_ptr<float>(), ld};
}

// A power of two p with Nk·max|v|/p well inside float32 (1 when it already is); non-finite v gives 1
// (its NaN/Inf spreads as SPEC §4 says whatever the scale).
inline float value_scale(const RowMajor& v, int64_t nk, int64_t dv) {
  float vmax = 0.0f;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < dv; ++c) vmax = std::max(vmax, std::fabs(v.ptr[j * v.ld + c]));
  const float limit = std::numeric_limits<float>::max() / 4.0f;
  if (!(vmax <= limit / float(nk)) && std::isfinite(vmax)) {
    const int e = int(std::ceil(std::log2(double(vmax) * double(nk) / double(limit))));
    return std::ldexp(1.0f, e);
  }
  return 1.0f;
}

}  // namespace cpu
}  // namespace asag

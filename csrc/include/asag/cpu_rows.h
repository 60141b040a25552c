// Row primitives of the CPU kernel (no PyTorch dependency). Each is implemented twice in
// csrc/cpu/row_kernels.cpp: a portable version and an AVX2+FMA version picked once at run time,
// so the shipped build needs no -march flag. Every reduction runs in a fixed order, so results
// are bitwise reproducible on a given machine. Row sums (exp_row, dot_rows) are accumulated in
// float32 over short blocks and in double across blocks, accurate at any row length.
#pragma once

#include <cstdint>

namespace asag {
namespace cpu {

struct RowStats {
  float max;  // max_j (x_j + bias_j)
  float sum;  // sum_j exp(x_j + bias_j - max)
};

// e_j = exp(x_j + bias_j - m) with m = max_j (x_j + bias_j); returns {m, sum_j e_j}.
// bias may be null (zero); e may alias x. A NaN anywhere makes the sum NaN.
RowStats exp_row(const float* x, const float* bias, float* e, int64_t n);

// out_r = <rows_r, x> for r < nrows; rows_r starts at rows + r * ld.
void dot_rows(const float* rows, int64_t ld, int64_t nrows, const float* x, int64_t n, float* out);

// acc_j += sum_r w_r * rows_r[j], rows added in order r = 0, 1, ...
void accumulate_rows(float* acc, const float* rows, int64_t ld, const float* w, int64_t nrows, int64_t n);

// out_j = exp(x_j - shift)
void exp_shifted(const float* x, float shift, float* out, int64_t n);

// x_j *= c
void scale_inplace(float* x, float c, int64_t n);

// Which implementation the dispatcher picked: "avx2" or "generic".
const char* row_kernels_isa();

// Re-pick the implementation (allow_avx2 = false forces "generic"); returns the one picked. Call
// it before any kernel runs (the Python module does so at import, from ASAG_CPU_ISA).
const char* select_row_kernels(bool allow_avx2);

}  // namespace cpu
}  // namespace asag

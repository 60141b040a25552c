// The per-pass building blocks of the CPU backend (issue 13), for the distributed op:
//
//   row_lse:          r_i = LSE_j (L_ij + g_j)                         [B, H, Nq]
//   col_lse:          c_j = LSE_i (L_ij + f_i)                         [B, H, Nk]
//   biased_attention: out_i = Σ_j softmax_j(L_ij + g_j) v_j, lse_i = r_i
//
// with L_ij = logit_scale · <q_i, k_j>. Every pass streams: logits are recomputed by a GEMM one
// block of rows (or columns) at a time into per-thread scratch, so memory is bounded by
// threads · 2 · 64 · max(Nq, Nk) floats whatever B·H. Heads run one after another; within a head the
// blocks are spread over the threads, and each output element is reduced by one thread in a fixed
// order (deterministic at any thread count). A -inf bias entry excludes its key (query); a row
// whose entries are all -inf gives lse = -inf and out = 0; NaN spreads to the affected outputs.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "asag/cpu_rows.h"
#include "asag/online_lse.h"
#include "cpu_gemm.h"

namespace {

using asag::cpu::RowMajor;
using asag::cpu::as_row_major_f32;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kRows = 64;   // rows of logits per GEMM (row passes)
constexpr int64_t kCols = 16;   // keys per column block (column pass)
constexpr int64_t kSpan = 256;  // query rows per GEMM in the column pass

// e_j = exp(x_j + bias_j − m) and {m, Σ e}; an all -inf row gives {-inf, 0} and e = 0 (exp_row
// alone would compute exp(-inf − -inf) = NaN there), unless it holds a NaN: then {NaN, NaN}.
// e must not alias x: x is read again in that case.
asag::OnlineLse row_stats(const float* x, const float* bias, float* e, int64_t n) {
  const asag::cpu::RowStats st = asag::cpu::exp_row(x, bias, e, n);
  if (st.max != kNegInf) return {st.max, st.sum};
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= std::isnan(x[j] + (bias ? bias[j] : 0.0f));
  std::fill(e, e + n, 0.0f);
  return nan ? asag::OnlineLse{kNaN, kNaN} : asag::OnlineLse{kNegInf, 0.0f};
}

float lse_of(asag::OnlineLse st) { return st.m == kNegInf ? kNegInf : st.m + std::log(st.s); }

void check_operand(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "asag cpu block pass: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, "asag cpu block pass: ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

void check_bias(const at::Tensor& bias, const char* name, int64_t B, int64_t H, int64_t n) {
  check_operand(bias, name, 3);
  TORCH_CHECK_TYPE(bias.scalar_type() == at::kFloat, "asag cpu block pass: ", name, " must be float32, got ",
                   bias.scalar_type());
  TORCH_CHECK_VALUE(bias.size(0) == B && bias.size(1) == H && bias.size(2) == n && bias.is_contiguous(),
                    "asag cpu block pass: ", name, " must be a contiguous [", B, ", ", H, ", ", n, "], got ",
                    bias.sizes());
}

// Shapes of q [B, H, Nq, D] and k [B, H, Nk, D] (v [B, H, Nk, Dv] where given).
struct Dims {
  int64_t B, H, nq, nk, d;
};

Dims check_qk(const at::Tensor& q, const at::Tensor& k) {
  check_operand(q, "q", 4);
  check_operand(k, "k", 4);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "asag cpu block pass: q and k must share one dtype");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "asag cpu block pass: q ", q.sizes(), " and k ", k.sizes(), " must share B, H and D");
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// A float32 [B, H, n] result, and fn(qh, kh, bias, dst) for every head in order with its float32
// row-major operands, its bias row (bias [B, H, m]) and its result row.
template <typename Fn>
at::Tensor per_head(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias, const Dims& s, int64_t n, Fn fn) {
  at::Tensor result = at::empty({s.B, s.H, n}, q.options().dtype(at::kFloat));
  if (n == 0) return result;
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    fn(as_row_major_f32(q[b][h]), as_row_major_f32(k[b][h]), bias[b][h].data_ptr<float>(),
       result[b][h].data_ptr<float>());
  }
  return result;
}

at::Tensor row_lse_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, double logit_scale) {
  const Dims s = check_qk(q, k);
  check_bias(g, "g", s.B, s.H, s.nk);
  const float c = float(logit_scale);
  return per_head(q, k, g, s, s.nq, [&](const RowMajor& qh, const RowMajor& kh, const float* bias, float* dst) {
    at::parallel_for(0, (s.nq + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(kRows * s.nk), e(s.nk);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * kRows, n = std::min(kRows, s.nq - i0);
        asag::cpu::gemm_abt(n, s.nk, s.d, c, qh.ptr + i0 * qh.ld, qh.ld, kh.ptr, kh.ld, buf.data(), s.nk);
        for (int64_t r_ = 0; r_ < n; ++r_) dst[i0 + r_] = lse_of(row_stats(buf.data() + r_ * s.nk, bias, e.data(), s.nk));
      }
    });
  });
}

at::Tensor col_lse_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& f, double logit_scale) {
  const Dims s = check_qk(q, k);
  check_bias(f, "f", s.B, s.H, s.nq);
  const float c = float(logit_scale);
  return per_head(q, k, f, s, s.nk, [&](const RowMajor& qh, const RowMajor& kh, const float* bias, float* dst) {
    at::parallel_for(0, (s.nk + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> lt(kCols * kSpan), e(kSpan);
      for (int64_t blk = c0; blk < c1; ++blk) {
        const int64_t j0 = blk * kCols, n = std::min(kCols, s.nk - j0);
        asag::OnlineLse acc[kCols];
        std::fill(acc, acc + kCols, asag::lse_empty());
        // Rows in fixed spans of kSpan, merged in order: a column's result does not depend on
        // which thread ran it.
        for (int64_t i0 = 0; i0 < s.nq; i0 += kSpan) {
          const int64_t ni = std::min(kSpan, s.nq - i0);
          asag::cpu::gemm_abt(n, ni, s.d, c, kh.ptr + j0 * kh.ld, kh.ld, qh.ptr + i0 * qh.ld, qh.ld, lt.data(), ni);
          for (int64_t r_ = 0; r_ < n; ++r_)
            acc[r_] = asag::lse_merge(acc[r_], row_stats(lt.data() + r_ * ni, bias + i0, e.data(), ni));
        }
        for (int64_t r_ = 0; r_ < n; ++r_) dst[j0 + r_] = lse_of(acc[r_]);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> biased_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& g, double logit_scale) {
  const Dims s = check_qk(q, k);
  check_operand(v, "v", 4);
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "asag cpu block pass: q and v must share one dtype");
  TORCH_CHECK_VALUE(v.size(0) == s.B && v.size(1) == s.H && v.size(2) == s.nk,
                    "asag cpu block pass: v ", v.sizes(), " must be [B, H, Nk, Dv] with k's B, H, Nk");
  check_bias(g, "g", s.B, s.H, s.nk);
  const int64_t dv = v.size(3);
  at::Tensor out = at::empty({s.B, s.H, s.nq, dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.nq}, q.options().dtype(at::kFloat));
  if (s.nq == 0 || s.B * s.H == 0) return {out, lse};
  const float c = float(logit_scale);
  const bool direct = q.scalar_type() == at::kFloat;
  at::Tensor out_f32 = direct ? at::Tensor() : at::empty({s.nq, dv}, q.options().dtype(at::kFloat));
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const RowMajor qh = as_row_major_f32(q[b][h]), kh = as_row_major_f32(k[b][h]);
    RowMajor vh = as_row_major_f32(v[b][h]);
    // Unnormalised sums reach Nk·max|v|: a power-of-two scale keeps any finite v finite.
    const float v_scale = asag::cpu::value_scale(vh, s.nk, dv);
    if (v_scale != 1.0f) {
      at::Tensor scaled = v[b][h].to(at::kFloat).div(double(v_scale)).contiguous();
      vh = {scaled, scaled.data_ptr<float>(), std::max<int64_t>(dv, 1)};
    }
    const float* bias = g[b][h].data_ptr<float>();
    float* lse_h = lse[b][h].data_ptr<float>();
    float* out_h = direct ? out[b][h].data_ptr<float>() : out_f32.data_ptr<float>();
    at::parallel_for(0, (s.nq + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(kRows * s.nk), ebuf(kRows * s.nk), prod(kRows * std::max<int64_t>(dv, 1)), sums(kRows);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * kRows, n = std::min(kRows, s.nq - i0);
        asag::cpu::gemm_abt(n, s.nk, s.d, c, qh.ptr + i0 * qh.ld, qh.ld, kh.ptr, kh.ld, buf.data(), s.nk);
        for (int64_t r_ = 0; r_ < n; ++r_) {
          const asag::OnlineLse st = row_stats(buf.data() + r_ * s.nk, bias, ebuf.data() + r_ * s.nk, s.nk);
          lse_h[i0 + r_] = lse_of(st);
          sums[r_] = st.s;
        }
        asag::cpu::gemm_ab(n, dv, s.nk, ebuf.data(), s.nk, vh.ptr, vh.ld, prod.data(), std::max<int64_t>(dv, 1));
        for (int64_t r_ = 0; r_ < n; ++r_) {
          float* dst = out_h + (i0 + r_) * dv;
          const float* num = prod.data() + r_ * dv;
          if (sums[r_] == 0.0f) {  // every key excluded
            std::fill(dst, dst + dv, 0.0f);
            continue;
          }
          const float inv = 1.0f / sums[r_];
          for (int64_t col = 0; col < dv; ++col) {
            const float x = num[col] * inv * v_scale;
            dst[col] = std::isinf(x) ? kNaN : x;  // a convex combination is infinite only for non-finite v
          }
        }
      }
    });
    if (!direct) out[b][h].copy_(out_f32);
  }
  return {out, lse};
}

}  // namespace

void define_block_passes(pybind11::module_& m) {
  m.def("row_lse_cpu", &row_lse_cpu, py::arg("q"), py::arg("k"), py::arg("g"), py::arg("logit_scale"),
        py::call_guard<py::gil_scoped_release>(),
        "r[b,h,i] = LSE_j(logit_scale·<q_i,k_j> + g_j): q [B,H,Nq,D], k [B,H,Nk,D], g [B,H,Nk] float32 contiguous");
  m.def("col_lse_cpu", &col_lse_cpu, py::arg("q"), py::arg("k"), py::arg("f"), py::arg("logit_scale"),
        py::call_guard<py::gil_scoped_release>(),
        "c[b,h,j] = LSE_i(logit_scale·<q_i,k_j> + f_i): f [B,H,Nq] float32 contiguous");
  m.def("biased_attention_cpu", &biased_attention_cpu, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"),
        py::arg("logit_scale"), py::call_guard<py::gil_scoped_release>(),
        "(out [B,H,Nq,Dv] in q's dtype, lse [B,H,Nq] float32): softmax_j(logit_scale·<q_i,k_j> + g_j)·v");
}

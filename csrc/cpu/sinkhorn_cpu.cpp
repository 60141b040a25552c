// Fused Sinkhorn attention on the CPU: asag_kernels._C_cpu.sinkhorn_attention_cpu.
//
//   L[i,j] = c · <q_i, k_j>          (c = logit_scale = cost_sign · scale / epsilon)
//   g = 0;  repeat T times:  f_i = log a − LSE_j(L_ij + g_j);  g_j = log b − LSE_i(L_ij + f_i)
//   out_i = Σ_j softmax_j(L_ij + g_j) v_j                    (T = 0: f = log a − LSE_j L_ij)
//
// One (batch, head) at a time; its rows are cut into fixed segments that the threads share (the
// cut depends only on Nq, so results do not depend on the thread count). Each segment keeps its
// own partial column sums, merged afterwards in segment order: no thread-order reduction.
//
// Two ways to handle a row, both exact to float32 rounding:
//  * cached: the first sweep stores the row of the Gibbs kernel E_ij = exp(L_ij − m_i)
//    (m_i = max_j L_ij) in the workspace. Later sweeps are then matrix-vector products with no
//    exponential: LSE_j(L_ij + g_j) = m_i + G + log Σ_j E_ij exp(g_j − G), and the column sums
//    Σ_i E_ij exp(m_i + f_i − U). The final pass is one GEMM E · (w ⊙ V) with w = exp(g − G) for
//    the numerators, and the normalisers E · w from dot_rows (accurate sums at any Nk).
//  * streamed: every sweep recomputes the row's logits with a GEMM, subtracts its exact max and
//    exponentiates (always accurate: the row sum is ≥ 1).
// As many rows as the workspace budget allows are cached, the same number in every segment so the
// threads stay balanced; the rest stream, so time grows smoothly as N outgrows the budget.
//
// The scaling-domain sums of the cached path lose accuracy when a row (or column) only meets
// entries that underflowed. Each such sum carries an error bound (every flushed term is below
// 2^-126 in its unit); a row whose sum is not well above it is recomputed by the streamed path,
// and a column is recomputed by an exact log-domain LSE over all rows (SPEC §4: |L| up to 1e4,
// columns that every row finds negligible).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "asag/cpu_rows.h"
#include "asag/online_lse.h"
#include "cpu_gemm.h"

namespace {

using asag::cpu::RowMajor;
using asag::cpu::RowStats;
using asag::cpu::as_row_major_f32;
using asag::cpu::value_scale;
using asag::cpu::gemm_ab;
using asag::cpu::gemm_abt;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kGemmRows = 64;      // rows of logits produced per GEMM call
constexpr float kFlushLog2 = -124.0f;  // log2 bound of one flushed term (2^-126, with slack)
constexpr float kTrustLog2 = 30.0f;    // a sum must exceed its flush bound by 2^30 to be used

// ---------------------------------------------------------------------------------------------
// Small scalar helpers (NaN-propagating).

inline float log_add_exp(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  const float m = std::max(a, b);
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// An output is a convex combination of rows of v, so it is infinite only when v is: SPEC §4 wants NaN.
inline float finite_or_nan(float x) { return std::isinf(x) ? kNaN : x; }

// Running (max, sum) merge: sum is Σ exp(x − max).
inline void merge_lse(float& m, float& s, float m2, float s2) {
  const asag::OnlineLse r = asag::lse_merge({m, s}, {m2, s2});
  m = r.m;
  s = r.s;
}

// ---------------------------------------------------------------------------------------------

struct Problem {
  int64_t nq, nk, d, dv;
  int num_iters;
  float logit_scale, a, log_a, log_b;
};

// One (batch, head): float32 row-major operands (leading dims may exceed the widths) and outputs.
struct Head {
  const float* q;
  int64_t ldq;
  const float* k;
  int64_t ldk;
  const float* v;
  int64_t ldv;
  float* f;    // [nq]
  float* g;    // [nk]
  float* out;  // [nq × dv], contiguous
  // v was divided by this power of two (1 unless Nk·max|v| could overflow float32 sums): the
  // unnormalised sums Σ_j e_j v_j reach Nk·max|v|, so any finite v must stay finite (SPEC §4).
  float v_scale;
};

// The work split, fixed by the shapes and the budget only.
struct Plan {
  int64_t seg_rows;     // rows per segment (a multiple of kGemmRows)
  int64_t nseg;         // number of segments
  int64_t cached_rows;  // cached rows at the start of every full segment (0 … seg_rows)
  int64_t sub_rows;     // rows per cache-resident sub-block of the matrix-vector sweeps
};

// Per-thread scratch, allocated once per call.
struct Scratch {
  std::vector<float> logits;   // kGemmRows × nk
  std::vector<float> product;  // kGemmRows × (dv + 1)
  std::vector<float> qrows;    // kGemmRows × d, gathered query rows
  std::vector<float> weights;  // kGemmRows
  std::vector<float> sums;     // kGemmRows
  std::vector<int64_t> ids;    // kGemmRows
  std::vector<int64_t> redo;   // rows of one segment to recompute by streaming
};

// Per-segment partial column sums of one sweep. Column j's LSE_i(L_ij + f_i) over the segment is
//   log(exp(shift) · cached[j] + exp(−g_j) · streamed[j])
// where g is the potential the sweep started from.
struct SegmentPartial {
  float* cached;    // [nk]
  float* streamed;  // [nk]
  float shift;
  int64_t n_cached;
  int64_t n_streamed;
  int64_t n_rescales;
};

class HeadSolver {
 public:
  HeadSolver(const Problem& p, const Plan& plan, float* cache, std::vector<Scratch>& scratch, float* partial_buf,
             float* row_max, float* row_sum, float* col_w, float* v_weighted)
      : p_(p),
        plan_(plan),
        cache_(cache),
        scratch_(scratch),
        partial_buf_(partial_buf),
        row_max_(row_max),
        row_sum_(row_sum),
        col_w_(col_w),
        v_weighted_(v_weighted),
        partials_(plan.nseg) {
    for (int64_t s = 0; s < plan_.nseg; ++s) {
      partials_[s].cached = partial_buf_ + (2 * s) * p_.nk;
      partials_[s].streamed = partial_buf_ + (2 * s + 1) * p_.nk;
    }
  }

  void solve(const Head& h) {
    h_ = h;
    if (p_.num_iters == 0) {
      final_pass(/*with_g=*/false, /*write_f=*/true);
      return;
    }
    std::fill(h_.g, h_.g + p_.nk, 0.0f);
    for (int t = 0; t < p_.num_iters; ++t) {
      potential_sweep(/*first=*/t == 0);
      update_g();
    }
    final_pass(/*with_g=*/true, /*write_f=*/false);
  }

 private:
  int64_t seg_begin(int64_t s) const { return s * plan_.seg_rows; }
  int64_t seg_end(int64_t s) const { return std::min(p_.nq, (s + 1) * plan_.seg_rows); }
  int64_t seg_cached(int64_t s) const { return std::min(plan_.cached_rows, seg_end(s) - seg_begin(s)); }
  float* cache_row(int64_t s, int64_t r) const { return cache_ + (s * plan_.cached_rows + r) * p_.nk; }

  // A solver that runs inside an outer parallel loop owns one scratch (nested loops run inline and
  // report thread 0); one that spreads its own loops over the threads has one per thread.
  Scratch& scratch() { return scratch_.size() == 1 ? scratch_[0] : scratch_[at::get_thread_num()]; }

  // Logits of rows ids[0..n) into dst (ld nk). Rows that are consecutive use q in place.
  void logits_rows(const int64_t* ids, int64_t n, float* dst, Scratch& sc) {
    bool consecutive = true;
    for (int64_t r = 1; r < n; ++r) consecutive &= ids[r] == ids[0] + r;
    const float* qp = h_.q + ids[0] * h_.ldq;
    int64_t ldq = h_.ldq;
    if (!consecutive) {
      for (int64_t r = 0; r < n; ++r) std::copy(h_.q + ids[r] * h_.ldq, h_.q + ids[r] * h_.ldq + p_.d, sc.qrows.data() + r * p_.d);
      qp = sc.qrows.data();
      ldq = p_.d;
    }
    gemm_abt(n, p_.nk, p_.d, p_.logit_scale, qp, ldq, h_.k, h_.ldk, dst, p_.nk);
  }

  // Streamed row update for rows ids[0..n) (n ≤ kGemmRows): f_i = log a − LSE_j(L_ij + g_j) and the
  // column sums Σ_i exp(L_ij + g_j − m_i) · a / s_i (= exp(g_j) Σ_i exp(L_ij + f_i)) into acc.
  // With `store`, the rows' E = exp(L − m) (g = 0) goes to the cache rows `store`… and m_i to row_max.
  void stream_update(const int64_t* ids, int64_t n, const float* g, float* acc, Scratch& sc, float* store) {
    float* buf = store ? store : sc.logits.data();
    logits_rows(ids, n, buf, sc);
    // Four rows at a time, so the rows are still in L1/L2 when their column sums are added.
    constexpr int64_t kGroup = 4;
    for (int64_t r0 = 0; r0 < n; r0 += kGroup) {
      const int64_t nr = std::min(kGroup, n - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) {
        float* row = buf + r * p_.nk;
        const RowStats st = asag::cpu::exp_row(row, g, row, p_.nk);
        h_.f[ids[r]] = p_.log_a - st.max - std::log(st.sum);
        sc.weights[r] = p_.a / st.sum;
        if (store) row_max_[ids[r]] = st.max;
      }
      asag::cpu::accumulate_rows(acc, buf + r0 * p_.nk, p_.nk, sc.weights.data() + r0, nr, p_.nk);
    }
  }

  // Streamed final rows: out_i = Σ_j softmax_j(L_ij + g_j) v_j (and f_i when write_f).
  void stream_final(const int64_t* ids, int64_t n, const float* g, bool write_f, Scratch& sc) {
    float* buf = sc.logits.data();
    logits_rows(ids, n, buf, sc);
    for (int64_t r = 0; r < n; ++r) {
      float* row = buf + r * p_.nk;
      const RowStats st = asag::cpu::exp_row(row, g, row, p_.nk);
      sc.sums[r] = st.sum;
      if (write_f) h_.f[ids[r]] = p_.log_a - st.max - std::log(st.sum);
    }
    gemm_ab(n, p_.dv, p_.nk, buf, p_.nk, h_.v, h_.ldv, sc.product.data(), p_.dv);
    for (int64_t r = 0; r < n; ++r) write_out_row(sc.product.data() + r * p_.dv, sc.sums[r], h_.out + ids[r] * p_.dv);
  }

  // out row = numerator / normaliser, times the head's value scale (see Head::v_scale).
  void write_out_row(const float* num, float norm, float* dst) const {
    const float inv = 1.0f / norm;
    for (int64_t c = 0; c < p_.dv; ++c) dst[c] = finite_or_nan(num[c] * inv * h_.v_scale);
  }

  template <typename Fn>
  void for_rows_in_blocks(const int64_t* ids, int64_t n, Fn fn) {
    for (int64_t r0 = 0; r0 < n; r0 += kGemmRows) fn(ids + r0, std::min(kGemmRows, n - r0));
  }

  template <typename Fn>
  void for_range_in_blocks(int64_t begin, int64_t end, Scratch& sc, Fn fn) {
    for (int64_t r0 = begin; r0 < end; r0 += kGemmRows) {
      const int64_t n = std::min(kGemmRows, end - r0);
      for (int64_t r = 0; r < n; ++r) sc.ids[r] = r0 + r;
      fn(sc.ids.data(), n);
    }
  }

  // One row update followed by the column sums of its plan, per segment.
  void potential_sweep(bool first) {
    // w_j = exp(g_j − G): the column factors of the cached rows (unused in the first sweep, g = 0).
    float G = kNegInf;
    for (int64_t j = 0; j < p_.nk; ++j) G = h_.g[j] > G ? h_.g[j] : G;
    if (G == kNegInf) G = 0.0f;  // all NaN: w becomes NaN and carries it
    if (!first) asag::cpu::exp_shifted(h_.g, G, col_w_, p_.nk);
    const float row_floor = float(p_.nk) * std::exp2(kFlushLog2 + kTrustLog2);
    const float* g_bias = first ? nullptr : h_.g;

    at::parallel_for(0, plan_.nseg, 1, [&](int64_t s_begin, int64_t s_end) {
      Scratch& sc = scratch();
      for (int64_t s = s_begin; s < s_end; ++s) {
        SegmentPartial& part = partials_[s];
        std::fill(part.cached, part.cached + p_.nk, 0.0f);
        std::fill(part.streamed, part.streamed + p_.nk, 0.0f);
        part.shift = kNegInf;
        part.n_cached = part.n_streamed = part.n_rescales = 0;
        const int64_t r0 = seg_begin(s), nc = seg_cached(s), r1 = seg_end(s);
        sc.redo.clear();

        if (first) {
          // g = 0: cached and streamed rows have the same column form; the cached ones store E.
          for (int64_t c0 = 0; c0 < nc; c0 += kGemmRows) {
            const int64_t n = std::min(kGemmRows, nc - c0);
            for (int64_t r = 0; r < n; ++r) sc.ids[r] = r0 + c0 + r;
            stream_update(sc.ids.data(), n, nullptr, part.streamed, sc, cache_row(s, c0));
          }
        } else {
          for (int64_t c0 = 0; c0 < nc; c0 += plan_.sub_rows) {
            const int64_t n = std::min(plan_.sub_rows, nc - c0);
            const float* rows = cache_row(s, c0);
            float* rsum = row_sum_ + r0 + c0;
            asag::cpu::dot_rows(rows, p_.nk, n, col_w_, p_.nk, rsum);
            // log u_i = m_i + f_i; the block's largest becomes the segment shift if it is larger.
            float block_shift = kNegInf;
            for (int64_t r = 0; r < n; ++r) {
              const int64_t i = r0 + c0 + r;
              if (rsum[r] < row_floor) {  // NaN is not < : it flows on and poisons f
                sc.redo.push_back(i);
                sc.weights[r] = kNegInf;
                continue;
              }
              const float lse = row_max_[i] + G + std::log(rsum[r]);
              h_.f[i] = p_.log_a - lse;
              sc.weights[r] = row_max_[i] + h_.f[i];
              block_shift = sc.weights[r] > block_shift ? sc.weights[r] : block_shift;
            }
            if (block_shift > part.shift) {
              if (part.shift != kNegInf) {
                asag::cpu::scale_inplace(part.cached, std::exp(part.shift - block_shift), p_.nk);
                ++part.n_rescales;
              }
              part.shift = block_shift;
            }
            for (int64_t r = 0; r < n; ++r)  // rows sent to redo carry -inf: weight 0
              sc.weights[r] = sc.weights[r] == kNegInf ? 0.0f : std::exp(sc.weights[r] - part.shift);
            asag::cpu::accumulate_rows(part.cached, rows, p_.nk, sc.weights.data(), n, p_.nk);
          }
          part.n_cached = nc - int64_t(sc.redo.size());
        }
        // Rows that could not use the cache, then the uncached rows, streamed with the current g.
        for_rows_in_blocks(sc.redo.data(), int64_t(sc.redo.size()),
                           [&](const int64_t* ids, int64_t n) { stream_update(ids, n, g_bias, part.streamed, sc, nullptr); });
        for_range_in_blocks(r0 + nc, r1, sc,
                            [&](const int64_t* ids, int64_t n) { stream_update(ids, n, g_bias, part.streamed, sc, nullptr); });
        part.n_streamed = (first ? nc : int64_t(sc.redo.size())) + (r1 - r0 - nc);
      }
    });
  }

  // g_j = log b − LSE_i(L_ij + f_i) from the segment partials (merged in segment order); columns
  // whose sum is not trustworthy are recomputed exactly.
  void update_g() {
    float shift = kNegInf;
    int64_t n_cached = 0, n_streamed = 0, n_terms = 0;
    for (const auto& part : partials_) {
      shift = part.shift > shift ? part.shift : shift;
      n_cached += part.n_cached;
      n_streamed += part.n_streamed;
      n_terms += part.n_cached + part.n_rescales + 1;
    }
    std::vector<float> seg_factor(plan_.nseg);
    for (int64_t s = 0; s < plan_.nseg; ++s)
      seg_factor[s] = partials_[s].shift == kNegInf ? 0.0f : std::exp(partials_[s].shift - shift);
    const float flush_cached =
        n_cached > 0 ? shift + std::log(float(n_terms)) + kFlushLog2 * kLn2 : kNegInf;
    const float flush_streamed_log = n_streamed > 0 ? std::log(float(n_streamed)) + kFlushLog2 * kLn2 : kNegInf;
    std::vector<uint8_t> redo(p_.nk, 0);

    at::parallel_for(0, p_.nk, 1024, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        float cached = 0.0f, streamed = 0.0f;
        for (int64_t s = 0; s < plan_.nseg; ++s) {
          cached += seg_factor[s] * partials_[s].cached[j];
          streamed += partials_[s].streamed[j];
        }
        const float g_old = h_.g[j];
        const float lse = log_add_exp(n_cached > 0 ? shift + std::log(cached) : kNegInf,
                                      n_streamed > 0 ? std::log(streamed) - g_old : kNegInf);
        const float flush = log_add_exp(flush_cached, flush_streamed_log - g_old);
        if (!std::isnan(lse) && !(lse - flush >= kTrustLog2 * kLn2)) redo[j] = 1;
        h_.g[j] = p_.log_b - lse;
      }
    });

    std::vector<int64_t> cols;
    for (int64_t j = 0; j < p_.nk; ++j)
      if (redo[j]) cols.push_back(j);
    if (!cols.empty()) exact_column_lse(cols);
  }

  // g_j = log b − LSE_i(L_ij + f_i) for the listed columns, in the log domain with a running max.
  void exact_column_lse(const std::vector<int64_t>& cols) {
    constexpr int64_t kCols = 16, kRows = 256;
    const int64_t nchunks = (int64_t(cols.size()) + kCols - 1) / kCols;
    at::parallel_for(0, nchunks, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<float> kc(kCols * p_.d), lt(kCols * kRows);
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t j0 = c * kCols, n = std::min<int64_t>(kCols, int64_t(cols.size()) - j0);
        for (int64_t r = 0; r < n; ++r)
          std::copy(h_.k + cols[j0 + r] * h_.ldk, h_.k + cols[j0 + r] * h_.ldk + p_.d, kc.data() + r * p_.d);
        float m[kCols], s[kCols];
        std::fill(m, m + kCols, kNegInf);
        std::fill(s, s + kCols, 0.0f);
        for (int64_t i0 = 0; i0 < p_.nq; i0 += kRows) {
          const int64_t ni = std::min(kRows, p_.nq - i0);
          gemm_abt(n, ni, p_.d, p_.logit_scale, kc.data(), p_.d, h_.q + i0 * h_.ldq, h_.ldq, lt.data(), ni);
          for (int64_t r = 0; r < n; ++r) {
            const RowStats st = asag::cpu::exp_row(lt.data() + r * ni, h_.f + i0, lt.data() + r * ni, ni);
            merge_lse(m[r], s[r], st.max, st.sum);
          }
        }
        for (int64_t r = 0; r < n; ++r) h_.g[cols[j0 + r]] = p_.log_b - (m[r] + std::log(s[r]));
      }
    });
  }

  // out = softmax_j(L_ij + g_j) · V. Cached rows: one GEMM E · (w ⊙ V), normalisers E · w.
  void final_pass(bool with_g, bool write_f) {
    const int64_t nc_any = plan_.cached_rows;
    const int64_t dvp = p_.dv + 1;
    float G = 0.0f;
    if (nc_any > 0) {
      G = kNegInf;
      for (int64_t j = 0; j < p_.nk; ++j) G = h_.g[j] > G ? h_.g[j] : G;
      if (G == kNegInf) G = 0.0f;
      asag::cpu::exp_shifted(h_.g, G, col_w_, p_.nk);
      at::parallel_for(0, p_.nk, 256, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const float w = col_w_[j];
          const float* vr = h_.v + j * h_.ldv;
          float* dst = v_weighted_ + j * dvp;
          for (int64_t c = 0; c < p_.dv; ++c) dst[c] = w * vr[c];
          dst[p_.dv] = w;
        }
      });
    }
    const float row_floor = float(p_.nk) * std::exp2(kFlushLog2 + kTrustLog2);
    const float* g_bias = with_g ? h_.g : nullptr;

    at::parallel_for(0, plan_.nseg, 1, [&](int64_t s_begin, int64_t s_end) {
      Scratch& sc = scratch();
      for (int64_t s = s_begin; s < s_end; ++s) {
        const int64_t r0 = seg_begin(s), nc = seg_cached(s), r1 = seg_end(s);
        sc.redo.clear();
        for (int64_t c0 = 0; c0 < nc; c0 += kGemmRows) {
          const int64_t n = std::min(kGemmRows, nc - c0);
          // The normaliser Σ_j E_ij w_j comes from dot_rows (blocked, double across blocks), not
          // from a w column in the GEMM: BLAS sums that column's Nk same-sign terms in one float32
          // running sum, off by ~Nk·ulp (7e-5 at Nk = 16384 when a row's plan is flat, e.g. Nq = 1).
          gemm_ab(n, p_.dv, p_.nk, cache_row(s, c0), p_.nk, v_weighted_, dvp, sc.product.data(), dvp);
          asag::cpu::dot_rows(cache_row(s, c0), p_.nk, n, col_w_, p_.nk, sc.sums.data());
          for (int64_t r = 0; r < n; ++r) {
            const float* src = sc.product.data() + r * dvp;
            const float norm = sc.sums[r];
            if (norm < row_floor) {
              sc.redo.push_back(r0 + c0 + r);
              continue;
            }
            write_out_row(src, norm, h_.out + (r0 + c0 + r) * p_.dv);
          }
        }
        for_rows_in_blocks(sc.redo.data(), int64_t(sc.redo.size()),
                           [&](const int64_t* ids, int64_t n) { stream_final(ids, n, g_bias, write_f, sc); });
        for_range_in_blocks(r0 + nc, r1, sc,
                            [&](const int64_t* ids, int64_t n) { stream_final(ids, n, g_bias, write_f, sc); });
      }
    });
  }

  const Problem& p_;
  const Plan& plan_;
  float* cache_;
  std::vector<Scratch>& scratch_;
  float* partial_buf_;
  float* row_max_;
  float* row_sum_;
  float* col_w_;
  float* v_weighted_;
  std::vector<SegmentPartial> partials_;
  Head h_{};
};

// The cache: tens to hundreds of MiB streamed once per sweep. 2 MiB pages (where the kernel allows
// them on request) cut its page faults and TLB misses.
class HugePageBuffer {
 public:
  HugePageBuffer(size_t floats, bool huge) {
    if (floats == 0) return;
    constexpr size_t kAlign = size_t(2) << 20;
    const size_t bytes = (floats * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kAlign, bytes) == 0 && p, "sinkhorn_attention_cpu: cannot allocate ", bytes,
                " bytes of workspace");
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advisory: failure only costs speed
#else
    (void)huge;
#endif
    ptr_ = static_cast<float*>(p);
  }
  ~HugePageBuffer() { free(ptr_); }
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;
  float* data() const { return ptr_; }

 private:
  float* ptr_ = nullptr;
};

// The cache outlives a call (one buffer, reused by the next call that fits in it) so that a call
// does not pay for faulting in and zeroing fresh pages: that cost is as large as a whole cached
// sweep. It never exceeds the workspace budget of the call that sized it. A call that finds it in
// use by another thread allocates its own. keep_workspace = false (ASAG_CPU_KEEP_WORKSPACE=0, read
// by the Python module like every ASAG_* variable) frees it after every call.
struct KeptCache {
  std::mutex mutex;
  std::unique_ptr<HugePageBuffer> buffer;
  size_t floats = 0;
};

KeptCache& kept_cache() {
  static KeptCache* kept = new KeptCache();  // leaked on purpose: no teardown-order issues at exit
  return *kept;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "sinkhorn_attention_cpu: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "sinkhorn_attention_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "sinkhorn_attention_cpu: ", name, " must be 4-D [B, H, N, D], got ", t.dim(), "-D");
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "sinkhorn_attention_cpu: ", name,
                   " must be float32, float16 or bfloat16, got ", st);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, int64_t num_iters,
                                                                      double logit_scale, int64_t workspace_bytes,
                                                                      bool keep_workspace, bool hugepages) {
  check_input(q, "q");
  check_input(k, "k");
  check_input(v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "sinkhorn_attention_cpu: q, k, v must share one dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t nk = k.size(2), dv = v.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && v.size(0) == B && v.size(1) == H,
                    "sinkhorn_attention_cpu: q, k, v must share [B, H], got q ", q.sizes(), ", k ", k.sizes(),
                    ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == d, "sinkhorn_attention_cpu: k's last dim must equal q's (", d, "), got ", k.size(3));
  TORCH_CHECK_VALUE(v.size(2) == nk, "sinkhorn_attention_cpu: v must have k's ", nk, " rows, got ", v.size(2));
  TORCH_CHECK_VALUE(nk > 0, "sinkhorn_attention_cpu: k must have at least one row (Nk = 0)");
  TORCH_CHECK_VALUE(num_iters >= 0 && num_iters <= INT_MAX,
                    "sinkhorn_attention_cpu: num_iters must be an int in [0, 2147483647], got ", num_iters);
  TORCH_CHECK_VALUE(std::isfinite(logit_scale), "sinkhorn_attention_cpu: logit_scale must be finite, got ",
                    logit_scale);
  TORCH_CHECK_VALUE(workspace_bytes >= 0, "sinkhorn_attention_cpu: workspace_bytes must be >= 0, got ",
                    workspace_bytes);

  at::Tensor out = at::empty({B, H, nq, dv}, q.options());
  at::Tensor f = at::empty({B, H, nq}, q.options().dtype(at::kFloat));
  at::Tensor g = at::zeros({B, H, nk}, q.options().dtype(at::kFloat));
  if (B * H == 0 || nq == 0) return {out, f, g};

  Problem p{nq, nk, d, dv, int(num_iters), float(logit_scale), float(1.0 / double(nq)), float(-std::log(double(nq))),
            float(-std::log(double(nk)))};

  // Work split: at most 64 segments of whole GEMM blocks; fixed by Nq alone.
  Plan plan{};
  const int64_t blocks = (nq + kGemmRows - 1) / kGemmRows;
  const int64_t blocks_per_seg = (blocks + 63) / 64;
  plan.seg_rows = blocks_per_seg * kGemmRows;
  plan.nseg = (nq + plan.seg_rows - 1) / plan.seg_rows;
  plan.sub_rows = std::max<int64_t>(4, std::min<int64_t>(64, (int64_t(256) << 10) / (4 * nk)));

  // Workspace: scratch, partials, factors and copies first; what is left caches Gibbs-kernel rows.
  // Heads run in parallel, one per thread, when there are enough of them to keep the threads evenly
  // busy: no synchronisation between the passes of a head. Otherwise the threads share each head's
  // segments. Each concurrent head has its own cache, a share of the budget.
  const int nthreads = at::get_num_threads();
  const int64_t heads = B * H;
  const bool heads_parallel = nthreads > 1 && heads >= nthreads && (heads % nthreads == 0 || heads >= 4 * nthreads);
  const int64_t workers = heads_parallel ? nthreads : 1;
  const bool copies = q.scalar_type() != at::kFloat;
  const int64_t per_worker_floats = plan.nseg * 2 * nk + nk * (dv + 2) + 2 * nq +
                                    (copies ? nq * d + nk * (d + dv) + nq * dv : 0);
  const int64_t fixed_floats =
      int64_t(nthreads) * (kGemmRows * (nk + dv + 1 + d) + 2 * kGemmRows) + workers * per_worker_floats;
  const int64_t spare_rows = std::max<int64_t>(0, workspace_bytes / 4 - fixed_floats) / nk / workers;
  plan.cached_rows = num_iters == 0 ? 0 : std::min(plan.seg_rows, spare_rows / plan.nseg);

  auto make_scratch = [&](int64_t count) {
    std::vector<Scratch> scratch(count);
    for (auto& sc : scratch) {
      sc.logits.resize(kGemmRows * nk);
      sc.product.resize(kGemmRows * (dv + 1));
      sc.qrows.resize(kGemmRows * std::max<int64_t>(d, 1));
      sc.weights.resize(kGemmRows);
      sc.sums.resize(kGemmRows);
      sc.ids.resize(kGemmRows);
      sc.redo.reserve(plan.seg_rows);
    }
    return scratch;
  };
  const bool out_direct = q.scalar_type() == at::kFloat;
  struct Worker {
    std::vector<Scratch> scratch;
    float* cache_rows = nullptr;
    at::Tensor small;
    at::Tensor out_f32;
    std::unique_ptr<HeadSolver> solver;
  };
  const size_t cache_floats_per_worker = size_t(plan.nseg * plan.cached_rows * nk);
  const size_t cache_floats = cache_floats_per_worker * size_t(workers);
  std::unique_lock<std::mutex> kept_lock;
  std::unique_ptr<HugePageBuffer> own_cache;
  float* cache_base = nullptr;
  if (cache_floats > 0) {
    KeptCache& kept = kept_cache();
    std::unique_lock<std::mutex> lock(kept.mutex, std::try_to_lock);
    if (keep_workspace && lock.owns_lock()) {
      if (kept.floats < cache_floats) {
        kept.buffer.reset();
        kept.buffer = std::make_unique<HugePageBuffer>(cache_floats, hugepages);
        kept.floats = cache_floats;
      }
      cache_base = kept.buffer->data();
      kept_lock = std::move(lock);
    } else {
      if (lock.owns_lock() && kept.buffer) {  // keeping is off: drop what an earlier call kept
        kept.buffer.reset();
        kept.floats = 0;
      }
      own_cache = std::make_unique<HugePageBuffer>(cache_floats, hugepages);
      cache_base = own_cache->data();
    }
  }
  std::vector<Worker> pool(workers);
  for (size_t wi = 0; wi < pool.size(); ++wi) {
    Worker& w = pool[wi];
    w.scratch = make_scratch(heads_parallel ? 1 : nthreads);
    w.cache_rows = cache_base ? cache_base + wi * cache_floats_per_worker : nullptr;
    w.small = at::empty({plan.nseg * 2 * nk + nk * (dv + 2) + 2 * nq}, q.options().dtype(at::kFloat));
    float* partial_buf = w.small.data_ptr<float>();
    float* v_weighted = partial_buf + plan.nseg * 2 * nk;
    float* col_w = v_weighted + nk * (dv + 1);
    float* row_max = col_w + nk;
    float* row_sum = row_max + nq;
    if (!out_direct) w.out_f32 = at::empty({nq, dv}, q.options().dtype(at::kFloat));
    w.solver = std::make_unique<HeadSolver>(p, plan, w.cache_rows, w.scratch, partial_buf, row_max, row_sum, col_w,
                                            v_weighted);
  }

  auto solve_head = [&](Worker& w, int64_t bh) {
    const int64_t b = bh / H, hh = bh % H;
    const RowMajor qh = as_row_major_f32(q[b][hh]);
    const RowMajor kh = as_row_major_f32(k[b][hh]);
    RowMajor vh = as_row_major_f32(v[b][hh]);
    const float v_scale = value_scale(vh, nk, dv);
    if (v_scale != 1.0f) {
      at::Tensor scaled = v[b][hh].to(at::kFloat).div(double(v_scale)).contiguous();
      vh = {scaled, scaled.data_ptr<float>(), std::max<int64_t>(dv, 1)};
    }
    Head head{qh.ptr,
              qh.ld,
              kh.ptr,
              kh.ld,
              vh.ptr,
              vh.ld,
              f[b][hh].data_ptr<float>(),
              g[b][hh].data_ptr<float>(),
              out_direct ? out[b][hh].data_ptr<float>() : w.out_f32.data_ptr<float>(),
              v_scale};
    w.solver->solve(head);
    if (!out_direct) out[b][hh].copy_(w.out_f32);
  };
  if (heads_parallel) {
    // Inside this region the solver's own parallel loops run inline on the calling thread.
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      Worker& w = pool[at::get_thread_num()];
      for (int64_t bh = begin; bh < end; ++bh) solve_head(w, bh);
    });
  } else {
    for (int64_t bh = 0; bh < heads; ++bh) solve_head(pool[0], bh);
  }
  return {out, f, g};
}

}  // namespace

void define_block_passes(py::module_& m);  // blocks_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU Sinkhorn attention (asag_kernels backend 'cpu')";
  // The GIL is released while computing: other Python threads run, and calls from several threads
  // overlap. Tensors are only touched through ATen inside.
  m.def("sinkhorn_attention_cpu", &sinkhorn_attention_cpu, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("num_iters"), py::arg("logit_scale"), py::arg("workspace_bytes"),
        py::arg("keep_workspace") = true, py::arg("hugepages") = true, py::call_guard<py::gil_scoped_release>(),
        "Sinkhorn attention on 4-D [B, H, N, D] CPU tensors (float16/bfloat16/float32). Returns (out, f, g): out "
        "[B, H, Nq, Dv] in q's dtype, f [B, H, Nq] and g [B, H, Nk] in float32. logit_scale = cost_sign * scale / "
        "epsilon; workspace_bytes bounds the cached Gibbs-kernel rows (beyond it rows are streamed); keep_workspace "
        "keeps the cache for the next call; hugepages asks for 2 MiB pages.");
  m.def("row_kernels_isa", &asag::cpu::row_kernels_isa, "Which row-kernel implementation runs here: avx2 or generic");
  m.def("select_row_kernels", &asag::cpu::select_row_kernels, py::arg("allow_avx2"),
        "Re-pick the row kernels (allow_avx2=False forces generic) before any call; returns the one picked");
  define_block_passes(m);
}

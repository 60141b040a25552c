// CUDA Sinkhorn-attention kernels (no PyTorch dependency).
//
//   L[i,j] = logit_scale * <q_i, k_j>       (logit_scale = cost_sign * scale / epsilon)
//   g = 0;  repeat num_iters times:  f_i = -log Nq - LSE_j(L[i,j] + g_j);  g_j = -log Nk - LSE_i(L[i,j] + f_i)
//   out_i = sum_j softmax_j(L[i,j] + g_j) v_j          (num_iters = 0: f = -log Nq - LSE_j L[i,j])
//
// Three kernels, each streaming the logits tile by tile, never storing them:
//   lse_pass_kernel       out_r = log_marginal - LSE_c(L'[r,c] + bias_c) for every row r of A, with
//                         L' = logit_scale * A B^T. The row update is (A, B, bias) = (q, k, g) and
//                         the column update is (k, q, f): L^T is the same product with q and k
//                         swapped, so the column LSE is a row LSE of the transposed problem. One block
//                         owns its rows for the whole sweep, so no atomics and a fixed reduction order.
//   attention_pass_kernel flash attention with key bias g (online softmax, P @ V on tensor cores);
//                         for num_iters = 0 it also writes f, which is then exactly its row LSE.
//
// Everything is computed in base 2: logits are scaled by logit_scale * log2(e) and the potentials are
// loaded times log2(e), so every exponential is one exp2; the potentials are stored in natural units.
// Each warp owns 16 rows; a lane keeps, per row it touches, a running (max, sum) over its own columns
// (online_lse.h), merged across the 4 lanes of its quad at the end (the LSE pass) or kept quad-wide
// per tile (the attention pass, where the row max must be shared to rescale the output).
// Tails: rows past N are zero-filled in shared memory and never stored; columns past N get bias
// -inf; feature columns past D are zero-filled. The -inf - -inf case is avoided by subtracting 0 when
// a running max is still -inf. NaN never enters a running max (fmaxf drops it) but always reaches the
// running sum, so it propagates to the outputs.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <cmath>

#include "asag/online_lse.h"
#include "asag/sinkhorn_launch.h"
#include "asag/warp_mma.cuh"

namespace asag {

constexpr float kNegInf = -INFINITY;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockRows = kWarps * 16;

// Padded head-dimension buckets the kernels are compiled for.
inline int head_dim_bucket(int d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }

struct StridedTile {
  const void* data;  // at batch 0, head 0, row 0, feature 0
  int64_t stride_b, stride_h, stride_n, stride_d;
  bool vectorized;  // 16-byte loads are legal: stride_d == 1 and everything 16-byte aligned
};

struct LsePassArgs {
  StridedTile a, b;
  const float* bias;  // [batch*heads, n_b], natural units; nullptr means zeros
  float* out;         // [batch*heads, n_a]
  int heads, n_a, n_b, d;
  int row_tiles;
  float scale2;        // logit_scale * log2(e)
  float log_marginal;  // -log(n_a)
};

struct AttentionArgs {
  StridedTile q, k, v;
  const float* bias;  // g [batch*heads, nk] natural units; nullptr means zeros
  void* out;          // [batch*heads, nq, dv] contiguous, element type of q
  float* f_out;       // [batch*heads, nq] or nullptr: written only when bias is zero (num_iters = 0)
  int heads, nq, nk, d, dv;
  int row_tiles;
  float scale2;
  float log_a;  // -log(nq)
};

template <class Elem>
struct RawBits;
template <>
struct RawBits<__half> {
  using type = uint16_t;
};
template <>
struct RawBits<__nv_bfloat16> {
  using type = uint16_t;
};
template <>
struct RawBits<float> {
  using type = uint32_t;
};

// Copies rows [0, valid_rows) x features [0, valid_cols) of a strided tile into a shared-memory tile
// of ROWS x COLS (leading dimension LD) and zero-fills the rest.
template <class Elem, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(Elem* dst, const Elem* src, int64_t stride_n, int64_t stride_d,
                                          int valid_rows, int valid_cols, bool vectorized) {
  if (vectorized) {  // valid_cols is then a multiple of kVec (checked on the host)
    constexpr int kVec = 16 / static_cast<int>(sizeof(Elem));
    constexpr int kChunksPerRow = COLS / kVec;
    for (int idx = threadIdx.x; idx < ROWS * kChunksPerRow; idx += kThreads) {
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * kVec;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < valid_rows && c < valid_cols) val = *reinterpret_cast<const uint4*>(src + r * stride_n + c);
      *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
  } else {
    using Bits = typename RawBits<Elem>::type;
    const Bits* src_bits = reinterpret_cast<const Bits*>(src);
    Bits* dst_bits = reinterpret_cast<Bits*>(dst);
    for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
      const int r = idx / COLS, c = idx % COLS;
      Bits val = 0;
      if (r < valid_rows && c < valid_cols) val = src_bits[r * stride_n + c * stride_d];
      dst_bits[r * LD + c] = val;
    }
  }
}

// Key-bias tile in base-2 units, -inf past the last column (so masked logits are -inf).
template <int BN>
__device__ __forceinline__ void load_bias(float* dst, const float* bias, int col0, int n_cols) {
  for (int j = threadIdx.x; j < BN; j += kThreads) {
    const int col = col0 + j;
    float val = kNegInf;
    if (col < n_cols) val = bias != nullptr ? bias[col] * kLog2e : 0.0f;
    dst[j] = val;
  }
}

// log2 of a running (max, sum) that keeps NaN (online_lse.h's lse_value2 returns -inf for an
// all -inf stream even when a NaN reached the sum).
__device__ __forceinline__ float lse_finish2(float m, float s) {
  if (m == kNegInf) return s == 0.0f ? m : __int_as_float(0x7fffffff);
  return m + log2f(s);
}

// Offset of the running max used when subtracting: 0 while the max is still -inf.
__device__ __forceinline__ float finite_or_zero(float m) {
  return m == kNegInf ? 0.0f : m;
}

template <class Elem>
__device__ __forceinline__ const Elem* head_base(const StridedTile& t, int64_t z, int heads) {
  const int64_t b = z / heads, h = z % heads;
  return static_cast<const Elem*>(t.data) + b * t.stride_b + h * t.stride_h;
}

template <class Elem>
__device__ __forceinline__ Elem from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}

// S[16 rows of this warp, BN columns] = A_tile @ B_tile^T over the first k_steps feature steps.
template <MathMode M, int DP, int LD, int NT>
__device__ __forceinline__ void tile_logits(float (&acc)[NT][4], const typename MmaTraits<M>::Elem* sa,
                                            const typename MmaTraits<M>::Elem* sb, int warp_row0, int k_steps) {
  constexpr int kK = MmaTraits<M>::kK;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
  }
  auto feature_step = [&](int ks) {
    typename MmaTraits<M>::A fa;
    load_a<M>(fa, sa, LD, warp_row0, ks * kK);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      typename MmaTraits<M>::B fb;
      load_b_nk<M>(fb, sb, LD, nt * 8, ks * kK);
      mma<M>(acc[nt], fa, fb);
    }
  };
  if constexpr (M == MathMode::kFloat32) {
    // The FMA path is long per step already; unrolling the feature loop only bloats the code.
#pragma unroll 1
    for (int ks = 0; ks < k_steps; ++ks) feature_step(ks);
  } else {
#pragma unroll
    for (int ks = 0; ks < DP / kK; ++ks) {
      if (ks < k_steps) feature_step(ks);
    }
  }
}

template <MathMode M, int DP, int BN>
struct LsePassConfig {
  using Elem = typename MmaTraits<M>::Elem;
  static constexpr int kLd = DP + 16 / static_cast<int>(sizeof(Elem));  // 16-byte pad: no bank conflicts
  static constexpr size_t kSmemBytes = (kBlockRows + BN) * kLd * sizeof(Elem) + BN * sizeof(float);
};

template <MathMode M, int DP, int BN>
__global__ void __launch_bounds__(kThreads) lse_pass_kernel(const LsePassArgs p) {
  using Cfg = LsePassConfig<M, DP, BN>;
  using Elem = typename Cfg::Elem;
  constexpr int kLd = Cfg::kLd;
  constexpr int NT = BN / 8;
  constexpr int kK = MmaTraits<M>::kK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* sa = reinterpret_cast<Elem*>(smem_raw);
  Elem* sb = sa + kBlockRows * kLd;
  float* sbias = reinterpret_cast<float*>(sb + BN * kLd);

  const int64_t z = blockIdx.x / p.row_tiles;
  const int row0 = (blockIdx.x % p.row_tiles) * kBlockRows;
  const int warp = threadIdx.x >> 5, gid = lane_id() >> 2, tig = lane_id() & 3;
  const Elem* a_base = head_base<Elem>(p.a, z, p.heads) + row0 * p.a.stride_n;
  const Elem* b_base = head_base<Elem>(p.b, z, p.heads);
  const float* bias = p.bias != nullptr ? p.bias + z * p.n_b : nullptr;
  const int k_steps = (p.d + kK - 1) / kK;

  load_tile<Elem, kBlockRows, DP, kLd>(sa, a_base, p.a.stride_n, p.a.stride_d, min(kBlockRows, p.n_a - row0), p.d,
                                        p.a.vectorized);

  float run_max[2] = {kNegInf, kNegInf};
  float run_sum[2] = {0.0f, 0.0f};
  for (int col0 = 0; col0 < p.n_b; col0 += BN) {
    __syncthreads();  // every warp is done with the previous B tile
    load_tile<Elem, BN, DP, kLd>(sb, b_base + col0 * p.b.stride_n, p.b.stride_n, p.b.stride_d, min(BN, p.n_b - col0),
                                 p.d, p.b.vectorized);
    load_bias<BN>(sbias, bias, col0, p.n_b);
    __syncthreads();

    float acc[NT][4];
    tile_logits<M, DP, kLd, NT>(acc, sa, sb, warp * 16, k_steps);

#pragma unroll
    for (int r = 0; r < 2; ++r) {  // r = 0: row gid, r = 1: row gid + 8
      float tile_max = kNegInf;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = acc[nt][2 * r + e] * p.scale2 + sbias[nt * 8 + 2 * tig + e];
          acc[nt][2 * r + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      const float new_max = fmaxf(run_max[r], tile_max);
      const float offset = finite_or_zero(new_max);
      float tile_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) tile_sum += exp2f(acc[nt][2 * r + e] - offset);
      }
      run_sum[r] = run_sum[r] * rescale2(run_max[r], new_max) + tile_sum;
      run_max[r] = new_max;
    }
  }

  // Merge the four partial states of each row across the quad: a fixed butterfly, so the result
  // does not depend on scheduling (the lane with tig == 0 writes it).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
      const float other_max = __shfl_xor_sync(0xffffffffu, run_max[r], offset);
      const float other_sum = __shfl_xor_sync(0xffffffffu, run_sum[r], offset);
      const float merged_max = fmaxf(run_max[r], other_max);
      run_sum[r] = run_sum[r] * rescale2(run_max[r], merged_max) + other_sum * rescale2(other_max, merged_max);
      run_max[r] = merged_max;
    }
    const int row = row0 + warp * 16 + gid + 8 * r;
    if (tig == 0 && row < p.n_a) p.out[z * p.n_a + row] = p.log_marginal - kLn2 * lse_finish2(run_max[r], run_sum[r]);
  }
}

template <MathMode M, int DP, int DVP, int BN>
struct AttentionConfig {
  using Elem = typename MmaTraits<M>::Elem;
  static constexpr int kPad = 16 / static_cast<int>(sizeof(Elem));
  static constexpr int kLdQk = DP + kPad;
  static constexpr int kLdV = DVP + kPad;
  static constexpr size_t kSmemBytes =
      ((kBlockRows + BN) * kLdQk + BN * kLdV) * sizeof(Elem) + BN * sizeof(float);
};

template <MathMode M, int DP, int DVP, int BN>
__global__ void __launch_bounds__(kThreads) attention_pass_kernel(const AttentionArgs p) {
  using Cfg = AttentionConfig<M, DP, DVP, BN>;
  using Elem = typename Cfg::Elem;
  constexpr int kLdQk = Cfg::kLdQk, kLdV = Cfg::kLdV;
  constexpr int NT = BN / 8;    // 8-key column tiles of S
  constexpr int NV = DVP / 8;   // 8-wide column tiles of the output
  constexpr int kK = MmaTraits<M>::kK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* sq = reinterpret_cast<Elem*>(smem_raw);
  Elem* sk = sq + kBlockRows * kLdQk;
  Elem* sv = sk + BN * kLdQk;
  float* sbias = reinterpret_cast<float*>(sv + BN * kLdV);

  const int64_t z = blockIdx.x / p.row_tiles;
  const int row0 = (blockIdx.x % p.row_tiles) * kBlockRows;
  const int warp = threadIdx.x >> 5, gid = lane_id() >> 2, tig = lane_id() & 3;
  const Elem* q_base = head_base<Elem>(p.q, z, p.heads) + row0 * p.q.stride_n;
  const Elem* k_base = head_base<Elem>(p.k, z, p.heads);
  const Elem* v_base = head_base<Elem>(p.v, z, p.heads);
  const float* bias = p.bias != nullptr ? p.bias + z * p.nk : nullptr;
  const int k_steps = (p.d + kK - 1) / kK;
  const int dv_tiles = (p.dv + 7) / 8;

  load_tile<Elem, kBlockRows, DP, kLdQk>(sq, q_base, p.q.stride_n, p.q.stride_d, min(kBlockRows, p.nq - row0), p.d,
                                          p.q.vectorized);

  float o[NV][4];
#pragma unroll
  for (int nv = 0; nv < NV; ++nv) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nv][e] = 0.0f;
  }
  float run_max[2] = {kNegInf, kNegInf};
  float run_sum[2] = {0.0f, 0.0f};  // this lane's columns only; summed over the quad at the end

  for (int col0 = 0; col0 < p.nk; col0 += BN) {
    __syncthreads();
    const int valid_keys = min(BN, p.nk - col0);
    load_tile<Elem, BN, DP, kLdQk>(sk, k_base + col0 * p.k.stride_n, p.k.stride_n, p.k.stride_d, valid_keys, p.d,
                                   p.k.vectorized);
    load_tile<Elem, BN, DVP, kLdV>(sv, v_base + col0 * p.v.stride_n, p.v.stride_n, p.v.stride_d, valid_keys, p.dv,
                                   p.v.vectorized);
    load_bias<BN>(sbias, bias, col0, p.nk);
    __syncthreads();

    float s[NT][4];
    tile_logits<M, DP, kLdQk, NT>(s, sq, sk, warp * 16, k_steps);

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = kNegInf;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = s[nt][2 * r + e] * p.scale2 + sbias[nt * 8 + 2 * tig + e];
          s[nt][2 * r + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(run_max[r], tile_max);
      const float offset = finite_or_zero(new_max);
      const float alpha = rescale2(run_max[r], new_max);
      float tile_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float prob = exp2f(s[nt][2 * r + e] - offset);
          s[nt][2 * r + e] = prob;
          tile_sum += prob;
        }
      }
      run_sum[r] = run_sum[r] * alpha + tile_sum;
      run_max[r] = new_max;
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        o[nv][2 * r] *= alpha;
        o[nv][2 * r + 1] *= alpha;
      }
    }

#pragma unroll
    for (int ks = 0; ks < BN / kK; ++ks) {
      typename MmaTraits<M>::A fa;
      a_from_accumulators<M, NT>(fa, s, ks);
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        if (nv < dv_tiles) {
          typename MmaTraits<M>::B fb;
          load_b_kn<M>(fb, sv, kLdV, ks * kK, nv * 8);
          mma<M>(o[nv], fa, fb);
        }
      }
    }
  }

  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = run_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int row = row0 + warp * 16 + gid + 8 * r;
    if (row >= p.nq) continue;
    const float inv_total = 1.0f / total;
    Elem* out_row = out + (z * p.nq + row) * p.dv;
#pragma unroll
    for (int nv = 0; nv < NV; ++nv) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nv * 8 + 2 * tig + e;
        float x = o[nv][2 * r + e] * inv_total;
        // out is a convex combination of v's rows, so it is infinite only for non-finite inputs,
        // which SPEC §4 wants to read as NaN.
        if (fabsf(x) == INFINITY) x = __int_as_float(0x7fffffff);
        if (col < p.dv) out_row[col] = from_float<Elem>(x);
      }
    }
    if (p.f_out != nullptr && tig == 0) p.f_out[z * p.nq + row] = p.log_a - kLn2 * lse_finish2(run_max[r], total);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: tile configurations per mode and head-dimension bucket, and the pass sequence.

// Keys per tile: 64, or 32 where the output accumulators of D = 256 leave no registers for a
// 64-wide logit tile, or where float32 tiles would pass the 99 KiB of shared memory a block gets
// on sm_86/sm_89 (float32 attention at D = 256 still needs 130 KiB: A100/H100-class GPUs only).
template <MathMode M, int DP>
constexpr int lse_keys_per_tile() {
  return (sizeof(typename MmaTraits<M>::Elem) == 4 && DP == 256) ? 32 : 64;
}
template <MathMode M, int DP>
constexpr int attention_keys_per_tile() {
  return (DP == 256 || (sizeof(typename MmaTraits<M>::Elem) == 4 && DP == 128)) ? 32 : 64;
}

inline StridedTile make_tile(const StridedInput& t, int batch, int heads, int n, int cols, int elem_size) {
  const int vec = 16 / elem_size;
  auto aligned = [&](int64_t stride, int extent) { return extent <= 1 || stride % vec == 0; };
  const bool vectorized = (t.stride_d == 1 || cols == 1) && cols % vec == 0 &&
                          reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && aligned(t.stride_n, n) &&
                          aligned(t.stride_h, heads) && aligned(t.stride_b, batch);
  return {t.data, t.stride_b, t.stride_h, t.stride_n, t.stride_d, vectorized};
}

// A failed runtime call also leaves its error as this thread's "last error"; the caller reports the
// returned value, so the copy is consumed here rather than left for unrelated later code to find.
inline int own_error(cudaError_t err) {
  if (err != cudaSuccess) (void)cudaGetLastError();
  return static_cast<int>(err);
}

// Returns this launch's own status only. cudaLaunchKernel returns it directly, unlike `<<<...>>>`
// followed by cudaGetLastError(), which would also report (and blame this launch for) an error that
// unrelated earlier work left pending on this thread, and would clear it for its real owner. Errors
// raised later while the kernels run are asynchronous; the next synchronising call reports them.
template <class Kernel, class Args>
int launch_kernel(Kernel kernel, int64_t blocks, size_t smem_bytes, cudaStream_t stream, const Args& args) {
  if (blocks > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return own_error(err);
  }
  void* params[] = {const_cast<Args*>(&args)};  // the kernels take one argument struct by value
  return own_error(
      cudaLaunchKernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), params, smem_bytes, stream));
}

// f (or g) = log_marginal - LSE over the other side, for every row of `a`.
template <MathMode M, int DP>
int launch_lse_pass(const StridedTile& a, const StridedTile& b, const float* bias, float* out, int batch, int heads,
                    int n_a, int n_b, int d, float scale2, cudaStream_t stream) {
  constexpr int BN = lse_keys_per_tile<M, DP>();
  LsePassArgs args;
  args.a = a;
  args.b = b;
  args.bias = bias;
  args.out = out;
  args.heads = heads;
  args.n_a = n_a;
  args.n_b = n_b;
  args.d = d;
  args.row_tiles = (n_a + kBlockRows - 1) / kBlockRows;
  args.scale2 = scale2;
  args.log_marginal = -logf(static_cast<float>(n_a));
  const int64_t blocks = static_cast<int64_t>(args.row_tiles) * batch * heads;
  return launch_kernel(lse_pass_kernel<M, DP, BN>, blocks, LsePassConfig<M, DP, BN>::kSmemBytes, stream, args);
}

template <MathMode M, int DP>
int launch_attention_pass(const AttentionArgs& base, int batch, cudaStream_t stream) {
  constexpr int BN = attention_keys_per_tile<M, DP>();
  AttentionArgs args = base;
  args.row_tiles = (args.nq + kBlockRows - 1) / kBlockRows;
  const int64_t blocks = static_cast<int64_t>(args.row_tiles) * batch * args.heads;
  return launch_kernel(attention_pass_kernel<M, DP, DP, BN>, blocks, AttentionConfig<M, DP, DP, BN>::kSmemBytes,
                       stream, args);
}

// All passes for one math mode and one head-dimension bucket DP (>= max(d, dv)).
template <MathMode M, int DP>
int launch_passes(const SinkhornProblem& p, cudaStream_t stream) {
  const int elem_size = static_cast<int>(sizeof(typename MmaTraits<M>::Elem));
  const StridedTile q = make_tile(p.q, p.batch, p.heads, p.nq, p.d, elem_size);
  const StridedTile k = make_tile(p.k, p.batch, p.heads, p.nk, p.d, elem_size);
  const StridedTile v = make_tile(p.v, p.batch, p.heads, p.nk, p.dv, elem_size);
  const float scale2 = static_cast<float>(static_cast<double>(p.logit_scale) * 1.4426950408889634);

  for (int iter = 0; iter < p.num_iters; ++iter) {
    // f = -log Nq - LSE_j(L + g): rows of q against keys, bias g (zero before the first update).
    int err = launch_lse_pass<M, DP>(q, k, iter == 0 ? nullptr : p.g, p.f, p.batch, p.heads, p.nq, p.nk, p.d, scale2,
                                     stream);
    if (err != 0) return err;
    // g = -log Nk - LSE_i(L + f): rows of k against queries, bias f.
    err = launch_lse_pass<M, DP>(k, q, p.f, p.g, p.batch, p.heads, p.nk, p.nq, p.d, scale2, stream);
    if (err != 0) return err;
  }

  AttentionArgs args;
  args.q = q;
  args.k = k;
  args.v = v;
  args.bias = p.num_iters > 0 ? p.g : nullptr;
  args.out = p.out;
  args.f_out = p.num_iters > 0 ? nullptr : p.f;
  args.heads = p.heads;
  args.nq = p.nq;
  args.nk = p.nk;
  args.d = p.d;
  args.dv = p.dv;
  args.row_tiles = 0;
  args.scale2 = scale2;
  args.log_a = -logf(static_cast<float>(p.nq));
  return launch_attention_pass<M, DP>(args, p.batch, stream);
}

// Entry point of one math mode; explicitly instantiated once per mode in csrc/cuda/.
template <MathMode M>
int launch_mode(const SinkhornProblem& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.d > p.dv ? p.d : p.dv)) {
    case 64:
      return launch_passes<M, 64>(p, stream);
    case 128:
      return launch_passes<M, 128>(p, stream);
    default:
      return launch_passes<M, 256>(p, stream);
  }
}

}  // namespace asag

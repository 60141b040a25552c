// Warp-level matrix-product primitives for the CUDA Sinkhorn kernels (no PyTorch dependency).
//
// One warp multiplies a 16-row A tile by an 8-column B tile and accumulates a 16x8 float32 tile C.
// Four math modes share one register layout, so the kernels are written once:
//
//   kHalf, kBFloat16 : mma.sync m16n8k16, operands packed two per 32-bit register
//   kTf32            : mma.sync m16n8k8 on float32 inputs rounded to TF32 (only when the caller allows it)
//   kFloat32         : the same 16x8x8 product with exact float32 FMAs on "wide" fragments: each lane
//                      holds the full 8-long k slices of the two A rows and two B columns its C
//                      elements need (read straight from shared memory; P is gathered from the quad)
//
// Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"), lane = 4*gid + tig:
//   C (16x8)       : c0,c1 at (row gid,   col 2*tig + {0,1}); c2,c3 at (row gid+8, same cols)
//   A, k16 (16x16) : a[0] = (gid, 2tig..+1)   a[1] = (gid+8, 2tig..+1)
//                    a[2] = (gid, 2tig+8..+9) a[3] = (gid+8, 2tig+8..+9)
//   B, k16 (16x8)  : b[0] = (k 2tig..+1, col gid)  b[1] = (k 2tig+8..+9, col gid)
//   A, k8 (16x8)   : a[0] = (gid, tig)  a[1] = (gid+8, tig)  a[2] = (gid, tig+4)  a[3] = (gid+8, tig+4)
//   B, k8 (8x8)    : b[0] = (k tig, col gid)  b[1] = (k tig+4, col gid)
//
// When a C tile (probabilities over 8 keys) becomes the A operand of the next product (P @ V), the
// k16 modes take two adjacent C tiles as they are. The k8 modes read the C tile's keys in the
// order slot s -> key 2s (s < 4), key 2(s-4)+1 (s >= 4): then a[0..3] = c0, c2, c1, c3 with no
// shuffles, and the B operand (V rows) is read with the same key order (load_b_kn below). The
// kFloat32 mode keeps the natural key order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace asag {

enum class MathMode { kHalf, kBFloat16, kTf32, kFloat32 };

struct FragA {  // tensor-core modes
  uint32_t r[4];
};
struct FragB {
  uint32_t r[2];
};
struct WideFragA {  // kFloat32: A[gid][k0 + i] and A[gid + 8][k0 + i], i = 0..7
  float top[8], bottom[8];
};
struct WideFragB {  // kFloat32: B[k0 + i][2 tig] and B[k0 + i][2 tig + 1], i = 0..7
  float left[8], right[8];
};

template <MathMode M>
struct MmaTraits;

template <>
struct MmaTraits<MathMode::kHalf> {
  using Elem = __half;
  using A = FragA;
  using B = FragB;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<MathMode::kBFloat16> {
  using Elem = __nv_bfloat16;
  using A = FragA;
  using B = FragB;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<MathMode::kTf32> {
  using Elem = float;
  using A = FragA;
  using B = FragB;
  static constexpr int kK = 8;
};
template <>
struct MmaTraits<MathMode::kFloat32> {
  using Elem = float;
  using A = WideFragA;
  using B = WideFragB;
  static constexpr int kK = 8;
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

__device__ __forceinline__ uint32_t pack_pair(__half lo, __half hi) {
  return static_cast<uint32_t>(__half_as_ushort(lo)) | (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack_pair(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}


template <MathMode M>
__device__ __forceinline__ uint32_t pair_from_floats(float lo, float hi) {
  if constexpr (M == MathMode::kHalf) {
    return pack_pair(__float2half_rn(lo), __float2half_rn(hi));
  } else {
    return pack_pair(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
  }
}

// A operand from a row-major shared-memory tile (rows x k, leading dimension ld elements).
template <MathMode M>
__device__ __forceinline__ void load_a(typename MmaTraits<M>::A& a, const typename MmaTraits<M>::Elem* tile, int ld, int row0, int k0) {
  const int gid = lane_id() >> 2, tig = lane_id() & 3;
  const auto* top = tile + (row0 + gid) * ld + k0;
  const auto* bottom = top + 8 * ld;
  if constexpr (MmaTraits<M>::kK == 16) {
    a.r[0] = *reinterpret_cast<const uint32_t*>(top + 2 * tig);
    a.r[1] = *reinterpret_cast<const uint32_t*>(bottom + 2 * tig);
    a.r[2] = *reinterpret_cast<const uint32_t*>(top + 2 * tig + 8);
    a.r[3] = *reinterpret_cast<const uint32_t*>(bottom + 2 * tig + 8);
  } else if constexpr (M == MathMode::kFloat32) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      a.top[i] = top[i];
      a.bottom[i] = bottom[i];
    }
  } else {
    a.r[0] = to_tf32(top[tig]);
    a.r[1] = to_tf32(bottom[tig]);
    a.r[2] = to_tf32(top[tig + 4]);
    a.r[3] = to_tf32(bottom[tig + 4]);
  }
}

// B operand (k x 8) from a shared-memory tile stored n-major: tile[n][k] = B[k][n] (the K tile of
// Q @ K^T, whose rows are keys and whose columns are the feature dimension).
template <MathMode M>
__device__ __forceinline__ void load_b_nk(typename MmaTraits<M>::B& b, const typename MmaTraits<M>::Elem* tile, int ld, int n0, int k0) {
  const int gid = lane_id() >> 2, tig = lane_id() & 3;
  const auto* row = tile + (n0 + gid) * ld + k0;
  if constexpr (MmaTraits<M>::kK == 16) {
    b.r[0] = *reinterpret_cast<const uint32_t*>(row + 2 * tig);
    b.r[1] = *reinterpret_cast<const uint32_t*>(row + 2 * tig + 8);
  } else if constexpr (M == MathMode::kFloat32) {
    const float* left = tile + (n0 + 2 * tig) * ld + k0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      b.left[i] = left[i];
      b.right[i] = left[ld + i];
    }
  } else {
    b.r[0] = to_tf32(row[tig]);
    b.r[1] = to_tf32(row[tig + 4]);
  }
}

// B operand (k x 8) from a shared-memory tile stored k-major: tile[k][n] = B[k][n] (the V tile of
// P @ V, whose rows are keys). The k8 modes use the permuted key order described at the top.
template <MathMode M>
__device__ __forceinline__ void load_b_kn(typename MmaTraits<M>::B& b, const typename MmaTraits<M>::Elem* tile, int ld, int k0, int n0) {
  const int gid = lane_id() >> 2, tig = lane_id() & 3;
  const auto* col = tile + k0 * ld + n0 + gid;
  if constexpr (MmaTraits<M>::kK == 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // ldmatrix .x2 .trans: lanes 0-15 give the addresses of tile rows k0..k0+15 (8 halves each,
    // 16-byte aligned: ld and n0 are multiples of 8); matrix j (rows k0+8j..) arrives transposed,
    // i.e. as (rows 2tig, 2tig+1; column gid) = b.r[j]. Lanes 16-31 repeat lanes 0-15's addresses.
    const auto* row = tile + (k0 + (lane_id() & 15)) * ld + n0;
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b.r[0]), "=r"(b.r[1])
                 : "r"(addr));
#else
    b.r[0] = pack_pair(col[(2 * tig) * ld], col[(2 * tig + 1) * ld]);
    b.r[1] = pack_pair(col[(2 * tig + 8) * ld], col[(2 * tig + 9) * ld]);
#endif
  } else if constexpr (M == MathMode::kFloat32) {
    const float* left = tile + k0 * ld + n0 + 2 * tig;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      b.left[i] = left[i * ld];
      b.right[i] = left[i * ld + 1];
    }
  } else {
    b.r[0] = to_tf32(col[(2 * tig) * ld]);
    b.r[1] = to_tf32(col[(2 * tig + 1) * ld]);
  }
}

// A operand of P @ V for key step `ks` from float32 C tiles c[n8 tile][4] (see the top comment).
template <MathMode M, int NT>
__device__ __forceinline__ void a_from_accumulators(typename MmaTraits<M>::A& a, const float (&c)[NT][4], int ks) {
  if constexpr (MmaTraits<M>::kK == 16) {
    a.r[0] = pair_from_floats<M>(c[2 * ks][0], c[2 * ks][1]);
    a.r[1] = pair_from_floats<M>(c[2 * ks][2], c[2 * ks][3]);
    a.r[2] = pair_from_floats<M>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a.r[3] = pair_from_floats<M>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  } else if constexpr (M == MathMode::kFloat32) {
    // Key i of tile ks sits in lane (quad base + i / 2), element i % 2 (row gid) or 2 + i % 2 (gid + 8).
    const int quad_base = lane_id() & ~3;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      a.top[i] = __shfl_sync(0xffffffffu, c[ks][i & 1], quad_base + i / 2);
      a.bottom[i] = __shfl_sync(0xffffffffu, c[ks][2 + (i & 1)], quad_base + i / 2);
    }
  } else {
    a.r[0] = to_tf32(c[ks][0]);
    a.r[1] = to_tf32(c[ks][2]);
    a.r[2] = to_tf32(c[ks][1]);
    a.r[3] = to_tf32(c[ks][3]);
  }
}

// c += A @ B for one 16x8 tile.
template <MathMode M>
__device__ __forceinline__ void mma(float (&c)[4], const typename MmaTraits<M>::A& a, const typename MmaTraits<M>::B& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (M == MathMode::kHalf) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else if constexpr (M == MathMode::kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else if constexpr (M == MathMode::kTf32) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
#else
  if constexpr (M != MathMode::kFloat32) __trap();  // the host refuses devices below sm_80
#endif
  if constexpr (M == MathMode::kFloat32) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // fixed k order: deterministic
      c[0] = fmaf(a.top[i], b.left[i], c[0]);
      c[1] = fmaf(a.top[i], b.right[i], c[1]);
      c[2] = fmaf(a.bottom[i], b.left[i], c[2]);
      c[3] = fmaf(a.bottom[i], b.right[i], c[3]);
    }
  }
}

}  // namespace asag

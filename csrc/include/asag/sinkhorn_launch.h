// Host entry point of the CUDA Sinkhorn-attention kernels: plain C++, no CUDA and no PyTorch
// headers, so the PyTorch binding and the nvcc-compiled kernels meet only here.
#pragma once

#include <cstdint>

namespace asag {

enum class ElemType { kHalf, kBFloat16, kFloat32 };

// A [batch, heads, n, d] tensor given by its data pointer and element strides (any layout).
struct StridedInput {
  const void* data;
  int64_t stride_b, stride_h, stride_n, stride_d;
};

struct SinkhornProblem {
  StridedInput q, k, v;
  int batch, heads, nq, nk, d, dv;
  int num_iters;
  float logit_scale;  // cost_sign * scale / epsilon, in natural-log units
  bool allow_tf32;    // float32 inputs: TF32 tensor cores allowed (else exact float32 FMAs)
  void* out;          // [batch, heads, nq, dv] contiguous, element type of q
  float* f;           // [batch, heads, nq] contiguous
  float* g;           // [batch, heads, nk] contiguous; must hold zeros when num_iters == 0
};

constexpr int kMaxHeadDim = 256;

// Enqueues all passes on `stream` (a cudaStream_t). Returns 0 or a cudaError_t value.
int launch_sinkhorn_attention(const SinkhornProblem& problem, ElemType elem, void* stream);

// cudaGetErrorString for a value returned above.
const char* cuda_error_string(int error);

// 10 * major + minor of a CUDA device, or -1 when it cannot be queried.
int device_compute_capability(int device);

}  // namespace asag

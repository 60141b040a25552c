// Picks the math mode for the element type and forwards to its kernels (compiled in the
// sinkhorn_<mode>.cu files, one translation unit per mode so they build in parallel).
#include <cuda_runtime.h>

#include "asag/sinkhorn_launch.h"
#include "asag/warp_mma.cuh"

namespace asag {

template <MathMode M>
int launch_mode(const SinkhornProblem& p, cudaStream_t stream);

int launch_sinkhorn_attention(const SinkhornProblem& problem, ElemType elem, void* stream) {
  if (problem.d < 1 || problem.d > kMaxHeadDim || problem.dv < 1 || problem.dv > kMaxHeadDim)
    return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (elem) {
    case ElemType::kHalf:
      return launch_mode<MathMode::kHalf>(problem, s);
    case ElemType::kBFloat16:
      return launch_mode<MathMode::kBFloat16>(problem, s);
    case ElemType::kFloat32:
      return problem.allow_tf32 ? launch_mode<MathMode::kTf32>(problem, s) : launch_mode<MathMode::kFloat32>(problem, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int device_compute_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return -1;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return -1;
  return 10 * major + minor;
}

}  // namespace asag

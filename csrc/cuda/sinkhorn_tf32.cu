// Sinkhorn-attention kernels for float32 inputs on TF32 tensor cores (only when the caller allows TF32).
#include "asag/sinkhorn_kernels.cuh"

namespace asag {
template int launch_mode<MathMode::kTf32>(const SinkhornProblem&, cudaStream_t);
}  // namespace asag

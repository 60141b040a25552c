// Sinkhorn-attention kernels for float32 inputs, exact float32 FMAs.
#include "asag/sinkhorn_kernels.cuh"

namespace asag {
template int launch_mode<MathMode::kFloat32>(const SinkhornProblem&, cudaStream_t);
}  // namespace asag

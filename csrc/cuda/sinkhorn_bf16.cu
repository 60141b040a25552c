// Sinkhorn-attention kernels for bfloat16 inputs, m16n8k16 tensor cores.
#include "asag/sinkhorn_kernels.cuh"

namespace asag {
template int launch_mode<MathMode::kBFloat16>(const SinkhornProblem&, cudaStream_t);
}  // namespace asag

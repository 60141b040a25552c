// Sinkhorn-attention kernels for float16 inputs, m16n8k16 tensor cores.
#include "asag/sinkhorn_kernels.cuh"

namespace asag {
template int launch_mode<MathMode::kHalf>(const SinkhornProblem&, cudaStream_t);
}  // namespace asag

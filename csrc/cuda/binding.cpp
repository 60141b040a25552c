// PyTorch binding of the CUDA Sinkhorn-attention kernels: input checks, output allocation, dtype
// dispatch. The kernels themselves (csrc/cuda/*.cu) never see a PyTorch header.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>
#include <tuple>

#include "asag/sinkhorn_launch.h"

namespace {

asag::ElemType elem_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return asag::ElemType::kHalf;
    case at::kBFloat16:
      return asag::ElemType::kBFloat16;
    case at::kFloat:
      return asag::ElemType::kFloat32;
    default:
      TORCH_CHECK(false, "asag cuda backend: dtype must be float16, bfloat16 or float32, got ", dtype);
  }
}

asag::StridedInput strided(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int checked_int(int64_t value, const char* what) {
  TORCH_CHECK(value <= std::numeric_limits<int>::max(), "asag cuda backend: ", what, " = ", value, " is too large");
  return static_cast<int>(value);
}

// q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], any strides. Returns (out, f, g) with out
// [B, H, Nq, Dv] contiguous in q's dtype and float32 potentials f [B, H, Nq], g [B, H, Nk].
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_attention(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, int64_t num_iters,
                                                                   double logit_scale, bool allow_tf32) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "asag cuda backend: q, k, v must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "asag cuda backend: q, k, v on different devices");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "asag cuda backend: q, k, v must be 4-D [B, H, N, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "asag cuda backend: q, k, v must share one dtype");
  const asag::ElemType elem = elem_type(q.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch && k.size(1) == heads && v.size(1) == heads,
              "asag cuda backend: q, k, v must share the leading dims");
  TORCH_CHECK(k.size(3) == d, "asag cuda backend: D of k (", k.size(3), ") != D of q (", d, ")");
  TORCH_CHECK(v.size(2) == nk, "asag cuda backend: Nk of v (", v.size(2), ") != Nk of k (", nk, ")");
  TORCH_CHECK(batch > 0 && heads > 0 && nq > 0 && nk > 0, "asag cuda backend: empty input");
  TORCH_CHECK(d >= 1 && d <= asag::kMaxHeadDim && dv >= 1 && dv <= asag::kMaxHeadDim,
              "asag cuda backend: head dims up to ", asag::kMaxHeadDim, " are supported, got D = ", d, ", Dv = ", dv);
  TORCH_CHECK(num_iters >= 0, "asag cuda backend: num_iters must be >= 0, got ", num_iters);

  const c10::cuda::CUDAGuard guard(q.device());
  const int capability = asag::device_compute_capability(q.get_device());
  TORCH_CHECK(capability >= 80, "asag cuda backend: needs a GPU of compute capability 8.0 or newer, got ",
              capability / 10, ".", capability % 10);

  const auto potential_options = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({batch, heads, nq, dv}, q.options());
  at::Tensor f = at::empty({batch, heads, nq}, potential_options);
  at::Tensor g = num_iters == 0 ? at::zeros({batch, heads, nk}, potential_options)
                                : at::empty({batch, heads, nk}, potential_options);

  asag::SinkhornProblem problem;
  problem.q = strided(q);
  problem.k = strided(k);
  problem.v = strided(v);
  problem.batch = checked_int(batch, "batch");
  problem.heads = checked_int(heads, "heads");
  problem.nq = checked_int(nq, "Nq");
  problem.nk = checked_int(nk, "Nk");
  problem.d = static_cast<int>(d);
  problem.dv = static_cast<int>(dv);
  problem.num_iters = checked_int(num_iters, "num_iters");
  problem.logit_scale = static_cast<float>(logit_scale);
  problem.allow_tf32 = allow_tf32;
  problem.out = out.data_ptr();
  problem.f = f.data_ptr<float>();
  problem.g = g.data_ptr<float>();

  const int err = asag::launch_sinkhorn_attention(problem, elem, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "asag cuda backend: kernel launch failed: ", asag::cuda_error_string(err));
  return {out, f, g};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA Sinkhorn-attention kernels of asag_kernels";
  m.def("sinkhorn_attention", &sinkhorn_attention, "Sinkhorn attention (q, k, v, num_iters, logit_scale, allow_tf32)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("num_iters"),
        pybind11::arg("logit_scale"), pybind11::arg("allow_tf32"));
}

"""The cuda backend's own behaviour: status/supports/JIT-build reporting (any machine) and, on a
CUDA GPU, the kernel's specifics (head-dim buckets, D != Dv, tails, strides and misaligned views,
TF32 switch, determinism, grid size). The shared suite covers the rest once status() is "ok".
The compile check (scripts/check_cuda_compile.sh) is run by CI separately: it takes minutes."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import asag_kernels
from asag_kernels import sinkhorn_attention
from asag_kernels.backends import cuda_backend
from asag_kernels._spec import out_tolerance, potential_tolerance
from conftest import TOLERANCES, max_abs_err, rel_err

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = cuda_backend.status() == "ok"
gpu_only = pytest.mark.skipif(not HAS_GPU, reason=f"cuda backend not usable here: {cuda_backend.status()}")


# ---- availability (runs everywhere) -------------------------------------------------------------

@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-build torch message")
def test_status_on_cpu_torch_says_why_quickly_without_building():
    start = time.perf_counter()
    why = cuda_backend.status()
    assert time.perf_counter() - start < 1.0
    assert why.startswith("no CUDA GPU") and "CPU build" in why, why
    assert cuda_backend._jit.thread is None, "must not start a build where it cannot run"
    assert asag_kernels.backend_status()["cuda"] == why
    assert "cuda" not in asag_kernels.available_backends()


def test_named_cuda_backend_never_falls_back():
    if HAS_GPU:
        pytest.skip("the backend is usable here")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        sinkhorn_attention(q, q, q, backend="cuda")


def test_supports():
    cuda = torch.device("cuda")
    assert "CUDA tensors" in cuda_backend.supports(torch.device("cpu"), torch.float32)
    assert "float64" in cuda_backend.supports(cuda, torch.float64)
    assert cuda_backend.supports(cuda, torch.int32) is not None
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert cuda_backend.supports(cuda, dtype) is None


@pytest.fixture
def pretend_gpu_without_extension(monkeypatch):
    """A machine with a usable GPU and no prebuilt extension: the just-in-time path decides."""
    monkeypatch.setattr(cuda_backend, "_device_reason", lambda: None)
    monkeypatch.setattr(cuda_backend, "_prebuilt", None)
    monkeypatch.setattr(cuda_backend, "_jit", cuda_backend._JitBuild())
    monkeypatch.delenv("ASAG_CUDA_JIT", raising=False)
    return monkeypatch


def test_jit_disabled_by_env(pretend_gpu_without_extension):
    pretend_gpu_without_extension.setenv("ASAG_CUDA_JIT", "off")
    assert "ASAG_CUDA_JIT=off" in cuda_backend.status()
    assert cuda_backend._jit.thread is None


def test_jit_needs_cuda_toolkit(pretend_gpu_without_extension):
    pretend_gpu_without_extension.setattr(cuda_backend, "_cuda_home", lambda: None)
    why = cuda_backend.status()
    assert why.startswith("not built") and "no CUDA toolkit was found" in why and "CUDA_HOME" in why, why
    assert cuda_backend._jit.thread is None


def test_jit_needs_ninja(pretend_gpu_without_extension):
    pretend_gpu_without_extension.setattr(cuda_backend, "_cuda_home", lambda: "/usr/local/cuda")
    pretend_gpu_without_extension.setattr(cuda_backend, "_ninja_available", lambda: False)
    assert "ninja is missing" in cuda_backend.status()
    assert cuda_backend._jit.thread is None


@pytest.mark.parametrize("csrc", ["missing", "empty"])
def test_jit_needs_sources(pretend_gpu_without_extension, tmp_path, csrc):
    pretend_gpu_without_extension.setattr(cuda_backend, "_cuda_home", lambda: "/usr/local/cuda")
    pretend_gpu_without_extension.setattr(cuda_backend, "_ninja_available", lambda: True)
    pretend_gpu_without_extension.setattr(cuda_backend, "_csrc", lambda: None if csrc == "missing" else tmp_path)
    why = cuda_backend.status()
    assert why.startswith("not built") and "CUDA sources are not available" in why, why
    assert cuda_backend._jit.thread is None


def test_jit_finds_sources_here():
    """This checkout (or the installed package) has what a just-in-time build compiles."""
    csrc = cuda_backend._csrc()
    assert csrc is not None
    from asag_kernels import build_spec

    assert any(s.endswith(".cu") for s in build_spec.kernel_sources(csrc))
    assert build_spec.binding_sources(csrc)


def test_jit_build_uses_the_build_spec(pretend_gpu_without_extension):
    """The just-in-time build hands torch's load() exactly the spec's sources, includes and flags,
    for this GPU's architecture, and gives torch the checked toolkit when its own guess is unusable."""
    from torch.utils import cpp_extension

    from asag_kernels import build_spec

    calls = []
    built = object()

    def fake_load(**kwargs):
        calls.append(kwargs)
        return built

    pretend_gpu_without_extension.setattr(cuda_backend, "_cuda_home", lambda: "/opt/checked-cuda")
    pretend_gpu_without_extension.setattr(cuda_backend, "_ninja_available", lambda: True)
    pretend_gpu_without_extension.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    pretend_gpu_without_extension.setattr(cpp_extension, "load", fake_load)
    pretend_gpu_without_extension.setattr(cpp_extension, "CUDA_HOME", "/usr/local")  # torch's unchecked guess
    pretend_gpu_without_extension.setenv("ASAG_CUDA_JIT", "wait")
    assert cuda_backend.status() == "ok", cuda_backend._jit.error
    (kwargs,) = calls
    spec = build_spec.cuda_extension(build_spec.csrc_dir(), ["86"], name=build_spec.JIT_EXTENSION)
    assert kwargs == {"name": build_spec.JIT_EXTENSION, "verbose": False, **spec.jit_kwargs()}
    assert "-std=c++20" in kwargs["extra_cflags"] and "-std=c++20" in kwargs["extra_cuda_cflags"]
    assert "arch=compute_86,code=sm_86" in kwargs["extra_cuda_cflags"]
    assert cpp_extension.CUDA_HOME == "/opt/checked-cuda"


@pytest.mark.parametrize("outcome", ["fails", "succeeds"])
def test_jit_build_reports_building_then_result(pretend_gpu_without_extension, outcome):
    release = threading.Event()
    built = object()

    def fake_build(self):
        release.wait(10)
        if outcome == "fails":
            self.error = "RuntimeError: nvcc exited with 1"
        else:
            self.ext = built

    pretend_gpu_without_extension.setattr(cuda_backend, "_cuda_home", lambda: "/usr/local/cuda")
    pretend_gpu_without_extension.setattr(cuda_backend, "_ninja_available", lambda: True)
    pretend_gpu_without_extension.setattr(cuda_backend._JitBuild, "_build", fake_build)
    first = cuda_backend.status()
    assert first.startswith("building…"), first
    assert cuda_backend.status().startswith("building…")  # one build, not one per call
    release.set()
    final = cuda_backend.wait_for_build()
    if outcome == "fails":
        assert final == "just-in-time build of the CUDA extension failed: RuntimeError: nvcc exited with 1"
    else:
        assert final == "ok" and cuda_backend._extension() is built


def test_kernel_translation_units_are_pytorch_free():
    kernel_files = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "include" / "asag").glob("*"))
    assert any(p.suffix == ".cu" for p in kernel_files)
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    for path in kernel_files:
        assert not torch_include.search(path.read_text()), f"{path} includes a PyTorch header"


def test_compile_check_skips_visibly_without_nvcc(tmp_path):
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_compile.sh")], capture_output=True, text=True, env=env, timeout=60)
    if "SKIPPED" not in done.stdout:
        pytest.skip("nvcc is on the minimal PATH here")
    assert done.returncode == 0 and "SKIPPED: nvcc not found" in done.stdout


# ---- the kernels (CUDA GPU only) ----------------------------------------------------------------

def _inputs(lead, nq, nk, d, dv, dtype, seed, layout):
    gen = torch.Generator().manual_seed(seed)

    def one(n, width):
        if layout == "transposed":
            t = torch.randn(lead[0], n, lead[1], width, generator=gen).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(*lead, n, 2 * width, generator=gen)[..., ::2]
        elif layout == "misaligned":  # unit stride but a base pointer off 16-byte alignment
            t = torch.randn(*lead, n, width + 1, generator=gen)[..., 1:]
        else:
            t = torch.randn(*lead, n, width, generator=gen)
        return t.to(device="cuda", dtype=dtype)

    return one(nq, d), one(nk, d), one(nk, dv)


def _poison_cuda_cache(nbytes):
    """Fill with 0xFF (NaN in float16, bfloat16 and float32), then free, a block the outputs will
    likely reuse from torch's caching allocator: elements no kernel wrote then show as NaN."""
    block = torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda")
    del block


def _check(q, k, v, dtype, tol_out=None, tol_pot=None, **kw):
    _poison_cuda_cache(4 * q.shape[0] * q.shape[1] * q.shape[2] * v.shape[3])
    out, f, g = sinkhorn_attention(q, k, v, backend="cuda", return_potentials=True, **kw)
    ref_out, ref_f, ref_g = sinkhorn_attention(q.double(), k.double(), v.double(), backend="reference", return_potentials=True, **kw)
    default_out, default_pot = TOLERANCES[dtype]
    tol_out = default_out if tol_out is None else tol_out
    tol_pot = default_pot if tol_pot is None else tol_pot
    ctx = f"{dtype} q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} strides {q.stride()} {kw}"
    assert out.dtype == dtype and out.is_contiguous() and f.dtype == g.dtype == torch.float32, ctx
    assert torch.isfinite(out).all() and torch.isfinite(f).all() and torch.isfinite(g).all(), ctx
    assert rel_err(out, ref_out) <= tol_out, f"out {rel_err(out, ref_out):.3e}: {ctx}"
    assert max_abs_err(f, ref_f) <= tol_pot, f"f {max_abs_err(f, ref_f):.3e}: {ctx}"
    assert max_abs_err(g, ref_g) <= tol_pot, f"g {max_abs_err(g, ref_g):.3e}: {ctx}"
    return out, f, g


# D, Dv across the 64/128/256 buckets and their edges; N across the 64-row and 32/64-key tiles.
CASES = [
    ((1, 2), 1, 1, 8, 8),
    ((2, 3), 63, 65, 40, 40),
    ((1, 2), 130, 33, 64, 64),
    ((1, 1), 65, 129, 72, 72),
    ((2, 1), 64, 64, 128, 128),
    ((1, 2), 97, 200, 200, 200),
    ((1, 1), 33, 70, 256, 256),
    ((1, 2), 50, 77, 64, 200),
    ((1, 2), 77, 50, 256, 16),
]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "misaligned"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[1:])))
def test_buckets_tails_layouts(case, layout, dtype, seed):
    torch.backends.cuda.matmul.allow_tf32 = False
    lead, nq, nk, d, dv = case
    q, k, v = _inputs(lead, nq, nk, d, dv, dtype, seed, layout)
    for num_iters, cost in ((0, "standard"), (3, "adversarial")):
        _check(q, k, v, dtype, num_iters=num_iters, cost=cost, epsilon=0.5)


@gpu_only
def test_tf32_only_when_allowed(seed):
    q, k, v = _inputs((1, 2), 150, 90, 64, 64, torch.float32, seed, "contiguous")
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = _check(q, k, v, torch.float32, num_iters=2)
        torch.backends.cuda.matmul.allow_tf32 = True
        # SPEC §4: TF32 has its own out bound; the potentials keep float32's.
        tf32 = _check(q, k, v, torch.float32, tol_out=out_tolerance(torch.float32, tf32=True),
                      tol_pot=potential_tolerance(torch.float32), num_iters=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert not torch.equal(exact[0], tf32[0]), "allow_tf32 did not reach the kernel"


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitwise_deterministic(dtype, seed):
    q, k, v = _inputs((2, 3), 300, 257, 128, 128, dtype, seed, "transposed")
    first = sinkhorn_attention(q, k, v, num_iters=3, backend="cuda", return_potentials=True)
    for _ in range(3):
        again = sinkhorn_attention(q, k, v, num_iters=3, backend="cuda", return_potentials=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@gpu_only
def test_large_logits_stay_finite(seed):
    q, k, v = _inputs((1, 2), 100, 80, 64, 64, torch.float32, seed, "contiguous")
    k[..., 3, :] *= 50.0  # an outlier key, and epsilon = 1e-3: |L| in the thousands
    out, f, g = sinkhorn_attention(q, k, v, num_iters=2, epsilon=1e-3, backend="cuda", return_potentials=True)
    assert torch.isfinite(out).all() and torch.isfinite(f).all() and torch.isfinite(g).all()


@gpu_only
def test_more_heads_than_one_grid_dimension_holds(seed):
    q, k, v = _inputs((70000, 1), 3, 5, 8, 8, torch.float16, seed, "contiguous")
    _check(q, k, v, torch.float16, num_iters=1)


def _process_cudart():
    """The CUDA runtime library this process (torch and the extension) uses, through ctypes."""
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    if not paths:
        pytest.skip("no shared libcudart is loaded (a statically linked runtime has its own error state)")
    return ctypes.CDLL(sorted(paths)[0])


@gpu_only
def test_launch_reports_its_own_error_only(seed):
    """An error that unrelated earlier work left pending is neither reported by the launch (the old
    launcher's cudaGetLastError() blamed it on the kernels) nor cleared for its owner."""
    q, k, v = _inputs((1, 2), 40, 50, 64, 64, torch.float16, seed, "contiguous")
    ext = cuda_backend._extension()
    cudart = _process_cudart()
    invalid_device = cudart.cudaSetDevice(10**6)  # fails, leaving a (non-sticky) last error
    assert invalid_device != 0
    try:
        out, f, g = ext.sinkhorn_attention(q, k, v, 1, -0.125, False)
    finally:
        pending = cudart.cudaGetLastError()  # read (and clear) it before torch's own launch checks
    assert pending == invalid_device, "the launch consumed an error that was not its own"
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(f).all() and torch.isfinite(g).all()

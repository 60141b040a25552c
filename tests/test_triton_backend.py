"""The triton backend's own launcher details: padding, tails, strides, dtypes, determinism, NaN,
output coverage, kernel loading. Without a GPU the real kernels run under TRITON_INTERPRET=1
(set here too, before anything loads the kernels), so shapes stay small."""

from __future__ import annotations

import importlib.machinery
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from asag_kernels import sinkhorn_attention  # noqa: E402
from asag_kernels.backends import triton_backend  # noqa: E402
from conftest import DEVICE, assert_close_to_reference, make_inputs, max_abs_err, rel_err, require_backend  # noqa: E402


def _run_both(q, k, v, **kw):
    got = sinkhorn_attention(q, k, v, backend="triton", return_potentials=True, **kw)
    ref = sinkhorn_attention(q.double(), k.double(), v.double(), backend="reference", return_potentials=True, **kw)
    return got, ref


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so an element no kernel wrote shows."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_backend, "_alloc", poisoned)


# (Nq, Nk, D, Dv): head dims padded to a power of two (40 -> 64, 24 -> 32, 80 -> 128, 12 -> 16),
# tails of one element past a tile, a single row/column, Nq != Nk both ways.
@pytest.mark.parametrize(
    "nq,nk,d,dv,dtype,num_iters",
    [
        (65, 130, 40, 24, torch.float32, 2),
        (129, 33, 12, 40, torch.float16, 1),
        (1, 70, 64, 64, torch.bfloat16, 3),
        (70, 1, 32, 16, torch.float32, 1),
        (48, 65, 80, 80, torch.bfloat16, 2),
        (40, 50, 128, 128, torch.float16, 0),
    ],
)
def test_padding_and_tails(nq, nk, d, dv, dtype, num_iters, seed):
    require_backend("triton", dtype)
    q, k, v = make_inputs((1, 2), nq, nk, d, dv, dtype, seed)
    got, ref = _run_both(q, k, v, num_iters=num_iters, cost="adversarial", epsilon=0.5)
    assert_close_to_reference(got, ref, dtype, f"{nq}x{nk}x{d}x{dv} {dtype} T={num_iters} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_strides_without_copies(dtype, seed):
    """q as a transposed [B, N, H, D] view, k with a D stride of 2, v with a unit stride along N."""
    require_backend("triton", dtype)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 67, 2, 24, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(1, 2, 45, 48, generator=gen).to(DEVICE, dtype)[..., ::2]
    v = torch.randn(1, 2, 40, 45, generator=gen).to(DEVICE, dtype).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    got, ref = _run_both(q, k, v, num_iters=2, cost="standard", epsilon=1.0)
    assert_close_to_reference(got, ref, dtype, f"strides {q.stride()} {k.stride()} {v.stride()} seed={seed}")


def test_deterministic_bitwise(seed):
    require_backend("triton", torch.bfloat16)
    q, k, v = make_inputs((2, 1), 90, 70, 40, 40, torch.bfloat16, seed, layout="transposed")
    first = sinkhorn_attention(q, k, v, num_iters=2, backend="triton", return_potentials=True)
    again = sinkhorn_attention(q, k, v, num_iters=2, backend="triton", return_potentials=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("num_iters", [0, 1])
def test_non_finite_pattern_matches_reference(num_iters, seed):
    """NaN in q and Inf in k reach exactly the outputs the reference marks non-finite; never Inf."""
    require_backend("triton", torch.float32)
    q, k, v = make_inputs((1, 2), 70, 40, 16, 16, torch.float32, seed)
    q[0, 0, 3, 5] = float("nan")
    k[0, 1, 7, 1] = float("inf")
    (out, f, g), (ref_out, ref_f, ref_g) = _run_both(q, k, v, num_iters=num_iters)
    for name, x in (("out", out), ("f", f), ("g", g)):
        assert not torch.isinf(x).any(), f"{name} holds Inf"
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref_out))
    assert torch.equal(torch.isfinite(f), torch.isfinite(ref_f))
    # The reference lets some g stay finite when f = -inf (LSE skips -inf terms); NaN f reach all g.
    assert not (torch.isfinite(g) & ~torch.isfinite(ref_g)).any()
    assert torch.isnan(out[0, 0, 3]).all()
    # Without a column update the NaN row stays alone; after one it reaches every row of its head.
    assert bool(torch.isfinite(out[0, 0, :3]).all()) == (num_iters == 0)


def test_large_logits_stay_finite_and_accurate(seed):
    """|L| around 1e4: every exponent is of a difference to the running max, so nothing overflows."""
    require_backend("triton", torch.float32)
    q, k, v = make_inputs((1, 1), 70, 66, 32, 32, torch.float32, seed)
    k[0, 0, 5] *= 30.0  # an outlier key
    (out, f, g), (ref_out, ref_f, ref_g) = _run_both(q, k, v, num_iters=2, epsilon=1e-3)
    assert ref_f.abs().max() > 1e4
    assert torch.isfinite(out).all() and torch.isfinite(f).all() and torch.isfinite(g).all()
    assert rel_err(out, ref_out) < 1e-3
    # float32 potentials of size 1e4+ carry about 1e-3 absolute rounding: compare relatively.
    assert max_abs_err(f, ref_f) <= 1e-6 * ref_f.abs().max().item()


def test_supports():
    assert triton_backend.supports(torch.device("cpu"), torch.float64) is not None
    if triton_backend.status() == "ok":
        assert triton_backend.supports(torch.device("cuda"), torch.bfloat16) is None
        on_cpu = triton_backend.supports(torch.device("cpu"), torch.float32)
        assert (on_cpu is None) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_namespace_lookalike_is_not_triton(tmp_path):
    kernel_dir = tmp_path / "triton"
    kernel_dir.mkdir()
    (kernel_dir / "kernels.py").write_text("")
    namespace = importlib.machinery.ModuleSpec("triton", None, is_package=True)
    assert "not installed" in triton_backend.triton_missing_reason(None, str(kernel_dir))
    assert "not installed" in triton_backend.triton_missing_reason(namespace, str(kernel_dir))
    inside = importlib.machinery.ModuleSpec("triton", None, origin=str(kernel_dir / "kernels.py"))
    assert "kernel folder" in triton_backend.triton_missing_reason(inside, str(kernel_dir))
    real = importlib.util.find_spec("triton")
    if real is not None and real.origin and os.path.isfile(real.origin):
        assert triton_backend.triton_missing_reason(real, str(kernel_dir)) is None


def test_kernel_module_is_a_real_file():
    require_backend("triton", torch.float32)
    module = triton_backend._kernel_module()
    assert os.path.basename(module.__file__) == f"{triton_backend.KERNEL_MODULE}.py"
    assert os.path.isfile(module.__file__)


def test_grid_split_over_batch_and_heads(monkeypatch, seed):
    """Launches split into batch and head ranges when B·H exceeds a grid dimension."""
    require_backend("triton", torch.float32)
    monkeypatch.setattr(triton_backend, "_MAX_GRID_Y", 3)
    q, k, v = make_inputs((2, 5), 20, 17, 16, 16, torch.float32, seed, layout="transposed")
    got, ref = _run_both(q, k, v, num_iters=1)
    assert_close_to_reference(got, ref, torch.float32, f"grid split seed={seed}")


def test_gpu_check_script_runs_tiny():
    """benchmarks/gpu_check.py --tiny (CPU, interpreter) must keep working between GPU loans."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(repo, "benchmarks", "gpu_check.py"), "--tiny",
         "--iters", "1", "--warmup", "0", "--repeat", "1", "--backends", "triton,torch"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("tiny")]
    assert {row[2] for row in rows} == {"sdpa", "torch", "triton"}, done.stdout
    triton_row = next(row for row in rows if row[2] == "triton")
    assert float(triton_row[-1]) < 2e-2, done.stdout  # bf16 out vs the torch backend

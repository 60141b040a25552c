"""The triton backend's own launcher details: padding, tails, strides, dtypes, determinism, NaN,
output coverage, kernel loading, every autotuning configuration forced at a small size, huge
values, the per-pass building blocks, configuration pruning against a fake device. Without a GPU
the real kernels run under TRITON_INTERPRET=1 (set here too, before anything loads the kernels),
so shapes stay small."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from asag_kernels import sinkhorn_attention  # noqa: E402
from asag_kernels.backends import triton_backend  # noqa: E402
from conftest import (  # noqa: E402
    DEVICE, assert_close_to_reference, make_inputs, max_abs_err, rel_err, require_backend,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """The repo's own triton/ folder (no __init__.py) seen as a namespace package is not Triton."""
    namespace = importlib.machinery.ModuleSpec("triton", None, is_package=True)
    namespace.submodule_search_locations = [str(tmp_path)]
    assert "not installed" in triton_backend.triton_missing_reason(None)
    assert "namespace package" in triton_backend.triton_missing_reason(namespace)
    real = importlib.util.find_spec("triton")
    if real is not None and real.origin and os.path.isfile(real.origin):
        assert triton_backend.triton_missing_reason(real) is None


def test_kernel_module_loads_by_its_package_name():
    """One import path everywhere (wheel, editable, source tree): no file-path loading."""
    require_backend("triton", torch.float32)
    module = triton_backend._kernel_module()
    assert module.__name__ == triton_backend.KERNEL_MODULE == "asag_kernels.triton_kernels.sinkhorn_attention_kernels"
    assert os.path.isfile(module.__file__)
    assert os.path.realpath(module.__file__) == os.path.realpath(os.path.join(REPO, "triton", "sinkhorn_attention_kernels.py"))
    assert not hasattr(triton_backend, "_SOURCE_KERNEL_DIR")
    assert not os.path.exists(os.path.join(REPO, "triton", "__init__.py"))


def test_grid_split_over_batch_and_heads(monkeypatch, seed):
    """Launches split into batch and head ranges when B·H exceeds a grid dimension."""
    require_backend("triton", torch.float32)
    monkeypatch.setattr(triton_backend, "_MAX_GRID_Y", 3)
    q, k, v = make_inputs((2, 5), 20, 17, 16, 16, torch.float32, seed, layout="transposed")
    got, ref = _run_both(q, k, v, num_iters=1)
    assert_close_to_reference(got, ref, torch.float32, f"grid split seed={seed}")


def test_gpu_check_script_runs_tiny():
    """benchmarks/gpu_check.py --tiny (CPU, interpreter) must keep working between GPU loans."""
    repo = REPO
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


# ---- every configuration the autotuner (or the pinned path) can choose, forced at small sizes ----

def _candidate_tiles():
    """The distinct (BLOCK_M, BLOCK_N) of every candidate shape: what changes the sums' order (the
    interpreter ignores warps and stages)."""
    kernels = triton_backend.kernels()
    shapes = [*kernels.POTENTIAL_SHAPES, *kernels.ATTENTION_SHAPES, *kernels.FLOAT32_SHAPES, *kernels.PINNED.values(),
              *(s for wide in kernels.WIDE_HEAD_SHAPES.values() for s in wide)]
    return sorted({(m, n) for m, n, _, _ in shapes})


def _tile_params():
    try:
        return _candidate_tiles()
    except Exception:  # no Triton: the tests below skip through require_backend
        return [(64, 64)]


@pytest.mark.parametrize("block_m,block_n", _tile_params())
def test_each_config_is_accurate(block_m, block_n, seed):
    """Each candidate tile, forced: full and partial row and column tiles, bias and no-bias passes,
    num_iters = 0 (attention pass writes f) and 1, float32 and float16."""
    require_backend("triton", torch.float32)
    kernels = triton_backend.kernels()
    nq, nk = block_m + 3, 2 * block_n + 5
    for dtype, num_iters in ((torch.float32, 1), (torch.float16, 0)):
        q, k, v = make_inputs((1, 2), nq, nk, 24, 16, dtype, seed)
        with kernels.forced_config(block_m, block_n):
            got, ref = _run_both(q, k, v, num_iters=num_iters, cost="adversarial", epsilon=0.7)
        assert_close_to_reference(got, ref, dtype, f"forced {block_m}x{block_n} {dtype} T={num_iters} seed={seed}")


_DETERMINISM_SCRIPT = r"""
import json, os, sys
import torch
from asag_kernels import sinkhorn_attention
from asag_kernels.backends import triton_backend
seed, tiles = int(sys.argv[1]), json.loads(sys.argv[2])
gen = torch.Generator().manual_seed(seed)
q, k, v = (torch.randn(1, 2, n, 24, generator=gen).to(torch.bfloat16) for n in (70, 150, 150))
result = {}
for m, n in tiles:
    with triton_backend.kernels().forced_config(m, n):
        out, f, g = sinkhorn_attention(q, k, v, num_iters=2, backend="triton", return_potentials=True)
    result[f"{m}x{n}"] = [out.float().flatten().tolist(), f.flatten().tolist(), g.flatten().tolist()]
print(json.dumps(result))
"""


def test_forced_configs_are_bitwise_deterministic_across_processes(seed):
    """Two fresh processes, the same forced tiles: bitwise the same out, f and g."""
    require_backend("triton", torch.bfloat16)
    tiles = json.dumps([(64, 32), (128, 64)])
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    runs = [subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(seed), tiles], capture_output=True,
                           text=True, timeout=600, env=env, cwd=REPO) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    first, second = (json.loads(done.stdout.splitlines()[-1]) for done in runs)
    assert first.keys() == {"64x32", "128x64"}
    assert first == second, f"seed={seed}"


# ---- finite inputs never give NaN (issue 11 item 4) ----

@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e37), (torch.bfloat16, 3.3e38), (torch.float16, 6e4)])
def test_huge_values_stay_finite(dtype, magnitude, seed):
    """v near its dtype's largest value: the output sums must not overflow (each output is a convex
    combination of v's rows, so it is as finite as v)."""
    require_backend("triton", dtype)
    q, k, _ = make_inputs((1, 2), 40, 150, 16, 8, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    v = (torch.rand(1, 2, 150, 8, generator=gen, dtype=torch.float64) * 0.2 + 0.8) * magnitude
    v = v.clamp(max=torch.finfo(dtype).max).to(dtype)
    v[0, 1] = torch.finfo(dtype).max  # every value the largest finite: out is that, to rounding
    for num_iters in (0, 2):
        got, ref = _run_both(q, k, v, num_iters=num_iters, epsilon=0.5)
        out = got[0]
        assert torch.isfinite(out).all(), f"{dtype} T={num_iters} seed={seed}"
        assert rel_err(out, ref[0]) <= (2e-2 if dtype == torch.bfloat16 else 5e-3), f"seed={seed}"
        top = torch.finfo(dtype)
        assert ((out[0, 1].double() - top.max).abs() <= 4 * top.eps * top.max).all(), f"{out[0, 1]} seed={seed}"


# ---- the per-pass building blocks (issue 13) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_against_float64(dtype, seed):
    require_backend("triton", dtype)
    from conftest import check_blocks  # the shared blocks check every backend's blocks run

    check_blocks(triton_backend, dtype, seed)


def test_blocks_excluded_keys(seed):
    """-inf bias entries: a first key tile with no admissible key (the running max starts at -inf),
    and a head with none at all (lse = -inf, out = 0); same for excluded queries in col_lse."""
    require_backend("triton", torch.float32)
    q, k, v = make_inputs((1, 2), 70, 150, 16, 8, torch.float32, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    g = torch.randn(1, 2, 150, generator=gen)
    f = torch.randn(1, 2, 70, generator=gen)
    g[0, 0, :100] = -float("inf")
    g[0, 1] = -float("inf")
    f[0, 0, :66] = -float("inf")
    f[0, 1] = -float("inf")
    kw = dict(cost_sign=1.0, scale=0.25, epsilon=1.0)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    ref_row = torch.logsumexp(logits + g.double().unsqueeze(-2), -1)
    ref_col = torch.logsumexp(logits + f.double().unsqueeze(-1), -2)
    ref_out = torch.softmax(logits[0, 0] + g[0, 0].double(), -1) @ v[0, 0].double()
    row = triton_backend.row_lse(q, k, g, **kw)
    col = triton_backend.col_lse(q, k, f, **kw)
    out, lse = triton_backend.biased_attention(q, k, v, g, **kw)
    ctx = f"seed={seed}"
    assert torch.equal(row[0, 1], torch.full_like(row[0, 1], -float("inf"))), ctx
    assert torch.equal(lse[0, 1], row[0, 1]) and torch.equal(col[0, 1], torch.full_like(col[0, 1], -float("inf"))), ctx
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])), ctx
    assert max_abs_err(row[0, 0], ref_row[0, 0]) <= 1e-4 and max_abs_err(lse[0, 0], ref_row[0, 0]) <= 1e-4, ctx
    assert max_abs_err(col[0, 0], ref_col[0, 0]) <= 1e-4, ctx
    assert rel_err(out[0, 0], ref_out) <= 1e-5, ctx


def test_sinkhorn_is_the_blocks_composed(seed):
    """f = -log Nq - row_lse(g); g = -log Nk - col_lse(f); out = biased_attention(g).out."""
    require_backend("triton", torch.float32)
    q, k, v = make_inputs((1, 2), 50, 70, 16, 16, torch.float32, seed)
    kw = dict(cost_sign=-1.0, scale=0.25, epsilon=0.5)
    g = torch.zeros(1, 2, 70)
    for _ in range(2):
        f = -torch.log(torch.tensor(50.0)) - triton_backend.row_lse(q, k, g, **kw)
        g = -torch.log(torch.tensor(70.0)) - triton_backend.col_lse(q, k, f, **kw)
    out, _ = triton_backend.biased_attention(q, k, v, g, **kw)
    ref_out, ref_f, ref_g = sinkhorn_attention(q.double(), k.double(), v.double(), num_iters=2, scale=0.25,
                                               epsilon=0.5, backend="reference", return_potentials=True)
    assert rel_err(out, ref_out) <= 1e-5 and max_abs_err(f, ref_f) <= 1e-4 and max_abs_err(g, ref_g) <= 1e-4, f"seed={seed}"


# ---- configuration choice and shared-memory pruning, against a fake device ----

def _named_args(dtype, rows, cols):
    return {"rows_ptr": torch.empty(1, dtype=dtype), "rows_bucket": rows, "cols_bucket": cols}


@pytest.mark.parametrize("max_shared_kib", [48, 100, 164, 227])
def test_prune_configs_fit_a_fake_device(monkeypatch, max_shared_kib):
    """_prune_configs (the autotuner's hook, only ever reached on a GPU) with a fake device limit:
    every config it returns fits the budget, stages shrink before tiles go, pinned first."""
    require_backend("triton", torch.float32)
    kernels = triton_backend.kernels()
    monkeypatch.setattr(kernels, "_device_properties", lambda: (80, max_shared_kib * 1024))
    monkeypatch.setattr(kernels, "INTERPRETING", False)  # decide as on a GPU
    budget = kernels.shared_memory_budget(max_shared_kib * 1024)
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
        elem = torch.empty(0, dtype=dtype).element_size()
        for d_pad in (64, 128, 256):
            for kind, extra in (("potential", {}), ("attention", {"DV_PAD": d_pad})):
                kw = dict(D_PAD=d_pad, DOT_PRECISION=precision, **extra)
                pruned = kernels._prune_configs([], _named_args(dtype, 4096, 4096), **kw)
                assert pruned, (kind, dtype, d_pad)
                shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned]
                assert len(set(shapes)) == len(shapes)
                for m, n, _, stages in shapes:
                    assert kernels.shared_memory_estimate(m, n, stages, d_pad, extra.get("DV_PAD", 0), elem) <= budget or \
                        shapes == [kernels.FALLBACK_SHAPE], (kind, dtype, d_pad, m, n, stages, budget)
                candidates = [*kernels.candidate_shapes(kind, elem, precision, arch=80, d_pad=d_pad),
                              kernels.FALLBACK_SHAPE]
                assert {(m, n, w) for m, n, w, _ in shapes} <= {(m, n, w) for m, n, w, _ in candidates}
                # Below AUTOTUNE_MIN_SIZE only the pinned one runs, and it leads the full list.
                small = kernels.fixed_config(_named_args(dtype, 512, 4096), kw)
                assert (small.kwargs["BLOCK_M"], small.kwargs["BLOCK_N"], small.num_warps, small.num_stages) == shapes[0]
                assert kernels.fixed_config(_named_args(dtype, 4096, 4096), kw) is None or not kernels.AUTOTUNE
    # A small device really removes stages and tiles that a large one keeps.
    if max_shared_kib == 48:
        big = kernels.choose_configs("attention", arch=90, max_shared_mem=227 * 1024, elem_bytes=2, precision="ieee",
                                     d_pad=128, dv_pad=128, pinned_only=False)
        small = kernels.choose_configs("attention", arch=80, max_shared_mem=48 * 1024, elem_bytes=2, precision="ieee",
                                       d_pad=128, dv_pad=128, pinned_only=False)
        assert sum(s for *_, s in small) < sum(s for *_, s in big)


def test_pinned_table_is_used(monkeypatch):
    """A PINNED entry for (kind, arch, D_PAD, float32-IEEE) is what the pinned path runs."""
    require_backend("triton", torch.float32)
    kernels = triton_backend.kernels()
    monkeypatch.setattr(kernels, "PINNED", {("attention", 90, 128, "16bit"): (64, 64, 4, 2)})
    got = kernels.choose_configs("attention", arch=90, max_shared_mem=227 * 1024, elem_bytes=2, precision="ieee",
                                 d_pad=128, dv_pad=128, pinned_only=True)
    assert got == [(64, 64, 4, 2)]
    other = kernels.choose_configs("attention", arch=80, max_shared_mem=164 * 1024, elem_bytes=2, precision="ieee",
                                   d_pad=128, dv_pad=128, pinned_only=True)
    assert other[0][:3] == kernels.ATTENTION_SHAPES[0][:3]


def test_wide_head_keys_run_their_compiled_shapes():
    """Every WIDE_HEAD_SHAPES key on an A100 / H100: the launch chooses exactly the tiles that the
    compile sweep measured spill-free (stages not shrunk, no 32×32 fallback); head dim 256 in TF32
    has its attention entries on both architectures."""
    require_backend("triton", torch.float32)
    kernels = triton_backend.kernels()
    assert {("attention", 80, 256, "tf32"), ("attention", 90, 256, "tf32")} <= set(kernels.WIDE_HEAD_SHAPES)
    for (kind, arch, d_pad, dot), wide in kernels.WIDE_HEAD_SHAPES.items():
        got = kernels.choose_configs(kind, arch=arch, max_shared_mem=kernels.ARCH_SHARED_MEMORY[arch],
                                     elem_bytes=2 if dot == "16bit" else 4, precision="ieee" if dot == "16bit" else dot,
                                     d_pad=d_pad, dv_pad=d_pad if kind == "attention" else 0, pinned_only=False)
        assert got == wide, (kind, arch, d_pad, dot, got)


def test_spilling_candidates_are_never_chosen(monkeypatch):
    require_backend("triton", torch.float32)
    kernels = triton_backend.kernels()
    monkeypatch.setattr(kernels, "SPILLING", {("potential", 90, 64, "16bit"): {(128, 64, 8), (64, 64, 4)}})
    got = kernels.choose_configs("potential", arch=90, max_shared_mem=227 * 1024, elem_bytes=2, precision="ieee",
                                 d_pad=64, pinned_only=False)
    assert got and not {s[:3] for s in got} & {(128, 64, 8), (64, 64, 4)}
    assert got[0][:3] == kernels.POTENTIAL_SHAPES[1][:3]  # the first candidate that does not spill is pinned


def test_alignment_hint():
    """Row alignment the kernels may assume: 16 bytes for contiguous D = 40 (80-byte rows), less
    for offset views or odd strides."""
    bf16 = torch.empty(2, 3, 10, 40, dtype=torch.bfloat16)
    assert triton_backend.alignment(bf16) == 8
    assert triton_backend.alignment(bf16.float()) == 4
    assert triton_backend.alignment(bf16[..., 1:]) == 1
    assert triton_backend.alignment(torch.empty(2, 3, 10, 44, dtype=torch.float16)) == 4
    assert triton_backend.alignment(torch.empty(2, 3, 10, 80, dtype=torch.float16)[..., ::2]) == 8
    assert triton_backend.alignment(torch.empty(2, 3, 10, 42, dtype=torch.float16)[..., ::2]) == 2
    assert triton_backend.alignment(torch.empty(2, 3, 40, 10, dtype=torch.float16).transpose(-1, -2)) == 1

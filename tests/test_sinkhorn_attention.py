"""The shared suite: every backend, compared with the float64 reference (SPEC §3-§5).

A backend joins by name (conftest's `backend` fixture); cases it cannot run here are skipped with the
backend's own reason (e.g. float64 on a float32-only kernel, no GPU). `ASAG_REQUIRE_BACKENDS`
(comma-separated) turns "not available" into a failure, so CI cannot pass by skipping a backend.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import asag_kernels
from asag_kernels import backends, sinkhorn_attention
from conftest import DEVICE, REQUIRED_BACKENDS, TOLERANCES, assert_close_to_reference, make_inputs, rel_err, require_backend

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
COSTS = ("adversarial", "standard")

# (leading dims, Nq, Nk, D, Dv): ragged sizes, Nq != Nk, 3-D and 4-D, D in {16, 40, 64, 80, 128}.
SHAPES = (
    ((2, 3), 7, 7, 16, 16),
    ((1, 2), 129, 65, 40, 40),
    ((2,), 33, 129, 64, 32),
    ((1, 1), 1, 1, 16, 16),
    ((1, 2), 1, 7, 80, 80),
    ((1, 1), 64, 96, 128, 128),
    ((2, 1), 100, 37, 64, 64),
)
LAYOUTS = ("contiguous", "transposed", "sliced")
ITERS = (0, 1, 2, 5, 3)
EPSILONS = (1.0, 0.1, 0.5)


def _reference(q, k, v, **kw):
    return sinkhorn_attention(q.double(), k.double(), v.double(), backend="reference", return_potentials=True, **kw)


def _check_against_reference(backend, q, k, v, seed, **kw):
    got = sinkhorn_attention(q, k, v, backend=backend, return_potentials=True, **kw)
    ref = _reference(q, k, v, **kw)
    ctx = f"backend={backend} dtype={q.dtype} shape={tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} {kw} seed={seed}"
    out, f, g = got
    assert out.shape == q.shape[:-1] + v.shape[-1:] and f.shape == q.shape[:-1] and g.shape == k.shape[:-1], ctx
    assert_close_to_reference(got, ref, q.dtype, ctx)
    return out


# Shapes x dtypes, with cost/iterations/epsilon/layout cycled so that each dtype meets both costs,
# every iteration count, epsilon and layout across the shapes, without a full product (the Triton
# interpreter is slow). The cost alternates within a shape and flips from one shape to the next.
GRID = [
    pytest.param(
        shape, dtype, COSTS[(s_idx + d_idx) % 2], ITERS[i % 5], EPSILONS[i % 3], LAYOUTS[(i // 3) % 3],
        id=f"{'x'.join(map(str, shape[0]))}-{shape[1]}x{shape[2]}x{shape[3]}-{str(dtype)[6:]}-{COSTS[(s_idx + d_idx) % 2][:3]}-{i}",
    )
    for i, ((s_idx, shape), (d_idx, dtype)) in enumerate(itertools.product(enumerate(SHAPES), enumerate(DTYPES)))
]
# Every dtype meets both costs (float64 is skipped by the kernel backends, so this matters), and
# epsilon and layout vary independently (every epsilon meets every layout).
assert {(p.values[1], p.values[2]) for p in GRID} == set(itertools.product(DTYPES, COSTS))
assert {(p.values[4], p.values[5]) for p in GRID} == set(itertools.product(EPSILONS, LAYOUTS))


@pytest.mark.parametrize("shape,dtype,cost,num_iters,epsilon,layout", GRID)
def test_matches_reference(backend, shape, dtype, cost, num_iters, epsilon, layout, seed):
    require_backend(backend, dtype)
    q, k, v = make_inputs(*shape, dtype, seed, layout)
    _check_against_reference(backend, q, k, v, seed, num_iters=num_iters, cost=cost, epsilon=epsilon)


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("num_iters", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("epsilon", [1.0, 0.05])
def test_iterations_costs_epsilons(backend, cost, num_iters, epsilon, seed):
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((1, 2), 48, 40, 32, 32, torch.float32, seed)
    _check_against_reference(backend, q, k, v, seed, num_iters=num_iters, cost=cost, epsilon=epsilon)


def test_explicit_scale(backend, seed):
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((2, 2), 20, 30, 16, 8, torch.float32, seed)
    _check_against_reference(backend, q, k, v, seed, num_iters=2, scale=0.7, epsilon=0.5)


def test_five_dim_inputs(backend, seed):
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((2, 2, 2), 9, 11, 16, 16, torch.float32, seed)
    _check_against_reference(backend, q, k, v, seed, num_iters=1)


# ---- properties of SPEC §3 ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_iterations_standard_is_sdpa(backend, dtype, seed):
    require_backend(backend, dtype)
    q, k, v = make_inputs((2, 3), 77, 50, 64, 64, dtype, seed)
    out = sinkhorn_attention(q, k, v, num_iters=0, cost="standard", epsilon=1.0, backend=backend)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_err(out, sdpa) <= TOLERANCES[dtype][0], f"seed={seed}"


def _logits64(q, k, cost, epsilon, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    sign = -1.0 if cost == "adversarial" else 1.0
    return sign * scale * (q.double() @ k.double().transpose(-1, -2)) / epsilon


@pytest.mark.parametrize("cost", COSTS)
def test_column_marginals_exact_after_column_update(backend, cost, seed):
    dtype = torch.float64 if backend in ("reference", "torch") else torch.float32
    require_backend(backend, dtype)
    q, k, v = make_inputs((1, 2), 45, 60, 32, 16, dtype, seed)
    for num_iters in (1, 3):
        _, f, g = sinkhorn_attention(q, k, v, num_iters=num_iters, cost=cost, backend=backend, return_potentials=True)
        plan = torch.exp(_logits64(q, k, cost, 1.0) + f.double().unsqueeze(-1) + g.double().unsqueeze(-2))
        col_err = (plan.sum(-2) * k.shape[-2] - 1).abs().max().item()
        # SPEC §4: f and g are each within 1e-4 (float32), so a column sum of exp(L + f + g) is within
        # about exp(2e-4) - 1 of 1/Nk, plus rounding: 3e-4. float64: 1e-10 each.
        assert col_err <= (1e-10 if dtype == torch.float64 else 3e-4), f"num_iters={num_iters} col_err={col_err:.2e} seed={seed}"


def test_row_marginal_error_decreases(backend, seed):
    dtype = torch.float64 if backend in ("reference", "torch") else torch.float32
    require_backend(backend, dtype)
    q, k, v = make_inputs((1, 1), 50, 70, 16, 16, dtype, seed)
    errors = []
    for num_iters in range(1, 7):
        _, f, g = sinkhorn_attention(q, k, v, num_iters=num_iters, backend=backend, return_potentials=True)
        plan = torch.exp(_logits64(q, k, "adversarial", 1.0) + f.double().unsqueeze(-1) + g.double().unsqueeze(-2))
        errors.append((plan.sum(-1) * q.shape[-2] - 1).abs().sum().item())
    slack = 1e-9 if dtype == torch.float64 else 1e-4
    assert all(b <= a + slack for a, b in zip(errors, errors[1:])), f"{errors} seed={seed}"
    assert errors[-1] < errors[0], f"{errors} seed={seed}"


def test_row_shift_invariance(backend, seed):
    """A per-row constant added to L leaves out unchanged. It is made through the inputs: an extra
    feature that is 1 for every key and alpha_i for query i adds scale*alpha_i to row i."""
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((1, 2), 40, 56, 31, 16, torch.float32, seed)
    alpha = torch.randn(q.shape[:-1] + (1,), generator=torch.Generator().manual_seed(seed)).to(q) * 3
    q2 = torch.cat([q, alpha], dim=-1)
    k2 = torch.cat([k, torch.ones(k.shape[:-1] + (1,), dtype=k.dtype, device=k.device)], dim=-1)
    for cost in COSTS:
        base = sinkhorn_attention(q, k, v, num_iters=2, cost=cost, scale=0.2, backend=backend)
        shifted = sinkhorn_attention(q2, k2, v, num_iters=2, cost=cost, scale=0.2, backend=backend)
        assert rel_err(shifted, base) <= TOLERANCES[torch.float32][0], f"cost={cost} seed={seed}"


@pytest.mark.parametrize("cost", COSTS)
def test_output_is_convex_combination_of_values(backend, cost, seed):
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((2, 2), 33, 47, 16, 24, torch.float32, seed)
    v = v * 10 + 5
    out = sinkhorn_attention(q, k, v, num_iters=3, cost=cost, epsilon=0.3, backend=backend)
    lo = v.amin(dim=-2, keepdim=True) - 1e-4 * v.abs().amax()
    hi = v.amax(dim=-2, keepdim=True) + 1e-4 * v.abs().amax()
    assert ((out >= lo) & (out <= hi)).all(), f"seed={seed}"
    ones = sinkhorn_attention(q, k, torch.ones_like(v), num_iters=3, cost=cost, backend=backend)
    assert torch.allclose(ones, torch.ones_like(ones), atol=1e-5), f"seed={seed}"


# ---- robustness -------------------------------------------------------------------------------

@pytest.mark.parametrize("epsilon", [1e-3, 1e-2])
def test_extreme_logits_stay_finite(backend, epsilon, seed):
    """|L| reaches ~1e4: tiny epsilon and large-norm outlier keys."""
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((1, 2), 40, 52, 16, 16, torch.float32, seed)
    k[..., 3, :] *= 30.0
    logits = _logits64(q, k, "adversarial", epsilon)
    assert logits.abs().max() > 1e3
    for cost in COSTS:
        out, f, g = sinkhorn_attention(q, k, v, num_iters=3, cost=cost, epsilon=epsilon, backend=backend, return_potentials=True)
        assert torch.isfinite(out).all() and torch.isfinite(f).all() and torch.isfinite(g).all(), f"cost={cost} seed={seed}"
        lo, hi = v.amin(-2, keepdim=True) - 1e-3, v.amax(-2, keepdim=True) + 1e-3
        assert ((out >= lo) & (out <= hi)).all(), f"cost={cost} seed={seed}"


def test_negligible_columns(backend, seed):
    """Keys that every row gives (almost) no weight: their potentials grow large but stay finite
    and the result still matches the reference."""
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((1, 2), 64, 48, 16, 16, torch.float32, seed)
    direction = q.mean(dim=-2, keepdim=True)
    k[..., :4, :] = 6.0 * direction / direction.norm(dim=-1, keepdim=True)  # adversarial: similar = expensive
    q = q + 2.0 * direction
    for num_iters in (0, 2):
        _check_against_reference(backend, q, k, v, seed, num_iters=num_iters, cost="adversarial", epsilon=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_non_finite_inputs_match_reference_pattern(backend, dtype, bad, where, seed):
    """NaN/Inf inputs: the finite pattern of out, f and g equals the float64 reference's, for every
    dtype (half precision takes other kernel paths); never Inf in out, other heads untouched."""
    require_backend(backend, dtype)
    q, k, v = make_inputs((2, 2), 21, 19, 16, 16, dtype, seed)
    {"q": q, "k": k, "v": v}[where][1, 0, 5, 3] = bad
    out, f, g = sinkhorn_attention(q, k, v, num_iters=2, backend=backend, return_potentials=True)
    ref_out, ref_f, ref_g = _reference(q, k, v, num_iters=2)
    ctx = f"{where}={bad} dtype={dtype} seed={seed}"
    assert not torch.isinf(out).any(), f"non-finite inputs must give NaN, never Inf: {ctx}"
    for name, got, ref in (("out", out, ref_out), ("f", f, ref_f), ("g", g, ref_g)):
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), f"{name}'s finite pattern differs from the reference: {ctx}"
    assert torch.isnan(out[1, 0]).any(), f"did not reach out[1, 0]: {ctx}"
    clean = torch.ones(out.shape[:2], dtype=torch.bool)
    clean[1, 0] = False
    assert torch.isfinite(out[clean]).all(), f"other (batch, head) pairs must stay finite: {ctx}"


def test_deterministic(backend, seed):
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((2, 2), 130, 70, 64, 64, torch.float32, seed)
    first = sinkhorn_attention(q, k, v, num_iters=2, backend=backend, return_potentials=True)
    for _ in range(2):
        again = sinkhorn_attention(q, k, v, num_iters=2, backend=backend, return_potentials=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"seed={seed}"


@pytest.mark.parametrize("lead,nq", [((2, 3), 0), ((0, 3), 5), ((2, 0), 5)])
def test_empty_queries_or_batch(backend, lead, nq):
    require_backend(backend, torch.float32)
    q = torch.randn(*lead, nq, 16, device=DEVICE)
    k = torch.randn(*lead, 9, 16, device=DEVICE)
    v = torch.randn(*lead, 9, 8, device=DEVICE)
    out, f, g = sinkhorn_attention(q, k, v, backend=backend, return_potentials=True)
    assert out.shape == (*lead, nq, 8) and f.shape == (*lead, nq) and g.shape == (*lead, 9)


# ---- the custom op -----------------------------------------------------------------------------

def test_opcheck(backend, seed):
    require_backend(backend, torch.float32)
    q, k, v = make_inputs((1, 2), 17, 12, 16, 8, torch.float32, seed, layout="transposed")
    torch.library.opcheck(torch.ops.asag.sinkhorn_attention.default, (q, k, v, 2, "adversarial", 0.25, 1.0, backend))


def test_torch_compile_fullgraph(seed):
    name = backends.resolve_auto(DEVICE, torch.float32)
    q, k, v = make_inputs((1, 2), 33, 20, 16, 16, torch.float32, seed)

    def layer(q, k, v):
        return sinkhorn_attention(q * 2.0, k, v, num_iters=2, epsilon=0.5) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, k, v)
    want = sinkhorn_attention(q * 2.0, k, v, num_iters=2, epsilon=0.5, backend=name) + 1.0
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"auto backend {name}, seed={seed}"


# ---- availability and dispatch -----------------------------------------------------------------

def test_status_lists_every_backend():
    status = asag_kernels.backend_status()
    assert list(status) == ["reference", "torch", "cpu", "triton", "cuda"]
    assert status["reference"] == status["torch"] == "ok"
    assert set(asag_kernels.available_backends()) == {n for n, s in status.items() if s == "ok"}
    for name, why in status.items():
        assert why == "ok" or len(why) > 10, f"{name}: status must say why it is unusable, got {why!r}"


def test_required_backends_are_available():
    if not REQUIRED_BACKENDS:
        pytest.skip("ASAG_REQUIRE_BACKENDS is not set and this is not a GPU run (CI sets it so a missing backend fails)")
    status = asag_kernels.backend_status()
    missing = {n: status[n] for n in REQUIRED_BACKENDS if status[n] != "ok"}
    assert not missing, f"required backends unavailable: {missing}"


def test_auto_prefers_kernels():
    cpu = torch.device("cpu")
    assert backends.resolve_auto(cpu, torch.float64) == "torch"
    expected_cpu = "cpu" if backends.unsupported_reason("cpu", cpu, torch.float32) is None else "torch"
    assert backends.resolve_auto(cpu, torch.float32) == expected_cpu
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        for name in ("triton", "cuda", "torch"):
            if backends.unsupported_reason(name, dev, torch.bfloat16) is None:
                assert backends.resolve_auto(dev, torch.bfloat16) == name
                break


def test_explicit_backend_never_falls_back():
    q = torch.randn(1, 1, 4, 8)
    unusable = [n for n in backends.BACKENDS if backends.unsupported_reason(n, q.device, q.dtype) is not None]
    if not unusable:
        pytest.skip("every backend can run CPU float32 here")
    for name in unusable:
        with pytest.raises(ValueError, match=f"backend='{name}'.*Available backends"):
            sinkhorn_attention(q, q, q, backend=name)


def test_auto_skips_backends_whose_head_dim_limit_is_exceeded():
    for name in backends.BACKENDS:
        limit = getattr(backends.get(name), "MAX_HEAD_DIM", None)
        if limit is None or backends.unsupported_reason(name, DEVICE, torch.float32) is not None:
            continue
        reason = backends.unsupported_reason(name, DEVICE, torch.float32, head_dim=limit + 1)
        assert reason is not None and f"up to {limit}" in reason
        assert backends.resolve_auto(DEVICE, torch.float32, head_dim=limit + 1) != name
    q = torch.randn(1, 1, 5, 300, device=DEVICE)
    out = sinkhorn_attention(q, q, q[..., :7], num_iters=1)  # "auto" must find a backend for D = 300
    ref = sinkhorn_attention(q.double(), q.double(), q[..., :7].double(), num_iters=1, backend="reference")
    assert rel_err(out, ref) <= TOLERANCES[torch.float32][0]


def test_tf32_switch_follows_torch():
    """Both GPU backends read torch's TF32 switch through backends.tf32_allowed(), legacy and new
    API alike (reading the legacy flag raises once the new one was used). A subprocess, since the
    switches are process-wide state."""
    code = """
import torch
from asag_kernels import backends
from asag_kernels.backends import triton_backend
m = torch.backends.cuda.matmul
seen = [backends.tf32_allowed()]
m.allow_tf32 = True; seen.append(backends.tf32_allowed())
m.allow_tf32 = False; seen.append(backends.tf32_allowed())
torch.set_float32_matmul_precision("high"); seen.append(backends.tf32_allowed())
torch.set_float32_matmul_precision("highest"); seen.append(backends.tf32_allowed())
m.fp32_precision = "tf32"; seen.append(backends.tf32_allowed())
seen.append(triton_backend.dot_precision(torch.float32) == "tf32" and triton_backend.dot_precision(torch.bfloat16) == "ieee")
m.fp32_precision = "ieee"; seen.append(backends.tf32_allowed())
seen.append(triton_backend.dot_precision(torch.float32) == "tf32")
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False, True, False, True, False, True, True, False, False]"


def test_torch_compile_fullgraph_dynamic_scalars(seed):
    """Defect 5: validation traces under fullgraph=True, dynamic=True, with default arguments and
    with num_iters/scale/epsilon passed in as inputs of the compiled function."""
    name = backends.resolve_auto(DEVICE, torch.float32)
    q, k, v = make_inputs((1, 2), 13, 9, 16, 8, torch.float32, seed)
    torch._dynamo.reset()
    plain = torch.compile(lambda q, k, v: sinkhorn_attention(q, k, v), fullgraph=True, dynamic=True)
    assert torch.allclose(plain(q, k, v), sinkhorn_attention(q, k, v, backend=name), rtol=1e-5, atol=1e-6), f"seed={seed}"
    scalars = torch.compile(
        lambda q, k, v, n, s, e: sinkhorn_attention(q, k, v, num_iters=n, scale=s, epsilon=e), fullgraph=True, dynamic=True
    )
    for n, sc, eps in ((3, 0.3, 0.5), (1, 0.2, 2.0)):
        want = sinkhorn_attention(q, k, v, num_iters=n, scale=sc, epsilon=eps, backend=name)
        assert torch.allclose(scalars(q, k, v, n, sc, eps), want, rtol=1e-5, atol=1e-6), f"{n, sc, eps} seed={seed}"
    # A bad value still gets the clear error (dynamo re-raises it with the message attached).
    with pytest.raises(Exception, match=r"epsilon must be a finite number > 0"):
        scalars(q, k, v, 2, 0.3, -1.0)


# ---- independent float64 identities (the reference is not only checked against itself) -------

def _float64_or_kernel_dtype(backend):
    return torch.float64 if backends.unsupported_reason(backend, DEVICE, torch.float64) is None else torch.float32


@pytest.mark.parametrize("epsilon", [1.0, 0.37])
def test_standard_cost_zero_iters_is_sdpa_with_scale_over_epsilon(backend, epsilon, seed):
    """T = 0, standard cost: softmax(scale·q kᵀ/ε) v = SDPA with scale/ε (1e-12 in float64)."""
    dtype = _float64_or_kernel_dtype(backend)
    require_backend(backend, dtype)
    q, k, v = make_inputs((2, 2), 23, 31, 16, 8, dtype, seed, layout="transposed")
    out = sinkhorn_attention(q, k, v, num_iters=0, cost="standard", scale=0.4, epsilon=epsilon, backend=backend)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.4 / epsilon)
    assert rel_err(out, sdpa) <= TOLERANCES[dtype][0], f"epsilon={epsilon} seed={seed}"


def test_adversarial_cost_zero_iters_is_sdpa_on_negated_queries(backend, seed):
    """T = 0, adversarial cost: softmax(−scale·q kᵀ) v = SDPA on −q."""
    dtype = _float64_or_kernel_dtype(backend)
    require_backend(backend, dtype)
    q, k, v = make_inputs((1, 3), 17, 29, 32, 16, dtype, seed, layout="sliced")
    out = sinkhorn_attention(q, k, v, num_iters=0, cost="adversarial", backend=backend)
    sdpa = F.scaled_dot_product_attention(-q.double(), k.double(), v.double())
    assert rel_err(out, sdpa) <= TOLERANCES[dtype][0], f"seed={seed}"


def _golden_scaling_domain(q, k, v, num_iters, cost, scale, epsilon):
    """SPEC §3 in the scaling domain, a different algorithm from every backend: K = exp(L),
    u = a / (K w), w = b / (Kᵀ u) (w⁰ = 1), out = rows of K·diag(w) normalised, times v;
    f = log u, g = log w. Float64 with small logits, so no log-domain stabilisation is needed."""
    sign = -1.0 if cost == "adversarial" else 1.0
    gibbs = torch.exp(sign * scale * (q.double() @ k.double().transpose(-1, -2)) / epsilon)
    nq, nk = gibbs.shape[-2:]
    w = torch.ones(gibbs.shape[:-2] + (nk,), dtype=torch.float64)
    u = (1.0 / nq) / (gibbs @ w.unsqueeze(-1)).squeeze(-1)
    for _ in range(num_iters):
        u = (1.0 / nq) / (gibbs @ w.unsqueeze(-1)).squeeze(-1)
        w = (1.0 / nk) / (gibbs.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
    plan = gibbs * w.unsqueeze(-2)
    out = (plan / plan.sum(-1, keepdim=True)) @ v.double()
    return out, torch.log(u), torch.log(w)


@pytest.mark.parametrize("num_iters,epsilon,cost", [(1, 0.7, "adversarial"), (3, 2.5, "standard"), (4, 0.45, "adversarial")])
def test_matches_golden_scaling_domain_loop(backend, num_iters, epsilon, cost, seed):
    dtype = _float64_or_kernel_dtype(backend)
    require_backend(backend, dtype)
    q, k, v = make_inputs((2, 1), 19, 26, 8, 8, dtype, seed)
    got = sinkhorn_attention(q, k, v, num_iters=num_iters, cost=cost, scale=0.3, epsilon=epsilon, backend=backend, return_potentials=True)
    golden = _golden_scaling_domain(q, k, v, num_iters, cost, 0.3, epsilon)
    assert_close_to_reference(got, golden, dtype, f"backend={backend} T={num_iters} eps={epsilon} {cost} seed={seed}")


# ---- "auto" resolution and named backends, through the public function -------------------------

_AUTO_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_AUTO_ORDER_SPEC = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}  # SPEC §2


def _record_backend(monkeypatch):
    ran = []
    real = backends.run

    def recording(name, *args, **kwargs):
        ran.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backends, "run", recording)
    return ran


@pytest.mark.parametrize("device", _AUTO_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 128, 300])
def test_auto_resolution_table(monkeypatch, device, dtype, head_dim):
    """SPEC §2's rule: float64 -> torch; cpu -> cpu else torch; cuda -> triton, cuda, torch; a
    backend is skipped when it cannot take the dtype or head dim here."""
    dev = torch.device(device)
    if dtype == torch.float64:
        expected = "torch"
    else:
        expected = next(n for n in _AUTO_ORDER_SPEC[device] if backends.unsupported_reason(n, dev, dtype, head_dim) is None)
    ran = _record_backend(monkeypatch)
    q = torch.randn(1, 1, 5, head_dim, device=dev, dtype=dtype)
    out = sinkhorn_attention(q, q, q[..., :8], num_iters=1)
    assert ran == [expected], f"auto ran {ran}, SPEC says {expected} for {device}/{dtype}/D={head_dim}"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", _AUTO_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 300])
def test_named_backend_never_falls_back(monkeypatch, backend, device, dtype, head_dim):
    dev = torch.device(device)
    q = torch.randn(1, 1, 5, head_dim, device=dev, dtype=dtype)
    reason = backends.unsupported_reason(backend, dev, dtype, head_dim)
    ran = _record_backend(monkeypatch)
    if reason is None:
        sinkhorn_attention(q, q, q[..., :8], num_iters=1, backend=backend)
        assert ran == [backend], f"backend={backend!r} ran {ran}"
    else:
        with pytest.raises(ValueError, match=f"backend='{backend}'.*Available backends"):
            sinkhorn_attention(q, q, q[..., :8], num_iters=1, backend=backend)
        assert ran == [], f"backend={backend!r} fell back to {ran}"


# ---- SPEC §6: extra memory does not grow with batch·heads beyond O(B·H·(Nq+Nk)) ------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _extra_peak_bytes(fn) -> int:
    """Peak RSS above the starting RSS while fn() runs, sampled every 0.2 ms by a thread (the
    backends release the GIL while they compute)."""
    import threading
    import time

    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
        peak[0] = max(peak[0], _rss_bytes())
    finally:
        stop.set()
        thread.join()
    del result
    return peak[0] - base


@pytest.mark.skipif(DEVICE.type != "cpu" or not os.path.exists("/proc/self/statm"),
                    reason="samples this process's RSS on Linux CPU tensors (GPU memory: benchmarks/gpu_check.py)")
@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_memory_does_not_grow_with_heads(monkeypatch, backend_name):
    """Extra peak memory of one call, 4 vs 64 heads of 512 tokens with an 8 MiB workspace: the
    materialising reference grows by 60 heads x 2 MiB of float64 logits at least (it must, or the
    measurement could not see the difference); a streaming backend only by its outputs and
    potentials."""
    require_backend(backend_name, torch.float32)
    monkeypatch.setenv("ASAG_TORCH_WORKSPACE_MB", "8")
    monkeypatch.setenv("ASAG_CPU_WORKSPACE_MB", "8")
    n, small, large = 512, 4, 64
    inputs = {h: tuple(torch.randn(1, h, n, 8) for _ in range(3)) for h in (small, large)}

    def grown(name):
        sinkhorn_attention(*inputs[small], num_iters=1, backend=name)  # library start-up, kept caches
        peaks = {h: _extra_peak_bytes(lambda: sinkhorn_attention(*inputs[h], num_iters=1, backend=name)) for h in (small, large)}
        return peaks[large] - peaks[small]

    per_head_logits = n * n * 8
    ref_grown = grown("reference")
    assert ref_grown > (large - small) * per_head_logits, f"the measurement cannot see materialisation: {ref_grown}"
    got = grown(backend_name)
    outputs = (large - small) * n * (8 + 2) * 8  # out + f + g, with float64 slack
    assert got <= outputs + 16 * 2**20, (
        f"{backend_name}: extra peak grew by {got / 2**20:.1f} MiB from {small} to {large} heads "
        f"(materialising adds {ref_grown / 2**20:.0f} MiB)"
    )

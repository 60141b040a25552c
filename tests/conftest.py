"""Shared fixtures: the device under test, the backend parametrisation, fresh random inputs, the
backends a run must have (a missing one fails instead of skipping) and a per-test timeout."""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import threading

import pytest
import torch

# Triton's interpreter must be chosen before any kernel module is imported: without a GPU, the
# triton backend runs its real kernels on CPU tensors through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asag_kernels import backends  # noqa: E402
from asag_kernels._env import env_float, env_list  # noqa: E402
from asag_kernels._spec import TOLERANCES  # noqa: E402,F401  (SPEC §4, re-exported for the tests)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Backends this run must have: ASAG_REQUIRE_BACKENDS (comma-separated; CI sets it), and on a GPU
# machine every backend (a GPU run that skips its GPU kernels proves nothing).
REQUIRED_BACKENDS: tuple[str, ...] = env_list("ASAG_REQUIRE_BACKENDS", backends.BACKENDS, ())
if DEVICE.type == "cuda":
    REQUIRED_BACKENDS = tuple(dict.fromkeys(REQUIRED_BACKENDS + backends.BACKENDS))
    # A just-in-time CUDA build must finish before tests decide what to skip: status() starts it
    # (in the background by default), wait_for_build() then joins it. Calling wait_for_build()
    # alone returned at once, before anything had started a build, and every cuda case skipped.
    from asag_kernels.backends import cuda_backend

    cuda_backend.status()
    cuda_backend.wait_for_build()
    # SPEC §4's float32 tolerance is for exact float32 products; TF32 has its own, looser budget.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def skip_reason(name: str, dtype: torch.dtype, device: torch.device = DEVICE) -> str | None:
    return backends.unsupported_reason(name, device, dtype)


def require_backend(name: str, dtype: torch.dtype = torch.float32, device: torch.device = DEVICE) -> None:
    """Skip (with the backend's reason) when `name` cannot run these tensors here; fail instead when
    the backend is required but unusable here at all (a dtype it never takes still skips)."""
    reason = skip_reason(name, dtype, device)
    if reason is None:
        return
    if name in REQUIRED_BACKENDS and backends.status(name) != "ok":
        pytest.fail(f"backend {name!r} is required (ASAG_REQUIRE_BACKENDS / GPU run) but unusable: {reason}")
    pytest.skip(f"backend {name!r} cannot run {dtype} on {device.type} here: {reason}")


@pytest.fixture(params=backends.BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (inputs are never fixed), printed by assertions that use it."""
    return random.SystemRandom().randrange(2**31)


def make_inputs(lead, nq, nk, d, dv, dtype, seed, layout="contiguous", device=DEVICE):
    """Random q [*lead, nq, d], k [*lead, nk, d], v [*lead, nk, dv], rounded to dtype.

    layout "transposed" hands out [B, N, H, D]-storage views transposed to [B, H, N, D] (what
    diffusers passes); "sliced" hands out views with a non-unit last-dim stride.
    """
    gen = torch.Generator().manual_seed(seed)

    def one(n, width):
        if layout == "transposed" and len(lead) >= 2:
            base = torch.randn(*lead[:-2], lead[-2], n, lead[-1], width, generator=gen)
            t = base.transpose(-3, -2)
        elif layout == "sliced":
            t = torch.randn(*lead, n, 2 * width, generator=gen)[..., ::2]
        else:
            t = torch.randn(*lead, n, width, generator=gen)
        return t.to(device=device, dtype=dtype)

    return one(nq, d), one(nk, d), one(nk, dv)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def pytest_report_header(config):
    lines = [f"asag_kernels device under test: {DEVICE}; required backends: {', '.join(REQUIRED_BACKENDS) or 'none'}"]
    lines += [f"  backend {name}: {why}" for name, why in backends.backend_status().items()]
    return lines


def assert_close_to_reference(got, ref, dtype, ctx=""):
    """(out, f, g) against the reference's (out, f, g) with SPEC §4's tolerances for `dtype`."""
    (out, f, g), (ref_out, ref_f, ref_g) = got, ref
    tol_out, tol_pot = TOLERANCES[dtype]
    pot = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.is_contiguous() and f.dtype == g.dtype == pot, ctx
    assert torch.isfinite(out).all() and torch.isfinite(f).all() and torch.isfinite(g).all(), ctx
    assert rel_err(out, ref_out) <= tol_out, f"out rel err {rel_err(out, ref_out):.3e} > {tol_out}: {ctx}"
    assert max_abs_err(f, ref_f) <= tol_pot, f"f err {max_abs_err(f, ref_f):.3e} > {tol_pot}: {ctx}"
    assert max_abs_err(g, ref_g) <= tol_pot, f"g err {max_abs_err(g, ref_g):.3e} > {tol_pot}: {ctx}"


def blocks_reference(q, k, v, bias_k, bias_q, *, cost_sign, scale, epsilon):
    """Float64 evaluation of the per-pass building blocks (issue 13), materialising the logits:
    (row_lse(bias_k), col_lse(bias_q), out, lse) of SPEC §3's L with the given bias vectors."""
    logits = cost_sign * scale * (q.double() @ k.double().transpose(-1, -2)) / epsilon
    rows = logits + bias_k.double().unsqueeze(-2)
    row = torch.logsumexp(rows, dim=-1)
    col = torch.logsumexp(logits + bias_q.double().unsqueeze(-1), dim=-2)
    plan = torch.exp(rows - row.masked_fill(row == -float("inf"), 0.0).unsqueeze(-1))
    return row, col, plan @ v.double(), row


def check_blocks(module, dtype, seed, *, layout="transposed", lead=(2, 3), nq=37, nk=29, d=16, dv=8):
    """A backend module's row_lse / col_lse / biased_attention against `blocks_reference`, with
    -inf bias entries (excluded keys and queries) and one fully excluded query row."""
    q, k, v = make_inputs(lead, nq, nk, d, dv, dtype, seed, layout)
    pot = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(*lead, nk, generator=gen, dtype=pot)
    f = torch.randn(*lead, nq, generator=gen, dtype=pot)
    g[..., 3] = -float("inf")
    f[..., 5] = -float("inf")
    kw = dict(cost_sign=-1.0, scale=0.3, epsilon=0.7)
    ref_row, ref_col, ref_out, ref_lse = blocks_reference(q, k, v, g, f, **kw)
    ctx = f"{module.__name__} dtype={dtype} seed={seed}"
    tol_out, tol_pot = TOLERANCES[dtype]
    row = module.row_lse(q, k, g, **kw)
    col = module.col_lse(q, k, f, **kw)
    out, lse = module.biased_attention(q, k, v, g, **kw)
    assert row.dtype == col.dtype == lse.dtype == pot and out.dtype == dtype and out.is_contiguous(), ctx
    assert row.shape == lse.shape == q.shape[:-1] and col.shape == k.shape[:-1] and out.shape == q.shape[:-1] + v.shape[-1:], ctx
    assert max_abs_err(row, ref_row) <= tol_pot, f"row_lse err {max_abs_err(row, ref_row):.3e}: {ctx}"
    assert max_abs_err(col, ref_col) <= tol_pot, f"col_lse err {max_abs_err(col, ref_col):.3e}: {ctx}"
    assert max_abs_err(lse, ref_lse) <= tol_pot, f"lse err {max_abs_err(lse, ref_lse):.3e}: {ctx}"
    assert rel_err(out, ref_out) <= tol_out, f"out rel err {rel_err(out, ref_out):.3e}: {ctx}"

    # Every key excluded for one (b, h): lse = -inf and out = 0 there, the other heads unaffected.
    g_none = g.clone()
    g_none[0, 0] = -float("inf")
    out2, lse2 = module.biased_attention(q, k, v, g_none, **kw)
    assert (lse2[0, 0] == -float("inf")).all() and (out2[0, 0] == 0).all(), ctx
    assert torch.equal(out2[1:], out[1:]) and torch.equal(lse2[1:], lse[1:]), ctx
    assert (module.row_lse(q, k, g_none, **kw)[0, 0] == -float("inf")).all(), ctx


# ---- per-test timeout ------------------------------------------------------------------------
# pytest-timeout is not a test dependency; this does its job for a hung interpreter, build or
# kernel: SIGALRM fails the test after ASAG_TEST_TIMEOUT_S seconds (default 1200, 0 = off), and if
# the process is stuck where Python cannot run the handler (inside C code), faulthandler dumps every
# thread's stack and exits 60 s later, so CI fails instead of stalling.

TEST_TIMEOUT_S = env_float("ASAG_TEST_TIMEOUT_S", 1200.0)


class PerTestTimeout(Exception):
    """A test ran past ASAG_TEST_TIMEOUT_S."""


def _timeout_usable(config) -> bool:
    return (
        TEST_TIMEOUT_S > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
        and not config.pluginmanager.hasplugin("timeout")
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _timeout_usable(item.config):
        yield
        return

    def on_alarm(signum, frame):
        raise PerTestTimeout(f"{item.nodeid} ran past ASAG_TEST_TIMEOUT_S={TEST_TIMEOUT_S:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S + 60, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)

"""Bounded property-based fuzz over shapes, dtypes and parameters against the float64 reference."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install asag-kernels[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from asag_kernels import backends, sinkhorn_attention  # noqa: E402
from conftest import DEVICE, TOLERANCES, max_abs_err, rel_err  # noqa: E402

# The Triton interpreter is too slow for a fuzz loop; the shared suite covers it.
FUZZED = [n for n in ("torch", "cpu", "cuda", "triton") if not (n == "triton" and DEVICE.type == "cpu")]


@pytest.mark.parametrize("backend", FUZZED)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    nq=st.integers(1, 70),
    nk=st.integers(1, 70),
    d=st.sampled_from([1, 3, 16, 40, 64]),
    dv=st.integers(1, 33),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    num_iters=st.integers(0, 5),
    cost=st.sampled_from(["adversarial", "standard"]),
    epsilon=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_reference(backend, lead, nq, nk, d, dv, dtype, num_iters, cost, epsilon, seed):
    if backends.unsupported_reason(backend, DEVICE, dtype) is not None:
        return  # this backend cannot take this dtype here; the shared suite reports such skips
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*lead, n, w, generator=gen).to(DEVICE, dtype) for n, w in ((nq, d), (nk, d), (nk, dv)))
    kw = dict(num_iters=num_iters, cost=cost, epsilon=epsilon)
    out, f, g = sinkhorn_attention(q, k, v, backend=backend, return_potentials=True, **kw)
    ref, rf, rg = sinkhorn_attention(q.double(), k.double(), v.double(), backend="reference", return_potentials=True, **kw)
    tol_out, tol_pot = TOLERANCES[dtype]
    assert rel_err(out, ref) <= tol_out
    assert max_abs_err(f, rf) <= tol_pot and max_abs_err(g, rg) <= tol_pot

"""The Triton compile sweep (benchmarks/triton_compile_sweep.py): compile-only evidence, no GPU.

The --ci subset compiles the Sinkhorn kernels for sm_80 and sm_90 with Triton's own ptxas and fails
on a compile error, a register spill in a choosable configuration, shared memory over the limit or
a scalar-load fallback at a SPEC head dim (a few minutes on two cores). The full sweep is opt-in:
``python benchmarks/triton_compile_sweep.py`` (see docs/PERF.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: benchmarks/ has a conftest.py of its own, and the tests' `from conftest
# import ...` (also in the processes tests spawn, which inherit sys.path) must find tests/conftest.py.
sys.path.append(os.path.join(REPO, "benchmarks"))

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None or
                                  importlib.util.find_spec("triton").origin is None,
                                  reason="Triton is not installed (the [triton] extra): nothing to compile")


def test_load_widths_reads_ptx():
    import triton_compile_sweep as sweep

    ptx = """
    cp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;
    cp.async.ca.shared.global [ %r4 + 0 ], [ %rd5 + 0 ], 0x4, %r6;
    @%p1 ld.global.L1::evict_last.v4.b32 { %r7, %r8, %r9, %r10 }, [ %rd11 + 0 ];
    ld.global.v2.b32 { %r12, %r13 }, [ %rd14 + 0 ];
    ld.global.b16 %rs1, [ %rd15 + 0 ];
    """
    assert sweep._load_widths(ptx) == {16: 2, 4: 1, 8: 1, 2: 1}


def test_problems_flag_each_rule():
    import triton_compile_sweep as sweep

    base = dict(ok=True, arch=90, dim=40, stack=0, shared=1024, loads16=10, loads8=2, loads_narrow=3)
    assert sweep.problems(base, (40, 64, 128)) == []
    assert "spills" in sweep.problems(dict(base, stack=8), (40,))[0]
    assert "shared memory" in sweep.problems(dict(base, shared=300 * 1024), (40,))[0]
    assert "scalar-load" in sweep.problems(dict(base, loads16=4, loads_narrow=96), (40,))[0]
    assert sweep.problems(dict(base, loads16=4, loads_narrow=96), (64,)) == []  # not a SPEC head dim here
    assert "compile failed" in sweep.problems(dict(ok=False, error="boom"), (40,))[0]


@needs_triton
def test_ci_plan_covers_the_spec_head_dims_on_both_archs():
    import triton_compile_sweep as sweep
    from asag_kernels._spec import SPEC_HEAD_DIMS

    jobs = sweep.plan(sweep.parse_args(["--ci"]))
    assert {(j["arch"], j["dim"]) for j in jobs if j["mode"] == "bf16"} == {(a, d) for a in (80, 90) for d in SPEC_HEAD_DIMS}
    # Head dim 256 in TF32: the pinned configuration of the potential pass and of biased_attention.
    wide = [j for j in jobs if j["mode"] != "bf16"]
    assert sorted((j["arch"], j["mode"], j["dim"], j["variant"], j["pinned"]) for j in wide) == \
        [(a, "tf32", 256, v, True) for a in (80, 90) for v in ("biased_attention", "potential_bias")]
    assert all(any(j["pinned"] and j["arch"] == a and j["dim"] == d and j["variant"] == v for j in jobs)
               for a in (80, 90) for d in SPEC_HEAD_DIMS for v in sweep.CI_VARIANTS)
    # At the widest SPEC head dim every candidate is compiled, not only the pinned one.
    widest = [j for j in jobs if j["dim"] == max(SPEC_HEAD_DIMS) and j["variant"] == "attention_bias" and j["arch"] == 90]
    assert len(widest) > 1


@needs_triton
@pytest.mark.slow
def test_compile_sweep_ci_passes(tmp_path):
    """sm_80 and sm_90: no compile failure, no spill, no scalar-load fallback (compile-only)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "triton_compile_sweep.py"), "--ci",
                           "--json", str(out)], capture_output=True, text=True, timeout=1800, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ok"] and r["stack"] == 0 for r in rows)
    assert {r["arch"] for r in rows} == {80, 90}
    assert "fp-fusion check sm_90" in done.stdout

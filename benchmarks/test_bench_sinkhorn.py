"""Time every (shape, backend) row of asag-bench with pytest-benchmark (its own timer: the point of
this suite); the row it records is the benchmarks' one row type (``BenchRow``), its error from the same
float64 oracle on heads {0, H-1} as the CLI."""

from __future__ import annotations

import pytest
import torch

from asag_kernels._spec import out_tolerance
from asag_kernels.benchmarking import core
from asag_kernels.benchmarking.measure import error_against, new_row


def test_attention_call(benchmark, bench_case, bench_config, bench_inputs, request):
    name, shape, backend, num_iters = bench_case
    heads, tokens, _ = shape
    cfg = bench_config
    need = core.materialised_bytes(heads, tokens, tokens, cfg.dtype)
    if backend == "naive" and need > cfg.mem_budget:
        pytest.skip(f"naive needs about {need / 2**20:,.0f} MiB for its [H, N, N] temporaries, over the budget")
    q, k, v = bench_inputs
    call = core.make_call(backend, q, k, v, num_iters)

    def timed_call():
        with torch.inference_mode():
            out = call()
        if cfg.device.type == "cuda":
            torch.cuda.synchronize(cfg.device)
        return out

    out = benchmark.pedantic(
        timed_call, rounds=request.config.getoption("asag_rounds"), warmup_rounds=cfg.warmup, iterations=1
    )
    assert out.shape == v.shape and out.dtype == cfg.dtype
    slice_heads = core.error_heads(heads)
    row = new_row(name, shape, backend, cfg.dtype, num_iters, out_heads=out[:, slice_heads])
    error_against(row, core.oracle_output(q, k, v, backend=backend, num_iters=num_iters, heads=slice_heads,
                                          mem_budget=cfg.mem_budget), slice_heads, out_tolerance(cfg.dtype))
    benchmark.extra_info.update({key: value for key, value in row.to_dict().items() if value is not None})
    # Naive computes in the input dtype and may exceed SPEC §4 in half precision; the kernels may not.
    if backend != "naive":
        assert row.within_tolerance, f"{name} {backend}: rel_err {row.rel_err:.2e}"

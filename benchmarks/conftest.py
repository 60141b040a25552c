"""pytest-benchmark suite options: which shapes, backends, dtype, device and num_iters to time.

    pytest benchmarks/ --benchmark-only                         # the asag-bench default rows
    pytest benchmarks/ --benchmark-only --asag-quick            # tiny shapes, seconds
    pytest benchmarks/ --benchmark-only --asag-shapes sdxl-mid --asag-backends sdpa,torch

Not part of the default test run (pyproject's testpaths is tests/). The parametrisation follows
`asag-bench` (`asag_kernels.benchmarking.cli`), so a row here is the row `asag-bench` prints for the same flags.
"""

from __future__ import annotations

import pytest

from asag_kernels.benchmarking import cli, core


def pytest_addoption(parser):
    group = parser.getgroup("asag", "asag_kernels benchmark rows")
    group.addoption("--asag-shapes", help="comma-separated shape names or HxNxD (default: asag-bench's)")
    group.addoption("--asag-backends", help="comma-separated backends and baselines (default: asag-bench's)")
    group.addoption("--asag-dtype", choices=tuple(core.DTYPES), help="default float32 on a CPU, bfloat16 on a GPU")
    group.addoption("--asag-device", help="cpu or cuda[:i] (default cuda when available)")
    group.addoption("--asag-iters", type=int, default=2, help="num_iters (default 2)")
    group.addoption("--asag-rounds", type=int, default=3, help="timed rounds per case (default 3)")
    group.addoption("--asag-quick", action="store_true", help="tiny shapes (seconds)")


def _bench_config(config) -> cli.Config:
    argv = []
    for option, flag in (("asag_shapes", "--shapes"), ("asag_backends", "--backends"),
                         ("asag_dtype", "--dtype"), ("asag_device", "--device")):
        value = config.getoption(option)
        if value:
            argv += [flag, value]
    if config.getoption("asag_quick"):
        argv.append("--quick")
    parser = cli.build_parser()
    return cli.resolve_config(parser.parse_args(argv), parser)


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    cfg = _bench_config(metafunc.config)
    num_iters = metafunc.config.getoption("asag_iters")
    cases, ids = [], []
    for name, shape in cfg.shapes:
        for backend in cfg.backends:
            cases.append((name, shape, backend, 0 if backend == "sdpa" else num_iters))
            ids.append(f"{name}-{backend}")
    metafunc.parametrize("bench_case", cases, ids=ids)
    metafunc.parametrize("bench_config", [cfg], ids=[str(cfg.dtype).replace("torch.", "")])


_inputs_cache: dict = {}


@pytest.fixture
def bench_inputs(bench_case, bench_config):
    """The shape's inputs, drawn once per session (the suite walks backends within a shape)."""
    name, shape, _, _ = bench_case
    key = (shape, bench_config.dtype, bench_config.device)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # keep one shape's inputs alive at a time
        _inputs_cache[key] = core.make_inputs(shape, bench_config.dtype, bench_config.device)
    return _inputs_cache[key]


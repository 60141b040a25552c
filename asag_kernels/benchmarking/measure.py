"""The one measurement every benchmark takes, and the one row type it fills.

``measure(backend, q, k, v, ...) -> BenchRow`` is what ``asag-bench`` (:mod:`.cli`, in-process or in a
row's subprocess), ``benchmarks/gpu_check.py`` and ``benchmarks/cpu_scaling.py`` (through the CLI's
run) call for one (shape, backend, num_iters):

1. one call of the same kind on tiny ``[1, 2, 64, D]`` inputs starts the libraries (thread pools, BLAS
   buffers, JIT caches), which are not the call's memory;
2. peak memory of one full-size call (the core's probe, output included) — before the warm-up by
   default; ``memory_after_warmup=True`` takes it after the warm-up and the timing instead (the GPU
   check: a first full-size call may autotune, and the autotuner's buffers are not the kernel's);
3. ``warmup`` untimed and ``repeat`` timed calls, SDPA's calls interleaved with them (load drift hits
   both alike); for ``backend="sdpa"`` SDPA alone;
4. one more call: its heads ``heads`` are ``out_heads`` (for the oracle check) and ``deterministic``
   says whether they equal the first call's bitwise.

The error against the float64 oracle is left to the caller (``error_against``), which shares one
oracle between the backends of a shape.

``BenchRow`` is a plain dataclass: ``to_dict()`` / ``from_dict()`` round-trip it through JSON
(``out_heads``, a tensor, is not serialised).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

import torch

from . import core

# The start-up call before the peak-memory probe runs on [1, 2, 64, D] inputs.
STARTUP_SHAPE = (2, 64)


@dataclass
class BenchRow:
    """One (shape, backend, num_iters) of a benchmark. ``None``: not measured (see ``skipped`` /
    ``error`` / ``not_run``)."""

    shape: str
    backend: str
    num_iters: int
    dtype: str = ""
    heads: int | None = None
    tokens: int | None = None
    head_dim: int | None = None
    passes: int | None = None
    median_ms: float | None = None
    vs_sdpa: float | None = None
    peak_mem_mib: float | None = None
    rel_err: float | None = None
    sdpa_median_ms: float | None = None
    times_ms: list[float] | None = None
    sdpa_times_ms: list[float] | None = None
    timing_method: str | None = None
    deterministic: bool | None = None
    within_tolerance: bool | None = None
    rel_err_heads: list[int] | None = None
    rel_err_oracle: str | None = None
    skipped: str | None = None
    error: str | None = None
    not_run: str | None = None
    out_heads: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def measured(self) -> bool:
        return self.median_ms is not None

    @property
    def extra_bytes(self) -> int | None:
        return None if self.peak_mem_mib is None else round(self.peak_mem_mib * 2**20)

    def to_dict(self) -> dict:
        """JSON-ready: every field but ``out_heads``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out_heads"}

    @classmethod
    def from_dict(cls, data: dict) -> "BenchRow":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def new_row(name: str, shape: tuple[int, int, int], backend: str, dtype: torch.dtype, num_iters: int,
            **values) -> BenchRow:
    """A row of ``shape = (H, N, D)`` named ``name``, nothing measured yet unless ``values`` say so."""
    heads, tokens, head_dim = shape
    return BenchRow(shape=name, backend=backend, num_iters=num_iters, dtype=str(dtype).replace("torch.", ""),
                    heads=heads, tokens=tokens, head_dim=head_dim, passes=core.logit_passes(backend, num_iters),
                    **values)


def measure(backend: str, q, k, v, *, num_iters: int, warmup: int, repeat: int, heads: list[int],
            name: str = "", memory_after_warmup: bool = False) -> BenchRow:
    """Time, peak memory and determinism of one backend on q, k, v ``[1, H, N, D]`` (module docstring)."""
    device = q.device
    index = torch.tensor(heads, device=device)
    call = core.make_call(backend, q, k, v, num_iters)
    sdpa = core.make_call("sdpa", q, k, v, num_iters)
    fns = [call] if backend == "sdpa" else [call, sdpa]
    with torch.inference_mode():
        small = core.make_inputs((STARTUP_SHAPE[0], STARTUP_SHAPE[1], q.shape[-1]), q.dtype, device)
        core.make_call(backend, *small, num_iters)()  # library start-up is not this call's memory
        del small
        if memory_after_warmup:
            stats = core.time_fns(fns, device=device, warmup=warmup, reps=repeat)
        with core.PeakMemory(device) as memory:
            out = call()
        first = out.index_select(1, index).cpu()
        del out
        if not memory_after_warmup:
            stats = core.time_fns(fns, device=device, warmup=max(0, warmup - 1), reps=repeat)
        last = call().index_select(1, index).cpu()
    median, sdpa_median = statistics.median(stats[0].times_ms), statistics.median(stats[-1].times_ms)
    return new_row(
        name, tuple(q.shape[1:]), backend, q.dtype, num_iters,
        median_ms=median, vs_sdpa=median / sdpa_median, sdpa_median_ms=sdpa_median, peak_mem_mib=memory.mib,
        times_ms=stats[0].times_ms, sdpa_times_ms=stats[-1].times_ms, timing_method=stats[0].method,
        deterministic=bool(torch.equal(first, last)) if bool(torch.isfinite(last).all()) else False,
        out_heads=last,
    )


def error_against(row: BenchRow, oracle: tuple[torch.Tensor, str], heads: list[int], tolerance: float) -> BenchRow:
    """Fill ``row``'s error fields from its ``out_heads`` and ``oracle = (out, name)`` (core.oracle_output)."""
    ref, oracle_name = oracle
    row.rel_err = core.relative_error(row.out_heads, ref)
    row.rel_err_heads, row.rel_err_oracle = list(heads), oracle_name
    row.within_tolerance = bool(row.rel_err <= tolerance)
    return row

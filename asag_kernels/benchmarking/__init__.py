"""Benchmark tooling: the core every benchmark uses (:mod:`.core`) and the ``asag-bench`` CLI (:mod:`.cli`).

Importing this package imports the core only; the CLI loads on use.
"""

from .core import (
    BASELINES,
    DTYPES,
    INPUT_SEED,
    PeakMemory,
    TimingStats,
    device_description,
    error_heads,
    free_memory_bytes,
    logit_passes,
    make_call,
    make_inputs,
    materialised_bytes,
    materialising_baseline,
    oracle_output,
    peak_memory,
    provenance,
    relative_error,
    sdpa_callable,
    time_fn,
    time_fns,
)

__all__ = [
    "BASELINES", "DTYPES", "INPUT_SEED", "PeakMemory", "TimingStats", "device_description", "error_heads",
    "free_memory_bytes", "logit_passes", "make_call", "make_inputs", "materialised_bytes", "materialising_baseline",
    "oracle_output", "peak_memory", "provenance", "relative_error", "sdpa_callable", "time_fn", "time_fns",
]

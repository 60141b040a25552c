"""Benchmark tooling: the core every benchmark uses (:mod:`.core`), the one measurement and its row type
(:mod:`.measure`: ``measure() -> BenchRow``), the output formatting (:mod:`.report`), the SPEC goals'
verdict (:mod:`.goals`) and the ``asag-bench`` CLI (:mod:`.cli`).

Importing this package imports the core and the measurement only; the CLI loads on use.
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
from .measure import BenchRow

__all__ = [
    "BASELINES", "BenchRow", "DTYPES", "INPUT_SEED", "PeakMemory", "TimingStats", "device_description", "error_heads",
    "free_memory_bytes", "logit_passes", "make_call", "make_inputs", "materialised_bytes", "materialising_baseline",
    "oracle_output", "peak_memory", "provenance", "relative_error", "sdpa_callable", "time_fn", "time_fns",
]

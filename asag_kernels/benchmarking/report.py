"""Output of the benchmarks, apart from measuring: the provenance record of a run, the table, the header,
CSV, the PNG plot, and the verdict against the SPEC goals (:mod:`.goals`). Rows are
:class:`~asag_kernels.benchmarking.measure.BenchRow`; JSON is ``row.to_dict()``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .. import backends
from . import core
from .measure import BenchRow


def report_provenance(cfg) -> dict:
    """core.provenance plus how ``cfg`` (a cli.Config) measured."""
    prov = core.provenance(cfg.device)
    timing = ("CUDA events around each call, L2 flushed before each" if cfg.device.type == "cuda"
              else "time.perf_counter around each call")
    prov.update({
        "repeat": cfg.repeat,
        "warmup": cfg.warmup,
        "cost": core.COST,
        "epsilon": core.EPSILON,
        "mem_budget_mib": round(cfg.mem_budget / 2**20),
        "timing_method": timing + "; SDPA's calls interleaved with the row's",
        "peak_mem_method": (
            core.PeakMemory(cfg.device).method + ", over the first call after a start-up call on tiny inputs"
            + (", each row in a fresh subprocess" if cfg.isolate else ", rows in one process")
        ),
        "backend_status": backends.backend_status(),
        "skipped_backends": cfg.skipped_backends,
    })
    return prov


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[BenchRow]) -> str:
    header = ("shape", "HxNxD", "backend", "dtype", "T", "passes", "median ms", "vs sdpa", "peak MiB", "rel err", "note")
    lines = []
    for r in results:
        if r.skipped:
            note = f"skipped: {r.skipped}"
        elif r.error:
            note = f"ERROR {r.error}"
        else:
            flags = []
            if r.within_tolerance is False:
                flags.append("rel_err over SPEC §4 tolerance")
            if not r.deterministic:
                flags.append("not bitwise deterministic")
            note = "; ".join(flags)
        lines.append((
            r.shape, f"{r.heads}x{r.tokens}x{r.head_dim}", r.backend, r.dtype, str(r.num_iters),
            str(r.passes), _fmt(r.median_ms, ",.2f"), _fmt(r.vs_sdpa, ".2f"),
            _fmt(r.peak_mem_mib, ",.1f"), _fmt(r.rel_err, ".1e"), note,
        ))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i]) for i in range(len(header))]
    right = {4, 5, 6, 7, 8, 9}

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])


def format_header(report: dict) -> str:
    prov = report["provenance"]
    lines = [
        f"asag-bench  asag_kernels {report['asag_kernels']}  torch {report['torch']}  triton {prov['triton']}  "
        f"python {prov['python']}  commit {prov['git_commit']}",
        f"device: {report['device']}",
        f"date:   {prov['utc']}   command: {prov['command']}",
        f"cost={prov['cost']} epsilon={prov['epsilon']} warmup={prov['warmup']} repeat={prov['repeat']} "
        f"(median of repeat; vs sdpa = time / sdpa time in the same process)",
        f"timing: {prov['timing_method']}",
        f"peak memory: {prov['peak_mem_method']}",
    ]
    for name, reason in prov["skipped_backends"].items():
        lines.append(f"not timed: {name}: {reason}")
    return "\n".join(lines)


CSV_COLUMNS = ["shape", "backend", "dtype", "num_iters", "median_ms", "vs_sdpa", "peak_mem_mib", "rel_err",
               "heads", "tokens", "head_dim", "passes", "sdpa_median_ms", "within_tolerance", "deterministic",
               "skipped", "error"]


def write_csv(path: Path, results: list[BenchRow]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            r = row.to_dict()
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in CSV_COLUMNS})


def write_plot(path: Path, results: list[BenchRow], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [r for r in results if r.median_ms is not None]
    labelled_shapes = set()
    for backend in dict.fromkeys((r.backend, r.num_iters) for r in measured):
        points = sorted((r.tokens, r.median_ms, r.shape) for r in measured if (r.backend, r.num_iters) == backend)
        label = backend[0] if backend[0] == "sdpa" else f"{backend[0]} (T={backend[1]})"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for n, ms, shape in points:
            if shape not in labelled_shapes:  # name each shape once, at its first backend's point
                labelled_shapes.add(shape)
                ax.annotate(shape, (n, ms), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N = Nq = Nk (tokens)")
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(f"{device}, {measured[0].dtype if measured else ''}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

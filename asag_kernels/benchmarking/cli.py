"""``asag-bench``: time every usable Sinkhorn-attention backend against SDPA on the SPEC §7 shapes.

Each row is one (shape, backend, num_iters) on inputs ``[1, H, N, D]`` drawn once per shape and
shared by every row. A row reports

- ``median_ms``: the median of ``--repeat`` timed calls after ``--warmup`` untimed ones (the core's
  timer: CUDA events with an L2 flush before each call on a GPU, ``perf_counter`` on a CPU);
- ``vs_sdpa``: ``median_ms`` over the median of ``scaled_dot_product_attention`` timed in the same
  process on the same inputs, its calls interleaved with the row's calls so that load drift hits
  both alike;
- ``peak_mem_mib``: memory the first call needs on top of its inputs (the core's probe). Before it,
  one call of the same kind on tiny inputs starts the libraries (thread pools, BLAS buffers), which
  are not the call's memory. On a CPU each row runs in a fresh subprocess (``--isolation``), so
  nothing another row allocated, and no allocator cache, hides or inflates it;
- ``rel_err``: ``‖out − ref‖_F / ‖ref‖_F`` on heads ``{0, H−1}`` of the full-size output against the
  float64 oracle on the same (already rounded) inputs of those heads (``--no-oracle`` skips it);
- ``passes``: passes over the Nq×Nk logits: ``2·num_iters + 1`` for Sinkhorn (SPEC §7), 1 for SDPA.

The ``naive`` baseline is the core's materialising Sinkhorn attention in the input dtype. It is
skipped, with the reason printed, when its ``[H, N, N]`` temporaries would not fit the memory budget
(``--mem-budget-mib``; default half of the memory free on the device).

Every bad option is an argparse error (exit status 2, the option named) raised before anything is
timed, output paths included.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, backends
from .._spec import ALL_SHAPES, CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES, SHAPES, out_tolerance
from . import core, goals

# "reference" is the error oracle, not a timed row.
TIMED_BACKENDS = tuple(name for name in backends.BACKENDS if name != "reference")
CHOICES = core.BASELINES + TIMED_BACKENDS
# Bounds that keep a typo from running for days or overflowing a count.
MAX_ITERS = 1000
MAX_CALLS = 10_000
MAX_DIM = 2**31 - 1
MAX_MEM_BUDGET_MIB = 2.0**30
# The start-up call before the peak-memory probe runs on [1, 2, 64, D] inputs.
STARTUP_SHAPE_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# Argument types: each raises ArgumentTypeError, which argparse reports naming the option (exit 2)


def _items(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return list(dict.fromkeys(items))


def _int_in(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}")
    return value


def _iters_list(text: str) -> list[int]:
    items = _items(text, f"integers in [0, {MAX_ITERS}]")
    return [_int_in(item, 0, MAX_ITERS) for item in items]


def parse_shape(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in ALL_SHAPES:
        return text, ALL_SHAPES[text]
    parts = text.lower().split("x")
    if len(parts) == 3 and all(p.isdigit() and 0 < int(p) <= MAX_DIM for p in parts):
        return text, tuple(int(p) for p in parts)
    raise argparse.ArgumentTypeError(
        f"unknown shape {text!r}: use one of {', '.join(ALL_SHAPES)} or HxNxD (e.g. 8x4096x40)"
    )


def _shapes_list(text: str) -> list[tuple[str, tuple[int, int, int]]]:
    return [parse_shape(item) for item in _items(text, "shape names or HxNxD")]


def _backends_list(text: str) -> list[str]:
    items = _items(text, f"backends from {', '.join(CHOICES)}")
    unknown = [b for b in items if b not in CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(CHOICES)}")
    return items


def _calls(text: str) -> int:
    return _int_in(text, 1, MAX_CALLS)


def _threads(text: str) -> int:
    # More threads than the machine has only slows OpenMP down (and very many crash it).
    return _int_in(text, 1, os.cpu_count() or 1)


def _mem_budget_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_MEM_BUDGET_MIB):
        raise argparse.ArgumentTypeError(f"expected a finite number of MiB in (0, {MAX_MEM_BUDGET_MIB:g}], got {text!r}")
    return value


def _output_path(text: str) -> Path:
    """A file this process can write, checked now so that no result is computed and then lost."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file path")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asag-bench",
        description="Benchmark Sinkhorn-attention backends against scaled_dot_product_attention (SPEC §7 shapes).",
    )
    parser.add_argument("--shapes", type=_shapes_list, help=(
        f"comma-separated shape names ({', '.join(ALL_SHAPES)}) or HxNxD; default: the SPEC §7 shapes "
        f"that fit the device ({', '.join(CPU_SHAPES)} on a CPU, all on a GPU)"))
    parser.add_argument("--iters", type=_iters_list, default=[2],
                        help=f"num_iters, comma-separated, each in [0, {MAX_ITERS}] (default 2)")
    parser.add_argument("--backends", type=_backends_list, help=(
        f"comma-separated from {', '.join(CHOICES)}; default: sdpa, naive and every "
        "backend usable for the device and dtype"))
    parser.add_argument("--dtype", choices=core.DTYPES, help="input dtype (default float32 on a CPU, bfloat16 on a GPU)")
    parser.add_argument("--device", help="cpu or cuda[:i] (default cuda when available)")
    parser.add_argument("--repeat", type=_calls, help=f"timed calls per row, 1..{MAX_CALLS} (default 3 on a CPU, 20 on a GPU)")
    parser.add_argument("--warmup", type=_calls, help=(
        f"untimed calls per row before timing, 1..{MAX_CALLS}; the first one measures peak memory "
        "(default 1 on a CPU, 3 on a GPU)"))
    parser.add_argument("--mem-budget-mib", type=_mem_budget_mib, help=(
        "memory the naive baseline and the float64 reference may materialise (default half the free memory)"))
    parser.add_argument("--threads", type=_threads,
                        help=f"torch CPU threads, 1..{os.cpu_count()} (this machine's cores; default torch's own choice)")
    parser.add_argument("--isolation", choices=("subprocess", "none"), help=(
        "subprocess: each row in a fresh process (default on a CPU: isolates its peak memory); none: every "
        "row in this process (default on a GPU, where the allocator's peak isolates it, and with --quick)"))
    parser.add_argument("--no-oracle", action="store_true", help=(
        "skip the float64 error check (rel_err empty): for shapes whose float64 oracle would take too long"))
    parser.add_argument("--quick", action="store_true", help=(
        "tiny shapes, 3 repeats, rows in this process (the CI smoke test); other flags still override"))
    parser.add_argument("--json", type=_output_path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", type=_output_path, metavar="PATH", help="write the results as CSV")
    parser.add_argument("--plot", type=_output_path, metavar="PATH",
                        help="write a PNG of time against N per backend (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--_row", help=argparse.SUPPRESS)
    return parser


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    shapes: list[tuple[str, tuple[int, int, int]]]
    iters: list[int]
    backends: list[str]
    skipped_backends: dict[str, str]
    repeat: int
    warmup: int
    mem_budget: int
    isolate: bool
    oracle: bool = True


def resolve_config(args, parser) -> Config:
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"argument --device: {exc}")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"argument --device: expected cpu or cuda[:i], got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device!r}, but this torch ({torch.__version__}) sees no CUDA device")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    dtype = core.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)

    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = [("tiny-96", QUICK_SHAPES["tiny-96"])]
    else:
        shapes = [(name, SHAPES[name]) for name in (GPU_SHAPES if on_gpu else CPU_SHAPES)]

    skipped: dict[str, str] = {}
    if args.backends:
        chosen = list(args.backends)
    else:
        chosen = list(CHOICES)
        if device.type == "cpu" and "triton" in chosen:
            # On a CPU Triton can only run through its interpreter: a correctness tool, far too slow to time.
            chosen.remove("triton")
            skipped["triton"] = "on a CPU it runs only through the Triton interpreter (name it in --backends to time it anyway)"
    max_head_dim = max(shape[2] for _, shape in shapes)
    backends_to_run = []
    for name in chosen:
        reason = None if name in core.BASELINES else backends.unsupported_reason(name, device, dtype, max_head_dim)
        if reason is None:
            backends_to_run.append(name)
        else:
            skipped[name] = reason
    if "sdpa" not in backends_to_run:
        backends_to_run.insert(0, "sdpa")  # every ratio needs it; it is timed in every row's process anyway

    repeat = args.repeat if args.repeat is not None else (3 if args.quick or not on_gpu else 20)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    isolation = args.isolation or ("none" if on_gpu or args.quick else "subprocess")
    if args.mem_budget_mib is not None:
        mem_budget = int(args.mem_budget_mib * 2**20)
    else:
        mem_budget = core.free_memory_bytes(device) // 2
    return Config(
        device=device, dtype=dtype, shapes=shapes, iters=args.iters, backends=backends_to_run,
        skipped_backends=skipped, repeat=repeat, warmup=warmup, mem_budget=mem_budget,
        isolate=isolation == "subprocess", oracle=not args.no_oracle,
    )


# ---------------------------------------------------------------------------------------------
# One row: timing and peak memory (in the row's own subprocess on a CPU, in-process on a GPU)


def measure_row(backend: str, q, k, v, *, num_iters: int, warmup: int, repeat: int, heads: list[int]) -> dict:
    """Peak memory of `backend`'s first call, then its calls timed interleaved with SDPA's."""
    device = q.device
    index = torch.tensor(heads, device=device)
    call = core.make_call(backend, q, k, v, num_iters)
    sdpa = core.make_call("sdpa", q, k, v, num_iters)
    with torch.inference_mode():
        small = core.make_inputs((2, STARTUP_SHAPE_TOKENS, q.shape[-1]), q.dtype, device)
        core.make_call(backend, *small, num_iters)()  # library start-up is not this call's memory
        del small
        with core.PeakMemory(device) as memory:
            out = call()
        first = out.index_select(1, index).cpu()
        del out
        fns = [call] if backend == "sdpa" else [call, sdpa]
        stats = core.time_fns(fns, device=device, warmup=max(0, warmup - 1), reps=repeat)
        last = call().index_select(1, index).cpu()
    return {
        "times_ms": stats[0].times_ms,
        "sdpa_times_ms": stats[-1].times_ms,
        "timing_method": stats[0].method,
        "peak_mem_mib": memory.mib,
        "out_heads": last,
        "deterministic": bool(torch.equal(first, last)) if bool(torch.isfinite(last).all()) else False,
    }


def _child_main(spec_path: str) -> int:
    """Subprocess entry: one row, inputs loaded from the parent's file, result written back."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    q, k, v = torch.load(spec["inputs"], weights_only=True)
    row = measure_row(
        spec["backend"], q, k, v,
        num_iters=spec["num_iters"], warmup=spec["warmup"], repeat=spec["repeat"], heads=spec["heads"],
    )
    torch.save(row.pop("out_heads"), spec["out_heads"])
    Path(spec["result"]).write_text(json.dumps(row))
    return 0


def measure_row_in_subprocess(backend, inputs_path, *, num_iters, warmup, repeat, heads, workdir) -> dict:
    tag = f"{backend}-{num_iters}"
    spec = {
        "backend": backend, "num_iters": num_iters, "warmup": warmup, "repeat": repeat, "heads": heads,
        "threads": torch.get_num_threads(), "inputs": str(inputs_path),
        "result": str(workdir / f"{tag}.json"), "out_heads": str(workdir / f"{tag}.pt"),
    }
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "asag_kernels.benchmarking.cli", "--_row", str(spec_path)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"row subprocess exited {proc.returncode}: " + " | ".join(tail))
    row = json.loads(Path(spec["result"]).read_text())
    row["out_heads"] = torch.load(spec["out_heads"], weights_only=True)
    return row


# ---------------------------------------------------------------------------------------------
# The run


class Progress:
    """A tqdm bar on stderr (``bar`` and tqdm installed), else one line per step on stderr; nothing
    when not ``enabled`` (--no-progress)."""

    def __init__(self, total: int, enabled: bool, bar: bool = True):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled and bar:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True)

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def result_row(name, shape, backend, dtype, num_iters, **values) -> dict:
    heads, tokens, head_dim = shape
    row = {
        "shape": name, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "num_iters": num_iters,
        "median_ms": None, "vs_sdpa": None, "peak_mem_mib": None, "rel_err": None,
        "heads": heads, "tokens": tokens, "head_dim": head_dim, "passes": core.logit_passes(backend, num_iters),
    }
    row.update(values)
    return row


def run_benchmark(cfg: Config, progress_enabled: bool, bar: bool = True) -> list[dict]:
    plans = [[(b, t) for b in cfg.backends for t in ([0] if b == "sdpa" else cfg.iters)] for _ in cfg.shapes]
    progress = Progress(sum(len(p) for p in plans), progress_enabled, bar=bar)
    results: list[dict] = []
    tolerance = out_tolerance(cfg.dtype)
    with tempfile.TemporaryDirectory(prefix="asag-bench-") as tmp:
        workdir = Path(tmp)
        for (name, shape), plan in zip(cfg.shapes, plans):
            heads, tokens, _ = shape
            q, k, v = core.make_inputs(shape, cfg.dtype, cfg.device)
            inputs_path = workdir / f"{name}.inputs.pt"
            if cfg.isolate:
                torch.save((q, k, v), inputs_path)
            slice_heads = core.error_heads(heads)
            oracles: dict[tuple[str, int], tuple[torch.Tensor, str]] = {}
            for backend, num_iters in plan:
                progress.start(f"{name} {backend} T={num_iters}")
                row_args = (name, shape, backend, cfg.dtype, num_iters)
                need = core.materialised_bytes(heads, tokens, tokens, cfg.dtype)
                if backend == "naive" and need > cfg.mem_budget:
                    reason = (f"its [H, N, N] temporaries need about {need / 2**20:,.1f} MiB, over the "
                              f"{cfg.mem_budget / 2**20:,.1f} MiB budget (--mem-budget-mib)")
                    results.append(result_row(*row_args, skipped=reason))
                    progress.advance()
                    continue
                oracle_key = ("sdpa", 0) if backend == "sdpa" else ("sinkhorn", num_iters)
                try:
                    if cfg.isolate:
                        measured = measure_row_in_subprocess(
                            backend, inputs_path, num_iters=num_iters, warmup=cfg.warmup, repeat=cfg.repeat,
                            heads=slice_heads, workdir=workdir,
                        )
                    else:
                        measured = measure_row(
                            backend, q, k, v, num_iters=num_iters, warmup=cfg.warmup, repeat=cfg.repeat,
                            heads=slice_heads,
                        )
                    if cfg.oracle and oracle_key not in oracles:
                        oracles[oracle_key] = core.oracle_output(
                            q, k, v, backend=backend, num_iters=num_iters, heads=slice_heads, mem_budget=cfg.mem_budget
                        )
                except Exception as exc:  # a broken backend is a row, not the end of the run
                    results.append(result_row(*row_args, error=f"{type(exc).__name__}: {exc}"))
                    progress.advance()
                    continue
                median = statistics.median(measured["times_ms"])
                sdpa_median = statistics.median(measured["sdpa_times_ms"])
                error: dict = {}
                if cfg.oracle:
                    ref, oracle_name = oracles[oracle_key]
                    rel_err = core.relative_error(measured["out_heads"], ref)
                    error = dict(rel_err=rel_err, rel_err_heads=slice_heads, rel_err_oracle=oracle_name,
                                 within_tolerance=bool(rel_err <= tolerance))
                results.append(result_row(
                    *row_args, median_ms=median, vs_sdpa=median / sdpa_median, peak_mem_mib=measured["peak_mem_mib"],
                    sdpa_median_ms=sdpa_median, times_ms=measured["times_ms"], deterministic=measured["deterministic"],
                    **error,
                ))
                progress.advance()
            del q, k, v, oracles
            inputs_path.unlink(missing_ok=True)
    progress.close()
    return results


def _command_line() -> str:
    prog = "asag-bench" if Path(sys.argv[0]).name == "asag-bench" else "python -m asag_kernels.bench"
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def report_provenance(cfg: Config) -> dict:
    prov = core.provenance(cfg.device)
    timing = ("CUDA events around each call, L2 flushed before each" if cfg.device.type == "cuda"
              else "time.perf_counter around each call")
    prov.update({
        "command": _command_line(),
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


def format_table(results: list[dict]) -> str:
    header = ("shape", "HxNxD", "backend", "dtype", "T", "passes", "median ms", "vs sdpa", "peak MiB", "rel err", "note")
    lines = []
    for r in results:
        if r.get("skipped"):
            note = f"skipped: {r['skipped']}"
        elif r.get("error"):
            note = f"ERROR {r['error']}"
        else:
            flags = []
            if r.get("within_tolerance") is False:
                flags.append("rel_err over SPEC §4 tolerance")
            if not r["deterministic"]:
                flags.append("not bitwise deterministic")
            note = "; ".join(flags)
        lines.append((
            r["shape"], f"{r['heads']}x{r['tokens']}x{r['head_dim']}", r["backend"], r["dtype"], str(r["num_iters"]),
            str(r["passes"]), _fmt(r["median_ms"], ",.2f"), _fmt(r["vs_sdpa"], ".2f"),
            _fmt(r["peak_mem_mib"], ",.1f"), _fmt(r["rel_err"], ".1e"), note,
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


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in CSV_COLUMNS})


def write_plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [r for r in report["results"] if r["median_ms"] is not None]
    labelled_shapes = set()
    for backend in dict.fromkeys((r["backend"], r["num_iters"]) for r in measured):
        points = sorted((r["tokens"], r["median_ms"], r["shape"]) for r in measured if (r["backend"], r["num_iters"]) == backend)
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
    ax.set_title(f"{report['device']}, {measured[0]['dtype'] if measured else ''}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._row:
        return _child_main(args._row)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("argument --plot: needs matplotlib: pip install 'asag-kernels[bench]' (or drop --plot)")
    cfg = resolve_config(args, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {
        "device": core.device_description(cfg.device),
        "torch": torch.__version__,
        "asag_kernels": __version__,
        "provenance": report_provenance(cfg),
        "results": [],
    }
    print(format_header(report), flush=True)
    wall = time.perf_counter()
    # The bar only where someone watches (a terminal); redirected, one line per row instead.
    report["results"] = run_benchmark(cfg, progress_enabled=not args.no_progress, bar=sys.stderr.isatty())
    report["provenance"]["wall_s"] = round(time.perf_counter() - wall, 1)

    print()
    print(format_table(report["results"]))
    print(f"\nrel err: on heads {{0, H-1}} against the float64 oracle (sdpa: float64 softmax attention); "
          f"passes: over the Nq x Nk logits. Wall time {report['provenance']['wall_s']} s.")
    verdict = goals.verdicts(report["results"], device_type=cfg.device.type, dtype=str(cfg.dtype).replace("torch.", ""))
    report["verdict"] = [v.to_dict() for v in verdict]
    print()
    print(goals.format_verdicts(verdict))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(args.csv, report["results"])
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(args.plot, report)
        print(f"wrote {args.plot}")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())

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
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, backends
from .._spec import ALL_SHAPES, CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES, SHAPES, out_tolerance
from . import core
from .goals import format_verdict, verdict
from .measure import BenchRow, error_against, measure, new_row
from .report import format_header, format_table, report_provenance, write_csv, write_plot

# "reference" is the error oracle, not a timed row.
TIMED_BACKENDS = tuple(name for name in backends.BACKENDS if name != "reference")
CHOICES = core.BASELINES + TIMED_BACKENDS
# Bounds that keep a typo from running for days or overflowing a count.
MAX_ITERS = 1000
MAX_CALLS = 10_000
MAX_DIM = 2**31 - 1
MAX_MEM_BUDGET_MIB = 2.0**30


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
    parser.add_argument("--no-progress", action="store_true", help=(
        "no progress bar on stderr (also off when stderr is not a terminal)"))
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
# One row in its own subprocess (on a CPU): the measurement itself is measure.measure


def _child_main(spec_path: str) -> int:
    """Subprocess entry: one row, inputs loaded from the parent's file, result written back."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    q, k, v = torch.load(spec["inputs"], weights_only=True)
    row = measure(
        spec["backend"], q, k, v,
        num_iters=spec["num_iters"], warmup=spec["warmup"], repeat=spec["repeat"], heads=spec["heads"],
        name=spec["name"],
    )
    torch.save(row.out_heads, spec["out_heads"])
    Path(spec["result"]).write_text(json.dumps(row.to_dict()))
    return 0


def measure_in_subprocess(backend, inputs_path, *, name, num_iters, warmup, repeat, heads, workdir) -> BenchRow:
    tag = f"{backend}-{num_iters}"
    spec = {
        "backend": backend, "name": name, "num_iters": num_iters, "warmup": warmup, "repeat": repeat,
        "heads": heads, "threads": torch.get_num_threads(), "inputs": str(inputs_path),
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
    row = BenchRow.from_dict(json.loads(Path(spec["result"]).read_text()))
    row.out_heads = torch.load(spec["out_heads"], weights_only=True)
    return row


# ---------------------------------------------------------------------------------------------
# The run


def progress_wanted(no_progress: bool, stream=None) -> bool:
    """A progress bar only for a person watching: not with --no-progress, not when stderr is a file or pipe."""
    stream = sys.stderr if stream is None else stream
    return not no_progress and bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """One progress bar per shape on stderr: tqdm when installed (the bench extra), else one line per row."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.tqdm = enabled, None, None
        self.label, self.done, self.total = "", 0, 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            self.tqdm = tqdm

    def shape(self, name: str, total: int) -> None:
        self.close()
        self.label, self.done, self.total = name, 0, total
        if self.enabled and self.tqdm is not None:
            # A terminal that reports no size (a pty without one) would get no bar from tqdm: 100x40 then.
            try:
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError, AttributeError):
                sized = False
            self.bar = self.tqdm(total=total, desc=name, file=sys.stderr, unit="row", dynamic_ncols=sized,
                                 ncols=None if sized else 100, nrows=None if sized else 40)

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            print(f"[{self.label} {self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_benchmark(cfg: Config, progress_enabled: bool) -> list[BenchRow]:
    plans = [[(b, t) for b in cfg.backends for t in ([0] if b == "sdpa" else cfg.iters)] for _ in cfg.shapes]
    progress = Progress(progress_enabled)
    results: list[BenchRow] = []
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
            progress.shape(name, len(plan))
            oracles: dict[tuple[str, int], tuple[torch.Tensor, str]] = {}
            for backend, num_iters in plan:
                progress.start(f"{backend} T={num_iters}")
                row_args = (name, shape, backend, cfg.dtype, num_iters)
                need = core.materialised_bytes(heads, tokens, tokens, cfg.dtype)
                if backend == "naive" and need > cfg.mem_budget:
                    reason = (f"its [H, N, N] temporaries need about {need / 2**20:,.1f} MiB, over the "
                              f"{cfg.mem_budget / 2**20:,.1f} MiB budget (--mem-budget-mib)")
                    results.append(new_row(*row_args, skipped=reason))
                    progress.advance()
                    continue
                oracle_key = ("sdpa", 0) if backend == "sdpa" else ("sinkhorn", num_iters)
                try:
                    if cfg.isolate:
                        row = measure_in_subprocess(
                            backend, inputs_path, name=name, num_iters=num_iters, warmup=cfg.warmup,
                            repeat=cfg.repeat, heads=slice_heads, workdir=workdir,
                        )
                    else:
                        row = measure(backend, q, k, v, num_iters=num_iters, warmup=cfg.warmup, repeat=cfg.repeat,
                                      heads=slice_heads, name=name)
                    if cfg.oracle and oracle_key not in oracles:
                        oracles[oracle_key] = core.oracle_output(
                            q, k, v, backend=backend, num_iters=num_iters, heads=slice_heads, mem_budget=cfg.mem_budget
                        )
                except Exception as exc:  # a broken backend is a row, not the end of the run
                    results.append(new_row(*row_args, error=f"{type(exc).__name__}: {exc}"))
                    progress.advance()
                    continue
                if cfg.oracle:
                    error_against(row, oracles[oracle_key], slice_heads, tolerance)
                row.out_heads = None
                results.append(row)
                progress.advance()
            del q, k, v, oracles
            inputs_path.unlink(missing_ok=True)
    progress.close()
    return results


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
    rows = run_benchmark(cfg, progress_enabled=progress_wanted(args.no_progress))
    report["results"] = [row.to_dict() for row in rows]
    report["provenance"]["wall_s"] = round(time.perf_counter() - wall, 1)

    print()
    print(format_table(rows))
    print(f"\nrel err: on heads {{0, H-1}} against the float64 oracle (sdpa: float64 softmax attention); "
          f"passes: over the Nq x Nk logits. Wall time {report['provenance']['wall_s']} s.")
    verdicts = verdict(rows, cfg.device.type)
    report["verdict"] = [dataclasses.asdict(v) for v in verdicts]
    print()
    print(format_verdict(verdicts), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(args.plot, rows, report["device"])
        print(f"wrote {args.plot}")
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

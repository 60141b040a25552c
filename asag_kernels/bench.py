"""``asag-bench``: time every usable Sinkhorn-attention backend against SDPA on the SPEC §7 shapes.

Each row is one (shape, backend, num_iters) on inputs ``[1, H, N, D]`` drawn once per shape and
shared by every row. A row reports

- ``median_ms``: the median of ``--repeat`` timed calls after ``--warmup`` untimed ones
  (CUDA events on a GPU, ``perf_counter`` on a CPU);
- ``vs_sdpa``: ``median_ms`` over the median of ``scaled_dot_product_attention`` timed in the same
  process on the same inputs, its calls interleaved with the row's calls so that load drift hits
  both alike;
- ``peak_mem_mib``: memory the call needs on top of its inputs. GPU: the caching allocator's peak
  over the first call. CPU: each row runs in a fresh subprocess that loads the inputs, returns freed
  heap to the OS (``malloc_trim``), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
  and reads ``VmHWM − VmRSS`` after the first call, so nothing another row allocated, and no
  allocator cache, hides or inflates it. It counts every allocation (C++ workspaces included),
  which ``tracemalloc`` and torch's CPU profiler would not;
- ``rel_err``: ``‖out − ref‖_F / ‖ref‖_F`` on heads ``{0, H−1}`` of the full-size output, where
  ``ref`` is the float64 oracle run on the same (already rounded) inputs of those heads. Heads are
  independent problems, so this is exact; rows of one head are coupled by the column updates, so
  a row slice would not be. The Sinkhorn oracle is ``backend="reference"`` (``"torch"`` in float64,
  which matches it to 1e-12, when the materialised logits would not fit); SDPA's oracle is the same
  op with ``num_iters=0, cost="standard"``, i.e. float64 softmax attention;
- ``passes``: passes over the Nq×Nk logits: ``2·num_iters + 1`` for Sinkhorn (SPEC §7), 1 for SDPA.

The ``naive`` baseline is the materialising Sinkhorn attention in the input dtype:

    L = −scale · q kᵀ / epsilon,   g = 0
    repeat num_iters times:  f = log(1/Nq) − LSE_j(L + g);  g = log(1/Nk) − LSE_i(L + f)
    out = softmax_j(L + g) · v

It is skipped, with the reason printed, when its ``[H, N, N]`` temporaries would not fit the memory
budget (``--mem-budget-mib``; default half of the memory free on the device).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import asag_kernels
from asag_kernels import backends, sinkhorn_attention

# name -> (heads, tokens Nq = Nk, head dim), batch 1 (SPEC §7)
SHAPES: dict[str, tuple[int, int, int]] = {
    "sd15-64": (8, 4096, 40),
    "sdxl-mid": (20, 1024, 64),
    "sdxl-64": (10, 4096, 64),
    "flux-1k": (24, 4608, 128),
    "video-32k": (12, 32760, 128),
}
CPU_SHAPES = ("sd15-64", "sdxl-mid", "sdxl-64")
GPU_SHAPES = tuple(SHAPES)
# --quick: tiny, odd-sized problems (tails of every tile loop) for the CI smoke test.
QUICK_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny-96": (3, 96, 16),
    "tiny-160": (2, 160, 32),
}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}

BASELINES = ("sdpa", "naive")
# "reference" is the error oracle, not a timed row.
TIMED_BACKENDS = tuple(name for name in backends.BACKENDS if name != "reference")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# SPEC §4: bound on ‖out − ref‖_F / ‖ref‖_F per input dtype.
REL_ERR_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

COST = "adversarial"
EPSILON = 1.0
INPUT_SEED = 20251125
# Materialising Sinkhorn peak, in [H, Nq, Nk] tensors: the logits, logits + bias, and the
# exp temporary inside logsumexp/softmax.
MATERIALISED_TEMPORARIES = 4


def logit_passes(backend: str, num_iters: int) -> int:
    return 1 if backend == "sdpa" else 2 * num_iters + 1


def naive_sinkhorn_attention(q, k, v, *, num_iters: int, scale: float, epsilon: float = EPSILON):
    """Materialising adversarial Sinkhorn attention in the input dtype (see the module docstring)."""
    nq, nk = q.shape[-2], k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * (-scale / epsilon)
    log_a, log_b = -math.log(nq), -math.log(nk)
    g = logits.new_zeros(logits.shape[:-2] + (nk,))
    for _ in range(num_iters):
        f = log_a - torch.logsumexp(logits + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(logits + f.unsqueeze(-1), dim=-2)
    return torch.matmul(torch.softmax(logits + g.unsqueeze(-2), dim=-1), v)


def materialised_bytes(heads: int, nq: int, nk: int, dtype: torch.dtype) -> int:
    return MATERIALISED_TEMPORARIES * heads * nq * nk * torch.finfo(dtype).bits // 8


def make_call(backend: str, q, k, v, num_iters: int):
    """A no-argument callable running one attention call of `backend` on these inputs."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "naive":
        return lambda: naive_sinkhorn_attention(q, k, v, num_iters=num_iters, scale=scale)
    return lambda: sinkhorn_attention(q, k, v, num_iters=num_iters, cost=COST, epsilon=EPSILON, backend=backend)


def make_inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, seed: int = INPUT_SEED):
    """q, k, v ``[1, H, N, D]``: standard normal, drawn in float32 on the CPU, rounded to dtype."""
    heads, tokens, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn((1, heads, tokens, head_dim), generator=gen).to(device=device, dtype=dtype) for _ in range(3)
    )


def error_heads(heads: int) -> list[int]:
    return [0] if heads == 1 else [0, heads - 1]


def oracle_output(q, k, v, *, backend: str, num_iters: int, heads: list[int], mem_budget: int):
    """float64 output of the op `backend` computes, on the given heads of the (rounded) inputs."""
    index = torch.tensor(heads, device=q.device)
    q64, k64, v64 = (t.index_select(1, index).double() for t in (q, k, v))
    fits = materialised_bytes(len(heads), q.shape[-2], k.shape[-2], torch.float64) <= mem_budget
    oracle = "reference" if fits else "torch"
    with torch.inference_mode():
        if backend == "sdpa":
            out = sinkhorn_attention(q64, k64, v64, num_iters=0, cost="standard", epsilon=1.0, backend=oracle)
            return out, f"float64 softmax ({oracle})"
        out = sinkhorn_attention(q64, k64, v64, num_iters=num_iters, cost=COST, epsilon=EPSILON, backend=oracle)
    return out, f"float64 sinkhorn ({oracle})"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().to(ref.device), ref
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64))


# ---------------------------------------------------------------------------------------------
# Timing and peak memory of one row (runs in the row's own subprocess on a CPU, in-process on a GPU)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn, device: torch.device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Memory one call needs beyond what was allocated before it (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
            self.peak_was_reset = True
        except OSError:
            self.peak_was_reset = False
        self.base = _proc_status_kib("VmRSS")
        self.peak_before = _proc_status_kib("VmHWM")
        return self

    def __exit__(self, *exc):
        self.mib = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
            return False
        peak = _proc_status_kib("VmHWM")
        if self.base is None or peak is None:
            return False
        # Without a reset, VmHWM may still hold an earlier (e.g. import-time) peak: only a rise is a measurement.
        if self.peak_was_reset or peak > self.peak_before:
            self.mib = max(0, peak - self.base) / 1024
        return False


def measure_row(backend: str, q, k, v, *, num_iters: int, warmup: int, repeat: int, heads: list[int]) -> dict:
    """Time `backend` and sdpa interleaved on the same inputs; peak memory of `backend`'s first call."""
    device = q.device
    index = torch.tensor(heads, device=device)
    call = make_call(backend, q, k, v, num_iters)
    sdpa = make_call("sdpa", q, k, v, num_iters)
    with torch.inference_mode():
        with PeakMemory(device) as memory:
            out = call()
        first = out.index_select(1, index).cpu()
        del out
        for _ in range(max(0, warmup - 1)):
            call()
        if backend != "sdpa":
            for _ in range(warmup):
                sdpa()
        times, sdpa_times = [], []
        for _ in range(repeat):
            out, ms = _timed_ms(call, device)
            times.append(ms)
            if backend != "sdpa":
                sdpa_times.append(_timed_ms(sdpa, device)[1])
        last = out.index_select(1, index).cpu()
    return {
        "times_ms": times,
        "sdpa_times_ms": sdpa_times or times,
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
        [sys.executable, "-m", "asag_kernels.bench", "--_row", str(spec_path)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"row subprocess exited {proc.returncode}: " + " | ".join(tail))
    row = json.loads(Path(spec["result"]).read_text())
    row["out_heads"] = torch.load(spec["out_heads"], weights_only=True)
    return row


# ---------------------------------------------------------------------------------------------
# Command line


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command_line() -> str:
    prog = "asag-bench" if Path(sys.argv[0]).name == "asag-bench" else "python -m asag_kernels.bench"
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def _parse_shape(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in ALL_SHAPES:
        return text, ALL_SHAPES[text]
    parts = text.lower().split("x")
    if len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts):
        return text, tuple(int(p) for p in parts)
    raise argparse.ArgumentTypeError(
        f"unknown shape {text!r}: use one of {', '.join(ALL_SHAPES)} or HxNxD (e.g. 8x4096x40)"
    )


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asag-bench",
        description="Benchmark Sinkhorn-attention backends against scaled_dot_product_attention (SPEC §7 shapes).",
    )
    parser.add_argument("--shapes", type=_comma_list, help=(
        f"comma-separated shape names ({', '.join(ALL_SHAPES)}) or HxNxD; default: the SPEC §7 shapes "
        f"that fit the device ({', '.join(CPU_SHAPES)} on a CPU, all on a GPU)"))
    parser.add_argument("--iters", type=_comma_list, default=["2"], help="num_iters, comma-separated (default 2)")
    parser.add_argument("--backends", type=_comma_list, help=(
        f"comma-separated from {', '.join(BASELINES + TIMED_BACKENDS)}; default: sdpa, naive and every "
        "backend usable for the device and dtype"))
    parser.add_argument("--dtype", choices=DTYPES, help="input dtype (default float32 on a CPU, bfloat16 on a GPU)")
    parser.add_argument("--device", help="cpu or cuda[:i] (default cuda when available)")
    parser.add_argument("--repeat", type=int, help="timed calls per row (default 3 on a CPU, 20 on a GPU)")
    parser.add_argument("--warmup", type=int, help=(
        "untimed calls per row before timing, >= 1; the first one measures peak memory (default 1 on a CPU, 3 on a GPU)"))
    parser.add_argument("--mem-budget-mib", type=float, help=(
        "memory the naive baseline and the float64 reference may materialise (default half the free memory)"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's own choice)")
    parser.add_argument("--isolation", choices=("subprocess", "none"), help=(
        "subprocess: each row in a fresh process (default on a CPU: isolates its peak memory); none: every "
        "row in this process (default on a GPU, where the allocator's peak isolates it, and with --quick)"))
    parser.add_argument("--quick", action="store_true", help=(
        "tiny shapes, 3 repeats, rows in this process (the CI smoke test); other flags still override"))
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="write the results as CSV")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of time against N per backend (needs matplotlib)")
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


def resolve_config(args, parser) -> Config:
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"--device: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)

    if args.shapes:
        try:
            shapes = [_parse_shape(s) for s in args.shapes]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--shapes: {exc}")
    elif args.quick:
        shapes = [("tiny-96", QUICK_SHAPES["tiny-96"])]
    else:
        shapes = [(name, SHAPES[name]) for name in (GPU_SHAPES if on_gpu else CPU_SHAPES)]

    try:
        iters = [int(t) for t in args.iters]
    except ValueError:
        parser.error(f"--iters takes comma-separated ints >= 0, got {','.join(args.iters)!r}")
    if any(t < 0 for t in iters):
        parser.error(f"--iters must be >= 0, got {iters}")

    skipped: dict[str, str] = {}
    if args.backends:
        unknown = [b for b in args.backends if b not in BASELINES + TIMED_BACKENDS]
        if unknown:
            parser.error(f"--backends: unknown {unknown}; choose from {', '.join(BASELINES + TIMED_BACKENDS)}")
        chosen = list(dict.fromkeys(args.backends))
    else:
        chosen = list(BASELINES + TIMED_BACKENDS)
        if device.type == "cpu" and "triton" in chosen:
            # On a CPU Triton can only run through its interpreter: a correctness tool, far too slow to time.
            chosen.remove("triton")
            skipped["triton"] = "on a CPU it runs only through the Triton interpreter (name it in --backends to time it anyway)"
    backends_to_run = []
    for name in chosen:
        reason = None if name in BASELINES else backends.unsupported_reason(name, device, dtype)
        if reason is None:
            backends_to_run.append(name)
        else:
            skipped[name] = reason
    if "sdpa" not in backends_to_run:
        backends_to_run.insert(0, "sdpa")  # every ratio needs it; it is timed in every row's process anyway

    repeat = args.repeat if args.repeat is not None else (3 if args.quick or not on_gpu else 20)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    if repeat < 1:
        parser.error(f"--repeat must be >= 1, got {repeat}")
    if warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first call measures peak memory), got {warmup}")
    isolation = args.isolation or ("none" if on_gpu or args.quick else "subprocess")
    if args.mem_budget_mib is not None:
        if args.mem_budget_mib <= 0:
            parser.error(f"--mem-budget-mib must be > 0, got {args.mem_budget_mib}")
        mem_budget = int(args.mem_budget_mib * 2**20)
    else:
        mem_budget = _free_memory_bytes(device) // 2
    return Config(
        device=device, dtype=dtype, shapes=shapes, iters=iters, backends=backends_to_run,
        skipped_backends=skipped, repeat=repeat, warmup=warmup, mem_budget=mem_budget,
        isolate=isolation == "subprocess",
    )


class Progress:
    """tqdm on stderr when installed, else one line per step."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled:
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


def _result_row(name, shape, backend, dtype, num_iters, **values) -> dict:
    heads, tokens, head_dim = shape
    row = {
        "shape": name, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "num_iters": num_iters,
        "median_ms": None, "vs_sdpa": None, "peak_mem_mib": None, "rel_err": None,
        "heads": heads, "tokens": tokens, "head_dim": head_dim, "passes": logit_passes(backend, num_iters),
    }
    row.update(values)
    return row


def run_benchmark(cfg: Config, progress_enabled: bool) -> list[dict]:
    rows_per_shape = [
        [(b, 0 if b == "sdpa" else t) for b in cfg.backends for t in (cfg.iters if b != "sdpa" else [0])]
        for _ in cfg.shapes
    ]
    progress = Progress(sum(len(r) for r in rows_per_shape), progress_enabled)
    results: list[dict] = []
    tolerance = REL_ERR_TOLERANCE[cfg.dtype]
    with tempfile.TemporaryDirectory(prefix="asag-bench-") as tmp:
        workdir = Path(tmp)
        for (name, shape), plan in zip(cfg.shapes, rows_per_shape):
            heads, tokens, _ = shape
            q, k, v = make_inputs(shape, cfg.dtype, cfg.device)
            inputs_path = workdir / f"{name}.inputs.pt"
            if cfg.isolate:
                torch.save((q, k, v), inputs_path)
            slice_heads = error_heads(heads)
            oracles: dict[tuple[str, int], tuple[torch.Tensor, str]] = {}
            for backend, num_iters in plan:
                progress.start(f"{name} {backend} T={num_iters}")
                row_args = (name, shape, backend, cfg.dtype, num_iters)
                need = materialised_bytes(heads, tokens, tokens, cfg.dtype)
                if backend == "naive" and need > cfg.mem_budget:
                    reason = (f"its [H, N, N] temporaries need about {need / 2**20:,.1f} MiB, over the "
                              f"{cfg.mem_budget / 2**20:,.1f} MiB budget (--mem-budget-mib)")
                    results.append(_result_row(*row_args, skipped=reason))
                    progress.advance()
                    continue
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
                    oracle_key = ("sdpa", 0) if backend == "sdpa" else ("sinkhorn", num_iters)
                    if oracle_key not in oracles:
                        oracles[oracle_key] = oracle_output(
                            q, k, v, backend=backend, num_iters=num_iters, heads=slice_heads, mem_budget=cfg.mem_budget
                        )
                except Exception as exc:  # a broken backend is a row, not the end of the run
                    results.append(_result_row(*row_args, error=f"{type(exc).__name__}: {exc}"))
                    progress.advance()
                    continue
                ref, oracle_name = oracles[oracle_key]
                median = statistics.median(measured["times_ms"])
                sdpa_median = statistics.median(measured["sdpa_times_ms"])
                rel_err = relative_error(measured["out_heads"], ref)
                results.append(_result_row(
                    *row_args,
                    median_ms=median,
                    vs_sdpa=median / sdpa_median,
                    peak_mem_mib=measured["peak_mem_mib"],
                    rel_err=rel_err,
                    sdpa_median_ms=sdpa_median,
                    times_ms=measured["times_ms"],
                    rel_err_heads=slice_heads,
                    rel_err_oracle=oracle_name,
                    within_tolerance=bool(rel_err <= tolerance),
                    deterministic=measured["deterministic"],
                ))
                progress.advance()
            del q, k, v, oracles
            inputs_path.unlink(missing_ok=True)
    progress.close()
    return results


def provenance(cfg: Config, started: datetime.datetime) -> dict:
    return {
        "command": _command_line(),
        "utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "python": platform.python_version(),
        "triton": _package_version("triton"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "repeat": cfg.repeat,
        "warmup": cfg.warmup,
        "cost": COST,
        "epsilon": EPSILON,
        "mem_budget_mib": round(cfg.mem_budget / 2**20),
        "peak_mem_method": (
            ("CUDA allocator peak over the first call" if cfg.device.type == "cuda"
             else "VmHWM - VmRSS over the first call after malloc_trim and clear_refs")
            + (", each row in a fresh subprocess" if cfg.isolate else ", rows in one process")
        ),
        "backend_status": backends.backend_status(),
        "skipped_backends": cfg.skipped_backends,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    header = ("shape", "HxNxD", "backend", "dtype", "T", "passes", "median ms", "vs sdpa", "peak MiB", "rel err", "note")
    lines = []
    for r in results:
        note = r.get("skipped") or r.get("error") and f"ERROR {r['error']}" or ""
        if not note:
            flags = []
            if not r["within_tolerance"]:
                flags.append("rel_err over SPEC §4 tolerance")
            if not r["deterministic"]:
                flags.append("not bitwise deterministic")
            note = "; ".join(flags)
        if r.get("skipped"):
            note = f"skipped: {note}"
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
        f"python {prov['python']}",
        f"device: {report['device']}",
        f"date:   {prov['utc']}   command: {prov['command']}",
        f"cost={prov['cost']} epsilon={prov['epsilon']} warmup={prov['warmup']} repeat={prov['repeat']} "
        f"(median of repeat; vs sdpa = time / sdpa time in the same process)",
        f"peak memory: {prov['peak_mem_method']}",
    ]
    for name, reason in prov["skipped_backends"].items():
        lines.append(f"not timed: {name}: {reason}")
    return "\n".join(lines)


def write_csv(path: Path, results: list[dict]) -> None:
    columns = ["shape", "backend", "dtype", "num_iters", "median_ms", "vs_sdpa", "peak_mem_mib", "rel_err",
               "heads", "tokens", "head_dim", "passes", "sdpa_median_ms", "within_tolerance", "deterministic",
               "skipped", "error"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})


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
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'asag-kernels[bench]' (or drop --plot)")
    cfg = resolve_config(args, parser)
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "device": _device_description(cfg.device),
        "torch": torch.__version__,
        "asag_kernels": asag_kernels.__version__,
        "provenance": provenance(cfg, started),
        "results": [],
    }
    print(format_header(report), flush=True)
    wall = time.perf_counter()
    report["results"] = run_benchmark(cfg, progress_enabled=not args.no_progress)
    report["provenance"]["wall_s"] = round(time.perf_counter() - wall, 1)

    print()
    print(format_table(report["results"]))
    print(f"\nrel err: on heads {{0, H-1}} against the float64 oracle (sdpa: float64 softmax attention); "
          f"passes: over the Nq x Nk logits. Wall time {report['provenance']['wall_s']} s.")
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

"""The benchmark core: one timer, one peak-memory probe, one materialising baseline, one way to draw
inputs, one float64 oracle and one provenance record, shared by ``asag-bench``,
``benchmarks/gpu_check.py``, ``benchmarks/cpu_scaling.py``, the pytest-benchmark suite and
``benchmarks/distributed_bench.py``.

Public API (stable; import it from :mod:`asag_kernels.benchmarking`):

- ``time_fn(fn, *, device, warmup=1, reps=3, flush_l2=None) -> TimingStats``: ``warmup`` untimed
  calls, then ``reps`` timed ones. CUDA: one pair of CUDA events around each call and, by default, a
  256 MiB buffer zeroed before each call so that no call finds its inputs in L2 (the
  ``triton.testing.do_bench`` method); CPU: ``time.perf_counter`` around each (synchronous) call.
  ``time_fns([fn_a, fn_b], ...)`` interleaves the calls (a, b, a, b, ...) so that load drift on a
  shared machine hits every function alike, and returns one ``TimingStats`` per function.
- ``peak_memory(fn, device) -> int | None``: bytes ``fn()`` needs beyond what was allocated before
  it. CUDA: the caching allocator's peak minus its allocation before the call. CPU (Linux): the
  process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) minus its
  RSS before the call, so C++ workspaces count too; ``None`` where that cannot be measured.
  ``PeakMemory`` is the same probe as a context manager.
- ``materialising_baseline(q, k, v, *, num_iters, scale=None, epsilon=1.0, cost="adversarial")``:
  Sinkhorn attention (SPEC §3) computed the obvious way, with the whole ``[..., Nq, Nk]`` logits,
  in the input dtype; ``materialised_bytes`` is what its temporaries take.
- ``make_inputs(shape, dtype, device, seed=INPUT_SEED) -> (q, k, v)``: ``[1, H, N, D]`` standard
  normal, drawn in float32 on the CPU (the same numbers on every device), then rounded to ``dtype``.
- ``provenance(device=None) -> dict``: machine, device, Python/torch/Triton/asag_kernels versions,
  git commit of the checkout, UTC time, command line, thread count.

And the pieces the reports are built from: ``make_call`` (one attention call of a backend or of a
baseline: ``"sdpa"``, ``"naive"``), ``oracle_output`` / ``relative_error`` / ``error_heads`` (error
against the float64 oracle on heads {0, H-1}), ``logit_passes``, ``device_description``,
``free_memory_bytes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import sinkhorn_attention
from .._spec import ALL_SHAPES

INPUT_SEED = 20251125
COST = "adversarial"
EPSILON = 1.0
BASELINES: tuple[str, ...] = ("sdpa", "naive")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
# Materialising Sinkhorn peak, in [H, Nq, Nk] tensors: the logits, logits + bias, and the exp
# temporary inside logsumexp/softmax, plus the softmax result.
MATERIALISED_TEMPORARIES = 4
# do_bench's L2 flush: larger than the L2 of any current GPU (H100: 50 MB, B200: 126 MB).
L2_FLUSH_BYTES = 256 * 2**20

Shape = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Inputs, calls, the float64 oracle


def make_inputs(shape: Shape | str, dtype: torch.dtype, device, seed: int = INPUT_SEED):
    """q, k, v ``[1, H, N, D]`` for ``shape = (H, N, D)`` (or a SPEC/quick shape name)."""
    heads, tokens, head_dim = ALL_SHAPES[shape] if isinstance(shape, str) else shape
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn((1, heads, tokens, head_dim), generator=gen).to(device=device, dtype=dtype) for _ in range(3)
    )


def logit_passes(backend: str, num_iters: int) -> int:
    """Passes over the Nq×Nk logits: 2T + 1 for Sinkhorn attention (SPEC §7), 1 for SDPA."""
    return 1 if backend == "sdpa" else 2 * num_iters + 1


def materialising_baseline(q, k, v, *, num_iters: int, scale: float | None = None, epsilon: float = EPSILON,
                           cost: str = COST):
    """Sinkhorn attention with materialised ``[..., Nq, Nk]`` logits, in the input dtype.

    q ``[..., Nq, D]``, k ``[..., Nk, D]``, v ``[..., Nk, Dv]`` -> ``[..., Nq, Dv]`` (SPEC §3)::

        L = sigma · scale · q kᵀ / epsilon,   g = 0
        repeat num_iters times:  f = log(1/Nq) − LSE_j(L + g);  g = log(1/Nk) − LSE_i(L + f)
        out = softmax_j(L + g) · v
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sigma = -1.0 if cost == "adversarial" else 1.0
    nq, nk = q.shape[-2], k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * (sigma * scale / epsilon)
    log_a, log_b = -math.log(nq), -math.log(nk)
    g = logits.new_zeros(logits.shape[:-2] + (nk,))
    for _ in range(num_iters):
        f = log_a - torch.logsumexp(logits + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(logits + f.unsqueeze(-1), dim=-2)
    return torch.matmul(torch.softmax(logits + g.unsqueeze(-2), dim=-1), v)


def materialised_bytes(heads: int, nq: int, nk: int, dtype: torch.dtype) -> int:
    """Peak bytes of ``materialising_baseline``'s temporaries for ``heads`` problems of Nq×Nk."""
    return MATERIALISED_TEMPORARIES * heads * nq * nk * torch.finfo(dtype).bits // 8


def sdpa_callable(q, k, v, *, scale: float | None = None) -> Callable[[], torch.Tensor]:
    """``scaled_dot_product_attention`` on these inputs; on CUDA the flash kernel (the one-pass floor
    the SPEC's speed goals compare against) where it takes them, else torch's own choice."""
    def default():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    if q.device.type != "cuda":
        return default
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    try:
        with torch.inference_mode():
            flash()
    except RuntimeError:
        return default
    return flash


def make_call(backend: str, q, k, v, num_iters: int, *, cost: str = COST, epsilon: float = EPSILON):
    """A no-argument callable running one attention call: a Sinkhorn backend, ``"sdpa"`` or ``"naive"``
    (the materialising baseline)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "sdpa":
        return sdpa_callable(q, k, v, scale=scale)
    if backend == "naive":
        return lambda: materialising_baseline(q, k, v, num_iters=num_iters, scale=scale, epsilon=epsilon, cost=cost)
    return lambda: sinkhorn_attention(q, k, v, num_iters=num_iters, cost=cost, epsilon=epsilon, backend=backend)


def error_heads(heads: int) -> list[int]:
    """The heads the error is measured on: {0, H-1} (heads are independent problems)."""
    return [0] if heads == 1 else [0, heads - 1]


def oracle_output(q, k, v, *, backend: str, num_iters: int, heads: list[int], mem_budget: int,
                  cost: str = COST, epsilon: float = EPSILON):
    """float64 output of the op `backend` computes, on the given heads of the (rounded) inputs.

    Returns ``(out [1, len(heads), Nq, Dv], name)``. The oracle is ``backend="reference"``, or the
    float64 ``"torch"`` backend (equal to it within 1e-12) where the materialised logits of those
    heads would not fit ``mem_budget`` bytes; for ``"sdpa"`` it is float64 softmax attention.
    """
    index = torch.tensor(heads, device=q.device)
    q64, k64, v64 = (t.index_select(1, index).double() for t in (q, k, v))
    fits = materialised_bytes(len(heads), q.shape[-2], k.shape[-2], torch.float64) <= mem_budget
    oracle = "reference" if fits else "torch"
    with torch.inference_mode():
        if backend == "sdpa":
            out = sinkhorn_attention(q64, k64, v64, num_iters=0, cost="standard", epsilon=1.0, backend=oracle)
            return out, f"float64 softmax ({oracle})"
        out = sinkhorn_attention(q64, k64, v64, num_iters=num_iters, cost=cost, epsilon=epsilon, backend=oracle)
    return out, f"float64 sinkhorn ({oracle})"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖_F / ‖ref‖_F`` in float64."""
    out64 = out.double().to(ref.device)
    return float(torch.linalg.vector_norm(out64 - ref) / torch.linalg.vector_norm(ref))


# ---------------------------------------------------------------------------------------------
# The timer


@dataclass
class TimingStats:
    """Per-call times of one function, in milliseconds."""

    times_ms: list[float] = field(default_factory=list)
    method: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "mean_ms": self.mean_ms, "min_ms": self.min_ms,
                "max_ms": self.max_ms, "times_ms": list(self.times_ms), "method": self.method}


def _as_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def time_fns(fns: Sequence[Callable[[], object]], *, device, warmup: int = 1, reps: int = 3,
             flush_l2: bool | None = None) -> list[TimingStats]:
    """Time several functions, their calls interleaved (see the module docstring)."""
    device = _as_device(device)
    if warmup < 0 or reps < 1:
        raise ValueError(f"time_fns needs warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}")
    cuda = device.type == "cuda"
    flush_l2 = cuda if flush_l2 is None else (flush_l2 and cuda)
    for _ in range(warmup):
        for fn in fns:
            fn()
    if not cuda:
        stats = [TimingStats(method="time.perf_counter around each call") for _ in fns]
        for _ in range(reps):
            for fn, st in zip(fns, stats):
                t0 = time.perf_counter()
                fn()
                st.times_ms.append((time.perf_counter() - t0) * 1e3)
        return stats
    with torch.cuda.device(device):
        cache = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
                  for _ in fns]
        torch.cuda.synchronize(device)
        for rep in range(reps):
            for fn, fn_events in zip(fns, events):
                if cache is not None:
                    cache.zero_()
                start, end = fn_events[rep]
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize(device)
    method = "CUDA events around each call" + (f", L2 flushed ({L2_FLUSH_BYTES >> 20} MiB zeroed) before each" if flush_l2 else "")
    return [TimingStats([s.elapsed_time(e) for s, e in fn_events], method) for fn_events in events]


def time_fn(fn: Callable[[], object], *, device, warmup: int = 1, reps: int = 3,
            flush_l2: bool | None = None) -> TimingStats:
    """Time one function (see the module docstring)."""
    return time_fns([fn], device=device, warmup=warmup, reps=reps, flush_l2=flush_l2)[0]


# ---------------------------------------------------------------------------------------------
# The peak-memory probe


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Context manager: ``.bytes`` is the memory the body needed beyond what was allocated before it
    (``None`` where it cannot be measured); see the module docstring for the method."""

    def __init__(self, device):
        self.device = _as_device(device)
        self.bytes: int | None = None

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "CUDA caching allocator: max_memory_allocated - memory_allocated before"
        return "VmHWM - VmRSS before, after malloc_trim and a peak reset through /proc/self/clear_refs"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: it must not hide the peak
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
            self._reset = True
        except OSError:
            self._reset = False
        self._base = _proc_status_kib("VmRSS")
        self._peak_before = _proc_status_kib("VmHWM")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return False
        peak = _proc_status_kib("VmHWM")
        # Without a reset VmHWM may still hold an earlier (e.g. import-time) peak: only a rise measures.
        if self._base is not None and peak is not None and (self._reset or peak > self._peak_before):
            self.bytes = max(0, peak - self._base) * 1024
        return False


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Bytes ``fn()`` needs beyond what was allocated before it (its result included while alive)."""
    with PeakMemory(device) as probe:
        result = fn()
        del result
    return probe.bytes


# ---------------------------------------------------------------------------------------------
# Machine and provenance


def device_description(device) -> str:
    device = _as_device(device)
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


def free_memory_bytes(device) -> int:
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: Path | None = None) -> str:
    """The commit of the checkout this package runs from (``+dirty`` with local changes), or why not."""
    path = path or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git unavailable)"


# Scripts whose argv[0] is a module file: the command a user types is the module entry.
MODULE_ENTRIES = {"bench.py": "python -m asag_kernels.bench", "cli.py": "python -m asag_kernels.bench",
                  "__main__.py": "python -m asag_kernels.bench"}


def command_line() -> str:
    """The command that ran, as its user typed it (``asag-bench ...``, ``python -m asag_kernels.bench ...``,
    ``gpu_check.py ...``): every benchmark's provenance records this one."""
    name = Path(sys.argv[0]).name or "python"
    return " ".join([MODULE_ENTRIES.get(name, shlex.quote(name)), shlex.join(sys.argv[1:])]).strip()


def provenance(device=None) -> dict:
    """Where and when a measurement ran: enough to name the machine and reproduce the command."""
    from .. import __version__

    device = _as_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_description(device),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "asag_kernels": __version__,
        "git_commit": git_commit(),
        "command": command_line(),
    }

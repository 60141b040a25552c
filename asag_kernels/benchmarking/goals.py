"""The verdict that ends an ``asag-bench`` run: each benchmark goal (``asag_kernels._spec``, from
docs/PERF.md's issues 3-5 and SPEC §4) PASS or FAIL with the measured figure, or "not measured here"
with the reason (a GPU goal on a CPU machine, a row this run did not take). Never PASS without a row.

``verdict(rows, device_type) -> list[Verdict]``; ``Verdict.line()`` is the printed line, e.g.
``PASS  cpu sdxl-64 T=2: 1.14x SDPA (goal <= 1.5x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _spec
from .measure import BenchRow

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "not measured here"


@dataclass
class Verdict:
    status: str  # PASS, FAIL or NOT_MEASURED
    goal: str  # what is checked, e.g. "cpu sdxl-64 T=2"
    detail: str  # the measured figure and the bound, or why it was not measured
    required: bool = True

    def line(self) -> str:
        tail = "" if self.required else " [stretch, not required]"
        if self.status == NOT_MEASURED:
            return f"--    {self.goal}: {NOT_MEASURED} ({self.detail}){tail}"
        return f"{self.status:<4}  {self.goal}: {self.detail}{tail}"


def _find(rows: list[BenchRow], shape: str, backend: str, num_iters: int | None = None) -> BenchRow | None:
    for row in rows:
        if (row.shape, row.backend) == (shape, backend) and (num_iters is None or row.num_iters == num_iters) \
                and row.measured:
            return row
    return None


def _check(ok: bool) -> str:
    return PASS if ok else FAIL


def cpu_verdicts(rows: list[BenchRow], on_cpu: bool) -> list[Verdict]:
    shape, t = _spec.CPU_GOAL_SHAPE, _spec.GOAL_ITERS
    name = f"cpu {shape} T={t}"
    goals = [
        (f"{name} vs SDPA", True), (f"{name} vs SDPA", False), (f"{name} vs naive", True), (f"{name} extra peak", True),
    ]
    if not on_cpu:
        return [Verdict(NOT_MEASURED, g, "CPU goal, this run is on a GPU", req) for g, req in goals]
    cpu = _find(rows, shape, "cpu", t)
    if cpu is None:
        why = f"no measured {shape} cpu T={t} row in this run"
        return [Verdict(NOT_MEASURED, g, why, req) for g, req in goals]
    out = [
        Verdict(_check(cpu.vs_sdpa <= _spec.CPU_MAX_VS_SDPA), goals[0][0],
                f"{cpu.vs_sdpa:.2f}x SDPA (goal <= {_spec.CPU_MAX_VS_SDPA:g}x)"),
        Verdict(_check(cpu.vs_sdpa <= _spec.CPU_STRETCH_VS_SDPA), goals[1][0],
                f"{cpu.vs_sdpa:.2f}x SDPA (stretch <= {_spec.CPU_STRETCH_VS_SDPA:g}x)", required=False),
    ]
    naive = _find(rows, shape, "naive", t)
    if naive is None:
        out.append(Verdict(NOT_MEASURED, goals[2][0], f"no measured {shape} naive T={t} row in this run"))
    else:
        speedup = naive.median_ms / cpu.median_ms
        out.append(Verdict(_check(speedup >= _spec.CPU_MIN_VS_NAIVE), goals[2][0],
                           f"{speedup:.1f}x faster than naive (goal >= {_spec.CPU_MIN_VS_NAIVE:g}x)"))
    if cpu.peak_mem_mib is None:
        out.append(Verdict(NOT_MEASURED, goals[3][0], "peak memory cannot be measured on this system"))
    else:
        out.append(Verdict(_check(cpu.peak_mem_mib <= _spec.CPU_MAX_EXTRA_PEAK_MIB), goals[3][0],
                           f"{cpu.peak_mem_mib:.0f} MiB (goal <= {_spec.CPU_MAX_EXTRA_PEAK_MIB:g} MiB)"))
    return out


def gpu_verdicts(rows: list[BenchRow], on_gpu: bool) -> list[Verdict]:
    out = []
    iters = sorted({r.num_iters for r in rows if r.backend not in ("sdpa", "naive")}) or [_spec.GOAL_ITERS]
    for shape in _spec.GPU_GOAL_SHAPES:
        for t in iters:
            budget = f"<= {_spec.GPU_MAX_BUDGET:g}*(2T+1) = {_spec.GPU_MAX_BUDGET * (2 * t + 1):g}x"
            goals = [(f"triton {shape} T={t} vs SDPA", budget), (f"cuda {shape} T={t} vs triton", "cuda <= triton")]
            if not on_gpu:
                out += [Verdict(NOT_MEASURED, g, f"no GPU; goal {b}") for g, b in goals]
                continue
            triton, cuda = _find(rows, shape, "triton", t), _find(rows, shape, "cuda", t)
            if triton is None:
                out.append(Verdict(NOT_MEASURED, goals[0][0], f"no measured {shape} triton T={t} row in this run"))
            else:
                limit = _spec.GPU_MAX_BUDGET * (2 * t + 1)
                out.append(Verdict(_check(triton.vs_sdpa <= limit), goals[0][0],
                                   f"{triton.vs_sdpa:.2f}x SDPA (goal {budget})"))
            if triton is None or cuda is None:
                out.append(Verdict(NOT_MEASURED, goals[1][0], f"no measured {shape} T={t} cuda and triton rows"))
            else:
                out.append(Verdict(_check(cuda.median_ms <= triton.median_ms), goals[1][0],
                                   f"cuda {cuda.median_ms:.3f} ms, triton {triton.median_ms:.3f} ms (goal cuda <= triton)"))
    return out


def accuracy_verdict(rows: list[BenchRow]) -> Verdict:
    checked = [r for r in rows if r.within_tolerance is not None]
    goal = "SPEC §4 accuracy, every row"
    if not checked:
        return Verdict(NOT_MEASURED, goal, "no row checked against the float64 oracle (--no-oracle?)")
    bad = [f"{r.shape} {r.backend} T={r.num_iters} {r.rel_err:.1e}" for r in checked if not r.within_tolerance]
    worst = max(checked, key=lambda r: r.rel_err)
    detail = (f"{len(checked)} rows within tolerance, worst rel err {worst.rel_err:.1e} ({worst.shape} {worst.backend})"
              if not bad else f"over tolerance: {'; '.join(bad)}")
    return Verdict(_check(not bad), goal, detail)


def verdict(rows: list[BenchRow], device_type: str) -> list[Verdict]:
    """Every goal, in a fixed order: SPEC §4 accuracy, the CPU goals, the GPU goals."""
    on_gpu = device_type == "cuda"
    return [accuracy_verdict(rows), *cpu_verdicts(rows, not on_gpu), *gpu_verdicts(rows, on_gpu)]


def format_verdict(verdicts: list[Verdict]) -> str:
    failed = [v for v in verdicts if v.required and v.status == FAIL]
    passed = [v for v in verdicts if v.status == PASS]
    unmeasured = [v for v in verdicts if v.status == NOT_MEASURED]
    summary = (f"verdict: {len(passed)} passed, {len(failed)} required failed, {len(unmeasured)} not measured here")
    return "\n".join(["SPEC goals on this machine:", *(v.line() for v in verdicts), summary])

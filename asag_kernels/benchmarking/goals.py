"""The SPEC/issue goals a benchmark run is judged against, and the verdict lines ``asag-bench`` ends with.

Each goal applies to some rows; on a machine that cannot measure it (a GPU goal on a CPU, a shape the
run left out) it is reported as not measured, never as PASS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# CPU (issue 3, docs/PERF.md): the cpu backend at sdxl-64, float32, num_iters=2.
CPU_GOAL_SHAPE = "sdxl-64"
CPU_GOAL_ITERS = 2
CPU_VS_SDPA_GOAL = 1.5          # x SDPA in the same process (stretch 1.2x, reported, not required)
CPU_VS_SDPA_STRETCH = 1.2
CPU_EXTRA_PEAK_GOAL_MIB = 300.0  # peak over the inputs, output included (SPEC §6)
# GPU (issues 4 and 5, benchmarks/gpu_check.py): triton within (2T+1)x SDPA; cuda at least as fast as triton.
GPU_GOAL_SHAPES = ("sdxl-64", "flux-1k")

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "NOT MEASURED"


@dataclass(frozen=True)
class Verdict:
    status: str   # PASS, FAIL or NOT MEASURED
    goal: str
    detail: str   # the measured figure against the goal, or why it was not measured

    def line(self) -> str:
        return f"{self.status:<12} {self.goal}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


def _measured(rows):
    return [r for r in rows if not r.get("skipped") and not r.get("error") and r.get("median_ms") is not None]


def verdicts(rows: list[dict], *, device_type: str, dtype: str) -> list[Verdict]:
    """The verdicts for ``rows`` (``asag-bench`` result rows) measured on ``device_type`` in ``dtype``."""
    out = []
    measured = _measured(rows)
    checked = [r for r in measured if r.get("within_tolerance") is not None]
    if checked:
        worst = max(checked, key=lambda r: r["rel_err"])
        bad = [r for r in checked if not r["within_tolerance"]]
        out.append(Verdict(FAIL if bad else PASS, "SPEC §4 accuracy on every row",
                           f"{len(checked) - len(bad)}/{len(checked)} rows within tolerance; worst rel err "
                           f"{worst['rel_err']:.1e} ({worst['shape']} {worst['backend']} T={worst['num_iters']})"))
    else:
        out.append(Verdict(NOT_MEASURED, "SPEC §4 accuracy on every row", "no row was checked (--no-oracle)"))
    kernels = [r for r in measured if r["backend"] != "sdpa"]
    if kernels:
        nondet = [r for r in kernels if not r.get("deterministic")]
        out.append(Verdict(FAIL if nondet else PASS, "bitwise deterministic (two calls equal)",
                           f"{len(kernels) - len(nondet)}/{len(kernels)} rows"))
    goal = f"cpu {CPU_GOAL_SHAPE} float32 T={CPU_GOAL_ITERS}"
    row = next((r for r in measured if r["shape"] == CPU_GOAL_SHAPE and r["backend"] == "cpu"
                and r["num_iters"] == CPU_GOAL_ITERS and r["dtype"] == "float32"), None)
    if device_type != "cpu" or row is None:
        why = ("not a CPU run" if device_type != "cpu" else
               f"this run has no cpu row at {CPU_GOAL_SHAPE}, float32, T={CPU_GOAL_ITERS}"
               + ("" if dtype == "float32" else f" (dtype {dtype})"))
        out.append(Verdict(NOT_MEASURED, f"{goal}: time <= {CPU_VS_SDPA_GOAL:g}x SDPA", why))
        out.append(Verdict(NOT_MEASURED, f"{goal}: extra peak <= {CPU_EXTRA_PEAK_GOAL_MIB:g} MiB", why))
    else:
        ratio = row["vs_sdpa"]
        stretch = "stretch reached" if ratio <= CPU_VS_SDPA_STRETCH else f"stretch <= {CPU_VS_SDPA_STRETCH:g}x not reached"
        out.append(Verdict(PASS if ratio <= CPU_VS_SDPA_GOAL else FAIL, f"{goal}: time <= {CPU_VS_SDPA_GOAL:g}x SDPA",
                           f"{ratio:.2f}x SDPA ({row['median_ms']:,.0f} ms vs {row['sdpa_median_ms']:,.0f} ms; {stretch})"))
        peak = row.get("peak_mem_mib")
        if peak is None:
            out.append(Verdict(NOT_MEASURED, f"{goal}: extra peak <= {CPU_EXTRA_PEAK_GOAL_MIB:g} MiB",
                               "peak memory was not measured for this row"))
        else:
            out.append(Verdict(PASS if peak <= CPU_EXTRA_PEAK_GOAL_MIB else FAIL,
                               f"{goal}: extra peak <= {CPU_EXTRA_PEAK_GOAL_MIB:g} MiB", f"{peak:,.1f} MiB"))
    if device_type != "cuda":
        shapes = " and ".join(GPU_GOAL_SHAPES)
        out.append(Verdict(NOT_MEASURED, f"triton <= (2T+1)x SDPA at {shapes}", "no GPU here (benchmarks/gpu_check.py)"))
        out.append(Verdict(NOT_MEASURED, f"cuda at least as fast as triton at {shapes}", "no GPU here (benchmarks/gpu_check.py)"))
    else:
        for shape in GPU_GOAL_SHAPES:
            for r in [r for r in measured if r["shape"] == shape and r["backend"] == "triton"]:
                limit = 2 * r["num_iters"] + 1
                out.append(Verdict(PASS if r["vs_sdpa"] <= limit else FAIL,
                                   f"triton {shape} T={r['num_iters']}: <= {limit}x SDPA", f"{r['vs_sdpa']:.2f}x SDPA"))
                cuda = next((c for c in measured if c["shape"] == shape and c["backend"] == "cuda"
                             and c["num_iters"] == r["num_iters"]), None)
                if cuda is not None:
                    out.append(Verdict(PASS if cuda["median_ms"] <= r["median_ms"] else FAIL,
                                       f"cuda {shape} T={r['num_iters']}: at least as fast as triton",
                                       f"{cuda['median_ms']:.3f} ms vs triton {r['median_ms']:.3f} ms"))
    return out


def format_verdicts(items: list[Verdict]) -> str:
    passed = sum(v.status == PASS for v in items)
    failed = sum(v.status == FAIL for v in items)
    lines = ["verdict (the goals that apply on this machine):"] + ["  " + v.line() for v in items]
    lines.append(f"  {passed} passed, {failed} failed, {len(items) - passed - failed} not measured here")
    return "\n".join(lines)

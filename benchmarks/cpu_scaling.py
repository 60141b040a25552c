"""CPU backend benchmark: speed against SDPA and a materialising float32 Sinkhorn, extra peak memory,
video-32k, and time against N. Prints markdown tables.

    python benchmarks/cpu_scaling.py                 # everything (video-32k takes minutes)
    python benchmarks/cpu_scaling.py --skip-video --scaling-max 16384

Times are medians of --repeats runs after one warm-up, all in this process, on the same fp32 inputs.
"Extra peak" is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
over its RSS before the call, so it counts everything the call allocates, outputs included; for the
cpu backend it is taken from a first call in a fresh process, so the cache the backend keeps for
later calls is counted.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from asag_kernels import sinkhorn_attention

SHAPES = {  # SPEC §7: (H, N, D), B = 1
    "sd15-64": (8, 4096, 40),
    "sdxl-mid": (20, 1024, 64),
    "sdxl-64": (10, 4096, 64),
    "video-32k": (12, 32760, 128),
}


def materialising_fp32(q, k, v, num_iters, scale):
    """The reference algorithm in float32: the whole [B, H, N, N] logit tensor at once (adversarial)."""
    logits = -scale * (q @ k.transpose(-1, -2))
    log_a, log_b = -math.log(q.shape[-2]), -math.log(k.shape[-2])
    g = torch.zeros(logits.shape[:-1], dtype=logits.dtype)
    for _ in range(num_iters):
        f = log_a - torch.logsumexp(logits + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(logits + f.unsqueeze(-1), dim=-2)
    return torch.softmax(logits + g.unsqueeze(-2), dim=-1) @ v


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def extra_peak_mib(fn) -> float:
    """Peak RSS rise while fn() runs (Linux only; NaN elsewhere)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    result = fn()
    peak = _rss_kib("VmHWM")
    del result
    return (peak - before) / 1024


_PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
from cpu_scaling import extra_peak_mib, inputs
from asag_kernels import sinkhorn_attention
q, k, v = inputs({h}, {n}, {d})
with torch.inference_mode():
    # One small call first: library start-up (thread pools, BLAS buffers) is not the call's memory.
    small = inputs(2, 64, {d})
    sinkhorn_attention(*small, num_iters={t}, backend="cpu")
    torch.nn.functional.scaled_dot_product_attention(*small)
    print(extra_peak_mib(lambda: sinkhorn_attention(q, k, v, num_iters={t}, backend="cpu")))
"""


def cpu_extra_peak_mib(h, n, d, num_iters) -> float:
    """Extra peak of the first cpu-backend call in a fresh process: it counts the workspace the
    backend then keeps for later calls, which an in-process measurement after a warm-up would miss."""
    import subprocess
    import sys

    script = _PEAK_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), h=h, n=n, d=d, t=num_iters)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(h, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, n, d, generator=gen) for _ in range(3))


def shape_table(names, num_iters, repeats, with_materialising=True):
    rows = []
    for name in names:
        h, n, d = SHAPES[name]
        q, k, v = inputs(h, n, d)
        scale = d**-0.5
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        cpu = lambda: sinkhorn_attention(q, k, v, num_iters=num_iters, backend="cpu")  # noqa: E731
        t_sdpa = median_time(sdpa, repeats)
        t_cpu = median_time(cpu, repeats)
        mem_cpu = cpu_extra_peak_mib(h, n, d, num_iters)
        mem_sdpa = extra_peak_mib(sdpa)
        row = {"shape": f"{name} (H={h}, N={n}, D={d})", "sdpa": t_sdpa, "cpu": t_cpu, "mem_cpu": mem_cpu, "mem_sdpa": mem_sdpa}
        if with_materialising:
            mat = lambda: materialising_fp32(q, k, v, num_iters, scale)  # noqa: E731
            row["mat"] = median_time(mat, max(1, repeats // 2))
            row["mem_mat"] = extra_peak_mib(mat)
            err = (cpu() - mat()).norm() / mat().norm()
            row["err"] = err.item()
        rows.append(row)
        print(f"  measured {name}", flush=True)
    print(f"\n### Speed at num_iters={num_iters}, fp32, B=1 (median of {repeats} after a warm-up)\n")
    print("| shape | SDPA | cpu backend | cpu / SDPA | materialising fp32 | materialising / cpu | extra peak: cpu / SDPA / materialising |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mat = f"{r['mat'] * 1e3:.0f} ms" if "mat" in r else "—"
        speedup = f"{r['mat'] / r['cpu']:.1f}×" if "mat" in r else "—"
        mem_mat = f"{r['mem_mat']:.0f}" if "mem_mat" in r else "—"
        print(
            f"| {r['shape']} | {r['sdpa'] * 1e3:.0f} ms | {r['cpu'] * 1e3:.0f} ms | {r['cpu'] / r['sdpa']:.2f}× | {mat} | "
            f"{speedup} | {r['mem_cpu']:.0f} / {r['mem_sdpa']:.0f} / {mem_mat} MiB |"
        )
    return rows


def video_table(num_iters):
    h, n, d = SHAPES["video-32k"]
    q, k, v = inputs(h, n, d)
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v)
    t_sdpa = time.perf_counter() - t0
    box = {}

    def cpu():
        t = time.perf_counter()
        out = sinkhorn_attention(q, k, v, num_iters=num_iters, backend="cpu")
        box["t"] = time.perf_counter() - t
        return out

    mem = extra_peak_mib(cpu)  # the first cpu call of this process: counts the workspace it keeps
    print(f"\n### video-32k (H={h}, N={n}, D={d}), num_iters={num_iters}, one run each\n")
    print("| SDPA | cpu backend | cpu / SDPA | extra peak (cpu) | materialising |")
    print("| --- | --- | --- | --- | --- |")
    need = h * n * n * 4 / 2**30
    print(f"| {t_sdpa:.1f} s | {box['t']:.1f} s | {box['t'] / t_sdpa:.2f}× | {mem:.0f} MiB | cannot run: needs ≥ {need:.0f} GiB per logit tensor |")


def scaling_table(h, d, num_iters, n_values, repeats):
    budget = float(os.environ.get("ASAG_CPU_WORKSPACE_MB", "256"))
    print(f"\n### Time against N (B=1, H={h}, D={d}, num_iters={num_iters}, fp32, workspace {budget:g} MiB)\n")
    # Heads run one per thread when there are enough of them; each concurrent head gets a share of the budget.
    concurrent = min(h, torch.get_num_threads())
    print("| N | ≈ rows cached | SDPA | cpu backend | cpu / SDPA | cpu ns per (head·N²) | extra peak (cpu) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in n_values:
        q, k, v = inputs(h, n, d)
        reps = repeats if n <= 8192 else 1
        t_sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        cpu = lambda: sinkhorn_attention(q, k, v, num_iters=num_iters, backend="cpu")  # noqa: E731
        t_cpu = median_time(cpu, reps)
        mem = cpu_extra_peak_mib(h, n, d, num_iters)
        cached = min(1.0, budget * 2**20 / (n * n * 4 * concurrent))
        print(
            f"| {n} | ~{cached:.0%} | {t_sdpa * 1e3:.0f} ms | {t_cpu * 1e3:.0f} ms | {t_cpu / t_sdpa:.2f}× | "
            f"{t_cpu / (h * n * n) * 1e9:.2f} | {mem:.0f} MiB |",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-iters", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-video", action="store_true")
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-heads", type=int, default=2)
    ap.add_argument("--scaling-dim", type=int, default=64)
    ap.add_argument("--scaling-max", type=int, default=32768)
    args = ap.parse_args()

    torch.manual_seed(0)
    from asag_kernels import _C_cpu

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, row kernels: {_C_cpu.row_kernels_isa()}, "
        f"ASAG_CPU_WORKSPACE_MB={os.environ.get('ASAG_CPU_WORKSPACE_MB', '256 (default)')}"
    )
    with torch.inference_mode():
        if not args.skip_shapes:
            shape_table(["sd15-64", "sdxl-mid", "sdxl-64"], args.num_iters, args.repeats)
        if not args.skip_scaling:
            ns = [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= args.scaling_max]
            scaling_table(args.scaling_heads, args.scaling_dim, args.num_iters, ns, args.repeats)
        if not args.skip_video:
            video_table(args.num_iters)


if __name__ == "__main__":
    main()

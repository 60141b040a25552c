"""CPU backend benchmark: speed against SDPA and the materialising float32 Sinkhorn, extra peak memory,
video-32k, and time against N. Prints markdown tables (and ``--json PATH`` writes every row).

    python benchmarks/cpu_scaling.py                 # everything (video-32k takes many minutes)
    python benchmarks/cpu_scaling.py --skip-video --scaling-max 16384

Every row is an ``asag-bench`` row (``asag_kernels.benchmarking``): float32 inputs ``[1, H, N, D]``,
its own fresh process, a start-up call on tiny inputs, then the first call under the peak-memory
probe (so the cache the cpu backend keeps for later calls counts, and library start-up does not),
then ``--repeats`` timed calls interleaved with SDPA's in that process ("vs SDPA" uses that SDPA
time). Errors (shape table only) are against the float64 oracle on heads {0, H-1}.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import asag_kernels
from asag_kernels._env import workspace_bytes
from asag_kernels._spec import CPU_SHAPES, SHAPES
from asag_kernels.benchmarking import cli, core

SCALING_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)


def _size(text: str) -> int:
    return cli._int_in(text, 1, cli.MAX_DIM)


def _sizes(text: str) -> list[int]:
    return [_size(item) for item in cli._items(text, "positive integers")]


def run_rows(shapes: list[tuple[str, tuple[int, int, int]]], backends: list[str], *, num_iters: int, repeat: int,
             oracle: bool) -> list[dict]:
    cfg = cli.Config(
        device=torch.device("cpu"), dtype=torch.float32, shapes=shapes, iters=[num_iters], backends=backends,
        skipped_backends={}, repeat=repeat, warmup=1, mem_budget=core.free_memory_bytes("cpu") // 2, isolate=True,
        oracle=oracle,
    )
    rows = [row.to_dict() for row in cli.run_benchmark(cfg, progress_enabled=False)]
    failed = [f"{r['shape']} {r['backend']}: {r['error']}" for r in rows if r.get("error")]
    if failed:
        raise SystemExit("rows failed:\n" + "\n".join(failed))
    return rows


def _by_shape(rows: list[dict]) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for r in rows:
        table.setdefault(r["shape"], {})[r["backend"]] = r
    return table


def _mib(row: dict | None) -> str:
    return "—" if row is None or row.get("peak_mem_mib") is None else f"{row['peak_mem_mib']:.0f}"


def shape_table(num_iters: int, repeats: int) -> list[dict]:
    rows = run_rows([(n, SHAPES[n]) for n in CPU_SHAPES], ["sdpa", "naive", "cpu"], num_iters=num_iters,
                    repeat=repeats, oracle=True)
    print(f"\n### Speed at num_iters={num_iters}, fp32, B=1 (median of {repeats} after a warm-up)\n")
    print("| shape | SDPA | cpu backend | cpu / SDPA (same process) | materialising fp32 | materialising / cpu "
          "| extra peak: cpu / SDPA / materialising | cpu rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in _by_shape(rows).items():
        heads, tokens, dim = SHAPES[name]
        cpu, sdpa, naive = r["cpu"], r["sdpa"], r.get("naive")
        timed_naive = naive is not None and naive["median_ms"] is not None
        mat = f"{naive['median_ms']:.0f} ms" if timed_naive else "— (over the memory budget)"
        speedup = f"{naive['median_ms'] / cpu['median_ms']:.1f}×" if timed_naive else "—"
        print(f"| {name} (H={heads}, N={tokens}, D={dim}) | {sdpa['median_ms']:.0f} ms | {cpu['median_ms']:.0f} ms | "
              f"{cpu['vs_sdpa']:.2f}× | {mat} | {speedup} | {_mib(cpu)} / {_mib(sdpa)} / {_mib(naive)} MiB | "
              f"{cpu['rel_err']:.1e} |")
    return rows


def scaling_table(heads: int, dim: int, num_iters: int, tokens: list[int], repeats: int) -> list[dict]:
    budget = workspace_bytes("ASAG_CPU_WORKSPACE_MB", 256)
    # Heads run one per thread when there are enough of them; each concurrent head gets a share of the budget.
    concurrent = min(heads, torch.get_num_threads())
    print(f"\n### Time against N (B=1, H={heads}, D={dim}, num_iters={num_iters}, fp32, "
          f"workspace {budget / 2**20:g} MiB)\n")
    print("| N | ≈ rows cached | SDPA | cpu backend | cpu / SDPA | cpu ns per (head·N²) | extra peak (cpu) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for n in tokens:
        shape = f"{heads}x{n}x{dim}"
        got = _by_shape(run_rows([(shape, (heads, n, dim))], ["sdpa", "cpu"], num_iters=num_iters,
                                 repeat=repeats if n <= 8192 else 1, oracle=False))[shape]
        cpu, sdpa = got["cpu"], got["sdpa"]
        cached = min(1.0, budget / (n * n * 4 * concurrent))
        print(f"| {n} | ~{cached:.0%} | {sdpa['median_ms']:.0f} ms | {cpu['median_ms']:.0f} ms | {cpu['vs_sdpa']:.2f}× | "
              f"{cpu['median_ms'] * 1e6 / (heads * n * n):.2f} | {_mib(cpu)} MiB |", flush=True)
        rows += [sdpa, cpu]
    return rows


def video_table(num_iters: int) -> list[dict]:
    heads, tokens, dim = SHAPES["video-32k"]
    rows = run_rows([("video-32k", SHAPES["video-32k"])], ["sdpa", "cpu"], num_iters=num_iters, repeat=1, oracle=False)
    got = _by_shape(rows)["video-32k"]
    cpu, sdpa = got["cpu"], got["sdpa"]
    need = core.materialised_bytes(heads, tokens, tokens, torch.float32) / core.MATERIALISED_TEMPORARIES / 2**30
    print(f"\n### video-32k (H={heads}, N={tokens}, D={dim}), num_iters={num_iters}, one timed run each\n")
    print("| SDPA | cpu backend | cpu / SDPA | extra peak (cpu) | materialising |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {sdpa['median_ms'] / 1e3:.1f} s | {cpu['median_ms'] / 1e3:.1f} s | {cpu['vs_sdpa']:.2f}× | {_mib(cpu)} MiB "
          f"| cannot run: needs ≥ {need:.0f} GiB per logit tensor |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-iters", type=cli._iters_list, default=[2], help="num_iters (one value)")
    ap.add_argument("--repeats", type=cli._calls, default=5, help="timed calls per row")
    ap.add_argument("--skip-video", action="store_true")
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-heads", type=_size, default=2)
    ap.add_argument("--scaling-dim", type=_size, default=64)
    ap.add_argument("--scaling-max", type=_size, default=SCALING_TOKENS[-1], help="largest N of the N sweep")
    ap.add_argument("--scaling-tokens", type=_sizes, default=None,
                    help="comma-separated N values of the sweep (default: powers of two 1024..--scaling-max)")
    ap.add_argument("--json", type=cli._output_path, metavar="PATH", help="write every row and the provenance as JSON")
    args = ap.parse_args(argv)
    if len(args.num_iters) != 1:
        ap.error(f"argument --num-iters: expected one value, got {args.num_iters}")
    num_iters = args.num_iters[0]
    if "cpu" not in asag_kernels.available_backends():
        ap.error(f"the cpu backend is not usable here: {asag_kernels.backend_status()['cpu']}")
    from asag_kernels import _C_cpu

    prov = core.provenance("cpu")
    print(f"machine: {prov['device']}, torch {prov['torch']}, commit {prov['git_commit']}, {prov['utc']}; "
          f"row kernels: {_C_cpu.row_kernels_isa()}, cpu workspace {workspace_bytes('ASAG_CPU_WORKSPACE_MB', 256) >> 20} MiB")
    report = {"provenance": prov, "shapes": [], "scaling": [], "video": []}
    if not args.skip_shapes:
        report["shapes"] = shape_table(num_iters, args.repeats)
    if not args.skip_scaling:
        tokens = args.scaling_tokens or [n for n in SCALING_TOKENS if n <= args.scaling_max]
        report["scaling"] = scaling_table(args.scaling_heads, args.scaling_dim, num_iters, tokens, args.repeats)
    if not args.skip_video:
        report["video"] = video_table(num_iters)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

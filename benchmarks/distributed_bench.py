"""Distributed Sinkhorn attention: time, per-rank peak memory and bytes sent, for 1, 2, 4 ranks.

    python benchmarks/distributed_bench.py --shape video-32k --ranks 1,2,4 --strategies ulysses,ring
    python benchmarks/distributed_bench.py --shape 12,8192,128 --iters 2 --json dist.json
    python benchmarks/distributed_bench.py --ranks 4 --strategies ulysses,ring,hybrid --ulysses-degree 2

Strategies as ``asag_kernels.distributed.sinkhorn_attention`` takes them; ``hybrid`` runs with
``--ulysses-degree U`` (Ulysses inside sets of U consecutive ranks, a ring across the sets) on the
world sizes it divides with 1 < U < ranks (other rows are left out, saying so).

Each (ranks, strategy) row spawns a fresh world (gloo on the CPU; NCCL, one GPU per rank, with
``--device cuda`` when there are enough GPUs). Every rank draws the full ``[1, H, N, D]`` inputs
with the benchmark core's seed, keeps its even sequence shard and frees the rest. Per rank:

- ``peak_mib``: the memory the first full-size call needs beyond what was allocated before it (the
  core's ``PeakMemory``: VmHWM over VmRSS on the CPU, the caching allocator on CUDA), the output
  included, after a start-up call on 2-token shards (library loading does not count);
- ``sent_bytes``: what the rank handed to torch.distributed in that call (the package's counter),
  next to ``formula_bytes`` from ``asag_kernels.distributed.cost`` (they must agree);
- ``median_s``: the median over ``--reps`` calls after ``--warmup`` (all ranks start each call
  together after a barrier; the slowest rank is the row's time).

With ``--sdpa`` the 1-rank row also times ``scaled_dot_product_attention`` on the full inputs in
the same process, interleaved with the op (``vs_sdpa``). Ranks share the machine's cores:
``--threads`` per rank defaults to cores // ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asag_kernels import distributed as asag_dist
from asag_kernels._spec import ALL_SHAPES
from asag_kernels.benchmarking import DTYPES, PeakMemory, make_call, make_inputs, provenance, time_fn, time_fns
from asag_kernels.distributed.cost import bytes_per_rank

_STRATEGIES = ("ulysses", "ring", "hybrid")


def _shape(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in ALL_SHAPES:
        return text, ALL_SHAPES[text]
    try:
        h, n, d = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be one of {sorted(ALL_SHAPES)} or H,N,D, got {text!r}") from None
    if min(h, n, d) < 1:
        raise argparse.ArgumentTypeError(f"--shape H,N,D must be positive, got {text!r}")
    return f"{h}x{n}x{d}", (h, n, d)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _strategies(text: str) -> list[str]:
    values = [x for x in text.split(",") if x]
    bad = [x for x in values if x not in _STRATEGIES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--strategies takes {', '.join(_STRATEGIES)} (comma-separated), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_shape, default=_shape("sdxl-mid"), help="SPEC §7 name or H,N,D (default sdxl-mid)")
    p.add_argument("--ranks", type=_ints, default=[1, 2, 4], help="world sizes (default 1,2,4)")
    p.add_argument("--strategies", type=_strategies, default=["ulysses", "ring"],
                   help="comma-separated ulysses, ring, hybrid (default ulysses,ring)")
    p.add_argument("--ulysses-degree", type=int, default=2, help="the hybrid's Ulysses degree U (default 2)")
    p.add_argument("--iters", type=int, default=2, help="num_iters (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--warmup", type=int, default=0, help="untimed calls after the measured first call (default 0)")
    p.add_argument("--reps", type=int, default=2, help="timed calls (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default cores // ranks)")
    p.add_argument("--sdpa", action="store_true", help="1-rank rows: also time SDPA in the same process")
    p.add_argument("--json", type=Path, help="write the rows and provenance here")
    return p


def _rank_main(rank, world, init_method, cfg, result_dir):
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=datetime.timedelta(hours=2))
    h, n, d = cfg["shape"]
    dtype = DTYPES[cfg["dtype"]]
    lengths = [n // world + (1 if s < n % world else 0) for s in range(world)]
    start = sum(lengths[:rank])
    with torch.no_grad():
        full = make_inputs((h, n, d), dtype, "cpu")
        q, k, v = (t[..., start : start + lengths[rank], :].to(device).clone() for t in full)
        kw = dict(num_iters=cfg["iters"], backend=cfg["backend"], cost="adversarial", epsilon=1.0,
                  strategy=cfg["strategy"], ulysses_degree=cfg["ulysses_degree"])

        def call():
            return asag_dist.sinkhorn_attention(q, k, v, **kw)

        def synced():
            dist.barrier()
            return call()

        # Start-up on tiny shards first (library loading, first-use caches), so that the measured
        # call's peak is the call's own, as asag-bench measures it.
        tiny = [t[..., :2, :].clone() for t in (q, k, v)]
        asag_dist.sinkhorn_attention(*tiny, **kw)
        del tiny
        dist.barrier()
        asag_dist.reset_bytes_sent()
        with PeakMemory(device) as peak:
            out = call()
            del out
        sent = asag_dist.bytes_sent()
        row = dict(rank=rank, threads=threads, shard=lengths[rank], peak_mib=peak.mib, sent_bytes=sent,
                   formula_bytes=bytes_per_rank(cfg["strategy"], rank, lengths, lengths, problems=h, d=d, dv=d,
                                                elem=q.element_size(), pot=8 if dtype == torch.float64 else 4,
                                                num_iters=cfg["iters"], potentials=False,
                                                ulysses_degree=cfg["ulysses_degree"]))
        if world == 1 and cfg["sdpa"]:
            sdpa = make_call("sdpa", q, k, v, cfg["iters"])
            op_t, sdpa_t = time_fns([call, sdpa], device=device, warmup=cfg["warmup"], reps=cfg["reps"])
            row["times_s"] = [t / 1e3 for t in op_t.times_ms]
            row["sdpa_median_s"] = sdpa_t.median_ms / 1e3
        else:
            stats = time_fn(synced, device=device, warmup=cfg["warmup"], reps=cfg["reps"])
            row["times_s"] = [t / 1e3 for t in stats.times_ms]
    (result_dir / f"rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()  # tear down together (a rank leaving early can abort gloo in a peer)
    dist.destroy_process_group()


def run_world(world: int, strategy: str, args) -> dict:
    u = args.ulysses_degree if strategy == "hybrid" else None
    cfg = dict(shape=args.shape[1], iters=args.iters, dtype=args.dtype, backend=args.backend, device=args.device,
               warmup=args.warmup, reps=args.reps, threads=args.threads, strategy=strategy, sdpa=args.sdpa,
               ulysses_degree=u)
    with tempfile.TemporaryDirectory(prefix="asag_dist_bench_") as tmp:
        tmp = Path(tmp)
        mp.spawn(_rank_main, args=(world, f"file://{tmp / 'rendezvous'}", cfg, tmp), nprocs=world, join=True)
        ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    # A call ends when its slowest rank does: the row's time per call is the maximum over ranks.
    per_call = [max(r["times_s"][i] for r in ranks) for i in range(len(ranks[0]["times_s"]))]
    row = dict(shape=args.shape[0], ranks=world, strategy=strategy if u is None else f"hybrid U{u}xR{world // u}",
               ulysses_degree=u, dtype=args.dtype, num_iters=args.iters,
               median_s=statistics.median(per_call), peak_mib_per_rank=[r["peak_mib"] for r in ranks],
               sent_bytes_per_rank=[r["sent_bytes"] for r in ranks],
               formula_bytes_per_rank=[r["formula_bytes"] for r in ranks], threads_per_rank=ranks[0]["threads"],
               per_rank=ranks)
    if "sdpa_median_s" in ranks[0]:
        row["sdpa_median_s"] = ranks[0]["sdpa_median_s"]
        row["vs_sdpa"] = row["median_s"] / row["sdpa_median_s"]
    return row


def _fmt_row(row: dict) -> str:
    peak = "/".join(f"{p:.0f}" if p is not None else "?" for p in row["peak_mib_per_rank"])
    sent = max(row["sent_bytes_per_rank"]) / 2**20
    formula = max(row["formula_bytes_per_rank"]) / 2**20
    extra = f"  vs SDPA {row['vs_sdpa']:.2f}x" if "vs_sdpa" in row else ""
    return (f"{row['shape']:>14} {row['ranks']:>5} {row['strategy']:>12} {row['median_s']:>10.2f} "
            f"{peak:>22} {sent:>12.1f} {formula:>12.1f}{extra}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ranks):
        print(f"--device cuda needs {max(args.ranks)} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    report = dict(provenance=provenance(args.device), rows=[])
    print(f"# {report['provenance']['device']}, {report['provenance']['cpu_count']} cores, "
          f"torch {report['provenance']['torch']}, {report['provenance']['utc']}, load {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>14} {'ranks':>5} {'strategy':>12} {'median_s':>10} {'peak MiB per rank':>22} "
          f"{'sent MiB':>12} {'formula MiB':>12}")
    for world in args.ranks:
        for strategy in args.strategies:
            u = args.ulysses_degree
            if strategy == "hybrid" and not (1 < u < world and world % u == 0 and args.shape[1][0] % u == 0):
                print(f"{'':>14} {world:>5} {'hybrid':>12}  left out: --ulysses-degree {u} must divide the ranks "
                      f"and the heads and lie strictly between 1 and the ranks", flush=True)
                continue
            row = run_world(world, strategy, args)
            report["rows"].append(row)
            print(_fmt_row(row), flush=True)
    report["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

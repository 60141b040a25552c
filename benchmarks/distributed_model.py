"""A MODEL, not a measurement: time and bytes per rank of one distributed Sinkhorn-attention call on
8–64 H100 GPUs (8 per node, NVLink inside a node, InfiniBand across), from stated inputs.

    python benchmarks/distributed_model.py                 # the docs/PERF.md table (markdown)
    python benchmarks/distributed_model.py --json model.json

Inputs, each an assumption with its source (none is measured here: no GPU was lent):

- compute: each of the 2T + 1 passes of a call (SPEC §7) takes as long as one FlashAttention-3
  forward pass on the same shape, 4·Nq·Nk·D FLOPs per problem at ``--tflops`` (default 640:
  FlashAttention-3, Shah et al. 2024, arXiv 2407.08608, "attention forward speed, head dim 128,
  H100 80GB SXM5", FP16/BF16, non-causal, 640–650 TFLOP/s at 8k–16k tokens; FlashAttention-2 on the
  same figure: about 370). The package's own kernels have not run on an H100 (docs/PERF.md, GPU).
- bytes: ``asag_kernels.distributed.cost.stage_bytes``, SPEC §9's formula, which equals what the
  ranks counted in every gloo test and in the measured 4-rank table.
- links, per GPU and direction, peak: NVLink 4 ``--nvlink-gbs`` 450 GB/s (H100 SXM: 900 GB/s
  bidirectional), InfiniBand ``--ib-gbs`` 50 GB/s (DGX H100: one 400 Gb/s ConnectX-7 per GPU). No
  latency, no congestion; both kinds of link run at once.
- schedule (as the code does it): Ulysses' all-to-alls do not overlap compute; the ring overlaps
  each step's transfer with that step's compute (a step takes the longer of the two), and a pass
  runs at the pace of its slowest hop (InfiniBand as soon as one hop leaves a node).
- layout: shard positions fill nodes in order (position r on node r // 8); a Ulysses set is U
  consecutive positions, a ring set every U-th (SPEC §9); bf16 inputs, float32 potentials, B = 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from asag_kernels._spec import ALL_SHAPES
from asag_kernels.distributed import plan
from asag_kernels.distributed.cost import stage_bytes
from asag_kernels.distributed.ulysses import problem_split

GPUS_PER_NODE = 8
# (name, heads, tokens, head dim, where the shape comes from)
SHAPES = (
    ("video-32k",) + ALL_SHAPES["video-32k"] + ("SPEC §7 (e.g. Wan 2.1 1.3B, 81 frames at 480p)",),
    ("video-100k", 24, 100_000, 128, "HunyuanVideo's 24 heads x 128 (diffusers 0.42.1 defaults) at 100K tokens"),
)


def _even(n: int, world: int) -> list[int]:
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def _node(position: int) -> int:
    return position // GPUS_PER_NODE


def model_row(heads, n, d, world, strategy, u, *, num_iters, tflops, nvlink, ib) -> dict:
    """The modelled call for rank 0 (every rank does the same with even shards)."""
    flops_per_s = tflops * 1e12
    shards = _even(n, world)
    stages = stage_bytes(strategy, 0, shards, shards, problems=heads, d=d, dv=d, elem=2, pot=4, num_iters=num_iters,
                         potentials=False, ulysses_degree=u)
    r = world // u
    passes = 2 * num_iters + 1
    # Ulysses among positions 0..u-1: the bytes to each peer are equal; peers off rank 0's node use InfiniBand.
    off_node = sum(1 for s in range(1, u) if _node(s) != _node(0))
    on_node = u - 1 - off_node
    ul_bytes = stages["ulysses"]
    per_peer = ul_bytes / (u - 1) if u > 1 else 0.0
    ul_nvlink, ul_ib = per_peer * on_node, per_peer * off_node
    ul_time = max(ul_nvlink / nvlink, ul_ib / ib)
    if strategy == "ulysses":
        compute = passes * 4 * max(problem_split(heads, u)) * n * n * d / flops_per_s
        ring_time, ring_nvlink, ring_ib = 0.0, 0.0, 0.0
    else:
        # Ring set 0: positions 0, u, 2u, ...; one hop off a node sets the pace of every step.
        members = [i * u for i in range(r)]
        crosses = any(_node(a) != _node(b) for a, b in zip(members, members[1:] + members[:1])) and r > 1
        bw = ib if crosses else nvlink
        block = n / r
        step_compute = 4 * (heads // u) * block * block * d / flops_per_s
        ring_time = sum((r - 1) * max(step_compute, b / (r - 1) / bw) + step_compute if r > 1 else step_compute
                        for b in stages["ring"])
        compute = passes * r * step_compute
        ring_bytes = sum(stages["ring"])
        ring_nvlink, ring_ib = (0.0, ring_bytes) if crosses else (ring_bytes, 0.0)
    total = ul_time + (compute if strategy == "ulysses" else ring_time)
    return dict(gpus=world, nodes=math.ceil(world / GPUS_PER_NODE), strategy=strategy, ulysses_degree=u,
                ring_degree=r, nvlink_mb=(ul_nvlink + ring_nvlink) / 1e6, ib_mb=(ul_ib + ring_ib) / 1e6,
                compute_ms=compute * 1e3, exposed_comm_ms=(total - compute) * 1e3, time_ms=total * 1e3)


def rows(args) -> list[dict]:
    out = []
    for name, heads, n, d, source in SHAPES:
        for world in (8, 16, 32, 64):
            auto = plan(heads, world)
            candidates = [("ulysses", world), ("ring", 1)]
            if auto.strategy == "hybrid":
                candidates.append(("hybrid", auto.ulysses_degree))
            for strategy, u in candidates:
                row = model_row(heads, n, d, world, strategy, u, num_iters=args.iters, tflops=args.tflops,
                                nvlink=args.nvlink_gbs * 1e9, ib=args.ib_gbs * 1e9)
                row.update(shape=name, heads=heads, tokens=n, head_dim=d, source=source,
                           auto=(strategy, u if strategy != "ring" else 1) == (auto.strategy, auto.ulysses_degree))
                out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| model | shape | GPUs (nodes) | strategy | MB/rank over NVLink | MB/rank over IB | compute ms | "
             "exposed comm ms | time per call ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        strategy = {"ulysses": f"Ulysses {r['ulysses_degree']}", "ring": f"ring {r['ring_degree']}",
                    "hybrid": f"hybrid U{r['ulysses_degree']} x R{r['ring_degree']}"}[r["strategy"]]
        if r["auto"]:
            strategy += " (auto)"
        lines.append(f"| model | {r['shape']} | {r['gpus']} ({r['nodes']}) | {strategy} | {r['nvlink_mb']:.0f} | "
                     f"{r['ib_mb']:.0f} | {r['compute_ms']:.1f} | {r['exposed_comm_ms']:.1f} | {r['time_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2, help="num_iters T (default 2)")
    p.add_argument("--tflops", type=float, default=640.0, help="per-pass compute rate, TFLOP/s (default 640, FA3)")
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per GPU and direction (default 450)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU and direction (default 50)")
    p.add_argument("--json", type=Path, help="write the rows and the inputs here")
    args = p.parse_args(argv)
    table = rows(args)
    print(markdown(table))
    if args.json:
        inputs = dict(iters=args.iters, tflops=args.tflops, nvlink_gbs=args.nvlink_gbs, ib_gbs=args.ib_gbs,
                      gpus_per_node=GPUS_PER_NODE, kind="model, not a measurement")
        args.json.write_text(json.dumps(dict(inputs=inputs, rows=table), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

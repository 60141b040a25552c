"""Distributed Sinkhorn attention (SPEC §9) on gloo, world sizes 1–4, against the float64 reference.

Each spawned world runs a whole list of cases (spawning costs seconds on two cores): every rank
draws the full inputs from the case's seed, keeps its shard, runs the distributed op and checks
its shard of out/f/g against the reference solved on the concatenated inputs.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import asag_kernels
from asag_kernels import distributed as asag_dist
from asag_kernels.distributed.cost import bytes_per_rank
from asag_kernels._spec import out_tolerance, potential_tolerance

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _rendezvous() -> str:
    """A fresh file rendezvous (a TCP port picked here could be taken before the ranks bind it)."""
    fd, path = tempfile.mkstemp(prefix="asag_dist_")
    os.close(fd)
    os.unlink(path)
    return f"file://{path}"


def case(strategy, nq, nk, *, lead=(1, 2), d=16, dv=8, dtype=F32, cost="adversarial", num_iters=2,
         potentials=True, backend="auto", epsilon=1.0, exact=False, seed=None):
    """One check; `exact`: also bitwise equal to the single-process op with the same backend
    (Ulysses solves whole problems with the same fused call)."""
    return dict(exact=exact, strategy=strategy, nq=tuple(nq), nk=tuple(nk), lead=lead, d=d, dv=dv, dtype=dtype, cost=cost,
                num_iters=num_iters, potentials=potentials, backend=backend, epsilon=epsilon,
                seed=random.SystemRandom().randrange(2**31) if seed is None else seed)


def _shard(t, lengths, rank):
    start = sum(lengths[:rank])
    return t[..., start : start + lengths[rank], :]


def check_case(c, rank, group=None):
    """`rank`: this process's rank in `group` (None: the default group)."""
    gen = torch.Generator().manual_seed(c["seed"])
    lead, d, dv, dtype = c["lead"], c["d"], c["dv"], c["dtype"]
    q = torch.randn(*lead, sum(c["nq"]), d, generator=gen).to(dtype)
    k = torch.randn(*lead, sum(c["nk"]), d, generator=gen).to(dtype)
    v = torch.randn(*lead, sum(c["nk"]), dv, generator=gen).to(dtype)
    kw = dict(num_iters=c["num_iters"], cost=c["cost"], epsilon=c["epsilon"])
    ref_out, ref_f, ref_g = asag_kernels.sinkhorn_attention(q, k, v, backend="reference", return_potentials=True, **kw)
    # Poison: the shards handed in are copies filled afterwards, so nothing of the inputs aliases the result.
    q_r, k_r, v_r = (_shard(t, c[n], rank).clone() for t, n in ((q, "nq"), (k, "nk"), (v, "nk")))
    asag_dist.reset_bytes_sent()
    got = asag_dist.sinkhorn_attention(q_r, k_r, v_r, group=group, strategy=c["strategy"], backend=c["backend"],
                                       return_potentials=c["potentials"], **kw)
    ctx = f"case {c} on rank {rank}"
    problems = math.prod(lead)
    strategy = c["strategy"]
    if strategy == "auto":
        strategy = "ulysses" if problems >= len(c["nq"]) else "ring"
    want_bytes = bytes_per_rank(strategy, rank, c["nq"], c["nk"], problems=problems, d=d, dv=dv,
                                elem=q.element_size(), pot=8 if dtype == F64 else 4, num_iters=c["num_iters"],
                                potentials=c["potentials"])
    assert asag_dist.bytes_sent() == want_bytes, f"sent {asag_dist.bytes_sent()} bytes, formula {want_bytes}: {ctx}"
    out = got[0] if c["potentials"] else got
    ref_r = _shard(ref_out, c["nq"], rank)
    assert out.shape == ref_r.shape and out.dtype == dtype and out.is_contiguous(), ctx
    assert torch.isfinite(out).all(), ctx
    if out.numel():
        err = ((out.double() - ref_r.double()).norm() / ref_r.double().norm()).item()
        assert err <= out_tolerance(dtype), f"out rel err {err:.3e}: {ctx}"
    if c["exact"]:
        single = asag_kernels.sinkhorn_attention(q, k, v, backend=c["backend"], **kw)
        assert torch.equal(out, _shard(single, c["nq"], rank)), f"not bitwise equal to the single-process op: {ctx}"
    if c["potentials"]:
        pot = F64 if dtype == F64 else F32
        for name, val, ref, lengths in (("f", got[1], ref_f, c["nq"]), ("g", got[2], ref_g, c["nk"])):
            ref_r = _shard(ref.unsqueeze(-1), lengths, rank).squeeze(-1)
            assert val.shape == ref_r.shape and val.dtype == pot, f"{name}: {ctx}"
            if val.numel():
                err = (val.double() - ref_r.double()).abs().max().item()
                assert err <= potential_tolerance(dtype), f"{name} err {err:.3e}: {ctx}"


def check_errors(rank, world):
    """Every rank raises (no rank is left waiting in a collective)."""
    q = torch.randn(1, 2, 3, 8)
    # Ranks disagree about the head dim.
    d = 8 if rank == 0 else 4
    with pytest.raises(ValueError, match="same head dim D"):
        asag_dist.sinkhorn_attention(torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, 4))
    # Ranks disagree about a keyword.
    with pytest.raises(ValueError, match="same num_iters"):
        asag_dist.sinkhorn_attention(q, q, q, num_iters=1 + rank)
    # One rank's own input is bad: it gets its own error, the others are told which rank failed.
    bad_eps = -1.0 if rank == world - 1 else 1.0
    expected = "epsilon" if rank == world - 1 else rf"rank\(s\) \[{world - 1}\]"
    with pytest.raises(ValueError, match=expected):
        asag_dist.sinkhorn_attention(q, q, q, epsilon=bad_eps)
    with pytest.raises(ValueError, match="total Nk >= 1"):
        asag_dist.sinkhorn_attention(q, q[..., :0, :], q[..., :0, :])
    with pytest.raises(ValueError, match="strategy must be one of"):
        asag_dist.sinkhorn_attention(q, q, q, strategy="tree")
    # After all that the group still works.
    out = asag_dist.sinkhorn_attention(q, q, q, num_iters=1)
    assert out.shape == q.shape


def check_subgroup(rank, world):
    """A group that is not the default one: its members run (group ranks index the shards), the
    others are told they are not members."""
    members = [0, world - 1]
    sub = dist.new_group(members)
    seed = torch.tensor([random.SystemRandom().randrange(2**31)])
    dist.broadcast(seed, 0)  # fresh inputs, the same on every rank
    if rank not in members:
        with pytest.raises(ValueError, match="not a member of the group"):
            asag_dist.sinkhorn_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                                         group=sub)
        return
    for strategy in ("ring", "ulysses"):
        check_case(case(strategy, [3, 5], [4, 2], seed=int(seed) + len(strategy)), dist.get_rank(sub), group=sub)


def _worker(rank, world, init_method, cases, with_errors):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with torch.no_grad():
            for c in cases:
                try:
                    check_case(c, rank)
                except Exception:
                    raise AssertionError(f"rank {rank}: {traceback.format_exc()}") from None
            if with_errors:
                check_errors(rank, world)
                check_subgroup(rank, world)
        # Tear down together: a rank that destroys its group (and exits) while others still talk
        # (e.g. the non-member of check_subgroup) aborted gloo in a peer once ("terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world, cases, with_errors=False):
    mp.spawn(_worker, args=(world, _rendezvous(), cases, with_errors), nprocs=world, join=True)


def test_world_1_both_strategies():
    cases = [case(s, [7], [9], cost=c, num_iters=n) for s in ("ulysses", "ring") for c, n in
             (("adversarial", 0), ("standard", 2))]
    # No queries anywhere (SPEC §5: an empty output), with and without potentials.
    empty = [case(s, [0], [9], potentials=p) for s in ("ulysses", "ring") for p in (False, True)]
    spawn(1, cases + empty + [case("ulysses", [7], [9], exact=True)])


def test_world_2_grid():
    """Both strategies × both costs × num_iters 0–3 × float32/bfloat16, uneven and empty shards."""
    cases = []
    shards = [([5, 8], [6, 3]), ([0, 9], [7, 4]), ([6, 5], [0, 11])]
    for i, (strategy, cost, n) in enumerate(
        (s, c, n) for s in ("ulysses", "ring") for c in ("adversarial", "standard") for n in range(4)
    ):
        nq, nk = shards[i % len(shards)]
        cases.append(case(strategy, nq, nk, cost=cost, num_iters=n, dtype=(F32, BF16)[i % 2],
                          potentials=i % 3 != 0))
    # Fewer problems than ranks: auto takes the ring; a single 2-D problem.
    cases.append(case("auto", [4, 6], [5, 5], lead=(1,)))
    cases.append(case("ring", [4, 6], [5, 5], lead=()))
    cases.append(case("ring", [0, 0], [5, 3], lead=(1,), potentials=True))  # no queries on any rank
    # float64 through the reference blocks and the torch backend, and a sharp epsilon.
    cases.append(case("ring", [3, 4], [4, 2], dtype=F64, backend="reference"))
    cases.append(case("ulysses", [3, 4], [4, 2], dtype=F64, backend="torch", exact=True))
    cases.append(case("ring", [9, 4], [4, 8], backend="torch", epsilon=0.1, d=32, dv=24))
    spawn(2, cases, with_errors=True)


def test_world_3_uneven_heads_and_shards():
    """Problems not divisible by the world size, empty shards, both strategies."""
    cases = [
        case("ulysses", [4, 0, 5], [3, 6, 2], lead=(1, 4)),
        case("ulysses", [2, 3, 4], [5, 0, 4], lead=(2, 1), dtype=BF16, cost="standard", num_iters=3),
        case("ulysses", [3, 3, 3], [3, 3, 3], lead=(1, 2), exact=True),  # one rank solves no problem
        case("ring", [4, 0, 5], [3, 6, 0], lead=(1, 1), num_iters=3),
        case("ring", [2, 7, 1], [5, 2, 4], dtype=BF16, num_iters=1),
        case("auto", [3, 3, 2], [4, 4, 4], lead=(1, 2), num_iters=0),
    ]
    spawn(3, cases, with_errors=True)


def test_world_4_few_cases():
    cases = [
        case("ulysses", [3, 0, 4, 2], [2, 5, 0, 3], lead=(1, 6), num_iters=2),
        case("ring", [3, 0, 4, 2], [2, 5, 0, 3], lead=(1, 3), num_iters=2, dtype=BF16),
        case("auto", [2, 2, 2, 2], [3, 3, 3, 3], lead=(1, 2), cost="standard", num_iters=1),
    ]
    spawn(4, cases)


def test_uninitialised_group_is_a_clear_error():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="not initialised.*init_process_group"):
        asag_dist.sinkhorn_attention(q, q, q)


def test_distributed_bench_smoke(tmp_path):
    """benchmarks/distributed_bench.py runs (so it cannot rot) and its byte counts match the formula."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_bench.py"
    out = tmp_path / "dist.json"
    subprocess.run([sys.executable, str(script), "--shape", "2,24,8", "--ranks", "2", "--strategies", "ring",
                    "--reps", "1", "--json", str(out)], check=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ranks"] == 2 and row["median_s"] > 0 and len(row["peak_mib_per_rank"]) == 2
    assert row["sent_bytes_per_rank"] == row["formula_bytes_per_rank"] and min(row["sent_bytes_per_rank"]) > 0

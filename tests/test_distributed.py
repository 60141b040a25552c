"""Distributed Sinkhorn attention (SPEC §9) on gloo, world sizes 1–4, against the float64 reference:
Ulysses, ring and the hybrid (over a group and over a DeviceMesh), the plan "auto" takes, the bytes
each rank sends against the formula, and the errors every rank raises together.

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
from torch.distributed.device_mesh import init_device_mesh

import asag_kernels
from asag_kernels import distributed as asag_dist
from asag_kernels.distributed.cost import bytes_per_rank
from asag_kernels.distributed.plan import plan
from asag_kernels._spec import out_tolerance, potential_tolerance

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _rendezvous() -> str:
    """A fresh file rendezvous (a TCP port picked here could be taken before the ranks bind it)."""
    fd, path = tempfile.mkstemp(prefix="asag_dist_")
    os.close(fd)
    os.unlink(path)
    return f"file://{path}"


def case(strategy, nq, nk, *, lead=(1, 2), d=16, dv=8, dtype=F32, cost="adversarial", num_iters=2,
         potentials=True, backend="auto", epsilon=1.0, exact=False, seed=None, ulysses_degree=None, mesh=False,
         expect=None):
    """One check; `exact`: also bitwise equal to the single-process op with the same backend
    (Ulysses solves whole problems with the same fused call); `mesh`: pass the worker's
    ("ring", "ulysses") DeviceMesh as the group; `expect`: the (strategy, ulysses degree) the plan
    must choose, written here rather than computed."""
    return dict(exact=exact, strategy=strategy, nq=tuple(nq), nk=tuple(nk), lead=lead, d=d, dv=dv, dtype=dtype, cost=cost,
                num_iters=num_iters, potentials=potentials, backend=backend, epsilon=epsilon,
                ulysses_degree=ulysses_degree, mesh=mesh, expect=expect,
                seed=random.SystemRandom().randrange(2**31) if seed is None else seed)


def _shard(t, lengths, rank):
    start = sum(lengths[:rank])
    return t[..., start : start + lengths[rank], :]


def check_case(c, rank, group=None):
    """`rank`: this process's shard position in `group` (None: the default group; a DeviceMesh:
    ring rank * ulysses size + ulysses rank)."""
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
                                       ulysses_degree=c["ulysses_degree"], return_potentials=c["potentials"], **kw)
    ctx = f"case {c} on rank {rank}"
    problems = math.prod(lead)
    mesh_degrees = (group.size(0), group.size(1)) if c["mesh"] else None
    chosen = plan(problems, len(c["nq"]), strategy=c["strategy"], ulysses_degree=c["ulysses_degree"],
                  mesh_degrees=mesh_degrees)
    if c["expect"] is not None:
        assert (chosen.strategy, chosen.ulysses_degree) == c["expect"], f"plan {chosen}: {ctx}"
    want_bytes = bytes_per_rank(chosen.strategy, rank, c["nq"], c["nk"], problems=problems, d=d, dv=dv,
                                elem=q.element_size(), pot=8 if dtype == F64 else 4, num_iters=c["num_iters"],
                                potentials=c["potentials"], ulysses_degree=chosen.ulysses_degree)
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


def _worker(rank, world, init_method, cases, with_errors, extra=None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with torch.no_grad():
            mesh = None
            if any(c["mesh"] for c in cases):
                # As diffusers builds it for ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2).
                mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ring", "ulysses"))
            for c in cases:
                try:
                    check_case(c, rank, group=mesh if c["mesh"] else None)
                except Exception:
                    raise AssertionError(f"rank {rank}: {traceback.format_exc()}") from None
            if with_errors:
                check_errors(rank, world)
                check_subgroup(rank, world)
            if extra is not None:
                try:
                    extra(rank, world)
                except Exception:
                    raise AssertionError(f"rank {rank}: {traceback.format_exc()}") from None
        # Tear down together: a rank that destroys its group (and exits) while others still talk
        # (e.g. the non-member of check_subgroup) aborted gloo in a peer once ("terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world, cases, with_errors=False, extra=None):
    mp.spawn(_worker, args=(world, _rendezvous(), cases, with_errors, extra), nprocs=world, join=True)


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
    # torch backend: its batched GEMMs see fewer heads per rank than the single-process call, and their
    # rounding may depend on the batch shape: SPEC §4's float64 tolerance only (cpu cases stay exact).
    cases.append(case("ulysses", [3, 4], [4, 2], dtype=F64, backend="torch"))
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


def test_world_4_ulysses_ring_hybrid():
    """Ulysses 4, ring 4 and hybrid 2 x 2 (over the group and over a DeviceMesh) against the
    single-process reference: both costs, uneven shards with an empty one, potentials, bf16; then
    what "auto" picks; then the errors every rank raises together."""
    shards = [([3, 0, 4, 2], [2, 5, 0, 3]), ([2, 5, 1, 0], [4, 0, 3, 3]), ([0, 0, 5, 3], [4, 0, 0, 6])]
    cases = []
    for i, (strategy, cost) in enumerate((s, c) for s in ("ulysses", "ring", "hybrid") for c in ("adversarial", "standard")):
        nq, nk = shards[i % len(shards)]
        expect = {"ulysses": ("ulysses", 4), "ring": ("ring", 1), "hybrid": ("hybrid", 2)}[strategy]
        cases.append(case(strategy, nq, nk, lead=(1, 6) if strategy != "ring" else (1, 3), cost=cost, num_iters=1 + i % 3,
                          dtype=(F32, BF16)[i % 2], potentials=i % 3 != 2, ulysses_degree=2 if strategy == "hybrid" else None,
                          expect=expect))
    cases += [
        case("hybrid", [0, 0, 5, 3], [4, 0, 0, 6], lead=(2, 3), ulysses_degree=2, num_iters=0, expect=("hybrid", 2)),
        case("hybrid", [4, 1, 0, 3], [2, 2, 5, 0], ulysses_degree=2, num_iters=3, epsilon=0.3, backend="torch"),
        case("hybrid", [3, 0, 4, 2], [2, 5, 0, 3], mesh=True, num_iters=2, expect=("hybrid", 2)),
        case("auto", [2, 3, 0, 4], [3, 3, 3, 3], lead=(2, 2), mesh=True, cost="standard", dtype=BF16, potentials=False,
             expect=("hybrid", 2)),
        case("ulysses", [3, 0, 4, 2], [2, 5, 0, 3], lead=(1, 4), exact=True, expect=("ulysses", 4)),
        # What "auto" takes (P = problems on 4 ranks), and degenerate hybrids.
        case("auto", [2, 2, 2, 2], [3, 3, 3, 3], lead=(1, 2), cost="standard", num_iters=1, expect=("hybrid", 2)),
        case("auto", [2, 1, 2, 2], [3, 3, 1, 3], lead=(2, 2), expect=("ulysses", 4)),
        case("auto", [1, 2, 2, 2], [3, 3, 3, 1], lead=(3,), expect=("ring", 1)),
        case("auto", [2, 2, 2, 1], [3, 2, 3, 3], lead=(1, 5), num_iters=1, expect=("ulysses", 4)),
        case("auto", [2, 2, 2, 1], [3, 2, 3, 3], lead=(1, 4), ulysses_degree=4, expect=("ulysses", 4)),
        case("hybrid", [2, 2, 2, 1], [3, 2, 3, 3], lead=(1, 3), ulysses_degree=1, expect=("ring", 1)),
        case("ring", [0, 0, 0, 0], [2, 2, 2, 1], potentials=True, expect=("ring", 1)),  # no queries on any rank
        case("hybrid", [0, 0, 0, 0], [2, 2, 2, 1], ulysses_degree=2, potentials=True, expect=("hybrid", 2)),
    ]
    spawn(4, cases, extra=check_hybrid_errors_and_joint)


def check_joint(rank, world):
    """Joint text + image attention over shards [text_r, image_r] (or [image_r, text_r]) against the
    float64 single-process joint op on [every rank's text, every rank's image] (SPEC §10)."""
    from asag_kernels.joint import joint_sinkhorn_attention

    seed = torch.tensor([random.SystemRandom().randrange(2**31)])
    dist.broadcast(seed, 0)  # fresh inputs, the same on every rank
    gen = torch.Generator().manual_seed(int(seed))
    text, image = [2, 0, 3, 1], [3, 4, 0, 2]
    b, h, d = 1, 4, 8
    qkv_t = [torch.randn(b, h, sum(text), d, generator=gen) for _ in range(3)]
    qkv_i = [torch.randn(b, h, sum(image), d, generator=gen) for _ in range(3)]
    full = [torch.cat([t, i], 2) for t, i in zip(qkv_t, qkv_i)]
    t0, i0 = sum(text[:rank]), sum(image[:rank])
    for mode, image_first, kw in (("image", False, dict(strategy="hybrid", ulysses_degree=2)),
                                  ("image", True, dict(strategy="ring")), ("joint", False, {})):
        ref = joint_sinkhorn_attention(*(x.double() for x in full), image_start=sum(text), image_stop=sum(text + image),
                                       joint_mode=mode, num_iters=2, epsilon=0.7, backend="reference")
        mine_t = [x[:, :, t0 : t0 + text[rank]] for x in qkv_t]
        mine_i = [x[:, :, i0 : i0 + image[rank]] for x in qkv_i]
        parts = (mine_i, mine_t) if image_first else (mine_t, mine_i)
        local = [torch.cat([a, c], 2) for a, c in zip(*parts)]
        start = 0 if image_first else text[rank]
        got = asag_dist.joint_sinkhorn_attention(*local, image_start=start, image_stop=start + image[rank],
                                                 joint_mode=mode, num_iters=2, epsilon=0.7, **kw)
        ref_t = ref[:, :, t0 : t0 + text[rank]]
        ref_i = ref[:, :, sum(text) + i0 : sum(text) + i0 + image[rank]]
        want = torch.cat([ref_i, ref_t] if image_first else [ref_t, ref_i], 2)
        assert got.shape == want.shape and got.dtype == F32, (mode, image_first)
        if want.numel():
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err <= out_tolerance(F32), f"joint_mode={mode} image_first={image_first}: rel err {err:.3e}"
    # Bad local arguments and disagreement raise on every rank.
    q = torch.randn(1, 2, 3, 8)
    expected = "image_start and image_stop" if rank == 3 else r"rank\(s\) \[3\]"
    with pytest.raises(ValueError, match=expected):
        asag_dist.joint_sinkhorn_attention(q, q, q, image_start=0, image_stop=4 if rank == 3 else 3)
    with pytest.raises(ValueError, match="same joint_mode"):
        asag_dist.joint_sinkhorn_attention(q, q, q, image_start=0, image_stop=3, joint_mode=("image", "joint")[rank % 2])
    with pytest.raises(ValueError, match="at least one image token over all ranks"):
        asag_dist.joint_sinkhorn_attention(q, q, q, image_start=1, image_stop=1)


def check_hybrid_errors_and_joint(rank, world):
    check_hybrid_errors(rank, world)
    check_joint(rank, world)


def check_hybrid_errors(rank, world):
    """Bad hybrid arguments: every rank raises (no rank is left waiting in a collective)."""
    q = torch.randn(1, 4, 3, 8)
    for kw, match in (
        (dict(strategy="hybrid", ulysses_degree=3), "ulysses_degree=3 must divide the world size 4"),
        (dict(strategy="hybrid"), "needs ulysses_degree"),
        (dict(strategy="ring", ulysses_degree=2), "applies to strategy='hybrid' or 'auto'"),
        (dict(strategy="hybrid", ulysses_degree=True), "ulysses_degree must be None or a positive int"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            asag_dist.sinkhorn_attention(q, q, q, **kw)
    with pytest.raises(ValueError, match="must divide the problems .* got 3 problems"):
        q3 = torch.randn(1, 3, 3, 8)
        asag_dist.sinkhorn_attention(q3, q3, q3, strategy="hybrid", ulysses_degree=2)
    # Ranks disagree about the degree, or about anything but the shard lengths.
    with pytest.raises(ValueError, match="same ulysses_degree"):
        asag_dist.sinkhorn_attention(q, q, q, strategy="hybrid", ulysses_degree=2 if rank else 4)
    lead = (1, 4) if rank != 2 else (2, 2)
    with pytest.raises(ValueError, match="same leading dims"):
        t = torch.randn(*lead, 3, 8)
        asag_dist.sinkhorn_attention(t, t, t, strategy="hybrid", ulysses_degree=2)
    # One rank's own degree is bad: it gets its own error, the others are told which rank failed.
    expected = "ulysses_degree must be None or a positive int" if rank == 1 else r"rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        asag_dist.sinkhorn_attention(q, q, q, strategy="hybrid", ulysses_degree=0 if rank == 1 else 2)
    # DeviceMeshes: wrong dim names, a strategy using one dim of two, a contradicting degree.
    other = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match="dims named 'ring' and 'ulysses'.*'dp', 'tp'"):
        asag_dist.sinkhorn_attention(q, q, q, group=other)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    with pytest.raises(ValueError, match="strategy='ulysses' cannot run on a DeviceMesh of ring 2 x ulysses 2"):
        asag_dist.sinkhorn_attention(q, q, q, group=mesh, strategy="ulysses")
    with pytest.raises(ValueError, match="ulysses_degree=4 contradicts the DeviceMesh"):
        asag_dist.sinkhorn_attention(q, q, q, group=mesh, ulysses_degree=4)
    with pytest.raises(TypeError, match="group must be None, a torch.distributed ProcessGroup or a DeviceMesh"):
        asag_dist.sinkhorn_attention(q, q, q, group="world")
    # After all that the group and the mesh still work.
    assert asag_dist.sinkhorn_attention(q, q, q, group=mesh, num_iters=1).shape == q.shape
    assert asag_dist.sinkhorn_attention(q, q, q, strategy="hybrid", ulysses_degree=2).shape == q.shape


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
    subprocess.run([sys.executable, str(script), "--shape", "2,24,8", "--ranks", "4", "--strategies", "hybrid",
                    "--ulysses-degree", "2", "--reps", "1", "--json", str(out)], check=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ranks"] == 4 and row["strategy"] == "hybrid U2xR2" and row["median_s"] > 0
    assert len(row["peak_mib_per_rank"]) == 4
    assert row["sent_bytes_per_rank"] == row["formula_bytes_per_rank"] and min(row["sent_bytes_per_rank"]) > 0

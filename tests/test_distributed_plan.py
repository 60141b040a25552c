"""The distributed plan (SPEC §9): what "auto" picks, the degrees, the errors; and the byte formula's
degenerate cases. Pure functions: no process group. (The gloo tests in test_distributed.py check
that the op runs what the plan says and sends what the formula says.)"""

from __future__ import annotations

import pytest

from asag_kernels import distributed as asag_dist
from asag_kernels.distributed.cost import bytes_per_rank


def _degrees(p):
    return p.strategy, p.ulysses_degree, p.ring_degree


@pytest.mark.parametrize(
    "problems, world, want",
    [
        (24, 8, ("ulysses", 8, 1)),  # Flux/Wan 14B heads on one 8-GPU node
        (24, 16, ("hybrid", 8, 2)),  # two nodes: Ulysses cannot go past 24 heads evenly
        (24, 64, ("hybrid", 8, 8)),
        (12, 8, ("hybrid", 4, 2)),
        (40, 64, ("hybrid", 8, 8)),
        (5, 4, ("ulysses", 4, 1)),  # no common divisor, enough problems: uneven shares
        (3, 4, ("ring", 1, 4)),  # no common divisor, too few problems
        (1, 2, ("ring", 1, 2)),
        (7, 1, ("ulysses", 1, 1)),
        (0, 4, ("ulysses", 4, 1)),
    ],
)
def test_auto(problems, world, want):
    p = asag_dist.plan(problems, world)
    assert _degrees(p) == want
    assert p.world == world and p.problems == problems and p.reason.startswith("auto")


def test_explicit_and_degenerate():
    assert _degrees(asag_dist.plan(3, 4, strategy="ulysses")) == ("ulysses", 4, 1)
    assert _degrees(asag_dist.plan(24, 4, strategy="ring")) == ("ring", 1, 4)
    assert _degrees(asag_dist.plan(24, 16, strategy="hybrid", ulysses_degree=4)) == ("hybrid", 4, 4)
    # Degenerate hybrids run as what they are.
    assert _degrees(asag_dist.plan(8, 4, strategy="hybrid", ulysses_degree=4)) == ("ulysses", 4, 1)
    assert _degrees(asag_dist.plan(8, 4, strategy="hybrid", ulysses_degree=1)) == ("ring", 1, 4)
    # "auto" with a degree fixed takes it.
    assert _degrees(asag_dist.plan(8, 8, ulysses_degree=2)) == ("hybrid", 2, 4)
    # A DeviceMesh's degrees (ring, ulysses) decide.
    assert _degrees(asag_dist.plan(24, 8, mesh_degrees=(2, 4))) == ("hybrid", 4, 2)
    assert _degrees(asag_dist.plan(24, 4, mesh_degrees=(1, 4))) == ("ulysses", 4, 1)
    assert _degrees(asag_dist.plan(24, 4, mesh_degrees=(4, 1), strategy="ring")) == ("ring", 1, 4)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((8, 4), dict(strategy="hybrid", ulysses_degree=3), ValueError, "ulysses_degree=3 must divide the world size 4"),
        ((6, 8), dict(strategy="hybrid", ulysses_degree=4), ValueError, "must divide the problems .* got 6 problems"),
        ((8, 4), dict(strategy="hybrid"), ValueError, "needs ulysses_degree"),
        ((8, 4), dict(strategy="ulysses", ulysses_degree=2), ValueError, "applies to strategy='hybrid' or 'auto'"),
        ((8, 4), dict(ulysses_degree=0), ValueError, "ulysses_degree must be None or a positive int, got 0"),
        ((8, 4), dict(ulysses_degree=2.0), TypeError, "ulysses_degree must be None or a positive int, got float"),
        ((8, 4), dict(strategy="tree"), ValueError, "strategy must be one of"),
        ((8, 4), dict(strategy=None), TypeError, "strategy must be one of"),
        ((8, 0), {}, ValueError, "world must be an int >= 1, got 0"),
        (("8", 4), {}, TypeError, "problems must be an int, got str"),
        ((8, 4), dict(mesh_degrees=(2, 2), ulysses_degree=4), ValueError, "contradicts the DeviceMesh"),
        ((8, 4), dict(mesh_degrees=(2, 2), strategy="ring"), ValueError, "strategy='ring' cannot run on a DeviceMesh"),
        ((6, 8), dict(mesh_degrees=(2, 4)), ValueError, "ulysses_degree=4 must divide the problems"),
    ],
)
def test_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        asag_dist.plan(*args, **kwargs)


def test_bytes_of_degenerate_hybrids():
    """A hybrid with U = W sends what Ulysses does, with U = 1 what the ring does; the hybrid 2 x 2
    sends Ulysses among 2 plus the ring over 2 blocks of half the problems."""
    nq, nk = [3, 0, 4, 2], [2, 5, 0, 3]
    kw = dict(problems=4, d=16, dv=8, elem=4, pot=4, num_iters=2, potentials=True)
    for r in range(4):
        assert bytes_per_rank("hybrid", r, nq, nk, ulysses_degree=4, **kw) == bytes_per_rank("ulysses", r, nq, nk, **kw)
        assert bytes_per_rank("hybrid", r, nq, nk, ulysses_degree=1, **kw) == bytes_per_rank("ring", r, nq, nk, **kw)
    row = 8 * 25 * 3  # the shape row to 3 other ranks
    # Rank 0 (set 0 = shards 0, 1; ring index 0): Ulysses among [3, 0] / [2, 5] with 2 problems each,
    # then the ring over blocks nq [3, 6], nk [7, 3] with 2 problems.
    ulysses = 2 * (3 * 16 + 2 * 24) * 4 + 2 * 0 * 8 * 4 + 2 * (0 + 5) * 4
    # Peer 0 forwards every block but peer 1's: 10 - 3 = 7 keys, 9 - 6 = 3 queries.
    ring = 2 * 7 * 2 * (16 * 4 + 4) + 2 * 3 * 2 * (16 * 4 + 4) + 7 * 2 * (24 * 4 + 4)
    assert bytes_per_rank("hybrid", 0, nq, nk, ulysses_degree=2, **kw) == row + ulysses + ring
    with pytest.raises(ValueError, match="ulysses_degree must be a divisor of the world size 4"):
        bytes_per_rank("hybrid", 0, nq, nk, ulysses_degree=3, **kw)


def test_distributed_model_is_consistent():
    """benchmarks/distributed_model.py (the docs/PERF.md model): its bytes are the formula's, split
    over the two kinds of link, its "auto" rows are what plan() picks, and no row is faster than its
    compute or than its slowest link alone."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_model.py"
    spec = importlib.util.spec_from_file_location("distributed_model", path)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    args = SimpleNamespace(iters=2, tflops=640.0, nvlink_gbs=450.0, ib_gbs=50.0)
    table = model.rows(args)
    assert {r["gpus"] for r in table} == {8, 16, 32, 64} and {r["shape"] for r in table} == {"video-32k", "video-100k"}
    for r in table:
        shards = model._even(r["tokens"], r["gpus"])
        sent = bytes_per_rank(r["strategy"], 0, shards, shards, problems=r["heads"], d=128, dv=128, elem=2, pot=4,
                              num_iters=2, potentials=False, ulysses_degree=r["ulysses_degree"])
        row_bytes = 8 * 25 * (r["gpus"] - 1)
        assert abs((r["nvlink_mb"] + r["ib_mb"]) * 1e6 - (sent - row_bytes)) < 1.0, r
        assert r["time_ms"] >= r["compute_ms"] and r["time_ms"] * 1e-3 >= r["ib_mb"] * 1e6 / 50e9 * 0.999, r
        p = asag_dist.plan(r["heads"], r["gpus"])
        assert r["auto"] == ((r["strategy"], r["ulysses_degree"]) == (p.strategy, p.ulysses_degree)), r
    assert "| model |" in model.markdown(table)

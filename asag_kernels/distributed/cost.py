"""Bytes each rank sends in one distributed call (what ``bytes_sent()`` counts), from the shapes.

Notation: W ranks, P problems (product of the leading dims), shard lengths nq_s / nk_s with totals
Nq / Nk, element size e (q's dtype) and potential size p (4; 8 for float64), T = num_iters.

Ring over W' peers holding shards n_s of P' problems: a pass forwards W'-1 shards; peer r forwards
every shard but the one of peer r+1, so it sends (N - n_{r+1}) tokens' worth per pass:

    row pass    (k, g):     P'·(D·e + p) per key        T passes (one more for f when T = 0 and f is returned)
    column pass (q, f):     P'·(D·e + p) per query      T passes
    final pass  (k, v, g):  P'·((D + Dv)·e + p) per key  1 pass

Ulysses among U peers: peer r sends its rows of every other peer's problems,
h_s·(nq_r·D + nk_r·(D + Dv))·e to peer s, and returns h_r·nq_s·Dv·e of output to each peer s (and
h_r·(nq_s + nk_s)·p of potentials when asked), where h_s = problems peer s solves.

Strategies (ulysses degree U, ring degree R = W / U, rank r = i·U + j): "ulysses" is Ulysses among
all W ranks (U = W); "ring" the ring over all W shards with P' = P (U = 1); "hybrid" is Ulysses
among set i's U shards plus the ring over the R blocks (block b = the concatenated shards of set b)
with P' = P / U. All add the shape exchange: one row of ROW_LEN float64 to each other rank; nothing
else when Nq = 0 or P = 0 (nothing to solve).
Even shards, Nq = Nk = N: ring ≈ (W-1)/W · P·N·[2T(D·e + p) + (D + Dv)·e + p];
Ulysses ≈ (W-1)/W · P·N/W · (2D + 2Dv)·e (+ 2p with potentials);
hybrid ≈ (U-1)/U · P·N/W · (2D + 2Dv)·e + (R-1)/R · P/U·N/R · [2T(D·e + p) + (D + Dv)·e + p].
"""

from __future__ import annotations

from .shapes import ROW_LEN
from .ulysses import problem_split


def _ring_passes(index, nq, nk, *, problems, d, dv, elem, pot, num_iters, potentials) -> list[int]:
    """Bytes peer `index` forwards in each pass of the ring, in order: (row, column) x T, final."""
    world = len(nq)
    nxt = (index + 1) % world
    keys, queries = sum(nk) - nk[nxt], sum(nq) - nq[nxt]
    row = keys * problems * (d * elem + pot)
    passes = [row] if num_iters == 0 and potentials else []
    passes += [row, queries * problems * (d * elem + pot)] * num_iters
    return passes + [keys * problems * ((d + dv) * elem + pot)]


def _ulysses(index, nq, nk, *, problems, d, dv, elem, pot, potentials) -> int:
    heads, total = problem_split(problems, len(nq)), 0
    for s in range(len(nq)):
        if s == index:
            continue
        total += heads[s] * (nq[index] * d + nk[index] * (d + dv)) * elem
        total += heads[index] * nq[s] * dv * elem
        if potentials:
            total += heads[index] * (nq[s] + nk[s]) * pot
    return total


def stage_bytes(strategy: str, rank: int, nq, nk, *, problems: int, d: int, dv: int, elem: int, pot: int,
                num_iters: int, potentials: bool, ulysses_degree: int | None = None) -> dict:
    """What rank `rank` (shard position) sends in one call, by stage: ``{"shapes": the shape row,
    "ulysses": both all-to-alls, "ring": [bytes of each ring pass]}`` (see the module docstring),
    for the strategy that ran (``plan(...).strategy``; "hybrid" with its ``ulysses_degree``) with
    shard lengths `nq`, `nk` (one per rank)."""
    world = len(nq)
    stages = dict(shapes=ROW_LEN * 8 * (world - 1), ulysses=0, ring=[])
    if strategy not in ("ulysses", "ring", "hybrid"):
        raise ValueError(f"strategy must be 'ulysses', 'ring' or 'hybrid', got {strategy!r}")
    if sum(nq) == 0 or problems == 0:  # nothing to solve: the empty output needs no transfer
        return stages
    u = {"ulysses": world, "ring": 1}.get(strategy, ulysses_degree)
    if not isinstance(u, int) or u < 1 or world % u:
        raise ValueError(f"ulysses_degree must be a divisor of the world size {world}, got {u!r}")
    i, j = divmod(rank, u)
    sets = [range(b * u, (b + 1) * u) for b in range(world // u)]
    if u > 1:
        stages["ulysses"] = _ulysses(j, [nq[s] for s in sets[i]], [nk[s] for s in sets[i]], problems=problems, d=d,
                                     dv=dv, elem=elem, pot=pot, potentials=potentials)
    if strategy != "ulysses":
        stages["ring"] = _ring_passes(i, [sum(nq[s] for s in b) for b in sets], [sum(nk[s] for s in b) for b in sets],
                                      problems=problem_split(problems, u)[j], d=d, dv=dv, elem=elem, pot=pot,
                                      num_iters=num_iters, potentials=potentials)
    return stages


def bytes_per_rank(strategy: str, rank: int, nq, nk, **kwargs) -> int:
    """Bytes rank `rank` sends in one call: the sum of :func:`stage_bytes` (same arguments)."""
    stages = stage_bytes(strategy, rank, nq, nk, **kwargs)
    return stages["shapes"] + stages["ulysses"] + sum(stages["ring"])

"""Bytes each rank sends in one distributed call (what ``bytes_sent()`` counts), from the shapes.

Notation: W ranks, P problems (product of the leading dims), shard lengths nq_s / nk_s with totals
Nq / Nk, element size e (q's dtype) and potential size p (4; 8 for float64), T = num_iters.

Ring: a pass forwards W-1 shards; rank r forwards every shard but the one of rank r+1, so it sends
(N - n_{r+1}) tokens' worth per pass:

    row pass    (k, g):     P·(D·e + p) per key        T passes (one more for f when T = 0 and f is returned)
    column pass (q, f):     P·(D·e + p) per query      T passes
    final pass  (k, v, g):  P·((D + Dv)·e + p) per key  1 pass

Ulysses: rank r sends its rows of every other rank's problems, h_s·(nq_r·D + nk_r·(D + Dv))·e to
rank s, and returns h_r·nq_s·Dv·e of output to each rank s (and h_r·(nq_s + nk_s)·p
of potentials when asked), where h_s = problems rank s solves.

Both add the shape exchange: one row of ROW_LEN float64 to each other rank.
Even shards, Nq = Nk = N: ring ≈ (W-1)/W · P·N·[2T(D·e + p) + (D + Dv)·e + p];
Ulysses ≈ (W-1)/W · P·N/W · (2D + 2Dv)·e (+ 2p with potentials).
"""

from __future__ import annotations

from .shapes import ROW_LEN
from .ulysses import problem_split


def bytes_per_rank(strategy: str, rank: int, nq, nk, *, problems: int, d: int, dv: int, elem: int, pot: int,
                   num_iters: int, potentials: bool) -> int:
    """Bytes rank `rank` sends in one call with shard lengths `nq`, `nk` (one per rank)."""
    world = len(nq)
    total = ROW_LEN * 8 * (world - 1)
    if strategy == "ring":
        if world == 1 or sum(nq) == 0:  # nothing to solve: the empty output needs no transfer
            return total
        nxt = (rank + 1) % world
        keys, queries = sum(nk) - nk[nxt], sum(nq) - nq[nxt]
        row_passes = num_iters + (1 if num_iters == 0 and potentials else 0)
        total += row_passes * keys * problems * (d * elem + pot)
        total += num_iters * queries * problems * (d * elem + pot)
        total += keys * problems * ((d + dv) * elem + pot)
        return total
    if strategy != "ulysses":
        raise ValueError(f"strategy must be 'ring' or 'ulysses', got {strategy!r}")
    heads = problem_split(problems, world)
    for s in range(world):
        if s == rank:
            continue
        total += heads[s] * (nq[rank] * d + nk[rank] * (d + dv)) * elem
        total += heads[rank] * nq[s] * dv * elem
        if potentials:
            total += heads[rank] * (nq[s] + nk[s]) * pot
    return total

"""Ulysses: trade the sequence shard for a share of the problems among a set of peers, and back.

The leading dims are flattened into P independent problems (batch × heads); peer s of a set of U
solves problems ``[p_s, p_s + h_s)`` with ``h_s = P // U`` (+1 for the first ``P % U`` peers), so P
need not divide by U (peers with ``h_s = 0`` only relay). One uneven ``all_to_all_single`` carries
q, k and v (flattened, concatenated per destination) and leaves each peer the set's whole
concatenated sequence for its problems; :func:`to_rows` carries a result back (out; f and g when
asked), each peer getting its own rows of every problem.
"""

from __future__ import annotations

import torch

from .comm import Peers, all_to_all
from .shapes import Layout


def problem_split(problems: int, world: int) -> list[int]:
    """How many of the flattened leading-dim problems each of `world` peers solves."""
    base, extra = divmod(problems, world)
    return [base + (1 if s < extra else 0) for s in range(world)]


def to_heads(q3, k3, v3, nq, nk, peers: Peers):
    """This peer's problems over the set's whole sequence.

    Args:
        q3, k3, v3: ``[P, nq[me], D]``, ``[P, nk[me], D]``, ``[P, nk[me], Dv]``: this peer's shard.
        nq, nk: every peer's shard lengths, in shard order.

    Returns:
        ``[h, Σ nq, D]``, ``[h, Σ nk, D]``, ``[h, Σ nk, Dv]`` with h = this peer's problem count.
    """
    me, u = peers.index, peers.size
    d, dv = q3.shape[-1], v3.shape[-1]
    heads = problem_split(q3.shape[0], u)
    hoff = Layout.offsets(heads)
    h = heads[me]

    def mine(t, s):
        return t[hoff[s] : hoff[s] + heads[s]]

    sends = [torch.cat([mine(t, s).reshape(-1) for t in (q3, k3, v3)]) for s in range(u)]
    recv_numels = [h * (nq[s] * d + nk[s] * (d + dv)) for s in range(u)]
    pieces = all_to_all(sends, recv_numels, peers)
    del sends
    qs, ks, vs = [], [], []
    for s, piece in enumerate(pieces):
        a, b = h * nq[s] * d, h * nk[s] * d
        qs.append(piece[:a].view(h, nq[s], d))
        ks.append(piece[a : a + b].view(h, nk[s], d))
        vs.append(piece[a + b :].view(h, nk[s], dv))
    return torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)


def to_rows(t, lengths, problems: int, peers: Peers):
    """The inverse trade for a result: ``t`` ``[h, Σ lengths, width]`` (this peer's problems over the
    set's sequence) -> ``[problems, lengths[me], width]`` (this peer's rows of every problem)."""
    me, u = peers.index, peers.size
    heads = problem_split(problems, u)
    width = t.shape[-1]
    offsets = Layout.offsets(lengths)
    sends = [t[:, offsets[s] : offsets[s] + lengths[s]] for s in range(u)]
    got = all_to_all(sends, [heads[s] * lengths[me] * width for s in range(u)], peers)
    return torch.cat([p.view(heads[s], lengths[me], width) for s, p in enumerate(got)], 0)

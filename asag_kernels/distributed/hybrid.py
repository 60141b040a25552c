"""Every strategy as one composition: Ulysses inside a set of U consecutive ranks, then the fused op
(ring degree 1) or a ring across the R sets, then Ulysses back (SPEC §9).

With Ulysses degree U and ring degree R = W / U, the rank at shard position ``r = i·U + j`` (ring
index i, Ulysses index j, :mod:`.topology`):

1. all-to-all within Ulysses set i: its U shards (block i of the sequence, consecutive) for the
   problems ``[p_j, p_j + h_j)`` (``h_j = P / U``; uneven shares only for plain Ulysses);
2. R = 1 (``"ulysses"``): the fused single-process op on those whole sequences; R > 1: the ring
   (:mod:`.ring`) over ring set j, whose members hold blocks 0..R-1 of the same problems;
3. all-to-all back within set i: each rank its own rows of every problem (out; f, g when asked).

U = 1 skips steps 1 and 3 (``"ring"``). Nothing is transferred when there is nothing to solve
(no queries on any rank, or no problems): every rank sees the same totals.
"""

from __future__ import annotations

import torch

from .. import backends
from ..api import sinkhorn_attention as _single_process
from ..ops import potential_dtype
from . import ring, ulysses
from .plan import Plan
from .shapes import Layout
from .topology import Topology


def _empty(q, layout: Layout, need_potentials):
    lead, r = tuple(q.shape[:-2]), layout.rank
    out = q.new_empty(lead + (layout.nq[r], layout.dv))
    if not need_potentials:
        return out, None, None
    pot = potential_dtype(q.dtype)
    return out, q.new_empty(lead + (layout.nq[r],), dtype=pot), torch.zeros(lead + (layout.nk[r],), dtype=pot,
                                                                              device=q.device)


def _fused(qh, kh, vh, *, num_iters, cost, scale, epsilon, backend):
    """The single-process op on whole sequences (h may be 0: a peer that only relays)."""
    if qh.shape[0]:
        return _single_process(qh, kh, vh, num_iters=num_iters, cost=cost, scale=scale, epsilon=epsilon,
                               backend=backend, return_potentials=True)
    pot = potential_dtype(qh.dtype)
    return (qh.new_empty(qh.shape[:-1] + (vh.shape[-1],)), qh.new_empty(qh.shape[:-1], dtype=pot),
            qh.new_empty(kh.shape[:-1], dtype=pot))


def run(q, k, v, layout: Layout, plan: Plan, topology: Topology, *, num_iters, cost, scale, epsilon, backend,
        need_potentials):
    """This rank's rows of the result: ``out`` ``[..., nq_r, Dv]``, ``f`` ``[..., nq_r]``,
    ``g`` ``[..., nk_r]`` (f, g None unless `need_potentials`)."""
    lead, d, dv, problems = tuple(q.shape[:-2]), layout.d, layout.dv, layout.heads
    if sum(layout.nq) == 0 or problems == 0:  # SPEC §5: an empty output, no transfer
        return _empty(q, layout, need_potentials)
    u, big_r = plan.ulysses_degree, plan.ring_degree
    # Resolve the kernels before any transfer: every rank fails alike if they cannot run here.
    if plan.strategy == "ulysses":
        if backend != "auto":
            backends.resolve(backend, q.device, q.dtype, max(d, dv))
    else:
        names = ring.block_backends(backend, q.device, q.dtype, d, dv)
    ring_peers, ulysses_peers = topology.peers(u)
    i = layout.rank // u
    # Shard lengths of this rank's Ulysses set, and of every block (a set's shards concatenated).
    set_nq, set_nk = layout.nq[i * u : (i + 1) * u], layout.nk[i * u : (i + 1) * u]
    block_nq = [sum(layout.nq[b * u : (b + 1) * u]) for b in range(big_r)]
    block_nk = [sum(layout.nk[b * u : (b + 1) * u]) for b in range(big_r)]

    q3, k3, v3 = (t.reshape((problems,) + t.shape[-2:]) for t in (q, k, v))
    if u > 1:
        q3, k3, v3 = ulysses.to_heads(q3, k3, v3, set_nq, set_nk, ulysses_peers)
    kw = dict(num_iters=num_iters, cost=cost, scale=scale, epsilon=epsilon)
    if plan.strategy == "ulysses":
        out, f, g = _fused(q3, k3, v3, backend=backend, **kw)
    else:
        out, f, g = ring.run(q3, k3, v3, block_nq, block_nk, ring_peers, names=names, need_potentials=need_potentials,
                             **kw)
    del q3, k3, v3
    if u > 1:
        out = ulysses.to_rows(out, set_nq, problems, ulysses_peers)
        if need_potentials:
            f = ulysses.to_rows(f.unsqueeze(-1), set_nq, problems, ulysses_peers).squeeze(-1)
            g = ulysses.to_rows(g.unsqueeze(-1), set_nk, problems, ulysses_peers).squeeze(-1)
    r = layout.rank
    out = out.reshape(lead + (layout.nq[r], dv)).contiguous()
    if not need_potentials:
        return out, None, None
    return out, f.reshape(lead + (layout.nq[r],)), g.reshape(lead + (layout.nk[r],))

"""Ulysses: trade the sequence shard for a shard of the problems, solve whole sequences, trade back.

The leading dims are flattened into P = prod(lead) independent problems (batch × heads); rank s
solves problems [p_s, p_s + h_s) with h_s = P // W (+1 for the first P % W ranks), so P need not
divide by the world size W (ranks with h_s = 0 only relay). One uneven ``all_to_all_single``
carries q, k and v (flattened, concatenated per destination); one carries out back and, when asked,
one more carries f and g (float32/float64).
"""

from __future__ import annotations

import torch

from .. import backends
from ..api import sinkhorn_attention as _single_process
from ..ops import potential_dtype
from .comm import all_to_all
from .shapes import Layout


def problem_split(problems: int, world: int) -> list[int]:
    """How many of the flattened leading-dim problems each rank solves."""
    base, extra = divmod(problems, world)
    return [base + (1 if s < extra else 0) for s in range(world)]


def run(q, k, v, layout: Layout, *, group, num_iters, cost, scale, epsilon, backend, need_potentials):
    r, world, d, dv = layout.rank, layout.world, layout.d, layout.dv
    nq_tot, nk_tot = sum(layout.nq), sum(layout.nk)
    lead = tuple(q.shape[:-2])
    heads = problem_split(layout.heads, world)
    hoff = Layout.offsets(heads)
    # Resolve before any transfer: every rank fails alike if the backend cannot run here.
    if backend != "auto":
        backends.resolve(backend, q.device, q.dtype, max(d, dv))
    q3, k3, v3 = (t.reshape((layout.heads,) + t.shape[-2:]) for t in (q, k, v))

    def mine(t, s):
        return t[hoff[s] : hoff[s] + heads[s]]

    sends = [torch.cat([mine(t, s).reshape(-1) for t in (q3, k3, v3)]) for s in range(world)]
    recv_numels = [heads[r] * (layout.nq[s] * d + layout.nk[s] * (d + dv)) for s in range(world)]
    pieces = all_to_all(sends, recv_numels, r, group)
    del sends
    qs, ks, vs = [], [], []
    for s, piece in enumerate(pieces):
        a, b = heads[r] * layout.nq[s] * d, heads[r] * layout.nk[s] * d
        qs.append(piece[:a].view(heads[r], layout.nq[s], d))
        ks.append(piece[a : a + b].view(heads[r], layout.nk[s], d))
        vs.append(piece[a + b :].view(heads[r], layout.nk[s], dv))
    pot = potential_dtype(q.dtype)
    if heads[r]:
        out, f, g = _single_process(
            torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1), num_iters=num_iters, cost=cost, scale=scale,
            epsilon=epsilon, backend=backend, return_potentials=True,
        )
    else:
        out = q.new_empty((0, nq_tot, dv))
        f, g = q.new_empty((0, nq_tot), dtype=pot), q.new_empty((0, nk_tot), dtype=pot)
    del qs, ks, vs, pieces
    qoff, koff = Layout.offsets(layout.nq), Layout.offsets(layout.nk)

    def back(t, offsets, lengths, width):
        """Rows of every rank's shard to that rank; this rank's rows of every problem back."""
        sends = [t[:, offsets[s] : offsets[s] + lengths[s]] for s in range(world)]
        got = all_to_all(sends, [heads[s] * lengths[r] * width for s in range(world)], r, group)
        return torch.cat([p.view(heads[s], lengths[r], width) for s, p in enumerate(got)], 0)

    out_r = back(out, qoff, layout.nq, dv).reshape(lead + (layout.nq[r], dv))
    if not need_potentials:
        return out_r, None, None
    f_r = back(f.unsqueeze(-1), qoff, layout.nq, 1).reshape(lead + (layout.nq[r],))
    g_r = back(g.unsqueeze(-1), koff, layout.nk, 1).reshape(lead + (layout.nk[r],))
    return out_r, f_r, g_r

"""Ring: Sinkhorn over shards that rotate around a set of peers; no peer holds the whole sequence.

Peer r keeps its queries q_r, keys k_r, values v_r and the potentials of its own rows f_r and
columns g_r. Each pass takes W steps (W peers); at step t peer r works on the shard that started on
peer (r - t) mod W while the next one is already in flight (isend to r+1, irecv from r-1):

    row pass     rotates (k_s, g_s):       f_r = -log Nq - logaddexp_s row_lse(q_r, k_s, g_s)
    column pass  rotates (q_s, f_s):       g_r = -log Nk - logaddexp_s col_lse(q_s, k_r, f_s)
    final pass   rotates (k_s, v_s, g_s):  out_r = Σ_s exp(lse_s - LSE_s lse_s) · out_s,
                                           (out_s, lse_s) = biased_attention(q_r, k_s, v_s, g_s)

with the building blocks (SPEC §8) of the chosen backend and g = 0 before the first row pass.
"""

from __future__ import annotations

import math

import torch

from ..block_ops import biased_attention_op, block_backend, col_lse_op, row_lse_op
from ..ops import potential_dtype
from .comm import Peers, RingExchange


def block_backends(backend: str, device, dtype, d: int, dv: int) -> dict[str, str]:
    """One backend per building block, chosen before any transfer so that all ranks fail alike."""
    return {blk: block_backend(backend, blk, device, dtype, max(d, dv) if blk == "biased_attention" else d)
            for blk in ("row_lse", "col_lse", "biased_attention")}


def _rotate(local, shapes_of, peers: Peers, step_fn) -> None:
    """Call ``step_fn(s, tensors of shard s)`` for every shard s, this peer's first; `shapes_of(s)`
    gives the shapes of shard s's tensors so receive buffers can be posted in advance."""
    r, world = peers.index, peers.size
    current = local
    for t in range(world):
        s = (r - t) % world
        pending = None
        if t < world - 1:
            pending = RingExchange(current, shapes_of((r - t - 1) % world), peers)
        step_fn(s, current)
        if pending is not None:
            current = pending.wait()


def run(q3, k3, v3, nq, nk, peers: Peers, *, names, num_iters, cost, scale, epsilon, need_potentials):
    """Sinkhorn attention over the peers' concatenated shards.

    Args:
        q3, k3, v3: ``[p, nq[me], D]``, ``[p, nk[me], D]``, ``[p, nk[me], Dv]``: this peer's shard
            of p problems (the same p on every peer).
        nq, nk: every peer's shard lengths, in shard order (total Nk >= 1).
        names: the blocks' backends (:func:`block_backends`).

    Returns:
        ``out`` ``[p, nq[me], Dv]`` (q's dtype), ``f`` ``[p, nq[me]]``, ``g`` ``[p, nk[me]]`` (the
        potential dtype; None unless `need_potentials`).
    """
    r = peers.index
    p, d, dv = q3.shape[0], q3.shape[-1], v3.shape[-1]
    nq_tot, nk_tot = sum(nq), sum(nk)
    pot = potential_dtype(q3.dtype)
    device = q3.device
    q3, k3, v3 = (t.contiguous() for t in (q3, k3, v3))
    log_a, log_b = -math.log(nq_tot), -math.log(nk_tot)
    neg_inf = float("-inf")

    def lse_pass(own_len, rotating, shapes_of, block, log_marginal):
        """log_marginal - logaddexp over shards of block(*shard): one row or column update."""
        acc = torch.full((p, own_len), neg_inf, dtype=pot, device=device)

        def step(s, tensors):
            nonlocal acc
            acc = torch.logaddexp(acc, block(*tensors))

        _rotate(rotating, shapes_of, peers, step)
        return log_marginal - acc

    def row_pass(g_r):  # rotates (k_s, g_s)
        return lse_pass(nq[r], [k3, g_r], lambda s: [(p, nk[s], d), (p, nk[s])],
                        lambda k_s, g_s: row_lse_op(q3, k_s, g_s, cost, scale, epsilon, names["row_lse"]), log_a)

    def col_pass(f_r):  # rotates (q_s, f_s)
        return lse_pass(nk[r], [q3, f_r], lambda s: [(p, nq[s], d), (p, nq[s])],
                        lambda q_s, f_s: col_lse_op(q_s, k3, f_s, cost, scale, epsilon, names["col_lse"]), log_b)

    g_r = torch.zeros((p, nk[r]), dtype=pot, device=device)
    f_r = None
    if num_iters == 0 and need_potentials:
        f_r = row_pass(g_r)
    for _ in range(num_iters):
        f_r = row_pass(g_r)
        g_r = col_pass(f_r)

    # Final pass: outputs of key shards merged by their LSEs (running maximum m, weight sum l).
    m = torch.full((p, nq[r]), neg_inf, dtype=pot, device=device)
    l = torch.zeros((p, nq[r]), dtype=pot, device=device)
    acc = torch.zeros((p, nq[r], dv), dtype=pot, device=device)

    def attend(s, tensors):
        nonlocal m, l, acc
        k_s, v_s, g_s = tensors
        out_s, lse_s = biased_attention_op(q3, k_s, v_s, g_s, cost, scale, epsilon, names["biased_attention"])
        m_new = torch.maximum(m, lse_s)
        # exp(-inf - -inf) is NaN: rows with nothing admissible yet keep weights 0.
        base = torch.where(torch.isfinite(m_new), m_new, 0.0)
        old_w, new_w = torch.exp(m - base), torch.exp(lse_s - base)
        acc = acc * old_w.unsqueeze(-1) + out_s.to(pot) * new_w.unsqueeze(-1)
        l = l * old_w + new_w
        m = m_new

    _rotate([k3, v3, g_r], lambda s: [(p, nk[s], d), (p, nk[s], dv), (p, nk[s])], peers, attend)
    out = (acc / l.unsqueeze(-1)).to(q3.dtype)
    return out, f_r if need_potentials else None, g_r if need_potentials else None

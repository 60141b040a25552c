"""Chunked log-domain Sinkhorn attention in plain PyTorch (any device, the fallback backend).

    L = cost_sign · scale · q kᵀ / epsilon,   a = 1/Nq,  b = 1/Nk,  g = 0
    repeat num_iters times:  f = log a − LSE_j(L + g);  g = log b − LSE_i(L + f)
    out = softmax_j(L + g) · v

Work goes one chunk of the B·H heads at a time (a chunk spans whole batches when a head is small,
so ``[70000, 1, N, D]`` costs no more Python than ``[1, 70000, N, D]``), and one row range of a
head at a time when a head is large: the logits held at once are bounded by the workspace budget
(env ``ASAG_TORCH_WORKSPACE_MB``, default 256), never by B·H·Nq·Nk (SPEC §6). When all rows of a
chunk fit, its logits are computed once and reused by every pass; otherwise each pass recomputes
them tile by tile and the column LSE is merged across row ranges with ``logaddexp`` in a fixed
order (deterministic). Half inputs are computed in float32.

The per-pass building blocks of the distributed op (issue 13) are the same passes, exposed:
``row_lse``, ``col_lse`` and ``biased_attention`` (see their docstrings).
"""

from __future__ import annotations

import math

import torch

from .._env import workspace_bytes

# A tile costs about this many tile-sized temporaries at its peak (logits, logits + bias, exp).
_TEMPORARIES_PER_TILE = 4
DEFAULT_WORKSPACE_MB = 256.0


def status() -> str:
    return "ok"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_plan(heads: int, nq: int, nk: int, elem_bytes: int) -> tuple[int, int]:
    """(heads per chunk, rows per chunk) so that one tile fits the workspace budget; `heads` is
    the number of heads in the whole call (B·H)."""
    budget = workspace_bytes("ASAG_TORCH_WORKSPACE_MB", DEFAULT_WORKSPACE_MB)
    tile_elems = max(1, budget // (elem_bytes * _TEMPORARIES_PER_TILE))
    if nq * nk <= tile_elems:
        return max(1, min(heads, tile_elems // (nq * nk))), nq
    return 1, max(1, min(nq, tile_elems // nk))


def _head_slices(batch: int, heads: int, head_chunk: int):
    """Index tuples into [B, H, ...] covering B·H in order, each `head_chunk` heads or fewer: whole
    batches at a time when a chunk holds at least one batch's heads, else heads within a batch."""
    if head_chunk >= heads:
        per = head_chunk // heads
        for b0 in range(0, batch, per):
            yield (slice(b0, min(batch, b0 + per)),)
    else:
        for b in range(batch):
            for h0 in range(0, heads, head_chunk):
                yield (b, slice(h0, min(heads, h0 + head_chunk)))


def _flat(t: torch.Tensor, idx, acc: torch.dtype) -> torch.Tensor:
    """t[idx] as [h, N, X] in `acc` (a copy bounded by the chunk, or a view)."""
    part = t[idx]
    # flatten, not reshape(-1, ...): -1 is ambiguous when the last dim is 0 (D = 0 or Dv = 0).
    return (part.flatten(0, 1) if part.dim() == t.dim() else part).to(acc)


class _Chunk:
    """The logits of a chunk of heads, cached when all rows fit the tile, else recomputed per row
    range. qh [h, Nq, D], kt [h, D, Nk] in the accumulation dtype."""

    def __init__(self, qh, kt, logit_scale, row_ranges):
        self.qh, self.kt, self.logit_scale, self.row_ranges = qh, kt, logit_scale, row_ranges
        self.cache = self._compute(0, qh.shape[1]) if len(row_ranges) == 1 else None

    def _compute(self, r0, r1):
        return torch.matmul(self.qh[:, r0:r1], self.kt).mul_(self.logit_scale)

    def logits(self, r0, r1):
        return self.cache if self.cache is not None else self._compute(r0, r1)

    def row_lse(self, bias_k, out):
        """out[:, i] = LSE_j(L[i, j] + bias_k[j]); bias_k [h, Nk], out [h, Nq]."""
        for r0, r1 in self.row_ranges:
            out[:, r0:r1] = torch.logsumexp(self.logits(r0, r1) + bias_k.unsqueeze(-2), dim=-1)

    def col_lse(self, bias_q):
        """LSE_i(L[i, j] + bias_q[i]) as [h, Nk]; bias_q [h, Nq]. Row ranges merge in order."""
        col = None
        for r0, r1 in self.row_ranges:
            part = torch.logsumexp(self.logits(r0, r1) + bias_q[:, r0:r1].unsqueeze(-1), dim=-2)
            col = part if col is None else torch.logaddexp(col, part)
        return col

    def attention(self, vh, bias_k, out, lse=None):
        """out[:, i] = softmax_j(L[i, j] + bias_k[j]) · vh; rows whose entries are all -inf give 0.
        `lse` (optional, [h, Nq]) receives the rows' LSEs."""
        for r0, r1 in self.row_ranges:
            biased = self.logits(r0, r1) + bias_k.unsqueeze(-2)
            if lse is None:
                plan = torch.softmax(biased, dim=-1)
            else:
                row_lse = torch.logsumexp(biased, dim=-1, keepdim=True)
                lse[:, r0:r1] = row_lse.squeeze(-1)
                # exp(L + bias - lse) is the normalised plan row; an all -inf row (lse = -inf)
                # subtracts 0 instead, so its plan is exp(-inf) = 0 (NaN from inputs still spreads).
                plan = biased.sub_(row_lse.masked_fill_(row_lse == -math.inf, 0.0)).exp_()
            rows = torch.matmul(plan, vh)
            # A convex combination of v's rows is infinite only for non-finite inputs (-> NaN).
            out[:, r0:r1] = rows.masked_fill_(rows.isinf(), math.nan)


def _chunks(q, k, *, cost_sign, scale, epsilon):
    """Yield (index into [B, H], _Chunk) over the heads of q [B, H, Nq, D], k [B, H, Nk, D]."""
    batch, heads, nq, _ = q.shape
    nk = k.shape[-2]
    acc = _acc_dtype(q.dtype)
    logit_scale = cost_sign * scale / epsilon
    head_chunk, row_chunk = _tile_plan(batch * heads, nq, nk, torch.finfo(acc).bits // 8)
    row_ranges = [(r, min(nq, r + row_chunk)) for r in range(0, nq, row_chunk)]
    for idx in _head_slices(batch, heads, head_chunk):
        yield idx, _Chunk(_flat(q, idx, acc), _flat(k, idx, acc).transpose(-1, -2), logit_scale, row_ranges)


def _flat_out(t: torch.Tensor, idx) -> torch.Tensor:
    """A view of the contiguous output t[idx] as [h, ...]."""
    part = t[idx]
    return part.flatten(0, 1) if part.dim() == t.dim() else part


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    batch, heads, nq, _ = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    acc = _acc_dtype(q.dtype)
    log_a, log_b = -math.log(nq), -math.log(nk)

    out = torch.empty((batch, heads, nq, dv), dtype=q.dtype, device=q.device)
    f = torch.empty((batch, heads, nq), dtype=acc, device=q.device)
    g = torch.empty((batch, heads, nk), dtype=acc, device=q.device)
    for idx, chunk in _chunks(q, k, cost_sign=cost_sign, scale=scale, epsilon=epsilon):
        fh, gh, oh = _flat_out(f, idx), _flat_out(g, idx), _flat_out(out, idx)
        gh.zero_()
        chunk.row_lse(gh, fh)  # with num_iters = 0 this f (against g = 0) is the one returned
        fh.neg_().add_(log_a)
        for t in range(num_iters):
            if t > 0:
                chunk.row_lse(gh, fh)
                fh.neg_().add_(log_a)
            gh.copy_(log_b - chunk.col_lse(fh))
        chunk.attention(_flat(v, idx, acc), gh, oh)
    return out, f, g


# ---- Per-pass building blocks (issue 13): inputs 4-D [B, H, N, D], validated, any strides; bias
# vectors contiguous in the potential dtype; -inf bias entries exclude a key (query). ----


def row_lse(q, k, g, *, cost_sign, scale, epsilon):
    """r[b, h, i] = LSE_j(L[i, j] + g[b, h, j]) -> [B, H, Nq] in g's dtype.

    q [B, H, Nq, D], k [B, H, Nk, D], g [B, H, Nk]; L = cost_sign·scale·q kᵀ/epsilon.
    """
    batch, heads, nq, _ = q.shape
    r = torch.empty((batch, heads, nq), dtype=_acc_dtype(q.dtype), device=q.device)
    for idx, chunk in _chunks(q, k, cost_sign=cost_sign, scale=scale, epsilon=epsilon):
        chunk.row_lse(_flat_out(g, idx).to(r.dtype), _flat_out(r, idx))
    return r


def col_lse(q, k, f, *, cost_sign, scale, epsilon):
    """c[b, h, j] = LSE_i(L[i, j] + f[b, h, i]) -> [B, H, Nk]; f [B, H, Nq]."""
    batch, heads, _, _ = q.shape
    c = torch.empty((batch, heads, k.shape[-2]), dtype=_acc_dtype(q.dtype), device=q.device)
    for idx, chunk in _chunks(q, k, cost_sign=cost_sign, scale=scale, epsilon=epsilon):
        _flat_out(c, idx).copy_(chunk.col_lse(_flat_out(f, idx).to(c.dtype)))
    return c


def biased_attention(q, k, v, g, *, cost_sign, scale, epsilon):
    """(out, lse): out[b, h, i] = Σ_j softmax_j(L[i, j] + g_j)·v_j -> [B, H, Nq, Dv] contiguous in
    q's dtype, lse[b, h, i] = LSE_j(L[i, j] + g_j) -> [B, H, Nq]. v [B, H, Nk, Dv], g [B, H, Nk];
    a row whose entries are all -inf gives lse = -inf and out = 0."""
    batch, heads, nq, _ = q.shape
    acc = _acc_dtype(q.dtype)
    out = torch.empty((batch, heads, nq, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, nq), dtype=acc, device=q.device)
    for idx, chunk in _chunks(q, k, cost_sign=cost_sign, scale=scale, epsilon=epsilon):
        chunk.attention(_flat(v, idx, acc), _flat_out(g, idx).to(acc), _flat_out(out, idx), _flat_out(lse, idx))
    return out, lse

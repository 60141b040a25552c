"""Chunked log-domain Sinkhorn attention in plain PyTorch (any device, the fallback backend).

    L = cost_sign · scale · q kᵀ / epsilon,   a = 1/Nq,  b = 1/Nk,  g = 0
    repeat num_iters times:  f = log a − LSE_j(L + g);  g = log b − LSE_i(L + f)
    out = softmax_j(L + g) · v

Work goes (batch, head chunk, row chunk) at a time, so the logits held at once are bounded by the
workspace budget (env ``ASAG_TORCH_WORKSPACE_MB``, default 256), never by B·H·Nq·Nk (SPEC §6).
When all rows of a head chunk fit, its logits are computed once and reused by every pass; otherwise
each pass recomputes them tile by tile and the column LSE is merged across row chunks with
``logaddexp`` in a fixed order (deterministic). Half inputs are computed in float32.
"""

from __future__ import annotations

import math
import os

import torch

# A tile costs about this many tile-sized temporaries at its peak (logits, logits + bias, exp).
_TEMPORARIES_PER_TILE = 4


def status() -> str:
    return "ok"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _workspace_bytes() -> int:
    return int(float(os.environ.get("ASAG_TORCH_WORKSPACE_MB", "256")) * 2**20)


def _tile_plan(heads: int, nq: int, nk: int, elem_bytes: int) -> tuple[int, int]:
    """(heads per chunk, rows per chunk) so that one tile fits the workspace budget."""
    tile_elems = max(1, _workspace_bytes() // (elem_bytes * _TEMPORARIES_PER_TILE))
    if nq * nk <= tile_elems:
        return max(1, min(heads, tile_elems // (nq * nk))), nq
    return 1, max(1, min(nq, tile_elems // nk))


def _solve_head_chunk(qh, kt, vh, fh, gh, out_rows, row_ranges, num_iters, logit_scale, log_a, log_b):
    """Sinkhorn attention for one chunk of heads: fills fh, gh and out_rows in place.

    qh [h, Nq, D] and kt [h, D, Nk] are in the accumulation dtype; with a single row range the
    logits are computed once and reused by every pass.
    """
    cache = torch.matmul(qh, kt).mul_(logit_scale) if len(row_ranges) == 1 else None

    def logits(r0, r1):
        return cache if cache is not None else torch.matmul(qh[:, r0:r1], kt).mul_(logit_scale)

    def row_update():
        for r0, r1 in row_ranges:
            fh[:, r0:r1] = log_a - torch.logsumexp(logits(r0, r1) + gh.unsqueeze(-2), dim=-1)

    def column_update():
        col_lse = None
        for r0, r1 in row_ranges:
            part = torch.logsumexp(logits(r0, r1) + fh[:, r0:r1].unsqueeze(-1), dim=-2)
            col_lse = part if col_lse is None else torch.logaddexp(col_lse, part)
        gh.copy_(log_b - col_lse)

    gh.zero_()
    row_update()  # with num_iters = 0 this f (against g = 0) is the one returned
    for t in range(num_iters):
        if t > 0:
            row_update()
        column_update()

    for r0, r1 in row_ranges:
        plan_rows = torch.softmax(logits(r0, r1) + gh.unsqueeze(-2), dim=-1)
        rows_out = torch.matmul(plan_rows, vh)
        # A convex combination of v's rows is infinite only for non-finite inputs (-> NaN).
        out_rows[:, r0:r1] = rows_out.masked_fill_(rows_out.isinf(), float("nan"))


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    batch, heads, nq, _ = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    logit_scale = cost_sign * scale / epsilon
    log_a, log_b = -math.log(nq), -math.log(nk)

    out = torch.empty((batch, heads, nq, dv), dtype=q.dtype, device=q.device)
    f = torch.empty((batch, heads, nq), dtype=acc, device=q.device)
    g = torch.empty((batch, heads, nk), dtype=acc, device=q.device)
    head_chunk, row_chunk = _tile_plan(heads, nq, nk, torch.finfo(acc).bits // 8)
    row_ranges = [(r, min(nq, r + row_chunk)) for r in range(0, nq, row_chunk)]

    for b in range(batch):
        for h0 in range(0, heads, head_chunk):
            hs = slice(h0, min(heads, h0 + head_chunk))
            _solve_head_chunk(
                q[b, hs].to(acc), k[b, hs].to(acc).transpose(-1, -2), v[b, hs].to(acc),
                f[b, hs], g[b, hs], out[b, hs], row_ranges, num_iters, logit_scale, log_a, log_b,
            )
    return out, f, g

"""Materialising float64 building blocks (SPEC §8): the oracle the other backends' blocks are tested against.

With ``L = cost_sign · scale · q kᵀ / epsilon`` held whole in float64:

    row_lse:          r_i = LSE_j (L[i,j] + g_j)                       [B, H, Nq]
    col_lse:          c_j = LSE_i (L[i,j] + f_i)                       [B, H, Nk]
    biased_attention: out_i = Σ_j softmax_j(L[i,j] + g_j) · v_j,  lse_i = r_i

A row whose entries are all -inf gives lse = -inf and out = 0. Not a backend of its own:
``asag_kernels.block_ops`` maps backend "reference" here.
"""

from __future__ import annotations

import torch


def _logits(q, k, cost_sign, scale, epsilon):
    return cost_sign * (scale * (q.double() @ k.double().transpose(-1, -2))) / epsilon


def _out_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def row_lse(q, k, g, *, cost_sign, scale, epsilon):
    """q [B, H, Nq, D], k [B, H, Nk, D], g [B, H, Nk] -> LSE_j(L + g) [B, H, Nq]."""
    logits = _logits(q, k, cost_sign, scale, epsilon) + g.double().unsqueeze(-2)
    return torch.logsumexp(logits, dim=-1).to(_out_dtype(q))


def col_lse(q, k, f, *, cost_sign, scale, epsilon):
    """q [B, H, Nq, D], k [B, H, Nk, D], f [B, H, Nq] -> LSE_i(L + f) [B, H, Nk]."""
    logits = _logits(q, k, cost_sign, scale, epsilon) + f.double().unsqueeze(-1)
    return torch.logsumexp(logits, dim=-2).to(_out_dtype(q))


def biased_attention(q, k, v, g, *, cost_sign, scale, epsilon):
    """q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], g [B, H, Nk] -> (out [B, H, Nq, Dv], lse [B, H, Nq])."""
    logits = _logits(q, k, cost_sign, scale, epsilon) + g.double().unsqueeze(-2)
    lse = torch.logsumexp(logits, dim=-1)
    # exp(-inf - (-inf)) would be NaN: a row with no admissible key gets weights 0 (out = 0).
    finite = torch.isfinite(lse) | torch.isnan(lse)
    weights = torch.exp(logits - torch.where(finite, lse, 0.0).unsqueeze(-1))
    out = weights @ v.double()
    out = out.masked_fill(out.isinf(), float("nan"))
    return out.to(q.dtype).contiguous(), lse.to(_out_dtype(q))

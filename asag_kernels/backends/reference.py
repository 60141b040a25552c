"""Materialising float64 Sinkhorn attention: the oracle of the test suite.

    L = cost_sign · (scale · q kᵀ) / epsilon,   a = 1/Nq,  b = 1/Nk,  g = 0
    f = log a − LSE_j L                                     (num_iters = 0)
    repeat num_iters times:  f = log a − LSE_j(L + g);  g = log b − LSE_i(L + f)
    out = softmax_j(L + g) · v

It holds the whole [B, H, Nq, Nk] logit tensor in float64 and exists to be obviously right.
"""

from __future__ import annotations

import math

import torch


def status() -> str:
    return "ok"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    nq, nk = q.shape[-2], k.shape[-2]
    q64, k64, v64 = q.double(), k.double(), v.double()
    similarity = scale * (q64 @ k64.transpose(-1, -2))
    logits = cost_sign * similarity / epsilon
    log_a, log_b = -math.log(nq), -math.log(nk)

    g = torch.zeros(logits.shape[:-2] + (nk,), dtype=torch.float64, device=q.device)
    f = log_a - torch.logsumexp(logits, dim=-1)
    for _ in range(num_iters):
        f = log_a - torch.logsumexp(logits + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(logits + f.unsqueeze(-1), dim=-2)

    plan_rows = torch.softmax(logits + g.unsqueeze(-2), dim=-1)
    out = plan_rows @ v64
    # out is a convex combination of v's rows, so an infinite entry can only come from non-finite
    # inputs: SPEC §4 wants those to read as NaN.
    out = out.masked_fill(out.isinf(), float("nan")).to(q.dtype).contiguous()
    pot_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, f.to(pot_dtype), g.to(pot_dtype)

"""The torch custom op ``asag::sinkhorn_attention`` and its fake (meta) implementation.

Every backend runs behind this one op; its real implementation dispatches to the backend module
named by the ``backend`` argument (already resolved from "auto" by the caller). This module
imports no Triton and no compiled extension: backends load lazily on first use.
"""

from __future__ import annotations

import torch

from . import backends

_COST_SIGN = {"adversarial": -1.0, "standard": 1.0}


def potential_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() >= 4:
        # flatten, not reshape(-1, ...): -1 is ambiguous when D or Dv is 0 (no elements).
        return t.flatten(0, t.dim() - 4)
    return t.reshape((1,) * (4 - t.dim()) + t.shape)


@torch.library.custom_op("asag::sinkhorn_attention", mutates_args=())
def sinkhorn_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_iters: int,
    cost: str,
    scale: float,
    epsilon: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sinkhorn attention over validated ``[..., N, D]`` tensors; returns (out, f, g).

    ``backend`` is a backend name or "auto" (resolved per call for the tensors' device and dtype).
    """
    # Resolved here, at run time, rather than in the traced Python of api.py: availability checks
    # (imports, file probes) stay invisible to torch.compile this way.
    name = backends.resolve(backend, q.device, q.dtype, max(q.shape[-1], v.shape[-1]))
    lead = q.shape[:-2]
    nq, nk = q.shape[-2], k.shape[-2]
    if lead.numel() == 0 or nq == 0:
        pot = potential_dtype(q.dtype)
        return (
            q.new_empty(lead + (nq, v.shape[-1])),
            q.new_empty(lead + (nq,), dtype=pot),
            q.new_zeros(lead + (nk,), dtype=pot),
        )
    # Backends take [B, H, N, D]; these reshapes are views for the usual 2-D/3-D/4-D layouts.
    q4, k4, v4 = (_as_4d(t) for t in (q, k, v))
    out, f, g = backends.run(
        name, q4, k4, v4, num_iters=num_iters, cost_sign=_COST_SIGN[cost], scale=scale, epsilon=epsilon
    )
    return out.reshape(lead + (nq, v.shape[-1])), f.reshape(lead + (nq,)), g.reshape(lead + (nk,))


@sinkhorn_attention_op.register_fake
def _(q, k, v, num_iters, cost, scale, epsilon, backend):
    lead = q.shape[:-2]
    pot = potential_dtype(q.dtype)
    return (
        q.new_empty(lead + (q.shape[-2], v.shape[-1])),
        q.new_empty(lead + (q.shape[-2],), dtype=pot),
        q.new_empty(lead + (k.shape[-2],), dtype=pot),
    )

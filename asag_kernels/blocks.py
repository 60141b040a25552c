"""Public building blocks of Sinkhorn attention (SPEC §8): validate, then call the custom ops.

With ``L = sigma · scale · q kᵀ / epsilon`` (sigma = -1 for ``cost="adversarial"``, +1 for
``"standard"``), over one block of queries and one block of keys:

    row_lse(q, k, g)             r_i = LSE_j (L[i,j] + g_j)
    col_lse(q, k, f)             c_j = LSE_i (L[i,j] + f_i)
    biased_attention(q, k, v, g) (Σ_j softmax_j(L[i,j] + g_j) v_j,  r_i)

so one Sinkhorn iteration is ``f = -log Nq - row_lse(g)``, ``g = -log Nk - col_lse(f)`` and the
output is ``biased_attention(g)[0]``. LSEs of disjoint key blocks merge with ``logaddexp``, and
outputs by their LSE weights, which is how ``asag_kernels.distributed`` runs the ring.
"""

from __future__ import annotations

import torch

from ._validate import check_op_scalars, check_operands, inference_only_error
from .block_ops import biased_attention_op, col_lse_op, row_lse_op
from .ops import potential_dtype



def _bias(value, name: str, like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A potential vector: None -> zeros; else a float tensor of `shape` on like's device, returned
    contiguous in the potential dtype (float32, float64 for float64 inputs)."""
    dtype = potential_dtype(like.dtype)
    if value is None:
        return torch.zeros(shape, dtype=dtype, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (q/k's leading dims and N), got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like q and k, got {value.device}")
    if torch.is_grad_enabled() and value.requires_grad:
        raise inference_only_error()
    return value.to(dtype).contiguous()


def _scalars(q, cost, scale, epsilon, backend):
    s = check_op_scalars(q, cost=cost, scale=scale, epsilon=epsilon, backend=backend)
    return s.cost, s.resolved_scale, float(s.epsilon), s.backend


def row_lse(q, k, g=None, *, cost="adversarial", scale=None, epsilon=1.0, backend="auto") -> torch.Tensor:
    r"""Row log-sum-exp ``r_i = LSE_j(L[i,j] + g_j)`` over one key block.

    Args:
        q: ``[..., Nq, D]``; k: ``[..., Nk, D]`` (same leading dims, dtype, device; any strides).
        g: ``[..., Nk]`` column potential, any float dtype (used in float32, float64 for float64
            inputs); ``None`` means zeros. ``-inf`` entries exclude their keys.
        cost, scale, epsilon, backend: as for :func:`asag_kernels.sinkhorn_attention`.

    Returns:
        ``[..., Nq]`` in float32 (float64 for float64 inputs); ``-inf`` where no key is admissible
        (``Nk = 0`` included).
    """
    check_operands(q=q, k=k)
    cost, scale, epsilon, backend = _scalars(q, cost, scale, epsilon, backend)
    g = _bias(g, "g", q, k.shape[:-1])
    return row_lse_op(q, k, g, cost, scale, epsilon, backend)


def col_lse(q, k, f=None, *, cost="adversarial", scale=None, epsilon=1.0, backend="auto") -> torch.Tensor:
    r"""Column log-sum-exp ``c_j = LSE_i(L[i,j] + f_i)`` over one query block.

    Args:
        q: ``[..., Nq, D]``; k: ``[..., Nk, D]``.
        f: ``[..., Nq]`` row potential, ``None`` means zeros; ``-inf`` entries exclude their queries.
        cost, scale, epsilon, backend: as for :func:`asag_kernels.sinkhorn_attention`.

    Returns:
        ``[..., Nk]`` in float32 (float64 for float64 inputs); ``-inf`` where no query is admissible.
    """
    check_operands(q=q, k=k)
    cost, scale, epsilon, backend = _scalars(q, cost, scale, epsilon, backend)
    f = _bias(f, "f", q, q.shape[:-1])
    return col_lse_op(q, k, f, cost, scale, epsilon, backend)


def biased_attention(q, k, v, g=None, *, cost="adversarial", scale=None, epsilon=1.0, backend="auto"):
    r"""Attention under a column bias: ``out_i = Σ_j softmax_j(L[i,j] + g_j) v_j`` and ``lse_i = LSE_j(L[i,j] + g_j)``.

    Args:
        q: ``[..., Nq, D]``; k: ``[..., Nk, D]``; v: ``[..., Nk, Dv]``.
        g: ``[..., Nk]`` column potential, ``None`` means zeros (then it is softmax attention).
        cost, scale, epsilon, backend: as for :func:`asag_kernels.sinkhorn_attention`.

    Returns:
        ``(out, lse)``: ``out`` ``[..., Nq, Dv]`` contiguous in q's dtype (0 for rows with no
        admissible key), ``lse`` ``[..., Nq]`` in float32 (float64 for float64 inputs). Outputs of
        disjoint key blocks merge as ``Σ_b exp(lse_b - LSE_b lse_b) out_b``.
    """
    check_operands(q=q, k=k, v=v)
    cost, scale, epsilon, backend = _scalars(q, cost, scale, epsilon, backend)
    g = _bias(g, "g", q, k.shape[:-1])
    return biased_attention_op(q, k, v, g, cost, scale, epsilon, backend)


__all__ = ["row_lse", "col_lse", "biased_attention"]

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

from ._validate import check_backend, check_cost, check_epsilon, check_logit_scale, check_scale, resolve_scale
from .block_ops import biased_attention_op, col_lse_op, row_lse_op
from .ops import potential_dtype

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_operands(**tensors: torch.Tensor) -> None:
    """q/k/v-style operands ``[..., N, D]``: tensors of one float dtype and device with the same
    leading dims; k's head dim equals q's, v has k's rows. Empty N is allowed (it is checked by
    the callers that need it). Raises TypeError/ValueError naming the argument."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims [..., N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{first_name} and {name} must be on one device: got {first.device} and {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{first_name} and {name} must share one dtype: got {first.dtype} and {t.dtype}")
        if t.shape[:-2] != first.shape[:-2]:
            raise ValueError(
                f"{first_name} and {name} must have the same leading dims (no broadcasting): "
                f"{first_name} has {tuple(first.shape[:-2])}, {name} has {tuple(t.shape[:-2])}"
            )
    q, k, v = tensors.get("q"), tensors.get("k"), tensors.get("v")
    if q is not None and k is not None and k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's: q has D={q.shape[-1]}, k has D={k.shape[-1]}")
    if k is not None and v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k: k has Nk={k.shape[-2]}, v has {v.shape[-2]}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise RuntimeError(
            "asag_kernels ops are inference-only (no autograd): call them under torch.no_grad() or "
            "torch.inference_mode(), or pass tensors that do not require grad"
        )


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
    return value.to(dtype).contiguous()


def _scalars(q, cost, scale, epsilon, backend):
    cost = check_cost(cost)
    scale = check_scale(scale)
    epsilon = check_epsilon(epsilon)
    backend = check_backend(backend)
    scale = resolve_scale(scale, q.shape[-1])
    check_logit_scale(scale, epsilon, q.dtype)
    return cost, scale, float(epsilon), backend


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


__all__ = ["row_lse", "col_lse", "biased_attention", "check_operands", "resolve_scale"]

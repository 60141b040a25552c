"""Torch custom ops for the building blocks (SPEC §8) and their fake (meta) implementations.

    asag::row_lse(q, k, g, ...)              -> r     [..., Nq]
    asag::col_lse(q, k, f, ...)              -> c     [..., Nk]
    asag::biased_attention(q, k, v, g, ...)  -> (out [..., Nq, Dv], lse [..., Nq])

The real implementations resolve the backend at run time (as ``asag::sinkhorn_attention`` does, so
``torch.compile`` never traces availability probes) and call the backend module's function of the
same name, found with ``getattr``: a backend provides a block by defining it. "reference" maps to
``backends/reference_blocks.py``. A named backend without the block raises; "auto" skips it.
Empty sets are answered here, never passed to a backend: an empty key set gives LSE = -inf (and
out = 0), an empty query set gives column LSE = -inf.
"""

from __future__ import annotations

import torch

from . import backends
from .backends import reference_blocks
from .ops import _COST_SIGN, _as_4d, potential_dtype

BLOCKS = ("row_lse", "col_lse", "biased_attention")


def block_backend(requested: str, block: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend whose `block` runs tensors of this device/dtype: "auto" takes the first usable
    backend that defines it (the single-process "auto" choice, then "torch", then "reference");
    a named backend that cannot run here, or that lacks the block, raises ValueError."""
    if requested == "reference":
        return "reference"
    if requested != "auto":
        name = backends.resolve(requested, device, dtype, head_dim)
        if getattr(backends.get(name), block, None) is None:
            having = [n for n in backends.available_backends() if n == "reference" or hasattr(backends.get(n), block)]
            raise ValueError(
                f"backend={name!r} does not provide the building block {block!r}; "
                f"backends here that do: {having}"
            )
        return name
    for name in dict.fromkeys((backends.resolve_auto(device, dtype, head_dim), "torch")):
        if backends.unsupported_reason(name, device, dtype, head_dim) is None and hasattr(backends.get(name), block):
            return name
    return "reference"


def _block_fn(requested: str, block: str, device, dtype, head_dim):
    name = block_backend(requested, block, device, dtype, head_dim)
    module = reference_blocks if name == "reference" else backends.get(name)
    return getattr(module, block)


def _neg_inf(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, float("-inf"), dtype=potential_dtype(like.dtype), device=like.device)


@torch.library.custom_op("asag::row_lse", mutates_args=())
def row_lse_op(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, cost: str, scale: float, epsilon: float, backend: str
) -> torch.Tensor:
    """LSE_j(L + g) over validated q [..., Nq, D], k [..., Nk, D], g [..., Nk] (potential dtype)."""
    lead, nq, nk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if lead.numel() == 0 or nq == 0 or nk == 0:
        return _neg_inf(lead + (nq,), q)
    fn = _block_fn(backend, "row_lse", q.device, q.dtype, q.shape[-1])
    r = fn(_as_4d(q), _as_4d(k), g.reshape(_as_4d(k).shape[:-1]).contiguous(),
           cost_sign=_COST_SIGN[cost], scale=scale, epsilon=epsilon)
    return r.reshape(lead + (nq,))


@row_lse_op.register_fake
def _(q, k, g, cost, scale, epsilon, backend):
    return q.new_empty(q.shape[:-1], dtype=potential_dtype(q.dtype))


@torch.library.custom_op("asag::col_lse", mutates_args=())
def col_lse_op(
    q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, cost: str, scale: float, epsilon: float, backend: str
) -> torch.Tensor:
    """LSE_i(L + f) over validated q [..., Nq, D], k [..., Nk, D], f [..., Nq] (potential dtype)."""
    lead, nq, nk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if lead.numel() == 0 or nq == 0 or nk == 0:
        return _neg_inf(lead + (nk,), q)
    fn = _block_fn(backend, "col_lse", q.device, q.dtype, q.shape[-1])
    c = fn(_as_4d(q), _as_4d(k), f.reshape(_as_4d(q).shape[:-1]).contiguous(),
           cost_sign=_COST_SIGN[cost], scale=scale, epsilon=epsilon)
    return c.reshape(lead + (nk,))


@col_lse_op.register_fake
def _(q, k, f, cost, scale, epsilon, backend):
    return q.new_empty(k.shape[:-1], dtype=potential_dtype(q.dtype))


@torch.library.custom_op("asag::biased_attention", mutates_args=())
def biased_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cost: str,
    scale: float,
    epsilon: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax_j(L + g) · v, LSE_j(L + g)) over validated q, k, v [..., N, D|Dv] and g [..., Nk]."""
    lead, nq, nk, dv = q.shape[:-2], q.shape[-2], k.shape[-2], v.shape[-1]
    if lead.numel() == 0 or nq == 0 or nk == 0:
        return q.new_zeros(lead + (nq, dv)), _neg_inf(lead + (nq,), q)
    fn = _block_fn(backend, "biased_attention", q.device, q.dtype, max(q.shape[-1], dv))
    out, lse = fn(_as_4d(q), _as_4d(k), _as_4d(v), g.reshape(_as_4d(k).shape[:-1]).contiguous(),
                  cost_sign=_COST_SIGN[cost], scale=scale, epsilon=epsilon)
    return out.reshape(lead + (nq, dv)), lse.reshape(lead + (nq,))


@biased_attention_op.register_fake
def _(q, k, v, g, cost, scale, epsilon, backend):
    return (
        q.new_empty(q.shape[:-1] + (v.shape[-1],)),
        q.new_empty(q.shape[:-1], dtype=potential_dtype(q.dtype)),
    )

"""Public entry point: validates inputs (SPEC §5) and calls the custom op, which resolves the backend."""

from __future__ import annotations

import math

import torch

from . import backends
from .ops import sinkhorn_attention_op

COSTS = ("adversarial", "standard")
BACKEND_CHOICES = ("auto",) + backends.BACKENDS
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends() -> list[str]:
    """Names of the backends usable in this process (for some device)."""
    return backends.available_backends()


def backend_status() -> dict[str, str]:
    """Every backend name -> "ok", or the reason it is not usable here."""
    return backends.backend_status()


def _check_inputs(q, k, v, num_iters, cost, scale, epsilon, backend) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims [..., N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device: q is on {q.device}, {name} is on {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype: q is {q.dtype}, {name} is {t.dtype}")
        if t.dim() != q.dim() or t.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"q, k and v must have the same leading dims (no broadcasting): q has {tuple(q.shape[:-2])}, "
                f"{name} has {tuple(t.shape[:-2])}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's: q has D={q.shape[-1]}, k has D={k.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k: k has Nk={k.shape[-2]}, v has {v.shape[-2]}")
    if k.shape[-2] == 0:
        raise ValueError("k must hold at least one key (Nk >= 1), got Nk=0")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int):
        raise TypeError(f"num_iters must be an int >= 0, got {type(num_iters).__name__} {num_iters!r}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "sinkhorn_attention is inference-only (no autograd): call it under torch.no_grad() or "
            "torch.inference_mode(), or pass tensors that do not require grad"
        )


def sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_iters: int = 2,
    cost: str = "adversarial",
    scale: float | None = None,
    epsilon: float = 1.0,
    backend: str = "auto",
    return_potentials: bool = False,
):
    r"""Attention whose plan is a few log-domain Sinkhorn iterations (inference only).

    With ``L = sigma * scale * q @ k.T / epsilon`` (sigma = -1 for ``cost="adversarial"``, +1 for
    ``"standard"``) and uniform marginals, it runs ``num_iters`` row/column potential updates and
    returns ``softmax_j(L + g) @ v``. ``num_iters=0, cost="standard", epsilon=1`` is softmax
    attention. See SPEC.md §3 for the exact iteration.

    Args:
        q: ``[..., Nq, D]`` queries, float16/bfloat16/float32/float64, any strides.
        k: ``[..., Nk, D]`` keys, same leading dims, device and dtype as ``q``; ``Nk >= 1``.
        v: ``[..., Nk, Dv]`` values, same leading dims, device and dtype as ``q``.
        num_iters: Sinkhorn iterations (each a row update then a column update), ``>= 0``.
        cost: ``"adversarial"`` (C = +similarity, ASAG's degraded attention) or ``"standard"``.
        scale: logit scale; ``None`` means ``1/sqrt(D)``.
        epsilon: entropic regularisation dividing the scaled logits, finite and ``> 0``.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
            A named backend that cannot run here raises; it never falls back.
        return_potentials: also return the last potentials ``f`` and ``g``.

    Returns:
        ``out``: ``[..., Nq, Dv]`` contiguous, dtype of ``q``; with ``return_potentials=True`` the
        tuple ``(out, f, g)`` with ``f``: ``[..., Nq]`` and ``g``: ``[..., Nk]`` in float32
        (float64 for float64 inputs).
    """
    _check_inputs(q, k, v, num_iters, cost, scale, epsilon, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, f, g = sinkhorn_attention_op(q, k, v, num_iters, cost, float(scale), float(epsilon), backend)
    if return_potentials:
        return out, f, g
    return out

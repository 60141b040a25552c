"""Public entry point: validates inputs (SPEC §5) and calls the custom op, which resolves the backend."""

from __future__ import annotations

import torch

from . import backends
from ._validate import BACKEND_CHOICES, COSTS, OpScalars, check_op_scalars, check_operands
from .ops import sinkhorn_attention_op

__all__ = ["sinkhorn_attention", "available_backends", "backend_status", "COSTS", "BACKEND_CHOICES"]


def available_backends() -> list[str]:
    """Names of the backends usable in this process (for some device)."""
    return backends.available_backends()


def backend_status() -> dict[str, str]:
    """Every backend name -> "ok", or the reason it is not usable here."""
    return backends.backend_status()


def _check_inputs(q, k, v, num_iters, cost, scale, epsilon, backend, return_potentials=False) -> OpScalars:
    """SPEC §5: the tensors and every keyword, checked and normalised (scale resolved in the result)."""
    check_operands(q=q, k=k, v=v)
    if k.shape[-2] == 0:
        raise ValueError("k must hold at least one key (Nk >= 1), got Nk=0")
    return check_op_scalars(q, cost=cost, scale=scale, epsilon=epsilon, backend=backend, num_iters=num_iters,
                            return_potentials=return_potentials)


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
        num_iters: Sinkhorn iterations (each a row update then a column update), in ``[0, 2**31 - 1]``.
        cost: ``"adversarial"`` (C = +similarity, ASAG's degraded attention) or ``"standard"``.
        scale: logit scale; ``None`` means ``1/sqrt(D)`` (1 for D = 0).
        epsilon: entropic regularisation dividing the scaled logits, finite and ``> 0``;
            ``scale/epsilon`` must be finite in the compute dtype (float32 unless inputs are float64):
            ``|scale/epsilon| <= 2.359e+38`` (``1.246e+308`` for float64 inputs).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
            A named backend that cannot run here raises; it never falls back.
        return_potentials: also return the last potentials ``f`` and ``g``.

    Returns:
        ``out``: ``[..., Nq, Dv]`` contiguous, dtype of ``q``; with ``return_potentials=True`` the
        tuple ``(out, f, g)`` with ``f``: ``[..., Nq]`` and ``g``: ``[..., Nk]`` in float32
        (float64 for float64 inputs).
    """
    s = _check_inputs(q, k, v, num_iters, cost, scale, epsilon, backend, return_potentials)
    out, f, g = sinkhorn_attention_op(q, k, v, s.num_iters, s.cost, s.resolved_scale, s.epsilon, s.backend)
    if s.return_potentials:
        return out, f, g
    return out

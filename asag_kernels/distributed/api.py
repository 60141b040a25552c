"""``asag_kernels.distributed.sinkhorn_attention``: validation, the one shape exchange, dispatch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._validate import BACKEND_CHOICES, COSTS, check_op_scalars, check_operands, resolve_scale
from . import ring, ulysses
from .shapes import MAX_LEAD_DIMS, exchange

STRATEGIES = ("auto", "ulysses", "ring")


def _check_group(group):
    """(rank, world) of this process in `group` (None: the default group), or a clear error."""
    if not dist.is_available():
        raise RuntimeError("asag_kernels.distributed needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "group: torch.distributed is not initialised; call torch.distributed.init_process_group(...) "
            "on every rank first (backend 'gloo' for CPU tensors, 'nccl' for CUDA tensors)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group given")
    return rank, dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    """Where the shape row lives: NCCL only moves CUDA tensors."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_strategy(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"strategy must be one of {STRATEGIES}, got {type(value).__name__} {value!r}")
    if value not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {value!r}")
    return value


def _check_local(q, k, v, num_iters, cost, scale, epsilon, backend, strategy, return_potentials):
    check_operands(q=q, k=k, v=v)
    if q.dim() - 2 > MAX_LEAD_DIMS:
        raise ValueError(f"q may have at most {MAX_LEAD_DIMS} leading dims here, got shape {tuple(q.shape)}")
    # The scale as given (None travels to the other ranks as such); resolved after the exchange.
    s = check_op_scalars(q, cost=cost, scale=scale, epsilon=epsilon, backend=backend, num_iters=num_iters,
                         return_potentials=return_potentials)
    return s.num_iters, s.cost, s.scale, s.epsilon, s.backend, _check_strategy(strategy)


def sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    strategy: str = "auto",
    num_iters: int = 2,
    cost: str = "adversarial",
    scale: float | None = None,
    epsilon: float = 1.0,
    backend: str = "auto",
    return_potentials: bool = False,
):
    r"""Sinkhorn attention over a sequence sharded across the ranks of `group` (SPEC §9).

    Every rank calls it with its consecutive shard of the sequence (dim -2), rank r of the group
    holding the r-th shard; shard lengths may differ and may be 0 (the total Nk must be >= 1).

    Args:
        q: ``[..., nq_r, D]`` this rank's queries; k: ``[..., nk_r, D]``; v: ``[..., nk_r, Dv]``.
            The leading dims, D, Dv, dtype, device type and every keyword must agree across ranks
            (checked once with one small all_gather; on disagreement every rank raises).
        group: a ``torch.distributed`` process group; None means the default group.
        strategy: ``"ulysses"`` (all-to-all trading the sequence shard for a shard of the
            flattened leading dims, the fused single-process op, all-to-all back), ``"ring"``
            (building blocks over shards rotated with async p2p; never gathers the sequence) or
            ``"auto"`` (ulysses when the leading dims hold at least one problem per rank, else ring).
        num_iters, cost, scale, epsilon, backend, return_potentials: as for
            :func:`asag_kernels.sinkhorn_attention`. Ring runs the building blocks of `backend`
            ("auto": the first usable backend that provides them).

    Returns:
        This rank's shard ``out`` ``[..., nq_r, Dv]`` (contiguous, q's dtype) of the single-process
        result on the concatenated inputs; with ``return_potentials`` also ``f`` ``[..., nq_r]``
        and ``g`` ``[..., nk_r]`` (float32, float64 for float64 inputs).
    """
    rank, world = _check_group(group)
    # Validate locally but raise only after the exchange, so a rank with bad input never leaves
    # the others waiting in a collective.
    local_error = None
    try:
        num_iters, cost, scale, epsilon, backend, strategy = _check_local(
            q, k, v, num_iters, cost, scale, epsilon, backend, strategy, return_potentials
        )
        codes = {
            "num_iters": num_iters, "cost": COSTS.index(cost), "scale_none": float(scale is None),
            "scale": 0.0 if scale is None else scale, "epsilon": epsilon,
            "backend": BACKEND_CHOICES.index(backend), "strategy": STRATEGIES.index(strategy),
            "return_potentials": float(return_potentials),
        }
    except (TypeError, ValueError, RuntimeError) as exc:
        local_error, codes = exc, {}
    layout = exchange(q, k, v, local_error=local_error, codes=codes, rank=rank, world=world, group=group,
                      device=_comm_device(group))
    scale = resolve_scale(scale, layout.d)
    if strategy == "auto":
        strategy = "ulysses" if layout.heads >= world else "ring"
    impl = ulysses if strategy == "ulysses" else ring
    out, f, g = impl.run(
        q, k, v, layout, group=group, num_iters=num_iters, cost=cost, scale=float(scale),
        epsilon=float(epsilon), backend=backend, need_potentials=return_potentials,
    )
    if return_potentials:
        return out, f, g
    return out

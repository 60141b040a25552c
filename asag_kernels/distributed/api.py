"""``asag_kernels.distributed.sinkhorn_attention``: validation, the one shape exchange, dispatch."""

from __future__ import annotations

import torch

from .._validate import BACKEND_CHOICES, COSTS, check_op_scalars, check_operands, resolve_scale
from . import hybrid, topology
from .plan import STRATEGIES, check_strategy, check_ulysses_degree, plan
from .shapes import MAX_LEAD_DIMS, exchange


def _check_local(q, k, v, num_iters, cost, scale, epsilon, backend, strategy, ulysses_degree, return_potentials):
    check_operands(q=q, k=k, v=v)
    if q.dim() - 2 > MAX_LEAD_DIMS:
        raise ValueError(f"q may have at most {MAX_LEAD_DIMS} leading dims here, got shape {tuple(q.shape)}")
    # The scale as given (None travels to the other ranks as such); resolved after the exchange.
    s = check_op_scalars(q, cost=cost, scale=scale, epsilon=epsilon, backend=backend, num_iters=num_iters,
                         return_potentials=return_potentials)
    return s, check_strategy(strategy), check_ulysses_degree(ulysses_degree)


def sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    strategy: str = "auto",
    ulysses_degree: int | None = None,
    num_iters: int = 2,
    cost: str = "adversarial",
    scale: float | None = None,
    epsilon: float = 1.0,
    backend: str = "auto",
    return_potentials: bool = False,
):
    r"""Sinkhorn attention over a sequence sharded across the ranks of `group` (SPEC §9).

    Every rank calls it with its consecutive shard of the sequence (dim -2), the rank at shard
    position r holding the r-th shard (group rank r; for a DeviceMesh ``ring_rank * U + ulysses_rank``);
    shard lengths may differ and may be 0 (the total Nk must be >= 1).

    Args:
        q: ``[..., nq_r, D]`` this rank's queries; k: ``[..., nk_r, D]``; v: ``[..., nk_r, Dv]``.
            The leading dims, D, Dv, dtype, device type and every keyword must agree across ranks
            (checked once with one small all_gather; on disagreement every rank raises).
        group: a ``torch.distributed`` process group (None: the default group), or a
            ``torch.distributed.device_mesh.DeviceMesh`` with dims named ``"ring"`` and ``"ulysses"``
            (as diffusers' ``ContextParallelConfig`` builds it), whose sizes fix the degrees.
        strategy: ``"ulysses"`` (all-to-all trading the sequence shard for a share of the
            flattened leading dims, the fused single-process op, all-to-all back), ``"ring"``
            (building blocks over shards rotated with async p2p; never gathers the sequence),
            ``"hybrid"`` (Ulysses inside each set of `ulysses_degree` consecutive ranks, a ring across
            the sets) or ``"auto"`` (:func:`asag_kernels.distributed.plan` says which and why).
        ulysses_degree: the hybrid's Ulysses degree U: it divides the world size and the product
            of the leading dims (for ``"auto"``: fixes U; a DeviceMesh gives it).
        num_iters, cost, scale, epsilon, backend, return_potentials: as for
            :func:`asag_kernels.sinkhorn_attention`. The ring runs the building blocks of `backend`
            ("auto": the first usable backend that provides them).

    Returns:
        This rank's shard ``out`` ``[..., nq_r, Dv]`` (contiguous, q's dtype) of the single-process
        result on the concatenated inputs; with ``return_potentials`` also ``f`` ``[..., nq_r]``
        and ``g`` ``[..., nk_r]`` (float32, float64 for float64 inputs).
    """
    topo = topology.resolve(group)
    # Validate locally but raise only after the exchange, so a rank with bad input never leaves
    # the others waiting in a collective.
    local_error = None
    try:
        s, strategy, ulysses_degree = _check_local(q, k, v, num_iters, cost, scale, epsilon, backend, strategy,
                                                   ulysses_degree, return_potentials)
        codes = {
            "num_iters": s.num_iters, "cost": COSTS.index(s.cost), "scale_none": float(s.scale is None),
            "scale": 0.0 if s.scale is None else s.scale, "epsilon": s.epsilon,
            "backend": BACKEND_CHOICES.index(s.backend), "strategy": STRATEGIES.index(strategy),
            "ulysses_degree": ulysses_degree or 0, "return_potentials": float(s.return_potentials),
        }
    except (TypeError, ValueError, RuntimeError) as exc:
        local_error, codes = exc, {}
    layout = exchange(q, k, v, local_error=local_error, codes=codes, topology=topo)
    # Every rank decides (and fails) alike: the plan reads only what the exchange made common.
    chosen = plan(layout.heads, topo.world, strategy=strategy, ulysses_degree=ulysses_degree,
                  mesh_degrees=topo.mesh_degrees)
    out, f, g = hybrid.run(
        q, k, v, layout, chosen, topo, num_iters=s.num_iters, cost=s.cost, scale=float(resolve_scale(s.scale, layout.d)),
        epsilon=float(s.epsilon), backend=s.backend, need_potentials=s.return_potentials,
    )
    if s.return_potentials:
        return out, f, g
    return out

"""Sequence-parallel Sinkhorn attention over ``torch.distributed`` (SPEC §9).

``sinkhorn_attention(q, k, v, *, group=None, strategy="auto", ulysses_degree=None, **kwargs)`` takes
this rank's shard of the sequence (dim -2) and returns this rank's shard of the single-process
result. Strategies: ``"ulysses"`` (all-to-all to a share of the problems, the fused single-process
op, all-to-all back), ``"ring"`` (the building blocks of SPEC §8 over rotating shards; no rank ever
holds the whole sequence) and ``"hybrid"`` (Ulysses inside sets of ``ulysses_degree`` consecutive
ranks, a ring across the sets; ``group`` may be a DeviceMesh with dims ``"ring"``/``"ulysses"``).
``joint_sinkhorn_attention`` is SPEC §10's joint text + image attention over such shards.
``plan(...)`` says what ``"auto"`` picks; ``bytes_sent()`` reports what this process handed to
torch.distributed, ``cost.bytes_per_rank`` what it should have.
"""

from .api import sinkhorn_attention
from .comm import bytes_sent, reset_bytes_sent
from .joint import joint_sinkhorn_attention
from .plan import STRATEGIES, Plan, plan

__all__ = ["sinkhorn_attention", "joint_sinkhorn_attention", "STRATEGIES", "Plan", "plan", "bytes_sent",
           "reset_bytes_sent"]

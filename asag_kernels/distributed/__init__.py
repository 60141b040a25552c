"""Sequence-parallel Sinkhorn attention over ``torch.distributed`` (SPEC §9).

``sinkhorn_attention(q, k, v, *, group=None, strategy="auto", **kwargs)`` takes this rank's shard
of the sequence (dim -2) and returns this rank's shard of the single-process result. Strategies:
``"ulysses"`` (all-to-all to a head shard, the fused single-process op, all-to-all back) and
``"ring"`` (the building blocks of SPEC §8 over rotating shards; no rank ever holds the whole
sequence). ``bytes_sent()`` reports what this process handed to torch.distributed.
"""

from .api import STRATEGIES, sinkhorn_attention
from .comm import bytes_sent, reset_bytes_sent

__all__ = ["sinkhorn_attention", "STRATEGIES", "bytes_sent", "reset_bytes_sent"]

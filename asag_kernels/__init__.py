"""asag_kernels: fused, tiled, log-domain Sinkhorn-attention kernels for Adversarial Sinkhorn
Attention Guidance (ASAG) in diffusion models."""

from .api import available_backends, backend_status, sinkhorn_attention
from .version import __version__

__all__ = ["sinkhorn_attention", "available_backends", "backend_status", "__version__"]

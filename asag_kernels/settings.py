"""What ASAG's perturbed attention computes, validated once: :class:`SinkhornSettings` and its ``attend``.

Every integration (diffusers' SDPA interception and PAG processors, the modular-pipeline guider, the
ComfyUI node pack) builds one of these from its user's inputs and calls :meth:`SinkhornSettings.attend`
on the ``[B, H, N, D]`` query/key/value of each perturbed self-attention call. ``attend`` decides
between plain Sinkhorn attention (no text tokens, no mask) and joint text+image attention (SPEC §10),
and applies the one mask rule of :mod:`asag_kernels.masks`.

The defaults of ASAG's user-facing parameters live here too, so the diffusers guider, ``enable_asag``
and the ComfyUI nodes cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validate import check_backend, check_epsilon, check_num_iters
from .api import sinkhorn_attention
from .joint import check_joint_mode, joint_sinkhorn_attention
from .masks import key_padding

__all__ = ["SinkhornSettings", "DEFAULT_ASAG_SCALE", "DEFAULT_NUM_ITERS", "DEFAULT_EPSILON", "DEFAULT_JOINT_MODE"]

# ASAG's guidance scale s in  pred + s * (pred_cond - pred_cond_asag)  (SPEC §1).
DEFAULT_ASAG_SCALE = 1.5
DEFAULT_NUM_ITERS = 2
DEFAULT_EPSILON = 1.0
DEFAULT_JOINT_MODE = "image"


@dataclass(frozen=True)
class SinkhornSettings:
    """The Sinkhorn keywords of ASAG's perturbed attention, checked on construction (SPEC §5 rules).

    Args:
        num_iters: Sinkhorn iterations, an int in ``[0, 2**31 - 1]``.
        epsilon: entropic regularisation, finite and ``> 0``.
        backend: ``"auto"`` or a backend name (whether it runs here is decided at the call).
        joint_mode: ``"image"`` (perturb only image-image attention, as PAG does) or ``"joint"`` (SPEC §10).
    """

    num_iters: int = DEFAULT_NUM_ITERS
    epsilon: float = DEFAULT_EPSILON
    backend: str = "auto"
    joint_mode: str = DEFAULT_JOINT_MODE

    def __post_init__(self):
        object.__setattr__(self, "num_iters", check_num_iters(self.num_iters))
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        object.__setattr__(self, "backend", check_backend(self.backend))
        object.__setattr__(self, "joint_mode", check_joint_mode(self.joint_mode))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        image_start: int = 0,
        image_stop: int | None = None,
        attn_mask: torch.Tensor | None = None,
        stock: Callable[[], torch.Tensor] | None = None,
        where: str = "this attention call",
    ) -> torch.Tensor:
        """ASAG's perturbed self-attention (adversarial cost) of one call.

        Args:
            q, k, v: ``[B, H, N, D]``, ``[B, H, N, D]``, ``[B, H, N, Dv]``, any strides.
            scale: the call's logit scale; ``None`` means ``1/sqrt(D)``.
            image_start, image_stop: the image tokens are ``image_start:image_stop`` (``None``: up to ``N``),
                the rest are text tokens of a joint sequence. The whole range means plain self-attention.
            attn_mask: ``None`` or the call's mask in SDPA's convention (bool, or additive 0 / very negative,
                broadcastable to ``[B, H, N, N]``): dropped tokens get zero mass (:func:`asag_kernels.masks.key_padding`);
                any other mask raises :class:`asag_kernels.masks.UnsupportedMaskError`.
            stock: ``() -> [B, H, N, Dv]``, the model's own masked attention; used for the query rows the mask
                itself drops (``m_i & m_j`` masks). Without it those rows get ordinary attention over the real keys.
            where: the module or block, for error messages.

        Returns:
            ``[B, H, N, Dv]`` in q's dtype.
        """
        n = q.shape[-2]
        image_stop = n if image_stop is None else image_stop
        kpm, padded_queries = key_padding(attn_mask, q.shape[0], n, where)
        kw = dict(num_iters=self.num_iters, cost="adversarial", scale=scale, epsilon=self.epsilon, backend=self.backend)
        if image_start == 0 and image_stop == n and kpm is None:
            return sinkhorn_attention(q, k, v, **kw)
        out = joint_sinkhorn_attention(q, k, v, image_start=image_start, image_stop=image_stop,
                                       joint_mode=self.joint_mode, key_padding_mask=kpm, **kw)
        if stock is not None and padded_queries is not None and bool(padded_queries.any()):
            out = torch.where(padded_queries[:, None, :, None], stock().to(out.dtype), out)
        return out

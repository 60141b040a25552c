"""One rule for turning a model's attention mask into what ASAG's perturbed attention honours (SPEC §10).

Sinkhorn attention has no counterpart for an attention *bias* or a causal mask: the only masks it
can honour are those that drop whole tokens. Both integrations (diffusers' SDPA interception and the
ComfyUI node pack) hand their mask to :func:`key_padding` and get the same answer:

* a bool mask (True = may attend), or an additive float mask whose entries are ``0`` (keep) or at or
  below :data:`DROPPED_LOGIT` (drop; ``-inf`` included) — anything else is a bias and is refused;
* it must be the same for every head, and either the same for every query (a key-padding mask,
  ``[B, 1, 1, N]`` as Qwen-Image passes it) or its query-and-key form ``m_i & m_j`` (HunyuanVideo 1.5),
  whose padded query rows the caller fills with what the model's own masked attention gives them.

Masks come in SDPA's convention: broadcastable to ``[B, H, Nq, Nk]`` from the right (a 2-D mask is
``[Nq, Nk]``, a 3-D one ``[H, Nq, Nk]``). A caller whose framework means something else by a 3-D mask
(ComfyUI: ``[B, Nq, Nk]``) adds the head dim first.
"""

from __future__ import annotations

import torch

__all__ = ["DROPPED_LOGIT", "UnsupportedMaskError", "key_padding"]

# An additive mask entry at or below this drops its key: exp(-1e4 + any moderate logit) is 0 in float32.
# Models write their "minus infinity" as -1e4 (older diffusers UNets), -finfo.max or -inf; all are at or below it.
DROPPED_LOGIT = -1.0e4


class UnsupportedMaskError(ValueError, NotImplementedError):
    """A mask ASAG's perturbed attention cannot honour (a bias, causal, different per head or per query).

    A ValueError (the mask is an input ASAG does not accept) and a NotImplementedError (what the
    diffusers interception raised before the two integrations shared this rule)."""


def _keep(mask: torch.Tensor, where: str) -> torch.Tensor:
    """True where a key may be attended: bool masks as they are, additive ones 0 (keep) / <= DROPPED_LOGIT."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise UnsupportedMaskError(f"ASAG cannot honour the attention mask in {where}: expected a bool or float mask, got {mask.dtype}")
    keep = mask == 0
    if not bool((keep | (mask <= DROPPED_LOGIT)).all()):
        raise UnsupportedMaskError(
            f"ASAG cannot replace the attention in {where}: its additive attention mask holds values other than 0 "
            f"and large negatives (<= {DROPPED_LOGIT:g}) — an attention bias, which Sinkhorn attention has no "
            f"counterpart for; it is not a key-padding mask"
        )
    return keep


def key_padding(mask: torch.Tensor | None, batch: int, n: int, where: str = "this attention call"):
    """``(key_padding_mask, padded_queries)`` from an SDPA-style mask of a self-attention call over ``n`` tokens.

    Args:
        mask: ``None``, or a bool/additive mask broadcastable to ``[batch, H, n, n]`` (SDPA's convention).
        batch: the batch size of the call; n: its number of tokens (queries = keys).
        where: the module or block, for error messages.

    Returns:
        ``key_padding_mask``: bool ``[batch, n]`` (True = real token), or ``None`` when every token is real;
        ``padded_queries``: bool ``[batch, n]`` marking query rows the mask itself drops (the ``m_i & m_j``
        form), or ``None``. Raises :class:`UnsupportedMaskError` for any other mask.
    """
    if mask is None:
        return None, None
    keep = _keep(mask, where)
    if keep.dim() > 4 or keep.shape[-1] != n or (keep.dim() >= 2 and keep.shape[-2] not in (1, n)):
        raise UnsupportedMaskError(
            f"ASAG cannot honour the attention mask in {where}: expected a mask broadcastable to "
            f"[B, H, {n}, {n}], got shape {tuple(mask.shape)}; it is not a key-padding mask"
        )
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    if keep.shape[0] not in (1, batch):
        raise UnsupportedMaskError(
            f"ASAG cannot honour the attention mask in {where}: expected a mask for a batch of {batch} (or shared), "
            f"got shape {tuple(mask.shape)}"
        )
    keep = keep.expand(batch, keep.shape[1], keep.shape[2], n)
    if not bool((keep == keep[:, :1]).all()):
        raise UnsupportedMaskError(f"ASAG cannot replace the attention in {where}: its mask differs between heads; it is not a key-padding mask")
    keep = keep[:, 0]                      # [B, Nq or 1, N]
    real = keep.any(dim=1)                 # a key is real if some query may see it
    if bool((keep == real[:, None, :]).all()):
        return (None if bool(real.all()) else real), None
    if keep.shape[1] == n and bool((keep == (real[:, :, None] & real[:, None, :])).all()):
        return real, ~real
    raise UnsupportedMaskError(
        f"ASAG cannot replace the attention in {where}: its attention mask is not a key-padding mask (only masks "
        f"that drop whole keys, optionally the same queries, are supported)"
    )

"""ASAG's perturbed attention, in the two shapes ComfyUI hands attention over.

* UNet (SD 1.5/SD 2/SDXL): an ``attn1`` replace patch, ``patch(q, k, v, extra_options)`` with
  ``q, k, v: [B, N, H*D]`` (the projections of ``CrossAttention``) returning ``[B, N, H*D]``.
* DiT (SD3/SD3.5, Flux, Wan): a ``"dit"`` block replace patch that runs the original block with an
  ``optimized_attention_override`` in its ``transformer_options``; the override computes the
  block's first attention call (its self-attention: the joint text+image attention of Flux/SD3
  blocks, the video self-attention of Wan blocks) with Sinkhorn attention and lets every later call
  (Wan's cross-attention, SD3.5's second image-only attention) through unchanged.

Both call the core ops of asag_kernels, so the plan is never materialised and the output is the
row-normalised plan times V (SPEC §3); ``legacy_output_scale`` multiplies it by ``1/N_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asag_kernels import sinkhorn_attention
from asag_kernels.joint import joint_sinkhorn_attention


@dataclass(frozen=True)
class SinkhornSettings:
    """The op arguments chosen on the node (already validated)."""

    num_iters: int = 2
    epsilon: float = 1.0
    backend: str = "auto"
    joint_mode: str = "image"
    legacy_output_scale: bool = False

    def attend(self, q, k, v, *, scale=None, image_start=0, key_padding_mask=None):
        """Perturbed attention of ``q, k, v: [B, H, N, D]`` -> ``[B, H, N, D]``; tokens before
        ``image_start`` are text (joint attention), the rest image tokens."""
        n = q.shape[2]
        if image_start == 0 and key_padding_mask is None:
            out = sinkhorn_attention(q, k, v, num_iters=self.num_iters, cost="adversarial", scale=scale,
                                     epsilon=self.epsilon, backend=self.backend)
        else:
            out = joint_sinkhorn_attention(
                q, k, v, image_start=image_start, image_stop=n, joint_mode=self.joint_mode,
                key_padding_mask=key_padding_mask, num_iters=self.num_iters, cost="adversarial", scale=scale,
                epsilon=self.epsilon, backend=self.backend,
            )
        if self.legacy_output_scale:
            # The old exponential-domain node returned P.V with rows of P summing to 1/N_k.
            out = out / k.shape[2]
        return out


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` (or ``[B, N, H, D]``, as SD3 passes v) -> ``[B, H, N, D]`` (a view where the
    layout allows; the op takes any strides)."""
    b, n = t.shape[:2]
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H*D]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def unet_attn1_patch(settings: SinkhornSettings):
    """An ``attn1`` replace patch for ComfyUI's UNet ``BasicTransformerBlock``."""

    def asag_attn1(q, k, v, extra_options, mask=None):
        if mask is not None:
            raise ValueError("ASAG: this self-attention layer has an attention mask, which ASAG's UNet patch does not support")
        heads = extra_options["n_heads"]
        out = settings.attend(_heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads))
        return _heads_last(out).to(q.dtype)

    return asag_attn1


def _key_padding_mask(mask, batch: int, n: int):
    """ComfyUI's attention mask as a bool key-padding mask ``[B, N]`` (True = real token), or a
    ValueError if the mask is more than that (a bias, or different per query or head)."""
    if mask is None:
        return None
    m = mask
    if m.dim() == 2:  # [Lq, Lk]
        m = m[None, None]
    elif m.dim() == 3:  # ComfyUI's [B, Lq, Lk] (per sample, shared by the heads)
        m = m[:, None]
    real = m if m.dtype == torch.bool else (m == 0)
    ok = m.dtype == torch.bool or bool(((m == 0) | (m == float("-inf"))).all())
    ok = ok and m.shape[-1] == n and bool((real == real[..., :1, :1, :]).all())
    if not ok:
        raise ValueError(
            "ASAG: the attention mask of this block is not a key-padding mask (a bool mask, or 0/-inf "
            f"entries that are the same for every head and query), got dtype {mask.dtype}, shape {tuple(mask.shape)}"
        )
    real = real[:, 0, 0, :].expand(batch, n)
    return None if bool(real.all()) else real.contiguous()


def _call_args(args, kwargs):
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    return q, k, v, heads, mask


def _perturbed_call(settings: SinkhornSettings, image_start: int, expected_tokens: int, args, kwargs):
    """ComfyUI's ``optimized_attention(q, k, v, heads, mask=None, skip_reshape=False,
    skip_output_reshape=False, scale=..., ...)`` computed with Sinkhorn attention."""
    q, k, v, heads, mask = _call_args(args, kwargs)
    if kwargs.get("skip_reshape", False):  # [B, H, N, D] already (Flux)
        qh, kh, vh = q, k, v
    else:  # [B, N, H*D] (SD3, Wan)
        qh, kh, vh = _heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads)
    if kh.shape[1] != qh.shape[1]:  # grouped-query attention: each key head serves several query heads
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    n = qh.shape[2]
    if kh.shape[2] != n or n != expected_tokens:
        raise RuntimeError(
            f"ASAG: expected this block's first attention call to be its self-attention over {expected_tokens} "
            f"tokens, got {n} queries and {kh.shape[2]} keys; this model's block layout is not supported"
        )
    out = settings.attend(qh, kh, vh, scale=kwargs.get("scale"), image_start=image_start,
                          key_padding_mask=_key_padding_mask(mask, qh.shape[0], n))
    out = out.to(q.dtype)
    return out if kwargs.get("skip_output_reshape", False) else _heads_last(out)


def dit_block_patch(settings: SinkhornSettings, token_split, previous=None):
    """A ``"dit"`` block replace patch (``patch(args, extra) -> dict``) running the block with its
    self-attention replaced by Sinkhorn attention.

    ``token_split(args) -> (n_text, n_tokens)``: how many of the block's attention tokens are text
    (they come first in ComfyUI's Flux and SD3) and how many tokens there are in all.
    ``previous``: a block patch already installed at this key, which still runs around the block.
    """

    def asag_block(args, extra):
        n_text, n_tokens = token_split(args)
        options = dict(args["transformer_options"])
        outer = options.get("optimized_attention_override")
        calls = [0]

        def override(func, *a, **kw):
            calls[0] += 1
            if calls[0] == 1:
                return _perturbed_call(settings, n_text, n_tokens, a, kw)
            return outer(func, *a, **kw) if outer is not None else func(*a, **kw)

        options["optimized_attention_override"] = override
        args = dict(args, transformer_options=options)
        out = previous(args, extra) if previous is not None else extra["original_block"](args)
        if calls[0] == 0:
            raise RuntimeError("ASAG: the patched block made no attention call through ComfyUI's optimized_attention")
        return out

    return asag_block

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

import torch

from asag_kernels.settings import SinkhornSettings

__all__ = ["SinkhornSettings", "comfy_mask_as_sdpa", "unet_attn1_patch", "dit_block_patch"]


def _attend(settings: SinkhornSettings, legacy_output_scale: bool, q, k, v, **kwargs):
    """``settings.attend`` (the core package's one perturbed attention and mask rule) plus the one
    thing that is ComfyUI's: ``legacy_output_scale``, the old exponential-domain node's ``P.V`` with
    plan rows summing to ``1/N_k``."""
    out = settings.attend(q, k, v, **kwargs)
    return out / k.shape[2] if legacy_output_scale else out


def comfy_mask_as_sdpa(mask):
    """ComfyUI's attention mask in SDPA's convention, for :func:`asag_kernels.masks.key_padding`:
    ComfyUI's 3-D masks are ``[B, Lq, Lk]`` (per sample, shared by the heads), SDPA's ``[H, Lq, Lk]``,
    so a 3-D mask gets its head dim; 2-D ``[Lq, Lk]`` and 4-D ``[B, H, Lq, Lk]`` mean the same in both."""
    if mask is None or mask.dim() != 3:
        return mask
    return mask[:, None]


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` (or ``[B, N, H, D]``, as SD3 passes v) -> ``[B, H, N, D]`` (a view where the
    layout allows; the op takes any strides)."""
    b, n = t.shape[:2]
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H*D]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def unet_attn1_patch(settings: SinkhornSettings, legacy_output_scale: bool = False):
    """An ``attn1`` replace patch for ComfyUI's UNet ``BasicTransformerBlock``."""

    def asag_attn1(q, k, v, extra_options, mask=None):
        heads = extra_options["n_heads"]
        qh, kh, vh = _heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads)
        block = extra_options.get("block")
        where = f"UNet self-attention {block}" if block is not None else "a UNet self-attention layer"
        out = _attend(settings, legacy_output_scale, qh, kh, vh, attn_mask=comfy_mask_as_sdpa(mask), where=where)
        return _heads_last(out).to(q.dtype)

    return asag_attn1


def _call_args(args, kwargs):
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    return q, k, v, heads, mask


def _perturbed_call(settings: SinkhornSettings, legacy_output_scale: bool, image_start: int, expected_tokens: int,
                    where: str, func, args, kwargs):
    """ComfyUI's ``optimized_attention(q, k, v, heads, mask=None, skip_reshape=False,
    skip_output_reshape=False, scale=..., ...)`` computed with Sinkhorn attention; ``func`` is the
    attention ComfyUI would have run (the model's own masked attention, for query rows a
    query-and-key mask drops)."""
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

    def stock():
        out = func(*args, **kwargs)
        return out if kwargs.get("skip_output_reshape", False) else _heads_first(out, qh.shape[1])

    out = _attend(settings, legacy_output_scale, qh, kh, vh, scale=kwargs.get("scale"), image_start=image_start,
                  attn_mask=comfy_mask_as_sdpa(mask), stock=stock, where=where)
    out = out.to(q.dtype)
    return out if kwargs.get("skip_output_reshape", False) else _heads_last(out)


def dit_block_patch(settings: SinkhornSettings, token_split, previous=None, where: str = "a DiT block"):
    """A ``"dit"`` block replace patch (``patch(args, extra) -> dict``) running the block with its
    self-attention replaced by Sinkhorn attention.

    ``token_split(args) -> (n_text, n_tokens)``: how many of the block's attention tokens are text
    (they come first in ComfyUI's Flux and SD3) and how many tokens there are in all.
    ``previous``: a block patch already installed at this key, which still runs around the block.
    ``where``: the block, for error messages.
    """

    def asag_block(args, extra):
        n_text, n_tokens = token_split(args)
        options = dict(args["transformer_options"])
        outer = options.get("optimized_attention_override")
        calls = [0]

        def override(func, *a, **kw):
            calls[0] += 1
            if calls[0] == 1:
                stock = func if outer is None else (lambda *sa, **skw: outer(func, *sa, **skw))
                return _perturbed_call(settings, False, n_text, n_tokens, where, stock, a, kw)
            return outer(func, *a, **kw) if outer is not None else func(*a, **kw)

        options["optimized_attention_override"] = override
        args = dict(args, transformer_options=options)
        out = previous(args, extra) if previous is not None else extra["original_block"](args)
        if calls[0] == 0:
            raise RuntimeError("ASAG: the patched block made no attention call through ComfyUI's optimized_attention")
        return out

    return asag_block

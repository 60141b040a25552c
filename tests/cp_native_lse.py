"""Test support: diffusers' ring context parallelism on the CPU.

diffusers 0.42.1's ring attention calls the backend's forward op with ``return_lse=True``; the
``native`` op refuses it and ``_native_flash`` calls ``aten::_scaled_dot_product_flash_attention``,
which has no CPU kernel, and every other backend that supports context parallelism is GPU-only. So
on a CPU machine nothing runs the unperturbed attention of a ring-parallel model. :func:`enable`
gives the native forward op the LSE through torch's CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, out and LSE in one call), in this process.
It changes only how diffusers computes its own (unperturbed) attention; ASAG's perturbed calls
never reach it.
"""

from __future__ import annotations

import torch


def enable() -> None:
    from diffusers.models import attention_dispatch

    original = attention_dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # [B, S, H, D] -> [B, H, S, D]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # [B, S, H, D], [B, S, H]

    attention_dispatch._native_attention_forward_op = forward_op

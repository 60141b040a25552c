"""Tiny ComfyUI models (ComfyUI's own model classes, small configs, random weights), sampling with
ComfyUI's own sampler, and a float64 oracle for the attention the node must produce.

Nothing here imports the node pack: the oracle is written from SPEC §3 (and the joint-attention
formula of the contract), so a test compares the pack against an independent computation.
"""

from __future__ import annotations

import math

import torch

import comfy.model_patcher
import comfy.sample
import comfy.supported_models

CPU = torch.device("cpu")


def randomize(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds layers without initialising them: fill every parameter with seeded values
    (1/sqrt(fan_in) weights, small biases, norm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _patcher(config_cls, unet_config: dict, seed: int):
    config = config_cls(unet_config)
    model = config.get_model({}, device=CPU)
    randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


# UNet: input_blocks 1 (1 transformer) and 3 (2 transformers), the middle block, output blocks
# with 2, 2, 1, 1 transformers; 8x8 latents -> 64 tokens at the first level, 16 below it.
TINY_UNET = dict(
    use_checkpoint=False, image_size=8, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, dtype=torch.float32, in_channels=4, model_channels=32, num_res_blocks=[1, 1],
    transformer_depth=[1, 2], channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True,
    context_dim=32, num_head_channels=16, transformer_depth_output=[1, 1, 2, 2], use_temporal_attention=False,
    use_temporal_resblock=False,
)


def tiny_unet(seed: int = 0):
    cfg = dict(TINY_UNET)

    class TinySD15(comfy.supported_models.SD15):
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    return _patcher(TinySD15, cfg, seed)


def tiny_flux(seed: int = 0):
    cfg = dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, patch_size=2,
               vec_in_dim=16, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2,
               depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, txt_ids_dims=[])
    return _patcher(comfy.supported_models.Flux, cfg, seed)


def tiny_sd3(seed: int = 0):
    cfg = dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=2,
               adm_in_channels=16, pos_embed_max_size=8, num_patches=64, qk_norm=None,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}})
    patcher = _patcher(comfy.supported_models.SD3, cfg, seed)
    # MMDiT allocates its position-embedding buffer empty (a checkpoint fills it).
    with torch.no_grad():
        pos = patcher.model.diffusion_model.pos_embed
        pos.copy_(0.1 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return patcher


def tiny_wan(seed: int = 0):
    cfg = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64,
               ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2, eps=1e-6)
    return _patcher(comfy.supported_models.WAN21_T2V, cfg, seed)


def tiny_chroma(seed: int = 0):
    # Chroma: Flux's blocks without per-block modulation (one distilled approximator makes every modulation).
    cfg = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
               num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
               qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=1, txt_ids_dims=[], vec_in_dim=None)
    return _patcher(comfy.supported_models.Chroma, cfg, seed)


def tiny_hunyuanvideo(seed: int = 0):
    cfg = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=32,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
               theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
               use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    return _patcher(comfy.supported_models.HunyuanVideo, cfg, seed)


def tiny_qwenimage(seed: int = 0):
    cfg = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
    return _patcher(comfy.supported_models.QwenImage, cfg, seed)


def conditioning(kind: str, seed: int, tokens: int = 6):
    """ComfyUI CONDITIONING lists ``[[tensor, dict]]`` (positive, negative) for a tiny model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ctx = torch.randn(1, tokens, 32, generator=g)
        extra = {}
        if kind == "flux":
            extra = {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5}
        elif kind == "sd3":
            extra = {"pooled_output": torch.randn(1, 16, generator=g)}
        elif kind == "chroma":
            extra = {"guidance": 0.0}
        elif kind == "hunyuanvideo":
            extra = {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 6.0}
        out.append([[ctx, extra]])
    return out


def latent(kind: str, seed: int) -> torch.Tensor:
    shape = {"unet": (1, 4, 8, 8), "flux": (1, 16, 8, 8), "sd3": (1, 16, 8, 8), "wan": (1, 16, 2, 8, 8),
             "chroma": (1, 16, 8, 8), "hunyuanvideo": (1, 16, 2, 8, 8), "qwenimage": (1, 16, 1, 8, 8)}[kind]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sample(model, kind: str, *, steps: int = 3, cfg: float = 2.5, seed: int = 0, extra_cond: dict | None = None) -> torch.Tensor:
    """Latents from ComfyUI's own KSampler path (comfy.sample.sample, euler, simple schedule);
    ``extra_cond`` is added to both conditionings' dicts."""
    pos, neg = conditioning(kind, seed + 1)
    for c in (pos, neg):
        c[0][1].update(extra_cond or {})
    lat = torch.zeros_like(latent(kind, seed))
    noise = latent(kind, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, lat, seed=seed,
                                   disable_pbar=True)


# ---- the float64 oracle (SPEC §3; joint mode "image" as in the joint-attention contract) ----

def sinkhorn64(q, k, v, *, num_iters=2, epsilon=1.0, scale=None):
    """Row-normalised adversarial Sinkhorn attention, materialised in float64. q, k, v: [B, H, N, D]."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = -scale * (q @ k.transpose(-1, -2)) / epsilon
    nq, nk = logits.shape[-2:]
    g = torch.zeros(logits.shape[:-2] + (1, nk), dtype=torch.float64)
    for _ in range(num_iters):
        f = -math.log(nq) - torch.logsumexp(logits + g, dim=-1, keepdim=True)
        g = -math.log(nk) - torch.logsumexp(logits + f, dim=-2, keepdim=True)
    return torch.softmax(logits + g, dim=-1) @ v


def _masked_logits(q, k, scale, real_keys):
    logits = scale * q @ k.transpose(-1, -2)
    return logits if real_keys is None else logits.masked_fill(~real_keys, float("-inf"))


def softmax64(q, k, v, scale=None, real_keys=None):
    """Softmax attention in float64; ``real_keys``: None or bool [N_k] (False = padded key)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(_masked_logits(q, k, scale, real_keys), dim=-1) @ v


def joint64(q, k, v, n_text: int, joint_mode: str, real_keys=None, **kw):
    """ASAG's joint attention over [text | image] tokens, materialised in float64; padded keys
    (``real_keys`` False, text only here) take no part, padded queries get ordinary attention."""
    if n_text == 0 or (joint_mode == "joint" and real_keys is None):
        return sinkhorn64(q, k, v, **kw)
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    soft = torch.softmax(_masked_logits(q, k, scale, real_keys), dim=-1)
    out = soft @ v
    if joint_mode == "joint":  # Sinkhorn over the real tokens
        idx = real_keys.nonzero().flatten()
        out[..., idx, :] = sinkhorn64(q[..., idx, :], k[..., idx, :], v[..., idx, :], **kw)
        return out
    img = slice(n_text, q.shape[2])
    m = soft[..., img, img].sum(-1, keepdim=True)
    out[..., img, :] = soft[..., img, :n_text] @ v[..., :n_text, :] + m * sinkhorn64(q[..., img, :], k[..., img, :], v[..., img, :], **kw)
    return out


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def heads_first(t, heads):
    """[B, N, H*D] or [B, N, H, D] -> [B, H, N, D]"""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

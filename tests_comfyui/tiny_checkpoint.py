"""A small checkpoint that ComfyUI's own loader (CheckpointLoaderSimple -> comfy.sd.load_checkpoint_guess_config)
detects as SD 1.5: random weights, built from ComfyUI's own classes and saved with ComfyUI's own
``comfy.sd.save_checkpoint``, then stored as float16 safetensors.

ComfyUI's model detection fixes what marks an SD 1.5 UNet (320 base channels, 768-wide text context,
no linear projections in the transformers) and reads the rest from the weights, so the UNet here has one
resolution level, one ResBlock per level and one transformer per attention block (about 20M parameters).
The text encoder (CLIP ViT-L/14's text tower, ComfyUI's fixed configuration) and the VAE (ComfyUI's
default SD VAE configuration) are not inferred from the weights and keep their full size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import CPU, randomize

# The smallest SD 1.5-architecture UNet ComfyUI's detection still recognises as SD15 (see module doc).
SD15_TINY_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, dtype=torch.float32, in_channels=4, model_channels=320, num_res_blocks=[1],
    transformer_depth=[1], channel_mult=[1], transformer_depth_middle=1, use_linear_in_transformer=False,
    context_dim=768, transformer_depth_output=[1, 1], use_temporal_attention=False, use_temporal_resblock=False,
)
# comfy.sd.VAE's default (SD) configuration.
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def build_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import load_file, save_file

    config = comfy.supported_models.SD15(dict(SD15_TINY_UNET))
    model = config.get_model({}, device=CPU)
    randomize(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    clip = comfy.sd.CLIP(target=config.clip_target())
    randomize(clip.cond_stage_model, seed + 1)
    autoencoder = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    randomize(autoencoder, seed + 2)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    full = path.with_suffix(".fp32.safetensors")
    comfy.sd.save_checkpoint(str(full), patcher, clip, vae)
    state = load_file(str(full))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    full.unlink()
    return path

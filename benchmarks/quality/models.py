"""The lab's architectures (diffusers' own classes), schedulers and shipped-weight loading, defined once."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel  # noqa: E402

from .data import NUM_CLASSES, RESOLUTION  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ("dit", "unet")
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"


def build(name: str) -> torch.nn.Module:
    """A fresh (random-init, current torch RNG) model ``name``: "dit" or "unet"; labels 0..9, 10 = null."""
    if name == "dit":
        # patch 2 on 16x16 -> 64 tokens; self-attention in each of the 4 blocks
        return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                                     num_layers=4, sample_size=RESOLUTION, patch_size=2,
                                     num_embeds_ada_norm=NUM_CLASSES + 1)
    if name == "unet":
        # self-attention at 8x8 (64 tokens): the attn down/up blocks and the mid block
        return UNet2DModel(sample_size=RESOLUTION, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
                           norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Predicted noise ``[B, 1, 16, 16]`` for ``x [B, 1, 16, 16]``, timesteps ``t [B]``, labels ``y [B]``."""
    if isinstance(model, UNet2DModel):
        return model(x, t, class_labels=y).sample
    return model(x, timestep=t, class_labels=y).sample


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE, clip_sample=True)


def weights_path(name: str) -> Path:
    return HERE / f"{name}.safetensors"


def load(name: str) -> torch.nn.Module:
    """The shipped trained model ``name`` (EMA weights), in eval mode."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build(name)
    model.load_state_dict(load_file(str(weights_path(name))))
    return model.eval()

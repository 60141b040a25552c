"""ASAG for Flux.1 in diffusers' modular pipeline: a guider-capable denoise step.

Flux.1's modular denoise loop (``FluxLoopDenoiser``) calls the transformer once per step and takes
no ``guider``: Flux.1-dev is guidance-distilled (the guidance strength goes in as an embedding, the
pipeline's ``guidance_scale`` input), and diffusers has no PAG pipeline for Flux. This module adds
the one piece that is missing, the way the other families' loops do it: :class:`FluxGuidedLoopDenoiser`
asks ``components.guider`` for its batches (``pred_cond``, ``pred_cond_asag`` and, when the guider's
CFG is on, ``pred_uncond``), runs the transformer on each with ``prepare_models``/``cleanup_models``
around it, and lets the guider combine them. With :class:`AdversarialSinkhornGuidance` and its
``guidance_scale=1.0`` (the default here: no true CFG on a distilled model) a step is

    pred = pred_cond + asag_scale * (pred_cond - pred_cond_asag)

while the distilled guidance embedding (``guidance_scale`` input, 3.5 by default) is passed to every
batch unchanged. ``guidance_scale > 1`` on the guider adds true CFG, which needs
``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``.

Usage::

    from diffusers.modular_pipelines.flux import FluxAutoBlocks
    from asag_kernels.diffusers import AdversarialSinkhornGuidance
    from asag_kernels.diffusers.flux import with_guided_denoiser

    blocks = with_guided_denoiser(FluxAutoBlocks())        # a copy with FluxGuidedLoopDenoiser in the loop
    pipe = blocks.init_pipeline("black-forest-labs/FLUX.1-dev")
    pipe.load_components(torch_dtype=torch.bfloat16)
    pipe.update_components(guider=AdversarialSinkhornGuidance(guidance_scale=1.0, asag_scale=1.5))
    image = pipe(prompt="a red fox in the snow", output="images")[0]

Any other diffusers guider (``ClassifierFreeGuidance``, ``PerturbedAttentionGuidance``,
``SkipLayerGuidance``) works in the same slot.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models import FluxTransformer2DModel
from diffusers.modular_pipelines.flux.denoise import FluxLoopDenoiser
from diffusers.modular_pipelines.modular_pipeline import BlockState, ModularPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam

from .guider import AdversarialSinkhornGuidance

__all__ = ["FluxGuidedLoopDenoiser", "with_guided_denoiser"]

# Flux.1 keyword -> (conditional, unconditional) block-state fields the guider splits into batches.
_GUIDER_INPUTS = {
    "encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds"),
    "pooled_projections": ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
}


class FluxGuidedLoopDenoiser(ModularPipelineBlocks):
    """``FluxLoopDenoiser`` with a ``guider``: one transformer call per guider batch, then the guider's combination.

    Block-state inputs are those of ``FluxLoopDenoiser`` (``latents [B, N, C]``, ``prompt_embeds
    [B, T, D]``, ``pooled_prompt_embeds [B, P]``, ``txt_ids``, ``img_ids``, ``guidance``) plus the
    optional negatives for true CFG. Writes ``block_state.noise_pred [B, N, C]``.
    """

    model_name = "flux"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec("transformer", FluxTransformer2DModel),
            ComponentSpec(
                "guider",
                AdversarialSinkhornGuidance,
                config=FrozenDict({"guidance_scale": 1.0}),  # distilled model: ASAG only, no true CFG
                default_creation_method="from_config",
            ),
        ]

    @property
    def description(self) -> str:
        return (
            "Step within the Flux.1 denoising loop that runs the transformer once per guider batch "
            "(e.g. AdversarialSinkhornGuidance: conditional and ASAG-perturbed) and combines them with the guider"
        )

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("joint_attention_kwargs"),
            InputParam("latents", required=True, type_hint=torch.Tensor, description="Packed latents [B, N, C]"),
            InputParam("guidance", type_hint=torch.Tensor, description="Distilled guidance as a tensor (Flux.1-dev)"),
            InputParam("prompt_embeds", required=True, type_hint=torch.Tensor, description="Prompt embeddings"),
            InputParam("pooled_prompt_embeds", required=True, type_hint=torch.Tensor, description="Pooled prompt embeddings"),
            InputParam("negative_prompt_embeds", type_hint=torch.Tensor, description="Negative prompt embeddings (true CFG)"),
            InputParam("negative_pooled_prompt_embeds", type_hint=torch.Tensor,
                       description="Negative pooled prompt embeddings (true CFG)"),
            InputParam("txt_ids", required=True, type_hint=torch.Tensor, description="Text-token ids for RoPE"),
            InputParam("img_ids", required=True, type_hint=torch.Tensor, description="Image-token ids for RoPE"),
            InputParam("num_inference_steps", required=True, type_hint=int, description="Number of denoising steps"),
        ]

    @torch.no_grad()
    def __call__(self, components, block_state: BlockState, i: int, t: torch.Tensor):
        guider = components.guider
        guider_inputs: dict[str, Any] = {
            name: tuple(getattr(block_state, field, None) for field in fields) for name, fields in _GUIDER_INPUTS.items()
        }
        guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        batches = guider.prepare_inputs(guider_inputs)
        if guider.num_conditions > 1 and any(getattr(b, "encoder_hidden_states", None) is None for b in batches):
            raise ValueError(
                f"{type(guider).__name__} asks for an unconditional batch (classifier-free guidance is on) but "
                f"negative_prompt_embeds / negative_pooled_prompt_embeds were not given; pass them, or use "
                f"guidance_scale=1.0 on the guider (Flux.1-dev is guidance-distilled)"
            )
        for batch in batches:
            guider.prepare_models(components.transformer)
            try:
                batch.noise_pred = components.transformer(
                    hidden_states=block_state.latents,
                    timestep=t.flatten() / 1000,
                    guidance=block_state.guidance,
                    joint_attention_kwargs=block_state.joint_attention_kwargs,
                    txt_ids=block_state.txt_ids,
                    img_ids=block_state.img_ids,
                    return_dict=False,
                    **{name: getattr(batch, name) for name in _GUIDER_INPUTS},
                )[0]
            finally:  # hooks come off even when the transformer raises
                guider.cleanup_models(components.transformer)
        block_state.noise_pred = guider(batches)[0]
        return components, block_state


def with_guided_denoiser(blocks):
    """A copy of ``blocks`` (e.g. ``FluxAutoBlocks()``) whose ``FluxLoopDenoiser`` steps are
    :class:`FluxGuidedLoopDenoiser`; ``blocks`` itself is left as it was.

    Only the containers on the way to a replaced step are copied: diffusers shares block instances
    between every ``FluxAutoBlocks()`` (they are created once, at class level), so replacing in place
    would change every Flux pipeline in the process. Raises ``ValueError`` when ``blocks`` holds no
    ``FluxLoopDenoiser`` (Flux Kontext's loop denoiser is a different block and is not replaced).
    """
    new, replaced = _replace_denoisers(blocks)
    if not replaced:
        raise ValueError(
            f"with_guided_denoiser found no FluxLoopDenoiser in {type(blocks).__name__}; pass Flux.1 blocks "
            f"(diffusers.modular_pipelines.flux.FluxAutoBlocks or one of its denoise steps)"
        )
    return new


def _replace_denoisers(block):
    """(block with its FluxLoopDenoiser steps replaced, how many): the block itself when none is inside."""
    subs = getattr(block, "sub_blocks", None)
    if not subs:
        return block, 0
    fresh, replaced = copy.copy(subs), 0
    for name, sub in subs.items():
        if type(sub) is FluxLoopDenoiser:
            fresh[name], count = FluxGuidedLoopDenoiser(), 1
        else:
            fresh[name], count = _replace_denoisers(sub)
        replaced += count
    if not replaced:
        return block, 0
    clone = copy.copy(block)
    clone.sub_blocks = fresh
    return clone, replaced

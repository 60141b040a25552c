"""Tiny random components for every diffusers modular-pipeline family, offline, for smoke tests.

``build(model)`` returns a :class:`TinySetup`: a modular pipeline made of the family's own
``denoise`` step (diffusers' blocks, unchanged) with tiny randomly initialised denoiser and scheduler,
plus the call inputs. Prompts go in as random embeddings (and masks), the way diffusers' own modular
tests skip the text encoders, so nothing is downloaded and nothing needs a tokenizer. The pipeline
returns latents (``output="latents"``): decoding is not what ASAG changes.

Flux.1's modular denoise loop takes no guider (guidance-distilled model): its setup uses the loop
denoiser of :mod:`asag_kernels.diffusers.flux`, which does.

Used by ``examples/asag_modular.py --smoke-test`` and ``tests/test_diffusers_families.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODELS = ("sdxl", "sd3", "flux", "flux2", "qwenimage", "wan", "hunyuanvideo", "ltx")

TEXT_TOKENS = 6  # prompt length of the random embeddings
STEPS = 2


@dataclass
class TinySetup:
    """A tiny pipeline and what to call it with.

    Attributes:
        model: the family name (``asag_kernels.diffusers.families.FAMILIES`` key).
        pipe: the modular pipeline (denoise step only), guider not yet set.
        inputs: keyword arguments for ``pipe(...)`` (embeddings, sizes, steps); add ``generator``.
        layers: PAG-syntax layer ids that exist in this tiny denoiser (its defaults are out of range).
        denoisers: attribute names of the pipeline's denoiser components (Wan 2.2 has two).
        video: latents are 5-D.
    """

    model: str
    pipe: object
    inputs: dict
    layers: list[str]
    denoisers: tuple[str, ...] = ("transformer",)
    video: bool = False
    extra: dict = field(default_factory=dict)


def _g(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _embeds(dim: int, seed: int, tokens: int = TEXT_TOKENS):
    g = _g(seed)
    return torch.randn(1, tokens, dim, generator=g), torch.randn(1, tokens, dim, generator=g)


def _mask(tokens: int = TEXT_TOKENS, real: int | None = None) -> torch.Tensor:
    """A key-padding mask over text tokens: the last ``tokens - real`` are padding."""
    m = torch.zeros(1, tokens, dtype=torch.long)
    m[:, : tokens if real is None else real] = 1
    return m


def _denoise_pipeline(auto_blocks, components: dict):
    from diffusers.modular_pipelines import SequentialPipelineBlocks

    blocks = auto_blocks().sub_blocks
    pipe = SequentialPipelineBlocks.from_blocks_dict({"denoise": blocks["denoise"]}).init_pipeline()
    pipe.update_components(**components)
    return pipe


def _flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _sdxl() -> TinySetup:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16, transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    ).eval()
    pipe = _denoise_pipeline(StableDiffusionXLAutoBlocks, dict(unet=unet, scheduler=EulerDiscreteScheduler()))
    cond, uncond = _embeds(16, 1)
    g = _g(2)
    inputs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond,
                  pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                  height=64, width=64, num_inference_steps=STEPS)
    return TinySetup("sdxl", pipe, inputs, ["mid"], denoisers=("unet",))


def _sd3() -> TinySetup:
    from diffusers import SD3Transformer2DModel
    from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
    ).eval()
    pipe = _denoise_pipeline(StableDiffusion3AutoBlocks, dict(transformer=transformer, scheduler=_flow_scheduler()))
    cond, uncond = _embeds(16, 1)
    g = _g(2)
    inputs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond,
                  pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                  height=64, width=64, num_inference_steps=STEPS)
    return TinySetup("sd3", pipe, inputs, [r"^transformer_blocks\.(1)\.attn$"])


def _flux() -> TinySetup:
    from diffusers import FluxTransformer2DModel
    from diffusers.modular_pipelines.flux import FluxAutoBlocks

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()
    from asag_kernels.diffusers.flux import with_guided_denoiser

    # Flux.1's own loop takes no guider: the guided loop denoiser of asag_kernels.diffusers.flux stands in
    pipe = _denoise_pipeline(lambda: with_guided_denoiser(FluxAutoBlocks()),
                             dict(transformer=transformer, scheduler=_flow_scheduler()))
    cond, _ = _embeds(16, 1)
    inputs = dict(prompt_embeds=cond, pooled_prompt_embeds=torch.randn(1, 16, generator=_g(2)),
                  height=32, width=32, num_inference_steps=STEPS, guidance_scale=3.5)
    return TinySetup("flux", pipe, inputs, [r"^transformer_blocks\.(0)\.attn$"])


def _flux2() -> TinySetup:
    from diffusers import Flux2Transformer2DModel
    from diffusers.modular_pipelines.flux2 import Flux2KleinBaseAutoBlocks

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    ).eval()
    pipe = _denoise_pipeline(Flux2KleinBaseAutoBlocks, dict(transformer=transformer, scheduler=_flow_scheduler()))
    cond, uncond = _embeds(16, 1)
    inputs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32, num_inference_steps=STEPS)
    return TinySetup("flux2", pipe, inputs, [r"^transformer_blocks\.(0)\.attn$"])


def _qwenimage() -> TinySetup:
    from diffusers import QwenImageTransformer2DModel
    from diffusers.modular_pipelines.qwenimage import QwenImageAutoBlocks

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    pipe = _denoise_pipeline(QwenImageAutoBlocks, dict(transformer=transformer, scheduler=_flow_scheduler()))
    cond, uncond = _embeds(16, 1)
    inputs = dict(prompt_embeds=cond, prompt_embeds_mask=_mask(real=4),
                  negative_prompt_embeds=uncond, negative_prompt_embeds_mask=_mask(real=5),
                  height=32, width=32, num_inference_steps=STEPS)
    return TinySetup("qwenimage", pipe, inputs, [r"^transformer_blocks\.(1)\.attn$"])


def _wan() -> TinySetup:
    from diffusers import WanTransformer3DModel
    from diffusers.modular_pipelines.wan import Wan22Blocks

    def tiny(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
            text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32,
        ).eval()

    pipe = _denoise_pipeline(Wan22Blocks, dict(transformer=tiny(0), transformer_2=tiny(1),
                                                scheduler=_flow_scheduler(shift=3.0)))
    cond, uncond = _embeds(16, 1)
    inputs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32, num_frames=5,
                  num_inference_steps=STEPS)
    return TinySetup("wan", pipe, inputs, [r"^blocks\.(1)\.attn1$"], denoisers=("transformer", "transformer_2"),
                     video=True)


def _hunyuanvideo() -> TinySetup:
    from diffusers import HunyuanVideo15Transformer3DModel
    from diffusers.modular_pipelines.hunyuan_video1_5 import HunyuanVideo15AutoBlocks

    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(2, 2, 4),
        task_type="t2v",
    ).eval()
    pipe = _denoise_pipeline(HunyuanVideo15AutoBlocks, dict(transformer=transformer, scheduler=_flow_scheduler(shift=7.0)))
    cond, uncond = _embeds(16, 1)
    cond2, uncond2 = _embeds(16, 3, tokens=4)
    inputs = dict(prompt_embeds=cond, prompt_embeds_mask=_mask(real=4), negative_prompt_embeds=uncond,
                  negative_prompt_embeds_mask=_mask(real=5), prompt_embeds_2=cond2, prompt_embeds_mask_2=_mask(4, real=3),
                  negative_prompt_embeds_2=uncond2, negative_prompt_embeds_mask_2=_mask(4, real=4), batch_size=1,
                  height=32, width=32, num_frames=5, num_inference_steps=STEPS)
    return TinySetup("hunyuanvideo", pipe, inputs, [r"^transformer_blocks\.(1)\.attn$"], video=True)


def _ltx() -> TinySetup:
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.modular_pipelines.ltx import LTXBlocks

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=16,
    ).eval()
    pipe = _denoise_pipeline(LTXBlocks, dict(transformer=transformer, scheduler=_flow_scheduler()))
    cond, uncond = _embeds(16, 1)
    inputs = dict(prompt_embeds=cond, prompt_attention_mask=_mask(real=4), negative_prompt_embeds=uncond,
                  negative_prompt_attention_mask=_mask(real=5), height=64, width=64, num_frames=9,
                  num_inference_steps=STEPS)
    return TinySetup("ltx", pipe, inputs, [r"^transformer_blocks\.(1)\.attn1$"], video=True)


_BUILDERS = {
    "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "flux2": _flux2, "qwenimage": _qwenimage, "wan": _wan,
    "hunyuanvideo": _hunyuanvideo, "ltx": _ltx,
}


def build(model: str) -> TinySetup:
    """The tiny setup of ``model`` (one of :data:`MODELS`)."""
    if model not in _BUILDERS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    setup = _BUILDERS[model]()
    _quiet(setup.pipe._blocks)
    return setup


def _quiet(block) -> None:
    """No progress bars: the denoise loop sits a few levels down, where the pipeline's own
    ``set_progress_bar_config`` (top-level blocks only) does not reach."""
    if hasattr(block, "set_progress_bar_config"):
        block.set_progress_bar_config(disable=True)
    for sub in (getattr(block, "sub_blocks", None) or {}).values():
        _quiet(sub)


def run(setup: TinySetup, guider=None, seed: int = 0) -> torch.Tensor:
    """Run the tiny pipeline with ``guider`` (set on every guider slot the pipeline has); returns latents."""
    if guider is not None:
        slots = {"guider": guider}
        if "guider_2" in setup.pipe.component_names:
            slots["guider_2"] = guider
        setup.pipe.update_components(**slots)
    with torch.no_grad():
        return setup.pipe(**setup.inputs, generator=_g(seed), output="latents")

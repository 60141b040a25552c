"""Per-family facts for ASAG in diffusers: which denoiser, which block lists, which default layers.

Data plus a few lookups, no diffusers import, so the guider, the examples and the tests can all read
one table. Every default layer choice carries where it comes from (``LayerChoice.source``); where
nobody has published a recommendation for a family, the source says so and the choice is ours
(a block in the first half of the stack, untuned), so a user knows which defaults are evidence and
which are a starting point.

Layer choices are written the way diffusers' ``LayerSkipConfig`` writes them: a block list
(``fqn``, e.g. ``"transformer_blocks"``) and indices into it; the self-attention module inside
each block is named by the family (``attn`` in MMDiT/Flux/Qwen blocks, ``attn1`` in Wan/LTX blocks).
UNets have no block list: their choice is a diffusers PAG layer id (a regular expression searched
in module names, ``"mid"``).

Joint attention (one softmax over the concatenation of text and image tokens) orders the tokens
differently per model: text first in Flux.1, Flux.2 and Qwen-Image, image first in SD3/SD3.5 and
HunyuanVideo 1.5. :func:`image_token_range` turns that order into the ``image_start:image_stop``
range that :func:`asag_kernels.joint.joint_sinkhorn_attention` takes.

Facts checked against diffusers 0.42.1 (``models/transformers/*.py`` for the block lists, attention
attributes and token order; ``modular_pipelines/*/denoise.py`` for which denoise loops take a guider).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "LayerChoice",
    "Family",
    "FAMILIES",
    "TEXT_FIRST",
    "IMAGE_FIRST",
    "family_of",
    "get_family",
    "default_layers",
    "layer_patterns",
    "model_default_layers",
    "token_order_of",
    "image_token_range",
]

TEXT_FIRST = "text_first"
IMAGE_FIRST = "image_first"


@dataclass(frozen=True)
class LayerChoice:
    """One default perturbation site.

    Attributes:
        fqn: the block list (``"transformer_blocks"``, ``"single_transformer_blocks"``, ``"blocks"``),
            or ``None`` for a UNet, whose choice is ``pattern`` alone.
        indices: indices into ``fqn``.
        source: where the choice comes from (a diffusers default, a published recommendation, or
            "ours" when there is none).
        pattern: a diffusers PAG layer id (regular expression over module names), UNets only.
    """

    fqn: str | None
    indices: tuple[int, ...]
    source: str
    pattern: str | None = None


@dataclass(frozen=True)
class Family:
    """What ASAG needs to know about one model family.

    Attributes:
        name: the short name used everywhere (``--model`` of the examples, ``FAMILIES`` key).
        title: the models it covers, for messages and docs.
        denoisers: class names of the denoiser (matched against the model's MRO).
        modular_pipelines: diffusers modular pipeline classes of this family, as
            ``"diffusers.modular_pipelines.<ClassName>"`` names.
        takes_guider: whether the family's modular denoise loop takes a ``guider`` component
            (Flux.1 and Flux.2-dev's loops do not: guidance-distilled models).
        block_lists: the attribute names of the denoiser's block lists, in forward order.
        self_attention: attribute of the self-attention module inside each block of ``block_lists``
            (``None`` for UNets).
        joint: whether that self-attention is joint (text and image tokens in one softmax).
        token_order: ``TEXT_FIRST`` / ``IMAGE_FIRST`` for joint attention, ``None`` otherwise.
        masked_text: whether the model passes a key-padding mask over text tokens to that attention.
        video: latents are 5-D ``[B, C, F, H, W]``.
        defaults: the default layer choices (see :class:`LayerChoice`).
        alternatives: other published choices, for documentation and users.
    """

    name: str
    title: str
    denoisers: tuple[str, ...]
    modular_pipelines: tuple[str, ...]
    takes_guider: bool
    block_lists: tuple[str, ...]
    self_attention: str | None
    joint: bool
    token_order: str | None
    masked_text: bool
    video: bool
    defaults: tuple[LayerChoice, ...]
    alternatives: tuple[LayerChoice, ...] = field(default=())


_COMFY_SLG = "ComfyUI's SkipLayerGuidanceDiT node default (double_layers '7, 8, 9'; a generic DiT default, not tuned for this model)"
_OURS = "no published PAG/SLG/STG recommendation found for this model; our choice (an early-middle block), untuned"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="sdxl",
            title="Stable Diffusion XL (and SD 1.5: the same UNet class and the same PAG default)",
            denoisers=("UNet2DConditionModel",),
            modular_pipelines=("StableDiffusionXLModularPipeline",),
            takes_guider=True,
            block_lists=(),
            self_attention=None,
            joint=False,
            token_order=None,
            masked_text=False,
            video=False,
            defaults=(LayerChoice(None, (), "diffusers' StableDiffusionXLPAGPipeline default pag_applied_layers='mid'", pattern="mid"),),
            alternatives=(
                LayerChoice(None, (), "diffusers' StableDiffusionXLControlNetPAGPipeline comment: alternative layer 'down.block_2'",
                            pattern=r"down_blocks\.2"),
            ),
        ),
        Family(
            name="sd3",
            title="Stable Diffusion 3 / 3.5 (MMDiT)",
            denoisers=("SD3Transformer2DModel",),
            modular_pipelines=("StableDiffusion3ModularPipeline",),
            takes_guider=True,
            block_lists=("transformer_blocks",),
            self_attention="attn",
            joint=True,
            token_order=IMAGE_FIRST,  # JointAttnProcessor2_0: cat([image, text])
            masked_text=False,
            video=False,
            defaults=(LayerChoice("transformer_blocks", (7, 8, 9),
                                  "StabilityAI's SLG recommendation for SD3.5 Medium, layers [7, 8, 9] "
                                  "(diffusers' SkipLayerGuidance and StableDiffusion3Pipeline docstrings)"),),
            alternatives=(
                LayerChoice("transformer_blocks", (1,), "diffusers' StableDiffusion3PAGPipeline default pag_applied_layers='blocks.1'"),
                LayerChoice("transformer_blocks", (13,), "diffusers' StableDiffusion3PAGPipeline docstring example ['blocks.13']"),
            ),
        ),
        Family(
            name="flux",
            title="Flux.1 (dev / schnell; guidance-distilled)",
            denoisers=("FluxTransformer2DModel",),
            modular_pipelines=("FluxModularPipeline",),
            takes_guider=False,
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            self_attention="attn",
            joint=True,
            token_order=TEXT_FIRST,  # FluxAttnProcessor: cat([text, image]); single blocks get cat([text, image])
            masked_text=False,
            video=False,
            defaults=(LayerChoice("transformer_blocks", (7, 8, 9), _COMFY_SLG),),
        ),
        Family(
            name="flux2",
            title="Flux.2 (dev; Klein base takes a guider)",
            denoisers=("Flux2Transformer2DModel",),
            modular_pipelines=("Flux2KleinBaseModularPipeline", "Flux2ModularPipeline", "Flux2KleinModularPipeline"),
            takes_guider=True,  # only Flux2KleinBaseModularPipeline's loop; dev and Klein are guidance-distilled
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            self_attention="attn",
            joint=True,
            token_order=TEXT_FIRST,  # Flux2AttnProcessor: cat([text, image])
            masked_text=False,
            video=False,
            defaults=(LayerChoice("transformer_blocks", (2,), _OURS),),
        ),
        Family(
            name="qwenimage",
            title="Qwen-Image",
            denoisers=("QwenImageTransformer2DModel",),
            modular_pipelines=("QwenImageModularPipeline",),
            takes_guider=True,
            block_lists=("transformer_blocks",),
            self_attention="attn",
            joint=True,
            token_order=TEXT_FIRST,  # QwenDoubleStreamAttnProcessor2_0: cat([text, image])
            masked_text=True,  # encoder_hidden_states_mask over padded text tokens
            video=False,
            defaults=(LayerChoice("transformer_blocks", (10,), _OURS),),
        ),
        Family(
            name="wan",
            title="Wan 2.1 / 2.2 (video)",
            denoisers=("WanTransformer3DModel",),
            modular_pipelines=("Wan22ModularPipeline", "WanModularPipeline"),
            takes_guider=True,
            block_lists=("blocks",),
            self_attention="attn1",  # attn2 is cross-attention to the text
            joint=False,
            token_order=None,
            masked_text=False,
            video=True,
            defaults=(LayerChoice("blocks", (9,), "community skip-layer guidance for Wan 2.1 (ComfyUI "
                                  "SkipLayerGuidanceDiT / WanVideoWrapper users: blocks 9 or 9-10), not an official default"),),
            alternatives=(LayerChoice("blocks", (9, 10), "same community recommendation, two blocks"),),
        ),
        Family(
            name="hunyuanvideo",
            title="HunyuanVideo 1.5 (video)",
            denoisers=("HunyuanVideo15Transformer3DModel",),
            modular_pipelines=("HunyuanVideo15ModularPipeline",),
            takes_guider=True,
            block_lists=("transformer_blocks",),
            self_attention="attn",
            joint=True,
            token_order=IMAGE_FIRST,  # HunyuanVideo15AttnProcessor2_0: cat([image, text]), text padded and masked
            masked_text=True,
            video=True,
            defaults=(LayerChoice("transformer_blocks", (10,), _OURS),),
        ),
        Family(
            name="ltx",
            title="LTX-Video 0.9.x (video)",
            denoisers=("LTXVideoTransformer3DModel",),
            modular_pipelines=("LTXModularPipeline",),
            takes_guider=True,
            block_lists=("transformer_blocks",),
            self_attention="attn1",  # attn2 is cross-attention to the text
            joint=False,
            token_order=None,
            masked_text=False,
            video=True,
            defaults=(LayerChoice("transformer_blocks", (19,), "Lightricks LTX-Video inference.py default "
                                  "--stg_skip_layers '19' (spatiotemporal guidance, 2B models)"),),
        ),
    )
}


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name``; raises ``ValueError`` naming the known ones."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_of(model) -> str | None:
    """The family name of a denoiser (or of a pipeline's ``transformer``/``unet``), ``None`` if unknown.

    Matches the class names of ``type(model).__mro__``, so subclasses of a known denoiser count.
    """
    for attr in ("transformer", "unet"):  # a pipeline: look at its denoiser
        inner = getattr(model, attr, None)
        if inner is not None and not isinstance(model, type) and hasattr(inner, "named_modules"):
            model = inner
            break
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES.values():
        if names.intersection(family.denoisers):
            return family.name
    return None


def default_layers(family: str) -> tuple[LayerChoice, ...]:
    """The default ASAG layer choices of ``family`` (each with its ``source``)."""
    return get_family(family).defaults


def layer_patterns(family: str, choices: tuple[LayerChoice, ...] | None = None) -> list[str]:
    """``choices`` (default: the family's defaults) as diffusers PAG layer ids: regular expressions
    that match exactly the chosen self-attention modules, e.g. ``r"^transformer_blocks\\.(7|8|9)\\.attn$"``.
    """
    fam = get_family(family)
    out = []
    for choice in fam.defaults if choices is None else choices:
        if choice.fqn is None:
            out.append(choice.pattern)
            continue
        if fam.block_lists and choice.fqn not in fam.block_lists:
            raise ValueError(f"{family}: block list must be one of {fam.block_lists}, got {choice.fqn!r}")
        indices = "|".join(str(i) for i in choice.indices)
        out.append(rf"^{re.escape(choice.fqn)}\.({indices})\.{re.escape(fam.self_attention)}$")
    return out


def model_default_layers(denoiser) -> list[str]:
    """The default ASAG layers of ``denoiser``'s family as PAG layer ids; a ValueError naming ``layers``
    when the model is of no known family (then the user must choose)."""
    family = family_of(denoiser)
    if family is None:
        raise ValueError(
            f"layers: no default ASAG layers for {type(denoiser).__name__} (not a known family: "
            f"{sorted(FAMILIES)}); pass layers=, e.g. block indices [7, 8] or module-name patterns "
            f"(list_attention_layers(model) lists them)"
        )
    return layer_patterns(family)


def token_order_of(model) -> str | None:
    """The joint-attention token order (``TEXT_FIRST``/``IMAGE_FIRST``) of a denoiser's family; ``None``
    when the family has no joint attention or the model is of no known family."""
    family = family_of(model)
    return get_family(family).token_order if family else None


def image_token_range(token_order: str, num_tokens: int, num_text_tokens: int) -> tuple[int, int]:
    """``(image_start, image_stop)`` of the image tokens in a joint sequence of ``num_tokens``
    tokens of which ``num_text_tokens`` are text, for ``TEXT_FIRST`` or ``IMAGE_FIRST`` order."""
    if not 0 <= num_text_tokens <= num_tokens:
        raise ValueError(f"num_text_tokens must be in [0, num_tokens={num_tokens}], got {num_text_tokens}")
    if token_order == TEXT_FIRST:
        return num_text_tokens, num_tokens
    if token_order == IMAGE_FIRST:
        return 0, num_tokens - num_text_tokens
    raise ValueError(f"token_order must be {TEXT_FIRST!r} or {IMAGE_FIRST!r}, got {token_order!r}")

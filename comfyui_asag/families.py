"""The DiT families the ASAG DiT node patches: ComfyUI's classes, block lists, token order, default layers.

Data plus one lookup; ComfyUI's model classes are imported only when a model is matched, so this file
is readable without ComfyUI. The node patches a block through ComfyUI's ``"dit"`` block replace
patches (the mechanism its own SkipLayerGuidanceDiT node uses), keyed ``("double_block", i)`` and
``("single_block", i)``; ``double`` / ``single`` below name the block list each key indexes.

How a block's attention tokens split into text and image (``token_split(args) -> (n_text, n_tokens)``,
text first in every family here, as ComfyUI concatenates them):

* Flux-style double blocks (Flux, Chroma, HunyuanVideo, whose ComfyUI blocks are Flux's
  ``DoubleStreamBlock``; Qwen-Image's block too): ``cat(txt, img)``;
* Flux-style single blocks: ``img`` already holds ``cat(txt, img)``, the text length is
  ``transformer_options["img_slice"][0]``;
* SD3/SD3.5 (ComfyUI's MMDiT): the context tokens first, then the image tokens;
* Wan: self-attention over the video tokens only (text enters by cross-attention).

Default layers follow ``asag_kernels/diffusers/families.py`` where the same family is there (the
same block indices: ComfyUI's block lists are diffusers' in the same order); ``source`` says where a
choice comes from. The node uses them when a layer input is the word ``default``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["DiTFamily", "DIT_FAMILIES", "DEFAULT_KEYWORD", "dit_family"]

# A layer input that is exactly this word means "this family's default layers".
DEFAULT_KEYWORD = "default"


def _text_first(args):
    """Double-stream blocks: ``txt`` and ``img`` separate, attention over ``cat(txt, img)``."""
    n_text = 0 if args.get("txt") is None else args["txt"].shape[1]
    return n_text, n_text + args["img"].shape[1]


def _single_stream(args):
    """Single-stream blocks: ``img`` is already ``cat(txt, img)``."""
    return args["transformer_options"]["img_slice"][0], args["img"].shape[1]


def _image_only(args):
    return 0, args["img"].shape[1]


_FROM_DIFFUSERS = "asag_kernels.diffusers.families default for the same family"
_COMFY_SLG = "ComfyUI's SkipLayerGuidanceDiT default double_layers '7, 8, 9' (generic, not tuned for this model)"


@dataclass(frozen=True)
class DiTFamily:
    """One DiT family.

    Attributes:
        name: short name (docs, messages; the ``asag_kernels.diffusers.families`` key where it exists there).
        title: the models it covers.
        model_class: ``"module:Class"`` of ComfyUI's diffusion model (matched with isinstance).
        double: ``(block list attribute, token_split)`` for ``("double_block", i)``.
        single: the same for ``("single_block", i)``, or ``None``.
        default_double, default_single: default block indices (``""``: none).
        source: where the defaults come from.
    """

    name: str
    title: str
    model_class: str
    double: tuple
    single: tuple | None
    default_double: str
    default_single: str
    source: str

    def matches(self, diffusion_model) -> bool:
        module, cls = self.model_class.split(":")
        try:
            klass = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):  # an older ComfyUI without this family
            return False
        return isinstance(diffusion_model, klass)

    def blocks(self, diffusion_model, kind: str):
        """``(count, token_split)`` of ``kind`` ("double_block" / "single_block") in this model."""
        entry = self.double if kind == "double_block" else self.single
        if entry is None:
            return 0, None
        attr, split = entry
        return len(getattr(diffusion_model, attr)), split


# Order matters only where one class derives from another (none do today); the first match wins.
DIT_FAMILIES: tuple[DiTFamily, ...] = (
    DiTFamily("flux", "Flux.1", "comfy.ldm.flux.model:Flux", ("double_blocks", _text_first),
              ("single_blocks", _single_stream), "7, 8, 9", "", _FROM_DIFFUSERS + " (" + _COMFY_SLG + ")"),
    DiTFamily("sd3", "SD3 / SD3.5 (MMDiT)", "comfy.ldm.modules.diffusionmodules.mmdit:MMDiT",
              ("joint_blocks", _text_first), None, "7, 8, 9", "", _FROM_DIFFUSERS + " (" + _COMFY_SLG + ")"),
    DiTFamily("wan", "Wan 2.1 / 2.2", "comfy.ldm.wan.model:WanModel", ("blocks", _image_only), None, "9", "",
              _FROM_DIFFUSERS + " (community skip-layer guidance for Wan 2.1: block 9)"),
    DiTFamily("chroma", "Chroma", "comfy.ldm.chroma.model:Chroma", ("double_blocks", _text_first),
              ("single_blocks", _single_stream), "7, 8, 9", "",
              "not in asag_kernels.diffusers.families; Flux's choice (Chroma has Flux.1-schnell's 19 double "
              "blocks), " + _COMFY_SLG),
    DiTFamily("hunyuanvideo", "HunyuanVideo / HunyuanVideo 1.5", "comfy.ldm.hunyuan_video.model:HunyuanVideo",
              ("double_blocks", _text_first), ("single_blocks", _single_stream), "10", "",
              _FROM_DIFFUSERS + " (untuned: no published recommendation)"),
    DiTFamily("qwenimage", "Qwen-Image", "comfy.ldm.qwen_image.model:QwenImageTransformer2DModel",
              ("transformer_blocks", _text_first), None, "10", "",
              _FROM_DIFFUSERS + " (untuned: no published recommendation)"),
)

_NAMES = ", ".join(f.title for f in DIT_FAMILIES)


def dit_family(diffusion_model) -> DiTFamily:
    """The family of ComfyUI's ``diffusion_model``, or a ValueError naming what is supported."""
    for family in DIT_FAMILIES:
        if family.matches(diffusion_model):
            return family
    raise ValueError(
        f"model: the ASAG DiT node supports {_NAMES} diffusion models, got {type(diffusion_model).__name__}; "
        "for SD 1.5/SDXL UNets use the ASAG node"
    )

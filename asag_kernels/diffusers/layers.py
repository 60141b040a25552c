"""Which self-attention modules ASAG perturbs, chosen the way diffusers' guiders choose layers.

``layers`` takes, alone or mixed in a list:

* an ``int``: an index into the model's block list, found automatically like diffusers'
  ``LayerSkipConfig(fqn="auto")`` (the family's first block list, else the first of
  ``transformer_blocks``, ``blocks``, ``layers``, ``single_transformer_blocks``, ... the model has);
* a ``LayerSkipConfig`` (or its dict): ``fqn`` and ``indices`` as in diffusers' guiders; every
  self-attention module inside the chosen blocks is perturbed, as PAG does;
* a ``str``: diffusers' PAG layer id, a regular expression searched in module names (``"mid"``,
  ``"down_blocks.2"``, ``r"transformer_blocks\\.(7|8)\\.attn$"``). Unlike PAG's search, an id
  ending in a digit does not also match longer numbers (``"blocks.1"`` is not ``"blocks.10"``).

A bad id, regex, index or block list raises a ValueError naming ``layers``.
"""

from __future__ import annotations

import re

import torch
from diffusers.hooks import LayerSkipConfig

try:  # the attention classes diffusers' own layer-skip hooks recognise
    from diffusers.hooks._common import _ATTENTION_CLASSES
except ImportError:  # pragma: no cover - older layout
    from diffusers.models.attention_processor import Attention

    _ATTENTION_CLASSES = (Attention,)

from . import families

__all__ = ["list_attention_layers", "select_attention_layers", "denoiser_of", "single_stream_blocks"]

# Block-list names tried in this order when the family is unknown (a fixed order: diffusers keeps
# its identifiers in a set, whose order is not).
_AUTO_BLOCK_LISTS = ("transformer_blocks", "blocks", "layers", "single_transformer_blocks", "visual_transformer_blocks",
                     "temporal_transformer_blocks")
# Block lists whose blocks concatenate text and image tokens before their attention (single-stream).
SINGLE_STREAM_LISTS = ("single_transformer_blocks",)


def denoiser_of(model) -> torch.nn.Module:
    """The denoiser of a pipeline (its ``transformer`` or ``unet``), or ``model`` itself if it is a module."""
    if isinstance(model, torch.nn.Module):
        return model
    for attr in ("transformer", "unet"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    raise ValueError(f"expected a denoiser (torch.nn.Module) or a pipeline with a `transformer` or `unet`, got {type(model).__name__}")


def _is_self_attention(module) -> bool:
    return isinstance(module, _ATTENTION_CLASSES) and not getattr(module, "is_cross_attention", False)


def list_attention_layers(model) -> list[str]:
    """Names of the self-attention modules of a denoiser or pipeline, in module order: the names
    ``layers`` can pick (by regular expression, or by block index through the block list)."""
    return [name for name, module in denoiser_of(model).named_modules() if _is_self_attention(module)]


def _describe(candidates: list[str]) -> str:
    if not candidates:
        return "it has none"
    sample = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    return f"it has {len(candidates)}, e.g. {sample}; list_attention_layers(model) lists them"


def _block_list(denoiser, fqn: str) -> tuple[str, torch.nn.ModuleList]:
    if fqn == "auto":
        family = families.family_of(denoiser)
        order = (families.get_family(family).block_lists if family else ()) + _AUTO_BLOCK_LISTS
        for candidate in order:
            if isinstance(getattr(denoiser, candidate, None), torch.nn.ModuleList):
                fqn = candidate
                break
        else:
            raise ValueError(
                f"layers: {type(denoiser).__name__} has no block list to index (none of {_AUTO_BLOCK_LISTS}); "
                f"name the layers by module name or regular expression instead (UNets: e.g. 'mid', 'down_blocks.2')"
            )
    blocks = dict(denoiser.named_modules()).get(fqn)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"layers: {fqn!r} is not a block list (torch.nn.ModuleList) of {type(denoiser).__name__}")
    return fqn, blocks


def _from_config(denoiser, config: LayerSkipConfig) -> dict[str, torch.nn.Module]:
    fqn, blocks = _block_list(denoiser, config.fqn)
    indices = [config.indices] if isinstance(config.indices, int) else list(config.indices)
    if not indices:
        raise ValueError(f"layers: a LayerSkipConfig for {fqn!r} has no indices")
    found = {}
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks):
            raise ValueError(f"layers: block index {index!r} is out of range for {fqn!r}, which has {len(blocks)} blocks")
        hits = {f"{fqn}.{index}.{sub}": m for sub, m in blocks[index].named_modules() if sub and _is_self_attention(m)}
        if not hits:
            raise ValueError(f"layers: block {fqn}.{index} of {type(denoiser).__name__} holds no self-attention module")
        found.update(hits)
    return found


def _from_pattern(denoiser, pattern: str, candidates: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    try:
        regex = re.compile(rf"(?:{pattern})(?!\d)")
    except re.error as exc:
        raise ValueError(f"layers: {pattern!r} is not a valid regular expression ({exc})") from None
    hits = {name: m for name, m in candidates.items() if regex.search(name)}
    if not hits:
        raise ValueError(
            f"layers: {pattern!r} matches no self-attention module of {type(denoiser).__name__} ({_describe(list(candidates))})"
        )
    return hits


def normalise_layers(layers) -> list:
    """``layers`` as a non-empty list of str / int / LayerSkipConfig (dicts converted); raises naming ``layers``."""
    if isinstance(layers, (str, int, LayerSkipConfig, dict)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            "layers must be a layer id (str, regular expression over module names), a block index (int), a "
            f"LayerSkipConfig, or a list of these; got {type(layers).__name__} {layers!r}"
        )
    out = []
    for item in layers:
        if isinstance(item, dict):
            try:
                item = LayerSkipConfig.from_dict(item)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"layers: {item!r} is not a LayerSkipConfig dict ({exc})") from None
        if isinstance(item, bool) or not isinstance(item, (str, int, LayerSkipConfig)):
            raise TypeError(f"layers must hold str, int or LayerSkipConfig entries, got {type(item).__name__} {item!r}")
        if isinstance(item, str):
            try:
                re.compile(item)
            except re.error as exc:
                raise ValueError(f"layers: {item!r} is not a valid regular expression ({exc})") from None
        out.append(item)
    if not out:
        raise ValueError("layers must name at least one layer, got an empty list")
    return out


def select_attention_layers(model, layers) -> dict[str, torch.nn.Module]:
    """The self-attention modules (name -> module) that ``layers`` picks in ``model`` (a denoiser or pipeline)."""
    denoiser = denoiser_of(model)
    candidates = {name: m for name, m in denoiser.named_modules() if _is_self_attention(m)}
    found: dict[str, torch.nn.Module] = {}
    items = normalise_layers(layers)
    ints = [item for item in items if isinstance(item, int)]
    for item in items:
        if isinstance(item, str):
            found.update(_from_pattern(denoiser, item, candidates))
        elif isinstance(item, LayerSkipConfig):
            found.update(_from_config(denoiser, item))
    if ints:  # bare indices: one LayerSkipConfig(fqn="auto"), as diffusers' PAG guider builds from its layer list
        found.update(_from_config(denoiser, LayerSkipConfig(indices=ints, fqn="auto", skip_attention=False,
                                                            skip_attention_scores=True, skip_ff=False)))
    order = {name: i for i, name in enumerate(candidates)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], -1)))


def single_stream_blocks(model, modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """For each chosen module inside a single-stream block list: name -> that block."""
    denoiser = denoiser_of(model)
    out = {}
    for name in modules:
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] in SINGLE_STREAM_LISTS and parts[1].isdigit():
            out[name] = getattr(denoiser, parts[0])[int(parts[1])]
    return out

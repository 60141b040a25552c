"""The SDPA interception: diffusers' own attention code runs, and only its
``F.scaled_dot_product_attention`` call on the perturbed samples becomes Sinkhorn attention.

Both routes into a pipeline use it: the guider's hooks (the whole batch is perturbed) and the PAG
processor pairs (only the last chunk of the batch is). Because the stock processor runs unchanged,
rotary embeddings, q/k norms, added (text) projections and output projections are whatever
diffusers does for that model; this module only decides what the attention call returns:

* no text tokens in the call (UNet self-attention, Wan/LTX ``attn1``): ``sinkhorn_attention``;
* joint text + image sequences (SD3/SD3.5, Flux double and single stream, Qwen-Image,
  HunyuanVideo): :func:`asag_kernels.joint.joint_sinkhorn_attention` with the image-token range
  from the model's token order and ``joint_mode`` (SPEC §10);
* a key-padding mask passed by the model: excluded keys (zero mass); any other mask is refused
  (the one rule of :mod:`asag_kernels.masks`, shared with the ComfyUI node pack).

What the perturbed attention computes is :meth:`asag_kernels.settings.SinkhornSettings.attend` (or
the ``attend`` of any object passed as ``settings``: :mod:`.perturb` passes identity attention for PAG).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from ..settings import SinkhornSettings
from .context_parallel import ShardedSinkhorn
from .families import IMAGE_FIRST, TEXT_FIRST

__all__ = ["SinkhornSettings", "SinkhornSDPAMode", "SinkhornAttentionHook", "TextLengthHook", "install", "uninstall",
           "replace_hook", "remove_hook"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class CallLayout:
    """What one attention-module call looks like to the SDPA inside it: ``text_tokens`` text tokens
    in the joint sequence (0: plain self-attention), in ``token_order`` (``TEXT_FIRST``/``IMAGE_FIRST``
    from the model family; None: unknown)."""

    module_name: str
    text_tokens: int = 0
    token_order: str | None = None


def _bind(args, kwargs) -> dict:
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return bound


def perturbed_attention(func, args, kwargs, settings: SinkhornSettings, layout: CallLayout, start: int):
    """What the SDPA call ``func(*args, **kwargs)`` returns with samples ``start:`` perturbed, or
    ``None`` when it is not a self-attention call (query and key lengths differ: e.g. IP-Adapter tokens)."""
    bound = _bind(args, kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    name = layout.module_name
    if query.shape[-2] != key.shape[-2]:
        return None
    if bound.get("is_causal", False):
        raise NotImplementedError(f"ASAG cannot replace the attention in {name!r}: it is causal")
    if query.dim() != 4 or key.shape[:-2] != query.shape[:-2]:
        raise NotImplementedError(
            f"ASAG cannot replace the attention in {name!r}: query and key have different head/batch dims "
            f"{tuple(query.shape[:-2])} vs {tuple(key.shape[:-2])} (grouped-query attention)"
        )
    b, _, n, _ = query.shape
    mask = bound.get("attn_mask")
    per_sample_mask = mask is not None and mask.dim() == 4 and mask.shape[0] == b
    plain = None
    if start > 0:
        rest = {k: v for k, v in bound.items() if k not in ("query", "key", "value", "attn_mask")}
        plain = func(query[:start], key[:start], value[:start], attn_mask=mask[:start] if per_sample_mask else mask, **rest)
        query, key, value = query[start:], key[start:], value[start:]
        if per_sample_mask:
            mask = mask[start:]
    text = layout.text_tokens
    if text and settings.joint_mode == "image" and layout.token_order not in (TEXT_FIRST, IMAGE_FIRST):
        raise ValueError(
            f"joint_mode='image' needs the token order (text first or image first) of the joint attention in "
            f"{name!r}, which is not known for this model; pass joint_mode='joint' (Sinkhorn over the whole sequence)"
        )
    if not 0 <= text < n:
        raise NotImplementedError(f"ASAG: {name!r} got {text} text tokens in a joint sequence of {n} tokens")
    image_start, image_stop = (text, n) if layout.token_order == TEXT_FIRST else (0, n - text)
    scale = bound.get("scale")
    # Padded query rows of an m_i & m_j mask: whatever the model's own masked attention gives them.
    out = settings.attend(query, key, value, scale=scale, image_start=image_start, image_stop=image_stop, attn_mask=mask,
                          stock=lambda: func(query, key, value, attn_mask=mask, scale=scale), where=repr(name))
    out = out.to(value.dtype)
    return out if plain is None else torch.cat([plain, out.to(plain.dtype)])


class SinkhornSDPAMode(torch.overrides.TorchFunctionMode):
    """Inside it, ``F.scaled_dot_product_attention`` self-attention calls run on samples ``start:``
    as ASAG's perturbed attention (samples before ``start`` keep ordinary attention)."""

    def __init__(self, settings: SinkhornSettings, layout: CallLayout, start: int = 0):
        super().__init__()
        self.settings, self.layout, self.start = settings, layout, start
        self.replaced_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = perturbed_attention(func, args, kwargs, self.settings, self.layout, self.start)
            if out is not None:
                self.replaced_calls += 1
                return out
        return func(*args, **kwargs)


class TextLengthHook(ModelHook):
    """On a single-stream block (Flux ``single_transformer_blocks``): records how many text tokens the
    block puts in front of the image tokens before it calls its attention on the joint sequence."""

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    @property
    def current(self) -> int | None:
        return getattr(self._local, "text", None)

    def initialize_hook(self, module):
        # The class's forward: the instance's may already be another hook's (*args, **kwargs) wrapper.
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        try:
            bound = self._signature.bind_partial(module, *args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        encoder = bound.get("encoder_hidden_states")
        text = encoder.shape[1] if isinstance(encoder, torch.Tensor) else bound.get("text_seq_len")
        self._local.text = int(text) if text is not None else None
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._local.text = None


def call_layout(module_name: str, args, kwargs, token_order, text_lengths: tuple = ()) -> CallLayout:
    """The layout of one attention-module call from its arguments: a self-attention module handed
    ``encoder_hidden_states`` is joint (double-stream: the text rows join the sequence); a
    single-stream block's attention gets the joint sequence, and its text length comes from the first
    of ``text_lengths`` (:class:`TextLengthHook` on the block, then on the denoiser) that knows it."""
    encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if isinstance(encoder, torch.Tensor) and encoder.dim() >= 2:
        return CallLayout(module_name, encoder.shape[1], token_order)
    for hook in text_lengths:
        if hook.current is not None:
            return CallLayout(module_name, hook.current, token_order)
    return CallLayout(module_name, 0, token_order)


class SinkhornAttentionHook(ModelHook):
    """On a chosen attention module: runs its forward under :class:`SinkhornSDPAMode` (all samples
    perturbed) and, under context parallelism, :class:`.context_parallel.ShardedSinkhorn`."""

    def __init__(self, module_name: str, settings: SinkhornSettings, token_order: str | None, text_lengths: tuple = ()):
        super().__init__()
        self.module_name, self.settings, self.token_order, self.text_lengths = module_name, settings, token_order, text_lengths
        self.forward_calls = 0
        self.replaced_calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.forward_calls += 1
        layout = call_layout(self.module_name, args, kwargs, self.token_order, self.text_lengths)
        mode = SinkhornSDPAMode(self.settings, layout)
        # Context parallelism: the call is taken at diffusers' attention dispatch (a no-op without it).
        sharded = ShardedSinkhorn(module, self.settings, layout, self.text_lengths, mode)
        try:
            with mode, sharded:
                return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.replaced_calls += mode.replaced_calls + sharded.replaced_calls


def install(modules: dict, settings: SinkhornSettings, name: str, token_order: str | None, blocks: dict,
            root: torch.nn.Module | None = None) -> list:
    """Register a :class:`SinkhornAttentionHook` called ``name`` on each of ``modules`` (name -> module).
    ``blocks`` maps a module name to its single-stream block; that block and ``root`` (the denoiser,
    whose ``encoder_hidden_states`` give the text length where the block is called without it, as in
    Flux.2) get a :class:`TextLengthHook` called ``name + "_text"``.
    Returns ``[(module, hook), ...]`` for :func:`uninstall`; on any error nothing stays installed."""
    installed, text_hooks = [], {}

    def register(module, hook, hook_name):
        installed.append((module, replace_hook(module, hook, hook_name)))
        return hook

    def text_hook(module):
        if id(module) not in text_hooks:
            text_hooks[id(module)] = register(module, TextLengthHook(), name + "_text")
        return text_hooks[id(module)]

    try:
        for module_name, module in modules.items():
            block = blocks.get(module_name)
            lengths = () if block is None else tuple(text_hook(m) for m in (block, root) if m is not None)
            register(module, SinkhornAttentionHook(module_name, settings, token_order, lengths), name)
    except BaseException:
        uninstall(installed, name)
        raise
    return installed


def uninstall(installed: list, name: str) -> None:
    """Remove the hooks :func:`install` registered (a missing one is skipped; never raises for it)."""
    for module, _ in installed:
        for hook_name in (name, name + "_text"):
            remove_hook(module, hook_name)


def replace_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> ModelHook:
    """Register ``hook`` on ``module`` as ``name``, replacing one of that name (left by a run that was
    interrupted, or by an earlier install); returns ``hook``."""
    remove_hook(module, name)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return hook


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove ``module``'s hook called ``name``, if it has one (never raises for a missing one)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)

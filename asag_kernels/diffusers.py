"""ASAG inside diffusers pipelines.

ASAG guides a diffusion model away from a deliberately degraded prediction: the conditional pass
recomputed with Sinkhorn attention under the adversarial cost (``sinkhorn_attention(cost=
"adversarial")``) in a few self-attention layers (SPEC §1)::

    pred = pred_uncond + w_cfg * (pred_cond - pred_uncond) + s_asag * (pred_cond - pred_cond_asag)

Two ways in:

* PAG pipelines (``StableDiffusionPAGPipeline``, ``StableDiffusionXLPAGPipeline``, the ControlNet and
  IP-Adapter variants, ``StableDiffusion3PAGPipeline``, ...) already batch ``[uncond, cond,
  perturbed]`` and combine the predictions as above; they only need an attention-processor pair for
  the perturbed layers. :func:`enable_asag` installs :class:`ASAGCFGSelfAttnProcessor` /
  :class:`ASAGSelfAttnProcessor` (UNet self-attention) or :class:`ASAGCFGJointAttnProcessor` /
  :class:`ASAGJointAttnProcessor` (SD3-style joint attention) and returns the call arguments that
  set the ASAG scale.
* Modular pipelines take a guider: :class:`AdversarialSinkhornGuidance` runs the perturbed batch
  with every ``scaled_dot_product_attention`` inside the chosen self-attention modules replaced by
  Sinkhorn attention, through diffusers' hook registry.

Install with ``pip install "asag-kernels[diffusers]"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

try:
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models.attention_processor import Attention
    from diffusers.pipelines.pag.pag_utils import PAGMixin
except ImportError as exc:  # pragma: no cover - exercised only without diffusers installed
    raise ImportError(
        "asag_kernels.diffusers needs diffusers (>= 0.35, with guiders and hooks) and transformers: "
        'install them with  pip install "asag-kernels[diffusers]"  '
        f"(import failed with: {exc})"
    ) from exc

try:  # attention classes that are not `Attention` subclasses (Flux, Wan, ... in newer diffusers)
    from diffusers.models.attention import AttentionModuleMixin

    _ATTENTION_TYPES: tuple[type, ...] = (Attention, AttentionModuleMixin)
except ImportError:  # pragma: no cover
    _ATTENTION_TYPES = (Attention,)

from .api import BACKEND_CHOICES, sinkhorn_attention

__all__ = [
    "ASAGCFGSelfAttnProcessor",
    "ASAGSelfAttnProcessor",
    "ASAGCFGJointAttnProcessor",
    "ASAGJointAttnProcessor",
    "AdversarialSinkhornGuidance",
    "enable_asag",
    "disable_asag",
    "DEFAULT_ASAG_SCALE",
    "DEFAULT_NUM_ITERS",
    "DEFAULT_EPSILON",
    "DEFAULT_UNET_LAYERS",
]

DEFAULT_ASAG_SCALE = 1.5
DEFAULT_NUM_ITERS = 2
DEFAULT_EPSILON = 1.0
DEFAULT_UNET_LAYERS = ("mid",)

# Processor classes whose self-attention math the ASAG processors reproduce (besides the Sinkhorn
# chunk). Anything else (rotary embeddings, linear attention, ...) would be silently changed.
_SELF_ATTN_PROCESSORS = {
    "AttnProcessor",
    "AttnProcessor2_0",
    "PAGIdentitySelfAttnProcessor2_0",
    "PAGCFGIdentitySelfAttnProcessor2_0",
    "ASAGSelfAttnProcessor",
    "ASAGCFGSelfAttnProcessor",
}
_JOINT_ATTN_PROCESSORS = {
    "JointAttnProcessor2_0",
    "PAGJointAttnProcessor2_0",
    "PAGCFGJointAttnProcessor2_0",
    "ASAGJointAttnProcessor",
    "ASAGCFGJointAttnProcessor",
}


def _checked_sinkhorn_args(num_iters, epsilon, backend) -> tuple[int, float, str]:
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"num_iters must be an int >= 0, got {num_iters!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return num_iters, float(epsilon), backend


def _perturbed_start(batch: int, plain_chunks: int, who: str) -> int:
    """Index of the first perturbed sample in a batch of ``plain_chunks + 1`` equal chunks."""
    chunks = plain_chunks + 1
    if batch % chunks:
        layout = "[uncond, cond, perturbed]" if plain_chunks == 2 else "[cond, perturbed]"
        raise ValueError(
            f"{who} expects the batch as {layout} ({chunks} equal chunks), got batch size {batch}; "
            f"use the CFG processor when classifier-free guidance is on and the other one when it is off"
        )
    return batch // chunks * plain_chunks


def _mask_is_trivial(mask: torch.Tensor) -> bool:
    """True when a boolean (keep = True) or additive (keep = 0) mask keeps every key."""
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _heads(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` -> ``[B, H, N, D]`` as a view (no copy)."""
    return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)


class _SinkhornSettings:
    def __init__(self, num_iters: int = DEFAULT_NUM_ITERS, epsilon: float = DEFAULT_EPSILON, backend: str = "auto"):
        self.num_iters, self.epsilon, self.backend = _checked_sinkhorn_args(num_iters, epsilon, backend)

    def _attend(self, attn, query, key, value, n_plain: int, plain_mask=None) -> torch.Tensor:
        """Softmax attention for samples ``[:n_plain]``, adversarial Sinkhorn for the rest."""
        plain = F.scaled_dot_product_attention(
            query[:n_plain], key[:n_plain], value[:n_plain], attn_mask=plain_mask, dropout_p=0.0,
            is_causal=False, scale=attn.scale,
        )
        perturbed = sinkhorn_attention(
            query[n_plain:], key[n_plain:], value[n_plain:], num_iters=self.num_iters, cost="adversarial",
            scale=attn.scale, epsilon=self.epsilon, backend=self.backend,
        )
        return torch.cat([plain, perturbed.to(plain.dtype)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_iters={self.num_iters}, epsilon={self.epsilon}, backend={self.backend!r})"


class _SelfAttnProcessor(_SinkhornSettings):
    _plain_chunks: int

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        n_plain = _perturbed_start(batch, self._plain_chunks, type(self).__name__)

        # GroupNorm normalises each sample on its own, so the whole batch goes through at once.
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states

        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(attn.to_k(context), batch, attn.heads)
        value = _heads(attn.to_v(context), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        plain_mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            if not _mask_is_trivial(mask[n_plain:]):
                raise NotImplementedError(
                    "sinkhorn_attention takes no attention mask; the perturbed chunk of this layer got one"
                )
            plain_mask = mask[:n_plain]

        out = self._attend(attn, query, key, value, n_plain, plain_mask)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ASAGCFGSelfAttnProcessor(_SelfAttnProcessor):
    """Self-attention processor for PAG pipelines with classifier-free guidance (``pag_attn_processors[0]``).

    The batch arrives as ``[uncond, cond, perturbed]``: the first two chunks get ordinary softmax
    attention (SDPA), the perturbed chunk gets ``sinkhorn_attention(cost="adversarial")``. Spatial and
    group norms, q/k norms, residual connection, output rescaling and the output projection are
    applied as in diffusers' ``AttnProcessor2_0``; 3-D ``[B, N, C]`` and 4-D ``[B, C, H, W]`` hidden
    states are both accepted.

    Args:
        num_iters: Sinkhorn iterations (default 2).
        epsilon: entropic regularisation (default 1.0).
        backend: ``asag_kernels`` backend name, ``"auto"`` by default.
    """

    _plain_chunks = 2


class ASAGSelfAttnProcessor(_SelfAttnProcessor):
    """Self-attention processor for PAG pipelines without classifier-free guidance (``pag_attn_processors[1]``).

    The batch arrives as ``[cond, perturbed]``; otherwise identical to :class:`ASAGCFGSelfAttnProcessor`.
    """

    _plain_chunks = 1


class _JointAttnProcessor(_SinkhornSettings):
    _plain_chunks: int

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        # Like diffusers' JointAttnProcessor2_0, `attention_mask` is accepted and not used.
        num_image_tokens = hidden_states.shape[1]
        batch = hidden_states.shape[0]
        n_plain = _perturbed_start(batch, self._plain_chunks, type(self).__name__)

        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(attn.to_k(hidden_states), batch, attn.heads)
        value = _heads(attn.to_v(hidden_states), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = _heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads)
            context_key = _heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads)
            context_value = _heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        # The perturbed chunk runs Sinkhorn over the whole joint (image + text) token sequence.
        out = self._attend(attn, query, key, value, n_plain)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)

        if encoder_hidden_states is not None:
            out, context_out = out[:, :num_image_tokens], out[:, num_image_tokens:]
            if not attn.context_pre_only:
                context_out = attn.to_add_out(context_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if encoder_hidden_states is not None:
            return out, context_out
        return out


class ASAGCFGJointAttnProcessor(_JointAttnProcessor):
    """Joint (MMDiT, SD3-style) attention processor for PAG pipelines with classifier-free guidance.

    Image and text streams arrive as ``[uncond, cond, perturbed]`` each. The first two chunks get
    softmax attention over the concatenated image+text tokens exactly as diffusers'
    ``JointAttnProcessor2_0``; the perturbed chunk gets ``sinkhorn_attention(cost="adversarial")`` over
    the same joint sequence. Returns ``(image_out, text_out)`` (``image_out`` alone when no text stream
    is passed, as in SD3.5's second self-attention).
    """

    _plain_chunks = 2


class ASAGJointAttnProcessor(_JointAttnProcessor):
    """Joint attention processor for PAG pipelines without classifier-free guidance (``[cond, perturbed]``)."""

    _plain_chunks = 1


# ----------------------------------------------------------------------------------------------
# Finding layers (diffusers' PAG layer syntax: each entry is a regular expression searched in the
# module names of the denoiser, e.g. "mid", "down_blocks.2", "blocks.1", "blocks.(1|3)").


def _normalise_layers(layers) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a string or a list of strings (PAG layer syntax), got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer, got an empty list")
    for layer in layers:
        if not isinstance(layer, str):
            raise TypeError(
                f"layers must hold strings in diffusers' PAG layer syntax (e.g. 'mid', 'blocks.1'), got {layer!r}"
            )
    return layers


def _self_attention_modules(denoiser: torch.nn.Module, layers: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The self-attention modules whose names match any layer id; raises if one id matches none."""
    candidates = [
        (name, module)
        for name, module in denoiser.named_modules()
        if isinstance(module, _ATTENTION_TYPES) and not getattr(module, "is_cross_attention", False)
    ]
    found: dict[str, torch.nn.Module] = {}
    for layer in layers:
        hits = [(name, module) for name, module in candidates if re.search(layer, name)]
        if not hits:
            sample = ", ".join(name for name, _ in candidates[:8]) or "none"
            raise ValueError(
                f"ASAG layer {layer!r} matches no self-attention module of {type(denoiser).__name__} "
                f"(it has {len(candidates)}; e.g. {sample})"
            )
        found.update(hits)
    return found


def _denoiser_of(pipe) -> torch.nn.Module:
    for attr in ("unet", "transformer"):
        model = getattr(pipe, attr, None)
        if isinstance(model, torch.nn.Module):
            return model
    raise ValueError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` to apply ASAG to")


# ----------------------------------------------------------------------------------------------
# PAG pipelines


def enable_asag(
    pipe,
    layers: str | Sequence[str] | None = None,
    *,
    asag_scale: float = DEFAULT_ASAG_SCALE,
    num_iters: int = DEFAULT_NUM_ITERS,
    epsilon: float = DEFAULT_EPSILON,
    backend: str = "auto",
) -> dict[str, float]:
    """Turn a diffusers PAG pipeline into an ASAG pipeline.

    Installs the ASAG processor pair as the pipeline's ``pag_attn_processors`` for ``layers`` (the
    pipeline swaps them in at each call and restores the original processors afterwards) and
    returns the call arguments that set the ASAG scale, ``{"pag_scale": asag_scale,
    "pag_adaptive_scale": 0.0}``::

        pipe = AutoPipelineForText2Image.from_pretrained(model_id, enable_pag=True)
        asag = enable_asag(pipe)                      # UNet mid-block self-attention
        image = pipe(prompt, **asag).images[0]

    Args:
        pipe: a pipeline with diffusers' ``PAGMixin`` (``...PAGPipeline``, or ``AutoPipeline...``
            with ``enable_pag=True``).
        layers: diffusers' PAG layer syntax. ``None`` means ``("mid",)`` for a UNet and the layers
            the pipeline already has (``pag_applied_layers``) for a transformer.
        asag_scale: the ASAG guidance scale (passed to the pipeline as ``pag_scale``).
        num_iters, epsilon, backend: forwarded to :func:`asag_kernels.sinkhorn_attention`.

    Raises:
        TypeError: the pipeline is not a PAG pipeline.
        ValueError: a layer id matches no self-attention module.
        NotImplementedError: the matched layers use an attention processor ASAG cannot stand in for.
    """
    if not isinstance(pipe, PAGMixin):
        raise TypeError(
            f"enable_asag needs a diffusers PAG pipeline (e.g. StableDiffusionXLPAGPipeline, or "
            f"AutoPipelineForText2Image.from_pretrained(..., enable_pag=True)); got {type(pipe).__name__}. "
            f"For modular pipelines use AdversarialSinkhornGuidance as the guider."
        )
    if isinstance(asag_scale, bool) or not isinstance(asag_scale, (int, float)) or not math.isfinite(asag_scale):
        raise ValueError(f"asag_scale must be a finite float, got {asag_scale!r}")
    _checked_sinkhorn_args(num_iters, epsilon, backend)
    denoiser = _denoiser_of(pipe)
    if layers is None:
        if hasattr(pipe, "unet"):
            layers = list(DEFAULT_UNET_LAYERS)
        else:
            layers = list(getattr(pipe, "pag_applied_layers", None) or [])
            if not layers:
                raise ValueError(f"{type(pipe).__name__} has no PAG layers set; pass layers=, e.g. ['blocks.1']")
    layers = _normalise_layers(layers)

    modules = _self_attention_modules(denoiser, layers)
    kinds = {type(module.processor).__name__ for module in modules.values()}
    if kinds <= _SELF_ATTN_PROCESSORS:
        pair = (ASAGCFGSelfAttnProcessor, ASAGSelfAttnProcessor)
    elif kinds <= _JOINT_ATTN_PROCESSORS:
        pair = (ASAGCFGJointAttnProcessor, ASAGJointAttnProcessor)
    else:
        raise NotImplementedError(
            f"ASAG processors stand in for {sorted(_SELF_ATTN_PROCESSORS | _JOINT_ATTN_PROCESSORS)}; "
            f"the layers {layers} of {type(denoiser).__name__} use {sorted(kinds)}"
        )
    pipe.set_pag_applied_layers(
        layers, pag_attn_processors=tuple(cls(num_iters=num_iters, epsilon=epsilon, backend=backend) for cls in pair)
    )
    return {"pag_scale": float(asag_scale), "pag_adaptive_scale": 0.0}


def disable_asag(pipe) -> None:
    """Give a PAG pipeline back diffusers' identity (PAG) processors for its current layers."""
    from diffusers.models.attention_processor import (
        PAGCFGIdentitySelfAttnProcessor2_0,
        PAGCFGJointAttnProcessor2_0,
        PAGIdentitySelfAttnProcessor2_0,
        PAGJointAttnProcessor2_0,
    )

    current = getattr(pipe, "_pag_attn_processors", None) or ()
    if any(isinstance(proc, _JointAttnProcessor) for proc in current):
        pair = (PAGCFGJointAttnProcessor2_0(), PAGJointAttnProcessor2_0())
    else:
        pair = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())
    pipe.set_pag_applied_layers(pipe.pag_applied_layers, pag_attn_processors=pair)


# ----------------------------------------------------------------------------------------------
# Modular pipelines: a guider


class _SinkhornSDPAMode(torch.overrides.TorchFunctionMode):
    """Runs every ``F.scaled_dot_product_attention`` call as adversarial Sinkhorn attention."""

    def __init__(self, hook: "_SinkhornAttentionHook"):
        super().__init__()
        self.hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        query, key, value = bound["query"], bound["key"], bound["value"]
        if bound.get("attn_mask") is not None or bound.get("is_causal", False):
            raise NotImplementedError(
                f"ASAG cannot replace the attention in {self.hook.module_name!r}: it uses an attention mask "
                f"or causal attention, which sinkhorn_attention does not take"
            )
        if key.shape[:-2] != query.shape[:-2]:
            raise NotImplementedError(
                f"ASAG cannot replace the attention in {self.hook.module_name!r}: query and key have different "
                f"head/batch dims {tuple(query.shape[:-2])} vs {tuple(key.shape[:-2])} (grouped-query attention)"
            )
        self.hook.replaced_calls += 1
        settings = self.hook.settings
        return sinkhorn_attention(
            query, key, value, num_iters=settings.num_iters, cost="adversarial", scale=bound.get("scale"),
            epsilon=settings.epsilon, backend=settings.backend,
        )


class _SinkhornAttentionHook(ModelHook):
    def __init__(self, module_name: str, settings: _SinkhornSettings):
        super().__init__()
        self.module_name = module_name
        self.settings = settings
        self.forward_calls = 0
        self.replaced_calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.forward_calls += 1
        with _SinkhornSDPAMode(self):
            return self.fn_ref.original_forward(*args, **kwargs)


class AdversarialSinkhornGuidance(BaseGuidance):
    """Adversarial Sinkhorn Attention Guidance (ASAG) as a guider for diffusers' modular pipelines.

    Shaped like diffusers' ``PerturbedAttentionGuidance``: per step the denoiser runs on up to three
    batches, ``pred_cond``, ``pred_uncond`` (when CFG is on) and ``pred_cond_asag`` (the conditional
    inputs again, with the attention of the chosen self-attention layers computed by
    ``sinkhorn_attention(cost="adversarial")``), and combines them as

        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond) + asag_scale * (pred_cond - pred_cond_asag)

    The replacement is a hook on each chosen attention module that turns its
    ``F.scaled_dot_product_attention`` calls into Sinkhorn attention during the perturbed pass only.
    If a chosen layer id matches no self-attention module, or a chosen module ran without calling
    ``scaled_dot_product_attention`` (so nothing was replaced), the guider raises instead of quietly
    guiding with an unperturbed prediction.

    Args:
        guidance_scale: classifier-free guidance scale (1.0 turns CFG off).
        asag_scale: ASAG scale (0 turns ASAG off). Default 1.5.
        num_iters, epsilon, backend: forwarded to :func:`asag_kernels.sinkhorn_attention`.
        layers: diffusers' PAG layer syntax (regular expressions over module names), default ``"mid"``
            (the UNet mid block); for DiTs e.g. ``["transformer_blocks.(4|5)\\."]``.
        guidance_rescale: rescale factor of "Common Diffusion Noise Schedules and Sample Steps are Flawed".
        use_original_formulation: combine around ``pred_cond`` instead of ``pred_uncond``.
        start, stop: fractions of the denoising steps between which guidance is applied.
        enabled: start enabled.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_asag"]
    _hook_name = "asag_sinkhorn_attention"

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        asag_scale: float = DEFAULT_ASAG_SCALE,
        num_iters: int = DEFAULT_NUM_ITERS,
        epsilon: float = DEFAULT_EPSILON,
        layers: str | list[str] = "mid",
        backend: str = "auto",
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.asag_scale = asag_scale
        self.layers = _normalise_layers(layers)
        self.settings = _SinkhornSettings(num_iters, epsilon, backend)
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self._batch_identifiers: list[str] = []
        self._hooks: list[tuple[torch.nn.Module, _SinkhornAttentionHook]] = []

    # --- which batches this step needs ------------------------------------------------------------

    def _in_window(self) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled or not self._in_window():
            return False
        neutral = 0.0 if self.use_original_formulation else 1.0
        return not math.isclose(self.guidance_scale, neutral)

    def _is_asag_enabled(self) -> bool:
        return self._enabled and self._in_window() and not math.isclose(self.asag_scale, 0.0)

    def _plan(self) -> list[tuple[int, str]]:
        """(index into each (cond, uncond) input pair, prediction name) for each denoiser batch."""
        plan = [(0, "pred_cond")]
        if self._is_cfg_enabled():
            plan.append((1, "pred_uncond"))
        if self._is_asag_enabled():
            plan.append((0, "pred_cond_asag"))
        return plan

    @property
    def num_conditions(self) -> int:
        return len(self._plan())

    @property
    def is_conditional(self) -> bool:
        if not 1 <= self._count_prepared <= len(self._batch_identifiers):
            return True
        return self._batch_identifiers[self._count_prepared - 1] != "pred_uncond"

    def prepare_inputs(self, data) -> list:
        plan = self._plan()
        self._batch_identifiers = [name for _, name in plan]
        return [self._prepare_batch(data, index, name) for index, name in plan]

    def prepare_inputs_from_block_state(self, data, input_fields) -> list:
        plan = self._plan()
        self._batch_identifiers = [name for _, name in plan]
        return [self._prepare_batch_from_block_state(input_fields, data, index, name) for index, name in plan]

    # --- the perturbed pass -------------------------------------------------------------------------

    def _current_is_perturbed(self) -> bool:
        i = self._count_prepared - 1
        return 0 <= i < len(self._batch_identifiers) and self._batch_identifiers[i] == "pred_cond_asag"

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if not self._current_is_perturbed():
            return
        for name, module in _self_attention_modules(denoiser, self.layers).items():
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(self._hook_name) is not None:  # left behind by a pass that raised
                registry.remove_hook(self._hook_name, recurse=False)
            hook = _SinkhornAttentionHook(name, self.settings)
            registry.register_hook(hook, self._hook_name)
            self._hooks.append((module, hook))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if not self._hooks:
            return
        hooks, self._hooks = self._hooks, []
        for module, _ in hooks:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(self._hook_name, recurse=False)
        missed = [(hook.module_name, type(getattr(module, "processor", module)).__name__)
                  for module, hook in hooks if hook.replaced_calls == 0]
        if missed:
            raise RuntimeError(
                "AdversarialSinkhornGuidance could not reach these layers: no scaled_dot_product_attention call "
                f"ran inside them during the perturbed pass, so nothing was replaced: {missed} "
                "(the module did not run, or its attention processor does not call "
                "torch.nn.functional.scaled_dot_product_attention)"
            )

    # --- combining ----------------------------------------------------------------------------------

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_cond_asag: torch.Tensor | None = None,
    ) -> GuiderOutput:
        pred = pred_cond
        if pred_uncond is not None:
            base = pred_cond if self.use_original_formulation else pred_uncond
            pred = base + self.guidance_scale * (pred_cond - pred_uncond)
        if pred_cond_asag is not None:
            pred = pred + self.asag_scale * (pred_cond - pred_cond_asag)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

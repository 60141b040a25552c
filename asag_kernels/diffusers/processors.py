"""ASAG in diffusers' PAG pipelines: the processor pair, :func:`enable_asag` and :func:`disable_asag`.

A PAG pipeline (``StableDiffusionXLPAGPipeline``, ``StableDiffusion3PAGPipeline``, the ControlNet and
IP-Adapter variants, ...) batches ``[uncond, cond, perturbed]`` (``[cond, perturbed]`` without CFG),
swaps its ``pag_attn_processors`` into the chosen layers for the call and combines the predictions
as ASAG does. The ASAG pair runs each module's *own* stock processor (recorded when ASAG is enabled)
on the whole batch and turns only the perturbed chunk of its ``scaled_dot_product_attention`` call
into Sinkhorn attention (:mod:`.intercept`), so any processor that calls SDPA is supported as is.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from diffusers.pipelines.pag.pag_utils import PAGMixin

from .._validate import check_finite_float
from ..settings import DEFAULT_ASAG_SCALE, DEFAULT_EPSILON, DEFAULT_JOINT_MODE, DEFAULT_NUM_ITERS, SinkhornSettings
from . import families
from ._common import FailureGuard, check_denoiser, nothing_perturbed
from .intercept import SinkhornSDPAMode, call_layout, remove_hook
from .layers import denoiser_of, normalise_layers, select_attention_layers

__all__ = ["ASAGCFGProcessor", "ASAGProcessor", "enable_asag", "disable_asag"]

_GUARD_HOOK = "asag_pag_guard"

# The names of the first release, which had a self- and a joint-attention class for each batch
# layout; one pair serves both now. Kept as aliases that warn, so code written for that release
# runs and says what to change.
_DEPRECATED_NAMES = {
    "ASAGCFGSelfAttnProcessor": "ASAGCFGProcessor",
    "ASAGCFGJointAttnProcessor": "ASAGCFGProcessor",
    "ASAGSelfAttnProcessor": "ASAGProcessor",
    "ASAGJointAttnProcessor": "ASAGProcessor",
}


def _deprecated_name(name: str):
    """The class a deprecated name of :data:`_DEPRECATED_NAMES` stands for, with a ``FutureWarning``
    (diffusers' category for deprecations: shown to users by default). Called from a module
    ``__getattr__``, so the warning points two frames up: at the user's import or attribute access."""
    new = _DEPRECATED_NAMES[name]
    warnings.warn(
        f"{name} is deprecated and will be removed in a future release: use {new}, the same class "
        f"(one processor serves self- and joint attention)",
        FutureWarning,
        stacklevel=3,
    )
    return globals()[new]


def __getattr__(name: str):
    if name in _DEPRECATED_NAMES:
        return _deprecated_name(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


class _ASAGProcessorBase:
    _plain_chunks: int

    def __init__(self, num_iters: int = DEFAULT_NUM_ITERS, epsilon: float = DEFAULT_EPSILON, backend: str = "auto", *,
                 joint_mode: str = DEFAULT_JOINT_MODE, token_order: str | None = None, stock_processors=None):
        self.settings = SinkhornSettings(num_iters, epsilon, backend, joint_mode)
        self.token_order = token_order
        # attention module -> the processor it had before ASAG (weak: never keeps a model alive)
        self._stock = weakref.WeakKeyDictionary(stock_processors or {})

    num_iters = property(lambda self: self.settings.num_iters)
    epsilon = property(lambda self: self.settings.epsilon)
    backend = property(lambda self: self.settings.backend)
    joint_mode = property(lambda self: self.settings.joint_mode)

    def remember(self, module: torch.nn.Module, processor) -> None:
        """Run ``processor`` (a stock diffusers processor) for ``module``'s calls."""
        if not isinstance(processor, _ASAGProcessorBase):
            self._stock[module] = processor

    def _stock_for(self, attn):
        processor = self._stock.get(attn)
        if processor is None:
            from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

            if type(attn).__name__ != "Attention":
                raise ValueError(
                    f"{type(self).__name__} does not know the original processor of this {type(attn).__name__}; "
                    f"install ASAG with enable_asag(pipe), which records it, or pass stock_processors="
                )
            # diffusers' defaults for its generic Attention class (joint when it has text projections)
            processor = JointAttnProcessor2_0() if getattr(attn, "add_q_proj", None) is not None else AttnProcessor2_0()
            self._stock[attn] = processor
        return processor

    def __call__(self, attn, hidden_states, *args, **kwargs):
        start = _perturbed_start(hidden_states.shape[0], self._plain_chunks, type(self).__name__)
        layout = call_layout(getattr(attn, "_asag_name", type(attn).__name__), (hidden_states, *args), kwargs,
                             self.token_order)
        mode = SinkhornSDPAMode(self.settings, layout, start)
        with mode:
            out = self._stock_for(attn)(attn, hidden_states, *args, **kwargs)
        if mode.replaced_calls == 0:
            raise nothing_perturbed(type(self).__name__, [(layout.module_name, self._stock_for(attn))], "in this call")
        return out

    def __repr__(self) -> str:
        s = self.settings
        return f"{type(self).__name__}(num_iters={s.num_iters}, epsilon={s.epsilon}, backend={s.backend!r}, joint_mode={s.joint_mode!r})"


class ASAGCFGProcessor(_ASAGProcessorBase):
    """PAG processor with classifier-free guidance (``pag_attn_processors[0]``): batch ``[uncond, cond,
    perturbed]``; the module's stock processor runs on all of it, and its SDPA call is Sinkhorn
    attention (``joint_mode`` for joint text+image sequences) on the perturbed chunk only.

    Args:
        num_iters, epsilon, backend: forwarded to :func:`asag_kernels.sinkhorn_attention`.
        joint_mode: ``"image"`` (default) or ``"joint"`` for joint attention (SPEC §10).
        token_order: the model's joint token order (``families.TEXT_FIRST``/``IMAGE_FIRST``); set by
            :func:`enable_asag`.
        stock_processors: ``{attention module: its original processor}``; set by :func:`enable_asag`.
    """

    _plain_chunks = 2


class ASAGProcessor(_ASAGProcessorBase):
    """PAG processor without classifier-free guidance (``pag_attn_processors[1]``): batch ``[cond, perturbed]``."""

    _plain_chunks = 1


def _is_asag(processor) -> bool:
    return isinstance(processor, _ASAGProcessorBase)


def _restore(denoiser: torch.nn.Module, originals: dict, keep=()) -> None:
    """Give every module that holds an ASAG processor (except those in `keep`) its recorded original back."""
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if _is_asag(processor) and module in originals and module not in keep:
            module.processor = originals[module]


def _install_guard(pipe, denoiser: torch.nn.Module, originals: weakref.WeakKeyDictionary) -> None:
    """The failure guard on the denoiser of an ASAG-enabled PAG pipeline. The pipeline swaps ASAG
    processors in for a call and back afterwards, but not when the call fails. A denoiser call that
    raises (Ctrl-C too) restores the originals at once; ASAG processors left behind by a failure
    outside the denoiser (scheduler, callback, VAE) are restored before the next call runs: all of
    them in a call without PAG, those outside the currently chosen layers in a PAG call (so they
    never add to its branch)."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(_GUARD_HOOK) is not None:
        return  # installed by an earlier enable_asag; the pipeline's originals are recorded once and kept
    pipe_ref = weakref.ref(pipe)  # the guard lives on the denoiser and must not keep the pipeline alive

    def before(module):
        pipe = pipe_ref()
        if pipe is not None:
            pag_on = getattr(pipe, "_pag_scale", 0.0) > 0
            _restore(module, originals, keep=getattr(pipe, "_asag_modules", ()) if pag_on else ())

    FailureGuard.attach(denoiser, _GUARD_HOOK, lambda module: _restore(module, originals), before)


def enable_asag(
    pipe,
    layers=None,
    *,
    asag_scale: float = DEFAULT_ASAG_SCALE,
    num_iters: int = DEFAULT_NUM_ITERS,
    epsilon: float = DEFAULT_EPSILON,
    backend: str = "auto",
    joint_mode: str = DEFAULT_JOINT_MODE,
) -> dict[str, float]:
    """Turn a diffusers PAG pipeline into an ASAG pipeline.

    Installs the ASAG processor pair as the pipeline's ``pag_attn_processors`` for ``layers`` and
    returns the call arguments that set the ASAG scale, ``{"pag_scale": asag_scale,
    "pag_adaptive_scale": 0.0}``::

        pipe = AutoPipelineForText2Image.from_pretrained(model_id, enable_pag=True)
        image = pipe(prompt, **enable_asag(pipe)).images[0]

    Args:
        pipe: a pipeline with diffusers' ``PAGMixin``.
        layers: see :mod:`asag_kernels.diffusers.layers` (PAG layer ids / regexes, block indices,
            ``LayerSkipConfig``). ``None``: the family default for a UNet (``"mid"``), else the
            layers the pipeline already has (``pag_applied_layers``).
        asag_scale: the ASAG guidance scale (passed to the pipeline as ``pag_scale``), finite.
        num_iters, epsilon, backend: forwarded to :func:`asag_kernels.sinkhorn_attention`; a named
            backend that cannot run the pipeline's device/dtype raises here.
        joint_mode: ``"image"`` or ``"joint"`` for joint text+image attention (SPEC §10).

    Raises ``TypeError``/``ValueError`` (naming the argument) before changing anything.
    """
    if not isinstance(pipe, PAGMixin):
        raise TypeError(
            f"enable_asag needs a diffusers PAG pipeline (e.g. StableDiffusionXLPAGPipeline, or "
            f"AutoPipelineForText2Image.from_pretrained(..., enable_pag=True)); got {type(pipe).__name__}. "
            f"For modular pipelines use AdversarialSinkhornGuidance as the guider."
        )
    asag_scale = check_finite_float(asag_scale, "asag_scale")
    settings = SinkhornSettings(num_iters, epsilon, backend, joint_mode)
    denoiser = denoiser_of(pipe)
    check_denoiser(denoiser, settings)
    if layers is None:
        if hasattr(pipe, "unet"):
            layers = families.layer_patterns("sdxl")
        else:
            layers = list(getattr(pipe, "pag_applied_layers", None) or [])
            if not layers:
                raise ValueError(f"layers: {type(pipe).__name__} has no PAG layers set; pass layers=, e.g. 'blocks.1'")
    layers = normalise_layers(layers)
    modules = select_attention_layers(denoiser, layers)

    # Originals: recorded once (a second enable_asag must not record ASAG processors as originals).
    originals = getattr(pipe, "_asag_original_processors", None)
    if originals is None:
        originals = weakref.WeakKeyDictionary()
    else:  # ASAG processors a failed run left in place go before the new layers are chosen
        _restore(denoiser, originals)
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and not _is_asag(processor) and module not in originals:
            originals[module] = processor
    token_order = families.token_order_of(denoiser)
    pair = tuple(cls(settings.num_iters, settings.epsilon, settings.backend, joint_mode=settings.joint_mode,
                     token_order=token_order, stock_processors=originals) for cls in (ASAGCFGProcessor, ASAGProcessor))
    for name, module in modules.items():
        module._asag_name = name  # for error messages

    # diffusers' PAG matching is by regular expression over names; hand it exact names.
    if not hasattr(pipe, "_asag_previous_layers"):
        pipe._asag_previous_layers = list(getattr(pipe, "pag_applied_layers", None) or [])
        # The pipeline's own PAG processor pair (HunyuanDiT, Sana, ... have their own), for disable_asag.
        pipe._asag_previous_pag_processors = getattr(pipe, "_pag_attn_processors", None)
    pipe.set_pag_applied_layers([rf"^{name}$".replace(".", r"\.") for name in modules], pag_attn_processors=pair)
    pipe._asag_original_processors = originals
    pipe._asag_modules = weakref.WeakSet(modules.values())
    _install_guard(pipe, denoiser, originals)
    return {"pag_scale": asag_scale, "pag_adaptive_scale": 0.0}


def disable_asag(pipe) -> None:
    """Undo :func:`enable_asag`: every module gets its original processor back (also after a failed
    run), the guard hook goes, and the pipeline's PAG layers get diffusers' identity (PAG) processors."""
    from diffusers.models.attention_processor import (
        PAGCFGIdentitySelfAttnProcessor2_0,
        PAGCFGJointAttnProcessor2_0,
        PAGIdentitySelfAttnProcessor2_0,
        PAGJointAttnProcessor2_0,
    )

    denoiser = denoiser_of(pipe)
    originals = getattr(pipe, "_asag_original_processors", None)
    if originals is not None:
        _restore(denoiser, originals)
    remove_hook(denoiser, _GUARD_HOOK)
    pair = getattr(pipe, "_asag_previous_pag_processors", None)
    if pair is None:  # the pipeline had no PAG pair of its own recorded: diffusers' default ones
        if any(type(p).__name__.startswith("Joint") for p in (originals or {}).values()):
            pair = (PAGCFGJointAttnProcessor2_0(), PAGJointAttnProcessor2_0())
        else:
            pair = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())
    layers = getattr(pipe, "_asag_previous_layers", None) or getattr(pipe, "pag_applied_layers", None)
    if isinstance(pipe, PAGMixin) and layers:
        pipe.set_pag_applied_layers(list(layers), pag_attn_processors=pair)
    for attr in ("_asag_previous_layers", "_asag_previous_pag_processors", "_asag_original_processors", "_asag_modules"):
        if hasattr(pipe, attr):
            delattr(pipe, attr)

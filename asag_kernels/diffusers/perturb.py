"""``perturbed_attention``: ASAG's (or PAG's) perturbed self-attention in any diffusers model, for custom loops.

The guider and ``enable_asag`` serve diffusers' own pipelines. A user with a sampling loop of their
own (a class-conditional ``UNet2DModel``, a ``DiTTransformer2DModel``, a research pipeline) needs the
perturbed prediction itself::

    from asag_kernels.diffusers import perturbed_attention

    pred_cond = model(x, t, class_labels=y).sample
    with perturbed_attention(model, layers=["mid_block.attentions.0"]) as handle:
        pred_asag = model(x, t, class_labels=y).sample
    pred = pred_cond + asag_scale * (pred_cond - pred_asag)

Inside the ``with`` block the chosen modules' own attention processors run and only their
``scaled_dot_product_attention`` self-attention call is replaced (:mod:`.intercept`, the mechanism the
guider uses), on every sample of the batch.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

from ..settings import DEFAULT_EPSILON, DEFAULT_JOINT_MODE, DEFAULT_NUM_ITERS, SinkhornSettings
from ._common import check_denoiser, check_perturbed, hook_layers
from .intercept import SinkhornAttentionHook, uninstall
from .layers import denoiser_of

__all__ = ["perturbed_attention", "PerturbedAttention", "IdentityAttention", "PERTURBATIONS"]

PERTURBATIONS = ("asag", "pag")
_names = itertools.count()


class IdentityAttention:
    """PAG's perturbation (Ahn et al.; diffusers' ``PAGIdentitySelfAttnProcessor2_0``): the self-attention
    map is the identity, so each query's output is its own value. Over a joint text+image sequence every
    token gets its own value (``joint_mode`` "joint")."""

    joint_mode = "joint"
    backend = "auto"

    def attend(self, q, k, v, **_) -> torch.Tensor:
        """``[B, H, N, Dv]``: the values themselves (the attention call's output for an identity map)."""
        return v.contiguous()

    def __repr__(self) -> str:
        return "IdentityAttention()"


class PerturbedAttention:
    """The handle :func:`perturbed_attention` yields: which modules are perturbed and how often their
    attention was replaced so far."""

    def __init__(self, hooks: dict[str, SinkhornAttentionHook], perturbation):
        self._hooks = hooks
        self.perturbation = perturbation

    @property
    def layers(self) -> list[str]:
        """Names of the perturbed attention modules, in module order."""
        return list(self._hooks)

    @property
    def replaced_calls(self) -> dict[str, int]:
        """Module name -> number of its attention calls replaced inside the ``with`` block so far."""
        return {name: hook.replaced_calls for name, hook in self._hooks.items()}

    def __repr__(self) -> str:
        return f"PerturbedAttention({self.perturbation!r}, layers={self.layers})"


def _check_method(method) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be one of {PERTURBATIONS}, got {type(method).__name__} {method!r}")
    if method not in PERTURBATIONS:
        raise ValueError(f"method must be one of {PERTURBATIONS}, got {method!r}")
    return method


@contextmanager
def perturbed_attention(
    model,
    layers=None,
    *,
    method: str = "asag",
    num_iters: int = DEFAULT_NUM_ITERS,
    epsilon: float = DEFAULT_EPSILON,
    backend: str = "auto",
    joint_mode: str = DEFAULT_JOINT_MODE,
    settings=None,
):
    """Within the ``with`` block, ``model``'s chosen self-attention layers compute ASAG's (or PAG's)
    perturbed attention on every forward; on leaving it the model is as it was.

    Args:
        model: a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            Flux, Wan, ...) or a pipeline with a ``transformer``/``unet``.
        layers: block indices into the model's block list, a diffusers ``LayerSkipConfig``, or PAG-style
            regular expressions over module names (:func:`asag_kernels.diffusers.list_attention_layers`
            lists the choices); ``None`` = the model family's default (known families only).
        method: ``"asag"`` (adversarial Sinkhorn attention, SPEC §1) or ``"pag"`` (identity attention).
        num_iters, epsilon, backend, joint_mode: the Sinkhorn settings (``method="asag"``).
        settings: instead of those four keywords, an :class:`asag_kernels.settings.SinkhornSettings` or
            any object with its ``attend(q, k, v, **call)`` method and a ``joint_mode``: what the chosen
            attention calls return (e.g. a subclass that rescales the output).

    Yields:
        :class:`PerturbedAttention` (``replaced_calls`` per layer).

    Raises ``TypeError``/``ValueError`` naming the argument before anything is changed; on a normal exit a
    ``RuntimeError`` if a chosen layer's attention was never replaced (nothing was perturbed there).
    """
    method = _check_method(method)
    if settings is None:
        settings = (SinkhornSettings(num_iters, epsilon, backend, joint_mode) if method == "asag"
                    else IdentityAttention())
    elif method != "asag":
        raise ValueError(f"settings applies to method='asag' only, got method={method!r} with settings={settings!r}")
    elif not callable(getattr(settings, "attend", None)) or not hasattr(settings, "joint_mode"):
        raise TypeError(f"settings must be a SinkhornSettings (or have attend() and joint_mode), got {type(settings).__name__}")
    denoiser = denoiser_of(model)
    check_denoiser(denoiser, settings)
    name = f"asag_perturbed_attention_{next(_names)}"  # nested blocks must not remove each other's hooks
    installed = hook_layers(denoiser, layers, settings, name)
    hooks = {h.module_name: h for _, h in installed if isinstance(h, SinkhornAttentionHook)}
    handle = PerturbedAttention(hooks, settings)
    try:
        yield handle
    finally:
        uninstall(installed, name)
    check_perturbed("perturbed_attention", installed, "in the with-block")

"""``AdversarialSinkhornGuidance``: ASAG as a guider for diffusers' modular pipelines.

Shaped like diffusers' ``PerturbedAttentionGuidance`` / ``SkipLayerGuidance``: the denoise loop calls
``prepare_inputs`` (one batch per prediction), then ``prepare_models`` / the denoiser /
``cleanup_models`` per batch, then the guider combines the predictions. For the perturbed batch
the guider hooks the chosen self-attention modules (:mod:`.intercept`): their own processors run,
and only the ``scaled_dot_product_attention`` call inside becomes Sinkhorn attention.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from .._validate import check_finite_float, check_fraction
from ..settings import DEFAULT_ASAG_SCALE, DEFAULT_EPSILON, DEFAULT_JOINT_MODE, DEFAULT_NUM_ITERS, SinkhornSettings
from ._common import FailureGuard, check_bool, check_denoiser, check_perturbed, hook_layers
from .intercept import uninstall
from .layers import normalise_layers

__all__ = ["AdversarialSinkhornGuidance"]

# The guider's hooks on the chosen modules and its failure guard on the denoiser share the name:
# one uninstall removes both.
_HOOK = "asag_sinkhorn_attention"


class AdversarialSinkhornGuidance(BaseGuidance):
    """Adversarial Sinkhorn Attention Guidance (ASAG) for diffusers' modular pipelines.

    Per step the denoiser runs on up to three batches, ``pred_cond``, ``pred_uncond`` (CFG on) and
    ``pred_cond_asag`` (the conditional inputs again, with the chosen self-attention layers computed
    by adversarial Sinkhorn attention), combined as::

        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond) + asag_scale * (pred_cond - pred_cond_asag)

    Args:
        guidance_scale: classifier-free guidance scale (1.0 turns CFG off), finite.
        asag_scale: ASAG scale (0 turns ASAG off), finite. Default 1.5.
        asag_start, asag_stop: fractions of the schedule between which ASAG is applied (steps
            ``int(asag_start*T) <= step < int(asag_stop*T)``), like ``perturbed_guidance_start/stop``
            of diffusers' PAG guider, separate from the CFG window ``start``/``stop``.
        layers: which self-attention layers (see :mod:`asag_kernels.diffusers.layers`): block
            indices (int, found in the block list automatically), ``LayerSkipConfig``, or PAG layer
            ids / regular expressions; ``None`` = the model family's default (``families.py``).
        num_iters, epsilon, backend: forwarded to :func:`asag_kernels.sinkhorn_attention`.
        joint_mode: ``"image"`` (default, PAG-like) or ``"joint"`` for joint text+image attention (SPEC §10).
        guidance_rescale: rescale factor of "Common Diffusion Noise Schedules and Sample Steps are Flawed", in [0, 1].
        use_original_formulation: combine around ``pred_cond`` instead of ``pred_uncond``.
        start, stop: the CFG window (fractions of the schedule).
        enabled: start enabled.

    Every argument is checked here; a bad one raises a ValueError/TypeError naming it. A layer that
    matches nothing, or a chosen module whose attention could not be replaced, raises at the first
    perturbed pass instead of quietly guiding with an unperturbed prediction.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_asag"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        asag_scale: float = DEFAULT_ASAG_SCALE,
        asag_start: float = 0.0,
        asag_stop: float = 1.0,
        layers=None,
        num_iters: int = DEFAULT_NUM_ITERS,
        epsilon: float = DEFAULT_EPSILON,
        backend: str = "auto",
        joint_mode: str = DEFAULT_JOINT_MODE,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        start, stop = check_fraction(start, "start"), check_fraction(stop, "stop")
        if start > stop:
            raise ValueError(f"start must be <= stop, got start={start}, stop={stop}")
        super().__init__(start, stop, check_bool(enabled, "enabled"))
        self.guidance_scale = check_finite_float(guidance_scale, "guidance_scale")
        self.asag_scale = check_finite_float(asag_scale, "asag_scale")
        self.asag_start, self.asag_stop = check_fraction(asag_start, "asag_start"), check_fraction(asag_stop, "asag_stop")
        if self.asag_start > self.asag_stop:
            raise ValueError(f"asag_start must be <= asag_stop, got asag_start={asag_start}, asag_stop={asag_stop}")
        self.layers = None if layers is None else normalise_layers(layers)
        self.settings = SinkhornSettings(num_iters, epsilon, backend, joint_mode)
        self.guidance_rescale = check_fraction(guidance_rescale, "guidance_rescale")
        self.use_original_formulation = check_bool(use_original_formulation, "use_original_formulation")
        self._batch_identifiers: list[str] = []
        self._installed: list = []

    # --- which batches this step needs ------------------------------------------------------------

    def _in(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled or not self._in(self._start, self._stop):
            return False
        return not math.isclose(self.guidance_scale, 0.0 if self.use_original_formulation else 1.0)

    def _is_asag_enabled(self) -> bool:
        return self._enabled and self._in(self.asag_start, self.asag_stop) and not math.isclose(self.asag_scale, 0.0)

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

    def _remove_hooks(self) -> None:
        installed, self._installed = self._installed, []
        uninstall(installed, _HOOK)

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        self._remove_hooks()  # left by a pass that was interrupted before cleanup_models
        if not self._current_is_perturbed():
            return
        # Every perturbed pass: the denoiser may have moved (pipe.to(...)) since the last one.
        # The guider's hooks take context-parallel calls at the attention dispatch (exact for any degrees).
        check_denoiser(denoiser, self.settings, sharded=True)
        self._installed = hook_layers(denoiser, self.layers, self.settings, _HOOK)
        guard = FailureGuard.attach(denoiser, _HOOK, lambda _: self._remove_hooks())
        self._installed.append((denoiser, guard))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if not self._installed:
            return
        installed = self._installed
        self._remove_hooks()
        check_perturbed(type(self).__name__, installed, "during the perturbed pass")

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

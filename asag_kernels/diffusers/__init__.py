"""ASAG inside diffusers pipelines.

ASAG guides a diffusion model away from a deliberately degraded prediction: the conditional pass
recomputed with Sinkhorn attention under the adversarial cost in a few self-attention layers (SPEC §1)::

    pred = pred_uncond + w_cfg * (pred_cond - pred_uncond) + s_asag * (pred_cond - pred_cond_asag)

Three ways in, sharing one mechanism (:mod:`.intercept`: diffusers' own attention processor runs and
only its ``scaled_dot_product_attention`` call on the perturbed samples becomes Sinkhorn attention):

* PAG pipelines: :func:`enable_asag` installs the ASAG processor pair, :class:`ASAGCFGProcessor` and
  :class:`ASAGProcessor` (:mod:`.processors`).
* Modular pipelines: :class:`AdversarialSinkhornGuidance` is the guider (:mod:`.guider`).
* Any diffusers model in a loop of your own: :func:`perturbed_attention`, a context manager in
  which the chosen layers compute the perturbed attention (:mod:`.perturb`; ``method="pag"`` for PAG).

The three routes never import from each other: what they share (the checks made before a denoiser
is changed, hooking the chosen layers, the one failure guard, the one "nothing was perturbed" error)
is :mod:`._common`. Layers are chosen as diffusers' guiders choose them (:mod:`.layers`,
:func:`list_attention_layers`); per-family defaults and token orders live in :mod:`.families`;
joint text+image attention follows ``joint_mode`` (SPEC §10). Install with
``pip install "asag-kernels[diffusers]"``.
"""

from __future__ import annotations

try:
    import diffusers.guiders  # noqa: F401
    import diffusers.hooks  # noqa: F401
    from diffusers.pipelines.pag.pag_utils import PAGMixin  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test without diffusers
    raise ImportError(
        "asag_kernels.diffusers needs diffusers (>= 0.35, with guiders and hooks) and transformers: "
        'install them with  pip install "asag-kernels[diffusers]"  '
        f"(import failed with: {exc})"
    ) from exc

from ..joint import JOINT_MODES
from ..settings import DEFAULT_ASAG_SCALE, DEFAULT_EPSILON, DEFAULT_NUM_ITERS, SinkhornSettings
from . import processors as _processors
from .guider import AdversarialSinkhornGuidance
from .layers import list_attention_layers, select_attention_layers
from .perturb import PERTURBATIONS, perturbed_attention
from .processors import ASAGCFGProcessor, ASAGProcessor, disable_asag, enable_asag

__all__ = [
    "AdversarialSinkhornGuidance",
    "enable_asag",
    "disable_asag",
    "perturbed_attention",
    "PERTURBATIONS",
    "list_attention_layers",
    "select_attention_layers",
    "ASAGCFGProcessor",
    "ASAGProcessor",
    "SinkhornSettings",
    "JOINT_MODES",
    "DEFAULT_ASAG_SCALE",
    "DEFAULT_NUM_ITERS",
    "DEFAULT_EPSILON",
]


def __getattr__(name: str):
    # The first release's processor names (ASAGCFGSelfAttnProcessor, ...): the pair, with a FutureWarning.
    if name in _processors._DEPRECATED_NAMES:
        return _processors._deprecated_name(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

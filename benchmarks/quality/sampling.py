"""Guided DDIM sampling of the lab's models through the package's public API
(:func:`asag_kernels.diffusers.perturbed_attention`), combined as the package's guider does::

    pred = pred_uncond + w * (pred_cond - pred_uncond) + s * (pred_cond - pred_cond_perturbed)   # CFG + ASAG/PAG
    pred = pred_cond + s * (pred_cond - pred_cond_perturbed)                                     # ASAG/PAG alone

Unconditional sampling uses the null label as "cond" (the same formula with every label = null).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asag_kernels.diffusers import perturbed_attention
from asag_kernels.settings import SinkhornSettings

from . import data, models


class LegacyScaledSettings(SinkhornSettings):
    """The earlier ComfyUI node's output, for comparison only: its attention output was ~1/N of a
    row-normalised plan's (N = keys), so this multiplies the package's Sinkhorn attention by 1/N."""

    def attend(self, q, k, v, **call):
        return super().attend(q, k, v, **call) / k.shape[-2]


@dataclass(frozen=True)
class Guidance:
    """One sampling configuration. ``method``: "none", "cfg", "pag", "asag", "asag_legacy"; ``scale`` is the
    perturbation's s (ignored for none/cfg); ``cfg_scale`` w (1 = off); ``layers`` None = the model's defaults."""

    method: str = "none"
    scale: float = 0.0
    cfg_scale: float = 1.0
    num_iters: int | None = None
    epsilon: float | None = None
    layers: tuple | None = None
    conditional: bool = True


def _perturbed(model, g: Guidance):
    if g.method == "pag":
        return perturbed_attention(model, g.layers and list(g.layers), method="pag")
    cls = LegacyScaledSettings if g.method == "asag_legacy" else SinkhornSettings
    return perturbed_attention(model, g.layers and list(g.layers),
                               settings=cls(num_iters=g.num_iters, epsilon=g.epsilon))


@torch.no_grad()
def sample(model: torch.nn.Module, g: Guidance, n: int, seed: int, steps: int = 20, progress=None) -> torch.Tensor:
    """``[n, 1, 16, 16]`` images in [-1, 1]; labels ``arange(n) % 10`` (all null when unconditional).
    Deterministic: the same ``seed`` gives the same tensor in one process."""
    if g.method not in ("none", "cfg", "pag", "asag", "asag_legacy"):
        raise ValueError(f"method must be none/cfg/pag/asag/asag_legacy, got {g.method!r}")
    sched = models.sample_scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, data.RESOLUTION, data.RESOLUTION, generator=gen)
    y = labels(n) if g.conditional else torch.full((n,), data.NULL_CLASS)
    null = torch.full((n,), data.NULL_CLASS)
    for t in sched.timesteps:
        tt = t.expand(n)
        cond = models.forward(model, x, tt, y)
        pred = cond
        if g.method == "cfg" or g.cfg_scale != 1.0:
            uncond = models.forward(model, x, tt, null)
            pred = uncond + g.cfg_scale * (cond - uncond)
        if g.method in ("pag", "asag", "asag_legacy") and g.scale != 0.0:
            with _perturbed(model, g):
                pert = models.forward(model, x, tt, y)
            pred = pred + g.scale * (cond - pert)
        x = sched.step(pred, t, x).prev_sample
        if progress is not None:
            progress.update(1)
    return x.clamp(-1, 1)


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % data.NUM_CLASSES

"""The guidance step: when ASAG runs (sigma window) and how its term joins the CFG result.

    out = cfg_result + scale * (cond_pred - cond_pred_asag)            (rescale = 0)

``rescale`` and ``rescale_mode`` follow the PAG/SEG nodes of the sd-perturbed-attention pack:

* ``"full"``: the ASAG term is multiplied by ``rescale * std(cond) / std(cfg_result + term) + (1 - rescale)``
  (standard deviations per batch element over all other dims, as CFG-rescale does);
* ``"partial"``: the same with ``std(cond + term)`` in the denominator (the ASAG term alone);
* ``"snf"``: saliency-adaptive noise fusion (Wang et al., arXiv 2311.10329): per element, keep the
  CFG term or the ASAG term, whichever is more salient (larger softmax over positions of its
  blurred magnitude), and add it to the unconditional prediction; ``rescale`` is ignored.
"""

from __future__ import annotations

import math

import torch

RESCALE_MODES = ("full", "partial", "snf")


class SigmaWindow:
    """ASAG runs at steps with ``sigma_end < sigma <= sigma_start``; a negative ``sigma_start``
    means no upper bound and a negative ``sigma_end`` no lower bound (the PAG nodes' -1 default)."""

    def __init__(self, sigma_start: float, sigma_end: float):
        self.start = math.inf if sigma_start < 0 else float(sigma_start)
        self.end = -math.inf if sigma_end < 0 else float(sigma_end)
        if self.end >= self.start:
            raise ValueError(
                f"sigma_end must be below sigma_start (ASAG runs where sigma_end < sigma <= sigma_start), "
                f"got sigma_start={sigma_start}, sigma_end={sigma_end}"
            )

    def __contains__(self, sigma: torch.Tensor) -> bool:
        s = float(sigma.flatten()[0])  # one sigma per step (every batch element shares it)
        return self.end < s <= self.start


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur (sigma 1) over the last two dims, reflect-padded."""
    g = torch.exp(-0.5 * torch.arange(-1.0, 2.0, device=x.device) ** 2)
    g = (g / g.sum()).to(x.dtype)
    flat = x.reshape(-1, 1, *x.shape[-2:])
    flat = torch.nn.functional.pad(flat, (1, 1, 1, 1), mode="reflect" if min(x.shape[-2:]) > 1 else "replicate")
    flat = torch.nn.functional.conv2d(flat, g.view(1, 1, 1, 3))
    flat = torch.nn.functional.conv2d(flat, g.view(1, 1, 3, 1))
    return flat.reshape(x.shape)


def _saliency(t: torch.Tensor) -> torch.Tensor:
    s = _blur3(t.abs())
    return torch.softmax(s.flatten(-2), dim=-1).view_as(s)


def combine(cfg_result, cond_pred, uncond_pred, asag_pred, scale: float, rescale: float, rescale_mode: str):
    """The denoised prediction with ASAG added (see the module docstring)."""
    term = (cond_pred - asag_pred) * scale
    if rescale_mode == "snf":
        if uncond_pred is None or not bool(uncond_pred.any()):  # no unconditional pass this step
            return cfg_result + term
        cfg_term = cfg_result - uncond_pred
        return uncond_pred + torch.where(_saliency(term) > _saliency(cfg_term), term, cfg_term)
    if rescale == 0:
        return cfg_result + term
    guided = (cfg_result if rescale_mode == "full" else cond_pred) + term
    factor = rescale * (_std(cond_pred) / _std(guided)) + (1.0 - rescale)
    return cfg_result + term * factor

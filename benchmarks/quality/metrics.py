"""Sample-quality metrics in the evaluator's feature space: Fréchet distance and k-NN precision/recall
(Kynkäänniemi et al. 2019: a sample is "precise" if it lies inside some real feature's k-NN ball, a real
feature is "recalled" if it lies inside some sample's k-NN ball)."""

from __future__ import annotations

import numpy as np
import torch

KNN = 3


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between Gaussians fitted to features ``a [n, F]`` and ``b [m, F]`` (float64)."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))  # singular when fewer samples than features (the quick run)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = KNN) -> tuple[float, float]:
    real, fake = real.double(), fake.double()
    d = torch.cdist(fake, real)  # [n_fake, n_real]
    precision = (d <= _radii(real, k)[None, :]).any(1).double().mean().item()
    recall = (d.T <= _radii(fake, k)[None, :]).any(1).double().mean().item()
    return precision, recall

"""The digits data: ``sklearn.datasets.load_digits`` (1,797 8x8 images, 10 classes), one fixed split, 16x16.

Images are bilinearly upsampled to ``[1, 16, 16]`` and mapped from ``[0, 16]`` to ``[-1, 1]`` (the range the
diffusion models are trained on). The split is a fixed permutation (seed ``SPLIT_SEED``): the first
``HELD_OUT`` indices are held out (FD reference, evaluator accuracy), the rest train everything.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
HELD_OUT = 397
RESOLUTION = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label index of "no class" (classifier-free guidance)


def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # [1797, 1, 8, 8] in [-1, 1]
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def split(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 1, 16, 16] in [-1, 1], labels [n] int64)`` of ``part`` "train" or "held_out"."""
    if part not in ("train", "held_out"):
        raise ValueError(f"part must be 'train' or 'held_out', got {part!r}")
    x, y = _all_digits()
    perm = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(len(y)))
    idx = perm[:HELD_OUT] if part == "held_out" else perm[HELD_OUT:]
    return x[idx], y[idx]


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation: each image shifted by an integer in [-1, 1] pixels per axis (zero = background -1)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=generator)
    dy = torch.randint(0, 3, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):  # n is a batch (<= 256): cheap next to the model
        out[i] = padded[i, :, dy[i]:dy[i] + RESOLUTION, dx[i]:dx[i] + RESOLUTION]
    return out

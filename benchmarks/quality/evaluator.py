"""The evaluator: a small CNN digit classifier on the train split; its penultimate features define the
Fréchet distance and the k-NN precision/recall of the guidance-quality lab.

    nice -n 5 python -m benchmarks.quality.evaluator   # writes evaluator.safetensors and evaluator_train.json
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .models import HERE

SEED = 7
FEATURES = 64
WEIGHTS = HERE / "evaluator.safetensors"


class DigitCNN(nn.Module):
    """``[B, 1, 16, 16]`` in [-1, 1] -> logits ``[B, 10]``; :meth:`features` gives the ``[B, 64]`` penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, data.NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load() -> DigitCNN:
    from safetensors.torch import load_file

    m = DigitCNN()
    m.load_state_dict(load_file(str(WEIGHTS)))
    return m.eval()


@torch.no_grad()
def accuracy(model: DigitCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def train(epochs: int = 20, batch: int = 64, lr: float = 2e-3) -> tuple[DigitCNN, list[float]]:
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    x, y = data.split("train")
    model = DigitCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(data.augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(round(total / len(y), 5))
    return model.eval(), losses


def main():
    torch.set_num_threads(1)
    t0 = time.time()
    model, losses = train()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(WEIGHTS))
    acc = accuracy(model, *data.split("held_out"))
    meta = {"command": "python -m benchmarks.quality.evaluator", "seed": SEED, "epochs": len(losses),
            "held_out_accuracy": round(acc, 4), "train_seconds": round(time.time() - t0, 1),
            "loss_per_epoch": losses}
    with open(HERE / "evaluator_train.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"held-out accuracy {acc:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()

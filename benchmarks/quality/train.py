"""Train the lab's diffusion models on the digits' train split (epsilon prediction, DDPM noise schedule).

    nice -n 5 python -m benchmarks.quality.train --model dit   # writes benchmarks/quality/dit.safetensors
    nice -n 5 python -m benchmarks.quality.train --model unet  #  and <model>_train.json (provenance, loss curve)

Fixed seeds; the label is replaced by the null class with probability ``CFG_DROPOUT`` (classifier-free
guidance). The shipped weights are an exponential moving average (decay ``EMA_DECAY``) of the trained ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from . import data, models

CFG_DROPOUT = 0.1
EMA_DECAY = 0.995
SEED = 1234


def train(name: str, steps: int, batch: int, lr: float, seed: int = SEED, log_every: int = 50,
          stop_after: int | None = None):
    """Returns ``(ema_model, losses)``: ``losses`` the mean training loss of each ``log_every`` steps.
    ``stop_after``: stop after that many steps of the ``steps``-step schedule (a reproducibility check of the
    shipped run's first losses without paying for all of it)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = data.split("train")
    model = models.build(name).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    noise_sched = models.train_scheduler()
    losses, acc = [], 0.0
    for step in range(1, (stop_after or steps) + 1):
        idx = torch.randint(0, len(y_train), (batch,), generator=g)
        x0 = data.augment(x_train[idx], g)
        y = torch.where(torch.rand(batch, generator=g) < CFG_DROPOUT, data.NULL_CLASS, y_train[idx])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, models.TRAIN_TIMESTEPS, (batch,), generator=g)
        loss = F.mse_loss(models.forward(model, noise_sched.add_noise(x0, noise, t), t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(EMA_DECAY, (1 + step) / (10 + step))  # warm-up so the early average is not the random init
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        acc += loss.item()
        if step % log_every == 0:
            losses.append(round(acc / log_every, 5))
            acc = 0.0
            print(f"step {step}/{steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return ema, losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=models.MODELS, required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="weights path (default benchmarks/quality/<model>.safetensors)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = a.steps or DEFAULT_STEPS[a.model]
    lr = a.lr or DEFAULT_LR[a.model]
    t0 = time.time()
    ema, losses = train(a.model, steps, a.batch, lr)
    seconds = time.time() - t0
    from safetensors.torch import save_file

    out = a.out or str(models.weights_path(a.model))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, out)
    meta = {"command": "python -m benchmarks.quality.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": a.model, "steps": steps, "batch": a.batch, "lr": lr, "seed": SEED, "cfg_dropout": CFG_DROPOUT,
            "ema_decay": EMA_DECAY, "data": "sklearn.datasets.load_digits, bilinear 8x8->16x16, [-1,1], +-1px shifts",
            "split": {"seed": data.SPLIT_SEED, "held_out": data.HELD_OUT, "rule": "np.random.RandomState(seed)"
                      ".permutation(1797): first held_out indices held out, the rest train"},
            "parameters": sum(p.numel() for p in ema.parameters()), "train_seconds": round(seconds, 1),
            "threads": a.threads, "machine": platform.platform(), "torch": torch.__version__,
            "loss_every_50_steps": losses}
    with open(out.replace(".safetensors", "_train.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out} ({seconds:.0f} s)", file=sys.stderr)


DEFAULT_STEPS = {"dit": 1200, "unet": 800}
DEFAULT_LR = {"dit": 1e-3, "unet": 2e-3}

if __name__ == "__main__":
    main()

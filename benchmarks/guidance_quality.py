"""Guidance quality on trained toy models: none / CFG / PAG / ASAG (scale, num_iters, epsilon, layers) /
ASAG with the earlier ComfyUI node's 1/N output, on the lab's digits DiT and UNet (benchmarks/quality).

    nice -n 5 python benchmarks/guidance_quality.py --json out.json          # the full run (docs/QUALITY.md)
    python benchmarks/guidance_quality.py --quick --json out.json            # CI: a few rows, small samples

Each row samples ``--n`` images (labels 0..9 in turn) per seed with DDIM ``--steps`` through
``asag_kernels.diffusers.perturbed_attention`` and reports, as mean ± std over the seeds, the Fréchet distance
in the evaluator's penultimate features against the held-out real digits, the evaluator's agreement with the
requested class, k-NN precision/recall (means over seeds) and wall seconds per image. SEG is not measured
(its perturbation, a Gaussian blur of the queries, is not part of this package's API).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quality import data, evaluator, metrics, models  # noqa: E402
from quality.sampling import Guidance, labels, sample  # noqa: E402

# Layer choices, by name: the model's attention modules (list_attention_layers) each choice perturbs.
LAYERS = {
    "dit": {"mid": ("transformer_blocks.1.attn1", "transformer_blocks.2.attn1"),
            "all": tuple(f"transformer_blocks.{i}.attn1" for i in range(4)),
            "first": ("transformer_blocks.0.attn1",)},
    "unet": {"mid": ("mid_block.attentions.0",),
             "all": ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                     "up_blocks.0.attentions.1"),
             "first": ("down_blocks.1.attentions.0",)},
}
DEFAULT_LAYERS = "mid"
SCALES = (0.5, 1.0, 2.0, 4.0)
CFG_SCALES = (1.5, 3.0)
PROBE_SCALE = 2.0  # where num_iters / epsilon / layers / unconditional are compared


def plan(quick: bool, names=models.MODELS, headline: bool = False) -> list[tuple[str, str, Guidance]]:
    """``(model, layers name, Guidance)`` per row. ``headline``: none, CFG 1.5, PAG and ASAG at 1 and 2,
    unconditional with and without ASAG 2 (the rows a slower model can afford)."""
    rows = []
    for m in names:
        add = lambda g, lay=DEFAULT_LAYERS: rows.append((m, lay, g))  # noqa: E731
        asag = lambda s, it=2, eps=1.0, lay=DEFAULT_LAYERS, cond=True, method="asag": add(  # noqa: E731
            Guidance(method, s, num_iters=it, epsilon=eps, layers=LAYERS[m][lay], conditional=cond), lay)
        add(Guidance("none"))
        if quick:
            add(Guidance("cfg", cfg_scale=3.0))
            add(Guidance("pag", PROBE_SCALE, layers=LAYERS[m][DEFAULT_LAYERS]))
            asag(PROBE_SCALE)
            continue
        if headline:
            add(Guidance("cfg", cfg_scale=CFG_SCALES[0]))
            for s in (1.0, PROBE_SCALE):
                add(Guidance("pag", s, layers=LAYERS[m][DEFAULT_LAYERS]))
                asag(s)
            add(Guidance("none", conditional=False))
            asag(PROBE_SCALE, cond=False)
            continue
        for w in CFG_SCALES:
            add(Guidance("cfg", cfg_scale=w))
        for s in SCALES:
            add(Guidance("pag", s, layers=LAYERS[m][DEFAULT_LAYERS]))
            asag(s)
        for it in (1, 4, 8):
            asag(PROBE_SCALE, it=it)
        for eps in (0.5, 2.0):
            asag(PROBE_SCALE, eps=eps)
        asag(PROBE_SCALE, lay="all")
        add(Guidance("none", conditional=False))
        asag(PROBE_SCALE, cond=False)
        asag(1.5, method="asag_legacy")  # the earlier node's default scale with its 1/N output
    return rows


ROW_TYPES = {"model": str, "method": str, "conditional": bool, "scale": float, "num_iters": (int, type(None)),
             "epsilon": (float, type(None)), "layers": str, "fd_mean": float, "fd_std": float,
             "acc_mean": (float, type(None)), "precision": float, "recall": float, "seeds": int, "s_per_image": float}


def check_result(result: dict) -> dict:
    """Raise ValueError unless ``result`` has the issue's JSON schema exactly (keys, types, finite FDs)."""
    if set(result) != {"evaluator_accuracy", "random_init_fd", "rows"} or not result["rows"]:
        raise ValueError(f"result keys {sorted(result)} / {len(result.get('rows', []))} rows: not the schema")
    for r in result["rows"]:
        if set(r) != set(ROW_TYPES) or any(not isinstance(r[k], t) for k, t in ROW_TYPES.items()):
            raise ValueError(f"row does not match the schema: {r}")
        if r["method"] not in ("none", "cfg", "pag", "seg", "asag", "asag_legacy") or r["model"] not in models.MODELS:
            raise ValueError(f"row has an unknown model/method: {r}")
        if not (r["fd_mean"] == r["fd_mean"] and r["fd_mean"] >= 0):
            raise ValueError(f"row has a bad FD: {r}")
    return result


def _scale(g: Guidance) -> float:
    return g.cfg_scale if g.method == "cfg" else (g.scale if g.method != "none" else 0.0)


def evaluate(images: torch.Tensor, cls, real_feats: torch.Tensor, conditional: bool):
    with torch.no_grad():
        feats = cls.features(images)
        acc = (cls.head(feats).argmax(1) == labels(len(images))).float().mean().item() if conditional else None
    fd = metrics.frechet_distance(feats, real_feats)
    p, r = metrics.precision_recall(real_feats, feats)
    return fd, acc, p, r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI: 4 rows per model, --n 30")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--n", type=int, default=None, help="images per row per seed (default 100; quick 30)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core machine)")
    ap.add_argument("--headline", action="store_true", help="8 rows per model (see plan()) instead of 20")
    ap.add_argument("--models", default=",".join(models.MODELS), help="comma-separated subset of dit,unet")
    ap.add_argument("--grids", help="folder for sample-grid PNGs (one per model: none, cfg, pag, asag rows)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    n = a.n or (30 if a.quick else 100)
    steps = a.steps or 10
    torch.set_num_threads(a.threads)
    from tqdm import tqdm

    cls = evaluator.load()
    x_ho, y_ho = data.split("held_out")
    with torch.no_grad():
        real_feats = cls.features(x_ho)
    ev_acc = evaluator.accuracy(cls, x_ho, y_ho)
    names = tuple(a.models.split(","))
    if not names or any(m not in models.MODELS for m in names):
        raise ValueError(f"--models must be a comma-separated subset of {models.MODELS}, got {a.models!r}")
    rows_plan = plan(a.quick, names, a.headline)
    nets = {m: models.load(m) for m in names}
    bar = tqdm(total=(len(rows_plan) * a.seeds + 1) * steps, desc="sampling", file=sys.stderr)
    torch.manual_seed(0)
    random_model = models.build("dit").eval()
    random_fd = evaluate(sample(random_model, Guidance("none"), n, 0, steps, bar), cls, real_feats, True)[0]
    out_rows, grids = [], {}
    for m, lay, g in rows_plan:
        fds, accs, ps, rs, secs = [], [], [], [], []
        for seed in range(a.seeds):
            t0 = time.perf_counter()
            imgs = sample(nets[m], g, n, seed, steps, bar)
            secs.append((time.perf_counter() - t0) / n)
            fd, acc, p, r = evaluate(imgs, cls, real_feats, g.conditional)
            fds.append(fd), accs.append(acc), ps.append(p), rs.append(r)
            if seed == 0:
                grids[(m, g)] = imgs[:30]
        row = {"model": m, "method": g.method, "conditional": g.conditional, "scale": float(_scale(g)),
               "num_iters": g.num_iters if g.method.startswith("asag") else None,
               "epsilon": g.epsilon if g.method.startswith("asag") else None,
               "layers": lay if g.method not in ("none", "cfg") else "",
               "fd_mean": statistics.fmean(fds), "fd_std": statistics.stdev(fds) if len(fds) > 1 else 0.0,
               "acc_mean": statistics.fmean(accs) if g.conditional else None,
               "precision": statistics.fmean(ps), "recall": statistics.fmean(rs), "seeds": a.seeds,
               "s_per_image": statistics.fmean(secs)}
        out_rows.append(row)
        tqdm.write(f"{m:4s} {g.method:11s} cond={int(g.conditional)} s={row['scale']:<4} it={row['num_iters']} "
                   f"eps={row['epsilon']} {lay:5s} FD {row['fd_mean']:.2f}±{row['fd_std']:.2f} "
                   f"acc {row['acc_mean']} P {row['precision']:.2f} R {row['recall']:.2f} "
                   f"{row['s_per_image'] * 1e3:.1f} ms/img", file=sys.stderr)
    bar.close()
    result = check_result({"evaluator_accuracy": ev_acc, "random_init_fd": random_fd, "rows": out_rows})
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.grids:
        save_grids(grids, Path(a.grids))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()}; n={n} steps={steps}",
          file=sys.stderr)
    return result


def save_grids(grids, folder: Path):
    """One PNG per model: rows none, best CFG, PAG s=2, ASAG s=2 (seed 0, 30 images, labels 0..9 x 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for m in sorted({m for m, _ in grids}):
        picks = [(g, im) for (mm, g), im in grids.items() if mm == m and g.conditional and g.method != "asag_legacy"
                 and (g.method in ("none",) or (g.method == "cfg" and g.cfg_scale == 3.0)
                      or (g.method in ("pag", "asag") and g.scale == PROBE_SCALE and g.num_iters in (None, 2)
                          and g.epsilon in (None, 1.0) and g.layers == LAYERS[m][DEFAULT_LAYERS]))]
        fig, axes = plt.subplots(len(picks), 1, figsize=(10, 1.3 * len(picks)))
        for ax, (g, im) in zip(list(axes) if len(picks) > 1 else [axes], picks):
            tiles = im[:30].reshape(3, 10, 16, 16).permute(0, 2, 1, 3).reshape(48, 160)
            ax.imshow(tiles.numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(f"{m} {g.method} scale {_scale(g)}", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / f"quality_samples_{m}.png", dpi=80)
        plt.close(fig)


if __name__ == "__main__":
    main()

"""docs/QUALITY.md's table and FD-vs-scale plot from guidance_quality.py's JSON (one or more files, merged).

    python -m benchmarks.quality.report out_dit.json out_unet.json --json docs/quality_full.json \
        --plot docs/quality_fd_vs_scale.png --table   # the markdown table on stdout
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(paths) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    return {"evaluator_accuracy": parts[0]["evaluator_accuracy"], "random_init_fd": parts[0]["random_init_fd"],
            "rows": [r for p in parts for r in p["rows"]]}


def table(result: dict) -> str:
    head = ("| model | method | cond | scale | num_iters | epsilon | layers | FD ↓ | class acc | precision | recall "
            "| s/image |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        acc = "—" if r["acc_mean"] is None else f"{r['acc_mean']:.3f}"
        lines.append(f"| {r['model']} | {r['method']} | {'yes' if r['conditional'] else 'no'} | {r['scale']:g} | "
                     f"{r['num_iters'] if r['num_iters'] is not None else '—'} | "
                     f"{r['epsilon'] if r['epsilon'] is not None else '—'} | {r['layers'] or '—'} | "
                     f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f} | {acc} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['s_per_image'] * 1e3:.1f} ms |")
    return head + "\n".join(lines)


def plot(result: dict, path: str):
    """FD against scale per model and method (conditional, default num_iters/epsilon/layers; none at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == m and r["conditional"]]
        none = next(r for r in rows if r["method"] == "none")
        for method in ("cfg", "pag", "asag"):
            pts = sorted((r["scale"], r["fd_mean"], r["fd_std"]) for r in rows if r["method"] == method
                         and r["num_iters"] in (None, 2) and r["epsilon"] in (None, 1.0)
                         and r["layers"] in ("", "mid"))
            if method != "cfg":
                pts = [(0.0, none["fd_mean"], none["fd_std"])] + pts
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                            label="CFG (x = guidance scale w)" if method == "cfg" else method.upper())
        ax.axhline(none["fd_mean"], color="gray", ls=":", label="no guidance")
        ax.set_title(f"{m}: FD vs scale (mean ± std, {none['seeds']} seeds)")
        ax.set_xlabel("scale")
        ax.set_ylabel("FD (evaluator features), lower is better")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    result = merge(a.inputs)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.plot:
        plot(result, a.plot)
    if a.table:
        print(table(result))


if __name__ == "__main__":
    main()

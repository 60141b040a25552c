"""ASAG in diffusers' modular pipelines, one family at a time: CFG alone next to CFG + ASAG.

    python examples/asag_modular.py --model sd3 --prompt "a corgi wearing a tiny wizard hat"
    python examples/asag_modular.py --model wan --steps 30 --out wan_asag.gif     # video: GIF, no guidance | ASAG
    python examples/asag_modular.py --model flux --smoke-test                      # tiny random model, CPU, seconds
    python examples/asag_modular.py --model sdxl sd3 flux flux2 qwenimage wan hunyuanvideo ltx --smoke-test

``--model``: sdxl | sd3 | flux | flux2 | qwenimage | wan | hunyuanvideo | ltx. Each runs the family's
own modular blocks with :class:`asag_kernels.diffusers.AdversarialSinkhornGuidance` as the guider,
at the family's default ASAG layers (``asag_kernels.diffusers.families``, each with its source) unless
``--layers`` is given. Flux.1 has no guider in its modular loop (guidance-distilled); it gets one
through :func:`asag_kernels.diffusers.flux.with_guided_denoiser`, with CFG off (``--cfg 1``) and the
distilled guidance embedding unchanged.

Weights come from the local Hugging Face cache only (nothing is downloaded); when they are missing the
script prints the ``hf download`` command and exits with status 2. ``--smoke-test`` builds tiny random
components instead (``examples/asag_tiny.py``), runs two steps with CFG and with CFG + ASAG, prints one
line ``smoke-test <model>: ok, asag branch differs from cfg by <x>`` and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

# Cache only, never download: huggingface_hub reads this once, at its import (before any diffusers import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # asag_tiny, next to this file

MODELS = ("sdxl", "sd3", "flux", "flux2", "qwenimage", "wan", "hunyuanvideo", "ltx")

# Hub repo, modular blocks (module, class), output kind, CFG scale that repo's model card uses.
REPOS = {
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "stable_diffusion_xl", "StableDiffusionXLAutoBlocks", "images", 5.0),
    "sd3": ("stabilityai/stable-diffusion-3.5-medium", "stable_diffusion_3", "StableDiffusion3AutoBlocks", "images", 4.5),
    "flux": ("black-forest-labs/FLUX.1-dev", "flux", "FluxAutoBlocks", "images", 1.0),
    "flux2": ("black-forest-labs/FLUX.2-klein-base-9B", "flux2", "Flux2KleinBaseAutoBlocks", "images", 4.0),
    "qwenimage": ("Qwen/Qwen-Image", "qwenimage", "QwenImageAutoBlocks", "images", 4.0),
    "wan": ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan", "Wan22Blocks", "videos", 4.0),
    "hunyuanvideo": ("hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v", "hunyuan_video1_5", "HunyuanVideo15AutoBlocks",
                     "videos", 6.0),
    "ltx": ("Lightricks/LTX-Video-0.9.5", "ltx", "LTXBlocks", "videos", 3.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, nargs="+", choices=MODELS,
                   help="the model family; --smoke-test takes several (one line each)")
    p.add_argument("--smoke-test", action="store_true", help="tiny random components, two steps, no weights")
    p.add_argument("--repo", default=None, help="Hub id or local path (default: per --model, see REPOS)")
    p.add_argument("--prompt", default="a red fox trotting through fresh snow, detailed fur, soft morning light")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: per model)")
    p.add_argument("--asag-scale", type=float, default=1.5)
    p.add_argument("--num-iters", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--joint-mode", default="image", choices=("image", "joint"))
    p.add_argument("--layers", nargs="+", default=None,
                   help="ASAG layers: block indices (ints) or PAG-syntax regexes (default: the family's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="video models only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="output file (default: asag_<model>.png, or .gif for video)")
    return p.parse_args(argv)


def _layers(args, default):
    if args.layers is None:
        return default
    return [int(x) if x.lstrip("-").isdigit() else x for x in args.layers]


def _guiders(args, layers, cfg):
    """(CFG alone, CFG + ASAG) with the same CFG scale."""
    from diffusers.guiders import ClassifierFreeGuidance

    from asag_kernels.diffusers import AdversarialSinkhornGuidance

    asag = AdversarialSinkhornGuidance(
        guidance_scale=cfg, asag_scale=args.asag_scale, layers=layers, num_iters=args.num_iters,
        epsilon=args.epsilon, joint_mode=args.joint_mode,
    )
    if args.model == "flux":  # the guided Flux.1 loop with ASAG off is the plain distilled model
        return AdversarialSinkhornGuidance(guidance_scale=cfg, asag_scale=0.0, layers=layers), asag
    return ClassifierFreeGuidance(guidance_scale=cfg), asag


def smoke_test(args) -> int:
    import asag_tiny

    setup = asag_tiny.build(args.model)
    cfg = args.cfg if args.cfg is not None else (1.0 if args.model == "flux" else 5.0)
    plain_guider, asag_guider = _guiders(args, _layers(args, setup.layers), cfg)
    plain = asag_tiny.run(setup, plain_guider, seed=args.seed)
    guided = asag_tiny.run(setup, asag_guider, seed=args.seed)
    diff = (guided.float() - plain.float()).abs().max().item()
    if not (math.isfinite(diff) and torch.isfinite(guided).all() and diff > 0):
        print(f"smoke-test {args.model}: FAILED, asag branch differs from cfg by {diff:.3g} (expected finite and > 0)")
        return 1
    print(f"smoke-test {args.model}: ok, asag branch differs from cfg by {diff:.3g}")
    return 0


def _cached(repo: str) -> bool:
    if os.path.isdir(repo):
        return True
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in ("model_index.json", "modular_model_index.json"))


def _frames(output):
    """PIL images from a pipeline's images/videos output (first sample)."""
    import numpy as np
    from PIL import Image

    x = output[0] if isinstance(output, (list, tuple)) else output
    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Image.Image):
        return list(x)
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    x = x[0] if x.ndim == 5 else x
    if x.ndim == 3:
        x = x[None]
    if x.shape[-1] not in (1, 3, 4):  # [F, C, H, W]
        x = x.transpose(0, 2, 3, 1)
    x = x if x.max() > 1.5 else x * 255
    return [Image.fromarray(f.clip(0, 255).astype("uint8")) for f in x]


def _side_by_side(left, right):
    from PIL import Image

    out = []
    for a, b in zip(left, right):
        canvas = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
        canvas.paste(a.convert("RGB"), (0, 0))
        canvas.paste(b.convert("RGB"), (a.width, 0))
        out.append(canvas)
    return out


def generate(args) -> int:
    import importlib

    repo, module, blocks_cls, kind, default_cfg = REPOS[args.model]
    repo = args.repo or repo
    if not _cached(repo):
        print(
            f"{repo!r} is not in the local Hugging Face cache and this example never downloads.\n"
            f"Fetch the weights once, then run it again:\n\n    hf download {repo}\n\n"
            f"(or: huggingface-cli download {repo}; gated repos need `hf auth login` first), "
            f"or try the script without weights:  python {sys.argv[0]} --model {args.model} --smoke-test",
            file=sys.stderr,
        )
        return 2
    blocks = getattr(importlib.import_module(f"diffusers.modular_pipelines.{module}"), blocks_cls)()
    if args.model == "flux":
        from asag_kernels.diffusers.flux import with_guided_denoiser

        blocks = with_guided_denoiser(blocks)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = blocks.init_pipeline(repo)
    pipe.load_components(torch_dtype=dtype)
    pipe.to(args.device)
    cfg = default_cfg if args.cfg is None else args.cfg
    layers = _layers(args, None)  # None: the guider picks the family default (families.layer_patterns)
    plain_guider, asag_guider = _guiders(args, layers, cfg)
    call = dict(prompt=args.prompt, num_inference_steps=args.steps, output=kind)
    call.update({k: v for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.num_frames)) if v})
    results = []
    for guider in (plain_guider, asag_guider):
        slots = {"guider": guider, **({"guider_2": guider} if "guider_2" in pipe.component_names else {})}
        pipe.update_components(**slots)
        start = time.perf_counter()
        results.append(_frames(pipe(**call, generator=torch.Generator(args.device).manual_seed(args.seed))))
        print(f"{type(guider).__name__}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    frames = _side_by_side(*results)
    out = args.out or f"asag_{args.model}.{'gif' if kind == 'videos' else 'png'}"
    if len(frames) > 1:
        frames[0].save(out, save_all=True, append_images=frames[1:], duration=80, loop=0)
    else:
        frames[0].save(out)
    print(f"wrote {out}: left CFG {cfg}, right CFG {cfg} + ASAG {args.asag_scale} at layers "
          f"{layers if layers is not None else '(family default)'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    if args.smoke_test:
        return max(smoke_test(argparse.Namespace(**{**vars(args), "model": m})) for m in args.model)
    if len(args.model) != 1:
        print(f"--model takes one family without --smoke-test, got {args.model}", file=sys.stderr)
        return 2
    args.model = args.model[0]
    return generate(args)


if __name__ == "__main__":
    sys.exit(main())

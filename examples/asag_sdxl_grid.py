"""SDXL (or SD 1.5) with no perturbation guidance, PAG and ASAG, side by side in one image.

Same prompt, seed and classifier-free guidance scale for every column; only the perturbed
prediction changes: none, PAG (identity self-attention) or ASAG (adversarial Sinkhorn attention).
Weights are read from the local Hugging Face cache only; nothing is downloaded. To get them first:

    hf download stabilityai/stable-diffusion-xl-base-1.0      # or: huggingface-cli download ...

Examples:

    python examples/asag_sdxl_grid.py --prompt "a corgi wearing a tiny wizard hat"
    python examples/asag_sdxl_grid.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --size 512
    python examples/asag_sdxl_grid.py --smoke-test --out /tmp/grid.png   # tiny random model, CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local path of an SDXL or SD 1.5 checkpoint")
    p.add_argument("--prompt", default="a photo of a red fox sitting in a snowy forest, detailed fur")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--cfg", type=float, default=1.0,
                   help="classifier-free guidance scale for every column (1.0: off, as in the PAG/ASAG papers' "
                        "guidance-only comparisons)")
    p.add_argument("--pag-scale", type=float, default=3.0)
    p.add_argument("--asag-scale", type=float, default=1.5)
    p.add_argument("--num-iters", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--layers", nargs="+", default=["mid"], help="PAG layer syntax, e.g. mid, down_blocks.2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="asag_grid.png")
    p.add_argument("--smoke-test", action="store_true",
                   help="use a tiny randomly initialised SD pipeline instead of real weights (checks the script)")
    return p.parse_args(argv)


def load_pipeline(args):
    from diffusers import AutoPipelineForText2Image

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(
            args.model, enable_pag=True, pag_applied_layers=args.layers, torch_dtype=dtype, local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        print(
            f"Could not load {args.model!r} from the local Hugging Face cache ({type(exc).__name__}: {exc}).\n"
            f"This example never downloads. Fetch the weights once, then run it again:\n"
            f"    hf download {args.model}\n"
            f"(older huggingface_hub: huggingface-cli download {args.model}; gated models need `hf auth login` "
            f"first), or pass --model /path/to/a/local/checkpoint.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return pipe.to(args.device), {}


def tiny_pipeline(args):
    """A randomly initialised SD 1.5-shaped PAG pipeline, small enough for a CPU smoke test."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPAGPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipe = StableDiffusionPAGPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, pag_applied_layers=args.layers,
    )
    g = torch.Generator("cpu").manual_seed(1)
    prompt_inputs = {"prompt_embeds": torch.randn(1, 6, 16, generator=g),
                     "negative_prompt_embeds": torch.randn(1, 6, 16, generator=g)}
    args.size, args.steps = 32, 2
    return pipe, prompt_inputs


def save_grid(images, labels, path):
    from PIL import Image, ImageDraw

    w, h = images[0].size
    band = max(16, h // 16)
    grid = Image.new("RGB", (w * len(images), h + band), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image, (i * w, band))
        draw.text((i * w + 4, 2), label, fill="black")
    grid.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from asag_kernels.diffusers import enable_asag
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 2

    pipe, prompt_inputs = tiny_pipeline(args) if args.smoke_test else load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    if not prompt_inputs:
        prompt_inputs = {"prompt": args.prompt}
    size = {"height": args.size, "width": args.size} if args.size else {}

    def generate(**guidance):
        generator = torch.Generator("cpu").manual_seed(args.seed)
        start = time.perf_counter()
        image = pipe(**prompt_inputs, **size, num_inference_steps=args.steps, guidance_scale=args.cfg,
                     generator=generator, **guidance).images[0]
        return image, time.perf_counter() - start

    cfg = f"CFG {args.cfg:g}" if args.cfg > 1 else "no CFG"
    columns = [(f"no guidance ({cfg})", {"pag_scale": 0.0}), (f"PAG {args.pag_scale:g} ({cfg})", {"pag_scale": args.pag_scale})]
    results = []
    for label, guidance in columns:
        image, seconds = generate(**guidance)
        results.append((label, image, seconds))
    asag = enable_asag(pipe, layers=args.layers, asag_scale=args.asag_scale, num_iters=args.num_iters, epsilon=args.epsilon)
    image, seconds = generate(**asag)
    results.append((f"ASAG {args.asag_scale:g}, T={args.num_iters}, eps={args.epsilon:g} ({cfg})", image, seconds))

    for label, _, seconds in results:
        print(f"{label:45s} {seconds:7.2f} s")
    save_grid([image for _, image, _ in results], [label for label, _, _ in results], args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

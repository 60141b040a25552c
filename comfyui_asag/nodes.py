"""The ComfyUI nodes: MODEL in, a clone with ASAG guidance out.

Each node validates its inputs against the model first (a bad input raises before anything is
cloned or patched), then clones the ModelPatcher and adds a post-CFG function, as ComfyUI's own
PAG node does: at steps inside the sigma window it reruns the conditional batch with the chosen
self-attention layers patched to adversarial Sinkhorn attention (the model_options copy it passes
to ``calc_cond_batch`` carries the patches, so the cond/uncond passes are untouched) and adds
``scale * (cond - cond_asag)`` to the CFG result.
"""

from __future__ import annotations

import comfy.model_patcher
import comfy.samplers

import asag_kernels
from asag_kernels._validate import (
    BACKEND_CHOICES,
    check_backend,
    check_epsilon,
    check_finite_float,
    check_fraction,
    check_num_iters,
)
from asag_kernels.joint import JOINT_MODES, check_joint_mode

from .attention import SinkhornSettings, dit_block_patch, unet_attn1_patch
from .blocks import UNET_PARTS, UNetLayout, parse_layer_list, parse_unet_block_list, unet_single_block
from .guidance import RESCALE_MODES, SigmaWindow, combine

DEFAULT_SCALE = 1.5
DEFAULT_ITERS = 2
DEFAULT_EPSILON = 1.0


def _check_model(model):
    if not isinstance(model, comfy.model_patcher.ModelPatcher):
        raise TypeError(f"model must be a ComfyUI MODEL (comfy.model_patcher.ModelPatcher), got {type(model).__name__}")
    return model


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _settings(sinkhorn_iters, epsilon, backend, joint_mode="image", legacy_output_scale=False) -> SinkhornSettings:
    backend = check_backend(backend)
    if backend != "auto" and backend not in asag_kernels.available_backends():
        status = asag_kernels.backend_status()
        raise ValueError(
            f"backend {backend!r} is not usable here ({status.get(backend)}); usable: "
            f"{['auto'] + asag_kernels.available_backends()}"
        )
    if not isinstance(legacy_output_scale, bool):
        raise TypeError(f"legacy_output_scale must be a bool, got {type(legacy_output_scale).__name__}")
    return SinkhornSettings(
        num_iters=check_num_iters(sinkhorn_iters, "sinkhorn_iters"),
        epsilon=check_epsilon(epsilon),
        backend=backend,
        joint_mode=check_joint_mode(joint_mode),
        legacy_output_scale=legacy_output_scale,
    )


def _guided_clone(model, perturb, scale, sigma_start, sigma_end, rescale, rescale_mode):
    """Validate the guidance inputs, then ``model.clone()`` with the ASAG post-CFG function.

    ``perturb(model_options) -> model_options``: installs the attention patches on a copy.
    """
    scale = check_finite_float(scale, "scale", minimum=0.0)
    window = SigmaWindow(check_finite_float(sigma_start, "sigma_start"), check_finite_float(sigma_end, "sigma_end"))
    rescale = check_fraction(rescale, "rescale")
    rescale_mode = _check_choice(rescale_mode, "rescale_mode", RESCALE_MODES)

    def asag_post_cfg(args):
        cfg_result = args["denoised"]
        sigma = args["sigma"]
        if scale == 0 or sigma not in window:
            return cfg_result
        model_options = perturb(args["model_options"].copy())
        (asag_pred,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], sigma, model_options)
        return combine(cfg_result, args["cond_denoised"], args.get("uncond_denoised"), asag_pred, scale, rescale, rescale_mode)

    m = model.clone()
    # snf needs the unconditional prediction even at cfg 1.
    m.set_model_sampler_post_cfg_function(asag_post_cfg, disable_cfg1_optimization=rescale_mode == "snf")
    return m


_SCALE = ("FLOAT", {"default": DEFAULT_SCALE, "min": 0.0, "max": 100.0, "step": 0.01, "round": 0.01,
                    "tooltip": "ASAG strength s: adds s * (cond - cond_asag) to the CFG result."})
_ITERS = ("INT", {"default": DEFAULT_ITERS, "min": 0, "max": 100,
                  "tooltip": "Sinkhorn iterations (row + column updates) in the perturbed layers."})
_SIGMA_START = ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10000.0, "step": 0.01, "round": False,
                          "tooltip": "ASAG runs while sigma_end < sigma <= sigma_start; -1 = no upper bound."})
_SIGMA_END = ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10000.0, "step": 0.01, "round": False,
                        "tooltip": "-1 = no lower bound."})
_RESCALE = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01})
_RESCALE_MODE = (list(RESCALE_MODES), {"default": "full"})
_EPSILON = ("FLOAT", {"default": DEFAULT_EPSILON, "min": 0.001, "max": 100.0, "step": 0.001, "round": False,
                      "tooltip": "Entropic regularisation of the Sinkhorn problem (on the scaled logits)."})
_BACKEND = (list(BACKEND_CHOICES), {"default": "auto", "tooltip": "asag_kernels backend; auto picks the fastest usable one."})


def _required(**layers):
    """The node inputs every ASAG node shares, with the block-choice inputs ``layers`` after the
    Sinkhorn settings (the order ComfyUI shows them in)."""
    return {"model": ("MODEL",), "scale": _SCALE, "sinkhorn_iters": _ITERS, **layers, "sigma_start": _SIGMA_START,
            "sigma_end": _SIGMA_END, "rescale": _RESCALE, "rescale_mode": _RESCALE_MODE, "epsilon": _EPSILON,
            "backend": _BACKEND}


class AdversarialSinkhornAttentionGuidance:
    """ASAG on SD 1.5/SD 2/SDXL UNets (block choice as in ComfyUI's PAG node and the sd-perturbed-attention pack)."""

    DESCRIPTION = (
        "Adversarial Sinkhorn Attention Guidance: guides away from a prediction whose self-attention in the chosen "
        "UNet blocks is replaced by adversarial-cost Sinkhorn attention (asag_kernels, log domain, bounded memory)."
    )
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _required(
                unet_block=(list(UNET_PARTS), {"default": "middle"}),
                unet_block_id=("INT", {"default": 0, "min": 0, "max": 100}),
            ),
            "optional": {
                "unet_block_list": ("STRING", {"default": "", "tooltip": "e.g. m0,u0.4,d2.2-9 (d = input, m = middle, "
                                               "u = output; .N = transformer index); replaces unet_block/unet_block_id."}),
            },
        }

    def patch(self, model, scale=DEFAULT_SCALE, sinkhorn_iters=DEFAULT_ITERS, unet_block="middle", unet_block_id=0,
              sigma_start=-1.0, sigma_end=-1.0, rescale=0.0, rescale_mode="full", epsilon=DEFAULT_EPSILON,
              backend="auto", unet_block_list="", legacy_output_scale=False):
        _check_model(model)
        settings = _settings(sinkhorn_iters, epsilon, backend, legacy_output_scale=legacy_output_scale)
        diffusion_model = model.get_model_object("diffusion_model")
        layout = UNetLayout(name for name, _ in diffusion_model.named_modules())
        if not isinstance(unet_block_list, str):
            raise TypeError(f"unet_block_list must be a string such as 'm0,u0.4', got {type(unet_block_list).__name__}")
        if unet_block_list.strip():
            blocks = parse_unet_block_list(unet_block_list, layout)
        else:
            blocks = unet_single_block(unet_block, unet_block_id, layout)
        attn = unet_attn1_patch(settings)

        def perturb(model_options):
            for block in blocks:
                model_options = comfy.model_patcher.set_model_options_patch_replace(model_options, attn, "attn1", *block)
            return model_options

        return (_guided_clone(model, perturb, scale, sigma_start, sigma_end, rescale, rescale_mode),)


class AdversarialSinkhornAttentionGuidanceAdvanced(AdversarialSinkhornAttentionGuidance):
    """The UNet node plus ``legacy_output_scale``."""

    DESCRIPTION = AdversarialSinkhornAttentionGuidance.DESCRIPTION + (
        " legacy_output_scale multiplies the perturbed attention output by 1/N (N = tokens of the layer), the scale "
        "of the earlier exponential-domain ASAG node, whose output rows summed to 1/N."
    )

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        types["required"]["legacy_output_scale"] = ("BOOLEAN", {"default": False})
        return types


# DiT families: block kinds ComfyUI's "dit" replace patches use, and how to split a block's tokens.
def _flux_double(args):
    n_text = args["txt"].shape[1]
    return n_text, n_text + args["img"].shape[1]


def _flux_single(args):  # "img" is already the concatenation text + image
    return args["transformer_options"]["img_slice"][0], args["img"].shape[1]


def _sd3_joint(args):  # ComfyUI's MMDiT puts the context (text) tokens first
    n_text = 0 if args.get("txt") is None else args["txt"].shape[1]
    return n_text, n_text + args["img"].shape[1]


def _image_only(args):  # Wan: self-attention over the video tokens; text enters by cross-attention
    return 0, args["img"].shape[1]


def _dit_family(diffusion_model):
    """``{"double_block": (count, token_split), "single_block": (count, token_split)}`` for the model."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.ldm.wan.model import WanModel

    if isinstance(diffusion_model, Flux):
        return {"double_block": (len(diffusion_model.double_blocks), _flux_double),
                "single_block": (len(diffusion_model.single_blocks), _flux_single)}
    if isinstance(diffusion_model, MMDiT):
        return {"double_block": (len(diffusion_model.joint_blocks), _sd3_joint), "single_block": (0, None)}
    if isinstance(diffusion_model, WanModel):
        return {"double_block": (len(diffusion_model.blocks), _image_only), "single_block": (0, None)}
    raise ValueError(
        f"model: the ASAG DiT node supports SD3/SD3.5 (MMDiT), Flux and Wan diffusion models, got "
        f"{type(diffusion_model).__name__}; for SD 1.5/SDXL UNets use the ASAG node"
    )


class AdversarialSinkhornAttentionGuidanceDiT:
    """ASAG on DiTs, blocks chosen by index like ComfyUI's SkipLayerGuidanceDiT node."""

    DESCRIPTION = (
        "Adversarial Sinkhorn Attention Guidance for SD3/SD3.5, Flux and Wan: the self-attention of the chosen blocks "
        "(double_layers: Flux double blocks, SD3 joint blocks, Wan blocks; single_layers: Flux single blocks) is "
        "replaced by adversarial Sinkhorn attention in the guidance pass. joint_mode 'image' perturbs only the "
        "image-image part of joint text+image attention (as diffusers' PAG), 'joint' the whole sequence."
    )
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/dit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _required(
                double_layers=("STRING", {"default": "7, 8, 9", "tooltip": "Block indices, e.g. '7, 8, 9' or '7-9'."}),
                single_layers=("STRING", {"default": "", "tooltip": "Flux single-stream block indices."}),
                joint_mode=(list(JOINT_MODES), {"default": "image"}),
            ),
        }

    def patch(self, model, scale=DEFAULT_SCALE, sinkhorn_iters=DEFAULT_ITERS, double_layers="7, 8, 9",
              single_layers="", joint_mode="image", sigma_start=-1.0, sigma_end=-1.0, rescale=0.0,
              rescale_mode="full", epsilon=DEFAULT_EPSILON, backend="auto"):
        _check_model(model)
        settings = _settings(sinkhorn_iters, epsilon, backend, joint_mode=joint_mode)
        family = _dit_family(model.get_model_object("diffusion_model"))
        targets = []
        for kind, text, name in (("double_block", double_layers, "double_layers"), ("single_block", single_layers, "single_layers")):
            count, split = family[kind]
            targets += [(kind, i, split) for i in parse_layer_list(text, count, name)]
        if not targets:
            raise ValueError("double_layers and single_layers are both empty; name at least one block to perturb")

        def perturb(model_options):
            for kind, i, split in targets:
                previous = model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get((kind, i))
                patch = dit_block_patch(settings, split, previous)
                model_options = comfy.model_patcher.set_model_options_patch_replace(model_options, patch, "dit", kind, i)
            return model_options

        return (_guided_clone(model, perturb, scale, sigma_start, sigma_end, rescale, rescale_mode),)


NODE_CLASS_MAPPINGS = {
    "AdversarialSinkhornAttentionGuidance": AdversarialSinkhornAttentionGuidance,
    "AdversarialSinkhornAttentionGuidanceAdvanced": AdversarialSinkhornAttentionGuidanceAdvanced,
    "AdversarialSinkhornAttentionGuidanceDiT": AdversarialSinkhornAttentionGuidanceDiT,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AdversarialSinkhornAttentionGuidance": "Adversarial Sinkhorn Attention Guidance (ASAG)",
    "AdversarialSinkhornAttentionGuidanceAdvanced": "Adversarial Sinkhorn Attention Guidance (ASAG, advanced)",
    "AdversarialSinkhornAttentionGuidanceDiT": "Adversarial Sinkhorn Attention Guidance (ASAG, DiT)",
}

"""The ComfyUI nodes: MODEL in, a clone with ASAG guidance out.

Every node is a ``comfy_api.latest`` ``io.ComfyNode`` (``define_schema`` / ``execute``), registered
through the :class:`ASAGExtension` that :func:`comfy_entrypoint` returns. Each node validates its inputs against the model first (a bad input raises before anything is
cloned or patched), then clones the ModelPatcher and adds a post-CFG function, as ComfyUI's own
PAG node does: at steps inside the sigma window it reruns the conditional batch with the chosen
self-attention layers patched to adversarial Sinkhorn attention (the model_options copy it passes
to ``calc_cond_batch`` carries the patches, so the cond/uncond passes are untouched) and adds
``scale * (cond - cond_asag)`` to the CFG result.
"""

from __future__ import annotations

import comfy.model_patcher
import comfy.samplers
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

import asag_kernels
from asag_kernels._validate import BACKEND_CHOICES, check_backend, check_finite_float, check_fraction, check_num_iters
from asag_kernels.joint import JOINT_MODES
from asag_kernels.settings import (
    DEFAULT_ASAG_SCALE,
    DEFAULT_EPSILON,
    DEFAULT_JOINT_MODE,
    DEFAULT_NUM_ITERS,
    SinkhornSettings,
)

from .attention import dit_block_patch, unet_attn1_patch
from .blocks import (
    UNET_PARTS,
    UNetLayout,
    check_layer_list_syntax,
    check_unet_block_list_syntax,
    parse_layer_list,
    parse_unet_block_list,
    unet_single_block,
)
from .families import DEFAULT_KEYWORD, dit_family
from .guidance import RESCALE_MODES, SigmaWindow, combine

DEFAULT_DOUBLE_LAYERS = "7, 8, 9"  # ComfyUI's SkipLayerGuidanceDiT default


def _check_model(model):
    if not isinstance(model, comfy.model_patcher.ModelPatcher):
        raise TypeError(f"model must be a ComfyUI MODEL (comfy.model_patcher.ModelPatcher), got {type(model).__name__}")
    return model


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _settings(sinkhorn_iters, epsilon, backend, joint_mode=DEFAULT_JOINT_MODE) -> SinkhornSettings:
    """The core package's validated settings from the node's inputs (checked here first under the
    node's own input names, so a message names ``sinkhorn_iters``, not the op's ``num_iters``)."""
    backend = check_backend(backend)
    if backend != "auto" and backend not in asag_kernels.available_backends():
        status = asag_kernels.backend_status()
        raise ValueError(
            f"backend {backend!r} is not usable here ({status.get(backend)}); usable: "
            f"{['auto'] + asag_kernels.available_backends()}"
        )
    return SinkhornSettings(num_iters=check_num_iters(sinkhorn_iters, "sinkhorn_iters"), epsilon=epsilon,
                            backend=backend, joint_mode=joint_mode)


def _check_legacy_output_scale(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"legacy_output_scale must be a bool, got {type(value).__name__}")
    return value


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


def _common_inputs(*layers: io.Input) -> list[io.Input]:
    """The inputs every ASAG node shares, with the block-choice inputs ``layers`` after the Sinkhorn
    settings (the order ComfyUI shows them in, and the order saved workflows' widget values follow)."""
    return [
        io.Model.Input("model", tooltip="The diffusion model to guide; a patched clone is returned, the input is left as it is."),
        io.Float.Input("scale", default=DEFAULT_ASAG_SCALE, min=0.0, max=100.0, step=0.01, round=0.01,
                       tooltip="ASAG strength s: adds s * (cond - cond_asag) to the CFG result; 0 turns ASAG off."),
        io.Int.Input("sinkhorn_iters", default=DEFAULT_NUM_ITERS, min=0, max=100,
                     tooltip="Sinkhorn iterations (one row and one column update each) in the perturbed layers."),
        *layers,
        io.Float.Input("sigma_start", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=False,
                       tooltip="ASAG runs at steps with sigma_end < sigma <= sigma_start; -1 = no upper bound."),
        io.Float.Input("sigma_end", default=-1.0, min=-1.0, max=10000.0, step=0.01, round=False,
                       tooltip="Lower end of the sigma window (exclusive); -1 = no lower bound."),
        io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Rescale the ASAG term towards the standard deviation of the conditional prediction "
                               "(0 = off, 1 = full); ignored by rescale_mode 'snf'."),
        io.Combo.Input("rescale_mode", options=list(RESCALE_MODES), default="full",
                       tooltip="full: std of cfg_result + term; partial: std of cond + term; snf: saliency-adaptive "
                               "noise fusion of the CFG and ASAG terms."),
        io.Float.Input("epsilon", default=DEFAULT_EPSILON, min=0.001, max=100.0, step=0.001, round=False,
                       tooltip="Entropic regularisation of the Sinkhorn problem (on the scaled logits)."),
        io.Combo.Input("backend", options=list(BACKEND_CHOICES), default="auto",
                       tooltip="asag_kernels backend; auto picks the fastest one usable on the model's device."),
    ]


def _unet_inputs(advanced: bool) -> list[io.Input]:
    layers = (
        io.Combo.Input("unet_block", options=list(UNET_PARTS), default="middle",
                       tooltip="UNet part holding the perturbed self-attention (as ComfyUI's PAG node)."),
        io.Int.Input("unet_block_id", default=0, min=0, max=100,
                     tooltip="Index of the block in that part (ComfyUI's input_blocks/output_blocks index; middle = 0)."),
    )
    inputs = _common_inputs(*layers)
    if advanced:
        inputs.append(io.Boolean.Input(
            "legacy_output_scale", default=False,
            tooltip="Multiply the perturbed attention output by 1/N (N = tokens of the layer), the scale of the "
                    "earlier exponential-domain ASAG node."))
    inputs.append(io.String.Input(
        "unet_block_list", default="", optional=True,
        tooltip="e.g. m0,u0.4,d2.2-9 (d = input, m = middle, u = output; .N = transformer index; ranges allowed); "
                "when not blank it replaces unet_block/unet_block_id."))
    return inputs


def _patch_unet(model, scale, sinkhorn_iters, unet_block, unet_block_id, sigma_start, sigma_end, rescale,
                rescale_mode, epsilon, backend, unet_block_list, legacy_output_scale):
    _check_model(model)
    settings = _settings(sinkhorn_iters, epsilon, backend)
    legacy_output_scale = _check_legacy_output_scale(legacy_output_scale)
    diffusion_model = model.get_model_object("diffusion_model")
    layout = UNetLayout(name for name, _ in diffusion_model.named_modules())
    if not isinstance(unet_block_list, str):
        raise TypeError(f"unet_block_list must be a string such as 'm0,u0.4', got {type(unet_block_list).__name__}")
    if unet_block_list.strip():
        blocks = parse_unet_block_list(unet_block_list, layout)
    else:
        blocks = unet_single_block(unet_block, unet_block_id, layout)
    attn = unet_attn1_patch(settings, legacy_output_scale)

    def perturb(model_options):
        for block in blocks:
            model_options = comfy.model_patcher.set_model_options_patch_replace(model_options, attn, "attn1", *block)
        return model_options

    return io.NodeOutput(_guided_clone(model, perturb, scale, sigma_start, sigma_end, rescale, rescale_mode))


_UNET_DESCRIPTION = (
    "Adversarial Sinkhorn Attention Guidance: guides away from a prediction whose self-attention in the chosen "
    "UNet blocks is replaced by adversarial-cost Sinkhorn attention (asag_kernels, log domain, bounded memory)."
)


class _UNetNode(io.ComfyNode):
    """What the two UNet nodes share: prompt-time validation and ``execute``. Each concrete node
    defines its own schema (ComfyUI caches schema facts on the class, so one concrete node must not
    inherit from another; this base is never registered and never asked for a schema)."""

    @classmethod
    def validate_inputs(cls, unet_block_list="") -> bool | str:
        """Prompt-time check of the block list's syntax (the model is not known yet; the blocks are
        checked against it when the node runs)."""
        if unet_block_list is None:  # a linked input, not known before execution
            return True
        try:
            check_unet_block_list_syntax(unet_block_list)
        except (TypeError, ValueError) as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, scale=DEFAULT_ASAG_SCALE, sinkhorn_iters=DEFAULT_NUM_ITERS, unet_block="middle", unet_block_id=0,
                sigma_start=-1.0, sigma_end=-1.0, rescale=0.0, rescale_mode="full", epsilon=DEFAULT_EPSILON,
                backend="auto", legacy_output_scale=False, unet_block_list="") -> io.NodeOutput:
        return _patch_unet(model, scale, sinkhorn_iters, unet_block, unet_block_id, sigma_start, sigma_end, rescale,
                           rescale_mode, epsilon, backend, unet_block_list, legacy_output_scale)


def _unet_schema(node_id: str, display_name: str, description: str, advanced: bool) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=display_name, category="model_patches/unet",
                     description=description, inputs=_unet_inputs(advanced), outputs=[io.Model.Output()])


class AdversarialSinkhornAttentionGuidance(_UNetNode):
    """ASAG on SD 1.5/SD 2/SDXL UNets (block choice as in ComfyUI's PAG node and the sd-perturbed-attention pack)."""

    @classmethod
    def define_schema(cls):
        return _unet_schema("AdversarialSinkhornAttentionGuidance", "Adversarial Sinkhorn Attention Guidance (ASAG)",
                            _UNET_DESCRIPTION, advanced=False)


class AdversarialSinkhornAttentionGuidanceAdvanced(_UNetNode):
    """The UNet node plus ``legacy_output_scale``."""

    @classmethod
    def define_schema(cls):
        return _unet_schema(
            "AdversarialSinkhornAttentionGuidanceAdvanced", "Adversarial Sinkhorn Attention Guidance (ASAG, advanced)",
            _UNET_DESCRIPTION + (
                " legacy_output_scale multiplies the perturbed attention output by 1/N (N = tokens of the layer), "
                "the scale of the earlier exponential-domain ASAG node, whose output rows summed to 1/N."),
            advanced=True)


def _layer_choice(text, family, diffusion_model, kind, name):
    """``[(kind, index, token_split)]`` for one layer input; the word ``default`` means the family's default."""
    count, split = family.blocks(diffusion_model, kind)
    if isinstance(text, str) and text.strip() == DEFAULT_KEYWORD:
        text = family.default_double if kind == "double_block" else family.default_single
    return [(kind, i, split) for i in parse_layer_list(text, count, name)]


class AdversarialSinkhornAttentionGuidanceDiT(io.ComfyNode):
    """ASAG on DiTs, blocks chosen by index like ComfyUI's SkipLayerGuidanceDiT node."""

    @classmethod
    def define_schema(cls):
        layer_help = (" Block indices such as '7, 8, 9' or '7-9'; 'default' = this model family's default layers "
                      "(see docs/comfyui.md); blank = none.")
        return io.Schema(
            node_id="AdversarialSinkhornAttentionGuidanceDiT",
            display_name="Adversarial Sinkhorn Attention Guidance (ASAG, DiT)",
            category="model_patches/dit",
            description=(
                "Adversarial Sinkhorn Attention Guidance for DiTs (SD3/SD3.5, Flux, Wan and the other families in "
                "docs/comfyui.md): the self-attention of the chosen blocks is replaced by adversarial Sinkhorn "
                "attention in the guidance pass. joint_mode 'image' perturbs only the image-image part of joint "
                "text+image attention (as diffusers' PAG), 'joint' the whole sequence."),
            inputs=_common_inputs(
                io.String.Input("double_layers", default=DEFAULT_DOUBLE_LAYERS,
                                tooltip="Double-stream / joint blocks to perturb (Flux double blocks, SD3 joint "
                                        "blocks, Wan blocks)." + layer_help),
                io.String.Input("single_layers", default="",
                                tooltip="Single-stream blocks to perturb (Flux-style models only)." + layer_help),
                io.Combo.Input("joint_mode", options=list(JOINT_MODES), default=DEFAULT_JOINT_MODE,
                               tooltip="image: perturb only image-image attention of joint text+image attention; "
                                       "joint: Sinkhorn attention over the whole sequence."),
            ),
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, double_layers=DEFAULT_DOUBLE_LAYERS, single_layers="") -> bool | str:
        """Prompt-time check of the layer lists' syntax (block counts are checked against the model when the node runs)."""
        named = False
        for text, name in ((double_layers, "double_layers"), (single_layers, "single_layers")):
            if text is None:  # a linked input, not known before execution
                return True
            if isinstance(text, str) and text.strip() == DEFAULT_KEYWORD:
                named = True
                continue
            try:
                named = check_layer_list_syntax(text, name) or named
            except (TypeError, ValueError) as exc:
                return str(exc)
        return True if named else "double_layers and single_layers are both empty; name at least one block to perturb"

    @classmethod
    def execute(cls, model, scale=DEFAULT_ASAG_SCALE, sinkhorn_iters=DEFAULT_NUM_ITERS, double_layers=DEFAULT_DOUBLE_LAYERS,
                single_layers="", joint_mode=DEFAULT_JOINT_MODE, sigma_start=-1.0, sigma_end=-1.0, rescale=0.0,
                rescale_mode="full", epsilon=DEFAULT_EPSILON, backend="auto") -> io.NodeOutput:
        _check_model(model)
        settings = _settings(sinkhorn_iters, epsilon, backend, joint_mode=joint_mode)
        diffusion_model = model.get_model_object("diffusion_model")
        family = dit_family(diffusion_model)
        targets = (_layer_choice(double_layers, family, diffusion_model, "double_block", "double_layers")
                   + _layer_choice(single_layers, family, diffusion_model, "single_block", "single_layers"))
        if not targets:
            raise ValueError("double_layers and single_layers are both empty; name at least one block to perturb")

        def perturb(model_options):
            for kind, i, split in targets:
                previous = model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get((kind, i))
                patch = dit_block_patch(settings, split, previous, where=f"{family.title} {kind} {i}")
                model_options = comfy.model_patcher.set_model_options_patch_replace(model_options, patch, "dit", kind, i)
            return model_options

        return io.NodeOutput(_guided_clone(model, perturb, scale, sigma_start, sigma_end, rescale, rescale_mode))


NODES: tuple[type[io.ComfyNode], ...] = (
    AdversarialSinkhornAttentionGuidance,
    AdversarialSinkhornAttentionGuidanceAdvanced,
    AdversarialSinkhornAttentionGuidanceDiT,
)


class ASAGExtension(ComfyExtension):
    """What ComfyUI's custom-node loader registers from this pack."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ASAGExtension:
    """ComfyUI's entry point for ``comfy_api`` node packs (called by ``nodes.load_custom_node``)."""
    return ASAGExtension()

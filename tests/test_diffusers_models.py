"""The ASAG guider on real diffusers denoisers (tiny random SDXL UNet, SD3 MMDiT, Flux double and
single stream), driven the way diffusers' modular denoise loops drive a guider.

For each: the perturbed attention call of a chosen module equals SPEC §10 evaluated in float64 on
that module's own projected q, k, v (both joint modes, the image-token range taken from the model's
token order); the other passes equal the plain model exactly; hooks are gone afterwards; the guided
prediction differs from CFG alone; CFG on and off.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402
from diffusers.hooks import LayerSkipConfig  # noqa: E402

import asag_kernels.diffusers.intercept as intercept  # noqa: E402
from asag_kernels._spec import out_tolerance  # noqa: E402
from asag_kernels.diffusers import AdversarialSinkhornGuidance, list_attention_layers  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_joint import reference_joint  # noqa: E402

TEXT_TOKENS = 6


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Tiny models: (model, {input name: (cond, uncond) or shared tensor}, forward, image tokens, order)


def _unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    g = _g(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    data = {"encoder_hidden_states": (torch.randn(1, TEXT_TOKENS, 16, generator=g), torch.randn(1, TEXT_TOKENS, 16, generator=g))}

    def forward(batch):
        return model(latents, torch.tensor(500), encoder_hidden_states=batch.encoder_hidden_states).sample

    return model, data, forward, None, None


def _sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()
    g = _g(2)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    data = {
        "encoder_hidden_states": (torch.randn(1, TEXT_TOKENS, 16, generator=g), torch.randn(1, TEXT_TOKENS, 16, generator=g)),
        "pooled_projections": (torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)),
    }

    def forward(batch):
        return model(hidden_states=latents, encoder_hidden_states=batch.encoder_hidden_states,
                     pooled_projections=batch.pooled_projections, timestep=torch.tensor([500.0]), return_dict=False)[0]

    return model, data, forward, 16, "image_first"


def _flux(text_tokens=TEXT_TOKENS, grid=(3, 4)):
    """`text_tokens` and a `grid` of image tokens (tests/test_diffusers_context_parallel.py takes
    counts that divide over its ranks)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()
    g = _g(3)
    image = grid[0] * grid[1]
    latents = torch.randn(1, image, 4, generator=g)  # packed latents: one token per grid cell
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(grid[0])), torch.arange(float(grid[1])),
                                         indexing="ij"), -1).reshape(image, 3)
    txt_ids = torch.zeros(text_tokens, 3)
    data = {
        "encoder_hidden_states": (torch.randn(1, text_tokens, 16, generator=g), torch.randn(1, text_tokens, 16, generator=g)),
        "pooled_projections": (torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)),
    }

    def forward(batch):
        return model(hidden_states=latents, encoder_hidden_states=batch.encoder_hidden_states,
                     pooled_projections=batch.pooled_projections, timestep=torch.tensor([0.5]), img_ids=img_ids,
                     txt_ids=txt_ids, return_dict=False)[0]

    return model, data, forward, image, "text_first"


def _run(guider, model, data, forward, step=0, steps=2):
    """One denoising step as diffusers' modular denoise loops run it: {prediction name: output}, guided output."""
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(500))
    preds = {}
    batches = guider.prepare_inputs(data)
    for batch in batches:
        guider.prepare_models(model)
        batch.noise_pred = forward(batch)
        guider.cleanup_models(model)
        preds[batch.__guidance_identifier__] = batch.noise_pred
    return preds, guider(batches).pred


def _no_hooks(model) -> bool:
    return all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in model.modules())


@pytest.fixture
def spy(monkeypatch):
    """Every perturbed SDPA call: (module name, q, k, v, scale, text tokens, order, mode, result)."""
    calls = []
    original = intercept.perturbed_attention

    def recording(func, args, kwargs, settings, layout, start):
        out = original(func, args, kwargs, settings, layout, start)
        if out is not None:
            bound = intercept._bind(args, kwargs)
            calls.append(dict(name=layout.module_name, q=bound["query"][start:], k=bound["key"][start:],
                              v=bound["value"][start:], scale=bound.get("scale"), text=layout.text_tokens,
                              order=layout.token_order, settings=settings, out=out[start:]))
        return out

    monkeypatch.setattr(intercept, "perturbed_attention", recording)
    return calls


CASES = [
    # (model, layers, expected perturbed module names)
    ("sdxl_unet", None, ["mid_block.attentions.0.transformer_blocks.0.attn1"]),
    ("sd3", [1], ["transformer_blocks.1.attn"]),
    ("flux_double", LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_attention=False,
                                    skip_attention_scores=True, skip_ff=False), ["transformer_blocks.0.attn"]),
    ("flux_single", r"single_transformer_blocks\.0\.attn$", ["single_transformer_blocks.0.attn"]),
]
MODELS = {"sdxl_unet": _unet, "sd3": _sd3, "flux_double": _flux, "flux_single": _flux}


# A UNet's self-attention has no text tokens, so joint_mode does not apply to it: 'image' only.
RUNS = [(*case, mode) for case in CASES for mode in ("image", "joint") if not (case[0] == "sdxl_unet" and mode == "joint")]


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("name,layers,expected,joint_mode", RUNS, ids=[f"{r[0]}-{r[3]}" for r in RUNS])
@torch.no_grad()
def test_guider_perturbs_exactly_the_chosen_attention(name, layers, expected, joint_mode, guidance_scale, spy):
    model, data, forward, image_tokens, order = MODELS[name]()
    guider = AdversarialSinkhornGuidance(guidance_scale=guidance_scale, asag_scale=2.0, layers=layers, num_iters=3,
                                         epsilon=0.8, joint_mode=joint_mode)
    preds, guided = _run(guider, model, data, forward)
    names = ["pred_cond", "pred_uncond", "pred_cond_asag"] if guidance_scale != 1.0 else ["pred_cond", "pred_cond_asag"]
    assert list(preds) == names
    assert _no_hooks(model), "hooks left on the model after the step"

    # The perturbed attention: SPEC §10 in float64 on the module's own q, k, v.
    assert [c["name"] for c in spy] == expected
    call = spy[0]
    q, k, v = call["q"], call["k"], call["v"]
    n = q.shape[2]
    scale = call["scale"] if call["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    if image_tokens is None:  # UNet self-attention: no text
        assert call["text"] == 0
        start, stop = 0, n
    else:
        assert call["text"] == TEXT_TOKENS and n == image_tokens + TEXT_TOKENS and call["order"] == order
        start, stop = (TEXT_TOKENS, n) if order == "text_first" else (0, image_tokens)
    ref = reference_joint(q, k, v, start, stop, joint_mode, num_iters=3, epsilon=0.8, scale=scale)
    assert rel_err(call["out"], ref) <= out_tolerance(torch.float32), f"{rel_err(call['out'], ref):.2e}"

    # The other passes are the plain model, bit for bit; the perturbed one is not.
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    plain_cond = forward(BlockState(**{k: v[0] if isinstance(v, tuple) else v for k, v in data.items()}))
    torch.testing.assert_close(preds["pred_cond"], plain_cond, rtol=0, atol=0)
    if guidance_scale != 1.0:
        plain_uncond = forward(BlockState(**{k: v[1] if isinstance(v, tuple) else v for k, v in data.items()}))
        torch.testing.assert_close(preds["pred_uncond"], plain_uncond, rtol=0, atol=0)
    assert (preds["pred_cond_asag"] - preds["pred_cond"]).abs().max() > 1e-5

    # Output differs from CFG alone, and is the ASAG combination.
    _, cfg_only = _run(ClassifierFreeGuidance(guidance_scale=guidance_scale), model, data, forward)
    assert (guided - cfg_only).abs().max() > 1e-5
    expected_pred = cfg_only + 2.0 * (preds["pred_cond"] - preds["pred_cond_asag"])
    torch.testing.assert_close(guided, expected_pred, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_image_mode_differs_from_joint_mode_on_a_joint_model():
    model, data, forward, _, _ = _sd3()
    outs = [_run(AdversarialSinkhornGuidance(guidance_scale=1.0, layers=[1], joint_mode=m), model, data, forward)[0]
            ["pred_cond_asag"] for m in ("image", "joint")]
    assert (outs[0] - outs[1]).abs().max() > 1e-5


def test_list_attention_layers():
    sd3 = _sd3()[0]
    assert list_attention_layers(sd3) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    flux = _flux()[0]
    assert list_attention_layers(flux) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    unet_layers = list_attention_layers(_unet()[0])
    assert unet_layers and all(name.endswith("attn1") for name in unet_layers)  # cross-attention (attn2) excluded


@torch.no_grad()
def test_single_stream_text_length_under_another_hook(spy):
    """Another diffusers hook already wrapping the single-stream block (caches, offloading) must not
    hide the block's text length from the guider."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, data, forward, image_tokens, _ = _flux()
    HookRegistry.check_if_exists_or_initialize(model.single_transformer_blocks[0]).register_hook(ModelHook(), "other")
    _run(AdversarialSinkhornGuidance(guidance_scale=1.0, layers=r"single_transformer_blocks\.0\.attn$"), model, data, forward)
    assert [(c["name"], c["text"]) for c in spy] == [("single_transformer_blocks.0.attn", TEXT_TOKENS)]
    assert model.single_transformer_blocks[0]._diffusers_hook.get_hook("other") is not None

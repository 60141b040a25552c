"""The diffusers layer under failure and bad input (issue 11 items 1 and 10), the ASAG window,
guidance_rescale, and masks handed to the interception the way models pass them."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDIMScheduler, StableDiffusionPAGPipeline  # noqa: E402
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402

import asag_kernels.settings as asag_settings  # noqa: E402  (where the perturbed attention calls the ops)
from asag_kernels._spec import out_tolerance  # noqa: E402
from asag_kernels import backends  # noqa: E402
from asag_kernels.diffusers import AdversarialSinkhornGuidance, disable_asag, enable_asag  # noqa: E402
from asag_kernels.diffusers.families import IMAGE_FIRST, TEXT_FIRST  # noqa: E402
from asag_kernels.diffusers.intercept import CallLayout, SinkhornSDPAMode, SinkhornSettings  # noqa: E402
from conftest import rel_err, require_backend  # noqa: E402
from test_diffusers import _embeds, _processor_state, _run, _tiny_unet, _tiny_vae  # noqa: E402
from test_diffusers_models import _no_hooks, _run as _guided_step, _sd3  # noqa: E402
from test_joint import reference_joint  # noqa: E402


def _sd_pipe():
    pipe = StableDiffusionPAGPipeline(
        vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=_tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False, pag_applied_layers=["mid"],
    )
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _embeds()
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond)


def _unusable_backend() -> str | None:
    for name in backends.BACKENDS:
        if backends.unsupported_reason(name, torch.device("cpu"), torch.float32) is not None:
            return name
    return None


# ------------------------------------------------------------------------------------------------
# Issue 11 item 1: a failed run leaves the pipeline usable


@torch.no_grad()
def test_enable_asag_refuses_a_backend_that_cannot_run_the_pipeline():
    name = _unusable_backend()
    if name is None:
        pytest.skip("every backend can run float32 on CPU here (a GPU machine): nothing to refuse")
    pipe, _ = _sd_pipe()
    before_layers, before_procs = list(pipe.pag_applied_layers), pipe._pag_attn_processors
    with pytest.raises(ValueError, match=f"backend={name!r} cannot run"):
        enable_asag(pipe, backend=name)
    assert pipe.pag_applied_layers == before_layers and pipe._pag_attn_processors is before_procs
    assert _no_hooks(pipe.unet)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
@torch.no_grad()
def test_failure_inside_the_denoiser_restores_the_processors(exc, monkeypatch):
    pipe, inputs = _sd_pipe()
    before = _processor_state(pipe.unet)
    baseline = _run(pipe, inputs, 5.0, pag_scale=0.0)
    asag = enable_asag(pipe)

    def failing(*args, **kwargs):
        raise exc("mid-run failure")

    monkeypatch.setattr(asag_settings, "sinkhorn_attention", failing)
    with pytest.raises(exc):
        _run(pipe, inputs, 5.0, **asag)
    monkeypatch.undo()
    assert _processor_state(pipe.unet) == before, "ASAG processors left in the UNet after a failed run"
    # CFG-only calls work and give what they gave before; ASAG runs again.
    assert torch.equal(_run(pipe, inputs, 5.0, pag_scale=0.0), baseline)
    assert (_run(pipe, inputs, 5.0, **asag) - baseline).abs().max() > 1e-4
    disable_asag(pipe)
    assert _processor_state(pipe.unet) == before and _no_hooks(pipe.unet)


@torch.no_grad()
def test_failure_outside_the_denoiser_leaves_the_pipeline_usable():
    """Ctrl-C in a step callback: the PAG pipeline never restores its processors; the next call does."""
    pipe, inputs = _sd_pipe()
    before = _processor_state(pipe.unet)
    baseline = _run(pipe, inputs, 5.0, pag_scale=0.0)
    asag = enable_asag(pipe)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, inputs, 5.0, callback_on_step_end=interrupt, **asag)
    assert _processor_state(pipe.unet) != before  # diffusers' pipeline left the ASAG processors in ...
    assert torch.equal(_run(pipe, inputs, 5.0, pag_scale=0.0), baseline)  # ... the next CFG-only call is right
    assert _processor_state(pipe.unet) == before
    with pytest.raises(KeyboardInterrupt):
        _run(pipe, inputs, 5.0, callback_on_step_end=interrupt, **asag)
    disable_asag(pipe)  # disable_asag restores them too
    assert _processor_state(pipe.unet) == before and _no_hooks(pipe.unet)
    assert torch.equal(_run(pipe, inputs, 5.0, pag_scale=0.0), baseline)


@torch.no_grad()
def test_failure_outside_the_denoiser_then_other_layers():
    """Processors a failed run left in the mid block never add to the branch of layers chosen later."""
    pipe, inputs = _sd_pipe()
    before = _processor_state(pipe.unet)
    asag = enable_asag(pipe)  # mid block

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, inputs, 5.0, callback_on_step_end=interrupt, **asag)
    other = enable_asag(pipe, layers="down_blocks.1")
    after_failure = _run(pipe, inputs, 5.0, **other)
    assert _processor_state(pipe.unet) == before
    disable_asag(pipe)
    clean = _run(pipe, inputs, 5.0, **enable_asag(pipe, layers="down_blocks.1"))
    assert torch.equal(after_failure, clean), "the mid block's leftover ASAG processor perturbed the later call"
    disable_asag(pipe)
    assert _processor_state(pipe.unet) == before and _no_hooks(pipe.unet)


@torch.no_grad()
def test_disable_asag_gives_back_the_pipelines_own_pag_pair():
    pipe, _ = _sd_pipe()
    own = pipe._pag_attn_processors
    enable_asag(pipe)
    enable_asag(pipe, layers="down_blocks.1")  # a second call must not record ASAG's pair as the pipeline's
    disable_asag(pipe)
    assert pipe._pag_attn_processors is own


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
@torch.no_grad()
def test_guider_failure_removes_its_hooks(exc, monkeypatch):
    model, data, forward, _, _ = _sd3()
    guider = AdversarialSinkhornGuidance(guidance_scale=4.0, layers=[0, 1])
    plain, _ = _guided_step(AdversarialSinkhornGuidance(guidance_scale=4.0, asag_scale=0.0), model, data, forward)

    def failing(*args, **kwargs):
        raise exc("mid-run failure")

    monkeypatch.setattr(asag_settings, "joint_sinkhorn_attention", failing)
    with pytest.raises(exc):
        _guided_step(guider, model, data, forward)
    monkeypatch.undo()
    assert _no_hooks(model), "hooks left on the model after a failed perturbed pass"
    again, _ = _guided_step(guider, model, data, forward)  # the same guider works on the next step
    torch.testing.assert_close(again["pred_cond"], plain["pred_cond"], rtol=0, atol=0)
    assert (again["pred_cond_asag"] - again["pred_cond"]).abs().max() > 1e-5


@torch.no_grad()
def test_guider_refuses_a_backend_that_cannot_run_the_model():
    name = _unusable_backend()
    if name is None:
        pytest.skip("every backend can run float32 on CPU here (a GPU machine): nothing to refuse")
    model, data, forward, _, _ = _sd3()
    with pytest.raises(ValueError, match=f"backend={name!r} cannot run"):
        _guided_step(AdversarialSinkhornGuidance(layers=[1], backend=name), model, data, forward)
    assert _no_hooks(model)


@torch.no_grad()
def test_guider_checks_the_backend_again_after_the_model_moves():
    """pipe.to(...) between calls: the first call's check must not stand for the model's new dtype/device."""
    require_backend("cpu", device=torch.device("cpu"))
    model, data, forward, _, _ = _sd3()
    guider = AdversarialSinkhornGuidance(guidance_scale=1.0, layers=[1], backend="cpu")  # batches: cond, perturbed
    preds, _ = _guided_step(guider, model, data, forward)  # float32 on CPU: the cpu backend runs it
    assert list(preds) == ["pred_cond", "pred_cond_asag"]
    model.to(torch.float64)  # which the cpu backend does not take
    guider.set_state(step=1, num_inference_steps=2, timestep=torch.tensor(500))
    guider.prepare_inputs(data)
    guider.prepare_models(model)  # the conditional pass: nothing to check
    guider.cleanup_models(model)
    with pytest.raises(ValueError, match="backend='cpu' cannot run this model \\(cpu, torch.float64\\)"):
        guider.prepare_models(model)  # the perturbed pass
    assert _no_hooks(model)


# ------------------------------------------------------------------------------------------------
# Issue 11 item 10: guider arguments are checked at construction


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(asag_scale=float("nan")), ValueError, "asag_scale"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(guidance_scale="7"), TypeError, "guidance_scale"),
        (dict(guidance_scale=None), TypeError, "guidance_scale"),
        (dict(asag_scale=None), TypeError, "asag_scale"),
        (dict(asag_scale=float("inf")), ValueError, "asag_scale"),
        (dict(asag_start=-0.1), ValueError, "asag_start"),
        (dict(asag_stop=1.5), ValueError, "asag_stop"),
        (dict(asag_start=0.6, asag_stop=0.4), ValueError, "asag_start"),
        (dict(guidance_rescale=float("nan")), ValueError, "guidance_rescale"),
        (dict(num_iters=-1), ValueError, "num_iters"),
        (dict(num_iters=2.0), TypeError, "num_iters"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(backend="fast"), ValueError, "backend"),
        (dict(joint_mode="text"), ValueError, "joint_mode"),
        (dict(layers="blocks.(1"), ValueError, "layers"),
        (dict(layers=[]), ValueError, "layers"),
        (dict(layers=[1.5]), TypeError, "layers"),
        (dict(layers={"indices": [1], "nonsense": 2}), ValueError, "layers"),
        (dict(start=float("nan")), ValueError, "start"),
        (dict(use_original_formulation="yes"), TypeError, "use_original_formulation"),
    ],
)
def test_guider_arguments_are_validated(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        AdversarialSinkhornGuidance(**kwargs)


@pytest.mark.parametrize(
    "layers,needle",
    [("blocks.(1", "not a valid regular expression"), ("up_blocks.9", "matches no self-attention"),
     ([7], "no block list"), ([True], "layers must hold")],
)
def test_bad_layers_name_the_argument(layers, needle):
    pipe, _ = _sd_pipe()
    before = _processor_state(pipe.unet)
    with pytest.raises((ValueError, TypeError), match="layers") as info:
        enable_asag(pipe, layers=layers)
    assert needle in str(info.value)
    assert _processor_state(pipe.unet) == before and pipe.pag_applied_layers == ["mid"]


@pytest.mark.parametrize(
    "layers,needle",
    [([7], "out of range"), ({"indices": [0], "fqn": "proj_out"}, "not a block list"), ("blocks.1(", "regular expression"),
     ("single_transformer_blocks", "matches no self-attention")],
)
def test_bad_layers_on_a_transformer(layers, needle):
    from asag_kernels.diffusers import select_attention_layers

    model = _sd3()[0]
    with pytest.raises(ValueError, match="layers") as info:
        select_attention_layers(model, layers)
    assert needle in str(info.value)


def test_enable_asag_checks_its_scale():
    pipe, _ = _sd_pipe()
    for bad, exc in ((float("nan"), ValueError), ("1.5", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="asag_scale"):
            enable_asag(pipe, asag_scale=bad)


# ------------------------------------------------------------------------------------------------
# The ASAG window and guidance_rescale


@torch.no_grad()
def test_asag_window_is_separate_from_the_cfg_window():
    model, data, forward, _, _ = _sd3()
    guider = AdversarialSinkhornGuidance(guidance_scale=4.0, layers=[1], asag_start=0.5, asag_stop=0.75, stop=0.5)
    seen = []
    for step in range(4):
        preds, _ = _guided_step(guider, model, data, forward, step=step, steps=4)
        seen.append(sorted(preds))
    assert seen == [
        ["pred_cond", "pred_uncond"], ["pred_cond", "pred_uncond"],  # CFG window [0, 0.5)
        ["pred_cond", "pred_cond_asag"],  # ASAG window [0.5, 0.75)
        ["pred_cond"],
    ]


@torch.no_grad()
def test_guidance_rescale():
    model, data, forward, _, _ = _sd3()
    preds, plain = _guided_step(AdversarialSinkhornGuidance(guidance_scale=4.0, layers=[1]), model, data, forward)
    _, rescaled = _guided_step(AdversarialSinkhornGuidance(guidance_scale=4.0, layers=[1], guidance_rescale=0.7),
                               model, data, forward)
    torch.testing.assert_close(rescaled, rescale_noise_cfg(plain, preds["pred_cond"], 0.7), rtol=1e-6, atol=1e-6)
    assert (rescaled - plain).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------
# Masks as models pass them to SDPA, through the interception


def _joint_qkv(seed, b=2, h=2, n=11, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
@pytest.mark.parametrize("form", ["qwen_key_padding", "hunyuan_query_and_key", "additive"])
@torch.no_grad()
def test_masks_become_excluded_keys(form, joint_mode, seed):
    q, k, v = _joint_qkv(seed)
    text, n = 4, q.shape[2]
    real = torch.ones(2, n, dtype=torch.bool)
    real[0, 2:4] = False  # padded text tokens of the first sample
    if form == "qwen_key_padding":  # text first, [B, 1, 1, N] bool (QwenDoubleStreamAttnProcessor2_0)
        order, mask = TEXT_FIRST, real[:, None, None, :]
        image = (text, n)
    else:  # image first; HunyuanVideo 1.5 passes m_i & m_j, UNets an additive mask
        real = real.roll(n - text, dims=1)
        order, image = IMAGE_FIRST, (0, n - text)
        mask = (real[:, None, :, None] & real[:, None, None, :]) if form == "hunyuan_query_and_key" else \
            torch.where(real, 0.0, -10000.0)[:, None, None, :]
    settings = SinkhornSettings(num_iters=2, epsilon=0.9, joint_mode=joint_mode)
    with SinkhornSDPAMode(settings, CallLayout("attn", text, order)) as mode:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert mode.replaced_calls == 1
    ref = reference_joint(q, k, v, *image, joint_mode, mask=real, num_iters=2, epsilon=0.9)
    rows = real[:, None, :, None].expand_as(out)
    assert rel_err(out[rows], ref[rows]) <= out_tolerance(torch.float32), f"seed={seed}"
    if form == "hunyuan_query_and_key":  # padded query rows: what the model's own masked SDPA gives them
        stock = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out[~rows], stock[~rows], equal_nan=True)


def test_masks_that_are_not_key_padding_are_refused():
    q, k, v = _joint_qkv(0)
    settings = SinkhornSettings()
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    bias = torch.randn(2, 1, 11, 11)
    for mask, needle in ((causal, "not a key-padding mask"), (bias, "attention bias")):
        with SinkhornSDPAMode(settings, CallLayout("blocks.0.attn")), pytest.raises(NotImplementedError, match=needle):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with SinkhornSDPAMode(settings, CallLayout("blocks.0.attn")), pytest.raises(NotImplementedError, match="causal"):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with SinkhornSDPAMode(settings, CallLayout("blocks.0.attn", 3, None)), pytest.raises(ValueError, match="token order"):
        F.scaled_dot_product_attention(q, k, v)


@torch.no_grad()
def test_cross_attention_calls_inside_a_module_pass_through():
    q, _, _ = _joint_qkv(1)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # e.g. IP-Adapter tokens: Nq != Nk
    with SinkhornSDPAMode(SinkhornSettings(), CallLayout("attn")) as mode:
        out = F.scaled_dot_product_attention(q, k, v)
    assert mode.replaced_calls == 0
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert math.isfinite(float(out.sum()))

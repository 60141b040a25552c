"""ASAG in every diffusers modular-pipeline family, offline, on tiny random components.

For each family (SDXL, SD3, Flux.1 through asag_kernels.diffusers.flux, Flux.2 Klein base, Qwen-Image,
Wan 2.2, HunyuanVideo 1.5, LTX-Video) the family's own modular denoise step runs two steps with
``AdversarialSinkhornGuidance`` as its guider (components from ``examples/asag_tiny.py``; prompts as
random embeddings and padding masks). Checked:

* the ASAG output is finite, differs from CFG alone and equals it at ``asag_scale=0``; video
  families produce 5-D latents;
* one chosen attention module: its perturbed call, replayed with the stock processor and its
  ``scaled_dot_product_attention`` replaced by a float64 evaluation of the SPEC formula on that
  call's own q, k, v (plain Sinkhorn; joint 'image' and 'joint' modes with the family's token order
  and text padding), gives the recorded output; its unperturbed calls equal the stock module;
* no hook is left on any module afterwards;
* 'image' mode with one image token equals CFG alone (a 1x1 plan is 1); bad layers raise clearly;
* the example's ``--smoke-test`` for every family, in one subprocess.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402

import asag_kernels  # noqa: E402
from asag_kernels.diffusers import AdversarialSinkhornGuidance  # noqa: E402
from asag_kernels.diffusers import families  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import asag_tiny  # noqa: E402

NUM_ITERS, EPSILON, ASAG_SCALE, CFG = 3, 0.8, 1.5, 5.0

# The attention module whose perturbed calls are replayed (one of each tiny setup's ASAG layers;
# double-stream for joint families, so the text length is that call's encoder_hidden_states).
CHECKED_MODULE = {
    "sdxl": "mid_block.attentions.0.transformer_blocks.0.attn1",
    "sd3": "transformer_blocks.1.attn",
    "flux": "transformer_blocks.0.attn",
    "flux2": "transformer_blocks.0.attn",
    "qwenimage": "transformer_blocks.1.attn",
    "wan": "blocks.1.attn1",
    "hunyuanvideo": "transformer_blocks.1.attn",
    "ltx": "transformer_blocks.1.attn1",
}
JOINT = [m for m in asag_tiny.MODELS if families.FAMILIES[m].joint]


def _guider(model: str, **kw) -> AdversarialSinkhornGuidance:
    args = dict(guidance_scale=1.0 if model == "flux" else CFG, asag_scale=ASAG_SCALE, num_iters=NUM_ITERS,
                epsilon=EPSILON)
    args.update(kw)
    return AdversarialSinkhornGuidance(**args)


def _cfg_only(model: str):
    # Flux.1 is guidance-distilled: its baseline is the guided loop with ASAG off (= FluxLoopDenoiser)
    return _guider(model, asag_scale=0.0) if model == "flux" else ClassifierFreeGuidance(guidance_scale=CFG)


def _denoisers(setup) -> list[torch.nn.Module]:
    return [getattr(setup.pipe, name) for name in setup.denoisers]


def _no_hooks_left(setup) -> bool:
    return all(
        getattr(m, "_diffusers_hook", None) is None or not m._diffusers_hook.hooks
        for d in _denoisers(setup) for m in d.modules()
    )


# ------------------------------------------------------------------------------------------------
# The SPEC formula, evaluated independently in float64


def _key_padding(mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor:
    """bool [B, N], True = real key, from an SDPA mask (bool or additive) that drops whole keys."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool)
    keep = mask if mask.dtype == torch.bool else mask > -1.0e4
    keep = keep.expand(batch, *keep.shape[1:]) if keep.shape[0] == 1 else keep
    return keep.reshape(batch, -1, n).any(dim=1)


def _softmax_attention(q, k, v, scale, real):
    logits = scale * q @ k.transpose(-1, -2)
    logits = logits.masked_fill(~real, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _spec_attention(q, k, v, *, scale, mask, text: int, order: str | None, joint_mode: str) -> torch.Tensor:
    """SPEC §1/§10 in float64 for one SDPA call of the perturbed pass: [B, H, N, D] -> [B, H, N, Dv]."""
    q, k, v = q.double(), k.double(), v.double()
    b, _, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kpm = _key_padding(mask, b, n)
    sinkhorn = dict(num_iters=NUM_ITERS, cost="adversarial", scale=scale, epsilon=EPSILON, backend="reference")
    image = torch.zeros(n, dtype=torch.bool)
    if text == 0:
        image[:] = True
    else:
        start, stop = families.image_token_range(order, n, text)
        image[start:stop] = True
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i in range(b):
        real = kpm[i]
        weights = _softmax_attention(q[i], k[i], v[i], scale, real)
        plain = weights @ v[i]  # padded queries keep ordinary attention over the real keys
        if text == 0 or joint_mode == "joint":
            sub = asag_kernels.sinkhorn_attention(q[i][:, real], k[i][:, real], v[i][:, real], **sinkhorn)
            plain[:, real] = sub
        else:
            img = image & real
            plan_rows = asag_kernels.sinkhorn_attention(q[i][:, img], k[i][:, img], v[i][:, img], **sinkhorn)
            mass = weights[:, img][:, :, img].sum(-1)  # softmax weight image queries give image keys
            text_part = weights[:, img][:, :, ~image] @ v[i][:, ~image]
            plain[:, img] = text_part + mass[..., None] * plan_rows
        out[i] = plain
    return out


def _perturbed_call(bound: dict, text: int, order: str | None, joint_mode: str) -> torch.Tensor:
    """What the perturbed SDPA call must return: the SPEC formula on its q, k, v; rows of padded
    queries (HunyuanVideo masks them out as queries too) keep what the stock attention gives them,
    which the model never reads."""
    q, mask = bound["query"], bound.get("attn_mask")
    out = _spec_attention(q, bound["key"], bound["value"], scale=bound.get("scale"), mask=mask, text=text,
                          order=order, joint_mode=joint_mode)
    if mask is not None:
        padded = ~_key_padding(mask, q.shape[0], q.shape[-2])
        stock = F.scaled_dot_product_attention(**bound).double()  # the mode is off inside its handler
        out = torch.where(padded[:, None, :, None], stock, out)
    return out


class _ReplaceSDPA(torch.overrides.TorchFunctionMode):
    """Runs every ``F.scaled_dot_product_attention`` call through ``fn`` instead."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = {**dict(zip(names, args)), **kwargs}
        return self.fn(bound).to(bound["query"].dtype)


def _text_tokens(args, kwargs) -> int:
    encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return encoder.shape[1] if isinstance(encoder, torch.Tensor) else 0


def _record(module: torch.nn.Module, calls: list):
    def hook(mod, args, kwargs, output):
        calls.append((args, dict(kwargs), output))

    return module.register_forward_hook(hook, with_kwargs=True)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _assert_outputs_close(got, want):
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# The guider in each family's modular pipeline


def _joint_mode_params():
    params = [pytest.param(m, "image", id=f"{m}") for m in asag_tiny.MODELS]
    return params + [pytest.param(m, "joint", id=f"{m}-joint") for m in JOINT]


# Token order of each joint family's attention, read off diffusers 0.42's transformers (the order in
# which they concatenate text and image), independently of families.py, which the code under test uses.
EXPECTED_TOKEN_ORDER = {"sd3": "image_first", "flux": "text_first", "flux2": "text_first",
                        "qwenimage": "text_first", "hunyuanvideo": "image_first"}


def _check_module_calls(module, calls, per_step: int, text_of, family, joint_mode: str) -> None:
    """Each step calls ``module`` for pred_cond, pred_uncond (CFG on) and last pred_cond_asag: the
    first ones must be the stock module, the last the stock module with its SDPA replaced by the
    SPEC formula (``text_of(args, kwargs)``: text tokens in that call's joint sequence)."""
    assert calls and len(calls) % per_step == 0
    for step in range(len(calls) // per_step):
        step_calls = calls[step * per_step:(step + 1) * per_step]
        for args, kwargs, output in step_calls[:-1]:  # unperturbed chunks: the stock module
            _assert_outputs_close(output, module(*args, **kwargs))
        args, kwargs, output = step_calls[-1]
        text = text_of(args, kwargs)
        assert (text > 0) == family.joint
        order = EXPECTED_TOKEN_ORDER.get(family.name)
        assert order == family.token_order, (family.name, family.token_order)
        mode = _ReplaceSDPA(lambda b: _perturbed_call(b, text, order, joint_mode))
        with mode:
            expected = module(*args, **kwargs)
        assert mode.calls >= 1
        _assert_outputs_close(output, expected)
        assert (_first(output) - _first(module(*args, **kwargs))).abs().max() > 1e-6  # it was perturbed


@pytest.mark.parametrize("model,joint_mode", _joint_mode_params())
@torch.no_grad()
def test_guider_in_family_pipeline(model, joint_mode):
    setup = asag_tiny.build(model)
    family = families.FAMILIES[model]
    assert families.family_of(_denoisers(setup)[0]) == model
    module_name = CHECKED_MODULE[model]
    assert any(re.search(p, module_name) for p in setup.layers), "the checked module must be an ASAG layer"
    # every denoiser (both Wan 2.2 experts) has the module; each one's calls are checked
    modules = [dict(d.named_modules())[module_name] for d in _denoisers(setup)]

    cfg_only = asag_tiny.run(setup, _cfg_only(model))
    calls: list[list] = [[] for _ in modules]
    handles = [_record(m, c) for m, c in zip(modules, calls)]
    try:
        asag = asag_tiny.run(setup, _guider(model, layers=setup.layers, joint_mode=joint_mode))
    finally:
        for handle in handles:
            handle.remove()
    assert _no_hooks_left(setup)
    assert torch.isfinite(asag).all()
    if family.video:  # [B, C, F, H, W] with several latent frames
        assert asag.dim() == 5 and asag.shape[2] > 1
    assert (asag - cfg_only).abs().max() > 1e-5
    assert asag_tiny.run(setup, _guider(model, layers=setup.layers, asag_scale=0.0)).equal(cfg_only)

    per_step = 2 if model == "flux" else 3  # Flux.1 runs without true CFG
    for module, module_calls in zip(modules, calls):
        _check_module_calls(module, module_calls, per_step, _text_tokens, family, joint_mode)


@pytest.mark.parametrize("model,joint_mode", [
    ("flux", "image"), ("flux", "joint"), ("flux2", "image"), ("flux2", "joint"),
])
@torch.no_grad()
def test_guider_on_single_stream_blocks(model, joint_mode):
    """Flux single-stream blocks attend over the [text, image] sequence they concatenate themselves;
    the text length is the transformer call's ``encoder_hidden_states`` length."""
    setup = asag_tiny.build(model)
    family = families.FAMILIES[model]
    denoiser = _denoisers(setup)[0]
    module = denoiser.single_transformer_blocks[0].attn
    text_lengths: list[int] = []
    pre = denoiser.register_forward_pre_hook(
        lambda mod, args, kwargs: text_lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    calls: list = []
    handle = _record(module, calls)
    try:
        asag = asag_tiny.run(setup, _guider(model, layers=[r"^single_transformer_blocks\.0\.attn$"], joint_mode=joint_mode))
    finally:
        handle.remove()
        pre.remove()
    assert _no_hooks_left(setup) and torch.isfinite(asag).all()
    assert len(set(text_lengths)) == 1
    _check_module_calls(module, calls, 2 if model == "flux" else 3, lambda args, kwargs: text_lengths[0], family,
                        joint_mode)


@pytest.mark.parametrize("model", ["sd3", "wan"])
def test_guider_without_cfg(model):
    setup = asag_tiny.build(model)
    cond_only = asag_tiny.run(setup, ClassifierFreeGuidance(guidance_scale=1.0))
    asag = asag_tiny.run(setup, _guider(model, guidance_scale=1.0, layers=setup.layers))
    assert torch.isfinite(asag).all() and (asag - cond_only).abs().max() > 1e-5
    assert _no_hooks_left(setup)


@pytest.mark.parametrize("model,size", [("sd3", 16), ("flux", 16)])
def test_image_mode_with_one_image_token_is_ordinary_attention(model, size):
    """One image token (SD3: image first; Flux: text first): the 1x1 image plan is 1, so 'image' mode
    is ordinary attention and ASAG leaves the prediction as it was."""
    setup = asag_tiny.build(model)
    setup.inputs.update(height=size, width=size)
    baseline = asag_tiny.run(setup, _cfg_only(model))
    asag = asag_tiny.run(setup, _guider(model, layers=setup.layers, joint_mode="image"))
    torch.testing.assert_close(asag, baseline, rtol=1e-4, atol=1e-5)
    joint = asag_tiny.run(setup, _guider(model, layers=setup.layers, joint_mode="joint"))
    assert (joint - baseline).abs().max() > 1e-6  # the text tokens do take part in 'joint' mode


def test_bad_layers_raise_and_leave_no_hooks():
    setup = asag_tiny.build("sd3")
    with pytest.raises(ValueError, match="layers"):
        asag_tiny.run(setup, _guider("sd3", layers=r"^no_such_block\.attn$"))
    with pytest.raises(ValueError, match="layers"):
        asag_tiny.run(setup, _guider("sd3", layers=[40]))  # the tiny model has 2 blocks
    assert _no_hooks_left(setup)


# ------------------------------------------------------------------------------------------------
# Flux.1


def test_flux_guided_denoiser_without_asag_is_flux_loop_denoiser():
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from diffusers.modular_pipelines.flux import FluxAutoBlocks

    setup = asag_tiny.build("flux")
    stock = SequentialPipelineBlocks.from_blocks_dict({"denoise": FluxAutoBlocks().sub_blocks["denoise"]}).init_pipeline()
    stock.update_components(transformer=setup.pipe.transformer, scheduler=setup.pipe.scheduler)
    asag_tiny._quiet(stock._blocks)
    with torch.no_grad():
        expected = stock(**setup.inputs, generator=torch.Generator().manual_seed(0), output="latents")
    assert asag_tiny.run(setup, _guider("flux", asag_scale=0.0, layers=setup.layers)).equal(expected)


def test_flux_errors():
    from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks

    from asag_kernels.diffusers.flux import with_guided_denoiser

    from diffusers.modular_pipelines.flux import FluxAutoBlocks
    from diffusers.modular_pipelines.flux.denoise import FluxLoopDenoiser

    from asag_kernels.diffusers.flux import FluxGuidedLoopDenoiser

    with pytest.raises(ValueError, match="FluxLoopDenoiser"):
        with_guided_denoiser(StableDiffusion3AutoBlocks())
    # a copy: diffusers shares block instances between FluxAutoBlocks() objects, which must stay stock
    guided = with_guided_denoiser(FluxAutoBlocks())
    assert type(guided.sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["denoiser"]) is FluxGuidedLoopDenoiser
    assert type(FluxAutoBlocks().sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["denoiser"]) is FluxLoopDenoiser
    setup = asag_tiny.build("flux")  # true CFG without negative embeddings
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        asag_tiny.run(setup, _guider("flux", guidance_scale=3.0, layers=setup.layers))
    assert _no_hooks_left(setup)


# ------------------------------------------------------------------------------------------------
# The family table and the examples


def test_family_table():
    assert set(asag_tiny.MODELS) == set(families.FAMILIES)
    for name, fam in families.FAMILIES.items():
        assert fam.defaults and all(choice.source for choice in fam.defaults + fam.alternatives), name
        assert (fam.token_order is not None) == fam.joint, name
        assert families.layer_patterns(name)
    assert families.image_token_range(families.TEXT_FIRST, 10, 3) == (3, 10)
    assert families.image_token_range(families.IMAGE_FIRST, 10, 3) == (0, 7)
    with pytest.raises(ValueError, match="family"):
        families.default_layers("sd4")
    assert families.family_of(torch.nn.Linear(2, 2)) is None


def test_example_smoke_tests_every_family():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "asag_modular.py"), "--smoke-test", "--model", *asag_tiny.MODELS],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("smoke-test ")]
    assert [line.split()[1].rstrip(":") for line in lines] == list(asag_tiny.MODELS)
    for line in lines:
        match = re.fullmatch(r"smoke-test \w+: ok, asag branch differs from cfg by (\S+)", line)
        assert match and float(match.group(1)) > 0, line


def test_example_without_cached_weights_says_how_to_get_them(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "asag_modular.py"), "--model", "ltx"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "hf download Lightricks/LTX-Video-0.9.5" in proc.stderr

"""ASAG in diffusers: processors, PAG pipelines, the modular-pipeline guider.

Everything runs offline on CPU with tiny randomly initialised components built in the test (the way
diffusers' own PAG tests build them); prompts go in as embeddings, so no tokenizer or text encoder
is ever loaded.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3PAGPipeline,
    StableDiffusionControlNetPAGPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLPAGPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0  # noqa: E402

import asag_kernels  # noqa: E402
from asag_kernels._spec import out_tolerance  # noqa: E402
from asag_kernels.diffusers.families import IMAGE_FIRST  # noqa: E402
from asag_kernels.diffusers import (  # noqa: E402
    AdversarialSinkhornGuidance,
    ASAGCFGProcessor,
    ASAGProcessor,
    disable_asag,
    enable_asag,
)
from conftest import rel_err  # noqa: E402
from test_joint import reference_joint  # noqa: E402

CROSS_DIM = 16
POOLED_DIM = 16
ASAG_SCALE = 1.5


def _assert_plain_rows_match(got: torch.Tensor, stock: torch.Tensor) -> None:
    """Rows an ASAG processor left unperturbed against diffusers' own processor run on another batch
    shape: the GEMMs round by batch shape (and threads, CPU), so SPEC §4's float32 bound, not bits."""
    err = rel_err(got, stock)
    assert err <= out_tolerance(torch.float32), f"plain rows rel err {err:.2e} > {out_tolerance(torch.float32)}"


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# One Attention module, checked against the math


def _sinkhorn_reference(attn: Attention, x: torch.Tensor, num_iters: int, epsilon: float) -> torch.Tensor:
    """What the perturbed chunk must be: to_out(sinkhorn_attention(q, k, v)) built by hand, in float64."""
    b, n, _ = x.shape
    h = attn.heads
    q, k, v = (proj(x).reshape(b, n, h, -1).permute(0, 2, 1, 3).double() for proj in (attn.to_q, attn.to_k, attn.to_v))
    o = asag_kernels.sinkhorn_attention(
        q, k, v, num_iters=num_iters, cost="adversarial", epsilon=epsilon, scale=attn.scale, backend="reference"
    )
    o = o.permute(0, 2, 1, 3).reshape(b, n, -1).to(x.dtype)
    return attn.to_out[0](o)


def _softmax_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    h = attn.heads
    q, k, v = (proj(x).reshape(b, n, h, -1).permute(0, 2, 1, 3).double() for proj in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    o = (w @ v).permute(0, 2, 1, 3).reshape(b, n, -1).to(x.dtype)
    return attn.to_out[0](o)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@torch.no_grad()
def test_self_attn_processor_matches_sdpa_and_sinkhorn(cfg):
    torch.manual_seed(0)
    attn = Attention(query_dim=24, heads=3, dim_head=8).eval()
    chunks = 3 if cfg else 2
    x = torch.randn(chunks * 2, 10, 24)  # two samples per chunk
    attn.set_processor(ASAGCFGProcessor(num_iters=3, epsilon=0.7) if cfg else ASAGProcessor(num_iters=3, epsilon=0.7))
    out = attn(x)

    n_plain = 2 * (chunks - 1)
    torch.testing.assert_close(out[:n_plain], _softmax_reference(attn, x[:n_plain]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[n_plain:], _sinkhorn_reference(attn, x[n_plain:], 3, 0.7), rtol=1e-5, atol=1e-5)
    # the plain chunks are exactly what diffusers' own processor gives
    attn.set_processor(AttnProcessor2_0())
    _assert_plain_rows_match(out[:n_plain], attn(x[:n_plain]))
    # and the Sinkhorn chunk is a real perturbation, not softmax attention
    assert (out[n_plain:] - attn(x[n_plain:])).abs().max() > 1e-3


@torch.no_grad()
def test_self_attn_processor_4d_with_group_norm_residual_and_rescale():
    """A VAE/UNet-style attention block: [B, C, H, W] in, group norm, residual, rescale."""
    torch.manual_seed(1)
    attn = Attention(
        query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
        rescale_output_factor=2.0, bias=True,
    ).eval()
    x = torch.randn(3, 16, 4, 5)
    attn.set_processor(ASAGCFGProcessor())
    out = attn(x)
    assert out.shape == x.shape

    tokens = attn.group_norm(x.view(3, 16, 20)).transpose(1, 2)
    expected_ptb = _sinkhorn_reference(attn, tokens[2:], 2, 1.0).transpose(1, 2).reshape(1, 16, 4, 5)
    torch.testing.assert_close(out[2:], (expected_ptb + x[2:]) / 2.0, rtol=1e-5, atol=1e-5)
    attn.set_processor(AttnProcessor2_0())
    _assert_plain_rows_match(out[:2], attn(x[:2]))


@torch.no_grad()
def test_self_attn_processor_passes_strided_views_without_copies(monkeypatch):
    import asag_kernels.settings as asag_settings  # where the perturbed attention calls the op

    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v))
        return asag_kernels.sinkhorn_attention(q, k, v, **kwargs)

    monkeypatch.setattr(asag_settings, "sinkhorn_attention", spy)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(ASAGProcessor())
    attn(torch.randn(2, 6, 16))
    (q, k, v), = seen
    assert q.shape == (1, 2, 6, 8)
    # [B, N, H, D].transpose(1, 2) views: not contiguous, sharing storage with the projections
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    assert q.stride() == (6 * 16, 8, 16, 1)


def test_processor_rejects_a_batch_that_is_not_chunked():
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    attn.set_processor(ASAGCFGProcessor())
    with torch.no_grad(), pytest.raises(ValueError, match="uncond, cond, perturbed"):
        attn(torch.randn(4, 6, 16))


@torch.no_grad()
def test_self_attn_processor_attention_mask():
    torch.manual_seed(2)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(3, 6, 16)
    mask = torch.zeros(3, 1, 6)
    mask[:2, :, 4:] = -10000.0  # the plain chunks drop the last two keys
    attn.set_processor(ASAGCFGProcessor())
    out = attn(x, attention_mask=mask)
    attn.set_processor(AttnProcessor2_0())
    _assert_plain_rows_match(out[:2], attn(x[:2], attention_mask=mask[:2]))
    torch.testing.assert_close(out[2:], _sinkhorn_reference(attn, x[2:], 2, 1.0), rtol=1e-5, atol=1e-5)

    # a key-padding mask on the Sinkhorn chunk: the dropped key gets zero mass in the plan
    mask[2, :, 5] = -10000.0
    attn.set_processor(ASAGCFGProcessor())
    out = attn(x, attention_mask=mask)
    torch.testing.assert_close(out[2:, :5], _sinkhorn_reference(attn, x[2:, :5], 2, 1.0), rtol=1e-5, atol=1e-5)
    # an attention bias (not a key-padding mask) cannot be honoured: a clear error
    mask[2, :, 5] = -1.5
    with pytest.raises(NotImplementedError, match="attention bias"):
        attn(x, attention_mask=mask)


def test_processor_validates_its_arguments():
    with pytest.raises(ValueError, match="num_iters"):
        ASAGProcessor(num_iters=-1)
    with pytest.raises(ValueError, match="epsilon"):
        ASAGCFGProcessor(epsilon=0.0)
    with pytest.raises(ValueError, match="backend"):
        ASAGCFGProcessor(backend="fast")


@pytest.mark.parametrize("module", ["asag_kernels.diffusers", "asag_kernels.diffusers.processors"])
def test_first_release_processor_names_warn_and_are_the_pair(module):
    import importlib

    mod = importlib.import_module(module)
    for old, new in [("ASAGCFGSelfAttnProcessor", ASAGCFGProcessor), ("ASAGCFGJointAttnProcessor", ASAGCFGProcessor),
                     ("ASAGSelfAttnProcessor", ASAGProcessor), ("ASAGJointAttnProcessor", ASAGProcessor)]:
        with pytest.warns(FutureWarning, match=f"{old} is deprecated.*use {new.__name__}"):
            assert getattr(mod, old) is new
        assert old not in mod.__all__
    with pytest.raises(AttributeError, match="ASAGFooProcessor"):
        getattr(mod, "ASAGFooProcessor")


@torch.no_grad()
def test_processor_says_when_the_stock_processor_made_no_sdpa_call():
    from diffusers.models.attention_processor import AttnProcessor

    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(ASAGCFGProcessor(stock_processors={attn: AttnProcessor()}))  # computes attention itself
    with pytest.raises(RuntimeError, match=r"ASAGCFGProcessor could not reach 'Attention' \(AttnProcessor\).*nothing was perturbed"):
        attn(torch.randn(3, 6, 16))


def test_the_routes_into_diffusers_do_not_import_each_other():
    """The guider, the PAG processors and perturbed_attention share only the neutral modules."""
    import ast
    import pathlib

    import asag_kernels.diffusers as package

    def package_modules(tree) -> set[str]:
        """Modules of asag_kernels.diffusers a file imports (relative or absolute), by their last name."""
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                inside = node.level == 1 or (node.module or "").startswith("asag_kernels.diffusers")
                if inside and node.module and node.module != "asag_kernels.diffusers":
                    out.add(node.module.rsplit(".", 1)[-1])
                elif inside:
                    out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name.rsplit(".", 1)[-1] for a in node.names if a.name.startswith("asag_kernels.diffusers."))
        return out

    routes = {"guider", "processors", "perturb"}
    for route in routes:
        imported = package_modules(ast.parse((pathlib.Path(package.__file__).parent / f"{route}.py").read_text()))
        assert "_common" in imported, f"{route}.py does not use the shared module"
        assert not imported & (routes - {route}), f"{route}.py imports {sorted(imported & (routes - {route}))}"


# ------------------------------------------------------------------------------------------------
# Tiny components


def _tiny_vae(**extra) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **extra,
    )


def _tiny_unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + POOLED_DIM, transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=4, norm_num_groups=4, **extra,
    )


def _embeds(batch: int = 1, tokens: int = 6, dim: int = CROSS_DIM, seed: int = 0):
    g = _seeded(seed)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)


def _sd_pipe():
    pipe = StableDiffusionPAGPipeline(
        vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=_tiny_unet(), scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        pag_applied_layers=["mid"],
    )
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _embeds()
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond)


def _sdxl_pipe():
    pipe = StableDiffusionXLPAGPipeline(
        vae=_tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=_tiny_unet(sdxl=True), scheduler=EulerDiscreteScheduler(), add_watermarker=False,
        pag_applied_layers=["mid"],
    )
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _embeds()
    g = _seeded(1)
    return pipe, dict(
        prompt_embeds=cond, negative_prompt_embeds=uncond,
        pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
    )


def _controlnet_pipe():
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=CROSS_DIM,
        attention_head_dim=4, norm_num_groups=4, conditioning_embedding_out_channels=(4, 8),
    )
    pipe = StableDiffusionControlNetPAGPipeline(
        vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=_tiny_unet(), controlnet=controlnet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False, pag_applied_layers=["mid"],
    )
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _embeds()
    image = torch.rand(1, 3, 32, 32, generator=_seeded(2))
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image)


PIPELINES = {"sd": _sd_pipe, "sdxl": _sdxl_pipe, "controlnet": _controlnet_pipe}


def _run(pipe, inputs, guidance_scale, pag_scale, **extra):
    out = pipe(
        **inputs, height=32, width=32, num_inference_steps=2, guidance_scale=guidance_scale,
        pag_scale=pag_scale, generator=_seeded(0), output_type="np", **extra,
    )
    return torch.from_numpy(out.images)


def _processor_state(model):
    return {name: (type(proc), id(proc)) for name, proc in model.attn_processors.items()}


@pytest.mark.parametrize(
    "name,guidance_scale",
    [("sd", 5.0), ("sd", 1.0), ("sdxl", 5.0), ("sdxl", 1.0), ("controlnet", 5.0)],
    ids=["sd-cfg", "sd-no_cfg", "sdxl-cfg", "sdxl-no_cfg", "controlnet_sd-cfg"],
)
@torch.no_grad()
def test_pag_pipeline_with_asag(name, guidance_scale):
    pipe, inputs = PIPELINES[name]()
    before = _processor_state(pipe.unet)

    no_guidance = _run(pipe, inputs, guidance_scale, pag_scale=0.0)
    pag = _run(pipe, inputs, guidance_scale, pag_scale=ASAG_SCALE)
    asag_kwargs = enable_asag(pipe)
    assert asag_kwargs == {"pag_scale": ASAG_SCALE, "pag_adaptive_scale": 0.0}

    calls = []
    for proc in pipe._pag_attn_processors:
        original = type(proc).__call__

        def counting(self, attn, hidden_states, *a, _original=original, **kw):
            calls.append((type(self).__name__, hidden_states.shape[0]))
            return _original(self, attn, hidden_states, *a, **kw)

        proc.__class__ = type(type(proc).__name__, (type(proc),), {"__call__": counting})
    asag = _run(pipe, inputs, guidance_scale, **asag_kwargs)

    assert torch.isfinite(asag).all() and torch.isfinite(pag).all()
    assert (asag - no_guidance).abs().max() > 1e-4, "ASAG changed nothing compared with no guidance"
    assert (asag - pag).abs().max() > 1e-4, "ASAG gave the same images as PAG"
    # each mid-block self-attention ran the right processor on the right batch, once per step
    mid_self_attn = [
        name for name, m in pipe.unet.named_modules()
        if isinstance(m, Attention) and not m.is_cross_attention and name.startswith("mid_block")
    ]
    expected = ("ASAGCFGProcessor", 3) if guidance_scale > 1 else ("ASAGProcessor", 2)
    assert mid_self_attn and calls == [expected] * (2 * len(mid_self_attn))
    assert _processor_state(pipe.unet) == before, "the pipeline's attention processors were not restored"


@torch.no_grad()
def test_enable_asag_layers_and_disable():
    pipe, inputs = _sd_pipe()
    enable_asag(pipe, layers=["down_blocks.1", "mid"], num_iters=1, epsilon=0.5)
    # the pipeline gets the exact names of the modules the layer ids matched
    assert pipe.pag_applied_layers == [
        r"^down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1$",
        r"^mid_block\.attentions\.0\.transformer_blocks\.0\.attn1$",
    ]
    cfg_proc, proc = pipe._pag_attn_processors
    assert isinstance(cfg_proc, ASAGCFGProcessor) and isinstance(proc, ASAGProcessor)
    assert (proc.num_iters, proc.epsilon) == (1, 0.5)
    assert torch.isfinite(_run(pipe, inputs, 5.0, pag_scale=ASAG_SCALE)).all()

    disable_asag(pipe)
    assert type(pipe._pag_attn_processors[0]).__name__ == "PAGCFGIdentitySelfAttnProcessor2_0"
    assert pipe.pag_applied_layers == ["mid"]  # what the pipeline had before enable_asag

    with pytest.raises(ValueError, match="matches no self-attention module"):
        enable_asag(pipe, layers="up_blocks.7")
    with pytest.raises(TypeError, match="PAG pipeline"):
        enable_asag(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# Joint attention (SD3)


def _tiny_sd3_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=CROSS_DIM, pooled_projection_dim=POOLED_DIM, out_channels=4,
    )


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@torch.no_grad()
def test_joint_processor_matches_sdpa_and_sinkhorn(cfg, joint_mode):
    transformer = _tiny_sd3_transformer().eval()
    attn = transformer.transformer_blocks[0].attn
    chunks = 3 if cfg else 2
    g = _seeded(3)
    image = torch.randn(chunks, 12, 16, generator=g)
    text = torch.randn(chunks, 5, 16, generator=g)

    attn.set_processor(JointAttnProcessor2_0())
    plain_img, plain_txt = attn(image, text)
    cls = ASAGCFGProcessor if cfg else ASAGProcessor
    attn.set_processor(cls(joint_mode=joint_mode, token_order=IMAGE_FIRST))
    img, txt = attn(image, text)
    n_plain = chunks - 1
    # The unperturbed chunks: SDPA on n_plain rows here, on all chunks in the stock processor.
    _assert_plain_rows_match(img[:n_plain], plain_img[:n_plain])
    _assert_plain_rows_match(txt[:n_plain], plain_txt[:n_plain])

    # the perturbed chunk: SPEC §10 on the joint [image, text] sequence (float64), then both output projections
    x, c = image[n_plain:], text[n_plain:]

    def heads(t):
        return t.reshape(1, t.shape[1], attn.heads, -1).permute(0, 2, 1, 3)

    def normed(norm, t):
        return t if norm is None else norm(t)

    q = torch.cat([normed(attn.norm_q, heads(attn.to_q(x))), normed(attn.norm_added_q, heads(attn.add_q_proj(c)))], 2)
    k = torch.cat([normed(attn.norm_k, heads(attn.to_k(x))), normed(attn.norm_added_k, heads(attn.add_k_proj(c)))], 2)
    v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(c))], dim=2)
    o = reference_joint(q, k, v, 0, 12, joint_mode, scale=attn.scale)
    o = o.permute(0, 2, 1, 3).reshape(1, 17, -1).float()
    torch.testing.assert_close(img[n_plain:], attn.to_out[0](o[:, :12]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt[n_plain:], attn.to_add_out(o[:, 12:]), rtol=1e-5, atol=1e-5)
    assert (img[n_plain:] - plain_img[n_plain:]).abs().max() > 1e-3
    if joint_mode == "image":  # text queries keep ordinary attention
        torch.testing.assert_close(txt[n_plain:], attn.to_add_out(_softmax_joint(q, k, v, attn.scale)[:, 12:]),
                                   rtol=1e-5, atol=1e-5)


def _softmax_joint(q, k, v, scale):
    o = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    return o.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1).float()


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
@torch.no_grad()
def test_sd3_pag_pipeline_with_asag(guidance_scale):
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3PAGPipeline(
        transformer=_tiny_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None, pag_applied_layers=["blocks.1"],
    )
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = _embeds()
    g = _seeded(1)
    inputs = dict(
        prompt_embeds=cond, negative_prompt_embeds=uncond,
        pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
    )
    before = _processor_state(pipe.transformer)
    no_guidance = _run(pipe, inputs, guidance_scale, pag_scale=0.0)
    pag = _run(pipe, inputs, guidance_scale, pag_scale=ASAG_SCALE)
    asag_kwargs = enable_asag(pipe)  # keeps the pipeline's own layers ("blocks.1")
    assert isinstance(pipe._pag_attn_processors[0], ASAGCFGProcessor)
    asag = _run(pipe, inputs, guidance_scale, **asag_kwargs)
    assert torch.isfinite(asag).all()
    assert (asag - no_guidance).abs().max() > 1e-4
    assert (asag - pag).abs().max() > 1e-4
    assert _processor_state(pipe.transformer) == before


# ------------------------------------------------------------------------------------------------
# The guider (modular pipelines)


def _run_guided_step(guider, unet, latents, t, cond, uncond):
    """One denoising step the way diffusers' modular denoise loop drives a guider."""
    guider.set_state(step=0, num_inference_steps=2, timestep=t)
    batches = guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)})
    for batch in batches:
        guider.prepare_models(unet)
        batch.noise_pred = unet(latents, t, encoder_hidden_states=batch.encoder_hidden_states, return_dict=False)[0]
        guider.cleanup_models(unet)
    return batches, guider(batches)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
@torch.no_grad()
def test_guider_perturbed_pass_is_the_processor_perturbed_chunk(guidance_scale):
    """The guider's hook and the PAG-pipeline processors are two routes to the same perturbed prediction."""
    unet = _tiny_unet().eval()
    cond, uncond = _embeds()
    latents = torch.randn(1, 4, 16, 16, generator=_seeded(5))
    t = torch.tensor(500)
    guider = AdversarialSinkhornGuidance(guidance_scale=guidance_scale, asag_scale=ASAG_SCALE, num_iters=3, epsilon=0.8)
    batches, out = _run_guided_step(guider, unet, latents, t, cond, uncond)
    preds = {getattr(b, "__guidance_identifier__"): b.noise_pred for b in batches}
    expected_names = ["pred_cond", "pred_uncond", "pred_cond_asag"] if guidance_scale > 1 else ["pred_cond", "pred_cond_asag"]
    assert list(preds) == expected_names

    # hooks are gone after the pass: the plain UNet gives pred_cond again
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in unet.modules())
    torch.testing.assert_close(unet(latents, t, encoder_hidden_states=cond).sample, preds["pred_cond"], rtol=0, atol=0)

    # the same perturbed prediction through ASAGProcessor on batch [cond, perturbed]
    original = unet.attn_processors
    unet.set_attn_processor({
        name: ASAGProcessor(num_iters=3, epsilon=0.8) if name.startswith("mid_block") and "attn1" in name else proc
        for name, proc in original.items()
    })
    both = unet(latents.repeat(2, 1, 1, 1), t, encoder_hidden_states=cond.repeat(2, 1, 1)).sample
    unet.set_attn_processor(original)
    torch.testing.assert_close(both[1:], preds["pred_cond_asag"], rtol=1e-5, atol=1e-5)
    assert (preds["pred_cond_asag"] - preds["pred_cond"]).abs().max() > 1e-4

    # the combination
    expected = preds["pred_cond"] + ASAG_SCALE * (preds["pred_cond"] - preds["pred_cond_asag"])
    if guidance_scale > 1:
        expected = expected + (guidance_scale - 1.0) * (preds["pred_cond"] - preds["pred_uncond"])
    torch.testing.assert_close(out.pred, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_guider_says_when_it_cannot_reach_the_layers():
    from diffusers.models.attention_processor import AttnProcessor

    unet = _tiny_unet().eval()
    cond, uncond = _embeds()
    latents = torch.randn(1, 4, 16, 16, generator=_seeded(5))
    t = torch.tensor(500)
    with pytest.raises(ValueError, match="matches no self-attention module"):
        _run_guided_step(AdversarialSinkhornGuidance(layers="up_blocks.9"), unet, latents, t, cond, uncond)
    # a processor that never calls scaled_dot_product_attention: nothing could be replaced
    unet.set_attn_processor(AttnProcessor())
    with pytest.raises(RuntimeError, match="could not reach"):
        _run_guided_step(AdversarialSinkhornGuidance(), unet, latents, t, cond, uncond)
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in unet.modules())


def test_guider_config_round_trip():
    guider = AdversarialSinkhornGuidance(layers=["mid", "down_blocks.1"], num_iters=3)
    copy = guider.new(asag_scale=2.5)
    assert copy.layers == ["mid", "down_blocks.1"] and copy.asag_scale == 2.5 and copy.settings.num_iters == 3
    defaults = AdversarialSinkhornGuidance()
    assert (defaults.asag_scale, defaults.settings.num_iters, defaults.settings.epsilon, defaults.layers) == (
        1.5, 2, 1.0, None  # None: the model family's default (the UNet mid block for SD/SDXL)
    )
    with pytest.raises(ValueError, match="epsilon"):
        AdversarialSinkhornGuidance(epsilon=-1.0)


@torch.no_grad()
def test_guider_in_a_modular_sdxl_pipeline():
    import diffusers.modular_pipelines as modular
    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    blocks = StableDiffusionXLAutoBlocks().sub_blocks
    # no text-encoder step: the prompt goes in as embeddings
    pipe = modular.SequentialPipelineBlocks.from_blocks_dict(
        {"denoise": blocks["denoise"], "decode": blocks["decode"]}
    ).init_pipeline()
    pipe.update_components(unet=_tiny_unet(sdxl=True), vae=_tiny_vae(), scheduler=EulerDiscreteScheduler())
    cond, uncond = _embeds()
    g = _seeded(1)
    inputs = dict(
        prompt_embeds=cond, negative_prompt_embeds=uncond,
        pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
        height=32, width=32, num_inference_steps=2, output_type="pt", output="images",
    )

    def generate(guider):
        pipe.update_components(guider=guider)
        return pipe(**inputs, generator=_seeded(0))

    cfg_only = generate(ClassifierFreeGuidance(guidance_scale=5.0))
    mid_blocks = LayerSkipConfig(indices=[0, 1], fqn="mid_block.attentions.0.transformer_blocks", skip_attention=False,
                                 skip_attention_scores=True, skip_ff=False)
    pag = generate(PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=ASAG_SCALE,
                                              perturbed_guidance_config=mid_blocks, perturbed_guidance_start=0.0,
                                              perturbed_guidance_stop=1.0))
    asag = generate(AdversarialSinkhornGuidance(guidance_scale=5.0))
    assert torch.isfinite(asag).all()
    assert (asag - cfg_only).abs().max() > 1e-4
    assert (asag - pag).abs().max() > 1e-4
    assert generate(AdversarialSinkhornGuidance(guidance_scale=5.0, asag_scale=0.0)).equal(cfg_only)


@torch.no_grad()
def test_guider_on_joint_attention_matches_the_joint_processor():
    transformer = _tiny_sd3_transformer().eval()
    g = _seeded(6)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    cond, uncond = _embeds()
    pooled = torch.randn(1, POOLED_DIM, generator=g)
    t = torch.tensor([500.0])
    guider = AdversarialSinkhornGuidance(guidance_scale=1.0, layers="transformer_blocks.1")
    guider.set_state(step=0, num_inference_steps=2, timestep=t)
    preds = {}
    for batch in guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)}):
        guider.prepare_models(transformer)
        preds[batch.__guidance_identifier__] = transformer(
            hidden_states=latents, encoder_hidden_states=batch.encoder_hidden_states, pooled_projections=pooled,
            timestep=t, return_dict=False,
        )[0]
        guider.cleanup_models(transformer)
    assert list(preds) == ["pred_cond", "pred_cond_asag"]

    transformer.transformer_blocks[1].attn.set_processor(ASAGProcessor(token_order=IMAGE_FIRST))
    both = transformer(
        hidden_states=latents.repeat(2, 1, 1, 1), encoder_hidden_states=cond.repeat(2, 1, 1),
        pooled_projections=pooled.repeat(2, 1), timestep=t.repeat(2), return_dict=False,
    )[0]
    torch.testing.assert_close(both[:1], preds["pred_cond"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:], preds["pred_cond_asag"], rtol=1e-5, atol=1e-5)
    assert (preds["pred_cond_asag"] - preds["pred_cond"]).abs().max() > 1e-4


def test_import_without_diffusers_names_the_extra():
    import subprocess
    import sys

    # diffusers made unimportable: the core package still imports, the integration says what to install
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import asag_kernels; print('CORE-OK')\n"
        "try:\n    import asag_kernels.diffusers\n"
        "except ImportError as exc:\n    print('IMPORT-ERROR:', exc)\n"
    )
    root = os.path.dirname(os.path.dirname(asag_kernels.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "CORE-OK" in out
    assert "IMPORT-ERROR:" in out and "asag-kernels[diffusers]" in out


def test_example_grid_script_smoke_test(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "asag_sdxl_grid.py")
    spec = importlib.util.spec_from_file_location("asag_sdxl_grid", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "grid.png"
    assert example.main(["--smoke-test", "--out", str(out)]) == 0
    from PIL import Image

    grid = Image.open(out)
    assert grid.size[0] == 3 * 32 and grid.size[1] > 32
    assert "ASAG 1.5, T=2, eps=1" in capsys.readouterr().out
    # without cached weights it explains how to get them instead of downloading
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--model", "asag-kernels-tests/no-such-model", "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "hf download asag-kernels-tests/no-such-model" in capsys.readouterr().err

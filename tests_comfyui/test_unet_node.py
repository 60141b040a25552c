"""The ASAG UNet node on a tiny ComfyUI UNet (random weights), sampled with ComfyUI's own sampler."""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch

import comfy.model_patcher
import comfy.samplers
from tiny_models import heads_first, rel_err, sample, sinkhorn64, softmax64, tiny_unet

STEPS = 3
TOL = 1e-4  # float32 attention against the float64 oracle (SPEC: 1e-5 per op; a margin for the reshapes)
_NAME = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.transformer_blocks\.(\d+)\.attn1$")


def _key(name):
    """ComfyUI's key of a UNet self-attention module: (part, block id, transformer index)."""
    block, t = _NAME.match(name).groups()
    if block == "middle_block":
        return ("middle", 0, int(t))
    part, bid = block.split(".")
    return ({"input_blocks": "input", "output_blocks": "output"}[part], int(bid), int(t))


class AttnRecorder:
    """Every self-attention call of the UNet: q, k, v (the projections) and the attention output
    (the input of to_out), from module hooks, whichever path ComfyUI takes (replace patch or not)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handles = []
        for name, mod in model.get_model_object("diffusion_model").named_modules():
            if _NAME.match(name):
                pending: dict = {}
                for proj in ("q", "k", "v"):
                    self.handles.append(getattr(mod, f"to_{proj}").register_forward_hook(partial(self._proj, pending, proj)))
                self.handles.append(mod.to_out[0].register_forward_pre_hook(partial(self._out, pending, _key(name), mod.heads)))
        assert self.handles

    @staticmethod
    def _proj(pending, proj, module, inputs, output):
        pending[proj] = output.detach().clone()

    def _out(self, pending, key, heads, module, inputs):
        self.calls.append(dict(key=key, heads=heads, out=inputs[0].detach().clone(), **pending))
        pending.clear()

    def close(self):
        for h in self.handles:
            h.remove()

    def classify(self, num_iters=2, epsilon=1.0, legacy=False):
        """[(key, "plain" | "asag", batch)]: each call matched against softmax and Sinkhorn attention."""
        out = []
        for c in self.calls:
            q, k, v = (heads_first(c[p], c["heads"]) for p in "qkv")
            got = heads_first(c["out"], c["heads"])
            plain = softmax64(q, k, v)
            asag = sinkhorn64(q, k, v, num_iters=num_iters, epsilon=epsilon) / (k.shape[2] if legacy else 1)
            e_plain, e_asag = rel_err(got, plain), rel_err(got, asag)
            assert min(e_plain, e_asag) < TOL, f"{c['key']}: output is neither softmax ({e_plain:.2e}) nor ASAG ({e_asag:.2e})"
            assert max(e_plain, e_asag) > 1e-2, f"{c['key']}: softmax and ASAG outputs too close to tell apart"
            out.append((c["key"], "plain" if e_plain < e_asag else "asag", q.shape[0]))
        return out


@pytest.fixture
def recorder():
    made = []

    def make(model):
        made.append(AttnRecorder(model))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _all_keys(model):
    return {_key(n) for n, _ in model.get_model_object("diffusion_model").named_modules() if _NAME.match(n)}


def test_node_pack_registered_by_comfyui_loader(comfy_nodes):
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS["AdversarialSinkhornAttentionGuidance"] == "Adversarial Sinkhorn Attention Guidance (ASAG)"
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["AdversarialSinkhornAttentionGuidance"]
    req = cls.INPUT_TYPES()["required"]
    assert req["scale"][1]["default"] == 1.5 and req["sinkhorn_iters"][1]["default"] == 2
    # comfy_api nodes describe a choice as ("COMBO", {"options": [...]}) where the V1 node had ([...], {...}).
    assert req["unet_block"][1]["options"] == ["input", "middle", "output"] and req["unet_block"][1]["default"] == "middle"
    assert "unet_block_list" in cls.INPUT_TYPES()["optional"]
    assert list(cls.RETURN_TYPES) == ["MODEL"]


def test_tiny_unet_layout():
    """The tiny model has the block structure the other tests assume."""
    assert _all_keys(tiny_unet()) == {("input", 1, 0), ("input", 3, 0), ("input", 3, 1), ("middle", 0, 0),
                                      ("output", 0, 0), ("output", 0, 1), ("output", 1, 0), ("output", 1, 1),
                                      ("output", 2, 0), ("output", 3, 0)}


@pytest.mark.parametrize(
    "inputs, chosen",
    [
        (dict(unet_block_list="d1.1,m0"), {("input", 3, 1), ("middle", 0, 0)}),
        (dict(unet_block_list="u0-1.1"), {("output", 0, 1), ("output", 1, 1)}),
        (dict(unet_block="input", unet_block_id=3), {("input", 3, 0), ("input", 3, 1)}),
        (dict(), {("middle", 0, 0)}),  # the default: middle block, as ComfyUI's PAG node
    ],
)
def test_perturbed_blocks_get_sinkhorn_attention_others_unchanged(asag_nodes, recorder, inputs, chosen):
    """In the chosen blocks the guidance pass's self-attention equals Sinkhorn attention on that
    block's q, k, v (once per step); every other self-attention call of every pass is softmax."""
    model = tiny_unet()
    (patched,) = asag_nodes[0].execute(model, **inputs)
    rec = recorder(patched)
    sample(patched, "unet", steps=STEPS)
    calls = rec.classify()
    asag = [(key, batch) for key, kind, batch in calls if kind == "asag"]
    assert {key for key, _ in asag} == chosen
    for key in chosen:
        assert [b for k, b in asag if k == key] == [1] * STEPS  # the cond batch only, one pass per step
    assert {key for key, _, _ in calls} == _all_keys(model)  # every block ran, the rest with softmax


def test_sinkhorn_settings_and_legacy_output_scale(asag_nodes, recorder):
    model = tiny_unet()
    (patched,) = asag_nodes[1].execute(model, sinkhorn_iters=3, epsilon=0.5, legacy_output_scale=True)
    rec = recorder(patched)
    sample(patched, "unet", steps=2)
    kinds = rec.classify(num_iters=3, epsilon=0.5, legacy=True)
    assert [k for k, kind, _ in kinds if kind == "asag"] == [("middle", 0, 0)] * 2


def _test_patch(num_iters=2, epsilon=1.0):
    """An attn1 replace patch written here from the float64 oracle (independent of the node pack)."""

    def attn(q, k, v, extra_options, mask=None):
        h = extra_options["n_heads"]
        out = sinkhorn64(heads_first(q, h), heads_first(k, h), heads_first(v, h), num_iters=num_iters, epsilon=epsilon)
        return out.transpose(1, 2).reshape(q.shape).to(q.dtype)

    return attn


def _std(x):
    return x.flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("rescale, rescale_mode", [(0.0, "full"), (0.7, "full"), (0.7, "partial"), (0.0, "snf")])
def test_guidance_step_matches_formula(asag_nodes, rescale, rescale_mode):
    """At every step: denoised = cfg + s * (cond - cond_asag) (times the rescale factor), with
    cond_asag recomputed by ComfyUI's calc_cond_batch and an independent Sinkhorn patch."""
    scale = 1.5
    steps = []

    def before(args):
        mo = comfy.model_patcher.set_model_options_patch_replace(args["model_options"].copy(), _test_patch(), "attn1", "middle", 0)
        (ref,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], mo)
        steps.append(dict(cfg=args["denoised"].clone(), cond=args["cond_denoised"].clone(),
                          uncond=args["uncond_denoised"].clone(), ref=ref))
        return args["denoised"]

    def after(args):
        steps[-1]["out"] = args["denoised"].clone()
        return args["denoised"]

    base = tiny_unet()
    base.set_model_sampler_post_cfg_function(before)
    (patched,) = asag_nodes[0].execute(base, scale=scale, rescale=rescale, rescale_mode=rescale_mode)
    patched.set_model_sampler_post_cfg_function(after)
    sample(patched, "unet", steps=STEPS)
    assert len(steps) == STEPS
    for s in steps:
        term = scale * (s["cond"] - s["ref"])
        assert term.abs().max() > 1e-3
        if rescale_mode == "snf":
            # every element takes either the ASAG term or the CFG term, on top of the unconditional prediction
            delta = s["out"] - s["uncond"]
            is_asag = (delta - term).abs() <= 1e-4 * term.abs().max()
            is_cfg = (delta - (s["cfg"] - s["uncond"])).abs() <= 1e-4
            assert bool((is_asag | is_cfg).all()) and bool(is_asag.any()) and bool(is_cfg.any())
            continue
        if rescale == 0:
            expected = s["cfg"] + term
        else:
            guided = (s["cfg"] if rescale_mode == "full" else s["cond"]) + term
            expected = s["cfg"] + term * (rescale * _std(s["cond"]) / _std(guided) + 1 - rescale)
        assert rel_err(s["out"] - s["cfg"], expected - s["cfg"]) < TOL


def test_sigma_window_is_honoured(asag_nodes, recorder):
    model = tiny_unet()
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    seen = []

    def before(args):
        seen.append([float(args["sigma"][0]), args["denoised"].clone()])
        return args["denoised"]

    def after(args):
        seen[-1].append(args["denoised"].clone())
        return args["denoised"]

    base = model.clone()
    base.set_model_sampler_post_cfg_function(before)
    # ASAG where sigma_end < sigma <= sigma_start: only the second step.
    (patched,) = asag_nodes[0].execute(base, sigma_start=float(sigmas[1]), sigma_end=float(sigmas[2]))
    patched.set_model_sampler_post_cfg_function(after)
    rec = recorder(patched)
    sample(patched, "unet", steps=STEPS)
    assert [round(s, 4) for s, _, _ in seen] == [round(float(s), 4) for s in sigmas[:STEPS]]
    changed = [not torch.equal(b, a) for _, b, a in seen]
    assert changed == [False, True, False]
    assert [k for k, kind, _ in rec.classify() if kind == "asag"] == [("middle", 0, 0)]


def test_result_differs_from_no_guidance_and_from_pag(asag_nodes):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    model = tiny_unet()
    plain = sample(model, "unet")
    pag = sample(PerturbedAttentionGuidance.execute(model, 1.5)[0], "unet")
    (asag_model,) = asag_nodes[0].execute(model, scale=1.5)
    asag = sample(asag_model, "unet")
    assert torch.isfinite(asag).all()
    assert rel_err(asag, plain) > 1e-2
    assert rel_err(asag, pag) > 1e-2
    assert torch.equal(asag, sample(asag_model, "unet"))  # deterministic


def _options_snapshot(model):
    mo = model.model_options
    to = mo.get("transformer_options", {})
    return (sorted(mo), list(mo.get("sampler_post_cfg_function", [])), sorted(to),
            {k: dict(v) for k, v in to.get("patches_replace", {}).items()})


def test_original_model_is_not_modified(asag_nodes):
    model = tiny_unet()
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    options = _options_snapshot(model)
    before = sample(model, "unet")
    (patched,) = asag_nodes[0].execute(model, unet_block_list="d0,m0,u2")
    assert patched is not model and patched.model is model.model  # a clone sharing the weights
    assert len(patched.model_options["sampler_post_cfg_function"]) == len(options[1]) + 1
    sample(patched, "unet")
    assert _options_snapshot(model) == options
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(sample(model, "unet"), before)


@pytest.mark.parametrize(
    "inputs, exc, pattern",
    [
        (dict(unet_block_list="x0"), ValueError, r"unet_block_list: cannot parse entry 'x0'"),
        (dict(unet_block_list="m0,,d1"), ValueError, r"unet_block_list: cannot parse entry ''"),
        (dict(unet_block_list="d2"), ValueError, r"unet_block_list: .*'d2'.*d0-d1"),
        (dict(unet_block_list="d1.5"), ValueError, r"transformer 5 of d1, which has transformers 0-1"),
        (dict(unet_block_list="u3-1"), ValueError, r"decreasing block range 3-1"),
        (dict(unet_block_list="d0-u1"), ValueError, r"cannot parse entry 'd0-u1'"),
        (dict(unet_block="input", unet_block_id=2), ValueError, r"unet_block_id 2 is not a input block with self-attention"),
        (dict(unet_block="side"), ValueError, r"unet_block must be one of"),
        (dict(sinkhorn_iters=-1), ValueError, r"sinkhorn_iters"),
        (dict(sinkhorn_iters=1.5), TypeError, r"sinkhorn_iters"),
        (dict(epsilon=0.0), ValueError, r"epsilon"),
        (dict(scale=float("nan")), ValueError, r"scale"),
        (dict(scale=-1.0), ValueError, r"scale"),
        (dict(rescale=1.5), ValueError, r"rescale"),
        (dict(rescale_mode="cfg"), ValueError, r"rescale_mode must be one of"),
        (dict(sigma_start=1.0, sigma_end=2.0), ValueError, r"sigma_end must be below sigma_start"),
        (dict(backend="fastest"), ValueError, r"backend"),
        (dict(backend="cuda"), ValueError, r"backend 'cuda' is not usable here"),
    ],
)
def test_bad_inputs_raise_clear_errors_and_leave_model_alone(asag_nodes, inputs, exc, pattern):
    model = tiny_unet()
    options = _options_snapshot(model)
    with pytest.raises(exc, match=pattern):
        asag_nodes[0].execute(model, **inputs)
    assert _options_snapshot(model) == options


def test_unet_node_rejects_non_models_and_dits(asag_nodes):
    from tiny_models import tiny_flux

    with pytest.raises(TypeError, match="model must be a ComfyUI MODEL"):
        asag_nodes[0].execute(object())
    with pytest.raises(ValueError, match="no UNet self-attention"):
        asag_nodes[0].execute(tiny_flux())

"""The ASAG DiT node on tiny ComfyUI Flux, SD3 (MMDiT) and Wan models with random weights."""

from __future__ import annotations

import pytest
import torch

import comfy.ldm.flux.math
import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.ldm.qwen_image.model
import comfy.ldm.wan.model
from tiny_models import (
    heads_first,
    joint64,
    rel_err,
    sample,
    softmax64,
    tiny_chroma,
    tiny_flux,
    tiny_hunyuanvideo,
    tiny_qwenimage,
    tiny_sd3,
    tiny_unet,
    tiny_wan,
)

TOL = 1e-4
TEXT_TOKENS = 6  # tiny_models.conditioning's context length
# Where each family's blocks call ComfyUI's optimized_attention, and its block lists.
FLUX_LISTS = {"double_block": "double_blocks", "single_block": "single_blocks"}
FAMILIES = {
    "flux": (tiny_flux, comfy.ldm.flux.math, FLUX_LISTS),
    "sd3": (tiny_sd3, comfy.ldm.modules.diffusionmodules.mmdit, {"double_block": "joint_blocks"}),
    "wan": (tiny_wan, comfy.ldm.wan.model, {"double_block": "blocks"}),
    # ComfyUI builds Chroma's and HunyuanVideo's blocks from Flux's layers (attention in comfy.ldm.flux.math).
    "chroma": (tiny_chroma, comfy.ldm.flux.math, FLUX_LISTS),
    "hunyuanvideo": (tiny_hunyuanvideo, comfy.ldm.flux.math, FLUX_LISTS),
    "qwenimage": (tiny_qwenimage, comfy.ldm.qwen_image.model, {"double_block": "transformer_blocks"}),
}
# The name each family's attention module calls ComfyUI's attention by.
ATTENTION_NAME = {"qwenimage": "optimized_attention_masked"}


class DiTAttnRecorder:
    """Every optimized_attention call of the model (inputs and output, after any override), with
    the block it came from (set by forward pre-hooks on the block modules)."""

    def __init__(self, monkeypatch, kind, model):
        _, module, lists = FAMILIES[kind]
        self.calls, self.current, self.handles, self.entries = [], None, [], 0
        dm = model.get_model_object("diffusion_model")
        for block_kind, attr in lists.items():
            for i, blk in enumerate(getattr(dm, attr)):
                self.handles.append(blk.register_forward_pre_hook(lambda m, a, key=(block_kind, i): self._enter(key)))
                self.handles.append(blk.register_forward_hook(lambda m, a, o: self._enter(None)))
        attr = ATTENTION_NAME.get(kind, "optimized_attention")
        inner = getattr(module, attr)

        def recording(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.calls.append(dict(block=self.current, entry=self.entries, args=args, kwargs=kwargs, out=out.detach().clone()))
            return out

        monkeypatch.setattr(module, attr, recording)

    def _enter(self, key):
        self.current = key
        self.entries += 1

    def close(self):
        for h in self.handles:
            h.remove()

    def classify(self, n_text, joint_mode, real_keys=None):
        """[(block, position in block, "plain" | "asag")]; ``real_keys``: the key-padding mask of
        the joint self-attention calls, if any."""
        out, position, last_entry = [], 0, None
        for c in self.calls:
            q, k, v = c["args"][:3]
            heads = c["args"][3] if len(c["args"]) > 3 else c["kwargs"]["heads"]
            if c["kwargs"].get("skip_reshape"):
                got = c["out"] if c["kwargs"].get("skip_output_reshape") else heads_first(c["out"], heads)
            else:
                q, k, v = (heads_first(t, heads) for t in (q, k, v))
                got = heads_first(c["out"], heads)
            mask = real_keys if q.shape[2] == k.shape[2] else None
            plain = softmax64(q, k, v, real_keys=mask)
            e_plain = rel_err(got, plain)
            e_asag = float("inf")
            if q.shape[2] == k.shape[2]:
                e_asag = rel_err(got, joint64(q, k, v, n_text(c["block"], q.shape[2]), joint_mode, real_keys=mask))
            assert min(e_plain, e_asag) < TOL, f"{c['block']}: neither softmax ({e_plain:.2e}) nor ASAG ({e_asag:.2e})"
            assert max(e_plain, e_asag) > 1e-2, f"{c['block']}: softmax and ASAG too close to tell apart"
            position = position + 1 if c["entry"] == last_entry else 0
            last_entry = c["entry"]
            out.append((c["block"], position, "plain" if e_plain < e_asag else "asag"))
        return out


@pytest.fixture
def dit_recorder(monkeypatch):
    made = []

    def make(kind, model):
        made.append(DiTAttnRecorder(monkeypatch, kind, model))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _text_tokens(kind):
    def n_text(block, n):
        return 0 if kind == "wan" else TEXT_TOKENS

    return n_text


CASES = [
    ("flux", dict(double_layers="1", single_layers="0"), "image", {("double_block", 1), ("single_block", 0)}),
    ("flux", dict(double_layers="0", single_layers="1"), "joint", {("double_block", 0), ("single_block", 1)}),
    ("sd3", dict(double_layers="1", single_layers=""), "image", {("double_block", 1)}),
    ("sd3", dict(double_layers="0-1", single_layers=""), "joint", {("double_block", 0), ("double_block", 1)}),
    ("wan", dict(double_layers="0", single_layers=""), "image", {("double_block", 0)}),
    ("chroma", dict(double_layers="1", single_layers="0"), "image", {("double_block", 1), ("single_block", 0)}),
    ("hunyuanvideo", dict(double_layers="0", single_layers="1"), "image", {("double_block", 0), ("single_block", 1)}),
    ("qwenimage", dict(double_layers="1", single_layers=""), "image", {("double_block", 1)}),
]


@pytest.mark.parametrize("kind, layers, joint_mode, chosen", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_dit_blocks_get_joint_sinkhorn_attention(asag_nodes, dit_recorder, kind, layers, joint_mode, chosen):
    """In each chosen block the guidance pass's self-attention (the block's first attention call)
    equals ASAG's joint attention on its q, k, v (text tokens first in ComfyUI's Flux and SD3,
    none in Wan); every other call (other blocks, the cond/uncond passes, Wan's cross-attention)
    is ordinary attention."""
    steps = 2
    model = FAMILIES[kind][0]()
    (patched,) = asag_nodes[2].execute(model, joint_mode=joint_mode, **layers)
    rec = dit_recorder(kind, patched)
    sample(patched, kind, steps=steps)
    calls = rec.classify(_text_tokens(kind), joint_mode)
    asag = [(block, pos) for block, pos, k in calls if k == "asag"]
    assert {b for b, _ in asag} == chosen
    for block in chosen:
        assert [p for b, p in asag if b == block] == [0] * steps
    if kind == "wan":  # the cross-attention of a perturbed block ran unchanged
        assert any(b in chosen and p == 1 and k == "plain" for b, p, k in calls)


@pytest.mark.parametrize("kind", ["flux", "sd3", "wan"])
def test_dit_result_differs_from_no_guidance_and_model_untouched(asag_nodes, kind):
    model = FAMILIES[kind][0]()
    plain = sample(model, kind, steps=2)
    post_cfg = list(model.model_options.get("sampler_post_cfg_function", []))
    (patched,) = asag_nodes[2].execute(model, double_layers="0", single_layers="")
    guided = sample(patched, kind, steps=2)
    assert torch.isfinite(guided).all()
    assert rel_err(guided, plain) > 1e-3
    assert model.model_options.get("sampler_post_cfg_function", []) == post_cfg
    assert torch.equal(sample(model, kind, steps=2), plain)


@pytest.mark.parametrize(
    "kind, inputs, exc, pattern",
    [
        ("flux", dict(double_layers="2"), ValueError, r"double_layers: block 2 does not exist; .* 0-1"),
        ("flux", dict(double_layers="0", single_layers="0,x"), ValueError, r"single_layers: cannot parse 'x'"),
        ("sd3", dict(double_layers="0", single_layers="0"), ValueError, r"single_layers: block 0 does not exist; .*none"),
        ("wan", dict(double_layers="", single_layers=""), ValueError, r"both empty"),
        ("wan", dict(double_layers="0", joint_mode="text"), ValueError, r"joint_mode must be one of"),
        ("flux", dict(double_layers="1-0"), ValueError, r"decreasing block range"),
        ("unet", dict(double_layers="0"), ValueError, r"the ASAG DiT node supports .*Flux.*, got UNetModel"),
    ],
)
def test_dit_bad_inputs(asag_nodes, kind, inputs, exc, pattern):
    model = tiny_unet() if kind == "unet" else FAMILIES[kind][0]()
    n_post = len(model.model_options.get("sampler_post_cfg_function", []))
    with pytest.raises(exc, match=pattern):
        asag_nodes[2].execute(model, **inputs)
    assert len(model.model_options.get("sampler_post_cfg_function", [])) == n_post


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
def test_flux_key_padding_mask_is_honoured(asag_nodes, dit_recorder, joint_mode):
    """Padded text keys (a Flux attention mask that drops keys for every query) get no mass in the
    perturbed attention either."""
    n = TEXT_TOKENS + 16  # 8x8 latent, patch 2
    real = torch.ones(n, dtype=torch.bool)
    real[TEXT_TOKENS - 2:TEXT_TOKENS] = False
    # Additive (0 / -inf), as masking nodes make them (ComfyUI's CPU attention mishandles 3-D bool masks).
    mask = torch.zeros(1, n, n).masked_fill(~real, float("-inf"))
    model = tiny_flux()
    (patched,) = asag_nodes[2].execute(model, double_layers="1", single_layers="1", joint_mode=joint_mode)
    rec = dit_recorder("flux", patched)
    sample(patched, "flux", steps=2, extra_cond={"attention_mask": mask, "attention_mask_img_shape": (4, 4)})
    calls = rec.classify(_text_tokens("flux"), joint_mode, real_keys=real)
    asag = [(block, pos) for block, pos, k in calls if k == "asag"]
    assert sorted(asag) == sorted([(("double_block", 1), 0), (("single_block", 1), 0)] * 2)


def test_flux_mask_that_is_not_key_padding_raises(asag_nodes):
    """A mask ASAG cannot honour (different per query) stops sampling with a clear error instead of
    being ignored."""
    n = TEXT_TOKENS + 16
    mask = torch.zeros(1, n, n)
    mask[:, TEXT_TOKENS:, :2] = float("-inf")  # image queries may not see the first two text tokens
    (patched,) = asag_nodes[2].execute(tiny_flux(), double_layers="0", single_layers="")
    with pytest.raises(ValueError, match="not a key-padding mask"):
        sample(patched, "flux", steps=1, extra_cond={"attention_mask": mask, "attention_mask_img_shape": (4, 4)})


def test_per_sample_key_padding_masks_are_accepted(asag_nodes):
    """ComfyUI's 3-D masks are [B, Lq, Lk]: different key padding per sample is a key-padding mask
    (the pack adds the head dim and hands the mask to the core package's one rule)."""
    import sys

    from asag_kernels.masks import UnsupportedMaskError, key_padding

    attention = sys.modules[asag_nodes[2].__module__.rsplit(".", 1)[0] + ".attention"]
    n = 6
    mask = torch.zeros(2, n, n)
    mask[0, :, 4:] = float("-inf")  # sample 0: the last two keys are padding
    mask[1, :, :1] = -1e4  # sample 1: the first key is padding (-1e4 drops a key, as in the diffusers rule)
    real, padded_queries = key_padding(attention.comfy_mask_as_sdpa(mask), 2, n)
    expected = torch.tensor([[True] * 4 + [False] * 2, [False] + [True] * 5])
    assert torch.equal(real, expected) and padded_queries is None
    mask[1, 2, 3] = float("-inf")  # now sample 1 differs between queries: not key padding
    with pytest.raises(UnsupportedMaskError, match="not a key-padding mask"):
        key_padding(attention.comfy_mask_as_sdpa(mask), 2, n)


def _pack_module(asag_nodes, name):
    import sys

    return sys.modules[asag_nodes[2].__module__.rsplit(".", 1)[0] + "." + name]


@pytest.mark.parametrize("kind", ["flux", "sd3", "wan", "chroma", "hunyuanvideo", "qwenimage"])
def test_family_is_recognised_and_default_layers_are_the_familys(asag_nodes, kind):
    """Each family's tiny model is matched to its entry, and the word 'default' means that entry's
    layers (the tiny models have 2 blocks, so the real models' defaults name a block they lack)."""
    families = _pack_module(asag_nodes, "families")
    model = FAMILIES[kind][0]()
    family = families.dit_family(model.get_model_object("diffusion_model"))
    assert family.name == kind
    first = int(family.default_double.split(",")[0])
    with pytest.raises(ValueError, match=rf"double_layers: block {first} does not exist"):
        asag_nodes[2].execute(model, double_layers="default")


def test_default_layers_agree_with_the_diffusers_table(asag_nodes):
    """Where asag_kernels.diffusers.families has the same family, the pack's default layers are its
    (read from the installed file: importing asag_kernels.diffusers needs diffusers)."""
    import importlib.util
    import sys
    from pathlib import Path

    import asag_kernels

    path = Path(asag_kernels.__file__).parent / "diffusers" / "families.py"
    spec = importlib.util.spec_from_file_location("asag_diffusers_families_probe", path)
    table = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = table  # dataclasses look their module up while the file runs
    spec.loader.exec_module(table)
    families = _pack_module(asag_nodes, "families")
    shared = [f for f in families.DIT_FAMILIES if f.name in table.FAMILIES]
    assert {f.name for f in shared} == {"flux", "sd3", "wan", "hunyuanvideo", "qwenimage"}
    for f in shared:
        (choice,) = [c for c in table.FAMILIES[f.name].defaults if c.fqn == table.FAMILIES[f.name].block_lists[0]]
        assert [int(i) for i in f.default_double.split(",")] == list(choice.indices), f.name
        assert f.default_single == ""

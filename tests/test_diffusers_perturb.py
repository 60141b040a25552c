"""asag_kernels.diffusers.perturbed_attention: ASAG's / PAG's perturbed attention in any diffusers model
(a class-conditional UNet2DModel and DiTTransformer2DModel here, tiny and random), for custom loops."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from diffusers import DiTTransformer2DModel, UNet2DModel  # noqa: E402

import asag_kernels  # noqa: E402
import asag_kernels.settings as asag_settings  # noqa: E402
from asag_kernels._spec import out_tolerance  # noqa: E402
from asag_kernels.diffusers import list_attention_layers, perturbed_attention  # noqa: E402
from asag_kernels.settings import SinkhornSettings  # noqa: E402
from conftest import rel_err  # noqa: E402

CLASSES = 10  # + 1 null class (classifier-free guidance), as a class-conditional digits model would have


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=8, norm_num_groups=8, num_class_embeds=CLASSES + 1).eval()


def _dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=CLASSES + 1).eval()


def _inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.tensor([500] * batch)
    y = torch.arange(batch) % CLASSES
    return x, t, y


def _forward(model, x, t, y):
    if isinstance(model, UNet2DModel):
        return model(x, t, class_labels=y).sample
    return model(x, timestep=t, class_labels=y).sample


MODELS = {"unet": (_unet, ["down_blocks.1.attentions.0"]), "dit": (_dit, [1])}


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(MODELS))
def test_asag_perturbs_exactly_the_chosen_layers(name, monkeypatch):
    """Each replaced call is Sinkhorn attention (adversarial cost) of that call's own q/k/v, within SPEC §4 of
    the float64 reference; only the chosen layers are replaced; the model is unchanged afterwards."""
    build, layers = MODELS[name]
    model = build()
    x, t, y = _inputs()
    before = _forward(model, x, t, y)
    calls = []

    def spy(q, k, v, **kwargs):
        out = asag_kernels.sinkhorn_attention(q, k, v, **kwargs)
        calls.append((q, k, v, kwargs, out))
        return out

    monkeypatch.setattr(asag_settings, "sinkhorn_attention", spy)
    with perturbed_attention(model, layers, num_iters=3, epsilon=0.8) as handle:
        perturbed = _forward(model, x, t, y)
    assert handle.layers and all(n in list_attention_layers(model) for n in handle.layers)
    assert handle.replaced_calls == {n: 1 for n in handle.layers}
    assert len(calls) == len(handle.layers)
    for q, k, v, kwargs, out in calls:
        assert kwargs["cost"] == "adversarial" and kwargs["num_iters"] == 3 and kwargs["epsilon"] == 0.8
        ref = asag_kernels.sinkhorn_attention(q.double(), k.double(), v.double(), **{**kwargs, "backend": "reference"})
        assert rel_err(out, ref) <= out_tolerance(q.dtype)
    assert rel_err(perturbed, before) > 1e-3  # the perturbation changes the prediction
    after = _forward(model, x, t, y)
    assert torch.equal(after, before)  # hooks gone: the same kernels on the same inputs again


@torch.no_grad()
def test_pag_is_identity_attention_and_never_calls_the_op(monkeypatch):
    model = _dit()
    x, t, y = _inputs(1)
    attn = dict(model.named_modules())["transformer_blocks.0.attn1"]
    seen = {}
    handle_fwd = attn.register_forward_hook(lambda m, args, kwargs_out: seen.update(x=args[0], out=kwargs_out),
                                            with_kwargs=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("PAG must not call the Sinkhorn op")

    monkeypatch.setattr(asag_settings, "sinkhorn_attention", forbidden)
    monkeypatch.setattr(asag_settings, "joint_sinkhorn_attention", forbidden)
    try:
        with perturbed_attention(model, [0], method="pag") as handle:
            _forward(model, x, t, y)
    finally:
        handle_fwd.remove()
    assert handle.replaced_calls == {"transformer_blocks.0.attn1": 1}
    # identity attention map: the attention module returns to_out(to_v(hidden_states))
    expected = attn.to_out[0](attn.to_v(seen["x"]))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_settings_subclass_changes_what_the_layers_compute():
    """The hook point for variants (e.g. the earlier ComfyUI node's 1/N output scale)."""

    class Halved(SinkhornSettings):
        def attend(self, q, k, v, **call):
            return super().attend(q, k, v, **call) / 2

    model = _unet()
    x, t, y = _inputs(2)
    with perturbed_attention(model, ["down_blocks.1"], settings=SinkhornSettings(num_iters=1)):
        full = _forward(model, x, t, y)
    with perturbed_attention(model, ["down_blocks.1"], settings=Halved(num_iters=1)):
        half = _forward(model, x, t, y)
    assert rel_err(half, full) > 1e-4


@torch.no_grad()
def test_failures_leave_the_model_as_it_was():
    model = _dit()
    x, t, y = _inputs(3)
    before = _forward(model, x, t, y)
    with pytest.raises(KeyboardInterrupt):
        with perturbed_attention(model, [0]):
            raise KeyboardInterrupt
    assert torch.equal(_forward(model, x, t, y), before)
    with pytest.raises(RuntimeError, match="nothing was perturbed"):
        with perturbed_attention(model, [0]):
            pass  # the model never ran inside the block
    assert torch.equal(_forward(model, x, t, y), before)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in model.modules())


def test_bad_arguments_are_refused_before_anything_changes():
    model = _dit()
    cases = [
        (dict(layers=[0], method="seg"), ValueError, "method"),
        (dict(layers=[0], method=1), TypeError, "method"),
        (dict(layers=["nothing_here"]), ValueError, "layers"),
        (dict(layers=None), ValueError, "no default ASAG layers"),
        (dict(layers=[0], num_iters=-1), ValueError, "num_iters"),
        (dict(layers=[0], method="pag", settings=SinkhornSettings()), ValueError, "settings"),
        (dict(layers=[0], settings=object()), TypeError, "settings"),
    ]
    for kwargs, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            with perturbed_attention(model, **kwargs):
                pass
        assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in model.modules())

"""The guidance-quality lab (benchmarks/quality): the shipped weights are real trained models, sampling is
deterministic, and the benchmark's ASAG branch runs the Sinkhorn op in exactly the chosen layers while its
PAG branch never does. The benchmark itself (benchmarks/guidance_quality.py --quick) runs in scripts/test.sh."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import asag_kernels  # noqa: E402
import asag_kernels.settings as asag_settings  # noqa: E402
from asag_kernels.settings import SinkhornSettings  # noqa: E402
from quality import data, evaluator, metrics, models, sampling  # noqa: E402
from quality.sampling import Guidance  # noqa: E402

LAYERS = {"dit": ("transformer_blocks.1.attn1", "transformer_blocks.2.attn1"), "unet": ("mid_block.attentions.0",)}


@pytest.fixture(scope="module")
def nets():
    return {m: models.load(m) for m in models.MODELS}


@pytest.fixture(scope="module")
def cls():
    return evaluator.load()


def test_shipped_weights_load_and_match_the_architectures(nets, cls):
    from safetensors.torch import load_file

    for m, net in nets.items():
        shipped = load_file(str(models.weights_path(m)))
        assert set(shipped) == set(net.state_dict())
        assert all(torch.equal(net.state_dict()[k], v) for k, v in shipped.items())
    assert set(load_file(str(evaluator.WEIGHTS))) == set(cls.state_dict())


def test_evaluator_held_out_accuracy(cls):
    x, y = data.split("held_out")
    assert len(y) == data.HELD_OUT and not set(data.split("train")[1].shape) & {0}
    assert evaluator.accuracy(cls, x, y) >= 0.95


@torch.no_grad()
def test_trained_unguided_fd_is_far_below_a_random_init_models(nets, cls):
    real = cls.features(data.split("held_out")[0])
    torch.manual_seed(0)
    fds = {}
    for name, net in (("trained", nets["unet"]), ("random", models.build("unet").eval())):
        imgs = sampling.sample(net, Guidance("none"), 80, seed=0, steps=6)
        fds[name] = metrics.frechet_distance(cls.features(imgs), real)
    assert fds["trained"] * 4 < fds["random"], fds


@torch.no_grad()
@pytest.mark.parametrize("method", ["none", "asag"])
def test_short_sampling_is_deterministic(nets, method):
    g = Guidance(method, 2.0, num_iters=2, epsilon=1.0, layers=LAYERS["dit"] if method == "asag" else None)
    a = sampling.sample(nets["dit"], g, 4, seed=3, steps=3)
    b = sampling.sample(nets["dit"], g, 4, seed=3, steps=3)
    c = sampling.sample(nets["dit"], g, 4, seed=4, steps=3)
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


@torch.no_grad()
@pytest.mark.parametrize("m", models.MODELS)
def test_asag_branch_runs_the_op_in_the_chosen_layers_and_pag_never(nets, m, monkeypatch):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([400, 400]), torch.tensor([3, 7])
    calls = []

    def spy(q, k, v, **kw):
        calls.append(q.shape)
        return asag_kernels.sinkhorn_attention(q, k, v, **kw)

    monkeypatch.setattr(asag_settings, "sinkhorn_attention", spy)
    for method in ("asag", "asag_legacy"):
        calls.clear()
        g = Guidance(method, 2.0, num_iters=2, epsilon=1.0, layers=LAYERS[m])
        with sampling._perturbed(nets[m], g) as h:
            models.forward(nets[m], x, t, y)
        assert h.layers == list(LAYERS[m]) and h.replaced_calls == {n: 1 for n in LAYERS[m]}
        assert len(calls) == len(LAYERS[m]) and all(s[-2] == 64 for s in calls)  # 64 tokens at 8x8
    calls.clear()
    sampling.sample(nets[m], Guidance("asag", 2.0, num_iters=1, epsilon=1.0, layers=LAYERS[m]), 2, 0, steps=2)
    assert len(calls) == 2 * len(LAYERS[m])  # once per step per layer: only the perturbed pass

    def forbidden(*a, **k):
        raise AssertionError("PAG must not call the Sinkhorn op")

    monkeypatch.setattr(asag_settings, "sinkhorn_attention", forbidden)
    monkeypatch.setattr(asag_settings, "joint_sinkhorn_attention", forbidden)
    g = Guidance("pag", 2.0, layers=LAYERS[m])
    with sampling._perturbed(nets[m], g) as h:
        pag = models.forward(nets[m], x, t, y)
    assert h.replaced_calls == {n: 1 for n in LAYERS[m]}
    assert not torch.equal(pag, models.forward(nets[m], x, t, y))  # the identity map did change the prediction
    sampling.sample(nets[m], g, 2, 0, steps=2)


def test_legacy_settings_are_the_sinkhorn_output_over_n():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    full = SinkhornSettings(num_iters=2).attend(q, k, v)
    torch.testing.assert_close(sampling.LegacyScaledSettings(num_iters=2).attend(q, k, v), full / 64)

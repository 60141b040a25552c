"""ASAG under diffusers' context parallelism (gloo, 4 CPU ranks, tiny random Flux and Wan transformers).

One world of 4 runs every configuration: ``ContextParallelConfig(ring_degree=2)`` and
``(ulysses_degree=2)`` on a ("ring", "ulysses", "dp") mesh with two data-parallel replicas of a
2-rank context-parallel group each, and ``(ulysses_degree=2, ring_degree=2)`` on all 4 ranks. For
each, the guided step (pred_cond, pred_cond_asag, the combined prediction) must equal the
single-process one within SPEC §4, for Flux in both joint modes (joint text+image attention, double
and single stream) and for Wan (plain self-attention). The perturbed calls go through
:class:`asag_kernels.diffusers.context_parallel.ShardedSinkhorn` (they send bytes through the
distributed op); the unperturbed ones are diffusers' own ring/Ulysses attention, which runs on the
CPU with ``tests/cp_native_lse.py`` (see there).

diffusers 0.42 computes ``rank % torch.accelerator.device_count()`` when it sets context
parallelism up, and that count is 0 on a CPU build; each rank reports one device here.
"""

from __future__ import annotations

import datetime
import os
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import ContextParallelConfig, FluxTransformer2DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models._modeling_parallel import ParallelConfig  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from asag_kernels import distributed as asag_dist  # noqa: E402
from asag_kernels._spec import out_tolerance  # noqa: E402
from asag_kernels.diffusers import AdversarialSinkhornGuidance  # noqa: E402
from asag_kernels.diffusers.context_parallel import ShardedSinkhorn, check_context_parallel  # noqa: E402
from asag_kernels.diffusers.intercept import CallLayout  # noqa: E402
from asag_kernels.settings import SinkhornSettings  # noqa: E402
import cp_native_lse  # noqa: E402
import test_diffusers_models  # noqa: E402
from test_distributed import _rendezvous  # noqa: E402


def _flux():
    """The guider tests' tiny random Flux.1 transformer (one double-stream, one single-stream block)
    with 8 text tokens and 4 x 4 image tokens (both divide over 4 ranks): (model, data, forward)."""
    return test_diffusers_models._flux(text_tokens=8, grid=(4, 4))[:3]


def _wan():
    """A tiny random Wan 2.x transformer (one block; 2 x 2 x 2 = 8 video tokens): (model, data, forward)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=32,
    ).eval()
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 4, 2, 4, 4, generator=g)
    data = {"encoder_hidden_states": (torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g))}

    def forward(batch):
        return model(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=batch.encoder_hidden_states,
                     return_dict=False)[0]

    return model, data, forward


MODELS = {
    # (builder, layers, joint modes): both Flux blocks (double- and single-stream); Wan's self-attention.
    "flux": (_flux, [r"^transformer_blocks\.0\.attn$", r"single_transformer_blocks\.0\.attn$"], ("image", "joint")),
    "wan": (_wan, [r"^blocks\.0\.attn1$"], ("image",)),
}


def _guider(layers, joint_mode):
    return AdversarialSinkhornGuidance(guidance_scale=2.0, layers=layers, num_iters=3, epsilon=0.7, joint_mode=joint_mode,
                                       backend="torch")


def _step(guider, model, data, forward):
    """One denoising step as diffusers' modular loop drives a guider: ({prediction name: output}, guided)."""
    return test_diffusers_models._run(guider, model, data, forward)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


DEGREES = {"ring 2": (2, 1), "ulysses 2": (1, 2), "ulysses 2 x ring 2": (2, 2)}


def _mesh(ring, ulysses, world):
    """A ("ring", "ulysses", "dp") mesh over all `world` ranks: ranks beyond ring x ulysses are
    data-parallel replicas, each running its own context-parallel group (dp 1: the mesh diffusers builds)."""
    return init_device_mesh("cpu", (ring, ulysses, world // (ring * ulysses)), mesh_dim_names=("ring", "ulysses", "dp"))


def _worker(rank, world, init_method):
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    cp_native_lse.enable()
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with torch.no_grad():
            for label, (ring, ulysses) in DEGREES.items():
                mesh = _mesh(ring, ulysses, world)
                for name, (build, layers, modes) in MODELS.items():
                    for joint_mode in modes:
                        ctx = f"rank {rank}, {label}, {name}, joint_mode={joint_mode!r}"
                        model, data, forward = build()
                        single, single_pred = _step(_guider(layers, joint_mode), model, data, forward)
                        model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses,
                                                                              mesh=mesh))
                        assert check_context_parallel(model, joint_mode, sharded=True) == "sharded", ctx
                        asag_dist.reset_bytes_sent()
                        sharded, sharded_pred = _step(_guider(layers, joint_mode), model, data, forward)
                        assert asag_dist.bytes_sent() > 0, f"the perturbed pass did not run the distributed op: {ctx}"
                        for key in ("pred_cond", "pred_uncond", "pred_cond_asag"):
                            err = _rel(sharded[key], single[key])
                            assert err <= out_tolerance(torch.float32), f"{key} rel err {err:.2e}: {ctx}"
                        err = _rel(sharded_pred, single_pred)
                        assert err <= out_tolerance(torch.float32), f"guided prediction rel err {err:.2e}: {ctx}"
                        gap = _rel(single["pred_cond_asag"], single["pred_cond"])
                        assert gap > 1e-3, f"the perturbed branch must differ from the conditional one ({gap:.2e}): {ctx}"
        dist.barrier()  # tear down together (a rank leaving early can abort gloo in a peer)
    except Exception:
        raise AssertionError(f"rank {rank}: {traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def test_guider_is_exact_under_ring_ulysses_and_unified_context_parallelism():
    mp.spawn(_worker, args=(4, _rendezvous()), nprocs=4, join=True)


# ------------------------------------------------------------------------------------------------
# Without a process group: what is refused, and where.


def _with_config(model, **cp):
    """A model as diffusers leaves it after enable_parallelism (the config it records), without a
    process group or its split hooks: what check_context_parallel reads."""
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**cp))
    return model


def test_check_context_parallel_without_parallelism():
    model, _, _ = _flux()
    assert check_context_parallel(model) is None
    assert check_context_parallel(model, sharded=True) is None


@pytest.mark.parametrize("cp", [dict(ring_degree=2), dict(ring_degree=2, ulysses_degree=2)], ids=["ring", "unified"])
def test_sdpa_route_refuses_ring(cp):
    """The SDPA interception alone (PAG processors, perturbed_attention) cannot see ring calls."""
    model = _with_config(_flux()[0], **cp)
    with pytest.raises(ValueError, match="SDPA interception cannot run .* ring context parallelism.*silently wrong"):
        check_context_parallel(model, joint_mode="joint")


def test_sdpa_route_needs_the_native_backend():
    model = _with_config(_flux()[0], ulysses_degree=2)
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_attention_backend"):
            module.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match=r"needs the 'native' attention backend.*\['flash'\]"):
        check_context_parallel(model, joint_mode="joint")


def test_guider_refuses_a_joint_model_whose_text_is_not_sharded_and_leaves_it_unchanged():
    """Joint attention whose cp_plan keeps the text whole on every rank would count it once per rank."""
    model, data, forward = _flux()
    layers = MODELS["flux"][1]
    with torch.no_grad():
        before = _step(AdversarialSinkhornGuidance(guidance_scale=1.0, asag_scale=0.0), model, data, forward)[0]
        _with_config(model, ring_degree=2)  # no split hooks: nothing shards encoder_hidden_states
        with pytest.raises(ValueError, match="does not shard encoder_hidden_states"):
            _step(_guider(layers, "joint"), model, data, forward)
        model._parallel_config = None
        after = _step(AdversarialSinkhornGuidance(guidance_scale=1.0, asag_scale=0.0), model, data, forward)[0]
    assert torch.equal(before["pred_cond"], after["pred_cond"])
    assert all(h.__class__.__name__ != "SinkhornAttentionHook" for m in model.modules()
               for h in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).values())


class _Hook:
    def __init__(self, current):
        self.current = current


def _call(**overrides):
    """Keywords of one sharded self-attention dispatch call ([B, S_local, H, D]) with a CP config."""
    q = torch.randn(1, 6, 2, 8)
    config = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1),
                             _asag_text_sharded=True)
    kw = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              _parallel_config=config)
    kw.update(overrides)
    return kw


def _sharded(layout, text_lengths=(), joint_mode="image"):
    module = SimpleNamespace(processor=SimpleNamespace(_parallel_config=_call()["_parallel_config"]))
    return ShardedSinkhorn(module, SinkhornSettings(joint_mode=joint_mode), layout, text_lengths)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(attn_mask=torch.ones(1, 1, 1, 6, dtype=torch.bool)), ValueError, r"ring_degree=2, ulysses_degree=1\): it passes an attention mask"),
        (dict(is_causal=True), NotImplementedError, "it is causal"),
        (dict(key=torch.randn(1, 6, 1, 8), value=torch.randn(1, 6, 1, 8)), NotImplementedError, "grouped-query"),
        (dict(return_lse=True), ValueError, "asks for the attention's LSE"),
    ],
)
def test_sharded_route_refuses(overrides, error, match):
    """What the sharded route cannot make exact raises, naming the module and the configuration."""
    sharded = _sharded(CallLayout("blocks.0.attn1"))
    with pytest.raises(error, match=match) as info:
        sharded._handle(lambda **kw: None, _call(**overrides))
    assert "blocks.0.attn1" in str(info.value)


def test_sharded_route_passes_what_is_not_sharded_self_attention():
    sharded = _sharded(CallLayout("blocks.0.attn2"))
    from asag_kernels.diffusers.dispatch import PASS

    assert sharded._handle(None, _call(_parallel_config=None)) is PASS  # no context parallelism on this call
    assert sharded._handle(None, _call(key=torch.randn(1, 3, 2, 8), value=torch.randn(1, 3, 2, 8))) is PASS  # cross-attention


def test_sharded_route_needs_a_local_text_length_for_image_mode():
    """Flux.2's single-stream blocks learn their text length from the denoiser's (unsharded) inputs."""
    cp = SimpleNamespace(ring_degree=2, ulysses_degree=2)
    config = _call()["_parallel_config"]
    from_root = _sharded(CallLayout("single_transformer_blocks.0.attn", 4, "text_first"), (_Hook(None), _Hook(4)))
    with pytest.raises(ValueError, match="comes from the denoiser's arguments.*joint_mode='joint'"):
        from_root._image_range(4, 6, config, cp)
    unknown = _sharded(CallLayout("blocks.0.attn", 2, None))
    with pytest.raises(ValueError, match="needs the token order"):
        unknown._image_range(2, 6, config, cp)
    local = _sharded(CallLayout("single_transformer_blocks.0.attn", 2, "text_first"), (_Hook(2), _Hook(8)))
    assert local._image_range(2, 6, config, cp) == (2, 6)
    assert _sharded(CallLayout("x", 2, "image_first"))._image_range(2, 6, config, cp) == (0, 4)
    config._asag_text_sharded = False
    with pytest.raises(ValueError, match="text tokens are not sharded"):
        local._image_range(2, 6, config, cp)


def test_no_context_parallelism_no_interception():
    """Without a CP config on the module's processor (or for PAG's identity attention) entering does nothing."""
    from asag_kernels.diffusers import dispatch

    plain = ShardedSinkhorn(SimpleNamespace(processor=None), SinkhornSettings(), CallLayout("m"))
    with plain:
        assert not plain.active and not dispatch._originals
    module = SimpleNamespace(processor=SimpleNamespace(_parallel_config=_call()["_parallel_config"]))
    assert not ShardedSinkhorn(module, object(), CallLayout("m")).active
    active = ShardedSinkhorn(module, SinkhornSettings(), CallLayout("m"))
    with active:
        assert active.active and dispatch._originals  # the registry holds wrappers while inside
    assert not dispatch._originals

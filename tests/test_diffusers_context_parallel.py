"""ASAG under diffusers' context parallelism (gloo, 2 CPU ranks, a tiny random Flux transformer).

diffusers 0.42 computes ``rank % torch.accelerator.device_count()`` when it sets context
parallelism up, and that count is 0 on a CPU build; each rank reports one device here (the measured
condition under which CP runs on CPU with gloo). Ulysses hands the attention call whole sequences,
so the guider's perturbed prediction must equal the single-process one; ring and joint_mode="image"
under Ulysses must raise, never guide with a wrong branch.
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig, FluxTransformer2DModel
from diffusers.models._modeling_parallel import ParallelConfig

from asag_kernels.diffusers import AdversarialSinkhornGuidance
from asag_kernels.diffusers.context_parallel import check_context_parallel
import test_diffusers_models
from test_distributed import _rendezvous



def _flux():
    """The tiny random Flux transformer of the guider's model tests: (model, data, forward)."""
    model, data, forward, _, _ = test_diffusers_models._flux()
    return model, data, forward


def _step(guider, model, data, forward):
    """One denoising step as diffusers' modular loop drives a guider: {prediction name: output}."""
    return test_diffusers_models._run(guider, model, data, forward)[0]


def _guider(joint_mode):
    # Both blocks: the double-stream (joint) one and the single-stream one.
    return AdversarialSinkhornGuidance(guidance_scale=1.0, layers=[r"^transformer_blocks\.0\.attn$", r"single_transformer_blocks\.0\.attn$"], num_iters=3, epsilon=0.7,
                                       joint_mode=joint_mode, backend="torch")


def _worker(rank, world, init_method):
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with torch.no_grad():
            model, data, forward = _flux()
            single = _step(_guider("joint"), model, data, forward)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            assert check_context_parallel(model, joint_mode="joint") == "ulysses"
            sharded = _step(_guider("joint"), model, data, forward)
            for name in ("pred_cond", "pred_cond_asag"):
                err = (sharded[name] - single[name]).abs().max().item()
                assert err <= 1e-5, f"rank {rank}: {name} differs from the single process by {err:.3e}"
            gap = (single["pred_cond_asag"] - single["pred_cond"]).abs().max().item()
            assert gap > 1e-3, f"the perturbed branch must differ from the conditional one, got {gap:.3e}"
            # joint_mode="image" would pick the wrong tokens from the interleaved sequence: refused,
            # and the model is left without hooks (it still gives pred_cond).
            with pytest.raises(ValueError, match="joint_mode='image' cannot run .* Ulysses"):
                _step(_guider("image"), model, data, forward)
            again = _step(AdversarialSinkhornGuidance(guidance_scale=1.0, asag_scale=0.0), model, data, forward)
            assert torch.equal(again["pred_cond"], sharded["pred_cond"])
        dist.barrier()  # tear down together (a rank leaving early can abort gloo in a peer)
    except Exception:
        raise AssertionError(f"rank {rank}: {traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def test_ulysses_context_parallel_matches_single_process():
    mp.spawn(_worker, args=(2, _rendezvous()), nprocs=2, join=True)


def _with_config(model, **cp):
    """A model as diffusers leaves it after enable_parallelism (the config it records), without a
    process group: what check_context_parallel reads."""
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**cp))
    return model


def test_check_context_parallel_without_parallelism():
    model, _, _ = _flux()
    assert check_context_parallel(model) is None


@pytest.mark.parametrize("cp", [dict(ring_degree=2), dict(ring_degree=2, ulysses_degree=2)], ids=["ring", "unified"])
def test_ring_context_parallel_is_refused(cp):
    model = _with_config(_flux()[0], **cp)
    with pytest.raises(ValueError, match="ring context parallelism.*silently wrong.*ulysses_degree"):
        check_context_parallel(model, joint_mode="joint")


def test_guider_refuses_ring_and_leaves_the_model_unchanged():
    model, data, forward = _flux()
    with torch.no_grad():
        before = _step(AdversarialSinkhornGuidance(guidance_scale=1.0, asag_scale=0.0), model, data, forward)
        _with_config(model, ring_degree=2)
        with pytest.raises(ValueError, match="ring context parallelism"):
            _step(_guider("joint"), model, data, forward)
        model._parallel_config = None
        after = _step(AdversarialSinkhornGuidance(guidance_scale=1.0, asag_scale=0.0), model, data, forward)
    assert torch.equal(before["pred_cond"], after["pred_cond"])


def test_ulysses_needs_the_native_backend():
    model = _with_config(_flux()[0], ulysses_degree=2)
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_attention_backend"):
            module.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match=r"needs the 'native' attention backend.*\['flash'\]"):
        check_context_parallel(model, joint_mode="joint")

"""ASAG under diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``).

What each diffusers 0.42 mode hands the attention call inside a module, and what that means for the
SDPA interception of :mod:`asag_kernels.diffusers.intercept`:

* Ulysses (``ulysses_degree > 1``, ``ring_degree == 1``; ``ulysses_anything`` too) with the
  ``native`` attention backend: ``TemplatedUlyssesAttention`` all-to-alls each rank's sequence
  shard into a head shard of the *whole* sequence and its forward op calls
  ``F.scaled_dot_product_attention`` on it, so the interception sees full sequences and Sinkhorn
  over them is exact. The sequence arrives in rank order, though: for joint text+image attention
  each rank's text shard is followed by its image shard (the cp_plan splits both), so the text
  tokens are no longer one block at the front or the back. ``joint_mode="joint"`` (Sinkhorn over
  the whole sequence, which does not depend on token order) stays exact; ``joint_mode="image"``
  would select the wrong tokens and is refused.
* Ring (``ring_degree > 1``, alone or unified with Ulysses): ``TemplatedRingAttention`` calls the
  backend's forward op once per key/value shard with ``return_lse=True`` and merges the pieces as
  softmax partials. The ``native`` op refuses ``return_lse`` and the other ops call aten/flash
  kernels the interception never sees (an unperturbed, silently wrong ASAG branch); even a seen
  call would be a softmax merge of per-shard Sinkhorn solves, which is not Sinkhorn attention.
  Refused; :func:`asag_kernels.distributed.sinkhorn_attention` with ``strategy="ring"`` is the
  correct ring Sinkhorn for custom processors.
* Any other attention backend under Ulysses: its forward op calls its own kernel, not
  ``F.scaled_dot_product_attention``: refused, naming ``set_attention_backend("native")``.
"""

from __future__ import annotations

import torch

from . import families

__all__ = ["check_context_parallel"]


def _parallel_config(module: torch.nn.Module):
    """The ParallelConfig diffusers recorded on the model or on its attention processors, or None."""
    config = getattr(module, "_parallel_config", None)
    if config is not None:
        return config
    for sub in module.modules():
        config = getattr(getattr(sub, "processor", None), "_parallel_config", None)
        if config is not None:
            return config
    return None


def _attention_backends(module: torch.nn.Module) -> set[str]:
    """Names of the attention backends the module's processors dispatch to."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    names = set()
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend or active
        names.add(str(getattr(backend, "value", backend)))
    return names


def _has_joint_attention(module: torch.nn.Module) -> bool:
    family = families.family_of(module)
    if family is not None and families.get_family(family).token_order is not None:
        return True
    return any(getattr(sub, "added_kv_proj_dim", None) for sub in module.modules())


def check_context_parallel(module: torch.nn.Module, joint_mode: str = "image") -> str | None:
    """How ASAG's interception runs on `module` (a diffusers model, or a module inside one) under
    context parallelism: ``None`` (not enabled), ``"ulysses"`` (exact, see the module docstring),
    or a ValueError saying why the configuration would give a wrong perturbed branch.

    Args:
        module: the denoiser (or any module; the config is looked up on it and its processors).
        joint_mode: the guider's ``joint_mode``; ``"image"`` on a model with joint text+image
            attention is refused under Ulysses (the gathered sequence interleaves text and image).
    """
    config = _parallel_config(module)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    ring, ulysses = cp.ring_degree or 1, cp.ulysses_degree or 1
    name = type(module).__name__
    if ring > 1:
        raise ValueError(
            f"ASAG cannot run on {name} under diffusers' ring context parallelism (ring_degree={ring}, "
            f"ulysses_degree={ulysses}): diffusers' ring computes each attention as per-shard pieces merged like "
            f"softmax attention, through kernels the ASAG interception does not see, so the perturbed branch "
            f"would be silently wrong. Use ContextParallelConfig(ulysses_degree=...) (exact for ASAG), or "
            f"asag_kernels.distributed.sinkhorn_attention(strategy='ring') in a custom processor"
        )
    if ulysses <= 1:
        return None
    others = _attention_backends(module) - {"native"}
    if others:
        raise ValueError(
            f"ASAG under Ulysses context parallelism needs the 'native' attention backend (its forward op calls "
            f"torch.nn.functional.scaled_dot_product_attention, which ASAG replaces); {name} uses {sorted(others)}: "
            f"call model.set_attention_backend('native') before enable_parallelism"
        )
    if joint_mode != "joint" and _has_joint_attention(module):
        raise ValueError(
            f"joint_mode={joint_mode!r} cannot run on {name} under Ulysses context parallelism "
            f"(ulysses_degree={ulysses}): each rank's text and image shards arrive interleaved in the gathered "
            f"sequence, so the image-token range is unknown to the attention call; pass joint_mode='joint' "
            f"(Sinkhorn over the whole sequence, exact under Ulysses)"
        )
    return "ulysses"

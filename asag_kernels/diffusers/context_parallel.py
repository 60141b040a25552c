"""ASAG under diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``).

Under context parallelism each rank holds a consecutive shard of the sequence: diffusers' sharder
splits the plan's inputs over the flattened ``("ring", "ulysses")`` mesh, rank
``ring_rank * ulysses_degree + ulysses_rank`` taking the shard of that index (joint models split
text and image alike, so a joint processor's local sequence is ``[text_r, image_r]``). Inside
attention, diffusers' Ulysses all-to-alls to a head share of whole sequences, its ring merges
per-shard pieces as softmax partials (``return_lse``), and unified mode does both.

Two routes, both exact or refused:

* **Sharded** (the guider's hooks with :class:`~asag_kernels.settings.SinkhornSettings`, any
  ``ring_degree``/``ulysses_degree``, any attention backend that supports context parallelism):
  :class:`ShardedSinkhorn` takes a perturbed module's call at diffusers' attention dispatch
  (:mod:`.dispatch`), before diffusers' own Ulysses or ring runs, and computes it with
  :func:`asag_kernels.distributed.sinkhorn_attention` (or its ``joint_sinkhorn_attention`` for
  ``joint_mode="image"`` on joint text+image attention) on the rank's local q/k/v over the CP mesh
  (``group=DeviceMesh``: Ulysses, ring or hybrid as its degrees say). Exact: the same operation as
  on one process. Refused with an error naming the module and the configuration: an attention mask
  under context parallelism, causal or grouped-query attention, a text length known only for the
  whole sequence with ``joint_mode="image"`` (it comes from the denoiser's arguments: Flux.2's
  single-stream blocks), a joint model whose context-parallel plan does not shard
  ``encoder_hidden_states``, a mesh whose shard order differs from the sharder's.
* **SDPA only** (the PAG processor pairs of ``enable_asag`` and ``perturbed_attention``, which
  replace ``F.scaled_dot_product_attention`` calls): exact under Ulysses with the ``native``
  backend (its forward op calls SDPA on whole sequences) and ``joint_mode="joint"`` (the gathered
  sequence interleaves each rank's text and image shards); ring and unified modes, other
  backends and ``joint_mode="image"`` on joint attention are refused (the ring's per-shard calls
  never reach SDPA as whole sequences: an unperturbed or silently wrong branch otherwise).

diffusers 0.42.1's own ring attention needs a backend whose forward op returns the LSE: ``native``
refuses ``return_lse`` and ``_native_flash`` calls a CUDA-only op, so ring and unified context
parallelism run on GPUs (flash, cuDNN, ...); the CPU tests give the native backend an LSE
(``tests/cp_native_lse.py``) to run the unperturbed passes.
"""

from __future__ import annotations

import torch

from ..settings import SinkhornSettings
from . import dispatch, families
from .families import IMAGE_FIRST, TEXT_FIRST

__all__ = ["check_context_parallel", "ShardedSinkhorn"]

# Recorded on diffusers' ParallelConfig by check_context_parallel, read by ShardedSinkhorn: whether
# the model's context-parallel plan shards encoder_hidden_states (the attention call cannot see it).
_TEXT_SHARDED = "_asag_text_sharded"


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


def _text_is_sharded(module: torch.nn.Module) -> bool:
    """Whether a context-parallel split hook of diffusers shards some module's encoder_hidden_states."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, ContextParallelSplitHook) and "encoder_hidden_states" in hook.metadata:
                return True
    return False


def _degrees(cp) -> str:
    return f"ring_degree={cp.ring_degree or 1}, ulysses_degree={cp.ulysses_degree or 1}"


def check_context_parallel(module: torch.nn.Module, joint_mode: str = "image", *, sharded: bool = False) -> str | None:
    """How ASAG runs on `module` (a diffusers model, or a module inside one) under context
    parallelism: ``None`` (not enabled), ``"sharded"`` / ``"ulysses"`` (the exact route, see the
    module docstring), or a ValueError saying why the configuration would give a wrong perturbed
    branch.

    Args:
        module: the denoiser (or any module; the config is looked up on it and its processors).
        joint_mode: the guider's ``joint_mode``.
        sharded: True for the guider's hooks (the sharded route: any degrees and backend); False for
            the SDPA interception alone (PAG processors, ``perturbed_attention``): Ulysses with the
            native backend only, ``joint_mode="image"`` refused on joint attention.
    """
    config = _parallel_config(module)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    name = type(module).__name__
    joint = _has_joint_attention(module)
    text_sharded = _text_is_sharded(module)
    setattr(config, _TEXT_SHARDED, text_sharded)
    ring, ulysses = cp.ring_degree or 1, cp.ulysses_degree or 1
    if sharded:
        if joint and not text_sharded:
            raise ValueError(
                f"ASAG cannot run on {name} under context parallelism ({_degrees(cp)}): it has joint text+image "
                f"attention but its context-parallel plan does not shard encoder_hidden_states, so a rank's text "
                f"tokens would count once per rank; pass a cp_plan that splits encoder_hidden_states"
            )
        return "sharded"
    if ring > 1:
        raise ValueError(
            f"ASAG's SDPA interception cannot run on {name} under diffusers' ring context parallelism ({_degrees(cp)}): "
            f"diffusers' ring computes each attention as per-shard pieces merged like softmax attention, through "
            f"kernels the interception does not see, so the perturbed branch would be silently wrong. Use the "
            f"AdversarialSinkhornGuidance guider (exact with any ring_degree and ulysses_degree), "
            f"ContextParallelConfig(ulysses_degree=...), or asag_kernels.distributed.sinkhorn_attention in a custom processor"
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
    if joint_mode != "joint" and joint:
        raise ValueError(
            f"joint_mode={joint_mode!r} cannot run on {name} under Ulysses context parallelism "
            f"(ulysses_degree={ulysses}) through the SDPA interception: each rank's text and image shards arrive "
            f"interleaved in the gathered sequence, so the image-token range is unknown to the attention call; pass "
            f"joint_mode='joint' (Sinkhorn over the whole sequence, exact under Ulysses) or use the "
            f"AdversarialSinkhornGuidance guider (exact for both joint modes)"
        )
    return "ulysses"


class ShardedSinkhorn:
    """Inside it (``with``), a perturbed module's attention calls under context parallelism run as
    distributed Sinkhorn attention on this rank's shards (the sharded route of the module docstring).

    Args:
        module: the attention module whose forward runs inside (its processor's ``_parallel_config``
            says whether context parallelism is on; without it, or for settings other than
            :class:`~asag_kernels.settings.SinkhornSettings`, entering does nothing).
        settings: what the perturbed attention computes.
        layout: the call's :class:`~asag_kernels.diffusers.intercept.CallLayout` (local text tokens).
        text_lengths: the :class:`~asag_kernels.diffusers.intercept.TextLengthHook` s that layout's
            text length was read from (block first, then the denoiser).
        sdpa_mode: the SDPA interception active around the same forward: under context parallelism
            an SDPA call it replaced saw a local shard only, which is refused on exit.
    """

    def __init__(self, module, settings, layout, text_lengths=(), sdpa_mode=None):
        config = getattr(getattr(module, "processor", None), "_parallel_config", None)
        cp = getattr(config, "context_parallel_config", None)
        self.active = cp is not None and isinstance(settings, SinkhornSettings)
        self.settings, self.layout, self.text_lengths, self.sdpa_mode = settings, layout, text_lengths, sdpa_mode
        self.replaced_calls = 0
        self._context = None

    def __enter__(self):
        if self.active:
            self._context = dispatch.intercepting(self._handle)
            self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None
        if self.active and exc[0] is None and self.sdpa_mode is not None and self.sdpa_mode.replaced_calls:
            raise NotImplementedError(
                f"ASAG cannot replace the attention in {self.layout.module_name!r} under context parallelism: it "
                f"calls scaled_dot_product_attention outside diffusers' attention dispatch, on this rank's sequence "
                f"shard only"
            )
        return False

    def _refuse(self, what: str, cp):
        raise ValueError(
            f"ASAG cannot replace the attention in {self.layout.module_name!r} under context parallelism "
            f"({_degrees(cp)}): {what}"
        )

    def _handle(self, backend_fn, kw):
        config = kw.get("_parallel_config")
        cp = getattr(config, "context_parallel_config", None)
        q, k, v = kw["query"], kw["key"], kw["value"]  # [B, S_local, H, D]
        if cp is None or q.shape[1] != k.shape[1]:
            return dispatch.PASS  # not a sharded self-attention call: the SDPA interception decides
        name = self.layout.module_name
        if kw.get("is_causal", False):
            raise NotImplementedError(f"ASAG cannot replace the attention in {name!r}: it is causal")
        if kw.get("enable_gqa", False) or q.shape[2] != k.shape[2]:
            raise NotImplementedError(f"ASAG cannot replace the attention in {name!r}: grouped-query attention")
        if kw.get("attn_mask") is not None:
            self._refuse("it passes an attention mask, which the distributed Sinkhorn attention does not take", cp)
        if kw.get("return_lse", False):
            self._refuse("the caller asks for the attention's LSE, which Sinkhorn attention has no counterpart for", cp)
        from ..distributed import joint_sinkhorn_attention, sinkhorn_attention
        from ..distributed.topology import resolve

        mesh = cp._mesh
        # Our shard order must be the sharder's (flattened ring x ulysses mesh): true for meshes
        # init_device_mesh builds; checked because a hand-made mesh could order its ranks otherwise.
        position, sharder = resolve(mesh).rank, cp._flattened_mesh.get_local_rank()
        if position != sharder:
            self._refuse(f"this rank holds sequence shard {sharder} but is at position {position} of the mesh's "
                         f"ring x ulysses order", cp)
        s = self.settings
        kwargs = dict(group=mesh, num_iters=s.num_iters, cost="adversarial", scale=kw.get("scale"), epsilon=s.epsilon,
                      backend=s.backend)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S_local, D]
        text, n = self.layout.text_tokens, q.shape[1]
        if text == 0 or s.joint_mode == "joint":
            # Sinkhorn over the whole sequence does not depend on where each token sits.
            if text and not getattr(config, _TEXT_SHARDED, False):
                self._refuse("its joint text+image sequence's text is not sharded by the model's context-parallel plan "
                             "(or check_context_parallel has not looked)", cp)
            out = sinkhorn_attention(qh, kh, vh, **kwargs)
        else:
            image_start, image_stop = self._image_range(text, n, config, cp)
            out = joint_sinkhorn_attention(qh, kh, vh, image_start=image_start, image_stop=image_stop,
                                           joint_mode="image", **kwargs)
        self.replaced_calls += 1
        return out.transpose(1, 2).to(v.dtype)

    def _image_range(self, text: int, n: int, config, cp) -> tuple[int, int]:
        """This rank's image tokens in its local sequence, for joint_mode='image'."""
        order = self.layout.token_order
        if order not in (TEXT_FIRST, IMAGE_FIRST):
            self._refuse("joint_mode='image' needs the token order (text first or image first) of its joint "
                         "attention, which is not known for this model; pass joint_mode='joint'", cp)
        if self.text_lengths and self.text_lengths[0].current is None:
            self._refuse("its text length comes from the denoiser's arguments, i.e. for the whole sequence, not for "
                         "this rank's shard; pass joint_mode='joint' (exact: it needs no token ranges)", cp)
        if not getattr(config, _TEXT_SHARDED, False):
            self._refuse("its text tokens are not sharded by the model's context-parallel plan "
                         "(or check_context_parallel has not looked)", cp)
        if not 0 <= text <= n:
            raise NotImplementedError(f"ASAG: {self.layout.module_name!r} got {text} text tokens in a shard of {n} tokens")
        return (text, n) if order == TEXT_FIRST else (0, n - text)

"""What the three routes into diffusers share, so that none of them depends on another.

The guider (:mod:`.guider`), the PAG processors with :func:`enable_asag` (:mod:`.processors`) and
:func:`perturbed_attention` (:mod:`.perturb`) each change a denoiser for a while and must leave it as
it was. They import from here, never from each other:

* :func:`check_denoiser`: what is checked on the denoiser before anything is changed (a named
  backend can run its device/dtype; diffusers' context parallelism is one the interception gets right);
* :func:`check_bool`: a flag argument;
* :func:`hook_layers`: the chosen self-attention layers hooked with the interception (guider and
  ``perturbed_attention``: every sample of the call is perturbed);
* :class:`FailureGuard`: the one hook on the denoiser that undoes a change when a denoiser call
  fails (any exception, Ctrl-C too), for the routes whose change outlives one Python ``with`` block;
* :func:`nothing_perturbed` / :func:`check_perturbed`: the one error for a chosen layer whose
  attention call was never replaced (an unperturbed prediction would otherwise guide quietly).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.hooks import ModelHook

from .. import backends
from . import families
from .context_parallel import check_context_parallel
from .intercept import SinkhornAttentionHook, install, replace_hook
from .layers import select_attention_layers, single_stream_blocks

__all__ = ["check_bool", "check_denoiser", "hook_layers", "FailureGuard", "nothing_perturbed", "check_perturbed"]


def check_bool(value, name: str) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name`` (1 and "yes" are not flags)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_device_support(backend: str, module: torch.nn.Module) -> None:
    """A named backend that cannot run the module's device/dtype raises now, before anything is changed."""
    if backend == "auto":
        return
    param = next(module.parameters(), None)
    if param is None:
        return
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    reason = backends.unsupported_reason(backend, param.device, dtype)
    if reason is not None:
        raise ValueError(
            f"backend={backend!r} cannot run this model ({param.device.type}, {dtype}): {reason}; "
            f"usable here: {backends.available_backends()} (or pass backend='auto')"
        )


def check_denoiser(denoiser: torch.nn.Module, settings, *, sharded: bool = False) -> None:
    """Raise a ValueError if ``settings`` (a :class:`~asag_kernels.settings.SinkhornSettings`, or any
    object with a ``joint_mode`` and optionally a ``backend``) cannot perturb ``denoiser`` as it is now.

    Cheap (one parameter and the parallel config are looked at), so callers check at every change:
    the denoiser may have moved (``pipe.to("cuda")``, another dtype) since the last one. ``sharded``:
    True for the guider, whose hooks compute context-parallel calls over the CP mesh (any degrees);
    False for the SDPA interception alone (see :func:`.context_parallel.check_context_parallel`).
    """
    _check_device_support(getattr(settings, "backend", "auto"), denoiser)
    check_context_parallel(denoiser, settings.joint_mode, sharded=sharded)


def hook_layers(denoiser: torch.nn.Module, layers, settings, name: str) -> list:
    """Hook the self-attention modules ``layers`` picks in ``denoiser`` (``None``: the model family's
    default) so that their SDPA self-attention calls return ``settings.attend(...)`` on every sample.

    Returns :func:`~.intercept.install`'s ``[(module, hook), ...]`` (hooks named ``name``) for
    :func:`~.intercept.uninstall`; a bad ``layers`` raises before anything is hooked."""
    modules = select_attention_layers(denoiser, families.model_default_layers(denoiser) if layers is None else layers)
    return install(modules, settings, name, families.token_order_of(denoiser), single_stream_blocks(denoiser, modules),
                   root=denoiser)


class FailureGuard(ModelHook):
    """On a denoiser: when its forward raises (any exception, Ctrl-C too), ``on_failure(denoiser)``
    undoes the route's change before the exception leaves, so the model is left as it was.

    Args:
        on_failure: ``(denoiser) -> None``, the clean-up; it must not raise.
        before: ``(denoiser) -> None`` run ahead of every call, or ``None``: the clean-up of a failure
            the guard could not see (outside the denoiser: a scheduler, a callback, the VAE).
    """

    def __init__(self, on_failure: Callable[[torch.nn.Module], None],
                 before: Callable[[torch.nn.Module], None] | None = None):
        super().__init__()
        self.on_failure, self.before = on_failure, before

    def pre_forward(self, module, *args, **kwargs):
        if self.before is not None:
            self.before(module)
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.on_failure(module)
            raise

    @classmethod
    def attach(cls, denoiser: torch.nn.Module, name: str, on_failure, before=None) -> "FailureGuard":
        """A guard registered on ``denoiser`` as ``name``, replacing one of that name."""
        return replace_hook(denoiser, cls(on_failure, before), name)


def nothing_perturbed(who: str, missed: list[tuple[str, object]], during: str) -> RuntimeError:
    """The error for chosen layers whose attention call was never replaced.

    Args:
        who: the route, for the message (``"AdversarialSinkhornGuidance"``, ``"perturbed_attention"``, ...).
        missed: ``(module name, the processor that ran there)`` of each such layer.
        during: when it should have happened (``"during the perturbed pass"``, ``"in the with-block"``).
    """
    places = ", ".join(f"{name!r} ({type(processor).__name__})" for name, processor in missed)
    return RuntimeError(
        f"{who} could not reach {places}: no scaled_dot_product_attention self-attention call ran there "
        f"{during}, so nothing was perturbed (its processor does not call "
        f"torch.nn.functional.scaled_dot_product_attention, the model uses another attention backend: "
        f"set_attention_backend('native'), or the module did not run)"
    )


def check_perturbed(who: str, installed: list, during: str) -> None:
    """Raise :func:`nothing_perturbed` for the hooks of ``installed`` (:func:`hook_layers`' list) that
    replaced no call."""
    missed = [(hook.module_name, getattr(module, "processor", module)) for module, hook in installed
              if isinstance(hook, SinkhornAttentionHook) and hook.replaced_calls == 0]
    if missed:
        raise nothing_perturbed(who, missed, during)

"""Intercepting diffusers' attention dispatch (``diffusers.models.attention_dispatch``).

diffusers' attention processors call ``dispatch_attention_fn``, which looks the backend function up
in ``_AttentionBackendRegistry._backends`` at every call and hands it its keywords (``query``,
``key``, ``value`` as ``[B, S, H, D]``, ``attn_mask``, ``scale``, ..., and ``_parallel_config`` where
the backend takes it). Inside :func:`intercepting`, a handler sees each such call first, in this
thread only: ``handler(backend_fn, kwargs)`` returns the attention output, or :data:`PASS` to let
the backend run. Under context parallelism this is the one place that sees a rank's sequence
shards together with the parallel config, before diffusers' Ulysses or ring attention runs.

The registry holds wrappers only while some thread is inside :func:`intercepting`; a wrapper
called from any other thread runs the backend unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

__all__ = ["PASS", "intercepting"]

PASS = object()  # a handler's "not mine": the backend runs as it would have

_local = threading.local()
_lock = threading.Lock()
_users = [0]
_originals: dict = {}  # backend name -> the function registered before the wrappers


def _registry():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry


def _wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(**kwargs):
        handlers = getattr(_local, "handlers", None)
        if handlers:
            out = handlers[-1](fn, kwargs)
            if out is not PASS:
                return out
        return fn(**kwargs)

    return wrapper


def _install() -> None:
    backends = _registry()._backends
    for name, fn in list(backends.items()):
        _originals[name] = fn
        backends[name] = _wrap(fn)


def _uninstall() -> None:
    backends = _registry()._backends
    for name, fn in _originals.items():
        backends[name] = fn
    _originals.clear()


@contextlib.contextmanager
def intercepting(handler: Callable):
    """Route this thread's attention-backend calls through ``handler(backend_fn, kwargs)``
    (nested uses: the innermost handler sees the call)."""
    with _lock:
        if _users[0] == 0:
            _install()
        _users[0] += 1
    handlers = getattr(_local, "handlers", None)
    if handlers is None:
        handlers = _local.handlers = []
    handlers.append(handler)
    try:
        yield
    finally:
        handlers.pop()
        with _lock:
            _users[0] -= 1
            if _users[0] == 0:
                _uninstall()

"""Backend registry.

Every backend is a module exposing

    status() -> str                       # "ok", or why it cannot run in this process
    supports(device, dtype) -> str | None # None, or why it cannot take tensors of this device/dtype
    run(q, k, v, *, num_iters, cost_sign, scale, epsilon) -> (out, f, g)

`run` receives 4-D tensors ``[B, H, N, D]`` of one device and dtype with arbitrary strides, already
validated (SPEC §5), with Nq > 0, Nk > 0 and B·H > 0. It returns ``out`` ``[B, H, Nq, Dv]``
contiguous in q's dtype and the potentials ``f`` ``[B, H, Nq]``, ``g`` ``[B, H, Nk]`` in float32
(float64 for float64 inputs). Modules are imported lazily and never import each other.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("reference", "torch", "cpu", "triton", "cuda")

_MODULES = {
    "reference": "asag_kernels.backends.reference",
    "torch": "asag_kernels.backends.torch_chunked",
    "cpu": "asag_kernels.backends.cpu",
    "triton": "asag_kernels.backends.triton_backend",
    "cuda": "asag_kernels.backends.cuda_backend",
}

_loaded: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    mod = _loaded.get(name)
    if mod is None:
        mod = importlib.import_module(_MODULES[name])
        _loaded[name] = mod
    return mod


def status(name: str) -> str:
    try:
        return get(name).status()
    except Exception as exc:  # a broken optional backend must not break the package
        return f"failed to load: {type(exc).__name__}: {exc}"


def backend_status() -> dict[str, str]:
    return {name: status(name) for name in BACKENDS}


def available_backends() -> list[str]:
    return [name for name in BACKENDS if status(name) == "ok"]


def unsupported_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int = 0) -> str | None:
    """None if backend `name` can run tensors of this device/dtype (and largest head dim) here,
    else the reason. A module may cap head dims with a ``MAX_HEAD_DIM`` attribute."""
    st = status(name)
    if st != "ok":
        return st
    limit = getattr(get(name), "MAX_HEAD_DIM", None)
    if limit is not None and head_dim > limit:
        return f"the {name} backend takes head dims (D and Dv) up to {limit}, got {head_dim}"
    return get(name).supports(device, dtype)


# "auto" preference by device type (SPEC §2); float64 always goes to "torch".
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def resolve_auto(device: torch.device, dtype: torch.dtype, head_dim: int = 0) -> str:
    if dtype == torch.float64:
        return "torch"
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if unsupported_reason(name, device, dtype, head_dim) is None:
            return name
    return "torch"


def tf32_allowed() -> bool:
    """Whether torch currently allows TF32 for float32 matmuls on CUDA (new or legacy API)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None and precision != "none":
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # the legacy flag is unreadable once the new API was used ("none" here)
        return False


def resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int = 0) -> str:
    """The backend that runs these tensors: "auto" picks one; a named one that cannot run raises.
    `head_dim` is the larger of D and Dv."""
    name = resolve_auto(device, dtype, head_dim) if requested == "auto" else requested
    reason = unsupported_reason(name, device, dtype, head_dim)
    if reason is not None:
        summary = "; ".join(f"{n}: {why}" for n, why in backend_status().items())
        raise ValueError(
            f"backend={name!r} cannot run {dtype} tensors on {device.type}: {reason}. "
            f"Available backends here: {available_backends()} (status: {summary})"
        )
    return name


def run(name: str, q, k, v, *, num_iters: int, cost_sign: float, scale: float, epsilon: float):
    return get(name).run(q, k, v, num_iters=num_iters, cost_sign=cost_sign, scale=scale, epsilon=epsilon)

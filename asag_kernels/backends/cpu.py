"""The fused C++ CPU backend (``csrc/cpu/``), loaded from the compiled ``asag_kernels._C_cpu``.

The kernel caches rows of the Gibbs kernel exp(L − rowmax) within a workspace budget of
``ASAG_CPU_WORKSPACE_MB`` MiB (default 256, read at every call) and streams the remaining rows,
recomputing their logits each pass; the budget never changes the result beyond float32 rounding.
"""

from __future__ import annotations

import os

import torch

try:
    from asag_kernels import _C_cpu as _ext

    _IMPORT_ERROR = None
except ImportError as exc:  # not built (no compiler at install time, or a failed optional build)
    _ext = None
    _IMPORT_ERROR = exc

DEFAULT_WORKSPACE_MB = 256.0


def status() -> str:
    if _ext is None:
        return f"not built: asag_kernels._C_cpu is missing ({_IMPORT_ERROR}); reinstall with a C++ compiler"
    return "ok"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device.type} tensors"
    if dtype == torch.float64:
        return "the cpu backend computes in float32 and takes float16/bfloat16/float32; use backend='torch' for float64"
    return None


def workspace_bytes() -> int:
    """The workspace budget in bytes, from ``ASAG_CPU_WORKSPACE_MB``."""
    raw = os.environ.get("ASAG_CPU_WORKSPACE_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_WORKSPACE_MB
    except ValueError:
        raise ValueError(f"ASAG_CPU_WORKSPACE_MB must be a number of MiB, got {raw!r}") from None
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(f"ASAG_CPU_WORKSPACE_MB must be a finite number >= 0, got {raw!r}")
    return int(mb * 2**20)


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    return _ext.sinkhorn_attention_cpu(q, k, v, num_iters, cost_sign * scale / epsilon, workspace_bytes())

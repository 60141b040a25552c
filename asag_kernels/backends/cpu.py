"""The fused C++ CPU backend (``csrc/cpu/``), loaded from the compiled ``asag_kernels._C_cpu``."""

from __future__ import annotations

import torch

try:
    from asag_kernels import _C_cpu as _ext

    _IMPORT_ERROR = None
except ImportError as exc:  # not built (no compiler at install time, or a failed optional build)
    _ext = None
    _IMPORT_ERROR = exc


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


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    return _ext.sinkhorn_attention_cpu(q, k, v, num_iters, cost_sign * scale / epsilon)

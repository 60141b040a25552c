"""The fused C++ CPU backend (``csrc/cpu/``), loaded from the compiled ``asag_kernels._C_cpu``.

The kernel caches rows of the Gibbs kernel exp(L − rowmax) within a workspace budget and streams the
remaining rows, recomputing their logits each pass; the budget never changes the result beyond
float32 rounding. ``ASAG_CPU_WORKSPACE_MB`` MiB (default 256, read at every call) bounds the call's
whole extra memory: the kernel's budget is what is left of it after the call's output and potentials
(:func:`call_workspace_bytes`), so the extra peak stays within it on any thread count (SPEC §6).
``ASAG_CPU_KEEP_WORKSPACE`` and ``ASAG_CPU_HUGEPAGES`` (read at every call) and ``ASAG_CPU_ISA``
(read at import) are parsed here, through ``asag_kernels._env``, and handed to the extension.
The extension releases the GIL while it computes.
"""

from __future__ import annotations

import torch

from .._env import env_choice, env_flag
from .._env import workspace_bytes as _env_workspace_bytes

try:
    from asag_kernels import _C_cpu as _ext

    _IMPORT_ERROR = None
except ImportError as exc:  # not built (no compiler at install time, or a failed optional build)
    _ext = None
    _IMPORT_ERROR = exc

DEFAULT_WORKSPACE_MB = 256.0

if _ext is not None:
    # Read once, like the kernels' own start-up choice: "generic" forces the portable row kernels.
    _ext.select_row_kernels(env_choice("ASAG_CPU_ISA", ("auto", "avx2", "generic"), "auto") != "generic")


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
    return _env_workspace_bytes("ASAG_CPU_WORKSPACE_MB", DEFAULT_WORKSPACE_MB)


def call_workspace_bytes(q, k, v) -> int:
    """The kernel's budget for one call: ``ASAG_CPU_WORKSPACE_MB`` less what the call returns (the output
    ``[..., Nq, Dv]`` in v's dtype and the float32 potentials f ``[..., Nq]``, g ``[..., Nk]``), sized from the
    problem so that workspace + output stays within the one budget (before: workspace alone, so at
    sdxl-64 with 5 or 10 threads the call's extra peak was the full 256 MiB plus its 10 MiB output)."""
    problems = q.shape[:-2].numel()
    returned = problems * (q.shape[-2] * v.shape[-1] * v.element_size() + 4 * (q.shape[-2] + k.shape[-2]))
    return max(0, workspace_bytes() - returned)


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    return _ext.sinkhorn_attention_cpu(
        q, k, v, num_iters, cost_sign * scale / epsilon, call_workspace_bytes(q, k, v),
        env_flag("ASAG_CPU_KEEP_WORKSPACE", True), env_flag("ASAG_CPU_HUGEPAGES", True),
    )


# ---- Per-pass building blocks (issue 13): 4-D [B, H, N, D] inputs, validated, any strides; bias
# vectors contiguous float32; every pass streams its logits (bounded memory, deterministic). ----


def row_lse(q, k, g, *, cost_sign, scale, epsilon):
    """r[b, h, i] = LSE_j(L[i, j] + g[b, h, j]) -> [B, H, Nq] float32; g [B, H, Nk]."""
    return _ext.row_lse_cpu(q, k, g.float().contiguous(), cost_sign * scale / epsilon)


def col_lse(q, k, f, *, cost_sign, scale, epsilon):
    """c[b, h, j] = LSE_i(L[i, j] + f[b, h, i]) -> [B, H, Nk] float32; f [B, H, Nq]."""
    return _ext.col_lse_cpu(q, k, f.float().contiguous(), cost_sign * scale / epsilon)


def biased_attention(q, k, v, g, *, cost_sign, scale, epsilon):
    """(out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32) with out_i = Σ_j softmax_j(L_ij + g_j)·v_j;
    a row whose entries are all -inf gives lse = -inf and out = 0."""
    return _ext.biased_attention_cpu(q, k, v, g.float().contiguous(), cost_sign * scale / epsilon)

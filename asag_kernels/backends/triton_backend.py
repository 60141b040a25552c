"""``backend="triton"``: launches the tiled Triton kernels of ``triton/sinkhorn_attention_kernels.py``.

A call with ``num_iters = T`` runs 2T + 1 passes over the logits (SPEC §7): T row and T column
potential passes, then one attention pass with the key bias g. ``T = 0`` needs only the attention
pass, which also writes f. The potential buffers hold natural-log f and g (what the caller gets);
the kernels take them to base 2 as they read them. The same kernels serve the per-pass building
blocks ``row_lse``, ``col_lse`` and ``biased_attention`` (issue 13).

The kernels are the module ``asag_kernels.triton_kernels.sinkhorn_attention_kernels``: setup.py
maps that package to the top-level ``triton/`` folder in wheels, and the checkout's
``asag_kernels/triton_kernels`` link to ``../triton`` serves editable installs and a plain source
tree, so one import finds them everywhere. CUDA tensors run compiled kernels; CPU tensors are
accepted only under ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
from types import ModuleType

import torch

from . import tf32_allowed

KERNEL_MODULE = "asag_kernels.triton_kernels.sinkhorn_attention_kernels"
_LOG2E = 1.4426950408889634
# CUDA caps grid dims 1 and 2 at 65535; heads·batch go on dim 1.
_MAX_GRID_Y = 65535
MAX_HEAD_DIM = 256  # read by the registry: larger head dims go to another backend under "auto"
# Largest load the kernels vectorise to (bytes): rows aligned to it keep 16-byte loads.
_VECTOR_BYTES = 16

_kernels: ModuleType | None = None
_load_error: str | None = None


def triton_missing_reason(spec) -> str | None:
    """Why ``spec`` (from ``find_spec("triton")``) is not the Triton package, or None if it is.

    Without Triton installed, running from the repo root finds our own ``triton/`` folder (no
    ``__init__.py``) as a namespace package; that must not count as Triton. The real package is a
    regular one (an ``__init__.py`` origin), which Python prefers over any namespace portion.
    """
    if spec is None:
        return "Triton is not installed (pip install triton)"
    if not spec.origin or not os.path.isfile(spec.origin):
        return "Triton is not installed (only a namespace package named triton was found; pip install triton)"
    return None


def _kernel_module() -> ModuleType | None:
    global _kernels, _load_error
    if _kernels is None and _load_error is None:
        reason = triton_missing_reason(importlib.util.find_spec("triton"))
        if reason is not None:
            _load_error = reason
            return None
        try:
            _kernels = importlib.import_module(KERNEL_MODULE)
        except Exception as exc:  # a broken Triton install must not break the package
            _load_error = f"the Triton kernels failed to load: {type(exc).__name__}: {exc}"
    return _kernels


def kernels() -> ModuleType:
    """The kernel module (raises if it cannot load): for tests, sweeps and tools."""
    module = _kernel_module()
    if module is None:
        raise RuntimeError(f"the triton backend is unusable: {_load_error}")
    return module


def status() -> str:
    module = _kernel_module()
    if module is None:
        return _load_error
    if not module.INTERPRETING and not torch.cuda.is_available():
        return "no CUDA GPU (the triton backend runs CPU tensors only under TRITON_INTERPRET=1)"
    return "ok"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype == torch.float64:
        return "the triton backend computes in float32 and takes float16/bfloat16/float32; use backend='torch' for float64"
    module = _kernel_module()
    if module is None:
        return _load_error
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if module.INTERPRETING:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 was set after the Triton kernels were loaded; set it before the first use"
        return "the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    return f"the triton backend takes CUDA tensors, got {device.type} tensors"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: TF32 for float32 only where torch allows it, as torch's matmul would."""
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_dim(d: int) -> int:
    """A head dim as the kernels hold it: the next power of two, at least 16 (the dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def alignment(t: torch.Tensor) -> int:
    """Largest power of two (in elements, up to 16 bytes' worth) dividing t's start and the strides of
    its batch, head and row dims (the offsets the kernels hint; the head-dim stride is not one).

    The kernels tell the compiler that row starts are multiples of it, which keeps 16-byte vector
    loads for rows such as D = 40 (80 bytes) that Triton's own specialisation (strides divisible
    by 16 elements) does not recognise.
    """
    elem = t.element_size()
    align = max(1, _VECTOR_BYTES // elem)
    offsets = [t.data_ptr() // elem if t.data_ptr() % elem == 0 else 1, *t.stride()[:-1]]
    while align > 1 and any(x % align for x in offsets):
        align //= 2
    return align


def _common(module, q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        D_PAD=padded_dim(head_dim),
        UPCAST_DOT=module.INTERPRETING and q.dtype == torch.bfloat16,
        DOT_PRECISION=dot_precision(q.dtype),
    )


def _grid_chunks(batch: int, heads: int):
    """(batch slice, head slice) pieces whose heads·batch fit one grid dimension."""
    head_step = min(heads, _MAX_GRID_Y)
    batch_step = max(1, _MAX_GRID_Y // head_step)
    for b0 in range(0, batch, batch_step):
        for h0 in range(0, heads, head_step):
            yield slice(b0, min(batch, b0 + batch_step)), slice(h0, min(heads, h0 + head_step))


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _potential_pass(module, rows, cols, col_bias, potential, *, logit_scale2, log2_marginal, has_bias,
                    output_lse, common):
    """potential [B, H, n_rows] (contiguous) from rows [B, H, n_rows, D], cols [B, H, n_cols, D] and
    col_bias [B, H, n_cols] (contiguous, natural log; unread without has_bias)."""
    batch, heads, n_rows = rows.shape[:3]
    n_cols = cols.shape[2]
    grid = lambda meta: (triton_cdiv(n_rows, meta["BLOCK_M"]), batch * heads)
    module.launch(
        module.potential_pass_kernel, grid,
        rows, cols, col_bias, potential,
        n_rows, n_cols, heads,
        *rows.stride(), *cols.stride(),
        logit_scale2, log2_marginal,
        module.size_bucket(n_rows), module.size_bucket(n_cols),
        HAS_BIAS=has_bias, OUTPUT_LSE=output_lse, ROWS_ALIGN=alignment(rows), COLS_ALIGN=alignment(cols), **common,
    )


def _attention_pass(module, q, k, v, key_bias, out, row_out, *, logit_scale2, log2_row_marginal, has_bias,
                    write_row, output_lse, common):
    """out [B, H, Nq, Dv] = softmax_j(L + key_bias)·v; row_out [B, H, Nq] gets log a − LSE (or LSE)."""
    batch, heads, n_q = q.shape[:3]
    n_k, value_dim = k.shape[2], v.shape[3]
    grid = lambda meta: (triton_cdiv(n_q, meta["BLOCK_M"]), batch * heads)
    module.launch(
        module.attention_pass_kernel, grid,
        q, k, v, key_bias, out, row_out,
        n_q, n_k, heads,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        logit_scale2, log2_row_marginal,
        module.size_bucket(n_q), module.size_bucket(n_k),
        HAS_BIAS=has_bias, WRITE_ROW_POTENTIAL=write_row, OUTPUT_LSE=output_lse,
        # float16 values cannot overflow a float32 sum; float32/bfloat16 ones can (see the kernels).
        NORMALISE=v.dtype != torch.float16, OUT_MAX=float(torch.finfo(out.dtype).max),
        Q_ALIGN=alignment(q), K_ALIGN=alignment(k), V_ALIGN=alignment(v),
        VALUE_DIM=value_dim, DV_PAD=padded_dim(value_dim), **common,
    )


def _pieces(*tensors):
    """Per grid chunk, each tensor's [batch slice, head slice] (potentials stay contiguous
    [B·H, N] inside a piece: whole heads of some batches, or a head range of one batch)."""
    batch, heads = tensors[0].shape[:2]
    for bs, hs in _grid_chunks(batch, heads):
        yield [t[bs, hs] for t in tensors]


def _logit_scale2(cost_sign, scale, epsilon) -> float:
    return cost_sign * scale / epsilon * _LOG2E


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    """Sinkhorn attention: (out [B, H, Nq, Dv] in q's dtype, f [B, H, Nq], g [B, H, Nk] float32)."""
    module = _kernel_module()
    batch, heads, n_q, _ = q.shape
    n_k, value_dim = k.shape[2], v.shape[3]
    device = q.device
    out = _alloc((batch, heads, n_q, value_dim), q.dtype, device)
    f = _alloc((batch, heads, n_q), torch.float32, device)
    g = _alloc((batch, heads, n_k), torch.float32, device)
    scalars = dict(logit_scale2=_logit_scale2(cost_sign, scale, epsilon), common=_common(module, q))
    log2_a, log2_b = -math.log2(n_q), -math.log2(n_k)

    with _device_guard(device):
        for q_, k_, v_, out_, f_, g_ in _pieces(q, k, v, out, f, g):
            if num_iters == 0:
                g_.zero_()
            for t in range(num_iters):
                _potential_pass(module, q_, k_, g_, f_, log2_marginal=log2_a, has_bias=t > 0, output_lse=False,
                                **scalars)
                _potential_pass(module, k_, q_, f_, g_, log2_marginal=log2_b, has_bias=True, output_lse=False,
                                **scalars)
            _attention_pass(module, q_, k_, v_, g_, out_, f_, log2_row_marginal=log2_a, has_bias=num_iters > 0,
                            write_row=num_iters == 0, output_lse=False, **scalars)
    return out, f, g


def row_lse(q, k, g, *, cost_sign, scale, epsilon):
    """q [B, H, Nq, D], k [B, H, Nk, D], g [B, H, Nk] float32 contiguous -> LSE_j(L + g) [B, H, Nq] float32."""
    module = _kernel_module()
    lse = _alloc(q.shape[:3], torch.float32, q.device)
    scalars = dict(logit_scale2=_logit_scale2(cost_sign, scale, epsilon), common=_common(module, q))
    with _device_guard(q.device):
        for q_, k_, g_, lse_ in _pieces(q, k, g, lse):
            _potential_pass(module, q_, k_, g_, lse_, log2_marginal=0.0, has_bias=True, output_lse=True, **scalars)
    return lse


def col_lse(q, k, f, *, cost_sign, scale, epsilon):
    """q [B, H, Nq, D], k [B, H, Nk, D], f [B, H, Nq] float32 contiguous -> LSE_i(L + f) [B, H, Nk] float32.

    L is symmetric in the roles of q and k, so this is the row LSE of the transposed problem."""
    return row_lse(k, q, f, cost_sign=cost_sign, scale=scale, epsilon=epsilon)


def biased_attention(q, k, v, g, *, cost_sign, scale, epsilon):
    """q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], g [B, H, Nk] float32 contiguous ->
    (softmax_j(L + g)·v [B, H, Nq, Dv] contiguous in q's dtype, LSE_j(L + g) [B, H, Nq] float32)."""
    module = _kernel_module()
    batch, heads, n_q, _ = q.shape
    out = _alloc((batch, heads, n_q, v.shape[3]), q.dtype, q.device)
    lse = _alloc((batch, heads, n_q), torch.float32, q.device)
    scalars = dict(logit_scale2=_logit_scale2(cost_sign, scale, epsilon), common=_common(module, q))
    with _device_guard(q.device):
        for q_, k_, v_, g_, out_, lse_ in _pieces(q, k, v, g, out, lse):
            _attention_pass(module, q_, k_, v_, g_, out_, lse_, log2_row_marginal=0.0, has_bias=True, write_row=True,
                            output_lse=True, **scalars)
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

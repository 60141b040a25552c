"""``backend="triton"``: launches the tiled Triton kernels of ``triton/sinkhorn_attention_kernels.py``.

A call with ``num_iters = T`` runs 2T + 1 passes over the logits (SPEC §7): T row and T column
potential passes, then one attention pass with the key bias g. ``T = 0`` needs only the attention
pass, which also writes f. The potential buffers hold natural-log f and g (what the caller gets);
the kernels take them to base 2 as they read them.

The kernel sources ship in the wheel as ``asag_kernels.triton_kernels`` (setup.py maps the
top-level ``triton/`` folder there); from a source checkout that is not installed they are loaded
from ``<repo>/triton/`` by file path. CUDA tensors run compiled kernels; CPU tensors are accepted
only under ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import math
import os
import sys
from types import ModuleType

import torch

from . import tf32_allowed

KERNEL_MODULE = "sinkhorn_attention_kernels"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SOURCE_KERNEL_DIR = os.path.join(_REPO_ROOT, "triton")
_LOG2E = 1.4426950408889634
# CUDA caps grid dims 1 and 2 at 65535; heads·batch go on dim 1.
_MAX_GRID_Y = 65535
MAX_HEAD_DIM = 256  # read by the registry: larger head dims go to another backend under "auto"

_kernels: ModuleType | None = None
_load_error: str | None = None


def triton_missing_reason(spec, repo_kernel_dir: str = _SOURCE_KERNEL_DIR) -> str | None:
    """Why ``spec`` (from ``find_spec("triton")``) is not the Triton package, or None if it is.

    Without Triton installed, running from the repo root finds our own ``triton/`` folder (no
    ``__init__.py``) as a namespace package; that must not count as Triton.
    """
    if spec is None:
        return "Triton is not installed (pip install triton)"
    origin = spec.origin
    if not origin or not os.path.isfile(origin):
        return "Triton is not installed (only a namespace package named triton was found; pip install triton)"
    kernel_dir = os.path.realpath(repo_kernel_dir)
    if os.path.commonpath([os.path.realpath(origin), kernel_dir]) == kernel_dir:
        return f"Triton is not installed (found this repo's kernel folder {repo_kernel_dir} instead; pip install triton)"
    return None


def _load_kernel_module(name: str) -> ModuleType:
    """Import ``asag_kernels.triton_kernels.<name>``, mapping that package to ``<repo>/triton`` if needed.

    A wheel installs the package itself. An editable install cannot (setuptools' editable finder
    does not resolve a sub-package without ``__init__.py`` mapped to another folder) and a plain
    source checkout has no mapping at all; there the package is registered here as a namespace
    package over ``<repo>/triton``, as setup.py's ``package_dir`` does, so the kernels always load
    under one module name.
    """
    package = "asag_kernels.triton_kernels"
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (package, f"{package}.{name}"):
            raise  # something the kernel module imports is missing
    if not os.path.isfile(os.path.join(_SOURCE_KERNEL_DIR, f"{name}.py")):
        raise ModuleNotFoundError(f"{package}.{name} is not installed and {_SOURCE_KERNEL_DIR}/{name}.py does not exist")
    if package not in sys.modules:
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [_SOURCE_KERNEL_DIR]
        sys.modules[package] = importlib.util.module_from_spec(spec)
    else:
        search = sys.modules[package].__path__
        if _SOURCE_KERNEL_DIR not in list(search):
            search.append(_SOURCE_KERNEL_DIR)
    return importlib.import_module(f"{package}.{name}")


def _kernel_module() -> ModuleType | None:
    global _kernels, _load_error
    if _kernels is None and _load_error is None:
        reason = triton_missing_reason(importlib.util.find_spec("triton"))
        if reason is not None:
            _load_error = reason
            return None
        try:
            _kernels = _load_kernel_module(KERNEL_MODULE)
        except Exception as exc:  # a broken Triton install must not break the package
            _load_error = f"the Triton kernels failed to load: {type(exc).__name__}: {exc}"
    return _kernels


def status() -> str:
    kernels = _kernel_module()
    if kernels is None:
        return _load_error
    if not kernels.INTERPRETING and not torch.cuda.is_available():
        return "no CUDA GPU (the triton backend runs CPU tensors only under TRITON_INTERPRET=1)"
    return "ok"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype == torch.float64:
        return "the triton backend computes in float32 and takes float16/bfloat16/float32; use backend='torch' for float64"
    kernels = _kernel_module()
    if kernels is None:
        return _load_error
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if kernels.INTERPRETING:
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


def _padded_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _grid_chunks(batch: int, heads: int):
    """(batch slice, head slice) pieces whose heads·batch fit one grid dimension."""
    head_step = min(heads, _MAX_GRID_Y)
    batch_step = max(1, _MAX_GRID_Y // head_step)
    for b0 in range(0, batch, batch_step):
        for h0 in range(0, heads, head_step):
            yield slice(b0, min(batch, b0 + batch_step)), slice(h0, min(heads, h0 + head_step))


def run(q, k, v, *, num_iters, cost_sign, scale, epsilon):
    kernels = _kernel_module()
    batch, heads, n_q, head_dim = q.shape
    n_k, value_dim = k.shape[2], v.shape[3]
    device = q.device
    out = _alloc((batch, heads, n_q, value_dim), q.dtype, device)
    f = _alloc((batch, heads, n_q), torch.float32, device)
    g = _alloc((batch, heads, n_k), torch.float32, device)

    logit_scale2 = cost_sign * scale / epsilon * _LOG2E
    log2_a, log2_b = -math.log2(n_q), -math.log2(n_k)
    common = dict(
        HEAD_DIM=head_dim,
        D_PAD=_padded_dim(head_dim),
        UPCAST_DOT=kernels.INTERPRETING and q.dtype == torch.bfloat16,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    q_bucket, k_bucket = kernels.size_bucket(n_q), kernels.size_bucket(n_k)

    # Triton launches on the current CUDA device: make it the tensors' device.
    device_guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with device_guard:
        _run_pieces(kernels, q, k, v, out, f, g, num_iters, logit_scale2, log2_a, log2_b, q_bucket, k_bucket, common)
    return out, f, g


def _run_pieces(kernels, q, k, v, out, f, g, num_iters, logit_scale2, log2_a, log2_b, q_bucket, k_bucket, common):
    batch, heads = q.shape[:2]
    for bs, hs in _grid_chunks(batch, heads):
        # The kernels index potentials as contiguous [B·H, N]: a piece is either whole heads of
        # some batches or a head range of one batch, contiguous either way.
        _run_chunk(kernels, q[bs, hs], k[bs, hs], v[bs, hs], out[bs, hs], f[bs, hs], g[bs, hs],
                   num_iters, logit_scale2, log2_a, log2_b, q_bucket, k_bucket, common)


def _run_chunk(kernels, q, k, v, out, f, g, num_iters, logit_scale2, log_a, log_b, q_bucket, k_bucket, common):
    batch, heads, n_q, head_dim = q.shape
    n_k, value_dim = k.shape[2], v.shape[3]

    def potential_pass(rows, cols, col_bias, potential, log_marginal, rows_bucket, cols_bucket, has_bias):
        n_rows, n_cols = rows.shape[2], cols.shape[2]
        grid = lambda meta: (triton_cdiv(n_rows, meta["BLOCK_M"]), batch * heads)
        kernels.potential_pass_kernel[grid](
            rows, cols, col_bias, potential,
            n_rows, n_cols, heads,
            *rows.stride(), *cols.stride(),
            logit_scale2, log_marginal,
            rows_bucket, cols_bucket,
            HAS_BIAS=has_bias, **common,
        )

    if num_iters == 0:
        g.zero_()
    else:
        potential_pass(q, k, g, f, log_a, q_bucket, k_bucket, has_bias=False)
        for t in range(num_iters):
            if t > 0:
                potential_pass(q, k, g, f, log_a, q_bucket, k_bucket, has_bias=True)
            potential_pass(k, q, f, g, log_b, k_bucket, q_bucket, has_bias=True)

    grid = lambda meta: (triton_cdiv(n_q, meta["BLOCK_M"]), batch * heads)
    kernels.attention_pass_kernel[grid](
        q, k, v, g, out, f,
        n_q, n_k, heads,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        logit_scale2, log_a,
        q_bucket, k_bucket,
        HAS_BIAS=num_iters > 0, WRITE_ROW_POTENTIAL=num_iters == 0,
        VALUE_DIM=value_dim, DV_PAD=_padded_dim(value_dim), **common,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

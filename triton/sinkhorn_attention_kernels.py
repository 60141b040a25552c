"""Triton kernels of ``backend="triton"``: tiled log-domain Sinkhorn attention (SPEC §3).

Everything runs in base 2 so that each exponential is one ``exp2``: with log2(e) folded into the
logit scale and the potentials taken to base 2 as they are read (f2 = f·log2 e, g2 = g·log2 e; the
buffers hold natural-log f and g, what the caller gets, so no conversion pass is needed),

    L2[i,j] = c2 · <q_i, k_j>,          c2 = cost_sign · scale / epsilon · log2(e)

    potential pass   p2_r = log2 mu_r − log2 Σ_c 2^(L2[r,c] + bias2_c)     (online over column tiles)
        row update:    rows = q, cols = k, bias = g2, mu = 1/Nq   → f2
        column update: rows = k, cols = q, bias = f2, mu = 1/Nk   → g2   (L is symmetric in the roles
                       of q and k, so the column LSE is the row LSE of the transposed problem; every
                       program owns whole outputs, so no atomics and a fixed reduction order)
    attention pass   out_i = Σ_j 2^(L2[i,j] + g2_j − m_i) v_j / Σ_j 2^(L2[i,j] + g2_j − m_i)
                     (flash attention with a key bias; it can also write f2 = log2 a − LSE2, which
                     is all that num_iters = 0 needs)

With ``OUTPUT_LSE`` both kernels write the natural-log LSE itself instead of log mu − LSE (the
per-pass building blocks row_lse / col_lse / biased_attention).

Float32 accumulation and potentials for float16/bfloat16/float32 inputs (``tl.dot`` in the input
dtype, float32 as IEEE or TF32 as the launcher says). Every multiply-add is an explicit ``tl.fma``
(or the dot's own accumulator), so results do not depend on Triton's fp-fusion default. Head dims
are constexpr and padded to a power of two, masked only when padding exists; ``*_ALIGN`` (from the
launcher, which checks the pointers and strides) tells the compiler that rows start on 16-byte
boundaries, so a head dim such as 40 (row stride 80 bytes, which Triton's own 16-divisibility
specialisation misses) keeps 16-byte vector loads. Whole column tiles run unmasked; the one partial
tile comes last and its missing columns enter the LSE as -inf.

-inf bias entries exclude a column: the running max is taken as 0 while it is still -inf, so no
-inf − -inf appears, and a row whose entries are all -inf gets LSE = -inf and out = 0. NaN in an
input reaches the sums through exp2 and stays; an infinite ``out`` (only possible from non-finite
inputs) is written as NaN. The attention pass keeps its accumulator normalised for float32 and
bfloat16 (whose range reaches 3.4e38): the weights of a tile are divided by a running bound Z on the
row sum (folded into the exp2 argument, no extra multiply per logit), so the accumulator is always
a sub-convex combination of v's rows and any finite v gives a finite out; float16 values cannot
overflow a float32 sum, and keep unnormalised weights (which stay clear of float16's subnormals).
Tile starts are 64-bit, offsets inside a tile 32-bit.

Configurations: ``choose_configs`` is the one place that decides which tiles a launch may use. On a
GPU the candidates that ``benchmarks/triton_compile_sweep.py`` saw spill registers on the
architecture at that head dim (``SPILLING``) are left out (where no generic tile can run spill-free,
``WIDE_HEAD_SHAPES`` replaces the candidates: head dim 256 in TF32) and the rest are fitted to the device's
shared memory (stages shrink first); below ``AUTOTUNE_MIN_SIZE`` rows or columns, or with
``ASAG_TRITON_AUTOTUNE=0``, only the pinned configuration runs (a ``PINNED`` entry, else the first
candidate left), launched directly without the autotuner. Under ``TRITON_INTERPRET=1`` one small
configuration runs, unless ``forced_config`` pins another (the tests force every candidate at small
sizes that way).
"""

from __future__ import annotations

import contextlib
import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Tile loops run as ``while`` loops under the interpreter: Triton 3.6's interpreter turns a tensor
# loop bound into an int with int() of a one-element array, which NumPy 2.4 refuses ("only
# 0-dimensional arrays can be converted to Python scalars"); a while condition goes through
# bool(), which works. Compiled kernels keep the ``for`` loop that Triton's pipeliner needs.
WHILE_LOOPS = tl.constexpr(INTERPRETING)
BOUND_MARGIN = tl.constexpr(1.0625)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; tensor-core dots (fp16, bf16, TF32).
POTENTIAL_SHAPES = [
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 3),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (256, 64, 8, 3),
    (128, 128, 4, 2),
]
# The attention pass holds a value tile and an accumulator too: not the widest tiles.
ATTENTION_SHAPES = POTENTIAL_SHAPES[:6]
# float32 without TF32 is an FMA dot (no tensor cores): small tiles, short compiles.
FLOAT32_SHAPES = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2)]
# When no candidate fits the shared memory (very wide heads on a small device).
FALLBACK_SHAPE = (32, 32, 4, 1)
# Rows of 512 bytes or more (head dim 256 in TF32; also head dim 128 in TF32 and 256 in 16 bits
# for the sm_80 attention pass, end of the table): these replace the generic candidates at their
# (kind, arch, D_PAD, dot class) key, the first one pinned. At D = 256 in TF32 the generic attention
# tiles do not fit the shared-memory budget beside the value tile (the 32×32 fallback ran and
# spilled 2,272 B on sm_80, 2,208 B on sm_90) and the one potential tile that fits on sm_80
# (64×64) spilled 7,528 B. On sm_80 (mma.sync) a warp holds its 16 rows of the resident row tile
# in registers: 16 × 256 float32 is 128 of its 255, so what is left must carry the key/value
# operands and the accumulator. Hence narrow key tiles (16 or 32 columns), few rows per warp in
# the attention pass (16-row tiles; the accumulator's columns spread over the warps) and 2-3
# stages (the same tiles with fewer stages spill: 16×32 with 4 warps 512 B at one stage, 184 B at
# two; 16×16 40 B at two, none at three; the potential pass's 128×16 with 8 warps 112 B at one
# stage, and two stages do not fit the budget, hence 64×32). On sm_90 the attention pass runs
# 128×16 with 8 warps on wgmma (two warpgroups of 64 rows, operands from shared memory), so K/V
# are read once per 128 query rows; its potential pass keeps the generic tiles (no spill there).
# Every shape here compiled with no spill for every pass (benchmarks/triton_compile_sweep.py,
# compile-only, Triton 3.9; docs/PERF.md), at 204-255 registers a thread and 81-144 KiB of shared
# memory a block: low occupancy (one or two blocks an SM), which the cp.async pipelining (sm_80)
# and the 128-row reuse of each K/V tile (sm_90) are there to offset. Two candidates each, so that
# the autotuner, not this table, picks the faster on a real GPU (no GPU has timed them).
WIDE_HEAD_SHAPES: dict[tuple[str, int, int, str], list[tuple[int, int, int, int]]] = {
    ("potential", 80, 256, "tf32"): [(64, 32, 8, 2), (64, 16, 4, 3)],
    ("attention", 80, 256, "tf32"): [(16, 32, 8, 2), (16, 16, 4, 3)],
    ("attention", 90, 256, "tf32"): [(128, 16, 8, 1), (16, 16, 4, 3)],
    # Every generic tile spilled here (TF32 D = 128: 184 B at best, 128×64 with 8 warps; 16-bit
    # D = 256: 7,992 B at best); 32-row tiles with 3 stages do not (242-255 registers; 16-bit
    # D = 256 also 16×32 with 8 warps, 167-172 registers, measured for bfloat16 and float16).
    ("attention", 80, 128, "tf32"): [(32, 32, 8, 3), (32, 32, 4, 3)],
    ("attention", 80, 256, "16bit"): [(32, 32, 8, 3), (16, 32, 8, 2)],
}
# The interpreter is slow per tile and cannot autotune: one small configuration.
INTERPRETER_SHAPE = (64, 64, 4, 1)

# Keys of the two tables below: (kind, arch, D_PAD, dot class) with arch 80 (sm_80 and the
# ~100 KiB consumer parts, whose budget shrinks stages) or 90 (sm_90), and dot class "16bit"
# (float16/bfloat16), "tf32" or "fp32" (IEEE float32, an FMA dot).
# Pinned configuration: the first candidate unless listed here.
PINNED: dict[tuple[str, int, int, str], tuple[int, int, int, int]] = {}
# Candidates (BLOCK_M, BLOCK_N, num_warps) that spill registers there, as compiled by
# benchmarks/triton_compile_sweep.py (Triton 3.9; docs/PERF.md has the table): never launched.
SPILLING: dict[tuple[str, int, int, str], set[tuple[int, int, int]]] = {
    ("potential", 80, 128, "16bit"): {(128, 64, 4), (128, 128, 8), (64, 128, 4), (256, 64, 8), (128, 128, 4)},
    ("attention", 80, 128, "16bit"): {(128, 64, 4), (128, 128, 8), (128, 32, 4), (64, 64, 4), (64, 128, 4)},
    ("attention", 90, 128, "16bit"): {(128, 64, 4), (64, 128, 4)},
    ("potential", 80, 64, "16bit"): {(128, 128, 4)},
    # 128×64 with 4 warps: 8-32 B in the attention variants (the whole sweep, 2026-12-07).
    ("attention", 80, 64, "16bit"): {(64, 128, 4), (128, 64, 4)},
    ("potential", 80, 128, "tf32"): {(128, 64, 4), (128, 128, 8), (64, 128, 4), (128, 128, 4)},
    # TF32 at head dims 40 and 64 (the --modes tf32 sweep, 2026-12-07: 16-432 B).
    ("potential", 80, 64, "tf32"): {(64, 128, 4), (128, 64, 4), (128, 128, 4), (128, 128, 8), (256, 64, 8)},
    ("attention", 80, 64, "tf32"): {(64, 128, 4), (128, 64, 4), (128, 128, 8)},
    ("attention", 90, 64, "tf32"): {(64, 128, 4), (128, 64, 4), (128, 128, 8)},
    ("potential", 90, 128, "tf32"): {(128, 128, 4)},
    ("attention", 90, 128, "tf32"): {(128, 64, 4), (128, 32, 4), (64, 64, 4), (64, 128, 4)},
    ("potential", 80, 256, "16bit"): {(128, 64, 4), (128, 128, 8), (64, 128, 4), (128, 128, 4)},
    ("potential", 90, 256, "16bit"): {(128, 128, 4)},
    ("attention", 90, 256, "16bit"): {(128, 64, 4), (128, 32, 4), (64, 64, 4), (64, 128, 4)},
}

# Below this many rows or columns a pass is too short for the tile choice to matter; the pinned
# configuration is used without benchmarking (also keeps test suites from compiling every config).
AUTOTUNE_MIN_SIZE = 1024
# ASAG_TRITON_AUTOTUNE=0 pins one configuration everywhere: results are then bitwise reproducible
# across processes too (autotuning may pick other tiles, which reorders the sums).
AUTOTUNE = os.environ.get("ASAG_TRITON_AUTOTUNE", "1") != "0"
# Shared memory a configuration may plan for: fits A100 (164 KiB) and H100 (227 KiB) with room;
# less where the device has less (consumer GPUs have about 100 KiB).
SHARED_MEMORY_BUDGET = 160 * 1024
# Per-block shared memory limits by architecture (bytes), for compile-only checks without a GPU.
ARCH_SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def shared_memory_budget(max_shared_mem: int) -> int:
    """What a configuration may plan for on a device with ``max_shared_mem`` bytes per block."""
    return min(SHARED_MEMORY_BUDGET, int(max_shared_mem) - 4 * 1024)


def pinned_arch(arch: int) -> int:
    """The ``PINNED`` column for a compute capability (e.g. 86 -> 80, 90 -> 90)."""
    return 90 if 90 <= arch < 100 else 80


def _config(shape) -> triton.Config:
    m, n, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def shared_memory_estimate(block_m, block_n, stages, d_pad, dv_pad, elem_bytes):
    """Upper bound: pipelined key (and value) tiles plus the resident row tile."""
    return (stages * block_n * (d_pad + dv_pad) + block_m * d_pad) * elem_bytes


def _fit(shape, budget, d_pad, dv_pad, elem_bytes):
    """``shape`` with its pipelining shrunk to fit ``budget``, or None if one stage does not fit."""
    m, n, w, s = shape
    while s > 1 and shared_memory_estimate(m, n, s, d_pad, dv_pad, elem_bytes) > budget:
        s -= 1
    if shared_memory_estimate(m, n, s, d_pad, dv_pad, elem_bytes) > budget:
        return None
    return (m, n, w, s)


def dot_class(elem_bytes: int, precision: str) -> str:
    if elem_bytes == 2:
        return "16bit"
    return "tf32" if precision == "tf32" else "fp32"


def config_key(kind: str, arch: int, d_pad: int, elem_bytes: int, precision: str) -> tuple[str, int, int, str]:
    """The (kind, arch column, D_PAD, dot class) key of ``PINNED``, ``SPILLING`` and ``WIDE_HEAD_SHAPES``."""
    return (kind, pinned_arch(arch), d_pad, dot_class(elem_bytes, precision))


def candidate_shapes(kind: str, elem_bytes: int, precision: str, *, arch: int,
                     d_pad: int) -> list[tuple[int, int, int, int]]:
    """Autotuning candidates of ``kind`` ("potential" or "attention") before the memory fit."""
    wide = WIDE_HEAD_SHAPES.get(config_key(kind, arch, d_pad, elem_bytes, precision))
    if wide is not None:
        return list(wide)
    if elem_bytes == 4 and precision == "ieee":
        return list(FLOAT32_SHAPES)
    return list(POTENTIAL_SHAPES if kind == "potential" else ATTENTION_SHAPES)


def choose_configs(kind: str, *, arch: int, max_shared_mem: int, elem_bytes: int, precision: str,
                   d_pad: int, dv_pad: int = 0, pinned_only: bool) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) a launch may use, the pinned one first.

    Candidates known to spill (``SPILLING``) are left out; every other one is fitted to the
    shared-memory budget of ``max_shared_mem`` (stages shrink, tiles that do not fit with one stage
    are dropped); ``pinned_only`` keeps just the first.
    """
    budget = shared_memory_budget(max_shared_mem)
    key = config_key(kind, arch, d_pad, elem_bytes, precision)
    candidates = [s for s in candidate_shapes(kind, elem_bytes, precision, arch=arch, d_pad=d_pad)
                  if s[:3] not in SPILLING.get(key, ())]
    pinned = PINNED.get(key, candidates[0] if candidates else FALLBACK_SHAPE)
    kept = []
    for shape in [pinned, *candidates]:
        fitted = _fit(shape, budget, d_pad, dv_pad, elem_bytes)
        if fitted is not None and fitted not in kept:
            kept.append(fitted)
    if not kept:  # nothing fits (a head dim too wide for this device): the smallest tile, one stage
        kept = [FALLBACK_SHAPE]
    return kept[:1] if pinned_only else kept


# A configuration pinned by ``forced_config`` (tests, sweeps): every launch uses it.
_forced: triton.Config | None = None


@contextlib.contextmanager
def forced_config(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1):
    """Run every launch inside the block with this tile, bypassing the autotuner (also under the
    interpreter, where the tests force each candidate at small sizes)."""
    global _forced
    previous = _forced
    _forced = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
    try:
        yield _forced
    finally:
        _forced = previous


def _device_properties() -> tuple[int, int]:
    """(compute capability as 10·major + minor, shared memory per block) of the current device."""
    import torch

    device = torch.cuda.current_device()
    if device not in _device_cache:
        major, minor = torch.cuda.get_device_capability(device)
        props = triton.runtime.driver.active.utils.get_device_properties(device)
        _device_cache[device] = (10 * major + minor, int(props["max_shared_mem"]))
    return _device_cache[device]


_device_cache: dict = {}


def _kind(kwargs) -> str:
    return "attention" if "DV_PAD" in kwargs else "potential"


def _choose_for_launch(named_args, kwargs, pinned_only):
    arch, max_shared_mem = _device_properties()
    return choose_configs(_kind(kwargs), arch=arch, max_shared_mem=max_shared_mem,
                          elem_bytes=next(iter(named_args.values())).element_size(),
                          precision=kwargs["DOT_PRECISION"], d_pad=kwargs["D_PAD"], dv_pad=kwargs.get("DV_PAD", 0),
                          pinned_only=pinned_only)


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner hook (large passes on a GPU only, see ``launch``): every candidate that fits."""
    return [_config(s) for s in _choose_for_launch(named_args, kwargs, pinned_only=False)]


def fixed_config(named_args, kwargs) -> triton.Config | None:
    """The one configuration a launch runs without the autotuner, or None to autotune."""
    if _forced is not None:
        return _forced
    if INTERPRETING:
        return _config(INTERPRETER_SHAPE)
    small = min(named_args["rows_bucket"], named_args["cols_bucket"]) < AUTOTUNE_MIN_SIZE
    if small or not AUTOTUNE:
        return _config(_choose_for_launch(named_args, kwargs, pinned_only=True)[0])
    return None


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` (one of the autotuned kernels below): a fixed configuration runs the
    jitted function directly (no benchmarking, which Triton 3.6 would do even for one config and
    the interpreter cannot do at all); large passes on a GPU go through the autotuner."""
    config = fixed_config(dict(zip(kernel.arg_names, args)), kwargs)
    # Every multiply-add is explicit: fusion off is the same code, on every Triton version (3.9
    # warns on each compile while the default is unset; 3.10 turns it off).
    kwargs = dict(kwargs, enable_fp_fusion=False)
    if config is None:
        return kernel[grid](*args, **kwargs)
    return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


def _autotune_configs(kind):
    # More than one, so that the autotuner always asks ``_prune_configs``; what runs is what the
    # pruner returns.
    return [_config(s) for s in (POTENTIAL_SHAPES if kind == "potential" else ATTENTION_SHAPES)]


def size_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two, capped (tiles stop mattering)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


@triton.jit
def _head_offset(program_bh, heads, stride_b, stride_h, ALIGN: tl.constexpr):
    """Element offset of one (batch, head); a multiple of ALIGN (the launcher checked the strides)."""
    batch = (program_bh // heads).to(tl.int64)
    head = (program_bh % heads).to(tl.int64)
    offset = batch * stride_b + head * stride_h
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return offset


@triton.jit
def _row_offsets(offs_row, stride_row, ALIGN: tl.constexpr):
    """offs_row · stride_row, each a multiple of ALIGN: with 16 bytes' worth, rows start on 16-byte
    boundaries and the loads vectorise even when Triton did not specialise the stride."""
    offsets = offs_row * stride_row
    if ALIGN > 1:
        offsets = tl.multiple_of(offsets, [ALIGN])
    return offsets


@triton.jit
def _load_tile(ptr, offs_row, offs_col, rows_left, stride_row, stride_col,
               N_COLS: tl.constexpr, COLS_PAD: tl.constexpr, MASK_ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """A [rows, COLS_PAD] tile from ``ptr`` (its first row); rows from ``rows_left`` on and padded
    columns read as 0, with no mask at all when neither exists. Offsets inside a tile are small,
    the tile's start is folded into ``ptr`` in 64 bits."""
    ptrs = ptr + _row_offsets(offs_row, stride_row, ALIGN)[:, None] + offs_col[None, :] * stride_col
    if MASK_ROWS:
        if N_COLS == COLS_PAD:
            return tl.load(ptrs, mask=(offs_row < rows_left)[:, None], other=0.0)
        return tl.load(ptrs, mask=(offs_row < rows_left)[:, None] & (offs_col < N_COLS)[None, :], other=0.0)
    if N_COLS == COLS_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_col < N_COLS)[None, :], other=0.0)


@triton.jit
def _load_tile_transposed(ptr, offs_row, offs_col, rows_left, stride_row, stride_col,
                          N_COLS: tl.constexpr, COLS_PAD: tl.constexpr, MASK_ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """``_load_tile`` read directly as its [COLS_PAD, rows] transpose through the strides (a load
    feeding ``tl.dot`` without a ``tl.trans`` in between is what Triton's pipeliner makes async)."""
    ptrs = ptr + offs_col[:, None] * stride_col + _row_offsets(offs_row, stride_row, ALIGN)[None, :]
    if MASK_ROWS:
        if N_COLS == COLS_PAD:
            return tl.load(ptrs, mask=(offs_row < rows_left)[None, :], other=0.0)
        return tl.load(ptrs, mask=(offs_col < N_COLS)[:, None] & (offs_row < rows_left)[None, :], other=0.0)
    if N_COLS == COLS_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_col < N_COLS)[:, None], other=0.0)


@triton.jit
def _logit_tile(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d, stride_cn, stride_cd, logit_scale2,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_COLS: tl.constexpr,
                UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, COLS_ALIGN: tl.constexpr):
    """L2 + bias2 for one column tile, -inf at columns past n_cols."""
    cols_idx = start + offs_c
    tile_ptr = cols_ptr + tl.cast(start, tl.int64) * stride_cn
    cols_t = _load_tile_transposed(tile_ptr, offs_c, offs_d, n_cols - start, stride_cn, stride_cd, HEAD_DIM, D_PAD,
                                   MASK_COLS, COLS_ALIGN)
    if UPCAST_DOT:
        cols_t = cols_t.to(tl.float32)
    dots = tl.dot(rows, cols_t, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        if MASK_COLS:
            bias = tl.load(col_bias_ptr + cols_idx, mask=cols_idx < n_cols, other=float("-inf")) * LOG2E
        else:
            bias = tl.load(col_bias_ptr + cols_idx) * LOG2E
        logits = tl.fma(dots, logit_scale2, bias[None, :])
    else:
        logits = dots * logit_scale2
        if MASK_COLS:
            logits = tl.where((cols_idx < n_cols)[None, :], logits, float("-inf"))
    return logits


@triton.jit
def _finite_max(run_max, logits):
    """(new running max, the max to subtract): the latter is 0 while every entry so far is -inf."""
    new_max = tl.maximum(run_max, tl.max(logits, 1))
    return new_max, tl.where(new_max == float("-inf"), 0.0, new_max)


@triton.jit
def _potential_update(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d, stride_cn, stride_cd,
                      logit_scale2, run_max, run_sum,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_COLS: tl.constexpr,
                      UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, COLS_ALIGN: tl.constexpr):
    logits = _logit_tile(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d, stride_cn, stride_cd,
                         logit_scale2, HEAD_DIM, D_PAD, HAS_BIAS, MASK_COLS, UPCAST_DOT, DOT_PRECISION, COLS_ALIGN)
    new_max, shift = _finite_max(run_max, logits)
    run_sum = tl.fma(run_sum, tl.exp2(run_max - shift), tl.sum(tl.exp2(logits - shift[:, None]), 1))
    return new_max, run_sum


@triton.jit
def _log_output(lse2, log2_marginal, OUTPUT_LSE: tl.constexpr):
    """Natural-log LSE itself, or the potential log mu − LSE."""
    if OUTPUT_LSE:
        return lse2 * LN2
    return (log2_marginal - lse2) * LN2


@triton.autotune(
    configs=_autotune_configs("potential"),
    key=["rows_bucket", "cols_bucket", "D_PAD", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def potential_pass_kernel(
    rows_ptr, cols_ptr, col_bias_ptr, potential_ptr,
    n_rows, n_cols, heads,
    stride_rb, stride_rh, stride_rn, stride_rd,
    stride_cb, stride_ch, stride_cn, stride_cd,
    logit_scale2, log2_marginal,
    rows_bucket, cols_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUTPUT_LSE: tl.constexpr,
    ROWS_ALIGN: tl.constexpr,
    COLS_ALIGN: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """potential[r] = log2_marginal − log2 Σ_c 2^(logit_scale2·<rows_r, cols_c> + col_bias[c])
    (in natural log; the LSE itself with OUTPUT_LSE)."""
    tile = tl.program_id(0)
    program_bh = tl.program_id(1)
    rows_ptr += _head_offset(program_bh, heads, stride_rb, stride_rh, ROWS_ALIGN)
    cols_ptr += _head_offset(program_bh, heads, stride_cb, stride_ch, COLS_ALIGN)
    # Potentials are contiguous [B·H, N] float32 buffers owned by the launcher.
    col_bias_ptr += program_bh.to(tl.int64) * n_cols
    potential_ptr += program_bh.to(tl.int64) * n_rows

    row_start = tile * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    rows = _load_tile(rows_ptr + tl.cast(row_start, tl.int64) * stride_rn, offs_r, offs_d, n_rows - row_start,
                      stride_rn, stride_rd, HEAD_DIM, D_PAD, True, ROWS_ALIGN)
    if UPCAST_DOT:
        rows = rows.to(tl.float32)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    # Whole column tiles need no column mask; the one partial tile (if any) comes last.
    n_full = (n_cols // BLOCK_N) * BLOCK_N
    if WHILE_LOOPS:
        start = 0
        while start < n_full:
            run_max, run_sum = _potential_update(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d,
                                                 stride_cn, stride_cd, logit_scale2, run_max, run_sum,
                                                 HEAD_DIM, D_PAD, HAS_BIAS, False, UPCAST_DOT, DOT_PRECISION, COLS_ALIGN)
            start += BLOCK_N
    else:
        for start in range(0, n_full, BLOCK_N):
            run_max, run_sum = _potential_update(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d,
                                                 stride_cn, stride_cd, logit_scale2, run_max, run_sum,
                                                 HEAD_DIM, D_PAD, HAS_BIAS, False, UPCAST_DOT, DOT_PRECISION, COLS_ALIGN)
    if n_full < n_cols:
        run_max, run_sum = _potential_update(rows, cols_ptr, col_bias_ptr, n_full, n_cols, offs_c, offs_d,
                                             stride_cn, stride_cd, logit_scale2, run_max, run_sum,
                                             HEAD_DIM, D_PAD, HAS_BIAS, True, UPCAST_DOT, DOT_PRECISION, COLS_ALIGN)

    potential = _log_output(run_max + tl.log2(run_sum), log2_marginal, OUTPUT_LSE)
    tl.store(potential_ptr + row_start + offs_r, potential, mask=row_start + offs_r < n_rows)


@triton.jit
def _attention_update(q, k_ptr, v_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, offs_dv,
                      stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, run_bound, acc,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, VALUE_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                      HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, NORMALISE: tl.constexpr, BLOCK_N: tl.constexpr,
                      K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr):
    """One key tile of online softmax·v. acc holds Σ_j w_j v_j / run_bound with the weights w_j
    relative to the running max; run_bound stays 1 unless NORMALISE, where it is an upper bound on
    the weight sum so far (acc is then a sub-convex combination of v's rows: no overflow)."""
    logits = _logit_tile(q, k_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, stride_kn, stride_kd,
                         logit_scale2, HEAD_DIM, D_PAD, HAS_BIAS, MASK_KEYS, UPCAST_DOT, DOT_PRECISION, K_ALIGN)
    new_max, shift = _finite_max(run_max, logits)
    rescale = tl.exp2(run_max - shift)
    if NORMALISE:
        carried = run_sum * rescale  # the earlier weights, relative to the new max
        # A tile adds at most BLOCK_N weights of at most 1 each; the 1/16 margin covers rounding
        # (bfloat16 weights round by up to 2^-9 each), so acc never leaves v's range.
        new_bound = tl.fma(carried, BOUND_MARGIN, BLOCK_N * BOUND_MARGIN)
        weights = tl.exp2(logits - (shift + tl.log2(new_bound))[:, None])
        run_sum = tl.fma(tl.sum(weights, 1), new_bound, carried)
        acc_scale = run_bound * rescale / new_bound
    else:
        new_bound = run_bound
        weights = tl.exp2(logits - shift[:, None])
        run_sum = tl.fma(run_sum, rescale, tl.sum(weights, 1))
        acc_scale = rescale
    # Value rows past n_k load as 0 (their weight is 0 too, but 0·garbage could be NaN).
    v = _load_tile(v_ptr + tl.cast(start, tl.int64) * stride_vn, offs_n, offs_dv, n_k - start, stride_vn, stride_vd,
                   VALUE_DIM, DV_PAD, MASK_KEYS, V_ALIGN)
    if UPCAST_DOT:
        v = v.to(tl.float32)
    acc = tl.dot(weights.to(v.dtype), v, acc * acc_scale[:, None], input_precision=DOT_PRECISION)
    return new_max, run_sum, new_bound, acc


@triton.autotune(
    configs=_autotune_configs("attention"),
    key=["rows_bucket", "cols_bucket", "D_PAD", "DV_PAD", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def attention_pass_kernel(
    q_ptr, k_ptr, v_ptr, key_bias_ptr, out_ptr, row_potential_ptr,
    n_q, n_k, heads,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    logit_scale2, log2_row_marginal,
    rows_bucket, cols_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    DV_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_ROW_POTENTIAL: tl.constexpr,
    OUTPUT_LSE: tl.constexpr,
    NORMALISE: tl.constexpr,
    OUT_MAX: tl.constexpr,
    Q_ALIGN: tl.constexpr,
    K_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out_i = softmax_j(L[i,j] + key_bias[j]) · v_j; optionally f2_i = log2_row_marginal − LSE2_i
    (the LSE itself with OUTPUT_LSE). OUT_MAX is the largest finite value of out's dtype."""
    tile = tl.program_id(0)
    program_bh = tl.program_id(1)
    q_ptr += _head_offset(program_bh, heads, stride_qb, stride_qh, Q_ALIGN)
    k_ptr += _head_offset(program_bh, heads, stride_kb, stride_kh, K_ALIGN)
    v_ptr += _head_offset(program_bh, heads, stride_vb, stride_vh, V_ALIGN)
    out_ptr += _head_offset(program_bh, heads, stride_ob, stride_oh, 1)
    key_bias_ptr += program_bh.to(tl.int64) * n_k
    row_potential_ptr += program_bh.to(tl.int64) * n_q

    row_start = tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_tile(q_ptr + tl.cast(row_start, tl.int64) * stride_qn, offs_m, offs_d, n_q - row_start,
                   stride_qn, stride_qd, HEAD_DIM, D_PAD, True, Q_ALIGN)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_bound = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    n_full = (n_k // BLOCK_N) * BLOCK_N
    if WHILE_LOOPS:
        start = 0
        while start < n_full:
            run_max, run_sum, run_bound, acc = _attention_update(
                q, k_ptr, v_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, offs_dv,
                stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, run_bound, acc,
                HEAD_DIM, D_PAD, VALUE_DIM, DV_PAD, HAS_BIAS, False, UPCAST_DOT, DOT_PRECISION, NORMALISE, BLOCK_N,
                K_ALIGN, V_ALIGN)
            start += BLOCK_N
    else:
        for start in range(0, n_full, BLOCK_N):
            run_max, run_sum, run_bound, acc = _attention_update(
                q, k_ptr, v_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, offs_dv,
                stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, run_bound, acc,
                HEAD_DIM, D_PAD, VALUE_DIM, DV_PAD, HAS_BIAS, False, UPCAST_DOT, DOT_PRECISION, NORMALISE, BLOCK_N,
                K_ALIGN, V_ALIGN)
    if n_full < n_k:
        run_max, run_sum, run_bound, acc = _attention_update(
            q, k_ptr, v_ptr, key_bias_ptr, n_full, n_k, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, run_bound, acc,
            HEAD_DIM, D_PAD, VALUE_DIM, DV_PAD, HAS_BIAS, True, UPCAST_DOT, DOT_PRECISION, NORMALISE, BLOCK_N,
                K_ALIGN, V_ALIGN)

    # A row with no admissible key (every entry -inf) has run_sum = 0 and gets out = 0.
    out = tl.where((run_sum == 0.0)[:, None], 0.0, acc * (run_bound / run_sum)[:, None])
    # out is a convex combination of v's rows. acc (kept within v's range) is infinite only for
    # non-finite inputs, which SPEC §4 wants to read as NaN; the final rescale may round one ulp
    # past the output dtype's largest value, which must not become Inf (comparisons are false
    # for NaN, which stays).
    out = tl.where(tl.abs(acc) == float("inf"), float("nan"), out)
    out = tl.where(out > OUT_MAX, OUT_MAX, tl.where(out < -OUT_MAX, -OUT_MAX, out))
    row_mask = row_start + offs_m < n_q
    tl.store(
        out_ptr + tl.cast(row_start, tl.int64) * stride_on + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (offs_dv < VALUE_DIM)[None, :],
    )
    if WRITE_ROW_POTENTIAL:
        row_potential = _log_output(run_max + tl.log2(run_sum), log2_row_marginal, OUTPUT_LSE)
        tl.store(row_potential_ptr + row_start + offs_m, row_potential, mask=row_mask)

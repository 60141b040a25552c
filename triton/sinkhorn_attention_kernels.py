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

Float32 accumulation and potentials for float16/bfloat16/float32 inputs (``tl.dot`` in the input
dtype, float32 as IEEE or TF32 as the launcher says). Head dims are constexpr and padded to a power
of two, masked only when padding exists. Whole column tiles run unmasked; the one partial tile
comes last and its missing columns enter the LSE as -inf. Every tile holds at least one real
column, so the running max is finite for finite inputs and no -inf − -inf appears. NaN in an input
reaches the sums through exp2 and stays; an infinite ``out`` (only possible from non-finite
inputs) is written as NaN. Tile starts are 64-bit, offsets inside a tile 32-bit.

Autotuning is keyed on bucketed sizes on a GPU (single config below 1024 rows or columns, or with
``ASAG_TRITON_AUTOTUNE=0``); under ``TRITON_INTERPRET=1`` exactly one pinned configuration is used
(the interpreter cannot benchmark several).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# The interpreter is slow per tile and cannot autotune: one small configuration.
INTERPRETER_BLOCK_M = 64
INTERPRETER_BLOCK_N = 64


def _potential_configs():
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_N": INTERPRETER_BLOCK_N}, num_warps=4, num_stages=1)]
    shapes = [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (256, 64, 8, 3),
        (128, 128, 4, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _attention_configs():
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_N": INTERPRETER_BLOCK_N}, num_warps=4, num_stages=1)]
    shapes = [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Below this many rows or columns a pass is too short for the tile choice to matter; the first
# configuration is used without benchmarking (also keeps test suites from compiling every config).
AUTOTUNE_MIN_SIZE = 1024
# ASAG_TRITON_AUTOTUNE=0 pins the first configuration everywhere: results are then bitwise
# reproducible across processes too (autotuning may pick other tiles, which reorders the sums).
AUTOTUNE = os.environ.get("ASAG_TRITON_AUTOTUNE", "1") != "0"
# Shared memory a configuration may plan for: fits A100 (164 KiB) and H100 (227 KiB) with room;
# less where the device has less (consumer GPUs have about 100 KiB).
SHARED_MEMORY_BUDGET = 160 * 1024
_device_budgets: dict = {}


def _shared_memory_budget() -> int:
    try:
        import torch

        device = torch.cuda.current_device()
        if device not in _device_budgets:
            props = triton.runtime.driver.active.utils.get_device_properties(device)
            _device_budgets[device] = min(SHARED_MEMORY_BUDGET, int(props["max_shared_mem"]) - 4 * 1024)
        return _device_budgets[device]
    except Exception:  # no GPU (ahead-of-time compile checks): the default
        return SHARED_MEMORY_BUDGET
# float32 without TF32 is an FMA dot (no tensor cores): small tiles, short compiles.
_FLOAT32_SHAPES = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2)]


def _shared_memory_estimate(block_m, block_n, stages, d_pad, dv_pad, elem_bytes):
    """Upper bound: pipelined key (and value) tiles plus the resident row tile."""
    return (stages * block_n * (d_pad + dv_pad) + block_m * d_pad) * elem_bytes


def _prune_configs(configs, named_args, **kwargs):
    """Shrink pipelining (or drop tiles) to fit shared memory; small or pinned passes: one config."""
    if INTERPRETING:
        return configs
    elem_bytes = next(iter(named_args.values())).element_size()
    d_pad, dv_pad = kwargs["D_PAD"], kwargs.get("DV_PAD", 0)
    budget = _shared_memory_budget()
    if elem_bytes == 4 and kwargs.get("DOT_PRECISION") == "ieee":
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in _FLOAT32_SHAPES]
    kept = {}
    for c in configs:
        block_m, block_n, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        while stages > 1 and _shared_memory_estimate(block_m, block_n, stages, d_pad, dv_pad, elem_bytes) > budget:
            stages -= 1
        if _shared_memory_estimate(block_m, block_n, stages, d_pad, dv_pad, elem_bytes) <= budget:
            kept.setdefault((block_m, block_n, c.num_warps, stages),
                            triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=c.num_warps, num_stages=stages))
    kept = list(kept.values()) or [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    small = min(named_args["rows_bucket"], named_args["cols_bucket"]) < AUTOTUNE_MIN_SIZE
    return kept[:1] if small or not AUTOTUNE else kept


def size_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two, capped (tiles stop mattering)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


@triton.jit
def _head_offset(program_bh, heads, stride_b, stride_h):
    batch = (program_bh // heads).to(tl.int64)
    head = (program_bh % heads).to(tl.int64)
    return batch * stride_b + head * stride_h


@triton.jit
def _load_tile(ptr, offs_row, offs_col, rows_left, stride_row, stride_col,
               N_COLS: tl.constexpr, COLS_PAD: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [rows, COLS_PAD] tile from ``ptr`` (its first row); rows from ``rows_left`` on and padded
    columns read as 0, with no mask at all when neither exists. Offsets inside a tile are small,
    the tile's start is folded into ``ptr`` in 64 bits."""
    ptrs = ptr + offs_row[:, None] * stride_row + offs_col[None, :] * stride_col
    if MASK_ROWS:
        if N_COLS == COLS_PAD:
            return tl.load(ptrs, mask=(offs_row < rows_left)[:, None], other=0.0)
        return tl.load(ptrs, mask=(offs_row < rows_left)[:, None] & (offs_col < N_COLS)[None, :], other=0.0)
    if N_COLS == COLS_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_col < N_COLS)[None, :], other=0.0)


@triton.jit
def _load_tile_transposed(ptr, offs_row, offs_col, rows_left, stride_row, stride_col,
                          N_COLS: tl.constexpr, COLS_PAD: tl.constexpr, MASK_ROWS: tl.constexpr):
    """``_load_tile`` read directly as its [COLS_PAD, rows] transpose through the strides (a load
    feeding ``tl.dot`` without a ``tl.trans`` in between is what Triton's pipeliner makes async)."""
    ptrs = ptr + offs_col[:, None] * stride_col + offs_row[None, :] * stride_row
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
                UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """L2 + bias for one column tile, -inf at columns past n_cols."""
    cols_idx = start + offs_c
    tile_ptr = cols_ptr + tl.cast(start, tl.int64) * stride_cn
    cols_t = _load_tile_transposed(tile_ptr, offs_c, offs_d, n_cols - start, stride_cn, stride_cd, HEAD_DIM, D_PAD,
                                   MASK_COLS)
    if UPCAST_DOT:
        cols_t = cols_t.to(tl.float32)
    logits = tl.dot(rows, cols_t, input_precision=DOT_PRECISION) * logit_scale2
    if HAS_BIAS:
        if MASK_COLS:
            bias = tl.load(col_bias_ptr + cols_idx, mask=cols_idx < n_cols, other=float("-inf")) * LOG2E
        else:
            bias = tl.load(col_bias_ptr + cols_idx) * LOG2E
        logits = logits + bias[None, :]
    elif MASK_COLS:
        logits = tl.where((cols_idx < n_cols)[None, :], logits, float("-inf"))
    return logits


@triton.jit
def _potential_update(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d, stride_cn, stride_cd,
                      logit_scale2, run_max, run_sum,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_COLS: tl.constexpr,
                      UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    logits = _logit_tile(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d, stride_cn, stride_cd,
                         logit_scale2, HEAD_DIM, D_PAD, HAS_BIAS, MASK_COLS, UPCAST_DOT, DOT_PRECISION)
    new_max = tl.maximum(run_max, tl.max(logits, 1))
    run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), 1)
    return new_max, run_sum


@triton.autotune(
    configs=_potential_configs(),
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
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """potential[r] = log2_marginal − log2 Σ_c 2^(logit_scale2·<rows_r, cols_c> + col_bias[c])."""
    tile = tl.program_id(0)
    program_bh = tl.program_id(1)
    rows_ptr += _head_offset(program_bh, heads, stride_rb, stride_rh)
    cols_ptr += _head_offset(program_bh, heads, stride_cb, stride_ch)
    # Potentials are contiguous [B·H, N] float32 buffers owned by the launcher.
    col_bias_ptr += program_bh.to(tl.int64) * n_cols
    potential_ptr += program_bh.to(tl.int64) * n_rows

    row_start = tile * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    rows = _load_tile(rows_ptr + tl.cast(row_start, tl.int64) * stride_rn, offs_r, offs_d, n_rows - row_start,
                      stride_rn, stride_rd, HEAD_DIM, D_PAD, True)
    if UPCAST_DOT:
        rows = rows.to(tl.float32)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    # Whole column tiles need no column mask; the one partial tile (if any) comes last.
    n_full = (n_cols // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        run_max, run_sum = _potential_update(rows, cols_ptr, col_bias_ptr, start, n_cols, offs_c, offs_d,
                                             stride_cn, stride_cd, logit_scale2, run_max, run_sum,
                                             HEAD_DIM, D_PAD, HAS_BIAS, False, UPCAST_DOT, DOT_PRECISION)
    if n_full < n_cols:
        run_max, run_sum = _potential_update(rows, cols_ptr, col_bias_ptr, n_full, n_cols, offs_c, offs_d,
                                             stride_cn, stride_cd, logit_scale2, run_max, run_sum,
                                             HEAD_DIM, D_PAD, HAS_BIAS, True, UPCAST_DOT, DOT_PRECISION)

    potential = (log2_marginal - (run_max + tl.log2(run_sum))) * LN2
    tl.store(potential_ptr + row_start + offs_r, potential, mask=row_start + offs_r < n_rows)


@triton.jit
def _attention_update(q, k_ptr, v_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, offs_dv,
                      stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, acc,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, VALUE_DIM: tl.constexpr, DV_PAD: tl.constexpr,
                      HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    logits = _logit_tile(q, k_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, stride_kn, stride_kd,
                         logit_scale2, HEAD_DIM, D_PAD, HAS_BIAS, MASK_KEYS, UPCAST_DOT, DOT_PRECISION)
    new_max = tl.maximum(run_max, tl.max(logits, 1))
    rescale = tl.exp2(run_max - new_max)
    weights = tl.exp2(logits - new_max[:, None])
    run_sum = run_sum * rescale + tl.sum(weights, 1)
    # Value rows past n_k load as 0 (their weight is 0 too, but 0·garbage could be NaN).
    v = _load_tile(v_ptr + tl.cast(start, tl.int64) * stride_vn, offs_n, offs_dv, n_k - start, stride_vn, stride_vd,
                   VALUE_DIM, DV_PAD, MASK_KEYS)
    if UPCAST_DOT:
        v = v.to(tl.float32)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, run_sum, acc


@triton.autotune(
    configs=_attention_configs(),
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
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out_i = softmax_j(L[i,j] + key_bias[j]) · v_j; optionally f2_i = log2_row_marginal − LSE2_i."""
    tile = tl.program_id(0)
    program_bh = tl.program_id(1)
    q_ptr += _head_offset(program_bh, heads, stride_qb, stride_qh)
    k_ptr += _head_offset(program_bh, heads, stride_kb, stride_kh)
    v_ptr += _head_offset(program_bh, heads, stride_vb, stride_vh)
    out_ptr += _head_offset(program_bh, heads, stride_ob, stride_oh)
    key_bias_ptr += program_bh.to(tl.int64) * n_k
    row_potential_ptr += program_bh.to(tl.int64) * n_q

    row_start = tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_tile(q_ptr + tl.cast(row_start, tl.int64) * stride_qn, offs_m, offs_d, n_q - row_start,
                   stride_qn, stride_qd, HEAD_DIM, D_PAD, True)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    n_full = (n_k // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        run_max, run_sum, acc = _attention_update(
            q, k_ptr, v_ptr, key_bias_ptr, start, n_k, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, acc,
            HEAD_DIM, D_PAD, VALUE_DIM, DV_PAD, HAS_BIAS, False, UPCAST_DOT, DOT_PRECISION)
    if n_full < n_k:
        run_max, run_sum, acc = _attention_update(
            q, k_ptr, v_ptr, key_bias_ptr, n_full, n_k, offs_n, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, logit_scale2, run_max, run_sum, acc,
            HEAD_DIM, D_PAD, VALUE_DIM, DV_PAD, HAS_BIAS, True, UPCAST_DOT, DOT_PRECISION)

    out = acc / run_sum[:, None]
    # out is a convex combination of v's rows: it is infinite only for non-finite inputs, which
    # SPEC §4 wants to read as NaN.
    out = tl.where(tl.abs(out) == float("inf"), float("nan"), out)
    row_mask = row_start + offs_m < n_q
    tl.store(
        out_ptr + tl.cast(row_start, tl.int64) * stride_on + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (offs_dv < VALUE_DIM)[None, :],
    )
    if WRITE_ROW_POTENTIAL:
        row_potential = (log2_row_marginal - (run_max + tl.log2(run_sum))) * LN2
        tl.store(row_potential_ptr + row_start + offs_m, row_potential, mask=row_mask)

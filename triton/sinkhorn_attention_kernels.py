"""Triton kernels of ``backend="triton"``: tiled log-domain Sinkhorn attention (SPEC §3).

Everything runs in base 2 so that each exponential is one ``exp2``: with log2(e) folded into the
logit scale and the potentials kept in base 2 (f2 = f·log2 e, g2 = g·log2 e),

    L2[i,j] = c2 · <q_i, k_j>,          c2 = cost_sign · scale / epsilon · log2(e)

    potential pass   p2_r = log2 mu_r − log2 Σ_c 2^(L2[r,c] + bias2_c)     (online over column tiles)
        row update:    rows = q, cols = k, bias = g2, mu = 1/Nq   → f2
        column update: rows = k, cols = q, bias = f2, mu = 1/Nk   → g2   (L is symmetric in the roles
                       of q and k, so the column LSE is the row LSE of the transposed problem; every
                       program owns whole outputs, so no atomics and a fixed reduction order)
    attention pass   out_i = Σ_j 2^(L2[i,j] + g2_j − m_i) v_j / Σ_j 2^(L2[i,j] + g2_j − m_i)
                     (flash attention with a key bias; it can also write f2 = log2 a − LSE2, which
                     is all that num_iters = 0 needs)

Float32 accumulation and potentials for float16/bfloat16/float32 inputs. Head dims are padded to a
power of two with masked loads; rows and columns past N are masked, the padded columns enter every
LSE as -inf and every column tile holds at least one real column, so the running max is finite for
finite inputs and no -inf − -inf appears. NaN in an input reaches the sums through exp2 and stays.

Autotuning is keyed on bucketed sizes on a GPU; under ``TRITON_INTERPRET=1`` exactly one pinned
configuration is used (the interpreter cannot benchmark several).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

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


def _prune_configs(configs, named_args, **kwargs):
    """Above head dim 128 keep tiles whose operands fit shared memory; small or pinned: one config."""
    if INTERPRETING:
        return configs
    width = max(kwargs.get("D_PAD", 16), kwargs.get("DV_PAD", 16))
    if width > 128:
        kept = {}
        for c in configs:
            if c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_M"] <= 128:
                stages = min(c.num_stages, 2)
                key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, stages)
                kept.setdefault(key, triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages))
        configs = list(kept.values()) or configs[:1]
    small = min(named_args["rows_bucket"], named_args["cols_bucket"]) < AUTOTUNE_MIN_SIZE
    return configs[:1] if small or not AUTOTUNE else configs


def size_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two, capped (tiles stop mattering)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


@triton.jit
def _head_offset(program_bh, heads, stride_b, stride_h):
    batch = (program_bh // heads).to(tl.int64)
    head = (program_bh % heads).to(tl.int64)
    return batch * stride_b + head * stride_h


@triton.autotune(
    configs=_potential_configs(),
    key=["rows_bucket", "cols_bucket", "D_PAD", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def potential_pass_kernel(
    rows_ptr, cols_ptr, col_bias_ptr, potential_ptr,
    n_rows, n_cols, head_dim, heads,
    stride_rb, stride_rh, stride_rn, stride_rd,
    stride_cb, stride_ch, stride_cn, stride_cd,
    logit_scale2, log2_marginal,
    rows_bucket, cols_bucket,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    D_PAD: tl.constexpr,
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

    offs_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_mask = offs_r < n_rows
    d_mask = offs_d < head_dim

    rows = tl.load(
        rows_ptr + offs_r[:, None] * stride_rn + offs_d[None, :] * stride_rd,
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST_DOT:
        rows = rows.to(tl.float32)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols_idx = start + offs_c
        col_mask = cols_idx < n_cols
        cols_t = tl.load(
            cols_ptr + offs_d[:, None] * stride_cd + cols_idx[None, :] * stride_cn,
            mask=d_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if UPCAST_DOT:
            cols_t = cols_t.to(tl.float32)
        logits = tl.dot(rows, cols_t, input_precision=DOT_PRECISION) * logit_scale2
        if HAS_BIAS:
            bias = tl.load(col_bias_ptr + cols_idx, mask=col_mask, other=float("-inf"))
            logits = logits + bias[None, :]
        else:
            logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), 1)
        run_max = new_max

    potential = log2_marginal - (run_max + tl.log2(run_sum))
    tl.store(potential_ptr + offs_r, potential, mask=row_mask)


@triton.autotune(
    configs=_attention_configs(),
    key=["rows_bucket", "cols_bucket", "D_PAD", "DV_PAD", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def attention_pass_kernel(
    q_ptr, k_ptr, v_ptr, key_bias_ptr, out_ptr, row_potential_ptr,
    n_q, n_k, head_dim, value_dim, heads,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    logit_scale2, log2_row_marginal,
    rows_bucket, cols_bucket,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    WRITE_ROW_POTENTIAL: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
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

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_mask = offs_m < n_q
    d_mask = offs_d < head_dim
    dv_mask = offs_dv < value_dim

    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        keys_idx = start + offs_n
        key_mask = keys_idx < n_k
        k_t = tl.load(
            k_ptr + offs_d[:, None] * stride_kd + keys_idx[None, :] * stride_kn,
            mask=d_mask[:, None] & key_mask[None, :], other=0.0,
        )
        if UPCAST_DOT:
            k_t = k_t.to(tl.float32)
        logits = tl.dot(q, k_t, input_precision=DOT_PRECISION) * logit_scale2
        if HAS_BIAS:
            bias = tl.load(key_bias_ptr + keys_idx, mask=key_mask, other=float("-inf"))
            logits = logits + bias[None, :]
        else:
            logits = tl.where(key_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        rescale = tl.exp2(run_max - new_max)
        weights = tl.exp2(logits - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(weights, 1)
        # Padded value rows load as 0 (their weight is 0 too; 0·garbage could be NaN).
        v = tl.load(
            v_ptr + keys_idx[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=key_mask[:, None] & dv_mask[None, :], other=0.0,
        )
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        run_max = new_max

    out = acc / run_sum[:, None]
    # out is a convex combination of v's rows: it is infinite only for non-finite inputs, which
    # SPEC §4 wants to read as NaN.
    out = tl.where(tl.abs(out) == float("inf"), float("nan"), out)
    tl.store(
        out_ptr + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dv_mask[None, :],
    )
    if WRITE_ROW_POTENTIAL:
        tl.store(row_potential_ptr + offs_m, log2_row_marginal - (run_max + tl.log2(run_sum)), mask=row_mask)

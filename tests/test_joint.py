"""joint_sinkhorn_attention (SPEC §10) against a float64 evaluation of the SPEC formula on full matrices."""

from __future__ import annotations

import math

import pytest
import torch

from asag_kernels import sinkhorn_attention
from asag_kernels._spec import out_tolerance
from asag_kernels.joint import joint_sinkhorn_attention

from conftest import rel_err, require_backend


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that is -inf (not nan) when every entry is -inf."""
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp().sum(dim=dim).log() + m.squeeze(dim)


def _plan_rows(L: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, num_iters: int) -> torch.Tensor:
    """SPEC §3 on the sub-problem rows x cols of L [B, H, N, N] (others -inf), uniform marginals over
    the chosen rows/cols; returns the row-normalised plan (zero outside cols; rows outside `rows` unused)."""
    ninf = torch.tensor(-math.inf, dtype=L.dtype)
    keep = rows[:, None, :, None] & cols[:, None, None, :]
    L = torch.where(keep, L, ninf)
    log_a = -torch.log(rows.sum(-1, dtype=L.dtype))[:, None, None]
    log_b = -torch.log(cols.sum(-1, dtype=L.dtype))[:, None, None]
    g = torch.where(cols[:, None, :], torch.zeros((), dtype=L.dtype), ninf).expand(L.shape[:-2] + L.shape[-1:])
    for _ in range(num_iters):
        f = torch.where(rows[:, None, :], log_a - _lse(L + g[..., None, :], -1), ninf)
        g = torch.where(cols[:, None, :], log_b - _lse(L + f[..., :, None], -2), ninf)
    logits = L + g[..., None, :]
    plan = (logits - _lse(logits, -1)[..., None]).exp()
    return torch.nan_to_num(plan, nan=0.0)


def reference_joint(q, k, v, start, stop, joint_mode, mask=None, num_iters=2, cost="adversarial", scale=None, epsilon=1.0):
    """SPEC §10 in float64 with every N x N matrix formed (the oracle)."""
    q, k, v = (t.double() for t in (q, k, v))
    b, _, n, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    image = torch.zeros(n, dtype=torch.bool)
    image[start:stop] = True
    S = scale * q @ k.transpose(-1, -2)
    softmax = torch.softmax(torch.where(real[:, None, None, :], S, torch.tensor(-math.inf, dtype=S.dtype)), -1)
    ordinary = softmax @ v
    sigma = -1.0 if cost == "adversarial" else 1.0
    L = sigma * S / epsilon
    if joint_mode == "joint":
        perturbed_rows = real
        perturbed = _plan_rows(L, real, real, num_iters) @ v
    else:
        perturbed_rows = real & image
        p_hat = _plan_rows(L, perturbed_rows, perturbed_rows, num_iters)
        text_keys = (real & ~image)[:, None, None, :]
        image_keys = perturbed_rows[:, None, None, :]
        m = (softmax * image_keys).sum(-1, keepdim=True)
        perturbed = (softmax * text_keys) @ v + m * (p_hat @ v)
    return torch.where(perturbed_rows[:, None, :, None], perturbed, ordinary)


def _qkv(b, h, n, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # diffusers hands over [B, N, H, D] storage transposed to [B, H, N, D]: test that layout.
    return [torch.randn(b, n, h, d, generator=gen).transpose(1, 2).to(dtype) for _ in range(3)]


def _mask(b, n, seed, start, stop, mask_image=False):
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, n, generator=gen) > 0.35
    if not mask_image:
        mask[:, start:stop] = True
    mask[:, start] = True  # at least one real image token
    mask[0] = True  # one element unmasked: two mask groups in one batch
    return mask


CASES = [
    # (N, image_start, image_stop): text first (Flux), image first (SD3), no text, one image token
    (13, 4, 13),
    (13, 0, 9),
    (9, 0, 9),
    (7, 6, 7),
]


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
@pytest.mark.parametrize("n,start,stop", CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("torch", torch.float64), ("cpu", torch.float32)])
def test_matches_float64_formula(joint_mode, n, start, stop, masked, backend, dtype, seed):
    require_backend(backend, dtype)
    b, h, d = 3, 2, 8
    q, k, v = _qkv(b, h, n, d, dtype, seed)
    mask = _mask(b, n, seed, start, stop, mask_image=True) if masked else None
    kwargs = dict(num_iters=3, epsilon=0.7, scale=0.4)
    out = joint_sinkhorn_attention(q, k, v, image_start=start, image_stop=stop, joint_mode=joint_mode,
                                   key_padding_mask=mask, backend=backend, **kwargs)
    ref = reference_joint(q, k, v, start, stop, joint_mode, mask, **kwargs)
    assert out.shape == (b, h, n, d) and out.dtype == dtype and out.is_contiguous()
    tol = out_tolerance(dtype)
    assert rel_err(out, ref) <= tol, f"seed={seed} err={rel_err(out, ref):.2e}"


@pytest.mark.parametrize("cost", ["adversarial", "standard"])
def test_default_scale_and_cost(cost, seed):
    q, k, v = _qkv(2, 3, 11, 16, torch.float64, seed)
    out = joint_sinkhorn_attention(q, k, v, image_start=3, image_stop=11, cost=cost, backend="torch")
    ref = reference_joint(q, k, v, 3, 11, "image", cost=cost)
    assert rel_err(out, ref) <= out_tolerance(torch.float64), f"seed={seed}"


def test_image_mode_with_one_image_token_is_ordinary_attention(seed):
    # A 1x1 plan is 1: m_i times the one image value is exactly the softmax's image term.
    q, k, v = _qkv(2, 2, 10, 8, torch.float64, seed)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    for start in (0, 4, 9):
        out = joint_sinkhorn_attention(q, k, v, image_start=start, image_stop=start + 1, key_padding_mask=mask,
                                       num_iters=4, epsilon=0.3, backend="torch")
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        assert rel_err(out, sdpa) <= out_tolerance(torch.float64), f"seed={seed} start={start}"


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
def test_without_text_both_modes_equal_sinkhorn(joint_mode, seed):
    q, k, v = _qkv(2, 2, 12, 8, torch.float64, seed)
    out = joint_sinkhorn_attention(q, k, v, image_start=0, image_stop=12, joint_mode=joint_mode, backend="torch")
    assert rel_err(out, sinkhorn_attention(q, k, v, backend="torch")) <= out_tolerance(torch.float64), f"seed={seed}"
    # Text that is all padding is the same as no text.
    q2, k2, v2 = _qkv(2, 2, 17, 8, torch.float64, seed + 7)
    for t, t2 in ((q, q2), (k, k2), (v, v2)):
        t2[:, :, 5:] = t
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, :5] = False
    out2 = joint_sinkhorn_attention(q2, k2, v2, image_start=5, image_stop=17, joint_mode=joint_mode,
                                    key_padding_mask=mask, backend="torch")
    assert rel_err(out2[:, :, 5:], out) <= out_tolerance(torch.float64), f"seed={seed}"


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
def test_padded_keys_have_no_influence(joint_mode, seed):
    q, k, v = _qkv(2, 2, 14, 8, torch.float64, seed)
    mask = _mask(2, 14, seed, 5, 14)
    mask[1, 1] = False
    out = joint_sinkhorn_attention(q, k, v, image_start=5, image_stop=14, joint_mode=joint_mode,
                                   key_padding_mask=mask, backend="torch")
    k2, v2 = k.clone(), v.clone()
    pad = ~mask[:, None, :, None]
    k2 = torch.where(pad, 50 * torch.randn_like(k2), k2)
    v2 = torch.where(pad, 1e3 * torch.randn_like(v2), v2)
    out2 = joint_sinkhorn_attention(q, k2, v2, image_start=5, image_stop=14, joint_mode=joint_mode,
                                    key_padding_mask=mask, backend="torch")
    assert torch.allclose(out, out2, rtol=1e-12, atol=1e-12), f"seed={seed}"
    # ... whereas without the mask those keys do change the result (the mask is not ignored).
    free = joint_sinkhorn_attention(q, k2, v2, image_start=5, image_stop=14, joint_mode=joint_mode, backend="torch")
    assert not torch.allclose(free, out, rtol=1e-6, atol=1e-6)


def test_half_precision_and_image_mode_differs_from_joint(seed):
    q, k, v = _qkv(1, 2, 20, 16, torch.bfloat16, seed)
    img = joint_sinkhorn_attention(q, k, v, image_start=8, image_stop=20, backend="cpu")
    joint = joint_sinkhorn_attention(q, k, v, image_start=8, image_stop=20, joint_mode="joint", backend="cpu")
    assert img.dtype == torch.bfloat16
    assert rel_err(img, reference_joint(q, k, v, 8, 20, "image")) <= out_tolerance(torch.bfloat16), f"seed={seed}"
    assert rel_err(joint, reference_joint(q, k, v, 8, 20, "joint")) <= out_tolerance(torch.bfloat16), f"seed={seed}"
    # Text queries: ordinary attention in 'image' mode only.
    assert rel_err(img[:, :, :8], joint[:, :, :8]) > 1e-2


def test_empty_batch():
    q = torch.randn(0, 2, 5, 4)
    out = joint_sinkhorn_attention(q, q, q, image_start=1, image_stop=5)
    assert out.shape == (0, 2, 5, 4)
    with pytest.raises(ValueError, match="epsilon"):  # arguments are checked even with nothing to compute
        joint_sinkhorn_attention(q, q, q, image_start=1, image_stop=5, epsilon=0.0)
    # ... and so are the tensors: head dims, dtypes, the scale/epsilon overflow.
    with pytest.raises(ValueError, match="head dim"):
        joint_sinkhorn_attention(q, torch.randn(0, 2, 5, 3), q, image_start=1, image_stop=5)
    with pytest.raises(TypeError, match="dtype"):
        joint_sinkhorn_attention(q, q.double(), q, image_start=1, image_stop=5)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        joint_sinkhorn_attention(q.long(), q.long(), q.long(), image_start=1, image_stop=5)
    with pytest.raises(ValueError, match="scale/epsilon"):
        joint_sinkhorn_attention(q, q, q, image_start=1, image_stop=5, epsilon=1e-300)


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(joint_mode="text"), ValueError, "joint_mode"),
        (dict(joint_mode=None), TypeError, "joint_mode"),
        (dict(image_start=3, image_stop=3), ValueError, "image_start"),
        (dict(image_start=-1), ValueError, "image_start"),
        (dict(image_stop=9), ValueError, "image_stop"),
        (dict(image_start=1.0), TypeError, "image_start"),
        (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask"),
        (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=torch.zeros(2, 8, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(num_iters=-1), ValueError, "num_iters"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(cost="x"), ValueError, "cost"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(num_iters=2.0), TypeError, "num_iters"),
        (dict(scale=float("inf")), ValueError, "scale"),
    ],
)
def test_bad_arguments(kwargs, exc, needle):
    q = torch.randn(2, 2, 8, 4)
    args = dict(image_start=2, image_stop=8)
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        joint_sinkhorn_attention(q, q, q, **args)


def test_bad_shapes():
    q = torch.randn(2, 2, 8, 4)
    with pytest.raises(ValueError, match="q"):
        joint_sinkhorn_attention(q[0], q[0], q[0], image_start=0, image_stop=8)
    with pytest.raises(ValueError, match="share"):
        joint_sinkhorn_attention(q, q[:, :, :6], q[:, :, :6], image_start=0, image_stop=6)

"""The one settings object (asag_kernels.settings) and the one mask rule (asag_kernels.masks) that the
diffusers integration and the ComfyUI node pack share: every mask form either integration meets."""

from __future__ import annotations

import pytest
import torch

from asag_kernels import sinkhorn_attention
from asag_kernels._spec import out_tolerance
from asag_kernels.joint import joint_sinkhorn_attention
from asag_kernels.masks import DROPPED_LOGIT, UnsupportedMaskError, key_padding
from asag_kernels.settings import DEFAULT_EPSILON, DEFAULT_NUM_ITERS, SinkhornSettings

from test_joint import reference_joint

B, H, N, D = 2, 2, 9, 8


def _qkv(seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g) for _ in range(3))


def _real(seed: int) -> torch.Tensor:
    """A key-padding pattern: sample 0 drops its last two tokens, sample 1 its first one."""
    real = torch.ones(B, N, dtype=torch.bool)
    real[0, -2:] = False
    real[1, 0] = False
    return real


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- the mask rule --------------------------------------------------------------------------------

KEY_PADDING_FORMS = {
    # name: real [B, N] -> the mask a framework passes
    "bool [B,1,1,N] (Qwen-Image)": lambda real: real[:, None, None, :],
    "bool [B,1,N,N] every query the same": lambda real: real[:, None, None, :].expand(B, 1, N, N),
    "bool [B,H,N,N] every head the same": lambda real: real[:, None, None, :].expand(B, H, N, N),
    "additive -1e4 [B,1,1,N] (diffusers UNets)": lambda real: torch.where(real, 0.0, DROPPED_LOGIT)[:, None, None, :],
    "additive -inf [B,1,N,N] (ComfyUI 3-D [B,Lq,Lk] with its head dim added)":
        lambda real: torch.where(real, 0.0, float("-inf"))[:, None, None, :].expand(B, 1, N, N),
    "additive -finfo.max float16": lambda real: torch.where(real, 0.0, -torch.finfo(torch.float16).max)
        .to(torch.float16)[:, None, None, :],
}


@pytest.mark.parametrize("form", sorted(KEY_PADDING_FORMS))
def test_key_padding_forms(form):
    real = _real(0)
    kpm, padded = key_padding(KEY_PADDING_FORMS[form](real), B, N, "'blocks.0.attn'")
    assert torch.equal(kpm, real)
    assert padded is None


def test_shared_masks_without_batch_dim():
    """SDPA broadcasting from the right: [N] keys, [N, N] and [H, N, N] shared by the batch."""
    real = torch.ones(N, dtype=torch.bool)
    real[3] = False
    for mask in (real, real[None].expand(N, N), real[None, None].expand(H, N, N)):
        kpm, padded = key_padding(mask, B, N)
        assert torch.equal(kpm, real.expand(B, N)) and padded is None


def test_all_real_masks_mean_no_mask():
    for mask in (torch.ones(B, 1, 1, N, dtype=torch.bool), torch.zeros(B, 1, N, N)):
        assert key_padding(mask, B, N) == (None, None)
    assert key_padding(None, B, N) == (None, None)


def test_query_and_key_form_marks_padded_queries():
    """HunyuanVideo 1.5 passes m_i & m_j: real keys, and query rows the model itself masks."""
    real = _real(1)
    kpm, padded = key_padding(real[:, None, :, None] & real[:, None, None, :], B, N)
    assert torch.equal(kpm, real) and torch.equal(padded, ~real)


@pytest.mark.parametrize("case", ["bias", "causal", "per-head", "per-query", "wrong length", "int dtype", "batch"])
def test_masks_that_are_not_key_padding_are_refused(case):
    real = _real(2)
    mask = {
        "bias": lambda: torch.randn(B, 1, N, N),
        "causal": lambda: torch.ones(N, N, dtype=torch.bool).tril(),
        "per-head": lambda: torch.stack([real, ~real], 1)[:, :, None, :],
        "per-query": lambda: torch.ones(B, 1, N, N, dtype=torch.bool).index_put_((torch.tensor([0]), torch.tensor([0]),
                                                                                torch.tensor([4]), torch.tensor([1])),
                                                                               torch.tensor(False)),
        "wrong length": lambda: torch.ones(B, 1, 1, N + 1, dtype=torch.bool),
        "int dtype": lambda: torch.ones(B, 1, 1, N, dtype=torch.int64),
        "batch": lambda: torch.ones(B + 1, 1, 1, N, dtype=torch.bool),
    }[case]()
    with pytest.raises(UnsupportedMaskError, match="'blocks.3.attn'") as info:
        key_padding(mask, B, N, "'blocks.3.attn'")
    # ValueError for the node pack, NotImplementedError for the diffusers interception: one error, both types.
    assert isinstance(info.value, ValueError) and isinstance(info.value, NotImplementedError)
    if case in ("bias",):
        assert "attention bias" in str(info.value)
    else:
        assert "not a key-padding mask" in str(info.value) or "expected" in str(info.value)


# --- the settings object --------------------------------------------------------------------------

def test_settings_defaults_and_validation():
    s = SinkhornSettings()
    assert (s.num_iters, s.epsilon, s.backend, s.joint_mode) == (DEFAULT_NUM_ITERS, DEFAULT_EPSILON, "auto", "image")
    for kwargs, exc, needle in (({"num_iters": -1}, ValueError, "num_iters"), ({"num_iters": 1.5}, TypeError, "num_iters"),
                                ({"epsilon": 0.0}, ValueError, "epsilon"), ({"backend": "gpu"}, ValueError, "backend"),
                                ({"joint_mode": "text"}, ValueError, "joint_mode"), ({"joint_mode": 1}, TypeError, "joint_mode")):
        with pytest.raises(exc, match=needle):
            SinkhornSettings(**kwargs)
    with pytest.raises(Exception):
        s.num_iters = 3  # frozen: one validated value, shared


def test_attend_plain_is_sinkhorn_attention():
    q, k, v = _qkv(3)
    s = SinkhornSettings(num_iters=3, epsilon=0.7, backend="torch")
    got = s.attend(q, k, v, scale=0.4)
    want = sinkhorn_attention(q.double(), k.double(), v.double(), num_iters=3, epsilon=0.7, scale=0.4, backend="reference")
    assert got.dtype == q.dtype
    assert _rel(got, want) <= out_tolerance(torch.float32)


@pytest.mark.parametrize("joint_mode", ["image", "joint"])
@pytest.mark.parametrize("text_first", [True, False])
def test_attend_joint_with_an_additive_mask(joint_mode, text_first):
    """attend = joint_sinkhorn_attention with the mask rule's key padding (text first or image first)."""
    q, k, v = _qkv(4)
    text = 3
    image = (text, N) if text_first else (0, N - text)
    real = _real(4)
    s = SinkhornSettings(num_iters=2, epsilon=0.9, joint_mode=joint_mode, backend="torch")
    mask = torch.where(real, 0.0, float("-inf"))[:, None, None, :]
    got = s.attend(q, k, v, image_start=image[0], image_stop=image[1], attn_mask=mask)
    ref = reference_joint(q, k, v, *image, joint_mode, mask=real, num_iters=2, epsilon=0.9)
    rows = real[:, None, :, None].expand_as(got)
    assert _rel(got[rows], ref[rows]) <= out_tolerance(torch.float32)
    same = joint_sinkhorn_attention(q, k, v, image_start=image[0], image_stop=image[1], joint_mode=joint_mode,
                                    key_padding_mask=real, num_iters=2, epsilon=0.9, backend="torch")
    assert torch.equal(got, same)  # the same kernels on the same shapes


def test_attend_fills_padded_query_rows_from_stock():
    q, k, v = _qkv(5)
    real = _real(5)
    mask = real[:, None, :, None] & real[:, None, None, :]
    marker = torch.full((B, H, N, D), 7.0)
    got = SinkhornSettings(backend="torch").attend(q, k, v, attn_mask=mask, stock=lambda: marker)
    padded = (~real)[:, None, :, None].expand_as(got)
    assert bool((got[padded] == 7.0).all()) and not bool((got[~padded] == 7.0).any())
    without = SinkhornSettings(backend="torch").attend(q, k, v, attn_mask=mask)  # SPEC §10: ordinary attention
    assert torch.equal(without[~padded], got[~padded])


def test_attend_refuses_a_bias_naming_the_call():
    q, k, v = _qkv(6)
    with pytest.raises(UnsupportedMaskError, match="attention bias"):
        SinkhornSettings().attend(q, k, v, attn_mask=torch.randn(B, 1, N, N), where="'double_blocks.0'")

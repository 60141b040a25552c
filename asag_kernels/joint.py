"""Sinkhorn attention over a joint text + image token sequence (SPEC §10).

Joint-attention models (SD3/SD3.5 MMDiT, Flux double- and single-stream blocks, HunyuanVideo,
Qwen-Image) run one self-attention over the concatenation of text and image tokens. ASAG can
perturb that attention in two ways (``joint_mode``):

* ``"image"`` (default; it mirrors diffusers' PAG, which perturbs only the image-image block):
  text queries keep ordinary softmax attention; an image query keeps the total weight ``m_i`` that
  ordinary attention gives the image keys, but spreads it over them by the row-normalised
  adversarial Sinkhorn plan of the image-image block.
* ``"joint"``: Sinkhorn over the whole sequence.

Padded tokens (``key_padding_mask`` False) take no part in any transport problem or softmax as keys
(zero mass); as queries they get ordinary softmax attention over the real keys, which is what the
model's own masked attention gives them.

Everything is computed from the op's outputs and log-sum-exps (``f`` of a zero-iteration call);
no N x N tensor is formed.
"""

from __future__ import annotations

import math

import torch

from ._validate import _check_choice
from .api import _check_inputs, sinkhorn_attention

__all__ = ["JOINT_MODES", "check_joint_mode", "joint_sinkhorn_attention"]

JOINT_MODES = ("image", "joint")


def check_joint_mode(value, name: str = "joint_mode") -> str:
    """``value`` if it is one of :data:`JOINT_MODES`; else, with the rule of ``cost``/``backend``, a
    TypeError (not a string) or ValueError (another string) naming ``name``."""
    return _check_choice(value, name, JOINT_MODES)


def _check_index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_joint_inputs(q, k, v, image_start, image_stop, key_padding_mask) -> tuple[int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D] (4 dims), got shape {tuple(t.shape)}")
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "joint attention is self-attention over one sequence: q, k and v must share [B, H, N], got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    n = q.shape[2]
    start = _check_index(image_start, "image_start")
    stop = _check_index(image_stop, "image_stop")
    if not 0 <= start < stop <= n:
        raise ValueError(
            f"image_start and image_stop must satisfy 0 <= image_start < image_stop <= N = {n} "
            f"(at least one image token), got image_start={start}, image_stop={stop}"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be None or a bool tensor [B, N], got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got dtype {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (q.shape[0], n):
            raise ValueError(
                f"key_padding_mask must have shape [B, N] = {(q.shape[0], n)}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    return start, stop


def _softmax_with_lse(q, k, v, scale, backend):
    """Ordinary attention ``[..., Nq, Dv]`` and ``LSE_j(scale * q.k_j)`` ``[..., Nq]`` (float32/64).

    A zero-iteration standard-cost call: its ``f`` is ``log(1/Nq) - LSE_j L`` (SPEC §3).
    """
    out, f, _ = sinkhorn_attention(
        q, k, v, num_iters=0, cost="standard", scale=scale, epsilon=1.0, backend=backend, return_potentials=True
    )
    return out, -math.log(q.shape[-2]) - f


def _plain(q, k, v, scale, backend):
    return sinkhorn_attention(q, k, v, num_iters=0, cost="standard", scale=scale, epsilon=1.0, backend=backend)


def _solve_group(q, k, v, real, start, stop, joint_mode, sinkhorn_kwargs, scale, backend) -> torch.Tensor:
    """Output for batch elements that share one token mask ``real`` ([N] bool, or None = all real)."""
    n = q.shape[2]
    all_idx = torch.arange(n, device=q.device)
    is_image = (all_idx >= start) & (all_idx < stop)
    real = torch.ones(n, dtype=torch.bool, device=q.device) if real is None else real
    real_idx = all_idx[real]
    if real_idx.numel() == 0:
        raise ValueError("key_padding_mask marks every token of a batch element as padding; at least one must be real")
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    k_real, v_real = k[:, :, real_idx], v[:, :, real_idx]

    if joint_mode == "joint":
        perturbed_idx, ordinary_idx = real_idx, all_idx[~real]
        out[:, :, perturbed_idx] = sinkhorn_attention(q[:, :, real_idx], k_real, v_real, **sinkhorn_kwargs).to(q.dtype)
    else:
        img_idx = all_idx[real & is_image]
        txt_idx = all_idx[real & ~is_image]
        perturbed_idx, ordinary_idx = img_idx, all_idx[~(real & is_image)]
        if img_idx.numel():
            q_img, k_img, v_img = q[:, :, img_idx], k[:, :, img_idx], v[:, :, img_idx]
            o_sink = sinkhorn_attention(q_img, k_img, v_img, **sinkhorn_kwargs)
            if txt_idx.numel():
                # m_i = sum_{j in image} softmax_ij = exp(lse_img - lse_all), lse_all = logaddexp(lse_img, lse_txt).
                _, lse_img = _softmax_with_lse(q_img, k_img, v_img, scale, backend)
                o_txt, lse_txt = _softmax_with_lse(q_img, k[:, :, txt_idx], v[:, :, txt_idx], scale, backend)
                m = torch.sigmoid(lse_img - lse_txt).unsqueeze(-1)  # = exp(lse_img - logaddexp(lse_img, lse_txt))
                o_sink = m * o_sink.to(m.dtype) + (1 - m) * o_txt.to(m.dtype)
            out[:, :, img_idx] = o_sink.to(q.dtype)
    if ordinary_idx.numel():
        out[:, :, ordinary_idx] = _plain(q[:, :, ordinary_idx], k_real, v_real, scale, backend).to(q.dtype)
    return out


def joint_sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    image_start: int,
    image_stop: int,
    joint_mode: str = "image",
    key_padding_mask: torch.Tensor | None = None,
    num_iters: int = 2,
    cost: str = "adversarial",
    scale: float | None = None,
    epsilon: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""ASAG's perturbed attention over a joint text + image sequence (SPEC §10).

    Args:
        q, k, v: ``[B, H, N, D]``, ``[B, H, N, D]``, ``[B, H, N, Dv]``: self-attention over one joint
            sequence (``Nq = Nk = N``), any strides.
        image_start, image_stop: tokens ``image_start:image_stop`` are the image tokens, the rest text
            (text first in Flux, image first in SD3: the caller passes the range). At least one image token.
        joint_mode: ``"image"`` (text queries keep softmax attention; image queries get
            ``out_i = sum_{t in text} softmax_it v_t + m_i sum_{j in image} P_ij v_j`` with ``m_i`` the
            softmax weight on image keys and ``P`` the row-normalised Sinkhorn plan of the image-image
            block) or ``"joint"`` (Sinkhorn over the whole sequence).
        key_padding_mask: ``None`` or bool ``[B, N]``, True = real token. Padded tokens get zero mass in
            every plan and softmax; as queries they get ordinary attention over the real keys.
        num_iters, cost, scale, epsilon, backend: as in :func:`asag_kernels.sinkhorn_attention`
            (``scale=None`` means ``1/sqrt(D)``; the ordinary-attention parts use the same scale).

    Returns:
        ``[B, H, N, Dv]``, contiguous, dtype of ``q``. With no text tokens (or all of them padded) both
        modes equal ``sinkhorn_attention`` on the real tokens.
    """
    check_joint_mode(joint_mode)
    start, stop = _check_joint_inputs(q, k, v, image_start, image_stop, key_padding_mask)
    # The op's own checks (dtypes, devices, head dims, scalars, scale/epsilon overflow), also for an
    # empty batch that returns before any op runs; scale comes back resolved.
    s = _check_inputs(q, k, v, num_iters, cost, scale, epsilon, backend)
    scale, backend = s.resolved_scale, s.backend
    sinkhorn_kwargs = dict(num_iters=s.num_iters, cost=s.cost, scale=scale, epsilon=s.epsilon, backend=backend)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    if key_padding_mask is None or bool(key_padding_mask.all()):
        return _solve_group(q, k, v, None, start, stop, joint_mode, sinkhorn_kwargs, scale, backend)
    # Batch elements with the same mask (e.g. the chunks of a CFG batch) are solved together.
    masks, group_of = torch.unique(key_padding_mask, dim=0, return_inverse=True)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for g in range(masks.shape[0]):
        rows = (group_of == g).nonzero().flatten()
        out[rows] = _solve_group(q[rows], k[rows], v[rows], masks[g], start, stop, joint_mode, sinkhorn_kwargs,
                                 scale, backend)
    return out

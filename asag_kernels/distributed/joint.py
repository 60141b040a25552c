"""Joint text + image Sinkhorn attention over a sharded sequence (SPEC §9, §10).

Each rank holds a shard of the text tokens and a shard of the image tokens, side by side in its
local sequence (``image_start:image_stop`` are its image tokens, the rest its text tokens: what a
joint processor builds under diffusers' context parallelism, ``[text_r, image_r]`` in Flux). The
result is this rank's rows of :func:`asag_kernels.joint.joint_sinkhorn_attention` on the sequence
of every rank's text tokens followed by every rank's image tokens (shard order); neither mode
depends on where text and image sit in the sequence, only on which tokens are which.

``"joint"`` is one distributed Sinkhorn call over the local sequences. ``"image"`` is SPEC §10's
decomposition with distributed calls, each over consecutive shards:

    image queries:  o = m·Sinkhorn_I(q_I, k_I, v_I) + (1 − m)·softmax_T(q_I)·v_T,
                    m = σ(λ_I − λ_T), λ_X = LSE_{j∈X} scale·q·k_j (a zero-iteration standard-cost
                    call's f is log(1/Nq) − λ);
    text queries:   ordinary softmax over all keys.
"""

from __future__ import annotations

import math

import torch

from ..joint import check_joint_mode
from .api import sinkhorn_attention
from .topology import resolve

_MODES = ("image", "joint")


def _check_range(n: int, image_start, image_stop) -> tuple[int, int]:
    for name, value in (("image_start", image_start), ("image_stop", image_stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= image_start <= image_stop <= n:
        raise ValueError(
            f"image_start and image_stop must satisfy 0 <= image_start <= image_stop <= N = {n} (this rank's "
            f"shard; it may hold no image token), got image_start={image_start}, image_stop={image_stop}"
        )
    return image_start, image_stop


def _counts(q, image_start, image_stop, joint_mode, topology):
    """(total text tokens, total image tokens) over the ranks, after one small all_gather that also
    makes every rank raise together when one rank's own arguments were bad or the ranks disagree
    about joint_mode."""
    error, codes = None, [0.0, -1.0, -1.0, -1.0]
    try:
        mode = check_joint_mode(joint_mode)
        if not isinstance(q, torch.Tensor) or q.dim() < 2:
            raise TypeError(f"q must be a tensor [..., N, D], got {type(q).__name__}")
        start, stop = _check_range(q.shape[-2], image_start, image_stop)
        codes = [0.0, float(_MODES.index(mode)), float(q.shape[-2] - (stop - start)), float(stop - start)]
    except (TypeError, ValueError) as exc:
        error, codes[0] = exc, 1.0
    rows = topology.gather_rows(torch.tensor(codes, dtype=torch.float64, device=topology.device)).cpu()
    if error is not None:
        raise error
    bad = [r for r in range(topology.world) if rows[r, 0] != 0]
    if bad:
        raise ValueError(f"rank(s) {bad} of the group rejected their joint-attention arguments (see the error raised there)")
    if not (rows[:, 1] == rows[0, 1]).all():
        raise ValueError(f"every rank must pass the same joint_mode; got {[_MODES[int(m)] for m in rows[:, 1]]} per rank")
    text, image = int(rows[:, 2].sum()), int(rows[:, 3].sum())
    if image == 0:
        raise ValueError("joint attention needs at least one image token over all ranks, got none "
                         "(image_start == image_stop on every rank)")
    return text, image


def joint_sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    image_start: int,
    image_stop: int,
    joint_mode: str = "image",
    group=None,
    strategy: str = "auto",
    ulysses_degree: int | None = None,
    num_iters: int = 2,
    cost: str = "adversarial",
    scale: float | None = None,
    epsilon: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""ASAG's perturbed joint attention (SPEC §10) over a sequence sharded across `group` (SPEC §9).

    Args:
        q, k, v: ``[B, H, n_r, D]``, ``[B, H, n_r, D]``, ``[B, H, n_r, Dv]``: this rank's shard of
            one joint self-attention sequence (query and key shards are the same tokens).
        image_start, image_stop: this rank's image tokens are ``image_start:image_stop`` of its shard
            (possibly none), the others its text tokens. At least one image token over all ranks.
        joint_mode: ``"image"`` or ``"joint"`` as in :func:`asag_kernels.joint.joint_sinkhorn_attention`.
        group, strategy, ulysses_degree: as in :func:`asag_kernels.distributed.sinkhorn_attention`.
        num_iters, cost, scale, epsilon, backend: as in :func:`asag_kernels.sinkhorn_attention`;
            the ordinary-attention parts use the same scale (``None``: ``1/sqrt(D)``).

    Returns:
        ``[B, H, n_r, Dv]`` in q's dtype: this rank's rows of the single-process joint op on every
        rank's text tokens followed by every rank's image tokens. No key-padding mask.
    """
    topology = resolve(group)
    text_total, image_total = _counts(q, image_start, image_stop, joint_mode, topology)
    dist_kw = dict(group=group, strategy=strategy, ulysses_degree=ulysses_degree, backend=backend)
    sinkhorn_kw = dict(num_iters=num_iters, cost=cost, scale=scale, epsilon=epsilon, **dist_kw)
    if joint_mode == "joint" or text_total == 0:
        return sinkhorn_attention(q, k, v, **sinkhorn_kw)
    n = q.shape[-2]
    image = torch.zeros(n, dtype=torch.bool, device=q.device)
    image[image_start:image_stop] = True
    txt = ~image
    q_i, k_i, v_i = q[..., image, :], k[..., image, :], v[..., image, :]
    k_t, v_t = k[..., txt, :], v[..., txt, :]

    def softmax_with_lse(queries, keys, values):
        """Ordinary attention and λ = LSE_j scale·q·k_j (from a zero-iteration call's f)."""
        out, f, _ = sinkhorn_attention(queries, keys, values, num_iters=0, cost="standard", scale=scale, epsilon=1.0,
                                       return_potentials=True, **dist_kw)
        return out, -math.log(image_total) - f

    o_sink = sinkhorn_attention(q_i, k_i, v_i, **sinkhorn_kw)
    _, lse_img = softmax_with_lse(q_i, k_i, v_i)
    o_txt, lse_txt = softmax_with_lse(q_i, k_t, v_t)
    m = torch.sigmoid(lse_img - lse_txt).unsqueeze(-1)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    out[..., image, :] = (m * o_sink.to(m.dtype) + (1 - m) * o_txt.to(m.dtype)).to(q.dtype)
    out[..., txt, :] = sinkhorn_attention(q[..., txt, :], k, v, num_iters=0, cost="standard", scale=scale,
                                          epsilon=1.0, **dist_kw)
    return out

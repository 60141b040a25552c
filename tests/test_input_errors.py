"""Every bad input of SPEC §5 gets a clear error naming the argument and what was got."""

from __future__ import annotations

import pytest
import torch

from asag_kernels import sinkhorn_attention


def _qkv(*lead, nq=6, nk=5, d=8, dv=4, dtype=torch.float32):
    return torch.randn(*lead, nq, d, dtype=dtype), torch.randn(*lead, nk, d, dtype=dtype), torch.randn(*lead, nk, dv, dtype=dtype)


q, k, v = _qkv(2, 3)

BAD = [
    ("leading dims", dict(q=torch.randn(2, 4, 6, 8)), ValueError, r"same leading dims.*\(2, 4\).*\(2, 3\)"),
    ("rank mismatch", dict(k=torch.randn(3, 5, 8)), ValueError, r"same leading dims"),
    ("head dim", dict(k=torch.randn(2, 3, 5, 7)), ValueError, r"k's head dim.*D=8.*D=7"),
    ("value rows", dict(v=torch.randn(2, 3, 6, 4)), ValueError, r"v must have as many rows as k.*Nk=5.*6"),
    ("1-D q", dict(q=torch.randn(8)), ValueError, r"q must have at least 2 dims.*\(8,\)"),
    ("0-D v", dict(v=torch.tensor(1.0)), ValueError, r"v must have at least 2 dims"),
    ("dtype mix", dict(k=k.double()), TypeError, r"one dtype.*torch.float32.*k is torch.float64"),
    ("int dtype", dict(q=torch.ones(2, 3, 6, 8, dtype=torch.int32)), TypeError, r"q must be float16.*int32"),
    ("complex dtype", dict(v=torch.ones(2, 3, 5, 4, dtype=torch.complex64)), TypeError, r"v must be float16.*complex64"),
    ("not a tensor", dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
    ("empty keys", dict(k=torch.randn(2, 3, 0, 8), v=torch.randn(2, 3, 0, 4)), ValueError, r"Nk >= 1.*Nk=0"),
    ("negative iters", dict(num_iters=-1), ValueError, r"num_iters must be an int in \[0, 2147483647\], got -1"),
    ("float iters", dict(num_iters=2.0), TypeError, r"num_iters must be an int.*float 2.0"),
    ("bool iters", dict(num_iters=True), TypeError, r"num_iters must be an int"),
    ("zero epsilon", dict(epsilon=0.0), ValueError, r"epsilon must be a finite number > 0, got 0.0"),
    ("negative epsilon", dict(epsilon=-1.0), ValueError, r"epsilon.*-1.0"),
    ("nan epsilon", dict(epsilon=float("nan")), ValueError, r"epsilon.*nan"),
    ("inf epsilon", dict(epsilon=float("inf")), ValueError, r"epsilon.*inf"),
    ("inf scale", dict(scale=float("inf")), ValueError, r"scale must be a finite number, got inf"),
    ("nan scale", dict(scale=float("nan")), ValueError, r"scale.*nan"),
    ("unknown cost", dict(cost="cosine"), ValueError, r"cost must be one of.*'cosine'"),
    ("unknown backend", dict(backend="mps"), ValueError, r"backend must be one of.*'mps'"),
]


@pytest.mark.parametrize("case,override,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, override, exc, pattern):
    args = dict(q=q, k=k, v=v)
    args.update(override)
    with pytest.raises(exc, match=pattern):
        sinkhorn_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_different_devices():
    meta_k = torch.empty(2, 3, 5, 8, device="meta")
    with pytest.raises(ValueError, match=r"one device.*q is on cpu, k is on meta"):
        sinkhorn_attention(q, meta_k, v)


def test_unavailable_backend_says_which_are_available():
    from asag_kernels import backends

    unusable = [n for n in backends.BACKENDS if backends.unsupported_reason(n, q.device, q.dtype)]
    if not unusable:
        pytest.skip("every backend can run CPU float32 here")
    with pytest.raises(ValueError, match=r"cannot run torch.float32 tensors on cpu: .+Available backends here: \[.*'torch'"):
        sinkhorn_attention(q, k, v, backend=unusable[0])


def test_inference_only():
    qg = q.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        sinkhorn_attention(qg, k, v)
    with torch.no_grad():
        assert sinkhorn_attention(qg, k, v).shape == (2, 3, 6, 4)
    with torch.inference_mode():
        assert sinkhorn_attention(qg, k, v).shape == (2, 3, 6, 4)

"""Every limit the docs quote is the one the code enforces (issue 21): the figure an error message
prints is found, in the same spelling, in the README, SPEC §5 and the API docstring, and the figures
the docs write as powers of two (2**31 − 1, 2**20) are the code's constants."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import asag_kernels
from asag_kernels import _env
from asag_kernels._validate import MAX_NUM_ITERS, check_logit_scale, format_limit, logit_scale_limit
from asag_kernels.settings import SinkhornSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SPEC = (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8")
SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")


def _section(text: str, start: str, end: str) -> str:
    """The text from the first `start` up to the next `end` after it."""
    i = text.index(start)
    j = text.find(end, i + len(start))
    return text[i:] if j < 0 else text[i:j]


README_TROUBLESHOOTING = _section(README, '**"scale/epsilon must be finite', "\n- **")
SPEC_ERRORS = _section(SPEC, "## 5.", "\n## ")


def _powers_of_two_minus_one(text: str) -> list[int]:
    """Every 2**N − 1 / 2**N - 1 / 2ᴺ−1 written in `text`, evaluated."""
    found = re.findall(r"2(?:\*\*(\d+)|([⁰¹²³⁴⁵⁶⁷⁸⁹]+))\s*[−-]\s*1\b", text)
    return [2 ** int(a or b.translate(SUPERSCRIPTS)) - 1 for a, b in found]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_over_epsilon_limit_is_quoted_as_the_error_prints_it(dtype):
    q = k = v = torch.randn(1, 4, 8, dtype=dtype)
    with pytest.raises(ValueError, match="scale/epsilon") as err:
        asag_kernels.sinkhorn_attention(q, k, v, scale=1e300 if dtype == torch.float64 else 1.0, epsilon=1e-300)
    printed = re.search(r"\|scale/epsilon\| <= (\S+)\)", str(err.value)).group(1)
    limit = logit_scale_limit(dtype)
    assert printed == format_limit(limit) and math.isclose(float(printed), limit, rel_tol=1e-3), str(err.value)
    for where, text in (("README troubleshooting", README_TROUBLESHOOTING), ("SPEC §5", SPEC_ERRORS),
                        ("sinkhorn_attention's docstring", asag_kernels.sinkhorn_attention.__doc__)):
        assert printed in text, f"{where} does not quote the limit the error prints ({printed})"
    # The bound is sharp: the limit itself passes, the next float above it is refused.
    assert check_logit_scale(limit, 1.0, dtype) == limit
    with pytest.raises(ValueError, match=re.escape(printed)):
        check_logit_scale(math.nextafter(limit, math.inf), 1.0, dtype)


def test_float32_maximum_the_readme_derives_the_limit_from():
    assert format_limit(torch.finfo(torch.float32).max) in README_TROUBLESHOOTING
    assert format_limit(torch.finfo(torch.float32).max) in SPEC_ERRORS


def test_num_iters_bound_in_docs_is_the_code_constant():
    q = k = v = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=rf"\[0, {MAX_NUM_ITERS}\]"):
        asag_kernels.sinkhorn_attention(q, k, v, num_iters=MAX_NUM_ITERS + 1)
    for where, text in (("SPEC §5", SPEC_ERRORS), ("README", README),
                        ("sinkhorn_attention's docstring", asag_kernels.sinkhorn_attention.__doc__),
                        ("SinkhornSettings' docstring", SinkhornSettings.__doc__)):
        figures = _powers_of_two_minus_one(text)
        assert figures and all(f == MAX_NUM_ITERS for f in figures), f"{where} quotes {figures}, code {MAX_NUM_ITERS}"


def test_workspace_bound_in_docs_is_the_code_constant(monkeypatch):
    monkeypatch.setenv("ASAG_CPU_WORKSPACE_MB", str(_env.MAX_WORKSPACE_MB * 2))
    with pytest.raises(ValueError, match="ASAG_CPU_WORKSPACE_MB") as err:
        _env.workspace_bytes("ASAG_CPU_WORKSPACE_MB", 256)
    printed = re.search(r"<= (\S+),", str(err.value)).group(1)
    assert float(printed) == _env.MAX_WORKSPACE_MB, str(err.value)
    quoted = re.search(r"MiB in \[0, 2\*\*(\d+)\] \((\d+) MiB", SPEC_ERRORS)
    assert quoted, "SPEC §5 no longer quotes the workspace bound as [0, 2**N] (M MiB"
    assert 2 ** int(quoted.group(1)) == int(quoted.group(2)) == _env.MAX_WORKSPACE_MB
    assert quoted.group(2) == printed


def test_distributed_leading_dims_bound_in_spec_is_the_code_constant():
    from asag_kernels.distributed.shapes import MAX_LEAD_DIMS

    quoted = re.findall(r"At most (\d+) leading\s+dims", SPEC)
    assert quoted and all(int(n) == MAX_LEAD_DIMS for n in quoted), f"SPEC quotes {quoted}, code {MAX_LEAD_DIMS}"

"""Helpers of the table-driven adversarial layer (issue 11), importable by every test module.

SPEC §5's rule for every public entry point: bad input gets a ValueError/TypeError that names the
argument (and says what was expected and what was got), or the call returns a correct result;
never a crash, hang, generic error or silent NaN. A table is a list of `Row`s; `params(rows)` turns
it into pytest parameters and `check_row(row)` applies the rule:

    from adversarial_table import Row, check_row, params

    ROWS = [Row("negative scale", lambda: my_entry_point(scale=-1), ValueError, ("scale", "-1"))]

    @pytest.mark.parametrize("row", params(ROWS))
    def test_my_entry_point_rejects_bad_input(row):
        check_row(row)

A row that must succeed gives `exc=None` and a `check(result)` callable that asserts the result is
right (finite where it must be, the right shape, equal to a reference, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch


def assert_clear_error(fn: Callable[[], Any], exc_type, *names: str) -> BaseException:
    """`fn()` raises `exc_type` (exactly that class or a subclass; not a bare RuntimeError or a
    library-internal error) whose message contains every string in `names`."""
    with pytest.raises(BaseException) as info:
        fn()
    err = info.value
    assert isinstance(err, exc_type), f"expected {exc_type.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    missing = [n for n in names if n not in message]
    assert not missing, f"the {type(err).__name__} does not name {missing}: {message!r}"
    return err


def assert_no_silent_nan(value: Any, what: str = "result") -> None:
    """Every floating tensor (or float) inside `value` is finite."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel():
            assert torch.isfinite(value).all(), f"{what} holds NaN/Inf for finite inputs"
    elif isinstance(value, float):
        assert math.isfinite(value), f"{what} is {value} for finite inputs"
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            assert_no_silent_nan(item, f"{what}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_no_silent_nan(item, f"{what}[{key!r}]")


@dataclass(frozen=True)
class Row:
    """One adversarial case: `call()` either raises `exc` naming every string of `names`, or (exc
    None) returns a result that `check` accepts (default: finite everywhere)."""

    id: str
    call: Callable[[], Any]
    exc: type | tuple | None
    names: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the call


def params(rows: list[Row]) -> list:
    ids = [r.id for r in rows]
    assert len(set(ids)) == len(ids), f"duplicate row ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    return [pytest.param(r, id=r.id) for r in rows]


def check_row(row: Row, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Apply SPEC §5's rule to one row (its env set through `monkeypatch` when it has any)."""
    if row.env:
        assert monkeypatch is not None, f"row {row.id} sets environment variables: pass monkeypatch"
        for name, value in row.env:
            monkeypatch.setenv(name, value)
    if row.exc is not None:
        assert_clear_error(row.call, row.exc, *row.names)
        return
    result = row.call()
    if row.check is not None:
        row.check(result)
    else:
        assert_no_silent_nan(result, row.id)

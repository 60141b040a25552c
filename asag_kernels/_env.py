"""Every ASAG_* environment variable is read here, with one rule (SPEC §5):

unset or empty (after stripping) -> the documented default; otherwise the value must parse, or a
ValueError names the variable, what it expects and what it got. Values are read at each call (tests
and users may change them between calls), which costs a dictionary lookup.
"""

from __future__ import annotations

import math
import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _raw(name: str) -> str | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def env_flag(name: str, default: bool) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (any case)."""
    raw = _raw(name)
    if raw is None:
        return default
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"environment variable {name} must be 1/0, true/false, yes/no or on/off, got {os.environ[name]!r}")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices` (case-insensitive)."""
    raw = _raw(name)
    if raw is None:
        return default
    low = raw.lower()
    if low not in choices:
        raise ValueError(f"environment variable {name} must be one of {choices}, got {os.environ[name]!r}")
    return low


def env_float(name: str, default: float, *, minimum: float = 0.0, maximum: float = math.inf) -> float:
    """A finite number in [minimum, maximum]."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not minimum <= value <= maximum:
        # Every digit of the bound, so the message quotes the figure the docs give (2**20 = 1048576).
        bound = f"<= {maximum:.12g}" if math.isfinite(maximum) else "finite"
        raise ValueError(
            f"environment variable {name} must be a number >= {minimum:g} and {bound}, got {os.environ[name]!r}"
        )
    return value


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    """An integer in [minimum, maximum]."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer in [{minimum}, {maximum}], got {os.environ[name]!r}"
        ) from None
    if not minimum <= value <= maximum:
        raise ValueError(
            f"environment variable {name} must be an integer in [{minimum}, {maximum}], got {os.environ[name]!r}"
        )
    return value


def env_list(name: str, choices: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of names from `choices` (case-insensitive, blanks ignored)."""
    raw = _raw(name)
    if raw is None:
        return default
    items = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    bad = [item for item in items if item not in choices]
    if bad or not items:
        raise ValueError(
            f"environment variable {name} must be a comma-separated list of {choices}, got {os.environ[name]!r}"
        )
    return items


# Workspace budgets in MiB: at most 1 TiB (larger is a typo, and overflows byte counts downstream).
MAX_WORKSPACE_MB = 2.0**20


def workspace_bytes(name: str, default_mb: float) -> int:
    """A workspace budget given in MiB (fractions allowed), returned in bytes."""
    return int(env_float(name, default_mb, minimum=0.0, maximum=MAX_WORKSPACE_MB) * 2**20)

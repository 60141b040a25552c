"""Which strategy a distributed call runs, with which degrees, and why (SPEC §9).

:func:`plan` is pure: the op calls it on every rank with the exchanged shapes (so every rank
decides, and fails, alike), and a user can call it ahead of time to see what ``"auto"`` will do.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

STRATEGIES = ("auto", "ulysses", "ring", "hybrid")


@dataclass(frozen=True)
class Plan:
    """What a distributed call runs.

    Attributes:
        strategy: ``"ulysses"`` (all-to-all to whole sequences, the fused op), ``"ring"`` (the
            building blocks over rotating shards) or ``"hybrid"`` (Ulysses inside each set of
            ``ulysses_degree`` consecutive ranks, a ring across the ``ring_degree`` sets).
        ulysses_degree, ring_degree: their product is the world size (Ulysses: ``(W, 1)``, ring: ``(1, W)``).
        problems: the product of the leading dims (batch × heads).
        reason: why this strategy (for ``"auto"``) or that it was asked for.
    """

    strategy: str
    ulysses_degree: int
    ring_degree: int
    problems: int
    reason: str

    @property
    def world(self) -> int:
        return self.ulysses_degree * self.ring_degree


def check_strategy(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"strategy must be one of {STRATEGIES}, got {type(value).__name__} {value!r}")
    if value not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {value!r}")
    return value


def check_ulysses_degree(value) -> int | None:
    """None or a positive int (bool and float rejected)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ulysses_degree must be None or a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"ulysses_degree must be None or a positive int, got {value}")
    return int(value)


def _check_problems_and_world(problems, world):
    for name, value, low in (("problems", problems, 0), ("world", world, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(problems), int(world)


def _auto(problems: int, world: int) -> Plan:
    # Balanced compute first (every rank the same share of problems × sequence), then fewer bytes:
    # Ulysses sends ~4·D·e per token and problem over W, the ring ~(2T + 2)·D·e (SPEC §9).
    if problems % world == 0:
        return Plan("ulysses", world, 1, problems, f"auto: {problems} problems divide over {world} ranks")
    u = math.gcd(problems, world)
    if u > 1:
        return Plan("hybrid", u, world // u, problems,
                    f"auto: {problems} problems do not divide over {world} ranks; Ulysses over gcd = {u} ranks, "
                    f"a ring across {world // u} sets")
    if problems >= world:
        return Plan("ulysses", world, 1, problems,
                    f"auto: {problems} problems >= {world} ranks, no common divisor: Ulysses with uneven shares")
    return Plan("ring", 1, world, problems, f"auto: {problems} problems < {world} ranks, no common divisor: ring")


def plan(problems: int, world: int, *, strategy: str = "auto", ulysses_degree: int | None = None,
         mesh_degrees: tuple[int, int] | None = None) -> Plan:
    """The strategy and degrees a call on `world` ranks with `problems` independent problems runs.

    Args:
        problems: the product of q's leading dims (batch × heads).
        world: the number of ranks (of the group, or of the mesh's ring × ulysses dims).
        strategy: ``"auto"``, ``"ulysses"``, ``"ring"`` or ``"hybrid"``.
        ulysses_degree: the hybrid's U (a divisor of `world` and of `problems`); for ``"auto"`` it
            fixes U (U = world: Ulysses, 1: ring). Not taken by ``"ulysses"``/``"ring"``.
        mesh_degrees: ``(ring, ulysses)`` sizes of a DeviceMesh: they fix the degrees
            (``ulysses_degree``, if given, must agree).

    ``"auto"`` (no degrees fixed): Ulysses when the problems divide over the ranks; else the hybrid
    with U = gcd(problems, world) when that is > 1; else Ulysses with uneven shares when
    problems >= world; else the ring. Degenerate hybrids run as what they are: U = world is Ulysses,
    U = 1 the ring.

    Raises:
        ValueError / TypeError naming the argument: an unknown strategy, ``ulysses_degree`` not a
        positive int, not dividing `world`, a hybrid whose U does not divide `problems`, a mesh whose
        degrees contradict the strategy or ``ulysses_degree``.
    """
    problems, world = _check_problems_and_world(problems, world)
    strategy, u = check_strategy(strategy), check_ulysses_degree(ulysses_degree)
    if mesh_degrees is not None:
        ring_size, ulysses_size = mesh_degrees
        if u is not None and u != ulysses_size:
            raise ValueError(
                f"ulysses_degree={u} contradicts the DeviceMesh given (ring {ring_size} x ulysses {ulysses_size}); "
                f"pass ulysses_degree=None or {ulysses_size}"
            )
        for name, other in (("ulysses", ring_size), ("ring", ulysses_size)):
            if strategy == name and other > 1:
                raise ValueError(
                    f"strategy={name!r} cannot run on a DeviceMesh of ring {ring_size} x ulysses {ulysses_size}: "
                    f"it uses one dim only; pass strategy='hybrid' or 'auto' (both dims), or a mesh whose other dim is 1"
                )
        u = ulysses_size
        if strategy == "auto":
            strategy = "hybrid"
    elif strategy in ("ulysses", "ring") and u is not None:
        raise ValueError(
            f"ulysses_degree={u} applies to strategy='hybrid' or 'auto', not strategy={strategy!r} "
            f"(Ulysses uses every rank, the ring none; pass ulysses_degree=None)"
        )
    if strategy == "ulysses":
        return Plan("ulysses", world, 1, problems, "asked for")
    if strategy == "ring":
        return Plan("ring", 1, world, problems, "asked for")
    if strategy == "auto" and u is None:
        return _auto(problems, world)
    if u is None:
        raise ValueError("ulysses_degree: strategy='hybrid' needs ulysses_degree=U (or a DeviceMesh as group), got None")
    if world % u:
        raise ValueError(
            f"ulysses_degree={u} must divide the world size {world} (ring degree = world / ulysses_degree)"
        )
    if problems % u:
        raise ValueError(
            f"ulysses_degree={u} must divide the problems (the product of the leading dims, batch x heads), "
            f"got {problems} problems: each of the {u} ranks of a Ulysses set takes {problems}/{u} of them"
        )
    why = "asked for" if mesh_degrees is None else f"DeviceMesh ring {world // u} x ulysses {u}"
    if u == world:
        return Plan("ulysses", world, 1, problems, f"{why}; ulysses_degree = world is Ulysses")
    if u == 1:
        return Plan("ring", 1, world, problems, f"{why}; ulysses_degree = 1 is the ring")
    return Plan("hybrid", u, world // u, problems, why)

"""Argument checks shared by every public entry point (SPEC §5).

Each ``check_*`` returns the normalised value or raises a ValueError/TypeError whose message names
the argument, says what was expected and what was got. The checks stay traceable by
``torch.compile(fullgraph=True, dynamic=True)``: a scalar that dynamo made symbolic
(``torch.SymInt``/``torch.SymFloat``) is accepted as a number, and every check is a comparison
(comparisons on symbols become guards; ``math.isfinite`` does not trace).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch

from .backends import BACKENDS

COSTS: tuple[str, ...] = ("adversarial", "standard")
BACKEND_CHOICES: tuple[str, ...] = ("auto",) + BACKENDS
# Every kernel counts iterations in a 32-bit int; one bound for all backends (SPEC §5).
MAX_NUM_ITERS = 2**31 - 1

_SYMBOLIC = (torch.SymInt, torch.SymFloat)
_INF = float("inf")
_ABSENT = object()  # a keyword the entry point does not take


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) else repr(value)


def _is_real(value) -> bool:
    """A real number a user may pass as a float argument (bool and tensors excluded)."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        return False
    return isinstance(value, (numbers.Real,) + _SYMBOLIC)


def _finite(value) -> bool:
    # Comparisons rather than math.isfinite, which dynamo cannot trace: NaN fails both, +-inf one
    # (on a symbolic value they become guards).
    return bool(value > -_INF) and bool(value < _INF)


def check_num_iters(value, name: str = "num_iters") -> int:
    """An int in [0, MAX_NUM_ITERS] (numpy integers accepted; bool and float rejected)."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int in [0, {MAX_NUM_ITERS}], got {_describe(value)}")
    if not isinstance(value, torch.SymInt):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int in [0, {MAX_NUM_ITERS}], got {_describe(value)}") from None
    if value < 0 or value > MAX_NUM_ITERS:
        raise ValueError(f"{name} must be an int in [0, {MAX_NUM_ITERS}], got {value}")
    return value


def check_finite_float(value, name: str, *, minimum: float | None = None, inclusive: bool = True) -> float:
    """A finite real number, optionally >= minimum (or > minimum with inclusive=False)."""
    if minimum is None:
        expected = "a finite number"
    else:
        expected = f"a finite number {'>=' if inclusive else '>'} {minimum:g}"
    if not _is_real(value):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    if not isinstance(value, _SYMBOLIC):
        value = float(value)
    if not _finite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if minimum is not None and (value < minimum if inclusive else value <= minimum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_epsilon(value, name: str = "epsilon") -> float:
    """Entropic regularisation: a finite number > 0."""
    return check_finite_float(value, name, minimum=0.0, inclusive=False)


def check_scale(value, name: str = "scale") -> float | None:
    """None (meaning 1/sqrt(D)) or a finite number."""
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(f"{name} must be None or a finite number, got {_describe(value)}")
    return check_finite_float(value, name)


def check_fraction(value, name: str) -> float:
    """A finite number in [0, 1]."""
    value = check_finite_float(value, name, minimum=0.0)
    if value > 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_cost(value, name: str = "cost") -> str:
    """"adversarial" or "standard"."""
    return _check_choice(value, name, COSTS)


def check_backend(value, name: str = "backend") -> str:
    """"auto" or a backend name (whether it can run here is decided at dispatch)."""
    return _check_choice(value, name, BACKEND_CHOICES)


def resolve_scale(scale: float | None, d: int) -> float:
    """None -> 1/sqrt(D) (SPEC §2); 1 for D = 0, where every logit is 0 whatever the scale."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(d) if d > 0 else 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits and potentials are computed in (SPEC §3): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_scale_limit(dtype: torch.dtype) -> float:
    """The largest |scale/epsilon| accepted for `dtype` inputs (SPEC §5): the compute dtype's largest
    finite value over log2(e), about 2.359e+38 for float32 compute and 1.246e+308 for float64."""
    # The exp2 kernels (triton, cuda) fold log2(e) into the ratio in the compute dtype: the product
    # must stay finite too, or inf * 0 turns small logits into NaN.
    return torch.finfo(compute_dtype(dtype)).max / math.log2(math.e)


def format_limit(value: float) -> str:
    """A limit as error messages print it and the docs quote it (4 significant digits, e.g. 2.359e+38)."""
    return f"{value:.4g}"


def check_logit_scale(scale, epsilon, dtype: torch.dtype, *, names: str = "scale/epsilon"):
    """scale/epsilon must be finite in the compute dtype of `dtype` inputs (SPEC §5): a ratio that
    overflows it (e.g. epsilon=1e-300 for float32 inputs) would turn every logit into +-inf.
    |scale/epsilon| <= logit_scale_limit(dtype)."""
    limit = logit_scale_limit(dtype)
    ratio = scale / epsilon
    if not (bool(ratio <= limit) and bool(ratio >= -limit)):
        raise ValueError(
            f"{names} must be finite in the compute dtype {compute_dtype(dtype)} (|scale/epsilon| <= {format_limit(limit)}) "
            f"for {dtype} inputs, got scale={scale!r}, epsilon={epsilon!r}"
        )
    return ratio


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def inference_only_error() -> RuntimeError:
    return RuntimeError(
        "asag_kernels ops are inference-only (no autograd): call them under torch.no_grad() or "
        "torch.inference_mode(), or pass tensors that do not require grad"
    )


def check_operands(**tensors) -> None:
    """q/k/v-style operands ``[..., N, D]`` (SPEC §5): tensors of one float dtype and device with the
    same leading dims; k's head dim equals q's, v has k's rows; none requires grad in grad mode.
    Empty N is allowed (callers that need Nk >= 1 check it). TypeError/ValueError name the argument."""
    names = list(tensors)
    together = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims [..., N, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    first_name, first = names[0], tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        if t.device != first.device:
            raise ValueError(f"{together} must be on one device: {first_name} is on {first.device}, {name} is on {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{together} must share one dtype: {first_name} is {first.dtype}, {name} is {t.dtype}")
        if t.dim() != first.dim() or t.shape[:-2] != first.shape[:-2]:
            raise ValueError(
                f"{together} must have the same leading dims (no broadcasting): {first_name} has "
                f"{tuple(first.shape[:-2])}, {name} has {tuple(t.shape[:-2])}"
            )
    q, k, v = tensors.get("q"), tensors.get("k"), tensors.get("v")
    if q is not None and k is not None and k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's: q has D={q.shape[-1]}, k has D={k.shape[-1]}")
    if k is not None and v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k: k has Nk={k.shape[-2]}, v has {v.shape[-2]}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise inference_only_error()


@dataclass(frozen=True)
class OpScalars:
    """The scalar keywords of a Sinkhorn entry point, checked (:func:`check_op_scalars`).

    ``scale`` is the value as given (``None`` travels between ranks as such); ``resolved_scale`` is
    what the kernels use (``1/sqrt(D)`` for ``None``). ``num_iters`` and ``return_potentials`` are
    ``None`` for entry points that do not take them (the building blocks)."""

    cost: str
    scale: float | None
    resolved_scale: float
    epsilon: float
    backend: str
    num_iters: int | None = None
    return_potentials: bool | None = None


def check_return_potentials(value, name: str = "return_potentials") -> bool:
    """A bool (TypeError otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_op_scalars(q: torch.Tensor, *, cost, scale, epsilon, backend, num_iters=_ABSENT,
                     return_potentials=_ABSENT) -> OpScalars:
    """The keywords every Sinkhorn entry point shares, checked (SPEC §5) for inputs like `q`: cost,
    scale, epsilon, backend, and where the entry point takes them num_iters and return_potentials.
    The resolved scale over epsilon must fit q's compute dtype."""
    cost, scale, epsilon, backend = check_cost(cost), check_scale(scale), check_epsilon(epsilon), check_backend(backend)
    if num_iters is not _ABSENT:
        num_iters = check_num_iters(num_iters)
    if return_potentials is not _ABSENT:
        return_potentials = check_return_potentials(return_potentials)
    resolved = resolve_scale(scale, q.shape[-1])
    check_logit_scale(resolved, epsilon, q.dtype)
    return OpScalars(cost, scale, resolved, epsilon, backend,
                     None if num_iters is _ABSENT else num_iters,
                     None if return_potentials is _ABSENT else return_potentials)

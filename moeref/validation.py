"""Argument checks shared by every public function.

Each check raises a `ValueError` or `TypeError` whose message names the argument, what was
expected and what came, e.g. ``"W has shape (3, 5) but (3, 4) was expected (d_in=3, n_experts=4)"``.
Formulations call these at their boundary so that bad input never reaches the math.

Value checks (finiteness) need concrete data. Under tracing transformations (``jax.grad``,
``jax.jit``) the values are symbolic, so those checks are skipped there; shape and dtype checks
always run.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .core import array_namespace

__all__ = [
    "check_float_array",
    "check_shape",
    "check_same_dtype",
    "check_finite",
    "check_positive_int",
    "check_positive_float",
    "check_choice",
    "concrete_bool",
]


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_float_array(x: Any, name: str, *, ndim: int | Sequence[int] | None = None) -> Any:
    """Check that ``x`` is a real floating-point array (optionally of a given rank)."""
    xp = array_namespace(x, names=(name,))
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating-point dtype (float64 is the reference), got {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must be {want}-dimensional, got shape {_fmt_shape(x.shape)}")
    return x


def check_shape(x: Any, name: str, expected: Sequence[int | None], *, what: str = "") -> Any:
    """Check ``x.shape`` against ``expected`` (``None`` matches any size)."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        want = _fmt_shape(["*" if e is None else e for e in expected])
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} has shape {_fmt_shape(shape)} but {want} was expected{extra}")
    return x


def check_same_dtype(named: dict[str, Any]) -> Any:
    """Check that every array in ``named`` has one dtype; return it."""
    dtypes = {name: a.dtype for name, a in named.items() if a is not None}
    if len(set(str(d) for d in dtypes.values())) > 1:
        detail = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"all floating-point arguments must share one dtype, got {detail}")
    return next(iter(dtypes.values()))


def concrete_bool(value: Any) -> bool | None:
    """``bool(value)`` for a concrete 0-d array, ``None`` when the value is symbolic (traced)."""
    try:
        return bool(value)
    except Exception as exc:  # jax tracers raise a ConcretizationTypeError subclass
        if "Concretization" in type(exc).__name__ or "Tracer" in type(exc).__name__:
            return None
        raise


def check_finite(x: Any, name: str, *, allow_neg_inf: bool = False) -> Any:
    """Raise if ``x`` has a NaN or an infinity (skipped for traced values).

    With ``allow_neg_inf=True``, $-\\infty$ entries are accepted (a masked logit or bias).
    """
    xp = array_namespace(x, names=(name,))
    ok = xp.isfinite(x)
    if allow_neg_inf:
        ok = ok | (xp.isinf(x) & (x < 0))
    if concrete_bool(xp.all(ok)) is False:
        allowed = "finite or -inf" if allow_neg_inf else "finite"
        raise ValueError(f"{name} contains NaN or infinite values; this formulation needs {allowed} input")
    return x


def check_positive_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Check that ``value`` is an int in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f" and at most {maximum}"
        raise ValueError(f"{name} must be at least {minimum}{hi}, got {value}")
    return value


def check_positive_float(value: Any, name: str) -> float:
    """Check that ``value`` is a finite positive Python number (a step size, a variance); return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value

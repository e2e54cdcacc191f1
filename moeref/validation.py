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
    "check_arrays",
    "check_array",
    "check_cotangent",
    "check_record_type",
    "check_gate_params",
    "check_experts_params",
    "check_responsibilities",
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


def check_array(x: Any, name: str) -> Any:
    """Check that ``x`` is an array of a supported library (not ``None``, a list or a scalar); return its namespace."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    return array_namespace(x, names=(name,))


def check_float_array(x: Any, name: str, *, ndim: int | Sequence[int] | None = None) -> Any:
    """Check that ``x`` is a real floating-point array (optionally of a given rank)."""
    xp = check_array(x, name)
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
    check_array(x, name)
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        want = _fmt_shape(["*" if e is None else e for e in expected])
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} has shape {_fmt_shape(shape)} but {want} was expected{extra}")
    return x


def check_same_dtype(named: dict[str, Any]) -> Any:
    """Check that the arrays in ``named`` (``None`` entries dropped) share one library and one dtype; return it."""
    present = {name: a for name, a in named.items() if a is not None}
    for name, a in present.items():
        check_array(a, name)
    array_namespace(*present.values(), names=tuple(present))
    dtypes = {name: a.dtype for name, a in present.items()}
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
    xp = check_array(x, name)
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


def check_arrays(named: dict[str, Any], *, finite: bool = True, neg_inf_ok: Sequence[str] = ()) -> Any:
    """Check the arrays of one call together; return their namespace.

    ``None`` entries are dropped. Every array must come from one library and have one real
    floating-point dtype; with ``finite=True`` every value must be finite (``-inf`` allowed for the
    names in ``neg_inf_ok``, e.g. a bias that switches an expert off).
    """
    given = {k: v for k, v in named.items() if v is not None}
    if not given:
        which = f"{next(iter(named))} must be an array" if len(named) == 1 else f"one of {', '.join(named)} must be an array"
        raise TypeError(f"{which}, got None")
    named = given
    xp = array_namespace(*named.values(), names=tuple(named))
    for name, a in named.items():
        check_float_array(a, name)
    check_same_dtype(named)
    if finite:
        for name, a in named.items():
            check_finite(a, name, allow_neg_inf=name in neg_inf_ok)
    return xp


def check_cotangent(cotangent: Any, expected: Sequence[int | None], like: Any, *, name: str = "cotangent", what: str = "") -> Any:
    """Check the cotangent of a VJP against the forward's output: shape, library and dtype of ``like``, finite.

    ``like`` is one of the forward's floating-point inputs (its library and dtype are the
    cotangent's). Returns the namespace.
    """
    check_float_array(cotangent, name)
    check_array(like, "the forward's inputs")
    xp = array_namespace(like, cotangent, names=("the forward's inputs", name))
    if str(cotangent.dtype) != str(like.dtype):
        raise TypeError(f"{name} has dtype {cotangent.dtype} but the forward's inputs have dtype {like.dtype}")
    check_shape(cotangent, name, expected, what=what)
    check_finite(cotangent, name)
    return xp


def check_record_type(value: Any, name: str, expected: type | tuple[type, ...]) -> Any:
    """Check that a parameter record has the expected NamedTuple type."""
    if not isinstance(value, expected):
        want = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise TypeError(f"{name} must be a {want}, got {type(value).__name__}")
    return value


def check_gate_params(weight: Any, bias: Any, d_in: int, *, name: str = "params") -> int:
    """Shapes of a linear gate over ``n`` experts: weight (d_in, n), bias (n,). Returns ``n``."""
    check_float_array(weight, f"{name}.weight", ndim=2)
    check_float_array(bias, f"{name}.bias")
    check_same_dtype({f"{name}.weight": weight, f"{name}.bias": bias})
    check_shape(weight, f"{name}.weight", (d_in, None), what=f"x has d_in={d_in} features")
    n = weight.shape[1]
    check_float_array(bias, f"{name}.bias", ndim=1)
    check_shape(bias, f"{name}.bias", (n,), what=f"{name}.weight has n={n} experts")
    return n


def check_experts_params(weight: Any, bias: Any, d_in: int, *, n: int | None = None, name: str = "params") -> tuple[int, int]:
    """Shapes of ``n`` affine experts: weight (n, d_in, d_out), bias (n, d_out). Returns ``(n, d_out)``.

    When ``n`` is given (the number of gate outputs) the expert count must match it.
    """
    check_float_array(weight, f"{name}.weight", ndim=3)
    check_float_array(bias, f"{name}.bias")
    check_same_dtype({f"{name}.weight": weight, f"{name}.bias": bias})
    what = f"x has d_in={d_in} features" if n is None else f"the gate has n={n} outputs, one per expert; x has d_in={d_in} features"
    check_shape(weight, f"{name}.weight", (n, d_in, None), what=what)
    n, _, d_out = weight.shape
    check_float_array(bias, f"{name}.bias", ndim=2)
    check_shape(bias, f"{name}.bias", (n, d_out), what=f"{name}.weight holds n={n} experts with d_out={d_out}")
    return n, d_out


def check_responsibilities(weights: Any, N: int, K: int) -> Any:
    """Weights of a weighted M-step: shape (N, K), finite, non-negative (EM responsibilities)."""
    check_float_array(weights, "weights", ndim=2)
    xp = array_namespace(weights, names=("weights",))
    check_shape(weights, "weights", (N, K), what=f"one row per sample of x (N={N}), one column per expert (K={K})")
    check_finite(weights, "weights")
    if concrete_bool(xp.all(weights >= 0)) is False:
        raise ValueError("weights must be non-negative (responsibilities)")
    return weights

"""Test helpers: the three-way VJP check used by every formulation's tests."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from moeref.backends._base import map_tree
from moeref.backends.gradcheck import (  # noqa: F401  (re-exported for the tests)
    finite_difference_vjp,
    jax_vjp,
    leaves,
    relative_error,
    torch_vjp,
    unflatten_like,
)


# Worst relative error seen per (formulation, check), printed at the end of the run by conftest.
GRADIENT_REPORT: dict[tuple[str, str], float] = {}


def assert_vjp_correct(
    name: str,
    forward: Callable[..., Any],
    vjp: Callable[..., Any],
    args: tuple,
    cotangent: np.ndarray,
    *,
    rtol: float = 1e-6,
    autograd: tuple[str, ...] = ("torch", "jax"),
) -> None:
    """Check an analytic VJP on NumPy float64 inputs three ways.

    ``forward(*args)`` returns one array; ``vjp(*args, cotangent)`` returns a NamedTuple whose
    fields line up with ``args`` (a ``None`` field means "not differentiable"). The analytic VJP is
    compared with central finite differences and with ``torch.autograd`` / ``jax.vjp`` run through
    the same moeref forward on those libraries; each worst relative error must be below ``rtol``.
    """
    analytic = tuple(vjp(*args, cotangent))
    analytic_np = tuple(map_tree(lambda a: None if a is None else np.asarray(a), g) for g in analytic)

    def keep(ref):  # compare only where moeref returns a gradient
        return tuple(None if a is None else r for a, r in zip(analytic_np, ref))

    fd = finite_difference_vjp(lambda *a: np.asarray(forward(*a)), args, np.asarray(cotangent))
    err = relative_error(keep(analytic_np), keep(fd))
    GRADIENT_REPORT[(name, "finite differences")] = max(err, GRADIENT_REPORT.get((name, "finite differences"), 0.0))
    assert err < rtol, f"{name}: analytic VJP vs finite differences, relative error {err:.2e}"
    for lib in autograd:
        try:
            __import__(lib)
        except ImportError:
            continue
        ref = torch_vjp(forward, args, cotangent) if lib == "torch" else jax_vjp(forward, args, cotangent)
        err = relative_error(keep(analytic_np), keep(ref))
        GRADIENT_REPORT[(name, lib)] = max(err, GRADIENT_REPORT.get((name, lib), 0.0))
        assert err < 1e-10, f"{name}: analytic VJP vs {lib} autograd through moeref's forward, relative error {err:.2e}"

r"""The generic mixture of experts: a gate-weighted combination of expert outputs.

Given expert outputs $f_i(x)$ and gate weights $w_i(x)$ from any gating function, the mixture
is $\sum_i w_i(x) f_i(x)$ (soft) or $f_{\arg\max_i w_i(x)}(x)$ (hard). Every other dense
formulation in moeref reduces to this combination.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .core import argmax, array_namespace, one_hot
from .validation import check_cotangent, check_finite, check_float_array, check_same_dtype, check_shape

__all__ = ["MixtureGrads", "mixture", "mixture_vjp", "hard_mixture", "hard_mixture_vjp"]


class MixtureGrads(NamedTuple):
    """Cotangents of [`mixture`][moeref.mixture.mixture]'s inputs."""

    gates: Any
    expert_outputs: Any


def _check_mixture(gates: Any, expert_outputs: Any) -> Any:
    xp = array_namespace(gates, expert_outputs, names=("gates", "expert_outputs"))
    check_float_array(gates, "gates", ndim=2)
    check_float_array(expert_outputs, "expert_outputs", ndim=3)
    N, n = gates.shape
    check_shape(
        expert_outputs, "expert_outputs", (N, n, None), what=f"gates has N={N} rows and n={n} gate outputs, one per expert"
    )
    check_same_dtype({"gates": gates, "expert_outputs": expert_outputs})
    check_finite(gates, "gates")
    check_finite(expert_outputs, "expert_outputs")
    return xp


def mixture(gates: Any, expert_outputs: Any) -> Any:
    r"""Gate-weighted sum of expert outputs (the generic mixture of experts).

    $$f(x) = \sum_{i=1}^{n} w_i(x)\, f_i(x) .$$

    The combination rule of the mixture of experts in Jacobs, Jordan, Nowlan & Hinton (1991),
    "Adaptive Mixtures of Local Experts", Neural Computation 3(1):79-87,
    doi:10.1162/neco.1991.3.1.79, and of the meta-pi network (Hampshire & Waibel 1992).

    Parameters
    ----------
    gates : array, shape (N, n)
        $w_i(x_n)$; usually rows of probabilities, but any weights are accepted.
    expert_outputs : array, shape (N, n, d)
        $f_i(x_n)$.

    Returns
    -------
    array, shape (N, d)

    Examples
    --------
    >>> import numpy as np
    >>> from moeref import mixture
    >>> mixture(np.array([[0.25, 0.75]]), np.array([[[4.0], [8.0]]])).tolist()
    [[7.0]]
    """
    return _mixture(gates, expert_outputs, _check_mixture(gates, expert_outputs))


def _mixture(gates: Any, expert_outputs: Any, xp: Any) -> Any:
    return xp.sum(gates[:, :, None] * expert_outputs, axis=1)  # (N, d)


def mixture_vjp(gates: Any, expert_outputs: Any, cotangent: Any) -> MixtureGrads:
    r"""VJP of [`mixture`][moeref.mixture.mixture].

    $$\bar w_{ni} = \langle \bar f_n, f_i(x_n) \rangle, \qquad \bar f_{ni} = w_{ni}\, \bar f_n .$$

    Parameters
    ----------
    cotangent : array, shape (N, d)
    """
    xp = _check_mixture(gates, expert_outputs)
    check_cotangent(cotangent, (gates.shape[0], expert_outputs.shape[2]), like=gates, what="the shape of the mixture's output")
    return _mixture_vjp(gates, expert_outputs, cotangent, xp)


def _mixture_vjp(gates: Any, expert_outputs: Any, cotangent: Any, xp: Any) -> MixtureGrads:
    """The VJP without argument checks (internal callers)."""
    return MixtureGrads(
        gates=xp.sum(expert_outputs * cotangent[:, None, :], axis=2),  # (N, n)
        expert_outputs=gates[:, :, None] * cotangent[:, None, :],  # (N, n, d)
    )


def hard_mixture(gates: Any, expert_outputs: Any) -> Any:
    r"""Hard mixture of experts: the output of the expert with the largest gate weight.

    $$f(x) = f_{i^*}(x), \qquad i^* = \arg\max_i w_i(x) \quad\text{(ties: lower index)}.$$

    Equals [`mixture`][moeref.mixture.mixture] with the one-hot gate $e_{i^*}$. It is the
    test-time rule of the hard-gated formulations (e.g. the greedy top-1 of BASE layers) and the
    $k = 1$ limit of top-k routing without renormalisation of the weight.

    Parameters
    ----------
    gates : array, shape (N, n)
    expert_outputs : array, shape (N, n, d)

    Returns
    -------
    array, shape (N, d)
    """
    xp = _check_mixture(gates, expert_outputs)
    chosen = one_hot(argmax(gates, axis=-1), gates.shape[1], dtype=expert_outputs.dtype)  # (N, n)
    return xp.sum(chosen[:, :, None] * expert_outputs, axis=1)


def hard_mixture_vjp(gates: Any, expert_outputs: Any, cotangent: Any) -> MixtureGrads:
    r"""VJP of [`hard_mixture`][moeref.mixture.hard_mixture].

    The selection is piecewise constant in the gates, so $\bar w = 0$ (almost everywhere; at a
    tie the derivative does not exist and 0 is returned); $\bar f_{ni} = [i = i^*_n]\,\bar f_n$.
    """
    xp = _check_mixture(gates, expert_outputs)
    check_cotangent(cotangent, (gates.shape[0], expert_outputs.shape[2]), like=gates, what="the shape of the mixture's output")
    chosen = one_hot(argmax(gates, axis=-1), gates.shape[1], dtype=expert_outputs.dtype)  # (N, n)
    return MixtureGrads(gates=xp.zeros_like(gates), expert_outputs=chosen[:, :, None] * cotangent[:, None, :])

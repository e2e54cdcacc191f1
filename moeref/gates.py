"""Gating networks: the functions $w(x)$ that weight the experts.

Every gate here returns probabilities over the experts (rows sum to 1) and has its analytic VJP
beside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .core import _softmax_vjp, log_softmax, softmax
from .validation import check_arrays, check_cotangent, check_float_array, check_gate_params, check_record_type

__all__ = [
    "LinearSoftmaxGateParams",
    "LinearSoftmaxGateGrads",
    "linear_softmax_gate",
    "linear_softmax_gate_logits",
    "linear_softmax_gate_vjp",
    "log_linear_softmax_gate",
]


class LinearSoftmaxGateParams(NamedTuple):
    """Parameters of a linear-softmax gate over ``n`` experts.

    Attributes
    ----------
    weight : array, shape (d, n)
        Column ``i`` is $k_i$, the gate vector of expert ``i``.
    bias : array, shape (n,)
    """

    weight: Any
    bias: Any


class LinearSoftmaxGateGrads(NamedTuple):
    """Cotangents of [`linear_softmax_gate`][moeref.gates.linear_softmax_gate]'s inputs."""

    x: Any
    params: LinearSoftmaxGateParams


def _check_gate(x: Any, params: LinearSoftmaxGateParams) -> Any:
    check_record_type(params, "params", LinearSoftmaxGateParams)
    # a -inf bias switches an expert off
    xp = check_arrays({"x": x, "params.weight": params.weight, "params.bias": params.bias}, neg_inf_ok=("params.bias",))
    check_float_array(x, "x", ndim=2)
    check_gate_params(params.weight, params.bias, x.shape[1])
    return xp


def linear_softmax_gate_logits(x: Any, params: LinearSoftmaxGateParams) -> Any:
    r"""Gate logits $u_i(x) = k_i^\top x + b_i$.

    Parameters
    ----------
    x : array, shape (N, d)
    params : LinearSoftmaxGateParams

    Returns
    -------
    array, shape (N, n)
    """
    return _logits(x, params, _check_gate(x, params))


def _logits(x: Any, params: LinearSoftmaxGateParams, xp: Any) -> Any:
    return xp.matmul(x, params.weight) + params.bias  # (N, n)


def linear_softmax_gate(x: Any, params: LinearSoftmaxGateParams) -> Any:
    r"""Linear-softmax gate (multinomial logit) of Jacobs, Jordan, Nowlan & Hinton (1991).

    $$w_i(x) = \frac{\exp(k_i^\top x + b_i)}{\sum_j \exp(k_j^\top x + b_j)} .$$

    Eq. (1.3)'s gating proportions $p_i = e^{x_i}/\sum_j e^{x_j}$ in Jacobs et al. (1991),
    "Adaptive Mixtures of Local Experts", Neural Computation 3(1), doi:10.1162/neco.1991.3.1.79,
    with the gate's linear outputs $x_i = k_i^\top x + b_i$.

    Parameters
    ----------
    x : array, shape (N, d)
    params : LinearSoftmaxGateParams

    Returns
    -------
    array, shape (N, n)
        Rows are probability vectors.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gates import LinearSoftmaxGateParams, linear_softmax_gate
    >>> p = LinearSoftmaxGateParams(np.zeros((2, 3)), np.zeros(3))
    >>> linear_softmax_gate(np.ones((1, 2)), p).tolist()
    [[0.3333333333333333, 0.3333333333333333, 0.3333333333333333]]
    """
    return softmax(linear_softmax_gate_logits(x, params), axis=-1)


def log_linear_softmax_gate(x: Any, params: LinearSoftmaxGateParams) -> Any:
    r"""$\log w_i(x)$ of the linear-softmax gate, computed as a log-softmax (no $\log 0$)."""
    return log_softmax(linear_softmax_gate_logits(x, params), axis=-1)


def linear_softmax_gate_vjp(
    x: Any, params: LinearSoftmaxGateParams, cotangent: Any, *, gates: Any = None
) -> LinearSoftmaxGateGrads:
    r"""VJP of [`linear_softmax_gate`][moeref.gates.linear_softmax_gate].

    With $\bar w$ the cotangent of the gate output and $\bar u_i = w_i(\bar w_i - \sum_j w_j \bar w_j)$
    the cotangent of the logits:

    $$\bar k_i = \sum_n x_n \bar u_{n i}, \qquad \bar b_i = \sum_n \bar u_{ni}, \qquad \bar x_n = \sum_i k_i \bar u_{ni}.$$

    Parameters
    ----------
    x, params
        As in the forward.
    cotangent : array, shape (N, n)
    gates : array, shape (N, n), optional
        The forward output, to skip recomputing it.
    """
    xp = _check_gate(x, params)
    check_cotangent(cotangent, (x.shape[0], params.weight.shape[1]), like=x, what="the shape of the gate's output (N, n)")
    return _gate_vjp(x, params, cotangent, softmax(_logits(x, params, xp), axis=-1) if gates is None else gates, xp)


def _gate_vjp(x: Any, params: LinearSoftmaxGateParams, cotangent: Any, w: Any, xp: Any) -> LinearSoftmaxGateGrads:
    """The VJP from the gate output ``w`` (no argument checks: internal callers)."""
    u_bar = _softmax_vjp(w, cotangent, -1, xp)  # (N, n)
    return LinearSoftmaxGateGrads(
        x=xp.matmul(u_bar, xp.matrix_transpose(params.weight)),  # (N, d)
        params=LinearSoftmaxGateParams(weight=xp.matmul(xp.matrix_transpose(x), u_bar), bias=xp.sum(u_bar, axis=0)),
    )

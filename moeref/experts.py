"""Expert networks $f_i(x)$, evaluated for every expert on every input (dense form).

Each family has its forward and VJP side by side. Outputs are stacked as ``(N, n, d_out)``:
input, expert, feature.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .validation import check_arrays, check_cotangent, check_experts_params, check_float_array, check_record_type

__all__ = ["LinearExpertsParams", "LinearExpertsGrads", "linear_experts", "linear_experts_vjp"]


class LinearExpertsParams(NamedTuple):
    """Parameters of ``n`` affine experts $f_i(x) = A_i x + c_i$.

    Attributes
    ----------
    weight : array, shape (n, d_in, d_out)
        ``weight[i]`` is $A_i^\\top$ (so that $f_i(x) = x$ @ ``weight[i]`` $+$ ``bias[i]`` for a row $x$).
    bias : array, shape (n, d_out)
    """

    weight: Any
    bias: Any


class LinearExpertsGrads(NamedTuple):
    """Cotangents of [`linear_experts`][moeref.experts.linear_experts]'s inputs."""

    x: Any
    params: LinearExpertsParams


def _check_experts(x: Any, params: LinearExpertsParams) -> Any:
    check_record_type(params, "params", LinearExpertsParams)
    xp = check_arrays({"x": x, "params.weight": params.weight, "params.bias": params.bias})
    check_float_array(x, "x", ndim=2)
    check_experts_params(params.weight, params.bias, x.shape[1])
    return xp


def linear_experts(x: Any, params: LinearExpertsParams) -> Any:
    r"""Outputs of ``n`` affine experts on every input.

    $$f_i(x_n) = A_i x_n + c_i, \qquad i = 1,\dots,n .$$

    The linear experts of Jacobs et al. (1991), Neural Computation 3(1), doi:10.1162/neco.1991.3.1.79,
    and of the expert networks in Jordan & Jacobs (1994), eq. (2.1), doi:10.1162/neco.1994.6.2.181.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : LinearExpertsParams

    Returns
    -------
    array, shape (N, n, d_out)
    """
    return _linear_experts(x, params, _check_experts(x, params))


def _linear_experts(x: Any, params: LinearExpertsParams, xp: Any) -> Any:
    # (n, N, d_out) -> (N, n, d_out)
    out = xp.matmul(x[None, :, :], params.weight) + params.bias[:, None, :]
    return xp.permute_dims(out, (1, 0, 2))


def linear_experts_vjp(x: Any, params: LinearExpertsParams, cotangent: Any) -> LinearExpertsGrads:
    r"""VJP of [`linear_experts`][moeref.experts.linear_experts].

    $$\bar A_i^\top = \sum_n x_n \bar f_{ni}^\top, \qquad \bar c_i = \sum_n \bar f_{ni}, \qquad \bar x_n = \sum_i A_i^\top \bar f_{ni}.$$

    Parameters
    ----------
    cotangent : array, shape (N, n, d_out)
    """
    xp = _check_experts(x, params)
    n, _, d_out = params.weight.shape
    check_cotangent(cotangent, (x.shape[0], n, d_out), like=x, what="the shape of the experts' output (N, n, d_out)")
    return _linear_experts_vjp(x, params, cotangent, xp)


def _linear_experts_vjp(x: Any, params: LinearExpertsParams, cotangent: Any, xp: Any) -> LinearExpertsGrads:
    """The VJP without argument checks (internal callers)."""
    ct = xp.permute_dims(cotangent, (1, 0, 2))  # (n, N, d_out)
    w_bar = xp.matmul(xp.matrix_transpose(x)[None, :, :], ct)  # (n, d_in, d_out)
    x_bar = xp.sum(xp.matmul(ct, xp.matrix_transpose(params.weight)), axis=0)  # (N, d_in)
    return LinearExpertsGrads(x=x_bar, params=LinearExpertsParams(weight=w_bar, bias=xp.sum(ct, axis=1)))

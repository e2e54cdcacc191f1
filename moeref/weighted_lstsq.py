r"""Weighted least squares for $K$ experts at once: the M-step shared by the linear expert families.

$$\hat\Theta_k = \arg\min_{\Theta}\sum_{i=1}^N w_{ik}\,\lVert y_i - \Theta^\top \tilde x_i\rVert^2
= (\tilde X^\top W_k \tilde X)^{-1}\tilde X^\top W_k Y, \qquad W_k = \operatorname{diag}(w_{1k}, \dots, w_{Nk}),$$

with $\tilde x_i = (x_i, 1)$ the row of the design matrix. This is the expert M-step of Jordan &
Jacobs (1994), "Hierarchical mixtures of experts and the EM algorithm", Neural Computation
6(2):181-214, doi:10.1162/neco.1994.6.2.181 (weighted least squares per expert, the weights being
the posterior probabilities), and eq. (14) of Benaglia, Chauveau, Hunter & Young (2009),
"mixtools: An R package for analyzing finite mixture models", JSS 32(6), doi:10.18637/jss.v032.i06,
for one output. The Gaussian, Laplace (reweighted) and $t$ (scale-weighted) experts, the gated
regressions of [`moeref.hme_em`][moeref.hme_em] and the GLM experts' Gram check use it.

Conventions: ``x`` is ``(N, d)`` without a column of ones; [`design_matrix`][moeref.weighted_lstsq.design_matrix]
appends it (last column), so the coefficients ``theta`` (K, p, D) hold the slopes in rows ``0..d-1``
and the intercept in row ``d``; [`split_coefficients`][moeref.weighted_lstsq.split_coefficients]
separates them.
"""

from __future__ import annotations

from typing import Any

from .core import array_namespace, device_of
from .em import SingularWeightedLeastSquaresError, first_true
from .validation import check_array, check_arrays, check_float_array, check_positive_int, check_shape, concrete_bool

__all__ = ["design_matrix", "weighted_least_squares", "split_coefficients"]


def design_matrix(x: Any, /, *, bias: bool = True) -> Any:
    r"""$\tilde X = [X, \mathbf 1]$, shape (N, d + 1), when ``bias``; else ``x`` itself.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.weighted_lstsq import design_matrix
    >>> design_matrix(np.array([[2.0], [3.0]])).tolist()
    [[2.0, 1.0], [3.0, 1.0]]
    """
    xp = check_arrays({"x": x})
    check_float_array(x, "x", ndim=2)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    return _design_matrix(x, bias, xp)


def _design_matrix(x: Any, bias: bool, xp: Any) -> Any:
    """[`design_matrix`][moeref.weighted_lstsq.design_matrix] without argument checks (M-steps)."""
    if not bias:
        return x
    ones = xp.ones((x.shape[0], 1), dtype=x.dtype, device=device_of(x))
    return xp.concat([x, ones], axis=1)  # (N, d + 1)


def weighted_least_squares(design: Any, y: Any, weights: Any, /) -> Any:
    r"""Per-expert weighted least squares $\Theta_k = (\tilde X^\top W_k \tilde X)^{-1}\tilde X^\top W_k Y$.

    Parameters
    ----------
    design : array, shape (N, p)
        $\tilde X$ (see [`design_matrix`][moeref.weighted_lstsq.design_matrix]).
    y : array, shape (N, D)
    weights : array, shape (N, K)
        Non-negative observation weights, one column per expert.

    Returns
    -------
    array, shape (K, p, D)

    Raises
    ------
    SingularWeightedLeastSquaresError
        When some $\tilde X^\top W_k \tilde X$ is singular to working precision: its smallest
        eigenvalue is $\le 0$ or below $p\,\varepsilon$ times its largest (condition number above
        $1/(p\varepsilon)$, the threshold of
        [`regression_mixture_m_step`][moeref.regression_mixture.regression_mixture_m_step]); the
        message names the first such expert.

    Notes
    -----
    The normal equations are solved with ``linalg.solve`` (not a QR of $W_k^{1/2}\tilde X$), so the
    result agrees with a QR solve (R's ``lm``) to round-off on well-conditioned problems only; the
    singularity check above guards the rest.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.weighted_lstsq import design_matrix, weighted_least_squares
    >>> x = np.array([[0.0], [1.0], [2.0]])
    >>> y = np.array([[1.0], [3.0], [5.0]])  # y = 1 + 2x
    >>> theta = weighted_least_squares(design_matrix(x), y, np.ones((3, 1)))
    >>> np.round(theta[0, :, 0], 12).tolist()  # slope, intercept
    [2.0, 1.0]
    """
    for name, a in (("design", design), ("y", y), ("weights", weights)):
        check_array(a, name)
    xp = check_arrays({"design": design, "y": y, "weights": weights})
    check_float_array(design, "design", ndim=2)
    N = design.shape[0]
    check_float_array(y, "y", ndim=2)
    check_shape(y, "y", (N, None), what=f"design has N={N} rows")
    check_float_array(weights, "weights", ndim=2)
    check_shape(weights, "weights", (N, None), what=f"design has N={N} rows")
    if concrete_bool(xp.all(weights >= 0)) is False:
        raise ValueError("weights must be non-negative (observation weights)")
    return _weighted_least_squares(design, y, weights, xp)


def _weighted_least_squares(design: Any, y: Any, weights: Any, xp: Any) -> Any:
    """[`weighted_least_squares`][moeref.weighted_lstsq.weighted_least_squares] without argument checks (M-steps)."""
    p = design.shape[1]
    xw = xp.matrix_transpose(weights)[:, None, :] * xp.matrix_transpose(design)[None, :, :]  # (K, p, N)
    gram = xw @ design  # (K, p, p)
    rhs = xw @ y  # (K, p, D)
    eig = xp.linalg.eigvalsh(gram)  # (K, p), ascending
    eps = float(xp.finfo(design.dtype).eps)
    singular = (eig[:, p - 1] <= 0) | (eig[:, 0] <= eig[:, p - 1] * (p * eps))  # (K,)
    k = first_true(singular)
    if k is not None:
        raise SingularWeightedLeastSquaresError(
            f"expert {k}: the weighted Gram matrix X^T W X is singular to working precision "
            f"(eigenvalues {float(eig[k, 0]):.3e} .. {float(eig[k, p - 1]):.3e}); the expert has too few "
            f"effective points for its p={p} regression coefficients"
        )
    return xp.linalg.solve(gram, rhs)  # (K, p, D)


def split_coefficients(theta: Any, d: int, /, *, bias: bool = True) -> tuple[Any, Any]:
    r"""Split $\Theta_k$ (K, p, D) into slopes ``weight`` (K, d, D) and intercepts ``bias`` (K, D).

    Without ``bias`` (p = d) the intercepts are zeros.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.weighted_lstsq import split_coefficients
    >>> w, b = split_coefficients(np.array([[[2.0], [1.0]]]), 1)
    >>> w.tolist(), b.tolist()
    ([[[2.0]]], [[1.0]])
    """
    xp = array_namespace(theta, names=("theta",))
    check_float_array(theta, "theta", ndim=3)
    d = check_positive_int(d, "d", minimum=0)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    check_shape(theta, "theta", (theta.shape[0], d + bias, theta.shape[2]),
                what=f"d={d} slopes" + (" and one intercept row" if bias else "") + " per expert")
    weight = theta[:, :d, :]  # (K, d, D)
    if bias:
        return weight, theta[:, d, :]  # (K, D)
    return weight, xp.zeros((theta.shape[0], theta.shape[2]), dtype=theta.dtype, device=device_of(theta))

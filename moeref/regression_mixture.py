r"""Mixture of linear regressions (constant mixing weights), fitted by EM.

$$p(y \mid x; \theta) = \sum_{k=1}^{K} \lambda_k\, \mathcal N\!\big(y \mid x^\top \beta_k, \sigma_k^2\big),
\qquad \lambda_k \ge 0,\ \sum_k \lambda_k = 1 .$$

This is the classical mixture of experts (Jacobs, Jordan, Nowlan & Hinton 1991) with a *constant*
gate $w_k(x) = \lambda_k$ and linear-Gaussian experts: the "mixture of regressions" / switching
regression model (Quandt 1972, "A new approach to estimating switching regressions", JASA
67(338):306-310, doi:10.1080/01621459.1972.10482378; DeSarbo & Cron 1988, "A maximum likelihood
methodology for clusterwise linear regression", Journal of Classification 5:249-282,
doi:10.1007/BF01897167). Notation and EM updates follow Benaglia, Chauveau, Hunter & Young (2009),
"mixtools: An R Package for Analyzing Finite Mixture Models", Journal of Statistical Software 32(6),
doi:10.18637/jss.v032.i06, Section 5.2: model eq. (12), E-step eq. (13), M-step eqs. (4), (14), (15)
(equation numbers of the mixtools package vignette, which reproduces the article).

Notes
-----
Conventions:

* ``x`` is the full design matrix, shape ``(N, p)``: add the intercept column yourself
  ([`with_intercept`][moeref.regression_mixture.with_intercept]), as mixtools' ``addintercept=TRUE`` does.
* ``params.beta`` has shape ``(p, K)``: column ``k`` is $\beta_k$ (mixtools' ``beta`` layout).
* ``params.sigma`` holds standard deviations $\sigma_k$ (not variances), shape ``(K,)``.
* ``params.weights`` holds $\lambda_k$, shape ``(K,)``.
* ``variance="component"`` gives each component its own $\sigma_k$ (mixtools' default
  ``arbvar = TRUE``); ``variance="common"`` ties them (``arbvar = FALSE``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .core import array_namespace, device_of, log_softmax, logsumexp
from .em import (
    CollapsedVarianceError,
    EMOptions,
    EMResult,
    EmptyComponentError,
    EStep,
    SingularWeightedLeastSquaresError,
    run_em,
    run_restarts,
)
from .em_init import RandomStart, random_starts
from .validation import (
    check_array,
    check_arrays,
    check_choice,
    check_cotangent,
    check_finite,
    check_float_array,
    check_positive_int,
    check_same_dtype,
    check_shape,
    concrete_bool,
)

__all__ = [
    "VARIANCE_MODELS",
    "RegressionMixtureParams",
    "RegressionMixtureGrads",
    "with_intercept",
    "regression_mixture_log_joint",
    "regression_mixture_loglik",
    "regression_mixture_loglik_vjp",
    "regression_mixture_posteriors",
    "regression_mixture_e_step",
    "regression_mixture_m_step",
    "regression_mixture_n_free_parameters",
    "regression_mixture_random_starts",
    "fit_regression_mixture",
]

VARIANCE_MODELS: tuple[str, ...] = ("component", "common")
"""``"component"``: one $\\sigma_k$ per component (mixtools ``arbvar=TRUE``); ``"common"``: one shared $\\sigma$."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class RegressionMixtureParams(NamedTuple):
    """Parameters of a $K$-component mixture of linear regressions on $p$ regressors.

    Attributes
    ----------
    beta : array, shape (p, K)
        Column ``k`` is $\\beta_k$.
    sigma : array, shape (K,)
        Standard deviations $\\sigma_k > 0$ (equal entries under ``variance="common"``).
    weights : array, shape (K,)
        Mixing proportions $\\lambda_k > 0$ (summing to 1 for a fit's starting values).
    """

    beta: Any
    sigma: Any
    weights: Any


class RegressionMixtureGrads(NamedTuple):
    """Cotangents of [`regression_mixture_loglik`][moeref.regression_mixture.regression_mixture_loglik]'s inputs."""

    x: Any
    y: Any
    params: RegressionMixtureParams


def _check_data(x: Any, y: Any) -> Any:
    """``x`` (N, p) and ``y`` (N,): real floating, one library and dtype, finite. Returns the namespace."""
    check_array(x, "x")
    check_array(y, "y")
    xp = check_arrays({"x": x, "y": y})
    check_float_array(x, "x", ndim=2)
    check_float_array(y, "y", ndim=1)
    check_shape(y, "y", (x.shape[0],), what=f"x has N={x.shape[0]} rows")
    return xp


def _check_inputs(x: Any, y: Any, params: RegressionMixtureParams, *, name: str = "params") -> Any:
    if not isinstance(params, RegressionMixtureParams):
        raise TypeError(f"{name} must be a RegressionMixtureParams record, got {type(params).__name__}")
    beta, sigma, weights = f"{name}.beta", f"{name}.sigma", f"{name}.weights"
    xp = array_namespace(x, y, params.beta, params.sigma, params.weights, names=("x", "y", beta, sigma, weights))
    check_float_array(x, "x", ndim=2)
    check_float_array(y, "y", ndim=1)
    check_float_array(params.beta, beta, ndim=2)
    N, p = x.shape
    K = params.beta.shape[1]
    check_shape(y, "y", (N,), what=f"x has N={N} rows")
    check_shape(params.beta, beta, (p, K), what=f"x has p={p} columns (regressors, intercept included)")
    check_shape(params.sigma, sigma, (K,), what=f"{beta} has K={K} components")
    check_shape(params.weights, weights, (K,), what=f"{beta} has K={K} components")
    check_same_dtype({"x": x, "y": y, beta: params.beta, sigma: params.sigma, weights: params.weights})
    for n, a in (("x", x), ("y", y), (beta, params.beta), (sigma, params.sigma), (weights, params.weights)):
        check_finite(a, n)
    if concrete_bool(xp.all(params.sigma > 0)) is False:
        raise ValueError(f"{sigma} must be positive (standard deviations)")
    if concrete_bool(xp.all(params.weights >= 0)) is False:
        raise ValueError(f"{weights} must be non-negative (mixing proportions)")
    return xp


def with_intercept(x: Any, /) -> Any:
    """Prepend a column of ones: ``(N, d) -> (N, d + 1)`` (mixtools' ``addintercept = TRUE``).

    A 1-D ``x`` of shape ``(N,)`` is treated as one regressor.
    """
    xp = array_namespace(x, names=("x",))
    check_float_array(x, "x", ndim=(1, 2))
    check_finite(x, "x")
    x2 = xp.reshape(x, (x.shape[0], 1)) if x.ndim == 1 else x
    ones = xp.ones((x2.shape[0], 1), dtype=x2.dtype, device=device_of(x2))
    return xp.concat([ones, x2], axis=1)


def _log_weights(weights: Any, xp: Any) -> Any:
    """$\\log\\lambda_k$ with $\\log 0 = -\\infty$ and no floating-point warning."""
    positive = weights > 0
    safe = xp.where(positive, weights, xp.ones_like(weights))
    return xp.where(positive, xp.log(safe), xp.full_like(weights, -math.inf))


def _residuals(x: Any, y: Any, beta: Any) -> Any:
    return y[:, None] - x @ beta  # (N, K)


def _component_logpdf(x: Any, y: Any, params: RegressionMixtureParams, xp: Any) -> Any:
    """$\\log \\mathcal N(y_i \\mid x_i^\\top\\beta_k, \\sigma_k^2)$, shape (N, K) (inputs already checked)."""
    z = _residuals(x, y, params.beta) / params.sigma  # (N, K)
    return -xp.log(params.sigma) - _HALF_LOG_2PI - 0.5 * z * z


def regression_mixture_log_joint(x: Any, y: Any, params: RegressionMixtureParams) -> Any:
    r"""Log joint density of each sample and component label.

    $$a_{ik} = \log\lambda_k + \log \mathcal N(y_i \mid x_i^\top\beta_k, \sigma_k^2)
    = \log\lambda_k - \log\sigma_k - \tfrac12\log(2\pi) - \frac{(y_i - x_i^\top\beta_k)^2}{2\sigma_k^2}.$$

    Parameters
    ----------
    x : array, shape (N, p)
    y : array, shape (N,)
    params : RegressionMixtureParams

    Returns
    -------
    array, shape (N, K)
        A zero weight gives $-\infty$ in its column.
    """
    return _log_joint(x, y, params, _check_inputs(x, y, params))


def _log_joint(x: Any, y: Any, params: RegressionMixtureParams, xp: Any) -> Any:
    return _log_weights(params.weights, xp) + _component_logpdf(x, y, params, xp)  # (N, K)


def regression_mixture_loglik(x: Any, y: Any, params: RegressionMixtureParams) -> Any:
    r"""Per-sample log-likelihood of the mixture of regressions.

    $$\ell_i = \log \sum_{k=1}^K \lambda_k\,\mathcal N(y_i \mid x_i^\top\beta_k, \sigma_k^2)
    = \operatorname{lse}_k(a_{ik}),$$

    eq. (12) of Benaglia et al. (2009), JSS 32(6), doi:10.18637/jss.v032.i06, evaluated in log space.
    The observed-data log-likelihood is $L = \sum_i \ell_i$.

    Parameters
    ----------
    x : array, shape (N, p)
        Design matrix (intercept column included if wanted).
    y : array, shape (N,)
    params : RegressionMixtureParams

    Returns
    -------
    array, shape (N,)

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.regression_mixture import RegressionMixtureParams, regression_mixture_loglik
    >>> p = RegressionMixtureParams(np.zeros((1, 2)), np.ones(2), np.array([0.5, 0.5]))
    >>> float(regression_mixture_loglik(np.ones((1, 1)), np.zeros(1), p)[0])  # log N(0 | 0, 1)
    -0.9189385332046728
    """
    return logsumexp(regression_mixture_log_joint(x, y, params), axis=1)


def regression_mixture_posteriors(x: Any, y: Any, params: RegressionMixtureParams) -> Any:
    r"""Posterior component probabilities (responsibilities), computed in log space.

    $$\tau_{ik} = \frac{\lambda_k\,\mathcal N(y_i \mid x_i^\top\beta_k, \sigma_k^2)}
    {\sum_j \lambda_j\,\mathcal N(y_i \mid x_i^\top\beta_j, \sigma_j^2)} = \exp\big(a_{ik} - \ell_i\big),$$

    eq. (13) of Benaglia et al. (2009), JSS 32(6), doi:10.18637/jss.v032.i06.

    Returns
    -------
    array, shape (N, K)
        Rows sum to 1.
    """
    a = regression_mixture_log_joint(x, y, params)  # (N, K)
    xp = array_namespace(a)
    return xp.exp(log_softmax(a, axis=1))


def regression_mixture_loglik_vjp(
    x: Any, y: Any, params: RegressionMixtureParams, cotangent: Any
) -> RegressionMixtureGrads:
    r"""VJP of [`regression_mixture_loglik`][moeref.regression_mixture.regression_mixture_loglik].

    With $c_i$ the cotangent of $\ell_i$, $\bar a_{ik} = c_i \tau_{ik}$ (the gradient of log-sum-exp
    is the softmax), $r_{ik} = y_i - x_i^\top\beta_k$ and $g_{ik} = \bar a_{ik} r_{ik} / \sigma_k^2$:

    $$\bar\beta_k = \sum_i x_i\, g_{ik}, \qquad
    \bar\sigma_k = \sum_i \bar a_{ik}\Big(\frac{r_{ik}^2}{\sigma_k^3} - \frac1{\sigma_k}\Big), \qquad
    \bar\lambda_k = \sum_i c_i\, \frac{\mathcal N(y_i \mid x_i^\top\beta_k, \sigma_k^2)}{p(y_i \mid x_i)}
    = \sum_i c_i\, e^{\log\mathcal N_{ik} - \ell_i},$$

    $$\bar y_i = -\sum_k g_{ik}, \qquad \bar x_i = \sum_k g_{ik}\,\beta_k .$$

    Notes
    -----
    The derivatives are taken with respect to the record's own fields, **sigma** (not
    $\log\sigma$) and the **weights** $\lambda$ treated as free (not constrained to the simplex),
    which is what autograd through the forward gives. For other parametrisations apply the chain
    rule: $\overline{\log\sigma_k} = \sigma_k\bar\sigma_k$; for softmax logits $u$ with
    $\lambda = \operatorname{softmax}(u)$, $\bar u = $ ``core.softmax_vjp(weights, weights_bar)``
    $= \lambda \odot (\bar\lambda - \sum_j \lambda_j\bar\lambda_j)$. $\bar\lambda_k$ is computed
    as $\sum_i c_i e^{\log\mathcal N_{ik} - \ell_i}$ rather than $\frac1{\lambda_k}\sum_i\bar a_{ik}$,
    so it stays finite and correct at $\lambda_k = 0$ (where autograd through $\log\lambda_k$ gives NaN).

    Parameters
    ----------
    x, y, params
        As in the forward.
    cotangent : array, shape (N,)

    Returns
    -------
    RegressionMixtureGrads
    """
    xp = _check_inputs(x, y, params)
    check_cotangent(cotangent, (x.shape[0],), like=x, what="one entry per sample, like the log-likelihood")
    log_n = _component_logpdf(x, y, params, xp)  # (N, K)
    a = _log_weights(params.weights, xp) + log_n  # (N, K)
    ell = logsumexp(a, axis=1)  # (N,)
    tau = xp.exp(log_softmax(a, axis=1))  # (N, K)
    a_bar = cotangent[:, None] * tau  # (N, K)
    r = _residuals(x, y, params.beta)  # (N, K)
    var = params.sigma * params.sigma  # (K,)
    g = a_bar * r / var  # (N, K)
    beta_bar = xp.matrix_transpose(x) @ g  # (p, K)
    sigma_bar = xp.sum(a_bar * (r * r / (var * params.sigma) - 1.0 / params.sigma), axis=0)  # (K,)
    weights_bar = xp.sum(cotangent[:, None] * xp.exp(log_n - ell[:, None]), axis=0)  # (K,)
    y_bar = -xp.sum(g, axis=1)  # (N,)
    x_bar = g @ xp.matrix_transpose(params.beta)  # (N, p)
    return RegressionMixtureGrads(
        x=x_bar, y=y_bar, params=RegressionMixtureParams(beta=beta_bar, sigma=sigma_bar, weights=weights_bar)
    )


def regression_mixture_e_step(x: Any, y: Any, params: RegressionMixtureParams) -> EStep:
    r"""E-step: $L = \sum_i \ell_i$ and $\log\tau_{ik} = a_{ik} - \ell_i$ (eq. (13), in log space)."""
    return _e_step(x, y, params, _check_inputs(x, y, params))


def _e_step(x: Any, y: Any, params: RegressionMixtureParams, xp: Any) -> EStep:
    a = _log_joint(x, y, params, xp)  # (N, K)
    ell = logsumexp(a, axis=1)  # (N,)
    return EStep(loglik=xp.sum(ell), log_responsibilities=log_softmax(a, axis=1))


def regression_mixture_m_step(
    x: Any,
    y: Any,
    responsibilities: Any,
    *,
    variance: str = "component",
    min_weight: float = 1e-8,
    min_sigma: float = 1e-8,
) -> RegressionMixtureParams:
    r"""M-step: weighted least squares per component, ML variances, mean responsibilities.

    With $W_k = \operatorname{diag}(\tau_{1k}, \dots, \tau_{Nk})$,

    $$\lambda_k = \frac1N\sum_i \tau_{ik}, \qquad
    \beta_k = (X^\top W_k X)^{-1} X^\top W_k y, \qquad
    \sigma_k^2 = \frac{\sum_i \tau_{ik}\,(y_i - x_i^\top\beta_k)^2}{\sum_i \tau_{ik}},$$

    eqs. (4), (14) and (15) of Benaglia et al. (2009), JSS 32(6), doi:10.18637/jss.v032.i06. With
    ``variance="common"``, $\sigma^2 = \frac1N \sum_{i,k} \tau_{ik}(y_i - x_i^\top\beta_k)^2$ for every
    component (mixtools' ``arbvar = FALSE``). $\beta_k$ comes from ``xp.linalg.solve`` on the normal
    equations (mixtools calls ``lm``, a QR solve; the two agree to round-off on well-conditioned data).

    Parameters
    ----------
    x : array, shape (N, p)
    y : array, shape (N,)
    responsibilities : array, shape (N, K)
    variance : {"component", "common"}
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] if some $\lambda_k$ < ``min_weight``
        (mixtools restarts when ``lambda.new < 1e-08``).
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] if some $\sigma_k$ < ``min_sigma``
        (mixtools restarts when ``s < 1e-08``).

    Returns
    -------
    RegressionMixtureParams

    Raises
    ------
    SingularWeightedLeastSquaresError
        If $X^\top W_k X$ has a condition number above $1/(p\,\varepsilon)$ (a component whose
        weighted design matrix is rank-deficient, e.g. fewer effective points than regressors).
    """
    check_choice(variance, "variance", VARIANCE_MODELS)
    xp = _check_data(x, y)
    check_array(responsibilities, "responsibilities")
    check_arrays({"x": x, "responsibilities": responsibilities})
    check_float_array(responsibilities, "responsibilities", ndim=2)
    N = x.shape[0]
    check_shape(responsibilities, "responsibilities", (N, None), what=f"x has N={N} rows")
    _check_min(min_weight, "min_weight")
    _check_min(min_sigma, "min_sigma")
    return _m_step(x, y, responsibilities, variance, min_weight, min_sigma, xp)


def _check_min(v: Any, name: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or math.isinf(v):
        raise ValueError(f"{name} must be a non-negative float (finite), got {v!r}")


def _m_step(x: Any, y: Any, tau: Any, variance: str, min_weight: float, min_sigma: float, xp: Any) -> RegressionMixtureParams:
    """The M-step without argument checks (the EM loop's responsibilities come from its own E-step)."""
    N, p = x.shape
    K = tau.shape[1]

    weights = xp.mean(tau, axis=0)  # (K,)
    # each degeneracy check is one host sync; the per-component loop only runs to name the culprit
    if concrete_bool(xp.any(weights < min_weight)):
        k = next(k for k in range(K) if concrete_bool(weights[k] < min_weight))
        raise EmptyComponentError(
            f"component {k} has mixing weight {float(weights[k]):.3e} < min_weight={min_weight:g} (it is empty)"
        )

    xw = xp.matrix_transpose(tau)[:, None, :] * xp.matrix_transpose(x)[None, :, :]  # (K, p, N) = X^T W_k
    gram = xw @ x  # (K, p, p)
    rhs = xw @ y[:, None]  # (K, p, 1)
    eig = xp.linalg.eigvalsh(gram)  # (K, p), ascending
    eps = float(xp.finfo(x.dtype).eps)
    singular = (eig[:, p - 1] <= 0) | (eig[:, 0] <= eig[:, p - 1] * (p * eps))  # (K,)
    if concrete_bool(xp.any(singular)):
        k = next(k for k in range(K) if concrete_bool(singular[k]))
        lo, hi = eig[k, 0], eig[k, p - 1]
        raise SingularWeightedLeastSquaresError(
            f"component {k}: the weighted Gram matrix X^T W X is singular to working precision "
            f"(eigenvalues {float(lo):.3e} .. {float(hi):.3e}); the component has too few effective "
            "points for its p regressors"
        )
    beta = xp.matrix_transpose(xp.reshape(xp.linalg.solve(gram, rhs), (K, p)))  # (p, K)

    r = _residuals(x, y, beta)  # (N, K)
    wss = xp.sum(tau * r * r, axis=0)  # (K,)
    if variance == "component":
        sigma = xp.sqrt(wss / xp.sum(tau, axis=0))  # (K,)
    else:
        s = xp.sqrt(xp.sum(wss) / N)
        sigma = s * xp.ones((K,), dtype=x.dtype, device=device_of(x))  # (K,)
    if concrete_bool(xp.any(sigma < min_sigma)):
        k = next(k for k in range(K) if concrete_bool(sigma[k] < min_sigma))
        raise CollapsedVarianceError(
            f"component {k} has sigma {float(sigma[k]):.3e} < min_sigma={min_sigma:g}: its regression passes "
            "through its points exactly and the likelihood is unbounded there"
        )
    return RegressionMixtureParams(beta=beta, sigma=sigma, weights=weights)


def regression_mixture_n_free_parameters(n_regressors: int, n_components: int, *, variance: str = "component") -> int:
    r"""Free parameters: $Kp$ coefficients, $K$ (or 1 common) variances and $K - 1$ weights."""
    check_choice(variance, "variance", VARIANCE_MODELS)
    check_positive_int(n_regressors, "n_regressors")
    check_positive_int(n_components, "n_components")
    return n_components * n_regressors + (n_components if variance == "component" else 1) + n_components - 1


def regression_mixture_random_starts(
    x: Any,
    y: Any,
    n_components: int,
    generator: Any,
    n_starts: int,
    *,
    scheme: str = "partition",
    variance: str = "component",
    min_weight: float = 1e-8,
    min_sigma: float = 1e-8,
) -> tuple[RandomStart, ...]:
    r"""Random starting values for [`fit_regression_mixture`][moeref.regression_mixture.fit_regression_mixture].

    Start $j$ is the M-step ([`regression_mixture_m_step`][moeref.regression_mixture.regression_mixture_m_step])
    of random responsibilities built from **one** call ``generator.random((N,))``; the starts are
    drawn in order and nothing else is drawn (see [`moeref.em_init`][moeref.em_init]). With the
    default ``scheme="partition"`` this is mixtools' ``regmix.init`` idea: the samples split at
    random into $K$ blocks of (nearly) equal size, one least-squares regression per block, the
    block sizes as weights (mixtools then also draws the weights; moeref does not).

    Parameters
    ----------
    x : array, shape (N, p)
    y : array, shape (N,)
    n_components : int
        $K$.
    generator
        Any object with ``random(shape)`` drawing uniforms in $[0, 1)$ (``numpy.random.default_rng(seed)``).
    n_starts : int
    scheme : {"partition", "flexmix"}
    variance, min_weight, min_sigma
        As in [`fit_regression_mixture`][moeref.regression_mixture.fit_regression_mixture].

    Returns
    -------
    tuple of RandomStart
        ``params`` are [`RegressionMixtureParams`][moeref.regression_mixture.RegressionMixtureParams].

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.datasets import load_dataset
    >>> from moeref.regression_mixture import regression_mixture_random_starts, with_intercept
    >>> co2 = load_dataset("co2data")
    >>> starts = regression_mixture_random_starts(with_intercept(co2["GNP"]), co2["CO2"], 2, np.random.default_rng(0), 3)
    >>> [s.params.weights.tolist() for s in starts]  # random blocks of 14 of the 28 countries
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    check_choice(variance, "variance", VARIANCE_MODELS)
    check_positive_int(n_components, "n_components")
    xp = _check_data(x, y)
    _check_min(min_weight, "min_weight")
    _check_min(min_sigma, "min_sigma")
    return random_starts(
        generator, n_starts,
        lambda tau: _m_step(x, y, tau, variance, min_weight, min_sigma, xp),
        n_components=n_components, like=x, scheme=scheme,
    )


def _check_start(params: Any, name: str, variance: str, xp: Any) -> None:
    for field in ("beta", "sigma", "weights"):
        check_finite(getattr(params, field), f"{name}.{field}")
    if concrete_bool(xp.all(params.weights > 0)) is False:
        raise ValueError(f"{name}.weights must be positive (a zero weight can never become positive under EM)")
    total = float(xp.sum(params.weights))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name}.weights must sum to 1, got sum {total!r}")
    if variance == "common" and concrete_bool(xp.all(params.sigma == params.sigma[0])) is False:
        raise ValueError(f'{name}.sigma must have equal entries when variance="common"')


def fit_regression_mixture(
    x: Any,
    y: Any,
    init: RegressionMixtureParams,
    *,
    variance: str = "component",
    options: EMOptions = EMOptions(),
    min_weight: float = 1e-8,
    min_sigma: float = 1e-8,
    restarts: Any = None,
    generator: Any = None,
    n_restarts: int = 0,
    init_scheme: str = "partition",
) -> EMResult:
    r"""Fit a mixture of linear regressions by EM from explicit starting values.

    Alternates the E-step (eq. (13) of Benaglia et al. 2009, in log space) and the M-step
    (eqs. (4), (14), (15)) with [`run_em`][moeref.em.run_em]. Each iteration cannot lower the
    log-likelihood (Dempster, Laird & Rubin 1977, Theorem 1); the driver checks that it does not.

    Parameters
    ----------
    x : array, shape (N, p)
        Design matrix; use [`with_intercept`][moeref.regression_mixture.with_intercept] for an intercept.
    y : array, shape (N,)
    init : RegressionMixtureParams
        Starting values $\theta^{(0)}$; ``init.weights`` must sum to 1 (to 1e-6) and, under
        ``variance="common"``, ``init.sigma`` must have equal entries.
    variance : {"component", "common"}
        Per-component $\sigma_k$ (mixtools' default ``arbvar = TRUE``) or one shared $\sigma$.
    options : EMOptions
        Stopping rule etc.; [`moeref.em.MIXTOOLS`][moeref.em.MIXTOOLS] reproduces ``regmixEM``'s rule.
    min_weight, min_sigma : float
        Degeneracy thresholds, see [`regression_mixture_m_step`][moeref.regression_mixture.regression_mixture_m_step].
    restarts : sequence of RegressionMixtureParams, optional
        Further explicit starting values, checked like ``init``.
    generator, n_restarts, init_scheme
        ``n_restarts`` random starts from the caller's generator, by
        [`regression_mixture_random_starts`][moeref.regression_mixture.regression_mixture_random_starts]
        (one ``generator.random((N,))`` call each, in order, drawn before EM runs). Every start
        runs; the best final log-likelihood wins (the first on ties) and every run is summarised in
        ``restarts`` of the result, as in [`run_restarts`][moeref.em.run_restarts].

    Returns
    -------
    EMResult
        ``params`` is a [`RegressionMixtureParams`][moeref.regression_mixture.RegressionMixtureParams];
        ``restarts`` holds one record per run (``init`` first), ``best_restart`` the run returned.

    Raises
    ------
    EmptyComponentError, CollapsedVarianceError, SingularWeightedLeastSquaresError, NonFiniteLogLikelihoodError
        On a degenerate state (of the only run, or of every run). mixtools restarts from random
        values in these cases; moeref stops and says why, so that a reference fit is never
        silently replaced by another one.

    Examples
    --------
    The CO2 example of the mixtools vignette (Benaglia et al. 2009, Section 5.2):

    >>> import numpy as np
    >>> from moeref.datasets import load_dataset
    >>> from moeref.em import MIXTOOLS
    >>> from moeref.regression_mixture import RegressionMixtureParams, fit_regression_mixture, with_intercept
    >>> co2 = load_dataset("co2data")
    >>> init = RegressionMixtureParams(beta=np.array([[8.0, 1.0], [-1.0, 1.0]]),
    ...                                sigma=np.array([2.0, 1.0]), weights=np.array([1.0, 3.0]) / 4)
    >>> fit = fit_regression_mixture(with_intercept(co2["GNP"]), co2["CO2"], init, options=MIXTOOLS)
    >>> fit.n_iter, round(fit.loglik, 5)
    (10, -66.93977)
    >>> np.round(fit.params.weights, 6).tolist()
    [0.754921, 0.245079]
    """
    check_choice(variance, "variance", VARIANCE_MODELS)
    xp = _check_inputs(x, y, init, name="init")
    _check_start(init, "init", variance, xp)
    starts = [init]
    if restarts is not None:
        if isinstance(restarts, RegressionMixtureParams) or not isinstance(restarts, (list, tuple)):
            raise TypeError("restarts must be a list or tuple of RegressionMixtureParams records")
        for j, r in enumerate(restarts):
            _check_inputs(x, y, r, name=f"restarts[{j}]")
            _check_start(r, f"restarts[{j}]", variance, xp)
            starts.append(r)
    _check_min(min_weight, "min_weight")
    _check_min(min_sigma, "min_sigma")
    check_positive_int(n_restarts, "n_restarts", minimum=0)
    if n_restarts and generator is None:
        raise ValueError(f"n_restarts={n_restarts} random starts need a generator (e.g. numpy.random.default_rng(seed))")
    N, p = x.shape
    K = init.beta.shape[1]
    draws: list[Any] = [None] * len(starts)
    if n_restarts:
        for r in regression_mixture_random_starts(
            x, y, K, generator, n_restarts, scheme=init_scheme, variance=variance, min_weight=min_weight, min_sigma=min_sigma
        ):
            starts.append(r.params)
            draws.append(r.draws)

    def e_step(params: RegressionMixtureParams) -> EStep:
        return _e_step(x, y, params, xp)

    def m_step(params: RegressionMixtureParams, tau: Any) -> RegressionMixtureParams:
        return _m_step(x, y, tau, variance, min_weight, min_sigma, xp)

    def fit_one(start: RegressionMixtureParams) -> tuple[EMResult, float, float]:
        res = run_em(
            e_step, m_step, start, n_samples=N,
            n_free_parameters=regression_mixture_n_free_parameters(p, K, variance=variance), options=options,
        )
        return res, res.loglik, res.loglik

    best, runs, records = run_restarts(fit_one, starts, draws)
    return runs[best]._replace(restarts=records, best_restart=best)

r"""Gaussian expert families for classical (EM-fitted) mixtures of experts.

$$p_k(y \mid x) = \mathcal N\big(y \mid B_k^\top x + c_k,\ \Sigma_k\big), \qquad y \in \mathbb R^{D},\ x \in \mathbb R^{d},$$

the normal linear experts of Jordan & Jacobs (1994), "Hierarchical mixtures of experts and the EM
algorithm", Neural Computation 6(2):181-214, doi:10.1162/neco.1994.6.2.181 (whose expert
networks are generalised linear models, the Gaussian one a linear regression), with a full,
diagonal or isotropic covariance, one per expert or one shared by all of them. Its M-step,
given weights $w_{ik}$ (the E-step responsibilities $\tau_{ik}$), is a weighted least-squares fit
per expert followed by the weighted maximum-likelihood covariance.
[`ConstantGaussianExperts`][moeref.gaussian_experts.ConstantGaussianExperts] drops the
regression: $p_k(y \mid x) = \mathcal N(y \mid \mu_k, \Sigma_k)$, the input-independent "local
experts" of Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", Neural
Computation 3(1):79-87, doi:10.1162/neco.1991.3.1.79 (whose experts output a constant vector and
whose error, eq. (1.3), is a Gaussian with $\Sigma_k = I$).

Both families implement [`ExpertFamily`][moeref.families.ExpertFamily]: ``log_density`` (N, K),
its VJP with respect to the parameter record, ``mean`` (N, K, D), ``m_step`` and
``n_free_parameters``. ``log_density_input_vjp`` gives the cotangents of ``x`` and ``y``.

Conventions
-----------
* ``y`` has shape ``(N, D)``; a 1-D ``y`` of shape ``(N,)`` is read as ``D = 1``.
* ``x`` is ``(N, d)`` **without** a column of ones: the bias $c_k$ is a parameter of its own
  (``bias=False`` removes it; then add an intercept column yourself if you want one).
* The covariance is stored in a form that is valid by construction (the field ``cov``):

  | ``covariance`` | ``cov`` holds | shape (untied) | $\Sigma_k$ |
  |---|---|---|---|
  | ``"full"`` | lower Cholesky factor $L_k$ (positive diagonal) | (K, D, D) | $L_k L_k^\top$ |
  | ``"diagonal"`` | variances $v_{kj}$ | (K, D) | $\operatorname{diag}(v_k)$ |
  | ``"isotropic"`` | one variance $v_k$ | (K,) | $v_k I_D$ |

  With ``tied=True`` the leading dimension is 1 (one covariance shared by every expert). The
  strictly upper triangle of a full ``cov`` is ignored (it is read through ``tril``), so its
  cotangent there is 0. [`covariance_matrices`][moeref.gaussian_experts.LinearGaussianExperts.covariance_matrices]
  and [`cov_from_matrices`][moeref.gaussian_experts.LinearGaussianExperts.cov_from_matrices]
  convert to and from $\Sigma_k$.
* ``variance="ml"`` (default) is maximum likelihood. ``variance="flexmix"`` multiplies the fitted
  covariance by $N/(N - p)$, $p$ the number of regression coefficients per output (intercept
  included): flexmix's ``FLXMRglm(family="gaussian")`` estimates
  ``sigma <- sqrt(sum(w * r^2 / mean(w)) / (nrow(x) - rank))``, i.e.
  $\hat\sigma_k^2 = \frac{N}{N - p}\,\frac{\sum_i w_{ik} r_{ik}^2}{\sum_i w_{ik}}$, and
  ``FLXMRglmfix(varFix=TRUE)`` pools with the same factor. mixtools' ``regmixEM`` and meteorits'
  ``NMoE`` use the ML value. flexmix's value is not the M-step maximiser, so an EM step with it
  need not increase the likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import array_namespace, device_of
from .em import CollapsedVarianceError, SingularWeightedLeastSquaresError, check_nonempty_components
from .validation import (
    check_responsibilities,
    check_choice,
    check_finite,
    check_float_array,
    check_same_dtype,
    check_shape,
    concrete_bool,
)

__all__ = [
    "EXPERT_COVARIANCE_TYPES",
    "VARIANCE_CONVENTIONS",
    "ExpertInputGrads",
    "LinearGaussianExpertsParams",
    "LinearGaussianExperts",
    "ConstantGaussianExpertsParams",
    "ConstantGaussianExperts",
]

EXPERT_COVARIANCE_TYPES: tuple[str, ...] = ("full", "diagonal", "isotropic")
"""Covariance structures of the Gaussian expert families (see the module conventions)."""

VARIANCE_CONVENTIONS: tuple[str, ...] = ("ml", "flexmix")
"""``"ml"``: maximum likelihood; ``"flexmix"``: ML times $N/(N-p)$, as flexmix's ``FLXMRglm``."""

_LOG_2PI = math.log(2.0 * math.pi)


class ExpertInputGrads(NamedTuple):
    """Cotangents of an expert family's inputs ``x`` and ``y`` (``x`` is ``None`` when the
    density does not depend on it)."""

    x: Any
    y: Any


class LinearGaussianExpertsParams(NamedTuple):
    r"""Parameters of $K$ linear-Gaussian experts.

    Attributes
    ----------
    weight : array, shape (K, d, D)
        ``weight[k]`` is $B_k$: the mean of expert $k$ at a row $x$ is ``x @ weight[k] + bias[k]``.
    bias : array, shape (K, D)
        $c_k$ (zeros, and not fitted, under ``bias=False``).
    cov : array
        The covariance parameter, shape (K', D, D), (K', D) or (K',) for ``"full"``,
        ``"diagonal"``, ``"isotropic"`` with $K' = K$ (untied) or 1 (tied); see the module
        conventions.
    """

    weight: Any
    bias: Any
    cov: Any


class ConstantGaussianExpertsParams(NamedTuple):
    r"""Parameters of $K$ input-independent Gaussian experts $\mathcal N(\mu_k, \Sigma_k)$.

    Attributes
    ----------
    mean : array, shape (K, D)
        $\mu_k$.
    cov : array
        As in [`LinearGaussianExpertsParams`][moeref.gaussian_experts.LinearGaussianExpertsParams].
    """

    mean: Any
    cov: Any


# --------------------------------------------------------------------------------------------
# Shared private helpers (also used by the Laplace and t expert modules)
# --------------------------------------------------------------------------------------------


def _check_nonneg_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite non-negative float, got {value!r}")
    return float(value)


def _as_2d_y(y: Any, xp: Any) -> Any:
    """``(N,) -> (N, 1)``; ``(N, D)`` unchanged."""
    return xp.reshape(y, (y.shape[0], 1)) if y.ndim == 1 else y


def _eye(n: int, like: Any, xp: Any) -> Any:
    return xp.eye(n, dtype=like.dtype, device=device_of(like))


def _design(x: Any, bias: bool, xp: Any) -> Any:
    """``[x, 1]`` (N, d + 1) when ``bias``, else ``x``."""
    if not bias:
        return x
    ones = xp.ones((x.shape[0], 1), dtype=x.dtype, device=device_of(x))
    return xp.concat([x, ones], axis=1)






def _weighted_least_squares(design: Any, y2: Any, weights: Any, xp: Any) -> Any:
    r"""Per-expert weighted least squares $\Theta_k = (X^\top W_k X)^{-1} X^\top W_k Y$.

    design (N, p), y2 (N, D), weights (N, K) -> (K, p, D). Raises
    `SingularWeightedLeastSquaresError` when some $X^\top W_k X$ has condition number above
    $1/(p\,\varepsilon)$ (the threshold of `regression_mixture_m_step`).
    """
    p = design.shape[1]
    K = weights.shape[1]
    xw = xp.matrix_transpose(weights)[:, None, :] * xp.matrix_transpose(design)[None, :, :]  # (K, p, N)
    gram = xw @ design  # (K, p, p)
    rhs = xw @ y2  # (K, p, D)
    eig = xp.linalg.eigvalsh(gram)  # (K, p), ascending
    eps = float(xp.finfo(design.dtype).eps)
    singular = (eig[:, p - 1] <= 0) | (eig[:, 0] <= eig[:, p - 1] * (p * eps))  # (K,)
    if concrete_bool(xp.any(singular)):
        k = next(k for k in range(K) if concrete_bool(singular[k]))
        raise SingularWeightedLeastSquaresError(
            f"expert {k}: the weighted Gram matrix X^T W X is singular to working precision "
            f"(eigenvalues {float(eig[k, 0]):.3e} .. {float(eig[k, p - 1]):.3e}); the expert has too few "
            f"effective points for its p={p} regression coefficients"
        )
    return xp.linalg.solve(gram, rhs)  # (K, p, D)


def _split_theta(theta: Any, d: int, bias: bool, xp: Any) -> tuple[Any, Any]:
    """(K, p, D) -> weight (K, d, D), bias (K, D) (zeros when not fitted)."""
    weight = theta[:, :d, :]
    if bias:
        return weight, theta[:, d, :]
    return weight, xp.zeros((theta.shape[0], theta.shape[2]), dtype=theta.dtype, device=device_of(theta))


def _name_first(flags: Any, K: int) -> int:
    return next(k for k in range(K) if concrete_bool(flags[k]))


# ---------------------------------------------------------------- covariance parameterisations


def _diag(m: Any, xp: Any) -> Any:
    """Diagonal of a batch of square matrices (..., D, D) -> (..., D)."""
    return xp.sum(m * _eye(m.shape[-1], m, xp), axis=-1)


def _check_cov(cov: Any, structure: str, Kc: int, D: int, name: str, xp: Any) -> None:
    check_float_array(cov, name)
    tied = "tied=True: one shared covariance" if Kc == 1 else f"K={Kc} experts"
    if structure == "full":
        check_shape(cov, name, (Kc, D, D), what=f'covariance="full" stores Cholesky factors; {tied}, D={D}')
        check_finite(cov, name)
        if concrete_bool(xp.all(_diag(cov, xp) > 0)) is False:
            raise ValueError(f'{name} must have a positive diagonal (a lower Cholesky factor, covariance="full")')
    elif structure == "diagonal":
        check_shape(cov, name, (Kc, D), what=f'covariance="diagonal" stores variances; {tied}, D={D}')
        check_finite(cov, name)
        if concrete_bool(xp.all(cov > 0)) is False:
            raise ValueError(f'{name} must be positive (variances, covariance="diagonal")')
    else:
        check_shape(cov, name, (Kc,), what=f'covariance="isotropic" stores one variance per expert; {tied}')
        check_finite(cov, name)
        if concrete_bool(xp.all(cov > 0)) is False:
            raise ValueError(f'{name} must be positive (variances, covariance="isotropic")')


def _cov_log_density(structure: str, cov: Any, r: Any, xp: Any) -> Any:
    r"""$\log\mathcal N(r_{ik} \mid 0, \Sigma_k)$ for residuals r (K, N, D) -> (K, N)."""
    K, N, D = r.shape
    if structure == "full":
        L = xp.broadcast_to(xp.tril(cov), (K, D, D))  # (K, D, D)
        z = xp.linalg.solve(L, xp.matrix_transpose(r))  # (K, D, N): L^{-1} r
        maha = xp.sum(z * z, axis=1)  # (K, N)
        logdet = 2.0 * xp.sum(xp.log(_diag(L, xp)), axis=-1)  # (K,)
        return -0.5 * (D * _LOG_2PI + logdet[:, None] + maha)
    if structure == "diagonal":
        v = cov[:, None, :]  # (K', 1, D)
        return -0.5 * xp.sum(_LOG_2PI + xp.log(v) + r * r / v, axis=-1)  # (K, N)
    v = cov[:, None]  # (K', 1)
    return -0.5 * (D * (_LOG_2PI + xp.log(v)) + xp.sum(r * r, axis=-1) / v)  # (K, N)


def _cov_vjp(structure: str, cov: Any, r: Any, c: Any, xp: Any) -> tuple[Any, Any]:
    r"""Cotangents of $\log\mathcal N(r \mid 0, \Sigma)$ for a cotangent c (K, N).

    Returns ``(g, cov_bar)`` with $g_{ik} = c_{ik}\,\Sigma_k^{-1} r_{ik}$ (K, N, D), the cotangent of
    the **mean** (minus that of $r$), and ``cov_bar`` shaped like ``cov`` (summed over experts when
    tied).
    """
    K, N, D = r.shape
    tied = cov.shape[0] == 1 and K > 1
    cc = c[:, :, None]  # (K, N, 1)
    if structure == "full":
        L = xp.broadcast_to(xp.tril(cov), (K, D, D))  # (K, D, D)
        z = xp.linalg.solve(L, xp.matrix_transpose(r))  # (K, D, N): L^{-1} r
        s = xp.linalg.solve(xp.matrix_transpose(L), z)  # (K, D, N): Sigma^{-1} r
        g = xp.matrix_transpose(s) * cc  # (K, N, D)
        outer = xp.matrix_transpose(g) @ xp.matrix_transpose(z)  # (K, D, D): sum_i c s z^T
        inv_diag = 1.0 / _diag(L, xp)  # (K, D)
        c_k = xp.sum(c, axis=1)  # (K,)
        L_bar = outer - (c_k[:, None] * inv_diag)[:, :, None] * _eye(D, r, xp)  # (K, D, D)
        if tied:
            L_bar = xp.sum(L_bar, axis=0, keepdims=True)
        return g, xp.tril(L_bar)
    if structure == "diagonal":
        v = cov[:, None, :]  # (K', 1, D)
        g = cc * r / v  # (K, N, D)
        v_bar = 0.5 * xp.sum(cc * (r * r / (v * v) - 1.0 / v), axis=1)  # (K, D)
        return g, (xp.sum(v_bar, axis=0, keepdims=True) if tied else v_bar)
    v = cov[:, None]  # (K', 1)
    g = cc * r / v[:, :, None]  # (K, N, D)
    v_bar = 0.5 * xp.sum(c * (xp.sum(r * r, axis=-1) / (v * v) - D / v), axis=1)  # (K,)
    return g, (xp.sum(v_bar, axis=0, keepdims=True) if tied else v_bar)


def _cov_mle(structure: str, r: Any, weights: Any, *, tied: bool, factor: float, min_sigma: float, xp: Any) -> Any:
    r"""Weighted ML covariance parameter from residuals r (K, N, D) and weights (N, K).

    $S_k = \sum_i w_{ik} r_{ik} r_{ik}^\top / \sum_i w_{ik}$ (untied) or
    $S = \sum_{i,k} w_{ik} r_{ik} r_{ik}^\top / \sum_{i,k} w_{ik}$ (tied), restricted to the diagonal
    or to $\operatorname{tr}(S)/D$ for the other structures, times ``factor``; then its Cholesky
    factor (full). Raises `CollapsedVarianceError`.
    """
    K, N, D = r.shape
    w = xp.matrix_transpose(weights)[:, :, None]  # (K, N, 1)
    n_k = xp.sum(weights, axis=0)  # (K,)
    if structure == "full":
        S = xp.matrix_transpose(w * r) @ r  # (K, D, D)
        S = 0.5 * (S + xp.matrix_transpose(S))
    elif structure == "diagonal":
        S = xp.sum(w * r * r, axis=1)  # (K, D)
    else:
        S = xp.sum(w * r * r, axis=(1, 2)) / D  # (K,)
    if tied:
        S = xp.sum(S, axis=0, keepdims=True) / xp.sum(n_k)
    else:
        S = S / xp.reshape(n_k, (K,) + (1,) * (S.ndim - 1))
    S = S * factor
    floor = float(min_sigma) ** 2
    eps = float(xp.finfo(r.dtype).eps)
    if structure == "full":
        eig = xp.linalg.eigvalsh(S)  # (K', D), ascending
        lo, hi = eig[:, 0], eig[:, D - 1]
    elif structure == "diagonal":
        lo, hi = xp.min(S, axis=1), xp.max(S, axis=1)
    else:
        lo, hi = S, S
    collapsed = (lo < floor) | (lo <= hi * (D * eps))  # (K',)
    if concrete_bool(xp.any(collapsed)):
        k = _name_first(collapsed, S.shape[0])
        who = "the shared (tied) covariance" if tied else f"expert {k}"
        raise CollapsedVarianceError(
            f"{who}: the fitted covariance has smallest eigenvalue {float(lo[k]):.3e} (largest {float(hi[k]):.3e}), "
            f"below min_sigma**2={floor:g} or singular to working precision; its residuals lie on a "
            "lower-dimensional set and the likelihood is unbounded there"
        )
    return xp.linalg.cholesky(S) if structure == "full" else S


def _cov_matrices(structure: str, cov: Any, D: int, xp: Any) -> Any:
    if structure == "full":
        L = xp.tril(cov)
        return L @ xp.matrix_transpose(L)
    eye = _eye(D, cov, xp)
    if structure == "diagonal":
        return cov[:, :, None] * eye
    return cov[:, None, None] * eye


def _cov_from_matrices(structure: str, sigma: Any, xp: Any) -> Any:
    check_float_array(sigma, "covariance", ndim=3)
    D = sigma.shape[-1]
    check_shape(sigma, "covariance", (sigma.shape[0], D, D), what="square matrices")
    if structure == "full":
        return xp.linalg.cholesky(0.5 * (sigma + xp.matrix_transpose(sigma)))
    dg = _diag(sigma, xp)  # (K', D)
    return dg if structure == "diagonal" else xp.mean(dg, axis=1)


def _cov_unconstrained(structure: str, cov: Any, xp: Any) -> Any:
    """Full: the Cholesky factor with its diagonal logged; diagonal / isotropic: log-variances."""
    if structure != "full":
        return xp.log(cov)
    eye = _eye(cov.shape[-1], cov, xp)
    return xp.tril(cov) * (1.0 - eye) + xp.log(_diag(cov, xp))[..., None] * eye


def _cov_constrained(structure: str, free: Any, xp: Any) -> Any:
    if structure != "full":
        return xp.exp(free)
    eye = _eye(free.shape[-1], free, xp)
    return xp.tril(free) * (1.0 - eye) + xp.exp(_diag(free, xp))[..., None] * eye


def _cov_constrained_vjp(structure: str, free: Any, cov_bar: Any, xp: Any) -> Any:
    if structure != "full":
        return cov_bar * xp.exp(free)
    eye = _eye(free.shape[-1], free, xp)
    return xp.tril(cov_bar) * (1.0 - eye) + (_diag(cov_bar, xp) * xp.exp(_diag(free, xp)))[..., None] * eye


def _cov_count(structure: str, D: int) -> int:
    return D * (D + 1) // 2 if structure == "full" else (D if structure == "diagonal" else 1)


@dataclass(frozen=True)
class _GaussianOptions:
    covariance: str = "full"
    tied: bool = False
    variance: str = "ml"
    min_weight: float = 1e-8
    min_sigma: float = 1e-8

    def _validate_options(self) -> None:
        check_choice(self.covariance, "covariance", EXPERT_COVARIANCE_TYPES)
        check_choice(self.variance, "variance", VARIANCE_CONVENTIONS)
        if not isinstance(self.tied, bool):
            raise TypeError(f"tied must be a bool, got {type(self.tied).__name__} {self.tied!r}")
        _check_nonneg_float(self.min_weight, "min_weight")
        _check_nonneg_float(self.min_sigma, "min_sigma")

    def covariance_matrices(self, params: Any) -> Any:
        r"""$\Sigma_k$ from ``params.cov``: array (K', D, D), $K' = 1$ when tied.

        Examples
        --------
        >>> import numpy as np
        >>> from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
        >>> fam = LinearGaussianExperts(covariance="isotropic")
        >>> p = LinearGaussianExpertsParams(np.zeros((2, 1, 2)), np.zeros((2, 2)), np.array([1.0, 4.0]))
        >>> fam.covariance_matrices(p)[1].tolist()
        [[4.0, 0.0], [0.0, 4.0]]
        """
        xp = array_namespace(params.cov, names=("params.cov",))
        D = params[0].shape[-1]
        return _cov_matrices(self.covariance, params.cov, D, xp)

    def cov_from_matrices(self, covariance: Any) -> Any:
        r"""The stored ``cov`` field for covariance matrices $\Sigma_k$, shape (K', D, D).

        Full: the lower Cholesky factor; diagonal: the diagonals; isotropic: $\operatorname{tr}(\Sigma_k)/D$
        (the nearest isotropic matrix in Frobenius norm).
        """
        xp = array_namespace(covariance, names=("covariance",))
        return _cov_from_matrices(self.covariance, covariance, xp)

    # ---------------------------------------------------------------- unconstrained view

    def unconstrained(self, params: Any) -> Any:
        r"""The record with ``cov`` replaced by an unconstrained form (for gradient ascent).

        Full: $L_k$ with its diagonal replaced by $\log L_{k,jj}$ (the log-Cholesky
        parameterisation of Pinheiro & Bates (1996), "Unconstrained parametrizations for
        variance-covariance matrices", Statistics and Computing 6:289-296, doi:10.1007/BF00140873);
        diagonal / isotropic: $\log v$.
        """
        xp = array_namespace(params.cov, names=("params.cov",))
        return params._replace(cov=_cov_unconstrained(self.covariance, params.cov, xp))

    def constrained(self, free: Any) -> Any:
        r"""Inverse of [`unconstrained`][moeref.gaussian_experts.LinearGaussianExperts.unconstrained]."""
        xp = array_namespace(free.cov, names=("free.cov",))
        return free._replace(cov=_cov_constrained(self.covariance, free.cov, xp))

    def constrained_vjp(self, free: Any, params_bar: Any) -> Any:
        r"""Chain rule through ``constrained``: $\overline{\log v} = v\,\bar v$ and, for a full
        covariance, $\overline{\log L_{jj}} = L_{jj}\bar L_{jj}$ (off-diagonal entries unchanged)."""
        xp = array_namespace(free.cov, params_bar.cov, names=("free.cov", "params_bar.cov"))
        return params_bar._replace(cov=_cov_constrained_vjp(self.covariance, free.cov, params_bar.cov, xp))

    def _factor(self, N: int, p: int) -> float:
        if self.variance == "ml":
            return 1.0
        if N <= p:
            raise ValueError(f'variance="flexmix" needs N > p (N={N} samples, p={p} coefficients per output)')
        return N / (N - p)


# --------------------------------------------------------------------------------------------
# Linear-Gaussian experts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGaussianExperts(_GaussianOptions):
    r"""$K$ linear-Gaussian experts $p_k(y \mid x) = \mathcal N(y \mid B_k^\top x + c_k, \Sigma_k)$.

    $$\log p_k(y_i \mid x_i) = -\tfrac12\Big(D\log 2\pi + \log\det\Sigma_k
    + r_{ik}^\top \Sigma_k^{-1} r_{ik}\Big), \qquad r_{ik} = y_i - B_k^\top x_i - c_k .$$

    The linear-regression expert networks of Jordan & Jacobs (1994), doi:10.1162/neco.1994.6.2.181,
    fitted in the M-step by weighted least squares, with a choice of covariance structure.

    Attributes
    ----------
    covariance : {"full", "diagonal", "isotropic"}
        Structure of $\Sigma_k$; see the module conventions for the stored form.
    tied : bool
        One covariance shared by every expert (``cov`` has leading dimension 1).
    variance : {"ml", "flexmix"}
        ``"ml"``: maximum-likelihood covariance (default). ``"flexmix"``: ML times $N/(N-p)$.
    bias : bool
        Fit the bias $c_k$. With ``False`` the bias is fixed at 0 (``params.bias`` must be zeros).
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] in ``m_step`` when some
        $\sum_i w_{ik} < $ ``min_weight`` $\cdot N$.
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] in ``m_step`` when a fitted
        covariance has an eigenvalue below ``min_sigma**2`` or below $D\varepsilon$ times its largest.
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
    >>> fam = LinearGaussianExperts(covariance="diagonal")
    >>> p = LinearGaussianExpertsParams(np.zeros((1, 1, 2)), np.zeros((1, 2)), np.ones((1, 2)))
    >>> float(fam.log_density(p, np.zeros((1, 1)), np.zeros((1, 2)))[0, 0])  # -log(2 pi)
    -1.8378770664093453
    """

    bias: bool = True
    name: str = "linear_gaussian"

    def __post_init__(self) -> None:
        self._validate_options()
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__} {self.bias!r}")

    # ---------------------------------------------------------------- checks

    def _check(self, params: Any, x: Any, y: Any = None) -> Any:
        if not isinstance(params, LinearGaussianExpertsParams):
            raise TypeError(
                f"params must be a LinearGaussianExpertsParams(weight, bias, cov), got {type(params).__name__}"
            )
        named = {"x": x, "y": y, "params.weight": params.weight, "params.bias": params.bias, "params.cov": params.cov}
        named = {k: v for k, v in named.items() if v is not None}
        xp = array_namespace(*named.values(), names=tuple(named))
        check_float_array(x, "x", ndim=2)
        check_float_array(params.weight, "params.weight", ndim=3)
        N, d = x.shape
        K, _, D = params.weight.shape
        check_shape(params.weight, "params.weight", (K, d, D), what=f"x has d={d} features")
        check_float_array(params.bias, "params.bias", ndim=2)
        check_shape(params.bias, "params.bias", (K, D), what=f"params.weight holds K={K} experts with D={D} outputs")
        _check_cov(params.cov, self.covariance, 1 if self.tied else K, D, "params.cov", xp)
        if y is not None:
            check_float_array(y, "y", ndim=(1, 2))
            check_shape(y, "y", (N,) if y.ndim == 1 else (N, D), what=f"x has N={N} rows; the experts have D={D} outputs")
            if y.ndim == 1 and D != 1:
                raise ValueError(f"y is 1-D but the experts have D={D} outputs; pass y with shape (N, {D})")
        check_same_dtype(named)
        check_finite(params.weight, "params.weight")
        check_finite(params.bias, "params.bias")
        return xp

    def _residuals(self, params: LinearGaussianExpertsParams, x: Any, y: Any, xp: Any) -> Any:
        mu = xp.matmul(x[None, :, :], params.weight) + params.bias[:, None, :]  # (K, N, D)
        return _as_2d_y(y, xp)[None, :, :] - mu  # (K, N, D)

    # ---------------------------------------------------------------- forward and VJPs

    def log_density(self, params: LinearGaussianExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log\mathcal N(y_i \mid B_k^\top x_i + c_k, \Sigma_k)$ for every sample and expert.

        Parameters
        ----------
        params : LinearGaussianExpertsParams
        x : array, shape (N, d)
        y : array, shape (N, D) or (N,)

        Returns
        -------
        array, shape (N, K)

        Notes
        -----
        Full covariance: $r^\top\Sigma^{-1}r = \lVert L^{-1} r\rVert^2$ by a linear solve with the
        Cholesky factor and $\log\det\Sigma = 2\sum_j \log L_{jj}$, never an explicit inverse or a
        determinant (which under/overflows).
        """
        xp = self._check(params, x, y)
        r = self._residuals(params, x, y, xp)  # (K, N, D)
        return xp.matrix_transpose(_cov_log_density(self.covariance, params.cov, r, xp))  # (N, K)

    def log_density_vjp(self, params: LinearGaussianExpertsParams, x: Any, y: Any, cotangent: Any) -> LinearGaussianExpertsParams:
        r"""VJP of [`log_density`][moeref.gaussian_experts.LinearGaussianExperts.log_density] with respect to ``params``.

        With $c_{ik}$ the cotangent, $s_{ik} = \Sigma_k^{-1} r_{ik}$ and $z_{ik} = L_k^{-1} r_{ik}$:

        $$\bar B_k = \sum_i c_{ik}\, x_i s_{ik}^\top, \qquad \bar c_k = \sum_i c_{ik}\, s_{ik},$$

        $$\bar L_k = \operatorname{tril}\Big(\sum_i c_{ik}\, s_{ik} z_{ik}^\top - \Big(\sum_i c_{ik}\Big)\operatorname{diag}(1/L_{k,jj})\Big)$$

        (full), $\bar v_{kj} = \tfrac12\sum_i c_{ik}\big(r_{ikj}^2/v_{kj}^2 - 1/v_{kj}\big)$ (diagonal) and
        $\bar v_k = \tfrac12\sum_i c_{ik}\big(\lVert r_{ik}\rVert^2/v_k^2 - D/v_k\big)$ (isotropic); tied
        covariances sum these over $k$. Under ``bias=False`` the returned bias cotangent is 0.

        Parameters
        ----------
        cotangent : array, shape (N, K)

        Returns
        -------
        LinearGaussianExpertsParams
        """
        xp = self._check(params, x, y)
        K = params.weight.shape[0]
        check_shape(cotangent, "cotangent", (x.shape[0], K), what="one entry per sample and expert, like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        r = self._residuals(params, x, y, xp)  # (K, N, D)
        g, cov_bar = _cov_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)  # (K, N, D)
        w_bar = xp.matmul(xp.matrix_transpose(x)[None, :, :], g)  # (K, d, D)
        b_bar = xp.sum(g, axis=1) if self.bias else xp.zeros_like(params.bias)  # (K, D)
        return LinearGaussianExpertsParams(weight=w_bar, bias=b_bar, cov=cov_bar)

    def log_density_input_vjp(self, params: LinearGaussianExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""Cotangents of ``x`` and ``y`` for a cotangent (N, K) of ``log_density``.

        $$\bar x_i = \sum_k c_{ik}\, B_k s_{ik}, \qquad \bar y_i = -\sum_k c_{ik}\, s_{ik},
        \qquad s_{ik} = \Sigma_k^{-1} r_{ik}.$$

        ``y.shape`` is kept (a 1-D ``y`` gets a 1-D cotangent).
        """
        xp = self._check(params, x, y)
        K = params.weight.shape[0]
        check_shape(cotangent, "cotangent", (x.shape[0], K), what="one entry per sample and expert, like log_density")
        r = self._residuals(params, x, y, xp)  # (K, N, D)
        g, _ = _cov_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)  # (K, N, D)
        x_bar = xp.sum(xp.matmul(g, xp.matrix_transpose(params.weight)), axis=0)  # (N, d)
        y_bar = -xp.sum(g, axis=0)  # (N, D)
        return ExpertInputGrads(x=x_bar, y=xp.reshape(y_bar, y.shape))

    def mean(self, params: LinearGaussianExpertsParams, x: Any) -> Any:
        r"""$E[y \mid x_i, k] = B_k^\top x_i + c_k$, shape (N, K, D)."""
        xp = self._check(params, x)
        mu = xp.matmul(x[None, :, :], params.weight) + params.bias[:, None, :]  # (K, N, D)
        return xp.permute_dims(mu, (1, 0, 2))

    # ---------------------------------------------------------------- M-step

    def m_step(self, params: LinearGaussianExpertsParams, x: Any, y: Any, weights: Any) -> LinearGaussianExpertsParams:
        r"""Weighted maximum likelihood: weighted least squares, then the residual covariance.

        With $W_k = \operatorname{diag}(w_{1k}, \dots, w_{Nk})$, $\tilde X = [X, \mathbf 1]$ and
        $n_k = \sum_i w_{ik}$:

        $$\begin{pmatrix} B_k \\ c_k^\top\end{pmatrix} = (\tilde X^\top W_k \tilde X)^{-1}\tilde X^\top W_k Y,
        \qquad \Sigma_k = \frac{1}{n_k}\sum_i w_{ik}\, r_{ik} r_{ik}^\top,$$

        and, tied, $\Sigma = \sum_{i,k} w_{ik} r_{ik}r_{ik}^\top / \sum_{i,k} w_{ik}$ (the denominator is
        $N$ when the weights are responsibilities). The diagonal structure keeps the diagonal of
        $\Sigma_k$, the isotropic one $\operatorname{tr}(\Sigma_k)/D$. This is the exact maximiser of
        $\sum_{i,k} w_{ik}\log p_k(y_i \mid x_i)$: the coefficients do not depend on $\Sigma_k$
        because every output shares the regressors and the weights (the weighted least squares of
        Jordan & Jacobs 1994; eqs. (14)-(15) of Benaglia et al. 2009, doi:10.18637/jss.v032.i06, for $D=1$). ``params`` is only used for its shapes.

        Parameters
        ----------
        params : LinearGaussianExpertsParams
        x : array, shape (N, d)
        y : array, shape (N, D) or (N,)
        weights : array, shape (N, K)
            Non-negative (responsibilities).

        Returns
        -------
        LinearGaussianExpertsParams

        Raises
        ------
        EmptyComponentError, SingularWeightedLeastSquaresError, CollapsedVarianceError
            See the class attributes. The covariance is accumulated from residuals (two passes),
            never as $\overline{yy^\top} - \mu\mu^\top$.
        """
        xp = self._check(params, x, y)
        K, d, D = params.weight.shape
        check_responsibilities(weights, x.shape[0], K)
        check_same_dtype({"x": x, "weights": weights})
        check_finite(x, "x")
        check_finite(y, "y")
        check_nonempty_components(weights, self.min_weight)
        design = _design(x, self.bias, xp)  # (N, p)
        y2 = _as_2d_y(y, xp)  # (N, D)
        theta = _weighted_least_squares(design, y2, weights, xp)  # (K, p, D)
        weight, bias = _split_theta(theta, d, self.bias, xp)
        r = y2[None, :, :] - xp.matmul(design[None, :, :], theta)  # (K, N, D)
        cov = _cov_mle(
            self.covariance, r, weights, tied=self.tied, factor=self._factor(x.shape[0], design.shape[1]),
            min_sigma=self.min_sigma, xp=xp,
        )
        return LinearGaussianExpertsParams(weight=weight, bias=bias, cov=cov)

    def n_free_parameters(self, params: LinearGaussianExpertsParams) -> int:
        r"""$K D (d + 1)$ regression coefficients ($K D d$ without bias) plus $K'$ covariances of
        $D(D+1)/2$ (full), $D$ (diagonal) or 1 (isotropic) entries."""
        K, d, D = params.weight.shape
        n_cov = 1 if self.tied else K
        return K * D * (d + (1 if self.bias else 0)) + n_cov * _cov_count(self.covariance, D)


# --------------------------------------------------------------------------------------------
# Constant (input-independent) Gaussian experts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantGaussianExperts(_GaussianOptions):
    r"""$K$ input-independent Gaussian experts $p_k(y \mid x) = \mathcal N(y \mid \mu_k, \Sigma_k)$.

    $$\log p_k(y_i) = -\tfrac12\Big(D\log 2\pi + \log\det\Sigma_k + (y_i - \mu_k)^\top\Sigma_k^{-1}(y_i - \mu_k)\Big).$$

    The local experts of Jacobs, Jordan, Nowlan & Hinton (1991), doi:10.1162/neco.1991.3.1.79,
    whose outputs do not depend on the input (the gate alone decides where each is used), with a
    learnt covariance instead of their $\Sigma_k = I$ (eq. (1.3)). With a constant gate this is a
    Gaussian mixture for $y$. ``x`` is accepted (for the interface) and only its row count is used.

    Attributes
    ----------
    covariance, tied, variance, min_weight, min_sigma
        As in [`LinearGaussianExperts`][moeref.gaussian_experts.LinearGaussianExperts]; here the
        flexmix factor is $N/(N-1)$ (one mean per output).
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gaussian_experts import ConstantGaussianExperts, ConstantGaussianExpertsParams
    >>> fam = ConstantGaussianExperts(covariance="isotropic")
    >>> y = np.array([[0.0], [1.0], [2.0]])
    >>> p = fam.m_step(ConstantGaussianExpertsParams(np.zeros((1, 1)), np.ones(1)), np.zeros((3, 0)), y, np.ones((3, 1)))
    >>> p.mean.tolist(), round(float(p.cov[0]), 6)
    ([[1.0]], 0.666667)
    """

    name: str = "constant_gaussian"

    def __post_init__(self) -> None:
        self._validate_options()

    def _check(self, params: Any, x: Any, y: Any = None) -> Any:
        if not isinstance(params, ConstantGaussianExpertsParams):
            raise TypeError(f"params must be a ConstantGaussianExpertsParams(mean, cov), got {type(params).__name__}")
        named = {"x": x, "y": y, "params.mean": params.mean, "params.cov": params.cov}
        named = {k: v for k, v in named.items() if v is not None}
        xp = array_namespace(*named.values(), names=tuple(named))
        check_float_array(x, "x", ndim=2)
        check_float_array(params.mean, "params.mean", ndim=2)
        N = x.shape[0]
        K, D = params.mean.shape
        _check_cov(params.cov, self.covariance, 1 if self.tied else K, D, "params.cov", xp)
        if y is not None:
            check_float_array(y, "y", ndim=(1, 2))
            check_shape(y, "y", (N,) if y.ndim == 1 else (N, D), what=f"x has N={N} rows; the experts have D={D} outputs")
            if y.ndim == 1 and D != 1:
                raise ValueError(f"y is 1-D but the experts have D={D} outputs; pass y with shape (N, {D})")
        check_same_dtype(named)
        check_finite(params.mean, "params.mean")
        return xp

    def log_density(self, params: ConstantGaussianExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log\mathcal N(y_i \mid \mu_k, \Sigma_k)$, shape (N, K).

        Parameters
        ----------
        params : ConstantGaussianExpertsParams
        x : array, shape (N, d)
            Only its row count is used.
        y : array, shape (N, D) or (N,)
        """
        xp = self._check(params, x, y)
        r = _as_2d_y(y, xp)[None, :, :] - params.mean[:, None, :]  # (K, N, D)
        return xp.matrix_transpose(_cov_log_density(self.covariance, params.cov, r, xp))

    def log_density_vjp(self, params: ConstantGaussianExpertsParams, x: Any, y: Any, cotangent: Any) -> ConstantGaussianExpertsParams:
        r"""VJP with respect to ``params``: $\bar\mu_k = \sum_i c_{ik}\,\Sigma_k^{-1}(y_i - \mu_k)$ and
        the covariance cotangents of [`LinearGaussianExperts.log_density_vjp`][moeref.gaussian_experts.LinearGaussianExperts.log_density_vjp]."""
        xp = self._check(params, x, y)
        check_shape(cotangent, "cotangent", (x.shape[0], params.mean.shape[0]), what="like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        r = _as_2d_y(y, xp)[None, :, :] - params.mean[:, None, :]  # (K, N, D)
        g, cov_bar = _cov_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)
        return ConstantGaussianExpertsParams(mean=xp.sum(g, axis=1), cov=cov_bar)

    def log_density_input_vjp(self, params: ConstantGaussianExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""$\bar y_i = -\sum_k c_{ik}\,\Sigma_k^{-1}(y_i - \mu_k)$; ``x`` gets ``None`` (no dependence)."""
        xp = self._check(params, x, y)
        check_shape(cotangent, "cotangent", (x.shape[0], params.mean.shape[0]), what="like log_density")
        r = _as_2d_y(y, xp)[None, :, :] - params.mean[:, None, :]
        g, _ = _cov_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)
        return ExpertInputGrads(x=None, y=xp.reshape(-xp.sum(g, axis=0), y.shape))

    def mean(self, params: ConstantGaussianExpertsParams, x: Any) -> Any:
        r"""$E[y \mid x_i, k] = \mu_k$ broadcast to (N, K, D)."""
        xp = self._check(params, x)
        K, D = params.mean.shape
        return xp.broadcast_to(params.mean[None, :, :], (x.shape[0], K, D))

    def m_step(self, params: ConstantGaussianExpertsParams, x: Any, y: Any, weights: Any) -> ConstantGaussianExpertsParams:
        r"""Closed-form weighted ML: $\mu_k = \sum_i w_{ik} y_i / n_k$, then the covariance as in
        [`LinearGaussianExperts.m_step`][moeref.gaussian_experts.LinearGaussianExperts.m_step]
        (from centred residuals; flexmix factor $N/(N-1)$).

        Raises
        ------
        EmptyComponentError, CollapsedVarianceError
        """
        xp = self._check(params, x, y)
        K, D = params.mean.shape
        check_responsibilities(weights, x.shape[0], K)
        check_same_dtype({"y": y, "weights": weights})
        check_finite(y, "y")
        n_k = check_nonempty_components(weights, self.min_weight)  # (K,)
        y2 = _as_2d_y(y, xp)  # (N, D)
        mean = (xp.matrix_transpose(weights) @ y2) / n_k[:, None]  # (K, D)
        r = y2[None, :, :] - mean[:, None, :]  # (K, N, D)
        cov = _cov_mle(
            self.covariance, r, weights, tied=self.tied, factor=self._factor(y2.shape[0], 1),
            min_sigma=self.min_sigma, xp=xp,
        )
        return ConstantGaussianExpertsParams(mean=mean, cov=cov)

    def n_free_parameters(self, params: ConstantGaussianExpertsParams) -> int:
        r"""$K D$ means plus $K'$ covariances ($D(D+1)/2$, $D$ or 1 entries each)."""
        K, D = params.mean.shape
        return K * D + (1 if self.tied else K) * _cov_count(self.covariance, D)

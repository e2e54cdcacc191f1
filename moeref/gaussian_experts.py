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
  need not increase the likelihood. ``variance="fixed"`` does not estimate the covariance: the
  M-step keeps ``params.cov`` as given, it counts no free parameter, and gradient ascent does not
  move it. That is the model of Jacobs, Jordan, Nowlan & Hinton (1991), whose error function
  (their eq. (1.3)) is the mixture log-likelihood with $\Sigma_k = I$; it is also the only
  well-posed choice for one-hot classification targets, whose ML covariance collapses to 0 as soon
  as an expert owns a single class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import array_namespace
from .em import check_nonempty_components, check_nonnegative_float
from .families import ExpertInputGrads
from .gaussian_covariance import (
    COVARIANCE_STRUCTURES,
    _residual_log_density,
    _residual_log_density_vjp,
    _weighted_cov_mle,
    check_cov,
    cov_constrained,
    cov_constrained_vjp,
    cov_count,
    cov_from_matrices,
    cov_matrices,
    cov_unconstrained,
)
from .validation import (
    check_cotangent,
    check_responsibilities,
    check_choice,
    check_finite,
    check_float_array,
    check_record_type,
    check_same_dtype,
    check_shape,
)
from .weighted_lstsq import _design_matrix, _weighted_least_squares, split_coefficients

__all__ = [
    "EXPERT_COVARIANCE_TYPES",
    "VARIANCE_CONVENTIONS",
    "ExpertInputGrads",
    "LinearGaussianExpertsParams",
    "LinearGaussianExperts",
    "ConstantGaussianExpertsParams",
    "ConstantGaussianExperts",
]

EXPERT_COVARIANCE_TYPES: tuple[str, ...] = COVARIANCE_STRUCTURES
"""Covariance structures of the Gaussian expert families (see the module conventions and
[`moeref.gaussian_covariance`][moeref.gaussian_covariance], which stores and fits them)."""

VARIANCE_CONVENTIONS: tuple[str, ...] = ("ml", "flexmix", "fixed")
r"""``"ml"``: maximum likelihood; ``"flexmix"``: ML times $N/(N-p)$, as flexmix's ``FLXMRglm``;
``"fixed"``: not estimated (``params.cov`` kept, e.g. $\Sigma_k = I$ as in Jacobs et al. 1991)."""


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
# Private helpers
# --------------------------------------------------------------------------------------------


def _as_2d_y(y: Any, xp: Any) -> Any:
    """``(N,) -> (N, 1)``; ``(N, D)`` unchanged."""
    return xp.reshape(y, (y.shape[0], 1)) if y.ndim == 1 else y


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
        check_nonnegative_float(self.min_weight, "min_weight")
        check_nonnegative_float(self.min_sigma, "min_sigma")

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
        array_namespace(params.cov, names=("params.cov",))  # a clear error for a non-array
        D = params[0].shape[-1]
        return cov_matrices(self.covariance, params.cov, D)

    def cov_from_matrices(self, covariance: Any) -> Any:
        r"""The stored ``cov`` field for covariance matrices $\Sigma_k$, shape (K', D, D).

        Full: the lower Cholesky factor; diagonal: the diagonals; isotropic: $\operatorname{tr}(\Sigma_k)/D$
        (the nearest isotropic matrix in Frobenius norm).
        """
        array_namespace(covariance, names=("covariance",))  # a clear error for a non-array
        return cov_from_matrices(self.covariance, covariance, name="covariance")

    # ---------------------------------------------------------------- unconstrained view

    def unconstrained(self, params: Any) -> Any:
        r"""The record with ``cov`` replaced by an unconstrained form (for gradient ascent).

        Full: $L_k$ with its diagonal replaced by $\log L_{k,jj}$ (the log-Cholesky
        parameterisation of Pinheiro & Bates (1996), "Unconstrained parametrizations for
        variance-covariance matrices", Statistics and Computing 6:289-296, doi:10.1007/BF00140873);
        diagonal / isotropic: $\log v$.
        """
        array_namespace(params.cov, names=("params.cov",))  # a clear error for a non-array
        return params._replace(cov=cov_unconstrained(self.covariance, params.cov))

    def constrained(self, free: Any) -> Any:
        r"""Inverse of [`unconstrained`][moeref.gaussian_experts.LinearGaussianExperts.unconstrained]."""
        array_namespace(free.cov, names=("free.cov",))  # a clear error for a non-array
        return free._replace(cov=cov_constrained(self.covariance, free.cov))

    def constrained_vjp(self, free: Any, params_bar: Any) -> Any:
        r"""Chain rule through ``constrained``: $\overline{\log v} = v\,\bar v$ and, for a full
        covariance, $\overline{\log L_{jj}} = L_{jj}\bar L_{jj}$ (off-diagonal entries unchanged);
        0 under ``variance="fixed"`` (the covariance is a constant, not a parameter)."""
        xp = array_namespace(free.cov, params_bar.cov, names=("free.cov", "params_bar.cov"))
        if self.variance == "fixed":  # a constant: no cotangent flows to it, gradient ascent keeps it
            return params_bar._replace(cov=xp.zeros_like(free.cov))
        return params_bar._replace(cov=cov_constrained_vjp(self.covariance, free.cov, params_bar.cov))

    def _n_cov_parameters(self, K: int, D: int) -> int:
        """Free covariance entries: $K'$ covariances of `cov_count` entries, none when fixed."""
        if self.variance == "fixed":
            return 0
        return (1 if self.tied else K) * cov_count(self.covariance, D)

    def _m_step_cov(self, params: Any, r: Any, weights: Any, N: int, p: int) -> Any:
        """The M-step's covariance: ``params.cov`` when fixed, else the weighted ML (times the flexmix factor)."""
        if self.variance == "fixed":
            return params.cov
        return _weighted_cov_mle(self.covariance, r, weights, self.tied, self._factor(N, p), self.min_sigma, array_namespace(r))

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
    variance : {"ml", "flexmix", "fixed"}
        ``"ml"``: maximum-likelihood covariance (default; mixtools, meteorits). ``"flexmix"``: ML
        times $N/(N-p)$ (flexmix ``FLXMRglm``). ``"fixed"``: ``params.cov`` is kept (Jacobs et al.
        1991 fix $\Sigma_k = I$).
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
        check_cov(params.cov, self.covariance, 1 if self.tied else K, D, "params.cov")
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
        return xp.matrix_transpose(_residual_log_density(self.covariance, params.cov, r, xp))  # (N, K)

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
        check_cotangent(cotangent, (x.shape[0], K), like=x, what="one entry per sample and expert, like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        r = self._residuals(params, x, y, xp)  # (K, N, D)
        g, cov_bar = _residual_log_density_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)  # (K, N, D)
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
        check_cotangent(cotangent, (x.shape[0], K), like=x, what="one entry per sample and expert, like log_density")
        r = self._residuals(params, x, y, xp)  # (K, N, D)
        g, _ = _residual_log_density_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)  # (K, N, D)
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
        design = _design_matrix(x, self.bias, xp)  # (N, p)
        y2 = _as_2d_y(y, xp)  # (N, D)
        theta = _weighted_least_squares(design, y2, weights, xp)  # (K, p, D)
        weight, bias = split_coefficients(theta, d, bias=self.bias)
        r = y2[None, :, :] - xp.matmul(design[None, :, :], theta)  # (K, N, D)
        cov = self._m_step_cov(params, r, weights, x.shape[0], design.shape[1])
        return LinearGaussianExpertsParams(weight=weight, bias=bias, cov=cov)

    def n_free_parameters(self, params: LinearGaussianExpertsParams) -> int:
        r"""$K D (d + 1)$ regression coefficients ($K D d$ without bias) plus $K'$ covariances of
        $D(D+1)/2$ (full), $D$ (diagonal) or 1 (isotropic) entries (none under ``variance="fixed"``)."""
        check_record_type(params, "params", LinearGaussianExpertsParams)
        check_float_array(params.weight, "params.weight", ndim=3)
        K, d, D = params.weight.shape
        return K * D * (d + (1 if self.bias else 0)) + self._n_cov_parameters(K, D)


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
        check_cov(params.cov, self.covariance, 1 if self.tied else K, D, "params.cov")
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
        return xp.matrix_transpose(_residual_log_density(self.covariance, params.cov, r, xp))

    def log_density_vjp(self, params: ConstantGaussianExpertsParams, x: Any, y: Any, cotangent: Any) -> ConstantGaussianExpertsParams:
        r"""VJP with respect to ``params``: $\bar\mu_k = \sum_i c_{ik}\,\Sigma_k^{-1}(y_i - \mu_k)$ and
        the covariance cotangents of [`LinearGaussianExperts.log_density_vjp`][moeref.gaussian_experts.LinearGaussianExperts.log_density_vjp]."""
        xp = self._check(params, x, y)
        check_cotangent(cotangent, (x.shape[0], params.mean.shape[0]), like=x, what="like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        r = _as_2d_y(y, xp)[None, :, :] - params.mean[:, None, :]  # (K, N, D)
        g, cov_bar = _residual_log_density_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)
        return ConstantGaussianExpertsParams(mean=xp.sum(g, axis=1), cov=cov_bar)

    def log_density_input_vjp(self, params: ConstantGaussianExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""$\bar y_i = -\sum_k c_{ik}\,\Sigma_k^{-1}(y_i - \mu_k)$; ``x`` gets ``None`` (no dependence)."""
        xp = self._check(params, x, y)
        check_cotangent(cotangent, (x.shape[0], params.mean.shape[0]), like=x, what="like log_density")
        r = _as_2d_y(y, xp)[None, :, :] - params.mean[:, None, :]
        g, _ = _residual_log_density_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)
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
        cov = self._m_step_cov(params, r, weights, y2.shape[0], 1)
        return ConstantGaussianExpertsParams(mean=mean, cov=cov)

    def n_free_parameters(self, params: ConstantGaussianExpertsParams) -> int:
        r"""$K D$ means plus $K'$ covariances ($D(D+1)/2$, $D$ or 1 entries each; none under ``variance="fixed"``)."""
        check_record_type(params, "params", ConstantGaussianExpertsParams)
        check_float_array(params.mean, "params.mean", ndim=2)
        K, D = params.mean.shape
        return K * D + self._n_cov_parameters(K, D)

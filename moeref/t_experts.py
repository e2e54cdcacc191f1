r"""Student-t linear experts: the robust mixture of experts (TMoE) of Chamroukhi (2016).

$$p_k(y \mid x) = t\big(y;\ \mu_k(x),\ \sigma_k^2,\ \nu_k\big)
= \frac{\Gamma\big(\frac{\nu_k+1}{2}\big)}{\Gamma\big(\frac{\nu_k}{2}\big)\sqrt{\pi\nu_k}\,\sigma_k}
\Big(1 + \frac{d_k^2}{\nu_k}\Big)^{-\frac{\nu_k+1}{2}},
\qquad d_k = \frac{y - \mu_k(x)}{\sigma_k},\quad \mu_k(x) = x^\top\beta_k + c_k,$$

Chamroukhi (2016), "Robust mixture of experts modeling using the $t$ distribution", Neural Networks
79:20-36, doi:10.1016/j.neunet.2016.03.002, arXiv:1701.07429. A $t$ expert is a scale mixture of
normals, $y \mid u \sim \mathcal N(\mu_k(x), \sigma_k^2/u)$ with $u \sim \mathrm{Gamma}(\nu_k/2, \nu_k/2)$,
so EM sees the latent precision weights $u$ as extra missing data: an outlier gets a small
$E[u \mid y]$ and little say in the regression.

The ECM / ECME M-step
---------------------
The [`ExpertFamily`][moeref.families.ExpertFamily] ``m_step`` receives only the responsibilities
$\tau_{ik}$; the $t$-specific E-step quantity is computed inside it from the **current** parameters
$\theta^{(t)}$ (``params``), which makes one ``m_step`` call one cycle of the ECM algorithm of Meng &
Rubin (1993), "Maximum likelihood estimation via the ECM algorithm: a general framework",
Biometrika 80(2):267-278, doi:10.1093/biomet/80.2.267:

1. E-step (latent scales): $u_{ik} = E[U \mid y_i, z_i = k] = \dfrac{\nu_k + 1}{\nu_k + d_{ik}^2}$ at $\theta^{(t)}$.
2. CM-step 1: $\beta_k, c_k$ by weighted least squares with weights $\tau_{ik}u_{ik}$, then
   $\sigma_k^2 = \sum_i \tau_{ik}u_{ik}(y_i - \mu_k(x_i))^2 / \sum_i \tau_{ik}$.
3. CM-step 2 (degrees of freedom, for **every** expert $k$ at once): with
   ``algorithm="ECM"``, refresh $u_{ik}$ at the new $\beta_k, \sigma_k$ and the current $\nu_k$
   (as Chamroukhi's TMoE MATLAB code ``learn_univ_TMoE_EM.m`` does: a partial E-step, which keeps the
   algorithm monotone) and solve for $\nu_k$

   $$-\psi\Big(\frac{\nu_k}{2}\Big) + \log\Big(\frac{\nu_k}{2}\Big) + 1
   + \frac{1}{n_k}\sum_i \tau_{ik}\big(\log u_{ik} - u_{ik}\big)
   + \psi\Big(\frac{\nu_k^{(t)} + 1}{2}\Big) - \log\Big(\frac{\nu_k^{(t)} + 1}{2}\Big) = 0,$$

   $n_k = \sum_i\tau_{ik}$ (the left side decreases in $\nu_k$: one root, or a bound);
   with ``algorithm="ECME"`` (Liu & Rubin 1994, "The ECME algorithm: a simple extension of EM and
   ECM with faster monotone convergence", Biometrika 81(4):633-648, doi:10.1093/biomet/81.4.633)
   maximise the **observed-data** weighted log-likelihood $\sum_i \tau_{ik}\log t(y_i; \mu_k,
   \sigma_k^2, \nu_k)$ over $\nu_k$ directly: the same equation with $u_{ik}$ a function of the
   unknown $\nu_k$, $u_{ik}(\nu) = (\nu+1)/(\nu + d_{ik}^2)$, in both places where the ECM
   equation uses $\nu_k^{(t)}$. ECME usually needs fewer iterations; it may have several roots,
   so moeref keeps the bisection's root only if it beats the current $\nu_k$.

Both roots are found by bisection on $\log\nu$ over $[\nu_{\min}, \nu_{\max}]$ with a fixed number
of steps, vectorised over the experts (no data-dependent loop); a root outside the bracket gives the
bound. ``fix_nu=True`` keeps $\nu$ fixed (then the family is a $t$ regression with known degrees of
freedom).

Known bug elsewhere: in the R package meteorits (``ParamTMoE$MStep``, since the field ``nuk`` was
renamed ``nu``) the root function is written ``function(nuk) ... psigamma((nuk[k] + 1) / 2) ...``;
inside it ``nuk`` is the scalar argument, so ``nuk[k]`` is ``NA`` for every $k \ge 2$,
``pracma::fzero`` fails, ``try(..., silent = TRUE)`` hides the error, and **only the first
expert's $\nu$ is ever updated** (for $k = 1$ the equation also uses the candidate $\nu$ where the
current one belongs). moeref updates every $\nu_k$ and tests it.

Special functions: the array API has no digamma or log-gamma, so
[`digamma`][moeref.special.digamma] and [`lgamma`][moeref.special.lgamma] are computed
here in pure array-API code (recurrence up to $x \ge 10$, then the asymptotic series).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import array_namespace, device_of
from .em import CollapsedVarianceError, check_nonempty_components, check_nonnegative_float, first_true
from .special import digamma, lgamma
from .families import ExpertInputGrads
from .weighted_lstsq import _design_matrix, _weighted_least_squares, split_coefficients
from .validation import (
    check_cotangent,
    check_responsibilities,
    check_choice,
    check_finite,
    check_float_array,
    check_positive_int,
    check_same_dtype,
    check_shape,
    concrete_bool,
)

__all__ = ["T_ALGORITHMS", "LinearTExpertsParams", "LinearTExperts"]

T_ALGORITHMS: tuple[str, ...] = ("ECM", "ECME")
"""Degrees-of-freedom updates of [`LinearTExperts`][moeref.t_experts.LinearTExperts]."""

# ----------------------------------------------------------------------------------------------
# digamma and log-gamma in pure array-API code
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# The family
# ----------------------------------------------------------------------------------------------


class LinearTExpertsParams(NamedTuple):
    r"""Parameters of $K$ Student-$t$ linear experts.

    Attributes
    ----------
    weight : array, shape (K, d)
        Row $k$ is $\beta_k$.
    bias : array, shape (K,)
        $c_k$ (zeros, not fitted, under ``bias=False``).
    sigma : array, shape (K,)
        Scale $\sigma_k > 0$ (not the standard deviation: $\operatorname{Var}(y \mid x, k) =
        \sigma_k^2\nu_k/(\nu_k - 2)$ for $\nu_k > 2$). meteorits and tMoE_m store $\sigma_k^2$.
    nu : array, shape (K,)
        Degrees of freedom $\nu_k > 0$.
    """

    weight: Any
    bias: Any
    sigma: Any
    nu: Any


def _t_logpdf(r: Any, sigma: Any, nu: Any, xp: Any) -> Any:
    """log t(r; 0, sigma^2, nu) for residuals (N, K) and per-expert sigma, nu (K,)."""
    d2 = (r / sigma) ** 2
    const = lgamma(0.5 * (nu + 1.0)) - lgamma(0.5 * nu) - 0.5 * xp.log(math.pi * nu) - xp.log(sigma)  # (K,)
    return const - 0.5 * (nu + 1.0) * xp.log1p(d2 / nu)


def _nu_score(nu: Any, d2: Any, xp: Any) -> Any:
    r"""$2\,\partial\log t/\partial\nu = \psi(\frac{\nu+1}2) - \psi(\frac\nu2) - \log(1 + d^2/\nu) + \frac{d^2 - 1}{\nu + d^2}$."""
    return digamma(0.5 * (nu + 1.0)) - digamma(0.5 * nu) - xp.log1p(d2 / nu) + (d2 - 1.0) / (nu + d2)


@dataclass(frozen=True)
class LinearTExperts:
    r"""$K$ Student-$t$ linear experts $y \mid x, k \sim t(x^\top\beta_k + c_k, \sigma_k^2, \nu_k)$.

    $$\log p_k(y_i \mid x_i) = \log\Gamma\Big(\frac{\nu_k+1}{2}\Big) - \log\Gamma\Big(\frac{\nu_k}{2}\Big)
    - \frac12\log(\pi\nu_k) - \log\sigma_k - \frac{\nu_k+1}{2}\log\Big(1 + \frac{d_{ik}^2}{\nu_k}\Big)$$

    (Chamroukhi 2016, doi:10.1016/j.neunet.2016.03.002, arXiv:1701.07429; the ECM / ECME M-step is
    described in the module notes).

    Attributes
    ----------
    algorithm : {"ECM", "ECME"}
        Update of $\nu_k$: the ECM conditional maximisation of the complete-data expectation, or
        the ECME maximisation of the observed-data weighted log-likelihood.
    fix_nu : bool
        Keep $\nu$ at ``params.nu`` (not counted as free parameters).
    nu_min, nu_max : float
        Bracket of the degrees of freedom ($0 < \nu_{\min} < \nu_{\max}$); a root outside it gives
        the bound (near-normal data push $\hat\nu \to \infty$, i.e. to ``nu_max``).
    nu_iterations : int
        Bisection steps on $\log\nu$ (60 halve the default bracket below float64 resolution).
    bias : bool
        Fit the intercept $c_k$ (``x`` has no column of ones).
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] threshold on $\sum_i\tau_{ik}/N$.
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] threshold on the fitted $\sigma_k$.
    name : str

    Notes
    -----
    The VJP with respect to $\nu_k$ uses [`digamma`][moeref.special.digamma]; ``lgamma`` of
    large arguments loses about $\varepsilon\,\nu\log\nu$ absolutely to cancellation in
    $\log\Gamma(\frac{\nu+1}2) - \log\Gamma(\frac\nu2)$ ($< 10^{-12}$ for $\nu \le 10^3$).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.t_experts import LinearTExperts, LinearTExpertsParams
    >>> p = LinearTExpertsParams(np.zeros((1, 1)), np.zeros(1), np.ones(1), np.ones(1))
    >>> round(float(LinearTExperts().log_density(p, np.zeros((1, 1)), np.zeros(1))[0, 0]), 12)  # Cauchy: -log(pi)
    -1.144729885849
    """

    algorithm: str = "ECM"
    fix_nu: bool = False
    nu_min: float = 1e-2
    nu_max: float = 1e3
    nu_iterations: int = 60
    bias: bool = True
    min_weight: float = 1e-8
    min_sigma: float = 1e-8
    name: str = "linear_t"

    def __post_init__(self) -> None:
        check_choice(self.algorithm, "algorithm", T_ALGORITHMS)
        for flag in ("fix_nu", "bias"):
            v = getattr(self, flag)
            if not isinstance(v, bool):
                raise TypeError(f"{flag} must be a bool, got {type(v).__name__} {v!r}")
        for bound in ("nu_min", "nu_max"):
            v = getattr(self, bound)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ValueError(f"{bound} must be a finite positive float, got {v!r}")
        if not self.nu_min < self.nu_max:
            raise ValueError(f"nu_min must be below nu_max, got nu_min={self.nu_min!r}, nu_max={self.nu_max!r}")
        check_positive_int(self.nu_iterations, "nu_iterations")
        check_nonnegative_float(self.min_weight, "min_weight")
        check_nonnegative_float(self.min_sigma, "min_sigma")

    # ---------------------------------------------------------------- checks

    def _check(self, params: Any, x: Any, y: Any = None) -> Any:
        if not isinstance(params, LinearTExpertsParams):
            raise TypeError(f"params must be a LinearTExpertsParams(weight, bias, sigma, nu), got {type(params).__name__}")
        named = {
            "x": x, "y": y, "params.weight": params.weight, "params.bias": params.bias,
            "params.sigma": params.sigma, "params.nu": params.nu,
        }
        named = {k: v for k, v in named.items() if v is not None}
        xp = array_namespace(*named.values(), names=tuple(named))
        check_float_array(x, "x", ndim=2)
        N, d = x.shape
        check_float_array(params.weight, "params.weight", ndim=2)
        K = params.weight.shape[0]
        check_shape(params.weight, "params.weight", (K, d), what=f"x has d={d} features")
        for name in ("params.bias", "params.sigma", "params.nu"):
            check_float_array(named[name], name, ndim=1)
            check_shape(named[name], name, (K,), what=f"params.weight holds K={K} experts")
        if y is not None:
            check_float_array(y, "y", ndim=(1, 2))
            check_shape(y, "y", (N,) if y.ndim == 1 else (N, 1), what=f"x has N={N} rows; t experts have one output")
        check_same_dtype(named)
        for name in ("params.weight", "params.bias", "params.sigma", "params.nu"):
            check_finite(named[name], name)
        if concrete_bool(xp.all(params.sigma > 0)) is False:
            raise ValueError("params.sigma must be positive (scales)")
        if concrete_bool(xp.all(params.nu > 0)) is False:
            raise ValueError("params.nu must be positive (degrees of freedom)")
        return xp

    @staticmethod
    def _residuals(weight: Any, bias: Any, x: Any, y: Any, xp: Any) -> Any:
        return xp.reshape(y, (y.shape[0],))[:, None] - (x @ xp.matrix_transpose(weight) + bias)  # (N, K)

    # ---------------------------------------------------------------- forward and VJPs

    def log_density(self, params: LinearTExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log t(y_i; x_i^\top\beta_k + c_k, \sigma_k^2, \nu_k)$, shape (N, K).

        Parameters
        ----------
        params : LinearTExpertsParams
        x : array, shape (N, d)
        y : array, shape (N,) or (N, 1)

        Returns
        -------
        array, shape (N, K)

        Notes
        -----
        $\log(1 + d^2/\nu)$ is computed with ``log1p``, so large $\nu$ (near-normal experts) keep
        full precision in the tail term.
        """
        xp = self._check(params, x, y)
        r = self._residuals(params.weight, params.bias, x, y, xp)
        return _t_logpdf(r, params.sigma, params.nu, xp)

    def _grads(self, params: Any, x: Any, y: Any, cotangent: Any, xp: Any) -> tuple[Any, Any, Any]:
        r = self._residuals(params.weight, params.bias, x, y, xp)  # (N, K)
        s, nu = params.sigma, params.nu
        d2 = (r / s) ** 2
        u = (nu + 1.0) / (nu + d2)  # (N, K)
        g = cotangent * u * r / (s * s)  # (N, K): cotangent of the mean
        s_bar = xp.sum(cotangent * (u * d2 - 1.0) / s, axis=0)  # (K,)
        nu_bar = 0.5 * xp.sum(cotangent * _nu_score(nu, d2, xp), axis=0)  # (K,)
        return g, s_bar, nu_bar

    def log_density_vjp(self, params: LinearTExpertsParams, x: Any, y: Any, cotangent: Any) -> LinearTExpertsParams:
        r"""VJP of ``log_density`` with respect to ``params``.

        With $u_{ik} = (\nu_k+1)/(\nu_k + d_{ik}^2)$ and $g_{ik} = c_{ik}u_{ik}r_{ik}/\sigma_k^2$:

        $$\bar\beta_k = \sum_i g_{ik}x_i,\quad \bar c_k = \sum_i g_{ik},\quad
        \bar\sigma_k = \sum_i c_{ik}\frac{u_{ik}d_{ik}^2 - 1}{\sigma_k},$$

        $$\bar\nu_k = \frac12\sum_i c_{ik}\Big[\psi\Big(\frac{\nu_k+1}2\Big) - \psi\Big(\frac{\nu_k}2\Big)
        - \log\Big(1 + \frac{d_{ik}^2}{\nu_k}\Big) + \frac{d_{ik}^2 - 1}{\nu_k + d_{ik}^2}\Big].$$

        Parameters
        ----------
        cotangent : array, shape (N, K)
        """
        xp = self._check(params, x, y)
        check_cotangent(cotangent, (x.shape[0], params.weight.shape[0]), like=x, what="like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        g, s_bar, nu_bar = self._grads(params, x, y, cotangent, xp)
        b_bar = xp.sum(g, axis=0) if self.bias else xp.zeros_like(params.bias)
        return LinearTExpertsParams(weight=xp.matrix_transpose(g) @ x, bias=b_bar, sigma=s_bar, nu=nu_bar)

    def log_density_input_vjp(self, params: LinearTExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""$\bar x_i = \sum_k g_{ik}\beta_k$, $\bar y_i = -\sum_k g_{ik}$ (``y.shape`` kept)."""
        xp = self._check(params, x, y)
        check_cotangent(cotangent, (x.shape[0], params.weight.shape[0]), like=x, what="like log_density")
        g, _, _ = self._grads(params, x, y, cotangent, xp)
        return ExpertInputGrads(x=g @ params.weight, y=xp.reshape(-xp.sum(g, axis=1), y.shape))

    def mean(self, params: LinearTExpertsParams, x: Any) -> Any:
        r"""Location $x_i^\top\beta_k + c_k$, shape (N, K, 1) (the mean when $\nu_k > 1$)."""
        xp = self._check(params, x)
        return (x @ xp.matrix_transpose(params.weight) + params.bias)[:, :, None]

    def latent_scale_weights(self, params: LinearTExpertsParams, x: Any, y: Any) -> Any:
        r"""$u_{ik} = E[U \mid y_i, z_i = k] = (\nu_k + 1)/(\nu_k + d_{ik}^2)$, shape (N, K):
        the weight an observation gets in expert $k$'s regression (small for outliers)."""
        xp = self._check(params, x, y)
        r = self._residuals(params.weight, params.bias, x, y, xp)
        return (params.nu + 1.0) / (params.nu + (r / params.sigma) ** 2)

    # ---------------------------------------------------------------- M-step

    def _bisect(self, f: Any, K: int, like: Any, xp: Any) -> Any:
        """Root of a per-expert function decreasing through 0 (positive below the root) on
        [nu_min, nu_max], by bisection on log(nu); a root outside gives the bound."""
        lo = xp.full((K,), math.log(self.nu_min), dtype=like.dtype, device=device_of(like))
        hi = xp.full((K,), math.log(self.nu_max), dtype=like.dtype, device=device_of(like))
        for _ in range(self.nu_iterations):
            mid = 0.5 * (lo + hi)
            above = f(xp.exp(mid)) > 0  # root is above mid
            lo = xp.where(above, mid, lo)
            hi = xp.where(above, hi, mid)
        return xp.exp(0.5 * (lo + hi))

    def m_step(self, params: LinearTExpertsParams, x: Any, y: Any, weights: Any) -> LinearTExpertsParams:
        r"""One ECM (or ECME) cycle of the weighted $t$ likelihood from the current ``params``.

        See the module notes: $u_{ik}$ at ``params``; weighted least squares with weights
        $\tau_{ik}u_{ik}$; $\sigma_k^2 = \sum_i\tau_{ik}u_{ik}r_{ik}^2/\sum_i\tau_{ik}$; then every
        $\nu_k$ by bisection (unless ``fix_nu``). Each call increases (never decreases)
        $\sum_{i,k}\tau_{ik}\log p_k(y_i \mid x_i)$; repeated calls with the same weights converge to
        its maximiser.

        Parameters
        ----------
        params : LinearTExpertsParams
            Current value $\theta^{(t)}$ (the E-step of the latent scales is taken there).
        x : array, shape (N, d)
        y : array, shape (N,) or (N, 1)
        weights : array, shape (N, K)
            Responsibilities $\tau_{ik}$.

        Returns
        -------
        LinearTExpertsParams

        Raises
        ------
        EmptyComponentError, SingularWeightedLeastSquaresError, CollapsedVarianceError
        """
        xp = self._check(params, x, y)
        K, d = params.weight.shape
        check_responsibilities(weights, x.shape[0], K)
        check_same_dtype({"x": x, "weights": weights})
        check_finite(x, "x")
        check_finite(y, "y")
        n_k = check_nonempty_components(weights, self.min_weight)  # (K,)
        nu0 = params.nu
        # E-step of the latent scales at theta^(t)
        r0 = self._residuals(params.weight, params.bias, x, y, xp)  # (N, K)
        u = (nu0 + 1.0) / (nu0 + (r0 / params.sigma) ** 2)  # (N, K)
        # CM-step 1: weighted least squares with tau * u, then sigma
        design = _design_matrix(x, self.bias, xp)
        y1 = xp.reshape(y, (y.shape[0],))
        theta = _weighted_least_squares(design, y1[:, None], weights * u, xp)  # (K, p, 1)
        weight, bias = split_coefficients(theta, d, bias=self.bias)
        weight, bias = weight[:, :, 0], bias[:, 0]
        r = self._residuals(weight, bias, x, y, xp)  # (N, K)
        sigma = xp.sqrt(xp.sum(weights * u * r * r, axis=0) / n_k)  # (K,)
        collapsed = sigma < self.min_sigma
        if concrete_bool(xp.any(collapsed)):
            k = first_true(collapsed)
            raise CollapsedVarianceError(
                f"expert {k} has sigma {float(sigma[k]):.3e} < min_sigma={self.min_sigma:g}: its regression passes "
                "through its weighted points and the likelihood is unbounded there"
            )
        if self.fix_nu:
            return LinearTExpertsParams(weight=weight, bias=bias, sigma=sigma, nu=nu0)
        d2 = (r / sigma) ** 2  # (N, K) at the new beta, sigma
        if self.algorithm == "ECM":
            u1 = (nu0 + 1.0) / (nu0 + d2)  # partial E-step at (beta_new, sigma_new, nu^(t))
            const = (
                xp.sum(weights * (xp.log(u1) - u1), axis=0) / n_k
                + digamma(0.5 * (nu0 + 1.0)) - xp.log(0.5 * (nu0 + 1.0)) + 1.0
            )  # (K,)

            def f(nu: Any) -> Any:
                return xp.log(0.5 * nu) - digamma(0.5 * nu) + const

            nu = self._bisect(f, K, sigma, xp)
        else:

            def f(nu: Any) -> Any:
                return xp.sum(weights * _nu_score(nu, d2, xp), axis=0)

            cand = self._bisect(f, K, sigma, xp)

            def objective(nu: Any) -> Any:
                return xp.sum(weights * _t_logpdf(r, sigma, nu, xp), axis=0)  # (K,)

            nu = xp.where(objective(cand) >= objective(nu0), cand, nu0)
        return LinearTExpertsParams(weight=weight, bias=bias, sigma=sigma, nu=nu)

    # ---------------------------------------------------------------- unconstrained view

    def unconstrained(self, params: LinearTExpertsParams) -> LinearTExpertsParams:
        r"""The record with $\log\sigma_k$ and $\log\nu_k$ in place of $\sigma_k, \nu_k$ (for gradient ascent)."""
        xp = array_namespace(params.sigma, params.nu, names=("params.sigma", "params.nu"))
        return params._replace(sigma=xp.log(params.sigma), nu=xp.log(params.nu))

    def constrained(self, free: LinearTExpertsParams) -> LinearTExpertsParams:
        r"""$\sigma_k = e^{\text{free.sigma}_k}$, $\nu_k = e^{\text{free.nu}_k}$."""
        xp = array_namespace(free.sigma, free.nu, names=("free.sigma", "free.nu"))
        return free._replace(sigma=xp.exp(free.sigma), nu=xp.exp(free.nu))

    def constrained_vjp(self, free: LinearTExpertsParams, params_bar: LinearTExpertsParams) -> LinearTExpertsParams:
        r"""$\overline{\log\sigma_k} = \sigma_k\bar\sigma_k$, $\overline{\log\nu_k} = \nu_k\bar\nu_k$
        (0 for $\nu$ when ``fix_nu``: gradient ascent then keeps $\nu$ fixed too)."""
        xp = array_namespace(free.sigma, free.nu, names=("free.sigma", "free.nu"))
        nu_bar = xp.zeros_like(free.nu) if self.fix_nu else params_bar.nu * xp.exp(free.nu)
        return params_bar._replace(sigma=params_bar.sigma * xp.exp(free.sigma), nu=nu_bar)

    def n_free_parameters(self, params: LinearTExpertsParams) -> int:
        r"""$K(d+1)$ coefficients ($Kd$ without bias), $K$ scales and $K$ degrees of freedom (none
        when ``fix_nu``)."""
        K, d = params.weight.shape
        return K * (d + (1 if self.bias else 0)) + K + (0 if self.fix_nu else K)

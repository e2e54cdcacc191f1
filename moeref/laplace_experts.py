r"""Laplace linear experts: least-absolute-deviation regression experts for robust mixtures of experts.

$$p_k(y \mid x) = \frac{1}{\sqrt2\,\xi_k}\exp\!\Big(-\frac{\sqrt2\,\lvert y - x^\top\beta_k - c_k\rvert}{\xi_k}\Big),$$

the experts of Nguyen & McLachlan (2016), "Laplace mixture of linear experts", Computational
Statistics & Data Analysis 93:177-191, doi:10.1016/j.csda.2014.10.016. A Laplace error has heavier
tails than a normal one, so an outlier pulls a Laplace expert's regression line less: its weighted
maximum-likelihood fit is a weighted least-absolute-deviations (LAD) fit, a weighted median
regression, instead of weighted least squares.

Parameterisation
----------------
$\xi_k$ is the **standard deviation** of the Laplace error ($\operatorname{Var} = \xi_k^2$); the
usual scale is $b_k = \xi_k/\sqrt2$, $p_k = \frac{1}{2b_k}e^{-\lvert r\rvert/b_k}$ (``scipy.stats.laplace(scale=b)``).
This is the parameterisation of the Laplace mixture of regressions of Song, Yao & Xing (2014),
"Robust mixture regression model fitting by Laplace distribution", Computational Statistics & Data
Analysis 71:128-137, doi:10.1016/j.csda.2013.06.022, on which Nguyen & McLachlan build (its R
implementations, ``RobMixReg::denLp`` and ``MixSemiRob::mixregLap``, evaluate
``exp(-sqrt(2) * abs(r) / sig) / (sqrt(2) * sig)`` and report ``sig`` as the component standard
deviation). We could not read Nguyen & McLachlan's own display of the density with the tools at
hand; ``scale="b"`` switches the stored parameter to $b_k$ if a comparison needs it.

M-step: the MM algorithm
------------------------
Given weights $w_{ik}$, the weighted log-likelihood of expert $k$ is
$-n_k\log(\sqrt2\,\xi_k) - \frac{\sqrt2}{\xi_k}\sum_i w_{ik}\lvert r_{ik}\rvert$. Its maximiser in
$\beta_k$ does not depend on $\xi_k$: a weighted LAD fit, which has no closed form. Nguyen &
McLachlan's MM algorithm minorises the log-likelihood with the quadratic majoriser of the absolute
value at the current residual $r^{(t)}_{ik}$ (the construction of Hunter & Lange (2000), "Quantile
regression via an MM algorithm", Journal of Computational and Graphical Statistics 9(1):60-77,
doi:10.1080/10618600.2000.10474866),

$$\lvert r\rvert \le \frac{r^2}{2\lvert r^{(t)}\rvert} + \frac{\lvert r^{(t)}\rvert}{2},$$

so one MM step is a weighted least-squares fit with weights $w_{ik}/\lvert r^{(t)}_{ik}\rvert$
(iteratively reweighted least squares, IRLS), followed by the closed-form scale

$$\xi_k = \sqrt2\,\frac{\sum_i w_{ik}\lvert r_{ik}\rvert}{\sum_i w_{ik}}
\quad\Big(b_k = \frac{\sum_i w_{ik}\lvert r_{ik}\rvert}{\sum_i w_{ik}}\Big).$$

A residual that is exactly 0 (a LAD fit passes through $p$ of its points) would get an infinite
weight: moeref uses $w_{ik}/\max(\lvert r^{(t)}_{ik}\rvert, \epsilon\,\xi_k)$, i.e. the MM step of
the Huber-smoothed absolute value $h(r) = r^2/(2\epsilon\xi_k) + \epsilon\xi_k/2$ for
$\lvert r\rvert < \epsilon\xi_k$, $\lvert r\rvert$ otherwise, which is within $\epsilon\xi_k/2$ of
$\lvert r\rvert$ (``eps``, relative to the expert's current scale, default $10^{-10}$).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import array_namespace
from .em import CollapsedVarianceError, check_nonempty_components, check_nonnegative_float, first_true
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

__all__ = ["LAPLACE_SCALES", "LinearLaplaceExpertsParams", "LinearLaplaceExperts"]

LAPLACE_SCALES: tuple[str, ...] = ("std", "b")
"""What ``params.scale`` holds: ``"std"``: $\\xi_k$, the standard deviation (default, Song et al. 2014);
``"b"``: the scale $b_k = \\xi_k/\\sqrt2$ of $\\frac1{2b}e^{-\\lvert r\\rvert/b}$."""


class LinearLaplaceExpertsParams(NamedTuple):
    r"""Parameters of $K$ Laplace linear experts.

    Attributes
    ----------
    weight : array, shape (K, d)
        Row $k$ is $\beta_k$.
    bias : array, shape (K,)
        $c_k$ (zeros, not fitted, under ``bias=False``).
    scale : array, shape (K,)
        $\xi_k$ (``scale="std"``) or $b_k = \xi_k/\sqrt2$ (``scale="b"``); positive.
    """

    weight: Any
    bias: Any
    scale: Any


def _constants(scale: str) -> tuple[float, float]:
    """``(a, c)`` with $\\log p = -\\log(a s) - c\\lvert r\\rvert / s$."""
    return (math.sqrt(2.0), math.sqrt(2.0)) if scale == "std" else (2.0, 1.0)


@dataclass(frozen=True)
class LinearLaplaceExperts:
    r"""$K$ Laplace linear experts $y \mid x, k \sim \mathrm{Laplace}(x^\top\beta_k + c_k, \xi_k)$.

    $$\log p_k(y_i \mid x_i) = -\log(\sqrt2\,\xi_k) - \frac{\sqrt2\,\lvert r_{ik}\rvert}{\xi_k},
    \qquad r_{ik} = y_i - x_i^\top\beta_k - c_k$$

    (Nguyen & McLachlan 2016, doi:10.1016/j.csda.2014.10.016; see the module notes for the
    parameterisation and the MM M-step).

    Attributes
    ----------
    scale : {"std", "b"}
        Meaning of ``params.scale``: the standard deviation $\xi_k$ or $b_k = \xi_k/\sqrt2$.
    bias : bool
        Fit the intercept $c_k$ (``x`` has no column of ones).
    mm_steps : int
        MM (IRLS) steps per ``m_step`` call, each followed by the scale update. 1 (default) is the
        MM algorithm of Nguyen & McLachlan, one minorise-maximise step per EM iteration; more steps
        move closer to the exact weighted LAD fit in each M-step.
    eps : float
        Residual floor of the IRLS weights, relative to the expert's current scale:
        $w_{ik}/\max(\lvert r_{ik}\rvert, \epsilon\,\xi_k)$.
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] when some $\sum_i w_{ik}$ <
        ``min_weight`` $\cdot N$.
    min_scale : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] when a fitted scale falls below it.
    name : str

    Notes
    -----
    * ``y`` has shape (N,) (or (N, 1)); ``mean`` returns (N, K, 1).
    * The gradient of $\lvert r\rvert$ at $r = 0$ is taken as 0 (``sign(0) = 0``), the midpoint of
      the subdifferential; away from a kink the VJP is exact.
    * Each MM step increases the (Huber-smoothed, see the module notes) weighted log-likelihood;
      with ``mm_steps`` large it converges to the weighted LAD fit, which is unique for data in
      general position.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.laplace_experts import LinearLaplaceExperts, LinearLaplaceExpertsParams
    >>> fam = LinearLaplaceExperts()
    >>> p = LinearLaplaceExpertsParams(np.zeros((1, 1)), np.zeros(1), np.ones(1))
    >>> round(float(fam.log_density(p, np.zeros((1, 1)), np.zeros(1))[0, 0]), 12)  # -log(sqrt 2)
    -0.34657359028
    """

    scale: str = "std"
    bias: bool = True
    mm_steps: int = 1
    eps: float = 1e-10
    min_weight: float = 1e-8
    min_scale: float = 1e-8
    name: str = "linear_laplace"

    def __post_init__(self) -> None:
        check_choice(self.scale, "scale", LAPLACE_SCALES)
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__} {self.bias!r}")
        check_positive_int(self.mm_steps, "mm_steps")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (0 < self.eps < 1):
            raise ValueError(f"eps must be a float in (0, 1), got {self.eps!r}")
        check_nonnegative_float(self.min_weight, "min_weight")
        check_nonnegative_float(self.min_scale, "min_scale")

    # ---------------------------------------------------------------- checks

    def _check(self, params: Any, x: Any, y: Any = None) -> Any:
        if not isinstance(params, LinearLaplaceExpertsParams):
            raise TypeError(f"params must be a LinearLaplaceExpertsParams(weight, bias, scale), got {type(params).__name__}")
        named = {"x": x, "y": y, "params.weight": params.weight, "params.bias": params.bias, "params.scale": params.scale}
        named = {k: v for k, v in named.items() if v is not None}
        xp = array_namespace(*named.values(), names=tuple(named))
        check_float_array(x, "x", ndim=2)
        N, d = x.shape
        check_float_array(params.weight, "params.weight", ndim=2)
        K = params.weight.shape[0]
        check_shape(params.weight, "params.weight", (K, d), what=f"x has d={d} features")
        check_float_array(params.bias, "params.bias", ndim=1)
        check_shape(params.bias, "params.bias", (K,), what=f"params.weight holds K={K} experts")
        check_float_array(params.scale, "params.scale", ndim=1)
        check_shape(params.scale, "params.scale", (K,), what=f"params.weight holds K={K} experts")
        if y is not None:
            check_float_array(y, "y", ndim=(1, 2))
            check_shape(y, "y", (N,) if y.ndim == 1 else (N, 1), what=f"x has N={N} rows; Laplace experts have one output")
        check_same_dtype(named)
        for name in ("params.weight", "params.bias", "params.scale"):
            check_finite(named[name], name)
        if concrete_bool(xp.all(params.scale > 0)) is False:
            raise ValueError("params.scale must be positive")
        return xp

    @staticmethod
    def _residuals(params: LinearLaplaceExpertsParams, x: Any, y: Any, xp: Any) -> Any:
        y1 = xp.reshape(y, (y.shape[0],))
        return y1[:, None] - (x @ xp.matrix_transpose(params.weight) + params.bias)  # (N, K)

    # ---------------------------------------------------------------- forward and VJPs

    def log_density(self, params: LinearLaplaceExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log p_k(y_i \mid x_i) = -\log(a\,s_k) - c\,\lvert r_{ik}\rvert/s_k$, shape (N, K).

        $(a, c) = (\sqrt2, \sqrt2)$ for $s = \xi$ (``scale="std"``), $(2, 1)$ for $s = b$.

        Parameters
        ----------
        params : LinearLaplaceExpertsParams
        x : array, shape (N, d)
        y : array, shape (N,) or (N, 1)

        Returns
        -------
        array, shape (N, K)
        """
        xp = self._check(params, x, y)
        a, c = _constants(self.scale)
        r = self._residuals(params, x, y, xp)  # (N, K)
        return -xp.log(a * params.scale) - c * xp.abs(r) / params.scale

    def log_density_vjp(self, params: LinearLaplaceExpertsParams, x: Any, y: Any, cotangent: Any) -> LinearLaplaceExpertsParams:
        r"""VJP of ``log_density`` with respect to ``params``.

        With $g_{ik} = c_{ik}\, c\,\operatorname{sign}(r_{ik})/s_k$ (the cotangent of the mean):

        $$\bar\beta_k = \sum_i g_{ik}\, x_i, \qquad \bar c_k = \sum_i g_{ik}, \qquad
        \bar s_k = \sum_i c_{ik}\Big(\frac{c\,\lvert r_{ik}\rvert}{s_k^2} - \frac1{s_k}\Big).$$

        Parameters
        ----------
        cotangent : array, shape (N, K)
        """
        xp = self._check(params, x, y)
        check_cotangent(cotangent, (x.shape[0], params.weight.shape[0]), like=x, what="like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        g, s_bar = self._grads(params, x, y, cotangent, xp)
        b_bar = xp.sum(g, axis=0) if self.bias else xp.zeros_like(params.bias)
        return LinearLaplaceExpertsParams(weight=xp.matrix_transpose(g) @ x, bias=b_bar, scale=s_bar)

    def _grads(self, params: Any, x: Any, y: Any, cotangent: Any, xp: Any) -> tuple[Any, Any]:
        _, c = _constants(self.scale)
        r = self._residuals(params, x, y, xp)  # (N, K)
        s = params.scale
        g = cotangent * (c * xp.sign(r) / s)  # (N, K)
        s_bar = xp.sum(cotangent * (c * xp.abs(r) / (s * s) - 1.0 / s), axis=0)  # (K,)
        return g, s_bar

    def log_density_input_vjp(self, params: LinearLaplaceExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""$\bar x_i = \sum_k g_{ik}\beta_k$, $\bar y_i = -\sum_k g_{ik}$ (``y.shape`` kept)."""
        xp = self._check(params, x, y)
        check_cotangent(cotangent, (x.shape[0], params.weight.shape[0]), like=x, what="like log_density")
        g, _ = self._grads(params, x, y, cotangent, xp)
        return ExpertInputGrads(x=g @ params.weight, y=xp.reshape(-xp.sum(g, axis=1), y.shape))

    def mean(self, params: LinearLaplaceExpertsParams, x: Any) -> Any:
        r"""$E[y \mid x_i, k] = x_i^\top\beta_k + c_k$ (also the median), shape (N, K, 1)."""
        xp = self._check(params, x)
        return (x @ xp.matrix_transpose(params.weight) + params.bias)[:, :, None]

    # ---------------------------------------------------------------- M-step

    def m_step(self, params: LinearLaplaceExpertsParams, x: Any, y: Any, weights: Any) -> LinearLaplaceExpertsParams:
        r"""``mm_steps`` MM steps of the weighted Laplace likelihood, starting from ``params``.

        Each step: IRLS weights $\omega_{ik} = w_{ik}/\max(\lvert r^{(t)}_{ik}\rvert, \epsilon s_k^{(t)})$,

        $$\begin{pmatrix}\beta_k\\ c_k\end{pmatrix} = (\tilde X^\top\Omega_k\tilde X)^{-1}\tilde X^\top\Omega_k y,
        \qquad \xi_k = \sqrt2\,\frac{\sum_i w_{ik}\lvert r_{ik}\rvert}{\sum_i w_{ik}}$$

        ($b_k = \xi_k/\sqrt2$ under ``scale="b"``), the MM algorithm of Nguyen & McLachlan (2016)
        (see the module notes).

        Parameters
        ----------
        params : LinearLaplaceExpertsParams
            The current value, the point of the first minorisation.
        x : array, shape (N, d)
        y : array, shape (N,) or (N, 1)
        weights : array, shape (N, K)

        Returns
        -------
        LinearLaplaceExpertsParams

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
        _, c = _constants(self.scale)
        design = _design_matrix(x, self.bias, xp)  # (N, p)
        y2 = xp.reshape(y, (y.shape[0], 1))  # (N, 1)
        current = params
        for _ in range(self.mm_steps):
            r = self._residuals(current, x, y, xp)  # (N, K)
            floor = self.eps * current.scale  # (K,)
            omega = weights / xp.maximum(xp.abs(r), floor)  # (N, K)
            theta = _weighted_least_squares(design, y2, omega, xp)  # (K, p, 1)
            weight, bias = split_coefficients(theta, d, bias=self.bias)  # (K, d, 1), (K, 1)
            weight, bias = weight[:, :, 0], bias[:, 0]
            r_new = xp.reshape(y, (y.shape[0],))[:, None] - (x @ xp.matrix_transpose(weight) + bias)  # (N, K)
            scale = c * xp.sum(weights * xp.abs(r_new), axis=0) / n_k  # (K,): sqrt2 * mean|r| (xi) or mean|r| (b)
            collapsed = scale < self.min_scale
            if concrete_bool(xp.any(collapsed)):
                k = first_true(collapsed)
                raise CollapsedVarianceError(
                    f"expert {k} has scale {float(scale[k]):.3e} < min_scale={self.min_scale:g}: its regression passes "
                    "through all of its weighted points and the likelihood is unbounded there"
                )
            current = LinearLaplaceExpertsParams(weight=weight, bias=bias, scale=scale)
        return current

    # ---------------------------------------------------------------- unconstrained view

    def unconstrained(self, params: LinearLaplaceExpertsParams) -> LinearLaplaceExpertsParams:
        r"""The record with ``scale`` replaced by $\log s_k$ (for gradient ascent)."""
        xp = array_namespace(params.scale, names=("params.scale",))
        return params._replace(scale=xp.log(params.scale))

    def constrained(self, free: LinearLaplaceExpertsParams) -> LinearLaplaceExpertsParams:
        r"""$s_k = \exp(\text{free.scale}_k)$."""
        xp = array_namespace(free.scale, names=("free.scale",))
        return free._replace(scale=xp.exp(free.scale))

    def constrained_vjp(self, free: LinearLaplaceExpertsParams, params_bar: LinearLaplaceExpertsParams) -> LinearLaplaceExpertsParams:
        r"""$\overline{\log s_k} = s_k\,\bar s_k$."""
        xp = array_namespace(free.scale, names=("free.scale",))
        return params_bar._replace(scale=params_bar.scale * xp.exp(free.scale))

    def n_free_parameters(self, params: LinearLaplaceExpertsParams) -> int:
        r"""$K(d + 1)$ coefficients ($Kd$ without bias) and $K$ scales."""
        K, d = params.weight.shape
        return K * (d + (1 if self.bias else 0)) + K

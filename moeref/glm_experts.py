r"""Generalised-linear-model experts: logistic, multinomial-logistic and Poisson regressions.

$$p_k(y \mid x) = h(y)\, \exp\!\big(y^\top \eta_k(x) - b(\eta_k(x))\big), \qquad \eta_k(x) = W_k^\top x + c_k,$$

the exponential-family expert networks of Jordan & Jacobs (1994), "Hierarchical mixtures of experts
and the EM algorithm", Neural Computation 6(2):181-214, doi:10.1162/neco.1994.6.2.181 (each expert a
generalised linear model with its canonical link), for three families:

| family | $y$ | $b(\eta)$ | $h(y)$ | mean $\mu = b'(\eta)$ |
|---|---|---|---|---|
| [`LogisticExperts`][moeref.glm_experts.LogisticExperts] | $\{0, 1\}$ (or soft, $[0, 1]$) | $\log(1 + e^\eta)$ | 1 | $\sigma(\eta)$ |
| [`MultinomialLogisticExperts`][moeref.glm_experts.MultinomialLogisticExperts] | one-hot (or soft) $C$-vector | $\log\sum_c e^{\eta_c}$ | 1 | $\operatorname{softmax}(\eta)$ |
| [`PoissonExperts`][moeref.glm_experts.PoissonExperts] | counts $\{0, 1, \dots\}$ | $e^\eta$ | $1/y!$ | $e^\eta$ |

Each family is an ``moeref.families.ExpertFamily``. Its M-step maximises the
responsibility-weighted log-likelihood of every expert $k$ separately,

$$\hat\theta_k = \arg\max_{\theta_k} \sum_{i=1}^N w_{ik} \log p_k(y_i \mid x_i; \theta_k)
\;-\; \frac{\rho}{2}\lVert\theta_k\rVert^2, \qquad \theta_k = (W_k, c_k),$$

a weighted GLM fit, by Newton's method with step halving: for a canonical link Newton's method is
Fisher scoring, the iteratively reweighted least squares of Nelder & Wedderburn (1972), "Generalized
linear models", JRSS A 135(3):370-384, doi:10.2307/2344614 (McCullagh & Nelder 1989, *Generalized
Linear Models*, 2nd ed., Chapman & Hall, doi:10.1007/978-1-4899-3242-6). For the multinomial-logistic expert the Newton step
uses the exact $(C-1)(d+1)$-dimensional Hessian, not the block-diagonal one-class-at-a-time
approximation of the IRLS inner loop of Jordan & Jacobs (1994): Chen, Xu & Chi (1999), "Improved
learning algorithms for mixture of experts in multiclass classification", Neural Networks
12(9):1229-1252, doi:10.1016/S0893-6080(99)00043-X, trace the instability of that inner loop to the
missing off-diagonal blocks and replace it by Newton-Raphson with the exact Hessian.

Conventions
-----------
* ``x`` is ``(N, d)`` **without** a column of ones; the intercept $c_k$ is the ``bias`` field
  (``bias=False`` fixes it at 0). This is the layout of
  ``moeref.gaussian_experts``.
* Logistic and Poisson experts: ``weight`` (K, d), ``bias`` (K,), ``y`` (N,) floating.
  Multinomial: ``weight`` (K, d, C), ``bias`` (K, C), ``y`` (N, C) one-hot or soft targets; integer
  labels are converted by the caller with [`class_targets`][moeref.glm_experts.class_targets].
  The **last** class $C - 1$ is the baseline: the M-step returns ``weight[:, :, C-1] = 0`` and
  ``bias[:, C-1] = 0`` (the ``"baseline"`` parametrisation of
  ``moeref.softmax_gate.fit_weighted_multinomial``, which it calls). R's
  ``nnet::multinom`` takes the *first* class as baseline: compare coefficients after subtracting
  column 0 from every column. ``log_density`` accepts any values in the baseline column (only
  differences between columns matter).
* Soft targets (``soft_targets=True``): the "log-density" is the cross-entropy
  $\sum_c y_c \log \mu_c$ (binary: $y\log\mu + (1-y)\log(1-\mu)$), which is a log-probability only
  for hard targets. Its score equations are those of a binomial (multinomial) GLM for observed
  proportions $y$, so the M-step fits e.g. success fractions or teacher probabilities.
* Poisson offset (``offset_column=True``): the **last** column of ``x`` is an offset $o_i$ (e.g. a
  log exposure $\log t_i$) entering $\eta$ with coefficient 1, $\eta_{ik} = o_i + W_k^\top x_i + c_k$;
  ``weight`` then has ``d - 1`` columns. flexmix's ``FLXMRglm(offset=)``.
* Ridge $\rho$ (``ridge``) penalises every fitted coefficient, intercepts included,
  $\frac\rho2(\lVert W_k\rVert^2 + \lVert c_k\rVert^2)$: the convention of
  ``moeref.softmax_gate``, under which the penalised maximiser always exists
  (also for an expert whose weighted targets are all of one class). With $\rho > 0$ EM maximises the
  penalised log-likelihood $L - \sum_k \text{penalty}_k$ (``penalty`` gives it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .core import array_namespace, device_of, log_softmax, log_softmax_vjp, one_hot, sigmoid, softmax, softplus
from .em import ConvergenceWarning, SingularWeightedLeastSquaresError, check_nonempty_components
from .em import SeparationWarning as _SeparationWarning
from .families import ExpertInputGrads
from .weighted_lstsq import _design_matrix
from .softmax_gate import fit_weighted_multinomial
from .special import lgamma
from .validation import (
    check_cotangent,
    check_responsibilities,
    check_finite,
    check_float_array,
    check_positive_int,
    check_same_dtype,
    check_shape,
    concrete_bool,
)

__all__ = [
    "SeparationWarning",
    "GLMInputGrads",
    "LogisticExpertsParams",
    "LogisticExperts",
    "PoissonExpertsParams",
    "PoissonExperts",
    "MultinomialLogisticExpertsParams",
    "MultinomialLogisticExperts",
    "class_targets",
]

# A Newton step that still moves the linear predictor by this much somewhere in the data after the
# objective has converged is the signature of a diverging MLE (separation).
_SEPARATION_ETA_STEP = 0.5


SeparationWarning = _SeparationWarning
"""[`moeref.em.SeparationWarning`][moeref.em.SeparationWarning], issued by the GLM experts' M-steps
with the index of the expert whose weighted fit is separated."""

GLMInputGrads = ExpertInputGrads
"""The cotangents of a GLM expert family's inputs: the record [`ExpertInputGrads`][moeref.families.ExpertInputGrads]
of every expert family, under its former name."""


class LogisticExpertsParams(NamedTuple):
    r"""Parameters of $K$ logistic-regression experts $P_k(y = 1 \mid x) = \sigma(W_k^\top x + c_k)$.

    Attributes
    ----------
    weight : array, shape (K, d)
        Row ``k`` is $W_k$.
    bias : array, shape (K,)
        $c_k$ (zeros, not fitted, under ``bias=False``).
    """

    weight: Any
    bias: Any


class PoissonExpertsParams(NamedTuple):
    r"""Parameters of $K$ Poisson-regression experts with rate $\mu_k(x) = \exp(W_k^\top x + c_k)$.

    Attributes
    ----------
    weight : array, shape (K, d)
        Row ``k`` is $W_k$ (``d`` excludes the offset column under ``offset_column=True``).
    bias : array, shape (K,)
        $c_k$ (zeros, not fitted, under ``bias=False``).
    """

    weight: Any
    bias: Any


class MultinomialLogisticExpertsParams(NamedTuple):
    r"""Parameters of $K$ multinomial-logistic experts $P_k(c \mid x) = \operatorname{softmax}_c(W_k^\top x + c_k)$.

    Attributes
    ----------
    weight : array, shape (K, d, C)
        ``weight[k, :, c]`` is $W_{kc}$ (the M-step returns the baseline column ``c = C - 1`` as 0).
    bias : array, shape (K, C)
        $c_{kc}$ (``bias[:, C - 1] = 0`` after an M-step).
    """

    weight: Any
    bias: Any


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _check_option_float(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return float(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _first(flags: Any, K: int) -> int:
    return next(k for k in range(K) if concrete_bool(flags[k]))








def _check_gram(design: Any, weights: Any, penalty: Any, xp: Any) -> None:
    r"""Raise `SingularWeightedLeastSquaresError` when some $X^\top \Omega_k X + \operatorname{diag}(\rho)$ is singular."""
    p = design.shape[1]
    K = weights.shape[1]
    gram = (xp.matrix_transpose(weights)[:, None, :] * xp.matrix_transpose(design)[None, :, :]) @ design  # (K, p, p)
    gram = gram + penalty[:, None] * _eye(p, design, xp)  # (K, p, p)
    eig = xp.linalg.eigvalsh(gram)  # (K, p), ascending
    eps = float(xp.finfo(design.dtype).eps)
    singular = (eig[:, p - 1] <= 0) | (eig[:, 0] <= eig[:, p - 1] * (p * eps))  # (K,)
    if concrete_bool(xp.any(singular)):
        k = _first(singular, K)
        raise SingularWeightedLeastSquaresError(
            f"expert {k}: the weighted Gram matrix X^T W X is singular to working precision "
            f"(eigenvalues {float(eig[k, 0]):.3e} .. {float(eig[k, p - 1]):.3e}); the expert has too few "
            f"effective points for its p={p} coefficients (or collinear columns of x)"
        )


def _eye(n: int, like: Any, xp: Any) -> Any:
    return xp.eye(n, dtype=like.dtype, device=device_of(like))


# --------------------------------------------------------------------------------------------
# Newton's method with step halving for single-index GLMs, all K experts at once
# --------------------------------------------------------------------------------------------


def _newton_single_index(
    design: Any,
    y: Any,
    weights: Any,
    theta0: Any,
    *,
    kind: str,
    offset: Any,
    penalty: Any,
    tol: float,
    max_iter: int,
    max_halvings: int,
    family: str,
    xp: Any,
) -> tuple[Any, Any]:
    r"""Maximise $F_k(\theta_k) = \sum_i w_{ik}\,[y_i\eta_{ik} - b(\eta_{ik})] - \tfrac12\sum_j \rho_j\theta_{kj}^2$.

    design (N, p), y (N,), weights (N, K), theta0 (K, p), offset (N,) or None, penalty (p,).
    Returns ``(theta, separated)``: (K, p) and a boolean (K,) flagging a diverging fit.
    """
    N, p = design.shape
    K = weights.shape[1]
    eps = float(xp.finfo(design.dtype).eps)
    cap = math.log(float(xp.finfo(design.dtype).max)) - 1.0  # exp(eta) finite below this

    def eta_of(theta: Any) -> Any:
        eta = design @ xp.matrix_transpose(theta)  # (N, K)
        return eta if offset is None else eta + offset[:, None]

    def objective(theta: Any) -> Any:  # (K,)
        eta = eta_of(theta)
        if kind == "logistic":
            b = softplus(eta)
        else:
            # exp(eta) clipped below overflow: a candidate with eta > cap is a huge (finite) loss
            b = xp.exp(xp.minimum(eta, xp.full_like(eta, cap))) + xp.maximum(eta - cap, xp.zeros_like(eta))
        return xp.sum(weights * (y[:, None] * eta - b), axis=0) - 0.5 * xp.sum(penalty * theta * theta, axis=1)

    total_weight = xp.sum(weights, axis=0)  # (K,)
    theta = theta0
    F = objective(theta)  # (K,)
    done = xp.zeros((K,), dtype=xp.bool, device=device_of(theta))
    separated = xp.zeros((K,), dtype=xp.bool, device=device_of(theta))
    zeros_k = xp.zeros((K,), dtype=theta.dtype, device=device_of(theta))
    eye = _eye(p, theta, xp)
    for _ in range(max_iter):
        eta = eta_of(theta)  # (N, K)
        if kind == "logistic":
            mu = sigmoid(eta)
            v = mu * (1.0 - mu)
        else:
            mu = xp.exp(xp.minimum(eta, xp.full_like(eta, cap)))
            v = mu
        grad = xp.matrix_transpose(weights * (y[:, None] - mu)) @ design - penalty * theta  # (K, p)
        hess = (xp.matrix_transpose(weights * v)[:, None, :] * xp.matrix_transpose(design)[None, :, :]) @ design
        hess = hess + penalty[:, None] * eye  # (K, p, p): minus the Hessian of F_k
        eig = xp.linalg.eigvalsh(hess)  # (K, p)
        singular = (eig[:, p - 1] <= 0) | (eig[:, 0] <= eig[:, p - 1] * (p * eps)) | ~xp.all(xp.isfinite(hess), axis=(1, 2))
        hess_safe = xp.where(singular[:, None, None], eye, hess)
        delta = xp.linalg.solve(hess_safe, grad[:, :, None])[:, :, 0]  # (K, p)
        move = ~(done | singular)
        delta = xp.where(move[:, None], delta, xp.zeros_like(delta))
        decrement = xp.sum(grad * delta, axis=1)  # (K,): the Newton decrement, twice the predicted gain
        # step halving: the largest t in {1, 1/2, 1/4, ...} with F(theta + t delta) >= F(theta)
        t = xp.ones((K,), dtype=theta.dtype, device=device_of(theta))
        for _h in range(max_halvings + 1):
            F_new = objective(theta + t[:, None] * delta)
            ok = (F_new >= F) | ~move
            if concrete_bool(xp.all(ok)):
                break
            t = xp.where(ok, t, 0.5 * t)
        t = xp.where(ok, t, zeros_k)  # no increase found: stay (a stalled expert counts as converged)
        step = t[:, None] * delta  # (K, p)
        theta = theta + step
        F = xp.where(ok, F_new, F)
        eta_step = xp.max(xp.abs(design @ xp.matrix_transpose(step)), axis=0)  # (K,)
        converged_now = move & ((0.5 * decrement <= tol * (xp.abs(F) + total_weight)) | ~ok)
        separated = separated | (singular & ~done) | (converged_now & (eta_step > _SEPARATION_ETA_STEP))
        done = done | singular | converged_now
        if concrete_bool(xp.all(done)):
            break
    else:
        k = _first(~done, K)
        warnings.warn(
            f"{family} experts: Newton's method for expert {k} did not converge in max_iter={max_iter} "
            "iterations (the M-step still increased its weighted log-likelihood: a generalised EM step)",
            ConvergenceWarning,
            stacklevel=4,
        )
    return theta, separated


def _warn_separation(separated: Any, K: int, family: str, what: str, xp: Any) -> None:
    if concrete_bool(xp.any(separated)):
        k = _first(separated, K)
        warnings.warn(
            f"{family} experts: the weighted maximum-likelihood fit of expert {k} does not exist ({what}); "
            "its coefficients diverge and the M-step returned large finite values. Set ridge > 0 for a "
            "penalised fit that exists",
            SeparationWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# Single-index families: logistic and Poisson
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SingleIndexOptions:
    bias: bool = True
    ridge: float = 0.0
    min_weight: float = 1e-8
    tol: float = 1e-12
    max_iter: int = 100
    max_halvings: int = 50

    def _validate_common(self) -> None:
        _check_bool(self.bias, "bias")
        _check_option_float(self.ridge, "ridge")
        _check_option_float(self.min_weight, "min_weight")
        _check_option_float(self.tol, "tol", positive=True)
        check_positive_int(self.max_iter, "max_iter")
        check_positive_int(self.max_halvings, "max_halvings", minimum=0)

    # set by the subclasses
    _record: ClassVar[Any] = None
    _kind: ClassVar[str] = ""

    @property
    def _offset_column(self) -> bool:
        return bool(getattr(self, "offset_column", False))

    def _check(self, params: Any, x: Any, y: Any = None) -> Any:
        rec = self._record
        if not isinstance(params, rec):
            raise TypeError(f"params must be a {rec.__name__}(weight, bias), got {type(params).__name__}")
        named = {"x": x, "y": y, "params.weight": params.weight, "params.bias": params.bias}
        named = {k: v for k, v in named.items() if v is not None}
        xp = array_namespace(*named.values(), names=tuple(named))
        for name, a in named.items():
            check_float_array(a, name)
        check_float_array(x, "x", ndim=2)
        N, d_x = x.shape
        d = d_x - 1 if self._offset_column else d_x
        if self._offset_column and d_x < 1:
            raise ValueError("x must have at least one column (the offset) when offset_column=True")
        check_float_array(params.weight, "params.weight", ndim=2)
        K = params.weight.shape[0]
        what = f"x has {d_x} columns, the last one the offset" if self._offset_column else f"x has d={d} features"
        check_shape(params.weight, "params.weight", (K, d), what=what)
        check_float_array(params.bias, "params.bias", ndim=1)
        check_shape(params.bias, "params.bias", (K,), what=f"params.weight holds K={K} experts")
        if y is not None:
            check_float_array(y, "y", ndim=1)
            check_shape(y, "y", (N,), what=f"x has N={N} rows")
        check_same_dtype(named)
        for name, a in named.items():
            check_finite(a, name)
        if not self.bias and concrete_bool(xp.all(params.bias == 0)) is False:
            raise ValueError("params.bias must be zeros when bias=False")
        if y is not None:
            self._check_y(y, xp)
        return xp

    def _check_y(self, y: Any, xp: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _split(self, x: Any) -> tuple[Any, Any]:
        """``(regressors, offset)``: the offset is the last column under ``offset_column=True``."""
        if self._offset_column:
            return x[:, :-1], x[:, -1]
        return x, None

    def _eta(self, params: Any, x: Any, xp: Any) -> Any:
        xr, offset = self._split(x)
        eta = xr @ xp.matrix_transpose(params.weight) + params.bias  # (N, K)
        return eta if offset is None else eta + offset[:, None]

    def _eta_input_vjp(self, params: Any, g: Any, xp: Any) -> Any:
        """Cotangent of ``x`` from the cotangent ``g`` (N, K) of $\\eta$."""
        x_bar = g @ params.weight  # (N, d)
        if self._offset_column:
            x_bar = xp.concat([x_bar, xp.sum(g, axis=1, keepdims=True)], axis=1)
        return x_bar

    def log_density_vjp(self, params: Any, x: Any, y: Any, cotangent: Any) -> Any:
        r"""VJP of ``log_density`` with respect to the parameters.

        With $c_{ik}$ the cotangent of $\log p_k(y_i \mid x_i)$ and $\mu_{ik} = b'(\eta_{ik})$ the
        mean, $\partial \log p_k / \partial \eta_{ik} = y_i - \mu_{ik}$, so with
        $g_{ik} = c_{ik}(y_i - \mu_{ik})$:

        $$\bar W_k = \sum_i g_{ik}\, x_i, \qquad \bar c_k = \sum_i g_{ik} .$$

        Parameters
        ----------
        params : the family's parameter record
        x : array, shape (N, d)
        y : array, shape (N,)
        cotangent : array, shape (N, K)

        Returns
        -------
        the family's parameter record
            Cotangents of ``weight`` (K, d) and ``bias`` (K,) (zeros for the bias under ``bias=False``).
        """
        xp = self._check(params, x, y)
        g = self._eta_cotangent(params, x, y, cotangent, xp)  # (N, K)
        xr, _ = self._split(x)
        weight_bar = xp.matrix_transpose(g) @ xr  # (K, d)
        bias_bar = xp.sum(g, axis=0) if self.bias else xp.zeros_like(params.bias)
        return self._record(weight=weight_bar, bias=bias_bar)

    def _eta_cotangent(self, params: Any, x: Any, y: Any, cotangent: Any, xp: Any) -> Any:
        N, K = x.shape[0], params.weight.shape[0]
        check_cotangent(cotangent, (N, K), like=x, what="one entry per sample and expert, like log_density")
        eta = self._eta(params, x, xp)
        return cotangent * (y[:, None] - self._mean_of_eta(eta, xp))  # (N, K)

    def mean(self, params: Any, x: Any) -> Any:
        r"""$E[y \mid x, k] = b'(\eta_k(x))$ for every sample and expert, shape (N, K, 1)."""
        xp = self._check(params, x)
        mu = self._mean_of_eta(self._eta(params, x, xp), xp)  # (N, K)
        return mu[:, :, None]

    def n_free_parameters(self, params: Any) -> int:
        r"""$K(d + 1)$ coefficients ($Kd$ under ``bias=False``)."""
        K, d = params.weight.shape
        return K * (d + (1 if self.bias else 0))

    def penalty(self, params: Any) -> Any:
        r"""$\frac\rho2\sum_k(\lVert W_k\rVert^2 + c_k^2)$, a 0-d array (0 without a ridge): what the
        M-step subtracts from the weighted log-likelihood."""
        xp = array_namespace(params.weight, params.bias, names=("params.weight", "params.bias"))
        return 0.5 * self.ridge * (xp.sum(params.weight * params.weight) + xp.sum(params.bias * params.bias))

    def m_step(self, params: Any, x: Any, y: Any, weights: Any) -> Any:
        r"""Weighted maximum-likelihood fit of every expert by Newton's method (IRLS) with step halving.

        For expert $k$, with $\tilde x_i = (x_i, 1)$, $\theta_k = (W_k, c_k)$, $\eta_{ik} = \tilde x_i^\top\theta_k$,
        $\mu_{ik} = b'(\eta_{ik})$, $v_{ik} = b''(\eta_{ik})$ and the ridge $\rho$, one Newton step on
        $F_k(\theta) = \sum_i w_{ik}[y_i\eta_{ik} - b(\eta_{ik})] - \frac\rho2\lVert\theta\rVert^2$ is

        $$\theta_k \leftarrow \theta_k + t\,\big(\tilde X^\top V_k \tilde X + \rho I\big)^{-1}
        \big(\tilde X^\top \Omega_k (y - \mu_k) - \rho\,\theta_k\big), \qquad
        \Omega_k = \operatorname{diag}(w_{ik}),\ V_k = \operatorname{diag}(w_{ik} v_{ik}),$$

        the iteratively reweighted least-squares update with working weights $w_{ik}v_{ik}$
        (Nelder & Wedderburn 1972), with the step length $t \in \{1, \frac12, \frac14, \dots\}$
        halved until $F_k$ does not decrease. $F_k$ is concave, so the iteration converges to the
        maximiser when it exists; it starts from ``params`` and stops once half the Newton decrement,
        $\frac12 g_k^\top \Delta_k$ (the predicted gain), is below ``tol`` $\cdot(|F_k| + \sum_i w_{ik})$,
        after taking that last step.

        Parameters
        ----------
        params : the family's parameter record
            Current values: the starting point of the Newton iteration.
        x : array, shape (N, d)
        y : array, shape (N,)
        weights : array, shape (N, K)
            Non-negative weights $w_{ik}$ (the E-step responsibilities).

        Returns
        -------
        the family's parameter record

        Raises
        ------
        EmptyComponentError
            When some $\sum_i w_{ik}$ is below ``min_weight`` $\cdot N$.
        SingularWeightedLeastSquaresError
            When some weighted Gram matrix $\tilde X^\top \Omega_k \tilde X + \rho I$ is singular (too few effective points, or collinear columns of ``x``).

        Warns
        -----
        SeparationWarning
            When an expert's maximum-likelihood fit does not exist (its coefficients diverge): the
            objective converged while the last Newton step still moved the linear predictor by more
            than 0.5 somewhere, or the Hessian $\tilde X^\top V_k \tilde X$ became singular because every
            weighted point is fitted with probability (or rate) numerically 0 or 1. Not issued under
            ``ridge > 0``, where the maximiser exists.
        ConvergenceWarning
            When ``max_iter`` Newton steps did not meet the stopping rule (the result still
            increases the weighted log-likelihood).
        """
        xp = self._check(params, x, y)
        N, K = x.shape[0], params.weight.shape[0]
        check_responsibilities(weights, N, K)
        check_same_dtype({"x": x, "weights": weights})
        check_nonempty_components(weights, self.min_weight)
        xr, offset = self._split(x)
        d = xr.shape[1]
        design = _design_matrix(xr, self.bias, xp)  # (N, p)
        p = design.shape[1]
        penalty = self.ridge * xp.ones((p,), dtype=x.dtype, device=device_of(x))  # (p,): every coefficient
        _check_gram(design, weights, penalty, xp)
        theta0 = xp.concat([params.weight, params.bias[:, None]], axis=1) if self.bias else params.weight  # (K, p)
        theta, separated = _newton_single_index(
            design, y, weights, theta0, kind=self._kind, offset=offset, penalty=penalty, tol=self.tol,
            max_iter=self.max_iter, max_halvings=self.max_halvings, family=self.name, xp=xp,
        )
        if self.ridge == 0:
            what = (
                "the weighted classes are (quasi-)completely separated"
                if self._kind == "logistic"
                else "its weighted counts are all 0 on one side of a hyperplane, so a rate goes to 0"
            )
            _warn_separation(separated, K, self.name, what, xp)
        weight = theta[:, :d]
        bias = theta[:, d] if self.bias else xp.zeros_like(params.bias)
        return self._record(weight=weight, bias=bias)


@dataclass(frozen=True)
class LogisticExperts(_SingleIndexOptions):
    r"""$K$ logistic-regression experts for a binary (or soft) target $y \in [0, 1]$.

    $$\log p_k(y_i \mid x_i) = y_i \log\mu_{ik} + (1 - y_i)\log(1 - \mu_{ik})
    = y_i\eta_{ik} - \log\big(1 + e^{\eta_{ik}}\big), \qquad \mu_{ik} = \sigma(\eta_{ik}),\ 
    \eta_{ik} = W_k^\top x_i + c_k .$$

    The binary expert networks of Jordan & Jacobs (1994), doi:10.1162/neco.1994.6.2.181
    (Bernoulli GLM experts), fitted in the M-step by weighted IRLS with soft targets as in Chen, Xu &
    Chi (1999), doi:10.1016/S0893-6080(99)00043-X (for two classes their exact-Hessian Newton step
    and IRLS coincide).

    Attributes
    ----------
    soft_targets : bool
        ``False`` (default): ``y`` must be exactly 0 or 1. ``True``: any $y \in [0, 1]$, the
        "log-density" then being the cross-entropy above.
    bias : bool
        Fit the intercepts $c_k$ (``False``: fixed at 0).
    ridge : float
        $\rho \ge 0$, the penalty $\frac\rho2(\lVert W_k\rVert^2 + c_k^2)$ of the M-step (every
        fitted coefficient, intercept included).
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] when some $\sum_i w_{ik}$ < ``min_weight`` $\cdot N$.
    tol, max_iter, max_halvings
        Newton stopping rule (see [`m_step`][moeref.glm_experts.LogisticExperts.m_step]), the most
        Newton steps per M-step and the most step halvings per step.
    name : str

    Notes
    -----
    $\log(1 + e^\eta)$ is [`softplus`][moeref.core.softplus], so the log-density is finite for any
    finite $\eta$ (no $\log 0$ for a confidently wrong expert). Separation is reported with a
    [`SeparationWarning`][moeref.glm_experts.SeparationWarning].

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.glm_experts import LogisticExperts, LogisticExpertsParams
    >>> fam = LogisticExperts()
    >>> p = LogisticExpertsParams(weight=np.array([[1.0], [-1.0]]), bias=np.zeros(2))
    >>> np.round(fam.log_density(p, np.array([[2.0]]), np.array([1.0])), 6).tolist()  # log sigma(+-2)
    [[-0.126928, -2.126928]]
    """

    soft_targets: bool = False
    name: str = "logistic"
    _record: ClassVar[Any] = LogisticExpertsParams
    _kind: ClassVar[str] = "logistic"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_bool(self.soft_targets, "soft_targets")

    def _check_y(self, y: Any, xp: Any) -> None:
        if concrete_bool(xp.all((y >= 0) & (y <= 1))) is False:
            raise ValueError("y must lie in [0, 1] for logistic experts (0/1 labels, or soft targets with soft_targets=True)")
        if not self.soft_targets and concrete_bool(xp.all((y == 0) | (y == 1))) is False:
            raise ValueError("y must be 0 or 1 for logistic experts; pass soft_targets=True for targets in (0, 1)")

    def _mean_of_eta(self, eta: Any, xp: Any) -> Any:
        return sigmoid(eta)

    def log_density(self, params: LogisticExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log p_k(y_i \mid x_i) = y_i\eta_{ik} - \log(1 + e^{\eta_{ik}})$ for every sample and expert.

        Parameters
        ----------
        params : LogisticExpertsParams
        x : array, shape (N, d)
        y : array, shape (N,)

        Returns
        -------
        array, shape (N, K)
        """
        xp = self._check(params, x, y)
        eta = self._eta(params, x, xp)  # (N, K)
        return y[:, None] * eta - softplus(eta)

    def log_density_input_vjp(self, params: LogisticExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""Cotangents of ``x`` and ``y`` for a cotangent (N, K) of ``log_density``.

        $$\bar x_i = \sum_k c_{ik}(y_i - \mu_{ik})\, W_k, \qquad \bar y_i = \sum_k c_{ik}\,\eta_{ik} .$$
        """
        xp = self._check(params, x, y)
        g = self._eta_cotangent(params, x, y, cotangent, xp)  # (N, K)
        y_bar = xp.sum(cotangent * self._eta(params, x, xp), axis=1)  # (N,)
        return ExpertInputGrads(x=self._eta_input_vjp(params, g, xp), y=y_bar)


@dataclass(frozen=True)
class PoissonExperts(_SingleIndexOptions):
    r"""$K$ Poisson-regression experts (log link) for counts $y \in \{0, 1, 2, \dots\}$.

    $$\log p_k(y_i \mid x_i) = y_i\eta_{ik} - e^{\eta_{ik}} - \log y_i!, \qquad
    \eta_{ik} = o_i + W_k^\top x_i + c_k,$$

    with $\log y! = \log\Gamma(y + 1)$ from [`moeref.special.lgamma`][moeref.special.lgamma] and the
    offset $o_i = 0$ unless ``offset_column=True``. The Poisson GLM experts of Jordan & Jacobs (1994),
    doi:10.1162/neco.1994.6.2.181, and the component model of the mixed Poisson regressions
    of Wang, Cockburn & Puterman (1998), "Analysis of patent data: a mixed-Poisson-regression-model
    approach", Journal of Business & Economic Statistics 16(1):27-41,
    doi:10.1080/07350015.1998.10524732 (flexmix's ``FLXMRglm(family = "poisson")``).

    Attributes
    ----------
    offset_column : bool
        The last column of ``x`` is an offset $o_i$ (coefficient fixed at 1; e.g. a log exposure).
    bias, ridge, min_weight, tol, max_iter, max_halvings, name
        As in [`LogisticExperts`][moeref.glm_experts.LogisticExperts].

    Notes
    -----
    ``y`` must hold non-negative whole numbers in a floating dtype. A rate $e^\eta$ that overflows
    gives a log-density of $-\infty$ without a floating-point warning. The M-step is the weighted
    IRLS of a Poisson GLM (working weights $w_{ik}\mu_{ik}$), the fit of R's
    ``glm.fit(x, y, weights = w, family = poisson())``, which flexmix calls.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.glm_experts import PoissonExperts, PoissonExpertsParams
    >>> fam = PoissonExperts()
    >>> p = PoissonExpertsParams(weight=np.zeros((1, 1)), bias=np.array([np.log(3.0)]))
    >>> float(np.round(fam.log_density(p, np.zeros((1, 1)), np.array([2.0]))[0, 0], 10))  # log(9 e^-3 / 2)
    -1.4959226032
    """

    offset_column: bool = False
    name: str = "poisson"
    _record: ClassVar[Any] = PoissonExpertsParams
    _kind: ClassVar[str] = "poisson"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_bool(self.offset_column, "offset_column")

    def _check_y(self, y: Any, xp: Any) -> None:
        if concrete_bool(xp.all(y >= 0)) is False:
            raise ValueError("y must be non-negative counts for Poisson experts (a count is negative)")
        if concrete_bool(xp.all(y == xp.floor(y))) is False:
            raise ValueError("y must be whole numbers (counts) for Poisson experts")

    def _mean_of_eta(self, eta: Any, xp: Any) -> Any:
        return _safe_exp(eta, xp)

    def log_density(self, params: PoissonExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log p_k(y_i \mid x_i) = y_i\eta_{ik} - e^{\eta_{ik}} - \log\Gamma(y_i + 1)$, shape (N, K).

        Parameters
        ----------
        params : PoissonExpertsParams
        x : array, shape (N, d) (plus the offset column under ``offset_column=True``)
        y : array, shape (N,)

        Returns
        -------
        array, shape (N, K)
        """
        xp = self._check(params, x, y)
        eta = self._eta(params, x, xp)  # (N, K)
        out = y[:, None] * eta - _safe_exp(eta, xp) - lgamma(y + 1.0)[:, None]
        return xp.where(_overflows(eta, xp), xp.full_like(eta, -math.inf), out)

    def log_density_input_vjp(self, params: PoissonExpertsParams, x: Any, y: Any, cotangent: Any) -> ExpertInputGrads:
        r"""Cotangent of ``x`` for a cotangent (N, K) of ``log_density`` (``y``, a count, gets ``None``).

        $$\bar x_i = \sum_k c_{ik}(y_i - \mu_{ik})\, W_k$$

        (and $\sum_k c_{ik}(y_i - \mu_{ik})$ for the offset column under ``offset_column=True``).
        """
        xp = self._check(params, x, y)
        g = self._eta_cotangent(params, x, y, cotangent, xp)  # (N, K)
        return ExpertInputGrads(x=self._eta_input_vjp(params, g, xp), y=None)


def _exp_cap(dtype: Any, xp: Any) -> float:
    return math.log(float(xp.finfo(dtype).max))


def _overflows(eta: Any, xp: Any) -> Any:
    return eta > _exp_cap(eta.dtype, xp)


def _safe_exp(eta: Any, xp: Any) -> Any:
    """``exp(eta)``, with ``+inf`` (and no floating-point warning) where it overflows."""
    big = _overflows(eta, xp)
    e = xp.exp(xp.where(big, xp.zeros_like(eta), eta))
    return xp.where(big, xp.full_like(eta, math.inf), e)


# --------------------------------------------------------------------------------------------
# Multinomial-logistic experts
# --------------------------------------------------------------------------------------------


def class_targets(labels: Any, n_classes: int, /, *, dtype: Any = None) -> Any:
    r"""One-hot targets $y_{ic} = [\text{labels}_i = c]$ for integer class labels.

    Parameters
    ----------
    labels : integer array, shape (N,)
        Classes in ``0 .. n_classes - 1``.
    n_classes : int
        $C \ge 2$.
    dtype : floating dtype of the labels' namespace, optional
        Default: the namespace's ``float64``.

    Returns
    -------
    array, shape (N, C)

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.glm_experts import class_targets
    >>> class_targets(np.array([2, 0]), 3).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    xp = array_namespace(labels, names=("labels",))
    check_positive_int(n_classes, "n_classes", minimum=2)
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-dimensional, got shape {tuple(labels.shape)}")
    bad = (labels < 0) | (labels >= n_classes)
    if concrete_bool(xp.any(bad)):
        i = _first(bad, labels.shape[0])
        raise ValueError(f"labels must lie in [0, {n_classes}) (n_classes={n_classes}); labels[{i}] = {int(labels[i])}")
    return one_hot(labels, n_classes, dtype=xp.float64 if dtype is None else dtype)


@dataclass(frozen=True)
class MultinomialLogisticExperts:
    r"""$K$ multinomial-logistic (softmax-regression) experts over $C$ classes.

    $$\log p_k(y_i \mid x_i) = \sum_{c=0}^{C-1} y_{ic}\log\mu_{ikc}, \qquad
    \mu_{ikc} = \frac{\exp\eta_{ikc}}{\sum_{c'}\exp\eta_{ikc'}}, \qquad \eta_{ikc} = W_{kc}^\top x_i + c_{kc},$$

    for one-hot $y_i$ the log-probability of the observed class. The multiclass expert networks of
    Chen, Xu & Chi (1999), "Improved learning algorithms for mixture of experts in multiclass
    classification", Neural Networks 12(9):1229-1252, doi:10.1016/S0893-6080(99)00043-X, whose M-step
    is Newton-Raphson with the exact Hessian of all $C - 1$ free classes (their remedy for the unstable
    one-class-at-a-time IRLS of Jordan & Jacobs 1994); here that is
    ``moeref.softmax_gate.fit_weighted_multinomial`` per expert, with the
    targets $y_{ic}$ and the observation weights $w_{ik}$.

    Attributes
    ----------
    soft_targets : bool
        ``False`` (default): rows of ``y`` must be one-hot. ``True``: any probability vectors (rows
        non-negative and summing to 1); the "log-density" is then the cross-entropy.
    ridge : float
        $\rho \ge 0$, the penalty $\frac\rho2(\lVert W_k\rVert_F^2 + \lVert c_k\rVert^2)$ on the free
        columns in the M-step.
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] when some $\sum_i w_{ik}$ < ``min_weight`` $\cdot N$.
    tol, max_iter, max_halvings
        Passed to ``moeref.softmax_gate.fit_weighted_multinomial``.
    name : str

    Notes
    -----
    Unlike the single-index families there is no ``bias=False``: the intercepts are always fitted.
    ``log_density`` is computed with [`log_softmax`][moeref.core.log_softmax] and $0\log 0 = 0$ for
    classes with target 0 (so a class the expert rules out with $\eta = -\infty$ costs nothing unless
    it is observed). Separation (an expert's weighted classes split by hyperplanes) is reported with
    a [`SeparationWarning`][moeref.glm_experts.SeparationWarning] naming the expert.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.glm_experts import MultinomialLogisticExperts, MultinomialLogisticExpertsParams, class_targets
    >>> fam = MultinomialLogisticExperts()
    >>> p = MultinomialLogisticExpertsParams(weight=np.zeros((1, 1, 3)), bias=np.zeros((1, 3)))
    >>> y = class_targets(np.array([1]), 3)
    >>> float(np.round(fam.log_density(p, np.zeros((1, 1)), y)[0, 0], 6))  # log(1/3)
    -1.098612
    """

    soft_targets: bool = False
    ridge: float = 0.0
    min_weight: float = 1e-8
    tol: float = 1e-10
    max_iter: int = 100
    max_halvings: int = 30
    name: str = "multinomial_logistic"

    def __post_init__(self) -> None:
        _check_bool(self.soft_targets, "soft_targets")
        _check_option_float(self.ridge, "ridge")
        _check_option_float(self.min_weight, "min_weight")
        _check_option_float(self.tol, "tol", positive=True)
        check_positive_int(self.max_iter, "max_iter")
        check_positive_int(self.max_halvings, "max_halvings", minimum=0)

    def _check(self, params: Any, x: Any, y: Any = None) -> Any:
        if not isinstance(params, MultinomialLogisticExpertsParams):
            raise TypeError(
                f"params must be a MultinomialLogisticExpertsParams(weight, bias), got {type(params).__name__}"
            )
        named = {"x": x, "y": y, "params.weight": params.weight, "params.bias": params.bias}
        named = {k: v for k, v in named.items() if v is not None}
        xp = array_namespace(*named.values(), names=tuple(named))
        for name, a in named.items():
            check_float_array(a, name)
        check_float_array(x, "x", ndim=2)
        N, d = x.shape
        check_float_array(params.weight, "params.weight", ndim=3)
        K, _, C = params.weight.shape
        check_shape(params.weight, "params.weight", (K, d, C), what=f"x has d={d} features")
        if C < 2:
            raise ValueError(f"params.weight must have at least 2 classes (last axis), got C={C}")
        check_float_array(params.bias, "params.bias", ndim=2)
        check_shape(params.bias, "params.bias", (K, C), what=f"params.weight holds K={K} experts over C={C} classes")
        if y is not None:
            check_float_array(y, "y", ndim=2)
            check_shape(y, "y", (N, C), what=f"x has N={N} rows; the experts have C={C} classes (one-hot rows)")
        check_same_dtype(named)
        for name, a in named.items():
            check_finite(a, name)
        if y is not None:
            self._check_y(y, xp)
        return xp

    def _check_y(self, y: Any, xp: Any) -> None:
        if concrete_bool(xp.all(y >= 0)) is False:
            raise ValueError("y must be non-negative (one-hot rows, or class probabilities with soft_targets=True)")
        if concrete_bool(xp.all(xp.abs(xp.sum(y, axis=1) - 1.0) <= 1e-6)) is False:
            raise ValueError("every row of y must sum to 1 (one-hot rows, or class probabilities with soft_targets=True)")
        if not self.soft_targets and concrete_bool(xp.all((y == 0) | (y == 1))) is False:
            raise ValueError("y must be one-hot (entries 0 or 1) for multinomial experts; pass soft_targets=True for class probabilities")

    def _log_mu(self, params: Any, x: Any, xp: Any) -> Any:
        eta = xp.matmul(x[None, :, :], params.weight) + params.bias[:, None, :]  # (K, N, C)
        return log_softmax(eta, axis=2)  # (K, N, C)

    def log_density(self, params: MultinomialLogisticExpertsParams, x: Any, y: Any) -> Any:
        r"""$\log p_k(y_i \mid x_i) = \sum_c y_{ic}\log\mu_{ikc}$ for every sample and expert.

        Parameters
        ----------
        params : MultinomialLogisticExpertsParams
        x : array, shape (N, d)
        y : array, shape (N, C)

        Returns
        -------
        array, shape (N, K)
        """
        xp = self._check(params, x, y)
        logmu = self._log_mu(params, x, xp)  # (K, N, C)
        terms = xp.where(y[None, :, :] > 0, y[None, :, :] * logmu, xp.zeros_like(logmu))
        return xp.matrix_transpose(xp.sum(terms, axis=2))  # (N, K)

    def _eta_cotangent(self, params: Any, x: Any, y: Any, cotangent: Any, xp: Any) -> Any:
        N, K = x.shape[0], params.weight.shape[0]
        check_cotangent(cotangent, (N, K), like=x, what="one entry per sample and expert, like log_density")
        mu = xp.exp(self._log_mu(params, x, xp))  # (K, N, C)
        # d/d eta_c of sum_c' y_c' log mu_c' = y_c - mu_c sum_c' y_c'
        return log_softmax_vjp(mu, xp.matrix_transpose(cotangent)[:, :, None] * y[None, :, :], axis=2)  # (K, N, C)

    def log_density_vjp(
        self, params: MultinomialLogisticExpertsParams, x: Any, y: Any, cotangent: Any
    ) -> MultinomialLogisticExpertsParams:
        r"""VJP of [`log_density`][moeref.glm_experts.MultinomialLogisticExperts.log_density] with respect to the parameters.

        With $c_{ik}$ the cotangent and $g_{ikc} = c_{ik}\,(y_{ic} - \mu_{ikc}\sum_{c'} y_{ic'})$:

        $$\bar W_{kc} = \sum_i g_{ikc}\, x_i, \qquad \bar c_{kc} = \sum_i g_{ikc}$$

        for every column, the baseline one included (a derivative with respect to the record's fields).

        Returns
        -------
        MultinomialLogisticExpertsParams
            ``weight`` (K, d, C), ``bias`` (K, C).
        """
        xp = self._check(params, x, y)
        g = self._eta_cotangent(params, x, y, cotangent, xp)  # (K, N, C)
        weight_bar = xp.matmul(xp.matrix_transpose(x)[None, :, :], g)  # (K, d, C)
        return MultinomialLogisticExpertsParams(weight=weight_bar, bias=xp.sum(g, axis=1))

    def log_density_input_vjp(
        self, params: MultinomialLogisticExpertsParams, x: Any, y: Any, cotangent: Any
    ) -> ExpertInputGrads:
        r"""Cotangents of ``x`` and ``y`` for a cotangent (N, K) of ``log_density``.

        $$\bar x_i = \sum_k\sum_c g_{ikc}\, W_{kc}, \qquad \bar y_{ic} = \sum_k c_{ik}\log\mu_{ikc} .$$
        """
        xp = self._check(params, x, y)
        g = self._eta_cotangent(params, x, y, cotangent, xp)  # (K, N, C)
        x_bar = xp.sum(xp.matmul(g, xp.matrix_transpose(params.weight)), axis=0)  # (N, d)
        logmu = self._log_mu(params, x, xp)  # (K, N, C)
        y_bar = xp.sum(xp.matrix_transpose(cotangent)[:, :, None] * logmu, axis=0)  # (N, C)
        return ExpertInputGrads(x=x_bar, y=y_bar)

    def mean(self, params: MultinomialLogisticExpertsParams, x: Any) -> Any:
        r"""Class probabilities $\mu_{ikc}$ of every expert, shape (N, K, C)."""
        xp = self._check(params, x)
        mu = softmax(xp.matmul(x[None, :, :], params.weight) + params.bias[:, None, :], axis=2)  # (K, N, C)
        return xp.permute_dims(mu, (1, 0, 2))

    def n_free_parameters(self, params: MultinomialLogisticExpertsParams) -> int:
        r"""$K(C - 1)(d + 1)$: the baseline class has no free coefficients."""
        K, d, C = params.weight.shape
        return K * (C - 1) * (d + 1)

    def penalty(self, params: MultinomialLogisticExpertsParams) -> Any:
        r"""$\frac\rho2\sum_k\sum_{c}\big(\lVert W_{kc} - W_{k,C-1}\rVert^2 + (c_{kc} - c_{k,C-1})^2\big)$, a 0-d array.

        The ridge of the M-step, evaluated at the equivalent baseline point (the last column moved to
        0, which changes no probability), so that it is the same number for every parametrisation of
        one model (0 without a ridge).
        """
        xp = array_namespace(params.weight, params.bias, names=("params.weight", "params.bias"))
        C = params.weight.shape[2]
        w = params.weight - params.weight[:, :, C - 1 : C]  # (K, d, C)
        b = params.bias - params.bias[:, C - 1 : C]  # (K, C)
        return 0.5 * self.ridge * (xp.sum(w * w) + xp.sum(b * b))

    def m_step(
        self, params: MultinomialLogisticExpertsParams, x: Any, y: Any, weights: Any
    ) -> MultinomialLogisticExpertsParams:
        r"""Weighted multinomial logistic regression of every expert, by exact-Hessian Newton steps.

        For expert $k$ (free columns $\theta_{kc} = (W_{kc}, c_{kc})$, $c < C - 1$), maximises

        $$F_k = \sum_i w_{ik}\sum_c y_{ic}\log\mu_{ikc} - \frac\rho2\sum_{c<C-1}\lVert\theta_{kc}\rVert^2$$

        with ``moeref.softmax_gate.fit_weighted_multinomial````(x, y,
        weights[:, k], ...)`` (targets $y$, observation weights $w_{ik}$, baseline parametrisation),
        starting from ``params``: Newton's method with the full $(C-1)(d+1)$-square Hessian
        (Chen, Xu & Chi 1999) and step halving, so $F_k$ never decreases. Once its decrement test
        holds, one more (halved if necessary) Newton step is taken (``single_step=True``), so that
        the coefficients, not only $F_k$, are converged to round-off.

        Parameters
        ----------
        params : MultinomialLogisticExpertsParams
            Current values (starting point; a non-zero baseline column is first moved to the
            equivalent point with a zero one).
        x : array, shape (N, d)
        y : array, shape (N, C)
        weights : array, shape (N, K)

        Returns
        -------
        MultinomialLogisticExpertsParams

        Raises
        ------
        EmptyComponentError, SingularWeightedLeastSquaresError
            As for [`LogisticExperts.m_step`][moeref.glm_experts.LogisticExperts.m_step].

        Warns
        -----
        SeparationWarning
            When the fit of an expert is separated (``ridge == 0``; detected by
            ``fit_weighted_multinomial``, whose warning of the same class is replaced by one that
            names the expert).
        """
        xp = self._check(params, x, y)
        N, K = x.shape[0], params.weight.shape[0]
        check_responsibilities(weights, N, K)
        check_same_dtype({"x": x, "weights": weights})
        check_nonempty_components(weights, self.min_weight)
        design = _design_matrix(x, True, xp)  # (N, d + 1)
        penalty = self.ridge * xp.ones((design.shape[1],), dtype=x.dtype, device=device_of(x))
        _check_gram(design, weights, penalty, xp)
        new_w, new_b, separated = [], [], []
        for k in range(K):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit = fit_weighted_multinomial(
                    x, y, weights[:, k], params.weight[k, ...], params.bias[k, ...], parametrisation="baseline",
                    ridge=self.ridge, max_iter=self.max_iter, tol=self.tol, max_halvings=self.max_halvings,
                )
                if fit.converged and not fit.separated:
                    # the decrement test stops *before* the last Newton step; take it (quadratic
                    # convergence: the coefficients go from ~sqrt(tol) to round-off accuracy)
                    fit = fit_weighted_multinomial(
                        x, y, weights[:, k], fit.weight, fit.bias, parametrisation="baseline", ridge=self.ridge,
                        max_iter=1, tol=0.0, max_halvings=self.max_halvings, single_step=True,
                    )
            for w in caught:
                if not issubclass(w.category, _SeparationWarning):
                    warnings.warn(f"{self.name} experts, expert {k}: {w.message}", w.category, stacklevel=2)
            if fit.separated:
                separated.append(k)
            new_w.append(fit.weight)
            new_b.append(fit.bias)
        if separated:
            warnings.warn(
                f"{self.name} experts: the weighted maximum-likelihood fit of expert {separated[0]} does not exist "
                "(its weighted classes are (quasi-)completely separated); its coefficients diverge and the M-step "
                "returned large finite values. Set ridge > 0 for a penalised fit that exists",
                SeparationWarning,
                stacklevel=2,
            )
        return MultinomialLogisticExpertsParams(weight=xp.stack(new_w, axis=0), bias=xp.stack(new_b, axis=0))

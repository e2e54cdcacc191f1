r"""The softmax (multinomial-logit) gate of classical MoE, and its weighted Newton M-step.

$$g_k(x; W, b) = \frac{\exp(x^\top w_k + b_k)}{\sum_{j=1}^{K}\exp(x^\top w_j + b_j)},
\qquad k = 1, \dots, K,$$

the gating network of Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local
Experts", Neural Computation 3(1):79-87, doi:10.1162/neco.1991.3.1.79, and of Jordan & Jacobs
(1994), "Hierarchical Mixtures of Experts and the EM Algorithm", Neural Computation 6(2):181-214,
doi:10.1162/neco.1994.6.2.181 (the top-level gating network of their architecture).

In EM the gate's M-step is a **weighted multinomial logistic regression with soft targets**
(Jordan & Jacobs 1994 solve it by iteratively reweighted least squares):

$$\max_{W, b}\ F(W, b) = \sum_{i=1}^N s_i \sum_{k=1}^K t_{ik}\,\log g_k(x_i; W, b)
\;-\; \frac{\rho}{2}\big(\lVert W\rVert_F^2 + \lVert b\rVert^2\big),$$

with targets $t_{ik}$ (EM responsibilities $\tau_{ik}$, or the conditional posteriors $h_{k\mid m}$
of an HME node), observation weights $s_i$ (1 for a flat MoE, the node posterior $h_m$ in HME) and
an optional ridge $\rho \ge 0$. [`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial]
solves it by Newton's method with the exact (full) Hessian and step halving;
[`SoftmaxGate`][moeref.softmax_gate.SoftmaxGate] wraps it as a
[`GateFamily`][moeref.families.GateFamily].

Conventions
-----------
* **Parametrisations.** ``"baseline"`` fixes the last class's column $w_K = 0$, $b_K = 0$
  (a multinomial logit with a reference class; identifiable; $(K-1)(d+1)$ free parameters), as
  meteorits' ``NMoE`` does ("$\alpha_K$ being the null vector"). flexmix's ``FLXPmultinom`` fixes the
  **first** class instead (its ``nnet`` mask zeroes the first output's weights): the same gate, with
  coefficients $w_k - w_1$, $b_k - b_1$; convert by subtracting the first column. ``"symmetric"`` leaves all $K$
  columns free: the likelihood is then invariant under adding one vector $c \in \mathbb R^{d+1}$ to
  every column, so its Hessian is singular. With $\rho > 0$ the penalised problem is strictly
  concave and its maximiser has $\sum_k w_k = 0$, $\sum_k b_k = 0$; with $\rho = 0$ Newton takes the
  **minimum-norm** step (the pseudo-inverse of the Hessian), which has no component along the
  invariant directions, so $\sum_k (w_k, b_k)$ keeps its starting value.
* **The ridge** covers every free entry of $W$ and $b$ (bias included; in the baseline
  parametrisation the fixed column is 0 and contributes nothing). It is reported separately as a
  penalty and never hidden in a log-likelihood.
* **Separation.** When a direction of the weights increases $F$ without bound (complete or
  quasi-complete separation; classes with no target mass), the maximum-likelihood estimate does not
  exist: the weights diverge while $F$ approaches its supremum and fitted probabilities saturate at 0
  and 1. The fit then reports ``separated=True`` and issues a
  [`GateSeparationWarning`][moeref.softmax_gate.GateSeparationWarning]; a ridge $\rho > 0$ restores
  a finite maximiser.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .core import array_namespace, device_of, log_softmax, log_softmax_vjp
from .em import ConvergenceWarning, SeparationWarning
from .validation import (
    check_cotangent,
    check_arrays,
    check_choice,
    check_finite,
    check_float_array,
    check_gate_params,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "PARAMETRISATIONS",
    "GateSeparationWarning",
    "WeightedMultinomialFit",
    "weighted_multinomial_objective",
    "fit_weighted_multinomial",
    "SoftmaxGateParams",
    "SoftmaxGate",
]

PARAMETRISATIONS: tuple[str, ...] = ("baseline", "symmetric")
"""``"baseline"``: last class fixed at 0 (identifiable); ``"symmetric"``: all $K$ columns free."""

_RECESSION_DISTANCE = 10.0  # how far along the last Newton direction the separation test looks
_SATURATION = 1.4901161193847656e-08  # sqrt(float64 eps): a fitted probability this small is "numerically 0"


GateSeparationWarning = SeparationWarning
"""[`moeref.em.SeparationWarning`][moeref.em.SeparationWarning], under the name the gates' M-steps
have used: issued by [`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial]
(and so by every M-step built on it) when the objective still increases along the direction the last
Newton steps took while some fitted probability is numerically 0. Use a ridge (``ridge > 0``)."""


class WeightedMultinomialFit(NamedTuple):
    """The result of [`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial].

    Attributes
    ----------
    weight : array, shape (d, K)
        Fitted $W$ (last column 0 under ``"baseline"``).
    bias : array, shape (K,)
        Fitted $b$ (last entry 0 under ``"baseline"``).
    n_iter : int
        Accepted Newton steps.
    converged : bool
        The Newton decrement met the tolerance (for ``single_step``: already at the start).
    separated : bool
        Separation was detected (see the module notes); the weights are then finite only because the
        iteration stopped.
    objective : float
        The penalised objective $F = \\text{loglik} - \\text{penalty}$ at the result.
    loglik : float
        $\\sum_i s_i \\sum_k t_{ik}\\log g_k(x_i)$ at the result.
    penalty : float
        $\\frac{\\rho}{2}(\\lVert W\\rVert_F^2 + \\lVert b\\rVert^2)$ at the result.
    objective_trace : tuple of float
        $F$ at the start and after each accepted step (non-decreasing by construction).
    min_probability : float
        Smallest fitted $g_k(x_i)$ over samples with positive weight $s_i \\sum_k t_{ik}$.
    n_halvings : int
        Total number of step halvings.
    stop_reason : str
    """

    weight: Any
    bias: Any
    n_iter: int
    converged: bool
    separated: bool
    objective: float
    loglik: float
    penalty: float
    objective_trace: tuple[float, ...]
    min_probability: float
    n_halvings: int
    stop_reason: str


def _check_nonneg(a: Any, name: str, xp: Any) -> None:
    if concrete_bool(xp.all(a >= 0)) is False:
        raise ValueError(f"{name} must be non-negative")


def _check_problem(x: Any, targets: Any, sample_weight: Any, weight: Any, bias: Any) -> Any:
    xp = check_arrays(
        {"x": x, "targets": targets, "sample_weight": sample_weight, "weight": weight, "bias": bias},
    )
    check_float_array(x, "x", ndim=2)
    check_float_array(targets, "targets", ndim=2)
    N, d = x.shape
    K = check_gate_params(weight, bias, d, name="gate")
    check_shape(targets, "targets", (N, K), what=f"x has N={N} rows and the gate has K={K} classes")
    _check_nonneg(targets, "targets", xp)
    if sample_weight is not None:
        check_float_array(sample_weight, "sample_weight", ndim=1)
        check_shape(sample_weight, "sample_weight", (N,), what=f"x has N={N} rows")
        _check_nonneg(sample_weight, "sample_weight", xp)
    return xp


def _check_ridge(ridge: Any, name: str = "ridge") -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (0 <= ridge < math.inf):
        raise ValueError(f"{name} must be a finite non-negative float, got {ridge!r}")
    return float(ridge)


def _check_tol(tol: Any, name: str = "tol") -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 <= tol < math.inf):
        raise ValueError(f"{name} must be a finite non-negative float, got {tol!r}")
    return float(tol)


def _masked_sum(targets: Any, logp: Any, xp: Any) -> Any:
    """$\\sum_k t_{ik}\\log p_{ik}$ per row, with $0 \\log 0 = 0$ (no NaN from $0\\cdot(-\\infty)$)."""
    return xp.sum(xp.where(targets > 0, targets * logp, xp.zeros_like(logp)), axis=1)  # (N,)


def weighted_multinomial_objective(
    x: Any, targets: Any, sample_weight: Any, weight: Any, bias: Any, *, ridge: float = 0.0
) -> Any:
    r"""The penalised weighted soft-target multinomial log-likelihood.

    $$F(W, b) = \sum_{i=1}^N s_i \sum_{k=1}^K t_{ik}\,\log\operatorname{softmax}_k(x_i^\top W + b)
    - \frac{\rho}{2}\big(\lVert W\rVert_F^2 + \lVert b\rVert^2\big),$$

    the objective of the gate M-step of Jordan & Jacobs (1994), Neural Computation 6(2):181-214,
    doi:10.1162/neco.1994.6.2.181 (with $\rho = 0$). Terms with $t_{ik} = 0$ count as 0.

    Parameters
    ----------
    x : array, shape (N, d)
    targets : array, shape (N, K)
        Non-negative; rows are usually probability vectors (a row summing to $r_i$ acts as a
        probability vector with observation weight $s_i r_i$).
    sample_weight : array, shape (N,), or None
        Non-negative $s_i$; ``None`` means all 1.
    weight : array, shape (d, K)
    bias : array, shape (K,)
    ridge : float
        $\rho \ge 0$ (applied to the arrays as given: all of $W$ and $b$).

    Returns
    -------
    0-d array

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.softmax_gate import weighted_multinomial_objective
    >>> t = np.array([[1.0, 0.0], [0.5, 0.5]])
    >>> round(float(weighted_multinomial_objective(np.zeros((2, 1)), t, None, np.zeros((1, 2)), np.zeros(2))), 6)
    -1.386294
    """
    xp = _check_problem(x, targets, sample_weight, weight, bias)
    ridge = _check_ridge(ridge)
    logp = log_softmax(xp.matmul(x, weight) + bias, axis=1)  # (N, K)
    per_row = _masked_sum(targets, logp, xp)  # (N,)
    if sample_weight is not None:
        per_row = sample_weight * per_row
    return xp.sum(per_row) - 0.5 * ridge * (xp.sum(weight * weight) + xp.sum(bias * bias))


# Samples per block of the Hessian assembly: each block's (rows, K_f (d+1)) temporaries stay in
# cache; fresh full-size ones were page-faulted on every Newton step (measured 2x slower).
_HESSIAN_BLOCK_ROWS = 2048


def _minus_hessian(x1: Any, p: Any, sr: Any, n_free: int, ridge: float, xp: Any) -> Any:
    r"""Minus the Hessian of $F$ over the first ``n_free`` columns, class-major, shape (n, n).

    $$M_{kl} = \tilde X^\top \operatorname{diag}(a_{kl})\,\tilde X + \rho\,\delta_{kl} I, \qquad
    a_{kl} = s r\,(\delta_{kl} p_k - p_k p_l), \qquad n = K_f (d+1),$$

    from ``x1`` (N, q) with rows $\tilde x_i$, the probabilities ``p`` (N, K) and ``sr`` (N,) $= s_i r_i$,
    without per-sample outer products $\tilde x_i \tilde x_i^\top$:

    * the blocks off the diagonal, $-\tilde X^\top \operatorname{diag}(s r p_k p_l)\tilde X$, from the
      Gram matrix $U^\top U$ of the rows $u_i = (p_{i1}, \dots, p_{iK_f}) \otimes \sqrt{s_i r_i}\,\tilde x_i$;
    * the diagonal blocks from their own per-sample weights $a_{kk} = s r (p_k - p_k^2)$, as
      $\tilde X^\top [a_{11}\tilde x, \dots, a_{K_f K_f}\tilde x]$, never as the difference of the
      summed $p_k$ and $p_k^2$ blocks: when the gate saturates ($p_k \to 1$) that difference cancels
      at the scale of the sums instead of per sample (measured: 10x the error on saturated gates,
      17x on the smallest eigenvalue).

    Both products are accumulated over blocks of ``_HESSIAN_BLOCK_ROWS`` samples; transient memory
    $O(\min(N, 2048)\, K_f (d+1) + n^2)$.
    """
    N, q = x1.shape
    n = n_free * q
    dtype, dev = x1.dtype, device_of(x1)
    cross = xp.zeros((n, n), dtype=dtype, device=dev)  # sum_i s r p_k p_l x~ x~^T, all (k, l)
    diag_rows = xp.zeros((q, n), dtype=dtype, device=dev)  # [X~^T diag(a_kk) X~]_k side by side
    for start in range(0, N, _HESSIAN_BLOCK_ROWS):  # blocks of samples (not one sample at a time)
        stop = min(start + _HESSIAN_BLOCK_ROWS, N)
        xb, pb, srb = x1[start:stop, :], p[start:stop, :n_free], sr[start:stop]
        nb = xb.shape[0]
        u = xp.reshape(pb[:, :, None] * (xp.sqrt(srb)[:, None] * xb)[:, None, :], (nb, n))  # (nb, Kf q) class-major
        cross = cross + xp.matmul(xp.matrix_transpose(u), u)
        w = srb[:, None] * (pb - pb * pb)  # (nb, Kf): a_kk per sample
        scaled = xp.reshape(w[:, :, None] * xb[:, None, :], (nb, n))  # (nb, Kf q)
        diag_rows = diag_rows + xp.matmul(xp.matrix_transpose(xb), scaled)
    diag = xp.permute_dims(xp.reshape(diag_rows, (q, n_free, q)), (1, 0, 2))  # (Kf, q, q)
    eye_k = xp.eye(n_free, dtype=dtype, device=dev)  # (Kf, Kf)
    on_diag = xp.reshape(eye_k[:, None, :, None] * xp.ones((1, q, 1, q), dtype=dtype, device=dev), (n, n)) > 0
    blocks = xp.reshape(eye_k[:, None, :, None] * diag[:, :, None, :], (n, n))  # (n, n) block diagonal
    m = xp.where(on_diag, blocks, -cross) + ridge * xp.eye(n, dtype=dtype, device=dev)  # (n, n)
    return 0.5 * (m + xp.matrix_transpose(m))


def fit_weighted_multinomial(
    x: Any,
    targets: Any,
    sample_weight: Any,
    weight: Any,
    bias: Any,
    *,
    parametrisation: str = "baseline",
    ridge: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-10,
    max_halvings: int = 30,
    single_step: bool = False,
) -> WeightedMultinomialFit:
    r"""Weighted multinomial logistic regression with soft targets, by Newton's method.

    Maximises

    $$F(\theta) = \sum_{i=1}^N s_i \sum_{k=1}^K t_{ik}\log g_k(x_i;\theta) - \frac{\rho}{2}\lVert\theta\rVert^2,
    \qquad \theta = (W, b) \text{ (free columns)},$$

    with the exact Newton step $\Delta = M^{+} \nabla F$, where, with $\tilde x_i = (x_i, 1)$,
    $r_i = \sum_k t_{ik}$ and $p_i = g(x_i;\theta)$,

    $$\nabla_{\theta_k} F = \sum_i s_i\,(t_{ik} - r_i p_{ik})\,\tilde x_i - \rho\,\theta_k, \qquad
    M_{kl} = -\nabla^2_{\theta_k\theta_l} F = \sum_i s_i r_i\,\big(\delta_{kl}p_{ik} - p_{ik}p_{il}\big)\,
    \tilde x_i\tilde x_i^\top + \rho\,\delta_{kl} I,$$

    (the IRLS of Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the EM Algorithm",
    Neural Computation 6(2):181-214, doi:10.1162/neco.1994.6.2.181, with the full
    $K-1$-class Hessian rather than one class at a time). Each step is halved until $F$ does not
    decrease, so the objective trace is non-decreasing; the iteration stops when the Newton decrement
    meets $\tfrac12 \nabla F^\top M^{+}\nabla F \le \mathrm{tol}\,(|F| + 1)$ (Boyd & Vandenberghe
    (2004), "Convex Optimization", Cambridge University Press, Section 9.5, Algorithm 9.5), i.e. when
    the predicted remaining gain is below ``tol`` relative to the objective.

    Parameters
    ----------
    x : array, shape (N, d)
        Gate inputs (no column of ones: the bias is separate).
    targets : array, shape (N, K)
        Non-negative soft targets $t_{ik}$: EM responsibilities, HME conditional posteriors or one-hot
        labels. A row summing to $r_i$ acts as a probability vector with observation weight $s_i r_i$.
    sample_weight : array, shape (N,), or None
        Non-negative observation weights $s_i$ (e.g. the parent node's posterior in HME EM); ``None``
        means all 1.
    weight : array, shape (d, K)
        Starting $W$.
    bias : array, shape (K,)
        Starting $b$. Under ``"baseline"`` a start with a non-zero last column is first moved to the
        equivalent baseline point $(w_k - w_K, b_k - b_K)$ (same probabilities).
    parametrisation : {"baseline", "symmetric"}
        See the module notes.
    ridge : float
        $\rho \ge 0$, on every free entry of $W$ and $b$ (bias included).
    max_iter : int
        Maximum number of Newton steps.
    tol : float
        Tolerance on the Newton decrement (relative to $|F| + 1$).
    max_halvings : int
        Maximum number of halvings of one step; if none of them gives $F_\text{new} \ge F$ the
        iteration stops at the current point (``stop_reason`` says so).
    single_step : bool
        Take one (halved if necessary) Newton step and return: a generalised-EM M-step that increases
        $F$ without maximising it (a GEM step: Dempster, Laird & Rubin 1977, Theorem 1, still
        guarantees that the likelihood does not decrease). Separation is not
        diagnosed in this mode.

    Returns
    -------
    WeightedMultinomialFit

    Warns
    -----
    GateSeparationWarning
        Separation detected (``ridge == 0`` only): after the iteration stopped, $F$ does not decrease
        ten units further along the direction of the last accepted step, and some fitted probability
        of a sample with positive weight is below $\sqrt{\varepsilon} \approx 1.5\times10^{-8}$.
    ConvergenceWarning
        ``max_iter`` full Newton steps ran without meeting the tolerance, without separation.

    Notes
    -----
    The Hessian is a $(K_f(d+1))^2$ matrix ($K_f = K-1$ or $K$), assembled without per-sample outer
    products: the blocks off the diagonal from one Gram matrix of the rows
    $(p_{i1}, \dots, p_{iK_f}) \otimes \sqrt{s_i r_i}\,\tilde x_i$, the diagonal blocks from their
    per-sample weights $s r (p_k - p_k^2)$, so that the cancellation of a saturated gate stays per
    sample (transient memory $O(N K_f (d+1))$). It is inverted through
    ``xp.linalg.eigh``; eigenvalues below $n\varepsilon\lambda_{\max}$ are treated as 0 (the
    pseudo-inverse), which gives the minimum-norm step for the symmetric parametrisation and for a
    rank-deficient design. Cost per step: $O(N K_f^2 (d+1)^2 + (K_f(d+1))^3)$; the first term
    dominates (two matmuls, over blocks of samples), the eigendecomposition is small for the sizes of a reference implementation.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.softmax_gate import fit_weighted_multinomial
    >>> x = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0]])
    >>> t = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    >>> fit = fit_weighted_multinomial(x, t, None, np.zeros((1, 2)), np.zeros(2))
    >>> fit.converged, fit.separated, fit.n_iter
    (True, False, 4)
    >>> np.round(fit.weight, 6).tolist(), np.round(fit.bias, 6).tolist()
    ([[-0.870139, 0.0]], [0.217676, 0.0])
    """
    xp = _check_problem(x, targets, sample_weight, weight, bias)
    check_choice(parametrisation, "parametrisation", PARAMETRISATIONS)
    ridge = _check_ridge(ridge)
    tol = _check_tol(tol)
    check_positive_int(max_iter, "max_iter")
    check_positive_int(max_halvings, "max_halvings", minimum=0)
    if not isinstance(single_step, bool):
        raise TypeError(f"single_step must be a bool, got {type(single_step).__name__}")

    N, d = x.shape
    K = weight.shape[1]
    q = d + 1
    dtype, dev = x.dtype, device_of(x)
    eps = float(xp.finfo(dtype).eps)
    x1 = xp.concat([x, xp.ones((N, 1), dtype=dtype, device=dev)], axis=1)  # (N, q)
    s = xp.ones((N,), dtype=dtype, device=dev) if sample_weight is None else sample_weight  # (N,)
    r = xp.sum(targets, axis=1)  # (N,)
    sr = s * r  # (N,)
    theta = xp.concat([weight, bias[None, :]], axis=0)  # (q, K)
    baseline = parametrisation == "baseline"
    if baseline:
        theta = theta - theta[:, K - 1 : K]  # equivalent point with a zero last column
    Kf = K - 1 if baseline else K
    free = theta[:, :Kf]  # (q, Kf)

    def full(f: Any) -> Any:
        if baseline:
            return xp.concat([f, xp.zeros((q, 1), dtype=dtype, device=dev)], axis=1)  # (q, K)
        return f

    def evaluate(f: Any) -> tuple[float, float, float, Any]:
        logp = log_softmax(xp.matmul(x1, full(f)), axis=1)  # (N, K)
        ll = xp.sum(s * _masked_sum(targets, logp, xp))
        pen = 0.5 * ridge * xp.sum(f * f)
        return float(ll - pen), float(ll), float(pen), logp

    def min_probability(logp: Any) -> float:
        p = xp.exp(logp)  # (N, K)
        return float(xp.min(xp.where(sr[:, None] > 0, p, xp.ones_like(p)))) if N > 0 else 1.0

    def result(f: Any, *, n_iter: int, converged: bool, separated: bool, F: float, ll: float, pen: float,
               trace: list, logp: Any, halvings: int, reason: str,
               pmin: float | None = None) -> WeightedMultinomialFit:
        th = full(f)  # (q, K)
        pmin = min_probability(logp) if pmin is None else pmin
        return WeightedMultinomialFit(
            weight=th[:d, :], bias=th[d, :], n_iter=n_iter, converged=converged, separated=separated,
            objective=F, loglik=ll, penalty=pen, objective_trace=tuple(trace), min_probability=pmin,
            n_halvings=halvings, stop_reason=reason,
        )

    F, ll, pen, logp = evaluate(free)
    trace = [F]
    if Kf == 0:  # one class under "baseline": nothing to fit
        return result(free, n_iter=0, converged=True, separated=False, F=F, ll=ll, pen=pen, trace=trace,
                      logp=logp, halvings=0, reason="converged: a single class has no free parameters")

    n = Kf * q
    st = s[:, None] * targets  # (N, K)

    def newton_direction(f: Any, logp: Any) -> tuple[Any, float]:
        p = xp.exp(logp)  # (N, K)
        resid = st - sr[:, None] * p  # (N, K)
        grad = xp.matmul(xp.matrix_transpose(x1), resid)[:, :Kf] - ridge * f  # (q, Kf)
        g = xp.reshape(xp.matrix_transpose(grad), (n,))  # (n,) class-major
        m = _minus_hessian(x1, p, sr, Kf, ridge, xp)  # (n, n): minus the Hessian of F
        lam, vec = xp.linalg.eigh(m)  # (n,), (n, n)
        thresh = max(float(xp.max(lam)), 0.0) * n * eps
        keep = lam > thresh
        inv = xp.where(keep, 1.0 / xp.where(keep, lam, xp.ones_like(lam)), xp.zeros_like(lam))  # (n,)
        delta = xp.matmul(vec, inv * xp.matmul(xp.matrix_transpose(vec), g))  # (n,)
        dec = float(xp.sum(g * delta))
        return xp.matrix_transpose(xp.reshape(delta, (Kf, q))), dec  # (q, Kf)

    n_iter, halvings = 0, 0
    converged, reason = False, ""
    last_step = None
    budget = max_iter
    while True:
        if single_step and n_iter >= 1:
            reason = "single Newton step taken"
            break
        delta, dec = newton_direction(free, logp)
        if 0.5 * dec <= tol * (abs(F) + 1.0):
            converged = True
            reason = f"converged: Newton decrement {0.5 * dec:.3e} <= tol * (|F| + 1) after {n_iter} steps"
            break
        if n_iter >= budget:
            reason = f"not converged: max_iter={max_iter} Newton steps ran"
            break
        step, accepted = 1.0, False
        for h in range(max_halvings + 1):
            cand = free + step * delta
            Fc, llc, penc, logpc = evaluate(cand)
            if Fc >= F:  # False for NaN
                accepted = True
                break
            step *= 0.5
            halvings += 1
        if not accepted:
            converged = 0.5 * dec <= math.sqrt(eps) * (abs(F) + 1.0)
            reason = (
                f"stopped: no step of {max_halvings} halvings increased the objective after {n_iter} steps "
                f"(Newton decrement {0.5 * dec:.3e}{', at round-off level' if converged else ''})"
            )
            break
        last_step = step * delta
        free, F, ll, pen, logp = cand, Fc, llc, penc, logpc
        trace.append(F)
        n_iter += 1

    separated = False
    pmin = min_probability(logp)
    if not single_step and ridge == 0.0 and last_step is not None:
        norm = float(xp.sqrt(xp.sum(last_step * last_step)))
        if pmin < _SATURATION and norm > 0:
            ahead, _, _, _ = evaluate(free + (_RECESSION_DISTANCE / norm) * last_step)
            separated = ahead >= F
    if separated:
        wnorm = float(xp.sqrt(xp.sum(free * free)))
        warnings.warn(
            "weighted multinomial fit is separated: the objective still increases along the direction of "
            f"the last Newton steps (|(W, b)| = {wnorm:.3g}, smallest fitted probability "
            f"{pmin:.3e}); the maximum-likelihood weights do not exist (they diverge). "
            "Use ridge > 0 for a finite maximiser",
            GateSeparationWarning,
            stacklevel=2,
        )
    elif not converged and not single_step and n_iter >= max_iter:
        warnings.warn(
            f"fit_weighted_multinomial did not converge in max_iter={max_iter} Newton steps "
            f"(Newton decrement {0.5 * dec:.3e})",
            ConvergenceWarning,
            stacklevel=2,
        )
    return result(free, n_iter=n_iter, converged=converged, separated=separated, F=F, ll=ll, pen=pen,
                  trace=trace, logp=logp, halvings=halvings, reason=reason, pmin=pmin)


# --------------------------------------------------------------------------------------------
# The gate family
# --------------------------------------------------------------------------------------------


class SoftmaxGateParams(NamedTuple):
    """Parameters of a softmax gate over $K$ experts on $d$ inputs.

    Attributes
    ----------
    weight : array, shape (d, K)
        Column $k$ is $w_k$ (last column 0 under the baseline parametrisation).
    bias : array, shape (K,)
    """

    weight: Any
    bias: Any


@dataclass(frozen=True)
class SoftmaxGate:
    r"""The softmax gate as a [`GateFamily`][moeref.families.GateFamily].

    $$\ell_k(x) = \log g_k(x) = x^\top w_k + b_k - \log\sum_{j=1}^K \exp(x^\top w_j + b_j),$$

    Jacobs et al. (1991), Neural Computation 3(1):79-87, doi:10.1162/neco.1991.3.1.79;
    Jordan & Jacobs (1994), Neural Computation 6(2):181-214, doi:10.1162/neco.1994.6.2.181. Its M-step
    is [`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial] with the
    responsibilities as targets and unit observation weights.

    Attributes
    ----------
    parametrisation : {"baseline", "symmetric"}
        ``"baseline"`` (default): class $K$ fixed at 0, as meteorits (flexmix fixes class 1: subtract
        the first column to compare).
    ridge : float
        $\rho \ge 0$: the M-step maximises $Q - \frac{\rho}{2}\lVert(W, b)\rVert^2$, so EM maximises
        the penalised log-likelihood $L - $ [`penalty`][moeref.softmax_gate.SoftmaxGate.penalty]
        (a MAP estimate under a Gaussian prior); the MoE driver reports the penalty separately.
    newton : {"full", "single_step"}
        Newton to convergence (an exact M-step: EM), or one Newton step per EM iteration
        (generalised EM; still monotone because of step halving).
    max_iter, tol, max_halvings
        Passed to [`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial].
    name : str

    Notes
    -----
    ``n_free_parameters`` is $(K-1)(d+1)$ for **both** parametrisations: the symmetric one has $K(d+1)$
    numbers but the same set of gate functions (the likelihood does not see the sum of the columns).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams
    >>> gate = SoftmaxGate()
    >>> p = SoftmaxGateParams(np.array([[1.0, 0.0]]), np.zeros(2))
    >>> np.round(np.exp(gate.log_weights(p, np.array([[0.0], [2.0]]))), 4).tolist()
    [[0.5, 0.5], [0.8808, 0.1192]]
    >>> gate.n_free_parameters(p)
    2
    """

    parametrisation: str = "baseline"
    ridge: float = 0.0
    newton: str = "full"
    max_iter: int = 100
    tol: float = 1e-10
    max_halvings: int = 30
    name: str = "softmax"
    models_x: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_choice(self.parametrisation, "parametrisation", PARAMETRISATIONS)
        check_choice(self.newton, "newton", ("full", "single_step"))
        _check_ridge(self.ridge)
        _check_tol(self.tol)
        check_positive_int(self.max_iter, "max_iter")
        check_positive_int(self.max_halvings, "max_halvings", minimum=0)

    def _check(self, params: Any, x: Any) -> Any:
        check_record_type(params, "params", SoftmaxGateParams)
        xp = check_arrays({"x": x, "params.weight": params.weight, "params.bias": params.bias})
        check_float_array(x, "x", ndim=2)
        check_gate_params(params.weight, params.bias, x.shape[1])
        return xp

    def log_weights(self, params: SoftmaxGateParams, x: Any) -> Any:
        r"""$\ell_{ik} = \log\operatorname{softmax}_k(x_i^\top W + b)$, shape (N, K) (rows log-sum-exp to 0)."""
        xp = self._check(params, x)
        return log_softmax(xp.matmul(x, params.weight) + params.bias, axis=1)  # (N, K)

    def log_weights_vjp(self, params: SoftmaxGateParams, x: Any, cotangent: Any) -> SoftmaxGateParams:
        r"""VJP of `log_weights` with respect to ``params`` (all $K$ columns, as stored).

        With $c$ the cotangent (N, K), $g = \operatorname{softmax}(xW + b)$ and
        $\bar u_{ik} = c_{ik} - g_{ik}\sum_j c_{ij}$:

        $$\bar W = x^\top \bar u, \qquad \bar b = \sum_i \bar u_i .$$

        The baseline constraint is not applied here (it is a derivative with respect to the record's
        fields); [`constrained_vjp`][moeref.softmax_gate.SoftmaxGate.constrained_vjp] drops the fixed
        column.
        """
        xp = self._check(params, x)
        check_cotangent(cotangent, (x.shape[0], params.weight.shape[1]), like=x)
        logp = log_softmax(xp.matmul(x, params.weight) + params.bias, axis=1)  # (N, K)
        u_bar = log_softmax_vjp(xp.exp(logp), cotangent, axis=1)  # (N, K)
        return SoftmaxGateParams(weight=xp.matmul(xp.matrix_transpose(x), u_bar), bias=xp.sum(u_bar, axis=0))

    def m_step(self, params: SoftmaxGateParams, x: Any, responsibilities: Any) -> SoftmaxGateParams:
        r"""$\arg\max_{W,b} \sum_{i,k}\tau_{ik}\log g_k(x_i) - \frac{\rho}{2}\lVert(W,b)\rVert^2$, from ``params``.

        One Newton step only when ``newton="single_step"`` (generalised EM).
        """
        self._check(params, x)
        fit = fit_weighted_multinomial(
            x, responsibilities, None, params.weight, params.bias,
            parametrisation=self.parametrisation, ridge=self.ridge, max_iter=self.max_iter, tol=self.tol,
            max_halvings=self.max_halvings, single_step=self.newton == "single_step",
        )
        return SoftmaxGateParams(weight=fit.weight, bias=fit.bias)

    def _check_record(self, params: Any) -> Any:
        """The record alone (no ``x``): types and shapes, weight (d, K) and bias (K,), one library and dtype."""
        check_record_type(params, "params", SoftmaxGateParams)
        check_float_array(params.weight, "params.weight", ndim=2)
        check_gate_params(params.weight, params.bias, params.weight.shape[0])
        return array_namespace(params.weight, params.bias, names=("params.weight", "params.bias"))

    def n_free_parameters(self, params: SoftmaxGateParams) -> int:
        """$(K-1)(d+1)$ (for both parametrisations)."""
        self._check_record(params)
        d, K = params.weight.shape
        return (K - 1) * (d + 1)

    def penalty(self, params: SoftmaxGateParams) -> Any:
        r"""$\frac{\rho}{2}\big(\lVert W\rVert_F^2 + \lVert b\rVert^2\big)$, a 0-d array (0 without a ridge)."""
        xp = self._check_record(params)
        check_finite(params.weight, "params.weight")
        check_finite(params.bias, "params.bias")
        return self._penalty(params, xp)

    def _penalty(self, params: SoftmaxGateParams, xp: Any) -> Any:
        """[`penalty`][moeref.softmax_gate.SoftmaxGate.penalty] without argument checks (EM loops)."""
        return 0.5 * self.ridge * (xp.sum(params.weight * params.weight) + xp.sum(params.bias * params.bias))

    def penalty_vjp(self, params: SoftmaxGateParams) -> SoftmaxGateParams:
        r"""Gradient of [`penalty`][moeref.softmax_gate.SoftmaxGate.penalty]: $\rho\,(W, b)$."""
        return SoftmaxGateParams(weight=self.ridge * params.weight, bias=self.ridge * params.bias)

    # unconstrained view, used by gradient ascent (moeref.moe_em.fit_moe_gradient)
    def unconstrained(self, params: SoftmaxGateParams) -> SoftmaxGateParams:
        """The free parameters: the first $K-1$ columns under ``"baseline"`` (after moving to the
        equivalent baseline point), all of them under ``"symmetric"``."""
        if self.parametrisation == "symmetric":
            return params
        K = params.weight.shape[1]
        w = params.weight - params.weight[:, K - 1 : K]
        b = params.bias - params.bias[K - 1 : K]
        return SoftmaxGateParams(weight=w[:, : K - 1], bias=b[: K - 1])

    def constrained(self, free: SoftmaxGateParams) -> SoftmaxGateParams:
        """Inverse of [`unconstrained`][moeref.softmax_gate.SoftmaxGate.unconstrained]: append the zero column."""
        if self.parametrisation == "symmetric":
            return free
        xp = array_namespace(free.weight, free.bias, names=("free.weight", "free.bias"))
        d = free.weight.shape[0]
        dt, dev = free.weight.dtype, device_of(free.weight)
        return SoftmaxGateParams(
            weight=xp.concat([free.weight, xp.zeros((d, 1), dtype=dt, device=dev)], axis=1),
            bias=xp.concat([free.bias, xp.zeros((1,), dtype=dt, device=dev)], axis=0),
        )

    def constrained_vjp(self, free: SoftmaxGateParams, params_bar: SoftmaxGateParams) -> SoftmaxGateParams:
        """Pull a cotangent of the stored params back to the free ones (drop the fixed column)."""
        if self.parametrisation == "symmetric":
            return params_bar
        K = params_bar.weight.shape[1]
        return SoftmaxGateParams(weight=params_bar.weight[:, : K - 1], bias=params_bar.bias[: K - 1])

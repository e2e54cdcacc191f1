r"""The constant gate: input-independent mixing proportions, as a gate family.

$$g_k(x) = \lambda_k = \frac{\pi_k}{\sum_{j=1}^K \pi_j}, \qquad \pi_k \ge 0,$$

the gate of a finite mixture of regressions (mixtools' ``regmixEM``, flexmix without a
concomitant model): Benaglia, Chauveau, Hunter & Young (2009), "mixtools: An R Package for
Analyzing Finite Mixture Models", Journal of Statistical Software 32(6), doi:10.18637/jss.v032.i06,
Section 5.2, eq. (12). With it, [`fit_moe`][moeref.moe_em.fit_moe] and linear-Gaussian experts fit
the same model as [`fit_regression_mixture`][moeref.regression_mixture.fit_regression_mixture].

Conventions
-----------
* ``params.weights`` holds the proportions $\pi_k$ themselves (not logs), shape ``(K,)``;
  [`log_weights`][moeref.constant_gate.ConstantGate.log_weights] normalises them, so any
  non-negative vector with a positive sum is a valid gate and the M-step returns a normalised one.
  A zero proportion has log-weight $-\infty$ and stays 0 under EM.
* The closed-form M-step is the mean responsibility $\lambda_k = \frac1N\sum_i\tau_{ik}$
  (Benaglia et al. 2009, eq. (4)).
* The unconstrained view for gradient ascent is the baseline logit
  $\eta_k = \log\lambda_k - \log\lambda_K$, $k < K$.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .core import array_namespace, device_of, softmax, softmax_vjp
from .em import EmptyComponentError
from .validation import check_arrays, check_cotangent, check_float_array, check_record_type, check_shape, concrete_bool

__all__ = ["ConstantGateParams", "ConstantGate"]


class ConstantGateParams(NamedTuple):
    """Parameters of a constant gate over $K$ experts.

    Attributes
    ----------
    weights : array, shape (K,)
        Mixing proportions $\\pi_k \\ge 0$ (normalised by the gate; a fit returns $\\sum_k\\pi_k = 1$).
    """

    weights: Any


def _safe_log(a: Any, xp: Any) -> Any:
    positive = a > 0
    return xp.where(positive, xp.log(xp.where(positive, a, xp.ones_like(a))), xp.full_like(a, -math.inf))


@dataclass(frozen=True)
class ConstantGate:
    r"""Constant mixing proportions as a [`GateFamily`][moeref.families.GateFamily].

    $$\ell_k(x) = \log\lambda_k = \log\pi_k - \log\sum_j\pi_j \quad\text{for every } x .$$

    Benaglia et al. (2009), JSS 32(6), doi:10.18637/jss.v032.i06, Section 5.2, eq. (12) (the
    $\lambda_k$ of the mixture of regressions) and eq. (4) (their M-step).

    Attributes
    ----------
    min_weight : float
        The M-step raises [`EmptyComponentError`][moeref.em.EmptyComponentError] when some
        $\lambda_k$ falls below it (mixtools restarts when ``lambda < 1e-08``).
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.constant_gate import ConstantGate, ConstantGateParams
    >>> gate = ConstantGate()
    >>> np.round(np.exp(gate.log_weights(ConstantGateParams(np.array([1.0, 3.0])), np.zeros((2, 1)))), 12).tolist()
    [[0.25, 0.75], [0.25, 0.75]]
    >>> gate.m_step(None, np.zeros((2, 1)), np.array([[0.25, 0.75], [0.75, 0.25]])).weights.tolist()
    [0.5, 0.5]
    """

    min_weight: float = 1e-8
    name: str = "constant"
    models_x: ClassVar[bool] = False

    def __post_init__(self) -> None:
        v = self.min_weight
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < math.inf):
            raise ValueError(f"min_weight must be a finite non-negative float, got {v!r}")

    def _check(self, params: Any, x: Any) -> Any:
        check_record_type(params, "params", ConstantGateParams)
        xp = check_arrays({"x": x, "params.weights": params.weights})
        check_float_array(x, "x", ndim=2)
        check_float_array(params.weights, "params.weights", ndim=1)
        if concrete_bool(xp.all(params.weights >= 0)) is False:
            raise ValueError("params.weights must be non-negative (mixing proportions)")
        if concrete_bool(xp.sum(params.weights) > 0) is False:
            raise ValueError("params.weights must have a positive sum")
        return xp

    def log_weights(self, params: ConstantGateParams, x: Any) -> Any:
        r"""$\ell_{ik} = \log\pi_k - \log\sum_j\pi_j$, broadcast to shape (N, K) (``x`` gives $N$)."""
        xp = self._check(params, x)
        w = params.weights
        row = _safe_log(w, xp) - xp.log(xp.sum(w))  # (K,)
        return xp.zeros((x.shape[0], w.shape[0]), dtype=w.dtype, device=device_of(w)) + row  # (N, K)

    def log_weights_vjp(self, params: ConstantGateParams, x: Any, cotangent: Any) -> ConstantGateParams:
        r"""VJP of `log_weights`: with $c$ the cotangent (N, K), $C_k = \sum_i c_{ik}$ and $S = \sum_j \pi_j$,

        $$\bar\pi_k = \frac{C_k}{\pi_k} - \frac{\sum_j C_j}{S}.$$

        At $\pi_k = 0$ the log-weight is the constant $-\infty$; its first term is returned as 0 there.
        """
        xp = self._check(params, x)
        w = params.weights
        check_cotangent(cotangent, (x.shape[0], w.shape[0]), like=x)
        c = xp.sum(cotangent, axis=0)  # (K,)
        positive = w > 0
        first = xp.where(positive, c / xp.where(positive, w, xp.ones_like(w)), xp.zeros_like(w))
        return ConstantGateParams(weights=first - xp.sum(c) / xp.sum(w))

    def m_step(self, params: Any, x: Any, responsibilities: Any) -> ConstantGateParams:
        r"""$\lambda_k = \frac1N\sum_i \tau_{ik}$ (closed form; ``params`` is not needed)."""
        xp = check_arrays({"x": x, "responsibilities": responsibilities})
        check_float_array(x, "x", ndim=2)
        check_float_array(responsibilities, "responsibilities", ndim=2)
        N, K = responsibilities.shape
        check_shape(responsibilities, "responsibilities", (x.shape[0], K), what=f"x has N={x.shape[0]} rows")
        lam = xp.mean(responsibilities, axis=0)  # (K,)
        if concrete_bool(xp.any(lam < self.min_weight)):
            k = next(k for k in range(K) if concrete_bool(lam[k] < self.min_weight))
            raise EmptyComponentError(
                f"component {k} has mixing weight {float(lam[k]):.3e} < min_weight={self.min_weight:g} (it is empty)"
            )
        return ConstantGateParams(weights=lam)

    def n_free_parameters(self, params: ConstantGateParams) -> int:
        """$K - 1$."""
        return int(params.weights.shape[0]) - 1

    # unconstrained view, used by gradient ascent (moeref.moe_em.fit_moe_gradient)
    def unconstrained(self, params: ConstantGateParams) -> ConstantGateParams:
        r"""Baseline logits $\eta_k = \log\pi_k - \log\pi_K$, shape (K-1,) (needs $\pi > 0$)."""
        xp = array_namespace(params.weights, names=("params.weights",))
        if concrete_bool(xp.all(params.weights > 0)) is False:
            raise ValueError("the unconstrained view needs positive params.weights (a zero weight has logit -inf)")
        logw = xp.log(params.weights)
        K = params.weights.shape[0]
        return ConstantGateParams(weights=logw[: K - 1] - logw[K - 1])

    def constrained(self, free: ConstantGateParams) -> ConstantGateParams:
        r"""$\lambda = \operatorname{softmax}(\eta_1, \dots, \eta_{K-1}, 0)$."""
        xp = array_namespace(free.weights, names=("free.weights",))
        zero = xp.zeros((1,), dtype=free.weights.dtype, device=device_of(free.weights))
        return ConstantGateParams(weights=softmax(xp.concat([free.weights, zero], axis=0)))

    def constrained_vjp(self, free: ConstantGateParams, params_bar: ConstantGateParams) -> ConstantGateParams:
        r"""$\bar\eta_k = \lambda_k(\bar\lambda_k - \sum_j\lambda_j\bar\lambda_j)$, $k < K$."""
        lam = self.constrained(free).weights
        K = lam.shape[0]
        return ConstantGateParams(weights=softmax_vjp(lam, params_bar.weights)[: K - 1])

"""meteorits' temperature-anomaly example: a normal mixture of experts (NMoE) with K = 2 linear experts
and a linear (logistic) gate on the year.

Chamroukhi (2016), "Robust mixture of experts modeling using the t distribution", Neural Networks
79:20-36, doi:10.1016/j.neunet.2016.03.002 (the NMoE model and its EM), as fitted in the README of
the R package meteorits (fchamroukhi/MEteorits, ``README.md`` at commit 3333c0e8), on
``data(tempanomalies)`` (136 GISTEMP annual anomalies, 1880-2015; moeref's
``load_dataset("tempanomalies_meteorits")``), with the raw year as covariate (no scaling):

    R> nmoe <- emNMoE(X = x, Y = y, K = 2, p = 1, q = 1, verbose = TRUE)
    #> EM NMoE: Iteration: 55 | log-likelihood: 102.720726493594
    R> nmoe$summary()
    #>  log-likelihood df      AIC      BIC      ICL
    #>        102.7207  8 94.72073 83.07011 83.18325
    #>  Clustering table:   1: 52   2: 84
    #>      Beta(k = 1)   Beta(k = 2)
    #> 1   -42.36262495 -12.667344766
    #> X^1   0.02149294   0.006474835
    #>  Sigma2(k = 1) Sigma2(k = 2)
    #>     0.01193082     0.0135232

meteorits' conventions (its ``R/emNMoE.R``, ``R/ParamNMoE.R``, ``R/StatNMoE.R``, and the Rcpp
``IRLS(X, Tau, Gamma, Winit, verbose)`` that ``src/RcppExports.cpp`` exports; its body was read from
a stored copy of Chamroukhi's Rcpp IRLS with that signature):

* the gate is a logistic regression on $(1, t)$ with class $K$ as baseline (moeref's
  ``SoftmaxGate(parametrisation="baseline")``); its M-step is IRLS (Newton-Raphson with step halving)
  under a tiny Gaussian prior, $\\lambda = 10^{-9}$ on **all** gate coefficients, intercept included;
* the printed "log-likelihood" is the MAP criterion $L - \\lambda\\lVert\\alpha\\rVert^2$
  (``reg_irls = -lambda * norm(W)^2``); AIC $= L - \\mathrm{df}$ and BIC $= L - \\frac{\\mathrm{df}}2\\log n$
  (larger is better);
* **but** the Newton step maximises $Q - \\frac\\lambda2\\lVert\\alpha\\rVert^2$ (Hessian $+\\lambda I$,
  gradient $-\\lambda\\alpha$) while the step-halving test and the reported value use
  $\\lambda\\lVert\\alpha\\rVert^2$; EM stops when $|\\Delta/L^{(t-1)}| \\le 10^{-6}$;
* the start is random (``runif``), so the printed run cannot be replayed.

**Why $\\lambda = 10^{-9}$ matters here.** With the raw year ($t \\approx 2000$) the two regimes are
separated by a single change year, and without any penalty the likelihood has no maximiser: the gate
sharpens into a hard switch ($\\lVert\\alpha\\rVert \\to \\infty$) and $L$ climbs to the supremum of the
two-segment regression, $L^\\sharp = 102.943047$. The intercept needed for a sharp switch at
$t \\approx 1960$ is $\\approx 10^4$, so even $\\lambda = 10^{-9}$ costs $\\approx 0.1$ nats and stops
the gate at a finite slope. What this file shows:

1. moeref's ``SoftmaxGate(ridge=2e-9)`` (moeref's penalty is $\\frac\\rho2\\lVert(W,b)\\rVert^2$, so
   $\\rho = 2\\lambda$ is meteorits' printed criterion) has the maximum $102.72447$ of that criterion,
   $0.0038$ above the printed value, with the printed expert parameters to 4-5 significant digits
   and the printed clustering;
2. meteorits' own gate M-step (the inconsistent $\\lambda/2$ vs $\\lambda$ Newton with halving, plugged
   into ``fit_moe`` as a test-local gate family) and its stopping rule, from random-partition starts
   drawn with NumPy, stop in a band $[102.719, 102.722]$ around the printed value, and one documented
   start stops at the printed value to its printed precision;
3. unpenalised (``SoftmaxGate()``), EM passes the printed value, warns ``GateSeparationWarning``,
   saturates the gate probabilities and approaches $L^\\sharp$ from below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from moeref.datasets import load_dataset
from moeref.em import EMOptions
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.moe_em import MoEParams, fit_moe
from moeref.softmax_gate import GateSeparationWarning, SoftmaxGate, SoftmaxGateParams

PRINTED = {
    "loglik": 102.7207,  # "log-likelihood" of the summary (the MAP criterion, see the module notes)
    "loglik_trace_last": 102.720726493594,  # iteration 55 of the verbose trace
    "n_iter": 55,
    "df": 8,
    "aic": 94.72073,
    "bic": 83.07011,
    "icl": 83.18325,
    "sizes": (52, 84),
    # (intercept, slope on the year) per expert, and the variances
    "beta": np.array([[-42.36262495, 0.02149294], [-12.667344766, 0.006474835]]),
    "sigma2": np.array([0.01193082, 0.0135232]),
}
LAMBDA = 1e-9  # meteorits' IRLS prior, fixed in its source
N = 136

# moeref's numbers (EM to |dL| < 1e-12)
CRITERION_MAX = 102.724472  # max of L - LAMBDA ||alpha||^2, i.e. SoftmaxGate(ridge=2 * LAMBDA)
HARD_SWITCH_SUP = 102.943047  # sup of the unpenalised L: the best two-segment regression

EXPERTS = LinearGaussianExperts(covariance="isotropic")
TIGHT = EMOptions(criterion="absolute", tol=1e-12, max_iter=2000)


def _data():
    d = load_dataset("tempanomalies_meteorits")
    x = np.asarray(d["Year"], dtype=np.float64)[:, None]  # (136, 1), raw years as meteorits uses them
    y = np.asarray(d["AnnualAnomaly"], dtype=np.float64)[:, None]  # (136, 1)
    return x, y


def _printed_start() -> MoEParams:
    """The printed expert parameters and a flat gate (meteorits' first try starts the gate at 0)."""
    b = PRINTED["beta"]
    experts = LinearGaussianExpertsParams(b[:, 1].reshape(2, 1, 1), b[:, :1].copy(), PRINTED["sigma2"].copy())
    return MoEParams(SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), experts)


def _random_partition_start(seed: int) -> MoEParams:
    """meteorits' ``initParam(segmental = FALSE)``: a uniform random hard partition, least squares per
    class, a flat gate. Drawn with NumPy ``default_rng(seed)`` (R's draw cannot be replayed)."""
    x, y = _data()
    klas = np.random.default_rng(seed).integers(0, 2, size=N)
    X = np.column_stack([np.ones(N), x[:, 0]])
    coef, var = np.zeros((2, 2)), np.zeros(2)
    for k in range(2):
        Xk, yk = X[klas == k], y[klas == k, 0]
        coef[k] = np.linalg.lstsq(Xk, yk, rcond=None)[0]
        var[k] = np.mean((yk - Xk @ coef[k]) ** 2)
    experts = LinearGaussianExpertsParams(coef[:, 1].reshape(2, 1, 1), coef[:, :1].copy(), var)
    return MoEParams(SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), experts)


def _experts_table(params) -> np.ndarray:
    """(intercept, slope) per expert, ordered as meteorits prints them (the steeper, later regime first)."""
    e = params.experts
    tab = np.column_stack([e.bias[:, 0], e.weight[:, 0, 0], e.cov])  # (2, 3)
    return tab[np.argsort(-tab[:, 1])]


# ------------------------------------------------------------------------------------------
# meteorits' gate M-step, as a test-local gate family (NumPy only)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MeteoritsGate:
    """SoftmaxGate with meteorits' IRLS M-step: Newton for $Q - \\frac\\lambda2\\lVert\\alpha\\rVert^2$,
    step halving and stopping on $Q - \\lambda\\lVert\\alpha\\rVert^2$ (relative 1e-7 or absolute 1e-6,
    at most 300 steps), and the penalty $\\lambda\\lVert\\alpha\\rVert^2$ that meteorits reports."""

    lam: float = LAMBDA
    inner: SoftmaxGate = SoftmaxGate()
    name: str = "softmax (meteorits IRLS)"
    models_x: bool = False

    def log_weights(self, params, x):
        return self.inner.log_weights(params, x)

    def log_weights_vjp(self, params, x, cotangent):
        return self.inner.log_weights_vjp(params, x, cotangent)

    def n_free_parameters(self, params):
        return self.inner.n_free_parameters(params)

    def penalty(self, params):
        return self.lam * (np.sum(params.weight[:, 0] ** 2) + params.bias[0] ** 2)

    def m_step(self, params, x, tau):
        X = np.column_stack([np.ones(x.shape[0]), x[:, 0]])  # (N, 2): meteorits' (1, t)
        w = np.array([params.bias[0] - params.bias[1], params.weight[0, 0] - params.weight[0, 1]])

        def crit(w):  # Q_gate - lam ||w||^2, and P(class 1)
            a = X @ w
            ll = tau[:, 0] @ (a - np.logaddexp(a, 0.0)) - tau[:, 1] @ np.logaddexp(a, 0.0)
            return ll - self.lam * (w @ w), np.exp(a - np.logaddexp(a, 0.0))

        old, p = crit(w)
        for _ in range(300):
            grad = X.T @ (tau[:, 0] - p) - self.lam * w  # the lam/2 prior's gradient
            hess = -(X.T * (p * (1 - p))) @ X + self.lam * np.eye(2)
            step = np.linalg.solve(hess, grad)
            s = 1.0
            new, p_new = crit(w - step)
            while new < old and s > 2.0**-60:  # meteorits halves until the lam-criterion does not drop
                s /= 2
                new, p_new = crit(w - s * step)
            if new < old:  # no acceptable step: stay
                break
            done = abs((new - old) / old) <= 1e-7 or abs(new - old) <= 1e-6
            w, p, old = w - s * step, p_new, new
            if done:
                break
        return SoftmaxGateParams(np.array([[w[1], 0.0]]), np.array([w[0], 0.0]))


# meteorits' EM rule |dL / L_prev| <= 1e-6 (moeref's "relative" divides by |L| + 0.1: the same to
# 0.1 %), at most 1500 iterations; its decrease check tolerates 1e-5
METEORITS = EMOptions(criterion="relative", tol=1e-6, max_iter=1500, warn_not_converged=False, decrease_rtol=1e-6)


# ------------------------------------------------------------------------------------------
# 1. The maximum of meteorits' printed criterion, with moeref's ridge
# ------------------------------------------------------------------------------------------


def test_ridge_two_lambda_maximises_the_printed_criterion_just_above_the_printed_value():
    x, y = _data()
    fit = fit_moe(x, y, SoftmaxGate(ridge=2 * LAMBDA), EXPERTS, _printed_start(), options=TIGHT)
    assert fit.converged and fit.decreases == ()
    assert fit.n_free_parameters == PRINTED["df"]
    # moeref's penalty rho/2 ||(W, b)||^2 with rho = 2 lambda is meteorits' reg_irls = -lambda ||alpha||^2
    alpha = np.array([fit.params.gate.bias[0], fit.params.gate.weight[0, 0]])
    assert fit.penalty == pytest.approx(LAMBDA * alpha @ alpha, rel=1e-12)
    assert fit.penalised_loglik == pytest.approx(CRITERION_MAX, abs=1e-6)
    gap = fit.penalised_loglik - PRINTED["loglik"]
    assert 0 < gap < 5e-3  # the printed run stopped 0.0038 below the maximum of its criterion
    # the gate is a sharp but finite switch: |alpha| ~ 1.1e4, the change year -b/w ~ 1963
    assert 1e4 < np.linalg.norm(alpha) < 1.3e4
    assert 1960 < -alpha[0] / alpha[1] < 1966
    # the printed experts to 4-5 significant digits, the printed clustering exactly
    tab = _experts_table(fit.params)
    np.testing.assert_allclose(tab[:, :2], PRINTED["beta"], rtol=2e-4)
    np.testing.assert_allclose(tab[:, 2], PRINTED["sigma2"], rtol=2e-4)
    sizes = np.bincount(np.argmax(fit.responsibilities, axis=1), minlength=2)
    assert tuple(sorted(sizes)) == PRINTED["sizes"]


def test_printed_information_criteria_follow_meteorits_conventions():
    """AIC = L - df and BIC = L - df log(n) / 2 of the printed (penalised) value; moeref's are -2 x."""
    assert round(PRINTED["loglik"] - PRINTED["df"], 4) == round(PRINTED["aic"], 4)
    assert round(PRINTED["loglik"] - PRINTED["df"] * math.log(N) / 2, 4) == round(PRINTED["bic"], 4)
    x, y = _data()
    fit = fit_moe(x, y, SoftmaxGate(ridge=2 * LAMBDA), EXPERTS, _printed_start(), options=TIGHT)
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * 8, abs=1e-9)  # from the unpenalised L
    assert fit.bic == pytest.approx(-2 * fit.loglik + 8 * math.log(N), abs=1e-9)


# ------------------------------------------------------------------------------------------
# 2. meteorits' own M-step and stopping rule: the printed value is where its EM stops
# ------------------------------------------------------------------------------------------

SEED = 0  # a random-partition start whose meteorits-rule run stops at the printed value


def test_meteorits_irls_and_stopping_rule_reproduce_the_printed_value():
    x, y = _data()
    fit = fit_moe(x, y, _MeteoritsGate(), EXPERTS, _random_partition_start(SEED), options=METEORITS)
    assert fit.converged
    assert round(fit.penalised_loglik, 4) == PRINTED["loglik"]
    # printed: 55 iterations from R's own random start (meteorits counts E-step + M-step as one
    # iteration, as moeref does); that this start also takes 55 is a coincidence of the draw
    assert fit.n_iter == PRINTED["n_iter"]
    tab = _experts_table(fit.params)
    np.testing.assert_allclose(tab[:, :2], PRINTED["beta"], rtol=5e-5)
    np.testing.assert_allclose(tab[:, 2], PRINTED["sigma2"], rtol=1e-4)
    sizes = np.bincount(np.argmax(fit.responsibilities, axis=1), minlength=2)
    assert tuple(sorted(sizes)) == PRINTED["sizes"]
    assert fit.penalised_loglik < CRITERION_MAX  # stopped below the maximum of its criterion
    # meteorits' criteria of this fit: AIC and BIC from the penalised value, to the precision of the
    # printed log-likelihood (this run stops 7e-5 below the printed trace's last value); ICL from the
    # complete-data log-likelihood of the MAP labels (no penalty), which depends on the stopping point
    # more: within 0.01 of the printed value
    assert abs(fit.penalised_loglik - 8 - PRINTED["aic"]) < 1e-4
    assert abs(fit.penalised_loglik - 4 * math.log(N) - PRINTED["bic"]) < 1e-4
    a = SoftmaxGate().log_weights(fit.params.gate, x) + EXPERTS.log_density(fit.params.experts, x, y)  # (136, 2)
    complete = float(np.sum(np.max(a, axis=1)))
    assert abs(complete - 4 * math.log(N) - PRINTED["icl"]) < 1e-2


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_meteorits_rule_stops_in_a_band_around_the_printed_value(seed):
    x, y = _data()
    fit = fit_moe(x, y, _MeteoritsGate(), EXPERTS, _random_partition_start(seed), options=METEORITS)
    assert 102.718 < fit.penalised_loglik < CRITERION_MAX
    assert abs(fit.penalised_loglik - PRINTED["loglik"]) < 3e-3


# ------------------------------------------------------------------------------------------
# 3. Unpenalised: no maximiser, the gate becomes a hard switch
# ------------------------------------------------------------------------------------------


def _two_segment_supremum(x: np.ndarray, y: np.ndarray) -> float:
    """sup L of the unpenalised NMoE: the best split year, a Gaussian linear regression on each side
    (every side with at least 3 points, so that the variances stay positive)."""
    t, yy = x[:, 0], y[:, 0]
    best = -np.inf
    for m in range(3, N - 2):  # loop over split positions, not samples
        total = 0.0
        for sl in (slice(0, m), slice(m, N)):
            X = np.column_stack([np.ones_like(t[sl]), t[sl]])
            r = yy[sl] - X @ np.linalg.lstsq(X, yy[sl], rcond=None)[0]
            n = r.size
            total += -0.5 * n * (math.log(2 * math.pi * (r @ r) / n) + 1)
        best = max(best, total)
    return best


def test_unpenalised_em_passes_the_printed_value_towards_the_hard_switch_supremum():
    x, y = _data()
    sup = _two_segment_supremum(x, y)
    assert sup == pytest.approx(HARD_SWITCH_SUP, abs=1e-6)
    with pytest.warns(GateSeparationWarning):
        fit = fit_moe(x, y, SoftmaxGate(), EXPERTS, _printed_start(),
                      options=EMOptions(criterion="absolute", tol=1e-10, max_iter=2000))
    trace = np.asarray(fit.loglik_trace)
    assert fit.penalty == 0.0 and np.all(np.diff(trace) >= -1e-10)
    assert trace[-1] > PRINTED["loglik"] + 0.2  # well above the printed (penalised) value ...
    assert trace[-1] > CRITERION_MAX
    assert sup - 1e-4 < trace[-1] <= sup + 1e-9  # ... and up to the supremum, never beyond
    # the gate saturates: probabilities numerically 0 and 1, far larger coefficients than with the ridge
    g = np.exp(SoftmaxGate().log_weights(fit.params.gate, x))  # (136, 2)
    assert g.min() == 0.0 and g.max() == 1.0
    top = np.max(g, axis=1)  # (136,)
    assert np.all(top > 1 - 1e-6) and np.sum(top > 1 - 1e-12) >= 134
    ridge = fit_moe(x, y, SoftmaxGate(ridge=2 * LAMBDA), EXPERTS, _printed_start(), options=TIGHT)
    g_ridge = np.exp(SoftmaxGate().log_weights(ridge.params.gate, x))  # (136, 2)
    assert np.min(np.max(g_ridge, axis=1)) < 0.95  # with the prior, the years next to the switch stay soft
    assert abs(fit.params.gate.bias[0]) > 5 * abs(ridge.params.gate.bias[0])

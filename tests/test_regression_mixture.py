"""Mixture of linear regressions: the mixtools CO2 reproduction, EM monotonicity, VJP, backends, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats

from moeref.datasets import load_dataset
from moeref.em import (
    MIXTOOLS,
    CollapsedVarianceError,
    ConvergenceWarning,
    EMError,
    EMOptions,
    EmptyComponentError,
    SingularWeightedLeastSquaresError,
)
from moeref.regression_mixture import (
    RegressionMixtureParams,
    fit_regression_mixture,
    regression_mixture_e_step,
    regression_mixture_log_joint,
    regression_mixture_loglik,
    regression_mixture_loglik_vjp,
    regression_mixture_m_step,
    regression_mixture_n_free_parameters,
    regression_mixture_posteriors,
    with_intercept,
)
from conftest import assert_close
from helpers import assert_vjp_correct

# ------------------------------------------------------------------------------------------
# The CO2 example of the mixtools vignette: Benaglia, Chauveau, Hunter & Young (2009),
# "mixtools: An R Package for Analyzing Finite Mixture Models", JSS 32(6), doi:10.18637/jss.v032.i06,
# Section 5.2:
#     CO2reg <- regmixEM(CO2, GNP, lambda = c(1, 3) / 4,
#                        beta = matrix(c(8, -1, 1, 1), 2, 2), sigma = c(2, 1))
#     number of iterations= 10
#     summary(CO2reg):           comp 1     comp 2
#                      lambda  0.754921   0.245079
#                      sigma   2.049315   0.809389
#                      beta1   8.678987   1.415150      (intercepts)
#                      beta2  -0.023344   0.676596      (slopes on GNP)
#                      loglik at estimate: -66.93977
# ------------------------------------------------------------------------------------------

PRINTED = {
    "lambda": [0.754921, 0.245079],
    "sigma": [2.049315, 0.809389],
    "beta1": [8.678987, 1.415150],
    "beta2": [-0.023344, 0.676596],
    "loglik": -66.93977,
    "n_iter": 10,
}


def _co2():
    co2 = load_dataset("co2data")
    x = np.column_stack([np.ones(co2.n_rows), co2["GNP"]])  # addintercept = TRUE
    # R's matrix(c(8, -1, 1, 1), 2, 2) fills by column: beta_1 = (8, -1), beta_2 = (1, 1)
    init = RegressionMixtureParams(beta=np.array([[8.0, 1.0], [-1.0, 1.0]]), sigma=np.array([2.0, 1.0]), weights=np.array([1.0, 3.0]) / 4)
    return x, np.array(co2["CO2"]), init


def test_co2_reproduces_mixtools_vignette():
    x, y, init = _co2()
    fit = fit_regression_mixture(x, y, init, options=MIXTOOLS)  # per-component sigma, as regmixEM's arbvar=TRUE
    p = fit.params
    # every printed digit: 6 decimals for the parameters, 5 for the log-likelihood
    np.testing.assert_allclose(p.weights, PRINTED["lambda"], rtol=0, atol=5e-7)
    np.testing.assert_allclose(p.sigma, PRINTED["sigma"], rtol=0, atol=5e-7)
    np.testing.assert_allclose(p.beta[0], PRINTED["beta1"], rtol=0, atol=5e-7)
    np.testing.assert_allclose(p.beta[1], PRINTED["beta2"], rtol=0, atol=5e-7)
    assert abs(fit.loglik - PRINTED["loglik"]) < 5e-6
    # Same iteration count: regmixEM counts parameter updates and stops after the first update
    # whose log-likelihood increase is <= epsilon = 1e-8, exactly as moeref's "increase" rule does
    # (the 10th change is 1.5e-9, the 9th 1.7e-8).
    assert fit.converged and fit.n_iter == PRINTED["n_iter"]
    deltas = np.diff(fit.loglik_trace)
    assert deltas[8] > 1e-8 >= deltas[9]
    assert fit.decreases == ()
    # 4 coefficients + 2 sigmas + 1 free weight
    assert fit.n_free_parameters == 7
    assert fit.aic == pytest.approx(-2 * fit.loglik + 14)
    assert fit.bic == pytest.approx(-2 * fit.loglik + 7 * math.log(28))


def test_co2_other_stopping_rules_reach_the_same_optimum():
    x, y, init = _co2()
    for criterion, tol in [("absolute", 1e-8), ("aitken", 1e-8), ("relative", 1e-12)]:
        fit = fit_regression_mixture(x, y, init, options=EMOptions(criterion=criterion, tol=tol))
        assert fit.converged
        assert abs(fit.loglik - PRINTED["loglik"]) < 5e-6
        np.testing.assert_allclose(fit.params.weights, PRINTED["lambda"], rtol=0, atol=5e-6)


def test_co2_fit_is_identical_on_every_backend(backend):
    x, y, init = _co2()
    ref = fit_regression_mixture(x, y, init, options=MIXTOOLS)
    got = fit_regression_mixture(backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(init), options=MIXTOOLS)
    assert got.n_iter == ref.n_iter and got.converged
    for a, b in zip(backend.tree_to_numpy(got.params), ref.params):
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert_close(backend.to_numpy(got.responsibilities), ref.responsibilities, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.loglik_trace, ref.loglik_trace, rtol=1e-12)
    assert got.icl == pytest.approx(ref.icl, rel=1e-10)


def test_with_intercept_on_every_backend(backend):
    gnp = load_dataset("co2data")["GNP"]
    x = backend.to_numpy(with_intercept(backend.from_numpy(gnp)))
    np.testing.assert_array_equal(x, np.column_stack([np.ones(28), gnp]))


# ------------------------------------------------------------------------------------------
# Forward functions against scipy, and the analytic VJP
# ------------------------------------------------------------------------------------------


def _random_problem(rng, N=9, p=3, K=3):
    x = rng.normal(size=(N, p))
    y = rng.normal(size=N)
    params = RegressionMixtureParams(rng.normal(size=(p, K)), rng.uniform(0.5, 2.0, size=K), rng.dirichlet(np.ones(K)))
    return x, y, params


# backend tests use the CO2 shapes (N=28, p=2, K=2), so that JAX compiles each kernel only once
def test_forward_matches_scipy_on_every_backend(backend, rng):
    x, y, params = _random_problem(rng, N=28, p=2, K=2)
    dens = params.weights * stats.norm.pdf(y[:, None], loc=x @ params.beta, scale=params.sigma)  # (N, K)
    args = (backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(params))
    assert_close(backend.to_numpy(regression_mixture_loglik(*args)), np.log(dens.sum(1)))
    assert_close(backend.to_numpy(regression_mixture_posteriors(*args)), dens / dens.sum(1, keepdims=True))
    e = regression_mixture_e_step(*args)
    assert float(e.loglik) == pytest.approx(np.log(dens.sum(1)).sum(), rel=1e-13)
    assert_close(backend.to_numpy(e.log_responsibilities), np.log(dens / dens.sum(1, keepdims=True)))


def test_loglik_vjp(rng):
    x, y, params = _random_problem(rng)
    assert_vjp_correct("regression_mixture_loglik", regression_mixture_loglik, regression_mixture_loglik_vjp, (x, y, params), rng.normal(size=9))


def test_loglik_vjp_on_every_backend(backend, rng):
    x, y, params = _random_problem(rng, N=28, p=2, K=2)
    ct = rng.normal(size=28)
    ref = regression_mixture_loglik_vjp(x, y, params, ct)
    got = regression_mixture_loglik_vjp(backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(params), backend.from_numpy(ct))
    for a, b in zip(backend.tree_to_numpy((got.x, got.y) + tuple(got.params)), (ref.x, ref.y) + tuple(ref.params)):
        assert_close(a, b)


def test_weights_gradient_is_finite_at_a_zero_weight(rng):
    x, y, params = _random_problem(rng)
    params = params._replace(weights=np.array([0.6, 0.4, 0.0]))
    ct = rng.normal(size=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = regression_mixture_loglik_vjp(x, y, params, ct)
    comp = stats.norm.pdf(y[:, None], loc=x @ params.beta, scale=params.sigma)  # (N, K)
    np.testing.assert_allclose(g.params.weights, (ct[:, None] * comp / (comp @ params.weights)[:, None]).sum(0), rtol=1e-12)
    assert np.all(np.isfinite(g.params.beta)) and np.all(np.isfinite(g.params.sigma))


# ------------------------------------------------------------------------------------------
# M-step against direct weighted least squares; EM monotonicity
# ------------------------------------------------------------------------------------------


def test_m_step_is_weighted_least_squares_on_every_backend(backend, rng):
    N, p, K = 28, 2, 2
    x, y = rng.normal(size=(N, p)), rng.normal(size=N)
    tau = rng.dirichlet(np.ones(K), size=N)
    got = backend.tree_to_numpy(regression_mixture_m_step(backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(tau)))
    for k in range(K):
        sw = np.sqrt(tau[:, k])
        b = np.linalg.lstsq(sw[:, None] * x, sw * y, rcond=None)[0]
        assert_close(got.beta[:, k], b, rtol=1e-10, atol=1e-12)
        assert_close(got.sigma[k], np.sqrt(np.sum(tau[:, k] * (y - x @ b) ** 2) / tau[:, k].sum()), rtol=1e-10)
    assert_close(got.weights, tau.mean(0))
    common = backend.tree_to_numpy(
        regression_mixture_m_step(backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(tau), variance="common")
    )
    s2 = sum(np.sum(tau[:, k] * (y - x @ got.beta[:, k]) ** 2) for k in range(K)) / N
    assert_close(common.sigma, np.full(K, np.sqrt(s2)), rtol=1e-10)
    assert_close(common.beta, got.beta, rtol=1e-10, atol=1e-12)


@given(st.integers(0, 2**32 - 1), st.integers(2, 3), st.sampled_from(["component", "common"]))
def test_em_loglik_never_decreases_property(seed, K, variance):
    rng = np.random.default_rng(seed)
    N, p = 40, 2
    x = np.column_stack([np.ones(N), rng.uniform(-3, 3, size=N)])
    labels = rng.integers(0, K, size=N)
    true_beta = rng.normal(scale=3.0, size=(p, K))
    y = np.sum(x * true_beta[:, labels].T, axis=1) + rng.normal(scale=0.5, size=N)
    s0 = rng.uniform(0.5, 2.0)
    init = RegressionMixtureParams(
        rng.normal(scale=3.0, size=(p, K)),
        np.full(K, s0) if variance == "common" else rng.uniform(0.5, 2.0, size=K),
        rng.dirichlet(np.full(K, 5.0)),
    )
    try:
        fit = fit_regression_mixture(
            x, y, init, variance=variance, options=EMOptions(max_iter=60, on_decrease="raise", warn_not_converged=False)
        )
    except EMError as err:  # a degenerate start (collapsed / empty component) is not what is tested
        assume(not isinstance(err, (CollapsedVarianceError, EmptyComponentError, SingularWeightedLeastSquaresError)))
        raise
    trace = np.asarray(fit.loglik_trace)
    assert np.all(np.diff(trace) >= -1e-10 * (np.abs(trace[:-1]) + 1))
    assert fit.decreases == ()
    assert len(trace) == fit.n_iter + 1


def test_final_responsibilities_are_posteriors_at_the_estimate():
    x, y, init = _co2()
    fit = fit_regression_mixture(x, y, init, options=MIXTOOLS)
    np.testing.assert_allclose(fit.responsibilities, regression_mixture_posteriors(x, y, fit.params), rtol=1e-14)
    np.testing.assert_allclose(fit.responsibilities.sum(1), 1.0, rtol=1e-14)


def test_common_variance_fit():
    x, y, init = _co2()
    init = init._replace(sigma=np.array([1.5, 1.5]))
    fit = fit_regression_mixture(x, y, init, variance="common", options=MIXTOOLS)
    assert fit.converged and fit.params.sigma[0] == fit.params.sigma[1]
    assert fit.n_free_parameters == regression_mixture_n_free_parameters(2, 2, variance="common") == 6
    assert fit.decreases == ()


def test_max_iter_reached_reports_not_converged():
    x, y, init = _co2()
    with pytest.warns(ConvergenceWarning, match="did not converge in 3 iterations"):
        fit = fit_regression_mixture(x, y, init, options=EMOptions(max_iter=3))
    assert not fit.converged and fit.n_iter == 3


# ------------------------------------------------------------------------------------------
# Degeneracies and bad input
# ------------------------------------------------------------------------------------------


def test_m_step_degeneracies_raise_named_errors():
    x = np.column_stack([np.ones(6), np.arange(6.0)])
    y = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 3.0])
    empty = np.column_stack([np.ones(6), np.zeros(6)])
    with pytest.raises(EmptyComponentError, match=r"component 1 has mixing weight 0.000e\+00 < min_weight=1e-08"):
        regression_mixture_m_step(x, y, empty)
    one_point = np.column_stack([np.r_[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], np.r_[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    with pytest.raises(SingularWeightedLeastSquaresError, match="component 1: the weighted Gram matrix X\\^T W X is singular"):
        regression_mixture_m_step(x, y, one_point)
    two_points = np.column_stack([np.r_[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], np.r_[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(CollapsedVarianceError, match="component 1 has sigma .* < min_sigma=1e-08"):
        regression_mixture_m_step(x, y, two_points)


def test_bad_input_names_the_argument(rng):
    x, y, init = _co2()
    with pytest.raises(ValueError, match=r"y has shape \(27,\) but \(28,\) was expected \(x has N=28 rows\)"):
        fit_regression_mixture(x, y[:27], init)
    with pytest.raises(ValueError, match=r"init.beta has shape \(3, 2\) but \(2, 2\) was expected"):
        fit_regression_mixture(x, y, init._replace(beta=np.zeros((3, 2))))
    with pytest.raises(ValueError, match=r"init.sigma has shape \(3,\) but \(2,\) was expected"):
        fit_regression_mixture(x, y, init._replace(sigma=np.ones(3)))
    with pytest.raises(ValueError, match="init.weights must sum to 1, got sum 1.25"):
        fit_regression_mixture(x, y, init._replace(weights=np.array([0.5, 0.75])))
    with pytest.raises(ValueError, match="init.sigma must be positive"):
        fit_regression_mixture(x, y, init._replace(sigma=np.array([2.0, -1.0])))
    with pytest.raises(ValueError, match="init.weights must be positive"):
        fit_regression_mixture(x, y, init._replace(weights=np.array([1.0, 0.0])))
    with pytest.raises(ValueError, match='init.sigma must have equal entries when variance="common"'):
        fit_regression_mixture(x, y, init, variance="common")
    with pytest.raises(ValueError, match="variance must be one of 'component', 'common'; got 'shared'"):
        fit_regression_mixture(x, y, init, variance="shared")
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        fit_regression_mixture(np.where(x == x[3, 1], np.nan, x), y, init)
    with pytest.raises(TypeError, match="y must have a real floating-point dtype"):
        fit_regression_mixture(x, y.astype(np.int64), init)
    with pytest.raises(TypeError, match="share one dtype"):
        regression_mixture_loglik(x.astype(np.float32), y, init)
    with pytest.raises(TypeError, match="params must be a RegressionMixtureParams record"):
        regression_mixture_loglik(x, y, (init.beta, init.sigma, init.weights))
    with pytest.raises(ValueError, match=r"cotangent has shape \(3,\) but \(28,\) was expected"):
        regression_mixture_loglik_vjp(x, y, init, np.ones(3))
    with pytest.raises(TypeError, match="options must be an EMOptions record"):
        fit_regression_mixture(x, y, init, options=MIXTOOLS._asdict())
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        regression_mixture_log_joint(torch.from_numpy(x), y, init)


def test_co2_random_restarts_find_the_vignette_optimum_and_report_every_run():
    x, y, init = _co2()
    opts = EMOptions(tol=1e-10, max_iter=5000)
    fits = [fit_regression_mixture(x, y, init, options=opts, generator=np.random.default_rng(0), n_restarts=6) for _ in range(2)]
    a, b = fits
    assert a.loglik_trace == b.loglik_trace and a.best_restart == b.best_restart  # same seed, same fit
    finals = [round(r.loglik, 5) for r in a.restarts]
    # two local maxima: the vignette's, and a lower one reached by two of the six random partitions
    assert sorted(set(finals)) == [-70.17293, PRINTED["loglik"]] and finals.count(-70.17293) == 2
    assert round(a.loglik, 5) == PRINTED["loglik"] and a.loglik == max(r.loglik for r in a.restarts)
    assert [r.draws is None for r in a.restarts] == [True] + [False] * 6
    draws = np.random.default_rng(0)
    for rec in a.restarts[1:]:
        np.testing.assert_array_equal(rec.draws, draws.random(28))
        assert rec.start.weights.tolist() == [0.5, 0.5]  # a balanced split of the 28 countries
        single = fit_regression_mixture(x, y, rec.start, options=opts)
        assert single.loglik_trace == rec.loglik_trace
    single = fit_regression_mixture(x, y, init, options=opts)
    assert len(single.restarts) == 1 and single.best_restart == 0 and single.restarts[0].start is init


def test_explicit_restarts_are_checked_like_init():
    x, y, init = _co2()
    bad = init._replace(weights=np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"restarts\[0\].weights must sum to 1"):
        fit_regression_mixture(x, y, init, restarts=[bad])
    with pytest.raises(TypeError, match="restarts must be a list or tuple of RegressionMixtureParams"):
        fit_regression_mixture(x, y, init, restarts=init)
    with pytest.raises(ValueError, match="n_restarts=1 random starts need a generator"):
        fit_regression_mixture(x, y, init, n_restarts=1)

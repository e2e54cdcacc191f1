"""Student-t linear experts (Chamroukhi 2016): special functions vs scipy, density vs scipy, VJPs, the ECM /
ECME M-step (every nu_k updated, each root checked with scipy's brentq), robustness, degeneracies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, special, stats

from moeref.constant_gate import ConstantGate, ConstantGateParams
from moeref.datasets import load_dataset
from moeref.em import CollapsedVarianceError, EMOptions, EmptyComponentError, SingularWeightedLeastSquaresError
from moeref.families import ExpertFamily
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.moe_em import MoEParams, fit_moe, fit_moe_gradient
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams
from moeref.special import digamma
from moeref.special import lgamma as log_gamma
from moeref.t_experts import LinearTExperts, LinearTExpertsParams
from conftest import assert_close
from helpers import assert_vjp_correct

# ------------------------------------------------------------------------------------------
# digamma and log-gamma
# ------------------------------------------------------------------------------------------

_GRID = np.concatenate([np.geomspace(1e-8, 1e8, 97), np.linspace(0.25, 4.0, 31), [1.0, 2.0, 1.4616321449683622]])


def test_digamma_and_log_gamma_match_scipy_on_every_backend(backend):
    x = backend.from_numpy(_GRID)
    psi = backend.to_numpy(digamma(x))
    lg = backend.to_numpy(log_gamma(x))
    np.testing.assert_allclose(psi, special.digamma(_GRID), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lg, special.gammaln(_GRID), rtol=1e-13, atol=1e-13)


def test_special_functions_outside_the_domain_are_nan():
    bad = np.array([0.0, -1.0, -2.5, np.nan])
    assert np.all(np.isnan(digamma(bad)))
    lg = np.asarray(log_gamma(bad))
    assert lg[0] == np.inf and np.all(np.isnan(lg[1:]))  # log Gamma(0) = +inf (moeref.special.lgamma)


@given(st.floats(1e-6, 1e6))
def test_digamma_is_the_derivative_of_log_gamma_property(x):
    # recurrences psi(x+1) = psi(x) + 1/x and lgamma(x+1) = lgamma(x) + log x hold to round-off
    a = np.array([x, x + 1.0])
    psi, lg = digamma(a), log_gamma(a)
    assert abs(psi[1] - psi[0] - 1.0 / x) <= 1e-13 * max(1.0, abs(psi[1]), 1.0 / x)
    assert abs(lg[1] - lg[0] - math.log(x)) <= 1e-13 * max(1.0, abs(lg[1]))
    assert abs(psi[0] - special.digamma(x)) <= 1e-13 * max(1.0, abs(special.digamma(x)))


# ------------------------------------------------------------------------------------------
# Density and VJP
# ------------------------------------------------------------------------------------------


def _problem(rng, N=12, d=2, K=3, nu=(0.7, 4.0, 60.0)):
    x = rng.normal(size=(N, d))
    y = rng.standard_t(3, size=N)
    params = LinearTExpertsParams(rng.normal(size=(K, d)), rng.normal(size=K), rng.uniform(0.5, 2.0, size=K), np.array(nu[:K]))
    return x, y, params


def test_interface():
    assert isinstance(LinearTExperts(), ExpertFamily)


def test_log_density_matches_scipy_on_every_backend(backend, rng):
    x, y, params = _problem(rng)
    fam = LinearTExperts()
    loc = x @ params.weight.T + params.bias
    got = fam.log_density(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y))
    ref = stats.t.logpdf(y[:, None], df=params.nu, loc=loc, scale=params.sigma)
    assert_close(backend.to_numpy(got), ref, rtol=1e-12, atol=1e-13)
    assert_close(backend.to_numpy(fam.mean(backend.tree_from_numpy(params), backend.from_numpy(x))), loc[:, :, None])


def test_log_density_vjp(rng):
    fam = LinearTExperts()
    x, y, params = _problem(rng, N=6, d=2, K=3, nu=(1.5, 4.0, 30.0))  # d/dnu is tiny at nu = 60: FD noise
    assert_vjp_correct(
        "t_experts",
        fam.log_density,
        lambda p, xx, yy, c: (fam.log_density_vjp(p, xx, yy, c),) + tuple(fam.log_density_input_vjp(p, xx, yy, c)),
        (params, x, y),
        rng.normal(size=(6, 3)),
    )


def test_vjp_on_every_backend(backend, rng):
    fam = LinearTExperts()
    x, y, params = _problem(rng)
    ct = rng.normal(size=(12, 3))
    ref = fam.log_density_vjp(params, x, y, ct)
    got = fam.log_density_vjp(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(ct))
    for a, b in zip(backend.tree_to_numpy(got), ref):
        assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_latent_scale_weights_downweight_outliers(rng):
    x, y, params = _problem(rng, K=1)
    y = y.copy()
    y[0] = float(x[0] @ params.weight[0] + params.bias[0]) + 100.0
    u = LinearTExperts().latent_scale_weights(params, x, y)
    d2 = ((y[:, None] - x @ params.weight.T - params.bias) / params.sigma) ** 2
    np.testing.assert_allclose(u, (params.nu + 1) / (params.nu + d2), rtol=1e-14)
    assert u[0, 0] == u.min() and u[0, 0] < 1e-3


# ------------------------------------------------------------------------------------------
# The ECM / ECME M-step
# ------------------------------------------------------------------------------------------


def _weighted_loglik(fam, params, x, y, w):
    return float(np.sum(w * fam.log_density(params, x, y)))


def test_one_ecm_cycle_by_hand(rng):
    """Every step of the cycle against a direct NumPy/SciPy computation; every nu_k is updated."""
    N, d, K = 30, 1, 3
    x, y = rng.normal(size=(N, d)), rng.standard_t(2, size=N)
    w = rng.dirichlet(np.ones(K), size=N)
    p0 = LinearTExpertsParams(rng.normal(size=(K, d)), rng.normal(size=K), np.ones(K), np.array([5.0, 5.0, 5.0]))
    got = LinearTExperts().m_step(p0, x, y, w)
    X = np.column_stack([x, np.ones(N)])
    r0 = y[:, None] - (x @ p0.weight.T + p0.bias)
    u = (p0.nu + 1) / (p0.nu + (r0 / p0.sigma) ** 2)
    for k in range(K):
        om = w[:, k] * u[:, k]
        coef = np.linalg.solve((X.T * om) @ X, (X.T * om) @ y)
        np.testing.assert_allclose(np.r_[got.weight[k], got.bias[k]], coef, rtol=1e-10)
        r = y - X @ coef
        s2 = np.sum(om * r**2) / w[:, k].sum()
        np.testing.assert_allclose(got.sigma[k] ** 2, s2, rtol=1e-12)
        u1 = (p0.nu[k] + 1) / (p0.nu[k] + r**2 / s2)
        c = np.sum(w[:, k] * (np.log(u1) - u1)) / w[:, k].sum() + special.digamma((p0.nu[k] + 1) / 2) - np.log((p0.nu[k] + 1) / 2)
        root = optimize.brentq(lambda v: -special.digamma(v / 2) + np.log(v / 2) + 1 + c, 1e-2, 1e3, xtol=1e-14, rtol=1e-15)
        np.testing.assert_allclose(got.nu[k], root, rtol=1e-10)
    # the meteorits bug updates only nu_1; here all three move away from the start, to different values
    assert np.all(np.abs(got.nu - 5.0) > 1e-3) and len(set(np.round(got.nu, 6))) == 3


def test_one_ecme_cycle_maximises_the_weighted_observed_loglik_in_nu(rng):
    N, d, K = 30, 1, 3
    x, y = rng.normal(size=(N, d)), rng.standard_t(2, size=N)
    w = rng.dirichlet(np.ones(K), size=N)
    p0 = LinearTExpertsParams(rng.normal(size=(K, d)), rng.normal(size=K), np.ones(K), np.array([5.0, 5.0, 5.0]))
    fam = LinearTExperts(algorithm="ECME")
    got = fam.m_step(p0, x, y, w)
    ecm = LinearTExperts().m_step(p0, x, y, w)
    np.testing.assert_allclose(got.weight, ecm.weight, rtol=1e-14)  # CM-step 1 is shared
    np.testing.assert_allclose(got.sigma, ecm.sigma, rtol=1e-14)
    loc = x @ got.weight.T + got.bias
    for k in range(K):
        res = optimize.minimize_scalar(
            lambda lv: -np.sum(w[:, k] * stats.t.logpdf(y, df=np.exp(lv), loc=loc[:, k], scale=got.sigma[k])),
            bounds=(math.log(1e-2), math.log(1e3)), method="bounded", options={"xatol": 1e-12},
        )
        np.testing.assert_allclose(math.log(got.nu[k]), res.x, atol=1e-5)
    assert np.all(np.abs(got.nu - 5.0) > 1e-3)


def _unpack(v, K, d):
    return LinearTExpertsParams(v[: K * d].reshape(K, d), v[K * d : K * d + K], np.exp(v[K * d + K : K * d + 2 * K]), np.exp(v[K * d + 2 * K :]))


@pytest.mark.parametrize("algorithm", ["ECME", "ECM"])
def test_repeated_m_steps_reach_the_weighted_mle(rng, algorithm):
    N, d, K = 40, 1, 2
    x = rng.normal(size=(N, d))
    y = 0.5 * x[:, 0] + rng.standard_t(2.5, size=N)
    w = rng.dirichlet(np.ones(K) * 2, size=N)
    fam = LinearTExperts(algorithm=algorithm)
    params = LinearTExpertsParams(np.zeros((K, d)), np.zeros(K), np.ones(K), np.full(K, 10.0))
    values = []
    for _ in range(120 if algorithm == "ECME" else 200):
        params = fam.m_step(params, x, y, w)
        values.append(_weighted_loglik(fam, params, x, y, w))
    assert np.all(np.diff(values) >= -1e-10)
    v0 = np.concatenate([params.weight.ravel(), params.bias, np.log(params.sigma), np.log(params.nu)])
    res = optimize.minimize(lambda v: -_weighted_loglik(fam, _unpack(v, K, d), x, y, w), v0 + 0.05, method="BFGS", options={"gtol": 1e-9})
    assert values[-1] >= -res.fun - 1e-7
    opt = _unpack(res.x, K, d)
    np.testing.assert_allclose(params.weight, opt.weight, atol=1e-3)
    np.testing.assert_allclose(np.log(params.nu), np.log(opt.nu), atol=1e-2)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["ECM", "ECME"]))
def test_m_step_never_decreases_the_weighted_loglik_property(seed, algorithm):
    rng = np.random.default_rng(seed)
    x, y, params = _problem(rng, N=15, d=1, K=2)
    w = rng.dirichlet(np.ones(2), size=15)
    fam = LinearTExperts(algorithm=algorithm)
    values = [_weighted_loglik(fam, params, x, y, w)]
    for _ in range(5):
        params = fam.m_step(params, x, y, w)
        values.append(_weighted_loglik(fam, params, x, y, w))
    assert np.all(np.diff(values) >= -1e-9 * (np.abs(values[:-1]) + 1))


def test_fixed_nu_and_the_bracket(rng):
    x, y, params = _problem(rng)
    w = rng.dirichlet(np.ones(3), size=12)
    fixed = LinearTExperts(fix_nu=True).m_step(params, x, y, w)
    np.testing.assert_array_equal(fixed.nu, params.nu)
    assert LinearTExperts(fix_nu=True).n_free_parameters(params) == 3 * 3 + 3
    assert LinearTExperts().n_free_parameters(params) == 3 * 3 + 6
    # uniform-ish residuals (lighter tails than any t): the root is beyond nu_max, so nu = nu_max
    xg = np.linspace(-1, 1, 200)[:, None]
    yg = 0.1 * rng.uniform(-1, 1, size=200)
    pg = LinearTExpertsParams(np.zeros((1, 1)), np.zeros(1), np.ones(1) * 0.05, np.ones(1) * 50.0)
    got = LinearTExperts(algorithm="ECME", nu_max=80.0).m_step(pg, xg, yg, np.ones((200, 1)))
    np.testing.assert_allclose(got.nu, [80.0], rtol=1e-12)


def test_m_step_on_every_backend(backend, rng):
    # ECM only: ECME's extra operations (log-gamma, the nu score on (N, K)) are covered on every
    # backend by the density and VJP tests; fewer bisection steps, same algorithm (JAX compile time)
    x, y, params = _problem(rng)
    w = rng.dirichlet(np.ones(3), size=12)
    fam = LinearTExperts(nu_iterations=12)
    ref = fam.m_step(params, x, y, w)
    got = fam.m_step(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(w))
    for a, b in zip(backend.tree_to_numpy(got), ref):
        assert_close(a, b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------
# Robustness on the tone data with 5 outliers at (0, 4) (Chamroukhi 2016's experiment)
# ------------------------------------------------------------------------------------------


def _fit(experts, init, x, y, max_iter):
    """The TMoE model: a softmax gate (one input) and t experts, fitted by moeref.moe_em.fit_moe."""
    gate0 = SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2))
    return fit_moe(x, y, SoftmaxGate(), experts, MoEParams(gate0, init), options=EMOptions(tol=1e-7, max_iter=max_iter, on_decrease="raise"))


def test_t_experts_move_less_than_gaussian_ones_under_outliers():
    clean, dirty = load_dataset("tone"), load_dataset("tone_with_outliers_tmoe")
    w0, b0 = np.array([[1.0], [0.0]]), np.array([0.0, 2.0])  # the lines y = x and y = 2
    gauss = LinearGaussianExperts(covariance="isotropic")
    g0 = LinearGaussianExpertsParams(w0[:, :, None], b0[:, None], np.array([0.1, 0.1]))
    ref = _fit(gauss, g0, clean["stretchratio"][:, None], clean["tuned"], 200).params.experts
    ref_coef = np.column_stack([ref.weight[:, 0, 0], ref.bias[:, 0]])
    xd, yd = dirty["stretchratio"][:, None], dirty["tuned"]
    g = _fit(gauss, g0, xd, yd, 200).params.experts
    fit = _fit(LinearTExperts(), LinearTExpertsParams(w0, b0, np.full(2, 0.3), np.full(2, 5.0)), xd, yd, 400)
    t = fit.params.experts
    shift_gauss = np.abs(np.column_stack([g.weight[:, 0, 0], g.bias[:, 0]]) - ref_coef).max()
    shift_t = np.abs(np.column_stack([t.weight[:, 0], t.bias]) - ref_coef).max()
    assert shift_t < 0.1 < 0.5 < shift_gauss
    assert fit.converged and fit.decreases == () and fit.n_free_parameters == 2 + 2 * 2 + 2 + 2
    assert np.all(np.abs(t.nu - 5.0) > 1.0)  # both degrees of freedom were estimated
    # the 5 outliers (rows 0-4) get tiny latent scale weights in the expert that owns them
    u = LinearTExperts().latent_scale_weights(t, xd, yd)
    assert np.all(np.sum(fit.responsibilities[:5] * u[:5], axis=1) < 0.05)


def test_unconstrained_view_and_gradient_ascent(rng):
    fam = LinearTExperts()
    x, y, params = _problem(rng, N=5, d=1, K=2, nu=(1.5, 4.0))
    free = fam.unconstrained(params)
    for a, b in zip(fam.constrained(free), params):
        np.testing.assert_allclose(a, b, rtol=1e-15)
    assert_vjp_correct(
        "t_experts_unconstrained",
        lambda u, xx, yy: fam.log_density(fam.constrained(u), xx, yy),
        lambda u, xx, yy, c: (fam.constrained_vjp(u, fam.log_density_vjp(fam.constrained(u), xx, yy, c)), None, None),
        (free, x, y),
        rng.normal(size=(5, 2)),
    )
    init = MoEParams(ConstantGateParams(np.array([0.5, 0.5])), params)
    fit = fit_moe_gradient(x, y, ConstantGate(), fam, init, learning_rate=0.05, options=EMOptions(max_iter=20, warn_not_converged=False))
    assert fit.loglik > fit.loglik_trace[0] and np.all(fit.params.experts.nu > 0)
    fixed = fit_moe_gradient(x, y, ConstantGate(), LinearTExperts(fix_nu=True), init, learning_rate=0.05, options=EMOptions(max_iter=5, warn_not_converged=False))
    np.testing.assert_allclose(fixed.params.experts.nu, params.nu, rtol=1e-14)


# ------------------------------------------------------------------------------------------
# Degeneracies and bad input
# ------------------------------------------------------------------------------------------


def test_degeneracies_raise_named_errors():
    x = np.arange(6.0)[:, None]
    y = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 3.0])
    fam = LinearTExperts()
    p0 = LinearTExpertsParams(np.zeros((2, 1)), np.zeros(2), np.ones(2), np.full(2, 4.0))
    with pytest.raises(EmptyComponentError, match="expert 1 has total weight"):
        fam.m_step(p0, x, y, np.column_stack([np.ones(6), np.zeros(6)]))
    with pytest.raises(SingularWeightedLeastSquaresError, match="expert 1: the weighted Gram matrix"):
        fam.m_step(p0, x, y, np.column_stack([np.r_[1.0, 1, 1, 1, 1, 0], np.r_[0.0, 0, 0, 0, 0, 1]]))
    with pytest.raises(CollapsedVarianceError, match="expert 1 has sigma .* < min_sigma=1e-08"):
        fam.m_step(p0, x, y, np.column_stack([np.r_[1.0, 1, 1, 1, 0, 0], np.r_[0.0, 0, 0, 0, 1, 1]]))


def test_bad_input_names_the_argument(rng):
    x, y, params = _problem(rng)
    fam = LinearTExperts()
    with pytest.raises(ValueError, match="algorithm must be one of 'ECM', 'ECME'; got 'EM'"):
        LinearTExperts(algorithm="EM")
    with pytest.raises(ValueError, match="nu_min must be below nu_max"):
        LinearTExperts(nu_min=10.0, nu_max=5.0)
    with pytest.raises(ValueError, match="nu_max must be a finite positive float"):
        LinearTExperts(nu_max=math.inf)
    with pytest.raises(TypeError, match="fix_nu must be a bool"):
        LinearTExperts(fix_nu="yes")
    with pytest.raises(TypeError, match=r"params must be a LinearTExpertsParams\(weight, bias, sigma, nu\)"):
        fam.log_density(tuple(params), x, y)
    with pytest.raises(ValueError, match="params.nu must be positive"):
        fam.log_density(params._replace(nu=-params.nu), x, y)
    with pytest.raises(ValueError, match="params.sigma must be positive"):
        fam.log_density(params._replace(sigma=np.zeros(3)), x, y)
    with pytest.raises(ValueError, match=r"params.nu has shape \(2,\) but \(3,\) was expected"):
        fam.log_density(params._replace(nu=np.ones(2)), x, y)
    with pytest.raises(ValueError, match=r"weights has shape \(12, 2\) but \(12, 3\) was expected"):
        fam.m_step(params, x, y, np.ones((12, 2)))
    with pytest.raises(TypeError, match="x must have a real floating-point dtype"):
        digamma(np.arange(3))

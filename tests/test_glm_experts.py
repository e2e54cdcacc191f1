"""GLM expert families: log-densities vs scipy.stats, VJPs, weighted M-steps vs scipy.optimize,
separation, degeneracies and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, special, stats

from moeref.core import array_namespace
from moeref.em import EMOptions, EmptyComponentError, SingularWeightedLeastSquaresError
from moeref.families import ExpertFamily
from moeref.moe_em import MoEParams, fit_moe
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams
from moeref.glm_experts import (
    LogisticExperts,
    LogisticExpertsParams,
    MultinomialLogisticExperts,
    MultinomialLogisticExpertsParams,
    PoissonExperts,
    PoissonExpertsParams,
    SeparationWarning,
    class_targets,
)
from moeref.softmax_gate import GateSeparationWarning
from conftest import assert_close
from helpers import assert_vjp_correct

# one set of shapes for every cross-backend test (JAX compiles each new shape once)
N, D, K, C = 24, 2, 3, 3


def _problem(rng, n=N, d=D, k=K, c=C):
    x = rng.normal(size=(n, d))
    weights = rng.dirichlet(np.ones(k), size=n)  # (n, k) responsibilities
    y_bin = (rng.uniform(size=n) < 0.4).astype(float)
    y_soft = rng.uniform(0.05, 0.95, size=n)
    y_count = rng.poisson(np.exp(0.8 + 0.5 * x[:, 0])).astype(float)
    labels = rng.integers(0, c, size=n)
    y_onehot = class_targets(labels, c)
    y_prob = rng.dirichlet(np.ones(c), size=n)
    single = dict(weight=rng.normal(scale=0.5, size=(k, d)), bias=rng.normal(scale=0.5, size=k))
    multi = MultinomialLogisticExpertsParams(rng.normal(scale=0.5, size=(k, d, c)), rng.normal(scale=0.5, size=(k, c)))
    return dict(
        x=x, weights=weights, y_bin=y_bin, y_soft=y_soft, y_count=y_count, y_onehot=y_onehot, y_prob=y_prob,
        logistic=LogisticExpertsParams(**single), poisson=PoissonExpertsParams(**single), multi=multi,
    )


def _like(x, a):
    """``a`` (NumPy) in the array library of ``x`` (for forwards run by torch / jax autograd)."""
    return array_namespace(x).asarray(a)


# --------------------------------------------------------------------------------------------
# Interface, forward against scipy.stats
# --------------------------------------------------------------------------------------------


def test_families_implement_the_interface():
    for fam in (LogisticExperts(), PoissonExperts(), MultinomialLogisticExperts()):
        assert isinstance(fam, ExpertFamily)
    p = _problem(np.random.default_rng(0))
    assert LogisticExperts().n_free_parameters(p["logistic"]) == K * (D + 1)
    assert LogisticExperts(bias=False).n_free_parameters(p["logistic"]) == K * D
    assert PoissonExperts().n_free_parameters(p["poisson"]) == K * (D + 1)
    assert MultinomialLogisticExperts().n_free_parameters(p["multi"]) == K * (C - 1) * (D + 1)
    # penalties: 0 without a ridge; the multinomial one at the equivalent baseline point
    assert float(LogisticExperts().penalty(p["logistic"])) == 0.0
    lp = p["logistic"]
    assert float(LogisticExperts(ridge=2.0).penalty(lp)) == pytest.approx(np.sum(lp.weight**2) + np.sum(lp.bias**2))
    m = p["multi"]
    shifted = MultinomialLogisticExpertsParams(m.weight + 1.5, m.bias - 0.5)  # the same probabilities
    fam = MultinomialLogisticExperts(ridge=2.0)
    assert float(fam.penalty(shifted)) == pytest.approx(float(fam.penalty(m)), rel=1e-12)
    base = np.concatenate([(m.weight - m.weight[:, :, -1:]).ravel(), (m.bias - m.bias[:, -1:]).ravel()])
    assert float(fam.penalty(m)) == pytest.approx(np.sum(base**2), rel=1e-12)


def test_log_density_and_mean_match_scipy_on_every_backend(backend, rng):
    p = _problem(rng)
    x = p["x"]
    b = backend.from_numpy
    # logistic: Bernoulli pmf
    eta = x @ p["logistic"].weight.T + p["logistic"].bias  # (N, K)
    mu = special.expit(eta)
    got = LogisticExperts().log_density(backend.tree_from_numpy(p["logistic"]), b(x), b(p["y_bin"]))
    assert_close(backend.to_numpy(got), stats.bernoulli.logpmf(p["y_bin"][:, None], mu))
    got = LogisticExperts().mean(backend.tree_from_numpy(p["logistic"]), b(x))
    assert_close(backend.to_numpy(got), mu[:, :, None])
    # Poisson pmf
    rate = np.exp(x @ p["poisson"].weight.T + p["poisson"].bias)
    got = PoissonExperts().log_density(backend.tree_from_numpy(p["poisson"]), b(x), b(p["y_count"]))
    assert_close(backend.to_numpy(got), stats.poisson.logpmf(p["y_count"][:, None], rate), rtol=1e-12, atol=1e-12)
    # multinomial with one trial
    eta3 = np.einsum("nd,kdc->nkc", x, p["multi"].weight) + p["multi"].bias  # (N, K, C)
    probs = special.softmax(eta3, axis=2)
    ref = np.stack([stats.multinomial.logpmf(p["y_onehot"], 1, probs[:, k, :]) for k in range(K)], axis=1)
    got = MultinomialLogisticExperts().log_density(backend.tree_from_numpy(p["multi"]), b(x), b(p["y_onehot"]))
    assert_close(backend.to_numpy(got), ref)
    got = MultinomialLogisticExperts().mean(backend.tree_from_numpy(p["multi"]), b(x))
    assert_close(backend.to_numpy(got), probs)


def test_soft_targets_are_the_cross_entropy(rng):
    p = _problem(rng)
    x, y = p["x"], p["y_soft"]
    mu = special.expit(x @ p["logistic"].weight.T + p["logistic"].bias)
    got = LogisticExperts(soft_targets=True).log_density(p["logistic"], x, y)
    np.testing.assert_allclose(got, y[:, None] * np.log(mu) + (1 - y[:, None]) * np.log1p(-mu), rtol=1e-12)
    probs = special.softmax(np.einsum("nd,kdc->nkc", x, p["multi"].weight) + p["multi"].bias, axis=2)
    got = MultinomialLogisticExperts(soft_targets=True).log_density(p["multi"], x, p["y_prob"])
    np.testing.assert_allclose(got, np.einsum("nc,nkc->nk", p["y_prob"], np.log(probs)), rtol=1e-12)


def test_poisson_offset_column(rng):
    p = _problem(rng)
    x, y = p["x"], p["y_count"]
    t = rng.uniform(0.5, 3.0, size=N)  # exposures
    xo = np.column_stack([x, np.log(t)])
    rate = t[:, None] * np.exp(x @ p["poisson"].weight.T + p["poisson"].bias)
    fam = PoissonExperts(offset_column=True)
    np.testing.assert_allclose(fam.log_density(p["poisson"], xo, y), stats.poisson.logpmf(y[:, None], rate), rtol=1e-12)
    np.testing.assert_allclose(fam.mean(p["poisson"], xo)[:, :, 0], rate, rtol=1e-13)


def test_poisson_rate_overflow_is_minus_inf_without_warning():
    fam = PoissonExperts()
    p = PoissonExpertsParams(np.array([[1000.0]]), np.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            out = fam.log_density(p, np.array([[1.0], [0.0]]), np.array([3.0, 3.0]))
    assert out[0, 0] == -np.inf and np.isfinite(out[1, 0])


def test_multinomial_zero_target_class_switched_off_costs_nothing():
    fam = MultinomialLogisticExperts()
    p = MultinomialLogisticExpertsParams(np.zeros((1, 1, 3)), np.array([[-np.inf, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="params.bias contains NaN or infinite values"):
        fam.log_density(p, np.zeros((1, 1)), np.array([[0.0, 1.0, 0.0]]))


def test_class_targets():
    y = class_targets(np.array([0, 2, 1, 2]), 3)
    np.testing.assert_array_equal(y, np.eye(3)[[0, 2, 1, 2]])
    assert y.dtype == np.float64
    assert class_targets(np.array([1]), 2, dtype=np.float32).dtype == np.float32


# --------------------------------------------------------------------------------------------
# VJPs: finite differences, torch and jax autograd through the forward
# --------------------------------------------------------------------------------------------


def _vjp_case(fam, params, x, y, ct, name, *, y_is_arg):
    if y_is_arg:
        def fwd(params, x, y):
            return fam.log_density(params, x, y)

        def vjp(params, x, y, c):
            inp = fam.log_density_input_vjp(params, x, y, c)
            return (fam.log_density_vjp(params, x, y, c), inp.x, inp.y)

        assert_vjp_correct(name, fwd, vjp, (params, x, y), ct)
    else:  # hard labels / counts stay fixed: finite differences must not perturb them
        def fwd(params, x):
            return fam.log_density(params, x, _like(x, y))

        def vjp(params, x, c):
            return (fam.log_density_vjp(params, x, y, c), fam.log_density_input_vjp(params, x, y, c).x)

        assert_vjp_correct(name, fwd, vjp, (params, x), ct)


def test_logistic_vjp(rng):
    # soft targets: y is an argument too (hard labels run through the same code, checked on backends)
    p = _problem(rng, n=7)
    _vjp_case(LogisticExperts(soft_targets=True), p["logistic"], p["x"], p["y_soft"], rng.normal(size=(7, K)),
              "LogisticExperts.log_density", y_is_arg=True)


def test_poisson_vjp(rng):
    # with an offset column (its cotangent is the sum of the eta cotangents); counts stay fixed
    p = _problem(rng, n=7)
    xo = np.column_stack([p["x"], rng.normal(size=7)])
    _vjp_case(PoissonExperts(offset_column=True), p["poisson"], xo, p["y_count"], rng.normal(size=(7, K)),
              "PoissonExperts.log_density", y_is_arg=False)


def test_multinomial_vjp(rng):
    p = _problem(rng, n=7)
    ct = rng.normal(size=(7, K))
    fam = MultinomialLogisticExperts(soft_targets=True)
    # soft rows must stay probability vectors, so y is held fixed here and its cotangent checked below
    _vjp_case(fam, p["multi"], p["x"], p["y_prob"], ct, "MultinomialLogisticExperts.log_density", y_is_arg=False)
    logp = special.log_softmax(np.einsum("nd,kdc->nkc", p["x"], p["multi"].weight) + p["multi"].bias, axis=2)
    y_bar = fam.log_density_input_vjp(p["multi"], p["x"], p["y_prob"], ct).y
    np.testing.assert_allclose(y_bar, np.einsum("nk,nkc->nc", ct, logp), rtol=1e-13)


def test_no_bias_vjp_is_zero_for_the_bias(rng):
    p = _problem(rng, n=7)
    params = p["logistic"]._replace(bias=np.zeros(K))
    g = LogisticExperts(bias=False).log_density_vjp(params, p["x"], p["y_bin"], rng.normal(size=(7, K)))
    np.testing.assert_array_equal(g.bias, np.zeros(K))


def test_vjps_on_every_backend(backend, rng):
    p = _problem(rng)
    ct = rng.normal(size=(N, K))
    cases = [
        (LogisticExperts(), p["logistic"], p["y_bin"]),
        (PoissonExperts(), p["poisson"], p["y_count"]),
        (MultinomialLogisticExperts(), p["multi"], p["y_onehot"]),
    ]
    for fam, params, y in cases:
        ref = (fam.log_density_vjp(params, p["x"], y, ct), fam.log_density_input_vjp(params, p["x"], y, ct).x)
        args = (backend.tree_from_numpy(params), backend.from_numpy(p["x"]), backend.from_numpy(y), backend.from_numpy(ct))
        got = (fam.log_density_vjp(*args), fam.log_density_input_vjp(*args).x)
        for a, r in zip(backend.tree_to_numpy(tuple(got[0]) + (got[1],)), tuple(ref[0]) + (ref[1],)):
            assert_close(a, r, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------------------------
# M-steps: the weighted maximum-likelihood fit, against scipy.optimize
# --------------------------------------------------------------------------------------------


def _single_objective(kind, x, y, w, ridge):
    """Minus the weighted penalised log-likelihood of one expert, its gradient (NumPy, independent)."""
    X = np.column_stack([x, np.ones(len(x))])

    def f(th):
        eta = X @ th
        b = np.logaddexp(0.0, eta) if kind == "logistic" else np.exp(eta)
        mu = special.expit(eta) if kind == "logistic" else np.exp(eta)
        val = -np.sum(w * (y * eta - b)) + 0.5 * ridge * th @ th
        return val, -X.T @ (w * (y - mu)) + ridge * th

    return f


def _multi_objective(x, y, w, ridge, c):
    X = np.column_stack([x, np.ones(len(x))])
    q = X.shape[1]

    def f(th):
        free = th.reshape(c - 1, q).T  # (q, C-1), the last class is the baseline
        eta = X @ np.column_stack([free, np.zeros(q)])
        logp = eta - special.logsumexp(eta, axis=1, keepdims=True)
        val = -np.sum(w * np.sum(y * logp, axis=1)) + 0.5 * ridge * th @ th
        grad = -(X.T @ (w[:, None] * (y - np.exp(logp) * y.sum(1, keepdims=True))))[:, : c - 1]
        return val, grad.T.ravel() + ridge * th

    return f


def _scipy_fit(f, n):
    res = optimize.minimize(f, np.zeros(n), jac=True, method="BFGS", options={"gtol": 1e-11, "maxiter": 10000})
    return res.x, res.fun


@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_single_index_m_steps_agree_with_scipy_optimize(rng, ridge):
    p = _problem(rng, n=30, k=2)
    x, w = p["x"], p["weights"]
    cases = [
        ("logistic", LogisticExperts(ridge=ridge), p["y_bin"], LogisticExpertsParams),
        ("logistic", LogisticExperts(soft_targets=True, ridge=ridge), p["y_soft"], LogisticExpertsParams),
        ("poisson", PoissonExperts(ridge=ridge), p["y_count"], PoissonExpertsParams),
    ]
    for kind, fam, y, rec in cases:
        start = rec(np.zeros((2, D)), np.zeros(2))
        got = fam.m_step(start, x, y, w)
        for k in range(2):
            f = _single_objective(kind, x, y, w[:, k], ridge)
            th, fun = _scipy_fit(f, D + 1)
            mine = np.r_[got.weight[k], got.bias[k]]
            np.testing.assert_allclose(mine, th, rtol=1e-6, atol=1e-7, err_msg=f"{fam.name} expert {k}")
            assert f(mine)[0] <= fun + 1e-10  # at least as good as scipy
            assert np.max(np.abs(f(mine)[1])) < 1e-8  # a stationary point


@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_multinomial_m_step_agrees_with_scipy_optimize(rng, ridge):
    p = _problem(rng, n=30, k=2)
    x, w = p["x"], p["weights"]
    for fam, y in ((MultinomialLogisticExperts(ridge=ridge), p["y_onehot"]),
                   (MultinomialLogisticExperts(soft_targets=True, ridge=ridge), p["y_prob"])):
        got = fam.m_step(MultinomialLogisticExpertsParams(np.zeros((2, D, C)), np.zeros((2, C))), x, y, w)
        np.testing.assert_array_equal(got.weight[:, :, C - 1], 0.0)  # baseline: the last class
        np.testing.assert_array_equal(got.bias[:, C - 1], 0.0)
        for k in range(2):
            f = _multi_objective(x, y, w[:, k], ridge, C)
            th, fun = _scipy_fit(f, (C - 1) * (D + 1))
            theta = np.vstack([got.weight[k], got.bias[k][None, :]])[:, : C - 1]  # (q, C-1)
            mine = theta.T.ravel()
            np.testing.assert_allclose(mine, th, rtol=1e-6, atol=1e-7)
            assert f(mine)[0] <= fun + 1e-10
            assert np.max(np.abs(f(mine)[1])) < 1e-7


def test_poisson_offset_m_step_agrees_with_scipy(rng):
    p = _problem(rng, n=30, k=2)
    x, w, y = p["x"], p["weights"], p["y_count"]
    o = rng.normal(scale=0.3, size=30)
    got = PoissonExperts(offset_column=True).m_step(
        PoissonExpertsParams(np.zeros((2, D)), np.zeros(2)), np.column_stack([x, o]), y, w
    )
    X = np.column_stack([x, np.ones(30)])
    for k in range(2):
        def f(th):
            eta = X @ th + o
            return -np.sum(w[:, k] * (y * eta - np.exp(eta))), -X.T @ (w[:, k] * (y - np.exp(eta)))

        th, _ = _scipy_fit(f, D + 1)
        np.testing.assert_allclose(np.r_[got.weight[k], got.bias[k]], th, rtol=1e-6, atol=1e-7)


def test_no_bias_m_step_fits_through_the_origin(rng):
    p = _problem(rng, n=30, k=2)
    x, w, y = p["x"], p["weights"], p["y_bin"]
    got = LogisticExperts(bias=False).m_step(LogisticExpertsParams(np.zeros((2, D)), np.zeros(2)), x, y, w)
    np.testing.assert_array_equal(got.bias, 0.0)
    for k in range(2):
        def f(th):
            eta = x @ th
            return -np.sum(w[:, k] * (y * eta - np.logaddexp(0, eta))), -x.T @ (w[:, k] * (y - special.expit(eta)))

        th, _ = _scipy_fit(f, D)
        np.testing.assert_allclose(got.weight[k], th, rtol=1e-6, atol=1e-7)


def test_m_steps_agree_on_every_backend(backend, rng):
    p = _problem(rng)
    cases = [(PoissonExperts(), p["poisson"], p["y_count"])]
    if backend.name != "jax":
        # on JAX every op of a Newton loop compiles once (seconds each loop): the Poisson loop stands for
        # the logistic one (same code but the mean function), and fit_weighted_multinomial has its own
        # JAX test in test_softmax_gate
        cases += [(LogisticExperts(), p["logistic"], p["y_bin"]), (MultinomialLogisticExperts(), p["multi"], p["y_onehot"])]
    for fam, params, y in cases:
        ref = fam.m_step(params, p["x"], y, p["weights"])
        got = fam.m_step(backend.tree_from_numpy(params), backend.from_numpy(p["x"]), backend.from_numpy(y),
                         backend.from_numpy(p["weights"]))
        for a, r in zip(backend.tree_to_numpy(got), ref):
            assert_close(a, r, rtol=1e-9, atol=1e-10)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["logistic", "poisson", "multinomial"]))
def test_m_step_never_lowers_the_weighted_loglik_property(seed, kind):
    rng = np.random.default_rng(seed)
    p = _problem(rng, n=15, k=2)
    x, w = p["x"], p["weights"]
    fam, params, y = {
        "logistic": (LogisticExperts(), p["logistic"], p["y_bin"]),
        "poisson": (PoissonExperts(), p["poisson"], p["y_count"]),
        "multinomial": (MultinomialLogisticExperts(), p["multi"], p["y_onehot"]),
    }[kind]
    params = type(params)(*(a[:2] for a in params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SeparationWarning)  # tiny samples may be separated: still monotone
        new = fam.m_step(params, x, y, w)
    before = np.sum(w * fam.log_density(params, x, y))
    after = np.sum(w * fam.log_density(new, x, y))
    assert after >= before - 1e-10 * (abs(before) + 1)


def test_em_with_glm_experts_never_decreases(rng):
    # a two-expert MoE per family on data drawn from such a model; EM (fit_moe) must be monotone
    n = 80
    x = rng.uniform(-2.0, 2.0, size=(n, 1))
    second = rng.uniform(size=n) < special.expit(3.0 * x[:, 0])
    cases = [
        (LogisticExperts(ridge=1e-3), (rng.uniform(size=n) < special.expit(np.where(second, 2.0, -2.0) * x[:, 0])).astype(float),
         LogisticExpertsParams(np.array([[-1.0], [1.0]]), np.zeros(2))),
        (PoissonExperts(), rng.poisson(np.exp(np.where(second, 1.0 + x[:, 0], 2.0 - x[:, 0]))).astype(float),
         PoissonExpertsParams(np.array([[-0.5], [0.5]]), np.ones(2))),
        (MultinomialLogisticExperts(ridge=1e-3), class_targets(np.where(second, 2, rng.integers(0, 2, size=n)), 3),
         MultinomialLogisticExpertsParams(np.zeros((2, 1, 3)), np.array([[0.5, 0.0, 0.0], [0.0, 0.0, 0.5]]))),
    ]
    for fam, y, experts in cases:
        init = MoEParams(SoftmaxGateParams(np.array([[-0.5, 0.0]]), np.zeros(2)), experts)
        # 60 iterations (EM for mixtures of logistic regressions crawls): monotonicity is what is checked
        options = EMOptions(max_iter=60, tol=1e-8, on_decrease="raise", warn_not_converged=False)
        fit = fit_moe(x, y, SoftmaxGate(), fam, init, options=options)
        assert fit.decreases == (), fam.name
        assert np.all(np.diff(fit.loglik_trace) >= -1e-10)
        assert fit.n_free_parameters == 2 + fam.n_free_parameters(experts)


# --------------------------------------------------------------------------------------------
# Separation
# --------------------------------------------------------------------------------------------


def _separated():
    x = np.linspace(-1.0, 1.0, 20)[:, None]
    return x, (x[:, 0] > 0).astype(float)


def test_logistic_separation_warns_and_ridge_fixes_it():
    x, y = _separated()
    w = np.ones((20, 1))
    start = LogisticExpertsParams(np.zeros((1, 1)), np.zeros(1))
    with pytest.warns(SeparationWarning, match="expert 0 does not exist .*separated.*Set ridge > 0"):
        fit = LogisticExperts().m_step(start, x, y, w)
    assert fit.weight[0, 0] > 20  # diverging, returned finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = LogisticExperts(ridge=0.1).m_step(start, x, y, w)
    f = _single_objective("logistic", x, y, w[:, 0], 0.1)
    th, _ = _scipy_fit(f, 2)
    np.testing.assert_allclose(np.r_[fit.weight[0], fit.bias[0]], th, rtol=1e-6, atol=1e-7)


def test_separation_is_only_reported_for_the_separated_expert():
    x, y = _separated()
    rng = np.random.default_rng(1)
    y2 = np.where(rng.uniform(size=20) < 0.3, 1.0 - y, y)  # expert 1 sees label noise: not separated
    # one problem per expert: the two data sets stacked, expert 0 weighting the first, expert 1 the second
    xx = np.vstack([x, x])
    yy = np.r_[y, y2]
    ww = np.vstack([np.column_stack([np.ones(20), np.zeros(20)]), np.column_stack([np.zeros(20), np.ones(20)])])
    start = LogisticExpertsParams(np.zeros((2, 1)), np.zeros(2))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit = LogisticExperts().m_step(start, xx, yy, ww)
    messages = [str(r.message) for r in rec if issubclass(r.category, SeparationWarning)]
    assert len(messages) == 1 and "expert 0 does not exist" in messages[0]
    assert abs(fit.weight[1, 0]) < 10


def test_multinomial_separation_is_reported_under_the_experts_name():
    x = np.linspace(-1.0, 1.0, 30)[:, None]
    labels = np.digitize(x[:, 0], [-0.33, 0.33])  # three ordered classes, separated by x
    y = class_targets(labels, 3)
    start = MultinomialLogisticExpertsParams(np.zeros((1, 1, 3)), np.zeros((1, 3)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        MultinomialLogisticExperts().m_step(start, x, y, np.ones((30, 1)))
    # one class for the gates' and the experts' separation (moeref.em.SeparationWarning); the
    # solver's own warning is replaced by a single one that names the expert
    assert GateSeparationWarning is SeparationWarning
    messages = [str(r.message) for r in rec if issubclass(r.category, SeparationWarning)]
    assert len(messages) == 1 and "multinomial_logistic experts" in messages[0] and "expert 0 does not exist" in messages[0]


def test_poisson_all_zero_counts_in_a_group_warns():
    x = np.r_[np.zeros(10), np.ones(10)][:, None]  # group indicator
    y = np.r_[np.arange(10) % 4, np.zeros(10)].astype(float)  # group 1 has no events: its rate -> 0
    start = PoissonExpertsParams(np.zeros((1, 1)), np.zeros(1))
    with pytest.warns(SeparationWarning, match="counts are all 0 on one side"):
        fit = PoissonExperts().m_step(start, x, y, np.ones((20, 1)))
    assert fit.weight[0, 0] < -15


# --------------------------------------------------------------------------------------------
# Degeneracies and bad input
# --------------------------------------------------------------------------------------------


def test_degenerate_m_steps_raise_named_errors(rng):
    p = _problem(rng)
    x, y = p["x"], p["y_bin"]
    start = LogisticExpertsParams(np.zeros((K, D)), np.zeros(K))
    w = p["weights"].copy()
    w[:, 1] = 0.0
    with pytest.raises(EmptyComponentError, match="expert 1 has total weight 0.000e\\+00"):
        LogisticExperts().m_step(start, x, y, w)
    collinear = np.column_stack([x[:, 0], 2.0 * x[:, 0]])
    with pytest.raises(SingularWeightedLeastSquaresError, match="expert 0: the weighted Gram matrix"):
        PoissonExperts().m_step(PoissonExpertsParams(np.zeros((K, D)), np.zeros(K)), collinear, p["y_count"], p["weights"])
    with pytest.raises(SingularWeightedLeastSquaresError, match="collinear"):
        MultinomialLogisticExperts().m_step(p["multi"], collinear, p["y_onehot"], p["weights"])


def test_bad_targets_raise(rng):
    p = _problem(rng)
    x = p["x"]
    with pytest.raises(ValueError, match="y must be non-negative counts for Poisson experts"):
        PoissonExperts().log_density(p["poisson"], x, p["y_count"] - 100.0)
    with pytest.raises(ValueError, match="y must be whole numbers"):
        PoissonExperts().log_density(p["poisson"], x, p["y_count"] + 0.5)
    with pytest.raises(ValueError, match="y must be 0 or 1 for logistic experts; pass soft_targets=True"):
        LogisticExperts().log_density(p["logistic"], x, p["y_soft"])
    with pytest.raises(ValueError, match=r"y must lie in \[0, 1\]"):
        LogisticExperts(soft_targets=True).log_density(p["logistic"], x, p["y_soft"] + 1.0)
    with pytest.raises(ValueError, match="y must be one-hot"):
        MultinomialLogisticExperts().log_density(p["multi"], x, p["y_prob"])
    with pytest.raises(ValueError, match="every row of y must sum to 1"):
        MultinomialLogisticExperts(soft_targets=True).log_density(p["multi"], x, 2.0 * p["y_prob"])
    with pytest.raises(ValueError, match=r"y has shape \(24, 2\) but \(24, 3\) was expected"):
        MultinomialLogisticExperts().log_density(p["multi"], x, p["y_onehot"][:, :2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(n_classes=3\); labels\[1\] = 3"):
        class_targets(np.array([0, 3, 1]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        class_targets(np.array([-1]), 3)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        class_targets(np.array([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        class_targets(np.array([0]), 1)


def test_bad_input_names_the_argument(rng):
    p = _problem(rng)
    x, y = p["x"], p["y_bin"]
    fam = LogisticExperts()
    with pytest.raises(TypeError, match=r"params must be a LogisticExpertsParams\(weight, bias\), got PoissonExpertsParams"):
        fam.log_density(PoissonExpertsParams(*p["logistic"]), x, y)
    with pytest.raises(ValueError, match=r"params.weight has shape \(3, 2\) but \(3, 5\) was expected \(x has d=5 features\)"):
        fam.log_density(p["logistic"], np.ones((N, 5)), y)
    with pytest.raises(ValueError, match=r"params.bias has shape \(2,\) but \(3,\) was expected"):
        fam.log_density(p["logistic"]._replace(bias=np.zeros(2)), x, y)
    with pytest.raises(ValueError, match=r"y has shape \(23,\) but \(24,\) was expected"):
        fam.log_density(p["logistic"], x, y[:-1])
    with pytest.raises(TypeError, match="share one dtype"):
        fam.log_density(p["logistic"], x.astype(np.float32), y)
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        fam.log_density(p["logistic"], np.where(x > 1, np.nan, x), y)
    with pytest.raises(ValueError, match="params.bias must be zeros when bias=False"):
        LogisticExperts(bias=False).log_density(p["logistic"], x, y)
    with pytest.raises(ValueError, match=r"x has 2 columns, the last one the offset"):
        PoissonExperts(offset_column=True).log_density(p["poisson"], x, p["y_count"])
    with pytest.raises(ValueError, match=r"weights has shape \(24, 2\) but \(24, 3\) was expected"):
        fam.m_step(p["logistic"], x, y, p["weights"][:, :2])
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fam.m_step(p["logistic"], x, y, -p["weights"])
    with pytest.raises(ValueError, match=r"cotangent has shape \(24, 2\) but \(24, 3\) was expected"):
        fam.log_density_vjp(p["logistic"], x, y, np.ones((N, 2)))
    with pytest.raises(ValueError, match="ridge must be non-negative"):
        LogisticExperts(ridge=-1.0)
    with pytest.raises(TypeError, match="soft_targets must be a bool"):
        LogisticExperts(soft_targets="yes")
    with pytest.raises(TypeError, match="offset_column must be a bool"):
        PoissonExperts(offset_column=1)
    with pytest.raises(ValueError, match="max_iter must be at least 1"):
        MultinomialLogisticExperts(max_iter=0)
    with pytest.raises(ValueError, match="params.weight must have at least 2 classes"):
        MultinomialLogisticExperts().log_density(
            MultinomialLogisticExpertsParams(np.zeros((K, D, 1)), np.zeros((K, 1))), x, np.ones((N, 1))
        )
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        fam.log_density(p["logistic"], torch.from_numpy(x), y)

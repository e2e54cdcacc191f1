"""Softmax gate: the weighted multinomial Newton solver against scipy, monotonicity, separation,
the single (GEM) step, the family's VJP and unconstrained view, backends, bad input."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, special

from moeref.core import array_namespace
from moeref.em import ConvergenceWarning, EMWarning
from moeref.families import GateFamily
from moeref.softmax_gate import (
    GateSeparationWarning,
    SoftmaxGate,
    SoftmaxGateParams,
    _minus_hessian,
    fit_weighted_multinomial,
    weighted_multinomial_objective,
)
from conftest import assert_close
from helpers import assert_vjp_correct


def _problem(rng, N=30, d=2, K=3, hard=False):
    x = rng.normal(size=(N, d))
    if hard:
        t = np.eye(K)[rng.integers(0, K, size=N)]
    else:
        t = rng.dirichlet(np.ones(K), size=N)
    s = rng.uniform(0.2, 1.5, size=N)
    return x, t, s


def _np_objective(theta, x, t, s, K, baseline, ridge):
    """The weighted objective written directly in NumPy/SciPy, theta = free columns (q, Kf) flattened."""
    d = x.shape[1]
    Kf = K - 1 if baseline else K
    th = theta.reshape(d + 1, Kf)
    if baseline:
        th = np.column_stack([th, np.zeros(d + 1)])
    z = x @ th[:d] + th[d]
    logp = special.log_softmax(z, axis=1)
    return float(np.sum(s * np.sum(t * logp, axis=1)) - 0.5 * ridge * np.sum(theta**2))


def _scipy_fit(x, t, s, K, baseline, ridge):
    d = x.shape[1]
    Kf = K - 1 if baseline else K
    res = optimize.minimize(
        lambda th: -_np_objective(th, x, t, s, K, baseline, ridge),
        np.zeros((d + 1) * Kf),
        method="BFGS",
        options={"gtol": 1e-11, "maxiter": 10000},
    )
    th = res.x.reshape(d + 1, Kf)
    if baseline:
        th = np.column_stack([th, np.zeros(d + 1)])
    return th[:d], th[d], -res.fun


# --------------------------------------------------------------------------------------------
# fit_weighted_multinomial
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parametrisation, ridge", [("baseline", 0.0), ("baseline", 0.7), ("symmetric", 0.7)])
def test_newton_equals_scipy_minimize(rng, parametrisation, ridge):
    x, t, s = _problem(rng)
    fit = fit_weighted_multinomial(x, t, s, np.zeros((2, 3)), np.zeros(3), parametrisation=parametrisation, ridge=ridge)
    w, b, obj = _scipy_fit(x, t, s, 3, parametrisation == "baseline", ridge)
    assert fit.converged and not fit.separated
    np.testing.assert_allclose(fit.weight, w, atol=1e-6)
    np.testing.assert_allclose(fit.bias, b, atol=1e-6)
    assert fit.objective == pytest.approx(obj, rel=1e-12)
    assert fit.objective >= obj - 1e-12 * abs(obj)  # Newton's optimum is at least as good as BFGS's
    assert fit.penalty == pytest.approx(0.5 * ridge * (np.sum(fit.weight**2) + np.sum(fit.bias**2)), rel=1e-12)
    assert fit.loglik - fit.penalty == pytest.approx(fit.objective, rel=1e-14)
    direct = weighted_multinomial_objective(x, t, s, fit.weight, fit.bias, ridge=ridge)
    assert float(direct) == pytest.approx(fit.objective, rel=1e-13)
    if parametrisation == "symmetric":  # the ridge optimum is centred over the classes
        np.testing.assert_allclose(fit.weight.sum(1), 0.0, atol=1e-12)
        assert abs(fit.bias.sum()) < 1e-12


def test_symmetric_without_ridge_takes_minimum_norm_steps(rng):
    x, t, s = _problem(rng)
    w0, b0 = rng.normal(size=(2, 3)), rng.normal(size=3)
    sym = fit_weighted_multinomial(x, t, s, w0, b0, parametrisation="symmetric")
    base = fit_weighted_multinomial(x, t, s, w0, b0)
    assert sym.converged and base.converged
    # same gate probabilities as the identifiable fit ...
    p_sym = special.softmax(x @ sym.weight + sym.bias, axis=1)
    p_base = special.softmax(x @ base.weight + base.bias, axis=1)
    np.testing.assert_allclose(p_sym, p_base, atol=1e-9)
    # ... and the sum of the columns never moves from its start (steps orthogonal to the invariance)
    np.testing.assert_allclose(sym.weight.sum(1), w0.sum(1), atol=1e-10)
    assert sym.bias.sum() == pytest.approx(b0.sum(), abs=1e-10)
    # the baseline fit moved the start to its baseline-equivalent point first
    assert np.all(base.weight[:, 2] == 0) and base.bias[2] == 0
    assert base.objective == pytest.approx(sym.objective, rel=1e-12)


def test_sample_weights_and_target_row_sums_are_interchangeable(rng):
    x, t, s = _problem(rng)
    a = fit_weighted_multinomial(x, t * s[:, None], None, np.zeros((2, 3)), np.zeros(3))
    b = fit_weighted_multinomial(x, t, s, np.zeros((2, 3)), np.zeros(3))
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-10)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-10)
    # a zero-weight sample does not matter
    s0 = s.copy()
    s0[0] = 0.0
    c = fit_weighted_multinomial(x, t, s0, np.zeros((2, 3)), np.zeros(3))
    t_mod = t.copy()
    t_mod[0] = [1.0, 0.0, 0.0]
    d = fit_weighted_multinomial(x, t_mod, s0, np.zeros((2, 3)), np.zeros(3))
    np.testing.assert_allclose(c.weight, d.weight, atol=1e-12)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["baseline", "symmetric"]), st.sampled_from([0.0, 0.3]), st.booleans())
def test_objective_never_decreases_property(seed, parametrisation, ridge, hard):
    rng = np.random.default_rng(seed)
    x, t, s = _problem(rng, N=12, d=2, K=3, hard=hard)
    w0, b0 = 3.0 * rng.normal(size=(2, 3)), 3.0 * rng.normal(size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EMWarning)  # hard targets may be separable
        fit = fit_weighted_multinomial(x, t, s, w0, b0, parametrisation=parametrisation, ridge=ridge, max_iter=30)
    trace = np.asarray(fit.objective_trace)
    assert np.all(np.diff(trace) >= 0)
    assert len(trace) == fit.n_iter + 1
    assert trace[-1] == fit.objective


@given(st.integers(0, 2**32 - 1), st.sampled_from(["baseline", "symmetric"]))
def test_single_step_increases_the_objective_property(seed, parametrisation):
    rng = np.random.default_rng(seed)
    x, t, s = _problem(rng, N=12, d=2, K=3)
    w0, b0 = 2.0 * rng.normal(size=(2, 3)), rng.normal(size=3)
    one = fit_weighted_multinomial(x, t, s, w0, b0, parametrisation=parametrisation, single_step=True)
    start = float(weighted_multinomial_objective(x, t, s, w0, b0))
    assert one.n_iter <= 1
    assert one.objective >= start
    assert one.objective_trace[0] == pytest.approx(start, rel=1e-13)
    full = fit_weighted_multinomial(x, t, s, w0, b0, parametrisation=parametrisation)
    assert full.objective >= one.objective - 1e-12 * abs(one.objective)


def test_single_step_is_one_newton_step(rng):
    """Without halving, the step is H^{-1} g of the baseline objective (the textbook IRLS update)."""
    x, t, s = _problem(rng, N=40, d=1, K=2)
    one = fit_weighted_multinomial(x, t, s, np.zeros((1, 2)), np.zeros(2), single_step=True)
    assert one.n_halvings == 0 and one.n_iter == 1 and not one.converged
    # binary logistic regression: class 0 against the baseline class 1
    X = np.column_stack([x, np.ones(40)])
    p = np.full(40, 0.5)
    r = t.sum(1)
    g = X.T @ (s * (t[:, 0] - r * p))
    H = X.T @ ((s * r * p * (1 - p))[:, None] * X)
    step = np.linalg.solve(H, g)
    np.testing.assert_allclose([one.weight[0, 0], one.bias[0]], step, rtol=1e-12)


def test_separation_is_detected_and_a_ridge_removes_it(rng):
    x = np.r_[rng.uniform(-3, -0.5, 10), rng.uniform(0.5, 3, 10)][:, None]
    t = np.column_stack([x[:, 0] < 0, x[:, 0] > 0]).astype(float)
    with pytest.warns(GateSeparationWarning, match="separated.*do not exist.*ridge > 0"):
        fit = fit_weighted_multinomial(x, t, None, np.zeros((1, 2)), np.zeros(2))
    assert fit.separated and fit.min_probability < 1e-8
    assert abs(fit.weight[0, 0]) > 10  # the weights ran away
    assert fit.objective > -1e-8  # while the objective approached its supremum, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge = fit_weighted_multinomial(x, t, None, np.zeros((1, 2)), np.zeros(2), ridge=1.0)
    assert ridge.converged and not ridge.separated and abs(ridge.weight[0, 0]) < 10


def test_a_class_without_target_mass_is_a_separation(rng):
    x, t, s = _problem(rng)
    t[:, 1] = 0.0
    with pytest.warns(GateSeparationWarning):
        fit = fit_weighted_multinomial(x, t, s, np.zeros((2, 3)), np.zeros(3))
    assert fit.separated and fit.bias[1] < -10


def test_overlapping_hard_labels_are_not_separated(rng):
    x = np.r_[rng.uniform(-3, 0.5, 10), rng.uniform(-0.5, 3, 10)][:, None]
    t = np.r_[np.tile([1.0, 0.0], (10, 1)), np.tile([0.0, 1.0], (10, 1))]
    x[0, 0], x[19, 0] = 2.0, -2.0  # one point of each class deep in the other's region
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_weighted_multinomial(x, t, None, np.zeros((1, 2)), np.zeros(2))
    assert fit.converged and not fit.separated


def test_max_iter_reports_not_converged(rng):
    x, t, s = _problem(rng)
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=1 Newton steps"):
        fit = fit_weighted_multinomial(x, t, s, 5.0 * np.ones((2, 3)), np.zeros(3), max_iter=1)
    assert not fit.converged and fit.n_iter == 1 and "max_iter=1" in fit.stop_reason


def test_one_class_baseline_has_nothing_to_fit(rng):
    x, t, s = _problem(rng, K=1)
    fit = fit_weighted_multinomial(x, t, s, np.zeros((2, 1)), np.zeros(1))
    assert fit.converged and fit.n_iter == 0 and fit.objective == 0.0


# --------------------------------------------------------------------------------------------
# The Hessian assembly (one matmul per block row, no per-sample outer products)
# --------------------------------------------------------------------------------------------


def _einsum_minus_hessian(x, p, s, r, n_free, ridge):
    """M written out from its definition: per-sample (Kf, Kf) weights times per-sample outer products."""
    x1 = np.column_stack([x, np.ones(len(x))])
    q = x1.shape[1]
    pf = p[:, :n_free]
    a = (s * r)[:, None, None] * (np.einsum("ik,kl->ikl", pf, np.eye(n_free)) - np.einsum("ik,il->ikl", pf, pf))
    m = np.einsum("ikl,ia,ib->kalb", a, x1, x1).reshape(n_free * q, n_free * q)
    return m + ridge * np.eye(n_free * q)


def _minus_hessian_of(x, p, s, r, n_free, ridge):
    x1 = np.column_stack([x, np.ones(len(x))])
    return _minus_hessian(x1, p, s * r, n_free, ridge, array_namespace(x1))


@pytest.mark.parametrize("n_free, ridge", [(3, 0.0), (4, 0.0), (3, 0.4)])
def test_minus_hessian_equals_the_per_sample_outer_products(rng, n_free, ridge):
    x, t, s = _problem(rng, N=40, d=3, K=4)
    p = special.softmax(x @ rng.normal(size=(3, 4)) + rng.normal(size=4), axis=1)
    r = t.sum(1) * rng.uniform(0.5, 2.0, size=40)  # rows of the targets need not sum to 1
    got = _minus_hessian_of(x, p, s, r, n_free, ridge)
    want = _einsum_minus_hessian(x, p, s, r, n_free, ridge)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert np.array_equal(got, got.T)


@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(0, 3), st.sampled_from([1.0, 30.0]))
def test_minus_hessian_equals_the_per_sample_outer_products_property(seed, K, d, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(9, d))
    p = special.softmax(scale * rng.normal(size=(9, K)), axis=1)  # scale 30: saturated probabilities
    s, r = rng.uniform(0.0, 2.0, size=9), rng.uniform(0.0, 2.0, size=9)
    # delta_kl p_k - p_k p_l cancels when p_k is near 1 (in either form): round-off is relative to the
    # scale of the terms, sum_i s_i r_i |x~_i|^2, not to the (tiny) result
    scale = np.sum(s * r * (1.0 + np.sum(x * x, axis=1)))
    for n_free in {K - 1, K} - {0}:
        got = _minus_hessian_of(x, p, s, r, n_free, 0.0)
        want = _einsum_minus_hessian(x, p, s, r, n_free, 0.0)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * scale)


def test_minus_hessian_over_several_blocks_of_samples(rng, monkeypatch):
    import moeref.softmax_gate as module

    x, t, s = _problem(rng, N=40, d=3, K=4)
    p = special.softmax(x @ rng.normal(size=(3, 4)), axis=1)
    r = t.sum(1)
    monkeypatch.setattr(module, "_HESSIAN_BLOCK_ROWS", 7)  # 6 blocks, the last one shorter
    got = _minus_hessian_of(x, p, s, r, 3, 0.1)
    np.testing.assert_allclose(got, _einsum_minus_hessian(x, p, s, r, 3, 0.1), rtol=1e-12, atol=1e-13)


def test_minus_hessian_of_a_saturated_gate_keeps_full_accuracy():
    # against an extended-precision evaluation of the definition: forming s r (delta_kl p_k - p_k p_l)
    # per sample keeps the error at round-off of the result; subtracting summed p_k p_l blocks from
    # summed p_k blocks (a single Gram matrix) was measured 10x worse here, 17x on the smallest eigenvalue
    rng = np.random.default_rng(1)
    N, d, K = 2000, 3, 4
    x = rng.standard_normal((N, d))
    x1 = np.column_stack([x, np.ones(N)])
    p = special.softmax(x1 @ (12.0 * rng.standard_normal((d + 1, K))), axis=1)  # many p_k within 1e-10 of 1
    sr = rng.uniform(0.1, 2.0, N) * rng.uniform(0.5, 1.0, N)
    pl, srl, xl = p.astype(np.longdouble), sr.astype(np.longdouble), x1.astype(np.longdouble)
    eye = np.eye(K - 1, dtype=np.longdouble)
    a = srl[:, None, None] * (eye[None] * pl[:, :K - 1, None] - pl[:, :K - 1, None] * pl[:, None, :K - 1])
    want = np.einsum("ikl,ia,ib->kalb", a, xl, xl).reshape((K - 1) * (d + 1), (K - 1) * (d + 1))
    got = _minus_hessian(x1, p, sr, K - 1, 0.0, array_namespace(x1))
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < 5e-15
    lo_want = np.linalg.eigvalsh(want.astype(np.float64))[0]
    assert abs(np.linalg.eigvalsh(got)[0] - lo_want) < 2e-7 * lo_want


def test_newton_memory_has_no_per_sample_outer_products():
    # the previous assembly held an (N, (d+1)^2) array of per-sample outer products on top of an
    # (N, Kf^2) array of weights: at d=16, K=8 its peak was ~500 floats per sample; the block rows
    # need ~300 (one (N, Kf (d+1)) scaled copy of the inputs at a time, plus the fit's own arrays)
    N, d, K = 5000, 16, 8
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(N, d)), rng.dirichlet(np.ones(K), size=N)
    tracemalloc.start()
    try:
        fit = fit_weighted_multinomial(x, t, None, np.zeros((d, K)), np.zeros(K))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fit.converged
    assert peak < N * (d + 1) ** 2 * 8, f"peak {peak / (8 * N):.0f} floats per sample"


# --------------------------------------------------------------------------------------------
# The gate family
# --------------------------------------------------------------------------------------------


def test_softmax_gate_is_a_gate_family():
    gate = SoftmaxGate()
    assert isinstance(gate, GateFamily) and gate.models_x is False
    p = SoftmaxGateParams(np.zeros((3, 4)), np.zeros(4))
    assert gate.n_free_parameters(p) == 3 * 4 == SoftmaxGate(parametrisation="symmetric").n_free_parameters(p)


def test_log_weights_vjp(rng):
    gate = SoftmaxGate()
    x = rng.normal(size=(7, 3))
    p = SoftmaxGateParams(rng.normal(size=(3, 4)), rng.normal(size=4))
    assert_vjp_correct(
        "SoftmaxGate.log_weights",
        lambda params, x: gate.log_weights(params, x),
        lambda params, x, ct: (gate.log_weights_vjp(params, x, ct), None),
        (p, x),
        rng.normal(size=(7, 4)),
    )


def test_log_weights_match_scipy(rng):
    x = rng.normal(size=(7, 3))
    p = SoftmaxGateParams(rng.normal(size=(3, 4)), rng.normal(size=4))
    np.testing.assert_allclose(SoftmaxGate().log_weights(p, x), special.log_softmax(x @ p.weight + p.bias, axis=1), rtol=1e-13)


def test_m_step_is_the_unweighted_fit_of_the_responsibilities(rng):
    x, t, _ = _problem(rng)
    gate = SoftmaxGate(ridge=0.2)
    p = gate.m_step(SoftmaxGateParams(np.zeros((2, 3)), np.zeros(3)), x, t)
    ref = fit_weighted_multinomial(x, t, None, np.zeros((2, 3)), np.zeros(3), ridge=0.2)
    np.testing.assert_array_equal(p.weight, ref.weight)
    assert float(gate.penalty(p)) == pytest.approx(ref.penalty, rel=1e-14)
    gem = SoftmaxGate(newton="single_step").m_step(SoftmaxGateParams(np.zeros((2, 3)), np.zeros(3)), x, t)
    one = fit_weighted_multinomial(x, t, None, np.zeros((2, 3)), np.zeros(3), single_step=True)
    np.testing.assert_array_equal(gem.weight, one.weight)


@pytest.mark.parametrize("parametrisation", ["baseline", "symmetric"])
def test_unconstrained_view_and_its_vjp(rng, parametrisation):
    gate = SoftmaxGate(parametrisation=parametrisation, ridge=0.5)
    p = SoftmaxGateParams(rng.normal(size=(2, 3)), rng.normal(size=3))
    if parametrisation == "baseline":
        p = SoftmaxGateParams(p.weight - p.weight[:, 2:], p.bias - p.bias[2])
    free = gate.unconstrained(p)
    back = gate.constrained(free)
    np.testing.assert_allclose(back.weight, p.weight, atol=1e-15)
    np.testing.assert_allclose(back.bias, p.bias, atol=1e-15)
    ct = SoftmaxGateParams(rng.normal(size=(2, 3)), rng.normal(size=3))
    assert_vjp_correct(
        f"SoftmaxGate.constrained[{parametrisation}]",
        lambda f: _flat(gate.constrained(f)),
        lambda f, c: (gate.constrained_vjp(f, SoftmaxGateParams(c[:6].reshape(2, 3), c[6:])),),
        (free,),
        np.concatenate([ct.weight.ravel(), ct.bias]),
    )
    # the penalty's gradient
    assert_vjp_correct(
        "SoftmaxGate.penalty",
        lambda params: gate.penalty(params),
        lambda params, c: (SoftmaxGateParams(*(c * g for g in gate.penalty_vjp(params))),),
        (p,),
        np.array(1.3),
    )


def _flat(params):
    import array_api_compat

    xp = array_api_compat.array_namespace(params.weight)
    return xp.concat([xp.reshape(params.weight, (-1,)), params.bias])


# --------------------------------------------------------------------------------------------
# Backends (one set of shapes: N=30, d=2, K=3)
# --------------------------------------------------------------------------------------------


def test_fit_is_identical_on_every_backend(backend, rng):
    x, t, s = _problem(rng)
    w0 = rng.normal(size=(2, 3))
    # one fit (JAX compiles every operation for every new shape: seconds per fit)
    ref = fit_weighted_multinomial(x, t, s, w0, np.zeros(3), ridge=0.1)
    got = fit_weighted_multinomial(*(backend.from_numpy(a) for a in (x, t, s, w0, np.zeros(3))), ridge=0.1)
    assert got.n_iter == ref.n_iter and got.converged
    assert_close(backend.to_numpy(got.weight), ref.weight, rtol=1e-10, atol=1e-12)
    assert_close(backend.to_numpy(got.bias), ref.bias, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.objective_trace, ref.objective_trace, rtol=1e-12)
    gate = SoftmaxGate()
    p = SoftmaxGateParams(w0, rng.normal(size=3))
    ct = rng.normal(size=(30, 3))
    bp, bx = backend.tree_from_numpy(p), backend.from_numpy(x)
    assert_close(backend.to_numpy(gate.log_weights(bp, bx)), gate.log_weights(p, x))
    g_ref = gate.log_weights_vjp(p, x, ct)
    g_got = backend.tree_to_numpy(gate.log_weights_vjp(bp, bx, backend.from_numpy(ct)))
    for a, b in zip(g_got, g_ref):
        assert_close(a, b)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, t, s = _problem(rng)
    w, b = np.zeros((2, 3)), np.zeros(3)
    with pytest.raises(ValueError, match=r"targets has shape \(30, 2\) but \(30, 3\) was expected"):
        fit_weighted_multinomial(x, t[:, :2], s, w, b)
    with pytest.raises(ValueError, match=r"sample_weight has shape \(29,\) but \(30,\) was expected"):
        fit_weighted_multinomial(x, t, s[:29], w, b)
    with pytest.raises(ValueError, match="targets must be non-negative"):
        fit_weighted_multinomial(x, -t, s, w, b)
    with pytest.raises(ValueError, match="sample_weight must be non-negative"):
        fit_weighted_multinomial(x, t, -s, w, b)
    with pytest.raises(ValueError, match=r"gate.weight has shape \(3, 3\) but \(2, \*\) was expected"):
        fit_weighted_multinomial(x, t, s, np.zeros((3, 3)), b)
    with pytest.raises(ValueError, match=r"gate.bias has shape \(2,\) but \(3,\) was expected"):
        fit_weighted_multinomial(x, t, s, w, np.zeros(2))
    with pytest.raises(ValueError, match="parametrisation must be one of 'baseline', 'symmetric'; got 'free'"):
        fit_weighted_multinomial(x, t, s, w, b, parametrisation="free")
    with pytest.raises(ValueError, match="ridge must be a finite non-negative float, got -1.0"):
        fit_weighted_multinomial(x, t, s, w, b, ridge=-1.0)
    with pytest.raises(ValueError, match="tol must be a finite non-negative float"):
        fit_weighted_multinomial(x, t, s, w, b, tol=float("nan"))
    with pytest.raises(ValueError, match="max_iter must be at least 1, got 0"):
        fit_weighted_multinomial(x, t, s, w, b, max_iter=0)
    with pytest.raises(TypeError, match="single_step must be a bool"):
        fit_weighted_multinomial(x, t, s, w, b, single_step=1)
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        fit_weighted_multinomial(np.where(x > 1, np.inf, x), t, s, w, b)
    with pytest.raises(TypeError, match="share one dtype"):
        fit_weighted_multinomial(x.astype(np.float32), t, s, w, b)
    with pytest.raises(ValueError, match="newton must be one of 'full', 'single_step'; got 'half'"):
        SoftmaxGate(newton="half")
    with pytest.raises(ValueError, match="ridge must be a finite non-negative float"):
        SoftmaxGate(ridge=float("inf"))
    gate = SoftmaxGate()
    with pytest.raises(TypeError, match="params must be a SoftmaxGateParams"):
        gate.log_weights((w, b), x)
    with pytest.raises(ValueError, match=r"cotangent has shape \(30, 2\) but \(30, 3\) was expected"):
        gate.log_weights_vjp(SoftmaxGateParams(w, b), x, np.zeros((30, 2)))

"""Generic MoE EM driver: log-likelihoods against direct computations, the VJP, EM monotonicity,
explicit restarts, penalties, joint vs conditional likelihood, gradient ascent, backends, bad input.

A minimal linear-Gaussian expert family and a minimal x-density gate are written here (test-only),
so that the driver is tested independently of the real families; extra tests then run it with
`moeref.gaussian_experts` and `moeref.gaussian_gate`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import array_api_compat
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import special, stats

from moeref.constant_gate import ConstantGate, ConstantGateParams
from moeref.em import (
    CollapsedVarianceError,
    ConvergenceWarning,
    EMError,
    EMOptions,
    EmptyComponentError,
    NonFiniteLogLikelihoodError,
    SingularWeightedLeastSquaresError,
)
from moeref.families import ExpertFamily, GateFamily
from moeref.moe_em import (
    MoEFitResult,
    MoEParams,
    fit_moe,
    fit_moe_gradient,
    moe_e_step,
    moe_log_likelihood,
    moe_log_likelihood_vjp,
    moe_posteriors,
    moe_random_starts,
)
from moeref.em import EMResult
from moeref.softmax_gate import GateSeparationWarning, SoftmaxGate, SoftmaxGateParams
from conftest import assert_close
from helpers import assert_vjp_correct

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# --------------------------------------------------------------------------------------------
# Test-only families
# --------------------------------------------------------------------------------------------


class LGParams(NamedTuple):
    weight: Any  # (d, K)
    bias: Any  # (K,)
    sigma: Any  # (K,)


@dataclass(frozen=True)
class LinGaussFamily:
    """y (N,) | x, k ~ N(x w_k + b_k, sigma_k^2); weighted least squares M-step; log-sigma view."""

    name: str = "test_linear_gaussian"
    min_sigma: float = 1e-8

    def _r(self, p, x, y):
        return y[:, None] - (x @ p.weight + p.bias)  # (N, K)

    def log_density(self, p, x, y):
        xp = array_api_compat.array_namespace(x, y, p.weight)
        z = self._r(p, x, y) / p.sigma
        return -xp.log(p.sigma) - _HALF_LOG_2PI - 0.5 * z * z

    def log_density_vjp(self, p, x, y, c):
        xp = array_api_compat.array_namespace(x, y, p.weight)
        r = self._r(p, x, y)
        g = c * r / (p.sigma * p.sigma)  # (N, K)
        return LGParams(
            weight=xp.matrix_transpose(x) @ g,
            bias=xp.sum(g, axis=0),
            sigma=xp.sum(c * (r * r / p.sigma**3 - 1.0 / p.sigma), axis=0),
        )

    def mean(self, p, x):
        return (x @ p.weight + p.bias)[:, :, None]

    def m_step(self, p, x, y, w):
        xp = array_api_compat.array_namespace(x, y, w)
        N, d = x.shape
        K = w.shape[1]
        x1 = xp.concat([x, xp.ones((N, 1), dtype=x.dtype, device=array_api_compat.device(x))], axis=1)
        xw = xp.matrix_transpose(w)[:, None, :] * xp.matrix_transpose(x1)[None, :, :]  # (K, q, N)
        coef = xp.reshape(xp.linalg.solve(xw @ x1, xw @ y[:, None]), (K, d + 1))  # (K, q)
        weight, bias = xp.matrix_transpose(coef[:, :d]), coef[:, d]
        r = y[:, None] - (x @ weight + bias)
        sigma = xp.sqrt(xp.sum(w * r * r, axis=0) / xp.sum(w, axis=0))
        if float(xp.min(sigma)) < self.min_sigma:
            raise CollapsedVarianceError("test family: a sigma collapsed")
        return LGParams(weight, bias, sigma)

    def n_free_parameters(self, p):
        d, K = p.weight.shape
        return K * (d + 2)

    def unconstrained(self, p):
        xp = array_api_compat.array_namespace(p.sigma)
        return LGParams(p.weight, p.bias, xp.log(p.sigma))

    def constrained(self, u):
        xp = array_api_compat.array_namespace(u.sigma)
        return LGParams(u.weight, u.bias, xp.exp(u.sigma))

    def constrained_vjp(self, u, bar):
        xp = array_api_compat.array_namespace(u.sigma)
        return LGParams(bar.weight, bar.bias, bar.sigma * xp.exp(u.sigma))


@dataclass(frozen=True)
class RawLinearGaussian(LinGaussFamily):
    """The same family without an unconstrained view (gradient ascent steps sigma itself)."""

    def __getattribute__(self, name):
        if name in ("unconstrained", "constrained", "constrained_vjp"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def log_density(self, p, x, y):
        xp = array_api_compat.array_namespace(p.sigma)
        if bool(xp.any(p.sigma <= 0)):
            raise ValueError("params.sigma must be positive")
        return super().log_density(p, x, y)


class UGParams(NamedTuple):
    weights: Any  # (K,)
    means: Any  # (K, d)


@dataclass(frozen=True)
class UnitGaussianXGate:
    """models_x gate: l_k(x) = log alpha_k + log N(x | m_k, I)."""

    name: str = "test_unit_gaussian"
    models_x: ClassVar[bool] = True

    def log_weights(self, p, x):
        xp = array_api_compat.array_namespace(x, p.means)
        diff = x[:, None, :] - p.means[None, :, :]  # (N, K, d)
        return xp.log(p.weights) - 0.5 * xp.sum(diff * diff, axis=2) - x.shape[1] * _HALF_LOG_2PI

    def log_weights_vjp(self, p, x, c):
        xp = array_api_compat.array_namespace(x, p.means)
        diff = x[:, None, :] - p.means[None, :, :]
        return UGParams(weights=xp.sum(c, axis=0) / p.weights, means=xp.sum(c[:, :, None] * diff, axis=0))

    def m_step(self, p, x, tau):
        xp = array_api_compat.array_namespace(x, tau)
        nk = xp.sum(tau, axis=0)
        return UGParams(weights=nk / x.shape[0], means=(xp.matrix_transpose(tau) @ x) / nk[:, None])

    def n_free_parameters(self, p):
        K, d = p.means.shape
        return K - 1 + K * d


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _data(rng, N=30, d=2, K=3, noise=0.4):
    x = rng.normal(size=(N, d))
    gate_w = 2.0 * rng.normal(size=(d, K))
    p = special.softmax(x @ gate_w, axis=1)
    labels = np.array([rng.choice(K, p=pi) for pi in p])
    coef = 2.0 * rng.normal(size=(d, K))
    inter = np.linspace(-3.0, 3.0, K)
    y = np.sum(x * coef[:, labels].T, axis=1) + inter[labels] + noise * rng.normal(size=N)
    return x, y


def _init(rng, d=2, K=3):
    return MoEParams(
        SoftmaxGateParams(0.1 * rng.normal(size=(d, K)), np.zeros(K)),
        LGParams(rng.normal(size=(d, K)), np.linspace(-2.0, 2.0, K), np.full(K, 1.5)),
    )


def _direct_loglik(x, y, params):
    g = special.softmax(x @ params.gate.weight + params.gate.bias, axis=1)
    dens = stats.norm.pdf(y[:, None], loc=x @ params.experts.weight + params.experts.bias, scale=params.experts.sigma)
    return np.log(np.sum(g * dens, axis=1)), g * dens / np.sum(g * dens, axis=1, keepdims=True)


EXPERTS = LinGaussFamily()
GATE = SoftmaxGate()
QUIET = dict(warn_not_converged=False)


def test_test_families_satisfy_the_protocols():
    assert isinstance(EXPERTS, ExpertFamily) and isinstance(UnitGaussianXGate(), GateFamily)


# --------------------------------------------------------------------------------------------
# Forward functions and the VJP
# --------------------------------------------------------------------------------------------


def test_log_likelihood_posteriors_and_e_step_match_a_direct_computation(rng):
    x, y = _data(rng)
    params = _init(rng)
    ll, tau = _direct_loglik(x, y, params)
    np.testing.assert_allclose(moe_log_likelihood(x, y, GATE, EXPERTS, params), ll, rtol=1e-13)
    np.testing.assert_allclose(moe_posteriors(x, y, GATE, EXPERTS, params), tau, rtol=1e-12, atol=1e-15)
    e = moe_e_step(x, y, GATE, EXPERTS, params)
    assert float(e.loglik) == pytest.approx(ll.sum(), rel=1e-13)
    np.testing.assert_allclose(np.exp(e.log_responsibilities), tau, rtol=1e-12, atol=1e-15)


def test_joint_and_conditional_likelihood_of_an_x_density_gate(rng):
    x, y = _data(rng)
    gate = UnitGaussianXGate()
    params = MoEParams(UGParams(np.array([0.2, 0.3, 0.5]), rng.normal(size=(3, 2))), _init(rng).experts)
    px_k = np.array([stats.multivariate_normal(m, np.eye(2)).pdf(x) for m in params.gate.means]).T  # (N, K)
    dens = stats.norm.pdf(y[:, None], loc=x @ params.experts.weight + params.experts.bias, scale=params.experts.sigma)
    joint = np.log(np.sum(params.gate.weights * px_k * dens, axis=1))
    cond = joint - np.log(np.sum(params.gate.weights * px_k, axis=1))
    np.testing.assert_allclose(moe_log_likelihood(x, y, gate, EXPERTS, params, joint=True), joint, rtol=1e-12)
    np.testing.assert_allclose(moe_log_likelihood(x, y, gate, EXPERTS, params), cond, rtol=1e-12)
    assert float(moe_e_step(x, y, gate, EXPERTS, params).loglik) == pytest.approx(joint.sum(), rel=1e-13)


@pytest.mark.parametrize("gate_kind", ["softmax", "constant"])
def test_log_likelihood_vjp(rng, gate_kind):
    x, y = _data(rng, N=8, d=2, K=3)
    p = _init(rng)
    gate = GATE
    if gate_kind == "constant":
        gate = ConstantGate()
        p = MoEParams(ConstantGateParams(np.array([0.2, 0.3, 0.5])), p.experts)
    assert_vjp_correct(
        f"moe_log_likelihood[{gate_kind}]",
        lambda x, y, params: moe_log_likelihood(x, y, gate, EXPERTS, params),
        lambda x, y, params, ct: (None, None, moe_log_likelihood_vjp(x, y, gate, EXPERTS, params, ct)),
        (x, y, p),
        rng.normal(size=8),
    )


@pytest.mark.parametrize("joint", [True, False])
def test_log_likelihood_vjp_with_an_x_density_gate(rng, joint):
    x, y = _data(rng, N=8, d=2, K=3)
    gate = UnitGaussianXGate()
    p = MoEParams(UGParams(np.array([0.2, 0.3, 0.5]), rng.normal(size=(3, 2))), _init(rng).experts)
    assert_vjp_correct(
        f"moe_log_likelihood[x-density gate, joint={joint}]",
        lambda x, y, params: moe_log_likelihood(x, y, gate, EXPERTS, params, joint=joint),
        lambda x, y, params, ct: (None, None, moe_log_likelihood_vjp(x, y, gate, EXPERTS, params, ct, joint=joint)),
        (x, y, p),
        rng.normal(size=8),
    )


# --------------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------------


def test_fit_moe_returns_an_em_result_with_extras(rng):
    x, y = _data(rng)
    fit = fit_moe(x, y, GATE, EXPERTS, _init(rng), options=EMOptions(max_iter=200, **QUIET))
    assert isinstance(fit, MoEFitResult)
    assert MoEFitResult._fields[: len(EMResult._fields)] == EMResult._fields
    assert fit.n_free_parameters == 2 * 3 + 3 * 4
    assert fit.loglik == pytest.approx(_direct_loglik(x, y, fit.params)[0].sum(), rel=1e-12)
    assert fit.conditional_loglik == fit.loglik and fit.joint_loglik is None
    assert fit.loglik_trace[-1] == fit.penalised_loglik == fit.loglik  # no penalty
    assert len(fit.penalty_trace) == len(fit.loglik_trace) and set(fit.penalty_trace) == {0.0}
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * 18)
    assert fit.icl == pytest.approx(fit.bic + 2 * fit.entropy)
    assert fit.restarts[0].loglik_trace == fit.loglik_trace and fit.best_restart == 0
    np.testing.assert_allclose(fit.responsibilities, _direct_loglik(x, y, fit.params)[1], rtol=1e-10, atol=1e-14)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["full", "single_step"]), st.sampled_from(["softmax", "constant"]))
def test_em_loglik_never_decreases_property(seed, newton, gate_kind):
    rng = np.random.default_rng(seed)
    x, y = _data(rng, N=30, d=1, K=2)
    init = _init(rng, d=1, K=2)
    gate = SoftmaxGate(newton=newton)
    if gate_kind == "constant":
        gate, init = ConstantGate(), MoEParams(ConstantGateParams(np.array([0.4, 0.6])), init.experts)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GateSeparationWarning)
            fit = fit_moe(x, y, gate, EXPERTS, init, options=EMOptions(max_iter=40, on_decrease="raise", **QUIET))
    except EMError as err:  # a degenerate start is not what is tested
        assume(not isinstance(err, (CollapsedVarianceError, EmptyComponentError, SingularWeightedLeastSquaresError)))
        raise
    trace = np.asarray(fit.loglik_trace)
    assert np.all(np.diff(trace) >= -1e-10 * (np.abs(trace[:-1]) + 1))
    assert fit.decreases == ()


def test_single_step_gem_reaches_the_em_optimum(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    em = fit_moe(x, y, SoftmaxGate(), EXPERTS, init, options=EMOptions(tol=1e-10, max_iter=2000))
    gem = fit_moe(x, y, SoftmaxGate(newton="single_step"), EXPERTS, init, options=EMOptions(tol=1e-10, max_iter=2000))
    assert em.converged and gem.converged and gem.decreases == ()
    assert gem.loglik == pytest.approx(em.loglik, abs=1e-6)
    assert gem.n_iter >= em.n_iter


def test_restarts_pick_the_best_and_report_every_run(rng):
    x, y = _data(rng, d=1, K=2)
    starts = [_init(np.random.default_rng(s), d=1, K=2) for s in range(4)]
    opts = EMOptions(max_iter=300, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GateSeparationWarning)
        single = [fit_moe(x, y, GATE, EXPERTS, s, options=opts) for s in starts]
        fit = fit_moe(x, y, GATE, EXPERTS, starts[0], restarts=starts[1:], options=opts)
    finals = [f.loglik for f in single]
    assert fit.best_restart == int(np.argmax(finals))
    assert fit.loglik == max(finals)
    assert [r.index for r in fit.restarts] == [0, 1, 2, 3]
    for rec, f in zip(fit.restarts, single):
        assert rec.loglik_trace == f.loglik_trace and rec.n_iter == f.n_iter and rec.error is None
    assert fit.loglik_trace == single[fit.best_restart].loglik_trace


def test_random_restarts_are_reproducible_and_every_run_is_reported(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    opts = EMOptions(max_iter=200, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GateSeparationWarning)
        fits = [fit_moe(x, y, GATE, EXPERTS, init, options=opts, generator=np.random.default_rng(11), n_restarts=3)
                for _ in range(2)]
        starts = moe_random_starts(x, y, GATE, EXPERTS, init, np.random.default_rng(11), 3)
        replay = [fit_moe(x, y, GATE, EXPERTS, s.params, options=opts) for s in starts]
    a, b = fits
    assert a.loglik_trace == b.loglik_trace and a.best_restart == b.best_restart  # same seed, same fit
    for u, v in zip(a.params.gate + a.params.experts, b.params.gate + b.params.experts):
        np.testing.assert_array_equal(u, v)
    assert [r.index for r in a.restarts] == [0, 1, 2, 3] and a.restarts[0].draws is None
    draws = np.random.default_rng(11)
    for rec, start, single in zip(a.restarts[1:], starts, replay):
        np.testing.assert_array_equal(rec.draws, draws.random(30))  # one generator.random((N,)) per start
        np.testing.assert_array_equal(rec.start.experts.weight, start.params.experts.weight)
        assert rec.loglik_trace == single.loglik_trace and rec.n_iter == single.n_iter
    assert a.loglik == max(r.loglik for r in a.restarts)
    assert a.loglik_trace == a.restarts[a.best_restart].loglik_trace


def test_random_restarts_need_a_generator(rng):
    x, y = _data(rng, d=1, K=2)
    with pytest.raises(ValueError, match="n_restarts=2 random starts need a generator"):
        fit_moe(x, y, GATE, EXPERTS, _init(rng, d=1, K=2), n_restarts=2)
    with pytest.raises(ValueError, match="n_restarts"):
        fit_moe(x, y, GATE, EXPERTS, _init(rng, d=1, K=2), n_restarts=-1, generator=np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"generator must have a random\(shape\) method"):
        fit_moe(x, y, GATE, EXPERTS, _init(rng, d=1, K=2), n_restarts=1, generator=42)


def test_a_failing_restart_is_recorded_and_all_failing_raises(rng):
    x, y = _data(rng, d=1, K=2)
    good = _init(rng, d=1, K=2)
    # a start with a zero mixing weight: that component is empty after the first M-step
    fit = fit_moe(x, y, ConstantGate(), EXPERTS, MoEParams(ConstantGateParams(np.array([1.0, 0.0])), good.experts),
                  restarts=[MoEParams(ConstantGateParams(np.array([0.5, 0.5])), good.experts)], options=EMOptions(**QUIET))
    assert fit.best_restart == 1
    assert fit.restarts[0].error.startswith("EmptyComponentError: EM iteration 1 (M-step): component 1")
    assert fit.restarts[0].loglik is None and fit.restarts[0].loglik_trace == ()
    with pytest.raises(EmptyComponentError, match="component 1"):
        fit_moe(x, y, ConstantGate(), EXPERTS, MoEParams(ConstantGateParams(np.array([1.0, 0.0])), good.experts),
                restarts=[MoEParams(ConstantGateParams(np.array([0.0, 1.0])), good.experts)])


def test_ridge_penalty_is_reported_separately(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    gate = SoftmaxGate(ridge=2.0)
    fit = fit_moe(x, y, gate, EXPERTS, init, options=EMOptions(tol=1e-10, max_iter=500))
    assert fit.penalty > 0 and fit.penalty == pytest.approx(float(gate.penalty(fit.params.gate)), rel=1e-14)
    assert fit.penalised_loglik == pytest.approx(fit.loglik - fit.penalty, rel=1e-14)
    assert fit.loglik_trace[-1] == fit.penalised_loglik
    assert fit.loglik == pytest.approx(_direct_loglik(x, y, fit.params)[0].sum(), rel=1e-12)
    assert fit.loglik_trace[0] + fit.penalty_trace[0] == pytest.approx(_direct_loglik(x, y, init)[0].sum(), rel=1e-13)
    assert fit.penalty_trace[0] == pytest.approx(float(gate.penalty(init.gate)), rel=1e-14)
    assert fit.decreases == ()
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * fit.n_free_parameters)
    free = fit_moe(x, y, SoftmaxGate(), EXPERTS, init, options=EMOptions(tol=1e-10, max_iter=500))
    assert free.loglik >= fit.loglik  # the ridge costs likelihood ...
    assert np.sum(fit.params.gate.weight**2) < np.sum(free.params.gate.weight**2)  # ... and shrinks the gate


def test_x_density_gate_reports_joint_and_conditional(rng):
    x, y = _data(rng, d=2, K=2)
    gate = UnitGaussianXGate()
    init = MoEParams(UGParams(np.array([0.5, 0.5]), rng.normal(size=(2, 2))), _init(rng, d=2, K=2).experts)
    fit = fit_moe(x, y, gate, EXPERTS, init, options=EMOptions(max_iter=300, on_decrease="raise", **QUIET))
    assert fit.decreases == ()
    assert fit.joint_loglik == fit.loglik
    assert fit.joint_loglik == pytest.approx(float(np.sum(moe_log_likelihood(x, y, gate, EXPERTS, fit.params, joint=True))), rel=1e-13)
    assert fit.conditional_loglik == pytest.approx(float(np.sum(moe_log_likelihood(x, y, gate, EXPERTS, fit.params))), rel=1e-13)
    assert fit.conditional_loglik > fit.joint_loglik  # log p(x) < 0 here (standard normal inputs, d = 2)
    assert fit.n_free_parameters == 1 + 4 + 2 * 4


def test_with_the_real_gaussian_gate(rng):
    gaussian_gate = pytest.importorskip("moeref.gaussian_gate")
    x, y = _data(rng, d=2, K=2)
    gate = gaussian_gate.GaussianGate()
    ours = UnitGaussianXGate()
    means = rng.normal(size=(2, 2))
    init_ours = MoEParams(UGParams(np.array([0.5, 0.5]), means), _init(rng, d=2, K=2).experts)
    init_real = MoEParams(gaussian_gate.gaussian_gate_params(np.array([0.5, 0.5]), means, np.stack([np.eye(2)] * 2)), init_ours.experts)
    a = moe_log_likelihood(x, y, gate, EXPERTS, init_real, joint=True)
    b = moe_log_likelihood(x, y, ours, EXPERTS, init_ours, joint=True)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    fit = fit_moe(x, y, gate, EXPERTS, init_real, options=EMOptions(max_iter=100, on_decrease="raise", **QUIET))
    assert fit.decreases == () and fit.joint_loglik == fit.loglik
    assert fit.conditional_loglik == pytest.approx(float(np.sum(moe_log_likelihood(x, y, gate, EXPERTS, fit.params))), rel=1e-12)


def test_with_the_real_linear_gaussian_experts(rng):
    ge = pytest.importorskip("moeref.gaussian_experts")
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    real = ge.LinearGaussianExperts(covariance="isotropic")
    init_real = MoEParams(
        init.gate,
        ge.LinearGaussianExpertsParams(np.transpose(init.experts.weight)[:, :, None], init.experts.bias[:, None], init.experts.sigma**2),
    )
    opts = EMOptions(max_iter=60, **QUIET)
    a = fit_moe(x, y, GATE, EXPERTS, init, options=opts)
    b = fit_moe(x, y[:, None], GATE, real, init_real, options=opts)
    assert a.n_iter == b.n_iter and a.n_free_parameters == b.n_free_parameters
    np.testing.assert_allclose(a.loglik_trace, b.loglik_trace, rtol=1e-11)
    np.testing.assert_allclose(b.params.experts.weight[:, 0, 0], a.params.experts.weight[0], rtol=1e-8)
    np.testing.assert_allclose(np.sqrt(b.params.experts.cov), a.params.experts.sigma, rtol=1e-8)


# --------------------------------------------------------------------------------------------
# Gradient ascent
# --------------------------------------------------------------------------------------------


def test_gradient_ascent_climbs_to_the_em_optimum(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    em = fit_moe(x, y, GATE, EXPERTS, init, options=EMOptions(tol=1e-11, max_iter=1000))
    ga = fit_moe_gradient(x, y, GATE, EXPERTS, init, learning_rate=0.2, options=EMOptions(max_iter=20000, tol=1e-13),
                          target=em.loglik - 1e-6)
    assert ga.converged and "target" in ga.stop_reason
    assert em.loglik - 1e-6 <= ga.loglik <= em.loglik + 1e-9
    assert ga.n_iter > em.n_iter
    assert ga.loglik_trace[0] == em.loglik_trace[0]
    assert ga.decreases == () and ga.seconds > 0


def test_gradient_ascent_step_is_the_vjp(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    ga = fit_moe_gradient(x, y, ConstantGate(), EXPERTS, MoEParams(ConstantGateParams(np.array([0.3, 0.7])), init.experts),
                          learning_rate=0.05, options=EMOptions(max_iter=1, **QUIET))
    g = moe_log_likelihood_vjp(x, y, ConstantGate(), EXPERTS, MoEParams(ConstantGateParams(np.array([0.3, 0.7])), init.experts), np.full(30, 1 / 30))
    # experts: weight and bias step directly, sigma through log-sigma
    np.testing.assert_allclose(ga.params.experts.weight, init.experts.weight + 0.05 * g.experts.weight, rtol=1e-13)
    np.testing.assert_allclose(ga.params.experts.sigma, init.experts.sigma * np.exp(0.05 * g.experts.sigma * init.experts.sigma), rtol=1e-13)
    # gate: the baseline logit eta = log(l1 / l2) moves by lr * l1 (g1 - sum_j l_j g_j)
    lam = np.array([0.3, 0.7])
    eta = np.log(0.3 / 0.7) + 0.05 * lam[0] * (g.gate.weights[0] - lam @ g.gate.weights)
    np.testing.assert_allclose(ga.params.gate.weights, special.softmax([eta, 0.0]), rtol=1e-13)
    assert ga.params.gate.weights.sum() == pytest.approx(1.0, abs=1e-15)


def test_gradient_ascent_includes_the_ridge_and_keeps_the_baseline_column(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    init = init._replace(gate=SoftmaxGateParams(np.array([[0.3, 0.0]]), np.array([-0.2, 0.0])))
    gate = SoftmaxGate(ridge=5.0)
    ga = fit_moe_gradient(x, y, gate, EXPERTS, init, learning_rate=0.05, options=EMOptions(max_iter=1, **QUIET))
    g = moe_log_likelihood_vjp(x, y, gate, EXPERTS, init, np.full(30, 1 / 30))
    np.testing.assert_allclose(ga.params.gate.weight[0, 0], 0.3 + 0.05 * (g.gate.weight[0, 0] - 5.0 * 0.3 / 30), rtol=1e-13)
    np.testing.assert_allclose(ga.params.gate.bias[0], -0.2 + 0.05 * (g.gate.bias[0] + 5.0 * 0.2 / 30), rtol=1e-13)
    assert ga.params.gate.weight[0, 1] == 0.0 and ga.params.gate.bias[1] == 0.0
    pen = 2.5 * (0.3**2 + 0.2**2)
    assert ga.loglik_trace[0] == pytest.approx(_direct_loglik(x, y, init)[0].sum() - pen, rel=1e-13)


def test_gradient_ascent_failures_are_named(rng):
    x, y = _data(rng, d=1, K=2)
    init = _init(rng, d=1, K=2)
    with pytest.raises(ValueError, match="gradient step 1 left the valid parameter region .*params.sigma must be positive"):
        fit_moe_gradient(x, y, GATE, RawLinearGaussian(), init, learning_rate=100.0, options=EMOptions(**QUIET))
    with pytest.raises(NonFiniteLogLikelihoodError, match="learning_rate=1e\\+06 too large"), np.errstate(all="ignore"):
        fit_moe_gradient(x, y, GATE, EXPERTS, init, learning_rate=1e6, options=EMOptions(**QUIET))
    with pytest.warns(ConvergenceWarning, match="gradient ascent did not converge in 3 steps"):
        ga = fit_moe_gradient(x, y, GATE, EXPERTS, init, learning_rate=1e-3, options=EMOptions(max_iter=3))
    assert not ga.converged and ga.n_iter == 3
    big = fit_moe_gradient(x, y, GATE, EXPERTS, init, learning_rate=3.0, options=EMOptions(max_iter=30, **QUIET))
    assert big.decreases == tuple(t for t in range(1, 31) if big.loglik_trace[t] < big.loglik_trace[t - 1] - 2.22e-12 * (abs(big.loglik_trace[t - 1]) + 1))


# --------------------------------------------------------------------------------------------
# Backends (N=30, d=2, K=3; the softmax gate's own M-step is compared across backends in
# test_softmax_gate.py: here the constant gate keeps JAX's per-shape compilation short)
# --------------------------------------------------------------------------------------------


def test_fit_is_identical_on_every_backend(backend, rng):
    x, y = _data(rng)
    init = MoEParams(ConstantGateParams(np.array([0.2, 0.3, 0.5])), _init(rng).experts)
    opts = EMOptions(max_iter=8, **QUIET)
    ref = fit_moe(x, y, ConstantGate(), EXPERTS, init, options=opts)
    got = fit_moe(backend.from_numpy(x), backend.from_numpy(y), ConstantGate(), EXPERTS, backend.tree_from_numpy(init), options=opts)
    assert got.n_iter == ref.n_iter
    np.testing.assert_allclose(got.loglik_trace, ref.loglik_trace, rtol=1e-12)
    for a, b in zip(backend.tree_to_numpy(got.params.gate + got.params.experts), ref.params.gate + ref.params.experts):
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert_close(backend.to_numpy(got.responsibilities), ref.responsibilities, rtol=1e-10, atol=1e-12)
    assert got.icl == pytest.approx(ref.icl, rel=1e-10)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, y = _data(rng)
    init = _init(rng)
    with pytest.raises(TypeError, match="gate must implement moeref.families.GateFamily"):
        fit_moe(x, y, object(), EXPERTS, init)
    with pytest.raises(TypeError, match="experts must implement moeref.families.ExpertFamily"):
        fit_moe(x, y, GATE, GATE, init)
    with pytest.raises(TypeError, match="init must be a MoEParams"):
        fit_moe(x, y, GATE, EXPERTS, (init.gate, init.experts))
    with pytest.raises(TypeError, match=r"restarts\[0\] must be a MoEParams"):
        fit_moe(x, y, GATE, EXPERTS, init, restarts=[init.gate])
    with pytest.raises(TypeError, match="restarts must be a list or tuple of MoEParams"):
        fit_moe(x, y, GATE, EXPERTS, init, restarts=init)
    with pytest.raises(TypeError, match="options must be an EMOptions record"):
        fit_moe(x, y, GATE, EXPERTS, init, options={"max_iter": 3})
    bad = MoEParams(SoftmaxGateParams(np.zeros((2, 2)), np.zeros(2)), init.experts)
    with pytest.raises(ValueError, match=r"log-weights of shape \(30, 2\) but the experts give log-densities of shape \(30, 3\)"):
        fit_moe(x, y, GATE, EXPERTS, bad)
    with pytest.raises(ValueError, match="joint=True needs a gate that models x"):
        moe_log_likelihood(x, y, GATE, EXPERTS, init, joint=True)
    with pytest.raises(ValueError, match=r"cotangent has shape \(29,\) but \(30,\) was expected"):
        moe_log_likelihood_vjp(x, y, GATE, EXPERTS, init, np.ones(29))
    with pytest.raises(ValueError, match="learning_rate must be a finite positive number"):
        fit_moe_gradient(x, y, GATE, EXPERTS, init, learning_rate=-0.1)
    with pytest.raises(ValueError, match="target must be None or a finite float"):
        fit_moe_gradient(x, y, GATE, EXPERTS, init, learning_rate=0.1, target=float("nan"))
    with pytest.raises(ValueError, match=r"x has shape|params.weight has shape"):
        fit_moe(x[:, :1], y, GATE, EXPERTS, init)


def test_bad_input_names_y_records_and_responsibilities(rng):
    from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
    from moeref.moe_em import moe_m_step, moe_penalty

    x, y = rng.normal(size=(8, 2)), rng.normal(size=(8, 1))
    gate, experts = SoftmaxGate(), LinearGaussianExperts(covariance="isotropic")
    p = MoEParams(SoftmaxGateParams(np.zeros((2, 2)), np.zeros(2)),
                  LinearGaussianExpertsParams(rng.normal(size=(2, 2, 1)), rng.normal(size=(2, 1)), np.ones(2)))
    with pytest.raises(ValueError, match="y contains NaN or infinite values"):
        moe_log_likelihood(x, np.full_like(y, np.nan), gate, experts, p)
    with pytest.raises(TypeError, match="y must be an array, got None"):
        moe_log_likelihood(x, None, gate, experts, p)
    with pytest.raises(TypeError, match="params.gate must be the 'softmax' family's parameter record"):
        moe_log_likelihood(x, y, gate, experts, p._replace(gate=None))
    with pytest.raises(TypeError, match="init.experts must be the .* family's parameter record"):
        fit_moe(x, y, gate, experts, p._replace(experts=tuple(p.experts)))
    with pytest.raises(ValueError, match="responsibilities contains NaN"):
        moe_m_step(x, y, gate, experts, p, np.full((8, 2), np.nan))
    with pytest.raises(ValueError, match=r"responsibilities has shape \(8, 3\) but \(8, 2\) was expected"):
        moe_m_step(x, y, gate, experts, p, np.full((8, 3), 1 / 3))
    with pytest.raises(ValueError, match="params.weight contains NaN"):
        moe_penalty(SoftmaxGate(ridge=0.1), experts, p._replace(gate=SoftmaxGateParams(np.full((2, 2), np.nan), np.zeros(2))))

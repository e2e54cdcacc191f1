"""Gaussian (localised) gate of Xu, Jordan & Hinton (1995): forward vs scipy, closed-form M-step = weighted
MLE, VJPs, a plug-in density, joint-likelihood EM against a direct NumPy computation, bad input."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, stats
from scipy.special import gammaln
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import logsumexp as sp_logsumexp

from moeref.em import CollapsedVarianceError, EMOptions, EmptyComponentError
from moeref.families import GateFamily
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.gaussian_gate import (
    DensityGate,
    DensityGateParams,
    GateDensity,
    GaussianDensity,
    GaussianDensityParams,
    GaussianGate,
    gaussian_gate_params,
)
from moeref.moe_em import MoEParams, fit_moe
from conftest import assert_close
from helpers import assert_vjp_correct, leaves

# One set of shapes for every cross-backend test (JAX compiles each new shape once).
N, D, K = 12, 2, 3


def _spd(rng, k, d):
    a = rng.normal(size=(k, d, d))
    return a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)


def _cov_param(rng, covariance, kc, d):
    if covariance == "full":
        return np.linalg.cholesky(_spd(rng, kc, d))  # (K', d, d) lower Cholesky factors
    if covariance == "diagonal":
        return rng.uniform(0.5, 2.0, size=(kc, d))
    return rng.uniform(0.5, 2.0, size=(kc,))


def _problem(rng, covariance="full", n=N, d=D, k=K, tied=False):
    x = rng.normal(size=(n, d))
    means = rng.normal(size=(k, d))
    return x, gaussian_gate_params(rng.dirichlet(np.ones(k)), means, _cov_param(rng, covariance, 1 if tied else k, d))


def _matrices(cov, covariance, k, d):
    if covariance == "full":
        s = cov @ np.swapaxes(cov, 1, 2)
    elif covariance == "diagonal":
        s = cov[:, :, None] * np.eye(d)
    else:
        s = cov[:, None, None] * np.eye(d)
    return np.broadcast_to(s, (k, d, d))


def _scipy_log_density(x, dens, covariance):
    k, d = dens.means.shape
    s = _matrices(dens.cov, covariance, k, d)
    return np.stack([stats.multivariate_normal(dens.means[j], s[j]).logpdf(x) for j in range(k)], axis=1)  # (N, K)

STRUCTURES = [("full", False), ("diagonal", False), ("isotropic", False), ("full", True)]
BACKEND_STRUCTURES = [("full", False), ("diagonal", True)]  # few: JAX compiles every new kernel


# --------------------------------------------------------------------------------------------
# Forward against scipy, on every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance, tied", BACKEND_STRUCTURES)
def test_forward_matches_scipy_on_every_backend(backend, rng, covariance, tied):
    x, params = _problem(rng, covariance, tied=tied)
    gate = GaussianGate(covariance=covariance, tied=tied)
    log_f = _scipy_log_density(x, params.density, covariance)
    joint = np.log(params.weights) + log_f  # (N, K)
    xb, pb = backend.from_numpy(x), backend.tree_from_numpy(params)
    assert_close(backend.to_numpy(gate.log_weights(pb, xb)), joint)
    assert_close(backend.to_numpy(gate.log_gate_probabilities(pb, xb)), joint - sp_logsumexp(joint, axis=1, keepdims=True))
    assert_close(backend.to_numpy(gate.log_marginal(pb, xb)), sp_logsumexp(joint, axis=1))


@pytest.mark.parametrize("covariance, tied", BACKEND_STRUCTURES)
def test_m_step_is_weighted_moments_on_every_backend(backend, rng, covariance, tied):
    x, _ = _problem(rng, covariance)
    tau = rng.dirichlet(np.ones(K), size=N)  # (N, K)
    gate = GaussianGate(covariance=covariance, tied=tied)
    got = backend.tree_to_numpy(gate.m_step(None, backend.from_numpy(x), backend.from_numpy(tau)))
    assert_close(got.weights, tau.mean(0))
    covs = []
    for k in range(K):
        assert_close(got.density.means[k], np.average(x, axis=0, weights=tau[:, k]))
        covs.append(np.cov(x.T, aweights=tau[:, k], ddof=0))
    covs = np.array(covs)  # (K, d, d)
    if tied:
        covs = np.tensordot(tau.sum(0), covs, axes=1)[None] / N
    if covariance == "full":
        expected = np.linalg.cholesky(covs)
    elif covariance == "diagonal":
        expected = np.diagonal(covs, axis1=1, axis2=2)
    else:
        expected = np.trace(covs, axis1=1, axis2=2) / D
    assert_close(got.density.cov, expected, rtol=1e-11)


def test_float32_stays_float32(rng):
    x, params = _problem(rng)
    gate = GaussianGate()
    p32 = DensityGateParams(params.weights.astype(np.float32), GaussianDensityParams(*(a.astype(np.float32) for a in params.density)))
    out = gate.log_weights(p32, x.astype(np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, gate.log_weights(params, x), rtol=1e-4, atol=1e-4)
    assert gate.m_step(None, x.astype(np.float32), np.full((N, K), 1 / K, dtype=np.float32)).density.cov.dtype == np.float32


# --------------------------------------------------------------------------------------------
# The closed-form M-step is the weighted MLE
# --------------------------------------------------------------------------------------------


def _objective(gate, params, x, w):
    return float(np.sum(w * gate.log_weights(params, x)))


def _unpack(theta, covariance, kc, d=2, k=2):
    """Unconstrained vector -> gate parameters: softmax weights, means, covariance parameter (a
    Cholesky factor with a log-diagonal, or log-variances)."""
    a = np.exp(theta[:k] - sp_logsumexp(theta[:k]))
    m = theta[k:k + k * d].reshape(k, d)
    rest = theta[k + k * d:]
    if covariance == "full":
        lo = np.zeros((kc, d, d))
        rows, cols = np.tril_indices(d)
        lo[:, rows, cols] = rest.reshape(kc, -1)
        lo[:, np.arange(d), np.arange(d)] = np.exp(lo[:, np.arange(d), np.arange(d)])
        return gaussian_gate_params(a, m, lo)
    return gaussian_gate_params(a, m, np.exp(rest).reshape((kc, d) if covariance == "diagonal" else (kc,)))


@pytest.mark.parametrize("covariance, tied", STRUCTURES)
def test_m_step_equals_numerical_weighted_mle(rng, covariance, tied):
    """A general-purpose optimiser on sum_ik tau_ik l_k(x_i) finds the closed-form M-step."""
    x, _ = _problem(rng, covariance, n=15, d=2, k=2)
    tau = rng.dirichlet(np.ones(2), size=15)
    gate = GaussianGate(covariance=covariance, tied=tied)
    closed = gate.m_step(None, x, tau)
    kc = 1 if tied else 2
    n_cov = kc * {"full": 3, "diagonal": 2, "isotropic": 1}[covariance]
    start = np.concatenate([np.zeros(2), x[:2].ravel(), np.zeros(n_cov)])
    res = optimize.minimize(lambda t: -_objective(gate, _unpack(t, covariance, kc), x, tau), start, method="BFGS", options={"gtol": 1e-10})
    best = _unpack(res.x, covariance, kc)
    assert _objective(gate, closed, x, tau) >= -res.fun - 1e-9
    np.testing.assert_allclose(best.weights, closed.weights, atol=1e-5)
    np.testing.assert_allclose(best.density.means, closed.density.means, atol=1e-5)
    np.testing.assert_allclose(gate.covariance_matrices(best), gate.covariance_matrices(closed), atol=1e-5)


@given(seed=st.integers(0, 2**32 - 1), structure=st.sampled_from(STRUCTURES), n=st.integers(8, 14))
def test_m_step_is_a_stationary_maximum_property(seed, structure, n):
    """At the M-step solution the analytic gradient of sum_ik tau_ik l_k(x_i) vanishes (alpha on the
    simplex: its gradient is constant), and random perturbations never increase the objective."""
    covariance, tied = structure
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    tau = rng.dirichlet(np.ones(2), size=n)
    gate = GaussianGate(covariance=covariance, tied=tied)
    p = gate.m_step(None, x, tau)
    g = gate.log_weights_vjp(p, x, tau)
    scale = max(1.0, float(np.abs(np.linalg.inv(gate.covariance_matrices(p))).max()))
    np.testing.assert_allclose(g.density.means, 0, atol=1e-9 * scale)
    np.testing.assert_allclose(g.density.cov, 0, atol=1e-8 * scale)
    np.testing.assert_allclose(g.weights, n, rtol=1e-12)  # sum_i tau_ik / alpha_k = N for every k: a Lagrange multiplier
    best = _objective(gate, p, x, tau)
    s = gate.covariance_matrices(p)
    for _ in range(5):
        a = np.eye(2) + 0.05 * rng.normal(size=(2, 2))
        q = gaussian_gate_params(
            rng.dirichlet(50 * p.weights),
            p.density.means + 0.05 * rng.normal(size=p.density.means.shape),
            gate.density.cov_from_matrices(a @ s @ a.T),
        )
        assert _objective(gate, q, x, tau) <= best + 1e-12


def test_tied_gaussian_gate_is_a_linear_softmax_gate(rng):
    """One shared covariance S: log g_k(x) = softmax_k(x^T S^-1 m_k - m_k^T S^-1 m_k / 2 + log alpha_k)."""
    x, params = _problem(rng, "full", tied=True)
    gate = GaussianGate(tied=True)
    prec = np.linalg.inv(gate.covariance_matrices(params)[0])
    m = params.density.means
    logits = x @ prec @ m.T - 0.5 * np.einsum("kd,de,ke->k", m, prec, m) + np.log(params.weights)
    np.testing.assert_allclose(gate.log_gate_probabilities(params, x), sp_log_softmax(logits, axis=1), rtol=1e-11, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), structure=st.sampled_from(STRUCTURES))
def test_gate_is_a_distribution_and_marginal_is_the_mixture_density_property(seed, structure):
    covariance, tied = structure
    rng = np.random.default_rng(seed)
    x, params = _problem(rng, covariance, n=5, tied=tied)
    gate = GaussianGate(covariance=covariance, tied=tied)
    g = np.exp(gate.log_gate_probabilities(params, x))
    np.testing.assert_allclose(g.sum(1), 1.0, rtol=1e-12)
    assert np.all(g >= 0)
    dens = np.exp(_scipy_log_density(x, params.density, covariance)) @ params.weights
    np.testing.assert_allclose(np.exp(gate.log_marginal(params, x)), dens, rtol=1e-10)


def test_far_inputs_do_not_underflow(rng):
    """Log space: a point 60 standard deviations from every centre still gets a proper gate."""
    gate = GaussianGate(covariance="diagonal")
    p = gaussian_gate_params(np.array([0.5, 0.5]), np.array([[0.0], [1.0]]), np.ones((2, 1)))
    g = np.exp(gate.log_gate_probabilities(p, np.array([[60.0]])))
    assert np.all(np.isfinite(g)) and g[0, 1] == pytest.approx(1.0)  # ratio exp(-59.5)
    assert np.isfinite(gate.log_marginal(p, np.array([[60.0]]))[0])


# --------------------------------------------------------------------------------------------
# VJPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance, tied", [("full", False), ("diagonal", True), ("isotropic", False)])
def test_log_density_vjp(rng, covariance, tied):
    x, params = _problem(rng, covariance, n=4, d=2, k=2, tied=tied)
    dens = GaussianDensity(covariance, tied=tied)
    assert_vjp_correct(
        f"gaussian_density_{covariance}{'_tied' if tied else ''}",
        lambda p, xx: dens.log_density(p, xx),
        lambda p, xx, c: (dens.log_density_vjp(p, xx, c), None),
        (params.density, x),
        rng.normal(size=(4, 2)),
    )


def test_log_weights_vjp(rng):
    x, params = _problem(rng, "diagonal", n=5, d=2, k=3)
    gate = GaussianGate("diagonal")
    assert_vjp_correct(
        "gaussian_gate_log_weights",
        lambda p, xx: gate.log_weights(p, xx),
        lambda p, xx, c: (gate.log_weights_vjp(p, xx, c), None),
        (params, x),
        rng.normal(size=(5, 3)),
    )


def test_full_covariance_upper_triangle_is_ignored(rng):
    x, params = _problem(rng, "full", n=5, d=3, k=2)
    dens = GaussianDensity()
    junk = params.density._replace(cov=params.density.cov + np.triu(rng.normal(size=(2, 3, 3)), 1))
    np.testing.assert_array_equal(dens.log_density(junk, x), dens.log_density(params.density, x))
    g = dens.log_density_vjp(params.density, x, rng.normal(size=(5, 2)))
    np.testing.assert_array_equal(np.triu(g.cov, 1), 0.0)


# --------------------------------------------------------------------------------------------
# The interfaces: GateFamily, GateDensity, and a second density plugged in
# --------------------------------------------------------------------------------------------


class PoissonRates(NamedTuple):
    rates: object  # (K, d)


class PoissonDensity:
    """Independent Poisson counts per feature: an exponential family with closed-form weighted MLE
    (the weighted mean of the counts). Written against the GateDensity protocol only."""

    name = "poisson"

    def log_density(self, params, x):
        lam = params.rates  # (K, d)
        return x @ np.log(lam).T - lam.sum(1)[None, :] - gammaln(x + 1).sum(1, keepdims=True)  # (N, K)

    def log_density_vjp(self, params, x, cotangent):
        lam = params.rates
        return PoissonRates(rates=(cotangent.T @ x) / lam - cotangent.sum(0)[:, None])

    def weighted_mle(self, x, weights):
        return PoissonRates(rates=(weights.T @ x) / weights.sum(0)[:, None])

    def n_free_parameters(self, params):
        return params.rates.size


def test_interfaces_are_implemented():
    assert isinstance(GaussianGate(), GateFamily) and GaussianGate.models_x is True
    assert isinstance(DensityGate(GaussianDensity()), GateFamily)
    assert isinstance(GaussianDensity("diagonal"), GateDensity)
    assert isinstance(PoissonDensity(), GateDensity)


def test_density_gate_equals_gaussian_gate(rng):
    x, params = _problem(rng, "diagonal")
    a, b = DensityGate(GaussianDensity("diagonal")), GaussianGate("diagonal")
    np.testing.assert_array_equal(a.log_weights(params, x), b.log_weights(params, x))
    tau = rng.dirichlet(np.ones(K), size=N)
    for u, v in zip(leaves(a.m_step(None, x, tau)), leaves(b.m_step(None, x, tau))):
        np.testing.assert_array_equal(u, v)


def test_another_exponential_family_plugs_in(rng):
    """A Poisson-count density gate: log-weights, the closed-form M-step, its VJP and parameter count."""
    x = rng.poisson(3.0, size=(10, 2)).astype(float)
    params = DensityGateParams(weights=np.array([0.3, 0.7]), density=PoissonRates(rates=np.array([[1.0, 2.0], [4.0, 3.0]])))
    gate = DensityGate(PoissonDensity(), name="poisson")
    expected = np.log(params.weights) + stats.poisson.logpmf(x[:, None, :], params.density.rates[None]).sum(-1)
    np.testing.assert_allclose(gate.log_weights(params, x), expected, rtol=1e-12)
    tau = rng.dirichlet(np.ones(2), size=10)
    p = gate.m_step(None, x, tau)
    np.testing.assert_allclose(p.density.rates, (tau.T @ x) / tau.sum(0)[:, None])
    np.testing.assert_allclose(p.weights, tau.mean(0))
    g = gate.log_weights_vjp(p, x, tau)  # stationary at the weighted MLE
    np.testing.assert_allclose(g.density.rates, 0, atol=1e-12)
    assert gate.n_free_parameters(p) == 1 + 4


# --------------------------------------------------------------------------------------------
# EM on the joint likelihood: the gate inside a full mixture of linear experts
# --------------------------------------------------------------------------------------------


def _linear_expert_log_density(x1, y, beta, sigma):
    r = y[:, None] - x1 @ beta  # (N, K)
    return -np.log(sigma) - 0.5 * np.log(2 * np.pi) - 0.5 * (r / sigma) ** 2


def _expert_m_step(x1, y, tau):
    beta = np.stack([np.linalg.solve(x1.T @ (tau[:, k, None] * x1), x1.T @ (tau[:, k] * y)) for k in range(tau.shape[1])], 1)
    r = y[:, None] - x1 @ beta
    return beta, np.sqrt((tau * r * r).sum(0) / tau.sum(0))


def _direct_gaussian_gated_em(x, y, alpha, m, v, beta, sigma, n_iter):
    """The whole Xu-Jordan-Hinton EM written out in NumPy probability space (1-D input)."""
    x1 = np.column_stack([np.ones_like(x), x])
    trace, cond = [], []
    for it in range(n_iter + 1):
        px_k = np.exp(-0.5 * (x[:, None] - m) ** 2 / v) / np.sqrt(2 * np.pi * v)  # (N, K)
        py_k = np.exp(_linear_expert_log_density(x1, y, beta, sigma))
        joint = alpha * px_k * py_k
        trace.append(np.log(joint.sum(1)).sum())
        cond.append(np.log(joint.sum(1) / (alpha * px_k).sum(1)).sum())
        if it == n_iter:
            break
        h = joint / joint.sum(1, keepdims=True)
        nk = h.sum(0)
        alpha = nk / len(x)
        m = (h * x[:, None]).sum(0) / nk
        v = (h * (x[:, None] - m) ** 2).sum(0) / nk
        beta, sigma = _expert_m_step(x1, y, h)
    return np.array(trace), np.array(cond), (alpha, m, v, beta, sigma)


def _two_regime_data(rng, n=80):
    x = np.sort(rng.uniform(-3, 3, size=n))
    y = np.where(x < 0, 1.0 + 2.0 * x, -1.0 - 0.5 * x) + 0.3 * rng.normal(size=n)
    return x, y


def test_fit_moe_with_the_gaussian_gate_is_the_direct_joint_em(rng):
    """fit_moe with the Gaussian gate runs the Xu-Jordan-Hinton EM: its trace is the joint log-likelihood
    (non-decreasing), it reports the conditional one beside it, and both equal a direct NumPy computation."""
    x, y = _two_regime_data(rng)
    alpha, m, v = np.array([0.5, 0.5]), np.array([-1.0, 1.0]), np.array([1.0, 1.0])
    beta, sigma = np.array([[0.0, 0.0], [1.0, -1.0]]), np.array([1.0, 1.0])
    gate, experts = GaussianGate(covariance="diagonal"), LinearGaussianExperts(covariance="isotropic")
    init = MoEParams(
        gaussian_gate_params(alpha, m[:, None], v[:, None]),
        LinearGaussianExpertsParams(beta[1][:, None, None], beta[0][:, None], sigma**2),
    )
    fit = fit_moe(x[:, None], y[:, None], gate, experts, init, options=EMOptions(tol=1e-10))
    assert fit.converged
    ref_trace, ref_cond, ref = _direct_gaussian_gated_em(x, y, alpha, m, v, beta, sigma, n_iter=fit.n_iter)
    np.testing.assert_allclose(fit.loglik_trace, ref_trace, rtol=1e-11)
    assert fit.decreases == () and np.all(np.diff(fit.loglik_trace) >= 0)
    assert fit.joint_loglik == pytest.approx(ref_trace[-1], rel=1e-11) and fit.loglik == fit.joint_loglik
    assert fit.conditional_loglik == pytest.approx(ref_cond[-1], rel=1e-11)
    g = fit.params.gate
    np.testing.assert_allclose(g.weights, ref[0], rtol=1e-9)
    np.testing.assert_allclose(g.density.means[:, 0], ref[1], rtol=1e-9)
    np.testing.assert_allclose(g.density.cov[:, 0], ref[2], rtol=1e-9)
    np.testing.assert_allclose(fit.params.experts.weight[:, 0, 0], ref[3][1], rtol=1e-9)
    np.testing.assert_allclose(np.sqrt(fit.params.experts.cov), ref[4], rtol=1e-9)
    # 1 free weight + 2 means + 2 variances (gate); 2 x 2 coefficients + 2 variances (experts)
    assert fit.n_free_parameters == 5 + 6
    # the two regimes are found: a gate centre on each side of 0, slopes ~2 and ~-0.5
    order = np.argsort(g.density.means[:, 0])
    np.testing.assert_allclose(fit.params.experts.weight[order, 0, 0], [2.0, -0.5], atol=0.25)


# --------------------------------------------------------------------------------------------
# Degeneracies, parameter counts, bad input
# --------------------------------------------------------------------------------------------


def test_empty_and_collapsed_components_raise(rng):
    x = rng.normal(size=(6, 2))
    tau = np.column_stack([np.ones(6), np.zeros(6)])
    with pytest.raises(EmptyComponentError, match="gate component 1 has mixing weight 0"):
        GaussianGate().m_step(None, x, tau)
    with pytest.raises(EmptyComponentError, match="component 1 has total weight"):
        GaussianDensity().weighted_mle(x, tau)
    # component 0 holds only points on a line: a singular covariance
    line = np.column_stack([np.arange(6.0), 2 * np.arange(6.0)])
    tau = np.column_stack([np.r_[np.ones(3), np.zeros(3)], np.r_[np.zeros(3), np.ones(3)]])
    with pytest.raises(CollapsedVarianceError, match="component 0"):
        GaussianGate().m_step(None, line + np.r_[np.zeros((3, 2)), rng.normal(size=(3, 2))], tau)
    # a diagonal component on one repeated value
    with pytest.raises(CollapsedVarianceError, match="component 1"):
        GaussianGate("diagonal").m_step(None, np.r_[rng.normal(size=(3, 1)), np.ones((3, 1))], tau)


@pytest.mark.parametrize("covariance, tied, n_cov", [("full", False, 4 * 6), ("diagonal", False, 4 * 3),
                                                    ("isotropic", False, 4), ("full", True, 6), ("isotropic", True, 1)])
def test_n_free_parameters(rng, covariance, tied, n_cov):
    _, p = _problem(rng, covariance, d=3, k=4, tied=tied)
    assert GaussianGate(covariance, tied=tied).n_free_parameters(p) == 3 + 4 * 3 + n_cov


def test_bad_input_names_the_argument(rng):
    x, params = _problem(rng)
    gate = GaussianGate()
    with pytest.raises(ValueError, match="covariance must be one of 'full', 'diagonal', 'isotropic'"):
        GaussianGate(covariance="spherical")
    with pytest.raises(TypeError, match="tied must be a bool"):
        GaussianGate(tied=1)
    with pytest.raises(ValueError, match="min_weight must be a non-negative float"):
        GaussianGate(min_weight=-1.0)
    with pytest.raises(TypeError, match="density must implement the GateDensity interface"):
        DensityGate(density=object())
    with pytest.raises(TypeError, match="params must be a DensityGateParams, got GaussianDensityParams"):
        gate.log_weights(params.density, x)
    with pytest.raises(ValueError, match=r"params.means has shape \(3, 2\) but \(3, 4\) was expected"):
        gate.log_weights(params, rng.normal(size=(N, 4)))
    with pytest.raises(ValueError, match=r"params.weights has shape \(2,\) but \(3,\) was expected"):
        gate.log_weights(params._replace(weights=np.array([0.5, 0.5])), x)
    with pytest.raises(ValueError, match="params.weights must be non-negative"):
        gate.log_weights(params._replace(weights=np.array([-0.1, 0.6, 0.5])), x)
    bad = params.density._replace(cov=-params.density.cov)
    with pytest.raises(ValueError, match="params.cov must have a positive diagonal"):
        gate.log_weights(params._replace(density=bad), x)
    with pytest.raises(ValueError, match=r"params.cov has shape \(3, 2\) but \(3, 2, 2\) was expected"):
        gate.log_weights(gaussian_gate_params(params.weights, params.density.means, np.ones((3, 2))), x)
    with pytest.raises(ValueError, match=r"params.cov has shape \(3, 2, 2\) but \(1, 2, 2\) was expected"):
        GaussianGate(tied=True).log_weights(params, x)
    with pytest.raises(ValueError, match='params.cov must be positive \\(variances'):
        GaussianGate("diagonal").log_weights(gaussian_gate_params(params.weights, params.density.means, -np.ones((3, 2))), x)
    with pytest.raises(ValueError, match="params.means contains NaN"):
        gate.log_weights(params._replace(density=params.density._replace(means=np.full((3, 2), np.nan))), x)
    with pytest.raises(ValueError, match="means contains NaN"):  # the record builder checks too
        gaussian_gate_params(params.weights, np.full((3, 2), np.nan), params.density.cov)
    with pytest.raises(TypeError, match="real floating-point dtype"):
        gate.log_weights(params, np.ones((N, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"cotangent has shape \(12, 2\) but \(12, 3\) was expected"):
        gate.log_weights_vjp(params, x, np.ones((N, 2)))
    with pytest.raises(ValueError, match=r"weights has shape \(5, 3\) but \(12, 3\) was expected"):
        GaussianDensity().weighted_mle(x, np.ones((5, 3)))
    with pytest.raises(TypeError, match="mixed in one call"):
        gate.log_weights(params, __import__("torch").zeros((N, 2), dtype=__import__("torch").float64))

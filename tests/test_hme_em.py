"""HME fitted by EM (Jordan & Jacobs 1994, Algorithm 1): monotone traces, the M-step's pieces against direct
computations, one level = the flat MoE's EM, a depth-2 tree recovering a piecewise-linear function, backends,
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import logsumexp as sp_logsumexp

from moeref.em import (
    CollapsedVarianceError,
    EMOptions,
    EMResult,
    EmptyComponentError,
    SingularWeightedLeastSquaresError,
)
from moeref.experts import LinearExpertsParams
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.hierarchical_moe import HMEParams, hme_log_likelihood, hme_posteriors, hme_priors
from moeref.hme_em import (
    HMEFitParams,
    HMEFitResult,
    fit_hme,
    hme_e_step,
    hme_m_step,
    hme_n_free_parameters,
    hme_penalty,
    hme_random_starts,
)
from moeref.moe_em import MoEParams, fit_moe
from moeref.softmax_gate import GateSeparationWarning, SoftmaxGate, SoftmaxGateParams
from conftest import assert_close
from helpers import leaves

QUIET = dict(warn_not_converged=False)


def _tree(rng, branching, d_in=1, d_out=1, scale=0.5):
    weights, biases, nodes = [], [], 1
    for b in branching:
        weights.append(scale * rng.normal(size=(nodes, d_in, b)))
        biases.append(scale * rng.normal(size=(nodes, b)))
        nodes *= b
    experts = LinearExpertsParams(rng.normal(size=(nodes, d_in, d_out)), rng.normal(size=(nodes, d_out)))
    return HMEParams(tuple(weights), tuple(biases), experts)


def _pieces(rng, n=160, noise=0.1):
    """A continuous function of four linear pieces on [-4, 4], breaks at -2, 0, 2."""
    x = np.sort(rng.uniform(-4, 4, size=n))
    slopes, intercepts = np.array([1.5, -1.0, 2.0, -0.5]), np.array([5.0, 0.0, 0.0, 5.0])
    piece = np.digitize(x, [-2.0, 0.0, 2.0])
    y = slopes[piece] * x + intercepts[piece] + noise * rng.normal(size=n)
    return x[:, None], y[:, None], slopes, intercepts


# --------------------------------------------------------------------------------------------
# EM never decreases the likelihood
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimate_variance, ridge, n_iter", [(False, 0.0, 20), (True, 1e-2, 40)])
def test_loglik_trace_is_non_decreasing(rng, estimate_variance, ridge, n_iter):
    x, y, _, _ = _pieces(rng, n=80, noise=0.3)
    init = _tree(rng, (2, 2))
    gate = SoftmaxGate(ridge=ridge)
    fit = fit_hme(x, y, init, variance=1.0, estimate_variance=estimate_variance, gate=gate, options=EMOptions(max_iter=n_iter, **QUIET))
    assert fit.decreases == () and fit.n_iter == n_iter
    assert np.all(np.diff(fit.loglik_trace) >= -1e-10 * (1 + np.abs(fit.loglik_trace[:-1])))
    assert fit.loglik_trace[-1] > fit.loglik_trace[0] + 1.0
    # the recorded objective is the forward's log-likelihood at the reported variance, minus the ridge penalty
    ll = hme_log_likelihood(x, y, fit.params, variance=fit.variance).sum()
    assert fit.loglik == pytest.approx(ll, rel=1e-12)
    assert fit.penalty == pytest.approx(hme_penalty(fit.params, gate), rel=1e-12)
    assert fit.loglik_trace[-1] == pytest.approx(fit.loglik - fit.penalty, rel=1e-12) == fit.penalised_loglik
    assert len(fit.penalty_trace) == len(fit.loglik_trace)
    assert (fit.penalty > 0) == (ridge > 0)
    if not estimate_variance:
        assert fit.variance == 1.0


def test_ridge_penalty_is_on_the_baseline_form(rng):
    params = _tree(rng, (2, 3))
    gate = SoftmaxGate(ridge=0.3)
    expected = 0.0
    for W, B in zip(params.gate_weights, params.gate_biases):
        for m in range(W.shape[0]):
            w, b = W[m] - W[m][:, -1:], B[m] - B[m][-1]  # the equivalent point with a zero last column
            expected += 0.15 * (np.sum(w**2) + np.sum(b**2))
    assert hme_penalty(params, gate) == pytest.approx(expected, rel=1e-13)
    assert hme_penalty(params, SoftmaxGate()) == 0.0
    sym = SoftmaxGate(parametrisation="symmetric", ridge=0.3)
    assert hme_penalty(params, sym) == pytest.approx(0.15 * sum(np.sum(w**2) + np.sum(b**2) for w, b in zip(params.gate_weights, params.gate_biases)))


def test_separated_gates_are_reported(rng):
    """Without a ridge, abrupt regime changes make a node's targets separable: the Newton solver warns."""
    x, y, _, _ = _pieces(rng, n=80, noise=0.3)
    with pytest.warns(GateSeparationWarning, match="separated"):
        fit_hme(x, y, _tree(rng, (2, 2)), estimate_variance=True, options=EMOptions(max_iter=10, **QUIET))


@settings(max_examples=10)  # each example is a small EM fit
@given(seed=st.integers(0, 2**32 - 1), branching=st.sampled_from([(2,), (3,), (2, 2), (2, 1, 2)]))
def test_em_increases_the_likelihood_property(seed, branching):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 2))
    y = np.tanh(x @ rng.normal(size=(2, 2))) + 0.2 * rng.normal(size=(30, 2))
    init = _tree(rng, branching, d_in=2, d_out=2)
    fit = fit_hme(x, y, init, variance=0.5, estimate_variance=True, gate=SoftmaxGate(ridge=1e-2), options=EMOptions(max_iter=4, **QUIET))
    assert fit.decreases == ()
    assert fit.n_iter == len(fit.loglik_trace) - 1


# --------------------------------------------------------------------------------------------
# The M-step's pieces, against direct computations
# --------------------------------------------------------------------------------------------


TIGHT = SoftmaxGate(tol=1e-16)  # Newton to round-off, so that the gate M-step is checkable to ~1e-8


def _one_m_step(rng, estimate_variance=True):
    x = rng.normal(size=(40, 2))
    y = rng.normal(size=(40, 2))
    params = _tree(rng, (2, 3), d_in=2, d_out=2)
    post = hme_posteriors(x, y, params, variance=0.7)
    new = hme_m_step(x, y, HMEFitParams(params, np.asarray(0.7)), post, estimate_variance=estimate_variance, gate=TIGHT)
    return x, y, params, post, new


def test_each_expert_is_a_weighted_least_squares_fit(rng):
    x, y, _, post, new = _one_m_step(rng)
    x1 = np.column_stack([x, np.ones(len(x))])
    for p in range(post.paths.shape[1]):
        sw = np.sqrt(post.paths[:, p])[:, None]
        coef = np.linalg.lstsq(sw * x1, sw * y, rcond=None)[0]  # (3, 2)
        np.testing.assert_allclose(new.hme.experts.weight[p], coef[:2], rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(new.hme.experts.bias[p], coef[2], rtol=1e-9, atol=1e-11)


def test_shared_variance_is_the_posterior_weighted_residual_mean(rng):
    x, y, _, post, new = _one_m_step(rng)
    mu = np.einsum("nd,pdo->npo", x, new.hme.experts.weight) + new.hme.experts.bias[None]
    expected = np.sum(post.paths * ((y[:, None, :] - mu) ** 2).sum(-1)) / y.size
    assert float(new.variance) == pytest.approx(expected, rel=1e-12)
    _, _, _, _, kept = _one_m_step(np.random.default_rng(0), estimate_variance=False)
    assert float(kept.variance) == 0.7


def test_each_gate_node_maximises_its_weighted_multinomial_objective(rng):
    """Stationarity of sum_n h_m sum_c h_{c|m} log g_{c|m}: the gradient sum_n h_m (h_{c|m} - g_{c|m}) [x, 1]
    vanishes at every node, and a general-purpose optimiser finds no better value."""
    x, _, _, post, new = _one_m_step(rng)
    x1 = np.column_stack([x, np.ones(len(x))])
    for l, (W, B) in enumerate(zip(new.hme.gate_weights, new.hme.gate_biases)):
        for m in range(W.shape[0]):
            t, s = post.conditionals[l][:, m, :], post.nodes[l][:, m]
            g = np.exp(sp_log_softmax(x @ W[m] + B[m], axis=1))
            grad = x1.T @ (s[:, None] * (t - g))
            np.testing.assert_allclose(grad, 0, atol=1e-7)

            def neg(theta, t=t, s=s, b=W.shape[2]):
                z = x1 @ np.column_stack([theta.reshape(3, b - 1), np.zeros(3)])
                return -np.sum(s[:, None] * t * sp_log_softmax(z, axis=1))

            best = optimize.minimize(neg, np.zeros(3 * (W.shape[2] - 1)), method="BFGS", options={"gtol": 1e-10})
            ours = -np.sum(s[:, None] * t * np.log(g))
            assert ours <= best.fun + 1e-9


def test_e_step_is_the_upward_downward_recursion(rng):
    x = rng.normal(size=(20, 1))
    y = rng.normal(size=(20, 1))
    params = _tree(rng, (2, 2))
    e = hme_e_step(x, y, params, variance=0.5)
    post = hme_posteriors(x, y, params, variance=0.5)
    assert float(e.loglik) == pytest.approx(post.log_likelihood.sum(), rel=1e-14)
    np.testing.assert_allclose(np.exp(e.log_responsibilities), post.paths, rtol=1e-14)


# --------------------------------------------------------------------------------------------
# One level = the flat MoE; depth 2 recovers a piecewise-linear function
# --------------------------------------------------------------------------------------------


def _direct_flat_moe_em(x, y, W, b, A, c, variance, n_iter):
    """Flat MoE (softmax gate, linear experts, one shared variance) by EM, in NumPy: gate M-step by
    BFGS on the soft-target cross-entropy (independent of moeref's Newton solver)."""
    x1 = np.column_stack([x, np.ones(len(x))])
    K = W.shape[1]
    trace = []
    for it in range(n_iter + 1):
        log_g = sp_log_softmax(x @ W + b, axis=1)
        mu = x @ A + c  # (N, K) for d_out = 1
        a = log_g - 0.5 * (y - mu) ** 2 / variance - 0.5 * np.log(2 * np.pi * variance)
        trace.append(sp_logsumexp(a, axis=1).sum())
        if it == n_iter:
            break
        h = np.exp(a - sp_logsumexp(a, axis=1, keepdims=True))
        coefs = [np.linalg.lstsq(np.sqrt(h[:, k:k + 1]) * x1, np.sqrt(h[:, k]) * y[:, 0], rcond=None)[0] for k in range(K)]
        A, c = np.array([cf[:-1] for cf in coefs]).T, np.array([cf[-1] for cf in coefs])
        variance = np.sum(h * (y - (x @ A + c)) ** 2) / len(y)

        def neg(theta, h=h):
            return -np.sum(h * sp_log_softmax(x1 @ np.column_stack([theta.reshape(x1.shape[1], K - 1), np.zeros(x1.shape[1])]), axis=1))

        theta0 = np.vstack([W - W[:, -1:], (b - b[-1])[None]])[:, :-1].ravel()
        res = optimize.minimize(neg, theta0, method="BFGS", options={"gtol": 1e-11})
        full = np.column_stack([res.x.reshape(x1.shape[1], K - 1), np.zeros(x1.shape[1])])
        W, b = full[:-1], full[-1]
    return np.array(trace), (W, b, A, c, variance)


def test_one_level_tree_is_the_flat_moe_em(rng):
    """A one-level HME is the flat MoE with a softmax gate and linear-Gaussian experts of one shared
    isotropic variance: fit_hme equals fit_moe (same Newton solver) to round-off, and a NumPy EM whose
    gate M-step is a BFGS fit (an independent solver) to the optimisers' tolerance."""
    x, y, _, _ = _pieces(rng, n=60, noise=0.3)
    init = _tree(rng, (3,))
    opts = EMOptions(max_iter=8, **QUIET)
    fit = fit_hme(x, y, init, variance=1.0, estimate_variance=True, gate=TIGHT, options=opts)
    p = fit.params

    experts = LinearGaussianExperts(covariance="isotropic", tied=True)
    moe_init = MoEParams(
        SoftmaxGateParams(init.gate_weights[0][0], init.gate_biases[0][0]),
        LinearGaussianExpertsParams(init.experts.weight, init.experts.bias, np.ones(1)),
    )
    moe = fit_moe(x, y, TIGHT, experts, moe_init, options=opts)
    np.testing.assert_allclose(fit.loglik_trace, moe.loglik_trace, rtol=1e-12)
    np.testing.assert_allclose(p.gate_weights[0][0], moe.params.gate.weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p.gate_biases[0][0], moe.params.gate.bias, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p.experts.weight, moe.params.experts.weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p.experts.bias, moe.params.experts.bias, rtol=1e-10, atol=1e-12)
    assert fit.variance == pytest.approx(float(moe.params.experts.cov[0]), rel=1e-12)
    assert fit.n_free_parameters == moe.n_free_parameters and fit.bic == pytest.approx(moe.bic, rel=1e-12)
    np.testing.assert_allclose(fit.responsibilities, moe.responsibilities, rtol=1e-10, atol=1e-14)

    trace, (W, b, A, c, var) = _direct_flat_moe_em(
        x, y, init.gate_weights[0][0], init.gate_biases[0][0], init.experts.weight[:, :, 0].T, init.experts.bias[:, 0], 1.0, 8
    )
    np.testing.assert_allclose(fit.loglik_trace, trace, rtol=1e-7)
    np.testing.assert_allclose(p.experts.weight[:, :, 0].T, A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.experts.bias[:, 0], c, rtol=1e-5, atol=1e-6)
    assert fit.variance == pytest.approx(var, rel=1e-6)
    # the gate only up to the softmax's shift invariance
    prob = np.exp(sp_log_softmax(x @ p.gate_weights[0][0] + p.gate_biases[0][0], axis=1))
    np.testing.assert_allclose(prob, np.exp(sp_log_softmax(x @ W + b, axis=1)), atol=1e-6)


def _quartile_init(x, y, rng):
    """Depth-2 binary tree: near-zero gates; experts fitted to the four quartiles of x (a common start)."""
    q = np.quantile(x[:, 0], [0.25, 0.5, 0.75])
    piece = np.digitize(x[:, 0], q)
    x1 = np.column_stack([x, np.ones(len(x))])
    coef = np.array([np.linalg.lstsq(x1[piece == p], y[piece == p], rcond=None)[0] for p in range(4)])  # (4, 2, 1)
    return HMEParams(
        (0.01 * rng.normal(size=(1, 1, 2)), 0.01 * rng.normal(size=(2, 1, 2))),
        (np.zeros((1, 2)), np.zeros((2, 2))),
        LinearExpertsParams(coef[:, :1, :] + 0.1 * rng.normal(size=(4, 1, 1)), coef[:, 1, :]),
    )


def test_depth_two_tree_recovers_four_linear_pieces(rng):
    x, y, slopes, intercepts = _pieces(rng)
    init = _quartile_init(x, y, rng)
    # a small ridge keeps the gates finite: the pieces switch abruptly, so the unpenalised gate weights diverge
    fit = fit_hme(x, y, init, variance=1.0, estimate_variance=True, gate=SoftmaxGate(ridge=1e-2), options=EMOptions(tol=1e-9, max_iter=300))
    assert fit.converged and fit.decreases == ()
    p = fit.params
    # each piece's centre is owned by one leaf (largest path prior), a different leaf per piece,
    # and that leaf's line is the piece's line
    centres = np.array([[-3.0], [-1.0], [1.0], [3.0]])
    owner = np.argmax(hme_priors(centres, p).paths, axis=1)
    assert len(set(owner.tolist())) == 4
    np.testing.assert_allclose(p.experts.weight[owner, 0, 0], slopes, atol=0.1)
    np.testing.assert_allclose(p.experts.bias[owner, 0], intercepts, atol=0.2)
    assert math.sqrt(fit.variance) == pytest.approx(0.1, rel=0.25)
    # the partition is hierarchical: the top gate separates {pieces 0, 1} from {pieces 2, 3}
    assert owner[0] // 2 == owner[1] // 2 and owner[2] // 2 == owner[3] // 2 and owner[0] // 2 != owner[2] // 2


def test_the_result_starts_with_the_em_result_fields():
    assert HMEFitResult._fields[: len(EMResult._fields)] == EMResult._fields


def test_random_restarts_of_a_tree_are_reproducible_and_reported(rng):
    x, y, _, _ = _pieces(rng, n=80)
    template = _tree(rng, (2, 2), scale=0.0)
    kw = dict(variance=1.0, estimate_variance=True, gate=SoftmaxGate(ridge=1e-2), options=EMOptions(tol=1e-8, max_iter=60, **QUIET))
    a, b = (fit_hme(x, y, template, generator=np.random.default_rng(3), n_restarts=2, **kw) for _ in range(2))
    assert a.loglik_trace == b.loglik_trace and a.best_restart == b.best_restart  # same seed, same fit
    assert [r.index for r in a.restarts] == [0, 1, 2] and a.restarts[0].draws is None
    assert a.penalised_loglik == max(r.objective for r in a.restarts)
    starts = hme_random_starts(x, y, template, np.random.default_rng(3), 2, gate=SoftmaxGate(ridge=1e-2))
    draws = np.random.default_rng(3)
    for rec, start in zip(a.restarts[1:], starts):
        np.testing.assert_array_equal(rec.draws, draws.random(80))
        assert np.all(start.responsibilities.sum(axis=0) == 20)  # a balanced split over the 4 leaves
        for u, v in zip(leaves(rec.start), leaves(start.params)):
            np.testing.assert_array_equal(u, v)
        assert fit_hme(x, y, rec.start, **kw).loglik_trace == rec.loglik_trace
    # an explicit restart of another branching is refused
    with pytest.raises(ValueError, match=r"restarts\[0\] has branching \(4,\) but init has \(2, 2\)"):
        fit_hme(x, y, template, restarts=[_tree(rng, (4,))], **kw)


# --------------------------------------------------------------------------------------------
# Backends, counts, criteria
# --------------------------------------------------------------------------------------------


def test_every_backend_equals_numpy(backend, rng):
    x, y, _, _ = _pieces(rng, n=40, noise=0.3)
    init = _tree(rng, (2, 2))
    opts = EMOptions(max_iter=3, **QUIET)
    gate = SoftmaxGate(ridge=1e-2)
    ref = fit_hme(x, y, init, variance=1.0, estimate_variance=True, gate=gate, options=opts)
    got = fit_hme(
        backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(init),
        variance=1.0, estimate_variance=True, gate=gate, options=opts,
    )
    np.testing.assert_allclose(got.loglik_trace, ref.loglik_trace, rtol=1e-10)
    np.testing.assert_allclose(got.penalty_trace, ref.penalty_trace, rtol=1e-10)
    for a, b in zip(leaves(backend.tree_to_numpy(got.params)), leaves(ref.params)):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert_close(backend.to_numpy(got.responsibilities), ref.responsibilities, rtol=1e-10, atol=1e-12)
    assert got.variance == pytest.approx(ref.variance, rel=1e-10)


def test_free_parameters_and_information_criteria(rng):
    x, y, _, _ = _pieces(rng, n=50, noise=0.3)
    init = _tree(rng, (2, 3))
    # gates: 1 node x 1 x 2 + 2 nodes x 2 x 2 = 10; experts: 6 x 2 = 12; variance: 1
    assert hme_n_free_parameters(init) == 22
    assert hme_n_free_parameters(init, estimate_variance=True) == 23
    fit = fit_hme(x, y, init, estimate_variance=True, options=EMOptions(max_iter=3, **QUIET))
    assert fit.n_free_parameters == 23 and fit.n_samples == 50
    assert fit.aic == pytest.approx(-2 * fit.loglik + 2 * 23)
    assert fit.bic == pytest.approx(-2 * fit.loglik + 23 * math.log(50))
    assert fit.responsibilities.shape == (50, 6)
    np.testing.assert_allclose(fit.responsibilities.sum(1), 1.0, rtol=1e-12)


def test_not_converged_warns(rng):
    x, y, _, _ = _pieces(rng, n=40, noise=0.3)
    with pytest.warns(Warning, match="did not converge in 2 iterations"):
        fit = fit_hme(x, y, _tree(rng, (2,)), options=EMOptions(max_iter=2))
    assert not fit.converged


# --------------------------------------------------------------------------------------------
# Degeneracies and bad input
# --------------------------------------------------------------------------------------------


def test_degenerate_states_raise_named_errors(rng):
    x, y, _, _ = _pieces(rng, n=40, noise=0.3)
    # a leaf that explains nothing: its expert is far from every point and its gate is closed
    init = _tree(rng, (2,))
    init = init._replace(
        gate_biases=(np.array([[0.0, -60.0]]),),
        experts=LinearExpertsParams(init.experts.weight, np.array([[0.0], [1e3]])),
    )
    with pytest.raises(EmptyComponentError, match="EM iteration 1 \\(M-step\\): expert 1 has total weight"):
        fit_hme(x, y, init)
    # too few distinct inputs for an affine expert
    xs = np.r_[np.zeros((20, 1)), np.ones((20, 1))]
    with pytest.raises(SingularWeightedLeastSquaresError, match="expert 0: the weighted Gram matrix"):
        fit_hme(np.zeros((40, 1)), y, _tree(rng, (2,)))
    # exact interpolation: the shared variance collapses
    with pytest.raises(CollapsedVarianceError, match="the shared \\(tied\\) covariance"):
        fit_hme(xs, 2 * xs + 1, _tree(rng, (2,)), estimate_variance=True)


def test_bad_input_names_the_argument(rng):
    x, y, _, _ = _pieces(rng, n=20, noise=0.3)
    init = _tree(rng, (2, 2))
    with pytest.raises(ValueError, match="init.gate_biases\\[1\\] has a non-finite entry"):
        fit_hme(x, y, init._replace(gate_biases=(init.gate_biases[0], np.array([[0.0, -np.inf], [0.0, 0.0]]))))
    with pytest.raises(ValueError, match="variance must be a positive finite Python number"):
        fit_hme(x, y, init, variance=-1.0)
    with pytest.raises(TypeError, match="estimate_variance must be a bool"):
        fit_hme(x, y, init, estimate_variance="yes")
    with pytest.raises(TypeError, match="gate must be a moeref.softmax_gate.SoftmaxGate"):
        fit_hme(x, y, init, gate={"ridge": 1.0})
    with pytest.raises(ValueError, match=r"y must be 2-dimensional, got shape \(20,\)"):
        fit_hme(x, y[:, 0], init)
    with pytest.raises(ValueError, match=r"y has shape \(19, 1\) but \(20, 1\) was expected"):
        fit_hme(x, y[:19], init)
    with pytest.raises(ValueError, match="x contains NaN"):
        fit_hme(np.full_like(x, np.nan), y, init)
    with pytest.raises(TypeError, match="init must be a HMEParams"):
        fit_hme(x, y, tuple(init))
    with pytest.raises(ValueError, match="init.experts.weight has shape"):
        fit_hme(x, y, init._replace(experts=LinearExpertsParams(np.zeros((3, 1, 1)), np.zeros((3, 1)))))
    with pytest.raises(TypeError, match="options must be an EMOptions"):
        fit_hme(x, y, init, options={"max_iter": 3})
    with pytest.raises(ValueError, match="min_sigma must be a non-negative float"):
        fit_hme(x, y, init, min_sigma=-1.0)
    post = hme_posteriors(x, y, init)
    with pytest.raises(TypeError, match="state must be a HMEFitParams"):
        hme_m_step(x, y, init, post)
    with pytest.raises(TypeError, match="posteriors must be a HMEPosteriors"):
        hme_m_step(x, y, HMEFitParams(init, np.asarray(1.0)), tuple(post))


def test_m_step_and_penalty_validate_their_records(rng):
    x, y = rng.normal(size=(12, 2)), rng.normal(size=(12, 2))
    params = _tree(rng, (2, 3), d_in=2, d_out=2)
    post = hme_posteriors(x, y, params, variance=0.7)
    state = HMEFitParams(params, np.asarray(0.7))
    with pytest.raises(ValueError, match="posteriors.paths contains NaN"):
        hme_m_step(x, y, state, post._replace(paths=np.full_like(post.paths, np.nan)))
    with pytest.raises(ValueError, match=r"posteriors.conditionals\[1\] has shape \(12, 2, 2\) but \(12, 2, 3\) was expected"):
        hme_m_step(x, y, state, post._replace(conditionals=(post.conditionals[0], post.conditionals[1][:, :, :2])))
    with pytest.raises(TypeError, match="posteriors.nodes must be a tuple of 3 arrays"):
        hme_m_step(x, y, state, post._replace(nodes=post.nodes[:2]))
    with pytest.raises(ValueError, match="state.variance must be a finite positive number"):
        hme_m_step(x, y, HMEFitParams(params, -1.0), post)
    with pytest.raises(ValueError, match=r"state.hme.gate_weights\[0\] contains NaN"):
        hme_m_step(x, y, HMEFitParams(params._replace(gate_weights=(np.full((1, 2, 2), np.nan), params.gate_weights[1])), 0.7), post)
    with pytest.raises(ValueError, match=r"params.gate_biases\[1\] contains NaN or infinite values"):
        hme_penalty(params._replace(gate_biases=(params.gate_biases[0], np.full((2, 3), np.nan))), SoftmaxGate(ridge=0.1))
    with pytest.raises(TypeError, match="params must be a HMEParams, got NoneType"):
        hme_penalty(None, SoftmaxGate(ridge=0.1))
    # the likelihood fields are not read by the M-step (documented)
    same = hme_m_step(x, y, state, post._replace(log_likelihood=None, log_node_likelihoods=()), gate=TIGHT)
    ref = hme_m_step(x, y, state, post, gate=TIGHT)
    np.testing.assert_array_equal(same.hme.experts.weight, ref.hme.experts.weight)

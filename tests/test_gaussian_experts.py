"""Gaussian expert families: densities vs scipy, VJPs, the weighted-ML M-step, conventions, degeneracies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, stats

from moeref.constant_gate import ConstantGate, ConstantGateParams
from moeref.datasets import load_dataset
from moeref.em import MIXTOOLS, CollapsedVarianceError, EMOptions, EmptyComponentError, SingularWeightedLeastSquaresError
from moeref.families import ExpertFamily
from moeref.gaussian_experts import (
    ConstantGaussianExperts,
    ConstantGaussianExpertsParams,
    LinearGaussianExperts,
    LinearGaussianExpertsParams,
)
from moeref.moe_em import MoEParams, fit_moe, moe_posteriors
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams
from conftest import assert_close
from helpers import assert_vjp_correct

STRUCTURES = list(itertools.product(["full", "diagonal", "isotropic"], [False, True]))
# on every backend: each structure once and tying once (JAX compiles every new operation and shape)
BACKEND_STRUCTURES = [("full", False), ("diagonal", True), ("isotropic", False)]


def _spd(rng, n, D):
    a = rng.normal(size=(n, D, D))
    return a @ a.transpose(0, 2, 1) + 0.5 * np.eye(D)


def _structured(cov, covariance):
    """Project SPD matrices onto a covariance structure (as numpy matrices)."""
    D = cov.shape[-1]
    if covariance == "diagonal":
        return np.einsum("kii->ki", cov)[:, :, None] * np.eye(D)
    if covariance == "isotropic":
        return (np.trace(cov, axis1=1, axis2=2) / D)[:, None, None] * np.eye(D)
    return cov


def _problem(rng, covariance, tied, N=12, d=2, D=2, K=3):
    fam = LinearGaussianExperts(covariance=covariance, tied=tied)
    x, y = rng.normal(size=(N, d)), rng.normal(size=(N, D))
    sig = _structured(_spd(rng, 1 if tied else K, D), covariance)
    params = LinearGaussianExpertsParams(rng.normal(size=(K, d, D)), rng.normal(size=(K, D)), fam.cov_from_matrices(sig))
    return fam, x, y, params, sig


def _scipy_logpdf(x, y, params, sig):
    K = params.weight.shape[0]
    return np.stack(
        [stats.multivariate_normal(mean=np.zeros(y.shape[1]), cov=sig[min(k, len(sig) - 1)]).logpdf(y - x @ params.weight[k] - params.bias[k]) for k in range(K)],
        axis=1,
    ).reshape(x.shape[0], K)


def test_families_implement_the_interface():
    for fam in (LinearGaussianExperts(), ConstantGaussianExperts()):
        assert isinstance(fam, ExpertFamily)


# ------------------------------------------------------------------------------------------
# Densities: scipy on every backend (one set of shapes: N=12, d=2, D=2, K=3)
# ------------------------------------------------------------------------------------------


def test_log_density_matches_scipy(rng):
    for covariance, tied in STRUCTURES:
        fam, x, y, params, sig = _problem(rng, covariance, tied)
        np.testing.assert_allclose(fam.log_density(params, x, y), _scipy_logpdf(x, y, params, sig), rtol=1e-12, atol=1e-12)


def test_log_density_matches_scipy_on_every_backend(backend, rng):
    for covariance, tied in BACKEND_STRUCTURES:
        fam, x, y, params, sig = _problem(rng, covariance, tied)
        got = fam.log_density(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y))
        assert_close(backend.to_numpy(got), _scipy_logpdf(x, y, params, sig), rtol=1e-12, atol=1e-12, err_msg=f"{covariance} tied={tied}")
        mean = backend.to_numpy(fam.mean(backend.tree_from_numpy(params), backend.from_numpy(x)))
        assert_close(mean, np.einsum("nd,kde->nke", x, params.weight) + params.bias[None])
        assert_close(backend.to_numpy(fam.covariance_matrices(backend.tree_from_numpy(params))), sig, rtol=1e-12, atol=1e-14)


def test_one_dimensional_y_is_one_output(rng):
    fam, x, y, params, sig = _problem(rng, "isotropic", False, D=1)
    np.testing.assert_allclose(fam.log_density(params, x, y[:, 0]), fam.log_density(params, x, y), rtol=1e-15)
    ref = stats.norm.logpdf(y, loc=np.einsum("nd,kd->nk", x, params.weight[:, :, 0]) + params.bias[:, 0], scale=np.sqrt(params.cov))
    np.testing.assert_allclose(fam.log_density(params, x, y[:, 0]), ref, rtol=1e-13)


def test_constant_experts_log_density_matches_scipy_on_every_backend(backend, rng):
    for covariance, tied in BACKEND_STRUCTURES:
        fam = ConstantGaussianExperts(covariance=covariance, tied=tied)
        sig = _structured(_spd(rng, 1 if tied else 3, 2), covariance)
        params = ConstantGaussianExpertsParams(rng.normal(size=(3, 2)), fam.cov_from_matrices(sig))
        x, y = rng.normal(size=(12, 2)), rng.normal(size=(12, 2))
        ref = np.stack([stats.multivariate_normal(params.mean[k], sig[min(k, len(sig) - 1)]).logpdf(y) for k in range(3)], 1)
        got = fam.log_density(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y))
        assert_close(backend.to_numpy(got), ref, rtol=1e-12, atol=1e-12)
        assert backend.to_numpy(fam.mean(backend.tree_from_numpy(params), backend.from_numpy(x))).shape == (12, 3, 2)


# ------------------------------------------------------------------------------------------
# VJPs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance,tied", STRUCTURES)
def test_log_density_vjp(rng, covariance, tied):
    fam, x, y, params, _ = _problem(rng, covariance, tied, N=5, d=2, D=2, K=2)
    ct = rng.normal(size=(5, 2))
    assert_vjp_correct(
        f"linear_gaussian[{covariance},tied={tied}]",
        fam.log_density,
        lambda p, xx, yy, c: (fam.log_density_vjp(p, xx, yy, c),) + tuple(fam.log_density_input_vjp(p, xx, yy, c)),
        (params, x, y),
        ct,
    )


@pytest.mark.parametrize("covariance,tied", [("full", False), ("diagonal", True), ("isotropic", False)])
def test_constant_experts_vjp(rng, covariance, tied):
    fam = ConstantGaussianExperts(covariance=covariance, tied=tied)
    sig = _structured(_spd(rng, 1 if tied else 2, 2), covariance)
    params = ConstantGaussianExpertsParams(rng.normal(size=(2, 2)), fam.cov_from_matrices(sig))
    x, y = rng.normal(size=(5, 1)), rng.normal(size=(5, 2))
    ct = rng.normal(size=(5, 2))
    assert_vjp_correct(
        f"constant_gaussian[{covariance},tied={tied}]",
        fam.log_density,
        lambda p, xx, yy, c: (fam.log_density_vjp(p, xx, yy, c), None, fam.log_density_input_vjp(p, xx, yy, c).y),
        (params, x, y),
        ct,
    )
    assert fam.log_density_input_vjp(params, x, y, ct).x is None


def test_vjp_on_every_backend(backend, rng):
    fam, x, y, params, _ = _problem(rng, "full", False)
    ct = rng.normal(size=(12, 3))
    ref = fam.log_density_vjp(params, x, y, ct)
    got = fam.log_density_vjp(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(ct))
    for a, b in zip(backend.tree_to_numpy(got), ref):
        assert_close(a, b, rtol=1e-11, atol=1e-12)


# ------------------------------------------------------------------------------------------
# M-step: the weighted maximum-likelihood estimate
# ------------------------------------------------------------------------------------------


def _numpy_weighted_mle(x, y, w, covariance, tied):
    """Reference: per-expert weighted lstsq, then the weighted residual covariance."""
    N, K = w.shape
    X = np.column_stack([x, np.ones(N)])
    thetas, scatters = [], []
    for k in range(K):
        sw = np.sqrt(w[:, k])
        theta = np.linalg.lstsq(sw[:, None] * X, sw[:, None] * y, rcond=None)[0]  # (p, D)
        r = y - X @ theta
        thetas.append(theta)
        scatters.append((w[:, k, None] * r).T @ r)
    S = np.stack(scatters)
    S = S.sum(0, keepdims=True) / w.sum() if tied else S / w.sum(0)[:, None, None]
    return np.stack(thetas), _structured(S, covariance)


def _weighted_loglik(fam, params, x, y, w):
    return float(np.sum(w * fam.log_density(params, x, y)))


def _check_weighted_mle(fam, x, y, w, got, covariance, tied):
    theta, sig = _numpy_weighted_mle(x, y, w, covariance, tied)
    assert_close(got.weight, theta[:, :2, :], rtol=1e-10, atol=1e-12)
    assert_close(got.bias, theta[:, 2, :], rtol=1e-10, atol=1e-12)
    assert_close(fam.covariance_matrices(got), sig, rtol=1e-10, atol=1e-12, err_msg=f"{covariance} tied={tied}")


def test_m_step_is_the_weighted_mle(rng):
    for covariance, tied in STRUCTURES:
        fam, x, y, params, _ = _problem(rng, covariance, tied)
        w = rng.dirichlet(np.ones(3), size=12)
        _check_weighted_mle(fam, x, y, w, fam.m_step(params, x, y, w), covariance, tied)


def test_m_step_is_the_weighted_mle_on_every_backend(backend, rng):
    for covariance, tied in BACKEND_STRUCTURES:
        fam, x, y, params, _ = _problem(rng, covariance, tied)
        w = rng.dirichlet(np.ones(3), size=12)
        got = fam.m_step(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(w))
        _check_weighted_mle(fam, x, y, w, backend.tree_to_numpy(got), covariance, tied)


def _unpack(v, covariance, tied, K, d, D):
    """Unconstrained vector -> params (log-Cholesky / log-variances)."""
    nw, nb = K * d * D, K * D
    weight, bias, rest = v[:nw].reshape(K, d, D), v[nw : nw + nb].reshape(K, D), v[nw + nb :]
    Kc = 1 if tied else K
    if covariance == "full":
        L = np.zeros((Kc, D, D))
        il = np.tril_indices(D)
        L[(slice(None),) + il] = rest.reshape(Kc, -1)
        L[:, np.arange(D), np.arange(D)] = np.exp(L[:, np.arange(D), np.arange(D)])
        cov = L
    elif covariance == "diagonal":
        cov = np.exp(rest.reshape(Kc, D))
    else:
        cov = np.exp(rest.reshape(Kc))
    return LinearGaussianExpertsParams(weight, bias, cov)


@pytest.mark.parametrize("covariance,tied", [("full", False), ("full", True), ("diagonal", False), ("isotropic", True)])
def test_m_step_agrees_with_scipy_optimize(rng, covariance, tied):
    K, d, D, N = 2, 1, 2, 15
    fam = LinearGaussianExperts(covariance=covariance, tied=tied)
    x = rng.normal(size=(N, d))
    y = x @ rng.normal(size=(d, D)) + rng.normal(size=(N, D))
    w = rng.dirichlet(np.ones(K), size=N)
    n_cov = {"full": D * (D + 1) // 2, "diagonal": D, "isotropic": 1}[covariance] * (1 if tied else K)
    v0 = np.zeros(K * d * D + K * D + n_cov)
    res = optimize.minimize(lambda v: -_weighted_loglik(fam, _unpack(v, covariance, tied, K, d, D), x, y, w), v0, method="BFGS", options={"gtol": 1e-10})
    opt = _unpack(res.x, covariance, tied, K, d, D)
    got = fam.m_step(opt, x, y, w)
    # the closed form is at least as good as the numerical optimum, and equal to it
    assert _weighted_loglik(fam, got, x, y, w) >= -res.fun - 1e-9
    np.testing.assert_allclose(got.weight, opt.weight, atol=1e-4)
    np.testing.assert_allclose(fam.covariance_matrices(got), fam.covariance_matrices(opt), atol=1e-4)


@given(st.integers(0, 2**32 - 1), st.sampled_from(STRUCTURES))
def test_m_step_maximises_the_weighted_loglik_property(seed, structure):
    covariance, tied = structure
    rng = np.random.default_rng(seed)
    fam, x, y, params, _ = _problem(rng, covariance, tied, N=10, d=1, D=2, K=2)
    w = rng.dirichlet(np.ones(2), size=10)
    best = fam.m_step(params, x, y, w)
    top = _weighted_loglik(fam, best, x, y, w)
    assert top >= _weighted_loglik(fam, params, x, y, w) - 1e-10
    for scale in (1e-3, 1e-1):  # perturbations of the optimum never do better
        pert = LinearGaussianExpertsParams(
            best.weight + scale * rng.normal(size=best.weight.shape),
            best.bias + scale * rng.normal(size=best.bias.shape),
            best.cov * np.exp(scale * rng.normal(size=best.cov.shape)) if covariance != "full" else best.cov + np.tril(scale * rng.normal(size=best.cov.shape)),
        )
        assert top >= _weighted_loglik(fam, pert, x, y, w) - 1e-10


def test_no_bias_option(rng):
    fam = LinearGaussianExperts(covariance="diagonal", bias=False)
    x, y, w = rng.normal(size=(12, 2)), rng.normal(size=(12, 2)), rng.dirichlet(np.ones(3), size=12)
    p0 = LinearGaussianExpertsParams(np.zeros((3, 2, 2)), np.zeros((3, 2)), np.ones((3, 2)))
    got = fam.m_step(p0, x, y, w)
    np.testing.assert_array_equal(got.bias, 0.0)
    sw = np.sqrt(w[:, 1])
    np.testing.assert_allclose(got.weight[1], np.linalg.lstsq(sw[:, None] * x, sw[:, None] * y, rcond=None)[0], rtol=1e-10)
    assert fam.n_free_parameters(got) == 3 * 2 * 2 + 3 * 2
    np.testing.assert_array_equal(fam.log_density_vjp(got, x, y, np.ones((12, 3))).bias, 0.0)


def test_flexmix_variance_convention(rng):
    """flexmix (FLXMRglm gaussian): sigma <- sqrt(sum(w * r^2 / mean(w)) / (nrow(x) - rank))."""
    N, K = 20, 2
    x, y, w = rng.normal(size=(N, 1)), rng.normal(size=N), rng.dirichlet(np.ones(K), size=N)
    p0 = LinearGaussianExpertsParams(np.zeros((K, 1, 1)), np.zeros((K, 1)), np.ones(K))
    ml = LinearGaussianExperts(covariance="isotropic").m_step(p0, x, y, w)
    fx = LinearGaussianExperts(covariance="isotropic", variance="flexmix").m_step(p0, x, y, w)
    np.testing.assert_allclose(fx.weight, ml.weight, rtol=1e-14)
    r = y[:, None] - (x[:, 0, None] * ml.weight[:, 0, 0] + ml.bias[:, 0])  # (N, K)
    flexmix_sigma = np.sqrt(np.sum(w * r**2 / w.mean(0), axis=0) / (N - 2))
    np.testing.assert_allclose(np.sqrt(fx.cov), flexmix_sigma, rtol=1e-12)
    np.testing.assert_allclose(fx.cov, ml.cov * N / (N - 2), rtol=1e-12)
    # tied: FLXMRglmfix(varFix = TRUE) pools with the same N / (N - p)
    tml = LinearGaussianExperts(covariance="isotropic", tied=True).m_step(p0._replace(cov=np.ones(1)), x, y, w)
    tfx = LinearGaussianExperts(covariance="isotropic", tied=True, variance="flexmix").m_step(p0._replace(cov=np.ones(1)), x, y, w)
    np.testing.assert_allclose(tfx.cov, tml.cov * N / (N - 2), rtol=1e-12)
    np.testing.assert_allclose(tml.cov, np.sum(w * r**2) / N, rtol=1e-12)


def test_fixed_variance_keeps_the_covariance_and_counts_no_parameter(rng):
    """variance="fixed": the unit-variance experts of Jacobs et al. (1991); the means are the same WLS fit."""
    N, K = 20, 2
    x, y, w = rng.normal(size=(N, 1)), rng.normal(size=(N, 3)), rng.dirichlet(np.ones(K), size=N)
    p0 = LinearGaussianExpertsParams(np.zeros((K, 1, 3)), np.zeros((K, 3)), np.full(1, 0.7))
    ml = LinearGaussianExperts(covariance="isotropic", tied=True)
    fixed = LinearGaussianExperts(covariance="isotropic", tied=True, variance="fixed")
    got, want = fixed.m_step(p0, x, y, w), ml.m_step(p0, x, y, w)
    np.testing.assert_allclose(got.weight, want.weight, rtol=1e-14)
    np.testing.assert_allclose(got.bias, want.bias, rtol=1e-14)
    assert got.cov is p0.cov
    assert fixed.n_free_parameters(got) == ml.n_free_parameters(got) - 1 == K * 3 * 2
    # gradient ascent does not move it: its cotangent through the unconstrained view is 0
    free = fixed.unconstrained(got)
    bar = fixed.constrained_vjp(free, fixed.log_density_vjp(got, x, y, np.ones((N, K))))
    np.testing.assert_array_equal(bar.cov, 0.0)
    assert np.any(ml.constrained_vjp(free, ml.log_density_vjp(got, x, y, np.ones((N, K)))).cov != 0.0)
    # constant experts too
    c0 = ConstantGaussianExpertsParams(np.zeros((K, 3)), np.ones((K, 3)))
    cfix = ConstantGaussianExperts(covariance="diagonal", variance="fixed")
    cgot = cfix.m_step(c0, x, y, w)
    np.testing.assert_allclose(cgot.mean, (w.T @ y) / w.sum(0)[:, None], rtol=1e-12)
    assert cgot.cov is c0.cov and cfix.n_free_parameters(cgot) == K * 3


def test_fixed_variance_makes_one_hot_targets_well_posed(rng):
    """With the ML variance an expert that owns one class fits it exactly and the variance collapses."""
    x = rng.normal(size=(40, 2))
    labels = (x[:, 0] > 0).astype(int)
    y = np.eye(2)[labels]
    w = np.eye(2)[labels]  # each expert owns one class
    p0 = LinearGaussianExpertsParams(np.zeros((2, 2, 2)), np.zeros((2, 2)), np.ones(1))
    with pytest.raises(CollapsedVarianceError, match="the shared"):
        LinearGaussianExperts(covariance="isotropic", tied=True).m_step(p0, x, y, w)
    got = LinearGaussianExperts(covariance="isotropic", tied=True, variance="fixed").m_step(p0, x, y, w)
    np.testing.assert_allclose(got.bias, np.eye(2), atol=1e-12)  # each expert outputs its class code


def test_constant_experts_m_step_is_weighted_mean_and_covariance(rng):
    y = rng.normal(size=(30, 3)) * [1.0, 2.0, 0.5] + 5.0
    w = rng.dirichlet(np.ones(2), size=30)
    x = np.zeros((30, 1))
    for covariance, tied in STRUCTURES:
        fam = ConstantGaussianExperts(covariance=covariance, tied=tied)
        p0 = ConstantGaussianExpertsParams(np.zeros((2, 3)), fam.cov_from_matrices(np.stack([np.eye(3)] * (1 if tied else 2))))
        got = fam.m_step(p0, x, y, w)
        covs = np.stack([np.cov(y.T, aweights=w[:, k], bias=True) for k in range(2)])
        if tied:
            covs = (covs * w.sum(0)[:, None, None]).sum(0, keepdims=True) / 30
        np.testing.assert_allclose(got.mean, (w.T @ y) / w.sum(0)[:, None], rtol=1e-12)
        np.testing.assert_allclose(fam.covariance_matrices(got), _structured(covs, covariance), rtol=1e-10)
        assert fam.n_free_parameters(got) == 6 + (1 if tied else 2) * {"full": 6, "diagonal": 3, "isotropic": 1}[covariance]


def test_n_free_parameters():
    p = LinearGaussianExpertsParams(np.zeros((3, 4, 2)), np.zeros((3, 2)), np.zeros((3, 2, 2)))
    assert LinearGaussianExperts().n_free_parameters(p) == 3 * 2 * 5 + 3 * 3
    assert LinearGaussianExperts(tied=True).n_free_parameters(p) == 30 + 3
    assert LinearGaussianExperts(covariance="diagonal").n_free_parameters(p) == 30 + 6
    assert LinearGaussianExperts(covariance="isotropic", tied=True).n_free_parameters(p) == 31


@pytest.mark.parametrize("covariance,tied", [("full", False), ("diagonal", True), ("isotropic", False)])
def test_unconstrained_view(rng, covariance, tied):
    fam, x, y, params, _ = _problem(rng, covariance, tied, N=5, d=1, D=2, K=2)
    free = fam.unconstrained(params)
    for a, b in zip(fam.constrained(free), params):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    assert_vjp_correct(
        f"linear_gaussian_unconstrained[{covariance},tied={tied}]",
        lambda u, xx, yy: fam.log_density(fam.constrained(u), xx, yy),
        lambda u, xx, yy, c: (fam.constrained_vjp(u, fam.log_density_vjp(fam.constrained(u), xx, yy, c)), None, None),
        (free, x, y),
        rng.normal(size=(5, 2)),
    )


# ------------------------------------------------------------------------------------------
# End to end through moeref.moe_em.fit_moe
# ------------------------------------------------------------------------------------------

# mixtools' CO2 example (Benaglia et al. 2009, JSS 32(6), doi:10.18637/jss.v032.i06, Section 5.2),
# printed by summary(regmixEM(CO2, GNP, lambda = c(1, 3) / 4, beta = matrix(c(8, -1, 1, 1), 2, 2),
# sigma = c(2, 1))): a constant gate and isotropic linear-Gaussian experts are the same model.
CO2_PRINTED = {"lambda": [0.754921, 0.245079], "sigma": [2.049315, 0.809389], "beta1": [8.678987, 1.415150], "beta2": [-0.023344, 0.676596], "loglik": -66.93977}


def test_co2_mixture_of_regressions_through_fit_moe():
    co2 = load_dataset("co2data")
    init = MoEParams(
        ConstantGateParams(np.array([0.25, 0.75])),
        LinearGaussianExpertsParams(np.array([[[-1.0]], [[1.0]]]), np.array([[8.0], [1.0]]), np.array([4.0, 1.0])),
    )
    fit = fit_moe(co2["GNP"][:, None], co2["CO2"], ConstantGate(), LinearGaussianExperts(covariance="isotropic"), init, options=MIXTOOLS)
    e = fit.params.experts
    np.testing.assert_allclose(fit.params.gate.weights, CO2_PRINTED["lambda"], atol=5e-7)
    np.testing.assert_allclose(np.sqrt(e.cov), CO2_PRINTED["sigma"], atol=5e-7)
    np.testing.assert_allclose(e.bias[:, 0], CO2_PRINTED["beta1"], atol=5e-7)
    np.testing.assert_allclose(e.weight[:, 0, 0], CO2_PRINTED["beta2"], atol=5e-7)
    assert abs(fit.loglik - CO2_PRINTED["loglik"]) < 5e-6
    assert fit.n_iter == 10 and fit.converged and fit.decreases == () and fit.n_free_parameters == 7


def test_fit_moe_with_full_covariance_experts_reaches_an_em_fixed_point(rng):
    """Two-output regimes switched by a softmax gate; at convergence one more M-step changes nothing."""
    N = 150
    x = rng.uniform(-1.0, 1.0, size=(N, 1))
    second = rng.uniform(size=N) < 1.0 / (1.0 + np.exp(-5.0 * x[:, 0]))
    mean = np.where(second[:, None], np.column_stack([1 + 2 * x[:, 0], -x[:, 0]]), np.column_stack([-1 - x[:, 0], 2 * x[:, 0]]))
    y = mean + rng.normal(size=(N, 2)) @ np.array([[0.3, 0.1], [0.0, 0.2]])
    experts = LinearGaussianExperts(covariance="full")
    init = MoEParams(
        SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
        LinearGaussianExpertsParams(np.array([[[-1.0, 1.0]], [[1.0, -1.0]]]), np.array([[-0.5, 0.0], [0.5, 0.0]]), np.stack([np.eye(2)] * 2)),
    )
    fit = fit_moe(x, y, SoftmaxGate(), experts, init, options=EMOptions(tol=1e-10, max_iter=500))
    assert fit.converged and fit.decreases == ()
    assert fit.n_free_parameters == 2 * 2 * 2 + 2 * 3 + 2
    tau = moe_posteriors(x, y, SoftmaxGate(), experts, fit.params)
    again = experts.m_step(fit.params.experts, x, y, tau)
    for a, b in zip(again, fit.params.experts):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(fit.params.experts.weight[:, 0, :], [[-1.0, 2.0], [2.0, -1.0]], atol=0.15)


# ------------------------------------------------------------------------------------------
# Degeneracies and bad input
# ------------------------------------------------------------------------------------------


def test_degeneracies_raise_named_errors():
    x = np.arange(6.0)[:, None]
    y = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 3.0])
    fam = LinearGaussianExperts(covariance="isotropic")
    p0 = LinearGaussianExpertsParams(np.zeros((2, 1, 1)), np.zeros((2, 1)), np.ones(2))
    with pytest.raises(EmptyComponentError, match=r"expert 1 has total weight 0.000e\+00"):
        fam.m_step(p0, x, y, np.column_stack([np.ones(6), np.zeros(6)]))
    one_point = np.column_stack([np.r_[1.0, 1, 1, 1, 1, 0], np.r_[0.0, 0, 0, 0, 0, 1]])
    with pytest.raises(SingularWeightedLeastSquaresError, match=r"expert 1: the weighted Gram matrix X\^T W X is singular"):
        fam.m_step(p0, x, y, one_point)
    two_points = np.column_stack([np.r_[1.0, 1, 1, 1, 0, 0], np.r_[0.0, 0, 0, 0, 1, 1]])
    with pytest.raises(CollapsedVarianceError, match="expert 1: the fitted covariance has smallest eigenvalue"):
        fam.m_step(p0, x, y, two_points)
    # full covariance: outputs that are exactly collinear collapse the covariance
    full = LinearGaussianExperts(covariance="full", tied=True)
    y2 = np.column_stack([y, 2.0 * y])
    p2 = LinearGaussianExpertsParams(np.zeros((2, 1, 2)), np.zeros((2, 2)), np.eye(2)[None])
    with pytest.raises(CollapsedVarianceError, match=r"the shared \(tied\) covariance"):
        full.m_step(p2, x, y2, np.full((6, 2), 0.5))
    with pytest.raises(CollapsedVarianceError):
        ConstantGaussianExperts(covariance="diagonal").m_step(
            ConstantGaussianExpertsParams(np.zeros((1, 2)), np.ones((1, 2))), x, np.column_stack([y, np.ones(6)]), np.ones((6, 1))
        )


def test_bad_input_names_the_argument(rng):
    fam, x, y, params, _ = _problem(rng, "full", False)
    with pytest.raises(ValueError, match="covariance must be one of 'full', 'diagonal', 'isotropic'; got 'spherical'"):
        LinearGaussianExperts(covariance="spherical")
    with pytest.raises(ValueError, match="variance must be one of 'ml', 'flexmix'"):
        LinearGaussianExperts(variance="unbiased")
    with pytest.raises(TypeError, match="tied must be a bool"):
        LinearGaussianExperts(tied=1)
    with pytest.raises(TypeError, match=r"params must be a LinearGaussianExpertsParams\(weight, bias, cov\)"):
        fam.log_density(tuple(params), x, y)
    with pytest.raises(ValueError, match=r"params.weight has shape \(3, 2, 2\) but \(3, 3, 2\) was expected \(x has d=3 features\)"):
        fam.log_density(params, rng.normal(size=(12, 3)), y)
    with pytest.raises(ValueError, match=r"y has shape \(11, 2\) but \(12, 2\) was expected"):
        fam.log_density(params, x, y[:11])
    with pytest.raises(ValueError, match=r"params.cov has shape \(3, 2\) but \(3, 2, 2\) was expected \(covariance=\"full\" stores Cholesky factors"):
        fam.log_density(params._replace(cov=np.ones((3, 2))), x, y)
    with pytest.raises(ValueError, match=r"params.cov has shape \(3, 2, 2\) but \(1, 2, 2\) was expected \(covariance=\"full\" stores Cholesky factors; tied=True"):
        LinearGaussianExperts(tied=True).log_density(params, x, y)
    with pytest.raises(ValueError, match="params.cov must have a positive diagonal"):
        fam.log_density(params._replace(cov=-params.cov), x, y)
    with pytest.raises(ValueError, match="params.cov must be positive"):
        LinearGaussianExperts(covariance="diagonal").log_density(params._replace(cov=-np.ones((3, 2))), x, y)
    with pytest.raises(ValueError, match="y is 1-D but the experts have D=2 outputs"):
        fam.log_density(params, x, y[:, 0])
    with pytest.raises(ValueError, match=r"weights has shape \(12, 2\) but \(12, 3\) was expected"):
        fam.m_step(params, x, y, np.ones((12, 2)))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fam.m_step(params, x, y, -np.ones((12, 3)))
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        fam.m_step(params, np.full_like(x, np.nan), y, np.ones((12, 3)))
    with pytest.raises(ValueError, match=r"cotangent has shape \(12,\) but \(12, 3\) was expected"):
        fam.log_density_vjp(params, x, y, np.ones(12))
    with pytest.raises(TypeError, match="share one dtype"):
        fam.log_density(params, x.astype(np.float32), y)
    with pytest.raises(ValueError, match='variance="flexmix" needs N > p'):
        LinearGaussianExperts(covariance="isotropic", variance="flexmix").m_step(
            LinearGaussianExpertsParams(np.zeros((1, 2, 1)), np.zeros((1, 1)), np.ones(1)), x[:3], y[:3, :1], np.ones((3, 1))
        )
    with pytest.raises(TypeError, match=r"params must be a ConstantGaussianExpertsParams\(mean, cov\)"):
        ConstantGaussianExperts().log_density(params, x, y)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        fam.log_density(params, torch.from_numpy(x), y)

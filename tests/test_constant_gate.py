"""Constant gate: log-weights, VJP, closed-form M-step, unconstrained view, and fit_moe reproducing
the mixture-of-regressions CO2 fit (mixtools vignette) exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeref.constant_gate import ConstantGate, ConstantGateParams
from moeref.datasets import load_dataset
from moeref.em import MIXTOOLS, EmptyComponentError
from moeref.families import GateFamily
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.moe_em import MoEParams, fit_moe
from moeref.regression_mixture import RegressionMixtureParams, fit_regression_mixture, with_intercept
from conftest import assert_close
from helpers import assert_vjp_correct


def test_constant_gate_is_a_gate_family():
    gate = ConstantGate()
    assert isinstance(gate, GateFamily) and gate.models_x is False
    assert gate.n_free_parameters(ConstantGateParams(np.ones(4) / 4)) == 3


def test_log_weights_normalise_and_broadcast():
    lw = ConstantGate().log_weights(ConstantGateParams(np.array([1.0, 3.0, 0.0])), np.zeros((4, 2)))
    assert lw.shape == (4, 3)
    np.testing.assert_allclose(lw[:, :2], np.log([[0.25, 0.75]] * 4), rtol=1e-15)
    assert np.all(lw[:, 2] == -np.inf)


def test_log_weights_vjp(rng):
    gate = ConstantGate()
    p = ConstantGateParams(rng.uniform(0.2, 2.0, size=3))
    x = rng.normal(size=(5, 2))
    assert_vjp_correct(
        "ConstantGate.log_weights",
        lambda params, x: gate.log_weights(params, x),
        lambda params, x, ct: (gate.log_weights_vjp(params, x, ct), None),
        (p, x),
        rng.normal(size=(5, 3)),
    )


def test_m_step_is_the_mean_responsibility(rng):
    tau = rng.dirichlet(np.ones(3), size=10)
    p = ConstantGate().m_step(ConstantGateParams(np.ones(3) / 3), np.zeros((10, 1)), tau)
    np.testing.assert_allclose(p.weights, tau.mean(0), rtol=1e-15)
    tau[:, 2] = 0.0
    with pytest.raises(EmptyComponentError, match=r"component 2 has mixing weight 0.000e\+00 < min_weight=1e-08"):
        ConstantGate().m_step(None, np.zeros((10, 1)), tau)


def test_unconstrained_view_and_its_vjp(rng):
    gate = ConstantGate()
    lam = rng.dirichlet(np.ones(4))
    free = gate.unconstrained(ConstantGateParams(lam))
    assert free.weights.shape == (3,)
    np.testing.assert_allclose(gate.constrained(free).weights, lam, rtol=1e-14)
    assert_vjp_correct(
        "ConstantGate.constrained",
        lambda f: gate.constrained(f).weights,
        lambda f, c: (gate.constrained_vjp(f, ConstantGateParams(c)),),
        (free,),
        rng.normal(size=4),
    )
    with pytest.raises(ValueError, match="the unconstrained view needs positive params.weights"):
        gate.unconstrained(ConstantGateParams(np.array([1.0, 0.0])))


# ------------------------------------------------------------------------------------------
# fit_moe(ConstantGate, linear-Gaussian experts) is the mixture of regressions
# (Benaglia et al. 2009, JSS 32(6), Section 5.2: regmixEM on CO2, printed: 10 iterations,
#  lambda 0.754921 0.245079, sigma 2.049315 0.809389, beta1 8.678987 1.415150,
#  beta2 -0.023344 0.676596, loglik -66.93977)
# ------------------------------------------------------------------------------------------


def _co2_moe():
    co2 = load_dataset("co2data")
    x = np.asarray(co2["GNP"], dtype=float)[:, None]
    y = np.asarray(co2["CO2"], dtype=float)[:, None]
    # regmixEM(CO2, GNP, lambda = c(1, 3) / 4, beta = matrix(c(8, -1, 1, 1), 2, 2), sigma = c(2, 1))
    init = MoEParams(
        ConstantGateParams(np.array([0.25, 0.75])),
        LinearGaussianExpertsParams(np.array([[[-1.0]], [[1.0]]]), np.array([[8.0], [1.0]]), np.array([4.0, 1.0])),
    )
    return x, y, init


def test_fit_moe_reproduces_the_regression_mixture_co2_fit():
    x, y, init = _co2_moe()
    fit = fit_moe(x, y, ConstantGate(), LinearGaussianExperts(covariance="isotropic"), init, options=MIXTOOLS)
    co2 = load_dataset("co2data")
    ref = fit_regression_mixture(
        with_intercept(co2["GNP"]),
        co2["CO2"],
        RegressionMixtureParams(np.array([[8.0, 1.0], [-1.0, 1.0]]), np.array([2.0, 1.0]), np.array([0.25, 0.75])),
        options=MIXTOOLS,
    )
    assert fit.n_iter == ref.n_iter == 10 and fit.converged
    np.testing.assert_allclose(fit.loglik_trace, ref.loglik_trace, rtol=1e-13)
    np.testing.assert_allclose(fit.params.gate.weights, ref.params.weights, rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(fit.params.experts.cov), ref.params.sigma, rtol=1e-12)
    np.testing.assert_allclose(fit.params.experts.bias[:, 0], ref.params.beta[0], rtol=1e-12)
    np.testing.assert_allclose(fit.params.experts.weight[:, 0, 0], ref.params.beta[1], rtol=1e-11)
    np.testing.assert_allclose(fit.responsibilities, ref.responsibilities, rtol=1e-11, atol=1e-14)
    assert fit.n_free_parameters == ref.n_free_parameters == 7
    for name in ("loglik", "aic", "bic", "icl", "entropy"):
        assert getattr(fit, name) == pytest.approx(getattr(ref, name), rel=1e-13)
    # and the printed digits of the vignette
    assert abs(fit.loglik - (-66.93977)) < 5e-6
    np.testing.assert_allclose(fit.params.gate.weights, [0.754921, 0.245079], atol=5e-7)
    np.testing.assert_allclose(np.sqrt(fit.params.experts.cov), [2.049315, 0.809389], atol=5e-7)
    assert fit.conditional_loglik == fit.loglik and fit.joint_loglik is None
    assert fit.penalty == 0.0 and fit.restarts[0].loglik == fit.loglik
    assert fit.bic == pytest.approx(-2 * fit.loglik + 7 * math.log(28), rel=1e-14)


def test_co2_fit_is_identical_on_every_backend(backend):
    x, y, init = _co2_moe()
    experts = LinearGaussianExperts(covariance="isotropic")
    ref = fit_moe(x, y, ConstantGate(), experts, init, options=MIXTOOLS)
    got = fit_moe(backend.from_numpy(x), backend.from_numpy(y), ConstantGate(), experts, backend.tree_from_numpy(init), options=MIXTOOLS)
    assert got.n_iter == ref.n_iter
    for a, b in zip(backend.tree_to_numpy(got.params.gate + got.params.experts), ref.params.gate + ref.params.experts):
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.loglik_trace, ref.loglik_trace, rtol=1e-12)


def test_bad_input_names_the_argument():
    gate = ConstantGate()
    x = np.zeros((3, 1))
    with pytest.raises(ValueError, match="params.weights must be non-negative"):
        gate.log_weights(ConstantGateParams(np.array([0.5, -0.5])), x)
    with pytest.raises(ValueError, match="params.weights must have a positive sum"):
        gate.log_weights(ConstantGateParams(np.zeros(2)), x)
    with pytest.raises(TypeError, match="params must be a ConstantGateParams"):
        gate.log_weights((np.ones(2),), x)
    with pytest.raises(ValueError, match=r"params.weights must be 1-dimensional"):
        gate.log_weights(ConstantGateParams(np.ones((2, 1))), x)
    with pytest.raises(ValueError, match=r"cotangent has shape \(3, 3\) but \(3, 2\) was expected"):
        gate.log_weights_vjp(ConstantGateParams(np.ones(2)), x, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"responsibilities has shape \(4, 2\) but \(3, 2\) was expected"):
        gate.m_step(None, x, np.ones((4, 2)) / 2)
    with pytest.raises(ValueError, match="min_weight must be a finite non-negative float"):
        ConstantGate(min_weight=-1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        gate.log_weights(ConstantGateParams(np.ones(2, dtype=np.float32)), x)

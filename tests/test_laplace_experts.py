"""Laplace linear experts (Nguyen & McLachlan 2016): density vs scipy, VJPs, the MM M-step vs an exact
weighted LAD fit (linear programming), robustness to outliers, degeneracies, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, stats

from moeref.datasets import load_dataset
from moeref.em import CollapsedVarianceError, EMOptions, EmptyComponentError, SingularWeightedLeastSquaresError
from moeref.families import ExpertFamily
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.laplace_experts import LinearLaplaceExperts, LinearLaplaceExpertsParams
from moeref.moe_em import MoEParams, fit_moe
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams
from conftest import assert_close
from helpers import assert_vjp_correct


def _problem(rng, N=12, d=2, K=3):
    x = rng.normal(size=(N, d))
    y = rng.laplace(size=N)
    params = LinearLaplaceExpertsParams(rng.normal(size=(K, d)), rng.normal(size=K), rng.uniform(0.5, 2.0, size=K))
    return x, y, params


def test_interface():
    assert isinstance(LinearLaplaceExperts(), ExpertFamily)


def test_log_density_matches_scipy_on_every_backend(backend, rng):
    x, y, params = _problem(rng)
    loc = x @ params.weight.T + params.bias  # (N, K)
    for scale, b in (("std", params.scale / math.sqrt(2.0)), ("b", params.scale)):
        fam = LinearLaplaceExperts(scale=scale)
        got = fam.log_density(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y))
        assert_close(backend.to_numpy(got), stats.laplace.logpdf(y[:, None], loc=loc, scale=b), rtol=1e-13, atol=1e-14)
    # xi is the standard deviation: the variance of Laplace(b) is 2 b^2 = xi^2
    np.testing.assert_allclose(stats.laplace(scale=params.scale / math.sqrt(2.0)).std(), params.scale, rtol=1e-14)
    mean = backend.to_numpy(LinearLaplaceExperts().mean(backend.tree_from_numpy(params), backend.from_numpy(x)))
    assert_close(mean, loc[:, :, None])


@pytest.mark.parametrize("scale", ["std", "b"])
def test_log_density_vjp(rng, scale):
    fam = LinearLaplaceExperts(scale=scale)
    x, y, params = _problem(rng, N=6, d=2, K=2)
    assert_vjp_correct(
        f"laplace_experts[{scale}]",
        fam.log_density,
        lambda p, xx, yy, c: (fam.log_density_vjp(p, xx, yy, c),) + tuple(fam.log_density_input_vjp(p, xx, yy, c)),
        (params, x, y),
        rng.normal(size=(6, 2)),
    )


def test_vjp_on_every_backend(backend, rng):
    fam = LinearLaplaceExperts()
    x, y, params = _problem(rng)
    ct = rng.normal(size=(12, 3))
    ref = fam.log_density_vjp(params, x, y, ct)
    got = fam.log_density_vjp(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(ct))
    for a, b in zip(backend.tree_to_numpy(got), ref):
        assert_close(a, b)


def test_gradient_at_a_zero_residual_is_the_subgradient_midpoint(rng):
    fam = LinearLaplaceExperts()
    x, y, params = _problem(rng, N=4, d=1, K=1)
    y = y.copy()
    y[2] = float(x[2] @ params.weight[0] + params.bias[0])  # residual exactly 0
    g = fam.log_density_vjp(params, x, y, np.eye(4)[:, 2:3])  # cotangent only on sample 2
    np.testing.assert_array_equal(g.weight, 0.0)
    np.testing.assert_array_equal(g.bias, 0.0)
    np.testing.assert_allclose(g.scale, -1.0 / params.scale)


# ------------------------------------------------------------------------------------------
# The MM M-step
# ------------------------------------------------------------------------------------------


def _weighted_lad(x, y, w):
    """Exact weighted least absolute deviations by linear programming: min sum_i w_i (e+_i + e-_i)."""
    N = len(y)
    X = np.column_stack([x, np.ones(N)])
    p = X.shape[1]
    res = optimize.linprog(
        np.concatenate([np.zeros(p), w, w]),
        A_eq=np.hstack([X, np.eye(N), -np.eye(N)]),
        b_eq=y,
        bounds=[(None, None)] * p + [(0, None)] * (2 * N),
        method="highs",
    )
    assert res.status == 0
    return res.x[:p], res.fun


def _weighted_loglik(fam, params, x, y, w):
    return float(np.sum(w * fam.log_density(params, x, y)))


def test_m_step_converges_to_the_weighted_lad_fit(rng):
    N, d, K = 25, 2, 2
    x, y = rng.normal(size=(N, d)), rng.standard_t(2, size=N)
    w = rng.dirichlet(np.ones(K), size=N)
    _, _, p0 = _problem(rng, N, d, K)
    for scale in ("std", "b"):
        fam = LinearLaplaceExperts(scale=scale, mm_steps=3000)
        got = fam.m_step(p0, x, y, w)
        for k in range(K):
            coef, fun = _weighted_lad(x, y, w[:, k])
            np.testing.assert_allclose(np.r_[got.weight[k], got.bias[k]], coef, atol=1e-6)
            c = math.sqrt(2.0) if scale == "std" else 1.0
            np.testing.assert_allclose(got.scale[k], c * fun / w[:, k].sum(), rtol=1e-9)


def test_one_mm_step_is_a_reweighted_least_squares_fit(rng):
    x, y, params = _problem(rng)
    w = rng.dirichlet(np.ones(3), size=12)
    got = LinearLaplaceExperts().m_step(params, x, y, w)
    X = np.column_stack([x, np.ones(12)])
    r0 = y[:, None] - (x @ params.weight.T + params.bias)
    for k in range(3):
        omega = w[:, k] / np.abs(r0[:, k])
        coef = np.linalg.solve((X.T * omega) @ X, (X.T * omega) @ y)
        np.testing.assert_allclose(np.r_[got.weight[k], got.bias[k]], coef, rtol=1e-10)
        r = y - X @ coef
        np.testing.assert_allclose(got.scale[k], math.sqrt(2.0) * np.sum(w[:, k] * np.abs(r)) / w[:, k].sum(), rtol=1e-12)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["std", "b"]))
def test_mm_steps_never_decrease_the_weighted_loglik_property(seed, scale):
    rng = np.random.default_rng(seed)
    x, y, params = _problem(rng, N=15, d=1, K=2)
    w = rng.dirichlet(np.ones(2), size=15)
    fam = LinearLaplaceExperts(scale=scale)
    values = [_weighted_loglik(fam, params, x, y, w)]
    for _ in range(8):
        params = fam.m_step(params, x, y, w)
        values.append(_weighted_loglik(fam, params, x, y, w))
    assert np.all(np.diff(values) >= -1e-9 * (np.abs(values[:-1]) + 1))


def test_m_step_on_every_backend(backend, rng):
    fam = LinearLaplaceExperts(mm_steps=3)
    x, y, params = _problem(rng)
    w = rng.dirichlet(np.ones(3), size=12)
    ref = fam.m_step(params, x, y, w)
    got = fam.m_step(backend.tree_from_numpy(params), backend.from_numpy(x), backend.from_numpy(y), backend.from_numpy(w))
    for a, b in zip(backend.tree_to_numpy(got), ref):
        assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_zero_residuals_are_floored_not_infinite(rng):
    """A LAD fit passes through p points: their IRLS weight is w / (eps * xi), finite."""
    x = np.arange(8.0)[:, None]
    y = 2.0 * x[:, 0] + 1.0
    y[5] += 3.0
    params = LinearLaplaceExpertsParams(np.array([[2.0]]), np.array([1.0]), np.array([1.0]))  # exact on 7 of 8 points
    with np.errstate(all="raise"):
        got = LinearLaplaceExperts(mm_steps=5).m_step(params, x, y, np.ones((8, 1)))
    np.testing.assert_allclose(got.weight, [[2.0]], atol=1e-8)
    np.testing.assert_allclose(got.bias, [1.0], atol=1e-8)
    np.testing.assert_allclose(got.scale, [math.sqrt(2.0) * 3.0 / 8.0], rtol=1e-7)


# ------------------------------------------------------------------------------------------
# Robustness: the tone data with 5 outliers at (0, 4) (Chamroukhi's TMoE demo)
# ------------------------------------------------------------------------------------------


def _fit(experts, init, x, y, max_iter):
    """A mixture of experts with a softmax gate (one input), fitted by moeref.moe_em.fit_moe."""
    gate0 = SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2))
    return fit_moe(x, y, SoftmaxGate(), experts, MoEParams(gate0, init), options=EMOptions(tol=1e-7, max_iter=max_iter, on_decrease="raise"))


def test_laplace_experts_move_less_than_gaussian_ones_under_outliers():
    clean, dirty = load_dataset("tone"), load_dataset("tone_with_outliers_tmoe")
    w0, b0 = np.array([[1.0], [0.0]]), np.array([0.0, 2.0])  # the lines y = x and y = 2
    gauss = LinearGaussianExperts(covariance="isotropic")
    g0 = LinearGaussianExpertsParams(w0[:, :, None], b0[:, None], np.array([0.1, 0.1]))
    ref = _fit(gauss, g0, clean["stretchratio"][:, None], clean["tuned"], 200).params.experts  # clean fit: reference lines
    ref_coef = np.column_stack([ref.weight[:, 0, 0], ref.bias[:, 0]])
    xd, yd = dirty["stretchratio"][:, None], dirty["tuned"]
    g = _fit(gauss, g0, xd, yd, 200).params.experts
    fit = _fit(LinearLaplaceExperts(), LinearLaplaceExpertsParams(w0, b0, np.array([0.3, 0.3])), xd, yd, 400)
    lp = fit.params.experts
    shift_gauss = np.abs(np.column_stack([g.weight[:, 0, 0], g.bias[:, 0]]) - ref_coef).max()
    shift_laplace = np.abs(np.column_stack([lp.weight[:, 0], lp.bias]) - ref_coef).max()
    assert shift_gauss > 0.5  # the outliers tilt the flat Gaussian expert
    assert shift_laplace < 0.1
    assert fit.converged and fit.decreases == () and fit.n_free_parameters == 2 + 2 * 2 + 2


def test_unconstrained_view(rng):
    fam = LinearLaplaceExperts()
    x, y, params = _problem(rng, N=5, d=1, K=2)
    free = fam.unconstrained(params)
    np.testing.assert_allclose(fam.constrained(free).scale, params.scale, rtol=1e-15)
    assert_vjp_correct(
        "laplace_experts_unconstrained",
        lambda u, xx, yy: fam.log_density(fam.constrained(u), xx, yy),
        lambda u, xx, yy, c: (fam.constrained_vjp(u, fam.log_density_vjp(fam.constrained(u), xx, yy, c)), None, None),
        (free, x, y),
        rng.normal(size=(5, 2)),
    )


# ------------------------------------------------------------------------------------------
# Degeneracies and bad input
# ------------------------------------------------------------------------------------------


def test_degeneracies_raise_named_errors():
    x = np.arange(6.0)[:, None]
    y = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 3.0])
    fam = LinearLaplaceExperts()
    p0 = LinearLaplaceExpertsParams(np.zeros((2, 1)), np.zeros(2), np.ones(2))
    with pytest.raises(EmptyComponentError, match="expert 1 has total weight"):
        fam.m_step(p0, x, y, np.column_stack([np.ones(6), np.zeros(6)]))
    with pytest.raises(SingularWeightedLeastSquaresError, match="expert 1: the weighted Gram matrix"):
        fam.m_step(p0, x, y, np.column_stack([np.r_[1.0, 1, 1, 1, 1, 0], np.r_[0.0, 0, 0, 0, 0, 1]]))
    with pytest.raises(CollapsedVarianceError, match="expert 1 has scale .* < min_scale=1e-08"):
        fam.m_step(p0, x, y, np.column_stack([np.r_[1.0, 1, 1, 1, 0, 0], np.r_[0.0, 0, 0, 0, 1, 1]]))


def test_bad_input_names_the_argument(rng):
    x, y, params = _problem(rng)
    fam = LinearLaplaceExperts()
    with pytest.raises(ValueError, match="scale must be one of 'std', 'b'; got 'xi'"):
        LinearLaplaceExperts(scale="xi")
    with pytest.raises(ValueError, match="eps must be a float in"):
        LinearLaplaceExperts(eps=0.0)
    with pytest.raises(ValueError, match="mm_steps must be at least 1"):
        LinearLaplaceExperts(mm_steps=0)
    with pytest.raises(TypeError, match=r"params must be a LinearLaplaceExpertsParams\(weight, bias, scale\)"):
        fam.log_density(tuple(params), x, y)
    with pytest.raises(ValueError, match=r"params.scale has shape \(2,\) but \(3,\) was expected"):
        fam.log_density(params._replace(scale=np.ones(2)), x, y)
    with pytest.raises(ValueError, match="params.scale must be positive"):
        fam.log_density(params._replace(scale=-params.scale), x, y)
    with pytest.raises(ValueError, match=r"y has shape \(12, 2\) but \(12, 1\) was expected"):
        fam.log_density(params, x, np.ones((12, 2)))
    with pytest.raises(ValueError, match=r"weights has shape \(12, 2\) but \(12, 3\) was expected"):
        fam.m_step(params, x, y, np.ones((12, 2)))
    with pytest.raises(ValueError, match="y contains NaN or infinite values"):
        fam.m_step(params, x, np.full(12, np.inf), np.ones((12, 3)))
    assert fam.n_free_parameters(params) == 3 * 3 + 3
    assert LinearLaplaceExperts(bias=False).n_free_parameters(params) == 3 * 2 + 3

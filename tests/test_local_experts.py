"""Adaptive mixtures of local experts: likelihood, posteriors, VJPs, fitting, specialisation, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp as sp_logsumexp
from scipy.stats import norm

from moeref.experts import LinearExpertsParams
from moeref.gates import LinearSoftmaxGateParams, linear_softmax_gate
from moeref.local_experts import (
    LinearLocalExpertsParams,
    LocalExpertsParams,
    fit_local_experts,
    local_experts_log_likelihood,
    local_experts_log_likelihood_vjp,
    local_experts_means,
    local_experts_posteriors,
    local_experts_predict,
    local_experts_predict_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves

VARIANTS = ("constant", "linear")
# One set of sizes for every backend test, so that JAX compiles each operation once.
N, D_IN, N_EXPERTS, D_OUT = 6, 2, 3, 2


def _params(rng, variant, d_in, n, d_out, scale=1.0):
    gate = LinearSoftmaxGateParams(scale * rng.normal(size=(d_in, n)), scale * rng.normal(size=n))
    if variant == "constant":
        return LocalExpertsParams(gate, scale * rng.normal(size=(n, d_out)))
    return LinearLocalExpertsParams(gate, LinearExpertsParams(scale * rng.normal(size=(n, d_in, d_out)), scale * rng.normal(size=(n, d_out))))


def _reference(x, y, p, variance):
    """NumPy / SciPy: gate, means, log N(y | mu_i, variance I), log-likelihood, posteriors."""
    logits = x @ p.gate.weight + p.gate.bias
    log_w = logits - sp_logsumexp(logits, axis=1, keepdims=True)  # (N, n)
    if isinstance(p, LocalExpertsParams):
        mu = np.broadcast_to(p.means[None], (x.shape[0],) + p.means.shape)
    else:
        mu = np.einsum("nd,ide->nie", x, p.experts.weight) + p.experts.bias[None]
    log_pdf = norm.logpdf(y[:, None, :], loc=mu, scale=math.sqrt(variance)).sum(axis=2)  # (N, n)
    joint = log_w + log_pdf
    ll = sp_logsumexp(joint, axis=1)
    return np.exp(log_w), mu, log_pdf, ll, np.exp(joint - ll[:, None])


# ------------------------------------------------------------------------------------------
# Forward values on every backend
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_log_likelihood_and_posteriors_match_scipy_on_every_backend(backend, rng, variant):
    x, y = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT))
    p = _params(rng, variant, D_IN, N_EXPERTS, D_OUT)
    _, mu, _, ll_ref, h_ref = _reference(x, y, p, 0.6)
    bx, by, bp = backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(p)
    ll = backend.to_numpy(local_experts_log_likelihood(bx, by, bp, variance=0.6))
    h = backend.to_numpy(local_experts_posteriors(bx, by, bp, variance=0.6))
    assert ll.shape == (N,) and h.shape == (N, N_EXPERTS)
    assert_close(ll, ll_ref)
    assert_close(h, h_ref)
    assert_close(h.sum(axis=1), np.ones(N))
    assert_close(backend.to_numpy(local_experts_means(bx, bp)), mu)


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_is_gate_weighted_mean_on_every_backend(backend, rng, variant):
    x = rng.normal(size=(N, D_IN))
    p = _params(rng, variant, D_IN, N_EXPERTS, D_OUT)
    w, mu, *_ = _reference(x, np.zeros((N, D_OUT)), p, 1.0)
    out = backend.to_numpy(local_experts_predict(backend.from_numpy(x), backend.tree_from_numpy(p)))
    assert_close(out, np.einsum("ni,nid->nd", w, mu))


def test_log_likelihood_is_minus_eq_1_3_minus_the_gaussian_constant(rng):
    # Jacobs et al. (1991) eq. (1.3): E = -log sum_i p_i exp(-||d - o_i||^2 / 2), unit variance
    x, y = rng.normal(size=(5, 2)), rng.normal(size=(5, 3))
    p = _params(rng, "linear", 2, 3, 3)
    w, mu, *_ = _reference(x, y, p, 1.0)
    E = -np.log(np.sum(w * np.exp(-0.5 * np.sum((y[:, None, :] - mu) ** 2, axis=2)), axis=1))
    assert_close(local_experts_log_likelihood(x, y, p), -E - 1.5 * np.log(2 * np.pi))


def test_far_targets_give_finite_log_likelihood_and_valid_posteriors(rng):
    x = rng.normal(size=(3, 1))
    p = _params(rng, "constant", 1, 2, 1)
    y = np.array([[1e3], [-1e3], [5e2]])
    ll = local_experts_log_likelihood(x, y, p, variance=0.01)
    h = local_experts_posteriors(x, y, p, variance=0.01)
    assert np.all(np.isfinite(ll)) and np.all(np.isfinite(h))
    assert_close(h.sum(axis=1), np.ones(3))
    assert_close(ll, _reference(x, y, p, 0.01)[3])


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_log_likelihood_vjp(rng, variant):
    x, y = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    p = _params(rng, variant, 2, 3, 2)
    assert_vjp_correct(
        f"local_experts_log_likelihood[{variant}]",
        lambda x, y, p: local_experts_log_likelihood(x, y, p, variance=0.7),
        lambda x, y, p, ct: local_experts_log_likelihood_vjp(x, y, p, ct, variance=0.7),
        (x, y, p),
        rng.normal(size=5),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_vjp(rng, variant):
    x = rng.normal(size=(5, 2))
    p = _params(rng, variant, 2, 3, 2)
    assert_vjp_correct(f"local_experts_predict[{variant}]", local_experts_predict, local_experts_predict_vjp, (x, p), rng.normal(size=(5, 2)))


def test_vjp_is_the_papers_competitive_gradient(rng):
    # dE/do_i = -h_i (d - o_i) (eq. 1.5) and d ll / d logits = h - w, written out directly
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    p = _params(rng, "constant", 2, 3, 2)
    c = rng.normal(size=6)
    w, mu, _, _, h = _reference(x, y, p, 0.5)
    g = local_experts_log_likelihood_vjp(x, y, p, c, variance=0.5)
    mu_bar = c[:, None, None] * h[:, :, None] * (y[:, None, :] - mu) / 0.5
    u_bar = c[:, None] * (h - w)
    assert_close(g.params.means, mu_bar.sum(axis=0))
    assert_close(g.params.gate.bias, u_bar.sum(axis=0))
    assert_close(g.params.gate.weight, x.T @ u_bar)
    assert_close(g.x, u_bar @ p.gate.weight.T)
    assert_close(g.y, -mu_bar.sum(axis=1))
    assert type(g.params) is LocalExpertsParams and type(g.params.gate) is LinearSoftmaxGateParams


@pytest.mark.parametrize("variant", VARIANTS)
def test_vjps_agree_across_backends(backend, rng, variant):
    x, y = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT))
    p = _params(rng, variant, D_IN, N_EXPERTS, D_OUT)
    c, cf = rng.normal(size=N), rng.normal(size=(N, D_OUT))

    def run(to, frm):
        g1 = local_experts_log_likelihood_vjp(to(x), to(y), to(p), to(c), variance=1.3)
        g2 = local_experts_predict_vjp(to(x), to(p), to(cf))
        return frm((g1, g2))

    ref = run(lambda a: a, lambda t: t)
    out = run(backend.tree_from_numpy, backend.tree_to_numpy)
    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, b)


# ------------------------------------------------------------------------------------------
# Fitting and specialisation
# ------------------------------------------------------------------------------------------


def _two_region_task(rng, N=100):
    x = rng.uniform(-1.0, 1.0, size=(N, 1))
    left = x[:, 0] < 0
    return x, left


def _owners(h, left):
    own_l, own_r = int(np.argmax(h[left].mean(0))), int(np.argmax(h[~left].mean(0)))
    return own_l, own_r


@pytest.mark.slow
def test_constant_experts_specialise_on_two_regions(rng):
    x, left = _two_region_task(rng)
    y = np.where(left, -2.0, 2.0)[:, None] + 0.1 * rng.normal(size=(100, 1))
    p0 = _params(rng, "constant", 1, 2, 1, scale=0.1)
    h0 = local_experts_posteriors(x, y, p0)
    fit = fit_local_experts(x, y, p0, learning_rate=1.0, steps=300)
    h = local_experts_posteriors(x, y, fit.params)
    w = linear_softmax_gate(x, fit.params.gate)
    own_l, own_r = _owners(h, left)
    assert own_l != own_r
    assert (h0 > 0.9).mean() < 0.5  # nobody owned anything at the start
    assert (h[left, own_l] > 0.9).mean() > 0.9 and (h[~left, own_r] > 0.9).mean() > 0.9
    assert (w[left, own_l] > 0.5).mean() > 0.9 and (w[~left, own_r] > 0.5).mean() > 0.9
    far = np.abs(x[:, 0]) > 0.5
    assert np.all(w[left & far, own_l] > 0.9) and np.all(w[~left & far, own_r] > 0.9)
    assert_close(fit.params.means[[own_l, own_r], 0], [-2.0, 2.0], rtol=0.05, atol=0.05)
    assert fit.log_likelihood[-1] > fit.log_likelihood[0] + 1.0


@pytest.mark.slow
def test_linear_experts_specialise_on_two_linear_maps(rng):
    # y = 2 + x on x < 0 and y = -2 + 2x on x > 0: each linear expert should learn one map
    x, left = _two_region_task(rng)
    y = np.where(left, 2.0 + x[:, 0], -2.0 + 2.0 * x[:, 0])[:, None] + 0.1 * rng.normal(size=(100, 1))
    p0 = _params(rng, "linear", 1, 2, 1, scale=0.1)
    fit = fit_local_experts(x, y, p0, learning_rate=0.5, steps=300, variance=0.25)
    h = local_experts_posteriors(x, y, fit.params, variance=0.25)
    w = linear_softmax_gate(x, fit.params.gate)
    own_l, own_r = _owners(h, left)
    assert own_l != own_r
    assert (h[left, own_l] > 0.9).mean() > 0.9 and (h[~left, own_r] > 0.9).mean() > 0.9
    assert (w[left, own_l] > 0.5).mean() > 0.9 and (w[~left, own_r] > 0.5).mean() > 0.9
    A, c = fit.params.experts.weight[:, 0, 0], fit.params.experts.bias[:, 0]
    assert_close([A[own_l], c[own_l], A[own_r], c[own_r]], [1.0, 2.0, 2.0, -2.0], rtol=0, atol=0.15)


def test_fit_agrees_across_backends_and_trace_is_consistent(backend, rng):
    # the linear variant only: the constant one runs the same loop over functions whose
    # backend agreement is checked above, and JAX compiles every new operation eagerly
    x, y = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT))
    p0 = _params(rng, "linear", D_IN, N_EXPERTS, D_OUT, scale=0.3)
    ref = fit_local_experts(x, y, p0, learning_rate=0.3, steps=2, variance=0.8)
    out = fit_local_experts(
        backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(p0), learning_rate=0.3, steps=2, variance=0.8
    )
    out = backend.tree_to_numpy(out)
    assert out.log_likelihood.shape == (3,)
    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, b)
    assert_close(ref.log_likelihood[0], local_experts_log_likelihood(x, y, p0, variance=0.8).mean())
    assert_close(ref.log_likelihood[-1], local_experts_log_likelihood(x, y, ref.params, variance=0.8).mean())
    assert type(ref.params) is type(p0)


def test_constant_means_fit_trace_is_consistent(rng):
    x, y = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT))
    p0 = _params(rng, "constant", D_IN, N_EXPERTS, D_OUT, scale=0.3)
    fit = fit_local_experts(x, y, p0, learning_rate=0.3, steps=3, variance=0.8)
    assert type(fit.params) is LocalExpertsParams and fit.log_likelihood.shape == (4,)
    assert_close(fit.log_likelihood[-1], local_experts_log_likelihood(x, y, fit.params, variance=0.8).mean())
    assert np.all(np.diff(fit.log_likelihood) > 0)


def test_fit_with_zero_steps_returns_the_start(rng):
    x, y = rng.normal(size=(4, 1)), rng.normal(size=(4, 1))
    p0 = _params(rng, "constant", 1, 2, 1)
    fit = fit_local_experts(x, y, p0, learning_rate=0.1, steps=0)
    assert fit.log_likelihood.shape == (1,)
    for a, b in zip(leaves(fit.params), leaves(p0)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.data())
def test_posteriors_are_probability_vectors_property(N, n, d, data):
    x = data.draw(hnp.arrays(np.float64, (N, 1), elements=st.floats(-30, 30)))
    y = data.draw(hnp.arrays(np.float64, (N, d), elements=st.floats(-1e3, 1e3)))
    means = data.draw(hnp.arrays(np.float64, (n, d), elements=st.floats(-1e3, 1e3)))
    gw = data.draw(hnp.arrays(np.float64, (1, n), elements=st.floats(-30, 30)))
    p = LocalExpertsParams(LinearSoftmaxGateParams(gw, np.zeros(n)), means)
    h = local_experts_posteriors(x, y, p, variance=0.5)
    assert np.all(h >= 0) and np.all(np.isfinite(h))
    np.testing.assert_allclose(h.sum(axis=1), 1.0, rtol=1e-12)


@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_log_likelihood_lies_between_the_experts_log_densities_property(N, n, data):
    x = data.draw(hnp.arrays(np.float64, (N, 2), elements=st.floats(-5, 5)))
    y = data.draw(hnp.arrays(np.float64, (N, 2), elements=st.floats(-20, 20)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    p = _params(rng, "linear", 2, n, 2)
    *_, log_pdf, ll, _ = _reference(x, y, p, 1.0)
    ours = local_experts_log_likelihood(x, y, p)
    tol = 1e-9 * (1 + np.abs(ours))
    assert np.all(ours <= log_pdf.max(axis=1) + tol) and np.all(ours >= log_pdf.min(axis=1) - tol)


@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_permuting_experts_with_their_gate_columns_changes_nothing_property(N, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    perm = np.asarray(data.draw(st.permutations(range(n))))
    x, y = rng.normal(size=(N, 2)), rng.normal(size=(N, 1))
    p = _params(rng, "linear", 2, n, 1)
    q = LinearLocalExpertsParams(
        LinearSoftmaxGateParams(p.gate.weight[:, perm], p.gate.bias[perm]),
        LinearExpertsParams(p.experts.weight[perm], p.experts.bias[perm]),
    )
    np.testing.assert_allclose(local_experts_log_likelihood(x, y, q), local_experts_log_likelihood(x, y, p), rtol=1e-12)
    np.testing.assert_allclose(local_experts_posteriors(x, y, q), local_experts_posteriors(x, y, p)[:, perm], atol=1e-14)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 1))
    p = _params(rng, "constant", 2, 3, 1)
    lp = _params(rng, "linear", 2, 3, 1)
    with pytest.raises(ValueError, match=r"params.means has shape \(2, 1\) but \(3, \*\) was expected \(the gate has n=3 outputs, one per expert\)"):
        local_experts_log_likelihood(x, y, p._replace(means=p.means[:2]))
    with pytest.raises(ValueError, match=r"params.experts.weight has shape \(2, 2, 1\) but \(3, 2, \*\) was expected"):
        local_experts_log_likelihood(x, y, lp._replace(experts=LinearExpertsParams(lp.experts.weight[:2], lp.experts.bias[:2])))
    with pytest.raises(ValueError, match=r"params.gate.weight has shape \(2, 3\) but \(3, \*\) was expected"):
        local_experts_log_likelihood(rng.normal(size=(4, 3)), y, p)
    with pytest.raises(ValueError, match=r"y has shape \(3, 1\) but \(4, 1\) was expected"):
        local_experts_log_likelihood(x, y[:3], p)
    with pytest.raises(ValueError, match="y must be 2-dimensional"):
        local_experts_posteriors(x, y[:, 0], p)
    with pytest.raises(TypeError, match="y must have a real floating-point dtype"):
        local_experts_log_likelihood(x, y.astype(np.int64), p)
    with pytest.raises(TypeError, match="share one dtype"):
        local_experts_log_likelihood(x.astype(np.float32), y, p)
    with pytest.raises(ValueError, match="y contains NaN or infinite values"):
        local_experts_log_likelihood(x, np.full((4, 1), np.inf), p)
    with pytest.raises(ValueError, match="params.means contains NaN"):
        local_experts_predict(x, p._replace(means=np.full((3, 1), np.nan)))
    with pytest.raises(ValueError, match="variance must be a finite positive number"):
        local_experts_log_likelihood(x, y, p, variance=0.0)
    with pytest.raises(TypeError, match="variance must be a Python float"):
        local_experts_log_likelihood(x, y, p, variance=np.ones(1))
    with pytest.raises(TypeError, match="params must be a LocalExpertsParams"):
        local_experts_log_likelihood(x, y, (p.gate, p.means))
    with pytest.raises(ValueError, match=r"cotangent has shape \(3,\) but \(4,\) was expected"):
        local_experts_log_likelihood_vjp(x, y, p, np.ones(3))
    with pytest.raises(ValueError, match="learning_rate must be a finite positive number"):
        fit_local_experts(x, y, p, learning_rate=-1.0, steps=3)
    with pytest.raises(ValueError, match="steps must be at least 0"):
        fit_local_experts(x, y, p, learning_rate=0.1, steps=-1)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        local_experts_log_likelihood(x, torch.from_numpy(y), p)


def test_float32_inputs_stay_float32(backend, rng):
    p = backend.tree_from_numpy(_params(rng, "linear", D_IN, N_EXPERTS, D_OUT), np.float32)
    x = backend.from_numpy(rng.normal(size=(N, D_IN)), np.float32)
    y = backend.from_numpy(rng.normal(size=(N, D_OUT)), np.float32)
    assert backend.to_numpy(local_experts_log_likelihood(x, y, p)).dtype == np.float32
    assert backend.to_numpy(local_experts_posteriors(x, y, p)).dtype == np.float32


def test_float32_gradients_stay_float32(rng):
    p = _params(rng, "linear", D_IN, N_EXPERTS, D_OUT)
    p = LinearLocalExpertsParams(*(type(r)(*(a.astype(np.float32) for a in r)) for r in p))
    x, y = rng.normal(size=(N, D_IN)).astype(np.float32), rng.normal(size=(N, D_OUT)).astype(np.float32)
    g = local_experts_log_likelihood_vjp(x, y, p, np.ones(N, dtype=np.float32))
    assert all(a.dtype == np.float32 for a in leaves(g))
    fit = fit_local_experts(x, y, p, learning_rate=0.1, steps=2)
    assert all(a.dtype == np.float32 for a in leaves(fit))


@pytest.mark.parametrize("variant", VARIANTS)
def test_minus_inf_gate_bias_switches_an_expert_off_as_in_the_gates(variant, rng):
    """A -inf gate bias is accepted here as by moeref.gates: that expert gets weight 0 and no posterior."""
    x, y = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT))
    p = _params(rng, variant, D_IN, N_EXPERTS, D_OUT)
    off = p._replace(gate=p.gate._replace(bias=np.array([0.0, -np.inf, 0.5])))
    np.testing.assert_allclose(linear_softmax_gate(x, off.gate)[:, 1], 0.0)
    assert np.all(np.isfinite(local_experts_log_likelihood(x, y, off)))
    np.testing.assert_allclose(local_experts_posteriors(x, y, off)[:, 1], 0.0)
    with pytest.raises(ValueError, match="params.gate.bias contains NaN or infinite values"):
        local_experts_log_likelihood(x, y, p._replace(gate=p.gate._replace(bias=np.array([0.0, np.inf, 0.5]))))


def test_bad_input_names_y_and_the_start():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT))
    p = _params(rng, "constant", D_IN, N_EXPERTS, D_OUT)
    with pytest.raises(TypeError, match="y must be an array, got None"):
        local_experts_log_likelihood(x, None, p)
    with pytest.raises(TypeError, match="init_params must be a LocalExpertsParams or LinearLocalExpertsParams, got NoneType"):
        fit_local_experts(x, y, None, learning_rate=0.1, steps=1)
    with pytest.raises(ValueError, match="params.means contains NaN"):
        local_experts_means(x, p._replace(means=np.full((N_EXPERTS, D_OUT), np.nan)))
    with pytest.raises(ValueError, match="cotangent contains NaN"):
        local_experts_predict_vjp(x, p, np.full((N, D_OUT), np.nan))

"""REINFORCE routing: inverse-CDF sampling, unbiasedness by exact enumeration, Monte Carlo, VJPs, backends, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.reinforce import (
    expected_reward,
    expected_reward_vjp,
    policy_logits,
    reinforce_gradient,
    reinforce_logits_gradient,
    sample_policy,
)
from moeref.router import RouterParams
from conftest import assert_close
from helpers import assert_vjp_correct, leaves


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def exact_gradient_joint(logits, reward):
    """d/dz E[R(a_1..a_T)] for independent a_t ~ softmax(z_t), by enumerating every joint action.

    dE/dz_t = sum_a R(a) prod_{s != t} pi_s(a_s) dpi_t(a_t)/dz_t, with dpi(a)/dz = pi(a)(e_a - pi).
    """
    pi = np_softmax(logits)
    T, E = pi.shape
    grad = np.zeros_like(logits)
    for a in itertools.product(range(E), repeat=T):
        p = np.prod([pi[t, a[t]] for t in range(T)])
        for t in range(T):
            grad[t] += reward(a) * p * (np.eye(E)[a[t]] - pi[t])
    return grad


def expectation_of_estimator(logits, reward, baseline):
    """sum_a P(a) * reinforce_logits_gradient(a): the estimator's exact mean over all joint actions."""
    pi = np_softmax(logits)
    T, E = pi.shape
    mean = np.zeros_like(logits)
    for a in itertools.product(range(E), repeat=T):
        p = np.prod([pi[t, a[t]] for t in range(T)])
        mean += p * reinforce_logits_gradient(logits, np.array(a), np.array(reward(a)), baseline)
    return mean


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_inverse_cdf_sampling_on_a_stratified_grid_hits_every_probability():
    # N draws u_i = (i + 1/2)/N: expert e is drawn exactly for u in [F_{e-1}, F_e), i.e. pi_e N +- 1 times
    pi = np.array([[0.1, 0.0, 0.35, 0.55], [0.25, 0.25, 0.25, 0.25]])
    N = 1000
    u = (np.arange(N) + 0.5) / N
    for t in range(2):
        with np.errstate(divide="ignore"):
            logits = np.log(np.repeat(pi[t : t + 1], N, axis=0))  # log 0 = -inf switches expert 1 off
        s = sample_policy(logits, u)
        counts = np.bincount(s.action, minlength=4)
        assert np.all(np.abs(counts - pi[t] * N) <= 1), counts
        assert counts[1] == 0 or pi[t, 1] > 0
        assert_close(s.log_prob, np.log(pi[t][s.action]))
        assert np.array_equal(s.routes.expert_index[:, 0], s.action) and np.all(s.routes.weight == 1)


def test_boundary_draws_go_to_the_next_expert_and_last_draw_stays_in_range():
    with np.errstate(divide="ignore"):
        logits = np.log(np.array([[0.5, 0.5, 0.0]]))
    actions = [int(sample_policy(logits, np.array([u])).action[0]) for u in (0.0, 0.5, np.nextafter(1.0, 0.0))]
    assert actions == [0, 1, 1]  # u = F_0 goes to expert 1; expert 2 has probability 0


def test_sampled_routes_feed_the_dispatch(rng):
    from moeref.dispatch import dispatch_combine
    from moeref.expert_ffn import RELU_FFN
    from test_expert_ffn import make_params, np_ffn

    x, logits = rng.normal(size=(7, 3)), rng.normal(size=(7, 4))
    s = sample_policy(logits, rng.random(7))
    p = make_params(rng, 4, 3, 2, RELU_FFN)
    y = dispatch_combine(x, s.routes, p, RELU_FFN)
    assert_close(y, np.concatenate([np_ffn(x[t : t + 1], p, s.action[t], RELU_FFN) for t in range(7)]), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Unbiasedness: exact enumeration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", [None, np.array(0.7), np.array([-1.0, 2.0, 0.3])], ids=["none", "scalar", "per_token"])
def test_estimator_expectation_equals_exact_gradient_for_a_joint_reward(baseline, rng):
    T, E = 3, 3
    logits = rng.normal(size=(T, E))
    table = rng.normal(size=(E,) * T)  # R(a_1, a_2, a_3): shared by all tokens, depends on every route

    def reward(a):
        return table[a]

    assert_close(expectation_of_estimator(logits, reward, baseline), exact_gradient_joint(logits, reward), rtol=1e-12, atol=1e-14)


def test_estimator_expectation_equals_expected_reward_vjp_for_per_token_rewards(rng):
    T, E = 2, 4
    logits, table = rng.normal(size=(T, E)), rng.normal(size=(T, E))

    def reward(a):  # one reward per token, R_t(a_t)
        return table[np.arange(T), list(a)]

    exact = expected_reward_vjp(logits, table, 1.0).logits
    assert_close(expectation_of_estimator(logits, reward, np.array([0.3, -0.2])), exact, rtol=1e-12, atol=1e-14)
    assert_close(exact, exact_gradient_joint(logits, lambda a: reward(a).sum()), rtol=1e-12, atol=1e-14)


def test_router_weight_estimate_is_x_transpose_times_logit_estimate_in_expectation(rng):
    T, d, E = 2, 3, 3
    x = rng.normal(size=(T, d))
    params = RouterParams(weight=rng.normal(size=(d, E)), bias=rng.normal(size=E))
    z = policy_logits(x, params)
    table = rng.normal(size=(T, E))
    pi = np_softmax(z)
    mean_W, mean_b = np.zeros((d, E)), np.zeros(E)
    for a in itertools.product(range(E), repeat=T):
        p = np.prod([pi[t, a[t]] for t in range(T)])
        g = reinforce_gradient(x, params, np.array(a), table[np.arange(T), list(a)])
        mean_W, mean_b = mean_W + p * g.params.weight, mean_b + p * g.params.bias
    exact_z = expected_reward_vjp(z, table, 1.0).logits
    assert_close(mean_W, x.T @ exact_z, rtol=1e-12, atol=1e-14)
    assert_close(mean_b, exact_z.sum(0), rtol=1e-12, atol=1e-14)


@given(st.integers(1, 3), st.integers(2, 3), st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_estimator_is_unbiased_for_any_baseline_property(T, E, b, seed):
    rng = np.random.default_rng(seed)
    logits, table = 2.0 * rng.normal(size=(T, E)), rng.normal(size=(E,) * T)

    def reward(a):
        return table[a]

    assert_close(expectation_of_estimator(logits, reward, np.array(b)), exact_gradient_joint(logits, reward), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Monte Carlo with explicit draws
# --------------------------------------------------------------------------------------------


def test_monte_carlo_mean_converges_and_a_baseline_lowers_the_variance(rng):
    """N = 20000 draws per token: every entry of the mean estimate lies within 5 standard errors
    (estimated from the same draws) of the exact gradient; the baseline b = E[R_t] cuts the variance."""
    T, E, N = 3, 4, 20_000
    logits, table = rng.normal(size=(T, E)), 1.0 + rng.normal(size=(T, E))
    exact = expected_reward_vjp(logits, table, 1.0).logits
    batch = np.tile(logits, (N, 1))  # (N*T, E): N independent draws for each token
    s = sample_policy(batch, rng.random(N * T))
    reward = np.tile(table, (N, 1))[np.arange(N * T), s.action]  # (N*T,)
    variances = []
    for baseline in (None, np.tile((np_softmax(logits) * table).sum(1), N)):
        g = reinforce_logits_gradient(batch, s.action, reward, baseline).reshape(N, T, E)
        mean, se = g.mean(0), g.std(0) / np.sqrt(N)
        assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12), np.max(np.abs(mean - exact) / se)
        variances.append(g.var(0).sum())
    assert variances[1] < variances[0]


# --------------------------------------------------------------------------------------------
# VJPs
# --------------------------------------------------------------------------------------------


def test_expected_reward_vjp(rng):
    logits, table = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    assert_vjp_correct("expected_reward", expected_reward, expected_reward_vjp, (logits, table), np.array(1.3))


def test_reinforce_gradient_is_advantage_times_log_prob_gradient(rng):
    # the score function e_a - pi is the VJP of log pi(a) (compared with torch.autograd)
    torch = pytest.importorskip("torch")
    x, params = rng.normal(size=(4, 3)), RouterParams(rng.normal(size=(3, 5)), rng.normal(size=5))
    a, R, b = rng.integers(0, 5, size=4), rng.normal(size=4), np.array(0.25)
    xt, W, bias = (torch.tensor(v, requires_grad=True) for v in (x, params.weight, params.bias))
    logp = torch.log_softmax(xt @ W + bias, dim=1)[torch.arange(4), torch.tensor(a)]
    (logp * torch.tensor(R - 0.25)).sum().backward()
    g = reinforce_gradient(x, params, a, R, b)
    for got, want in ((g.x, xt.grad), (g.params.weight, W.grad), (g.params.bias, bias.grad)):
        assert_close(got, want.numpy(), rtol=1e-12, atol=1e-14)
    assert g.params.noise_weight is None and np.allclose(g.logits.sum(1), 0)


# --------------------------------------------------------------------------------------------
# Every backend
# --------------------------------------------------------------------------------------------


def test_reinforce_agrees_across_backends(backend, rng):
    x, params = rng.normal(size=(5, 3)), RouterParams(rng.normal(size=(3, 4)), rng.normal(size=4))
    u, R, table, b = rng.random(5), rng.normal(size=5), rng.normal(size=(5, 4)), np.array(0.3)

    def run(x, params, u, R, table, b):
        z = policy_logits(x, params)
        s = sample_policy(z, u)
        return (s, reinforce_gradient(x, params, s.action, R, b), expected_reward(z, table), expected_reward_vjp(z, table, b))

    want = run(x, params, u, R, table, b)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(params), t(u), t(R), t(table), t(b)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input(rng):
    logits = rng.normal(size=(3, 4))
    with pytest.raises(ValueError, match=r"uniform must lie in \[0, 1\); found values in \[0.2, 1.0\]"):
        sample_policy(logits, np.array([0.2, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"uniform must lie in \[0, 1\); found values in \[-0.1, 0.5\]"):
        sample_policy(logits, np.array([-0.1, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"uniform has shape \(2,\) but \(3,\) was expected \(one draw per token"):
        sample_policy(logits, np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="logits has a row of all -inf"):
        sample_policy(np.full((3, 4), -np.inf), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"action has values up to 4 .*entries must lie in \[0, 4\)"):
        reinforce_logits_gradient(logits, np.array([0, 4, 1]), np.array(1.0))
    with pytest.raises(TypeError, match="action must have an integer dtype"):
        reinforce_logits_gradient(logits, np.array([0.0, 1.0, 1.0]), np.array(1.0))
    with pytest.raises(ValueError, match=r"reward has shape \(4,\) but \(3,\) was expected \(a scalar \(\) or one value per token"):
        reinforce_logits_gradient(logits, np.array([0, 1, 1]), np.ones(4))
    with pytest.raises(ValueError, match="baseline contains NaN"):
        reinforce_logits_gradient(logits, np.array([0, 1, 1]), np.array(1.0), np.array(np.nan))
    with pytest.raises(ValueError, match=r"rewards has shape \(3, 3\) but \(3, 4\) was expected"):
        expected_reward(logits, np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"params.weight has shape \(2, 4\) but \(3, \*\) was expected \(x has d=3 features\)"):
        policy_logits(rng.normal(size=(3, 3)), RouterParams(rng.normal(size=(2, 4))))
    with pytest.raises(ValueError, match="params.noise_weight and params.selection_bias are not used"):
        policy_logits(rng.normal(size=(3, 2)), RouterParams(rng.normal(size=(2, 4)), noise_weight=rng.normal(size=(2, 4))))


def test_reward_cotangent_and_action_are_checked():
    logits = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    with pytest.raises(TypeError, match="reward must be an array, got None"):
        reinforce_logits_gradient(logits, np.array([0, 1]), None)
    with pytest.raises(ValueError, match=r"action has values up to 2 but logits has E=2 experts"):
        reinforce_logits_gradient(logits, np.array([0, 2]), np.ones(2))
    with pytest.raises(ValueError, match="cotangent contains NaN"):
        expected_reward_vjp(logits, np.ones((2, 2)), np.array(np.nan))
    with pytest.raises(ValueError, match=r"cotangent has shape \(1,\) but \(\) was expected"):
        expected_reward_vjp(logits, np.ones((2, 2)), np.ones(1))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries.*action"):
        reinforce_logits_gradient(logits, torch.tensor([0, 1]), np.ones(2))

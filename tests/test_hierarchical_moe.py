"""Hierarchical mixture of experts (Jordan & Jacobs 1994): forward, VJPs, posteriors, properties, bad input.

The oracle for the forward quantities is a brute-force NumPy computation that walks every root-to-leaf
path explicitly (product of the gates along it), independent of moeref's log-space level recursion.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given
from hypothesis import strategies as st

from moeref.experts import LinearExpertsParams
from moeref.hierarchical_moe import (
    HMEGrads,
    HMELogLikelihoodGrads,
    HMEParams,
    HMEPosteriors,
    HMEPriors,
    hme,
    hme_branching,
    hme_log_likelihood,
    hme_log_likelihood_vjp,
    hme_posteriors,
    hme_priors,
    hme_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves


# --------------------------------------------------------------------------------------------
# Helpers: random trees and a brute-force NumPy reference
# --------------------------------------------------------------------------------------------


def _make(rng, branching, d_in=3, d_out=2, N=4, scale=1.0):
    weights, biases = [], []
    nodes = 1
    for b in branching:
        weights.append(scale * rng.normal(size=(nodes, d_in, b)))
        biases.append(scale * rng.normal(size=(nodes, b)))
        nodes *= b
    experts = LinearExpertsParams(rng.normal(size=(nodes, d_in, d_out)), rng.normal(size=(nodes, d_out)))
    x = rng.normal(size=(N, d_in))
    y = rng.normal(size=(N, d_out))
    return x, y, HMEParams(tuple(weights), tuple(biases), experts)


def _reference(x, y, params, variance=1.0):
    """Everything by explicit enumeration of the root-to-leaf paths, in probability space."""
    branching = tuple(w.shape[2] for w in params.gate_weights)
    N = x.shape[0]
    gates = [
        sp.softmax(np.einsum("nd,mdb->nmb", x, W) + b[None], axis=-1)  # (N, M_l, b_l)
        for W, b in zip(params.gate_weights, params.gate_biases)
    ]
    L = math.prod(branching)
    prior = np.ones((N, L))
    for p, digits in enumerate(itertools.product(*(range(b) for b in branching))):
        m = 0
        for l, c in enumerate(digits):
            prior[:, p] *= gates[l][:, m, c]
            m = m * branching[l] + c
        assert m == p  # row-major leaf numbering
    mu = np.einsum("nd,pdo->npo", x, params.experts.weight) + params.experts.bias[None]
    d_out = y.shape[1]
    dens = (2 * np.pi * variance) ** (-d_out / 2) * np.exp(-0.5 * ((y[:, None, :] - mu) ** 2).sum(-1) / variance)
    joint = prior * dens
    lik = joint.sum(1)
    h = joint / lik[:, None]
    node_counts = [math.prod(branching[:l]) for l in range(len(branching) + 1)]
    node_sum = lambda a, M: a.reshape(N, M, -1).sum(-1)  # noqa: E731  (sum over the leaves under each node)
    node_prior = [node_sum(prior, M) for M in node_counts]
    node_post = [node_sum(h, M) for M in node_counts]
    node_lik = [node_sum(joint, M) / node_sum(prior, M) for M in node_counts]  # lambda_m
    cond = [node_post[l + 1].reshape(N, node_counts[l], -1) / node_post[l][:, :, None] for l in range(len(branching))]
    return dict(
        gates=gates, prior=prior, mu=mu, mean=np.einsum("np,npo->no", prior, mu), ll=np.log(lik), h=h,
        node_prior=node_prior, node_post=node_post, node_lik=node_lik, cond=cond,
    )


def _jordan_jacobs_grads(x, y, params, cotangent, variance=1.0):
    """The log-likelihood gradients in the form of Jordan & Jacobs eqs. (2.14)-(2.16), from brute-force posteriors."""
    ref = _reference(x, y, params, variance)
    h, mu = ref["h"], ref["mu"]
    mu_bar = cotangent[:, None, None] * h[:, :, None] * (y[:, None, :] - mu) / variance  # (N, L, d_out)
    w_bars, b_bars = [], []
    x_bar = np.einsum("npo,pdo->nd", mu_bar, params.experts.weight)
    for l, (W, g) in enumerate(zip(params.gate_weights, ref["gates"])):
        M, _, b = W.shape
        h_child = ref["node_post"][l + 1].reshape(-1, M, b)
        u_bar = cotangent[:, None, None] * (h_child - g * ref["node_post"][l][:, :, None])  # h_i (h_{j|i} - g_{j|i})
        w_bars.append(np.einsum("nd,nmb->mdb", x, u_bar))
        b_bars.append(u_bar.sum(0))
        x_bar = x_bar + np.einsum("nmb,mdb->nd", u_bar, W)
    experts = LinearExpertsParams(np.einsum("npo,nd->pdo", mu_bar, x), mu_bar.sum(0))
    return HMELogLikelihoodGrads(x=x_bar, y=-mu_bar.sum(1), params=HMEParams(tuple(w_bars), tuple(b_bars), experts))


def _assert_trees_close(actual, expected, **kw):
    a, e = leaves(actual), leaves(expected)
    assert len(a) == len(e)
    for u, v in zip(a, e):
        assert_close(u, v, **kw)


# --------------------------------------------------------------------------------------------
# Forward against the brute-force reference, on every backend
# --------------------------------------------------------------------------------------------


def test_hme_matches_path_enumeration_on_every_backend(backend, rng):
    x, y, p = _make(rng, (2, 3))
    ref = _reference(x, y, p, variance=0.7)
    xb, yb, pb = backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(p)
    assert_close(backend.to_numpy(hme(xb, pb)), ref["mean"])
    assert_close(backend.to_numpy(hme_log_likelihood(xb, yb, pb, variance=0.7)), ref["ll"])

    pri = backend.tree_to_numpy(hme_priors(xb, pb))
    assert isinstance(pri, HMEPriors)
    assert_close(pri.paths, ref["prior"])
    _assert_trees_close(pri.gates, tuple(ref["gates"]))
    _assert_trees_close(pri.nodes, tuple(ref["node_prior"]))

    post = backend.tree_to_numpy(hme_posteriors(xb, yb, pb, variance=0.7))
    assert isinstance(post, HMEPosteriors)
    assert_close(post.log_likelihood, ref["ll"])
    assert_close(post.paths, ref["h"])
    _assert_trees_close(post.nodes, tuple(ref["node_post"]))
    _assert_trees_close(post.conditionals, tuple(ref["cond"]))
    _assert_trees_close(post.log_node_likelihoods, tuple(np.log(l) for l in ref["node_lik"]))


def test_gradients_agree_across_backends(backend, rng):
    x, y, p = _make(rng, (2, 3))
    ct_mean, ct_ll = rng.normal(size=(4, 2)), rng.normal(size=4)
    expected_mean = hme_vjp(x, p, ct_mean)
    expected_ll = hme_log_likelihood_vjp(x, y, p, ct_ll, variance=1.3)
    xb, yb, pb = backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(p)
    g_mean = backend.tree_to_numpy(hme_vjp(xb, pb, backend.from_numpy(ct_mean)))
    g_ll = backend.tree_to_numpy(hme_log_likelihood_vjp(xb, yb, pb, backend.from_numpy(ct_ll), variance=1.3))
    assert isinstance(g_mean, HMEGrads) and isinstance(g_ll, HMELogLikelihoodGrads)
    _assert_trees_close(g_mean, expected_mean)
    _assert_trees_close(g_ll, expected_ll)


def test_float32_inputs_stay_float32(backend, rng):
    x, y, p = _make(rng, (3,))  # one level: a float32 run recompiles every JAX op, keep it small
    xb, yb, pb = backend.from_numpy(x, np.float32), backend.from_numpy(y, np.float32), backend.tree_from_numpy(p, np.float32)
    ll = backend.to_numpy(hme_log_likelihood(xb, yb, pb))
    assert ll.dtype == np.float32
    np.testing.assert_allclose(ll, _reference(x, y, p)["ll"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# VJPs: finite differences, torch.autograd and jax.vjp through moeref's forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branching", [(2, 3), (2, 3, 2)], ids=["depth2-(2,3)", "depth3-(2,3,2)"])
def test_hme_vjp(rng, branching):
    x, _, p = _make(rng, branching, N=4)
    assert_vjp_correct(f"hme {branching}", hme, hme_vjp, (x, p), rng.normal(size=(4, 2)))


@pytest.mark.parametrize(
    "branching, variance", [((2, 3), 1.0), ((2, 3, 2), 0.35)], ids=["depth2-(2,3)", "depth3-(2,3,2)-variance0.35"]
)
def test_hme_log_likelihood_vjp(rng, branching, variance):
    x, y, p = _make(rng, branching, N=4)
    assert_vjp_correct(
        f"hme_log_likelihood {branching}",
        lambda *a: hme_log_likelihood(*a, variance=variance),
        lambda *a: hme_log_likelihood_vjp(*a, variance=variance),
        (x, y, p),
        rng.normal(size=4),
    )


def test_log_likelihood_vjp_is_jordan_jacobs_gradient(rng):
    """eqs. (2.14)-(2.16): experts h_ij (y - mu_ij) x / sigma^2, gates h_i (h_{j|i} - g_{j|i}) x, at any depth."""
    for branching in [(2, 3), (3, 1, 2)]:
        x, y, p = _make(rng, branching, N=6)
        ct = rng.normal(size=6)
        _assert_trees_close(
            hme_log_likelihood_vjp(x, y, p, ct, variance=0.8), _jordan_jacobs_grads(x, y, p, ct, variance=0.8), rtol=1e-10
        )


# --------------------------------------------------------------------------------------------
# Posteriors: normalisation, upward / downward consistency
# --------------------------------------------------------------------------------------------


def test_posteriors_sum_to_one_at_every_level_and_per_node(rng):
    x, y, p = _make(rng, (3, 2, 2), N=7, scale=2.0)
    post = hme_posteriors(x, y, p, variance=0.5)
    assert len(post.nodes) == 4 and len(post.conditionals) == 3 and len(post.log_node_likelihoods) == 4
    for level in post.nodes:
        np.testing.assert_allclose(level.sum(axis=1), 1.0, rtol=1e-12)
    for cond in post.conditionals:
        np.testing.assert_allclose(cond.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(post.nodes[0], 1.0)
    np.testing.assert_array_equal(post.nodes[-1], post.paths)
    # downward pass: h_{mc} = h_m h_{c|m}, and every node posterior is the sum of the path posteriors below it
    for l, cond in enumerate(post.conditionals):
        np.testing.assert_allclose((post.nodes[l][:, :, None] * cond).reshape(7, -1), post.nodes[l + 1], rtol=1e-12)
        M = post.nodes[l].shape[1]
        np.testing.assert_allclose(post.paths.reshape(7, M, -1).sum(-1), post.nodes[l], rtol=1e-12)
    pri = hme_priors(x, p)
    for level in pri.nodes:
        np.testing.assert_allclose(level.sum(axis=1), 1.0, rtol=1e-12)
    for g in pri.gates:
        np.testing.assert_allclose(g.sum(axis=-1), 1.0, rtol=1e-12)


def test_upward_pass_node_likelihoods_are_consistent(rng):
    x, y, p = _make(rng, (2, 3, 2), N=6)
    post = hme_posteriors(x, y, p, variance=1.5)
    pri = hme_priors(x, p)
    lam = [np.exp(l) for l in post.log_node_likelihoods]
    # lambda_m = sum_c g_{c|m} lambda_{mc}; the root's is the likelihood; the leaves' are the Gaussian densities
    for l, g in enumerate(pri.gates):
        np.testing.assert_allclose((g * lam[l + 1].reshape(g.shape)).sum(-1), lam[l], rtol=1e-12)
    np.testing.assert_allclose(post.log_node_likelihoods[0][:, 0], post.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(post.log_likelihood, hme_log_likelihood(x, y, p, variance=1.5), rtol=1e-13)
    ref = _reference(x, y, p, variance=1.5)
    for a, b in zip(lam, ref["node_lik"]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # h_m = pi_m lambda_m / P(y)
    for h, prior, l_m in zip(post.nodes, pri.nodes, lam):
        np.testing.assert_allclose(h, prior * l_m / np.exp(post.log_likelihood)[:, None], rtol=1e-12)


def test_log_space_survives_far_outliers(rng):
    """y far from every expert: the densities underflow in probability space, the log-space results do not."""
    x, y, p = _make(rng, (2, 2), N=3)
    y = y + 300.0
    ll = hme_log_likelihood(x, y, p, variance=0.5)
    post = hme_posteriors(x, y, p, variance=0.5)
    assert np.all(np.isfinite(ll)) and np.all(ll < -1e4)
    for level in post.nodes:
        np.testing.assert_allclose(level.sum(axis=1), 1.0, rtol=1e-12)
    g = hme_log_likelihood_vjp(x, y, p, np.ones(3), variance=0.5)
    assert all(np.all(np.isfinite(a)) for a in leaves(g))


# --------------------------------------------------------------------------------------------
# A one-level tree is the flat mixture of local experts
# --------------------------------------------------------------------------------------------


def _flat_model(x, y, K, b, A, c, variance):
    """Jacobs et al. (1991) / Jordan & Jacobs (1994) flat model, directly in NumPy: log sum_i g_i N(y | A_i x + c_i, v I)."""
    g = sp.softmax(x @ K + b, axis=-1)  # (N, n)
    mu = np.einsum("nd,ido->nio", x, A) + c  # (N, n, d_out)
    d_out = y.shape[1]
    log_dens = -0.5 * ((y[:, None, :] - mu) ** 2).sum(-1) / variance - 0.5 * d_out * np.log(2 * np.pi * variance)
    log_joint = np.log(g) + log_dens
    ll = sp.logsumexp(log_joint, axis=1)
    h = np.exp(log_joint - ll[:, None])
    return g, mu, ll, h


def test_one_level_tree_equals_flat_mixture_of_local_experts(rng):
    N, d_in, d_out, n, v = 8, 3, 2, 4, 0.6
    K, b = rng.normal(size=(d_in, n)), rng.normal(size=n)
    A, c = rng.normal(size=(n, d_in, d_out)), rng.normal(size=(n, d_out))
    x, y = rng.normal(size=(N, d_in)), rng.normal(size=(N, d_out))
    p = HMEParams((K[None],), (b[None],), LinearExpertsParams(A, c))
    g, mu, ll, h = _flat_model(x, y, K, b, A, c, v)

    np.testing.assert_allclose(hme_log_likelihood(x, y, p, variance=v), ll, rtol=1e-12)
    np.testing.assert_allclose(hme(x, p), np.einsum("ni,nio->no", g, mu), rtol=1e-12)
    post = hme_posteriors(x, y, p, variance=v)
    np.testing.assert_allclose(post.paths, h, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(post.conditionals[0][:, 0, :], h, rtol=1e-12, atol=1e-15)  # h_{c|root} = h_c
    np.testing.assert_allclose(hme_priors(x, p).gates[0][:, 0, :], g, rtol=1e-12)

    # gradients of sum_n ct_n ll_n: experts h_i (y - mu_i) / v chained to A, c; gate logits h_i - g_i chained to K, b
    ct = rng.normal(size=N)
    mu_bar = ct[:, None, None] * h[:, :, None] * (y[:, None, :] - mu) / v  # (N, n, d_out)
    u_bar = ct[:, None] * (h - g)  # (N, n)
    grads = hme_log_likelihood_vjp(x, y, p, ct, variance=v)
    np.testing.assert_allclose(grads.params.gate_weights[0][0], x.T @ u_bar, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads.params.gate_biases[0][0], u_bar.sum(0), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads.params.experts.weight, np.einsum("nd,nio->ido", x, mu_bar), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads.params.experts.bias, mu_bar.sum(0), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(grads.y, -mu_bar.sum(1), rtol=1e-11, atol=1e-13)
    x_bar = u_bar @ K.T + np.einsum("nio,ido->nd", mu_bar, A)
    np.testing.assert_allclose(grads.x, x_bar, rtol=1e-11, atol=1e-13)


def test_one_level_tree_equals_moeref_local_experts(rng):
    """The same equality against moeref's flat mixture of local experts (skipped where that module is absent)."""
    le = pytest.importorskip("moeref.local_experts")
    needed = ("LinearLocalExpertsParams", "local_experts_log_likelihood", "local_experts_posteriors",
              "local_experts_log_likelihood_vjp", "local_experts_predict")
    if not all(hasattr(le, name) for name in needed):
        pytest.skip("moeref.local_experts does not provide the linear-expert API compared here")
    from moeref.gates import LinearSoftmaxGateParams

    N, d_in, d_out, n, v = 6, 3, 2, 4, 0.6
    K, b = rng.normal(size=(d_in, n)), rng.normal(size=n)
    experts = LinearExpertsParams(rng.normal(size=(n, d_in, d_out)), rng.normal(size=(n, d_out)))
    x, y, ct = rng.normal(size=(N, d_in)), rng.normal(size=(N, d_out)), rng.normal(size=N)
    tree = HMEParams((K[None],), (b[None],), experts)
    flat = le.LinearLocalExpertsParams(LinearSoftmaxGateParams(K, b), experts)
    np.testing.assert_allclose(
        hme_log_likelihood(x, y, tree, variance=v), le.local_experts_log_likelihood(x, y, flat, variance=v), rtol=1e-12
    )
    np.testing.assert_allclose(
        hme_posteriors(x, y, tree, variance=v).paths,
        le.local_experts_posteriors(x, y, flat, variance=v),
        rtol=1e-12,
        atol=1e-15,
    )
    np.testing.assert_allclose(hme(x, tree), le.local_experts_predict(x, flat), rtol=1e-12, atol=1e-14)
    g_tree = hme_log_likelihood_vjp(x, y, tree, ct, variance=v)
    g_flat = le.local_experts_log_likelihood_vjp(x, y, flat, ct, variance=v)
    np.testing.assert_allclose(g_tree.x, g_flat.x, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(g_tree.y, g_flat.y, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(g_tree.params.gate_weights[0][0], g_flat.params.gate.weight, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(g_tree.params.gate_biases[0][0], g_flat.params.gate.bias, rtol=1e-11, atol=1e-13)
    _assert_trees_close(g_tree.params.experts, g_flat.params.experts, rtol=1e-11, atol=1e-13)
    if hasattr(le, "local_experts_predict_vjp"):
        ct_mean = rng.normal(size=(N, d_out))
        m_tree, m_flat = hme_vjp(x, tree, ct_mean), le.local_experts_predict_vjp(x, flat, ct_mean)
        np.testing.assert_allclose(m_tree.x, m_flat.x, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(m_tree.params.gate_weights[0][0], m_flat.params.gate.weight, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(m_tree.params.gate_biases[0][0], m_flat.params.gate.bias, rtol=1e-11, atol=1e-13)
        _assert_trees_close(m_tree.params.experts, m_flat.params.experts, rtol=1e-11, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Irregular trees by -inf gate biases
# --------------------------------------------------------------------------------------------


def test_minus_inf_bias_removes_a_child(rng):
    """Branching (2, 2) with child 1 of node 1 removed: the tree root -> {node 0 -> {e0, e1}, node 1 -> {e2}}."""
    x, y, p = _make(rng, (2, 2), N=5)
    biases = (p.gate_biases[0], p.gate_biases[1].copy())
    biases[1][1, 1] = -np.inf
    q = p._replace(gate_biases=biases)
    g0 = sp.softmax(x @ p.gate_weights[0][0] + p.gate_biases[0][0], axis=-1)
    g1 = sp.softmax(x @ p.gate_weights[1][0] + p.gate_biases[1][0], axis=-1)
    mu = np.einsum("nd,pdo->npo", x, p.experts.weight) + p.experts.bias
    expected = g0[:, :1] * (g1[:, :1] * mu[:, 0] + g1[:, 1:] * mu[:, 1]) + g0[:, 1:] * mu[:, 2]
    np.testing.assert_allclose(hme(x, q), expected, rtol=1e-12)
    post = hme_posteriors(x, y, q)
    assert np.all(post.paths[:, 3] == 0) and np.all(post.conditionals[1][:, 1, 1] == 0)
    np.testing.assert_allclose(post.conditionals[1][:, 1, 0], 1.0, rtol=1e-12)
    for level in post.nodes:
        np.testing.assert_allclose(level.sum(axis=1), 1.0, rtol=1e-12)
    for g in (hme_vjp(x, q, np.ones((5, 2))), hme_log_likelihood_vjp(x, y, q, np.ones(5))):
        assert all(np.all(np.isfinite(a)) for a in leaves(g))
        assert np.all(g.params.gate_biases[1][1, 1] == 0) and np.all(g.params.experts.weight[3] == 0)


def test_leaf_numbering_and_branching(rng):
    _, _, p = _make(rng, (3, 1, 2))
    assert hme_branching(p) == (3, 1, 2)
    assert [w.shape[0] for w in p.gate_weights] == [1, 3, 3]


# --------------------------------------------------------------------------------------------
# Property: permuting the children of a node together with their subtrees changes nothing
# --------------------------------------------------------------------------------------------


def _permute_subtrees(params, level, node, perm):
    """Reorder the children of ``node`` at ``level`` by ``perm``, moving each child's subtree with it."""
    branching = tuple(w.shape[2] for w in params.gate_weights)
    D = len(branching)
    M = math.prod(branching[:level])
    weights = [w.copy() for w in params.gate_weights]
    biases = [b.copy() for b in params.gate_biases]
    weights[level][node] = params.gate_weights[level][node][:, perm]
    biases[level][node] = params.gate_biases[level][node][perm]
    leaf_index = None
    for k in range(level + 1, D + 1):
        idx = np.arange(math.prod(branching[:k])).reshape(M, branching[level], -1)
        idx[node] = idx[node][perm]
        idx = idx.reshape(-1)
        if k < D:
            weights[k], biases[k] = weights[k][idx], biases[k][idx]
        else:
            leaf_index = idx
    experts = LinearExpertsParams(params.experts.weight[leaf_index], params.experts.bias[leaf_index])
    return HMEParams(tuple(weights), tuple(biases), experts), leaf_index


@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(0, 2**32 - 1), st.data())
def test_permuting_children_with_their_subtrees_leaves_output_unchanged_property(branching, seed, data):
    rng = np.random.default_rng(seed)
    x, y, p = _make(rng, tuple(branching), N=4, scale=2.0)
    level = data.draw(st.integers(0, len(branching) - 1))
    node = data.draw(st.integers(0, math.prod(branching[:level]) - 1))
    perm = np.asarray(data.draw(st.permutations(range(branching[level]))))
    q, leaf_index = _permute_subtrees(p, level, node, perm)
    np.testing.assert_allclose(hme(x, q), hme(x, p), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hme_log_likelihood(x, y, q), hme_log_likelihood(x, y, p), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        hme_posteriors(x, y, q).paths, hme_posteriors(x, y, p).paths[:, leaf_index], rtol=1e-10, atol=1e-14
    )


@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(0, 2**32 - 1))
def test_posteriors_and_priors_are_distributions_property(branching, seed):
    rng = np.random.default_rng(seed)
    x, y, p = _make(rng, tuple(branching), N=3, scale=3.0)
    post, pri = hme_posteriors(x, y, p, variance=0.3), hme_priors(x, p)
    for h, prior in zip(post.nodes, pri.nodes):
        assert np.all(h >= 0) and np.all(prior >= 0)
        np.testing.assert_allclose(h.sum(1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(prior.sum(1), 1.0, rtol=1e-12)
    for cond in post.conditionals:
        np.testing.assert_allclose(cond.sum(-1), 1.0, rtol=1e-12)
    mu = np.einsum("nd,pdo->npo", x, p.experts.weight) + p.experts.bias  # (N, L, d_out)
    np.testing.assert_allclose(hme(x, p), np.einsum("np,npo->no", pri.paths, mu), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, y, p = _make(rng, (2, 3), d_in=4, d_out=2, N=5)
    with pytest.raises(ValueError, match="params.gate_biases has 1 levels but params.gate_weights has 2"):
        hme(x, p._replace(gate_biases=p.gate_biases[:1]))
    with pytest.raises(ValueError, match="at least one level"):
        hme(x, p._replace(gate_weights=(), gate_biases=()))
    with pytest.raises(TypeError, match="params.gate_weights must be a tuple of arrays"):
        hme(x, p._replace(gate_weights=p.gate_weights[0]))
    with pytest.raises(TypeError, match="params must be an HMEParams"):
        hme(x, (1, 2))
    # level 1 must have M_1 = b_0 = 2 nodes
    bad_level = (p.gate_weights[0], rng.normal(size=(3, 4, 3)))
    msg = r"params.gate_weights\[1\] has shape \(3, 4, 3\) but \(2, 4, 3\) was expected \(level 1 has M_1 = 2 nodes"
    with pytest.raises(ValueError, match=msg):
        hme(x, p._replace(gate_weights=bad_level))
    with pytest.raises(ValueError, match=r"params.gate_biases\[1\] has shape \(2, 2\) but \(2, 3\) was expected"):
        hme(x, p._replace(gate_biases=(p.gate_biases[0], p.gate_biases[1][:, :2])))
    with pytest.raises(ValueError, match=r"params.gate_weights\[0\] has shape \(1, 3, 2\) but \(1, 4, 2\) was expected"):
        hme(x, p._replace(gate_weights=(p.gate_weights[0][:, :3], p.gate_weights[1])))
    with pytest.raises(ValueError, match=r"params.gate_weights\[1\] must be 3-dimensional"):
        hme(x, p._replace(gate_weights=(p.gate_weights[0], p.gate_weights[1][0])))
    # wrong expert count: branching (2, 3) has 6 leaves
    few = LinearExpertsParams(p.experts.weight[:5], p.experts.bias[:5])
    msg = r"params.experts.weight has shape \(5, 4, 2\) but \(6, 4, 2\) was expected \(one expert per leaf: branching \(2, 3\) has 6"
    with pytest.raises(ValueError, match=msg):
        hme(x, p._replace(experts=few))
    with pytest.raises(ValueError, match=r"params.experts.weight has shape"):
        hme_branching(p._replace(experts=few))
    with pytest.raises(ValueError, match=r"params.experts.bias has shape \(6, 3\) but \(6, 2\) was expected"):
        hme(x, p._replace(experts=LinearExpertsParams(p.experts.weight, rng.normal(size=(6, 3)))))
    with pytest.raises(ValueError, match=r"y has shape \(5, 3\) but \(5, 2\) was expected"):
        hme_log_likelihood(x, rng.normal(size=(5, 3)), p)
    with pytest.raises(ValueError, match="variance must be positive and finite"):
        hme_log_likelihood(x, y, p, variance=0.0)
    with pytest.raises(TypeError, match="variance must be a positive Python number"):
        hme_posteriors(x, y, p, variance=np.ones(2))
    with pytest.raises(ValueError, match="x contains NaN"):
        hme(np.full_like(x, np.nan), p)
    nan_bias = (p.gate_biases[0], np.where(np.eye(2, 3) > 0, np.nan, p.gate_biases[1]))
    with pytest.raises(ValueError, match=r"params.gate_biases\[1\] contains NaN or \+inf"):
        hme(x, p._replace(gate_biases=nan_bias))
    with pytest.raises(TypeError, match="share one dtype"):
        hme(x.astype(np.float32), p)
    with pytest.raises(TypeError, match="x must have a real floating-point dtype"):
        hme(x.astype(np.int64), p)
    with pytest.raises(ValueError, match=r"cotangent has shape \(5,\) but \(5, 2\) was expected"):
        hme_vjp(x, p, np.ones(5))
    with pytest.raises(ValueError, match=r"cotangent has shape \(5, 2\) but \(5,\) was expected"):
        hme_log_likelihood_vjp(x, y, p, np.ones((5, 2)))
    with pytest.raises(TypeError, match="cotangent must have a real floating-point dtype"):
        hme_log_likelihood_vjp(x, y, p, np.ones(5, dtype=np.int64))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        hme(torch.from_numpy(x), p)
    with pytest.raises(TypeError, match=r"different array libraries were mixed in one call \(numpy: the forward's inputs; torch: cotangent\)"):
        hme_vjp(x, p, torch.ones(5, 2, dtype=torch.float64))

"""Token-choice router: score functions, selection, groups, noise, GShard policies, VJP, bad input."""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref.router import (
    RouterDraws,
    RouterOptions,
    RouterOutput,
    RouterParams,
    normalize_route_weights,
    normalize_route_weights_vjp,
    renormalize_routes,
    route,
    route_weights_vjp,
)
from moeref.routes import Routes
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from moeref.backends._base import map_tree

T, D, E = 6, 3, 8  # shared shapes (JAX compiles per shape)


# --------------------------------------------------------------------------------------------
# NumPy references, written directly from the papers / peer code
# --------------------------------------------------------------------------------------------


def np_softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_topk(v, k):
    """Top-k indices, ties to the lower index (stable sort of -v)."""
    return np.argsort(-v, axis=-1, kind="stable")[:, :k]


def _params(rng, d=D, e=E, bias=False):
    return RouterParams(rng.normal(size=(d, e)), rng.normal(size=e) if bias else None)


def _weights(out):
    return np.asarray(out.routes.weight)


# --------------------------------------------------------------------------------------------
# Ties and score functions
# --------------------------------------------------------------------------------------------


def test_top_k_tie_rule_lower_index_wins():
    x = np.ones((3, 2))
    W = np.zeros((2, 5))  # every logit equal: a five-way tie
    for score in ("softmax", "sigmoid", "topk_softmax", "topk_sigmoid", "none"):
        out = route(x, RouterParams(W), RouterOptions(k=2, score=score))
        assert out.routes.expert_index.tolist() == [[0, 1]] * 3, score
    # a tie between experts 1 and 3 for the second place: expert 1 wins
    W2 = np.array([[5.0, 1.0, 0.0, 1.0]])
    out = route(np.ones((1, 1)), RouterParams(W2), RouterOptions(k=2))
    assert out.routes.expert_index.tolist() == [[0, 1]]


def test_softmax_underflow_ties_on_scores_but_not_on_logits():
    # probabilities of experts 1 and 2 both underflow to 0: on scores they tie (lower index wins)
    W = np.array([[0.0, -2000.0, -1000.0]])
    x = np.ones((1, 1))
    on_scores = route(x, RouterParams(W), RouterOptions(k=2, selection="scores"))
    on_logits = route(x, RouterParams(W), RouterOptions(k=2, selection="logits"))
    assert on_scores.routes.expert_index.tolist() == [[0, 1]]
    assert on_logits.routes.expert_index.tolist() == [[0, 2]]


@pytest.mark.parametrize("score", ["softmax", "topk_softmax", "sigmoid", "topk_sigmoid", "none"])
@pytest.mark.parametrize("normalize", ["none", "sum"])
def test_score_functions_match_direct_numpy(rng, score, normalize):
    x, p = rng.normal(size=(T, D)), _params(rng, bias=True)
    k = 3
    out = route(x, p, RouterOptions(k=k, score=score, normalize=normalize, routed_scaling_factor=1.5))
    z = x @ p.weight + p.bias
    idx = np_topk(z, k)  # every score function is monotone, and the logits here have no ties
    zk = np.take_along_axis(z, idx, axis=1)
    g = {
        "softmax": np.take_along_axis(np_softmax(z), idx, axis=1),
        "topk_softmax": np_softmax(zk),
        "sigmoid": np_sigmoid(zk),
        "topk_sigmoid": np_sigmoid(zk),
        "none": zk,
    }[score]
    if normalize == "sum":
        g = g / g.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(out.routes.expert_index, idx)
    assert_close(out.routes.weight, 1.5 * g)
    assert_close(out.logits, z)
    assert out.routes.kept.all() and not out.routes.position.any()
    if score == "topk_softmax":  # GPT-OSS router_scores: dense, 0 off the winners
        dense = np.zeros_like(z)
        np.put_along_axis(dense, idx, np_softmax(zk), axis=1)
        assert_close(out.scores, dense)


def test_mixtral_softmax_renormalised_equals_softmax_over_the_top_k(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    mixtral = route(x, p, RouterOptions(k=2, score="softmax", normalize="sum"))
    gpt_oss = route(x, p, RouterOptions(k=2, score="topk_softmax"))
    np.testing.assert_array_equal(mixtral.routes.expert_index, gpt_oss.routes.expert_index)
    assert_close(mixtral.routes.weight, gpt_oss.routes.weight)


@pytest.mark.parametrize(
    "mode, eps, p",
    [("sum_plus_eps", 1e-20, 1.0), ("sum_plus_eps", 0.5, 1.0), ("sum_clamp", 0.3, 1.0), ("sum_clamp", "finfo_eps", 1.0), ("lp", None, 1.0), ("lp", None, 2.0), ("lp", None, 0.5)],
)
def test_normalizations_match_direct_numpy(rng, mode, eps, p):
    g = rng.uniform(0.01, 0.3, size=(T, 3))
    kept = rng.uniform(size=(T, 3)) < 0.7
    gm = np.where(kept, g, 0.0)
    e = np.finfo(np.float64).eps if eps == "finfo_eps" else eps
    S = {
        "sum_plus_eps": lambda: gm.sum(1, keepdims=True) + e,
        "sum_clamp": lambda: np.maximum(gm.sum(1, keepdims=True), e),
        "lp": lambda: (gm**p).sum(1, keepdims=True) ** (1 / p),
    }[mode]()
    expected = np.where(S > 0, gm / np.where(S > 0, S, 1.0), 0.0)
    assert_close(normalize_route_weights(g, kept, mode, eps=eps, p=p), expected)


def test_normalization_of_a_fully_dropped_row_is_zero_not_nan():
    w = np.array([[0.4, 0.6], [0.3, 0.2]])
    kept = np.array([[False, False], [True, True]])
    for mode, eps in (("sum", None), ("lp", None), ("none", None), ("sum_clamp", "finfo_eps")):
        out = normalize_route_weights(w, kept, mode, eps=eps)
        assert np.all(np.isfinite(out)) and np.all(out[0] == 0), mode


# --------------------------------------------------------------------------------------------
# Selection bias and group-limited routing
# --------------------------------------------------------------------------------------------


def test_selection_bias_changes_winners_not_weights(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    bias = np.zeros(E)
    bias[5] = 100.0  # expert 5 always wins
    opts = RouterOptions(k=2, score="sigmoid", normalize="sum")
    plain = route(x, p, opts)
    biased = route(x, p._replace(selection_bias=bias), opts)
    assert np.all(biased.routes.expert_index[:, 0] == 5)
    s = np_sigmoid(x @ p.weight)
    idx = np_topk(s + bias, 2)
    g = np.take_along_axis(s, idx, axis=1)
    assert_close(biased.routes.weight, g / g.sum(1, keepdims=True))  # weights from the unbiased scores
    assert_close(biased.scores, plain.scores)
    # a bias that does not change the winners does not change anything
    same = route(x, p._replace(selection_bias=np.full(E, 3.0)), opts)
    np.testing.assert_array_equal(same.routes.expert_index, plain.routes.expert_index)
    assert_close(same.routes.weight, plain.routes.weight)


def _grouped_topk_loop(v, k, n_group, topk_group, group_score, fill):
    """Group-limited top-k, one token at a time (the reference)."""
    T_, E_ = v.shape
    size = E_ // n_group
    out = []
    for t in range(T_):
        groups = [v[t, g * size : (g + 1) * size] for g in range(n_group)]
        gs = [max(gr) if group_score == "max" else sum(sorted(gr, reverse=True)[:2]) for gr in groups]
        best = sorted(range(n_group), key=lambda g: (-gs[g], g))[:topk_group]
        masked = [v[t, e] if e // size in best else fill for e in range(E_)]
        out.append(sorted(range(E_), key=lambda e: (-masked[e], e))[:k])
    return np.array(out)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("fill", [-math.inf, 0.0])
def test_group_limited_top_k_matches_a_loop_over_tokens(rng, group_score, fill):
    x, p = rng.normal(size=(T, D)), _params(rng)
    bias = rng.normal(scale=0.5, size=E)
    opts = RouterOptions(k=3, score="sigmoid", n_group=4, topk_group=2, group_score=group_score, group_masked_score=fill, normalize="sum")
    out = route(x, p._replace(selection_bias=bias), opts)
    s = np_sigmoid(x @ p.weight)
    idx = _grouped_topk_loop(s + bias, 3, 4, 2, group_score, fill)
    np.testing.assert_array_equal(out.routes.expert_index, idx)
    g = np.take_along_axis(s, idx, axis=1)
    assert_close(out.routes.weight, g / g.sum(1, keepdims=True))


def test_group_masked_score_matters_only_for_negative_selection_values():
    # DeepSeek-V3: older transformers fill left-out groups with 0.0; the reference inference code and
    # transformers v5.24 with -inf (checked against the installed HF module in test_sparse_moe_peers.py)
    s = np.array([[0.1, 0.2, 0.9, 0.8]])  # sigmoid scores; group 1 (experts 2, 3) wins
    z = np.log(s / (1 - s))
    bias = np.array([0.0, 0.0, -1.0, -1.0])  # pushes the winning group's values below 0
    p = RouterParams(np.eye(4), selection_bias=bias)
    kw = dict(k=2, score="sigmoid", n_group=2, topk_group=1, group_score="max")
    x = z
    hf = route(x, p, RouterOptions(group_masked_score=0.0, **kw))
    ref = route(x, p, RouterOptions(**kw))
    # group scores: max(0.1, 0.2) = 0.2 vs max(-0.1, -0.2) = -0.1: group 0 wins, no negative values
    assert hf.routes.expert_index.tolist() == ref.routes.expert_index.tolist() == [[1, 0]]
    bias2 = np.array([-1.0, -1.0, 0.0, -0.5])  # group 1 wins but holds a value below 0 ...
    p2 = p._replace(selection_bias=bias2)
    s2 = np.array([[0.1, 0.2, 0.9, 0.05]])  # selection values [-0.9, -0.8, 0.9, -0.45]
    z2 = np.log(s2 / (1 - s2))
    hf = route(z2, p2, RouterOptions(group_masked_score=0.0, **kw))
    ref = route(z2, p2, RouterOptions(**kw))
    assert ref.routes.expert_index.tolist() == [[2, 3]]
    assert hf.routes.expert_index.tolist() == [[2, 0]]  # ... so a left-out expert (filled with 0.0 > -0.45) wins


# --------------------------------------------------------------------------------------------
# GShard second-expert policies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["all", "none", "threshold", "random"])
def test_gshard_second_expert_policies(rng, policy):
    x, p = rng.normal(size=(T, D)), _params(rng)
    u = rng.uniform(size=T)
    probs = np_softmax(x @ p.weight)
    idx = np_topk(probs, 2)
    g = np.take_along_axis(probs, idx, axis=1)
    g = g / (g.sum(1, keepdims=True) + 1e-9)  # Mesh-TF: denom = gate_1 + gate_2 + 1e-9
    theta = 0.8 if policy == "random" else float(np.median(g[:, 1]))
    keep2 = {"all": np.ones(T, bool), "none": np.zeros(T, bool), "threshold": g[:, 1] > theta, "random": u < g[:, 1] / theta}[policy]
    if policy in ("threshold", "random"):
        assert 0 < keep2.sum() < T  # the rule makes a difference on this input
    draws = RouterDraws(second_expert_uniform=u) if policy == "random" else None
    opts = RouterOptions(k=2, normalize="sum_plus_eps", normalize_eps=1e-9, second_expert_policy=policy, second_expert_threshold=theta)
    out = route(x, p, opts, draws)
    np.testing.assert_array_equal(out.routes.kept, np.stack([np.ones(T, bool), keep2], axis=1))
    assert_close(out.routes.weight, np.where(out.routes.kept, g, 0.0))
    np.testing.assert_array_equal(out.routes.expert_index, idx)  # the dropped route keeps its expert


def test_fairseq_random_policy_is_mesh_tf_random_with_threshold_one_half(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    u = rng.uniform(size=T)
    out = route(x, p, RouterOptions(k=2, second_expert_policy="random", second_expert_threshold=0.5), RouterDraws(second_expert_uniform=u))
    g2 = np.sort(np_softmax(x @ p.weight), axis=1)[:, -2]  # raw second probability (fairseq default)
    np.testing.assert_array_equal(out.routes.kept[:, 1], 2 * g2 > u)


def test_normalize_after_capacity_defers_normalisation_and_scaling(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    opts = RouterOptions(k=2, normalize="sum_clamp", normalize_eps="finfo_eps", routed_scaling_factor=2.0, normalize_after_capacity=True)
    out = route(x, p, opts)
    probs = np_softmax(x @ p.weight)
    g = np.take_along_axis(probs, np_topk(probs, 2), axis=1)
    assert_close(out.routes.weight, g)  # raw probabilities, as fairseq / DeepSpeed before dropping
    dropped = out.routes._replace(kept=np.array([[True, False]] + [[True, True]] * (T - 1)))
    renorm = renormalize_routes(dropped, opts)
    expected = np.where(dropped.kept, g, 0.0)
    expected = 2.0 * expected / np.maximum(expected.sum(1, keepdims=True), np.finfo(float).eps)
    assert_close(renorm.weight, expected)
    assert renorm.weight[0, 0] == 2.0


# --------------------------------------------------------------------------------------------
# Noise, jitter, Gumbel
# --------------------------------------------------------------------------------------------


def _noisy_params(rng):
    return RouterParams(rng.normal(size=(D, E)), None, rng.normal(size=(D, E)))


def test_noisy_top_k_with_zero_noise_equals_plain_top_k(rng):
    x, p = rng.normal(size=(T, D)), _noisy_params(rng)
    opts = RouterOptions(k=2, score="topk_softmax")
    noisy = route(x, p, RouterOptions(k=2, score="topk_softmax", noisy_top_k=True), RouterDraws(noise=np.zeros((T, E))))
    plain = route(x, p._replace(noise_weight=None), opts)
    np.testing.assert_array_equal(noisy.routes.expert_index, plain.routes.expert_index)
    assert_close(noisy.routes.weight, plain.routes.weight)


def test_noisy_top_k_matches_shazeer_eq_3_to_5(rng):
    x, p = rng.normal(size=(T, D)), _noisy_params(rng)
    n = rng.normal(size=(T, E))
    out = route(x, p, RouterOptions(k=2, score="topk_softmax", noisy_top_k=True), RouterDraws(noise=n))
    H = x @ p.weight + n * np.log1p(np.exp(x @ p.noise_weight))  # eq. (4)
    idx = np_topk(H, 2)  # KeepTopK, eq. (5)
    G = np_softmax(np.take_along_axis(H, idx, axis=1))  # softmax over the kept, eq. (3)
    np.testing.assert_array_equal(out.routes.expert_index, idx)
    assert_close(out.routes.weight, G)
    assert_close(out.noisy_logits, H)
    assert_close(out.logits, x @ p.weight)


def test_noise_epsilon_is_tensor2tensors_noise_floor(rng):
    from moeref.aux_losses import SHAZEER_TENSOR2TENSOR, NoisyTopKDraws, noisy_top_k_gates

    x, p = rng.normal(size=(T, D)), _noisy_params(rng)
    n = rng.normal(size=(T, E))
    out = route(x, p, RouterOptions(k=2, score="topk_softmax", noisy_top_k=True, noise_epsilon=1e-2), RouterDraws(noise=n))
    H = x @ p.weight + n * (np.log1p(np.exp(x @ p.noise_weight)) + 1e-2)  # tensor2tensor noisy_top_k_gating
    assert_close(out.noisy_logits, H)
    np.testing.assert_array_equal(out.routes.expert_index, np_topk(H, 2))
    # the same gates as the auxiliary-loss module's noisy top-k (tensor2tensor conventions), bit for bit
    gates = noisy_top_k_gates(x @ p.weight, x @ p.noise_weight, NoisyTopKDraws(n), 2, options=SHAZEER_TENSOR2TENSOR)
    np.testing.assert_array_equal(out.scores, gates)


def test_vmoe_logit_noise_scales_with_one_over_e(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    nu = rng.normal(size=(T, E))
    out = route(x, p, RouterOptions(k=2, logit_noise_std=1.0), RouterDraws(logit_noise=nu))
    probs = np_softmax(x @ p.weight + nu / E)
    idx = np_topk(probs, 2)
    np.testing.assert_array_equal(out.routes.expert_index, idx)
    assert_close(out.routes.weight, np.take_along_axis(probs, idx, axis=1))


def test_input_jitter_and_what_the_experts_see(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    u = rng.uniform(0.99, 1.01, size=(T, D))
    for flag in (False, True):
        out = route(x, p, RouterOptions(k=2, input_jitter=0.01, jitter_experts=flag), RouterDraws(jitter=u))
        assert_close(out.router_input, x * u)
        assert_close(out.logits, (x * u) @ p.weight)
        assert_close(out.expert_input, x * u if flag else x)


@pytest.mark.parametrize("mode", ["selection", "selection_after_first", "selection_and_weights"])
def test_gumbel_modes(rng, mode):
    x, p = rng.normal(size=(T, D)), _params(rng)
    gum = rng.gumbel(size=(T, E))
    out = route(x, p, RouterOptions(k=2, gumbel=mode), RouterDraws(gumbel=gum))
    z = x @ p.weight
    probs = np_softmax(z)
    if mode == "selection":
        idx = np_topk(z + gum, 2)
        g = np.take_along_axis(probs, idx, axis=1)
    elif mode == "selection_after_first":  # fairseq / DeepSpeed "sampling" of the second expert
        first = np.argmax(probs, axis=1)
        masked = np.where(np.arange(E) == first[:, None], -np.inf, z + gum)
        idx = np.stack([first, np.argmax(masked, axis=1)], axis=1)
        g = np.take_along_axis(probs, idx, axis=1)
    else:
        noisy = np_softmax(z + gum)
        idx = np_topk(noisy, 2)
        g = np.take_along_axis(noisy, idx, axis=1)
    np.testing.assert_array_equal(out.routes.expert_index, idx)
    assert_close(out.routes.weight, g)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 6), st.data())
def test_chosen_experts_are_the_top_k_of_the_selection_scores_property(n, d, e, data):
    k = data.draw(st.integers(1, e))
    x = data.draw(hnp.arrays(np.float64, (n, d), elements=st.integers(-3, 3).map(float)))  # many ties
    W = data.draw(hnp.arrays(np.float64, (d, e), elements=st.integers(-3, 3).map(float)))
    score = data.draw(st.sampled_from(["softmax", "sigmoid", "topk_softmax", "none"]))
    out = route(x, RouterParams(W), RouterOptions(k=k, score=score, selection="logits"))
    v = x @ W
    idx = out.routes.expert_index
    assert all(len(set(row)) == k for row in idx.tolist())
    chosen = np.take_along_axis(v, idx, axis=1)
    assert np.all(np.diff(chosen, axis=1) <= 0)  # rank order
    np.testing.assert_array_equal(idx, np_topk(v, k))  # ties: lower index first


@given(st.integers(1, 5), st.integers(2, 6), st.data())
def test_sum_normalised_weights_add_up_to_the_scaling_factor_property(n, e, data):
    k = data.draw(st.integers(1, e))
    scale = data.draw(st.floats(0.1, 5.0))
    score = data.draw(st.sampled_from(["softmax", "sigmoid", "topk_softmax", "topk_sigmoid"]))
    x = data.draw(hnp.arrays(np.float64, (n, 2), elements=st.floats(-5, 5)))
    W = data.draw(hnp.arrays(np.float64, (2, e), elements=st.floats(-5, 5)))
    out = route(x, RouterParams(W), RouterOptions(k=k, score=score, normalize="sum", routed_scaling_factor=scale))
    np.testing.assert_allclose(out.routes.weight.sum(axis=1), scale, rtol=1e-12)
    assert np.all(out.routes.weight >= 0)


# --------------------------------------------------------------------------------------------
# VJPs
# --------------------------------------------------------------------------------------------

VJP_CASES = {
    "softmax_sum": (RouterOptions(k=2, normalize="sum"), False, None),
    "topk_softmax_bias": (RouterOptions(k=3, score="topk_softmax"), True, None),
    "sigmoid_groups_deepseek": (
        RouterOptions(k=2, score="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", normalize="sum_plus_eps", normalize_eps=1e-20, routed_scaling_factor=2.5),
        False,
        "selection_bias",
    ),
    "topk_sigmoid_llama4": (RouterOptions(k=1, score="topk_sigmoid"), False, None),
    "none_lp2": (RouterOptions(k=3, score="none", normalize="lp", normalize_p=2.0), True, None),
    "softmax_sum_clamp_policy": (
        RouterOptions(k=2, normalize="sum_clamp", normalize_eps="finfo_eps", second_expert_policy="random", second_expert_threshold=0.4),
        False,
        "uniform",
    ),
    "noisy_top_k_jitter": (RouterOptions(k=2, score="topk_softmax", noisy_top_k=True, noise_epsilon=1e-2, input_jitter=0.05), False, "noise"),
    "vmoe_gumbel_dbrx": (RouterOptions(k=2, normalize="lp", normalize_p=1.0, logit_noise_std=1.0, gumbel="selection_and_weights"), False, "vmoe"),
}


def _vjp_inputs(rng, name):
    opts, bias, extra = VJP_CASES[name]
    x = rng.normal(size=(T, D))
    p = RouterParams(rng.normal(size=(D, E)), rng.normal(size=E) if bias else None)
    draws = None
    if extra == "selection_bias":
        p = p._replace(selection_bias=rng.normal(size=E))
    elif extra == "uniform":
        draws = RouterDraws(second_expert_uniform=rng.uniform(size=T))
    elif extra == "noise":
        p = p._replace(noise_weight=rng.normal(size=(D, E)))
        draws = RouterDraws(jitter=rng.uniform(0.95, 1.05, size=(T, D)), noise=rng.normal(size=(T, E)))
    elif extra == "vmoe":
        draws = RouterDraws(logit_noise=rng.normal(size=(T, E)), gumbel=rng.gumbel(size=(T, E)))
    return x, p, opts, draws


# JAX compiles every primitive of a new configuration (seconds each): jax.vjp checks the one
# case the backend test also runs; torch.autograd and finite differences check every case.
JAX_CASES = ("sigmoid_groups_deepseek",)


def _like(ref, tree):
    """Draws (NumPy) moved to the array library of ``ref`` (autograd runs the forward on torch / JAX)."""
    xp = array_api_compat.array_namespace(ref)
    return map_tree(lambda a: xp.asarray(a), tree)


@pytest.mark.parametrize("name", list(VJP_CASES))
def test_route_weights_vjp(rng, name):
    x, p, opts, draws = _vjp_inputs(rng, name)
    out = route(x, p, opts, draws)

    def forward(x_, p_):
        return route(x_, p_, opts, _like(x_, draws)).routes.weight

    def vjp(x_, p_, ct):
        return route_weights_vjp(x_, p_, opts, out, ct, draws)

    autograd = ("torch", "jax") if name in JAX_CASES else ("torch",)
    assert_vjp_correct(f"route_weights[{name}]", forward, vjp, (x, p), rng.normal(size=(T, opts.k)), autograd=autograd)


def test_vjp_differentiates_the_forward_routes_and_never_selects_again(rng):
    # experts 0 and 1 tie exactly on every token (equal columns, far ahead of the rest): the
    # forward takes expert 0 (lower index). Both routes are valid at the tie; the VJP must follow
    # the one in `output`, also after a perturbation that would flip a recomputed selection.
    x = rng.normal(size=(T, D))
    W = 0.1 * rng.normal(size=(D, E))
    W[:, 1] = W[:, 0]
    b = np.zeros(E)
    b[:2] = 3.0
    opts = RouterOptions(k=1, score="sigmoid")
    out = route(x, RouterParams(W, b), opts)
    assert np.all(out.routes.expert_index == 0)
    ct = rng.normal(size=(T, 1))
    taken = route_weights_vjp(x, RouterParams(W, b), opts, out, ct).params
    assert np.any(taken.weight[:, 0] != 0) and np.all(taken.weight[:, 1] == 0)
    # the other side of the tie, handed in as the forward's output: its expert gets the gradient
    other = out._replace(routes=out.routes._replace(expert_index=np.ones_like(out.routes.expert_index)))
    swapped = route_weights_vjp(x, RouterParams(W, b), opts, other, ct).params
    np.testing.assert_array_equal(swapped.weight[:, [1, 0] + list(range(2, E))], taken.weight)
    # a perturbation that breaks the tie towards expert 1 changes a fresh selection, not the VJP
    b2 = b + np.where(np.arange(E) == 1, 1e-9, 0.0)
    assert np.all(route(x, RouterParams(W, b2), opts).routes.expert_index == 1)
    kept = route_weights_vjp(x, RouterParams(W, b2), opts, out, ct).params
    np.testing.assert_array_equal(kept.weight, taken.weight)
    fresh = route_weights_vjp(x, RouterParams(W, b2), opts, None, ct).params
    assert np.all(fresh.weight[:, 0] == 0) and np.any(fresh.weight[:, 1] != 0)


def test_normalize_route_weights_vjp(rng):
    g = rng.uniform(0.05, 0.5, size=(T, 3))
    kept = np.ones((T, 3), bool)
    kept[1, 2] = kept[4, 0] = False
    ct = rng.normal(size=(T, 3))
    for mode, eps, p in (("sum", None, 1.0), ("sum_plus_eps", 1e-3, 1.0), ("sum_clamp", 1e-3, 1.0), ("lp", None, 3.0), ("none", None, 1.0)):
        assert_vjp_correct(
            f"normalize_route_weights[{mode}]",
            lambda w, kept=kept, mode=mode, eps=eps, p=p: normalize_route_weights(w, _like(w, kept), mode, eps=eps, p=p),
            lambda w, c, kept=kept, mode=mode, eps=eps, p=p: (normalize_route_weights_vjp(w, kept, mode, c, eps=eps, p=p),),
            (g,),
            ct,
            autograd=("torch",),
        )


# --------------------------------------------------------------------------------------------
# Switched-off experts: a -inf logit means "never route here"
# --------------------------------------------------------------------------------------------


def test_a_token_with_every_expert_switched_off_is_an_error(rng):
    with pytest.raises(ValueError, match="-inf for every expert at token 0 .* no expert can be selected for token 0"):
        route(rng.normal(size=(T, D)), RouterParams(rng.normal(size=(D, E)), np.full(E, -np.inf)), RouterOptions(k=2))


@pytest.mark.parametrize("score", ["softmax", "topk_softmax", "sigmoid", "topk_sigmoid", "none"])
@pytest.mark.parametrize("normalize", ["none", "sum", "lp"])
def test_routes_beyond_the_live_experts_are_dropped_not_kept(rng, score, normalize):
    """Two live experts, k = 3: rank 2 must go to a switched-off expert; it is kept=False, weight 0."""
    bias = np.full(E, -np.inf)
    bias[[2, 5]] = 0.0
    x = rng.normal(size=(T, D))
    opts = RouterOptions(k=3, score=score, normalize=normalize)
    out = route(x, RouterParams(rng.normal(size=(D, E)), bias), opts)
    r = out.routes
    assert np.all(np.isin(r.expert_index[:, :2], [2, 5])) and not np.any(np.isin(r.expert_index[:, 2], [2, 5]))
    assert np.all(r.kept[:, :2]) and not np.any(r.kept[:, 2])
    assert np.all(np.isfinite(r.weight)) and np.all(r.weight[:, 2] == 0.0)
    if normalize == "sum":  # renormalised over the live routes only
        np.testing.assert_allclose(r.weight.sum(axis=1), 1.0, rtol=1e-12)
    # the dropped routes take no capacity slot
    from moeref.capacity import CapacityOptions, apply_capacity

    report = apply_capacity(r, E, CapacityOptions(capacity=T, capacity_factor=None)).report
    assert report.counts_before.sum() == 2 * T
    grads = route_weights_vjp(x, RouterParams(rng.normal(size=(D, E)), bias), opts, None, rng.normal(size=(T, 3)))
    assert all(np.all(np.isfinite(g)) for g in leaves(grads))


def test_a_switched_off_expert_never_wins_while_enough_are_live(rng):
    """On scores a switched-off expert scores 0 (softmax, sigmoid) and could win through a
    selection bias, or tie with a live expert whose score underflows: it must not."""
    x = rng.normal(size=(T, D))
    W = rng.normal(size=(D, E))
    bias = np.zeros(E)
    bias[0] = -np.inf
    bias[1] = -2000.0  # live, but its softmax and sigmoid underflow to exactly 0
    push = np.zeros(E)
    push[0] = 10.0  # a selection bias that would make expert 0 win
    for score in ("softmax", "sigmoid"):
        out = route(x, RouterParams(W, bias, selection_bias=push), RouterOptions(k=E - 1, score=score))
        assert not np.any(out.routes.expert_index == 0), score
        assert np.all(out.routes.kept), score
        assert np.all(np.isneginf(out.selection_scores[:, 0])), score


@pytest.mark.parametrize("fill", [-math.inf, 0.0])
def test_groups_with_too_few_live_experts(fill):
    """Group 0 wins but holds one live expert; rank 1 falls outside the live experts of the chosen group."""
    x = np.zeros((1, 1))
    bias = np.array([5.0, -np.inf, -3.0, -3.0])
    opts = RouterOptions(k=2, score="sigmoid", n_group=2, topk_group=1, group_score="top2_sum", group_masked_score=fill, normalize="sum")
    r = route(x, RouterParams(np.zeros((1, 4)), bias), opts).routes
    assert r.expert_index[0, 0] == 0 and r.kept[0, 0]
    if fill == -math.inf:  # the left-out group's experts are masked like switched-off ones: never routed to
        assert r.expert_index[0, 1] == 1 and not r.kept[0, 1] and r.weight[0, 1] == 0.0
        assert r.weight[0, 0] == 1.0
    else:  # masked with 0.0 (older HF releases): a live expert of the left-out group is selectable
        assert r.expert_index[0, 1] == 2 and r.kept[0, 1] and 0.0 < r.weight[0, 1] < r.weight[0, 0]


def test_gumbel_after_first_with_one_live_expert_does_not_repeat_it(rng):
    bias = np.array([0.0] + [-np.inf] * (E - 1))
    opts = RouterOptions(k=2, gumbel="selection_after_first", normalize="sum")
    x = rng.normal(size=(T, D))
    p = RouterParams(rng.normal(size=(D, E)), bias)
    draws = RouterDraws(gumbel=rng.gumbel(size=(T, E)))
    out = route(x, p, opts, draws)
    assert np.all(out.routes.kept[:, 0]) and not np.any(out.routes.kept[:, 1])
    np.testing.assert_array_equal(out.routes.weight, np.tile([[1.0, 0.0]], (T, 1)))
    ct = rng.normal(size=(T, 2))
    np.testing.assert_array_equal(route_weights_vjp(x, p, opts, out, ct, draws).x, route_weights_vjp(x, p, opts, None, ct, draws).x)


def test_route_weights_vjp_with_switched_off_experts(rng):
    x = rng.normal(size=(T, D))
    bias = rng.normal(size=E)
    bias[[0, 3, 4, 6, 7]] = -np.inf  # three live experts, k = 4
    p = RouterParams(rng.normal(size=(D, E)), bias)
    opts = RouterOptions(k=4, normalize="sum", routed_scaling_factor=2.0)
    out = route(x, p, opts)

    def forward(x_, w_):
        return route(x_, RouterParams(w_, _like(w_, bias)), opts).routes.weight

    def vjp(x_, w_, ct):
        g = route_weights_vjp(x_, p._replace(weight=w_), opts, out, ct)
        return (g.x, g.params.weight)

    assert_vjp_correct("route_weights[switched_off]", forward, vjp, (x, p.weight), rng.normal(size=(T, 4)), autograd=("torch",))
    g = route_weights_vjp(x, p, opts, out, rng.normal(size=(T, 4))).params
    assert np.all(g.weight[:, np.isneginf(bias)] == 0.0) and np.all(g.bias[np.isneginf(bias)] == 0.0)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def test_router_agrees_with_numpy_on_every_backend(backend, rng):
    names = JAX_CASES if backend.name == "jax" else ("sigmoid_groups_deepseek", "noisy_top_k_jitter", "softmax_sum_clamp_policy", "vmoe_gumbel_dbrx")
    for name in names:
        x, p, opts, draws = _vjp_inputs(rng, name)
        ct = rng.normal(size=(T, opts.k))

        def run(to, frm):
            out = route(to(x), to(p), opts, to(draws))
            grads = route_weights_vjp(to(x), to(p), opts, out, to(ct), to(draws))
            return frm((out, grads))

        ref = run(lambda a: a, lambda a: a)
        got = run(backend.tree_from_numpy, backend.tree_to_numpy)
        for a, b in zip(leaves(got), leaves(ref)):
            b = np.asarray(b)
            if b.dtype.kind == "f":
                assert_close(a, b, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)
    w = backend.from_numpy(rng.uniform(0.1, 1.0, size=(T, 2)))
    kept = backend.from_numpy(np.array([[True, False]] * T))
    assert_close(backend.to_numpy(normalize_route_weights(w, kept, "lp", p=2.0)), np.array([[1.0, 0.0]] * T))


def test_float32_inputs_stay_float32(rng):
    x, p = rng.normal(size=(T, D)).astype(np.float32), _params(rng)
    p = RouterParams(p.weight.astype(np.float32), selection_bias=np.zeros(E, np.float32))
    opts = RouterOptions(k=2, score="sigmoid", n_group=4, topk_group=2, normalize="sum_clamp", normalize_eps="finfo_eps", routed_scaling_factor=2.5)
    out = route(x, p, opts)
    assert out.routes.weight.dtype == out.logits.dtype == out.scores.dtype == np.float32
    grads = route_weights_vjp(x, p, opts, out, np.ones((T, 2), np.float32))
    assert grads.x.dtype == grads.params.weight.dtype == np.float32
    ref = route(x.astype(np.float64), RouterParams(p.weight.astype(np.float64), selection_bias=np.zeros(E)), opts)
    np.testing.assert_array_equal(out.routes.expert_index, ref.routes.expert_index)
    np.testing.assert_allclose(out.routes.weight, ref.routes.weight, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, p = rng.normal(size=(T, D)), _params(rng)
    with pytest.raises(ValueError, match=r"options.k must be at most the number of experts E=8, got k=9"):
        route(x, p, RouterOptions(k=9))
    with pytest.raises(ValueError, match="options.k must be at least 1, got 0"):
        RouterOptions(k=0)
    with pytest.raises(TypeError, match="options.k must be an int"):
        RouterOptions(k=2.0)
    with pytest.raises(ValueError, match="x contains NaN"):
        route(np.full((T, D), np.nan), p)
    with pytest.raises(ValueError, match=r"router logits \(x @ params.weight \+ params.bias\) contains NaN"), np.errstate(over="ignore"):
        route(np.full((T, D), 1e200), RouterParams(np.full((D, E), 1e200)))
    with pytest.raises(ValueError, match=r"params.weight has shape \(4, 8\) but \(3, \*\) was expected \(x has d=3 features\)"):
        route(x, RouterParams(rng.normal(size=(4, E))))
    with pytest.raises(ValueError, match=r"params.bias has shape \(7,\) but \(8,\) was expected"):
        route(x, RouterParams(p.weight, np.zeros(7)))
    with pytest.raises(ValueError, match=r"params.selection_bias has shape \(3,\)"):
        route(x, RouterParams(p.weight, selection_bias=np.zeros(3)))
    with pytest.raises(ValueError, match="params.bias contains NaN"):
        route(x, RouterParams(p.weight, np.full(E, np.nan)))
    with pytest.raises(TypeError, match="params must be a RouterParams"):
        route(x, (p.weight, None))
    with pytest.raises(ValueError, match="options.score must be one of"):
        RouterOptions(score="softmax2")
    with pytest.raises(ValueError, match="options.noise_epsilon=0.01 is the noise floor of the noisy top-k gate and needs options.noisy_top_k=True"):
        RouterOptions(noise_epsilon=0.01)
    with pytest.raises(ValueError, match="options.noise_epsilon must be non-negative"):
        RouterOptions(noisy_top_k=True, noise_epsilon=-0.01)
    with pytest.raises(ValueError, match="options.selection must be 'logits'"):
        RouterOptions(score="topk_softmax", selection="scores")
    with pytest.raises(ValueError, match="must be given together"):
        RouterOptions(n_group=2)
    with pytest.raises(ValueError, match="options.topk_group must be at least 1 and at most 2, got 3"):
        RouterOptions(n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="options.n_group=3 must divide the number of experts E=8"):
        route(x, p, RouterOptions(n_group=3, topk_group=1))
    with pytest.raises(ValueError, match=r"options.k=5 exceeds the 4 experts"):
        route(x, p, RouterOptions(k=5, n_group=4, topk_group=2))
    with pytest.raises(ValueError, match="options.normalize_eps is required"):
        RouterOptions(normalize="sum_plus_eps")
    with pytest.raises(ValueError, match="options.normalize_p must be a finite positive number"):
        RouterOptions(normalize="lp", normalize_p=0.0)
    with pytest.raises(ValueError, match="needs options.k == 2"):
        RouterOptions(k=3, second_expert_policy="random")
    with pytest.raises(ValueError, match=r"options.second_expert_policy='random' needs draws.second_expert_uniform, shape \(6,\)"):
        route(x, p, RouterOptions(k=2, second_expert_policy="random"))
    with pytest.raises(ValueError, match=r"draws.second_expert_uniform must lie in \[0, 1\)"):
        route(x, p, RouterOptions(k=2, second_expert_policy="random"), RouterDraws(second_expert_uniform=np.full(T, 1.0)))
    with pytest.raises(ValueError, match="draws.gumbel is given but unused"):
        route(x, p, RouterOptions(k=2), RouterDraws(gumbel=np.zeros((T, E))))
    with pytest.raises(ValueError, match=r"draws.noise has shape \(6, 7\) but \(6, 8\) was expected"):
        route(x, _noisy_params(rng), RouterOptions(noisy_top_k=True), RouterDraws(noise=np.zeros((T, 7))))
    with pytest.raises(ValueError, match="options.noisy_top_k=True needs params.noise_weight"):
        route(x, p, RouterOptions(noisy_top_k=True), RouterDraws(noise=np.zeros((T, E))))
    with pytest.raises(ValueError, match="params.noise_weight is given but options.noisy_top_k is False"):
        route(x, _noisy_params(rng))
    with pytest.raises(ValueError, match=r"draws.jitter must lie in \[1 - eps, 1 \+ eps\]"):
        route(x, p, RouterOptions(input_jitter=0.01), RouterDraws(jitter=np.full((T, D), 1.5)))
    with pytest.raises(ValueError, match="needs options.k >= 2"):
        RouterOptions(k=1, gumbel="selection_after_first")
    with pytest.raises(ValueError, match=r"cotangent_weight has shape \(6, 3\) but \(6, 2\) was expected"):
        route_weights_vjp(x, p, RouterOptions(k=2), None, np.zeros((T, 3)))
    out = route(x, p, RouterOptions(k=2))
    with pytest.raises(ValueError, match=r"output.routes.expert_index has shape \(6, 1\) but \(6, 2\) was expected"):
        wrong = out._replace(routes=out.routes._replace(expert_index=out.routes.expert_index[:, :1]))
        route_weights_vjp(x, p, RouterOptions(k=2), wrong, np.zeros((T, 2)))
    with pytest.raises(TypeError, match="output must be a RouterOutput"):
        route_weights_vjp(x, p, RouterOptions(k=2), out.routes, np.zeros((T, 2)))
    with pytest.raises(TypeError, match="share one dtype"):
        route(x.astype(np.float32), p)
    with pytest.raises(TypeError, match="kept must be a bool array"):
        normalize_route_weights(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="eps is required"):
        normalize_route_weights(np.ones((2, 2)), None, "sum_clamp")
    assert isinstance(out, RouterOutput) and isinstance(out.routes, Routes)


def test_second_expert_threshold_range():
    with pytest.raises(ValueError, match=r"options.second_expert_threshold must be a finite number >= 0 .*, got -1.0"):
        RouterOptions(second_expert_threshold=-1.0)  # checked whatever the policy
    with pytest.raises(ValueError, match=r"options.second_expert_threshold must be a finite number >= 0 .*, got nan"):
        RouterOptions(k=2, second_expert_policy="threshold", second_expert_threshold=math.nan)
    with pytest.raises(ValueError, match=r"options.second_expert_threshold must be a finite number > 0 \(the 'random' policy"):
        RouterOptions(k=2, second_expert_policy="random", second_expert_threshold=0.0)
    RouterOptions(k=2, second_expert_policy="threshold", second_expert_threshold=0.0)  # keeps every g_2 > 0


def test_bad_cotangents_and_routes_are_refused(rng):
    torch = pytest.importorskip("torch")
    x, p = rng.normal(size=(T, D)), _params(rng)
    opts = RouterOptions(k=2)
    out = route(x, p, opts)
    ct = rng.normal(size=(T, 2))
    with pytest.raises(ValueError, match="cotangent_weight contains NaN"):
        route_weights_vjp(x, p, opts, out, np.full((T, 2), np.nan))
    with pytest.raises(TypeError, match="cotangent_weight has dtype float32 but x has dtype float64"):
        route_weights_vjp(x, p, opts, out, ct.astype(np.float32))
    with pytest.raises(TypeError, match=r"different array libraries .*torch: cotangent_weight"):
        route_weights_vjp(x, p, opts, out, torch.from_numpy(ct))
    with pytest.raises(TypeError, match="cotangent_weight must have a real floating-point dtype"):
        route_weights_vjp(x, p, opts, out, np.ones((T, 2), dtype=np.int64))
    w, kept = rng.uniform(size=(T, 2)), np.ones((T, 2), bool)
    with pytest.raises(TypeError, match="cotangent has dtype float64 but weight has dtype float32"):
        normalize_route_weights_vjp(w.astype(np.float32), kept, "sum", ct)
    with pytest.raises(ValueError, match="cotangent contains NaN"):
        normalize_route_weights_vjp(w, kept, "sum", np.full((T, 2), np.inf))
    with pytest.raises(TypeError, match="routes.kept must be an array, got None"):
        renormalize_routes(out.routes._replace(kept=None), opts)


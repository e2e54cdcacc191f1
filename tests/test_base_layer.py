"""BASE layer: forward against a direct NumPy/scipy reference, greedy evaluation, VJPs, backends, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from moeref.base_layer import BaseLayerOptions, BaseLayerParams, base_layer, base_layer_vjp
from moeref.expert_ffn import GPT_OSS_SWIGLU, RELU_FFN, SWIGLU, ExpertFFN
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params, np_ffn

SEPARATE_SWIGLU = ExpertFFN(activation="silu", gated=True, gate_up_layout="separate")


def make(rng, T=8, d=3, I=4, E=2, ffn=RELU_FFN, bias=True, scale=1.0):
    x = rng.normal(size=(T, d))
    params = BaseLayerParams(centroids=rng.normal(size=(E, d)), experts=make_params(rng, E, d, I, ffn, bias=bias, scale=scale))
    return x, params


def reference(x, params, ffn, training=True):
    """Affinities, scipy's optimal balanced assignment (or argmax), then the gated residual mix token by token."""
    a = x @ params.centroids.T
    T, E = a.shape
    if training:
        rows, cols = linear_sum_assignment(np.repeat(a, T // E, axis=1), maximize=True)
        e = cols[np.argsort(rows)] // (T // E)
    else:
        e = np.argmax(a, axis=1)
    y = np.zeros_like(x)
    for t in range(T):
        alpha = 1.0 / (1.0 + np.exp(-a[t, e[t]]))
        y[t] = alpha * np_ffn(x[t : t + 1], params.experts, e[t], ffn)[0] + (1.0 - alpha) * x[t]
    return y, e


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("ffn", [RELU_FFN, SWIGLU, SEPARATE_SWIGLU], ids=["relu", "swiglu", "swiglu_separate"])
def test_base_layer_equals_direct_reference(ffn, training, rng):
    x, params = make(rng, T=12, d=4, I=5, E=3, ffn=ffn)
    out = base_layer(x, params, BaseLayerOptions(ffn=ffn), training=training)
    y, e = reference(x, params, ffn, training)
    assert np.array_equal(out.routes.expert_index[:, 0], e)
    assert_close(out.y, y, rtol=1e-12, atol=1e-12)
    assert_close(out.affinities, x @ params.centroids.T)
    assert_close(out.alpha, 1.0 / (1.0 + np.exp(-(x * params.centroids[e]).sum(1))))
    assert out.routes.kept.all() and np.array_equal(out.routes.weight[:, 0], out.alpha)
    assert (out.assignment is not None) == training
    if training:
        assert np.all(np.bincount(e, minlength=3) == 4)


def test_greedy_evaluation_can_be_unbalanced_and_breaks_ties_to_the_lower_expert(rng):
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    params = BaseLayerParams(np.array([[1.0, 0.0], [0.0, 1.0]]), make_params(rng, 2, 2, 3, RELU_FFN))
    assert base_layer(x, params, training=False).routes.expert_index[:, 0].tolist() == [0, 0, 0, 1]  # token 2 ties
    assert base_layer(x, params, training=True).routes.expert_index[:, 0].tolist() == [0, 0, 1, 1]


def test_zero_expert_output_leaves_one_minus_alpha_times_x(rng):
    # fairseq zero-initialises the last projection of its residual expert; with f_e = 0, y = (1 - alpha) x
    x, params = make(rng, bias=False)
    params = params._replace(experts=params.experts._replace(w_out=np.zeros_like(params.experts.w_out)))
    out = base_layer(x, params)
    assert_close(out.y, (1.0 - out.alpha)[:, None] * x)


def test_given_expert_index_skips_the_routing(rng):
    x, params = make(rng)
    out = base_layer(x, params)
    again = base_layer(x, params, expert_index=out.routes.expert_index[:, 0])
    assert_close(again.y, out.y) and again.assignment is None
    forced = base_layer(x, params, expert_index=np.zeros(8, dtype=np.int64))
    assert forced.routes.expert_index[:, 0].tolist() == [0] * 8


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_training_gives_every_expert_t_over_e_tokens_property(E, C, seed):
    rng = np.random.default_rng(seed)
    x, params = make(rng, T=E * C, d=3, I=2, E=E)
    out = base_layer(x, params)
    counts = np.bincount(out.routes.expert_index[:, 0], minlength=E)
    assert np.all(counts == C)
    assert np.all((out.alpha > 0) & (out.alpha < 1))


# --------------------------------------------------------------------------------------------
# VJP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,ffn,bias,scale,training,autograd",
    [
        ("relu_bias", RELU_FFN, True, 1.0, True, ("torch", "jax")),
        ("swiglu_separate", SEPARATE_SWIGLU, True, 1.0, True, ("torch",)),
        ("gpt_oss_greedy", GPT_OSS_SWIGLU, True, 6.0, False, ("torch",)),
    ],
    ids=["relu_bias", "swiglu_separate", "gpt_oss_greedy"],
)
def test_base_layer_vjp(name, ffn, bias, scale, training, autograd, rng):
    x, params = make(rng, T=6, d=3, I=3, E=3, ffn=ffn, bias=bias, scale=scale)
    options = BaseLayerOptions(ffn=ffn)
    e = base_layer(x, params, options, training=training).routes.expert_index[:, 0]

    def forward(x, params, e):  # the assignment is an integer leaf, held fixed
        return base_layer(x, params, options, training=training, expert_index=e).y

    def vjp(x, params, e, ct):
        g = base_layer_vjp(x, params, options, ct, training=training, expert_index=e)
        return g.x, g.params, None

    ct = rng.normal(size=x.shape)
    assert_vjp_correct(f"base_layer[{name}]", forward, vjp, (x, params, e), ct, autograd=autograd)
    # the VJP recomputes the same assignment when none is given
    fresh = base_layer_vjp(x, params, options, ct, training=training)
    for a, b in zip(leaves(fresh), leaves(vjp(x, params, e, ct)[:2])):
        assert_close(a, b)


def test_base_layer_vjp_through_the_auction_by_finite_differences(rng):
    # the assignment is re-solved at every perturbed point; away from ties it does not move
    x, params = make(rng, T=4, d=2, I=2, E=2)

    def forward(x, params):
        return base_layer(x, params).y

    def vjp(x, params, ct):
        return tuple(base_layer_vjp(x, params, BaseLayerOptions(), ct))

    assert_vjp_correct("base_layer[auction inside]", forward, vjp, (x, params), rng.normal(size=x.shape), autograd=("torch",))


# --------------------------------------------------------------------------------------------
# Every backend
# --------------------------------------------------------------------------------------------


def test_base_layer_agrees_across_backends(backend, rng):
    x, params = make(rng, T=6, d=3, I=3, E=3)  # the shapes of the VJP test (one set of JAX compilations)
    options = BaseLayerOptions()
    ct = rng.normal(size=x.shape)

    def run(x, params, ct):  # training only: evaluation differs by an argmax (checked on NumPy above)
        return base_layer(x, params, options).y, base_layer_vjp(x, params, options, ct)

    want = run(x, params, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(params), t(ct)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input(rng):
    x, params = make(rng, T=8, d=3, I=4, E=3)
    with pytest.raises(ValueError, match=r"x has T=8 tokens, not divisible by E=3 experts.*training=False"):
        base_layer(x, params)
    assert base_layer(x, params, training=False).y.shape == (8, 3)  # greedy routing has no such rule
    x, params = make(rng, T=8, d=3, I=4, E=2)
    with pytest.raises(ValueError, match=r"params.centroids has shape \(2, 4\) but \(\*, 3\) was expected"):
        base_layer(x, params._replace(centroids=rng.normal(size=(2, 4))))
    with pytest.raises(ValueError, match=r"params.experts has E=2 experts but params.centroids has E=4 rows"):
        base_layer(x, params._replace(centroids=rng.normal(size=(4, 3))))
    with pytest.raises(ValueError, match="params.centroids must be 2-dimensional"):
        base_layer(x, params._replace(centroids=rng.normal(size=(3,))))
    with pytest.raises(ValueError, match=r"expert_index has values up to 2 .*entries must lie in \[0, 2\)"):
        base_layer(x, params, expert_index=np.full(8, 2))
    with pytest.raises(ValueError, match=r"expert_index has shape \(7,\) but \(8,\) was expected"):
        base_layer(x, params, expert_index=np.zeros(7, dtype=np.int64))
    with pytest.raises(TypeError, match="training must be a bool"):
        base_layer(x, params, training=1)
    with pytest.raises(ValueError, match="params.centroids contains NaN"):
        base_layer(x, params._replace(centroids=np.full((2, 3), np.nan)))
    with pytest.raises(ValueError, match=r"cotangent has shape \(8, 2\) but \(8, 3\) was expected"):
        base_layer_vjp(x, params, BaseLayerOptions(), np.zeros((8, 2)))
    with pytest.raises(TypeError, match="params must be a BaseLayerParams"):
        base_layer(x, tuple(params))

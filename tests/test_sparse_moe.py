"""The full sparse MoE layer: per-token reference, VJP (finite differences, torch, jax), dropless vs
infinite capacity, every backend, presets, properties, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.aux_losses import HF_MIXTRAL, load_balancing_loss, router_z_loss
from moeref.capacity import CapacityOptions
from moeref.core import array_namespace
from moeref.expert_ffn import GPT_OSS_SWIGLU, RELU_FFN, SWIGLU
from moeref.presets import PRESETS, deepseek_v3, mixtral, switch
from moeref.router import RouterDraws, RouterOptions, RouterParams
from moeref.shared_experts import SharedExpertParams, combine_shared_experts
from moeref.sparse_moe import (
    SparseMoEAuxCotangents,
    SparseMoEDraws,
    SparseMoEOptions,
    SparseMoEParams,
    sparse_moe_layer,
    sparse_moe_layer_value_and_vjp,
    sparse_moe_layer_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params as make_expert_params
from test_expert_ffn import np_ffn

T, D, I, E = 6, 4, 5, 4


def make_layer_params(rng, ffn, *, E=E, router_bias=False, selection_bias=False, expert_bias=True, scale=1.0, shared=None):
    """Random layer parameters; with ``shared`` (a SharedExpertOptions) one shared expert and its gate too."""
    shared_params = None
    if shared is not None:
        w = shared.gate_width
        shared_params = SharedExpertParams(
            make_expert_params(rng, 1, D, I, shared.ffn, bias=expert_bias),
            gate_weight=rng.normal(size=(D, w)) if w else None,
        )
    return SparseMoEParams(
        router=RouterParams(
            weight=scale * rng.normal(size=(D, E)),
            bias=rng.normal(size=(E,)) if router_bias else None,
            selection_bias=0.1 * rng.normal(size=(E,)) if selection_bias else None,
        ),
        experts=make_expert_params(rng, E, D, I, ffn, bias=expert_bias),
        shared=shared_params,
    )


def selection_margin(out_sel, k):
    """Smallest gap between the k-th and (k+1)-th selection value over tokens (inf if k == E)."""
    s = -np.sort(-np.asarray(out_sel), axis=1)
    return np.inf if k >= s.shape[1] else float(np.min(s[:, k - 1] - s[:, k]))


def tie_free_case(ffn, options, *, draws=None, **kw):
    """First seed whose selection has a margin > 1e-3, so finite differences never cross a boundary."""
    from moeref.router import route

    for seed in range(100):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(T, D))
        p = make_layer_params(rng, ffn, shared=options.shared, **kw)
        r = route(x, p.router, options.router, None if draws is None else draws.router)
        if selection_margin(r.selection_scores, options.router.k) > 1e-3:
            return rng, x, p
    raise AssertionError("no tie-free seed")


def flat_forward(options, draws=None):
    def forward(x, params):
        out = sparse_moe_layer(x, params, options, draws)
        xp = array_namespace(out.y)
        return xp.concat([xp.reshape(out.y, (-1,)), xp.stack([out.load_balancing_loss, out.z_loss])])

    return forward


def flat_vjp(options, draws=None):
    def vjp(x, params, ct):
        n = x.shape[0] * x.shape[1]
        aux = SparseMoEAuxCotangents(float(ct[n]), float(ct[n + 1]))
        return sparse_moe_layer_vjp(x, params, options, np.reshape(ct[:n], x.shape), draws=draws, aux_cotangents=aux)

    return vjp


def loop_reference(x, params, options, routes):
    """y_t = sum_j kept_tj w_tj FFN_e(x_t), token by token, from the layer's own routes."""
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routes.expert_index.shape[1]):
            if routes.kept[t, j]:
                e, w = routes.expert_index[t, j], routes.weight[t, j]
                if options.apply_weight_to == "input":
                    y[t] += np_ffn(w * x[t : t + 1], params.experts, e, options.ffn)[0]
                else:
                    y[t] += w * np_ffn(x[t : t + 1], params.experts, e, options.ffn)[0]
    return y


DROP = CapacityOptions(capacity_factor=0.75, rounding="floor", k_factor="inside")  # C = floor(0.75*6*2/4) = 2

VJP_CASES = {
    "mixtral_aux": (SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), ffn=SWIGLU, load_balancing=HF_MIXTRAL), {}),
    "capacity_drop_before": (SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), capacity=DROP), {"router_bias": True}),
    "capacity_drop_after_scaled": (
        SparseMoEOptions(
            router=RouterOptions(
                k=2, normalize="sum_clamp", normalize_eps="finfo_eps", normalize_after_capacity=True, routed_scaling_factor=1.5
            ),
            capacity=DROP,
        ),
        {"router_bias": True},
    ),
    "llama4_input": (SparseMoEOptions(router=RouterOptions(k=1, score="topk_sigmoid"), ffn=SWIGLU, apply_weight_to="input"), {}),
    "gpt_oss_bias": (SparseMoEOptions(router=RouterOptions(k=2, score="topk_softmax"), ffn=GPT_OSS_SWIGLU), {"router_bias": True}),
}


@pytest.mark.parametrize("name", list(VJP_CASES))
def test_sparse_moe_layer_forward_and_vjp(name):
    options, kw = VJP_CASES[name]
    rng, x, p = tie_free_case(options.ffn, options, **kw)
    out = sparse_moe_layer(x, p, options)
    assert_close(out.y, loop_reference(x, p, options, out.routes))
    assert_close(out.load_balancing_loss, load_balancing_loss(out.logits, out.routes, options=options.load_balancing))
    assert_close(out.z_loss, router_z_loss(out.logits))
    if options.capacity is DROP:
        assert out.capacity == 2 and not np.all(out.routes.kept)  # something was dropped
        assert np.all(out.counts_after <= 2)
    # finite differences + torch autograd; jax.vjp is left out here (it recompiles for every
    # data-dependent block shape: ~10 s per case); jax is covered by the backend test below
    autograd = ("torch",)
    ct = rng.normal(size=T * D + 2)
    assert_vjp_correct(f"sparse_moe_layer[{name}]", flat_forward(options), flat_vjp(options), (x, p), ct, autograd=autograd)


def test_vjp_with_jitter_draws_held_fixed():
    options = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum", input_jitter=0.1, jitter_experts=True), ffn=SWIGLU)
    rng = np.random.default_rng(3)
    draws = SparseMoEDraws(router=RouterDraws(jitter=rng.uniform(0.9, 1.1, size=(T, D))))
    rng, x, p = tie_free_case(SWIGLU, options, draws=draws)
    ct = rng.normal(size=T * D + 2)
    assert_vjp_correct("sparse_moe_layer[jitter]", flat_forward(options, draws), flat_vjp(options, draws), (x, p), ct, autograd=())


def test_default_aux_cotangents_are_the_coefficients():
    options = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), ffn=SWIGLU, load_balancing_coef=0.3, z_loss_coef=0.2)
    rng, x, p = tie_free_case(SWIGLU, options)
    ct = rng.normal(size=(T, D))
    a = sparse_moe_layer_vjp(x, p, options, ct)
    b = sparse_moe_layer_vjp(x, p, options, ct, aux_cotangents=SparseMoEAuxCotangents(0.3, 0.2))
    for u, v in zip(leaves(a), leaves(b)):
        assert_close(u, v)
    out = sparse_moe_layer(x, p, options)
    assert_close(out.aux_loss, 0.3 * out.load_balancing_loss + 0.2 * out.z_loss)


# --------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------


def test_dropless_equals_infinite_capacity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, SWIGLU)
    base = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), ffn=SWIGLU)
    huge = dataclasses.replace(base, capacity=CapacityOptions(capacity_factor=100.0))
    a, b = sparse_moe_layer(x, p, base), sparse_moe_layer(x, p, huge)
    assert_close(a.y, b.y)
    assert np.all(a.routes.kept) and np.all(b.routes.kept)
    np.testing.assert_array_equal(a.counts_before, b.counts_after)
    assert a.capacity == int(np.max(a.counts_before)) and b.capacity == 300
    ct = rng.normal(size=(T, D))
    for u, v in zip(leaves(sparse_moe_layer_vjp(x, p, base, ct)), leaves(sparse_moe_layer_vjp(x, p, huge, ct))):
        assert_close(u, v)


def test_renormalising_after_capacity_gives_kept_routes_full_weight():
    opts = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum", normalize_after_capacity=True), capacity=DROP)
    rng, x, p = tie_free_case(RELU_FFN, opts)
    out = sparse_moe_layer(x, p, opts)
    sums = out.routes.weight.sum(axis=1)
    live = out.routes.kept.any(axis=1)
    assert_close(sums[live], np.ones(live.sum()))
    assert np.all(out.routes.weight[~out.routes.kept] == 0)


# --------------------------------------------------------------------------------------------
# Every backend equals NumPy (one configuration, one shape)
# --------------------------------------------------------------------------------------------


def _compared_fields(out, grads):
    """The array fields of a layer output (no Python ints) and the gradients, for backend comparisons."""
    return (out.y, out.logits, out.scores, out.routes, out.counts_before, out.counts_after, out.load_balancing_loss, out.z_loss, grads)


def test_sparse_moe_layer_agrees_across_backends(backend):
    options, kw = VJP_CASES["capacity_drop_after_scaled"]
    options = dataclasses.replace(options, ffn=SWIGLU, load_balancing_coef=0.1, z_loss_coef=0.01)
    rng, x, p = tie_free_case(SWIGLU, options, **kw)
    ct = rng.normal(size=(T, D))

    def run(x, p, ct):
        return _compared_fields(sparse_moe_layer(x, p, options), sparse_moe_layer_vjp(x, p, options, ct))

    want = run(x, p, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(p), t(ct)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Output and VJP in one call
# --------------------------------------------------------------------------------------------


def _assert_equal_records(got, want):
    got_leaves, want_leaves = leaves(got), leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for u, v in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("name", list(VJP_CASES))
def test_value_and_vjp_equals_the_layer_and_its_vjp_bit_for_bit(name):
    options, kw = VJP_CASES[name]
    options = dataclasses.replace(options, load_balancing_coef=0.1, z_loss_coef=0.01)
    rng, x, p = tie_free_case(options.ffn, options, **kw)
    ct = rng.normal(size=(T, D))
    aux = SparseMoEAuxCotangents(load_balancing=0.5, z_loss=-0.25)
    out, grads = sparse_moe_layer_value_and_vjp(x, p, options, ct, aux_cotangents=aux)
    _assert_equal_records(out, sparse_moe_layer(x, p, options))
    _assert_equal_records(grads, sparse_moe_layer_vjp(x, p, options, ct, aux_cotangents=aux))


@pytest.mark.parametrize("name", ["switch", "deepseek_v3"])
def test_value_and_vjp_of_presets_with_groups_drops_and_shared_experts(name):
    make, kw = PRESET_CALLS[name]
    options = make()
    rng, x, p = tie_free_case(options.ffn, options, E=8, **kw)
    ct = rng.normal(size=(T, D))
    out, grads = sparse_moe_layer_value_and_vjp(x, p, options, ct)
    _assert_equal_records(out, sparse_moe_layer(x, p, options))
    _assert_equal_records(grads, sparse_moe_layer_vjp(x, p, options, ct))


def test_value_and_vjp_agrees_across_backends(backend):
    options, kw = VJP_CASES["capacity_drop_after_scaled"]
    options = dataclasses.replace(options, ffn=SWIGLU, load_balancing_coef=0.1, z_loss_coef=0.01)
    rng, x, p = tie_free_case(SWIGLU, options, **kw)
    ct = rng.normal(size=(T, D))

    def run(x, p, ct):
        return _compared_fields(*sparse_moe_layer_value_and_vjp(x, p, options, ct))

    want = run(x, p, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(p), t(ct)))
    for a, b in zip(leaves(got), leaves(want), strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_value_and_vjp_refuses_a_bad_cotangent():
    options, kw = VJP_CASES["mixtral_aux"]
    rng, x, p = tie_free_case(options.ffn, options, **kw)
    with pytest.raises(ValueError, match="cotangent_y"):
        sparse_moe_layer_value_and_vjp(x, p, options, np.ones((T + 1, D)))
    with pytest.raises(ValueError, match="aux_cotangents.load"):
        sparse_moe_layer_value_and_vjp(x, p, options, np.ones((T, D)), aux_cotangents=SparseMoEAuxCotangents(load=1.0))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

PRESET_CALLS = {
    "mixtral": (lambda: mixtral(), {}),
    "switch": (lambda: switch(capacity=1, group_size=3), {"expert_bias": False}),
    "deepseek_v3": (lambda: deepseek_v3(k=2, n_group=4, topk_group=2), {"selection_bias": True, "expert_bias": False}),
    "qwen2_moe": (lambda: PRESETS["qwen2_moe"](k=2, norm_topk_prob=True), {"expert_bias": False}),
    "olmoe": (lambda: PRESETS["olmoe"](k=2), {"expert_bias": False}),
    "gpt_oss": (lambda: PRESETS["gpt_oss"](k=2), {"router_bias": True}),
    "llama4": (lambda: PRESETS["llama4"](), {"expert_bias": False}),
}


def test_every_preset_is_tested():
    assert set(PRESET_CALLS) <= set(PRESETS)  # every preset is exercised in tests/test_presets.py


@pytest.mark.parametrize("name", list(PRESET_CALLS))
def test_preset_smoke(name):
    make, kw = PRESET_CALLS[name]
    options = make()
    assert isinstance(options, SparseMoEOptions)
    rng, x, p = tie_free_case(options.ffn, options, E=8, **kw)
    out = sparse_moe_layer(x, p, options)
    assert out.y.shape == (T, D) and np.all(np.isfinite(out.y))
    assert out.routes.expert_index.shape == (T, options.router.k)
    assert_close(out.routed_y, loop_reference(x, p, options, out.routes))
    if options.shared is not None:  # shared experts (DeepSeek, Qwen2-MoE): tests/test_shared_experts.py checks the combination
        assert_close(out.y, combine_shared_experts(x, out.routed_y, p.shared, options.shared).y)
    else:
        assert_close(out.y, out.routed_y)
    if name == "switch":  # capacity 1 per group of 3 tokens
        assert out.capacity == 1 and out.counts_after.shape == (2, 8) and np.all(out.counts_after <= 1)
    if name == "deepseek_v3":  # sigmoid, groups, selection bias, scaling: not covered by the VJP cases above
        ct = rng.normal(size=T * D + 2)
        assert_vjp_correct(f"preset[{name}]", flat_forward(options), flat_vjp(options), (x, p), ct, autograd=())


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3))
def test_dropless_layer_is_token_permutation_equivariant_property(seed, k):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5, D))
    p = make_layer_params(rng, SWIGLU)
    options = SparseMoEOptions(router=RouterOptions(k=k, normalize="sum"), ffn=SWIGLU)
    perm = rng.permutation(5)
    a, b = sparse_moe_layer(x, p, options), sparse_moe_layer(x[perm], p, options)
    assert_close(b.y, a.y[perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(a.counts_before, b.counts_before)


@given(seed=st.integers(0, 2**31 - 1))
def test_layer_output_is_sum_of_weighted_expert_outputs_property(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5, D))
    p = make_layer_params(rng, RELU_FFN)
    options = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), capacity=CapacityOptions(capacity_factor=0.5))
    out = sparse_moe_layer(x, p, options)
    assert_close(out.y, loop_reference(x, p, options, out.routes), rtol=1e-10, atol=1e-12)
    assert np.all(out.counts_after <= out.capacity)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, RELU_FFN)
    opts = SparseMoEOptions(router=RouterOptions(k=2))
    with pytest.raises(ValueError, match="params.experts has E=4 experts but params.router.weight has E=3"):
        sparse_moe_layer(x, p._replace(router=RouterParams(p.router.weight[:, :3])), opts)
    with pytest.raises(TypeError, match="params"):
        sparse_moe_layer(x, (p.router, p.experts), opts)
    with pytest.raises(TypeError, match="options"):
        sparse_moe_layer(x, p, RouterOptions(k=2))
    with pytest.raises(ValueError, match="load_balancing_coef"):
        SparseMoEOptions(load_balancing_coef=-1.0)
    with pytest.raises(ValueError, match="apply_weight_to"):
        SparseMoEOptions(apply_weight_to="both")
    with pytest.raises(ValueError, match="k must be at most"):
        sparse_moe_layer(x, p, SparseMoEOptions(router=RouterOptions(k=5)))
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoEOptions(capacity=CapacityOptions(capacity_factor=0.0))
    with pytest.raises(ValueError, match="group_size"):
        sparse_moe_layer(x, p, SparseMoEOptions(capacity=CapacityOptions(group_size=4)))
    with pytest.raises(ValueError, match="cotangent_y"):
        sparse_moe_layer_vjp(x, p, opts, np.ones((T, D + 1)))
    with pytest.raises(ValueError, match="NaN|finite"):
        sparse_moe_layer(np.where(np.arange(D) == 0, np.nan, x), p, opts)
    with pytest.raises(ValueError, match="draws.jitter"):
        sparse_moe_layer(x, p, SparseMoEOptions(router=RouterOptions(input_jitter=0.1)))


def test_expert_switched_off_by_minus_inf_bias():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, SWIGLU, router_bias=True)
    p = p._replace(router=p.router._replace(bias=np.array([0.0, -np.inf, 0.0, 0.0])))
    opts = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), ffn=SWIGLU, load_balancing=HF_MIXTRAL, load_balancing_coef=0.3, z_loss_coef=0.2)
    out = sparse_moe_layer(x, p, opts)
    assert not np.any(out.routes.expert_index == 1) and np.all(out.counts_before[:, 1] == 0)
    # the losses are those of the three live experts (probability 0 for expert 1, lse ignores it)
    live = out.logits[:, [0, 2, 3]]
    assert_close(out.z_loss, router_z_loss(live))
    assert_close(out.load_balancing_loss, load_balancing_loss(out.logits, out.routes, options=HF_MIXTRAL))
    assert np.isfinite(float(out.aux_loss)) and float(out.aux_loss) > 0
    g = sparse_moe_layer_vjp(x, p, opts, rng.normal(size=(T, D)))
    assert all(np.all(np.isfinite(a)) for a in leaves(g))
    assert g.params.router.bias[1] == 0 and np.all(g.params.router.weight[:, 1] == 0) and np.all(g.params.experts.w_in[1] == 0)
    rng, x, p = tie_free_case(SWIGLU, opts, router_bias=True)
    p = p._replace(router=p.router._replace(bias=np.array([0.0, -np.inf, 0.0, 0.0])))
    ct = rng.normal(size=T * D + 2)
    assert_vjp_correct("sparse_moe_layer[-inf bias]", flat_forward(opts), flat_vjp(opts), (x, p), ct, autograd=())


def test_vjp_reuses_the_forward_routes_at_a_tie():
    # experts 0 and 1 have equal router columns: every token ties between them and the forward
    # takes expert 0. A perturbation that breaks the tie towards expert 1 changes a recomputed
    # selection, not a VJP given the forward's output.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, SWIGLU, router_bias=True, scale=0.1)
    W = p.router.weight.copy()
    W[:, 1] = W[:, 0]
    b = np.array([3.0, 3.0, 0.0, 0.0])
    p = p._replace(router=RouterParams(W, b))
    opts = SparseMoEOptions(router=RouterOptions(k=1, score="sigmoid"), ffn=SWIGLU)
    out = sparse_moe_layer(x, p, opts)
    assert np.all(out.routes.expert_index == 0)
    ct = rng.normal(size=(T, D))
    taken = sparse_moe_layer_vjp(x, p, opts, ct, output=out)
    for u, v in zip(leaves(taken), leaves(sparse_moe_layer_vjp(x, p, opts, ct))):  # same as recomputing here
        np.testing.assert_array_equal(u, v)
    p2 = p._replace(router=RouterParams(W, b + np.array([0.0, 1e-9, 0.0, 0.0])))
    assert np.all(sparse_moe_layer(x, p2, opts).routes.expert_index == 1)
    kept = sparse_moe_layer_vjp(x, p2, opts, ct, output=out)
    assert np.any(kept.params.experts.w_in[0] != 0) and np.all(kept.params.experts.w_in[1] == 0)
    fresh = sparse_moe_layer_vjp(x, p2, opts, ct)
    assert np.all(fresh.params.experts.w_in[0] == 0) and np.any(fresh.params.experts.w_in[1] != 0)


def test_sequence_balance_loss_is_reported_and_differentiated():
    from moeref.aux_losses import DEEPSEEK_V3_SEQUENCE_BALANCE, sequence_balance_loss

    seq = dataclasses.replace(DEEPSEEK_V3_SEQUENCE_BALANCE, sequence_length=3)
    opts = dataclasses.replace(deepseek_v3(k=2, n_group=2, topk_group=1), sequence_balance=seq, sequence_balance_coef=0.5)
    rng, x, p = tie_free_case(SWIGLU, opts, selection_bias=True, expert_bias=False)
    out = sparse_moe_layer(x, p, opts)
    assert_close(out.sequence_balance_loss, sequence_balance_loss(out.logits, 2, options=seq))
    assert_close(out.aux_loss, 0.5 * out.sequence_balance_loss)

    def forward(x, params):
        o = sparse_moe_layer(x, params, opts)
        xp = array_namespace(o.y)
        return xp.concat([xp.reshape(o.y, (-1,)), xp.reshape(o.sequence_balance_loss, (1,))])

    def vjp(x, params, ct):
        n = x.shape[0] * x.shape[1]
        aux = SparseMoEAuxCotangents(sequence_balance=float(ct[n]))
        return sparse_moe_layer_vjp(x, params, opts, np.reshape(ct[:n], x.shape), aux_cotangents=aux)

    assert_vjp_correct("sparse_moe_layer[sequence balance]", forward, vjp, (x, p), rng.normal(size=T * D + 1), autograd=())
    with pytest.raises(ValueError, match="sequence_balance_coef needs options.sequence_balance"):
        SparseMoEOptions(sequence_balance_coef=0.1)
    with pytest.raises(ValueError, match="aux_cotangents.sequence_balance is nonzero"):
        no_seq = dataclasses.replace(deepseek_v3(k=2, n_group=2, topk_group=1, n_shared_experts=0), sequence_balance=None)
        sparse_moe_layer_vjp(x, p._replace(shared=None), no_seq, np.ones((T, D)), aux_cotangents=SparseMoEAuxCotangents(sequence_balance=1.0))


# --------------------------------------------------------------------------------------------
# Importance and load losses (Shazeer et al. 2017, V-MoE) in the layer
# --------------------------------------------------------------------------------------------


def _gate_loss_case(kind, rng):
    """Options, parameters and draws of a layer with both losses of ``kind`` (tie-free seeds)."""
    from moeref.aux_losses import SHAZEER_TENSOR2TENSOR

    if kind == "shazeer2017":
        options = SparseMoEOptions(
            router=RouterOptions(k=2, score="topk_softmax", noisy_top_k=True, noise_epsilon=1e-2, input_jitter=0.05),
            ffn=RELU_FFN,
            importance_loss="shazeer2017",
            importance_loss_coef=0.1,
            load_loss="shazeer2017",
            load_loss_coef=0.2,
            shazeer_loss=SHAZEER_TENSOR2TENSOR,
        )
        draws = SparseMoEDraws(router=RouterDraws(jitter=rng.uniform(0.95, 1.05, size=(T, D)), noise=rng.normal(size=(T, E))))
    else:
        options = SparseMoEOptions(
            router=RouterOptions(k=2, logit_noise_std=1.0),
            capacity=CapacityOptions(capacity_factor=1.0, group_size=3, priority="batch_prioritized"),
            ffn=RELU_FFN,
            importance_loss="vmoe",
            importance_loss_coef=0.005,
            load_loss="vmoe",
            load_loss_coef=0.005,
        )
        draws = SparseMoEDraws(router=RouterDraws(logit_noise=rng.normal(size=(T, E))))
    from moeref.router import route

    for seed in range(100):
        r = np.random.default_rng(seed)
        x = r.normal(size=(T, D))
        p = make_layer_params(r, RELU_FFN, expert_bias=False)  # few parameters: finite differences are quick
        if kind == "shazeer2017":
            p = p._replace(router=p.router._replace(noise_weight=r.normal(size=(D, E))))
        sel = route(x, p.router, options.router, draws.router).selection_scores
        if selection_margin(sel, options.router.k) > 1e-3:
            return options, x, p, draws
    raise AssertionError("no tie-free seed")


@pytest.mark.parametrize("kind", ["shazeer2017", "vmoe"])
def test_importance_and_load_losses_are_reported_and_differentiated(kind):
    from moeref import aux_losses as al

    rng = np.random.default_rng(7)
    options, x, p, draws = _gate_loss_case(kind, rng)
    out = sparse_moe_layer(x, p, options, draws)
    k = options.router.k
    if kind == "shazeer2017":  # the aux-loss module's functions on the router's clean and noise logits
        h = out.router.router_input @ p.router.noise_weight
        nd = al.NoisyTopKDraws(draws.router.noise)
        assert_close(out.importance_loss, al.importance_loss(out.logits, h, nd, k, options=options.shazeer_loss))
        assert_close(out.load_loss, al.load_loss(out.logits, h, nd, k, options=options.shazeer_loss))
        # the importance is the batch sum of the router's own gates: the loss sees the layer's noise
        assert_close(out.importance_loss, al.cv_squared(out.scores.sum(0), options=options.shazeer_loss))
    else:
        nd = al.NoisyTopKDraws(draws.router.logit_noise)
        assert_close(out.importance_loss, al.vmoe_importance_loss(out.logits, group_size=3))
        assert_close(out.load_loss, al.vmoe_load_loss(out.logits, nd, k, noise_std=1.0 / E, group_size=3))
    coefs = (options.importance_loss_coef, options.load_loss_coef)
    assert_close(out.aux_loss, coefs[0] * out.importance_loss + coefs[1] * out.load_loss)

    # x and the router's parameters (the losses' new paths; the experts' VJP is checked above),
    # which keeps finite differences through normal_cdf quick
    def forward(x, router):
        from moeref.backends._base import map_tree

        xp = array_namespace(x)
        d, experts = (draws, p.experts) if isinstance(x, np.ndarray) else map_tree(xp.asarray, (draws, p.experts))
        o = sparse_moe_layer(x, p._replace(router=router, experts=experts), options, d)
        return xp.concat([xp.reshape(o.y, (-1,)), xp.stack([o.importance_loss, o.load_loss])])

    def vjp(x, router, ct):
        n = x.shape[0] * x.shape[1]
        aux = SparseMoEAuxCotangents(importance=float(ct[n]), load=float(ct[n + 1]))
        g = sparse_moe_layer_vjp(x, p._replace(router=router), options, np.reshape(ct[:n], x.shape), draws=draws, aux_cotangents=aux)
        return g.x, g.params.router

    ct = rng.normal(size=T * D + 2)
    assert_vjp_correct(f"sparse_moe_layer[{kind} losses]", forward, vjp, (x, p.router), ct, autograd=("torch",))
    # the default cotangents are the coefficients
    g = rng.normal(size=(T, D))
    a = sparse_moe_layer_vjp(x, p, options, g, draws=draws)
    b = sparse_moe_layer_vjp(x, p, options, g, draws=draws, aux_cotangents=SparseMoEAuxCotangents(importance=coefs[0], load=coefs[1]))
    for u, v in zip(leaves(a), leaves(b)):
        assert_close(u, v)


def test_router_scores_priority_orders_tokens_by_the_raw_top1_probability():
    """Normalised before capacity, the weights are g1 / (g1 + g2); fairseq's BPR still sorts by the raw g1."""
    from moeref.capacity import apply_capacity
    from moeref.router import route

    base = SparseMoEOptions(
        router=RouterOptions(k=2, normalize="sum"),
        capacity=CapacityOptions(capacity_factor=0.5, priority="batch_prioritized", priority_values="router_scores"),
    )
    by_weight = dataclasses.replace(base, capacity=dataclasses.replace(base.capacity, priority_values="weights"))
    differ = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x, p = rng.normal(size=(T, D)), make_layer_params(rng, RELU_FFN)
        out = sparse_moe_layer(x, p, base)
        r = route(x, p.router, base.router)
        raw = np.take_along_axis(r.scores, r.routes.expert_index, axis=1)[:, 0]
        want, _ = apply_capacity(r.routes, E, by_weight.capacity, priority=raw)
        np.testing.assert_array_equal(out.routes.kept, want.kept)
        np.testing.assert_array_equal(out.routes.position, want.position)
        differ += not np.array_equal(sparse_moe_layer(x, p, by_weight).routes.position, out.routes.position)
    assert differ > 0  # the two orders are not the same rule


def test_gate_loss_bad_inputs():
    from moeref.aux_losses import SHAZEER_PAPER, SHAZEER_TENSOR2TENSOR

    noisy = RouterOptions(k=2, score="topk_softmax", noisy_top_k=True, noise_epsilon=1e-2)
    with pytest.raises(ValueError, match="options.importance_loss must be one of 'shazeer2017', 'vmoe'"):
        SparseMoEOptions(importance_loss="switch")
    with pytest.raises(ValueError, match="options.load_loss_coef needs options.load_loss"):
        SparseMoEOptions(load_loss_coef=0.1)
    with pytest.raises(ValueError, match="options.importance_loss_coef must be a finite number >= 0"):
        SparseMoEOptions(importance_loss="vmoe", importance_loss_coef=-1.0)
    with pytest.raises(ValueError, match="load_loss='shazeer2017' needs options.router.noisy_top_k=True"):
        SparseMoEOptions(load_loss="shazeer2017", shazeer_loss=SHAZEER_TENSOR2TENSOR)
    with pytest.raises(ValueError, match="load_loss='vmoe' needs options.router.logit_noise_std > 0"):
        SparseMoEOptions(load_loss="vmoe")
    with pytest.raises(ValueError, match="options.shazeer_loss .* must be given exactly when"):
        SparseMoEOptions(router=noisy, importance_loss="shazeer2017")
    with pytest.raises(ValueError, match="options.shazeer_loss .* must be given exactly when"):
        SparseMoEOptions(importance_loss="vmoe", shazeer_loss=SHAZEER_TENSOR2TENSOR)
    with pytest.raises(ValueError, match="shazeer_loss.noise_epsilon=0.0 must equal options.router.noise_epsilon=0.01"):
        SparseMoEOptions(router=noisy, load_loss="shazeer2017", shazeer_loss=SHAZEER_PAPER)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, RELU_FFN)
    p = p._replace(router=p.router._replace(noise_weight=rng.normal(size=(D, E))))
    all_k = dataclasses.replace(noisy, k=E)
    opts = SparseMoEOptions(router=all_k, load_loss="shazeer2017", shazeer_loss=SHAZEER_TENSOR2TENSOR)
    with pytest.raises(ValueError, match="options.load_loss='shazeer2017' needs options.router.k < E"):
        sparse_moe_layer(x, p, opts, SparseMoEDraws(router=RouterDraws(noise=np.zeros((T, E)))))
    plain = SparseMoEOptions(router=RouterOptions(k=2))
    p0 = p._replace(router=p.router._replace(noise_weight=None))
    with pytest.raises(ValueError, match="aux_cotangents.importance is nonzero but options.importance_loss is None"):
        sparse_moe_layer_vjp(x, p0, plain, np.ones((T, D)), aux_cotangents=SparseMoEAuxCotangents(importance=1.0))
    with pytest.raises(ValueError, match="aux_cotangents.load is nonzero but options.load_loss is None"):
        sparse_moe_layer_vjp(x, p0, plain, np.ones((T, D)), aux_cotangents=SparseMoEAuxCotangents(load=1.0))


def test_bad_cotangents_are_refused():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, RELU_FFN)
    opts = SparseMoEOptions(router=RouterOptions(k=2), load_balancing_coef=0.01)
    ct = rng.normal(size=(T, D))
    with pytest.raises(ValueError, match="cotangent_y contains NaN"):
        sparse_moe_layer_vjp(x, p, opts, np.full((T, D), np.nan))
    with pytest.raises(TypeError, match="cotangent_y has dtype float32 but x has dtype float64"):
        sparse_moe_layer_vjp(x, p, opts, ct.astype(np.float32))
    with pytest.raises(TypeError, match=r"different array libraries .*torch: cotangent_y"):
        sparse_moe_layer_vjp(x, p, opts, torch.from_numpy(ct))
    with pytest.raises(ValueError, match="aux_cotangents.load_balancing must be a finite number, got nan"):
        sparse_moe_layer_vjp(x, p, opts, ct, aux_cotangents=SparseMoEAuxCotangents(load_balancing=float("nan")))
    with pytest.raises(TypeError, match="aux_cotangents.z_loss has dtype float32 but x has dtype float64"):
        sparse_moe_layer_vjp(x, p, opts, ct, aux_cotangents=SparseMoEAuxCotangents(z_loss=np.float32(1.0)))


def test_routes_to_switched_off_experts_take_no_capacity_slot():
    """Only expert 2 is live and k = 2: every rank-1 route goes to a switched-off expert, is
    dropped by the router and never counts against that expert's capacity."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, D))
    p = make_layer_params(rng, RELU_FFN, router_bias=True)
    p = p._replace(router=p.router._replace(bias=np.array([-np.inf, -np.inf, 0.0, -np.inf])))
    opts = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), capacity=CapacityOptions(capacity=T, capacity_factor=None))
    out = sparse_moe_layer(x, p, opts)
    assert np.all(out.routes.expert_index[:, 0] == 2) and np.all(out.routes.kept[:, 0]) and not np.any(out.routes.kept[:, 1])
    np.testing.assert_array_equal(out.counts_before, [[0, 0, T, 0]])
    assert_close(out.y, np_ffn(x, p.experts, 2, RELU_FFN))  # weight 1: renormalised over the live route
    g = sparse_moe_layer_vjp(x, p, opts, rng.normal(size=(T, D)), output=out)
    assert all(np.all(np.isfinite(a)) for a in leaves(g))

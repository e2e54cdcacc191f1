"""Sparse upcycling: the upcycled layer reproduces the dense FFN, router initialisations, VJP, backends, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.expert_ffn import GPT_OSS_SWIGLU, RELU_FFN, SWIGLU, ExpertFFN, ExpertFFNParams, expert_ffn
from moeref.router import RouterOptions
from moeref.sparse_moe import SparseMoEOptions, SparseMoEParams, sparse_moe_layer
from moeref.upcycling import (
    FLAXFORMER_ROUTER_INIT,
    LECUN_TRUNCATED_NORMAL_STD,
    VMOE_ROUTER_INIT,
    ZERO_ROUTER_INIT,
    RouterInit,
    upcycle,
    upcycle_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves

SEPARATE_SWIGLU = ExpertFFN(activation="silu", gated=True, gate_up_layout="separate")
FAMILIES = [
    ("relu_bias", RELU_FFN, True, 1.0),
    ("swiglu", SWIGLU, False, 1.0),
    ("swiglu_separate", SEPARATE_SWIGLU, True, 1.0),
    ("gpt_oss", GPT_OSS_SWIGLU, True, 6.0),
]


def make_dense(rng, d, I, ffn, *, bias=True, scale=1.0):
    """One dense FFN in moeref's layout, without the expert axis."""
    K = 2 * I if ffn.fused else I
    separate = ffn.gated and ffn.gate_up_layout == "separate"
    return ExpertFFNParams(
        w_in=scale * rng.normal(size=(d, K)),
        w_out=rng.normal(size=(I, d)),
        b_in=rng.normal(size=K) if bias else None,
        b_out=rng.normal(size=d) if bias else None,
        w_up=scale * rng.normal(size=(d, I)) if separate else None,
        b_up=rng.normal(size=I) if separate and bias else None,
    )


def dense_ffn(x, dense, ffn):
    return expert_ffn(x, ExpertFFNParams(*(None if a is None else a[None] for a in dense)), ffn, expert=0)


def layer(x, params, ffn, k, **router):
    options = SparseMoEOptions(router=RouterOptions(k=k, **router), ffn=ffn)
    return sparse_moe_layer(x, params, options).y


@pytest.mark.parametrize("name,ffn,bias,scale", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_zero_router_and_renormalised_top_k_reproduce_the_dense_ffn_exactly(name, ffn, bias, scale, rng):
    T, d, I, E = 9, 4, 3, 8
    dense, x = make_dense(rng, d, I, ffn, bias=bias, scale=scale), rng.normal(size=(T, d))
    params = upcycle(dense, E, ffn, router_init=ZERO_ROUTER_INIT)
    want = dense_ffn(x, dense, ffn)
    # uniform scores: experts 0..k-1 win (lower index), weight 1/k each; every expert block holds all T
    # tokens in order, so each block's matmul is the dense one, and 1 * y and 0.5 * y + 0.5 * y are exact
    for k in (1, 2):
        assert np.array_equal(layer(x, params, ffn, k, normalize="sum"), want)
    for k in (3, 4):  # 1/3 and sums of four quarters round
        assert_close(layer(x, params, ffn, k, normalize="sum"), want, rtol=1e-14, atol=1e-14)
    assert np.array_equal(layer(x, params, ffn, 2, score="topk_softmax"), want)  # softmax over the winners sums to 1 too


@pytest.mark.parametrize("name,ffn,bias,scale", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_any_router_with_weights_summing_to_one_reproduces_the_dense_ffn(name, ffn, bias, scale, rng):
    T, d, I, E = 9, 4, 3, 6
    dense, x = make_dense(rng, d, I, ffn, bias=bias, scale=scale), rng.normal(size=(T, d))
    params = upcycle(dense, E, ffn, rng.normal(size=(d, E)), router_init=RouterInit(std=3.0, bias=True))
    want = dense_ffn(x, dense, ffn)
    for k in (1, 2, 3):
        assert_close(layer(x, params, ffn, k, normalize="sum"), want, rtol=1e-13, atol=1e-13)
    # without renormalisation (Switch top-1) the output starts scaled by the winning probability
    z = x @ params.router.weight + params.router.bias
    p_max = np.max(np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True), axis=1)
    assert_close(layer(x, params, ffn, 1), p_max[:, None] * want, rtol=1e-13, atol=1e-13)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_upcycled_layer_equals_dense_ffn_property(k, extra, T, seed):
    rng = np.random.default_rng(seed)
    E, d, I = k + extra - 1, 3, 2
    ffn = [RELU_FFN, SWIGLU, GPT_OSS_SWIGLU][seed % 3]
    dense, x = make_dense(rng, d, I, ffn, scale=6.0 if ffn is GPT_OSS_SWIGLU else 1.0), rng.normal(size=(T, d))
    params = upcycle(dense, E, ffn, rng.normal(size=(d, E)), router_init=RouterInit(std=float(seed % 4)))
    assert_close(layer(x, params, ffn, k, normalize="sum"), dense_ffn(x, dense, ffn), rtol=1e-12, atol=1e-12)


def test_experts_are_copies_and_router_follows_its_initialisation(rng):
    d, I, E = 4, 3, 5
    dense, draws = make_dense(rng, d, I, SEPARATE_SWIGLU), rng.normal(size=(d, E))
    p = upcycle(dense, E, SEPARATE_SWIGLU, draws)  # default: flaxformer's N(0, 0.02^2) kernel and zero bias
    assert isinstance(p, SparseMoEParams)
    for f in ExpertFFNParams._fields:
        got, want = getattr(p.experts, f), getattr(dense, f)
        assert got.shape == (E,) + want.shape and all(np.array_equal(got[e], want) for e in range(E))
    assert_close(p.router.weight, 0.02 * draws) and np.array_equal(p.router.bias, np.zeros(E))
    assert FLAXFORMER_ROUTER_INIT.bias and p.router.noise_weight is None and p.router.selection_bias is None
    truncated = np.clip(draws, -2.0, 2.0)
    q = upcycle(dense, E, SEPARATE_SWIGLU, truncated, router_init=VMOE_ROUTER_INIT)  # flax lecun_normal: variance 1/d
    assert_close(q.router.weight, truncated / (LECUN_TRUNCATED_NORMAL_STD * math.sqrt(d))) and q.router.bias is None
    stacked = ExpertFFNParams(*(None if a is None else a[None] for a in dense))  # a leading axis of 1 works too
    assert all(np.array_equal(a, b) for a, b in zip(leaves(upcycle(stacked, E, SEPARATE_SWIGLU, draws)), leaves(p)))


# --------------------------------------------------------------------------------------------
# VJP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stacked", [False, True])
def test_upcycle_vjp(stacked, rng):
    d, I, E = 3, 2, 4
    ffn = SEPARATE_SWIGLU
    dense, draws = make_dense(rng, d, I, ffn), rng.normal(size=(d, E))
    if stacked:
        dense = ExpertFFNParams(*(a[None] for a in dense))
    template = upcycle(dense, E, ffn, draws)
    sizes = [a.size for a in leaves(template)]

    def forward(dense, draws):  # every upcycled parameter, flattened into one vector
        p = upcycle(dense, E, ffn, draws)
        xp = __import__("array_api_compat").array_namespace(p.router.weight)
        return xp.concat([xp.reshape(a, (-1,)) for a in leaves(p)])

    def vjp(dense, draws, ct):
        parts = np.split(np.asarray(ct), np.cumsum(sizes)[:-1])
        shaped = [np.reshape(c, a.shape) for c, a in zip(parts, leaves(template))]
        it = iter(shaped)
        cot = type(template)(*(None if r is None else type(r)(*(None if a is None else next(it) for a in r)) for r in template))
        return tuple(upcycle_vjp(dense, E, ffn, draws, cot))

    assert_vjp_correct(f"upcycle[stacked={stacked}]", forward, vjp, (dense, draws), rng.normal(size=sum(sizes)))


def test_upcycle_vjp_sums_the_copies(rng):
    dense = make_dense(rng, 3, 2, RELU_FFN)
    cot = upcycle(dense, 4, RELU_FFN, router_init=ZERO_ROUTER_INIT)
    cot = cot._replace(experts=ExpertFFNParams(*(rng.normal(size=a.shape) for a in cot.experts if a is not None)))
    g = upcycle_vjp(dense, 4, RELU_FFN, None, cot, router_init=ZERO_ROUTER_INIT)
    assert_close(g.dense.w_in, cot.experts.w_in.sum(0)) and g.router_draws is None


# --------------------------------------------------------------------------------------------
# Every backend
# --------------------------------------------------------------------------------------------


def test_upcycling_agrees_across_backends(backend, rng):
    T, d, I, E = 5, 3, 2, 4
    dense, draws, x = make_dense(rng, d, I, SWIGLU), rng.normal(size=(d, E)), rng.normal(size=(T, d))

    def run(dense, draws, x):
        p = upcycle(dense, E, SWIGLU, draws)
        return p, layer(x, p, SWIGLU, 2, normalize="sum"), upcycle_vjp(dense, E, SWIGLU, draws, p)

    want = run(dense, draws, x)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(dense), t(draws), t(x)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert_close(want[1], dense_ffn(x, dense, SWIGLU), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input(rng):
    d, I, E = 3, 2, 4
    dense, draws = make_dense(rng, d, I, RELU_FFN), rng.normal(size=(d, E))
    with pytest.raises(ValueError, match="num_experts must be at least 1, got 0"):
        upcycle(dense, 0, RELU_FFN, draws)
    with pytest.raises(ValueError, match=r"router_draws has shape \(3, 3\) but \(3, 4\) was expected"):
        upcycle(dense, E, RELU_FFN, draws[:, :3])
    with pytest.raises(ValueError, match=r"router_draws \(shape \(d, E\) = \(3, 4\)\) are required unless router_init.std is 0"):
        upcycle(dense, E, RELU_FFN)
    with pytest.raises(ValueError, match=r"dense.w_out has shape \(2, 2, 3\): a dense FFN is one expert"):
        upcycle(ExpertFFNParams(*(None if a is None else np.stack([a, a]) for a in dense)), E, RELU_FFN, draws)
    with pytest.raises(ValueError, match=r"dense.w_in has shape \(1, 3, 2\) but \(1, 3, 4\) was expected \(gated FFN"):
        upcycle(dense._replace(b_in=None), E, SWIGLU, draws)
    with pytest.raises(ValueError, match=r"truncated to \[-2, 2\]"):
        upcycle(dense, E, RELU_FFN, 3.0 * np.ones((d, E)), router_init=VMOE_ROUTER_INIT)
    with pytest.raises(ValueError, match="router_init.std must be a finite number >= 0 or 'lecun_normal', got -1.0"):
        RouterInit(std=-1.0)
    with pytest.raises(ValueError, match="router_draws contains NaN"):
        upcycle(dense, E, RELU_FFN, np.full((d, E), np.nan))
    with pytest.raises(TypeError, match="dense must be an ExpertFFNParams"):
        upcycle(tuple(dense), E, RELU_FFN, draws)


def test_vjp_checks_the_cotangent_record():
    dense = ExpertFFNParams(w_in=np.ones((2, 3)), w_out=np.ones((3, 2)))
    draws = np.zeros((2, 4))
    ct = upcycle(dense, 4, RELU_FFN, draws)
    with pytest.raises(ValueError, match=r"cotangent.experts.w_in contains NaN"):
        upcycle_vjp(dense, 4, RELU_FFN, draws, ct._replace(experts=ct.experts._replace(w_in=np.full((4, 2, 3), np.nan))))
    with pytest.raises(TypeError, match="cotangent.router must be a RouterParams"):
        upcycle_vjp(dense, 4, RELU_FFN, draws, ct._replace(router=None))
    with pytest.raises(ValueError, match=r"dense.w_in has shape \(2, 3\) but dense.w_out has shape \(1, 3, 2\)"):
        upcycle(dense._replace(w_out=np.ones((1, 3, 2))), 4, RELU_FFN, draws)

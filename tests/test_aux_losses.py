"""Auxiliary losses: forward on every backend, VJPs, direct formulas, properties, bad input."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import norm

from moeref import aux_losses as al
from moeref.aux_losses import (
    DEEPSPEED_TOPK,
    GSHARD,
    GSHARD_PAPER,
    HF_MIXTRAL,
    HF_SWITCH_TRANSFORMERS,
    MEGABLOCKS,
    SHAZEER_PAPER,
    SHAZEER_RAU,
    SHAZEER_TENSOR2TENSOR,
    SWITCH_TRANSFORMER,
    DEEPSEEK_V2_SEQUENCE_BALANCE,
    DEEPSEEK_V3_SEQUENCE_BALANCE,
    LoadBalancingLossOptions,
    NoisyTopKDraws,
    SequenceBalanceLossOptions,
    ShazeerLossOptions,
)
from moeref.routes import Routes
from conftest import assert_close
from helpers import assert_vjp_correct

T, E, K = 8, 4, 2


def _logits(rng, t=T, e=E):
    return rng.normal(size=(t, e))


def _top(z, k):
    return np.argsort(-z, axis=1, kind="stable")[:, :k].astype(np.int64)


def _mask(rng, t=T):
    m = rng.random(t) < 0.7
    m[0] = True
    return m


# --------------------------------------------------------------------------------------------
# Direct NumPy versions, written from the equations (independent of moeref's code paths)
# --------------------------------------------------------------------------------------------


def _direct_balance(z, idx, *, fraction="top1", scale="num_experts", group_size=None, mask=None, mask_mode="exclude"):
    t, e = z.shape
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    k = idx.shape[1]
    ranks = 1 if fraction == "top1" else k
    w = 1.0 / k if fraction == "all_routes_over_k" else 1.0
    c = np.zeros((t, e))
    for tok in range(t):
        for j in range(ranks):
            c[tok, idx[tok, j]] += w
    m = np.ones(t) if mask is None else mask.astype(float)
    s = t if group_size is None else group_size
    losses = []
    for g in range(t // s):
        sl = slice(g * s, (g + 1) * s)
        if mask is not None and mask_mode == "exclude":
            denom = max(m[sl].sum(), 1.0)
        else:
            denom = s
        cm = np.ones(s) if (mask is not None and mask_mode == "probs_only") else m[sl]
        f = (cm[:, None] * c[sl]).sum(0) / denom
        a = np.ones(s) if (mask is not None and mask_mode == "counts_only") else m[sl]
        P = (a[:, None] * p[sl]).sum(0) / denom
        losses.append((e if scale == "num_experts" else 1.0 / e) * np.sum(f * P))
    return np.mean(losses)


def _direct_cv2(v, variance="population", eps=1e-10, size_eps=1e-10):
    n = len(v)
    if variance == "unbiased":
        return np.var(v, ddof=1) / (np.mean(v) ** 2 + eps) if n > 1 else 0.0
    mean = v.sum() / (n + size_eps)
    return np.sum((v - mean) ** 2) / (n + size_eps) / (mean**2 + eps)


def _direct_noisy(clean, noise, eps, k, noise_epsilon=1e-2):
    """tensor2tensor's recipe: thresholds from the (k+1) largest noisy values, is_in by comparison."""
    s = np.log1p(np.exp(noise)) + noise_epsilon
    h = clean + eps * s
    top = -np.sort(-h, axis=1)[:, : k + 1]
    gates = np.where(h >= top[:, k - 1 : k], np.exp(h - top[:, :1]), 0.0)
    gates /= gates.sum(1, keepdims=True)
    if k < h.shape[1]:
        is_in = h > top[:, k : k + 1]
        prob = np.where(is_in, norm.cdf((clean - top[:, k : k + 1]) / s), norm.cdf((clean - top[:, k - 1 : k]) / s))
    else:
        prob = None
    return gates, prob


def _direct_vmoe(z, eps, k, sigma, group_size):
    """google-research/vmoe routing.py, transliterated: per group, population var / mean^2."""
    imp_losses, load_losses = [], []
    for g in range(z.shape[0] // group_size):
        zg, eg = z[g * group_size : (g + 1) * group_size], eps[g * group_size : (g + 1) * group_size]
        gates = np.exp(zg - zg.max(1, keepdims=True))
        gates /= gates.sum(1, keepdims=True)
        importance = gates.sum(0)
        imp_losses.append(np.var(importance) / np.mean(importance) ** 2)
        noisy = zg + sigma * eg
        threshold = -np.sort(-noisy, axis=1)[:, k - 1]  # the k-th largest noisy logit
        p = 1.0 - norm.cdf((threshold[:, None] - zg) / sigma)
        p_mean = p.mean(0)
        load_losses.append(np.var(p_mean) / np.mean(p_mean) ** 2)
    return np.mean(imp_losses), np.mean(load_losses)


# --------------------------------------------------------------------------------------------
# Every backend: one shared set of shapes
# --------------------------------------------------------------------------------------------


def _on(backend, fn, *args):
    """``fn(*args)`` on the backend; under ``jax.jit`` for JAX (one compilation instead of one per eager op)."""
    if backend.name == "jax":
        import jax

        return jax.jit(fn)(*args)
    return fn(*args)


def test_losses_and_vjps_agree_across_backends(backend, rng):
    z, u, eps = _logits(rng), _logits(rng), _logits(rng)
    idx = _top(z, K)
    mask = _mask(rng)
    kept = rng.random((T, K)) < 0.8
    routes = Routes(idx, rng.random((T, K)), kept, np.zeros((T, K), dtype=np.int64))
    z2 = _logits(rng)
    idx2 = _top(z2, K)
    grouped = replace(HF_MIXTRAL, group_size=4, count_dropped_routes=False)
    switch = replace(HF_SWITCH_TRANSFORMERS, group_size=4)

    seq = replace(DEEPSEEK_V3_SEQUENCE_BALANCE, sequence_length=4)
    z_off = np.where(np.arange(E) == 1, -np.inf, z)  # expert 1 switched off

    idx_off = _top(z_off, K)

    def run(z, u, eps, idx, mask, routes, z2, idx2, ct, z_off, idx_off):
        d = NoisyTopKDraws(eps)
        return (
            al.sequence_balance_loss(z_off, K, options=seq),
            al.sequence_balance_loss_vjp(z, idx, ct, options=seq).logits,
            al.sequence_balance_loss_vjp(z_off, K, ct, options=replace(seq, score="softmax")).logits,
            al.load_balancing_loss_vjp(z_off, idx_off, ct, options=HF_MIXTRAL).logits,
            al.router_z_loss(z_off),
            al.router_z_loss_vjp(z_off, ct, mask=mask, mask_mode="zero_logits").logits,
            al.importance_loss(z, u, d, K),
            al.importance_loss_vjp(z, u, d, K, ct)[:2],
            al.load_loss(z, u, d, K, options=SHAZEER_RAU),
            al.load_loss_vjp(z, u, d, K, ct, options=SHAZEER_RAU)[:2],
            al.load_balancing_loss(z, idx),
            al.load_balancing_loss(z, routes, options=grouped, mask=mask),
            al.load_balancing_loss_vjp(z, routes, ct, options=grouped, mask=mask).logits,
            al.load_balancing_loss_vjp(z, idx, ct, options=replace(GSHARD, group_size=4), mask=mask).logits,
            al.multilayer_load_balancing_loss([z, z2], [idx, idx2], options=switch),
            al.multilayer_load_balancing_loss_vjp([z, z2], [idx, idx2], ct, options=switch).logits,
            al.router_z_loss(z, mask=mask),
            al.router_z_loss_vjp(z, ct).logits,
            al.vmoe_importance_loss(z_off, group_size=4),
            al.vmoe_importance_loss_vjp(z, ct, group_size=4).logits,
            al.vmoe_load_loss(z, d, K, noise_std=0.3, group_size=4),
            al.vmoe_load_loss_vjp(z, d, K, ct, noise_std=0.3, group_size=4).logits,
        )

    args = (z, u, eps, idx, mask, routes, z2, idx2, np.asarray(0.7), z_off, idx_off)
    ref = run(*args)
    got = backend.tree_to_numpy(_on(backend, run, *backend.tree_from_numpy(args)))
    from helpers import leaves

    for a, b in zip(leaves(got), leaves(ref)):
        assert_close(a, np.asarray(b))


def test_float32_inputs_stay_float32(backend, rng):
    z = rng.normal(size=(T, E)).astype(np.float32)
    args = backend.tree_from_numpy((z, _top(z, K)))
    out = _on(backend, lambda z, i: (al.load_balancing_loss(z, i), al.router_z_loss(z), al.load_balancing_loss_vjp(z, i, 1.0).logits), *args)
    assert all(backend.to_numpy(o).dtype == np.float32 for o in out)


# --------------------------------------------------------------------------------------------
# Forward against the direct formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", ["top1", "all_routes", "all_routes_over_k"])
@pytest.mark.parametrize("scale", ["num_experts", "mean"])
@pytest.mark.parametrize("mask_mode", [None, "exclude", "counts_only", "probs_only", "zero"])
@pytest.mark.parametrize("group_size", [None, 4])
def test_load_balancing_loss_matches_direct_formula(rng, fraction, scale, mask_mode, group_size):
    z = _logits(rng)
    idx = _top(z, K)
    mask = None if mask_mode is None else _mask(rng)
    opts = LoadBalancingLossOptions(fraction=fraction, scale=scale, group_size=group_size, mask_mode=mask_mode or "exclude")
    got = al.load_balancing_loss(z, idx, options=opts, mask=mask)
    want = _direct_balance(z, idx, fraction=fraction, scale=scale, group_size=group_size, mask=mask, mask_mode=mask_mode or "exclude")
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_presets_pin_the_documented_conventions():
    assert (SWITCH_TRANSFORMER.fraction, SWITCH_TRANSFORMER.scale) == ("top1", "num_experts")
    assert (HF_MIXTRAL.fraction, HF_MIXTRAL.layers, HF_MIXTRAL.mask_mode) == ("all_routes", "pooled", "exclude")
    assert (GSHARD.fraction, GSHARD.scale, GSHARD.mask_mode) == ("top1", "num_experts", "counts_only")
    assert (GSHARD_PAPER.fraction, GSHARD_PAPER.scale) == ("top1", "mean")
    assert DEEPSPEED_TOPK.fraction == MEGABLOCKS.fraction == "all_routes_over_k"
    assert MEGABLOCKS.layers == "averaged"
    assert (SHAZEER_TENSOR2TENSOR.variance, SHAZEER_RAU.variance) == ("population", "unbiased")


def test_dropped_routes_count_unless_told_otherwise(rng):
    z = _logits(rng)
    idx = _top(z, K)
    kept = np.ones((T, K), dtype=bool)
    kept[:3, 1] = False
    routes = Routes(idx, np.ones((T, K)), kept, np.zeros((T, K), dtype=np.int64))
    opts = LoadBalancingLossOptions(fraction="all_routes")
    assert al.load_balancing_loss(z, routes, options=opts) == al.load_balancing_loss(z, idx, options=opts)
    only_kept = al.load_balancing_loss(z, routes, options=replace(opts, count_dropped_routes=False))
    f = np.zeros(E)
    for t in range(T):
        for j in range(K):
            f[idx[t, j]] += kept[t, j] / T
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(only_kept, E * np.sum(f * p.mean(0)), rtol=1e-13)


def test_expert_fractions(rng):
    idx = np.array([[0, 1], [0, 2], [3, 0], [1, 2]])
    f = al.expert_fractions(idx, 4, options=LoadBalancingLossOptions(fraction="all_routes"))
    np.testing.assert_allclose(f, [[3 / 4, 2 / 4, 2 / 4, 1 / 4]])
    f = al.expert_fractions(idx, 4, options=LoadBalancingLossOptions(fraction="top1", group_size=2))
    np.testing.assert_allclose(f, [[1.0, 0, 0, 0], [0, 0.5, 0, 0.5]])


def test_multilayer_aggregation_matches_direct_formulas(rng):
    zs = [_logits(rng) for _ in range(3)]
    idxs = [_top(z, K) for z in zs]
    mask = _mask(rng)
    avg = al.multilayer_load_balancing_loss(zs, idxs, options=replace(HF_MIXTRAL, layers="averaged"), mask=mask)
    np.testing.assert_allclose(avg, np.mean([_direct_balance(z, i, fraction="all_routes", mask=mask) for z, i in zip(zs, idxs)]), rtol=1e-13)
    pooled = al.multilayer_load_balancing_loss(zs, idxs, options=HF_MIXTRAL, mask=mask)
    want = _direct_balance(np.concatenate(zs), np.concatenate(idxs), fraction="all_routes", mask=np.tile(mask, 3))
    np.testing.assert_allclose(pooled, want, rtol=1e-13)
    assert abs(pooled - avg) > 1e-6  # the two aggregations really differ
    # pooled with groups: group g of the pooled problem holds group g of every layer
    opts = replace(HF_SWITCH_TRANSFORMERS, group_size=4)
    pooled_g = al.multilayer_load_balancing_loss(zs, idxs, options=opts)
    gz = np.concatenate([np.concatenate([z[g * 4 : (g + 1) * 4] for z in zs]) for g in range(2)])
    gi = np.concatenate([np.concatenate([i[g * 4 : (g + 1) * 4] for i in idxs]) for g in range(2)])
    np.testing.assert_allclose(pooled_g, _direct_balance(gz, gi, fraction="all_routes", group_size=12), rtol=1e-13)


def test_router_z_loss_matches_direct_formula(rng):
    z = 3.0 * _logits(rng)
    lse = np.log(np.exp(z).sum(1))
    np.testing.assert_allclose(al.router_z_loss(z), np.mean(lse**2), rtol=1e-14)
    mask = _mask(rng)
    np.testing.assert_allclose(al.router_z_loss(z, mask=mask), np.mean(lse[mask] ** 2), rtol=1e-14)
    zeroed = np.where(mask[:, None], z, 0.0)  # flaxformer: padding logits multiplied by 0, mean over all T
    np.testing.assert_allclose(al.router_z_loss(z, mask=mask, mask_mode="zero_logits"), np.mean(np.log(np.exp(zeroed).sum(1)) ** 2), rtol=1e-14)
    big = z + 800.0  # no overflow: lse is computed stably
    np.testing.assert_allclose(al.router_z_loss(big), np.mean((lse + 800.0) ** 2), rtol=1e-14)


@pytest.mark.parametrize("options", [SHAZEER_TENSOR2TENSOR, SHAZEER_RAU, SHAZEER_PAPER], ids=["t2t", "rau", "paper"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_importance_and_load_match_tensor2tensor_recipe(rng, options, k):
    z, u, eps = _logits(rng, 12, E), _logits(rng, 12, E), _logits(rng, 12, E)
    gates, prob = _direct_noisy(z, u, eps, k, options.noise_epsilon)
    d = NoisyTopKDraws(eps)
    np.testing.assert_allclose(al.noisy_top_k_gates(z, u, d, k, options=options), gates, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(al.smooth_load(z, u, d, k, options=options), prob.sum(0), rtol=1e-12)
    cv = lambda v: _direct_cv2(v, options.variance, options.epsilon, options.size_epsilon)  # noqa: E731
    np.testing.assert_allclose(al.importance_loss(z, u, d, k, w_importance=0.1, options=options), 0.1 * cv(gates.sum(0)), rtol=1e-12)
    np.testing.assert_allclose(al.load_loss(z, u, d, k, w_load=0.3, options=options), 0.3 * cv(prob.sum(0)), rtol=1e-12)


@pytest.mark.parametrize("k,group_size", [(1, None), (2, 4), (3, 2)])
def test_vmoe_losses_match_vmoe_routing_py(rng, k, group_size):
    z, eps = _logits(rng, 12, E), _logits(rng, 12, E)
    want_imp, want_load = _direct_vmoe(z, eps, k, 0.25, group_size or 12)
    d = NoisyTopKDraws(eps)
    np.testing.assert_allclose(al.vmoe_importance_loss(z, group_size=group_size), want_imp, rtol=1e-12)
    np.testing.assert_allclose(al.vmoe_load_loss(z, d, k, noise_std=0.25, group_size=group_size), want_load, rtol=1e-10)


def test_vmoe_load_is_the_probability_of_beating_the_threshold_again(rng):
    """p_ti = Pr over a fresh draw of expert i's noise that it beats the current k-th noisy logit (Monte Carlo)."""
    z, eps, sigma, k = rng.normal(size=(1, 5)), rng.normal(size=(1, 5)), 0.7, 2
    noisy = z + sigma * eps
    kth = -np.sort(-noisy, axis=1)[0, k - 1]
    draws = np.random.default_rng(2).normal(size=200_000)
    mc = np.array([np.mean(z[0, i] + sigma * draws > kth) for i in range(5)])
    # with one token the per-expert loads are the probabilities themselves: check them through CV^2
    loss = float(al.vmoe_load_loss(z, NoisyTopKDraws(eps), k, noise_std=sigma))
    assert abs(loss - np.var(mc) / np.mean(mc) ** 2) < 2e-2


def test_smooth_load_is_the_probability_of_staying_in_the_top_k(rng):
    """P(x, i) = Pr over a fresh draw of expert i's noise only that H_i is in the top k (Monte Carlo)."""
    z, u, eps = rng.normal(size=(1, 5)), rng.normal(size=(1, 5)), rng.normal(size=(1, 5))
    k = 2
    prob = np.asarray(al.smooth_load(z, u, NoisyTopKDraws(eps), k))
    s = np.log1p(np.exp(u)) + 1e-2
    draws = np.random.default_rng(1).normal(size=200_000)
    for i in range(5):
        others = np.delete(z + eps * s, i, axis=1)
        kth = -np.sort(-others, axis=1)[0, k - 1]
        mc = np.mean(z[0, i] + draws * s[0, i] > kth)
        assert abs(mc - prob[i]) < 5e-3


def test_cv_squared_matches_direct_formula(rng):
    v = rng.random(6) * 5
    for o in (SHAZEER_TENSOR2TENSOR, SHAZEER_RAU, SHAZEER_PAPER):
        np.testing.assert_allclose(al.cv_squared(v, options=o), _direct_cv2(v, o.variance, o.epsilon, o.size_epsilon), rtol=1e-13)
    assert float(al.cv_squared(np.array([3.0]), options=SHAZEER_RAU)) == 0.0  # Rau's n = 1 rule


def test_balance_loss_can_fall_below_one_with_unbalanced_routing():
    """E sum f P is not bounded below by 1: 3 of 4 tokens on expert 0 at p0 = 0.5+, one certain token on expert 1."""
    z = np.array([[1e-9, 0.0]] * 3 + [[-40.0, 0.0]])
    idx = np.array([[0], [0], [0], [1]])
    loss = float(al.load_balancing_loss(z, idx))
    np.testing.assert_allclose(loss, 0.875, atol=1e-9)
    f = np.array([0.75, 0.25])
    assert loss >= np.sum(f**2) - 1e-12  # the bound that does hold: P_i >= f_i / E


# --------------------------------------------------------------------------------------------
# VJPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [SHAZEER_TENSOR2TENSOR, SHAZEER_RAU, SHAZEER_PAPER], ids=["t2t", "rau", "paper"])
@pytest.mark.parametrize("k", [1, 2])
def test_importance_and_load_loss_vjp(rng, options, k):
    z, u, eps = _logits(rng), _logits(rng), _logits(rng)  # the shapes of the backend test (JAX compiles per shape)
    d = NoisyTopKDraws(eps)
    ct = np.asarray(1.3)

    def imp(c, n, dr):
        return al.importance_loss(c, n, dr, k, w_importance=0.5, options=options)

    def imp_vjp(c, n, dr, g):
        return al.importance_loss_vjp(c, n, dr, k, g, w_importance=0.5, options=options)[:3]

    def load(c, n, dr):
        return al.load_loss(c, n, dr, k, w_load=0.5, options=options)

    def load_vjp(c, n, dr, g):
        return al.load_loss_vjp(c, n, dr, k, g, w_load=0.5, options=options)[:3]

    first = (k, options) == (2, SHAZEER_TENSOR2TENSOR)
    assert_vjp_correct("importance_loss", imp, imp_vjp, (z, u, d), ct, autograd=("torch", "jax") if first else ("torch",))
    # not jax: its eager autograd compiles every op of core.normal_cdf's 200-term continued fraction
    # (~8 s of this file's 30 s budget; under jit, XLA takes longer still)
    assert_vjp_correct("load_loss", load, load_vjp, (z, u, d), ct, autograd=("torch",))


@pytest.mark.parametrize("group_size", [None, 4])
def test_vmoe_loss_vjps(rng, group_size):
    z, d = _logits(rng), NoisyTopKDraws(_logits(rng))  # the shapes of the backend test
    ct = np.asarray(0.9)
    first = group_size is None

    def imp(c):
        return al.vmoe_importance_loss(c, group_size=group_size)

    def imp_vjp(c, g):
        return al.vmoe_importance_loss_vjp(c, g, group_size=group_size)[:1]

    def load(c, dr):
        return al.vmoe_load_loss(c, dr, K, noise_std=0.4, group_size=group_size)

    def load_vjp(c, dr, g):
        return al.vmoe_load_loss_vjp(c, dr, K, g, noise_std=0.4, group_size=group_size)[:2]

    assert_vjp_correct("vmoe_importance_loss", imp, imp_vjp, (z,), ct, autograd=("torch", "jax") if first else ("torch",))
    # not jax, as for load_loss above (normal_cdf's continued fraction)
    assert_vjp_correct("vmoe_load_loss", load, load_vjp, (z, d), ct, autograd=("torch",))


@pytest.mark.parametrize("options", [SHAZEER_TENSOR2TENSOR, SHAZEER_RAU], ids=["t2t", "rau"])
def test_cv_squared_vjp(rng, options):
    v = rng.random(5) + 0.5
    assert_vjp_correct("cv_squared", lambda x: al.cv_squared(x, options=options), lambda x, g: (al.cv_squared_vjp(x, g, options=options),), (v,), np.asarray(0.8))


@pytest.mark.parametrize(
    "options,use_mask",
    [
        (SWITCH_TRANSFORMER, False),
        (replace(HF_MIXTRAL, group_size=4), True),
        (replace(GSHARD, group_size=2), True),
        (GSHARD_PAPER, False),
        (replace(DEEPSPEED_TOPK, mask_mode="zero"), True),
        (replace(HF_MIXTRAL, mask_mode="probs_only"), True),
    ],
    ids=["switch", "mixtral-groups-mask", "gshard-counts-only", "gshard-paper", "topk-zero-mask", "probs-only-mask"],
)
def test_load_balancing_loss_vjp(rng, options, use_mask):
    z = _logits(rng)
    idx = _top(z, K)
    mask = _mask(rng) if use_mask else None
    assert_vjp_correct(
        "load_balancing_loss",
        lambda x, s, m: al.load_balancing_loss(x, s, options=options, mask=m),
        lambda x, s, m, g: al.load_balancing_loss_vjp(x, s, g, options=options, mask=m),
        (z, idx, mask),
        np.asarray(-0.9),
        autograd=("torch", "jax") if options is SWITCH_TRANSFORMER else ("torch",),  # JAX compiles per shape: once
    )


@pytest.mark.parametrize("layers", ["pooled", "averaged"])
def test_multilayer_load_balancing_loss_vjp(rng, layers):
    zs = (_logits(rng), _logits(rng))
    idxs = tuple(_top(z, K) for z in zs)
    opts = replace(HF_SWITCH_TRANSFORMERS, group_size=4, layers=layers)
    assert_vjp_correct(
        "multilayer_load_balancing_loss",
        lambda z, i: al.multilayer_load_balancing_loss(z, i, options=opts),
        lambda z, i, g: (al.multilayer_load_balancing_loss_vjp(z, i, g, options=opts).logits, None),
        (zs, idxs),
        np.asarray(1.1),
        autograd=("torch",),  # pooling is reshapes and concatenations around the checked single-layer loss
    )


@pytest.mark.parametrize("use_mask,mask_mode", [(False, "exclude"), (True, "exclude"), (True, "zero_logits")])
def test_router_z_loss_vjp(rng, use_mask, mask_mode):
    z = _logits(rng)
    mask = _mask(rng) if use_mask else None
    assert_vjp_correct(
        "router_z_loss",
        lambda x, m: al.router_z_loss(x, mask=m, mask_mode=mask_mode),
        lambda x, m, g: (al.router_z_loss_vjp(x, g, mask=m, mask_mode=mask_mode).logits, None),
        (z, mask),
        np.asarray(0.6),
        autograd=("torch", "jax") if not use_mask else ("torch",),
    )


# --------------------------------------------------------------------------------------------
# DeepSeek-V3 sequence-wise balance loss
# --------------------------------------------------------------------------------------------


def test_sequence_balance_loss_hand_computed_case():
    # two sequences of two tokens, E = 3 experts, K = 1; expert 2 is switched off (-inf logit).
    # sigmoid(0) = 1/2, sigmoid(log 3) = 3/4, sigmoid(-inf) = 0.
    l3 = np.log(3.0)
    z = np.array([[0.0, l3, -np.inf], [0.0, l3, -np.inf], [l3, 0.0, -np.inf], [0.0, 0.0, -np.inf]])
    sel = np.array([[1], [1], [0], [0]])
    # sequence 1: s' = (0.4, 0.6, 0) twice, P = (0.4, 0.6, 0); counts (0, 2, 0), f = E/(K T) counts = (0, 3, 0)
    # sequence 2: s' = (0.6, 0.4, 0), (0.5, 0.5, 0), P = (0.55, 0.45, 0); f = (3, 0, 0)
    want = (3 * 0.6 + 3 * 0.55) / 2  # 1.725
    opts = replace(DEEPSEEK_V3_SEQUENCE_BALANCE, sequence_length=2)
    assert_close(al.sequence_balance_loss(z, sel, options=opts), want)
    assert_close(al.sequence_balance_loss(z, Routes(sel, np.ones((4, 1)), np.zeros((4, 1), bool), sel), options=opts), want)
    # K = 1 given as an int: the top-1 affinity; token 4 ties (0, 0): expert 0, the lower index
    assert_close(al.sequence_balance_loss(z, 1, options=opts), want)
    # one sequence of four tokens: P = (0.475, 0.525, 0), counts (2, 2, 0), f = 3/4 * counts
    assert_close(al.sequence_balance_loss(z, sel), 1.5 * 0.475 + 1.5 * 0.525)
    # softmax affinities (DeepSeek-V2): s' = softmax(z) directly
    p = np.exp(np.where(np.isinf(z), -np.inf, z))
    p /= p.sum(1, keepdims=True)
    f = np.array([[0.0, 3.0, 0.0], [3.0, 0.0, 0.0]])
    want_v2 = np.mean(np.sum(f * p.reshape(2, 2, 3).mean(1), axis=1))
    assert_close(al.sequence_balance_loss(z, sel, options=replace(DEEPSEEK_V2_SEQUENCE_BALANCE, sequence_length=2)), want_v2)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_sequence_balance_loss_vjp(rng, score):
    z = _logits(rng)
    z[:, 3] = -np.inf  # an expert switched off: cotangent 0, no NaN
    opts = SequenceBalanceLossOptions(score=score, sequence_length=4)
    assert_vjp_correct(
        f"sequence_balance_loss[{score}]",
        lambda x, s: al.sequence_balance_loss(x, s, options=opts),
        lambda x, s, g: (al.sequence_balance_loss_vjp(x, s, g, options=opts).logits, None),
        (z, _top(z, K)),
        np.asarray(0.8),
        autograd=("torch",),
    )
    assert_vjp_correct(  # K as an int: the loss's own top-K of the affinities, held fixed
        f"sequence_balance_loss[{score}, top-K]",
        lambda x: al.sequence_balance_loss(x, K, options=opts),
        lambda x, g: (al.sequence_balance_loss_vjp(x, K, g, options=opts).logits,),
        (z,),
        np.asarray(0.8),
        autograd=("torch",),
    )
    g = al.sequence_balance_loss_vjp(z, K, 1.0, options=opts).logits
    assert np.all(g[:, 3] == 0) and np.all(np.isfinite(g))


def test_losses_with_minus_inf_logits_are_finite_and_switched_off_experts_get_zero_gradient(rng):
    z = _logits(rng)
    z_off = np.where(np.arange(E) == 2, -np.inf, z)
    live = [0, 1, 3]
    idx = _top(z_off, K)
    assert not np.any(idx == 2)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        # z-loss: the -inf expert adds nothing to log-sum-exp
        assert_close(al.router_z_loss(z_off), al.router_z_loss(z[:, live]))
        g = al.router_z_loss_vjp(z_off, 1.0).logits
        assert_close(g[:, live], al.router_z_loss_vjp(z[:, live], 1.0).logits)
        assert np.all(g[:, 2] == 0)
        # balance loss: probability 0 for the switched-off expert (the scale E still counts it)
        assert_close(al.load_balancing_loss(z_off, idx, options=HF_MIXTRAL), _direct_balance(z_off, idx, fraction="all_routes"))
        g = al.load_balancing_loss_vjp(z_off, idx, 1.0, options=HF_MIXTRAL).logits
        assert np.all(g[:, 2] == 0) and np.all(np.isfinite(g))
        for mask_mode in ("exclude", "zero_logits"):
            mask = _mask(rng)
            assert np.isfinite(float(al.router_z_loss(z_off, mask=mask, mask_mode=mask_mode)))
            assert np.all(np.isfinite(al.router_z_loss_vjp(z_off, 1.0, mask=mask, mask_mode=mask_mode).logits))
    assert_vjp_correct(
        "load_balancing_loss[-inf]",
        lambda x, i: al.load_balancing_loss(x, i, options=HF_MIXTRAL),
        lambda x, i, c: (al.load_balancing_loss_vjp(x, i, c, options=HF_MIXTRAL).logits, None),
        (z_off, idx),
        np.asarray(0.7),
        autograd=("torch",),
    )
    assert_vjp_correct(
        "router_z_loss[-inf]",
        lambda x: al.router_z_loss(x),
        lambda x, c: (al.router_z_loss_vjp(x, c).logits,),
        (z_off,),
        np.asarray(0.7),
        autograd=("torch",),
    )
    # a padding row may be all -inf; a counted one has no finite z-loss
    dead = np.where(np.arange(T)[:, None] == 3, -np.inf, z)
    mask = np.arange(T) != 3
    assert np.isfinite(float(al.router_z_loss(dead, mask=mask)))
    with pytest.raises(ValueError, match="logits row 3 is -inf for every expert"):
        al.router_z_loss(dead)
    assert np.isfinite(float(al.load_balancing_loss(dead, _top(z, K))))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_finite = st.floats(-6, 6, allow_nan=False)


@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_balance_loss_equals_one_when_assignment_is_uniform_property(per_expert, e, data):
    t = per_expert * e
    z = data.draw(hnp.arrays(np.float64, (t, e), elements=_finite))
    idx = np.asarray(data.draw(st.permutations(list(range(e)) * per_expert)), dtype=np.int64)[:, None]
    np.testing.assert_allclose(al.load_balancing_loss(z, idx), 1.0, rtol=1e-12)


@given(st.integers(1, 8), st.integers(1, 5), st.sampled_from(["top1", "all_routes", "all_routes_over_k"]), st.data())
def test_balance_loss_equals_total_fraction_when_probabilities_are_uniform_property(t, e, fraction, data):
    k = data.draw(st.integers(1, e))
    idx = np.stack([data.draw(st.permutations(range(e)))[:k] for _ in range(t)]).astype(np.int64)
    want = {"top1": 1.0, "all_routes": float(k), "all_routes_over_k": 1.0}[fraction]
    got = al.load_balancing_loss(np.zeros((t, e)), idx, options=LoadBalancingLossOptions(fraction=fraction))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@given(st.integers(1, 8), st.integers(1, 5), st.data())
def test_switch_balance_loss_is_at_least_its_minimum_property(t, e, data):
    """With the top-1 of the same logits, P_i >= f_i / E, so E sum f P >= sum f^2 >= 1/E."""
    z = data.draw(hnp.arrays(np.float64, (t, e), elements=_finite))
    idx = _top(z, 1)
    f = np.bincount(idx[:, 0], minlength=e) / t
    loss = float(al.load_balancing_loss(z, idx))
    assert loss >= np.sum(f**2) * (1 - 1e-12) >= 1.0 / e * (1 - 1e-12)


@given(st.integers(2, 8), st.integers(1, 5), st.data())
def test_balance_loss_is_invariant_to_relabelling_experts_property(t, e, data):
    z = data.draw(hnp.arrays(np.float64, (t, e), elements=_finite))
    idx = _top(z, min(2, e))
    perm = np.asarray(data.draw(st.permutations(range(e))))
    inv = np.argsort(perm)
    opts = LoadBalancingLossOptions(fraction="all_routes")
    np.testing.assert_allclose(al.load_balancing_loss(z[:, perm], inv[idx], options=opts), al.load_balancing_loss(z, idx, options=opts), rtol=1e-12)


@given(st.integers(1, 6), st.floats(0.1, 100), st.sampled_from([SHAZEER_TENSOR2TENSOR, SHAZEER_RAU, SHAZEER_PAPER]))
def test_cv_squared_is_zero_for_equal_loads_property(n, load, options):
    assert float(al.cv_squared(np.full(n, load), options=options)) == pytest.approx(0.0, abs=1e-15)


@given(hnp.arrays(np.float64, st.integers(2, 6), elements=st.floats(0.01, 50)), st.floats(0.1, 10))
def test_cv_squared_is_nonnegative_and_scale_free_property(v, c):
    cv = float(al.cv_squared(v, options=SHAZEER_PAPER))
    assert cv >= 0
    np.testing.assert_allclose(al.cv_squared(c * v, options=SHAZEER_PAPER), cv, rtol=1e-9, atol=1e-15)


@given(st.integers(1, 6), st.integers(1, 5), st.floats(-20, 20), st.data())
def test_router_z_loss_shift_property(t, e, c, data):
    z = data.draw(hnp.arrays(np.float64, (t, e), elements=_finite))
    lse = np.log(np.exp(z).sum(1))
    np.testing.assert_allclose(al.router_z_loss(z + c), np.mean((lse + c) ** 2), rtol=1e-10, atol=1e-12)


@given(st.integers(1, 4), st.integers(2, 5), st.data())
def test_pooled_equals_averaged_for_identical_layers_property(t, e, data):
    z = data.draw(hnp.arrays(np.float64, (t, e), elements=_finite))
    idx = _top(z, 1)
    pooled = al.multilayer_load_balancing_loss([z, z], [idx, idx], options=HF_MIXTRAL)
    averaged = al.multilayer_load_balancing_loss([z, z], [idx, idx], options=replace(HF_MIXTRAL, layers="averaged"))
    np.testing.assert_allclose(pooled, averaged, rtol=1e-12)


@given(st.integers(1, 4), st.integers(2, 5), st.floats(-30, 30), st.data())
def test_vmoe_losses_are_invariant_to_a_per_token_shift_of_the_logits_property(t, e, c, data):
    z = data.draw(hnp.arrays(np.float64, (t, e), elements=_finite))
    eps = data.draw(hnp.arrays(np.float64, (t, e), elements=st.floats(-3, 3)))
    k = data.draw(st.integers(1, e))
    shift = c * np.arange(1, t + 1)[:, None]  # softmax and the margins to the threshold ignore it
    d = NoisyTopKDraws(eps)
    np.testing.assert_allclose(al.vmoe_importance_loss(z + shift), al.vmoe_importance_loss(z), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(
        al.vmoe_load_loss(z + shift, d, k, noise_std=0.5), al.vmoe_load_loss(z, d, k, noise_std=0.5), rtol=1e-7, atol=1e-10
    )


@given(st.integers(2, 6), st.data())
def test_smooth_load_sums_close_to_k_times_tokens_for_small_noise_property(e, data):
    """As the noise scale shrinks, P(x, i) -> 1 for the top k of the clean logits and 0 otherwise."""
    k = data.draw(st.integers(1, e - 1))
    z = np.stack([np.asarray(data.draw(st.permutations(range(e))), dtype=float) for _ in range(3)])
    u = np.full_like(z, -30.0)  # softplus(-30) ~ 1e-13
    opts = replace(SHAZEER_TENSOR2TENSOR, noise_epsilon=1e-3)
    load = np.asarray(al.smooth_load(z, u, NoisyTopKDraws(np.zeros_like(z)), k, options=opts))
    want = np.asarray([(z[:, i] >= e - k).sum() for i in range(e)], dtype=float)
    np.testing.assert_allclose(load, want, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    z = _logits(rng)
    idx = _top(z, K)
    d = NoisyTopKDraws(_logits(rng))
    with pytest.raises(ValueError, match="logits contains NaN"):
        al.load_balancing_loss(np.full_like(z, np.nan), idx)
    with pytest.raises(ValueError, match="logits contains NaN"):
        al.router_z_loss(np.where(z > 0, np.inf, z))
    with pytest.raises(ValueError, match="logits contains NaN"):
        al.sequence_balance_loss(np.where(z > 0, np.nan, z), idx)
    with pytest.raises(ValueError, match="sequence_length=3 does not divide the number of tokens T=8"):
        al.sequence_balance_loss(z, idx, options=SequenceBalanceLossOptions(sequence_length=3))
    with pytest.raises(ValueError, match="sequence_length must be None or a positive int"):
        SequenceBalanceLossOptions(sequence_length=0)
    with pytest.raises(ValueError, match="score must be one of"):
        SequenceBalanceLossOptions(score="tanh")
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        al.sequence_balance_loss(z, 5)
    with pytest.raises(TypeError, match="options must be a SequenceBalanceLossOptions"):
        al.sequence_balance_loss(z, idx, options=HF_MIXTRAL)
    with pytest.raises(ValueError, match=r"selection has shape \(7, 2\) but \(8, \*\) was expected"):
        al.load_balancing_loss(z, idx[:7])
    with pytest.raises(ValueError, match="expert indices outside"):
        al.load_balancing_loss(z, idx + 3)
    with pytest.raises(ValueError, match="k=5 routes per token but must have between 1 and E=4"):
        al.load_balancing_loss(z, np.zeros((T, 5), dtype=np.int64))
    with pytest.raises(TypeError, match="selection must be an integer array"):
        al.load_balancing_loss(z, idx.astype(float))
    with pytest.raises(ValueError, match="group_size=3 does not divide the number of tokens T=8"):
        al.load_balancing_loss(z, idx, options=LoadBalancingLossOptions(group_size=3))
    with pytest.raises(ValueError, match="group_size must be None or a positive int"):
        LoadBalancingLossOptions(group_size=0)
    with pytest.raises(ValueError, match="fraction must be one of"):
        LoadBalancingLossOptions(fraction="top2")
    with pytest.raises(ValueError, match="variance must be one of"):
        ShazeerLossOptions(variance="sample")
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        ShazeerLossOptions(epsilon=-1.0)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        al.load_balancing_loss(z, idx, mask=np.ones(T))
    with pytest.raises(ValueError, match=r"mask has shape \(5,\) but \(8,\) was expected"):
        al.router_z_loss(z, mask=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="k must be between 1 and 3 for E=4 experts \\(the smooth load"):
        al.load_loss(z, z, d, 4)
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        al.importance_loss(z, z, d, 0)
    with pytest.raises(TypeError, match="draws must be a NoisyTopKDraws"):
        al.importance_loss(z, z, d.normal, 1)
    with pytest.raises(ValueError, match=r"draws.normal has shape \(8, 3\)"):
        al.importance_loss(z, z, NoisyTopKDraws(z[:, :3]), 1)
    with pytest.raises(ValueError, match=r"noise_logits has shape"):
        al.load_loss(z, z[:4], d, 1)
    with pytest.raises(TypeError, match="options must be a LoadBalancingLossOptions"):
        al.load_balancing_loss(z, idx, options=SHAZEER_RAU)
    with pytest.raises(ValueError, match=r"selections has 1 entries but logits_per_layer has 2 layers"):
        al.multilayer_load_balancing_loss([z, z], [idx])
    with pytest.raises(ValueError, match=r"logits_per_layer\[1\] has shape"):
        al.multilayer_load_balancing_loss([z, z[:4]], [idx, idx[:4]])
    with pytest.raises(ValueError, match="mask_mode must be one of 'exclude', 'zero_logits'"):
        al.router_z_loss(z, mask=np.ones(T, dtype=bool), mask_mode="zero")
    with pytest.raises(TypeError, match="different array libraries"):
        al.router_z_loss(z, mask=pytest.importorskip("torch").ones(T, dtype=pytest.importorskip("torch").bool))
    with pytest.raises(TypeError, match="cotangent has dtype float32 but logits has dtype float64"):
        al.router_z_loss_vjp(z, np.asarray(1.0, dtype=np.float32))
    with pytest.raises(ValueError, match="group_size=3 must divide the number of tokens T=8"):
        al.vmoe_importance_loss(z, group_size=3)
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        al.vmoe_load_loss(z, d, 1, noise_std=0.1, group_size=0)
    with pytest.raises(ValueError, match="noise_std must be a finite positive number"):
        al.vmoe_load_loss(z, d, 1, noise_std=0.0)
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        al.vmoe_load_loss(z, d, 5, noise_std=0.1)
    with pytest.raises(TypeError, match="draws must be a NoisyTopKDraws"):
        al.vmoe_load_loss(z, d.normal, 1, noise_std=0.1)
    with pytest.raises(ValueError, match=r"draws.normal has shape \(8, 3\)"):
        al.vmoe_load_loss_vjp(z, NoisyTopKDraws(z[:, :3]), 1, 1.0, noise_std=0.1)
    with pytest.raises(ValueError, match="logits contains"):
        al.vmoe_load_loss(np.where(z > 0, -np.inf, z), d, 1, noise_std=0.1)
    with pytest.raises(ValueError, match="logits contains NaN"):
        al.vmoe_importance_loss(np.where(z > 0, np.nan, z))
    with pytest.raises(TypeError, match="selection.kept must be a boolean"):
        al.load_balancing_loss(z, Routes(idx, np.ones((T, K)), np.ones((T, K)), idx))


def test_options_selections_cotangents_and_layers_are_named(rng):
    torch = pytest.importorskip("torch")
    z = _logits(rng)
    idx = _top(z, K)
    d = NoisyTopKDraws(_logits(rng))
    v = rng.uniform(0.5, 2.0, size=E)
    with pytest.raises(TypeError, match="options must be a ShazeerLossOptions, got NoneType"):
        al.cv_squared(v, options=None)
    for fn in (al.noisy_top_k_gates, al.smooth_load, al.importance_loss, al.load_loss):
        with pytest.raises(TypeError, match="options must be a ShazeerLossOptions, got NoneType"):
            fn(z, z, d, K, options=None)
    for fn in (al.load_balancing_loss, al.sequence_balance_loss):
        with pytest.raises(TypeError, match=r"selection must be an integer array of expert indices, shape \(T, k\), or a Routes record; got None"):
            fn(z, None)
    with pytest.raises(TypeError, match="selection.kept must be an array, got None"):
        al.load_balancing_loss(z, Routes(idx, np.ones(idx.shape), None, np.zeros_like(idx)))
    # cotangents of the scalar losses: finite, and of the library and dtype of the named input
    with pytest.raises(TypeError, match="cotangent has dtype float64 but v has dtype float32"):
        al.cv_squared_vjp(v.astype(np.float32), np.array(1.0))
    with pytest.raises(TypeError, match=r"different array libraries .*torch: v"):
        al.cv_squared_vjp(torch.from_numpy(v), np.array(1.0))
    for bad in (np.array(np.nan), np.array(np.inf), float("nan")):
        with pytest.raises(ValueError, match="cotangent (contains NaN|must be a finite number)"):
            al.load_balancing_loss_vjp(z, idx, bad)
    with pytest.raises(ValueError, match=r"cotangent has shape \(1,\) but \(\) was expected \(the loss is a scalar\)"):
        al.router_z_loss_vjp(z, np.ones(1))
    # expert_fractions names its own arguments, never `logits`
    with pytest.raises(TypeError, match=r"different array libraries .*torch: selection; numpy: mask"):
        al.expert_fractions(torch.from_numpy(idx), E, mask=np.ones(T, bool))
    with pytest.raises(ValueError, match=r"selection holds expert indices outside \[0, 2\) \(num_experts=2\)"):
        al.expert_fractions(idx + 1, 2)
    # multilayer losses name the layer
    z1 = _logits(rng)
    i1 = _top(z1, K)
    with pytest.raises(TypeError, match="logits_per_layer\\[0\\]: float64, logits_per_layer\\[1\\]: float32"):
        al.multilayer_load_balancing_loss((z, z1.astype(np.float32)), (idx, i1))
    with pytest.raises(TypeError, match=r"different array libraries .*torch: logits_per_layer\[1\]"):
        al.multilayer_load_balancing_loss_vjp((z, torch.from_numpy(z1)), (idx, i1), 1.0)
    with pytest.raises(ValueError, match=r"logits_per_layer\[1\] contains NaN"):
        al.multilayer_load_balancing_loss((z, np.full_like(z1, np.nan)), (idx, i1))
    with pytest.raises(TypeError, match=r"selections\[1\] must be an integer array .* got None"):
        al.multilayer_load_balancing_loss((z, z1), (idx, None))
    with pytest.raises(ValueError, match=r"selections\[0\] holds expert indices outside \[0, 4\) \(E=4 experts in logits_per_layer\[0\]\)"):
        al.multilayer_load_balancing_loss((z, z1), (idx + E, i1))
    with pytest.raises(TypeError, match="logits_per_layer must be a list or tuple with one entry per layer, got NoneType"):
        al.multilayer_load_balancing_loss(None, (idx, i1))

"""Soft MoE: forward against a direct NumPy transcription, VJPs (finite differences, torch, jax), every
backend, dispatch/combine properties, non-causality, slot counts, presets, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.core import array_namespace
from moeref.expert_ffn import GEGLU, GELU_FFN, GELU_TANH_FFN, RELU_FFN, SWIGLU, ExpertFFN, ExpertFFNParams
from moeref.soft_moe import (
    SOFT_MOE_PRESETS,
    SoftMoEOptions,
    SoftMoEParams,
    vmoe,
    soft_moe_layer,
    soft_moe_layer_vjp,
    soft_moe_pytorch,
    soft_moe_slots,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params as make_expert_params
from test_expert_ffn import np_ffn

M, D, N, P, I = 4, 3, 2, 2, 3  # tokens, features, experts, slots per expert, FFN width
IDENTITY = ExpertFFN(activation="identity")


def make_params(rng, ffn=GELU_TANH_FFN, *, n=N, p=P, d=D, scale=True, gains=False, bias=True):
    return SoftMoEParams(
        phi=rng.normal(size=(d, n, p)),
        experts=make_expert_params(rng, n, d, I, ffn, bias=bias, scale=0.7),
        scale=np.asarray(rng.uniform(0.5, 2.0)) if scale else None,
        token_norm_weight=rng.uniform(0.5, 1.5, size=d) if gains else None,
        slot_norm_weight=rng.uniform(0.5, 1.5, size=d) if gains else None,
    )


# --------------------------------------------------------------------------------------------
# Direct NumPy transcription of the equations (one sequence at a time)
# --------------------------------------------------------------------------------------------


def np_normalize(v, kind, eps):
    """Along the last axis, written from the definitions in the implementations' source."""
    if kind == "none":
        return v
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if kind == "l2":
        return v / np.sqrt(norm**2 + eps)
    if kind == "rms":
        return v / np.maximum(norm, eps) * np.sqrt(v.shape[-1])
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + eps)


def np_softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_soft_moe(x, params, options, noise=None):
    """Y = C f(D^T M) for every sequence of x (m, d) or (B, m, d); returns (y, D, C)."""
    if x.ndim == 3:
        outs = [np_soft_moe(x[b], params, options, None if noise is None else noise[b]) for b in range(x.shape[0])]
        return tuple(np.stack(a) for a in zip(*outs))
    d, n, p = params.phi.shape
    ones = np.ones(d)
    g_x = ones if params.token_norm_weight is None else params.token_norm_weight
    g_s = ones if params.slot_norm_weight is None else params.slot_norm_weight
    xn = np_normalize(x, options.normalization, options.norm_eps) * g_x  # (m, d)
    Phi = params.phi.reshape(d, n * p)  # column j = e p + s
    Phin = (np_normalize(Phi.T, options.normalization, options.norm_eps) * g_s).T  # (d, n p)
    L = (xn @ Phin) * (1.0 if params.scale is None else float(params.scale))
    if noise is not None:
        L = L + noise
    Dw, Cw = np_softmax(L, 0), np_softmax(L, 1)
    mixed = x if options.mixed_tokens == "original" else xn
    Xs = Dw.T @ mixed  # (n p, d)
    Ys = np.concatenate([np_ffn(Xs[e * p : (e + 1) * p], params.experts, e, options.ffn) for e in range(n)])
    return Cw @ Ys, Dw, Cw


# configurations: (options, params kwargs, batched, with noise)
CASES = {
    "vmoe": (vmoe(capacity_factor=None), {"scale": True}, False, False),
    "soft_moe_pytorch_batched": (soft_moe_pytorch(capacity_factor=None), {"scale": False, "gains": True}, True, False),
    "layer_norm_geglu_noise": (
        SoftMoEOptions(normalization="layer_norm", mixed_tokens="normalized", ffn=GEGLU),
        {"gains": True, "bias": False},
        True,
        True,
    ),
    "paper_plain_swiglu": (SoftMoEOptions(normalization="none", ffn=SWIGLU), {"scale": False, "bias": False}, False, True),
}


def case_inputs(name, seed=0):
    options, kw, batched, noisy = CASES[name]
    rng = np.random.default_rng(seed)
    params = make_params(rng, options.ffn, **kw)
    shape = (2, M, D) if batched else (M, D)
    x = rng.normal(size=shape)
    noise = 0.3 * rng.normal(size=shape[:-1] + (N * P,)) if noisy else None
    return rng, x, params, options, noise


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_numpy_transcription(name):
    _, x, params, options, noise = case_inputs(name)
    out = soft_moe_layer(x, params, options, logit_noise=noise)
    y, Dw, Cw = np_soft_moe(x, params, options, noise)
    assert_close(out.y, y)
    assert_close(out.dispatch_weights, Dw)
    assert_close(out.combine_weights, Cw)
    assert out.logits.shape == x.shape[:-1] + (N * P,)
    assert out.slot_inputs.shape == out.slot_outputs.shape == x.shape[:-2] + (N * P, D)


@pytest.mark.parametrize("name", list(CASES))
def test_vjp(name):
    rng, x, params, options, noise = case_inputs(name)

    def forward(x, params):  # the noise is held fixed, as an array of x's library
        eps = None if noise is None else array_namespace(x).asarray(noise)
        return soft_moe_layer(x, params, options, logit_noise=eps).y

    def vjp(x, params, ct):
        return soft_moe_layer_vjp(x, params, options, ct, logit_noise=noise)

    # finite differences + torch.autograd; jax.vjp is left out (eager JAX compiles every op of the
    # forward and its transpose for every new shape: ~15 s here); the backend test below runs the
    # analytic VJP on JAX against NumPy
    assert_vjp_correct(f"soft_moe_layer[{name}]", forward, vjp, (x, params), rng.normal(size=x.shape), autograd=("torch",))


def test_vjp_has_a_cotangent_for_every_parameter():
    rng, x, params, options, _ = case_inputs("soft_moe_pytorch_batched")
    params = params._replace(scale=np.asarray(1.5))
    g = soft_moe_layer_vjp(x, params, options, rng.normal(size=x.shape))
    for field in SoftMoEParams._fields:
        assert getattr(g.params, field) is not None, field
    for got, want in zip(leaves(g.params), leaves(params)):
        assert got.shape == want.shape


def test_rms_below_the_floor_is_linear():
    """soft-moe-pytorch's F.normalize clamps the norm at eps: a tiny token is scaled by sqrt(d)/eps."""
    rng = np.random.default_rng(5)
    params = make_params(rng, GELU_FFN, scale=False)
    options = soft_moe_pytorch(capacity_factor=None, eps=1e-3)
    x = rng.normal(size=(M, D))
    x[1] *= 1e-4 / np.linalg.norm(x[1])  # |x_1| = 1e-4 < eps
    out = soft_moe_layer(x, params, options)
    assert_close(out.y, np_soft_moe(x, params, options)[0])

    def forward(x, params):
        return soft_moe_layer(x, params, options).y

    def vjp(x, params, ct):
        return soft_moe_layer_vjp(x, params, options, ct)

    assert_vjp_correct("soft_moe_layer[rms_floor]", forward, vjp, (x, params), rng.normal(size=x.shape), rtol=1e-5, autograd=("torch",))


# --------------------------------------------------------------------------------------------
# Every backend equals NumPy (one configuration, one shape)
# --------------------------------------------------------------------------------------------


def test_soft_moe_agrees_across_backends(backend):
    rng, x, params, options, noise = case_inputs("layer_norm_geglu_noise")
    params = params._replace(scale=np.asarray(1.3))
    ct = rng.normal(size=x.shape)

    def run(x, params, noise, ct):
        return (soft_moe_layer(x, params, options, logit_noise=noise), soft_moe_layer_vjp(x, params, options, ct, logit_noise=noise))

    want = run(x, params, noise, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(params), t(noise), t(ct)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 6),
    n=st.integers(1, 3),
    p=st.integers(1, 3),
    normalization=st.sampled_from(["none", "l2", "rms", "layer_norm"]),
)
def test_dispatch_columns_and_combine_rows_sum_to_one_property(seed, m, n, p, normalization):
    rng = np.random.default_rng(seed)
    params = make_params(rng, RELU_FFN, n=n, p=p)
    x = 3.0 * rng.normal(size=(2, m, D))
    out = soft_moe_layer(x, params, SoftMoEOptions(normalization=normalization, ffn=RELU_FFN))
    assert np.all(out.dispatch_weights >= 0) and np.all(out.combine_weights >= 0)
    assert_close(out.dispatch_weights.sum(axis=-2), np.ones((2, n * p)), rtol=1e-12, atol=1e-12)
    assert_close(out.combine_weights.sum(axis=-1), np.ones((2, m)), rtol=1e-12, atol=1e-12)
    # each slot input is a convex combination of the tokens: inside their bounding box
    assert np.all(out.slot_inputs <= x.max(axis=-2, keepdims=True) + 1e-12)
    assert np.all(out.slot_inputs >= x.min(axis=-2, keepdims=True) - 1e-12)


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6), normalization=st.sampled_from(["none", "l2", "rms"]))
def test_one_expert_one_slot_identity_gives_every_token_the_dispatch_weighted_mean_property(seed, m, normalization):
    rng = np.random.default_rng(seed)
    eye = np.eye(D)[None]
    params = SoftMoEParams(phi=rng.normal(size=(D, 1, 1)), experts=ExpertFFNParams(w_in=eye, w_out=eye), scale=np.asarray(2.0))
    x = rng.normal(size=(m, D))
    out = soft_moe_layer(x, params, SoftMoEOptions(normalization=normalization, ffn=IDENTITY))
    assert_close(out.combine_weights, np.ones((m, 1)))  # one slot: every token takes all of it
    w = out.dispatch_weights[:, 0]
    mean = w @ x  # the softmax-over-tokens weighted average
    assert_close(out.y, np.broadcast_to(mean, (m, D)), rtol=1e-12, atol=1e-14)


@given(seed=st.integers(0, 2**31 - 1))
def test_token_permutation_equivariance_property(seed):
    """No positions: permuting the tokens of a sequence permutes its outputs."""
    rng = np.random.default_rng(seed)
    params = make_params(rng, GELU_TANH_FFN)
    x = rng.normal(size=(5, D))
    perm = rng.permutation(5)
    a, b = soft_moe_layer(x, params), soft_moe_layer(x[perm], params)
    assert_close(b.y, a.y[perm], rtol=1e-10, atol=1e-12)
    assert_close(b.slot_inputs, a.slot_inputs, rtol=1e-10, atol=1e-12)


def test_not_causal_a_later_token_changes_an_earlier_output():
    """The seed's point: D is a softmax over all tokens, so y_0 depends on x_{m-1} (no causal mask)."""
    rng = np.random.default_rng(11)
    params = make_params(rng, GELU_TANH_FFN)
    x = rng.normal(size=(M, D))
    x_later = x.copy()
    x_later[-1] += 1.0
    y, y_later = soft_moe_layer(x, params).y, soft_moe_layer(x_later, params).y
    assert np.max(np.abs(y_later[0] - y[0])) > 1e-3
    # and the gradient of y_0 w.r.t. the last token is non-zero
    ct = np.zeros((M, D))
    ct[0] = 1.0
    assert np.max(np.abs(soft_moe_layer_vjp(x, params, SoftMoEOptions(), ct).x[-1])) > 1e-3


def test_sequences_of_a_batch_are_routed_separately():
    rng, x, params, options, _ = case_inputs("soft_moe_pytorch_batched")
    out = soft_moe_layer(x, params, options)
    for b in range(x.shape[0]):
        assert_close(out.y[b], soft_moe_layer(x[b], params, options).y)
    x2 = x.copy()
    x2[1] += 1.0  # another sequence changes: sequence 0 does not
    assert_close(soft_moe_layer(x2, params, options).y[0], out.y[0])


# --------------------------------------------------------------------------------------------
# Slot count, presets
# --------------------------------------------------------------------------------------------


def test_slot_count_from_a_capacity_factor():
    assert soft_moe_slots(196, 128, 1.0) == 2  # round(1.53)
    assert soft_moe_slots(10, 4, 1.0) == 2  # round(2.5) = 2, half to even (Python round, V-MoE)
    assert soft_moe_slots(14, 4, 1.0) == 4  # round(3.5) = 4
    assert soft_moe_slots(10, 4, 1.0, rounding="floor") == 2  # soft-moe-pytorch seq_len // num_experts
    assert soft_moe_slots(10, 4, 1.0, rounding="ceil") == 3
    assert soft_moe_slots(8, 2, 0.5) == 2
    with pytest.raises(ValueError, match=r"gives p = round_half_even\(0.1 \* 4 / 4\) = 0 slots per expert"):
        soft_moe_slots(4, 4, 0.1)


def test_capacity_factor_and_slots_per_expert_are_checked_against_phi():
    rng = np.random.default_rng(2)
    params = make_params(rng)  # p = 2 slots, n = 2 experts
    x = rng.normal(size=(M, D))
    soft_moe_layer(x, params, vmoe())  # round(1.0 * 4 / 2) = 2
    soft_moe_layer(x, params, vmoe(slots_per_expert=2))
    with pytest.raises(ValueError, match=r"options.capacity_factor=2.0 with m=4 tokens and n=2 experts gives p = .* = 4"):
        soft_moe_layer(x, params, vmoe(capacity_factor=2.0))
    with pytest.raises(ValueError, match="params.phi has p=2 slots per expert but options.slots_per_expert=3"):
        soft_moe_layer(x, params, vmoe(slots_per_expert=3))


def test_presets():
    assert set(SOFT_MOE_PRESETS) == {"vmoe", "soft_moe_pytorch"}
    bv, lr = vmoe(), soft_moe_pytorch()
    fields = ("normalization", "norm_eps", "mixed_tokens", "slot_rounding", "ffn")
    assert tuple(getattr(bv, f) for f in fields) == ("l2", 1e-6, "original", "round_half_even", GELU_TANH_FFN)
    assert tuple(getattr(lr, f) for f in fields) == ("rms", 1e-12, "normalized", "floor", GELU_FFN)
    assert bv.capacity_factor == lr.capacity_factor == 1.0
    assert vmoe(slots_per_expert=1).capacity_factor is None
    assert SoftMoEOptions(normalization="layer_norm").norm_eps == 1e-5


def test_mixed_tokens_option_matters_unless_normalisation_is_identity():
    rng = np.random.default_rng(4)
    params = make_params(rng)
    x = rng.normal(size=(M, D))
    a = soft_moe_layer(x, params, vmoe(mixed_tokens="original"))
    b = soft_moe_layer(x, params, vmoe(mixed_tokens="normalized"))
    assert np.max(np.abs(a.y - b.y)) > 1e-3
    assert_close(a.dispatch_weights, b.dispatch_weights)  # the routing is the same
    none = SoftMoEOptions(normalization="none")
    assert_close(soft_moe_layer(x, params, none).y, soft_moe_layer(x, params, dataclasses.replace(none, mixed_tokens="normalized")).y)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    x = rng.normal(size=(M, D))
    opts = SoftMoEOptions()
    with pytest.raises(ValueError, match="options.slots_per_expert must be at least 1, got 0"):
        SoftMoEOptions(slots_per_expert=0)
    with pytest.raises(ValueError, match="give one"):
        SoftMoEOptions(slots_per_expert=2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="options.capacity_factor must be a finite positive number"):
        SoftMoEOptions(capacity_factor=0.0)
    with pytest.raises(ValueError, match="options.normalization must be one of"):
        SoftMoEOptions(normalization="batch_norm")
    with pytest.raises(ValueError, match="options.mixed_tokens must be one of"):
        SoftMoEOptions(mixed_tokens="both")
    with pytest.raises(ValueError, match="options.eps must be a finite positive number"):
        SoftMoEOptions(eps=-1.0)
    with pytest.raises(ValueError, match=r"params.phi has p=0 slots per expert"):
        soft_moe_layer(x, params._replace(phi=np.zeros((D, N, 0))), opts)
    with pytest.raises(ValueError, match=r"params.phi has shape \(4, 2, 2\) but \(3, \*, \*\) was expected"):
        soft_moe_layer(x, params._replace(phi=np.zeros((D + 1, N, P))), opts)
    with pytest.raises(ValueError, match="params.experts has n=2 experts but params.phi has n=3"):
        soft_moe_layer(x, params._replace(phi=np.zeros((D, 3, P))), opts)
    with pytest.raises(ValueError, match="x must be 2 or 3-dimensional"):
        soft_moe_layer(x[0], params, opts)
    with pytest.raises(ValueError, match="x has no tokens"):
        soft_moe_layer(x[:0], params, opts)
    with pytest.raises(ValueError, match=r"params.scale has shape \(1,\) but \(\) was expected"):
        soft_moe_layer(x, params._replace(scale=np.ones(1)), opts)
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match="params.scale contains NaN or infinite values"):
            soft_moe_layer(x, params._replace(scale=np.asarray(bad)), opts)
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        soft_moe_layer(np.where(np.arange(D) == 0, np.nan, x), params, opts)
    with pytest.raises(ValueError, match=r"params.token_norm_weight has shape \(2,\)"):
        soft_moe_layer(x, params._replace(token_norm_weight=np.ones(2)), opts)
    with pytest.raises(ValueError, match="logit_noise has shape"):
        soft_moe_layer(x, params, opts, logit_noise=np.zeros((M, N)))
    with pytest.raises(ValueError, match="cotangent_y has shape"):
        soft_moe_layer_vjp(x, params, opts, np.ones((M, D + 1)))
    with pytest.raises(TypeError, match="params must be a SoftMoEParams"):
        soft_moe_layer(x, (params.phi, params.experts), opts)
    with pytest.raises(TypeError, match="options must be a SoftMoEOptions"):
        soft_moe_layer(x, params, vmoe)
    with pytest.raises(TypeError, match="mixed"):
        import torch

        soft_moe_layer(torch.tensor(x), params, opts)

"""Shared experts (DeepSeek add, Qwen2-MoE sigmoid gate, DeepSpeed Residual MoE, NLLB-200 CMR):
direct formulas, the layer equals the sum of its parts, VJPs, every backend, properties, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.core import array_namespace
from moeref.expert_ffn import RELU_FFN, SWIGLU, ExpertFFNParams
from moeref.router import RouterOptions, RouterParams
from moeref.shared_experts import (
    SharedExpertOptions,
    SharedExpertParams,
    combine_shared_experts,
    combine_shared_experts_vjp,
)
from moeref.sparse_moe import (
    SparseMoEAuxCotangents,
    SparseMoEOptions,
    SparseMoEParams,
    sparse_moe_layer,
    sparse_moe_layer_value_and_vjp,
    sparse_moe_layer_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params as make_ffn_params
from test_expert_ffn import np_ffn

T, D, I, E = 6, 3, 2, 3

KINDS = ("add", "sigmoid_gate", "residual_softmax", "nllb_cmr")
OPTIONS = {
    "add": SharedExpertOptions("add", SWIGLU),  # DeepSeek-V3
    "sigmoid_gate": SharedExpertOptions("sigmoid_gate", SWIGLU),  # Qwen2-MoE
    "residual_softmax": SharedExpertOptions("residual_softmax", RELU_FFN),  # DeepSpeed
    "nllb_cmr": SharedExpertOptions("nllb_cmr", RELU_FFN, budget=0.3, budget_loss_coef=0.5),  # NLLB-200
}


def make_shared(rng, kind, *, S=1):
    opts = OPTIONS[kind]
    width = opts.gate_width
    biased = kind in ("residual_softmax", "nllb_cmr")  # DeepSpeed's and fairseq's gates have a bias, Qwen2's none
    return SharedExpertParams(
        ffn=make_ffn_params(rng, S, D, I, opts.ffn, bias=opts.ffn is RELU_FFN),
        gate_weight=rng.normal(size=(D, width)) if width else None,
        gate_bias=rng.normal(size=(width,)) if width and biased else None,
    )


def np_combine(x, r, p, kind):
    """y = a r + b o, written out per kind from the sources' formulas."""
    o = sum(np_ffn(x, p.ffn, s, OPTIONS[kind].ffn) for s in range(p.ffn.w_out.shape[0]))
    if kind == "add":
        return r + o
    h = x @ p.gate_weight + (0.0 if p.gate_bias is None else p.gate_bias)
    if kind == "sigmoid_gate":
        return r + o / (1.0 + np.exp(-h))
    if kind == "residual_softmax":
        c = np.exp(h - h.max(1, keepdims=True))
        c /= c.sum(1, keepdims=True)
        return r * c[:, :1] + o * c[:, 1:]  # coef[..., 0:1] on the MoE output, as deepspeed/moe/layer.py
    g = 1.0 / (1.0 + np.exp(-h))
    return g * r + (1.0 - g) * o  # fairseq CMRLayer: x_ffn * (1 - gates) + x_moe * gates


# --------------------------------------------------------------------------------------------
# The combination on its own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_combine_matches_the_systems_formulas_and_its_vjp(rng, kind):
    x, r = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    p = make_shared(rng, kind)
    opts = OPTIONS[kind]
    out = combine_shared_experts(x, r, p, opts)
    assert_close(out.y, np_combine(x, r, p, kind))
    assert_close(out.y, out.routed_coef * r + out.shared_coef * out.shared_y)
    has_budget = opts.budget is not None
    if has_budget:
        g = 1.0 / (1.0 + np.exp(-(x @ p.gate_weight + p.gate_bias)))
        assert_close(out.budget_loss, abs(g.mean() - opts.budget))

    def forward(x, r, p):
        o = combine_shared_experts(x, r, p, opts)
        xp = array_namespace(o.y)
        flat = xp.reshape(o.y, (-1,))
        return xp.concat([flat, xp.reshape(o.budget_loss, (1,))]) if has_budget else flat

    def vjp(x, r, p, ct):
        n = T * D
        extra = {"budget_cotangent": float(ct[n])} if has_budget else {}
        return combine_shared_experts_vjp(x, r, p, opts, np.reshape(ct[:n], (T, D)), **extra)

    ct = rng.normal(size=T * D + (1 if has_budget else 0))
    assert_vjp_correct(f"combine_shared_experts[{kind}]", forward, vjp, (x, r, p), ct, autograd=("torch",))


def test_deepseek_fused_shared_experts_equal_the_sum_of_separate_ones(rng):
    # n_shared_experts = 2 fused into one SwiGLU of width 2I (HF DeepseekV3MLP) = two SwiGLUs summed
    x, r = rng.normal(size=(T, D)), np.zeros((T, D))
    sep = make_shared(rng, "add", S=2)
    g = [sep.ffn.w_in[s][:, :I] for s in range(2)]
    u = [sep.ffn.w_in[s][:, I:] for s in range(2)]
    fused = SharedExpertParams(
        ExpertFFNParams(w_in=np.concatenate(g + u, axis=1)[None], w_out=np.concatenate(list(sep.ffn.w_out), axis=0)[None])
    )
    opts = OPTIONS["add"]
    assert_close(combine_shared_experts(x, r, fused, opts).y, combine_shared_experts(x, r, sep, opts).y)
    ct = rng.normal(size=(T, D))
    assert_close(combine_shared_experts_vjp(x, r, fused, opts, ct).x, combine_shared_experts_vjp(x, r, sep, opts, ct).x)


# --------------------------------------------------------------------------------------------
# In the layer
# --------------------------------------------------------------------------------------------


def layer_case(rng, kind):
    options = SparseMoEOptions(router=RouterOptions(k=2, normalize="sum"), ffn=SWIGLU, load_balancing_coef=0.1, shared=OPTIONS[kind])
    params = SparseMoEParams(
        router=RouterParams(rng.normal(size=(D, E))),
        experts=make_ffn_params(rng, E, D, I, SWIGLU, bias=False),
        shared=make_shared(rng, kind),
    )
    return options, params


def tie_free(rng, kind):
    for _ in range(50):
        options, params = layer_case(rng, kind)
        x = rng.normal(size=(T, D))
        z = np.exp(x @ params.router.weight)
        s = -np.sort(-z / z.sum(1, keepdims=True), axis=1)
        if np.min(s[:, 1] - s[:, 2]) > 1e-3:
            return options, params, x
    raise AssertionError("no tie-free case")


@pytest.mark.parametrize("kind", KINDS)
def test_layer_output_is_the_sum_of_its_parts(rng, kind):
    options, params, x = tie_free(rng, kind)
    out = sparse_moe_layer(x, params, options)
    routed_only = sparse_moe_layer(x, params._replace(shared=None), dataclasses.replace(options, shared=None))
    assert_close(out.routed_y, routed_only.y)
    assert_close(out.y, np_combine(x, routed_only.y, params.shared, kind))
    assert_close(out.shared.y, out.y)
    want_aux = 0.1 * out.load_balancing_loss + (0.5 * out.shared.budget_loss if kind == "nllb_cmr" else 0.0)
    assert_close(out.aux_loss, want_aux)


@pytest.mark.parametrize("kind", ["sigmoid_gate", "nllb_cmr"])
def test_layer_vjp_with_shared_experts(rng, kind):
    # nllb_cmr: the routed output enters the gate's cotangent, and the budget loss is differentiated
    options, params, x = tie_free(rng, kind)

    def forward(x, p):
        o = sparse_moe_layer(x, p, options)
        xp = array_namespace(o.y)
        extra = [o.load_balancing_loss] + ([o.shared.budget_loss] if kind == "nllb_cmr" else [])
        return xp.concat([xp.reshape(o.y, (-1,)), xp.stack(extra)])

    def vjp(x, p, ct):
        n = T * D
        aux = SparseMoEAuxCotangents(load_balancing=float(ct[n]), shared_budget=float(ct[n + 1]) if kind == "nllb_cmr" else 0.0)
        return sparse_moe_layer_vjp(x, p, options, np.reshape(ct[:n], (T, D)), aux_cotangents=aux)

    ct = rng.normal(size=T * D + (2 if kind == "nllb_cmr" else 1))
    assert_vjp_correct(f"sparse_moe_layer[shared {kind}]", forward, vjp, (x, params), ct, autograd=("torch",))
    # the forward's output may be handed to the VJP: same numbers, no second routing pass
    out = sparse_moe_layer(x, params, options)
    ct_y = rng.normal(size=(T, D))
    for u, v in zip(leaves(sparse_moe_layer_vjp(x, params, options, ct_y, output=out)), leaves(sparse_moe_layer_vjp(x, params, options, ct_y))):
        assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_value_and_vjp_with_shared_experts(rng, kind):
    """One call gives the forward's output and the VJP's cotangents exactly; for residual_softmax
    and nllb_cmr (mixing weights that depend on the routed output) through the fallback that runs
    the experts' forward first."""
    options, params, x = tie_free(rng, kind)
    ct = rng.normal(size=(T, D))
    aux = SparseMoEAuxCotangents(load_balancing=0.3, shared_budget=0.7 if kind == "nllb_cmr" else 0.0)
    out, grads = sparse_moe_layer_value_and_vjp(x, params, options, ct, aux_cotangents=aux)
    for u, v in zip(leaves(out), leaves(sparse_moe_layer(x, params, options)), strict=True):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(leaves(grads), leaves(sparse_moe_layer_vjp(x, params, options, ct, aux_cotangents=aux)), strict=True):
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------------------------
# Every backend
# --------------------------------------------------------------------------------------------


def test_shared_experts_agree_across_backends(backend, rng):
    x, r, ct = rng.normal(size=(T, D)), rng.normal(size=(T, D)), rng.normal(size=(T, D))
    cases = [(kind, make_shared(rng, kind)) for kind in KINDS]

    def run(x, r, ct, cases):
        return [
            (combine_shared_experts(x, r, p, OPTIONS[kind]), combine_shared_experts_vjp(x, r, p, OPTIONS[kind], ct, budget_cotangent=0.5))
            for kind, p in cases
        ]

    want = run(x, r, ct, cases)
    t = backend.tree_from_numpy
    args = (t(x), t(r), t(ct), [(kind, t(p)) for kind, p in cases])
    if backend.name == "jax":  # one compilation for the whole run (static shapes throughout)
        import jax

        got = jax.jit(lambda x, r, ct, ps: run(x, r, ct, list(zip(KINDS, ps))))(*args[:3], [p for _, p in args[3]])
    else:
        got = run(*args)
    for a, b in zip(leaves(backend.tree_to_numpy(got)), leaves(want)):
        assert_close(a, b)
    if backend.name == "jax":
        return  # the layer itself is eager only (data-dependent blocks); test_sparse_moe runs it on JAX
    options, params, x = tie_free(rng, "nllb_cmr")

    def layer(x, p, ct):
        out = sparse_moe_layer(x, p, options)
        return out.y, out.routed_y, out.shared.budget_loss, out.aux_loss, sparse_moe_layer_vjp(x, p, options, ct)

    want = layer(x, params, ct)
    got = backend.tree_to_numpy(layer(t(x), t(params), t(ct)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["residual_softmax", "nllb_cmr"]))
def test_mixing_coefficients_are_a_convex_pair_property(seed, kind):
    rng = np.random.default_rng(seed)
    x, r = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    out = combine_shared_experts(x, r, make_shared(rng, kind), OPTIONS[kind])
    a, b = out.routed_coef, out.shared_coef
    assert np.all((a >= 0) & (b >= 0)) and np.allclose(a + b, 1.0, rtol=0, atol=1e-15)
    # each output lies on the segment between the routed and the shared output
    assert_close(out.y, r + b * (out.shared_y - r), rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1))
def test_sigmoid_gate_tends_to_add_for_a_large_gate_logit_property(seed):
    rng = np.random.default_rng(seed)
    x, r = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    p = make_shared(rng, "sigmoid_gate")
    opened = p._replace(gate_weight=np.zeros((D, 1)), gate_bias=np.array([40.0]))  # sigma(40) = 1 - 4e-18
    added = combine_shared_experts(x, r, SharedExpertParams(p.ffn), OPTIONS["add"]).y
    assert_close(combine_shared_experts(x, r, opened, OPTIONS["sigmoid_gate"]).y, added, rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, r = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    p = make_shared(rng, "residual_softmax")
    opts = OPTIONS["residual_softmax"]
    with pytest.raises(ValueError, match=r"params.gate_weight has shape \(3, 2\) but \(3, 1\) was expected"):
        combine_shared_experts(x, r, p._replace(gate_bias=None), OPTIONS["nllb_cmr"])
    with pytest.raises(ValueError, match=r"needs params.gate_weight, shape \(3, 2\)"):
        combine_shared_experts(x, r, p._replace(gate_weight=None), opts)
    with pytest.raises(ValueError, match="must be None for shared kind='add'"):
        combine_shared_experts(x, r, p, SharedExpertOptions("add", RELU_FFN))
    with pytest.raises(ValueError, match=r"params.gate_bias has shape \(1,\) but \(2,\) was expected"):
        combine_shared_experts(x, r, p._replace(gate_bias=np.zeros(1)), opts)
    with pytest.raises(ValueError, match=r"routed_y has shape \(5, 3\)"):
        combine_shared_experts(x, r[:5], p, opts)
    with pytest.raises(ValueError, match="params.ffn.w_in"):
        combine_shared_experts(x, r, p, SharedExpertOptions("residual_softmax", SWIGLU))
    with pytest.raises(TypeError, match="params.ffn must be an? ExpertFFNParams, got NoneType"):
        combine_shared_experts(x, r, p._replace(ffn=None), opts)
    with pytest.raises(TypeError, match="params.ffn must be an? ExpertFFNParams, got tuple"):
        combine_shared_experts_vjp(x, r, p._replace(ffn=tuple(p.ffn)), opts, np.ones((T, D)))
    with pytest.raises(ValueError, match="shared.kind must be one of"):
        SharedExpertOptions("gated")
    with pytest.raises(ValueError, match="needs kind='nllb_cmr'"):
        SharedExpertOptions("add", budget=0.5)
    with pytest.raises(ValueError, match=r"shared.budget must be a fraction in \[0, 1\]"):
        SharedExpertOptions("nllb_cmr", budget=1.5)
    with pytest.raises(ValueError, match="budget_loss_coef needs shared.budget"):
        SharedExpertOptions("nllb_cmr", budget_loss_coef=0.1)
    with pytest.raises(ValueError, match="x contains NaN"):
        combine_shared_experts(np.full((T, D), np.nan), r, p, opts)
    options, params = layer_case(rng, "add")
    with pytest.raises(ValueError, match="params.shared must be given exactly when options.shared is set"):
        sparse_moe_layer(x, params._replace(shared=None), options)
    with pytest.raises(ValueError, match="aux_cotangents.shared_budget is nonzero"):
        sparse_moe_layer_vjp(x, params, options, np.ones((T, D)), aux_cotangents=SparseMoEAuxCotangents(shared_budget=1.0))
    with pytest.raises(TypeError, match="options.shared must be a SharedExpertOptions"):
        SparseMoEOptions(shared="add")


def test_bad_cotangents_are_refused(rng):
    torch = pytest.importorskip("torch")
    x, r = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    p = make_shared(rng, "nllb_cmr")
    opts = OPTIONS["nllb_cmr"]
    ct = rng.normal(size=(T, D))
    with pytest.raises(ValueError, match="cotangent contains NaN"):
        combine_shared_experts_vjp(x, r, p, opts, np.full((T, D), np.inf))
    with pytest.raises(TypeError, match="cotangent has dtype float32 but x has dtype float64"):
        combine_shared_experts_vjp(x, r, p, opts, ct.astype(np.float32))
    with pytest.raises(TypeError, match=r"different array libraries .*torch: cotangent"):
        combine_shared_experts_vjp(x, r, p, opts, torch.from_numpy(ct))
    with pytest.raises(ValueError, match=r"cotangent has shape \(6, 2\) but \(6, 3\) was expected"):
        combine_shared_experts_vjp(x, r, p, opts, ct[:, :2])
    with pytest.raises(ValueError, match="budget_cotangent must be a finite number, got nan"):
        combine_shared_experts_vjp(x, r, p, opts, ct, budget_cotangent=float("nan"))
    with pytest.raises(ValueError, match="budget_cotangent contains NaN"):
        combine_shared_experts_vjp(x, r, p, opts, ct, budget_cotangent=np.array(np.nan))

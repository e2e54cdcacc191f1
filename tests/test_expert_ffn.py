"""Expert FFN families: forward against direct NumPy formulas on every backend, VJPs, layouts, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import erf
from scipy.special import expit as scipy_expit

from moeref.expert_ffn import (
    GEGLU,
    GELU_FFN,
    GELU_TANH_FFN,
    GPT_OSS_SWIGLU,
    RELU_FFN,
    SWIGLU,
    ExpertFFN,
    ExpertFFNParams,
    batched_expert_ffn,
    batched_expert_ffn_vjp,
    expert_ffn,
    expert_ffn_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves

SEPARATE_SWIGLU = ExpertFFN(activation="silu", gated=True, gate_up_layout="separate")
REGLU_INTERLEAVED = ExpertFFN(activation="relu", gated=True, gate_up_layout="interleaved")
GLU_SIGMOID = ExpertFFN(activation="sigmoid", gated=True)
BILINEAR = ExpertFFN(activation="identity", gated=True, gate_up_layout="separate")

# (id, ffn, with biases, weight scale: GPT-OSS's is large enough that some gate/up values pass the clamp)
FAMILIES = [
    ("relu", RELU_FFN, True, 1.0),
    ("gelu", GELU_FFN, True, 1.0),
    ("gelu_tanh", GELU_TANH_FFN, False, 1.0),
    ("swiglu", SWIGLU, False, 1.0),
    ("swiglu_separate", SEPARATE_SWIGLU, True, 1.0),
    ("geglu", GEGLU, True, 1.0),
    ("reglu_interleaved", REGLU_INTERLEAVED, False, 1.0),
    ("glu_sigmoid", GLU_SIGMOID, False, 1.0),
    ("bilinear", BILINEAR, False, 1.0),
    ("gpt_oss", GPT_OSS_SWIGLU, True, 6.0),
]


# --------------------------------------------------------------------------------------------
# Direct NumPy formulas (independent of moeref's code)
# --------------------------------------------------------------------------------------------


def np_act(h, ffn):
    a = ffn.activation
    if a == "relu":
        return np.maximum(h, 0.0)
    if a == "gelu":
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if a == "gelu_tanh":
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if a == "silu":
        return h / (1.0 + np.exp(-ffn.swish_beta * h))
    if a == "sigmoid":
        return 1.0 / (1.0 + np.exp(-h))
    return h


def np_ffn(x, p, e, ffn):
    """FFN_e(x) for rows x (n, d), written out from the equations."""
    def add(v, b):
        return v if b is None else v + b[e]

    if not ffn.gated:
        return add(np_act(add(x @ p.w_in[e], p.b_in), ffn) @ p.w_out[e], p.b_out)
    I = p.w_out.shape[1]
    if ffn.gate_up_layout == "separate":
        g, u = add(x @ p.w_in[e], p.b_in), add(x @ p.w_up[e], p.b_up)
    else:
        h = add(x @ p.w_in[e], p.b_in)
        g, u = (h[:, 0::2], h[:, 1::2]) if ffn.gate_up_layout == "interleaved" else (h[:, :I], h[:, I:])
    if ffn.clamp_limit is not None:
        g = np.minimum(g, ffn.clamp_limit)
        u = np.clip(u, -ffn.clamp_limit, ffn.clamp_limit)
    return add((np_act(g, ffn) * (u + ffn.up_offset)) @ p.w_out[e], p.b_out)


def make_params(rng, E, d, I, ffn, *, bias=True, scale=1.0):
    K = 2 * I if ffn.fused else I
    separate = ffn.gated and ffn.gate_up_layout == "separate"
    return ExpertFFNParams(
        w_in=scale * rng.normal(size=(E, d, K)),
        w_out=rng.normal(size=(E, I, d)),
        b_in=rng.normal(size=(E, K)) if bias else None,
        b_out=rng.normal(size=(E, d)) if bias else None,
        w_up=scale * rng.normal(size=(E, d, I)) if separate else None,
        b_up=rng.normal(size=(E, I)) if separate and bias else None,
    )


# --------------------------------------------------------------------------------------------
# Forward on every backend
# --------------------------------------------------------------------------------------------


def test_expert_ffn_families_match_numpy_formulas_on_every_backend(backend, rng):
    E, n, d, I = 2, 5, 4, 3
    x = rng.normal(size=(n, d))
    xb = rng.normal(size=(E, n, d))
    for name, ffn, bias, scale in FAMILIES:
        p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
        if ffn is GPT_OSS_SWIGLU:
            assert_clamp_active(x, p, 1)
        bp = backend.tree_from_numpy(p)
        got = backend.to_numpy(expert_ffn(backend.from_numpy(x), bp, ffn, expert=1))
        assert_close(got, np_ffn(x, p, 1, ffn), rtol=1e-12, atol=1e-12, err_msg=name)
        got = backend.to_numpy(batched_expert_ffn(backend.from_numpy(xb), bp, ffn))
        want = np.stack([np_ffn(xb[e], p, e, ffn) for e in range(E)])
        assert_close(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


def assert_clamp_active(x, p, e):
    """The GPT-OSS test data must reach both sides of the clamp (gate > 7, |up| > 7) and stay inside it too."""
    h = x @ p.w_in[e] + p.b_in[e]
    assert np.any(h[:, 0::2] > 7.0) and np.any(h[:, 0::2] < 7.0)
    assert np.any(np.abs(h[:, 1::2]) > 7.0) and np.any(np.abs(h[:, 1::2]) < 7.0)


def test_gelu_tanh_is_close_to_exact_gelu_and_relu_kink():
    h = np.linspace(-6, 6, 241)[:, None]
    p = ExpertFFNParams(w_in=np.ones((1, 1, 1)), w_out=np.ones((1, 1, 1)))
    exact = expert_ffn(h, p, GELU_FFN, expert=0)
    approx = expert_ffn(h, p, GELU_TANH_FFN, expert=0)
    assert np.max(np.abs(exact - approx)) < 1e-3
    assert_close(exact, 0.5 * h * (1 + erf(h / math.sqrt(2))), rtol=1e-13, atol=1e-15)
    # the exact GELU keeps relative precision far in the left tail (erfc form)
    far = expert_ffn(np.array([[-30.0]]), p, GELU_FFN, expert=0)[0, 0]
    assert far < 0 and np.isfinite(far) and abs(far / (-30.0 * 0.5 * math.erfc(30 / math.sqrt(2))) - 1) < 1e-12


def test_float32_stays_float32(rng):
    p = make_params(rng, 2, 4, 3, SWIGLU)
    p32 = ExpertFFNParams(*(None if a is None else a.astype(np.float32) for a in p))
    y = expert_ffn(rng.normal(size=(3, 4)).astype(np.float32), p32, SWIGLU, expert=0)
    assert y.dtype == np.float32


def _swish_gate_params(dtype, beta_scale=1.0):
    """d = 1, I = 1 SwiGLU whose gate pre-activation is the input row and whose up projection is 1."""
    return ExpertFFNParams(
        w_in=np.array([[[beta_scale, 0.0]]], dtype=dtype),
        w_out=np.ones((1, 1, 1), dtype=dtype),
        b_in=np.array([[0.0, 1.0]], dtype=dtype),
        b_out=np.zeros((1, 1), dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ffn", [SWIGLU, ExpertFFN(activation="silu", gated=True, swish_beta=1.702)], ids=["beta1", "beta1.702"])
def test_silu_keeps_relative_accuracy_and_never_overflows(dtype, ffn):
    """h / (1 + e^{-beta h}) over the whole range, far tails included, without a floating-point warning."""
    g = np.array([-1e4, -800.0, -710.0, -100.0, -88.5, -40.0, -20.0, -1.0, -1e-8, 0.0, 1e-8, 1.0, 20.0, 100.0, 1e4])
    g = g[np.abs(g) < np.finfo(dtype).max / 2].astype(dtype)[:, None]
    p = _swish_gate_params(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = expert_ffn(g, p, ffn, expert=0)[:, 0]
        grads = expert_ffn_vjp(g, p, ffn, np.ones_like(g), expert=0)
    b = ffn.swish_beta
    gl = g[:, 0].astype(np.longdouble)
    s = scipy_expit(b * gl)
    want, want_grad = gl * s, s + b * gl * s * (1 - s)
    cap = math.floor(math.log(float(np.finfo(dtype).max)))  # e^{-beta h} is capped at e^{cap}
    ordinary = b * gl >= -cap
    eps = float(np.finfo(dtype).eps)
    rel = np.abs(got[ordinary] - want[ordinary]) / np.maximum(np.abs(want[ordinary]), np.finfo(dtype).tiny)
    # exp(-beta h) has condition number |beta h|: the rounding of beta h costs that many ulp
    assert np.all(rel < eps * (8 + 2 * np.abs(b * gl[ordinary]))), (g[ordinary, 0], got[ordinary], want[ordinary])
    assert np.all(np.abs(got[~ordinary]) <= np.abs(gl[~ordinary]) * 1.01 * math.exp(-cap))  # absolute, far below tiny * |h|
    assert np.all(np.isfinite(grads.x)) and np.all(np.isfinite(grads.params.w_in))
    assert_close(grads.x[:, 0].astype(np.float64), want_grad.astype(np.float64), rtol=8 * eps, atol=4 * eps)


def test_finiteness_check_names_the_parameter_and_accepts_huge_finite_weights(rng):
    x = rng.normal(size=(5, 4))
    p = make_params(rng, 2, 4, 3, SWIGLU)
    for field in ("w_in", "w_out", "b_in", "b_out"):
        a = getattr(p, field).copy()
        a.flat[-1] = -np.inf
        with pytest.raises(ValueError, match=f"params.{field} contains NaN or infinite values"):
            expert_ffn(x, p._replace(**{field: a}), SWIGLU, expert=0)
    huge = p._replace(w_out=np.full_like(p.w_out, 1e308))  # column sums overflow; every value is finite
    with np.errstate(over="ignore"):
        expert_ffn(x, huge, SWIGLU, expert=0)


# --------------------------------------------------------------------------------------------
# VJPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ffn,bias,scale", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_expert_ffn_vjp(name, ffn, bias, scale, rng):
    E, n, d, I = 2, 4, 3, 2
    x, p = rng.normal(size=(n, d)), make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
    if ffn is GPT_OSS_SWIGLU:
        assert_clamp_active(x, p, 1)
    ct = rng.normal(size=(n, d))
    assert_vjp_correct(
        f"expert_ffn[{name}]",
        lambda x, p: expert_ffn(x, p, ffn, expert=1),
        lambda x, p, c: expert_ffn_vjp(x, p, ffn, c, expert=1),
        (x, p),
        ct,
    )


@pytest.mark.parametrize("name,ffn,bias,scale", [FAMILIES[0], FAMILIES[9]], ids=["relu", "gpt_oss"])
def test_batched_expert_ffn_vjp(name, ffn, bias, scale, rng):
    E, C, d, I = 2, 3, 3, 2
    x, p = rng.normal(size=(E, C, d)), make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
    assert_vjp_correct(
        f"batched_expert_ffn[{name}]",
        lambda x, p: batched_expert_ffn(x, p, ffn),
        lambda x, p, c: batched_expert_ffn_vjp(x, p, ffn, c),
        (x, p),
        rng.normal(size=(E, C, d)),
    )


def test_expert_ffn_vjp_is_zero_for_other_experts_and_none_for_absent_biases(rng):
    p = make_params(rng, 3, 4, 2, SWIGLU, bias=False)
    g = expert_ffn_vjp(rng.normal(size=(5, 4)), p, SWIGLU, rng.normal(size=(5, 4)), expert=2)
    assert g.params.b_in is None and g.params.b_out is None and g.params.w_up is None
    assert np.all(g.params.w_in[:2] == 0) and np.all(g.params.w_out[:2] == 0)
    assert np.any(g.params.w_in[2] != 0)


def test_vjps_agree_across_backends(backend, rng):
    E, n, d, I = 2, 5, 4, 3
    x, xb = rng.normal(size=(n, d)), rng.normal(size=(E, n, d))
    for name, ffn, bias, scale in (FAMILIES[1], FAMILIES[4], FAMILIES[9]):
        p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
        ct, ctb = rng.normal(size=(n, d)), rng.normal(size=(E, n, d))
        want = (expert_ffn_vjp(x, p, ffn, ct, expert=0), batched_expert_ffn_vjp(xb, p, ffn, ctb))
        t = backend.tree_from_numpy
        got = (
            expert_ffn_vjp(backend.from_numpy(x), t(p), ffn, backend.from_numpy(ct), expert=0),
            batched_expert_ffn_vjp(backend.from_numpy(xb), t(p), ffn, backend.from_numpy(ctb)),
        )
        for a, b in zip(leaves(backend.tree_to_numpy(got)), leaves(want)):
            assert_close(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------------------------
# Layout properties
# --------------------------------------------------------------------------------------------


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_concatenated_interleaved_and_separate_layouts_agree_property(E, d, I, seed):
    rng = np.random.default_rng(seed)
    gate, up = rng.normal(size=(E, d, I)), rng.normal(size=(E, d, I))
    b_gate, b_up = rng.normal(size=(E, I)), rng.normal(size=(E, I))
    w_out, x = rng.normal(size=(E, I, d)), rng.normal(size=(E, 3, d))
    inter_w = np.stack([gate, up], axis=-1).reshape(E, d, 2 * I)
    inter_b = np.stack([b_gate, b_up], axis=-1).reshape(E, 2 * I)
    outs = [
        batched_expert_ffn(x, ExpertFFNParams(np.concatenate([gate, up], -1), w_out, np.concatenate([b_gate, b_up], -1)), SWIGLU),
        batched_expert_ffn(x, ExpertFFNParams(inter_w, w_out, inter_b), ExpertFFN("silu", gated=True, gate_up_layout="interleaved")),
        batched_expert_ffn(x, ExpertFFNParams(gate, w_out, b_gate, None, up, b_up), SEPARATE_SWIGLU),
    ]
    assert_close(outs[1], outs[0])
    assert_close(outs[2], outs[0])


@given(st.integers(0, 2**31 - 1))
def test_batched_equals_per_expert_blocks_property(seed):
    rng = np.random.default_rng(seed)
    p = make_params(rng, 3, 2, 4, GPT_OSS_SWIGLU, scale=3.0)
    x = rng.normal(size=(3, 4, 2))
    y = batched_expert_ffn(x, p, GPT_OSS_SWIGLU)
    for e in range(3):
        assert_close(y[e], expert_ffn(x[e], p, GPT_OSS_SWIGLU, expert=e))


def test_empty_block_gives_empty_output(rng):
    p = make_params(rng, 2, 3, 2, SWIGLU)
    assert expert_ffn(np.zeros((0, 3)), p, SWIGLU, expert=0).shape == (0, 3)
    g = expert_ffn_vjp(np.zeros((0, 3)), p, SWIGLU, np.zeros((0, 3)), expert=0)
    assert g.x.shape == (0, 3) and np.all(g.params.w_in == 0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_options():
    with pytest.raises(ValueError, match="ExpertFFN.activation must be one of"):
        ExpertFFN(activation="swish")
    with pytest.raises(ValueError, match="ExpertFFN.gate_up_layout must be one of"):
        ExpertFFN(activation="silu", gated=True, gate_up_layout="up_first")
    with pytest.raises(ValueError, match="swish_beta=1.702 only applies to activation='silu'"):
        ExpertFFN(activation="relu", swish_beta=1.702)
    with pytest.raises(ValueError, match="apply to gated FFNs only"):
        ExpertFFN(activation="silu", clamp_limit=7.0)
    with pytest.raises(ValueError, match="ExpertFFN.clamp_limit must be a finite positive number"):
        ExpertFFN(activation="silu", gated=True, clamp_limit=-1.0)
    with pytest.raises(TypeError, match="ExpertFFN.gated must be a bool"):
        ExpertFFN(activation="silu", gated=1)


def test_bad_params_and_inputs(rng):
    x = rng.normal(size=(5, 4))
    p = make_params(rng, 2, 4, 3, SWIGLU)
    with pytest.raises(ValueError, match=r"params.w_in has shape \(2, 4, 3\) but \(2, 4, 6\) was expected \(gated FFN with concatenated"):
        expert_ffn(x, p._replace(w_in=p.w_in[..., :3]), SWIGLU, expert=0)
    with pytest.raises(ValueError, match=r"params.w_out has shape \(2, 3, 4\) but \(\*, \*, 5\) was expected \(x has d=5 features\)"):
        expert_ffn(rng.normal(size=(5, 5)), p, SWIGLU, expert=0)
    with pytest.raises(ValueError, match=r"params.b_in has shape \(2, 3\) but \(2, 6\) was expected"):
        expert_ffn(x, p._replace(b_in=p.b_in[:, :3]), SWIGLU, expert=0)
    with pytest.raises(ValueError, match="params.w_up is required by a gated FFN with gate_up_layout='separate'"):
        expert_ffn(x, ExpertFFNParams(p.w_in[..., :3], p.w_out), SEPARATE_SWIGLU, expert=0)
    with pytest.raises(ValueError, match="params.w_up / params.b_up are only used by"):
        expert_ffn(x, p._replace(w_up=p.w_in[..., :3]), SWIGLU, expert=0)
    with pytest.raises(ValueError, match="expert must be at least 0 and at most 1, got 2"):
        expert_ffn(x, p, SWIGLU, expert=2)
    with pytest.raises(TypeError, match="all floating-point arguments must share one dtype"):
        expert_ffn(x.astype(np.float32), p, SWIGLU, expert=0)
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        expert_ffn(np.full((1, 4), np.nan), p, SWIGLU, expert=0)
    with pytest.raises(TypeError, match="ffn must be an ExpertFFN"):
        expert_ffn(x, p, "swiglu", expert=0)
    with pytest.raises(TypeError, match="params must be an ExpertFFNParams"):
        expert_ffn(x, tuple(p), SWIGLU, expert=0)
    with pytest.raises(ValueError, match=r"x has shape \(3, 5, 4\) but \(2, \*, \*\) was expected"):
        batched_expert_ffn(rng.normal(size=(3, 5, 4)), p, SWIGLU)
    with pytest.raises(ValueError, match=r"cotangent has shape \(5, 3\) but \(5, 4\) was expected"):
        expert_ffn_vjp(x, p, SWIGLU, np.zeros((5, 3)), expert=0)

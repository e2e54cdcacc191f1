"""Sorted dispatch / combine: per-token reference loop, VJPs, dense GShard form, properties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moeref.dispatch as dispatch_module
from moeref.dispatch import (
    dense_dispatch_combine,
    dense_dispatch_tensors,
    dispatch_combine,
    dispatch_combine_value_and_vjp,
    dispatch_combine_vjp,
)
from moeref.expert_ffn import GPT_OSS_SWIGLU, RELU_FFN, SWIGLU, ExpertFFN
from moeref.routes import Routes
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params, np_ffn

SEPARATE_SWIGLU = ExpertFFN(activation="silu", gated=True, gate_up_layout="separate")


def make_routes(rng, T, k, E, *, drop=0.3, skip_expert=None):
    """Routes built directly: k distinct experts per token (optionally never ``skip_expert``),
    softmax weights over the k choices, random drops (weight 0), positions = arrival order per expert."""
    pool = [e for e in range(E) if e != skip_expert]
    expert = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(T)]).astype(np.int64)
    logits = rng.normal(size=(T, k))
    weight = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kept = rng.random((T, k)) >= drop
    weight = np.where(kept, weight, 0.0)
    flat_e, flat_kept = expert.reshape(-1), kept.reshape(-1)
    position = np.zeros(T * k, dtype=np.int64)
    for e in range(E):  # slot = number of earlier kept routes of the same expert (token-major order)
        mine = flat_kept & (flat_e == e)
        position[mine] = np.arange(mine.sum())
    return Routes(expert, weight, kept, position.reshape(T, k))


def loop_reference(x, routes, p, ffn, apply_weight_to="output"):
    """y_t = sum_j kept_tj w_tj FFN_e(x_t) token by token (or FFN_e(w_tj x_t) for input weighting)."""
    T, k = routes.expert_index.shape
    y = np.zeros_like(x)
    for t in range(T):
        for j in range(k):
            if not routes.kept[t, j]:
                continue
            e, w = routes.expert_index[t, j], routes.weight[t, j]
            if apply_weight_to == "input":
                y[t] += np_ffn(w * x[t : t + 1], p, e, ffn)[0]
            else:
                y[t] += w * np_ffn(x[t : t + 1], p, e, ffn)[0]
    return y


CASES = [("relu_bias", RELU_FFN, True, 1.0), ("swiglu_separate", SEPARATE_SWIGLU, True, 1.0), ("gpt_oss", GPT_OSS_SWIGLU, True, 6.0)]


@pytest.fixture
def small(rng):
    """T=6, d=4, I=5, E=3, k=2, some routes dropped, expert 1 receives no token."""
    T, d, I, E, k = 6, 4, 5, 3, 2
    routes = make_routes(rng, T, k, E, drop=0.3, skip_expert=1)
    assert not routes.kept.all() and routes.kept.any()
    return rng.normal(size=(T, d)), routes, d, I, E


# --------------------------------------------------------------------------------------------
# Forward against the per-token loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_weight_to", ["output", "input"])
@pytest.mark.parametrize("name,ffn,bias,scale", CASES, ids=[c[0] for c in CASES])
def test_dispatch_combine_equals_per_token_loop(name, ffn, bias, scale, apply_weight_to, rng):
    T, d, I, E, k = 11, 4, 5, 4, 3
    x, routes = rng.normal(size=(T, d)), make_routes(rng, T, k, E, drop=0.25, skip_expert=2)
    p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
    y = dispatch_combine(x, routes, p, ffn, apply_weight_to=apply_weight_to)
    assert_close(y, loop_reference(x, routes, p, ffn, apply_weight_to), rtol=1e-12, atol=1e-12)


def test_all_routes_dropped_gives_zeros_and_zero_grads(rng):
    x = rng.normal(size=(4, 3))
    r = make_routes(rng, 4, 2, 3, drop=1.0)
    p = make_params(rng, 3, 3, 2, RELU_FFN)
    assert np.all(dispatch_combine(x, r, p, RELU_FFN) == 0)
    g = dispatch_combine_vjp(x, r, p, RELU_FFN, np.ones((4, 3)))
    assert all(np.all(a == 0) for a in leaves(g))


def test_dropped_route_ignores_its_weight_and_expert(rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, SWIGLU)
    junk = routes._replace(
        weight=np.where(routes.kept, routes.weight, 5.0), expert_index=np.where(routes.kept, routes.expert_index, 99)
    )
    assert_close(dispatch_combine(x, junk, p, SWIGLU), dispatch_combine(x, routes, p, SWIGLU))


# --------------------------------------------------------------------------------------------
# VJPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,ffn,bias,scale,apply_weight_to",
    [c + ("output",) for c in CASES] + [CASES[0] + ("input",), CASES[1] + ("input",)],
    ids=["relu_bias", "swiglu_separate", "gpt_oss", "relu_bias-input", "swiglu_separate-input"],
)
def test_dispatch_combine_vjp(name, ffn, bias, scale, apply_weight_to, rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)

    def forward(x, routes, p):
        return dispatch_combine(x, routes, p, ffn, apply_weight_to=apply_weight_to)

    def vjp(x, routes, p, ct):
        return dispatch_combine_vjp(x, routes, p, ffn, ct, apply_weight_to=apply_weight_to)

    ct = rng.normal(size=x.shape)
    assert_vjp_correct(f"dispatch_combine[{name},{apply_weight_to}]", forward, vjp, (x, routes, p), ct)
    g = vjp(x, routes, p, ct)
    assert np.all(g.routes.weight[~routes.kept] == 0)
    assert np.all(g.experts.w_in[1] == 0) and np.all(g.experts.w_out[1] == 0)  # expert 1 received no token
    assert g.routes.expert_index is None and g.routes.kept is None and g.routes.position is None


# --------------------------------------------------------------------------------------------
# Every backend: forward, VJP and the dense form equal NumPy
# --------------------------------------------------------------------------------------------


def test_dispatch_agrees_across_backends(backend, rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, GPT_OSS_SWIGLU, scale=6.0)
    ct = rng.normal(size=x.shape)
    C = int(routes.position.max()) + 2

    def run(x, routes, p, ct):
        return (
            dispatch_combine(x, routes, p, GPT_OSS_SWIGLU),
            dispatch_combine(x, routes, p, GPT_OSS_SWIGLU, apply_weight_to="input"),
            dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct),
            dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to="input"),
            dense_dispatch_combine(x, routes, p, GPT_OSS_SWIGLU, C),
            dense_dispatch_tensors(routes, E, C),
        )

    want = run(x, routes, p, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(routes), t(p), t(ct)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert_close(want[4], want[0], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The dense GShard form
# --------------------------------------------------------------------------------------------


def test_dense_dispatch_tensors_values(rng, small):
    x, routes, d, I, E = small
    C = int(routes.position.max()) + 1
    disp, comb = dense_dispatch_tensors(routes, E, C)
    assert disp.shape == comb.shape == (6, E, C)
    T, k = routes.expert_index.shape
    want_d, want_c = np.zeros((T, E, C)), np.zeros((T, E, C))
    for t in range(T):
        for j in range(k):
            if routes.kept[t, j]:
                want_d[t, routes.expert_index[t, j], routes.position[t, j]] += 1
                want_c[t, routes.expert_index[t, j], routes.position[t, j]] += routes.weight[t, j]
    assert_close(disp, want_d)
    assert_close(comb, want_c)
    assert np.all(disp[:, 1] == 0)


@given(
    st.integers(1, 8), st.integers(1, 3), st.integers(3, 5), st.integers(1, 3), st.integers(1, 3),
    st.sampled_from(["output", "input"]), st.floats(0.0, 0.6), st.integers(0, 2), st.integers(0, 2**31 - 1),
)
def test_dense_einsum_path_equals_sorted_path_property(T, k, E, d, I, apply_weight_to, drop, extra, seed):
    rng = np.random.default_rng(seed)
    routes = make_routes(rng, T, k, E, drop=drop)
    ffn = [RELU_FFN, SWIGLU, GPT_OSS_SWIGLU][seed % 3]
    p = make_params(rng, E, d, I, ffn, scale=6.0 if ffn is GPT_OSS_SWIGLU else 1.0)
    x = rng.normal(size=(T, d))
    C = int(routes.position.max()) + 1 + extra  # covers every kept route's position
    assert_close(
        dense_dispatch_combine(x, routes, p, ffn, C, apply_weight_to=apply_weight_to),
        dispatch_combine(x, routes, p, ffn, apply_weight_to=apply_weight_to),
        rtol=1e-12, atol=1e-12,
    )


@given(st.integers(1, 9), st.integers(1, 3), st.sampled_from(["output", "input"]), st.integers(0, 2**31 - 1))
def test_permuting_tokens_permutes_outputs_property(T, k, apply_weight_to, seed):
    rng = np.random.default_rng(seed)
    E, d, I = 4, 3, 2
    routes, x = make_routes(rng, T, k, E, drop=0.3), rng.normal(size=(T, d))
    p = make_params(rng, E, d, I, SWIGLU)
    perm = rng.permutation(T)
    permuted = Routes(*(a[perm] for a in routes))
    y = dispatch_combine(x, routes, p, SWIGLU, apply_weight_to=apply_weight_to)
    assert_close(dispatch_combine(x[perm], permuted, p, SWIGLU, apply_weight_to=apply_weight_to), y[perm])


# --------------------------------------------------------------------------------------------
# Work cut into pieces (long expert blocks, many tokens): same results
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_pieces(monkeypatch):
    """Tokens in chunks of ceil(E / k), expert blocks cut into pieces of 2 rows, the combine run 3 numbers (one
    token) at a time."""
    monkeypatch.setattr(dispatch_module, "_EXPERT_ROWS_PER_CHUNK", 1)
    monkeypatch.setattr(dispatch_module, "_MIN_CHUNK_TOKENS", 1)
    monkeypatch.setattr(dispatch_module, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(dispatch_module, "_MIN_BLOCK_ROWS", 2)
    monkeypatch.setattr(dispatch_module, "_COMBINE_ELEMENTS", 3)


@pytest.mark.parametrize("apply_weight_to", ["output", "input"])
@pytest.mark.parametrize("name,ffn,bias,scale", CASES, ids=[c[0] for c in CASES])
def test_pieces_and_combine_chunks_equal_per_token_loop(name, ffn, bias, scale, apply_weight_to, rng, tiny_pieces):
    T, d, I, E, k = 13, 4, 5, 3, 2
    x, routes = rng.normal(size=(T, d)), make_routes(rng, T, k, E, drop=0.2)
    p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
    assert dispatch_module._pieces(0, 7, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    y = dispatch_combine(x, routes, p, ffn, apply_weight_to=apply_weight_to)
    assert_close(y, loop_reference(x, routes, p, ffn, apply_weight_to), rtol=1e-12, atol=1e-12)


def test_vjp_with_combine_chunks(rng, small, tiny_pieces):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, SWIGLU)
    ct = rng.normal(size=x.shape)
    assert_vjp_correct(
        "dispatch_combine[swiglu,pieces]",
        lambda x, routes, p: dispatch_combine(x, routes, p, SWIGLU),
        lambda x, routes, p, c: dispatch_combine_vjp(x, routes, p, SWIGLU, c),
        (x, routes, p),
        ct,
        autograd=(),
    )


@pytest.mark.parametrize("apply_weight_to", ["output", "input"])
def test_written_buffers_equal_concatenation_bit_for_bit(apply_weight_to, rng, tiny_pieces, monkeypatch):
    """The writeable-array path (one buffer reused by chunks of different sizes, so stale rows sit
    after a short chunk's zero row) and the immutable-array path (JAX's: concatenation) agree exactly."""
    T, d, I, E, k = 17, 4, 5, 3, 2
    x, routes = rng.normal(size=(T, d)), make_routes(rng, T, k, E, drop=0.3)
    p = make_params(rng, E, d, I, GPT_OSS_SWIGLU, scale=6.0)
    ct = rng.normal(size=x.shape)
    y = dispatch_combine(x, routes, p, GPT_OSS_SWIGLU, apply_weight_to=apply_weight_to)
    g = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
    monkeypatch.setattr(dispatch_module, "_writeable", lambda like, xp: False)
    np.testing.assert_array_equal(dispatch_combine(x, routes, p, GPT_OSS_SWIGLU, apply_weight_to=apply_weight_to), y)
    g2 = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
    for a, b in zip(leaves(g2), leaves(g)):
        np.testing.assert_array_equal(a, b)
    assert_close(y, loop_reference(x, routes, p, GPT_OSS_SWIGLU, apply_weight_to), rtol=1e-12, atol=1e-12)


@given(st.integers(1, 40), st.integers(1, 3), st.integers(1, 9), st.integers(1, 64), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_piece_sizes_do_not_change_the_result_property(T, k, min_rows, combine_elements, chunk_rows, seed):
    assert dispatch_module._token_chunks(4096, 8, 64) == [(0, 4096)]  # about 512 rows per expert
    assert dispatch_module._token_chunks(8192, 8, 64) == [(0, 4096), (4096, 8192)]
    assert dispatch_module._token_chunks(4096, 2, 8) == [(0, 2048), (2048, 4096)]
    assert dispatch_module._token_chunks(16384, 4, 32) == [(0, 4096), (4096, 8192), (8192, 12288), (12288, 16384)]
    assert dispatch_module._token_chunks(200, 2, 8) == [(0, 200)]
    rng = np.random.default_rng(seed)
    E, d, I = 4, 3, 2
    routes, x = make_routes(rng, T, k, E, drop=0.25), rng.normal(size=(T, d))
    p = make_params(rng, E, d, I, GPT_OSS_SWIGLU, scale=6.0)
    want = dispatch_combine(x, routes, p, GPT_OSS_SWIGLU)
    names = ("_BLOCK_ELEMENTS", "_MIN_BLOCK_ROWS", "_COMBINE_ELEMENTS", "_EXPERT_ROWS_PER_CHUNK", "_MIN_CHUNK_TOKENS")
    saved = [getattr(dispatch_module, n) for n in names]
    try:
        for n, v in zip(names, (1, min_rows, combine_elements, chunk_rows, 1)):
            setattr(dispatch_module, n, v)
        got = dispatch_combine(x, routes, p, GPT_OSS_SWIGLU)
    finally:
        for n, v in zip(names, saved):
            setattr(dispatch_module, n, v)
    assert_close(got, want, rtol=1e-13, atol=1e-13)


@given(st.integers(1, 40), st.integers(1, 3), st.integers(1, 9), st.integers(1, 8), st.sampled_from(["output", "input"]),
       st.integers(0, 2**31 - 1))
def test_vjp_piece_sizes_do_not_change_the_cotangents_property(T, k, min_rows, chunk_rows, apply_weight_to, seed):
    """The VJP's token chunks and expert pieces only regroup the sums over a token's routes and an
    expert's tokens: every cotangent equals the one-piece result to round-off, and an expert
    without tokens still gets zeros."""
    rng = np.random.default_rng(seed)
    E, d, I = 4, 3, 2
    routes, x = make_routes(rng, T, k, E, drop=0.25, skip_expert=E - 1), rng.normal(size=(T, d))
    p = make_params(rng, E, d, I, GPT_OSS_SWIGLU, bias=True, scale=6.0)
    ct = rng.normal(size=(T, d))
    want = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
    names = ("_BLOCK_ELEMENTS", "_MIN_BLOCK_ROWS", "_EXPERT_ROWS_PER_CHUNK", "_MIN_CHUNK_TOKENS")
    saved = [getattr(dispatch_module, n) for n in names]
    try:
        for n, v in zip(names, (1, min_rows, chunk_rows, 1)):
            setattr(dispatch_module, n, v)
        got = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
    finally:
        for n, v in zip(names, saved):
            setattr(dispatch_module, n, v)
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not np.any(got.experts.w_in[E - 1]) and not np.any(got.experts.b_out[E - 1])


# --------------------------------------------------------------------------------------------
# Output and VJP in one pass
# --------------------------------------------------------------------------------------------


def _assert_value_and_vjp_equals_the_two_calls(x, routes, p, ffn, ct, apply_weight_to):
    y, g = dispatch_combine_value_and_vjp(x, routes, p, ffn, ct, apply_weight_to=apply_weight_to)
    np.testing.assert_array_equal(y, dispatch_combine(x, routes, p, ffn, apply_weight_to=apply_weight_to))
    want = dispatch_combine_vjp(x, routes, p, ffn, ct, apply_weight_to=apply_weight_to)
    assert g.routes.expert_index is None and g.routes.kept is None
    for a, b in zip(leaves(g), leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("apply_weight_to", ["output", "input"])
@pytest.mark.parametrize("name,ffn,bias,scale", CASES, ids=[c[0] for c in CASES])
def test_value_and_vjp_equals_the_forward_and_the_vjp_bit_for_bit(name, ffn, bias, scale, apply_weight_to, rng, small):
    x, routes, d, I, E = small  # some routes dropped, expert 1 without tokens
    p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
    _assert_value_and_vjp_equals_the_two_calls(x, routes, p, ffn, rng.normal(size=x.shape), apply_weight_to)


@pytest.mark.parametrize("writeable", [True, False])
@pytest.mark.parametrize("apply_weight_to", ["output", "input"])
def test_value_and_vjp_in_chunks_and_pieces(apply_weight_to, writeable, rng, tiny_pieces, monkeypatch):
    """Chunks of different sizes and pieces of 2 rows, on written buffers and on concatenated
    blocks (JAX's path); also for the plain-activation FFN (no gate)."""
    if not writeable:
        monkeypatch.setattr(dispatch_module, "_writeable", lambda like, xp: False)
    T, d, I, E, k = 17, 4, 5, 3, 2
    x, routes = rng.normal(size=(T, d)), make_routes(rng, T, k, E, drop=0.3)
    for ffn, bias, scale in ((GPT_OSS_SWIGLU, True, 6.0), (RELU_FFN, True, 1.0)):
        p = make_params(rng, E, d, I, ffn, bias=bias, scale=scale)
        _assert_value_and_vjp_equals_the_two_calls(x, routes, p, ffn, rng.normal(size=x.shape), apply_weight_to)


def test_value_and_vjp_agrees_across_backends(backend, rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, GPT_OSS_SWIGLU, scale=6.0)
    ct = rng.normal(size=x.shape)

    def run(x, routes, p, ct):
        return tuple(dispatch_combine_value_and_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=a) for a in ("output", "input"))

    want = run(x, routes, p, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(routes), t(p), t(ct)))
    for a, b in zip(leaves(got), leaves(want), strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_value_and_vjp_checks_its_arguments(rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, SWIGLU)
    with pytest.raises(ValueError, match="cotangent"):
        dispatch_combine_value_and_vjp(x, routes, p, SWIGLU, np.ones((x.shape[0] + 1, d)))
    with pytest.raises(ValueError, match="cotangent"):
        dispatch_combine_value_and_vjp(x, routes, p, SWIGLU, np.full(x.shape, np.nan))
    with pytest.raises(ValueError, match="apply_weight_to"):
        dispatch_combine_value_and_vjp(x, routes, p, SWIGLU, np.ones(x.shape), apply_weight_to="both")


def test_check_finite_false_skips_the_check_but_dropped_routes_still_count_zero(rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, SWIGLU)
    y = dispatch_combine(x, routes, p, SWIGLU)
    nan_dropped = routes._replace(weight=np.where(routes.kept, routes.weight, np.nan))
    with pytest.raises(ValueError, match="routes.weight contains NaN"):
        dispatch_combine(x, nan_dropped, p, SWIGLU)
    assert_close(dispatch_combine(x, nan_dropped, p, SWIGLU, check_finite=False), y)
    bad = p._replace(w_out=np.where(np.arange(d) == 0, np.inf, p.w_out))
    with pytest.raises(ValueError, match="experts.w_out contains NaN or infinite values"):
        dispatch_combine(x, routes, bad, SWIGLU)
    with np.errstate(invalid="ignore", over="ignore"):
        assert not np.all(np.isfinite(dispatch_combine(x, routes, bad, SWIGLU, check_finite=False)))
    with pytest.raises(ValueError, match="cotangent contains NaN or infinite values"):
        dispatch_combine_vjp(x, routes, p, SWIGLU, np.full(x.shape, np.nan))
    with pytest.raises(TypeError, match="check_finite must be a bool, got int 1"):
        dispatch_combine(x, routes, p, SWIGLU, check_finite=1)


def test_huge_finite_values_pass_the_finiteness_check(rng, small):
    """The check sums columns: an overflowing sum of finite values must not be reported as NaN."""
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, RELU_FFN, bias=False)
    huge = p._replace(w_out=np.full_like(p.w_out, 1e308))
    with np.errstate(over="ignore"):
        y = dispatch_combine(x, routes, huge, RELU_FFN)
    assert y.shape == x.shape


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input(rng, small):
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, SWIGLU)
    with pytest.raises(ValueError, match=r"routes.expert_index has shape \(6, 2\) but \(5, \*\) was expected \(x has T=5 tokens\)"):
        dispatch_combine(x[:5], routes, p, SWIGLU)
    with pytest.raises(ValueError, match=r"routes.weight has shape \(6, 3\) but \(6, 2\) was expected"):
        dispatch_combine(x, routes._replace(weight=np.zeros((6, 3))), p, SWIGLU)
    bad = routes._replace(expert_index=np.where(routes.kept, E, routes.expert_index))
    with pytest.raises(ValueError, match=r"routes.expert_index of the kept routes must lie in \[0, 3\) \(experts holds E=3 experts\)"):
        dispatch_combine(x, bad, p, SWIGLU)
    with pytest.raises(ValueError, match="must lie in"):
        dispatch_combine(x, routes._replace(expert_index=np.where(routes.kept, -1, routes.expert_index)), p, SWIGLU)
    with pytest.raises(ValueError, match=r"experts.w_out has shape \(3, 5, 4\) but \(\*, \*, 3\) was expected"):
        dispatch_combine(x[:, :3], routes, p, SWIGLU)
    with pytest.raises(ValueError, match=r"experts.w_in has shape \(3, 4, 5\) but \(3, 4, 10\) was expected"):
        dispatch_combine(x, routes, p._replace(w_in=p.w_in[..., :5]), SWIGLU)
    with pytest.raises(ValueError, match=r"experts.w_in has shape \(2, 4, 10\) but \(3, 4, 10\) was expected"):
        dispatch_combine(x, routes, p._replace(w_in=p.w_in[:2]), SWIGLU)
    with pytest.raises(TypeError, match="all floating-point arguments must share one dtype"):
        dispatch_combine(x, routes._replace(weight=routes.weight.astype(np.float32)), p, SWIGLU)
    with pytest.raises(TypeError, match="routes.expert_index must have an integer dtype"):
        dispatch_combine(x, routes._replace(expert_index=routes.expert_index.astype(np.float64)), p, SWIGLU)
    with pytest.raises(TypeError, match="routes.kept must be a bool array"):
        dispatch_combine(x, routes._replace(kept=routes.kept.astype(np.int64)), p, SWIGLU)
    with pytest.raises(TypeError, match="routes must be a Routes"):
        dispatch_combine(x, tuple(routes), p, SWIGLU)
    with pytest.raises(ValueError, match="routes.weight contains NaN"):
        dispatch_combine(x, routes._replace(weight=np.full((6, 2), np.nan)), p, SWIGLU)
    with pytest.raises(ValueError, match="apply_weight_to must be one of 'output', 'input'"):
        dispatch_combine(x, routes, p, SWIGLU, apply_weight_to="both")
    with pytest.raises(ValueError, match=r"cotangent has shape \(6, 3\) but \(6, 4\) was expected"):
        dispatch_combine_vjp(x, routes, p, SWIGLU, np.zeros((6, 3)))


def test_mixed_array_libraries_are_named(rng, small):
    torch = pytest.importorskip("torch")
    x, routes, d, I, E = small
    p = make_params(rng, E, d, I, SWIGLU)
    with pytest.raises(TypeError, match=r"arrays from different array libraries were mixed in one call \(torch: x; numpy: routes"):
        dispatch_combine(torch.from_numpy(x), routes, p, SWIGLU)


def test_bad_dense_input(rng, small):
    x, routes, d, I, E = small
    C = int(routes.position.max()) + 1
    with pytest.raises(ValueError, match=rf"routes.position of the kept routes must lie in \[0, {C - 1}\) \(capacity={C - 1}\)"):
        dense_dispatch_tensors(routes, E, C - 1)
    clash = routes._replace(position=np.zeros_like(routes.position), expert_index=np.zeros_like(routes.expert_index))
    with pytest.raises(ValueError, match=r"two kept routes in the same \(expert, position\) slot"):
        dense_dispatch_tensors(clash, E, C)
    with pytest.raises(ValueError, match="capacity must be at least 1, got 0"):
        dense_dispatch_tensors(routes, E, 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        dense_dispatch_tensors(routes, 3.0, C)

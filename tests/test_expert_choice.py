"""Expert-choice routing: a direct loop over experts, the VJP (finite differences, torch, jax), every
backend, capacity rules, properties (every expert exactly C tokens, coverage, permutations), bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.expert_choice import (
    ExpertChoiceOptions,
    ExpertChoiceParams,
    expert_choice_capacity,
    expert_choice_layer,
    expert_choice_layer_vjp,
    expert_choice_routes,
)
from moeref.expert_ffn import GELU_FFN, RELU_FFN, SWIGLU
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params as make_expert_params
from test_expert_ffn import np_ffn

T, D, I, E = 8, 3, 4, 4
# C = round(2 * 8 / 4) = 4 per expert (flaxformer rule without the minimum), 16 routes for 8 tokens
OPTS = ExpertChoiceOptions(capacity_factor=2.0, min_capacity=0, ffn=SWIGLU)


def make(rng, ffn=SWIGLU, *, T=T, E=E, bias=False, scale=1.0):
    x = rng.normal(size=(T, D))
    params = ExpertChoiceParams(
        w_g=scale * rng.normal(size=(D, E)),
        experts=make_expert_params(rng, E, D, I, ffn, bias=True),
        b_g=rng.normal(size=(E,)) if bias else None,
    )
    return x, params


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loop_reference(x, params, C, ffn, group_size=None):
    """The paper's layer written as a direct Python loop over groups and experts."""
    z = x @ params.w_g + (0 if params.b_g is None else params.b_g)
    S = np_softmax(z)
    Tg = x.shape[0] if group_size is None else group_size
    y = np.zeros_like(x)
    taken = np.zeros(S.shape, dtype=bool)
    for g0 in range(0, x.shape[0], Tg):
        for e in range(S.shape[1]):
            chosen = g0 + np.argsort(-S[g0 : g0 + Tg, e], kind="stable")[:C]  # ties: lower token
            y[chosen] += S[chosen, e, None] * np_ffn(x[chosen], params.experts, e, ffn)
            taken[chosen, e] = True
    return y, S, taken


def margin(S, C, group_size=None):
    """Smallest gap between the C-th and (C+1)-th score of any expert in any group (inf if C = T_g)."""
    Tg = S.shape[0] if group_size is None else group_size
    if C >= Tg:
        return np.inf
    gaps = []
    for g0 in range(0, S.shape[0], Tg):
        s = -np.sort(-S[g0 : g0 + Tg], axis=0)
        gaps.append(np.min(s[C - 1] - s[C]))
    return float(min(gaps))


def tie_free(ffn, options, *, group_size=None, **kw):
    for seed in range(100):
        rng = np.random.default_rng(seed)
        x, p = make(rng, ffn, **kw)
        S = np_softmax(x @ p.w_g + (0 if p.b_g is None else p.b_g))
        Tg = x.shape[0] if group_size is None else group_size
        if margin(S, expert_choice_capacity(Tg, p.w_g.shape[1], options), group_size) > 1e-3:
            return rng, x, p
    raise AssertionError("no tie-free seed")


# --------------------------------------------------------------------------------------------
# Forward against the loop; VJP
# --------------------------------------------------------------------------------------------

CASES = {
    "swiglu": (OPTS, {}),
    "gelu_bias_groups": (ExpertChoiceOptions(capacity_factor=1.0, min_capacity=0, group_size=4, ffn=GELU_FFN), {"bias": True}),
    "paper_rule": (ExpertChoiceOptions(capacity_factor=1.5, capacity_rule="paper", ffn=RELU_FFN), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_equals_direct_loop_over_experts_and_vjp(name):
    options, kw = CASES[name]
    rng, x, p = tie_free(options.ffn, options, group_size=options.group_size, **kw)
    out = expert_choice_layer(x, p, options)
    C = out.routing.capacity
    y, S, taken = loop_reference(x, p, C, options.ffn, options.group_size)
    assert_close(out.y, y)
    assert_close(out.scores, S)
    n = taken.sum(axis=1)
    np.testing.assert_array_equal(out.routing.experts_per_token, n)
    np.testing.assert_array_equal(out.routing.coverage, np.bincount(n, minlength=E + 1))
    ct = rng.normal(size=(T, D))
    assert_vjp_correct(
        f"expert_choice_layer[{name}]",
        lambda x, p: expert_choice_layer(x, p, options).y,
        lambda x, p, ct: expert_choice_layer_vjp(x, p, options, ct),
        (x, p),
        ct,
        # jax.vjp is left out (it recompiles for every data-dependent block shape: ~30 s here);
        # jax runs the forward and the analytic VJP in the backend test below
        autograd=("torch",),
    )


def test_routes_record_matches_the_assignment():
    rng, x, p = tie_free(SWIGLU, OPTS)
    r = expert_choice_layer(x, p, OPTS).routing
    S = np_softmax(x @ p.w_g)
    C = r.capacity
    assert C == 4 and r.token_index.shape == (1, E, C) and r.gates.shape == (1, E, C)
    for e in range(E):
        best = np.argsort(-S[:, e], kind="stable")[:C]
        np.testing.assert_array_equal(r.token_index[0, e], best)
        assert_close(r.gates[0, e], S[best, e])
    rt = r.routes
    assert rt.expert_index.shape[1] == r.experts_per_token.max()
    for t in range(T):
        m = r.experts_per_token[t]
        assert np.all(rt.kept[t, :m]) and not np.any(rt.kept[t, m:]) and np.all(rt.weight[t, m:] == 0)
        assert np.all(np.diff(rt.weight[t, :m]) <= 0)  # decreasing score
        for j in range(m):
            e = rt.expert_index[t, j]
            assert_close(rt.weight[t, j], S[t, e])
            assert r.token_index[0, e, rt.position[t, j]] == t  # position = slot in the expert's choice


def test_ties_go_to_the_lower_token_index():
    S = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    r = expert_choice_routes(S, 2)
    np.testing.assert_array_equal(r.token_index[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(r.coverage, [2, 0, 2])
    np.testing.assert_array_equal(r.routes.expert_index[:2], [[0, 1], [0, 1]])  # ties: lower expert first


# --------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------


def test_capacity_rules():
    flax = ExpertChoiceOptions(capacity_factor=1.0)
    assert expert_choice_capacity(10, 4, dataclasses.replace(flax, min_capacity=0)) == 2  # round(2.5): half to even
    assert expert_choice_capacity(14, 4, dataclasses.replace(flax, min_capacity=0)) == 4  # round(3.5)
    assert expert_choice_capacity(10, 4, flax) == 4  # flaxformer's min_expert_capacity = 4
    assert expert_choice_capacity(64, 8, ExpertChoiceOptions()) == 16  # EC-CF2: 2 * 64 / 8
    paper = ExpertChoiceOptions(capacity_factor=2.0, capacity_rule="paper")
    assert expert_choice_capacity(12, 4, paper) == 6
    assert expert_choice_capacity(12, 4, ExpertChoiceOptions(capacity=5, capacity_factor=None)) == 5
    with pytest.raises(ValueError, match="needs T\\*c/E to be an integer"):
        expert_choice_capacity(9, 4, paper)
    with pytest.raises(ValueError, match="exceeds the 3 tokens"):
        expert_choice_capacity(3, 2, flax)  # min capacity 4 > 3 tokens
    with pytest.raises(ValueError, match="at least 1 token"):
        expert_choice_capacity(4, 16, dataclasses.replace(flax, min_capacity=0))


# --------------------------------------------------------------------------------------------
# Every backend equals NumPy (one configuration, one shape)
# --------------------------------------------------------------------------------------------


def test_expert_choice_agrees_across_backends(backend):
    options, kw = CASES["gelu_bias_groups"]
    rng, x, p = tie_free(options.ffn, options, group_size=options.group_size, **kw)
    ct = rng.normal(size=(T, D))

    def run(x, p, ct):
        out = expert_choice_layer(x, p, options)
        g = expert_choice_layer_vjp(x, p, options, ct)
        r = out.routing
        return (out.y, out.scores, r.routes, r.token_index, r.gates, r.experts_per_token, r.coverage, g)

    want = run(x, p, ct)
    t = backend.tree_from_numpy
    got = backend.tree_to_numpy(run(t(x), t(p), t(ct)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), E=st.integers(1, 5), groups=st.integers(1, 3), cf=st.sampled_from([0.5, 1.0, 2.0, 3.0]))
def test_every_expert_takes_exactly_C_tokens_per_group_property(seed, E, groups, cf):
    rng = np.random.default_rng(seed)
    Tg = 6
    S = np_softmax(rng.normal(size=(groups * Tg, E)))
    C = expert_choice_capacity(Tg, E, ExpertChoiceOptions(capacity_factor=cf, min_capacity=1)) if cf * Tg / E <= Tg else Tg
    r = expert_choice_routes(S, C, group_size=Tg)
    kept = r.routes.kept
    experts = np.where(kept, r.routes.expert_index, -1)
    for g in range(groups):
        rows = slice(g * Tg, (g + 1) * Tg)
        for e in range(E):
            assert np.sum(experts[rows] == e) == C  # perfect load balance
        assert np.all((r.token_index[g] >= g * Tg) & (r.token_index[g] < (g + 1) * Tg))
    assert r.coverage.sum() == groups * Tg and np.dot(np.arange(E + 1), r.coverage) == groups * E * C
    assert np.all(np.sort(r.routes.position[kept]) >= 0) and np.all(r.routes.position[kept] < C)


@given(seed=st.integers(0, 2**31 - 1))
def test_layer_is_token_permutation_equivariant_property(seed):
    rng = np.random.default_rng(seed)
    x, p = make(rng, RELU_FFN, T=6, E=3)
    options = ExpertChoiceOptions(capacity_factor=1.0, min_capacity=0, ffn=RELU_FFN)
    perm = rng.permutation(6)
    a, b = expert_choice_layer(x, p, options), expert_choice_layer(x[perm], p, options)
    # random continuous data: no ties, so the assignment moves with the tokens
    assert_close(b.y, a.y[perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(b.routing.experts_per_token, a.routing.experts_per_token[perm])
    np.testing.assert_array_equal(b.routing.coverage, a.routing.coverage)


@given(seed=st.integers(0, 2**31 - 1))
def test_relabelling_experts_permutes_the_assignment_property(seed):
    rng = np.random.default_rng(seed)
    x, p = make(rng, RELU_FFN, T=6, E=3)
    options = ExpertChoiceOptions(capacity_factor=1.0, min_capacity=0, ffn=RELU_FFN)
    perm = rng.permutation(3)
    q = ExpertChoiceParams(w_g=p.w_g[:, perm], experts=type(p.experts)(*(None if a is None else a[perm] for a in p.experts)))
    a, b = expert_choice_layer(x, p, options), expert_choice_layer(x, q, options)
    assert_close(b.y, a.y, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(b.routing.token_index[0], a.routing.token_index[0][perm])


def test_not_causal_a_later_token_changes_an_earlier_output():
    rng, x, p = tie_free(RELU_FFN, dataclasses.replace(OPTS, ffn=RELU_FFN))
    options = ExpertChoiceOptions(capacity_factor=0.5, min_capacity=0, ffn=RELU_FFN)
    base = expert_choice_layer(x, p, options)
    changed = False
    for t in range(1, T):  # push each later token to the top of every expert's list
        x2 = x.copy()
        x2[t] = 50.0 * x[t]
        out = expert_choice_layer(x2, p, options)
        changed |= not np.allclose(out.y[:t], base.y[:t])
    assert changed


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(1)
    x, p = make(rng)
    with pytest.raises(ValueError, match="params.experts has E=4 experts but params.w_g has E=3"):
        expert_choice_layer(x, p._replace(w_g=p.w_g[:, :3]), OPTS)
    with pytest.raises(ValueError, match="params.w_g has shape"):
        expert_choice_layer(x, p._replace(w_g=p.w_g[:2]), OPTS)
    with pytest.raises(ValueError, match="params.b_g has shape"):
        expert_choice_layer(x, p._replace(b_g=np.zeros(3)), OPTS)
    with pytest.raises(TypeError, match="params"):
        expert_choice_layer(x, (p.w_g, p.experts), OPTS)
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        expert_choice_layer(x, p, dataclasses.replace(OPTS, group_size=3))
    with pytest.raises(ValueError, match="capacity_rule"):
        ExpertChoiceOptions(capacity_rule="round")
    with pytest.raises(ValueError, match="capacity_factor must be a finite positive"):
        ExpertChoiceOptions(capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor must be None"):
        ExpertChoiceOptions(capacity=2)
    with pytest.raises(ValueError, match="NaN"):
        expert_choice_layer(np.where(np.arange(D) == 0, np.nan, x), p, OPTS)
    with pytest.raises(ValueError, match="cotangent"):
        expert_choice_layer_vjp(x, p, OPTS, np.ones((T, D + 1)))
    with pytest.raises(ValueError, match="capacity must be at least 1 and at most 8"):
        expert_choice_routes(np_softmax(x @ p.w_g), 9)
    with pytest.raises(TypeError, match="scores must have a real floating-point dtype"):
        expert_choice_routes(np.ones((4, 2), dtype=np.int64), 1)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        expert_choice_layer(torch.from_numpy(x), p, OPTS)

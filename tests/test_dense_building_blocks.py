"""Gates, linear experts and the generic / hard mixture: forward, VJP, properties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref.experts import LinearExpertsParams, linear_experts, linear_experts_vjp
from moeref.gates import LinearSoftmaxGateParams, linear_softmax_gate, linear_softmax_gate_vjp
from moeref.mixture import hard_mixture, hard_mixture_vjp, mixture, mixture_vjp
from conftest import assert_close
from helpers import assert_vjp_correct


def _gate_params(rng, d, n):
    return LinearSoftmaxGateParams(rng.normal(size=(d, n)), rng.normal(size=n))


def _expert_params(rng, n, d_in, d_out):
    return LinearExpertsParams(rng.normal(size=(n, d_in, d_out)), rng.normal(size=(n, d_out)))


def test_linear_softmax_gate_rows_sum_to_one_on_every_backend(backend, rng):
    x = rng.normal(size=(6, 3))
    p = _gate_params(rng, 3, 4)
    w = backend.to_numpy(linear_softmax_gate(backend.from_numpy(x), backend.tree_from_numpy(p)))
    assert_close(w.sum(axis=1), np.ones(6))
    logits = x @ p.weight + p.bias
    assert_close(w, np.exp(logits) / np.exp(logits).sum(1, keepdims=True))


def test_linear_softmax_gate_vjp(rng):
    x, p = rng.normal(size=(5, 3)), _gate_params(rng, 3, 4)
    assert_vjp_correct("linear_softmax_gate", linear_softmax_gate, linear_softmax_gate_vjp, (x, p), rng.normal(size=(5, 4)))


def test_linear_experts_vjp(rng):
    x, p = rng.normal(size=(5, 3)), _expert_params(rng, 4, 3, 2)
    assert_vjp_correct("linear_experts", linear_experts, linear_experts_vjp, (x, p), rng.normal(size=(5, 4, 2)))


def test_mixture_and_hard_mixture_vjp(rng):
    g = rng.dirichlet(np.ones(4), size=5)
    f = rng.normal(size=(5, 4, 3))
    ct = rng.normal(size=(5, 3))
    assert_vjp_correct("mixture", mixture, mixture_vjp, (g, f), ct)
    assert_vjp_correct("hard_mixture", hard_mixture, hard_mixture_vjp, (g, f), ct)


def test_building_blocks_agree_across_backends(backend, rng):
    x = rng.normal(size=(7, 3))
    gp, ep = _gate_params(rng, 3, 4), _expert_params(rng, 4, 3, 2)
    ct = rng.normal(size=(7, 2))

    def run(to, frm):
        g = linear_softmax_gate(to(x), to(gp))
        f = linear_experts(to(x), to(ep))
        y = mixture(g, f)
        grads = mixture_vjp(g, f, to(ct))
        return frm((y, hard_mixture(g, f), grads, linear_experts_vjp(to(x), to(ep), grads.expert_outputs)))


    ref = run(lambda a: a if isinstance(a, tuple) else a, lambda t: t)
    out = run(backend.tree_from_numpy, backend.tree_to_numpy)
    from helpers import leaves

    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, np.asarray(b))


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.data())
def test_permuting_experts_with_their_gates_leaves_mixture_unchanged_property(N, n, d, data):
    g = data.draw(hnp.arrays(np.float64, (N, n), elements=st.floats(0, 1)))
    f = data.draw(hnp.arrays(np.float64, (N, n, d), elements=st.floats(-10, 10)))
    perm = np.asarray(data.draw(st.permutations(range(n))))
    np.testing.assert_allclose(mixture(g[:, perm], f[:, perm]), mixture(g, f), rtol=1e-12, atol=1e-12)


@given(st.integers(1, 6), st.integers(1, 5), st.data())
def test_hard_mixture_equals_mixture_with_one_hot_gate_property(N, n, data):
    g = data.draw(hnp.arrays(np.float64, (N, n), elements=st.integers(0, 3).map(float)))  # many ties
    f = data.draw(hnp.arrays(np.float64, (N, n, 2), elements=st.floats(-10, 10)))
    chosen = np.argmax(g, axis=1)  # NumPy's argmax also takes the first maximum
    np.testing.assert_array_equal(hard_mixture(g, f), mixture(np.eye(n)[chosen], f))


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.data())
def test_linear_softmax_gates_sum_to_one_property(N, d, n, data):
    x = data.draw(hnp.arrays(np.float64, (N, d), elements=st.floats(-50, 50)))
    W = data.draw(hnp.arrays(np.float64, (d, n), elements=st.floats(-50, 50)))
    w = linear_softmax_gate(x, LinearSoftmaxGateParams(W, np.zeros(n)))
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)


def test_bad_input_names_the_argument(rng):
    g, f = rng.dirichlet(np.ones(3), size=4), rng.normal(size=(4, 3, 2))
    with pytest.raises(ValueError, match=r"expert_outputs has shape \(4, 2, 2\) but \(4, 3, \*\) was expected"):
        mixture(g, f[:, :2])
    with pytest.raises(TypeError, match="gates must have a real floating-point dtype"):
        mixture(g.astype(np.int64), f)
    with pytest.raises(TypeError, match="share one dtype"):
        mixture(g.astype(np.float32), f)
    with pytest.raises(ValueError, match="expert_outputs must be 3-dimensional"):
        mixture(g, f[:, :, 0])
    with pytest.raises(ValueError, match=r"params.weight has shape \(5, 3\) but \(2, \*\) was expected \(x has d_in=2 features\)"):
        linear_softmax_gate(rng.normal(size=(4, 2)), LinearSoftmaxGateParams(rng.normal(size=(5, 3)), np.zeros(3)))
    with pytest.raises(ValueError, match="gates contains NaN"):
        mixture(np.full_like(g, np.nan), f)
    with pytest.raises(ValueError, match="x contains NaN"):
        linear_experts(np.full((4, 3), np.inf), _expert_params(rng, 3, 3, 2))
    with pytest.raises(ValueError, match="params.bias contains NaN or infinite values; this formulation needs finite or -inf"):
        linear_softmax_gate(rng.normal(size=(4, 2)), LinearSoftmaxGateParams(rng.normal(size=(2, 3)), np.array([0.0, np.nan, 0.0])))
    masked = linear_softmax_gate(rng.normal(size=(4, 2)), LinearSoftmaxGateParams(rng.normal(size=(2, 3)), np.array([0.0, -np.inf, 0.0])))
    assert np.all(masked[:, 1] == 0)  # a -inf bias switches an expert off
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        mixture(g, torch.from_numpy(f))


def test_float32_inputs_stay_float32(backend, rng):
    g = backend.from_numpy(rng.dirichlet(np.ones(3), size=4), np.float32)
    f = backend.from_numpy(rng.normal(size=(4, 3, 2)), np.float32)
    y = backend.to_numpy(mixture(g, f))
    assert y.dtype == np.float32

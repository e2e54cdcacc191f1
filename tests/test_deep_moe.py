"""Deep mixture of experts (Eigen, Ranzato & Sutskever 2013): forward, VJPs, properties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref.core import relu
from moeref.deep_moe import (
    DeepMoELayerParams,
    deep_moe,
    deep_moe_gates,
    deep_moe_layer,
    deep_moe_layer_gates,
    deep_moe_layer_vjp,
    deep_moe_vjp,
)
from moeref.experts import LinearExpertsParams, linear_experts
from moeref.mixture import mixture
from conftest import assert_close
from helpers import assert_vjp_correct, leaves

# One set of shapes for most tests (JAX compiles each primitive once per shape and dtype):
# N inputs of width 3 -> layer 0 (3 experts, gate with 2 hidden units) -> width 4
#                     -> layer 1 (2 experts, gate with 3 hidden units) -> width 2
N = 4
WIDTHS = (3, 4, 2)
EXPERTS = (3, 2)
GATE_HIDDEN = (2, 3)


def _layer(rng, d_in, d_out, n, h):
    return DeepMoELayerParams(
        expert_weight=rng.normal(size=(n, d_in, d_out)),
        expert_bias=rng.normal(size=(n, d_out)),
        gate_hidden_weight=rng.normal(size=(d_in, h)),
        gate_hidden_bias=rng.normal(size=h),
        gate_weight=rng.normal(size=(h, n)),
        gate_bias=rng.normal(size=n),
    )


def _stack(rng, widths=WIDTHS, experts=EXPERTS, hidden=GATE_HIDDEN):
    return tuple(_layer(rng, widths[l], widths[l + 1], experts[l], hidden[l]) for l in range(len(experts)))


def _reference(x, params):
    """Eigen et al.'s layer written out in NumPy, column-vector style: returns (z^L, [g^1, ..., g^L])."""
    z, gates = x, []
    for p in params:
        A, a, B, b = p.gate_hidden_weight.T, p.gate_hidden_bias, p.gate_weight.T, p.gate_bias
        logits = (B @ np.maximum(0.0, A @ z.T + a[:, None]) + b[:, None]).T  # (N, n)
        g = np.exp(logits - logits.max(axis=1, keepdims=True))
        g /= g.sum(axis=1, keepdims=True)
        f = np.stack([np.maximum(0.0, W.T @ z.T + c[:, None]).T for W, c in zip(p.expert_weight, p.expert_bias)], axis=1)
        z = np.einsum("ni,nid->nd", g, f)  # (N, d_out)
        gates.append(g)
    return z, gates


def test_deep_moe_matches_a_numpy_reference_on_every_backend(backend, rng):
    x, params = rng.normal(size=(N, WIDTHS[0])), _stack(rng)
    ref_z, ref_gates = _reference(x, params)
    xb, pb = backend.from_numpy(x), backend.tree_from_numpy(params)
    z = backend.to_numpy(deep_moe(xb, pb))
    assert z.shape == (N, WIDTHS[-1])
    assert_close(z, ref_z)
    gates = deep_moe_gates(xb, pb)
    assert len(gates) == len(params)
    for g, ref in zip(gates, ref_gates):
        g = backend.to_numpy(g)
        assert_close(g, ref)
        assert_close(g.sum(axis=1), np.ones(N))
    # the stack is the layer applied L times; each layer's gates are the layer-gates at its input
    z0 = backend.to_numpy(deep_moe_layer(xb, pb[0]))
    assert_close(z0, _reference(x, params[:1])[0])
    assert_close(backend.to_numpy(deep_moe_layer_gates(backend.from_numpy(z0), pb[1])), ref_gates[1])


def test_one_layer_stack_is_the_generic_mixture_of_relu_experts(backend, rng):
    x, params = rng.normal(size=(N, WIDTHS[0])), _stack(rng)[:1]
    p = params[0]
    logits = np.maximum(x @ p.gate_hidden_weight + p.gate_hidden_bias, 0.0) @ p.gate_weight + p.gate_bias  # (N, n)
    gates = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    xb = backend.from_numpy(x)
    experts = relu(linear_experts(xb, backend.tree_from_numpy(LinearExpertsParams(p.expert_weight, p.expert_bias))))
    direct = mixture(backend.from_numpy(gates), experts)
    out = deep_moe(xb, backend.tree_from_numpy(params))
    assert_close(backend.to_numpy(out), backend.to_numpy(direct))


def test_deep_moe_layer_vjp(rng):
    x, p = rng.normal(size=(N, WIDTHS[0])), _stack(rng)[0]
    assert_vjp_correct("deep_moe_layer", deep_moe_layer, deep_moe_layer_vjp, (x, p), rng.normal(size=(N, WIDTHS[1])))


def test_deep_moe_vjp_two_layers(rng):
    x, params = rng.normal(size=(N, WIDTHS[0])), _stack(rng)
    assert_vjp_correct("deep_moe (2 layers)", deep_moe, deep_moe_vjp, (x, params), rng.normal(size=(N, WIDTHS[-1])))


def test_relu_derivative_at_zero_is_zero():
    # every expert pre-activation is exactly 0: the experts' weights and x get no gradient through them
    p = DeepMoELayerParams(np.zeros((2, 2, 2)), np.zeros((2, 2)), np.ones((2, 1)), np.zeros(1), np.zeros((1, 2)), np.zeros(2))
    grads = deep_moe_layer_vjp(np.zeros((3, 2)), p, np.ones((3, 2)))
    assert np.all(grads.params.expert_weight == 0) and np.all(grads.params.expert_bias == 0)
    assert np.all(grads.x == 0) and np.all(grads.params.gate_hidden_weight == 0)


def test_vjps_agree_across_backends(backend, rng):
    x, params = rng.normal(size=(N, WIDTHS[0])), _stack(rng)
    ct, ct0 = rng.normal(size=(N, WIDTHS[-1])), rng.normal(size=(N, WIDTHS[1]))

    def run(to, frm):
        return frm((deep_moe_vjp(to(x), to(params), to(ct)), deep_moe_layer_vjp(to(x), to(params[0]), to(ct0))))

    ref = run(lambda a: a, lambda t: t)
    out = run(backend.tree_from_numpy, backend.tree_to_numpy)
    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, np.asarray(b))


def test_float32_inputs_stay_float32(backend, rng):
    x = backend.from_numpy(rng.normal(size=(N, WIDTHS[0])), np.float32)
    params = backend.tree_from_numpy(_stack(rng), np.float32)
    assert backend.to_numpy(deep_moe(x, params)).dtype == np.float32
    grads = deep_moe_vjp(x, params, backend.from_numpy(np.ones((N, WIDTHS[-1])), np.float32))
    assert all(backend.to_numpy(a).dtype == np.float32 for a in leaves(grads))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 1), st.data())
def test_permuting_a_layers_experts_with_its_gate_rows_leaves_output_unchanged_property(n0, n1, batch, layer, data):
    widths, experts, hidden = (3, 2, 2), (n0, n1), (2, 2)
    floats = st.floats(-3, 3)
    params = []
    for l in range(2):
        d_in, d_out, n, h = widths[l], widths[l + 1], experts[l], hidden[l]
        shapes = [(n, d_in, d_out), (n, d_out), (d_in, h), (h,), (h, n), (n,)]
        params.append(DeepMoELayerParams(*(data.draw(hnp.arrays(np.float64, s, elements=floats)) for s in shapes)))
    x = data.draw(hnp.arrays(np.float64, (batch, widths[0]), elements=floats))
    perm = np.asarray(data.draw(st.permutations(range(experts[layer]))))
    p = params[layer]
    permuted = list(params)
    permuted[layer] = p._replace(
        expert_weight=p.expert_weight[perm], expert_bias=p.expert_bias[perm], gate_weight=p.gate_weight[:, perm], gate_bias=p.gate_bias[perm]
    )
    np.testing.assert_allclose(deep_moe(x, tuple(permuted)), deep_moe(x, tuple(params)), rtol=1e-12, atol=1e-12)
    # the gates of the permuted layer are the original gates, permuted
    np.testing.assert_allclose(deep_moe_gates(x, tuple(permuted))[layer], deep_moe_gates(x, tuple(params))[layer][:, perm], rtol=1e-12, atol=1e-15)


def test_bad_input_names_the_layer_and_the_argument(rng):
    x, params = rng.normal(size=(N, WIDTHS[0])), _stack(rng)
    bad = params[1]._replace(expert_weight=rng.normal(size=(2, 5, 2)))
    with pytest.raises(ValueError, match=r"params\[1\]\.expert_weight has shape \(2, 5, 2\) but \(2, 4, 2\) was expected \(layer 1 reads the d=4 outputs of layer 0\)"):
        deep_moe(x, (params[0], bad))
    bad = params[1]._replace(gate_hidden_weight=rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match=r"params\[1\]\.gate_hidden_weight has shape \(5, 3\) but \(4, 3\) was expected \(layer 1 reads"):
        deep_moe_vjp(x, (params[0], bad), np.zeros((N, 2)))
    with pytest.raises(ValueError, match=r"params\[0\]\.expert_weight has shape \(3, 3, 4\) but \(3, 2, 4\) was expected \(x has d=2 features\)"):
        deep_moe_gates(x[:, :2], params)
    bad = params[0]._replace(gate_weight=rng.normal(size=(2, 4)))
    with pytest.raises(ValueError, match=r"params\[0\]\.gate_weight has shape \(2, 4\) but \(2, 3\) was expected"):
        deep_moe(x, (bad, params[1]))
    with pytest.raises(ValueError, match=r"params\.expert_bias has shape \(3, 3\) but \(3, 4\) was expected"):
        deep_moe_layer(x, params[0]._replace(expert_bias=np.zeros((3, 3))))
    with pytest.raises(TypeError, match=r"for one layer pass \(params,\)"):
        deep_moe(x, params[0])
    with pytest.raises(TypeError, match="non-empty tuple or list"):
        deep_moe(x, ())
    with pytest.raises(TypeError, match=r"params\[1\] must be a DeepMoELayerParams"):
        deep_moe(x, (params[0], tuple(params[1])))
    with pytest.raises(TypeError, match="x must have a real floating-point dtype"):
        deep_moe(x.astype(np.int64), params)
    with pytest.raises(TypeError, match="share one dtype"):
        deep_moe(x.astype(np.float32), params)
    with pytest.raises(ValueError, match=r"cotangent has shape \(4, 3\) but \(4, 2\) was expected"):
        deep_moe_vjp(x, params, np.zeros((N, 3)))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        deep_moe(torch.from_numpy(x), params)

"""Meta-Pi network: forward, loss, VJPs (incl. intermediate cotangents), fitting, properties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref.experts import LinearExpertsParams, linear_experts
from moeref.gates import LinearSoftmaxGateParams, linear_softmax_gate
from moeref.meta_pi import MetaPiParams, fit_meta_pi, meta_pi, meta_pi_loss, meta_pi_loss_vjp, meta_pi_vjp
from moeref.mixture import mixture, mixture_vjp
from conftest import assert_close
from helpers import assert_vjp_correct, finite_difference_vjp, leaves, relative_error

# One set of sizes for every backend test, so that JAX compiles each operation once.
N, D_IN, N_EXPERTS, D_OUT = 6, 2, 3, 2


def _params(rng, d_in=D_IN, n=N_EXPERTS, d_out=D_OUT, scale=1.0):
    return MetaPiParams(
        LinearSoftmaxGateParams(scale * rng.normal(size=(d_in, n)), scale * rng.normal(size=n)),
        LinearExpertsParams(scale * rng.normal(size=(n, d_in, d_out)), scale * rng.normal(size=(n, d_out))),
    )


def _reference(x, p):
    logits = x @ p.gate.weight + p.gate.bias
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    f = np.einsum("nd,ide->nie", x, p.experts.weight) + p.experts.bias[None]  # (N, n, d_out)
    return w, f, np.einsum("ni,nie->ne", w, f)


# ------------------------------------------------------------------------------------------
# Forward on every backend
# ------------------------------------------------------------------------------------------


def test_meta_pi_and_loss_match_numpy_on_every_backend(backend, rng):
    x, y, p = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT)), _params(rng)
    _, _, f_ref = _reference(x, p)
    bx, by, bp = backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(p)
    f = backend.to_numpy(meta_pi(bx, bp))
    assert f.shape == (N, D_OUT)
    assert_close(f, f_ref)
    loss = backend.to_numpy(meta_pi_loss(bx, by, bp))
    assert loss.shape == ()
    assert_close(loss, np.mean(np.sum((y - f_ref) ** 2, axis=1)))


def test_meta_pi_is_the_generic_mixture_of_its_building_blocks(rng):
    x, p = rng.normal(size=(N, D_IN)), _params(rng)
    expected = mixture(linear_softmax_gate(x, p.gate), linear_experts(x, p.experts))
    np.testing.assert_array_equal(meta_pi(x, p), expected)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


def test_meta_pi_vjp(rng):
    x, p = rng.normal(size=(5, 2)), _params(rng, 2, 3, 2)
    # the first two fields line up with (x, params); the intermediates are checked below
    assert_vjp_correct("meta_pi", meta_pi, lambda x, p, ct: meta_pi_vjp(x, p, ct)[:2], (x, p), rng.normal(size=(5, 2)))


def test_meta_pi_loss_vjp(rng):
    x, y, p = rng.normal(size=(5, 2)), rng.normal(size=(5, 2)), _params(rng, 2, 3, 2)
    assert_vjp_correct(
        "meta_pi_loss", meta_pi_loss, lambda x, y, p, ct: meta_pi_loss_vjp(x, y, p, ct)[:3], (x, y, p), np.array(1.7)
    )


def test_intermediate_cotangents_are_those_of_expert_outputs_and_gates(rng):
    x, p = rng.normal(size=(5, 2)), _params(rng, 2, 3, 2)
    ct = rng.normal(size=(5, 2))
    w, f, _ = _reference(x, p)
    g = meta_pi_vjp(x, p, ct)
    assert g.expert_outputs.shape == (5, 3, 2) and g.gates.shape == (5, 3)
    m = mixture_vjp(w, f, ct)
    assert_close(g.expert_outputs, m.expert_outputs)
    assert_close(g.gates, m.gates)
    # and against finite differences of f(x) = sum_i w_i f_i in (w, f_1..f_n)
    fd_w, fd_f = finite_difference_vjp(mixture, (w, f), ct)
    assert relative_error((g.gates, g.expert_outputs), (fd_w, fd_f)) < 1e-6


def test_loss_vjp_default_cotangent_is_one_and_scales_linearly(rng):
    x, y, p = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT)), _params(rng)
    g1 = meta_pi_loss_vjp(x, y, p)
    g3 = meta_pi_loss_vjp(x, y, p, 3.0)
    ga = meta_pi_loss_vjp(x, y, p, np.array(3.0))
    for a, b, c in zip(leaves(g1), leaves(g3), leaves(ga)):
        assert_close(3.0 * a, b)
        assert_close(b, c)
    # dL/dy = 2/N (y - f)
    assert_close(g1.y, 2.0 / N * (y - _reference(x, p)[2]))


def test_vjps_agree_across_backends(backend, rng):
    x, y, p = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT)), _params(rng)
    ct = rng.normal(size=(N, D_OUT))

    def run(to, frm):
        return frm((meta_pi_vjp(to(x), to(p), to(ct)), meta_pi_loss_vjp(to(x), to(y), to(p))))

    ref = run(lambda a: a, lambda t: t)
    out = run(backend.tree_from_numpy, backend.tree_to_numpy)
    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, b)


# ------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------


def test_fit_decreases_the_loss(rng):
    # a piecewise-linear target that no single linear map fits: y = |x|
    x = rng.uniform(-1.0, 1.0, size=(60, 1))
    y = np.abs(x)
    p0 = _params(rng, 1, 2, 1, scale=0.1)
    fit = fit_meta_pi(x, y, p0, learning_rate=0.5, steps=300)
    assert fit.loss.shape == (301,)
    assert fit.loss[-1] < 0.2 * fit.loss[0]
    assert fit.loss[-1] < 0.3 * np.var(y)  # better than any constant, and than one linear map (R^2 ~ 0)
    assert np.all(np.diff(fit.loss) <= 1e-12)  # small steps: monotone descent
    assert_close(fit.loss[0], meta_pi_loss(x, y, p0))
    assert_close(fit.loss[-1], meta_pi_loss(x, y, fit.params))


def test_fit_with_frozen_experts_only_moves_the_gate(rng):
    # two pre-trained "modules", one right for x < 0 and one for x > 0; only the gate learns
    x = rng.uniform(-1.0, 1.0, size=(40, 1))
    y = np.abs(x)
    experts = LinearExpertsParams(np.array([[[-1.0]], [[1.0]]]), np.zeros((2, 1)))
    p0 = MetaPiParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), experts)
    fit = fit_meta_pi(x, y, p0, learning_rate=1.0, steps=200, update_experts=False)
    assert fit.params.experts is experts
    assert fit.loss[-1] < 0.1 * fit.loss[0]
    w = linear_softmax_gate(x, fit.params.gate)
    assert np.all((w[:, 1] > 0.5) == (x[:, 0] > 0))


def test_fit_agrees_across_backends(backend, rng):
    x, y, p0 = rng.normal(size=(N, D_IN)), rng.normal(size=(N, D_OUT)), _params(rng, scale=0.3)
    ref = fit_meta_pi(x, y, p0, learning_rate=0.1, steps=2)
    out = backend.tree_to_numpy(
        fit_meta_pi(backend.from_numpy(x), backend.from_numpy(y), backend.tree_from_numpy(p0), learning_rate=0.1, steps=2)
    )
    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, b)


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_identical_experts_make_the_gate_irrelevant_property(n_cases, n, data):
    x = data.draw(hnp.arrays(np.float64, (n_cases, 2), elements=st.floats(-10, 10)))
    gw = data.draw(hnp.arrays(np.float64, (2, n), elements=st.floats(-30, 30)))
    A = data.draw(hnp.arrays(np.float64, (1, 2, 2), elements=st.floats(-5, 5)))
    c = data.draw(hnp.arrays(np.float64, (1, 2), elements=st.floats(-5, 5)))
    p = MetaPiParams(LinearSoftmaxGateParams(gw, np.zeros(n)), LinearExpertsParams(np.repeat(A, n, 0), np.repeat(c, n, 0)))
    np.testing.assert_allclose(meta_pi(x, p), x @ A[0] + c[0], rtol=1e-10, atol=1e-10)
    g = meta_pi_vjp(x, p, np.ones((n_cases, 2)))
    np.testing.assert_allclose(g.params.gate.weight, 0.0, atol=1e-8 * (1 + np.abs(x).max() * (np.abs(A).max() + np.abs(c).max())))


@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_permuting_experts_with_their_gate_columns_changes_nothing_property(n_cases, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    perm = np.asarray(data.draw(st.permutations(range(n))))
    x, y, p = rng.normal(size=(n_cases, 2)), rng.normal(size=(n_cases, 1)), _params(rng, 2, n, 1)
    q = MetaPiParams(
        LinearSoftmaxGateParams(p.gate.weight[:, perm], p.gate.bias[perm]),
        LinearExpertsParams(p.experts.weight[perm], p.experts.bias[perm]),
    )
    np.testing.assert_allclose(meta_pi(x, q), meta_pi(x, p), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(meta_pi_loss(x, y, q), meta_pi_loss(x, y, p), rtol=1e-12)
    gp, gq = meta_pi_loss_vjp(x, y, p), meta_pi_loss_vjp(x, y, q)
    np.testing.assert_allclose(gq.params.experts.weight, gp.params.experts.weight[perm], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gq.gates, gp.gates[:, perm], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    x, y, p = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), _params(rng)
    with pytest.raises(ValueError, match=r"params.experts.weight has shape \(2, 2, 2\) but \(3, 2, \*\) was expected \(the gate has n=3 outputs, one per expert"):
        meta_pi(x, p._replace(experts=LinearExpertsParams(p.experts.weight[:2], p.experts.bias[:2])))
    with pytest.raises(ValueError, match=r"params.gate.weight has shape \(2, 3\) but \(3, \*\) was expected"):
        meta_pi(rng.normal(size=(4, 3)), p)
    with pytest.raises(ValueError, match=r"params.gate.bias has shape \(2,\) but \(3,\) was expected"):
        meta_pi(x, p._replace(gate=LinearSoftmaxGateParams(p.gate.weight, np.zeros(2))))
    with pytest.raises(ValueError, match=r"y has shape \(4, 1\) but \(4, 2\) was expected"):
        meta_pi_loss(x, y[:, :1], p)
    with pytest.raises(TypeError, match="x must have a real floating-point dtype"):
        meta_pi(x.astype(np.int32), p)
    with pytest.raises(TypeError, match="share one dtype"):
        meta_pi_loss(x, y.astype(np.float32), p)
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        meta_pi(np.full((4, 2), np.nan), p)
    with pytest.raises(TypeError, match="params must be a MetaPiParams"):
        meta_pi(x, tuple(p))
    with pytest.raises(ValueError, match=r"cotangent has shape \(4, 3\) but \(4, 2\) was expected"):
        meta_pi_vjp(x, p, np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"cotangent has shape \(4,\) but \(\) was expected \(the loss is a scalar\)"):
        meta_pi_loss_vjp(x, y, p, np.ones(4))
    with pytest.raises(ValueError, match="learning_rate must be a finite positive number"):
        fit_meta_pi(x, y, p, learning_rate=float("nan"), steps=3)
    with pytest.raises(TypeError, match="steps must be an int"):
        fit_meta_pi(x, y, p, learning_rate=0.1, steps=2.0)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        meta_pi(torch.from_numpy(x), p)
    with pytest.raises(TypeError, match="different array libraries"):
        meta_pi_vjp(x, p, torch.ones(4, 2, dtype=torch.float64))


def test_float32_inputs_stay_float32(backend, rng):
    p = backend.tree_from_numpy(_params(rng), np.float32)
    x = backend.from_numpy(rng.normal(size=(N, D_IN)), np.float32)
    y = backend.from_numpy(rng.normal(size=(N, D_OUT)), np.float32)
    assert backend.to_numpy(meta_pi(x, p)).dtype == np.float32
    assert backend.to_numpy(meta_pi_loss(x, y, p)).dtype == np.float32


def test_float32_gradients_stay_float32(rng):
    p = MetaPiParams(*(type(r)(*(a.astype(np.float32) for a in r)) for r in _params(rng)))
    x, y = rng.normal(size=(N, D_IN)).astype(np.float32), rng.normal(size=(N, D_OUT)).astype(np.float32)
    assert all(a.dtype == np.float32 for a in leaves(meta_pi_loss_vjp(x, y, p)))
    assert all(a.dtype == np.float32 for a in leaves(fit_meta_pi(x, y, p, learning_rate=0.1, steps=2)))


def test_y_start_and_cotangent_are_named(rng):
    x, y, p = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), _params(rng)
    with pytest.raises(TypeError, match="y must be an array, got None"):
        meta_pi_loss(x, None, p)
    with pytest.raises(TypeError, match="init_params must be a MetaPiParams, got NoneType"):
        fit_meta_pi(x, y, None, learning_rate=0.1, steps=1)
    with pytest.raises(ValueError, match="cotangent contains NaN or infinite values"):
        meta_pi_vjp(x, p, np.full((4, 2), np.nan))
    with pytest.raises(TypeError, match="cotangent must have a real floating-point dtype"):
        meta_pi_vjp(x, p, np.ones((4, 2), dtype=np.int64))
    # a -inf gate bias switches an expert off, as in moeref.gates
    off = p._replace(gate=p.gate._replace(bias=np.array([0.0, -np.inf, 0.0])))
    assert np.isfinite(float(meta_pi_loss(x, y, off)))

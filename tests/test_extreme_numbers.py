"""Extreme numbers across formulations: no NaN or inf where the mathematics is finite, a clear error
where it is not.

Inputs come from tests/strategies.py: logits of +-1e4, -inf masks (whole rows too), denormal and
huge values, zero-probability experts, float16 / bfloat16. Variance collapse in EM raises the named
``moeref.em.CollapsedVarianceError``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref import core
from moeref.aux_losses import HF_MIXTRAL, load_balancing_loss, load_balancing_loss_vjp, router_z_loss, sequence_balance_loss
from moeref.capacity import CapacityOptions, apply_capacity
from moeref.em import CollapsedVarianceError
from moeref.experts import LinearExpertsParams
from moeref.expert_ffn import ExpertFFNParams
from moeref.gates import LinearSoftmaxGateParams, linear_softmax_gate, linear_softmax_gate_vjp, log_linear_softmax_gate
from moeref.local_experts import (
    LinearLocalExpertsParams,
    local_experts_log_likelihood,
    local_experts_log_likelihood_vjp,
    local_experts_posteriors,
)
from moeref.mixture import hard_mixture, mixture, mixture_vjp
from moeref.mixture_of_softmaxes import MixtureOfSoftmaxesParams, mixture_of_softmaxes_log_probs, mixture_of_softmaxes_nll
from moeref.regression_mixture import regression_mixture_m_step, with_intercept
from moeref.router import RouterOptions, RouterParams, route
from moeref.sparse_moe import SparseMoEOptions, SparseMoEParams, sparse_moe_layer, sparse_moe_layer_vjp
from strategies import (
    DENORMALS,
    HUGE,
    bfloat16_available,
    bias_with_dead_experts,
    extreme_floats,
    logits,
    low_precision_numpy,
    masked_logits,
    shapes,
    zero_probability_gates,
)


def finite(*arrays) -> bool:
    return all(np.all(np.isfinite(np.asarray(a, dtype=np.float64))) for a in arrays)


def seeded(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# softmax / log_softmax / logsumexp
# --------------------------------------------------------------------------------------------


@given(logits(huge=True))
def test_softmax_family_is_finite_on_extreme_finite_logits_property(z):
    p, lp, lse = core.softmax(z), core.log_softmax(z), core.logsumexp(z)
    assert finite(p, lp, lse)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all(lp <= 0.0) and np.all(lse >= z.max(axis=1))
    np.testing.assert_allclose(np.exp(lp), p, rtol=0, atol=1e-12)
    assert finite(core.softmax_vjp(p, np.ones_like(p)), core.log_softmax_vjp(p, np.ones_like(p)))


@given(masked_logits())
def test_masks_give_exact_zeros_and_no_nan_even_for_whole_rows_property(z):
    p, lp, lse = core.softmax(z), core.log_softmax(z), core.logsumexp(z)
    masked, empty = np.isneginf(z), np.all(np.isneginf(z), axis=1)
    assert not np.any(np.isnan(p)) and not np.any(np.isnan(lp)) and not np.any(np.isnan(lse))
    assert np.all(p[masked] == 0.0) and np.all(np.isneginf(lp[masked]))
    assert np.all(np.isfinite(lp[~masked]))
    np.testing.assert_allclose(p.sum(axis=1), np.where(empty, 0.0, 1.0), atol=1e-12)
    assert np.array_equal(np.isneginf(lse), empty) and np.all(np.isfinite(lse[~empty]))
    assert finite(core.softmax_vjp(p, np.ones_like(p)))  # a masked entry gets cotangent 0, not NaN


EXTREME_ROWS = np.array([
    [1e4, -1e4, 0.0, 5e-324],
    [-np.inf, -np.inf, -np.inf, -np.inf],
    [-np.inf, 1e300, -1e300, 1e-310],
    [1e307, 1e307, -np.inf, 0.0],
])


def test_extreme_rows_give_the_numpy_answer_on_every_backend(backend):
    """The same masked / huge / denormal rows on every array library: no NaN, NumPy's values."""
    z = backend.from_numpy(EXTREME_ROWS)
    for fn in (core.softmax, core.log_softmax, core.logsumexp):
        got, want = np.asarray(backend.tree_to_numpy(fn(z))), fn(EXTREME_ROWS)
        assert not np.any(np.isnan(got)), fn.__name__
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=fn.__name__)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=fn.__name__)


@given(hnp.arrays(np.float64, st.integers(1, 8), elements=extreme_floats()))
def test_elementwise_functions_stay_finite_and_in_range_property(x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow inside the logistic family
        s, ls, sp = core.sigmoid(x), core.log_sigmoid(x), core.softplus(x)
    with np.errstate(over="ignore"):  # erf / erfc square |x| > 1e154 to inf on the way to exp(-inf) = 0 (see the report)
        e, ec, cdf = core.erf(x), core.erfc(x), core.normal_cdf(x)
    assert finite(s, ls, sp, e, ec, cdf)
    assert np.all((0 <= s) & (s <= 1)) and np.all(ls <= 0) and np.all(sp >= np.maximum(x, 0))
    assert np.all((-1 <= e) & (e <= 1)) and np.all((0 <= ec) & (ec <= 2)) and np.all((0 <= cdf) & (cdf <= 1))
    np.testing.assert_allclose(ls, np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x))), rtol=1e-12, atol=1e-300)


def test_denormal_and_huge_inputs_of_the_elementwise_functions():
    x = np.array(DENORMALS + HUGE)
    assert np.all(core.sigmoid(np.array(DENORMALS)) == 0.5)
    np.testing.assert_array_equal(core.log_sigmoid(np.array(HUGE)), np.minimum(np.array(HUGE), 0.0))
    assert finite(core.normal_logpdf(np.array(DENORMALS)), core.logsumexp(x), core.softmax(x))


# --------------------------------------------------------------------------------------------
# Gates, mixtures, mixture of softmaxes
# --------------------------------------------------------------------------------------------


@given(st.data(), shapes(), st.sampled_from([1.0, 1e4]))
def test_gate_with_switched_off_experts_and_huge_logits_property(data, shape, scale):
    N, n = shape
    x = data.draw(hnp.arrays(np.float64, (N, 2), elements=st.floats(-3, 3)))
    params = LinearSoftmaxGateParams(scale * seeded(n).normal(size=(2, n)), data.draw(bias_with_dead_experts(n)))
    g, lg = linear_softmax_gate(x, params), log_linear_softmax_gate(x, params)
    dead = np.isneginf(params.bias)
    assert finite(g) and np.all(g[:, dead] == 0.0) and np.all(np.isneginf(lg[:, dead]))
    assert np.all(np.isfinite(lg[:, ~dead]))  # log-space: a live expert's log-gate never underflows to -inf
    np.testing.assert_allclose(g.sum(axis=1), 1.0, atol=1e-12)
    grads = linear_softmax_gate_vjp(x, params, np.ones((N, n)))
    assert finite(grads.x, grads.params.weight, grads.params.bias)


@given(st.data(), shapes())
def test_mixture_of_huge_outputs_with_zero_probability_experts_is_a_convex_combination_property(data, shape):
    N, n = shape
    g = data.draw(zero_probability_gates(shape))
    f = data.draw(hnp.arrays(np.float64, (N, n, 2), elements=st.one_of(st.sampled_from(HUGE), st.floats(-10, 10))))
    y, h = mixture(g, f), hard_mixture(g, f)
    assert finite(y, h)
    # only experts with positive probability count towards the bounds
    live = (g > 0)[..., None]
    lo = np.where(live, f, np.inf).min(axis=1)
    hi = np.where(live, f, -np.inf).max(axis=1)
    slack = 1e-12 * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(y >= lo - slack) and np.all(y <= hi + slack)
    grads = mixture_vjp(g, f, np.ones((N, 2)))
    assert finite(grads.gates, grads.expert_outputs)


@given(st.data(), st.sampled_from([1.0, 1e2, 1e4]))
def test_mixture_of_softmaxes_with_huge_output_logits_property(data, scale):
    N, d, K, d_e, V = 3, 2, 2, 3, data.draw(st.integers(2, 6))
    r = seeded(V)
    params = MixtureOfSoftmaxesParams(
        scale * r.normal(size=(d, K)), scale * r.normal(size=(K, d, d_e)), r.normal(size=(K, d_e)),
        scale * r.normal(size=(d_e, V)), data.draw(hnp.arrays(np.float64, (V,), elements=st.floats(-5, 5))),
    )
    g = data.draw(hnp.arrays(np.float64, (N, d), elements=st.floats(-3, 3)))
    lp = mixture_of_softmaxes_log_probs(g, params)
    assert not np.any(np.isnan(lp)) and np.all(lp <= 0)
    np.testing.assert_allclose(core.logsumexp(lp, axis=-1), 0.0, atol=1e-10)
    targets = np.argmax(lp, axis=1)  # the most likely token has a finite log-probability
    assert np.isfinite(mixture_of_softmaxes_nll(g, targets, params))


# --------------------------------------------------------------------------------------------
# Local experts (Jacobs et al. 1991): log-likelihood far from every expert
# --------------------------------------------------------------------------------------------


@given(st.data(), st.sampled_from([1.0, 1e2, 1e4]), st.sampled_from([1e-6, 1.0, 1e6]))
def test_local_experts_log_likelihood_far_from_every_expert_property(data, distance, variance):
    """Zero-probability experts here have bias -1e4: their gate underflows to exactly 0 (local_experts
    refuses a -inf bias, which the linear-softmax gate accepts; see the report)."""
    N, d, n, d_out = 4, 2, data.draw(st.integers(2, 4)), 2
    r = seeded(n)
    bias = data.draw(bias_with_dead_experts(n))
    params = LinearLocalExpertsParams(
        LinearSoftmaxGateParams(r.normal(size=(d, n)), np.where(np.isneginf(bias), -1e4, bias)),
        LinearExpertsParams(r.normal(size=(n, d, d_out)), r.normal(size=(n, d_out))),
    )
    x = r.normal(size=(N, d))
    y = distance * data.draw(hnp.arrays(np.float64, (N, d_out), elements=st.floats(-1, 1)))
    ll = local_experts_log_likelihood(x, y, params, variance=variance)
    post = local_experts_posteriors(x, y, params, variance=variance)
    assert finite(ll, post)  # log-space: the likelihood underflows, its logarithm does not
    np.testing.assert_allclose(post.sum(axis=1), 1.0, atol=1e-12)
    # (a gate of exp(-1e4) is 0 in probability space but not in log space: with a tiny variance its
    # posterior can still be 1 when every other expert is far worse, which is the exact answer)
    grads = local_experts_log_likelihood_vjp(x, y, params, np.ones(N), variance=variance)
    assert finite(grads.x, grads.y, grads.params.experts.weight, grads.params.gate.weight)


# --------------------------------------------------------------------------------------------
# Router, capacity, sparse layer, auxiliary losses
# --------------------------------------------------------------------------------------------

T, D, E, I = 6, 3, 5, 4


def layer_params(r, bias, scale):
    return SparseMoEParams(
        RouterParams(scale * r.normal(size=(D, E)), bias),
        ExpertFFNParams(r.normal(size=(E, D, I)), r.normal(size=(E, I, D)), r.normal(size=(E, I)), r.normal(size=(E, D))),
        None,
    )


@given(st.data(), st.sampled_from([1.0, 1e4]), st.integers(1, 2), st.sampled_from(["scores", "logits"]))
def test_router_capacity_and_layer_with_huge_logits_and_switched_off_experts_property(data, scale, k, selection):
    r = seeded(k)
    bias = data.draw(bias_with_dead_experts(E, min_live=k))
    dead = np.isneginf(bias)
    x = data.draw(hnp.arrays(np.float64, (T, D), elements=st.floats(-2, 2)))
    opts = RouterOptions(k=k, normalize="sum", selection=selection)
    out = route(x, RouterParams(scale * r.normal(size=(D, E)), bias), opts)
    assert finite(out.routes.weight, out.scores[:, ~dead])
    on_dead = dead[out.routes.expert_index]
    assert np.all(out.routes.weight[on_dead] == 0.0), "a switched-off expert received weight"
    if selection == "logits":  # on scores, live experts whose softmax underflows to 0 tie with dead ones (documented)
        assert not np.any(on_dead), "a switched-off expert was selected while enough were live"
    capped = apply_capacity(out.routes, E, CapacityOptions(capacity=2, capacity_factor=None, dropless=False)).routes
    assert finite(capped.weight) and np.all(capped.weight[~capped.kept] == 0.0)
    layer = SparseMoEOptions(router=opts, capacity=CapacityOptions(capacity=3, capacity_factor=None, dropless=False),
                             load_balancing=HF_MIXTRAL, load_balancing_coef=0.01, z_loss_coef=1e-3)
    params = layer_params(r, bias, scale)
    res = sparse_moe_layer(x, params, layer)
    assert finite(res.y, res.load_balancing_loss, res.z_loss)
    grads = sparse_moe_layer_vjp(x, params, layer, np.ones((T, D)))
    assert finite(grads.x, grads.params.router.weight, grads.params.experts.w_in)


@given(masked_logits((T, E), whole_rows=False, min_live=2))
def test_auxiliary_losses_with_huge_and_masked_logits_property(z):
    sel = core.top_k(z, 2)[1]
    lb = load_balancing_loss(z, sel, options=HF_MIXTRAL)
    assert np.isfinite(lb) and np.isfinite(router_z_loss(z))
    assert finite(load_balancing_loss_vjp(z, sel, 1.0, options=HF_MIXTRAL).logits)
    assert np.isfinite(sequence_balance_loss(z, sel))


def test_whole_masked_rows_in_the_auxiliary_losses():
    z = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1e4, -1e4]])
    sel = np.array([[0], [1]])
    assert np.isfinite(load_balancing_loss(z, sel))  # an all -inf row has no probability mass: p_t = 0
    with pytest.raises(ValueError, match="row 0 is -inf for every expert"):
        router_z_loss(z)  # (log sum exp)^2 = +inf: no finite answer, and the error says so


def test_a_router_with_every_expert_switched_off_raises():
    r = seeded(0)
    with pytest.raises(ValueError, match="-inf"):
        route(r.normal(size=(T, D)), RouterParams(r.normal(size=(D, E)), np.full(E, -np.inf)), RouterOptions(k=2))


def test_routes_to_switched_off_experts_are_not_kept():
    r = seeded(0)
    bias = np.array([-np.inf] * (E - 1) + [0.0])
    out = route(r.normal(size=(T, D)), RouterParams(r.normal(size=(D, E)), bias), RouterOptions(k=2))
    assert not np.any(out.routes.kept & np.isneginf(bias)[out.routes.expert_index])


# --------------------------------------------------------------------------------------------
# Low precision: float16 / float32 (NumPy) and bfloat16 (PyTorch)
# --------------------------------------------------------------------------------------------


@given(low_precision_numpy, logits((3, 4)))
def test_low_precision_numpy_stays_finite_and_keeps_its_dtype_property(dtype, z):
    z = z.astype(dtype)  # +-1e4 fits in float16 (max 65504)
    p, lp = core.softmax(z), core.log_softmax(z)
    assert p.dtype == dtype and lp.dtype == dtype and finite(p, lp)
    np.testing.assert_allclose(p.astype(np.float64).sum(axis=1), 1.0, atol=4 * np.finfo(dtype).eps)
    g = linear_softmax_gate(np.ones((2, 3), dtype), LinearSoftmaxGateParams(z[:3, :].astype(dtype), np.zeros(4, dtype)))
    assert g.dtype == dtype and finite(g)
    y = mixture(p, np.ones((3, 4, 2), dtype))
    assert y.dtype == dtype and finite(y)


@pytest.mark.skipif(not bfloat16_available(), reason="PyTorch is not installed (bfloat16 needs it)")
@given(logits((3, 4)))
def test_bfloat16_softmax_gate_and_mixture_property(z):
    import torch

    zt = torch.from_numpy(z).to(torch.bfloat16)
    p, lp = core.softmax(zt), core.log_softmax(zt)
    assert p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) and bool(torch.isfinite(lp).all())
    assert torch.allclose(p.float().sum(dim=1), torch.ones(3), atol=3e-2)
    gate = LinearSoftmaxGateParams(zt[:3, :], torch.zeros(4, dtype=torch.bfloat16))
    g = linear_softmax_gate(torch.ones(2, 3, dtype=torch.bfloat16), gate)
    assert g.dtype == torch.bfloat16 and bool(torch.isfinite(g).all())
    y = mixture(p, torch.ones(3, 4, 2, dtype=torch.bfloat16))
    assert bool(torch.isfinite(y).all())


# --------------------------------------------------------------------------------------------
# EM: variance collapse is a named error, never a NaN
# --------------------------------------------------------------------------------------------


@given(st.data(), st.integers(5, 10))
def test_variance_collapse_raises_the_named_em_error_property(data, N):
    """Component 1 owns exactly two points: its regression line fits them exactly, sigma -> 0."""
    # distinct x values at least 0.1 apart (unique floats such as 0 and 1e-233 make the design singular first)
    x = with_intercept(data.draw(hnp.arrays(np.int64, (N, 1), elements=st.integers(-50, 50), unique=True)) / 10.0)
    # generic y (noise added) so that component 0, with N - 2 >= 3 points, keeps a positive variance
    y = data.draw(hnp.arrays(np.float64, (N,), elements=st.floats(-5, 5))) + seeded(N).normal(size=N)
    owned = data.draw(st.lists(st.integers(0, N - 1), min_size=2, max_size=2, unique=True))
    tau = np.zeros((N, 2))
    tau[:, 0] = 1.0
    tau[owned] = [0.0, 1.0]
    with pytest.raises(CollapsedVarianceError, match="component 1 has sigma"):
        regression_mixture_m_step(x, y, tau)

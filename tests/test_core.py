"""The portable primitives in moeref.core, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref import core
from conftest import assert_close


def test_logsumexp_softmax_match_scipy(backend, rng):
    x = rng.normal(size=(5, 7)) * 30
    xb = backend.from_numpy(x)
    assert_close(backend.to_numpy(core.logsumexp(xb, axis=-1)), sp.logsumexp(x, axis=-1))
    assert_close(backend.to_numpy(core.logsumexp(xb, axis=0, keepdims=True)), sp.logsumexp(x, axis=0, keepdims=True))
    assert_close(backend.to_numpy(core.softmax(xb)), sp.softmax(x, axis=-1))
    assert_close(backend.to_numpy(core.log_softmax(xb)), sp.log_softmax(x, axis=-1))


def test_all_neg_inf_row_is_handled_without_nan(backend):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 1.0]])
    xb = backend.from_numpy(x)
    lse = backend.to_numpy(core.logsumexp(xb))
    assert lse[0] == -np.inf and np.isfinite(lse[1])
    p = backend.to_numpy(core.softmax(xb))
    assert np.all(p[0] == 0) and np.isclose(p[1].sum(), 1.0) and p[1, 1] == 0
    lp = backend.to_numpy(core.log_softmax(xb))
    assert np.all(lp[0] == -np.inf) and lp[1, 1] == -np.inf and not np.isnan(lp).any()


def test_softmax_of_huge_logits_is_finite(backend):
    x = np.array([[1e4, -1e4, 0.0], [1e300, 1e300, -1e300]])
    p = backend.to_numpy(core.softmax(backend.from_numpy(x)))
    assert np.all(np.isfinite(p))
    assert_close(p, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])


def test_softmax_and_log_softmax_vjp_match_finite_differences(backend, rng):
    z = rng.normal(size=(3, 4))
    ct = rng.normal(size=(3, 4))
    eps = 1e-6
    fd_p = np.zeros_like(z)
    fd_l = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        fd_p[idx] = np.sum((sp.softmax(zp, -1) - sp.softmax(zm, -1)) * ct) / (2 * eps)
        fd_l[idx] = np.sum((sp.log_softmax(zp, -1) - sp.log_softmax(zm, -1)) * ct) / (2 * eps)
    p = core.softmax(backend.from_numpy(z))
    ctb = backend.from_numpy(ct)
    assert_close(backend.to_numpy(core.softmax_vjp(p, ctb)), fd_p, rtol=1e-7, atol=1e-9)
    assert_close(backend.to_numpy(core.log_softmax_vjp(p, ctb)), fd_l, rtol=1e-7, atol=1e-9)


def test_elementwise_match_scipy(backend):
    x = np.concatenate([np.linspace(-40, 40, 801), [-745.0, 700.0, 0.0]])
    xb = backend.from_numpy(x)
    assert_close(backend.to_numpy(core.softplus(xb)), np.logaddexp(x, 0.0))
    assert_close(backend.to_numpy(core.sigmoid(xb)), sp.expit(x))
    assert_close(backend.to_numpy(core.log_sigmoid(xb)), sp.log_expit(x), rtol=1e-12, atol=1e-300)
    assert_close(backend.to_numpy(core.relu(xb)), np.maximum(x, 0))


def test_erf_erfc_normal_cdf_match_scipy_to_a_few_ulp(backend):
    x = np.concatenate([np.linspace(-9, 9, 3601), [0.0, 1e-300, -1e-10, 0.9999999, 1.0, 2.5, 26.0, -26.0]])
    xb = backend.from_numpy(x)
    assert_close(backend.to_numpy(core.erf(xb)), sp.erf(x), rtol=4e-15, atol=1e-300)
    assert_close(backend.to_numpy(core.erfc(xb)), sp.erfc(x), rtol=4e-14, atol=1e-300)
    # Phi(-26) has condition number ~x^2 = 676 with respect to the rounding of x / sqrt(2)
    assert_close(backend.to_numpy(core.normal_cdf(xb)), sp.ndtr(x), rtol=2e-13, atol=1e-300)
    assert np.isnan(backend.to_numpy(core.erfc(backend.from_numpy(np.array([np.nan]))))).all()


def test_erf_float32_is_accurate_to_float32(backend):
    x = np.linspace(-6, 6, 1201).astype(np.float32)
    out = backend.to_numpy(core.erf(backend.from_numpy(x)))
    assert out.dtype == np.float32
    assert_close(out, sp.erf(x.astype(np.float64)), rtol=2e-6, atol=1e-7)


def test_top_k_lower_index_wins_ties(backend):
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    vals, idx = core.top_k(backend.from_numpy(x), 2)
    np.testing.assert_array_equal(backend.to_numpy(idx), [[1, 2], [0, 1]])
    assert_close(backend.to_numpy(vals), [[3.0, 3.0], [0.0, 0.0]])
    assert backend.to_numpy(idx).dtype == np.int64
    np.testing.assert_array_equal(backend.to_numpy(core.argmax(backend.from_numpy(x))), [1, 0])


def test_top_k_along_axis_0_and_bad_k(backend):
    x = np.array([[1.0, 5.0], [4.0, 5.0], [4.0, 0.0]])
    _, idx = core.top_k(backend.from_numpy(x), 2, axis=0)
    np.testing.assert_array_equal(backend.to_numpy(idx), [[1, 0], [2, 1]])
    with pytest.raises(ValueError, match="k must be between 1 and 2"):
        core.top_k(backend.from_numpy(x), 3)


@given(hnp.arrays(np.float64, (4, 6), elements=st.integers(-3, 3).map(float)), st.integers(1, 6))
def test_top_k_matches_a_stable_numpy_reference_property(x, k):
    _, idx = core.top_k(x, k)
    ref = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(idx), ref)


@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 9)),
               elements=st.one_of(st.integers(-4, 4).map(float), st.floats(-1e3, 1e3), st.sampled_from([-np.inf, np.inf]))),
    st.integers(1, 9), st.sampled_from([0, -1]),
)
def test_top_k_fast_path_equals_the_stable_sort_property(x, k, axis):
    """The unstable sort with its tie check gives exactly the stable sort's first k (rows with and
    without ties, infinities, along either axis)."""
    k = min(k, x.shape[axis])
    vals, idx = core.top_k(x, k, axis=axis)
    ref = np.take(np.argsort(-x, axis=axis, kind="stable"), np.arange(k), axis=axis)
    np.testing.assert_array_equal(np.asarray(idx), ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(x, ref, axis=axis))


def test_top_k_with_nan_falls_back_to_the_stable_sort():
    x = np.array([[np.nan, 1.0, np.nan, 2.0], [3.0, np.nan, np.nan, np.nan]])
    _, idx = core.top_k(x, 3)
    np.testing.assert_array_equal(idx, np.argsort(-x, axis=-1, kind="stable")[:, :3])


@given(st.lists(st.integers(0, 6), max_size=60))
def test_stable_argsort_of_small_ints_is_the_stable_sort_property(keys):
    key = np.array(keys, dtype=np.int64)
    np.testing.assert_array_equal(core._stable_argsort_small_ints(key, 7), np.argsort(key, kind="stable"))


def test_one_hot_and_take_along_axis(backend):
    idx = backend.from_numpy(np.array([[2, 0], [1, 1]], dtype=np.int64))
    xp = backend.namespace()
    oh = backend.to_numpy(core.one_hot(idx, 3, dtype=xp.float64))
    assert oh.shape == (2, 2, 3) and oh.dtype == np.float64
    np.testing.assert_array_equal(oh.argmax(-1), [[2, 0], [1, 1]])
    x = backend.from_numpy(np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]))
    np.testing.assert_array_equal(backend.to_numpy(core.take_along_axis(x, idx, axis=1)), [[30, 10], [50, 50]])


def test_inverse_permutation(backend, rng):
    perm = rng.permutation(11)
    inv = backend.to_numpy(core.inverse_permutation(backend.from_numpy(perm)))
    np.testing.assert_array_equal(inv[perm], np.arange(11))


def test_segment_sum_keeps_duplicates_and_empty_segments(backend, rng):
    ids = np.array([3, 0, 3, 3, 1, 0, 3], dtype=np.int64)
    v = rng.normal(size=(7, 2))
    ref = np.zeros((5, 2))
    np.add.at(ref, ids, v)
    out = backend.to_numpy(core.segment_sum(backend.from_numpy(v), backend.from_numpy(ids), 5))
    assert_close(out, ref)
    assert np.all(out[2] == 0) and np.all(out[4] == 0)


@given(st.integers(0, 40), st.integers(1, 6), st.data())
def test_segment_sum_equals_add_at_property(n, segments, data):
    ids = np.asarray(data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, segments - 1))))
    v = np.asarray(data.draw(hnp.arrays(np.float64, (n,), elements=st.floats(-1e3, 1e3))))
    ref = np.zeros(segments)
    np.add.at(ref, ids, v)
    np.testing.assert_allclose(np.asarray(core.segment_sum(v, ids, segments)), ref, rtol=1e-12, atol=1e-9)


def test_array_namespace_names_mixed_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different array libraries.*numpy: a.*torch: b"):
        core.array_namespace(np.ones(2), torch.ones(2), names=("a", "b"))
    with pytest.raises(TypeError, match="c must be an array"):
        core.array_namespace([1.0, 2.0], names=("c",))


def test_primitives_refuse_bad_input_with_the_argument_named():
    with pytest.raises(TypeError, match="x must have a real floating-point dtype.*got bool"):
        core.softmax(np.array([True, False]))
    with pytest.raises(TypeError, match="x must have a real floating-point dtype.*got int64"):
        core.log_softmax(np.array([1, 2]))
    with pytest.raises(TypeError, match="x must be an array, got None"):
        core.logsumexp(None)
    with pytest.raises(TypeError, match="k must be an int, got float 1.5"):
        core.top_k(np.ones((2, 3)), 1.5)
    with pytest.raises(ValueError, match=r"cotangent has shape \(2, 4\) but \(2, 3\) was expected \(the shape of p\)"):
        core.softmax_vjp(np.ones((2, 3)) / 3, np.ones((2, 4)))
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        core.one_hot(np.array([0.0, 1.0]), 2, dtype=np.float64)
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        core.one_hot(np.array([0, 1]), 0, dtype=np.float64)
    with pytest.raises(TypeError, match="x must be an array .* got builtins.list"):
        core.device_of([1.0])
    with pytest.raises(TypeError, match="one of a, b must be an array, got None"):
        core.array_namespace(None, None, names=("a", "b"))


def test_segment_sum_refuses_ids_outside_the_segments():
    v = np.ones((3, 1))
    with pytest.raises(ValueError, match=r"segment_ids has values up to 7 but num_segments=3 segments were given \(entries must lie in \[0, 3\)\)"):
        core.segment_sum(v, np.array([0, 1, 7]), 3)  # row 2 would be lost silently
    with pytest.raises(ValueError, match=r"segment_ids has negative values \(min -1\)"):
        core.segment_sum(v, np.array([0, -1, 2]), 3)
    with pytest.raises(ValueError, match=r"values has shape \(3, 1\) but segment_ids has shape \(2,\)"):
        core.segment_sum(v, np.array([0, 1]), 3)
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        core.segment_sum(v, np.array([0.0, 1.0, 2.0]), 3)
    np.testing.assert_array_equal(core._segment_sum(v, np.array([0, 1, 1]), 2), [[1.0], [2.0]])  # the unchecked twin


def test_inverse_permutation_refuses_a_non_permutation():
    with pytest.raises(ValueError, match=r"perm must be a permutation of 0\.\.2"):
        core.inverse_permutation(np.array([0, 0, 1]))
    with pytest.raises(ValueError, match=r"perm must be a permutation of 0\.\.2"):
        core.inverse_permutation(np.array([0, 3, 1]))
    with pytest.raises(TypeError, match="perm must have an integer dtype"):
        core.inverse_permutation(np.array([1.0, 0.0]))
    # a batch of permutations, row by row; the unchecked twin agrees on a permutation
    perms = np.array([[2, 0, 1], [0, 1, 2]])
    np.testing.assert_array_equal(core.inverse_permutation(perms), [[1, 2, 0], [0, 1, 2]])
    np.testing.assert_array_equal(core._inverse_permutation(perms[0]), [1, 2, 0])


def test_take_along_axis_refuses_indices_libraries_disagree_on():
    x = np.arange(6.0).reshape(2, 3)
    with pytest.raises(ValueError, match=r"indices has negative values \(min -1\) but x has 3 entries along axis -1"):
        core.take_along_axis(x, np.array([[0], [-1]]))
    with pytest.raises(ValueError, match="indices has values up to 3"):
        core.take_along_axis(x, np.array([[0], [3]]))
    with pytest.raises(ValueError, match=r"indices must have the rank of x \(2\)"):
        core.take_along_axis(x, np.array([0, 1]))
    np.testing.assert_array_equal(core.take_along_axis(x, np.array([[2], [0]])), [[2.0], [3.0]])


def test_tree_add_scaled_refuses_mismatched_trees():
    from moeref.gates import LinearSoftmaxGateParams

    p = LinearSoftmaxGateParams(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"grads.bias has shape \(4,\) but params.bias has shape \(3,\)"):
        core.tree_add_scaled(p, p._replace(bias=np.zeros(4)), 0.1)
    with pytest.raises(TypeError, match="grads must have the structure of params: params is a LinearSoftmaxGateParams"):
        core.tree_add_scaled(p, tuple(p), 0.1)
    out = core.tree_add_scaled(p, LinearSoftmaxGateParams(np.ones((2, 3)), np.ones(3)), 0.5)
    assert isinstance(out, LinearSoftmaxGateParams) and np.all(out.weight == 0.5)


def test_top_k_orders_booleans_and_unsigned_integers():
    _, idx = core.top_k(np.array([False, True, True]), 2)
    np.testing.assert_array_equal(idx, [1, 2])
    _, idx = core.top_k(np.array([0, 3, 255], dtype=np.uint8), 2)
    np.testing.assert_array_equal(idx, [2, 1])

"""Balanced assignment by auction: optimality against scipy, the dual certificate, ties, backends, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from moeref.balanced_assignment import (
    AuctionOptions,
    assignment_value,
    balanced_assignment,
    dual_bound,
    positions_in_expert,
)
from conftest import assert_close


def scipy_optimum(a):
    """Optimal balanced value: each expert's column repeated T/E times, then the Hungarian method."""
    T, E = a.shape
    slots = np.repeat(a, T // E, axis=1)  # (T, T)
    rows, cols = linear_sum_assignment(slots, maximize=True)
    return slots[rows, cols].sum()


def check_result(a, r):
    """Balanced counts, positions, and value within T*eps of scipy's optimum with a valid certificate."""
    T, E = a.shape
    e = np.asarray(r.expert_index)
    assert e.dtype == np.int64 and np.all(np.bincount(e, minlength=E) == T // E)
    for k in range(E):
        assert np.array_equal(np.sort(np.asarray(r.position)[e == k]), np.arange(T // E))
    value, opt, upper = float(assignment_value(a, e)), scipy_optimum(a), float(dual_bound(a, r.prices))
    slack = 1e-9 * max(1.0, abs(opt))
    assert upper >= opt - slack  # weak duality
    assert value >= upper - T * r.epsilon - slack  # the auction's certificate
    assert value >= opt - T * r.epsilon - slack  # hence near-optimal
    return value, opt


@pytest.mark.parametrize("T,E", [(2, 2), (6, 3), (12, 4), (12, 2), (8, 8), (20, 5)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_within_t_epsilon_of_scipy_optimum(T, E, scale, rng):
    a = scale * rng.normal(size=(T, E))
    check_result(a, balanced_assignment(a))


@pytest.mark.parametrize("T,E", [(6, 2), (9, 3), (12, 4), (16, 4), (10, 5)])
def test_integer_affinities_are_solved_exactly_when_epsilon_below_one_over_t(T, E, rng):
    for _ in range(5):
        a = rng.integers(-5, 6, size=(T, E)).astype(np.float64)
        r = balanced_assignment(a, AuctionOptions(epsilon=1.0 / (T + 1)))
        value, opt = check_result(a, r)
        assert value == opt


def test_beats_greedy_when_greedy_is_unbalanced():
    # all four tokens prefer expert 0; the optimum moves the two with the smallest loss
    a = np.array([[3.0, 1.0], [2.0, 0.0], [1.0, 0.5], [4.0, 3.9]])
    r = balanced_assignment(a)
    assert r.expert_index.tolist() == [0, 0, 1, 1]
    assert float(assignment_value(a, r.expert_index)) == 3.0 + 2.0 + 0.5 + 3.9


def test_ties_lower_token_index_takes_the_lower_expert():
    # all affinities equal: every assignment is optimal; the tie rules give token blocks in order
    r = balanced_assignment(np.zeros((6, 3)))
    assert r.expert_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.position.tolist() == [0, 1, 0, 1, 0, 1]


def test_one_expert_and_one_token_per_expert(rng):
    r = balanced_assignment(rng.normal(size=(5, 1)))
    assert r.expert_index.tolist() == [0] * 5 and r.position.tolist() == [0, 1, 2, 3, 4] and r.rounds == 0
    a = rng.normal(size=(7, 7))  # C = 1: a plain assignment problem
    rows, cols = linear_sum_assignment(a, maximize=True)
    r = balanced_assignment(a)
    assert np.array_equal(r.expert_index, cols[np.argsort(rows)])


def test_positions_in_expert_is_the_rank_in_token_order():
    e = np.array([2, 0, 2, 1, 0, 2])
    assert positions_in_expert(e, 3).tolist() == [0, 0, 1, 0, 1, 2]


def test_dual_bound_is_an_upper_bound_for_any_prices(rng):
    a = rng.normal(size=(8, 4))
    opt = scipy_optimum(a)
    for _ in range(5):
        assert float(dual_bound(a, rng.normal(size=4))) >= opt - 1e-12


@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([0.01, 1.0, 100.0]), st.integers(0, 2**31 - 1))
def test_balanced_and_within_t_epsilon_of_optimum_property(E, C, scale, seed):
    rng = np.random.default_rng(seed)
    a = scale * rng.normal(size=(E * C, E))
    check_result(a, balanced_assignment(a))


@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_adding_a_constant_per_token_does_not_change_the_assignment_property(E, C, seed):
    # sum_t (a_t sigma(t) + r_t) = value + sum_t r_t for every balanced sigma: same optimisation problem
    rng = np.random.default_rng(seed)
    a = rng.integers(-4, 5, size=(E * C, E)).astype(np.float64)
    shift = rng.integers(-3, 4, size=(E * C, 1)).astype(np.float64)
    opts = AuctionOptions(epsilon=1.0 / (E * C + 1))
    r1, r2 = balanced_assignment(a, opts), balanced_assignment(a + shift, opts)
    assert float(assignment_value(a, r1.expert_index)) == float(assignment_value(a, r2.expert_index))


# --------------------------------------------------------------------------------------------
# Every backend
# --------------------------------------------------------------------------------------------


def test_same_assignment_on_every_backend(backend, rng):
    a = rng.normal(size=(6, 3))
    want = balanced_assignment(a)
    got = balanced_assignment(backend.from_numpy(a))
    assert got.rounds == want.rounds
    assert np.array_equal(backend.to_numpy(got.expert_index), want.expert_index)
    assert np.array_equal(backend.to_numpy(got.position), want.position)
    assert_close(backend.to_numpy(got.prices), want.prices)
    assert_close(backend.to_numpy(dual_bound(backend.from_numpy(a), got.prices)), dual_bound(a, want.prices))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input(rng):
    a = rng.normal(size=(10, 4))
    with pytest.raises(ValueError, match=r"affinities has T=10 tokens, not divisible by E=4 experts.*pad or drop 2 tokens"):
        balanced_assignment(a)
    with pytest.raises(ValueError, match="affinities must be 2-dimensional, got shape"):
        balanced_assignment(a[:, 0])
    with pytest.raises(ValueError, match="affinities contains NaN or infinite values"):
        balanced_assignment(np.full((4, 2), np.nan))
    with pytest.raises(TypeError, match="affinities must have a real floating-point dtype"):
        balanced_assignment(np.ones((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="at least one token and one expert"):
        balanced_assignment(np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"options.epsilon=1e-20 is below the rounding floor"):
        balanced_assignment(a[:8], AuctionOptions(epsilon=1e-20))
    with pytest.raises(ValueError, match="options.scaling must be a finite number > 1, got 1.0"):
        AuctionOptions(scaling=1.0)
    with pytest.raises(ValueError, match="options.epsilon must be a finite positive number or None, got -1"):
        AuctionOptions(epsilon=-1)
    with pytest.raises(TypeError, match="options must be an AuctionOptions"):
        balanced_assignment(a[:8], options={"epsilon": 0.1})
    with pytest.raises(RuntimeError, match="options.max_rounds=2 rounds without finishing"):
        balanced_assignment(rng.normal(size=(16, 4)), AuctionOptions(max_rounds=2))


def test_traced_affinities_are_rejected_with_advice(rng):
    jax = pytest.importorskip("jax")
    a = jax.numpy.asarray(rng.normal(size=(4, 2)))
    with pytest.raises(TypeError, match=r"needs concrete affinities, got traced values \(jax.jit / jax.grad\)"):
        jax.jit(lambda a: balanced_assignment(a).expert_index)(a)


def test_helpers_check_their_arguments():
    a = np.array([[3.0, 1.0], [2.0, 0.0], [1.0, 0.5], [0.0, 2.0]])
    with pytest.raises(ValueError, match=r"expert_index has values up to 2 but affinities has E=2 columns"):
        assignment_value(a, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="affinities contains NaN"):
        assignment_value(np.where(a == 0.0, np.nan, a), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"prices has shape \(3,\) but \(2,\) was expected"):
        dual_bound(a, np.zeros(3))
    with pytest.raises(ValueError, match=r"expert_index has negative values \(min -1\)"):
        positions_in_expert(np.array([0, -1, 1]), 2)
    np.testing.assert_array_equal(positions_in_expert(np.array([1, 0, 1, 1]), 2), [0, 0, 1, 2])

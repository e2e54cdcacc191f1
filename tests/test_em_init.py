"""moeref.em_init: random starting values from explicit draws of a caller's generator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_close
from moeref.em_init import INIT_SCHEMES, draw_uniforms, random_responsibilities, random_starts


class RecordingGenerator:
    """A generator that records every call: only ``random(shape)`` may be called."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self.calls: list[tuple] = []

    def random(self, shape):
        self.calls.append(tuple(shape))
        return self._rng.random(shape)


def test_partition_scheme_is_a_balanced_split_by_rank():
    u = np.array([0.7, 0.1, 0.9, 0.3, 0.5])
    tau = random_responsibilities(u, 2)
    # ranks 3, 0, 4, 1, 2 -> blocks floor(2 r / 5) = 1, 0, 1, 0, 0
    assert tau.tolist() == [[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]]


def test_flexmix_scheme_is_point_nine_on_the_drawn_component():
    u = np.array([0.05, 0.4, 0.99])
    tau = random_responsibilities(u, 3, scheme="flexmix")
    want = np.full((3, 3), 0.1)
    want[[0, 1, 2], [0, 1, 2]] = 0.9
    np.testing.assert_allclose(tau, want / want.sum(axis=1, keepdims=True), rtol=1e-15)


@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_partition_blocks_have_floor_or_ceil_size_property(n, k, seed):
    u = np.random.default_rng(seed).random(n)
    tau = random_responsibilities(u, k)
    assert set(np.unique(tau)) <= {0.0, 1.0} and np.all(tau.sum(axis=1) == 1)
    sizes = tau.sum(axis=0)
    assert np.all((sizes == n // k) | (sizes == -(-n // k))) and sizes.sum() == n
    # the same uniforms in another order permute the rows the same way
    perm = np.random.default_rng(seed + 1).permutation(n)
    np.testing.assert_array_equal(random_responsibilities(u[perm], k), tau[perm])


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_random_responsibilities_on_every_backend(backend, scheme):
    u = np.random.default_rng(3).random(11)
    ref = random_responsibilities(u, 3, scheme=scheme)
    assert_close(backend.to_numpy(random_responsibilities(backend.from_numpy(u), 3, scheme=scheme)), ref, rtol=1e-15)


def test_draws_are_one_random_call_per_start_in_order():
    gen = RecordingGenerator(7)
    seen = []

    def m_step(tau):
        seen.append(tau)
        return float(tau[:, 0].sum())

    starts = random_starts(gen, 3, m_step, n_components=2, like=np.zeros((6, 2)))
    assert gen.calls == [(6,), (6,), (6,)]
    ref = np.random.default_rng(7)
    for s, tau in zip(starts, seen):
        np.testing.assert_array_equal(s.draws, ref.random(6))
        np.testing.assert_array_equal(s.responsibilities, tau)
        assert s.params == 3.0  # the M-step's value, from balanced blocks of 3
    assert random_starts(gen, 0, m_step, n_components=2, like=np.zeros((6, 2))) == ()


def test_draws_follow_the_namespace_and_dtype_of_like(backend):
    u = draw_uniforms(np.random.default_rng(0), 4, like=backend.from_numpy(np.zeros((4, 1))))
    assert_close(backend.to_numpy(u), np.random.default_rng(0).random(4), rtol=0)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match=r"generator must have a random\(shape\) method"):
        draw_uniforms(object(), 3, like=np.zeros(1))

    class Wrong:
        def random(self, shape):
            return np.zeros((2,))

    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        draw_uniforms(Wrong(), 3, like=np.zeros(1))

    class Normal:
        def random(self, shape):
            return np.full(shape, 1.5)

    with pytest.raises(ValueError, match=r"values outside \[0, 1\)"):
        draw_uniforms(Normal(), 3, like=np.zeros(1))
    with pytest.raises(ValueError, match="scheme"):
        random_responsibilities(np.zeros(3), 2, scheme="kmeans")
    with pytest.raises(ValueError, match="n_components"):
        random_responsibilities(np.zeros(3), 0)
    with pytest.raises(ValueError, match="draws must be"):
        random_responsibilities(np.zeros((3, 1)), 2)


def test_draws_outside_the_unit_interval_and_bad_like_are_refused():
    with pytest.raises(ValueError, match=r"draws must hold uniforms in \[0, 1\)"):
        random_responsibilities(np.array([0.2, np.nan, 0.5]), 2)
    with pytest.raises(TypeError, match="like must have a real floating-point dtype"):
        draw_uniforms(np.random.default_rng(0), 3, like=np.zeros(3, dtype=bool))
    with pytest.raises(TypeError, match="like must be an array, got None"):
        random_starts(np.random.default_rng(0), 1, lambda tau: tau, n_components=2, like=None)

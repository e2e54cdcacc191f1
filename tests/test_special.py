"""moeref.special.lgamma against scipy.special.gammaln, on every backend; edge cases; bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import special

from moeref.special import lgamma


def _grid():
    return np.concatenate(
        [
            np.linspace(1e-6, 30.0, 20001),  # the shifted range, the switch at 10 and beyond
            np.logspace(-300, 300, 601),  # tiny to huge
            np.arange(0.0, 171.0) + 1.0,  # log(n!) for counts n = 0..170
            [0.5, 1.0, 2.0, 9.999999999, 10.0, 10.000000001],
        ]
    )


def test_lgamma_matches_scipy_to_1e_13():
    x = _grid()
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # no warning anywhere on the grid
        got = lgamma(x)
    ref = special.gammaln(x)
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))  # absolute below 1, relative above
    assert err.max() < 1e-13, f"worst error {err.max():.2e} at x={x[np.argmax(err)]!r}"


def test_lgamma_of_integers_is_log_factorial():
    n = np.arange(0, 30)
    got = lgamma(n.astype(np.float64) + 1.0)
    ref = np.array([math.log(math.factorial(k)) for k in n])
    np.testing.assert_allclose(got, ref, rtol=1e-14, atol=1e-14)


def test_lgamma_on_every_backend(backend):
    x = np.array([1e-8, 0.5, 1.0, 2.0, 3.7, 9.5, 10.0, 57.0, 1e6])
    got = backend.to_numpy(lgamma(backend.from_numpy(x)))
    np.testing.assert_allclose(got, special.gammaln(x), rtol=1e-13, atol=1e-14)


def test_lgamma_edge_cases_without_warnings():
    x = np.array([0.0, np.inf, -1.0, -0.5, np.nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", divide="raise", invalid="raise"):
            got = lgamma(x)
    assert got[0] == np.inf and got[1] == np.inf
    assert np.isnan(got[2:]).all()


def test_lgamma_float32():
    x = np.linspace(0.1, 50.0, 500).astype(np.float32)
    got = lgamma(x)
    assert got.dtype == np.float32
    # near the zeros of log Gamma (x = 1, 2) the recurrence cancels two numbers of size ~15: the
    # error there is absolute, a few float32 ulps of 15
    np.testing.assert_allclose(got, special.gammaln(x.astype(np.float64)), rtol=2e-6, atol=1e-5)


@given(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False))
def test_lgamma_recurrence_property(x):
    # log Gamma(x + 1) = log Gamma(x) + log x
    a = lgamma(np.array([x + 1.0]))[0]
    b = lgamma(np.array([x]))[0] + math.log(x)
    assert abs(a - b) <= 1e-13 * max(1.0, abs(a))


def test_lgamma_bad_input():
    with pytest.raises(TypeError, match="x must have a real floating-point dtype"):
        lgamma(np.arange(3))
    with pytest.raises(TypeError, match="x must be an array"):
        lgamma(2.0)

"""Weighted least squares (moeref.weighted_lstsq): a value check and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from moeref.weighted_lstsq import design_matrix, split_coefficients, weighted_least_squares


def test_matches_numpy_lstsq_per_expert(rng):
    x, y, w = rng.normal(size=(12, 2)), rng.normal(size=(12, 3)), rng.uniform(0.1, 1.0, size=(12, 2))
    theta = weighted_least_squares(design_matrix(x), y, w)  # (2, 3, 3)
    for k in range(2):
        sw = np.sqrt(w[:, k])[:, None]
        ref = np.linalg.lstsq(sw * design_matrix(x), sw * y, rcond=None)[0]
        np.testing.assert_allclose(theta[k], ref, rtol=1e-10, atol=1e-12)
    slopes, intercepts = split_coefficients(theta, 2)
    assert slopes.shape == (2, 2, 3) and intercepts.shape == (2, 3)


def test_bad_input_names_the_argument(rng):
    x, y, w = rng.normal(size=(8, 2)), rng.normal(size=(8, 1)), np.ones((8, 2))
    d = design_matrix(x)
    with pytest.raises(ValueError, match="design contains NaN or infinite values"):
        weighted_least_squares(np.where(d == d[0, 0], np.nan, d), y, w)
    with pytest.raises(ValueError, match=r"y has shape \(7, 1\) but \(8, \*\) was expected \(design has N=8 rows\)"):
        weighted_least_squares(d, y[:7], w)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        weighted_least_squares(d, y, -w)
    with pytest.raises(TypeError, match="share one dtype"):
        weighted_least_squares(d, y.astype(np.float32), w)
    with pytest.raises(ValueError, match="x contains NaN"):
        design_matrix(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match=r"theta has shape \(2, 4, 1\) but \(2, 3, 1\) was expected"):
        split_coefficients(np.zeros((2, 4, 1)), 2)

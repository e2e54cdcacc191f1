"""Covariance structures (moeref.gaussian_covariance): values against SciPy and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from moeref import gaussian_covariance as gc


def test_residual_log_density_matches_scipy_for_every_structure(rng):
    r = rng.normal(size=(2, 4, 2))  # (K, N, D)
    L = np.array([[[1.0, 0.0], [0.3, 0.8]], [[0.9, 0.0], [-0.2, 1.1]]])
    for structure, cov in (("full", L), ("diagonal", np.array([[1.0, 0.5], [2.0, 0.7]])), ("isotropic", np.array([1.0, 0.4]))):
        sigma = gc.cov_matrices(structure, cov, 2)  # (K, D, D)
        ref = np.stack([stats.multivariate_normal(np.zeros(2), sigma[k]).logpdf(r[k]) for k in range(2)])
        np.testing.assert_allclose(gc.residual_log_density(structure, cov, r), ref, rtol=1e-12)
        free = gc.cov_unconstrained(structure, cov)
        np.testing.assert_allclose(gc.cov_constrained(structure, free), np.tril(cov) if structure == "full" else cov, rtol=1e-12)


def test_bad_input_names_the_argument(rng):
    r = rng.normal(size=(2, 4, 2))
    with pytest.raises(ValueError, match="cov must be positive"):
        gc.residual_log_density("isotropic", np.array([1.0, -1.0]), r)
    with pytest.raises(ValueError, match=r"cov has shape \(3,\) but \(2,\) was expected"):
        gc.residual_log_density("isotropic", np.ones(3), r)
    with pytest.raises(ValueError, match="cotangent contains NaN"):
        gc.residual_log_density_vjp("isotropic", np.ones(2), r, np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="structure must be one of"):
        gc.residual_log_density("spherical", np.ones(2), r)
    with pytest.raises(ValueError, match="weights contains NaN"):
        gc.weighted_cov_mle("diagonal", r, np.full((4, 2), np.nan), tied=False)
    with pytest.raises(ValueError, match=r"weights has shape \(4, 3\) but \(4, 2\) was expected"):
        gc.weighted_cov_mle("diagonal", r, np.ones((4, 3)), tied=False)
    with pytest.raises(TypeError, match="cov_bar has dtype float32 but free has dtype float64"):
        gc.cov_constrained_vjp("diagonal", np.zeros((2, 2)), np.ones((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"sigma has shape \(2, 2, 3\)"):
        gc.cov_from_matrices("full", np.ones((2, 2, 3)))

r"""Structured Gaussian covariances for $K$ components: storage, log-density of residuals, ML fit, VJPs.

Shared by the Gaussian experts ([`moeref.gaussian_experts`][moeref.gaussian_experts]) and the
Gaussian gate ([`moeref.gaussian_gate`][moeref.gaussian_gate]). A covariance $\Sigma_k$ is stored in
a form that is valid by construction, one per component or one shared (``tied``: leading dimension
$K' = 1$):

| ``structure`` | stored ``cov`` | shape | $\Sigma_k$ | free entries |
|---|---|---|---|---|
| ``"full"`` | lower Cholesky factor $L_k$ (positive diagonal) | (K', D, D) | $L_k L_k^\top$ | $D(D+1)/2$ |
| ``"diagonal"`` | variances $v_{kj}$ | (K', D) | $\operatorname{diag}(v_k)$ | $D$ |
| ``"isotropic"`` | one variance $v_k$ | (K',) | $v_k I_D$ | 1 |

The strictly upper triangle of a full ``cov`` is ignored (read through ``tril``), so its cotangent is
0 there. The log-density works on residuals $r_{ik} = y_i - \mu_{ik}$, shape (K, N, D):

$$\log\mathcal N(r_{ik}\mid 0, \Sigma_k) = -\tfrac12\big(D\log 2\pi + \log\det\Sigma_k + r_{ik}^\top\Sigma_k^{-1}r_{ik}\big),$$

for a full covariance by a triangular solve with $L_k$ and $\log\det\Sigma_k = 2\sum_j\log L_{k,jj}$,
never an explicit inverse or determinant. The weighted maximum-likelihood covariance is the
M-step of every Gaussian family (Jordan & Jacobs 1994, "Hierarchical mixtures of experts and the EM
algorithm", Neural Computation 6(2):181-214, doi:10.1162/neco.1994.6.2.181). The unconstrained form
for gradient ascent is the log-Cholesky parametrisation of Pinheiro & Bates (1996), "Unconstrained
parametrizations for variance-covariance matrices", Statistics and Computing 6:289-296,
doi:10.1007/BF00140873 (full), or log-variances.
"""

from __future__ import annotations

import math
from typing import Any

from .core import array_namespace, device_of
from .em import CollapsedVarianceError, first_true
from .validation import (
    check_array,
    check_arrays,
    check_choice,
    check_cotangent,
    check_finite,
    check_float_array,
    check_positive_float,
    check_positive_int,
    check_shape,
    concrete_bool,
)

__all__ = [
    "COVARIANCE_STRUCTURES",
    "check_cov",
    "cov_count",
    "cov_matrices",
    "cov_from_matrices",
    "residual_log_density",
    "residual_log_density_vjp",
    "weighted_cov_mle",
    "cov_unconstrained",
    "cov_constrained",
    "cov_constrained_vjp",
]

COVARIANCE_STRUCTURES: tuple[str, ...] = ("full", "diagonal", "isotropic")
"""The covariance structures, stored as in the module table."""

_LOG_2PI = math.log(2.0 * math.pi)


def _eye(n: int, like: Any, xp: Any) -> Any:
    return xp.eye(n, dtype=like.dtype, device=device_of(like))


def _diag(m: Any, xp: Any) -> Any:
    """Diagonal of a batch of square matrices (..., D, D) -> (..., D)."""
    return xp.sum(m * _eye(m.shape[-1], m, xp), axis=-1)


_STORED_NDIM = {"full": 3, "diagonal": 2, "isotropic": 1}


def _check_stored(cov: Any, structure: str, name: str, K: int | None = None, D: int | None = None) -> tuple[int, int | None]:
    """A stored covariance whose leading size is ``K`` or 1 (tied) and whose ``D`` is read from it when not given
    (``None`` for an isotropic one). Returns ``(K', D)``."""
    check_choice(structure, "structure", COVARIANCE_STRUCTURES)
    check_float_array(cov, name, ndim=_STORED_NDIM[structure])
    n_cov = cov.shape[0] if K is None or cov.shape[0] == 1 else K
    if D is None and structure != "isotropic":
        D = cov.shape[-1]
    check_cov(cov, structure, n_cov, 1 if D is None else D, name)
    return n_cov, D


def _check_residuals(r: Any, name: str = "r") -> tuple[int, int, int]:
    check_float_array(r, name, ndim=3)
    K, N, D = r.shape
    return K, N, D


def check_cov(cov: Any, structure: str, n_cov: int, D: int, name: str) -> None:
    """Check a stored covariance: shape ``(n_cov, ...)`` for ``structure``, finite, positive (diagonal).

    ``n_cov`` is $K$, or 1 for a tied covariance; the error messages name ``name``.
    """
    check_choice(structure, "structure", COVARIANCE_STRUCTURES)
    xp = array_namespace(cov, names=(name,), allow_none=False)
    check_float_array(cov, name)
    n_cov = check_positive_int(n_cov, "n_cov")
    D = check_positive_int(D, "D")
    tied = "tied=True: one shared covariance" if n_cov == 1 else f"K={n_cov} experts"
    if structure == "full":
        check_shape(cov, name, (n_cov, D, D), what=f'covariance="full" stores Cholesky factors; {tied}, D={D}')
        check_finite(cov, name)
        if concrete_bool(xp.all(_diag(cov, xp) > 0)) is False:
            raise ValueError(f'{name} must have a positive diagonal (a lower Cholesky factor, covariance="full")')
    elif structure == "diagonal":
        check_shape(cov, name, (n_cov, D), what=f'covariance="diagonal" stores variances; {tied}, D={D}')
        check_finite(cov, name)
        if concrete_bool(xp.all(cov > 0)) is False:
            raise ValueError(f'{name} must be positive (variances, covariance="diagonal")')
    else:
        check_shape(cov, name, (n_cov,), what=f'covariance="isotropic" stores one variance per expert; {tied}')
        check_finite(cov, name)
        if concrete_bool(xp.all(cov > 0)) is False:
            raise ValueError(f'{name} must be positive (variances, covariance="isotropic")')


def cov_count(structure: str, D: int) -> int:
    r"""Free entries of one stored covariance: $D(D+1)/2$ (full), $D$ (diagonal) or 1 (isotropic)."""
    check_choice(structure, "structure", COVARIANCE_STRUCTURES)
    D = check_positive_int(D, "D")
    return D * (D + 1) // 2 if structure == "full" else (D if structure == "diagonal" else 1)


def residual_log_density(structure: str, cov: Any, r: Any) -> Any:
    r"""$\log\mathcal N(r_{ik} \mid 0, \Sigma_k)$ for residuals ``r`` (K, N, D), shape (K, N).

    ``cov`` has leading dimension $K$ or 1 (tied, broadcast).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gaussian_covariance import residual_log_density
    >>> float(residual_log_density("isotropic", np.ones(1), np.zeros((1, 1, 2)))[0, 0])  # -log(2 pi)
    -1.8378770664093453
    """
    xp = check_arrays({"cov": cov, "r": r})
    K, _, D = _check_residuals(r)
    _check_stored(cov, structure, "cov", K, D)
    return _residual_log_density(structure, cov, r, xp)


def _residual_log_density(structure: str, cov: Any, r: Any, xp: Any) -> Any:
    """[`residual_log_density`][moeref.gaussian_covariance.residual_log_density] without argument checks (E-steps)."""
    K, N, D = r.shape
    if structure == "full":
        L = xp.broadcast_to(xp.tril(cov), (K, D, D))  # (K, D, D)
        z = xp.linalg.solve(L, xp.matrix_transpose(r))  # (K, D, N): L^{-1} r
        maha = xp.sum(z * z, axis=1)  # (K, N)
        logdet = 2.0 * xp.sum(xp.log(_diag(L, xp)), axis=-1)  # (K,)
        return -0.5 * (D * _LOG_2PI + logdet[:, None] + maha)
    if structure == "diagonal":
        v = cov[:, None, :]  # (K', 1, D)
        return -0.5 * xp.sum(_LOG_2PI + xp.log(v) + r * r / v, axis=-1)  # (K, N)
    v = cov[:, None]  # (K', 1)
    return -0.5 * (D * (_LOG_2PI + xp.log(v)) + xp.sum(r * r, axis=-1) / v)  # (K, N)


def residual_log_density_vjp(structure: str, cov: Any, r: Any, cotangent: Any) -> tuple[Any, Any]:
    r"""VJP of [`residual_log_density`][moeref.gaussian_covariance.residual_log_density] for a cotangent $c$ (K, N).

    With $s_{ik} = \Sigma_k^{-1} r_{ik}$ and $z_{ik} = L_k^{-1} r_{ik}$:

    $$g_{ik} = c_{ik}\,s_{ik}, \qquad
    \bar L_k = \operatorname{tril}\Big(\sum_i c_{ik}\, s_{ik} z_{ik}^\top - \Big(\sum_i c_{ik}\Big)\operatorname{diag}(1/L_{k,jj})\Big)$$

    (full), $\bar v_{kj} = \tfrac12\sum_i c_{ik}(r_{ikj}^2/v_{kj}^2 - 1/v_{kj})$ (diagonal),
    $\bar v_k = \tfrac12\sum_i c_{ik}(\lVert r_{ik}\rVert^2/v_k^2 - D/v_k)$ (isotropic).

    Returns
    -------
    g : array, shape (K, N, D)
        The cotangent of the **mean** $\mu_{ik}$ (minus that of $r_{ik}$).
    cov_bar : array
        Shaped like ``cov`` (summed over components when tied).
    """
    xp = check_arrays({"cov": cov, "r": r})
    K, N, D = _check_residuals(r)
    _check_stored(cov, structure, "cov", K, D)
    check_cotangent(cotangent, (K, N), like=r, what="the shape of the log-densities (K, N)")
    return _residual_log_density_vjp(structure, cov, r, cotangent, xp)


def _residual_log_density_vjp(structure: str, cov: Any, r: Any, cotangent: Any, xp: Any) -> tuple[Any, Any]:
    """[`residual_log_density_vjp`][moeref.gaussian_covariance.residual_log_density_vjp] without argument checks."""
    c = cotangent
    K, N, D = r.shape
    tied = cov.shape[0] == 1 and K > 1
    cc = c[:, :, None]  # (K, N, 1)
    if structure == "full":
        L = xp.broadcast_to(xp.tril(cov), (K, D, D))  # (K, D, D)
        z = xp.linalg.solve(L, xp.matrix_transpose(r))  # (K, D, N): L^{-1} r
        s = xp.linalg.solve(xp.matrix_transpose(L), z)  # (K, D, N): Sigma^{-1} r
        g = xp.matrix_transpose(s) * cc  # (K, N, D)
        outer = xp.matrix_transpose(g) @ xp.matrix_transpose(z)  # (K, D, D): sum_i c s z^T
        inv_diag = 1.0 / _diag(L, xp)  # (K, D)
        c_k = xp.sum(c, axis=1)  # (K,)
        L_bar = outer - (c_k[:, None] * inv_diag)[:, :, None] * _eye(D, r, xp)  # (K, D, D)
        if tied:
            L_bar = xp.sum(L_bar, axis=0, keepdims=True)
        return g, xp.tril(L_bar)
    if structure == "diagonal":
        v = cov[:, None, :]  # (K', 1, D)
        g = cc * r / v  # (K, N, D)
        v_bar = 0.5 * xp.sum(cc * (r * r / (v * v) - 1.0 / v), axis=1)  # (K, D)
        return g, (xp.sum(v_bar, axis=0, keepdims=True) if tied else v_bar)
    v = cov[:, None]  # (K', 1)
    g = cc * r / v[:, :, None]  # (K, N, D)
    v_bar = 0.5 * xp.sum(c * (xp.sum(r * r, axis=-1) / (v * v) - D / v), axis=1)  # (K,)
    return g, (xp.sum(v_bar, axis=0, keepdims=True) if tied else v_bar)


def weighted_cov_mle(
    structure: str, r: Any, weights: Any, *, tied: bool, factor: float = 1.0, min_sigma: float = 0.0
) -> Any:
    r"""Weighted maximum-likelihood covariance, stored as ``structure`` stores it.

    $$S_k = \frac{\sum_i w_{ik} r_{ik} r_{ik}^\top}{\sum_i w_{ik}} \ \text{(untied)}, \qquad
    S = \frac{\sum_{i,k} w_{ik} r_{ik} r_{ik}^\top}{\sum_{i,k} w_{ik}} \ \text{(tied)},$$

    restricted to the diagonal (``"diagonal"``) or to $\operatorname{tr}(S)/D$ (``"isotropic"``),
    times ``factor`` (flexmix's $N/(N-p)$, or 1); for ``"full"`` the Cholesky factor of $S$. The
    covariance is accumulated from the residuals (two passes), never as
    $\overline{rr^\top} - \bar r\bar r^\top$.

    Parameters
    ----------
    structure : {"full", "diagonal", "isotropic"}
    r : array, shape (K, N, D)
        Residuals at the fitted means.
    weights : array, shape (N, K)
    tied : bool
    factor : float
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] when an eigenvalue (a variance)
        is below ``min_sigma**2`` or below $D\varepsilon$ times the largest: the residuals lie on a
        lower-dimensional set and the likelihood is unbounded there.

    Returns
    -------
    array
        Shape (K', D, D), (K', D) or (K',), $K' = 1$ when tied.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gaussian_covariance import weighted_cov_mle
    >>> r = np.array([[[1.0], [-1.0], [3.0]]])  # (K=1, N=3, D=1)
    >>> weighted_cov_mle("isotropic", r, np.array([[1.0], [1.0], [0.0]]), tied=False).tolist()
    [1.0]
    """
    check_choice(structure, "structure", COVARIANCE_STRUCTURES)
    check_array(r, "r")
    check_array(weights, "weights")
    xp = check_arrays({"r": r, "weights": weights})
    K, N, D = _check_residuals(r)
    check_float_array(weights, "weights", ndim=2)
    check_shape(weights, "weights", (N, K), what=f"r has K={K} components of N={N} residuals")
    if concrete_bool(xp.all(weights >= 0)) is False:
        raise ValueError("weights must be non-negative (responsibilities)")
    if not isinstance(tied, bool):
        raise TypeError(f"tied must be a bool, got {type(tied).__name__}")
    factor = check_positive_float(factor, "factor")
    if isinstance(min_sigma, bool) or not isinstance(min_sigma, (int, float)) or not (min_sigma >= 0 and math.isfinite(min_sigma)):
        raise ValueError(f"min_sigma must be a finite non-negative float, got {min_sigma!r}")
    return _weighted_cov_mle(structure, r, weights, tied, factor, min_sigma, xp)


def _weighted_cov_mle(structure: str, r: Any, weights: Any, tied: bool, factor: float, min_sigma: float, xp: Any) -> Any:
    """[`weighted_cov_mle`][moeref.gaussian_covariance.weighted_cov_mle] without argument checks (M-steps)."""
    K, N, D = r.shape
    w = xp.matrix_transpose(weights)[:, :, None]  # (K, N, 1)
    n_k = xp.sum(weights, axis=0)  # (K,)
    if structure == "full":
        S = xp.matrix_transpose(w * r) @ r  # (K, D, D)
        S = 0.5 * (S + xp.matrix_transpose(S))
    elif structure == "diagonal":
        S = xp.sum(w * r * r, axis=1)  # (K, D)
    else:
        S = xp.sum(w * r * r, axis=(1, 2)) / D  # (K,)
    if tied:
        S = xp.sum(S, axis=0, keepdims=True) / xp.sum(n_k)
    else:
        S = S / xp.reshape(n_k, (K,) + (1,) * (S.ndim - 1))
    S = S * factor
    floor = float(min_sigma) ** 2
    eps = float(xp.finfo(r.dtype).eps)
    if structure == "full":
        eig = xp.linalg.eigvalsh(S)  # (K', D), ascending
        lo, hi = eig[:, 0], eig[:, D - 1]
    elif structure == "diagonal":
        lo, hi = xp.min(S, axis=1), xp.max(S, axis=1)
    else:
        lo, hi = S, S
    k = first_true((lo < floor) | (lo <= hi * (D * eps)))  # (K',) -> first collapsed
    if k is not None:
        who = "the shared (tied) covariance" if tied else f"expert {k}"
        raise CollapsedVarianceError(
            f"{who}: the fitted covariance has smallest eigenvalue {float(lo[k]):.3e} (largest {float(hi[k]):.3e}), "
            f"below min_sigma**2={floor:g} or singular to working precision; its residuals lie on a "
            "lower-dimensional set and the likelihood is unbounded there"
        )
    return xp.linalg.cholesky(S) if structure == "full" else S


def cov_matrices(structure: str, cov: Any, D: int) -> Any:
    r"""$\Sigma_k$ from the stored ``cov``: array (K', D, D)."""
    D = check_positive_int(D, "D")
    xp = check_arrays({"cov": cov})
    _check_stored(cov, structure, "cov", D=D)
    if structure == "full":
        L = xp.tril(cov)
        return L @ xp.matrix_transpose(L)
    eye = _eye(D, cov, xp)
    if structure == "diagonal":
        return cov[:, :, None] * eye
    return cov[:, None, None] * eye


def cov_from_matrices(structure: str, sigma: Any, *, name: str = "sigma") -> Any:
    r"""The stored ``cov`` for matrices $\Sigma_k$ (K', D, D): Cholesky factor, diagonal, or $\operatorname{tr}(\Sigma_k)/D$.

    The isotropic value is the nearest isotropic matrix in Frobenius norm. ``name``: the argument's
    name in error messages.
    """
    check_choice(structure, "structure", COVARIANCE_STRUCTURES)
    check_array(sigma, name)
    xp = check_arrays({name: sigma})
    check_float_array(sigma, name, ndim=3)
    D = sigma.shape[-1]
    check_shape(sigma, name, (sigma.shape[0], D, D), what="square matrices")
    if structure == "full":
        return xp.linalg.cholesky(0.5 * (sigma + xp.matrix_transpose(sigma)))
    dg = _diag(sigma, xp)  # (K', D)
    return dg if structure == "diagonal" else xp.mean(dg, axis=1)


def cov_unconstrained(structure: str, cov: Any) -> Any:
    r"""Unconstrained form: full, $L_k$ with its diagonal replaced by $\log L_{k,jj}$; else $\log v$."""
    xp = check_arrays({"cov": cov})
    _check_stored(cov, structure, "cov")
    if structure != "full":
        return xp.log(cov)
    eye = _eye(cov.shape[-1], cov, xp)
    return xp.tril(cov) * (1.0 - eye) + xp.log(_diag(cov, xp))[..., None] * eye


def _check_free(structure: str, free: Any) -> Any:
    """An unconstrained covariance: real floating, finite, the rank of ``structure``'s storage (square when full)."""
    check_choice(structure, "structure", COVARIANCE_STRUCTURES)
    xp = check_arrays({"free": free})
    check_float_array(free, "free", ndim=_STORED_NDIM[structure])
    if structure == "full":
        D = free.shape[-1]
        check_shape(free, "free", (free.shape[0], D, D), what='covariance="full": one D x D matrix per component')
    return xp


def cov_constrained(structure: str, free: Any) -> Any:
    """Inverse of [`cov_unconstrained`][moeref.gaussian_covariance.cov_unconstrained]."""
    xp = _check_free(structure, free)
    if structure != "full":
        return xp.exp(free)
    eye = _eye(free.shape[-1], free, xp)
    return xp.tril(free) * (1.0 - eye) + xp.exp(_diag(free, xp))[..., None] * eye


def cov_constrained_vjp(structure: str, free: Any, cov_bar: Any) -> Any:
    r"""Chain rule through [`cov_constrained`][moeref.gaussian_covariance.cov_constrained]:
    $\overline{\log v} = v\,\bar v$; full: $\overline{\log L_{jj}} = L_{jj}\bar L_{jj}$, off-diagonal entries unchanged."""
    xp = _check_free(structure, free)
    check_cotangent(cov_bar, tuple(free.shape), like=free, name="cov_bar", what="the shape of free", like_name="free")
    if structure != "full":
        return cov_bar * xp.exp(free)
    eye = _eye(free.shape[-1], free, xp)
    return xp.tril(cov_bar) * (1.0 - eye) + (_diag(cov_bar, xp) * xp.exp(_diag(free, xp)))[..., None] * eye

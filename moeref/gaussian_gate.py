r"""The Gaussian (localised) gate of Xu, Jordan & Hinton, and density gates in general.

$$g_k(x) = \frac{\alpha_k\, \mathcal N(x \mid m_k, S_k)}{\sum_{j=1}^{K} \alpha_j\, \mathcal N(x \mid m_j, S_j)},
\qquad \alpha_k \ge 0,\ \sum_k \alpha_k = 1 .$$

Xu, Jordan & Hinton (1995), "An Alternative Model for Mixtures of Experts", Advances in Neural
Information Processing Systems 7 (NIPS 1994), MIT Press, pp. 633-640
(<https://proceedings.neurips.cc/paper/1994/hash/c8fbbc86abe8bd6a5eb6a3b4d0411301-Abstract.html>),
replace the softmax gate of a mixture of experts by this normalised kernel. The gate is then the
posterior of a mixture model of the *input*, $p(x) = \sum_k \alpha_k \mathcal N(x \mid m_k, S_k)$, and
the whole model is a joint density

$$p(x, y) = \sum_{k=1}^K \alpha_k\, \mathcal N(x \mid m_k, S_k)\, p_k(y \mid x),
\qquad p(y \mid x) = \frac{p(x, y)}{p(x)} = \sum_k g_k(x)\, p_k(y \mid x) .$$

EM on the **joint** likelihood $\sum_i \log p(x_i, y_i)$ has a closed-form gate M-step (a weighted
Gaussian fit per component), where the softmax gate needs an inner IRLS loop: that is the paper's
point. The conditional likelihood $\sum_i \log p(y_i \mid x_i)$ is what a softmax-gated MoE maximises;
for the Gaussian gate it is $\sum_i \log p(x_i, y_i) - \sum_i \log p(x_i)$, and EM on the joint
likelihood does **not** in general increase it.

Structure
---------
A gate that is a mixture density of $x$ is a [`DensityGate`][moeref.gaussian_gate.DensityGate]
over $K$ component densities $f_k(x; \phi_k)$ described by a
[`GateDensity`][moeref.gaussian_gate.GateDensity]: it supplies ``log_density``, its VJP, the
closed-form ``weighted_mle`` and a parameter count. [`GaussianDensity`][moeref.gaussian_gate.GaussianDensity]
is the first implementation; [`GaussianGate`][moeref.gaussian_gate.GaussianGate] is the density gate
over it. To plug in another density of $x$ whose weighted maximum-likelihood fit is closed form (an
exponential family $f(x;\eta) = h(x)\exp(\eta^\top T(x) - A(\eta))$, whose weighted MLE matches
moments, $\nabla A(\hat\eta_k) = \sum_i w_{ik} T(x_i) / \sum_i w_{ik}$: Poisson counts, categorical
inputs, exponential durations, ...), write a frozen dataclass with those four methods and a
NamedTuple of arrays for its parameters, and use ``DensityGate(density=YourDensity())``.

Both gates are [`GateFamily`][moeref.families.GateFamily] objects with ``models_x = True``: their
``log_weights`` are the **un-normalised** $\ell_k(x) = \log\alpha_k + \log f_k(x)$, so that
$\operatorname{lse}_k \ell_k(x) = \log p(x)$ and $\operatorname{softmax}_k \ell_k(x) = g_k(x)$.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from .core import array_namespace, log_softmax, logsumexp
from .em import CollapsedVarianceError, EmptyComponentError
from .gaussian_covariance import (  # the covariance storage and Gaussian log-density shared with the experts
    COVARIANCE_STRUCTURES,
    _residual_log_density,
    _residual_log_density_vjp,
    check_cov,
    cov_count,
    cov_from_matrices,
    cov_matrices,
)
from .validation import (
    check_cotangent,
    check_array,
    check_arrays,
    check_choice,
    check_float_array,
    check_record_type,
    check_same_dtype,
    check_shape,
    concrete_bool,
)

__all__ = [
    "COVARIANCE_TYPES",
    "GateDensity",
    "GaussianDensityParams",
    "GaussianDensity",
    "DensityGateParams",
    "DensityGate",
    "GaussianGate",
    "gaussian_gate_params",
]

COVARIANCE_TYPES: tuple[str, ...] = COVARIANCE_STRUCTURES
"""Covariance structures of [`GaussianDensity`][moeref.gaussian_gate.GaussianDensity], stored as for
the Gaussian experts ([`moeref.gaussian_experts`][moeref.gaussian_experts]): ``"full"`` (the lower
Cholesky factor $L_k$, $S_k = L_k L_k^\top$, shape (K', d, d)), ``"diagonal"`` (the variances, (K', d))
or ``"isotropic"`` (one variance, (K',)), with $K' = K$, or $K' = 1$ when ``tied``."""


# --------------------------------------------------------------------------------------------
# The plug-in interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class GateDensity(Protocol):
    r"""$K$ component densities $f_k(x; \phi_k)$ of the input, with a closed-form weighted MLE.

    Shapes: ``x`` (N, d), ``weights`` (N, K) non-negative; ``params`` is the density's own
    NamedTuple of arrays.
    """

    name: str

    def log_density(self, params: Any, x: Any) -> Any:
        """$\\log f_k(x_i; \\phi_k)$, shape (N, K), including every normalising constant."""
        ...

    def log_density_vjp(self, params: Any, x: Any, cotangent: Any) -> Any:
        """Cotangent of ``params`` (same record type) for a cotangent (N, K) of `log_density`."""
        ...

    def weighted_mle(self, x: Any, weights: Any) -> Any:
        """$\\arg\\max_\\phi \\sum_{i,k} w_{ik} \\log f_k(x_i; \\phi_k)$, in closed form; raises the
        named errors of `moeref.em` on a degenerate fit."""
        ...

    def n_free_parameters(self, params: Any) -> int:
        """Number of free parameters of the $K$ densities (for AIC / BIC / ICL)."""
        ...


# --------------------------------------------------------------------------------------------
# Gaussian component densities
# --------------------------------------------------------------------------------------------


class GaussianDensityParams(NamedTuple):
    """Means and covariances of $K$ Gaussian densities on $\\mathbb R^d$.

    Attributes
    ----------
    means : array, shape (K, d)
        Row ``k`` is $m_k$.
    cov : array, shape (K', d, d), (K', d) or (K',)
        The covariance parameter in the storage of
        [`COVARIANCE_TYPES`][moeref.gaussian_gate.COVARIANCE_TYPES] (a lower Cholesky factor for
        ``"full"``); $K' = 1$ when tied.
    """

    means: Any
    cov: Any


@dataclass(frozen=True)
class GaussianDensity:
    r"""$K$ multivariate normal densities $\mathcal N(x \mid m_k, S_k)$: a [`GateDensity`][moeref.gaussian_gate.GateDensity].

    $$\log\mathcal N(x \mid m, S) = -\tfrac12\Big(d\log(2\pi) + \log\det S + (x - m)^\top S^{-1} (x - m)\Big).$$

    Attributes
    ----------
    covariance : {"full", "diagonal", "isotropic"}
        Structure of $S_k$, see [`COVARIANCE_TYPES`][moeref.gaussian_gate.COVARIANCE_TYPES].
    tied : bool
        One covariance shared by the $K$ components (``cov`` has leading dimension 1).
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] when a fitted covariance has
        an eigenvalue below ``min_sigma**2`` (or below $d\,\varepsilon$ times its largest).
    name : str

    Notes
    -----
    The covariance storage, the log-density (a triangular solve with the Cholesky factor,
    $\log\det S = 2\sum_j\log L_{jj}$) and its VJP are those of the Gaussian experts in
    [`moeref.gaussian_experts`][moeref.gaussian_experts], applied to the residuals $x_i - m_k$. The
    strictly upper triangle of a full ``cov`` is ignored, so its cotangent there is 0.
    """

    covariance: str = "full"
    tied: bool = False
    min_sigma: float = 1e-8
    name: str = "gaussian"

    def __post_init__(self) -> None:
        check_choice(self.covariance, "covariance", COVARIANCE_TYPES)
        if not isinstance(self.tied, bool):
            raise TypeError(f"tied must be a bool, got {type(self.tied).__name__} {self.tied!r}")
        if isinstance(self.min_sigma, bool) or not isinstance(self.min_sigma, (int, float)) or not self.min_sigma >= 0:
            raise ValueError(f"min_sigma must be a non-negative float, got {self.min_sigma!r}")

    # ---------------------------------------------------------------- checks and conversions

    def _check(self, params: Any, x: Any) -> Any:
        check_record_type(params, "params", GaussianDensityParams)
        xp = check_arrays({"x": x, "params.means": params.means, "params.cov": params.cov})
        check_float_array(x, "x", ndim=2)
        check_float_array(params.means, "params.means", ndim=2)
        d = x.shape[1]
        K = params.means.shape[0]
        check_shape(params.means, "params.means", (K, d), what=f"x has d={d} features")
        check_cov(params.cov, self.covariance, 1 if self.tied else K, d, "params.cov")
        return xp

    def covariance_matrices(self, params: GaussianDensityParams) -> Any:
        r"""$S_k$ from ``params.cov``, shape (K', d, d).

        Examples
        --------
        >>> import numpy as np
        >>> from moeref.gaussian_gate import GaussianDensity, GaussianDensityParams
        >>> p = GaussianDensityParams(np.zeros((1, 2)), np.array([[[2.0, 0.0], [1.0, 1.0]]]))  # L
        >>> GaussianDensity("full").covariance_matrices(p)[0].tolist()  # L L^T
        [[4.0, 2.0], [2.0, 2.0]]
        """
        array_namespace(params.cov, names=("params.cov",))  # a clear error for a non-array
        return cov_matrices(self.covariance, params.cov, params.means.shape[1])

    def cov_from_matrices(self, covariance: Any) -> Any:
        """The stored ``cov`` for covariance matrices $S_k$ (K', d, d): Cholesky factor, diagonal or $\\operatorname{tr}(S_k)/d$."""
        array_namespace(covariance, names=("covariance",))  # a clear error for a non-array
        return cov_from_matrices(self.covariance, covariance, name="covariance")

    # ---------------------------------------------------------------- forward and VJP

    def log_density(self, params: GaussianDensityParams, x: Any) -> Any:
        r"""$\log\mathcal N(x_i \mid m_k, S_k)$ for every sample and component.

        $$\log\mathcal N(x_i \mid m_k, S_k) = -\tfrac12\Big(d\log 2\pi + \log\det S_k
        + r_{ik}^\top S_k^{-1} r_{ik}\Big), \qquad r_{ik} = x_i - m_k .$$

        Parameters
        ----------
        params : GaussianDensityParams
        x : array, shape (N, d)

        Returns
        -------
        array, shape (N, K)

        Examples
        --------
        >>> import numpy as np
        >>> from moeref.gaussian_gate import GaussianDensity, GaussianDensityParams
        >>> p = GaussianDensityParams(np.zeros((1, 2)), np.eye(2)[None])
        >>> float(GaussianDensity().log_density(p, np.zeros((1, 2)))[0, 0])  # -log(2 pi)
        -1.8378770664093453
        """
        xp = self._check(params, x)
        r = x[None, :, :] - params.means[:, None, :]  # (K, N, d)
        return xp.matrix_transpose(_residual_log_density(self.covariance, params.cov, r, xp))  # (N, K)

    def log_density_vjp(self, params: GaussianDensityParams, x: Any, cotangent: Any) -> GaussianDensityParams:
        r"""VJP of [`log_density`][moeref.gaussian_gate.GaussianDensity.log_density] with respect to the parameters.

        With $c_{ik}$ the cotangent, $r_{ik} = x_i - m_k$, $s_{ik} = S_k^{-1} r_{ik}$ and
        $z_{ik} = L_k^{-1} r_{ik}$:

        $$\bar m_k = \sum_i c_{ik}\, s_{ik}, \qquad
        \bar L_k = \operatorname{tril}\Big(\sum_i c_{ik}\, s_{ik} z_{ik}^\top - \Big(\sum_i c_{ik}\Big)\operatorname{diag}(1/L_{k,jj})\Big)$$

        (full), $\bar v_{kj} = \tfrac12\sum_i c_{ik}(r_{ikj}^2/v_{kj}^2 - 1/v_{kj})$ (diagonal),
        $\bar v_k = \tfrac12\sum_i c_{ik}(\lVert r_{ik}\rVert^2/v_k^2 - d/v_k)$ (isotropic); a tied
        covariance sums them over $k$.

        Parameters
        ----------
        params, x
            As in the forward.
        cotangent : array, shape (N, K)

        Returns
        -------
        GaussianDensityParams
            Cotangents shaped like ``params``.
        """
        xp = self._check(params, x)
        K = params.means.shape[0]
        check_cotangent(cotangent, (x.shape[0], K), like=x, what="one entry per sample and component, like log_density")
        check_same_dtype({"x": x, "cotangent": cotangent})
        r = x[None, :, :] - params.means[:, None, :]  # (K, N, d)
        g, cov_bar = _residual_log_density_vjp(self.covariance, params.cov, r, xp.matrix_transpose(cotangent), xp)  # g: (K, N, d)
        return GaussianDensityParams(means=xp.sum(g, axis=1), cov=cov_bar)  # (K, d), like cov

    # ---------------------------------------------------------------- M-step

    def weighted_mle(self, x: Any, weights: Any) -> GaussianDensityParams:
        r"""Weighted Gaussian maximum likelihood: weighted means and (centred) weighted covariances.

        $$n_k = \sum_i w_{ik}, \qquad m_k = \frac1{n_k}\sum_i w_{ik}\, x_i, \qquad
        S_k = \frac1{n_k}\sum_i w_{ik}\,(x_i - m_k)(x_i - m_k)^\top,$$

        restricted to its diagonal (``"diagonal"``) or to $\operatorname{tr}(S_k)/d$ (``"isotropic"``);
        tied: $S = \sum_k n_k S_k / \sum_k n_k$. The unique maximiser of
        $\sum_{i,k} w_{ik}\log\mathcal N(x_i \mid m_k, S_k)$ under each structure (the means do
        not depend on the covariance). Stored as in
        [`COVARIANCE_TYPES`][moeref.gaussian_gate.COVARIANCE_TYPES] (the Cholesky factor of $S_k$ for ``"full"``).

        Parameters
        ----------
        x : array, shape (N, d)
        weights : array, shape (N, K)
            Non-negative weights (responsibilities).

        Returns
        -------
        GaussianDensityParams

        Raises
        ------
        EmptyComponentError
            If some $n_k$ is not positive.
        CollapsedVarianceError
            If a fitted covariance has an eigenvalue (a variance, for the diagonal) below
            ``min_sigma**2`` or below $d\,\varepsilon$ times its largest: the component sits on a
            lower-dimensional set and the likelihood is unbounded there.

        Notes
        -----
        The covariance is accumulated from centred residuals (two passes), not as
        $\overline{xx^\top} - m m^\top$, which cancels catastrophically far from the origin.
        """
        xp = check_arrays({"x": x, "weights": weights})
        check_float_array(x, "x", ndim=2)
        check_float_array(weights, "weights", ndim=2)
        N, d = x.shape
        K = weights.shape[1]
        check_shape(weights, "weights", (N, K), what=f"x has N={N} rows")
        if concrete_bool(xp.all(weights >= 0)) is False:
            raise ValueError("weights must be non-negative (responsibilities)")
        n_k = xp.sum(weights, axis=0)  # (K,)
        if concrete_bool(xp.any(n_k <= 0)):
            k = next(k for k in range(K) if concrete_bool(n_k[k] <= 0))
            raise EmptyComponentError(f"component {k} has total weight {float(n_k[k]):.3e}: there is nothing to fit")
        means = (xp.matrix_transpose(weights) @ x) / n_k[:, None]  # (K, d)
        r = x[None, :, :] - means[:, None, :]  # (K, N, d)
        w = xp.matrix_transpose(weights)[:, :, None]  # (K, N, 1)
        if self.covariance == "full":
            s = xp.matrix_transpose(w * r) @ r  # (K, d, d)
            s = 0.5 * (s + xp.matrix_transpose(s))
        elif self.covariance == "diagonal":
            s = xp.sum(w * r * r, axis=1)  # (K, d)
        else:
            s = xp.sum(w * r * r, axis=(1, 2)) / d  # (K,)
        if self.tied:
            s = xp.sum(s, axis=0, keepdims=True) / xp.sum(n_k)  # (1, ...)
        else:
            s = s / xp.reshape(n_k, (K,) + (1,) * (s.ndim - 1))
        if self.covariance == "full":
            eig = xp.linalg.eigvalsh(s)  # (K', d), ascending
            lo, hi = eig[:, 0], eig[:, d - 1]
        elif self.covariance == "diagonal":
            lo, hi = xp.min(s, axis=1), xp.max(s, axis=1)
        else:
            lo, hi = s, s
        floor = float(self.min_sigma) ** 2
        eps = float(xp.finfo(x.dtype).eps)
        collapsed = (lo < floor) | (lo <= hi * (d * eps))  # (K',)
        if concrete_bool(xp.any(collapsed)):
            k = next(k for k in range(s.shape[0]) if concrete_bool(collapsed[k]))
            who = "the shared (tied) covariance" if self.tied else f"component {k}"
            raise CollapsedVarianceError(
                f"{who}: the fitted covariance has smallest eigenvalue {float(lo[k]):.3e} "
                f"(largest {float(hi[k]):.3e}), below min_sigma**2={floor:g} or singular to working precision; "
                "its points lie on a lower-dimensional set and the likelihood is unbounded there"
            )
        cov = xp.linalg.cholesky(s) if self.covariance == "full" else s
        return GaussianDensityParams(means=means, cov=cov)

    def n_free_parameters(self, params: GaussianDensityParams) -> int:
        r"""$K d$ means plus $K'$ covariances of $d(d+1)/2$ (full), $d$ (diagonal) or 1 (isotropic) entries."""
        K, d = params.means.shape
        return K * d + (1 if self.tied else K) * cov_count(self.covariance, d)


# --------------------------------------------------------------------------------------------
# The density gate
# --------------------------------------------------------------------------------------------


class DensityGateParams(NamedTuple):
    r"""Parameters of a density gate: mixing proportions and the component densities' record.

    Attributes
    ----------
    weights : array, shape (K,)
        $\alpha_k \ge 0$ (summing to 1 for $p(x)$ to be a density).
    density
        The [`GateDensity`][moeref.gaussian_gate.GateDensity]'s parameter record, e.g. a
        [`GaussianDensityParams`][moeref.gaussian_gate.GaussianDensityParams].
    """

    weights: Any
    density: Any


def gaussian_gate_params(weights: Any, means: Any, cov: Any) -> DensityGateParams:
    r"""``DensityGateParams(weights, GaussianDensityParams(means, cov))``: the Gaussian gate's record
    (``cov`` in the storage of [`COVARIANCE_TYPES`][moeref.gaussian_gate.COVARIANCE_TYPES]).

    Checked here: ``weights`` (K,) non-negative, ``means`` (K, d), ``cov`` (K', ...) with $K' \in \{K, 1\}$
    and trailing sizes ``d`` (full (K', d, d), diagonal (K', d), isotropic (K',)); one library and
    dtype, finite values. The structure itself is checked by the gate that reads the record.
    """
    named = {"weights": weights, "means": means, "cov": cov}
    for name, a in named.items():
        check_array(a, name)
    xp = check_arrays(named)
    check_float_array(weights, "weights", ndim=1)
    K = weights.shape[0]
    check_float_array(means, "means", ndim=2)
    check_shape(means, "means", (K, None), what=f"weights has K={K} components")
    d = means.shape[1]
    check_float_array(cov, "cov", ndim=(1, 2, 3))
    lead = cov.shape[0] if cov.shape[0] in (1, K) else K
    check_shape(cov, "cov", (lead,) + (d,) * (cov.ndim - 1), what=f"K={K} components (or 1, tied) of d={d} features")
    if concrete_bool(xp.all(weights >= 0)) is False:
        raise ValueError("weights must be non-negative (mixing proportions alpha_k)")
    return DensityGateParams(weights=weights, density=GaussianDensityParams(means=means, cov=cov))


def _safe_log(a: Any, xp: Any) -> Any:
    """$\\log a$ with $\\log 0 = -\\infty$ and no floating-point warning."""
    positive = a > 0
    return xp.where(positive, xp.log(xp.where(positive, a, xp.ones_like(a))), xp.full_like(a, -math.inf))


class _DensityGateMethods:
    """The gate family built on ``self.density`` (a GateDensity) and ``self.min_weight``."""

    models_x: ClassVar[bool] = True
    density: Any
    min_weight: float

    def _check_weights(self, params: Any, x: Any) -> Any:
        check_record_type(params, "params", DensityGateParams)
        xp = check_arrays({"x": x, "params.weights": params.weights})
        check_float_array(x, "x", ndim=2)
        check_float_array(params.weights, "params.weights", ndim=1)
        if concrete_bool(xp.all(params.weights >= 0)) is False:
            raise ValueError("params.weights must be non-negative (mixing proportions alpha_k)")
        return xp

    def log_weights(self, params: DensityGateParams, x: Any) -> Any:
        r"""Un-normalised gate log-weights $\ell_k(x_i) = \log\alpha_k + \log f_k(x_i)$.

        $$g_k(x) = \operatorname{softmax}_k \ell_k(x) = \frac{\alpha_k f_k(x)}{\sum_j \alpha_j f_j(x)},
        \qquad \operatorname{lse}_k \ell_k(x) = \log p(x) .$$

        Parameters
        ----------
        params : DensityGateParams
        x : array, shape (N, d)

        Returns
        -------
        array, shape (N, K)
            $\alpha_k = 0$ gives $-\infty$ in column $k$.
        """
        xp = self._check_weights(params, x)
        log_f = self.density.log_density(params.density, x)  # (N, K)
        check_shape(params.weights, "params.weights", (log_f.shape[1],), what=f"the density has K={log_f.shape[1]} components")
        return _safe_log(params.weights, xp) + log_f  # (N, K)

    def log_weights_vjp(self, params: DensityGateParams, x: Any, cotangent: Any) -> DensityGateParams:
        r"""VJP of [`log_weights`][moeref.gaussian_gate.DensityGate.log_weights] with respect to the parameters.

        $$\bar\alpha_k = \frac{1}{\alpha_k}\sum_i c_{ik}, \qquad \bar\phi = \text{the density's VJP of } c .$$

        The weights are treated as free (not constrained to the simplex); for softmax logits $u$ of
        $\alpha$ use ``core.softmax_vjp(alpha, alpha_bar)``. At $\alpha_k = 0$ the derivative is
        infinite (the forward is $-\infty$ there).

        Parameters
        ----------
        params, x
            As in the forward.
        cotangent : array, shape (N, K)

        Returns
        -------
        DensityGateParams
        """
        xp = self._check_weights(params, x)
        density_bar = self.density.log_density_vjp(params.density, x, cotangent)
        check_shape(params.weights, "params.weights", (cotangent.shape[1],), what="one weight per component")
        return DensityGateParams(weights=xp.sum(cotangent, axis=0) / params.weights, density=density_bar)

    def log_gate_probabilities(self, params: DensityGateParams, x: Any) -> Any:
        r"""Normalised $\log g_k(x_i) = \ell_k(x_i) - \operatorname{lse}_j \ell_j(x_i)$, shape (N, K)."""
        return log_softmax(self.log_weights(params, x), axis=-1)

    def log_marginal(self, params: DensityGateParams, x: Any) -> Any:
        r"""$\log p(x_i) = \log\sum_k \alpha_k f_k(x_i)$, shape (N,): the input-density term of the joint likelihood."""
        return logsumexp(self.log_weights(params, x), axis=-1)

    def m_step(self, params: Any, x: Any, responsibilities: Any) -> DensityGateParams:
        r"""Closed-form gate M-step of the joint likelihood.

        $$\alpha_k = \frac{\sum_i \tau_{ik}}{\sum_{i,j}\tau_{ij}}, \qquad
        \phi_k = \arg\max_{\phi} \sum_i \tau_{ik} \log f_k(x_i; \phi)$$

        (for the Gaussian: the weighted means and covariances), the maximiser of
        $\sum_{i,k}\tau_{ik}\,\ell_k(x_i)$. With rows of $\tau$ summing to 1, $\alpha_k = \frac1N\sum_i\tau_{ik}$.

        Parameters
        ----------
        params : DensityGateParams or None
            Not used (the update is closed form); ``None`` is accepted, so that
            ``gate.m_step(None, x, one_hot_labels)`` builds starting values from a hard partition.
        x : array, shape (N, d)
        responsibilities : array, shape (N, K)

        Returns
        -------
        DensityGateParams

        Raises
        ------
        EmptyComponentError
            If some $\alpha_k$ < ``min_weight``.
        CollapsedVarianceError
            From the density's weighted MLE.
        """
        xp = check_arrays({"x": x, "responsibilities": responsibilities})
        check_float_array(responsibilities, "responsibilities", ndim=2)
        if concrete_bool(xp.all(responsibilities >= 0)) is False:
            raise ValueError("responsibilities must be non-negative")
        K = responsibilities.shape[1]
        n_k = xp.sum(responsibilities, axis=0)  # (K,)
        alpha = n_k / xp.sum(n_k)  # (K,)
        if concrete_bool(xp.any(alpha < self.min_weight)):
            k = next(k for k in range(K) if concrete_bool(alpha[k] < self.min_weight))
            raise EmptyComponentError(
                f"gate component {k} has mixing weight {float(alpha[k]):.3e} < min_weight={self.min_weight:g} (it is empty)"
            )
        return DensityGateParams(weights=alpha, density=self.density.weighted_mle(x, responsibilities))

    def n_free_parameters(self, params: DensityGateParams) -> int:
        """$K - 1$ free mixing weights plus the density's parameters."""
        return params.weights.shape[0] - 1 + self.density.n_free_parameters(params.density)


def _check_min_weight(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"min_weight must be a non-negative float, got {value!r}")


@dataclass(frozen=True)
class DensityGate(_DensityGateMethods):
    r"""A gate that is the posterior of a mixture density of $x$: $g_k(x) \propto \alpha_k f_k(x)$.

    A [`GateFamily`][moeref.families.GateFamily] with ``models_x = True`` over any
    [`GateDensity`][moeref.gaussian_gate.GateDensity].

    Attributes
    ----------
    density : GateDensity
        The $K$ component densities $f_k$ (e.g. ``GaussianDensity("diagonal")``).
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] when an M-step gives some
        $\alpha_k$ < ``min_weight``.
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gaussian_gate import DensityGate, GaussianDensity, gaussian_gate_params
    >>> gate = DensityGate(GaussianDensity("diagonal"))
    >>> p = gaussian_gate_params(np.array([0.5, 0.5]), np.array([[-1.0], [1.0]]), np.ones((2, 1)))
    >>> np.exp(gate.log_gate_probabilities(p, np.zeros((1, 1)))).tolist()  # halfway: equal gates
    [[0.5, 0.5]]
    """

    density: Any
    min_weight: float = 1e-8
    name: str = "density"

    def __post_init__(self) -> None:
        if not isinstance(self.density, GateDensity):
            raise TypeError(
                "density must implement the GateDensity interface (name, log_density, log_density_vjp, "
                f"weighted_mle, n_free_parameters), got {type(self.density).__name__}"
            )
        _check_min_weight(self.min_weight)


@dataclass(frozen=True)
class GaussianGate(_DensityGateMethods):
    r"""The Gaussian (localised) gate of Xu, Jordan & Hinton (1995).

    $$g_k(x) = \frac{\alpha_k\, \mathcal N(x \mid m_k, S_k)}{\sum_j \alpha_j\, \mathcal N(x \mid m_j, S_j)},
    \qquad \ell_k(x) = \log\alpha_k + \log\mathcal N(x \mid m_k, S_k),$$

    Xu, Jordan & Hinton (1995), "An Alternative Model for Mixtures of Experts", NIPS 7, pp. 633-640
    (the modified gating network and its EM algorithm). A [`GateFamily`][moeref.families.GateFamily]
    with ``models_x = True``: EM with this gate maximises the joint likelihood
    $\sum_i\log\sum_k \exp(\ell_k(x_i))\,p_k(y_i\mid x_i)$, and its M-step is closed form:

    $$\alpha_k = \frac1N\sum_i \tau_{ik}, \qquad m_k = \frac{\sum_i \tau_{ik}x_i}{\sum_i\tau_{ik}}, \qquad
    S_k = \frac{\sum_i \tau_{ik}(x_i - m_k)(x_i - m_k)^\top}{\sum_i\tau_{ik}} .$$

    Parameters are a [`DensityGateParams`][moeref.gaussian_gate.DensityGateParams] holding
    $\alpha$ (K,) and a [`GaussianDensityParams`][moeref.gaussian_gate.GaussianDensityParams]
    (build one with [`gaussian_gate_params`][moeref.gaussian_gate.gaussian_gate_params]).

    Attributes
    ----------
    covariance : {"full", "diagonal", "isotropic"}
        Structure of $S_k$; stored as in [`COVARIANCE_TYPES`][moeref.gaussian_gate.COVARIANCE_TYPES]
        (``"full"``: the lower Cholesky factor).
    tied : bool
        One covariance $S$ for every component. The gate is then a linear softmax,
        $\ell_k(x) = x^\top S^{-1} m_k - \tfrac12 m_k^\top S^{-1} m_k + \log\alpha_k + \text{const}(x)$
        (the posterior of linear discriminant analysis), fitted in closed form.
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] below this $\alpha_k$.
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] when a fitted $S_k$ has an
        eigenvalue below ``min_sigma**2``.
    name : str

    Notes
    -----
    * ``log_weights`` are **not** normalised over $k$: their log-sum-exp is $\log p(x)$. Use
      ``log_gate_probabilities`` for $\log g_k(x)$ and ``log_marginal`` for $\log p(x)$.
    * The conditional log-likelihood is $\sum_i[\log p(x_i, y_i) - \log p(x_i)]$; EM on the joint
      likelihood need not increase it.
    * As for any Gaussian mixture with free covariances, the joint likelihood is unbounded (a
      component collapsing onto one point); the M-step raises instead of returning such a fit.
    * The number of free parameters is $(K - 1) + Kd + K'c$ with $K' = K$ ($1$ if tied) and
      $c = d(d+1)/2$, $d$ or $1$ for a full, diagonal or isotropic covariance.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gaussian_gate import GaussianGate
    >>> x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    >>> labels = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> gate = GaussianGate()
    >>> p = gate.m_step(None, x, labels)  # starting values from a hard partition
    >>> p.weights.tolist(), p.density.means.ravel().tolist(), p.density.cov.ravel().tolist()  # cov: L = 0.5
    ([0.5, 0.5], [-1.5, 1.5], [0.5, 0.5])
    >>> np.round(np.exp(gate.log_gate_probabilities(p, np.array([[-1.5], [0.0]]))), 6).tolist()
    [[1.0, 0.0], [0.5, 0.5]]
    """

    covariance: str = "full"
    tied: bool = False
    min_weight: float = 1e-8
    min_sigma: float = 1e-8
    name: str = "gaussian"

    def __post_init__(self) -> None:
        GaussianDensity(covariance=self.covariance, tied=self.tied, min_sigma=self.min_sigma)  # validates them
        _check_min_weight(self.min_weight)

    @property
    def density(self) -> GaussianDensity:  # type: ignore[override]
        """The component densities, ``GaussianDensity(covariance, tied, min_sigma)``."""
        return GaussianDensity(covariance=self.covariance, tied=self.tied, min_sigma=self.min_sigma)

    def covariance_matrices(self, params: DensityGateParams) -> Any:
        """$S_k$ from ``params.density.cov``, shape (K', d, d)."""
        return self.density.covariance_matrices(params.density)

r"""The interfaces that classical (probabilistic) mixture-of-experts models are assembled from.

A classical MoE models the conditional density of $y$ given $x$ as

$$p(y \mid x; \theta) = \sum_{k=1}^{K} g_k(x; \alpha)\, p_k(y \mid x; \theta_k),
\qquad g_k(x;\alpha) = \frac{\exp \ell_k(x;\alpha)}{\sum_j \exp \ell_j(x;\alpha)},$$

(Jacobs, Jordan, Nowlan & Hinton 1991; Jordan & Jacobs 1994, eq. (2.3)), where the **gate family**
gives the log-weights $\ell_k(x)$ and the **expert family** the densities $p_k$. EM alternates an
E-step (responsibilities $\tau_{ik} \propto \exp(\ell_k(x_i))\, p_k(y_i\mid x_i)$, in log space)
with separate M-steps for the gate and for each expert, which only need the responsibilities as
weights. A family is a small frozen dataclass holding its options (covariance structure, ECM vs
ECME, ridge, ...); its parameters are a NamedTuple of arrays.

A gate that is itself a density of $x$ (the Gaussian gate of Xu, Jordan & Hinton 1994) sets
``models_x = True``: its log-weights are $\ell_k(x) = \log \alpha_k + \log \mathcal N(x\mid m_k, S_k)$,
un-normalised, and EM then maximises the joint likelihood
$\sum_i \log \sum_k \exp(\ell_k(x_i))\, p_k(y_i \mid x_i)$, while the conditional likelihood subtracts
$\log\sum_k \exp\ell_k(x_i)$.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["ExpertFamily", "GateFamily", "ExpertInputGrads"]


class ExpertInputGrads(NamedTuple):
    """Cotangents of an expert family's inputs, from its optional ``log_density_input_vjp``.

    Attributes
    ----------
    x : array or None
        Cotangent of ``x``; ``None`` when the density does not depend on it (constant experts).
    y : array or None
        Cotangent of ``y`` (same shape as ``y``); ``None`` where ``y`` is not differentiable.
    """

    x: Any
    y: Any


@runtime_checkable
class ExpertFamily(Protocol):
    """$K$ expert densities $p_k(y \\mid x; \\theta_k)$ with a weighted maximum-likelihood M-step.

    Shapes: ``x`` (N, d) (a column of ones is *not* added implicitly unless the family says so),
    ``y`` (N, d_out) or (N,) as the family documents, ``weights`` (N, K) non-negative.
    """

    name: str

    def log_density(self, params: Any, x: Any, y: Any) -> Any:
        """$\\log p_k(y_i \\mid x_i)$, shape (N, K)."""
        ...

    def log_density_vjp(self, params: Any, x: Any, y: Any, cotangent: Any) -> Any:
        """Cotangent of ``params`` (same record type) for a cotangent (N, K) of `log_density`."""
        ...

    def mean(self, params: Any, x: Any) -> Any:
        """$E[y \\mid x, k]$ per expert, shape (N, K, d_out) (class probabilities for classifiers)."""
        ...

    def m_step(self, params: Any, x: Any, y: Any, weights: Any) -> Any:
        """Maximise $\\sum_i \\sum_k w_{ik} \\log p_k(y_i \\mid x_i)$ (or increase it, for iterative
        families); ``params`` is the current value (a starting point for IRLS/ECM)."""
        ...

    def n_free_parameters(self, params: Any) -> int:
        """Number of free parameters, for AIC / BIC / ICL."""
        ...


@runtime_checkable
class GateFamily(Protocol):
    """Gate log-weights $\\ell_k(x)$; the gate probabilities are their softmax over $k$."""

    name: str
    models_x: bool

    def log_weights(self, params: Any, x: Any) -> Any:
        """$\\ell_k(x_i)$, shape (N, K) (normalised log-probabilities unless ``models_x``)."""
        ...

    def log_weights_vjp(self, params: Any, x: Any, cotangent: Any) -> Any:
        """Cotangent of ``params`` for a cotangent (N, K) of `log_weights`."""
        ...

    def m_step(self, params: Any, x: Any, responsibilities: Any) -> Any:
        """Maximise (or, for a generalised EM step, increase) $\\sum_{ik} \\tau_{ik}\\, \\log g_k(x_i)$
        (or the joint $\\sum_{ik}\\tau_{ik}\\,\\ell_k(x_i)$ when ``models_x``)."""
        ...

    def n_free_parameters(self, params: Any) -> int:
        """Number of free parameters (e.g. $(K-1)(d+1)$ for a softmax gate with a baseline)."""
        ...

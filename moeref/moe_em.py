r"""Classical mixture of experts assembled from a gate family and an expert family, fitted by EM.

$$p(y \mid x; \theta) = \sum_{k=1}^{K} g_k(x;\alpha)\, p_k(y \mid x; \theta_k), \qquad
g_k(x;\alpha) = \operatorname{softmax}_k\,\ell(x;\alpha),$$

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", Neural Computation
3(1):79-87, doi:10.1162/neco.1991.3.1.79; Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts
and the EM Algorithm", Neural Computation 6(2):181-214, doi:10.1162/neco.1994.6.2.181 (the
one-level case). The gate is a [`GateFamily`][moeref.families.GateFamily] (log-weights
$\ell_k(x)$), the experts an [`ExpertFamily`][moeref.families.ExpertFamily] (log-densities
$\log p_k(y \mid x)$); this module only combines them:

* **E-step** (in log space): $a_{ik} = \ell_k(x_i) + \log p_k(y_i \mid x_i)$,
  $\log\tau_{ik} = a_{ik} - \operatorname{lse}_j a_{ij}$;
* **M-step**: ``gate.m_step(params.gate, x, tau)`` and ``experts.m_step(params.experts, x, y, tau)``,
  two independent maximisations of the expected complete-data log-likelihood
  $Q = \sum_{ik}\tau_{ik}\ell_k(x_i) + \sum_{ik}\tau_{ik}\log p_k(y_i\mid x_i)$;
* the loop, stopping rules, monotonicity check and information criteria of
  [`run_em`][moeref.em.run_em].

**Conditional and joint likelihood.** For an ordinary gate (``models_x = False``) the log-weights
are normalised and EM maximises the conditional log-likelihood
$L_c = \sum_i \log\sum_k g_k(x_i)p_k(y_i\mid x_i)$. A gate that is a density of $x$
(``models_x = True``, e.g. the Gaussian gate of Xu, Jordan & Hinton 1995) has un-normalised
$\ell_k(x) = \log\alpha_k + \log f_k(x)$; EM then maximises the **joint** log-likelihood
$L_j = \sum_i \operatorname{lse}_k a_{ik} = \sum_i \log p(x_i, y_i)$, and
$L_c = L_j - \sum_i \operatorname{lse}_k \ell_k(x_i)$. [`fit_moe`][moeref.moe_em.fit_moe] reports both.

**Penalties.** A family with a ``penalty(params)`` method (e.g. a
[`SoftmaxGate`][moeref.softmax_gate.SoftmaxGate] with a ridge) makes its M-step maximise
$Q - \text{penalty}$; EM then increases the penalised log-likelihood $L - \text{penalty}$, which is
what the trace records; the penalty is reported beside it and the information criteria use the
unpenalised $L$.

**Gradient ascent** ([`fit_moe_gradient`][moeref.moe_em.fit_moe_gradient]) climbs the same objective
with the families' VJPs. Constrained parameters (variances, mixing weights, a baseline column) stay
valid through an optional **unconstrained view** a family may implement:

* ``unconstrained(params) -> free``: a record of unconstrained arrays;
* ``constrained(free) -> params``: its inverse;
* ``constrained_vjp(free, params_bar) -> free_bar``: the chain rule through ``constrained``.

A family without these methods is stepped in its own parametrisation (fine for unconstrained
parameters); a step that leaves the valid region then raises a ``ValueError`` naming the iteration.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple, Sequence

from .core import _tree_add_scaled, array_namespace, log_softmax, logsumexp, softmax
from .em import (
    ConvergenceWarning,
    EMOptions,
    EStep,
    NonFiniteLogLikelihoodError,
    PenalisedRun,
    RestartRecord,
    _check_options,
    entropy,
    find_loglik_decreases,
    information_criteria,
    run_em,
    run_restarts,
    stopping_rule_met,
)
from .em_init import RandomStart, random_starts
from .families import ExpertFamily, GateFamily
from .validation import (
    check_array,
    check_arrays,
    check_cotangent,
    check_finite,
    check_float_array,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "MoEParams",
    "MoEFitResult",
    "RestartRecord",
    "GradientFitResult",
    "moe_log_joint",
    "moe_log_likelihood",
    "moe_log_likelihood_vjp",
    "moe_posteriors",
    "moe_e_step",
    "moe_m_step",
    "moe_n_free_parameters",
    "moe_penalty",
    "moe_random_starts",
    "fit_moe",
    "fit_moe_gradient",
]


class MoEParams(NamedTuple):
    """Parameters of a classical MoE: the gate's record and the experts' record.

    Attributes
    ----------
    gate
        The gate family's parameter record (e.g. [`SoftmaxGateParams`][moeref.softmax_gate.SoftmaxGateParams]).
    experts
        The expert family's parameter record.
    """

    gate: Any
    experts: Any


class MoEFitResult(NamedTuple):
    """The outcome of [`fit_moe`][moeref.moe_em.fit_moe]: the fields of
    [`EMResult`][moeref.em.EMResult] (same names, same order) for the best run, then the MoE extras.

    Attributes
    ----------
    params : MoEParams
    loglik : float
        The unpenalised log-likelihood EM maximised at $\\hat\\theta$: joint $L_j$ if the gate models
        $x$, conditional $L_c$ otherwise. AIC, BIC and ICL use it.
    loglik_trace : tuple of float
        The EM objective $L^{(t)} - \\text{penalty}^{(t)}$, $t = 0..T$ (non-decreasing; equal to the
        log-likelihood when no family has a penalty).
    responsibilities, n_iter, converged, stop_reason, criterion, tol, n_samples, n_free_parameters, entropy, aic, bic, icl, decreases
        As in [`EMResult`][moeref.em.EMResult] (``aic``/``bic``/``icl`` from the unpenalised ``loglik``).
    restarts : tuple of RestartRecord
        Every run: ``init`` first, then the explicit ``restarts``, then the random starts in the
        order drawn (with their starting values and draws).
    best_restart : int
        Index of the run returned (the highest final penalised log-likelihood; the first on ties).
    conditional_loglik : float
        $L_c = \\sum_i \\log p(y_i \\mid x_i; \\hat\\theta)$.
    joint_loglik : float or None
        $L_j = \\sum_i \\log p(x_i, y_i; \\hat\\theta)$ when the gate models $x$, else ``None``.
    penalty : float
        The families' penalties at $\\hat\\theta$ (0 without a ridge).
    penalised_loglik : float
        ``loglik - penalty`` ($=$ ``loglik_trace[-1]``).
    penalty_trace : tuple of float
        The penalty at each entry of ``loglik_trace``.
    """

    params: Any
    loglik: float
    loglik_trace: tuple[float, ...]
    responsibilities: Any
    n_iter: int
    converged: bool
    stop_reason: str
    criterion: str
    tol: float
    n_samples: int
    n_free_parameters: int
    entropy: float
    aic: float
    bic: float
    icl: float
    decreases: tuple[int, ...]
    restarts: tuple[RestartRecord, ...]
    best_restart: int
    conditional_loglik: float
    joint_loglik: float | None
    penalty: float
    penalised_loglik: float
    penalty_trace: tuple[float, ...]


class GradientFitResult(NamedTuple):
    """The outcome of [`fit_moe_gradient`][moeref.moe_em.fit_moe_gradient].

    Attributes
    ----------
    params : MoEParams
    loglik : float
        Final unpenalised log-likelihood (joint if the gate models $x$).
    loglik_trace : tuple of float
        The penalised objective $L^{(t)} - \\text{penalty}^{(t)}$, $t = 0..T$ (not necessarily monotone).
    n_iter : int
        Gradient steps taken.
    converged : bool
        The stopping rule or the target was met.
    stop_reason : str
    learning_rate : float
    decreases : tuple of int
        Steps $t$ at which the objective went down (a sign of too large a learning rate).
    seconds : float
        Wall time of the loop (``time.perf_counter``), for benchmarks.
    """

    params: Any
    loglik: float
    loglik_trace: tuple[float, ...]
    n_iter: int
    converged: bool
    stop_reason: str
    learning_rate: float
    decreases: tuple[int, ...]
    seconds: float


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_families(gate: Any, experts: Any) -> None:
    if not isinstance(gate, GateFamily):
        raise TypeError(
            "gate must implement moeref.families.GateFamily (name, models_x, log_weights, log_weights_vjp, "
            f"m_step, n_free_parameters), got {type(gate).__name__}"
        )
    if not isinstance(experts, ExpertFamily):
        raise TypeError(
            "experts must implement moeref.families.ExpertFamily (name, log_density, log_density_vjp, mean, "
            f"m_step, n_free_parameters), got {type(experts).__name__}"
        )


def _check_params(params: Any, gate: Any, experts: Any, name: str = "params") -> MoEParams:
    """``params`` is an MoEParams whose two fields are parameter records (the families check their contents)."""
    check_record_type(params, name, MoEParams)
    for field, family in (("gate", gate), ("experts", experts)):
        record = getattr(params, field)
        if not (isinstance(record, tuple) and hasattr(record, "_fields")):
            raise TypeError(
                f"{name}.{field} must be the {family.name!r} family's parameter record (a NamedTuple), "
                f"got {type(record).__name__}"
            )
    return params


def _check_y(y: Any) -> None:
    """``y`` is an array without NaN or infinity (its dtype and shape are the expert family's to check)."""
    check_array(y, "y")
    check_finite(y, "y")


def _parts(x: Any, y: Any, gate: Any, experts: Any, params: Any, name: str = "params") -> tuple[Any, Any, Any]:
    """``(xp, log-weights (N, K), log-densities (N, K))`` with the shapes checked against each other."""
    _check_families(gate, experts)
    _check_params(params, gate, experts, name)
    check_array(x, "x")
    _check_y(y)
    return _parts_unchecked(x, y, gate, experts, params)


def _parts_unchecked(x: Any, y: Any, gate: Any, experts: Any, params: Any) -> tuple[Any, Any, Any]:
    """`_parts` without the family and record checks (inside the fitting loops, after one check)."""
    ell = gate.log_weights(params.gate, x)  # (N, K)
    logp = experts.log_density(params.experts, x, y)  # (N, K)
    xp = array_namespace(ell, logp, names=("gate.log_weights(...)", "experts.log_density(...)"))
    if ell.ndim != 2 or logp.ndim != 2 or tuple(ell.shape) != tuple(logp.shape):
        raise ValueError(
            f"the gate gives log-weights of shape {tuple(ell.shape)} but the experts give log-densities of shape "
            f"{tuple(logp.shape)}; both must be (N, K) with one gate output per expert"
        )
    return xp, ell, logp


def _joint_flag(gate: Any, joint: Any) -> bool:
    if not isinstance(joint, bool):
        raise TypeError(f"joint must be a bool, got {type(joint).__name__}")
    if joint and not gate.models_x:
        raise ValueError(
            f"joint=True needs a gate that models x (models_x=True); the {gate.name!r} gate gives p(y | x) only"
        )
    return joint


# --------------------------------------------------------------------------------------------
# Forward functions
# --------------------------------------------------------------------------------------------


def moe_log_joint(x: Any, y: Any, gate: Any, experts: Any, params: MoEParams) -> Any:
    r"""$a_{ik} = \ell_k(x_i) + \log p_k(y_i \mid x_i)$, shape (N, K).

    For an ordinary gate $a_{ik} = \log\big(g_k(x_i)\,p_k(y_i\mid x_i)\big)$, the log of the joint
    probability of $y_i$ and the label $z_i = k$ given $x_i$; for a gate that models $x$ it also
    includes $\log p(x_i)$.
    """
    _, ell, logp = _parts(x, y, gate, experts, params)
    return ell + logp


def moe_log_likelihood(x: Any, y: Any, gate: Any, experts: Any, params: MoEParams, *, joint: bool = False) -> Any:
    r"""Per-sample log-likelihood of a classical MoE.

    $$\log p(y_i \mid x_i) = \operatorname{lse}_k\big(\ell_k(x_i) + \log p_k(y_i\mid x_i)\big)
    - \operatorname{lse}_k \ell_k(x_i),$$

    the mixture-of-experts likelihood of Jacobs et al. (1991), doi:10.1162/neco.1991.3.1.79, and of
    Jordan & Jacobs (1994), doi:10.1162/neco.1994.6.2.181, for one level. The second term is 0 for an ordinary gate. With
    ``joint=True`` (only for a gate with ``models_x``) the joint $\log p(x_i, y_i) = \operatorname{lse}_k a_{ik}$.

    Parameters
    ----------
    x : array, shape (N, d)
    y : array
        As the expert family takes it.
    gate : GateFamily
    experts : ExpertFamily
    params : MoEParams
    joint : bool

    Returns
    -------
    array, shape (N,)

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.constant_gate import ConstantGate, ConstantGateParams
    >>> from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
    >>> from moeref.moe_em import MoEParams, moe_log_likelihood
    >>> experts = LinearGaussianExperts(covariance="isotropic")
    >>> p = MoEParams(ConstantGateParams(np.array([0.5, 0.5])),
    ...               LinearGaussianExpertsParams(np.zeros((2, 1, 1)), np.array([[-1.0], [1.0]]), np.ones(2)))
    >>> float(moe_log_likelihood(np.zeros((1, 1)), np.zeros((1, 1)), ConstantGate(), experts, p)[0])  # log N(1 | 0, 1)
    -1.4189385332046727
    """
    joint = _joint_flag(gate, joint)
    _, ell, logp = _parts(x, y, gate, experts, params)
    out = logsumexp(ell + logp, axis=1)  # (N,)
    if gate.models_x and not joint:
        out = out - logsumexp(ell, axis=1)
    return out


def moe_posteriors(x: Any, y: Any, gate: Any, experts: Any, params: MoEParams) -> Any:
    r"""Responsibilities $\tau_{ik} = P(z_i = k \mid x_i, y_i) = \operatorname{softmax}_k(a_{ik})$, shape (N, K).

    The E-step of Jordan & Jacobs (1994), doi:10.1162/neco.1994.6.2.181 (their posterior
    probabilities $h_i$, for one level), computed in log space; the same for ordinary and
    $x$-modelling gates.
    """
    return softmax(moe_log_joint(x, y, gate, experts, params), axis=1)


def moe_e_step(x: Any, y: Any, gate: Any, experts: Any, params: MoEParams) -> EStep:
    r"""E-step: ``EStep(loglik, log_responsibilities)``.

    ``loglik`` is the log-likelihood EM maximises, $\sum_i \operatorname{lse}_k a_{ik}$ (the joint
    $L_j$ for a gate that models $x$, the conditional $L_c$ otherwise), without any penalty;
    $\log\tau_{ik} = a_{ik} - \operatorname{lse}_j a_{ij}$.
    """
    xp, ell, logp = _parts(x, y, gate, experts, params)
    a = ell + logp  # (N, K)
    return EStep(loglik=xp.sum(logsumexp(a, axis=1)), log_responsibilities=log_softmax(a, axis=1))


def moe_m_step(x: Any, y: Any, gate: Any, experts: Any, params: MoEParams, responsibilities: Any) -> MoEParams:
    r"""M-step: the gate's and the experts' weighted maximisations, given $\tau$ (N, K).

    $$\alpha^{new} = \arg\max_\alpha \sum_{ik}\tau_{ik}\ell_k(x_i;\alpha), \qquad
    \theta_k^{new} = \arg\max_{\theta_k}\sum_i \tau_{ik}\log p_k(y_i\mid x_i;\theta_k)$$

    (Jordan & Jacobs 1994), each by its family (exactly, or increased for a generalised EM
    family). ``params`` is the starting point of iterative M-steps.
    """
    _check_families(gate, experts)
    _check_params(params, gate, experts)
    check_array(x, "x")
    _check_y(y)
    K = gate.log_weights(params.gate, x).shape[1]  # also checks params.gate against x
    _check_responsibilities(responsibilities, x, K)
    return MoEParams(
        gate=gate.m_step(params.gate, x, responsibilities),
        experts=experts.m_step(params.experts, x, y, responsibilities),
    )


def _check_responsibilities(tau: Any, x: Any, K: int) -> None:
    check_array(tau, "responsibilities")
    xp = check_arrays({"x": x, "responsibilities": tau})
    check_float_array(tau, "responsibilities", ndim=2)
    check_shape(tau, "responsibilities", (x.shape[0], K), what=f"x has N={x.shape[0]} rows and the gate has K={K} outputs")
    if concrete_bool(xp.all(tau >= 0)) is False:
        raise ValueError("responsibilities must be non-negative (posterior probabilities)")


def moe_n_free_parameters(gate: Any, experts: Any, params: MoEParams) -> int:
    """``gate.n_free_parameters(params.gate) + experts.n_free_parameters(params.experts)``."""
    _check_families(gate, experts)
    _check_params(params, gate, experts)
    return int(gate.n_free_parameters(params.gate)) + int(experts.n_free_parameters(params.experts))


def moe_penalty(gate: Any, experts: Any, params: MoEParams) -> float:
    """Sum of the families' ``penalty(params)`` (a family without the method contributes 0), as a float."""
    _check_families(gate, experts)
    _check_params(params, gate, experts)
    return _penalty(gate, experts, params)


def _penalty(gate: Any, experts: Any, params: MoEParams) -> float:
    total = 0.0
    for fam, p in ((gate, params.gate), (experts, params.experts)):
        pen = getattr(fam, "penalty", None)
        if pen is not None:
            total += float(pen(p))
    return total


def moe_log_likelihood_vjp(
    x: Any, y: Any, gate: Any, experts: Any, params: MoEParams, cotangent: Any, *, joint: bool = False
) -> MoEParams:
    r"""VJP of [`moe_log_likelihood`][moeref.moe_em.moe_log_likelihood] with respect to ``params``.

    With $c_i$ the cotangent of the per-sample log-likelihood, $\tau = \operatorname{softmax}(a)$ and
    $g = \operatorname{softmax}(\ell)$:

    $$\bar\ell_{ik} = c_i(\tau_{ik} - g_{ik}) \ \text{(conditional)}, \qquad
    \bar\ell_{ik} = c_i\tau_{ik} \ \text{(joint)}, \qquad
    \overline{\log p_k}(y_i\mid x_i) = c_i\tau_{ik},$$

    then ``gate.log_weights_vjp(params.gate, x, ell_bar)`` and
    ``experts.log_density_vjp(params.experts, x, y, logp_bar)``. For an ordinary gate (normalised
    $\ell$) the conditional form equals $c_i\tau_{ik}$ pushed through the log-softmax, so both
    conventions give the same parameter cotangents.

    Returns
    -------
    MoEParams
        ``MoEParams(gate=<gate record>, experts=<expert record>)`` of cotangents.
    """
    joint = _joint_flag(gate, joint)
    xp, ell, logp = _parts(x, y, gate, experts, params)
    check_cotangent(cotangent, (ell.shape[0],), like=ell, what="one entry per sample, like the log-likelihood")
    tau = softmax(ell + logp, axis=1)  # (N, K)
    c = cotangent[:, None]  # (N, 1)
    ell_bar = c * tau if joint else c * (tau - softmax(ell, axis=1))  # (N, K)
    return MoEParams(
        gate=gate.log_weights_vjp(params.gate, x, ell_bar),
        experts=experts.log_density_vjp(params.experts, x, y, c * tau),
    )


# --------------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------------


def _fit_one(x: Any, y: Any, gate: Any, experts: Any, init: MoEParams, n_samples: int, options: EMOptions) -> tuple[PenalisedRun, float, float]:
    """One EM run from ``init``: ``(run, final penalised objective, final unpenalised log-likelihood)``."""
    penalties: list[float] = []

    def e_step(params: MoEParams) -> EStep:
        xp, ell, logp = _parts_unchecked(x, y, gate, experts, params)
        a = ell + logp  # (N, K)
        pen = _penalty(gate, experts, params)
        penalties.append(pen)
        return EStep(loglik=xp.sum(logsumexp(a, axis=1)) - pen, log_responsibilities=log_softmax(a, axis=1))

    def m_step(params: MoEParams, tau: Any) -> MoEParams:
        return MoEParams(gate=gate.m_step(params.gate, x, tau), experts=experts.m_step(params.experts, x, y, tau))

    res = run_em(
        e_step, m_step, init, n_samples=n_samples,
        n_free_parameters=int(gate.n_free_parameters(init.gate)) + int(experts.n_free_parameters(init.experts)), options=options,
    )
    return PenalisedRun(res, tuple(penalties[: len(res.loglik_trace)])), res.loglik, res.loglik + penalties[-1]


def moe_random_starts(
    x: Any,
    y: Any,
    gate: Any,
    experts: Any,
    template: MoEParams,
    generator: Any,
    n_starts: int,
    *,
    scheme: str = "partition",
) -> tuple[RandomStart, ...]:
    r"""Random starting values for [`fit_moe`][moeref.moe_em.fit_moe], from a caller's seeded generator.

    Start $j$ is the M-step ([`moe_m_step`][moeref.moe_em.moe_m_step], from ``template``) of random
    responsibilities built from **one** call ``generator.random((N,))``; the starts are drawn in
    order $j = 1, \dots, n$ and nothing else is drawn. See [`moeref.em_init`][moeref.em_init] for the
    schemes (``"partition"``: a balanced random split into $K$ blocks; ``"flexmix"``: flexmix's
    0.9/0.1 posteriors).

    Parameters
    ----------
    x, y, gate, experts
        As in [`fit_moe`][moeref.moe_em.fit_moe].
    template : MoEParams
        Fixes the shapes and starts iterative M-steps (its values are ignored by closed-form ones).
    generator
        Any object with ``random(shape)`` drawing uniforms in $[0, 1)$ (``numpy.random.default_rng(seed)``).
    n_starts : int
    scheme : {"partition", "flexmix"}

    Returns
    -------
    tuple of RandomStart
        ``params`` (a `MoEParams`), ``draws`` (N,) and ``responsibilities`` (N, K) of each start.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.constant_gate import ConstantGate, ConstantGateParams
    >>> from moeref.gaussian_experts import ConstantGaussianExperts, ConstantGaussianExpertsParams
    >>> from moeref.moe_em import MoEParams, moe_random_starts
    >>> y = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> template = MoEParams(ConstantGateParams(np.full(2, 0.5)), ConstantGaussianExpertsParams(np.zeros((2, 1)), np.ones(2)))
    >>> (s,) = moe_random_starts(np.zeros((4, 1)), y, ConstantGate(), ConstantGaussianExperts(covariance="isotropic"),
    ...                          template, np.random.default_rng(1), 1)
    >>> s.responsibilities.sum(axis=0).tolist(), s.params.experts.mean.ravel().tolist()  # two random blocks of two
    ([2.0, 2.0], [1.0, 2.0])
    """
    _, ell, _ = _parts(x, y, gate, experts, template, "template")
    return random_starts(
        generator, n_starts,
        lambda tau: MoEParams(gate.m_step(template.gate, x, tau), experts.m_step(template.experts, x, y, tau)),
        n_components=int(ell.shape[1]), like=x, scheme=scheme,
    )


def fit_moe(
    x: Any,
    y: Any,
    gate: Any,
    experts: Any,
    init: MoEParams,
    *,
    options: EMOptions = EMOptions(),
    restarts: Sequence[MoEParams] | None = None,
    generator: Any = None,
    n_restarts: int = 0,
    init_scheme: str = "partition",
) -> MoEFitResult:
    r"""Fit a classical MoE by EM from explicit starting values (and optional explicit restarts).

    Alternates [`moe_e_step`][moeref.moe_em.moe_e_step] and [`moe_m_step`][moeref.moe_em.moe_m_step]
    with [`run_em`][moeref.em.run_em]: EM for mixtures of experts, Jordan & Jacobs (1994),
    "Hierarchical Mixtures of Experts and the EM Algorithm", Neural Computation 6(2):181-214,
    doi:10.1162/neco.1994.6.2.181 (one level). The objective is

    $$L(\theta) - \text{penalty}(\theta), \qquad L = \sum_i \operatorname{lse}_k\big(\ell_k(x_i) + \log p_k(y_i\mid x_i)\big),$$

    the conditional log-likelihood for an ordinary gate, the joint one for a gate with
    ``models_x``; each exact (or generalised) EM iteration cannot lower it (Dempster, Laird & Rubin
    1977, Theorem 1), and the driver checks that it does not.

    Parameters
    ----------
    x : array, shape (N, d)
    y : array
        As the expert family takes it.
    gate : GateFamily
    experts : ExpertFamily
    init : MoEParams
        Starting values (never drawn at random inside moeref).
    options : EMOptions
        Stopping rule, tolerance, ``max_iter``, decrease policy.
    restarts : sequence of MoEParams, optional
        Further starting values. EM runs from ``init`` and from each of them; the run with the highest
        final penalised log-likelihood is returned (the first on ties) and every run is summarised in
        ``restarts`` of the result. A run stopped by an [`EMError`][moeref.em.EMError] (an empty
        component, a collapsed variance, ...) is recorded with its error; if every run fails, the
        first error is raised.
    generator, n_restarts, init_scheme
        ``n_restarts`` further **random** starts, drawn from the caller's ``generator`` (any object
        with ``random(shape)``, e.g. ``numpy.random.default_rng(seed)``) by
        [`moe_random_starts`][moeref.moe_em.moe_random_starts] with ``init`` as the template and
        ``init_scheme`` as the scheme: one ``generator.random((N,))`` call per start, in order, all
        drawn before EM runs. They run after ``init`` and ``restarts``, like them; the records
        keep each start and its draws. The same generator state gives the same result.

    Returns
    -------
    MoEFitResult

    Raises
    ------
    EMError
        A degenerate state (from the families' M-steps) or a non-finite log-likelihood, when there is
        no other run to fall back on.

    Examples
    --------
    Two noisy linear regimes, $y = -1 - x$ and $y = 1 + 2x$, switched by $P(\text{second} \mid x) =
    \operatorname{sigmoid}(4x)$, fitted with a softmax gate and linear-Gaussian experts:

    >>> import numpy as np
    >>> from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
    >>> from moeref.moe_em import MoEParams, fit_moe
    >>> from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams
    >>> rng = np.random.default_rng(0)
    >>> x = rng.uniform(-1.0, 1.0, size=(100, 1))
    >>> second = rng.uniform(size=100) < 1.0 / (1.0 + np.exp(-4.0 * x[:, 0]))
    >>> y = np.where(second, 1.0 + 2.0 * x[:, 0], -1.0 - x[:, 0])[:, None] + 0.3 * rng.normal(size=(100, 1))
    >>> experts = LinearGaussianExperts(covariance="isotropic")
    >>> init = MoEParams(SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
    ...                  LinearGaussianExpertsParams(np.array([[[-1.0]], [[1.0]]]), np.array([[-0.5], [0.5]]), np.ones(2)))
    >>> fit = fit_moe(x, y, SoftmaxGate(), experts, init)
    >>> fit.converged, fit.n_iter, fit.decreases, fit.n_free_parameters
    (True, 15, (), 8)
    >>> np.round(fit.params.experts.weight.ravel(), 2).tolist(), np.round(fit.params.experts.bias.ravel(), 2).tolist()
    ([-0.97, 2.0], [-1.01, 0.93])
    >>> round(float(fit.params.gate.weight[0, 0]), 2)  # the gate's slope for the first expert (second: 0)
    -3.37
    """
    _check_families(gate, experts)
    options = _check_options(options)
    starts = [_check_params(init, gate, experts, "init")]
    if restarts is not None:
        if isinstance(restarts, MoEParams) or not isinstance(restarts, (list, tuple)):
            raise TypeError("restarts must be a list or tuple of MoEParams records")
        for j, r in enumerate(restarts):
            starts.append(_check_params(r, gate, experts, f"restarts[{j}]"))
    check_positive_int(n_restarts, "n_restarts", minimum=0)
    if n_restarts and generator is None:
        raise ValueError(f"n_restarts={n_restarts} random starts need a generator (e.g. numpy.random.default_rng(seed))")
    # shapes of the first start, and N
    _, ell, _ = _parts(x, y, gate, experts, init, "init")
    N = int(ell.shape[0])
    draws: list[Any] = [None] * len(starts)
    for r in moe_random_starts(x, y, gate, experts, init, generator, n_restarts, scheme=init_scheme) if n_restarts else ():
        starts.append(r.params)
        draws.append(r.draws)

    best, runs, records = run_restarts(lambda start: _fit_one(x, y, gate, experts, start, N, options), starts, draws)
    res, pens = runs[best].em, runs[best].penalty_trace

    params = res.params
    xp, ell, logp = _parts_unchecked(x, y, gate, experts, params)
    lse_a = logsumexp(ell + logp, axis=1)  # (N,)
    penalty = pens[-1]
    loglik = res.loglik + penalty  # unpenalised
    if gate.models_x:
        joint_ll = float(xp.sum(lse_a))
        cond_ll = float(xp.sum(lse_a - logsumexp(ell, axis=1)))
    else:
        joint_ll, cond_ll = None, float(xp.sum(lse_a))
    crit = information_criteria(loglik, res.n_free_parameters, N, entropy_value=entropy(res.responsibilities))
    em = res._replace(
        loglik=loglik, n_samples=N, entropy=crit.entropy, aic=crit.aic, bic=crit.bic, icl=crit.icl,
        restarts=records, best_restart=best,
    )
    return MoEFitResult(
        *em,
        conditional_loglik=cond_ll,
        joint_loglik=joint_ll,
        penalty=penalty,
        penalised_loglik=res.loglik,
        penalty_trace=pens,
    )


# --------------------------------------------------------------------------------------------
# Gradient ascent
# --------------------------------------------------------------------------------------------


def _view(family: Any) -> tuple[Any, Any, Any]:
    """``(unconstrained, constrained, constrained_vjp)`` of a family, identity when it has none."""
    names = ("unconstrained", "constrained", "constrained_vjp")
    have = [hasattr(family, n) for n in names]
    if any(have) and not all(have):
        missing = ", ".join(n for n, h in zip(names, have) if not h)
        raise TypeError(f"the {family.name!r} family has a partial unconstrained view (missing {missing})")
    if all(have):
        return family.unconstrained, family.constrained, family.constrained_vjp
    return (lambda p: p), (lambda u: u), (lambda u, g: g)


def fit_moe_gradient(
    x: Any,
    y: Any,
    gate: Any,
    experts: Any,
    init: MoEParams,
    *,
    learning_rate: float,
    options: EMOptions = EMOptions(),
    target: float | None = None,
) -> GradientFitResult:
    r"""Fit a classical MoE by plain gradient ascent on the same objective as [`fit_moe`][moeref.moe_em.fit_moe].

    With $u$ the families' unconstrained parameters (see the module notes) and
    $J(u) = \frac1N\big(L(\theta(u)) - \text{penalty}(\theta(u))\big)$, the **mean** per-sample
    penalised log-likelihood,

    $$u^{(t)} = u^{(t-1)} + \eta\,\nabla_u J\big(u^{(t-1)}\big),$$

    with a fixed learning rate $\eta$. The gradient is
    [`moe_log_likelihood_vjp`][moeref.moe_em.moe_log_likelihood_vjp] with cotangent $1/N$, minus the
    families' ``penalty_vjp``, pulled back through each family's ``constrained_vjp``. This is the
    baseline against which Jordan & Jacobs (1994), doi:10.1162/neco.1994.6.2.181 (their simulations),
    and Xu & Jordan (1996), "On convergence properties of the EM algorithm for Gaussian mixtures", Neural
    Computation 8(1):129-151, doi:10.1162/neco.1996.8.1.129, compare EM.

    Parameters
    ----------
    x, y, gate, experts, init
        As in [`fit_moe`][moeref.moe_em.fit_moe].
    learning_rate : float
        $\eta > 0$, on the mean log-likelihood scale.
    options : EMOptions
        ``max_iter``, ``criterion`` and ``tol`` stop the loop as they stop EM; ``warn_not_converged``
        issues a [`ConvergenceWarning`][moeref.em.ConvergenceWarning]. Decreases are not warned about
        (gradient ascent is not monotone) but listed in ``decreases``.
    target : float, optional
        Also stop as soon as the penalised log-likelihood (the sum, not the mean) reaches ``target``
        (``converged=True``), e.g. EM's final value minus $10^{-6}$ in a benchmark.

    Returns
    -------
    GradientFitResult

    Raises
    ------
    NonFiniteLogLikelihoodError
        The log-likelihood became NaN or infinite (the learning rate is too large).
    ValueError
        A step left a family's valid parameter region (no unconstrained view, learning rate too large).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.constant_gate import ConstantGate, ConstantGateParams
    >>> from moeref.gaussian_experts import ConstantGaussianExperts, ConstantGaussianExpertsParams
    >>> from moeref.moe_em import MoEParams, fit_moe_gradient
    >>> from moeref.em import EMOptions
    >>> y = np.array([[-1.0], [-1.2], [0.9], [1.1]])
    >>> init = MoEParams(ConstantGateParams(np.array([0.5, 0.5])),
    ...                  ConstantGaussianExpertsParams(np.array([[-0.5], [0.5]]), np.ones(2)))
    >>> fit = fit_moe_gradient(np.zeros((4, 1)), y, ConstantGate(), ConstantGaussianExperts(covariance="isotropic"),
    ...                        init, learning_rate=0.1, options=EMOptions(max_iter=50, warn_not_converged=False))
    >>> fit.loglik > fit.loglik_trace[0]
    True
    """
    _check_families(gate, experts)
    options = _check_options(options)
    lr = check_positive_float(learning_rate, "learning_rate")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target)):
        raise ValueError(f"target must be None or a finite float, got {target!r}")
    xp, ell, _ = _parts(x, y, gate, experts, init, "init")
    N = int(ell.shape[0])
    g_u, g_c, g_vjp = _view(gate)
    e_u, e_c, e_vjp = _view(experts)
    joint = bool(gate.models_x)

    def value(params: MoEParams, t: int) -> tuple[float, tuple[Any, Any]]:
        try:
            _, ell_t, logp_t = _parts_unchecked(x, y, gate, experts, params)
        except ValueError as err:
            if t == 0:
                raise
            raise ValueError(
                f"gradient step {t} left the valid parameter region ({err}); lower learning_rate or give the "
                "family an unconstrained view (unconstrained / constrained / constrained_vjp)"
            ) from err
        a = ell_t + logp_t  # (N, K)
        val = float(xp.sum(logsumexp(a, axis=1))) - _penalty(gate, experts, params)
        if not math.isfinite(val):
            where = "at the starting values" if t == 0 else f"after gradient step {t}"
            raise NonFiniteLogLikelihoodError(f"the log-likelihood is {val} {where} (learning_rate={lr:g} too large?)")
        return val, (ell_t, a)

    def gradient(gu: Any, eu: Any, params: MoEParams, cache: tuple[Any, Any]) -> tuple[Any, Any]:
        ell_t, a = cache
        tau = softmax(a, axis=1) / N  # (N, K): cotangent 1/N per sample
        ell_bar = tau if joint else tau - softmax(ell_t, axis=1) / N  # (N, K)
        gbar = gate.log_weights_vjp(params.gate, x, ell_bar)
        ebar = experts.log_density_vjp(params.experts, x, y, tau)
        pv = getattr(gate, "penalty_vjp", None)
        if pv is not None:
            gbar = _tree_add_scaled(gbar, pv(params.gate), -1.0 / N)
        pv = getattr(experts, "penalty_vjp", None)
        if pv is not None:
            ebar = _tree_add_scaled(ebar, pv(params.experts), -1.0 / N)
        return g_vjp(gu, gbar), e_vjp(eu, ebar)

    start = time.perf_counter()
    gu, eu = g_u(init.gate), e_u(init.experts)
    params = MoEParams(g_c(gu), e_c(eu))
    val, cache = value(params, 0)
    trace = [val]
    converged, reason, t = False, "", 0
    if target is not None and trace[0] >= target:
        converged, reason = True, f"converged: the target {target!r} was met at the starting values"
    while not converged and t < options.max_iter:
        t += 1
        dg, de = gradient(gu, eu, params, cache)
        gu, eu = _tree_add_scaled(gu, dg, lr), _tree_add_scaled(eu, de, lr)
        params = MoEParams(g_c(gu), e_c(eu))
        val, cache = value(params, t)
        trace.append(val)
        if target is not None and trace[-1] >= target:
            converged, reason = True, f"converged: the target {target!r} was reached after step {t}"
        elif stopping_rule_met(trace, options.criterion, options.tol):
            converged = True
            reason = f"converged: the {options.criterion!r} rule with tol={options.tol:g} held after step {t}"
    seconds = time.perf_counter() - start
    if not converged:
        reason = f"not converged: max_iter={options.max_iter} gradient steps ran"
        if options.warn_not_converged:
            warnings.warn(
                f"gradient ascent did not converge in {options.max_iter} steps (last change {trace[-1] - trace[-2]:.3e})",
                ConvergenceWarning,
                stacklevel=2,
            )
    return GradientFitResult(
        params=params,
        loglik=trace[-1] + moe_penalty(gate, experts, params),
        loglik_trace=tuple(trace),
        n_iter=t,
        converged=converged,
        stop_reason=reason,
        learning_rate=lr,
        decreases=find_loglik_decreases(trace),
        seconds=seconds,
    )

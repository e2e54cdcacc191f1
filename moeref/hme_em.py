r"""Hierarchical mixture of experts fitted by EM (Jordan & Jacobs 1994, Algorithm 1).

The model is the one of [`moeref.hierarchical_moe`][moeref.hierarchical_moe]: a tree of depth $D$
whose inner node $m$ of level $l$ has a linear-softmax gate
$g_{c|m}(x) = \operatorname{softmax}_c(x^\top V_{l,m} + \beta_{l,m})$ over its $b_l$ children, and
whose leaf $p$ is a linear-Gaussian expert $\mathcal N(y \mid A_p x + c_p, \sigma^2 I)$:

$$P(y \mid x) = \sum_p \pi_p(x)\, \mathcal N\big(y \mid \mu_p(x), \sigma^2 I\big), \qquad
\pi_p(x) = \prod_{l=0}^{D-1} g_{c_l \mid m_l}(x) .$$

Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the EM Algorithm", *Neural
Computation* 6(2):181-214, doi:10.1162/neco.1994.6.2.181, fit it by EM (their Algorithm 1):

* **E-step**: the upward-downward recursion of
  [`hme_posteriors`][moeref.hierarchical_moe.hme_posteriors] gives, for every sample, the joint
  path posteriors $h_p$, the node posteriors $h_m$ and the conditional posteriors $h_{c|m}$ of
  every child of every node.
* **M-step**, one independent problem per node and per leaf:

  * each expert $p$: weighted least squares with weights $h_p$,
    $(A_p, c_p) = \arg\min \sum_n h_{np}\,\lVert y_n - A_p x_n - c_p\rVert^2$;
  * each gate node $m$: a weighted multinomial logistic regression with **soft targets**
    $h_{c|m}$ and **observation weights** $h_m$,
    $(V_{l,m}, \beta_{l,m}) = \arg\max \sum_n h_{nm} \sum_c h_{n,c|m} \log g_{c|m}(x_n)$,
    by Newton's method (IRLS) with step halving
    ([`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial], with the options
    of a [`SoftmaxGate`][moeref.softmax_gate.SoftmaxGate]: parametrisation, ridge, Newton to
    convergence or one step);
  * optionally the shared variance,
    $\sigma^2 = \frac{1}{N d_{out}}\sum_n\sum_p h_{np}\lVert y_n - \mu_p(x_n)\rVert^2$.

**The variance.** The forward of [`moeref.hierarchical_moe`][moeref.hierarchical_moe] has one
isotropic output variance $\sigma^2$ shared by every expert, a fixed number (``variance=``). fit_hme
keeps that model: with ``estimate_variance=False`` (the default) $\sigma^2$ stays at the value given
and EM fits the gates and experts only (the expert and gate updates do not depend on $\sigma^2$ except
through the posteriors); with ``estimate_variance=True`` the shared $\sigma^2$ is a parameter too,
updated by the closed form above, and every log-likelihood (the trace, AIC/BIC) is evaluated at the
current estimate. Per-expert variances are not offered, because the forward cannot express them.

**Separation and the ridge.** On data that switch regime abruptly, the posteriors that a gate node
is fitted to become (numerically) 0/1 and its maximum-likelihood weights diverge; the Newton solver
then issues a [`GateSeparationWarning`][moeref.softmax_gate.GateSeparationWarning]. A ridge
(``gate=SoftmaxGate(ridge=rho)``) makes every node's M-step maximise $Q_m - \frac{\rho}{2}\lVert(V, \beta)\rVert^2$,
so EM increases the penalised log-likelihood $L - \sum_{\text{nodes}}\frac{\rho}{2}\lVert(V_{l,m}, \beta_{l,m})\rVert^2$
(a MAP fit): that is what the trace records, as in [`fit_moe`][moeref.moe_em.fit_moe], with the
penalty reported beside it and AIC/BIC computed from the unpenalised $L$.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .core import array_namespace, device_of
from .em import (
    EMOptions,
    EStep,
    PenalisedRun,
    RestartRecord,
    _check_options,
    check_nonempty_components,
    entropy,
    information_criteria,
    run_em,
    run_restarts,
)
from .em_init import RandomStart, random_starts
from .experts import LinearExpertsParams
from .gaussian_covariance import _weighted_cov_mle
from .hierarchical_moe import HMEParams, HMEPosteriors, _check_hme, _check_tree, _posteriors, hme_branching
from .softmax_gate import SoftmaxGate, SoftmaxGateParams, fit_weighted_multinomial
from .validation import (
    check_array,
    check_arrays,
    check_finite,
    check_float_array,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_same_dtype,
    check_shape,
    concrete_bool,
)
from .weighted_lstsq import _design_matrix, _weighted_least_squares, split_coefficients

__all__ = [
    "HMEFitParams",
    "HMEFitResult",
    "hme_n_free_parameters",
    "hme_penalty",
    "hme_e_step",
    "hme_m_step",
    "hme_random_starts",
    "fit_hme",
]


class HMEFitParams(NamedTuple):
    r"""The state of an HME EM iteration: the tree's parameters and the output variance.

    Attributes
    ----------
    hme : HMEParams
        Gates and experts, as [`moeref.hierarchical_moe`][moeref.hierarchical_moe] takes them.
    variance : 0-d array
        $\sigma^2$, shared by every expert and output feature.
    """

    hme: HMEParams
    variance: Any


class HMEFitResult(NamedTuple):
    r"""The outcome of [`fit_hme`][moeref.hme_em.fit_hme]: the fields of [`EMResult`][moeref.em.EMResult]
    (same names, same order), then the variance and the penalty.

    Attributes
    ----------
    params : HMEParams
        The fitted tree (pass ``variance=fit.variance`` to the forward functions).
    loglik : float
        The unpenalised log-likelihood $L = \sum_n \log P(y_n \mid x_n)$ at the fit (AIC, BIC and ICL use it).
    loglik_trace : tuple of float
        The EM objective $L^{(t)} - \text{penalty}^{(t)}$, $t = 0..T$ (non-decreasing; the
        log-likelihood itself without a ridge).
    responsibilities : array, shape (N, L)
        The joint path posteriors $h_{np}$ at the fit.
    n_iter, converged, stop_reason, criterion, tol, n_samples, n_free_parameters, entropy, aic, bic, icl, decreases
        As in [`EMResult`][moeref.em.EMResult].
    restarts : tuple of RestartRecord
        Every run (``init`` first, then the explicit restarts, then the random starts; the starts'
        ``HMEParams`` and draws are kept).
    best_restart : int
        Index of the run returned (highest final penalised log-likelihood, the first on ties).
    variance : float
        $\sigma^2$ at the fit (the value given, unless ``estimate_variance``).
    penalty : float
        The gates' ridge penalty at the fit (0 without a ridge).
    penalised_loglik : float
        ``loglik - penalty`` (``= loglik_trace[-1]``).
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
    variance: float
    penalty: float
    penalised_loglik: float
    penalty_trace: tuple[float, ...]


def _check_data(x: Any, y: Any, params: HMEParams, name: str = "params") -> tuple[Any, tuple[int, ...]]:
    """``x``, ``y`` and a tree named ``name``: types, shapes, one library and dtype, finite values
    (gate biases: finite or -inf). Returns ``(xp, branching)``."""
    check_record_type(params, name, HMEParams)
    xp, branching = _check_hme(x, params, y, with_y=True, name=name)
    return xp, branching


def _check_variance(variance: Any, name: str, like: Any) -> None:
    """A positive finite variance: a Python number or a 0-d array of the library and dtype of ``like``."""
    if isinstance(variance, (int, float)) and not isinstance(variance, bool):
        check_positive_float(variance, name)
        return
    check_array(variance, name)
    xp = check_arrays({"x": like, name: variance})
    check_float_array(variance, name, ndim=0)
    if concrete_bool(xp.all(variance > 0)) is False:
        raise ValueError(f"{name} must be positive (a variance), got {float(variance)!r}")


def _check_posteriors(post: HMEPosteriors, x: Any, branching: tuple[int, ...]) -> None:
    """The posteriors the M-step reads: paths (N, L), nodes[l] (N, M_l) for l = 0..D and
    conditionals[l] (N, M_l, b_l) for l < D; real floating like ``x``, finite and non-negative."""
    N, D = x.shape[0], len(branching)
    for field, count in (("nodes", D + 1), ("conditionals", D)):
        levels = getattr(post, field)
        if not isinstance(levels, (tuple, list)) or len(levels) != count:
            got = f"{type(levels).__name__} of {len(levels)}" if isinstance(levels, (tuple, list)) else type(levels).__name__
            raise TypeError(f"posteriors.{field} must be a tuple of {count} arrays (the tree has depth D={D}), got {got}")
    expected = {"posteriors.paths": (post.paths, (N, math.prod(branching)))}
    nodes = 1
    for l, b in enumerate(branching):
        expected[f"posteriors.nodes[{l}]"] = (post.nodes[l], (N, nodes))
        expected[f"posteriors.conditionals[{l}]"] = (post.conditionals[l], (N, nodes, b))
        nodes *= b
    expected[f"posteriors.nodes[{D}]"] = (post.nodes[D], (N, nodes))
    for name, (a, _) in expected.items():
        check_array(a, name)
    xp = check_arrays({"x": x, **{name: a for name, (a, _) in expected.items()}})
    for name, (a, shape) in expected.items():
        check_float_array(a, name, ndim=len(shape))
        check_shape(a, name, shape, what=f"N={N} samples and the tree's branching {tuple(branching)}")
        if concrete_bool(xp.all(a >= 0)) is False:
            raise ValueError(f"{name} must be non-negative (posterior probabilities)")


def _check_min(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v):
        raise ValueError(f"{name} must be a non-negative float (finite), got {v!r}")


def _check_gate(gate: Any) -> SoftmaxGate:
    if not isinstance(gate, SoftmaxGate):
        raise TypeError(
            "gate must be a moeref.softmax_gate.SoftmaxGate (the options of every node's weighted multinomial "
            f"fit: parametrisation, ridge, newton, max_iter, tol, max_halvings), got {type(gate).__name__}"
        )
    return gate


def hme_n_free_parameters(params: HMEParams, *, estimate_variance: bool = False) -> int:
    r"""Free parameters of an HME: identifiable gate parameters, expert coefficients, variance.

    $$p = \sum_{l=0}^{D-1} M_l\,(b_l - 1)(d_{in} + 1) \;+\; L\,(d_{in} + 1)\,d_{out} \;+\; [\sigma^2 \text{ estimated}],$$

    since a softmax over $b_l$ children is unchanged by adding one vector to every child's
    $(V, \beta)$ column, so only $b_l - 1$ of them are free at each node.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams
    >>> from moeref.hme_em import hme_n_free_parameters
    >>> p = HMEParams((np.zeros((1, 1, 2)), np.zeros((2, 1, 2))), (np.zeros((1, 2)), np.zeros((2, 2))),
    ...               LinearExpertsParams(np.zeros((4, 1, 1)), np.zeros((4, 1))))
    >>> hme_n_free_parameters(p, estimate_variance=True)  # 3 gates x 2 + 4 experts x 2 + 1
    15
    """
    branching = hme_branching(params)
    d_in, d_out = params.experts.weight.shape[1], params.experts.weight.shape[2]
    gates, nodes = 0, 1
    for b in branching:
        gates += nodes * (b - 1) * (d_in + 1)
        nodes *= b
    return gates + nodes * (d_in + 1) * d_out + (1 if estimate_variance else 0)


def _node(params: HMEParams, l: int, m: int) -> SoftmaxGateParams:
    return SoftmaxGateParams(weight=params.gate_weights[l][m, :, :], bias=params.gate_biases[l][m, :])


def hme_penalty(params: HMEParams, gate: SoftmaxGate = SoftmaxGate()) -> float:
    r"""The gates' ridge penalty $\sum_{l,m}\frac{\rho}{2}\big(\lVert V_{l,m}\rVert_F^2 + \lVert\beta_{l,m}\rVert^2\big)$.

    Each node is taken in the form its M-step penalises: under the ``"baseline"``
    parametrisation the equivalent point with a zero last column (the same gate probabilities).
    0 when ``gate.ridge == 0``.
    """
    _check_gate(gate)
    check_record_type(params, "params", HMEParams)
    _check_tree(params, None)
    gates = {f"params.gate_weights[{l}]": w for l, w in enumerate(params.gate_weights)}
    gates |= {f"params.gate_biases[{l}]": b for l, b in enumerate(params.gate_biases)}
    array_namespace(*gates.values(), names=tuple(gates))
    check_same_dtype(gates)
    for name, a in gates.items():
        check_finite(a, name)
    return _penalty(params, gate)


def _penalty(params: HMEParams, gate: SoftmaxGate) -> float:
    """[`hme_penalty`][moeref.hme_em.hme_penalty] without argument checks (EM loops)."""
    if gate.ridge == 0.0:
        return 0.0
    xp = array_namespace(params.gate_weights[0])
    total = 0.0
    for l, w in enumerate(params.gate_weights):
        for m in range(w.shape[0]):
            total += float(gate._penalty(gate.constrained(gate.unconstrained(_node(params, l, m))), xp))
    return total


def _safe_log(a: Any, xp: Any) -> Any:
    positive = a > 0
    return xp.where(positive, xp.log(xp.where(positive, a, xp.ones_like(a))), xp.full_like(a, -math.inf))


def _e_step_from(post: HMEPosteriors, xp: Any) -> EStep:
    return EStep(loglik=xp.sum(post.log_likelihood), log_responsibilities=_safe_log(post.paths, xp))


def hme_e_step(x: Any, y: Any, params: HMEParams, *, variance: float = 1.0) -> EStep:
    r"""E-step: $L = \sum_n \log P(y_n \mid x_n)$ and the log joint path posteriors $\log h_{np}$.

    $$h_{np} = \frac{\pi_p(x_n)\,\mathcal N(y_n \mid \mu_p(x_n), \sigma^2 I)}{P(y_n \mid x_n)}$$

    from the upward-downward recursion of [`hme_posteriors`][moeref.hierarchical_moe.hme_posteriors]
    (which also holds the node and conditional posteriors the M-step needs).

    Returns
    -------
    EStep
        ``loglik`` (0-d, unpenalised), ``log_responsibilities`` (N, L); an underflowed posterior is $-\infty$.
    """
    xp, _ = _check_hme(x, params, y, variance, with_y=True)
    return _e_step_from(_posteriors(x, y, params, variance, xp), xp)


def hme_m_step(
    x: Any,
    y: Any,
    state: HMEFitParams,
    posteriors: HMEPosteriors,
    *,
    estimate_variance: bool = False,
    gate: SoftmaxGate = SoftmaxGate(),
    min_weight: float = 1e-8,
    min_sigma: float = 1e-8,
) -> HMEFitParams:
    r"""M-step of HME EM: weighted least squares per expert, a weighted multinomial fit per gate node.

    With $h_{np}$, $h_{nm}$ and $h_{n,c|m}$ the path, node and conditional posteriors of the E-step:

    $$(A_p, c_p) = \arg\min_{A, c} \sum_n h_{np}\lVert y_n - A x_n - c\rVert^2, \qquad
    (V_{l,m}, \beta_{l,m}) = \arg\max_{V, \beta} \sum_n h_{nm} \sum_c h_{n,c|m}\log\operatorname{softmax}_c(x_n^\top V + \beta),$$

    and, with ``estimate_variance``, $\sigma^2 = \frac1{N d_{out}}\sum_{n,p} h_{np}\lVert y_n - \mu_p(x_n)\rVert^2$
    at the experts' new means. Jordan & Jacobs (1994), doi:10.1162/neco.1994.6.2.181, Algorithm 1.
    The problems are independent: each maximises its own term of the expected complete-data
    log-likelihood

    $$Q = \sum_n\sum_{l,m,c} h_{n,mc}\log g_{c|m}(x_n) + \sum_n\sum_p h_{np}\log\mathcal N\big(y_n\mid\mu_p(x_n),\sigma^2 I\big),$$

    where $h_{n,mc} = h_{nm} h_{n,c|m}$ is the posterior of child $c$ of node $m$.

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    state : HMEFitParams
        The current parameters (starting points of the gates' Newton iterations) and $\sigma^2$.
    posteriors : HMEPosteriors
        From [`hme_posteriors`][moeref.hierarchical_moe.hme_posteriors] at ``state``.
    estimate_variance : bool
        Update the shared $\sigma^2$ (else it is kept).
    gate : SoftmaxGate
        The options of every node's [`fit_weighted_multinomial`][moeref.softmax_gate.fit_weighted_multinomial]:
        ``parametrisation``, ``ridge``, ``newton`` (``"single_step"``: one Newton step, generalised
        EM), ``max_iter``, ``tol``, ``max_halvings``.
    min_weight : float
        [`EmptyComponentError`][moeref.em.EmptyComponentError] if a leaf's total posterior
        $\sum_n h_{np}$ is below ``min_weight`` $\cdot N$ (an expert with no data).
    min_sigma : float
        [`CollapsedVarianceError`][moeref.em.CollapsedVarianceError] if the estimated $\sigma$ is below it.

    Returns
    -------
    HMEFitParams
        Gates in ``gate.parametrisation``'s form (a zero last column under ``"baseline"``: the
        same gate probabilities).

    Raises
    ------
    EmptyComponentError, SingularWeightedLeastSquaresError, CollapsedVarianceError

    Warns
    -----
    GateSeparationWarning
        From a node's multinomial fit when its targets are separable (use ``gate.ridge > 0``).
    """
    check_record_type(state, "state", HMEFitParams)
    check_record_type(posteriors, "posteriors", HMEPosteriors)
    _check_gate(gate)
    xp, branching = _check_data(x, y, state.hme, "state.hme")
    _check_variance(state.variance, "state.variance", x)
    _check_posteriors(posteriors, x, branching)
    if not isinstance(estimate_variance, bool):
        raise TypeError(f"estimate_variance must be a bool, got {type(estimate_variance).__name__}")
    _check_min(min_weight, "min_weight")
    _check_min(min_sigma, "min_sigma")
    return _m_step(x, y, state, posteriors, estimate_variance, gate, min_weight, min_sigma, xp)


def _m_step(
    x: Any, y: Any, state: HMEFitParams, posteriors: HMEPosteriors, estimate_variance: bool, gate: SoftmaxGate,
    min_weight: float, min_sigma: float, xp: Any,
) -> HMEFitParams:
    """[`hme_m_step`][moeref.hme_em.hme_m_step] without argument checks (EM loops, random starts)."""
    N, d_in = x.shape
    # experts: weighted least squares per leaf on [x, 1], weights h_p
    check_nonempty_components(posteriors.paths, min_weight)
    design = _design_matrix(x, True, xp)  # (N, d_in + 1)
    theta = _weighted_least_squares(design, y, posteriors.paths, xp)  # (L, d_in + 1, d_out)
    weight, bias = split_coefficients(theta, d_in, bias=True)
    variance = state.variance
    if estimate_variance:
        r = y[None, :, :] - xp.matmul(design[None, :, :], theta)  # (L, N, d_out)
        variance = _weighted_cov_mle("isotropic", r, posteriors.paths, True, 1.0, min_sigma, xp)[0]
    # gates: one weighted multinomial fit per node, targets h_{c|m}, observation weights h_m
    new_w, new_b = [], []
    for l in range(len(state.hme.gate_weights)):
        ws, bs = [], []
        for m in range(state.hme.gate_weights[l].shape[0]):  # a loop over the M_l nodes of the level
            start = _node(state.hme, l, m)
            fit = fit_weighted_multinomial(
                x, posteriors.conditionals[l][:, m, :], posteriors.nodes[l][:, m], start.weight, start.bias,
                parametrisation=gate.parametrisation, ridge=gate.ridge, max_iter=gate.max_iter, tol=gate.tol,
                max_halvings=gate.max_halvings, single_step=gate.newton == "single_step",
            )
            ws.append(fit.weight)  # (d_in, b_l)
            bs.append(fit.bias)  # (b_l,)
        new_w.append(xp.stack(ws, axis=0))  # (M_l, d_in, b_l)
        new_b.append(xp.stack(bs, axis=0))  # (M_l, b_l)
    hme = HMEParams(gate_weights=tuple(new_w), gate_biases=tuple(new_b), experts=LinearExpertsParams(weight=weight, bias=bias))
    return HMEFitParams(hme=hme, variance=variance)


def _check_finite_biases(params: HMEParams, name: str, xp: Any) -> None:
    for l, b in enumerate(params.gate_biases):
        if concrete_bool(xp.all(xp.isfinite(b))) is False:
            raise ValueError(
                f"{name}.gate_biases[{l}] has a non-finite entry: fit_hme does not support removed children "
                "(-inf gate biases); give the tree a regular branching instead"
            )


def _posteriors_from_paths(paths: Any, branching: tuple[int, ...], xp: Any) -> HMEPosteriors:
    r"""Node and conditional posteriors implied by path posteriors $h_{np}$ (N, L), for the M-step.

    $h_{nm}$ sums the paths below node $m$ and $h_{n,c|m} = h_{n,mc}/h_{nm}$ ($1/b_l$ where
    $h_{nm} = 0$: the node then has observation weight 0). The likelihood fields are not known here
    and are left empty (zeros and ``()``); [`hme_m_step`][moeref.hme_em.hme_m_step] does not read them.
    """
    N = paths.shape[0]
    nodes = [paths]  # level D first, then upwards
    conditionals = []
    for l in range(len(branching) - 1, -1, -1):
        b = branching[l]
        child = xp.reshape(nodes[0], (N, nodes[0].shape[1] // b, b))  # (N, M_l, b_l): children m*b + c
        parent = xp.sum(child, axis=2)  # (N, M_l)
        positive = parent > 0
        safe = xp.where(positive, parent, xp.ones_like(parent))
        conditionals.insert(0, xp.where(positive[:, :, None], child / safe[:, :, None], xp.full_like(child, 1.0 / b)))
        nodes.insert(0, parent)
    zeros = xp.zeros((N,), dtype=paths.dtype, device=device_of(paths))
    return HMEPosteriors(log_likelihood=zeros, paths=paths, nodes=tuple(nodes), conditionals=tuple(conditionals), log_node_likelihoods=())


def hme_random_starts(
    x: Any,
    y: Any,
    template: HMEParams,
    generator: Any,
    n_starts: int,
    *,
    scheme: str = "partition",
    gate: SoftmaxGate = SoftmaxGate(),
    min_weight: float = 1e-8,
) -> tuple[RandomStart, ...]:
    r"""Random starting trees for [`fit_hme`][moeref.hme_em.fit_hme], from a caller's seeded generator.

    Start $j$ takes **one** call ``generator.random((N,))`` (in order, nothing else is drawn) and
    turns it into random path posteriors $h_{np}$ over the $L$ leaves
    ([`random_responsibilities`][moeref.em_init.random_responsibilities]; ``"partition"``: a
    balanced random split of the samples among the leaves); the start is one
    [`hme_m_step`][moeref.hme_em.hme_m_step] from ``template`` with those posteriors (node and
    conditional posteriors summed from the paths): a weighted least-squares fit per leaf and a
    weighted multinomial fit per gate node.

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    template : HMEParams
        The tree's shapes and the starting point of the gates' Newton iterations.
    generator
        Any object with ``random(shape)`` drawing uniforms in $[0, 1)$ (``numpy.random.default_rng(seed)``).
    n_starts : int
    scheme : {"partition", "flexmix"}
    gate : SoftmaxGate
        The gate nodes' M-step options, as in [`fit_hme`][moeref.hme_em.fit_hme].
    min_weight : float
        As in [`hme_m_step`][moeref.hme_em.hme_m_step].

    Returns
    -------
    tuple of RandomStart
        ``params`` are `HMEParams`.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams
    >>> from moeref.hme_em import hme_random_starts
    >>> x = np.linspace(-1, 1, 8)[:, None]
    >>> tree = HMEParams((np.zeros((1, 1, 2)),), (np.zeros((1, 2)),), LinearExpertsParams(np.zeros((2, 1, 1)), np.zeros((2, 1))))
    >>> (s,) = hme_random_starts(x, np.abs(x), tree, np.random.default_rng(0), 1)
    >>> s.responsibilities.sum(axis=0).tolist()  # four samples per leaf
    [4.0, 4.0]
    """
    xp, branching = _check_data(x, y, template, "template")
    _check_gate(gate)
    state = HMEFitParams(hme=template, variance=xp.asarray(1.0, dtype=x.dtype, device=device_of(x)))

    def m_step(paths: Any) -> HMEParams:
        post = _posteriors_from_paths(paths, branching, xp)
        return _m_step(x, y, state, post, False, gate, min_weight, 1e-8, xp).hme

    return random_starts(
        generator, n_starts, m_step, n_components=int(template.experts.weight.shape[0]), like=x, scheme=scheme
    )


def fit_hme(
    x: Any,
    y: Any,
    init: HMEParams,
    *,
    variance: float = 1.0,
    estimate_variance: bool = False,
    gate: SoftmaxGate = SoftmaxGate(),
    options: EMOptions = EMOptions(),
    min_weight: float = 1e-8,
    min_sigma: float = 1e-8,
    restarts: Any = None,
    generator: Any = None,
    n_restarts: int = 0,
    init_scheme: str = "partition",
) -> HMEFitResult:
    r"""Fit a hierarchical mixture of linear-Gaussian experts by EM (Jordan & Jacobs 1994, Algorithm 1).

    $$h = \text{E-step}(\theta^{(t)}) \text{ (upward-downward recursion)}, \qquad
    \theta^{(t+1)} = \text{M-step}(\theta^{(t)}, h) \text{ (WLS per expert, IRLS per gate node)},$$

    run by [`run_em`][moeref.em.run_em], which records $L^{(t)} - \text{penalty}^{(t)}$, with
    $L = \sum_n \log P(y_n \mid x_n)$, and checks that it never decreases.

    Parameters
    ----------
    x : array, shape (N, d_in)
        Inputs (no intercept column: gates and experts have their own biases).
    y : array, shape (N, d_out)
    init : HMEParams
        Starting gates and experts (the tree's branching is read from their shapes). Removed
        children ($-\infty$ gate biases) are not supported here.
    variance : float
        $\sigma^2$: fixed, or the starting value when ``estimate_variance``.
    estimate_variance : bool
        Estimate the shared isotropic $\sigma^2$ (one more free parameter).
    gate : SoftmaxGate
        The options of every gate node's M-step (parametrisation, ridge, Newton to convergence or
        one step, tolerances); see [`hme_m_step`][moeref.hme_em.hme_m_step].
    options : EMOptions
        Stopping rule, tolerance, ``max_iter``, decrease policy.
    min_weight, min_sigma : float
        Degeneracy thresholds, see [`hme_m_step`][moeref.hme_em.hme_m_step].
    restarts : sequence of HMEParams, optional
        Further explicit starting trees (same branching), each run from ``variance``.
    generator, n_restarts, init_scheme
        ``n_restarts`` random starting trees from the caller's generator, by
        [`hme_random_starts`][moeref.hme_em.hme_random_starts] with ``init`` as the template (one
        ``generator.random((N,))`` call each, in order, drawn before EM runs). Every start runs; the
        highest final penalised log-likelihood wins (the first on ties), as in
        [`run_restarts`][moeref.em.run_restarts], and ``restarts`` of the result reports every run.

    Returns
    -------
    HMEFitResult
        ``params`` an `HMEParams`, ``variance`` a float, the path posteriors as ``responsibilities``,
        ``n_free_parameters`` from [`hme_n_free_parameters`][moeref.hme_em.hme_n_free_parameters].

    Raises
    ------
    EmptyComponentError, SingularWeightedLeastSquaresError, CollapsedVarianceError, NonFiniteLogLikelihoodError
        On a degenerate state (named, never silently restarted).

    Notes
    -----
    * With Newton run to convergence every iteration is an EM step; with
      ``gate=SoftmaxGate(newton="single_step")`` each node takes one Newton step with step halving, a
      generalised EM step that still increases $Q$. Either way the objective cannot decrease.
    * The M-step uses the node and conditional posteriors of the upward-downward recursion
      directly (not ratios of path posteriors), so a node whose posterior underflows still has
      accurate conditional targets, with observation weight 0.
    * The variance enters the E-step as a Python float (the forward's ``variance=``), one host
      read per iteration when it is estimated.
    * A one-level tree is the flat mixture of experts with a softmax gate and linear-Gaussian
      experts of one shared isotropic variance: this fit then equals
      [`fit_moe`][moeref.moe_em.fit_moe] with ``SoftmaxGate()`` and
      ``LinearGaussianExperts(covariance="isotropic", tied=True)``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams
    >>> from moeref.hme_em import fit_hme
    >>> from moeref.softmax_gate import SoftmaxGate
    >>> x = np.linspace(-2, 2, 41)[:, None]
    >>> y = np.abs(x) + 0.1 * np.cos(9.0 * x)  # two linear pieces, and a deterministic wiggle
    >>> init = HMEParams((np.array([[[-1.0, 1.0]]]),), (np.zeros((1, 2)),),
    ...                  LinearExpertsParams(np.array([[[-0.5]], [[0.5]]]), np.zeros((2, 1))))
    >>> fit = fit_hme(x, y, init, variance=0.1, estimate_variance=True, gate=SoftmaxGate(ridge=1e-3))
    >>> fit.converged, fit.decreases
    (True, ())
    >>> np.round(fit.params.experts.weight.ravel(), 2).tolist()  # the slopes of |x|, moved a little by the wiggle
    [-0.99, 0.99]
    >>> round(fit.loglik - fit.penalty, 10) == round(fit.loglik_trace[-1], 10)  # the trace is the penalised objective
    True
    """
    xp, _ = _check_data(x, y, init, "init")
    _check_finite_biases(init, "init", xp)
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be a positive finite Python number, got {variance!r}")
    if not isinstance(estimate_variance, bool):
        raise TypeError(f"estimate_variance must be a bool, got {type(estimate_variance).__name__}")
    _check_gate(gate)
    options = _check_options(options)
    _check_min(min_weight, "min_weight")
    _check_min(min_sigma, "min_sigma")

    starts = [init]
    if restarts is not None:
        if isinstance(restarts, HMEParams) or not isinstance(restarts, (list, tuple)):
            raise TypeError("restarts must be a list or tuple of HMEParams records")
        for j, r in enumerate(restarts):
            _, branching = _check_data(x, y, r, f"restarts[{j}]")
            if branching != hme_branching(init):
                raise ValueError(f"restarts[{j}] has branching {branching} but init has {hme_branching(init)}")
            _check_finite_biases(r, f"restarts[{j}]", xp)
            starts.append(r)
    check_positive_int(n_restarts, "n_restarts", minimum=0)
    if n_restarts and generator is None:
        raise ValueError(f"n_restarts={n_restarts} random starts need a generator (e.g. numpy.random.default_rng(seed))")
    draws: list[Any] = [None] * len(starts)
    if n_restarts:
        for r in hme_random_starts(x, y, init, generator, n_restarts, scheme=init_scheme, gate=gate, min_weight=min_weight):
            starts.append(r.params)
            draws.append(r.draws)
    n_free = hme_n_free_parameters(init, estimate_variance=estimate_variance)

    def fit_one(start: HMEParams) -> tuple[PenalisedRun, float, float]:
        state0 = HMEFitParams(hme=start, variance=xp.asarray(float(variance), dtype=x.dtype, device=device_of(x)))
        # The E-step's full posteriors (node and conditional, from the upward-downward recursion) are
        # kept for the M-step that run_em calls next with the same state.
        last: dict = {}
        penalties: list[float] = []

        def e_step(state: HMEFitParams) -> EStep:
            post = _posteriors(x, y, state.hme, float(state.variance), xp)
            last["state"], last["posteriors"] = state, post
            pen = _penalty(state.hme, gate)
            penalties.append(pen)
            e = _e_step_from(post, xp)
            return EStep(loglik=e.loglik - pen, log_responsibilities=e.log_responsibilities)

        def m_step(state: HMEFitParams, tau: Any) -> HMEFitParams:
            post = last["posteriors"] if last.get("state") is state else _posteriors(x, y, state.hme, float(state.variance), xp)
            return _m_step(x, y, state, post, estimate_variance, gate, min_weight, min_sigma, xp)

        res = run_em(e_step, m_step, state0, n_samples=x.shape[0], n_free_parameters=n_free, options=options)
        return PenalisedRun(res, tuple(penalties[: len(res.loglik_trace)])), res.loglik, res.loglik + penalties[-1]

    best, runs, records = run_restarts(fit_one, starts, draws)
    res, pens = runs[best].em, runs[best].penalty_trace
    penalty = pens[-1]
    loglik = res.loglik + penalty
    crit = information_criteria(loglik, res.n_free_parameters, res.n_samples, entropy_value=entropy(res.responsibilities))
    em = res._replace(
        params=res.params.hme, loglik=loglik, entropy=crit.entropy, aic=crit.aic, bic=crit.bic, icl=crit.icl,
        restarts=records, best_restart=best,
    )
    return HMEFitResult(
        *em,
        variance=float(res.params.variance),
        penalty=penalty,
        penalised_loglik=res.loglik,
        penalty_trace=pens,
    )

r"""Hierarchical mixture of experts (HME): a tree of softmax gates over linear-Gaussian experts.

The architecture of Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the EM
Algorithm", *Neural Computation* 6(2):181-214, doi:10.1162/neco.1994.6.2.181, for a tree of any
depth $D \ge 1$ and any branching.

**The tree.** Levels are numbered from 0 at the root. The branching is uniform within a level:
every inner node of level $l$ ($0 \le l < D$) has $b_l$ children, so level $l$ holds
$M_l = b_0 b_1 \cdots b_{l-1}$ nodes ($M_0 = 1$, the root) and level $D$ holds the
$L = M_D = b_0 \cdots b_{D-1}$ leaves, one expert each. Nodes are numbered row-major: child
$c$ of node $m$ of level $l$ is node $m\, b_l + c$ of level $l + 1$, so the leaf reached by the
choices $(c_0, \dots, c_{D-1})$ has index $(\dots((c_0 b_1 + c_1) b_2 + c_2)\dots) b_{D-1} + c_{D-1}$.
An irregular tree is represented by giving unneeded children a gate bias of $-\infty$ (their
gate, prior and posterior are then exactly 0).

**The model.** Node $m$ of level $l$ has a linear-softmax gate over its children,
$g_{c|m}(x) = \operatorname{softmax}_c(x^\top V_{l,m} + \beta_{l,m})$; leaf $p$ is a linear expert
$\mu_p(x) = A_p x + c_p$ with Gaussian output noise $\mathcal N(y \mid \mu_p(x), \sigma^2 I)$. The
prior of a path (root to leaf $p$) is the product of the gates along it, $\pi_p(x) = \prod_l
g_{c_l | m_l}(x)$, and

$$\mu(x) = \sum_p \pi_p(x)\, \mu_p(x), \qquad
P(y \mid x) = \sum_p \pi_p(x)\, \mathcal N(y \mid \mu_p(x), \sigma^2 I) .$$

Everything probabilistic is computed in log space (log-softmax gates, summed log-priors,
log-densities, log-sum-exp), so posteriors never divide by an underflowed likelihood.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .core import _log_softmax_vjp, array_namespace, device_of, log_softmax, logsumexp
from .experts import LinearExpertsParams, _linear_experts, _linear_experts_vjp
from .mixture import _mixture, _mixture_vjp
from .validation import check_array, check_cotangent, check_finite, check_float_array, check_same_dtype, check_shape, concrete_bool

__all__ = [
    "HMEParams",
    "HMEGrads",
    "HMELogLikelihoodGrads",
    "HMEPriors",
    "HMEPosteriors",
    "hme_branching",
    "hme",
    "hme_vjp",
    "hme_log_likelihood",
    "hme_log_likelihood_vjp",
    "hme_priors",
    "hme_posteriors",
]


class HMEParams(NamedTuple):
    r"""Parameters of a hierarchical mixture of experts with branching $(b_0, \dots, b_{D-1})$.

    Attributes
    ----------
    gate_weights : tuple of D arrays, entry ``l`` of shape (M_l, d_in, b_l)
        ``gate_weights[l][m]`` is the $(d_{in}, b_l)$ weight matrix $V_{l,m}$ of the gate at node
        $m$ of level $l$ (column $c$ is the gate vector of child $c$). $M_l = b_0 \cdots b_{l-1}$.
    gate_biases : tuple of D arrays, entry ``l`` of shape (M_l, b_l)
        Gate biases $\beta_{l,m}$; $-\infty$ removes a child (irregular trees).
    experts : LinearExpertsParams
        One affine expert per leaf: ``weight`` of shape (L, d_in, d_out), ``bias`` of shape
        (L, d_out), $L = b_0 \cdots b_{D-1}$, leaves in row-major path order.
    """

    gate_weights: tuple
    gate_biases: tuple
    experts: LinearExpertsParams


class HMEGrads(NamedTuple):
    """Cotangents of [`hme`][moeref.hierarchical_moe.hme]'s inputs."""

    x: Any
    params: HMEParams


class HMELogLikelihoodGrads(NamedTuple):
    """Cotangents of [`hme_log_likelihood`][moeref.hierarchical_moe.hme_log_likelihood]'s inputs."""

    x: Any
    y: Any
    params: HMEParams


class HMEPriors(NamedTuple):
    r"""Prior (input-only) quantities of an HME, from [`hme_priors`][moeref.hierarchical_moe.hme_priors].

    Attributes
    ----------
    paths : array, shape (N, L)
        Path priors $\pi_p(x_n)$ (product of the gates from the root to leaf $p$); rows sum to 1.
    nodes : tuple of D + 1 arrays, entry ``l`` of shape (N, M_l)
        Node priors (product of the gates from the root to the node), levels $0$ (the root,
        all ones) to $D$ (the leaves, equal to ``paths``). Rows sum to 1 at every level.
    gates : tuple of D arrays, entry ``l`` of shape (N, M_l, b_l)
        The gates $g_{c|m}(x_n)$ of every node of level $l$; they sum to 1 over the last axis.
    """

    paths: Any
    nodes: tuple
    gates: tuple


class HMEPosteriors(NamedTuple):
    r"""Upward and downward pass of an HME, from [`hme_posteriors`][moeref.hierarchical_moe.hme_posteriors].

    Attributes
    ----------
    log_likelihood : array, shape (N,)
        $\log P(y_n \mid x_n)$.
    paths : array, shape (N, L)
        Joint path posteriors $h_p = \pi_p P_p(y) / P(y)$; rows sum to 1.
    nodes : tuple of D + 1 arrays, entry ``l`` of shape (N, M_l)
        Node posteriors $h_m$ (the probability that the path passes through node $m$ given
        $x$ and $y$), levels $0$ (root, all ones) to $D$ (leaves, equal to ``paths``).
    conditionals : tuple of D arrays, entry ``l`` of shape (N, M_l, b_l)
        Conditional posteriors $h_{c|m} = g_{c|m} \lambda_{mc} / \lambda_m$; they sum to 1
        over the last axis.
    log_node_likelihoods : tuple of D + 1 arrays, entry ``l`` of shape (N, M_l)
        The upward pass $\log \lambda_m$: the log-likelihood of $y$ under the subtree rooted at
        node $m$. Level $D$ holds the leaf log-densities, level 0 the log-likelihood.
    """

    log_likelihood: Any
    paths: Any
    nodes: tuple
    conditionals: tuple
    log_node_likelihoods: tuple


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_levels(params: Any, p: str = "params") -> tuple[tuple, tuple]:
    """The per-level gate arrays as tuples, after checking that they pair up (``p``: the record's name)."""
    if not isinstance(params, tuple) or not all(hasattr(params, f) for f in ("gate_weights", "gate_biases", "experts")):
        raise TypeError(f"{p} must be an HMEParams(gate_weights, gate_biases, experts), got {type(params).__name__}")
    weights, biases = params.gate_weights, params.gate_biases
    for name, levels in ((f"{p}.gate_weights", weights), (f"{p}.gate_biases", biases)):
        if not isinstance(levels, (tuple, list)):
            raise TypeError(f"{name} must be a tuple of arrays, one per tree level, got {type(levels).__name__}")
    if len(weights) == 0:
        raise ValueError(f"{p}.gate_weights must hold at least one level (a tree of depth D >= 1), got none")
    if len(biases) != len(weights):
        raise ValueError(
            f"{p}.gate_biases has {len(biases)} levels but {p}.gate_weights has {len(weights)}; "
            "there must be one bias array per gate level"
        )
    return tuple(weights), tuple(biases)


def _check_tree(params: HMEParams, d_in: int | None, p: str = "params") -> tuple[int, ...]:
    """Check every gate and expert shape against the tree they describe; return the branching."""
    weights, biases = _check_levels(params, p)
    if d_in is None:
        check_float_array(weights[0], f"{p}.gate_weights[0]", ndim=3)
        d_in = weights[0].shape[1]
    branching: list[int] = []
    nodes = 1  # M_l
    for l, (w, b) in enumerate(zip(weights, biases)):
        check_float_array(w, f"{p}.gate_weights[{l}]", ndim=3)
        width = w.shape[2]
        if width < 1:
            raise ValueError(f"{p}.gate_weights[{l}] has shape {tuple(w.shape)}: level {l} needs at least one child per node")
        above = "the root" if l == 0 else f"the product of the branching factors {tuple(branching)} above it"
        check_shape(
            w, f"{p}.gate_weights[{l}]", (nodes, d_in, width),
            what=f"level {l} has M_{l} = {nodes} nodes ({above}) and the input has d_in={d_in} features",
        )
        check_float_array(b, f"{p}.gate_biases[{l}]", ndim=2)
        check_shape(b, f"{p}.gate_biases[{l}]", (nodes, width), what=f"{p}.gate_weights[{l}] has shape {tuple(w.shape)}")
        branching.append(width)
        nodes *= width
    experts = params.experts
    if not isinstance(experts, tuple) or not all(hasattr(experts, f) for f in ("weight", "bias")):
        raise TypeError(f"{p}.experts must be a LinearExpertsParams(weight, bias), got {type(experts).__name__}")
    check_float_array(experts.weight, f"{p}.experts.weight", ndim=3)
    d_out = experts.weight.shape[2]
    check_shape(
        experts.weight, f"{p}.experts.weight", (nodes, d_in, d_out),
        what=f"one expert per leaf: branching {tuple(branching)} has {nodes} leaves, and d_in={d_in}",
    )
    check_float_array(experts.bias, f"{p}.experts.bias", ndim=2)
    check_shape(experts.bias, f"{p}.experts.bias", (nodes, d_out), what=f"{nodes} leaves with d_out={d_out}")
    return tuple(branching)


def _check_no_nan_or_pos_inf(x: Any, name: str, xp: Any) -> None:
    ok = xp.all(x < math.inf)  # False for NaN and +inf, True for finite values and -inf
    if concrete_bool(ok) is False:
        raise ValueError(f"{name} contains NaN or +inf; gate biases must be finite or -inf (a removed child)")


def _check_hme(
    x: Any, params: HMEParams, y: Any = None, variance: Any = None, *, with_y: bool = False, name: str = "params"
) -> tuple[Any, tuple[int, ...]]:
    """Validate the arguments of every public function (``y`` only ``with_y``; ``name``: the record's
    argument name); return ``(xp, branching)``."""
    p = name
    check_array(x, "x")
    if with_y:
        check_array(y, "y")
    weights, biases = _check_levels(params, p)
    experts = params.experts
    arrays = [x, y if with_y else None, *weights, *biases, getattr(experts, "weight", None), getattr(experts, "bias", None)]
    names = (
        ["x", "y"]
        + [f"{p}.gate_weights[{l}]" for l in range(len(weights))]
        + [f"{p}.gate_biases[{l}]" for l in range(len(biases))]
        + [f"{p}.experts.weight", f"{p}.experts.bias"]
    )
    xp = array_namespace(*arrays, names=tuple(names))
    check_float_array(x, "x", ndim=2)
    branching = _check_tree(params, x.shape[1], p)
    d_out = experts.weight.shape[2]
    if with_y:
        check_float_array(y, "y", ndim=2)
        check_shape(y, "y", (x.shape[0], d_out), what=f"x has N={x.shape[0]} rows and the experts have d_out={d_out}")
    check_same_dtype({n: a for n, a in zip(names, arrays) if a is not None})
    for n, a in zip(names, arrays):
        if a is None:
            continue
        if n.startswith(f"{p}.gate_biases"):
            _check_no_nan_or_pos_inf(a, n, xp)
        else:
            check_finite(a, n)
    if variance is not None:
        if isinstance(variance, bool) or not isinstance(variance, (int, float)):
            raise TypeError(f"variance must be a positive Python number, got {type(variance).__name__} {variance!r}")
        if not (math.isfinite(variance) and variance > 0):
            raise ValueError(f"variance must be positive and finite, got {variance!r}")
    return xp, branching


def hme_branching(params: HMEParams) -> tuple[int, ...]:
    r"""The branching factors $(b_0, \dots, b_{D-1})$ that ``params`` describes, after checking it.

    Raises a `ValueError` naming the offending array when the gate levels, the node counts
    $M_l = b_0 \cdots b_{l-1}$ or the number of experts $L = b_0 \cdots b_{D-1}$ do not fit together.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams, hme_branching
    >>> p = HMEParams((np.zeros((1, 4, 2)), np.zeros((2, 4, 3))), (np.zeros((1, 2)), np.zeros((2, 3))),
    ...               LinearExpertsParams(np.zeros((6, 4, 1)), np.zeros((6, 1))))
    >>> hme_branching(p)
    (2, 3)
    """
    _check_levels(params)
    return _check_tree(params, None)


# --------------------------------------------------------------------------------------------
# Shared pieces: log-gates, log-priors, the upward pass, and the one log-prior VJP
# --------------------------------------------------------------------------------------------


def _log_gates(x: Any, params: HMEParams, xp: Any) -> list:
    """``log g`` of every level, entry ``l`` of shape (N, M_l, b_l)."""
    out = []
    for w, b in zip(params.gate_weights, params.gate_biases):
        logits = xp.matmul(x[None, :, :], w) + b[:, None, :]  # (M_l, N, b_l)
        out.append(log_softmax(xp.permute_dims(logits, (1, 0, 2)), axis=-1))  # (N, M_l, b_l)
    return out


def _log_node_priors(log_gates: list, x: Any, xp: Any) -> list:
    """Log-priors of the nodes of levels 0..D (sums of log-gates from the root), (N, M_l) each."""
    n = x.shape[0]
    current = xp.zeros((n, 1), dtype=x.dtype, device=device_of(x))  # (N, M_0 = 1): the root
    out = [current]
    for lg in log_gates:
        m, width = lg.shape[1], lg.shape[2]
        current = xp.reshape(current[:, :, None] + lg, (n, m * width))  # (N, M_{l+1})
        out.append(current)
    return out


def _leaf_log_density(y: Any, mu: Any, variance: float, xp: Any) -> Any:
    r"""$\log \mathcal N(y_n \mid \mu_{np}, \sigma^2 I)$ with its normalising constant, (N, L)."""
    d_out = y.shape[1]
    diff = y[:, None, :] - mu  # (N, L, d_out)
    return -0.5 * xp.sum(diff * diff, axis=-1) / variance - 0.5 * d_out * math.log(2.0 * math.pi * variance)


def _safe_log_normaliser(log_z: Any, xp: Any) -> Any:
    """``log_z`` with -inf replaced by 0, so that ``log_q - log_z`` never forms ``-inf - -inf``."""
    return xp.where(xp.isfinite(log_z), log_z, xp.zeros_like(log_z))


def _upward_pass(log_gates: list, leaf_log_density: Any, xp: Any) -> list:
    r"""$\log\lambda$ of levels 0..D: $\log\lambda_m = \operatorname{lse}_c(\log g_{c|m} + \log\lambda_{mc})$."""
    n = leaf_log_density.shape[0]
    current = leaf_log_density  # (N, M_D = L)
    out = [current]
    for lg in reversed(log_gates):
        m, width = lg.shape[1], lg.shape[2]
        current = logsumexp(lg + xp.reshape(current, (n, m, width)), axis=-1)  # (N, M_l)
        out.append(current)
    return out[::-1]


def _log_prior_vjp(x: Any, params: HMEParams, log_gates: list, path_cotangent: Any, xp: Any) -> tuple[Any, tuple, tuple]:
    r"""Pull a cotangent $a_p$ of the path log-priors $\log\pi_p$ back to the gate parameters and $x$.

    The log-gate $\log g_{c|m}$ of node $m$ of level $l$ enters the log-prior of every path through
    child $c$, so its cotangent is $A_{mc} = \sum_{p \ni (m, c)} a_p$, and through the log-softmax
    the gate logit gets $\bar u_{mc} = A_{mc} - g_{c|m} A_m$ with $A_m = \sum_c A_{mc}$ (the sum
    over the paths through $m$). $A$ of level $l$ is the sum of $A$ of level $l + 1$ over the
    children, so one sweep from the leaves to the root gives every level.

    Returns ``(x_bar, gate_weight_bars, gate_bias_bars)``.
    """
    n = x.shape[0]
    acc = path_cotangent  # (N, M_D): A at the leaves
    x_bar = xp.zeros(x.shape, dtype=x.dtype, device=device_of(x))  # (N, d_in)
    w_bars: list = [None] * len(log_gates)
    b_bars: list = [None] * len(log_gates)
    x_t = xp.matrix_transpose(x)[None, :, :]  # (1, d_in, N)
    for l in reversed(range(len(log_gates))):
        lg = log_gates[l]
        m, width = lg.shape[1], lg.shape[2]
        a_child = xp.reshape(acc, (n, m, width))  # (N, M_l, b_l): A_{mc}
        u_bar = _log_softmax_vjp(xp.exp(lg), a_child, -1, xp)  # (N, M_l, b_l): A_{mc} - g_{c|m} A_m
        u_t = xp.permute_dims(u_bar, (1, 0, 2))  # (M_l, N, b_l)
        w_bars[l] = xp.matmul(x_t, u_t)  # (M_l, d_in, b_l)
        b_bars[l] = xp.sum(u_bar, axis=0)  # (M_l, b_l)
        x_bar = x_bar + xp.sum(xp.matmul(u_t, xp.matrix_transpose(params.gate_weights[l])), axis=0)  # (N, d_in)
        acc = xp.sum(a_child, axis=-1)  # (N, M_l): A_m
    return x_bar, tuple(w_bars), tuple(b_bars)


def _grads_record(params: HMEParams, w_bars: tuple, b_bars: tuple, experts_bar: LinearExpertsParams) -> HMEParams:
    """Gate cotangents in the container type of ``params`` (tuple or list)."""
    kind = type(params.gate_weights) if isinstance(params.gate_weights, (tuple, list)) else tuple
    return HMEParams(gate_weights=kind(w_bars), gate_biases=kind(b_bars), experts=experts_bar)


# --------------------------------------------------------------------------------------------
# Mean output
# --------------------------------------------------------------------------------------------


def hme(x: Any, params: HMEParams) -> Any:
    r"""Mean output of a hierarchical mixture of experts.

    $$\mu(x) = \sum_{c_0} g_{c_0}(x) \sum_{c_1} g_{c_1 | c_0}(x) \cdots \sum_{c_{D-1}}
    g_{c_{D-1} | c_0 \dots c_{D-2}}(x)\; \mu_{c_0 \dots c_{D-1}}(x)
    = \sum_p \pi_p(x)\, \mu_p(x) ,$$

    with linear-softmax gates $g_{c|m}(x) = \operatorname{softmax}_c(x^\top V_{l,m} + \beta_{l,m})$
    and linear experts $\mu_p(x) = A_p x + c_p$. For $D = 2$ this is the two-level architecture of
    Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the EM Algorithm", *Neural
    Computation* 6(2):181-214, doi:10.1162/neco.1994.6.2.181, section 2 (experts $\mu_{ij}$ as in
    their eq. (2.1), blended as $\mu_i = \sum_j g_{j|i}\mu_{ij}$ and $\mu = \sum_i g_i \mu_i$),
    extended to any depth by the same recursion.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : HMEParams
        Branching $(b_0, \dots, b_{D-1})$ is read from the gate shapes.

    Returns
    -------
    array, shape (N, d_out)

    Notes
    -----
    The path priors are $\exp$ of summed log-softmax gates (never a product of underflowed
    probabilities). The mean does not depend on the output variance. Permuting the children of a
    node together with their subtrees leaves the output unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams, hme
    >>> p = HMEParams((np.zeros((1, 1, 2)), np.zeros((2, 1, 2))), (np.zeros((1, 2)), np.zeros((2, 2))),
    ...               LinearExpertsParams(np.zeros((4, 1, 1)), np.array([[1.0], [2.0], [3.0], [6.0]])))
    >>> hme(np.ones((1, 1)), p).tolist()  # uniform gates: the average of the four experts
    [[3.0]]
    """
    xp, _ = _check_hme(x, params)
    log_prior = _log_node_priors(_log_gates(x, params, xp), x, xp)[-1]  # (N, L)
    mu = _linear_experts(x, params.experts, xp)  # (N, L, d_out)
    return _mixture(xp.exp(log_prior), mu, xp)  # (N, d_out)


def hme_vjp(x: Any, params: HMEParams, cotangent: Any) -> HMEGrads:
    r"""VJP of [`hme`][moeref.hierarchical_moe.hme].

    With $\bar\mu_n$ the cotangent of the output row, each path log-prior gets
    $a_{np} = \pi_{np} \langle \bar\mu_n, \mu_{np} \rangle$ (since $\partial\pi_p / \partial\log\pi_p
    = \pi_p$), each expert output gets $\bar\mu_{np} = \pi_{np} \bar\mu_n$, and the gate logits of node
    $m$ get

    $$\bar u_{mc} = A_{mc} - g_{c|m} A_m, \qquad A_{mc} = \sum_{p \text{ through } (m, c)} a_p,
    \quad A_m = \sum_c A_{mc},$$

    chained to $\bar V_{l,m} = \sum_n x_n \bar u_{n,mc}$, $\bar\beta_{l,m} = \sum_n \bar u_{n,m}$; the
    expert cotangent is chained through [`linear_experts_vjp`][moeref.experts.linear_experts_vjp].
    $\bar x$ sums the contributions of every gate level and of the experts.

    Parameters
    ----------
    x, params
        As in the forward.
    cotangent : array, shape (N, d_out)

    Returns
    -------
    HMEGrads
        ``x`` of shape (N, d_in) and ``params`` an `HMEParams` of cotangents shaped like ``params``.
    """
    xp, _ = _check_hme(x, params)
    check_cotangent(cotangent, (x.shape[0], params.experts.weight.shape[2]), like=x, what="one row per input, like the output")
    log_gates = _log_gates(x, params, xp)
    prior = xp.exp(_log_node_priors(log_gates, x, xp)[-1])  # (N, L)
    mu = _linear_experts(x, params.experts, xp)  # (N, L, d_out)
    mix = _mixture_vjp(prior, mu, cotangent, xp)  # gates: <mu_bar, mu_p> (N, L); expert_outputs: pi_p mu_bar (N, L, d_out)
    x_bar, w_bars, b_bars = _log_prior_vjp(x, params, log_gates, prior * mix.gates, xp)
    experts = _linear_experts_vjp(x, params.experts, mix.expert_outputs, xp)
    return HMEGrads(x=x_bar + experts.x, params=_grads_record(params, w_bars, b_bars, experts.params))


# --------------------------------------------------------------------------------------------
# Log-likelihood
# --------------------------------------------------------------------------------------------


def _log_joint(x: Any, y: Any, params: HMEParams, variance: float, xp: Any) -> tuple[list, list, Any, Any]:
    """``(log_gates, log_node_priors, leaf_log_density, mu)`` of one forward pass."""
    log_gates = _log_gates(x, params, xp)
    log_priors = _log_node_priors(log_gates, x, xp)
    mu = _linear_experts(x, params.experts, xp)  # (N, L, d_out)
    return log_gates, log_priors, _leaf_log_density(y, mu, variance, xp), mu


def hme_log_likelihood(x: Any, y: Any, params: HMEParams, *, variance: float = 1.0) -> Any:
    r"""Per-sample log-likelihood of a hierarchical mixture of linear-Gaussian experts.

    $$\log P(y \mid x) = \log \sum_p \exp\Big( \underbrace{\textstyle\sum_{l} \log g_{c_l | m_l}(x)}_{\log \pi_p(x)}
    + \log \mathcal N\big(y \mid \mu_p(x), \sigma^2 I\big) \Big),$$

    $$\log \mathcal N(y \mid \mu, \sigma^2 I) = -\frac{\lVert y - \mu \rVert^2}{2\sigma^2}
    - \frac{d_{out}}{2} \log(2\pi\sigma^2) .$$

    The probability model of Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the
    EM Algorithm", *Neural Computation* 6(2):181-214, doi:10.1162/neco.1994.6.2.181, section 2
    (the mixture $P(y \mid x) = \sum_i g_i \sum_j g_{j|i} P_{ij}(y)$; summed over the data it is
    the log-likelihood $l(\theta; \mathcal X)$ whose gradients are their eqs. (2.14)-(2.16)), with
    Gaussian experts of fixed isotropic variance $\sigma^2$, for any depth.

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    params : HMEParams
    variance : float, keyword-only
        $\sigma^2 > 0$, shared by every expert and output feature (not a parameter; default 1).

    Returns
    -------
    array, shape (N,)

    Notes
    -----
    The Gaussian normalising constant $-\tfrac{d_{out}}{2}\log(2\pi\sigma^2)$ is included, so the
    result is a true log-density of $y$. Computed entirely in log space: log-softmax gates, summed
    log-priors, log-densities and a stable log-sum-exp over the $L$ paths; a removed child
    ($-\infty$ gate bias) contributes exactly nothing.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams, hme_log_likelihood
    >>> p = HMEParams((np.zeros((1, 1, 2)),), (np.zeros((1, 2)),),
    ...               LinearExpertsParams(np.zeros((2, 1, 1)), np.zeros((2, 1))))
    >>> bool(np.isclose(hme_log_likelihood(np.ones((1, 1)), np.zeros((1, 1)), p)[0], -0.5 * np.log(2 * np.pi)))
    True
    """
    xp, _ = _check_hme(x, params, y, variance, with_y=True)
    _, log_priors, leaf, _ = _log_joint(x, y, params, variance, xp)
    return logsumexp(log_priors[-1] + leaf, axis=-1)  # (N,)


def hme_log_likelihood_vjp(
    x: Any, y: Any, params: HMEParams, cotangent: Any, *, variance: float = 1.0
) -> HMELogLikelihoodGrads:
    r"""VJP of [`hme_log_likelihood`][moeref.hierarchical_moe.hme_log_likelihood]: the gradients of Jordan & Jacobs.

    With $\bar\ell_n$ the cotangent of sample $n$ and $h_{np}$ the joint path posteriors
    (see [`hme_posteriors`][moeref.hierarchical_moe.hme_posteriors]), the path log-priors get
    $a_{np} = \bar\ell_n h_{np}$; summed under child $c$ of node $m$ that is $\bar\ell\, h_{mc}$
    (the node posterior), so the gate logits get

    $$\bar u_{mc} = \bar\ell\,\big(h_{mc} - g_{c|m} h_m\big) = \bar\ell\, h_m \big(h_{c|m} - g_{c|m}\big),$$

    and the experts get

    $$\bar\mu_p = \bar\ell\, h_p\, \frac{y - \mu_p}{\sigma^2}, \qquad
    \bar A_p = \sum_n \bar\mu_{np} x_n^\top, \quad \bar c_p = \sum_n \bar\mu_{np}, \qquad
    \bar y = -\sum_p \bar\mu_p .$$

    For $D = 2$ and $\bar\ell = 1$ these are eqs. (2.14)-(2.16) of Jordan & Jacobs (1994),
    doi:10.1162/neco.1994.6.2.181: $\partial l / \partial\theta_{ij} = \sum_t h_i h_{j|i}(y - \mu_{ij})x^\top$
    (here divided by $\sigma^2$), $\partial l / \partial v_i = \sum_t (h_i - g_i) x$ and
    $\partial l / \partial v_{ij} = \sum_t h_i (h_{j|i} - g_{j|i}) x$. The gate part shares one
    routine with [`hme_vjp`][moeref.hierarchical_moe.hme_vjp].

    Parameters
    ----------
    x, y, params, variance
        As in the forward.
    cotangent : array, shape (N,)

    Returns
    -------
    HMELogLikelihoodGrads
        ``x`` (N, d_in), ``y`` (N, d_out), ``params`` an `HMEParams` shaped like ``params``.
    """
    xp, _ = _check_hme(x, params, y, variance, with_y=True)
    check_cotangent(cotangent, (x.shape[0],), like=x, what="one entry per input, like the log-likelihood")
    log_gates, log_priors, leaf, mu = _log_joint(x, y, params, variance, xp)
    log_joint = log_priors[-1] + leaf  # (N, L)
    ll = logsumexp(log_joint, axis=-1, keepdims=True)  # (N, 1)
    weight = cotangent[:, None] * xp.exp(log_joint - _safe_log_normaliser(ll, xp))  # (N, L): ell_bar h_p
    mu_bar = weight[:, :, None] * (y[:, None, :] - mu) / variance  # (N, L, d_out)
    x_bar, w_bars, b_bars = _log_prior_vjp(x, params, log_gates, weight, xp)
    experts = _linear_experts_vjp(x, params.experts, mu_bar, xp)
    return HMELogLikelihoodGrads(
        x=x_bar + experts.x,
        y=-xp.sum(mu_bar, axis=1),  # (N, d_out)
        params=_grads_record(params, w_bars, b_bars, experts.params),
    )


# --------------------------------------------------------------------------------------------
# Priors and posteriors (the E-step quantities)
# --------------------------------------------------------------------------------------------


def hme_priors(x: Any, params: HMEParams) -> HMEPriors:
    r"""Gates, node priors and path priors of an HME (the quantities that depend on $x$ only).

    $$\pi_{m'}(x) = \pi_m(x)\, g_{c|m}(x) \quad (m' = \text{child } c \text{ of } m), \qquad \pi_{\text{root}} = 1 ,$$

    the prior probability of reaching each node: the products $g_i$, $g_i g_{j|i}$ of Jordan &
    Jacobs (1994), "Hierarchical Mixtures of Experts and the EM Algorithm", *Neural Computation*
    6(2):181-214, doi:10.1162/neco.1994.6.2.181, section 2.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : HMEParams

    Returns
    -------
    HMEPriors
        ``paths`` (N, L), ``nodes`` (D + 1 arrays (N, M_l)), ``gates`` (D arrays (N, M_l, b_l)).

    Notes
    -----
    Computed as $\exp$ of summed log-gates. Not differentiated here (no VJP): it is a diagnostic
    of the forward pass; differentiate [`hme`][moeref.hierarchical_moe.hme] or
    [`hme_log_likelihood`][moeref.hierarchical_moe.hme_log_likelihood] instead.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams, hme_priors
    >>> p = HMEParams((np.zeros((1, 1, 2)), np.zeros((2, 1, 2))), (np.zeros((1, 2)), np.zeros((2, 2))),
    ...               LinearExpertsParams(np.zeros((4, 1, 1)), np.zeros((4, 1))))
    >>> hme_priors(np.ones((1, 1)), p).paths.tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    """
    xp, _ = _check_hme(x, params)
    log_gates = _log_gates(x, params, xp)
    nodes = tuple(xp.exp(lp) for lp in _log_node_priors(log_gates, x, xp))  # (N, M_l) per level
    return HMEPriors(paths=nodes[-1], nodes=nodes, gates=tuple(xp.exp(lg) for lg in log_gates))


def hme_posteriors(x: Any, y: Any, params: HMEParams, *, variance: float = 1.0) -> HMEPosteriors:
    r"""Upward and downward pass of an HME: node likelihoods and the posteriors of every node.

    Upward pass (leaves to root), with $\lambda_p = \mathcal N(y \mid \mu_p(x), \sigma^2 I)$ at the leaves:

    $$\log\lambda_m = \log\sum_c \exp\big(\log g_{c|m} + \log\lambda_{mc}\big), \qquad
    \lambda_{\text{root}} = P(y \mid x) .$$

    Conditional posteriors and the downward pass (root to leaves), $h_{\text{root}} = 1$:

    $$h_{c|m} = \frac{g_{c|m}\,\lambda_{mc}}{\lambda_m}, \qquad h_{mc} = h_m\, h_{c|m}
    = \frac{\pi_{mc}\,\lambda_{mc}}{P(y \mid x)} .$$

    For $D = 2$ these are the posterior probabilities $h_i$, $h_{j|i}$ and $h_{ij} = h_i h_{j|i}$ of
    Jordan & Jacobs (1994), "Hierarchical Mixtures of Experts and the EM Algorithm", *Neural
    Computation* 6(2):181-214, doi:10.1162/neco.1994.6.2.181, section 2 (the quantities in their
    gradients, eqs. (2.14)-(2.16)); they are the E-step of their EM algorithm (Algorithm 1; the
    M-step is not implemented here).

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    params : HMEParams
    variance : float, keyword-only
        $\sigma^2 > 0$ (default 1).

    Returns
    -------
    HMEPosteriors

    Notes
    -----
    Every ratio is a difference of logs ($h_{c|m} = \exp(\log g_{c|m} + \log\lambda_{mc} -
    \log\lambda_m)$, $h_m = \exp(\log\pi_m + \log\lambda_m - \log P(y))$), so the conditional
    posteriors of a node are accurate even where its own posterior underflows. A node whose
    children are all removed ($-\infty$ biases) has $\lambda_m = 0$ and conditional posteriors 0.
    The node posteriors at each level sum to 1, the conditional posteriors sum to 1 per node, and
    the node posteriors equal the sums of the path posteriors below them. No VJP (a diagnostic).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.hierarchical_moe import HMEParams, hme_posteriors
    >>> p = HMEParams((np.zeros((1, 1, 2)),), (np.zeros((1, 2)),),
    ...               LinearExpertsParams(np.zeros((2, 1, 1)), np.array([[0.0], [100.0]])))
    >>> hme_posteriors(np.ones((1, 1)), np.zeros((1, 1)), p).paths.tolist()  # y = 0 is explained by expert 0
    [[1.0, 0.0]]
    """
    xp, _ = _check_hme(x, params, y, variance, with_y=True)
    return _posteriors(x, y, params, variance, xp)


def _posteriors(x: Any, y: Any, params: HMEParams, variance: float, xp: Any) -> HMEPosteriors:
    """[`hme_posteriors`][moeref.hierarchical_moe.hme_posteriors] without argument checks (EM loops)."""
    log_gates, log_priors, leaf, _ = _log_joint(x, y, params, variance, xp)
    log_lambda = _upward_pass(log_gates, leaf, xp)  # levels 0..D, (N, M_l)
    ll = log_lambda[0][:, 0]  # (N,): the root's likelihood, so that h_root = 1 exactly
    safe_ll = _safe_log_normaliser(ll, xp)[:, None]  # (N, 1)
    nodes = tuple(xp.exp(lp + lam - safe_ll) for lp, lam in zip(log_priors, log_lambda))  # (N, M_l) per level
    n = x.shape[0]
    conditionals = []
    for l, lg in enumerate(log_gates):
        m, width = lg.shape[1], lg.shape[2]
        child = xp.reshape(log_lambda[l + 1], (n, m, width))  # (N, M_l, b_l)
        parent = _safe_log_normaliser(log_lambda[l], xp)[:, :, None]  # (N, M_l, 1)
        conditionals.append(xp.exp(lg + child - parent))  # (N, M_l, b_l)
    return HMEPosteriors(
        log_likelihood=ll,
        paths=nodes[-1],
        nodes=nodes,
        conditionals=tuple(conditionals),
        log_node_likelihoods=tuple(log_lambda),
    )

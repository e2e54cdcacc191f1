r"""Adaptive mixtures of local experts: the Gaussian mixture-of-experts likelihood.

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", Neural
Computation 3(1):79-87, doi:10.1162/neco.1991.3.1.79.

Each expert $i$ predicts a Gaussian $y \sim \mathcal N(\mu_i(x), \sigma^2 I)$ and a
linear-softmax gate chooses between them with probabilities $w_i(x)$. The experts compete for
each training case: the gradient of the log-likelihood moves expert $i$ towards $y$ in proportion
to its posterior responsibility $h_i$, and moves the gate logits by $h_i - w_i$. Two expert
families are provided:

* [`LocalExpertsParams`][moeref.local_experts.LocalExpertsParams]: constant means
  $\mu_i(x) = \mu_i$ (the experts only learn *what* to output; the gate learns *where*);
* [`LinearLocalExpertsParams`][moeref.local_experts.LinearLocalExpertsParams]: affine means
  $\mu_i(x) = A_i x + c_i$ (the linear experts of [`moeref.experts`][moeref.experts]).

Every function accepts either record and dispatches on its type; gradients of a record come back
as a record of the same type.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

from .core import _tree_add_scaled, device_of, log_softmax, logsumexp, softmax
from .experts import LinearExpertsParams, _linear_experts, _linear_experts_vjp
from .gates import LinearSoftmaxGateParams, _gate_vjp, _logits
from .mixture import _mixture, _mixture_vjp
from .validation import (
    check_array,
    check_arrays,
    check_cotangent,
    check_experts_params,
    check_float_array,
    check_gate_params,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_shape,
)

__all__ = [
    "LocalExpertsParams",
    "LinearLocalExpertsParams",
    "LocalExpertsLogLikelihoodGrads",
    "LocalExpertsPredictGrads",
    "LocalExpertsFit",
    "local_experts_means",
    "local_experts_log_likelihood",
    "local_experts_log_likelihood_vjp",
    "local_experts_posteriors",
    "local_experts_predict",
    "local_experts_predict_vjp",
    "fit_local_experts",
]


class LocalExpertsParams(NamedTuple):
    r"""Local experts with **constant** means $\mu_i$ and a linear-softmax gate.

    Attributes
    ----------
    gate : LinearSoftmaxGateParams
        ``weight`` of shape (d_in, n) and ``bias`` of shape (n,): one gate output per expert.
    means : array, shape (n, d_out)
        Row ``i`` is $\mu_i$, the output of expert ``i`` whatever the input.
    """

    gate: LinearSoftmaxGateParams
    means: Any


class LinearLocalExpertsParams(NamedTuple):
    r"""Local experts with **affine** means $\mu_i(x) = A_i x + c_i$ and a linear-softmax gate.

    Attributes
    ----------
    gate : LinearSoftmaxGateParams
        ``weight`` of shape (d_in, n) and ``bias`` of shape (n,).
    experts : LinearExpertsParams
        ``weight`` of shape (n, d_in, d_out) (``weight[i]`` is $A_i^\top$) and ``bias`` of shape
        (n, d_out).
    """

    gate: LinearSoftmaxGateParams
    experts: LinearExpertsParams


AnyLocalExpertsParams = Union[LocalExpertsParams, LinearLocalExpertsParams]


class LocalExpertsLogLikelihoodGrads(NamedTuple):
    """Cotangents of [`local_experts_log_likelihood`][moeref.local_experts.local_experts_log_likelihood]'s inputs.

    ``params`` has the type of the record that was passed in.
    """

    x: Any
    y: Any
    params: AnyLocalExpertsParams


class LocalExpertsPredictGrads(NamedTuple):
    """Cotangents of [`local_experts_predict`][moeref.local_experts.local_experts_predict]'s inputs."""

    x: Any
    params: AnyLocalExpertsParams


class LocalExpertsFit(NamedTuple):
    """Result of [`fit_local_experts`][moeref.local_experts.fit_local_experts].

    Attributes
    ----------
    params : LocalExpertsParams or LinearLocalExpertsParams
        The parameters after the last step (same record type as the initial ones).
    log_likelihood : array, shape (steps + 1,)
        Mean per-sample log-likelihood after 0, 1, ..., ``steps`` updates.
    """

    params: AnyLocalExpertsParams
    log_likelihood: Any


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_local_experts(x: Any, y: Any, params: Any, *, with_y: bool = False, name: str = "params") -> Any:
    """Validate ``(x, y, params)`` (``y`` only ``with_y``; ``name``: the record's argument name). Returns the namespace."""
    check_record_type(params, name, (LocalExpertsParams, LinearLocalExpertsParams))
    check_record_type(params.gate, f"{name}.gate", LinearSoftmaxGateParams)
    check_array(x, "x")
    if with_y:
        check_array(y, "y")
    named = {"x": x, "y": y if with_y else None, f"{name}.gate.weight": params.gate.weight, f"{name}.gate.bias": params.gate.bias}
    if isinstance(params, LocalExpertsParams):
        named[f"{name}.means"] = params.means
    else:
        check_record_type(params.experts, f"{name}.experts", LinearExpertsParams)
        named[f"{name}.experts.weight"] = params.experts.weight
        named[f"{name}.experts.bias"] = params.experts.bias
    # a -inf gate bias switches an expert off, as in moeref.gates
    xp = check_arrays(named, neg_inf_ok=(f"{name}.gate.bias",))
    check_float_array(x, "x", ndim=2)
    N, d_in = x.shape
    n = check_gate_params(params.gate.weight, params.gate.bias, d_in, name=f"{name}.gate")
    if isinstance(params, LocalExpertsParams):
        check_float_array(params.means, f"{name}.means", ndim=2)
        check_shape(params.means, f"{name}.means", (n, None), what=f"the gate has n={n} outputs, one per expert")
        d_out = params.means.shape[1]
    else:
        _, d_out = check_experts_params(params.experts.weight, params.experts.bias, d_in, n=n, name=f"{name}.experts")
    if with_y:
        check_float_array(y, "y", ndim=2)
        check_shape(y, "y", (N, d_out), what=f"x has N={N} rows and the experts have d_out={d_out} outputs")
    return xp


# --------------------------------------------------------------------------------------------
# Forward pieces (no checks)
# --------------------------------------------------------------------------------------------


def _expert_means(x: Any, params: AnyLocalExpertsParams, xp: Any) -> Any:
    """$\\mu_i(x_n)$ stacked as (N, n, d_out)."""
    if isinstance(params, LocalExpertsParams):
        n, d_out = params.means.shape
        return xp.broadcast_to(params.means[None, :, :], (x.shape[0], n, d_out))  # (N, n, d_out)
    return _linear_experts(x, params.experts, xp)  # (N, n, d_out)


def _log_joint(x: Any, y: Any, params: AnyLocalExpertsParams, variance: float, xp: Any) -> tuple[Any, Any, Any]:
    """``(log w, y - mu, log w + log N(y | mu, variance I))``."""
    log_w = log_softmax(_logits(x, params.gate, xp), axis=-1)  # (N, n)
    resid = y[:, None, :] - _expert_means(x, params, xp)  # (N, n, d_out)
    d_out = y.shape[1]
    log_norm = -0.5 * d_out * math.log(2.0 * math.pi * variance)
    log_pdf = -0.5 * xp.sum(resid * resid, axis=2) / variance + log_norm  # (N, n)
    return log_w, resid, log_w + log_pdf


def _value_and_vjp(
    x: Any, y: Any, params: AnyLocalExpertsParams, cotangent: Any, variance: float, xp: Any
) -> tuple[Any, LocalExpertsLogLikelihoodGrads]:
    log_w, resid, log_joint = _log_joint(x, y, params, variance, xp)
    ll = logsumexp(log_joint, axis=1)  # (N,)
    h = softmax(log_joint, axis=1)  # (N, n) posteriors
    w = xp.exp(log_w)  # (N, n) gate
    # d ll_n / d mu_i = h_ni (y_n - mu_i) / variance                       eq. (1.5), sign flipped
    mu_bar = (cotangent[:, None] * h)[:, :, None] * resid / variance  # (N, n, d_out)
    y_bar = -xp.sum(mu_bar, axis=1)  # (N, d_out)
    # d ll_n / d u_i = h_ni - w_ni  (u: gate logits)
    u_bar = cotangent[:, None] * (h - w)  # (N, n)
    gw = params.gate.weight
    gate_bar = LinearSoftmaxGateParams(
        weight=xp.matmul(xp.matrix_transpose(x), u_bar),  # (d_in, n)
        bias=xp.sum(u_bar, axis=0),  # (n,)
    )
    x_bar = xp.matmul(u_bar, xp.matrix_transpose(gw))  # (N, d_in)
    if isinstance(params, LocalExpertsParams):
        p_bar: AnyLocalExpertsParams = LocalExpertsParams(gate=gate_bar, means=xp.sum(mu_bar, axis=0))  # (n, d_out)
    else:
        e = _linear_experts_vjp(x, params.experts, mu_bar, xp)
        x_bar = x_bar + e.x
        p_bar = LinearLocalExpertsParams(gate=gate_bar, experts=e.params)
    return ll, LocalExpertsLogLikelihoodGrads(x=x_bar, y=y_bar, params=p_bar)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def local_experts_means(x: Any, params: AnyLocalExpertsParams) -> Any:
    r"""Every expert's mean prediction on every input.

    $$\mu_i(x_n) = \mu_i \ \text{(constant experts)} \quad\text{or}\quad \mu_i(x_n) = A_i x_n + c_i \ \text{(linear experts)}.$$

    The expert outputs $o_i$ of Jacobs et al. (1991), doi:10.1162/neco.1991.3.1.79.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : LocalExpertsParams or LinearLocalExpertsParams

    Returns
    -------
    array, shape (N, n, d_out)
    """
    xp = _check_local_experts(x, None, params)
    return _expert_means(x, params, xp)


def local_experts_log_likelihood(x: Any, y: Any, params: AnyLocalExpertsParams, *, variance: float = 1.0) -> Any:
    r"""Per-sample log-likelihood of the adaptive mixture of local experts.

    $$\log p(y_n \mid x_n) = \log \sum_{i=1}^{n} w_i(x_n)\, \mathcal N\!\big(y_n;\ \mu_i(x_n),\ \sigma^2 I\big),
    \qquad w_i(x) = \frac{e^{u_i(x)}}{\sum_j e^{u_j(x)}},\quad u_i(x) = k_i^\top x + b_i ,$$

    computed in log space as
    $\operatorname{lse}_i\big(\log w_i - \|y - \mu_i\|^2 / (2\sigma^2) - \tfrac{d}{2}\log(2\pi\sigma^2)\big)$.

    Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive Mixtures of Local Experts", Neural
    Computation 3(1):79-87, doi:10.1162/neco.1991.3.1.79, eq. (1.3): the paper minimises the error
    $E^c = -\log \sum_i p_i^c\, e^{-\frac12 \|d^c - o_i^c\|^2}$ for case $c$ (target $d^c$,
    expert outputs $o_i^c$, gating proportions $p_i^c$). With $\sigma^2 = 1$,

    $$\log p(d^c \mid x^c) = -E^c - \tfrac{d}{2}\log(2\pi),$$

    i.e. this function **includes the Gaussian normalising constant** that eq. (1.3) drops; the
    two differ by that constant only, so their gradients agree.

    Parameters
    ----------
    x : array, shape (N, d_in)
        Inputs (fed to the gate, and to the experts when they are linear).
    y : array, shape (N, d_out)
        Targets ($d^c$ in the paper).
    params : LocalExpertsParams or LinearLocalExpertsParams
        Gate and experts; the gate must have one output per expert.
    variance : float, keyword-only
        The fixed variance $\sigma^2 > 0$ shared by every expert and output dimension
        (1 in the paper).

    Returns
    -------
    array, shape (N,)

    Raises
    ------
    TypeError
        Integer arrays, mixed dtypes or array libraries, a params record of another type.
    ValueError
        Inconsistent shapes (e.g. a gate with a different number of outputs than there are
        experts), non-finite inputs or parameters, a non-positive variance.

    Notes
    -----
    * $\log w_i$ is a log-softmax of the logits, so no $\log 0$ occurs even when a gate
      probability underflows; the sum over experts is a shifted log-sum-exp, so a target far from
      every mean gives a large negative but finite value instead of $\log 0$.
    * Computed in the dtype of the inputs (float64 is the reference).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.local_experts import LocalExpertsParams, local_experts_log_likelihood
    >>> p = LocalExpertsParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), np.array([[0.0], [2.0]]))
    >>> ll = local_experts_log_likelihood(np.zeros((1, 1)), np.array([[0.0]]), p)
    >>> bool(np.isclose(ll[0], np.log(0.5 * (1 + np.exp(-2.0)) / np.sqrt(2 * np.pi))))
    True
    """
    variance = check_positive_float(variance, "variance")
    xp = _check_local_experts(x, y, params, with_y=True)
    _, _, log_joint = _log_joint(x, y, params, variance, xp)
    return logsumexp(log_joint, axis=1)  # (N,)


def local_experts_posteriors(x: Any, y: Any, params: AnyLocalExpertsParams, *, variance: float = 1.0) -> Any:
    r"""Posterior responsibility of each expert for each case.

    $$h_i(x, y) = \frac{w_i(x)\, \mathcal N(y;\ \mu_i(x), \sigma^2 I)}{\sum_j w_j(x)\, \mathcal N(y;\ \mu_j(x), \sigma^2 I)} .$$

    The weighting term of eq. (1.5) in Jacobs et al. (1991), Neural Computation 3(1):79-87,
    doi:10.1162/neco.1991.3.1.79, where it scales each expert's error derivative by how well
    the expert does on the case relative to the others.

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    params : LocalExpertsParams or LinearLocalExpertsParams
    variance : float, keyword-only
        $\sigma^2 > 0$ (default 1).

    Returns
    -------
    array, shape (N, n)
        Rows are probability vectors.

    Notes
    -----
    Computed as a softmax of the log joint $\log w_i + \log\mathcal N_i$, so it stays a
    probability vector when every likelihood underflows. Equal joints give equal posteriors.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.local_experts import LocalExpertsParams, local_experts_posteriors
    >>> p = LocalExpertsParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), np.array([[0.0], [2.0]]))
    >>> local_experts_posteriors(np.zeros((1, 1)), np.array([[1.0]]), p).tolist()
    [[0.5, 0.5]]
    """
    variance = check_positive_float(variance, "variance")
    xp = _check_local_experts(x, y, params, with_y=True)
    _, _, log_joint = _log_joint(x, y, params, variance, xp)
    return softmax(log_joint, axis=1)  # (N, n)


def local_experts_log_likelihood_vjp(
    x: Any, y: Any, params: AnyLocalExpertsParams, cotangent: Any, *, variance: float = 1.0
) -> LocalExpertsLogLikelihoodGrads:
    r"""VJP of [`local_experts_log_likelihood`][moeref.local_experts.local_experts_log_likelihood].

    With $\bar\ell_n$ the cotangent of $\ell_n = \log p(y_n \mid x_n)$, $h$ the posteriors and
    $w$ the gate probabilities:

    $$\frac{\partial \ell_n}{\partial \mu_i(x_n)} = h_{ni}\, \frac{y_n - \mu_i(x_n)}{\sigma^2},
    \qquad \frac{\partial \ell_n}{\partial u_{ni}} = h_{ni} - w_{ni},
    \qquad \frac{\partial \ell_n}{\partial y_n} = -\sum_i h_{ni}\, \frac{y_n - \mu_i(x_n)}{\sigma^2}.$$

    The first is the negative of eq. (1.5) of Jacobs et al. (1991), doi:10.1162/neco.1991.3.1.79
    ($\partial E^c / \partial o_i^c = -h_i (d^c - o_i^c)$ with $\sigma^2 = 1$). The logit
    cotangent $\bar u = \bar\ell\,(h - w)$ is chained through $u = x K + b$:
    $\bar K = x^\top \bar u$, $\bar b = \sum_n \bar u_n$, $\bar x \mathrel{+}= \bar u K^\top$. The
    mean cotangent $\bar\mu = \bar\ell\, h\, (y - \mu)/\sigma^2$ is summed over cases for constant
    means, or passed to [`linear_experts_vjp`][moeref.experts.linear_experts_vjp] for linear
    experts ($\bar A_i^\top = \sum_n x_n \bar\mu_{ni}^\top$, $\bar c_i = \sum_n \bar\mu_{ni}$).

    Parameters
    ----------
    x, y, params, variance
        As in the forward.
    cotangent : array, shape (N,)
        $\bar\ell$.

    Returns
    -------
    LocalExpertsLogLikelihoodGrads
        ``x`` (N, d_in), ``y`` (N, d_out), and ``params`` of the same record type as ``params``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.local_experts import LocalExpertsParams, local_experts_log_likelihood_vjp
    >>> p = LocalExpertsParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), np.array([[0.0], [2.0]]))
    >>> g = local_experts_log_likelihood_vjp(np.zeros((1, 1)), np.array([[1.0]]), p, np.ones(1))
    >>> g.params.means.tolist()  # h = (1/2, 1/2), y - mu = (1, -1)
    [[0.5], [-0.5]]
    """
    variance = check_positive_float(variance, "variance")
    xp = _check_local_experts(x, y, params, with_y=True)
    check_cotangent(cotangent, (x.shape[0],), like=x, what="one entry per case, like the log-likelihood")
    _, grads = _value_and_vjp(x, y, params, cotangent, variance, xp)
    return grads


def local_experts_predict(x: Any, params: AnyLocalExpertsParams) -> Any:
    r"""Mean prediction of the mixture: the gate-weighted average of the expert means.

    $$\mathbb E[y \mid x] = \sum_{i=1}^{n} w_i(x)\, \mu_i(x) .$$

    The conditional mean of the mixture of Jacobs et al. (1991), doi:10.1162/neco.1991.3.1.79
    (computed with [`mixture`][moeref.mixture.mixture]). It does not depend on the variance.
    Note that the paper *trains* the competitive error (1.3), not the squared error of this
    average (their cooperative eq. (1.1)).

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : LocalExpertsParams or LinearLocalExpertsParams

    Returns
    -------
    array, shape (N, d_out)

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.local_experts import LocalExpertsParams, local_experts_predict
    >>> p = LocalExpertsParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), np.array([[0.0], [2.0]]))
    >>> local_experts_predict(np.zeros((1, 1)), p).tolist()
    [[1.0]]
    """
    xp = _check_local_experts(x, None, params)
    gates = softmax(_logits(x, params.gate, xp), axis=-1)  # (N, n)
    return _mixture(gates, _expert_means(x, params, xp), xp)  # (N, d_out)


def local_experts_predict_vjp(x: Any, params: AnyLocalExpertsParams, cotangent: Any) -> LocalExpertsPredictGrads:
    r"""VJP of [`local_experts_predict`][moeref.local_experts.local_experts_predict].

    By [`mixture_vjp`][moeref.mixture.mixture_vjp], $\bar w_{ni} = \langle \bar f_n, \mu_i(x_n)\rangle$
    and $\bar\mu_{ni} = w_{ni} \bar f_n$; then $\bar w$ goes through
    [`linear_softmax_gate_vjp`][moeref.gates.linear_softmax_gate_vjp] and $\bar\mu$ is summed
    over cases (constant means) or goes through
    [`linear_experts_vjp`][moeref.experts.linear_experts_vjp] (linear experts).

    Parameters
    ----------
    x, params
        As in the forward.
    cotangent : array, shape (N, d_out)
    """
    xp = _check_local_experts(x, None, params)
    d_out = params.means.shape[1] if isinstance(params, LocalExpertsParams) else params.experts.weight.shape[2]
    check_cotangent(cotangent, (x.shape[0], d_out), like=x, what="the shape of the prediction (N, d_out)")
    gates = softmax(_logits(x, params.gate, xp), axis=-1)  # (N, n)
    mu = _expert_means(x, params, xp)  # (N, n, d_out)
    m = _mixture_vjp(gates, mu, cotangent, xp)
    g = _gate_vjp(x, params.gate, m.gates, gates, xp)
    if isinstance(params, LocalExpertsParams):
        return LocalExpertsPredictGrads(
            x=g.x, params=LocalExpertsParams(gate=g.params, means=xp.sum(m.expert_outputs, axis=0))  # (n, d_out)
        )
    e = _linear_experts_vjp(x, params.experts, m.expert_outputs, xp)
    return LocalExpertsPredictGrads(x=g.x + e.x, params=LinearLocalExpertsParams(gate=g.params, experts=e.params))


def fit_local_experts(
    x: Any,
    y: Any,
    init_params: AnyLocalExpertsParams,
    *,
    learning_rate: float,
    steps: int,
    variance: float = 1.0,
) -> LocalExpertsFit:
    r"""Fit the adaptive mixture of local experts by plain (full-batch) gradient ascent.

    $$\theta_{t+1} = \theta_t + \eta\, \nabla_\theta \frac1N \sum_{n=1}^{N} \log p(y_n \mid x_n; \theta_t),$$

    for gate and expert parameters $\theta$ together, with the analytic gradient of
    [`local_experts_log_likelihood_vjp`][moeref.local_experts.local_experts_log_likelihood_vjp].
    Maximising the mean log-likelihood is minimising the mean of eq. (1.3) of Jacobs et al.
    (1991), doi:10.1162/neco.1991.3.1.79 (the paper uses per-case or batch gradient descent on
    (1.3); this reference uses the full batch, so its result is deterministic).

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    init_params : LocalExpertsParams or LinearLocalExpertsParams
        Starting point. Symmetric starts (identical experts and gate columns) stay symmetric:
        break the symmetry, e.g. with small random means.
    learning_rate : float, keyword-only
        $\eta > 0$.
    steps : int, keyword-only
        Number of updates ($\ge 0$).
    variance : float, keyword-only
        $\sigma^2 > 0$ (default 1).

    Returns
    -------
    LocalExpertsFit
        The final ``params`` and the ``log_likelihood`` trace, shape (steps + 1,).

    Notes
    -----
    Inputs are validated once, before the first step; the iterates are not re-checked, so a
    learning rate that makes the ascent diverge shows up as NaN / inf in the trace.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.local_experts import LocalExpertsParams, fit_local_experts
    >>> x = np.linspace(-1, 1, 20)[:, None]
    >>> y = np.where(x < 0, -2.0, 2.0)
    >>> p0 = LocalExpertsParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)), np.array([[-0.1], [0.1]]))
    >>> fit = fit_local_experts(x, y, p0, learning_rate=0.5, steps=200)
    >>> bool(fit.log_likelihood[-1] > fit.log_likelihood[0])
    True
    """
    variance = check_positive_float(variance, "variance")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    steps = check_positive_int(steps, "steps", minimum=0)
    xp = _check_local_experts(x, y, init_params, with_y=True, name="init_params")
    N = x.shape[0]
    ct = xp.full((N,), 1.0 / N, dtype=x.dtype, device=device_of(x))  # d mean / d ll_n
    params = init_params
    trace = []
    for _ in range(steps):
        ll, grads = _value_and_vjp(x, y, params, ct, variance, xp)
        trace.append(xp.mean(ll))
        params = _tree_add_scaled(params, grads.params, learning_rate)
    _, _, log_joint = _log_joint(x, y, params, variance, xp)
    trace.append(xp.mean(logsumexp(log_joint, axis=1)))
    return LocalExpertsFit(params=params, log_likelihood=xp.stack(trace))

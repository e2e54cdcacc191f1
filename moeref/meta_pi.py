r"""The Meta-Pi network: a gate-weighted sum of expert outputs trained on the squared error.

Hampshire & Waibel (1992), "The Meta-Pi network: building distributed knowledge representations
for robust multisource pattern recognition", IEEE Transactions on Pattern Analysis and Machine
Intelligence 14(7):751-769, doi:10.1109/34.142911.

Written as a mixture of experts,

$$f(x) = \sum_{i=1}^{n} w_i(x)\, f_i(x), \qquad
L = \frac1N \sum_{k=1}^{N} \big\| y_k - f(x_k) \big\|^2 ,$$

with linear experts $f_i(x) = A_i x + c_i$ ([`moeref.experts`][moeref.experts]) and a
linear-softmax gate $w(x)$ ([`moeref.gates`][moeref.gates]). Unlike the competitive likelihood
of [`moeref.local_experts`][moeref.local_experts], the error is measured on the *blended* output,
so the experts cooperate: each one is pushed to reduce the residual left by all the others.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .core import _tree_add_scaled, device_of, softmax
from .experts import LinearExpertsParams, _linear_experts, _linear_experts_vjp
from .gates import LinearSoftmaxGateParams, _gate_vjp, _logits
from .mixture import _mixture, _mixture_vjp
from .validation import (
    check_array,
    check_arrays,
    check_cotangent,
    check_scalar_cotangent,
    check_experts_params,
    check_float_array,
    check_gate_params,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_shape,
)

__all__ = [
    "MetaPiParams",
    "MetaPiGrads",
    "MetaPiLossGrads",
    "MetaPiFit",
    "meta_pi",
    "meta_pi_vjp",
    "meta_pi_loss",
    "meta_pi_loss_vjp",
    "fit_meta_pi",
]


class MetaPiParams(NamedTuple):
    r"""Parameters of a Meta-Pi network with ``n`` linear experts.

    Attributes
    ----------
    gate : LinearSoftmaxGateParams
        ``weight`` of shape (d_in, n) and ``bias`` of shape (n,): the gating ("Meta-Pi")
        network, one output per expert.
    experts : LinearExpertsParams
        ``weight`` of shape (n, d_in, d_out) (``weight[i]`` is $A_i^\top$) and ``bias`` of shape
        (n, d_out).
    """

    gate: LinearSoftmaxGateParams
    experts: LinearExpertsParams


class MetaPiGrads(NamedTuple):
    r"""Cotangents of [`meta_pi`][moeref.meta_pi.meta_pi]'s inputs, then of its intermediates.

    The first two fields line up with the forward's arguments ``(x, params)``; the last two are
    the cotangents of the intermediate values, exposed for inspection.

    Attributes
    ----------
    x : array, shape (N, d_in)
    params : MetaPiParams
    expert_outputs : array, shape (N, n, d_out)
        $\bar f_i(x_n) = w_i(x_n)\, \bar f_n$, the cotangent of each expert's output.
    gates : array, shape (N, n)
        $\bar w_{ni} = \langle \bar f_n, f_i(x_n) \rangle$, the cotangent of the gate outputs.
    """

    x: Any
    params: MetaPiParams
    expert_outputs: Any
    gates: Any


class MetaPiLossGrads(NamedTuple):
    """Cotangents of [`meta_pi_loss`][moeref.meta_pi.meta_pi_loss]'s inputs, then of its intermediates.

    ``x``, ``y``, ``params`` line up with the forward's arguments; ``expert_outputs`` (N, n, d_out)
    and ``gates`` (N, n) are the cotangents of $f_i(x)$ and $w(x)$, as in
    [`MetaPiGrads`][moeref.meta_pi.MetaPiGrads].
    """

    x: Any
    y: Any
    params: MetaPiParams
    expert_outputs: Any
    gates: Any


class MetaPiFit(NamedTuple):
    """Result of [`fit_meta_pi`][moeref.meta_pi.fit_meta_pi].

    Attributes
    ----------
    params : MetaPiParams
        The parameters after the last step.
    loss : array, shape (steps + 1,)
        The loss after 0, 1, ..., ``steps`` updates.
    """

    params: MetaPiParams
    loss: Any


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_meta_pi(x: Any, y: Any, params: Any, *, with_y: bool = False, name: str = "params") -> Any:
    """Validate ``(x, y, params)`` (``y`` only ``with_y``; ``name``: the record's argument name). Returns the namespace."""
    check_record_type(params, name, MetaPiParams)
    check_record_type(params.gate, f"{name}.gate", LinearSoftmaxGateParams)
    check_record_type(params.experts, f"{name}.experts", LinearExpertsParams)
    check_array(x, "x")
    if with_y:
        check_array(y, "y")
    xp = check_arrays(
        {
            "x": x,
            "y": y if with_y else None,
            f"{name}.gate.weight": params.gate.weight,
            f"{name}.gate.bias": params.gate.bias,
            f"{name}.experts.weight": params.experts.weight,
            f"{name}.experts.bias": params.experts.bias,
        },
        neg_inf_ok=(f"{name}.gate.bias",),  # a -inf gate bias switches an expert off, as in moeref.gates
    )
    check_float_array(x, "x", ndim=2)
    N, d_in = x.shape
    n = check_gate_params(params.gate.weight, params.gate.bias, d_in, name=f"{name}.gate")
    _, d_out = check_experts_params(params.experts.weight, params.experts.bias, d_in, n=n, name=f"{name}.experts")
    if with_y:
        check_float_array(y, "y", ndim=2)
        check_shape(y, "y", (N, d_out), what=f"x has N={N} rows and the experts have d_out={d_out} outputs")
    return xp


# --------------------------------------------------------------------------------------------
# Forward and backward pieces (no checks)
# --------------------------------------------------------------------------------------------


def _forward(x: Any, params: MetaPiParams, xp: Any) -> tuple[Any, Any, Any]:
    """``(w(x), f_i(x), f(x))``."""
    gates = softmax(_logits(x, params.gate, xp), axis=-1)  # (N, n)
    outputs = _linear_experts(x, params.experts, xp)  # (N, n, d_out)
    return gates, outputs, _mixture(gates, outputs, xp)  # (N, d_out)


def _backward(x: Any, params: MetaPiParams, gates: Any, outputs: Any, f_bar: Any, xp: Any) -> MetaPiGrads:
    m = _mixture_vjp(gates, outputs, f_bar, xp)  # gates (N, n), expert_outputs (N, n, d_out)
    g = _gate_vjp(x, params.gate, m.gates, gates, xp)
    e = _linear_experts_vjp(x, params.experts, m.expert_outputs, xp)
    return MetaPiGrads(
        x=g.x + e.x,  # (N, d_in)
        params=MetaPiParams(gate=g.params, experts=e.params),
        expert_outputs=m.expert_outputs,
        gates=m.gates,
    )


def _loss_and_grads(x: Any, y: Any, params: MetaPiParams, scale: Any, xp: Any) -> tuple[Any, MetaPiLossGrads]:
    gates, outputs, f = _forward(x, params, xp)
    resid = y - f  # (N, d_out)
    N = x.shape[0]
    loss = xp.sum(resid * resid) / N  # ()
    f_bar = (-2.0 / N) * scale * resid  # (N, d_out)
    g = _backward(x, params, gates, outputs, f_bar, xp)
    return loss, MetaPiLossGrads(x=g.x, y=-f_bar, params=g.params, expert_outputs=g.expert_outputs, gates=g.gates)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def meta_pi(x: Any, params: MetaPiParams) -> Any:
    r"""Output of the Meta-Pi network: the gate-weighted sum of the expert outputs.

    $$f(x) = \sum_{i=1}^{n} w_i(x)\, f_i(x), \qquad w_i(x) = \frac{e^{k_i^\top x + b_i}}{\sum_j e^{k_j^\top x + b_j}},
    \qquad f_i(x) = A_i x + c_i .$$

    Hampshire & Waibel (1992), "The Meta-Pi network: building distributed knowledge
    representations for robust multisource pattern recognition", IEEE TPAMI 14(7):751-769,
    doi:10.1109/34.142911, as the mixture-of-experts literature writes it. Jacobs, Jordan,
    Nowlan & Hinton (1991), doi:10.1162/neco.1991.3.1.79, write the squared error of this
    linear combination of expert outputs as their eq. (1.1) and discuss it as the error used in
    earlier work, Hampshire & Waibel's among it.

    Parameters
    ----------
    x : array, shape (N, d_in)
    params : MetaPiParams

    Returns
    -------
    array, shape (N, d_out)

    Raises
    ------
    TypeError
        Integer arrays, mixed dtypes or array libraries, a params record of another type.
    ValueError
        Inconsistent shapes (e.g. a gate whose number of outputs differs from the number of
        experts) or non-finite inputs / parameters.

    Notes
    -----
    * **What is the original and what is this instance.** The Meta-Pi network of Hampshire &
      Waibel combined *source-dependent* modules (speaker-dependent time-delay neural networks,
      each trained to classify /b, d, g/ phonemes of one speaker) through a combinational
      superstructure (in their application also a TDNN), linked to the modules by multiplicative "Meta-Pi"
      connections; the authors interpret the result as an adaptive Bayesian maximum a posteriori
      classifier. This module implements only the *formulation* $f = \sum_i w_i f_i$ trained on
      the mean squared error, with **linear** experts and a **linear-softmax** gate as the
      building blocks: it reproduces neither the TDNN modules nor the original gate's exact
      normalisation and training schedule.
    * The gate is a stable softmax (no overflow for large logits). Computed in the dtype of the
      inputs (float64 is the reference).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.meta_pi import MetaPiParams, meta_pi
    >>> p = MetaPiParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
    ...                  LinearExpertsParams(np.array([[[1.0]], [[3.0]]]), np.zeros((2, 1))))
    >>> meta_pi(np.array([[1.0]]), p).tolist()  # (1 + 3) / 2
    [[2.0]]
    """
    return _forward(x, params, _check_meta_pi(x, None, params))[2]


def meta_pi_vjp(x: Any, params: MetaPiParams, cotangent: Any) -> MetaPiGrads:
    r"""VJP of [`meta_pi`][moeref.meta_pi.meta_pi].

    With $\bar f_n$ the cotangent of $f(x_n)$:

    $$\bar f_{i}(x_n) = w_i(x_n)\, \bar f_n, \qquad \bar w_{ni} = \langle \bar f_n, f_i(x_n) \rangle,
    \qquad \bar u_{ni} = w_{ni}\Big(\bar w_{ni} - \sum_j w_{nj} \bar w_{nj}\Big),$$

    then $\bar K = x^\top \bar u$, $\bar b = \sum_n \bar u_n$ for the gate, and
    $\bar A_i^\top = \sum_n x_n \bar f_i(x_n)^\top$, $\bar c_i = \sum_n \bar f_i(x_n)$ for the
    experts; $\bar x_n = K \bar u_n + \sum_i A_i^\top \bar f_i(x_n)$ collects both paths.

    Parameters
    ----------
    x, params
        As in the forward.
    cotangent : array, shape (N, d_out)

    Returns
    -------
    MetaPiGrads
        ``x``, ``params`` (a `MetaPiParams`), and the intermediate cotangents
        ``expert_outputs`` (N, n, d_out) and ``gates`` (N, n).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.meta_pi import MetaPiParams, meta_pi_vjp
    >>> p = MetaPiParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
    ...                  LinearExpertsParams(np.array([[[1.0]], [[3.0]]]), np.zeros((2, 1))))
    >>> g = meta_pi_vjp(np.array([[1.0]]), p, np.array([[1.0]]))
    >>> g.gates.tolist(), g.x.tolist()  # f_i(1) = 1, 3; zero gate weights, so df/dx = (1 + 3) / 2
    ([[1.0, 3.0]], [[2.0]])
    """
    xp = _check_meta_pi(x, None, params)
    check_cotangent(cotangent, (x.shape[0], params.experts.weight.shape[2]), like=x, what="the shape of meta_pi's output (N, d_out)")
    gates, outputs, _ = _forward(x, params, xp)
    return _backward(x, params, gates, outputs, cotangent, xp)


def meta_pi_loss(x: Any, y: Any, params: MetaPiParams) -> Any:
    r"""Mean squared error of the Meta-Pi network.

    $$L = \frac1N \sum_{k=1}^{N} \big\| y_k - f(x_k) \big\|^2, \qquad f(x) = \sum_i w_i(x) f_i(x).$$

    The squared norm is summed over output dimensions and averaged over the $N$ cases, as the
    loss is written for the Meta-Pi network in the mixture-of-experts literature (Hampshire &
    Waibel 1992, doi:10.1109/34.142911); per case it is the cooperative error eq. (1.1) of
    Jacobs et al. (1991), doi:10.1162/neco.1991.3.1.79.

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    params : MetaPiParams

    Returns
    -------
    array, shape ()

    Notes
    -----
    No factor $\tfrac12$: the gradient with respect to the output is $-\tfrac{2}{N}(y_k - f(x_k))$.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.meta_pi import MetaPiParams, meta_pi_loss
    >>> p = MetaPiParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
    ...                  LinearExpertsParams(np.array([[[1.0]], [[3.0]]]), np.zeros((2, 1))))
    >>> float(meta_pi_loss(np.array([[1.0], [2.0]]), np.array([[2.0], [2.0]]), p))  # (0 + 2^2) / 2
    2.0
    """
    xp = _check_meta_pi(x, y, params, with_y=True)
    resid = y - _forward(x, params, xp)[2]  # (N, d_out)
    return xp.sum(resid * resid) / x.shape[0]


def meta_pi_loss_vjp(x: Any, y: Any, params: MetaPiParams, cotangent: Any = None) -> MetaPiLossGrads:
    r"""VJP of [`meta_pi_loss`][moeref.meta_pi.meta_pi_loss].

    $$\bar f(x_k) = -\frac{2\bar L}{N}\big(y_k - f(x_k)\big), \qquad \bar y_k = \frac{2\bar L}{N}\big(y_k - f(x_k)\big),$$

    then $\bar f$ goes back through [`meta_pi_vjp`][moeref.meta_pi.meta_pi_vjp].

    Parameters
    ----------
    x, y, params
        As in the forward.
    cotangent : array, shape (), or float, optional
        $\bar L$; ``None`` (default) means 1, i.e. the gradient of $L$ itself.

    Returns
    -------
    MetaPiLossGrads
        ``x``, ``y``, ``params``, then the intermediate cotangents ``expert_outputs`` and ``gates``.
    """
    xp = _check_meta_pi(x, y, params, with_y=True)
    if cotangent is None:
        cotangent = xp.ones((), dtype=x.dtype, device=device_of(x))
    else:
        cotangent = check_scalar_cotangent(cotangent, x, what="the loss is a scalar")
    return _loss_and_grads(x, y, params, cotangent, xp)[1]


def fit_meta_pi(
    x: Any,
    y: Any,
    init_params: MetaPiParams,
    *,
    learning_rate: float,
    steps: int,
    update_experts: bool = True,
) -> MetaPiFit:
    r"""Fit a Meta-Pi network by plain (full-batch) gradient descent on its squared error.

    $$\theta_{t+1} = \theta_t - \eta\, \nabla_\theta L(\theta_t), \qquad
    L = \frac1N \sum_k \big\|y_k - \textstyle\sum_i w_i(x_k) f_i(x_k)\big\|^2 ,$$

    with the analytic gradient of [`meta_pi_loss_vjp`][moeref.meta_pi.meta_pi_loss_vjp].

    Parameters
    ----------
    x : array, shape (N, d_in)
    y : array, shape (N, d_out)
    init_params : MetaPiParams
    learning_rate : float, keyword-only
        $\eta > 0$.
    steps : int, keyword-only
        Number of updates ($\ge 0$).
    update_experts : bool, keyword-only
        ``True`` (default) trains gate and experts jointly. ``False`` keeps the experts fixed
        and trains only the gate, closer to the original set-up in which the Meta-Pi
        superstructure combined modules that had already been trained, each on one source.

    Returns
    -------
    MetaPiFit
        The final ``params`` and the ``loss`` trace, shape (steps + 1,).

    Notes
    -----
    Inputs are validated once, before the first step; a learning rate that makes the descent
    diverge shows up as NaN / inf in the trace.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.experts import LinearExpertsParams
    >>> from moeref.gates import LinearSoftmaxGateParams
    >>> from moeref.meta_pi import MetaPiParams, fit_meta_pi
    >>> x = np.linspace(-1, 1, 20)[:, None]
    >>> p0 = MetaPiParams(LinearSoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
    ...                   LinearExpertsParams(np.array([[[0.1]], [[-0.1]]]), np.zeros((2, 1))))
    >>> fit = fit_meta_pi(x, np.abs(x), p0, learning_rate=0.5, steps=100)
    >>> bool(fit.loss[-1] < 0.5 * fit.loss[0])
    True
    """
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    steps = check_positive_int(steps, "steps", minimum=0)
    if not isinstance(update_experts, bool):
        raise TypeError(f"update_experts must be a bool, got {type(update_experts).__name__}")
    xp = _check_meta_pi(x, y, init_params, with_y=True, name="init_params")
    one = xp.ones((), dtype=x.dtype, device=device_of(x))
    params = init_params
    trace = []
    for _ in range(steps):
        loss, grads = _loss_and_grads(x, y, params, one, xp)
        trace.append(loss)
        gate = _tree_add_scaled(params.gate, grads.params.gate, -learning_rate)
        experts = _tree_add_scaled(params.experts, grads.params.experts, -learning_rate) if update_experts else params.experts
        params = MetaPiParams(gate=gate, experts=experts)
    resid = y - _forward(x, params, xp)[2]  # (N, d_out)
    trace.append(xp.sum(resid * resid) / x.shape[0])
    return MetaPiFit(params=params, loss=xp.stack(trace))

r"""The BASE layer: balanced assignment of tokens to experts, and a sigmoid-gated residual mix.

Lewis, Bhosale, Dettmers, Goyal & Zettlemoyer (2021), "BASE Layers: Simplifying Training of Large,
Sparse Models", ICML, arXiv:2103.16716. Each expert $e$ has a centroid (expert embedding)
$c_e \in \mathbb R^d$; token $t$'s affinity to expert $e$ is $a_{te} = x_t \cdot c_e$. During
training the tokens are assigned by a balanced linear assignment (exactly $T/E$ tokens per
expert, maximising $\sum_t a_{t\sigma(t)}$, see [`moeref.balanced_assignment`][moeref.balanced_assignment]);
at evaluation each token goes to its best expert (greedy top-1). The output is

$$y_t = \alpha_t\, f_{\sigma(t)}(x_t) + (1 - \alpha_t)\, x_t, \qquad \alpha_t = \operatorname{sigmoid}(x_t \cdot c_{\sigma(t)}),$$

the form of fairseq's `fairseq/modules/base_layer.py` (``BaseLayer.forward``: ``alpha =
sigmoid(routed_features.mv(expert_centroids[expert_id]))``, then ``alpha * expert(routed) + (1 -
alpha) * routed``). No auxiliary loss and no capacity factor: every token is processed by exactly
one expert. The experts' outputs are computed by the shared sorted dispatch
[`dispatch_combine`][moeref.dispatch.dispatch_combine] with route weight $\alpha_t$.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .balanced_assignment import AuctionOptions, BalancedAssignment, _positions_in_expert, balanced_assignment
from .core import _segment_sum, _take_along_axis, argmax, array_namespace, device_of, sigmoid
from .dispatch import dispatch_combine, dispatch_combine_vjp
from .expert_ffn import RELU_FFN, ExpertFFN, ExpertFFNParams, check_expert_ffn_params
from .routes import Routes
from .validation import (
    check_cotangent,
    check_arrays,
    check_float_array,
    check_index_range,
    check_int_array,
    check_record_type,
    check_shape,
)

__all__ = [
    "BaseLayerParams",
    "BaseLayerOptions",
    "BaseLayerOutput",
    "BaseLayerGrads",
    "base_layer",
    "base_layer_vjp",
]


class BaseLayerParams(NamedTuple):
    r"""Parameters of a BASE layer.

    Attributes
    ----------
    centroids : array, shape (E, d)
        $c_e$, the expert embeddings (fairseq ``expert_centroids``, initialised orthogonal with
        gain 0.1 there).
    experts : ExpertFFNParams
        The $E$ expert networks $f_e$ (``w_in (E, d, K)``, ``w_out (E, I, d)``, ...).
    """

    centroids: Any
    experts: ExpertFFNParams


def _default_auction() -> AuctionOptions:
    return AuctionOptions()


@dataclass(frozen=True)
class BaseLayerOptions:
    r"""Conventions of a BASE layer.

    Attributes
    ----------
    ffn : ExpertFFN
        The expert family (default ReLU). fairseq's expert is a stack of ``base_sublayers``
        residual blocks $x + W_2\,\mathrm{relu}(W_1 \mathrm{LN}(x))$ with $W_2$ zero-initialised
        (``BaseSublayer``); moeref's expert is one [`ExpertFFN`][moeref.expert_ffn.ExpertFFN]
        without the layer norm and the inner residual, so $f_e$ here is what the paper's formula
        calls the expert, not fairseq's module.
    auction : AuctionOptions
        The $\varepsilon$ schedule of the balanced assignment (training only).
    """

    ffn: ExpertFFN = RELU_FFN
    auction: AuctionOptions = field(default_factory=_default_auction)

    def __post_init__(self) -> None:
        check_record_type(self.ffn, "options.ffn", ExpertFFN)
        check_record_type(self.auction, "options.auction", AuctionOptions)


class BaseLayerOutput(NamedTuple):
    r"""Everything the BASE layer computes.

    Attributes
    ----------
    y : array, shape (T, d)
    affinities : array, shape (T, E)
        $a_{te} = x_t \cdot c_e$.
    alpha : array, shape (T,)
        $\alpha_t = \operatorname{sigmoid}(a_{t\sigma(t)})$.
    routes : Routes
        ``expert_index (T, 1)`` $= \sigma(t)$, ``weight (T, 1)`` $= \alpha_t$, ``kept`` all True,
        ``position`` the token's rank among its expert's tokens.
    assignment : BalancedAssignment or None
        The auction's result (prices, $\varepsilon$, rounds) when it ran; None at evaluation or
        when ``expert_index`` was given.
    """

    y: Any
    affinities: Any
    alpha: Any
    routes: Routes
    assignment: BalancedAssignment | None


class BaseLayerGrads(NamedTuple):
    """Cotangents of the BASE layer's inputs: ``x (T, d)`` and ``params`` (``centroids (E, d)``, ``experts``)."""

    x: Any
    params: BaseLayerParams


# --------------------------------------------------------------------------------------------
# Checks and the routing step
# --------------------------------------------------------------------------------------------


def _check(x: Any, params: Any, options: Any, training: Any, expert_index: Any) -> tuple[Any, int]:
    check_record_type(params, "params", BaseLayerParams)
    check_record_type(options, "options", BaseLayerOptions)
    check_record_type(params.experts, "params.experts", ExpertFFNParams)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__} {training!r}")
    xp = check_arrays({"x": x, "params.centroids": params.centroids, "params.experts.w_in": params.experts.w_in})
    check_float_array(x, "x", ndim=2)
    T, d = x.shape
    check_float_array(params.centroids, "params.centroids", ndim=2)
    check_shape(params.centroids, "params.centroids", (None, d), what=f"one row of d={d} features per expert; x has d={d}")
    E = params.centroids.shape[0]
    E_ffn, _, _ = check_expert_ffn_params(params.experts, options.ffn, d=d, name="params.experts")
    if E_ffn != E:
        raise ValueError(f"params.experts has E={E_ffn} experts but params.centroids has E={E} rows (shape (E, d))")
    if expert_index is not None:
        array_namespace(x, expert_index, names=("x", "expert_index"))
        check_int_array(expert_index, "expert_index", ndim=1)
        check_shape(expert_index, "expert_index", (T,), what=f"one expert per token, x has T={T} tokens")
        check_index_range(expert_index, "expert_index", E, what=f"params.centroids has E={E} rows")
    elif training and T % E != 0:
        raise ValueError(
            f"x has T={T} tokens, not divisible by E={E} experts (rows of params.centroids): the balanced assignment "
            f"gives every expert exactly T/E tokens; pad or drop {T % E} tokens, or use training=False (greedy top-1)"
        )
    return xp, E


class _Routing(NamedTuple):
    affinities: Any  # (T, E)
    alpha: Any  # (T,)
    routes: Routes  # (T, 1)
    assignment: Any  # BalancedAssignment or None


def _route(x: Any, params: BaseLayerParams, options: BaseLayerOptions, training: bool, expert_index: Any, E: int, xp: Any) -> _Routing:
    affinities = xp.matmul(x, xp.matrix_transpose(params.centroids))  # (T, E)
    assignment = None
    if expert_index is None:
        if training:
            assignment = balanced_assignment(affinities, options.auction)
            expert_index = assignment.expert_index  # (T,)
        else:
            expert_index = argmax(affinities, axis=1)  # (T,) greedy top-1, ties to the lower index
    e = xp.astype(expert_index, xp.int64)  # (T,)
    alpha = sigmoid(_take_along_axis(affinities, e[:, None], axis=1)[:, 0])  # (T,)
    T = x.shape[0]
    routes = Routes(
        expert_index=e[:, None],
        weight=alpha[:, None],
        kept=xp.ones((T, 1), dtype=xp.bool, device=device_of(x)),
        position=_positions_in_expert(e, E, xp)[:, None],
    )
    return _Routing(affinities, alpha, routes, assignment)


# --------------------------------------------------------------------------------------------
# Forward and VJP
# --------------------------------------------------------------------------------------------


def base_layer(
    x: Any,
    params: BaseLayerParams,
    options: BaseLayerOptions = BaseLayerOptions(),
    *,
    training: bool = True,
    expert_index: Any = None,
) -> BaseLayerOutput:
    r"""BASE layer output: balanced (training) or greedy (evaluation) routing, then the gated residual mix.

    $$a_{te} = x_t \cdot c_e, \qquad
    \sigma = \begin{cases} \arg\max_{\sigma \text{ balanced}} \sum_t a_{t\sigma(t)} & \text{training} \\
    \sigma(t) = \arg\max_e a_{te} & \text{evaluation} \end{cases}$$

    $$y_t = \alpha_t\, f_{\sigma(t)}(x_t) + (1 - \alpha_t)\, x_t, \qquad \alpha_t = \operatorname{sigmoid}(a_{t\sigma(t)}),$$

    the BASE layer of Lewis et al. (2021), "BASE Layers: Simplifying Training of Large, Sparse
    Models", ICML, arXiv:2103.16716, in the form of fairseq's ``BaseLayer.forward``
    (`fairseq/modules/base_layer.py`): balanced assignment in training, ``greedy_assignment``
    (top-1) otherwise.

    Parameters
    ----------
    x : array, shape (T, d)
        The tokens of one routing batch (fairseq: one worker's tokens after the optional
        shuffle). $T$ must be a multiple of $E$ when ``training``.
    params : BaseLayerParams
        ``centroids (E, d)`` and the experts.
    options : BaseLayerOptions
        Expert family and auction schedule.
    training : bool
        True: balanced assignment by [`balanced_assignment`][moeref.balanced_assignment.balanced_assignment];
        False: greedy top-1. (fairseq switches on ``input_features.requires_grad``, not on
        ``module.training``.)
    expert_index : int array, shape (T,), optional
        A given assignment $\sigma$ (e.g. the forward's ``routes.expert_index[:, 0]``, to reuse it
        in the VJP); skips the routing step.

    Returns
    -------
    BaseLayerOutput

    Raises
    ------
    ValueError
        $T$ not divisible by $E$ in training, mismatched centroid shapes (``params.centroids``
        must be ``(E, d)`` with ``d`` from ``x`` and ``E`` from ``params.experts``), NaN input.

    Notes
    -----
    **Ties.** In the greedy assignment the lower expert index wins (fairseq's ``torch.topk``
    leaves the order unspecified); the balanced assignment's ties are documented on
    [`balanced_assignment`][moeref.balanced_assignment.balanced_assignment].

    **Autodiff.** The routing is data dependent (the auction loop, the dispatch blocks), so it
    needs concrete values: ``torch.autograd`` works directly; under ``jax.grad`` / ``jax.vjp``
    compute ``out = base_layer(x, params)`` eagerly first and differentiate
    ``lambda x, params: base_layer(x, params, expert_index=out.routes.expert_index[:, 0]).y``, the
    assignment held fixed as in [`base_layer_vjp`][moeref.base_layer.base_layer_vjp]. Not under
    ``jax.jit``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.base_layer import BaseLayerParams, base_layer
    >>> from moeref.expert_ffn import ExpertFFNParams
    >>> x = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    >>> experts = ExpertFFNParams(w_in=np.stack([np.eye(2)] * 2), w_out=np.stack([np.eye(2), -np.eye(2)]))
    >>> params = BaseLayerParams(centroids=np.array([[1.0, 0.0], [0.0, 1.0]]), experts=experts)
    >>> base_layer(x, params).routes.expert_index[:, 0].tolist()  # two tokens per expert
    [0, 0, 1, 1]
    >>> base_layer(x, params, training=False).routes.expert_index[:, 0].tolist()  # greedy
    [0, 0, 1, 0]
    """
    xp, E = _check(x, params, options, training, expert_index)
    r = _route(x, params, options, training, expert_index, E, xp)
    y = dispatch_combine(x, r.routes, params.experts, options.ffn) + (1.0 - r.alpha)[:, None] * x  # (T, d)
    return BaseLayerOutput(y, r.affinities, r.alpha, r.routes, r.assignment)


def base_layer_vjp(
    x: Any,
    params: BaseLayerParams,
    options: BaseLayerOptions,
    cotangent: Any,
    *,
    training: bool = True,
    expert_index: Any = None,
) -> BaseLayerGrads:
    r"""VJP of [`base_layer`][moeref.base_layer.base_layer] w.r.t. ``x``, the centroids and the experts, assignment held fixed.

    With $s_t = x_t \cdot c_{\sigma(t)}$, $\alpha_t = \operatorname{sigmoid}(s_t)$,
    $o_t = f_{\sigma(t)}(x_t)$ and the output cotangent $\bar y_t$:

    $$\bar\alpha_t = \langle \bar y_t, o_t - x_t\rangle, \qquad
    \bar s_t = \bar\alpha_t\, \alpha_t (1 - \alpha_t),$$

    $$\bar x_t = J_{f_{\sigma(t)}}(x_t)^\top(\alpha_t \bar y_t) + (1 - \alpha_t)\,\bar y_t + \bar s_t\, c_{\sigma(t)}, \qquad
    \bar c_e = \sum_{t : \sigma(t) = e} \bar s_t\, x_t, \qquad
    \bar\theta_e = \sum_{t:\sigma(t)=e} \partial_{\theta_e} f_e(x_t)^\top (\alpha_t \bar y_t).$$

    The expert part is [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp] (its route
    weight cotangent is $\langle \bar y_t, o_t\rangle$); the centroid sum is a
    [`segment_sum`][moeref.core.segment_sum]. The assignment $\sigma$ is piecewise constant in
    $x$ and $c$ and receives no gradient, as in fairseq, which computes the affinities for
    routing under ``torch.no_grad()`` while $\alpha$ keeps its gradient.

    Parameters
    ----------
    x, params, options, training, expert_index
        As in the forward (pass the forward's assignment as ``expert_index`` to skip re-running
        the auction; it is deterministic, so the result is the same).
    cotangent : array, shape (T, d)
        $\bar y$.

    Returns
    -------
    BaseLayerGrads
    """
    xp, E = _check(x, params, options, training, expert_index)
    check_cotangent(cotangent, tuple(x.shape), like=x, what="the layer output, (T, d)")
    check_arrays({"x": x, "cotangent": cotangent})
    r = _route(x, params, options, training, expert_index, E, xp)
    dg = dispatch_combine_vjp(x, r.routes, params.experts, options.ffn, cotangent)
    alpha = r.alpha  # (T,)
    alpha_bar = dg.routes.weight[:, 0] - xp.sum(cotangent * x, axis=1)  # (T,)
    s_bar = alpha_bar * alpha * (1.0 - alpha)  # (T,)
    e = r.routes.expert_index[:, 0]  # (T,)
    x_bar = dg.x + (1.0 - alpha)[:, None] * cotangent + s_bar[:, None] * xp.take(params.centroids, e, axis=0)  # (T, d)
    c_bar = _segment_sum(s_bar[:, None] * x, e, E)  # (E, d)
    return BaseLayerGrads(x=x_bar, params=BaseLayerParams(centroids=c_bar, experts=dg.experts))

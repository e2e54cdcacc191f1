r"""The full sparse token-choice MoE layer: router, capacity, dispatch and combine, auxiliary losses, and its VJP.

For $T$ tokens $x_t \in \mathbb R^d$ (rows of ``x``, shape ``(T, d)``) and $E$ expert FFNs, the
layer computes

$$z = \tilde x W_r + b_r, \qquad (e_{tj}, g_{tj})_{j<k} = \operatorname{route}(z),
\qquad m_{tj} = \operatorname{capacity}(e, \text{priority}),$$

$$w_{tj} = \rho\, m_{tj}\, \operatorname{normalize}(g_t)_j, \qquad
y_t = \sum_{j=0}^{k-1} m_{tj}\, w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$$

(eq. (1) of Shazeer et al. 2017, arXiv:1701.06538; eq. (2) of Fedus, Zoph & Shazeer 2022,
"Switch Transformers", JMLR 23(120), arXiv:2101.03961), together with the auxiliary losses
$\mathcal L_\text{aux} = \alpha\, \mathcal L_\text{balance}(z, e) + \beta\, \mathcal L_z(z)$.
Each step is one of moeref's building blocks, so every convention is an explicit option there:
[`route`][moeref.router.route] ([`RouterOptions`][moeref.router.RouterOptions]),
[`apply_capacity`][moeref.capacity.apply_capacity]
([`CapacityOptions`][moeref.capacity.CapacityOptions]),
[`dispatch_combine`][moeref.dispatch.dispatch_combine]
([`ExpertFFN`][moeref.expert_ffn.ExpertFFN]) and the losses of
[`moeref.aux_losses`][moeref.aux_losses]. [`moeref.presets`][moeref.presets] fills the options
for real systems.

The VJP [`sparse_moe_layer_vjp`][moeref.sparse_moe.sparse_moe_layer_vjp] chains the building
blocks' VJPs with the selection, the capacity decisions and every random draw held fixed (no
straight-through estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .aux_losses import (
    SWITCH_TRANSFORMER,
    LoadBalancingLossOptions,
    load_balancing_loss,
    load_balancing_loss_vjp,
    router_z_loss,
    router_z_loss_vjp,
)
from .capacity import CapacityDraws, CapacityOptions, apply_capacity
from .dispatch import dispatch_combine, dispatch_combine_vjp
from .expert_ffn import ExpertFFN, ExpertFFNParams, RELU_FFN, check_expert_ffn_params
from .router import RouterDraws, RouterOptions, RouterParams, normalize_route_weights_vjp, renormalize_routes, route, route_weights_vjp
from .routes import Routes
from .core import device_of
from .validation import check_arrays, check_choice, check_float_array, check_record_type, check_shape, concrete_bool

__all__ = [
    "SparseMoEParams",
    "SparseMoEOptions",
    "SparseMoEDraws",
    "SparseMoEOutput",
    "SparseMoEAuxCotangents",
    "SparseMoEGrads",
    "sparse_moe_layer",
    "sparse_moe_layer_vjp",
]

_APPLY_WEIGHT_TO = ("output", "input")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class SparseMoEParams(NamedTuple):
    """Parameters of a sparse MoE layer.

    Attributes
    ----------
    router : RouterParams
        ``weight (d, E)``, optional ``bias (E,)``, ``noise_weight (d, E)``, ``selection_bias (E,)``.
    experts : ExpertFFNParams
        The $E$ expert FFNs (``w_in (E, d, K)``, ``w_out (E, I, d)``, ...).
    """

    router: RouterParams
    experts: ExpertFFNParams


def _dropless() -> CapacityOptions:
    return CapacityOptions(dropless=True)


@dataclass(frozen=True)
class SparseMoEOptions:
    r"""Conventions of a sparse token-choice MoE layer (see [`moeref.presets`][moeref.presets] for real systems).

    Attributes
    ----------
    router : RouterOptions
        $k$, the score function, selection, normalisation, noise. Its
        ``normalize_after_capacity`` decides whether the $k$ weights are renormalised before the
        capacity limit (Mesh-TF; every dropless system, where both orders agree) or over the routes
        that survive it (fairseq's default, DeepSpeed top-2 / top-$k$).
    capacity : CapacityOptions
        Default ``dropless=True`` (Mixtral, DeepSeek-V3, Qwen2-MoE, OLMoE, DBRX, GPT-OSS, Llama 4
        and every HF inference implementation; Megablocks dMoE). A capacity factor or a fixed
        capacity drops routes (Switch, GShard, DeepSpeed, fairseq, V-MoE, flaxformer).
    ffn : ExpertFFN
        The expert family and weight layout (default ReLU, the original Switch / GShard experts).
    apply_weight_to : {"output", "input"}
        ``"output"``: $w_{tj}\,\mathrm{FFN}(x_t)$ (every system but Llama 4); ``"input"``:
        $\mathrm{FFN}(w_{tj}\, x_t)$ (Llama 4 ``Llama4TextMoe``).
    load_balancing : LoadBalancingLossOptions
        Conventions of the Switch / GShard balancing loss (default
        [`SWITCH_TRANSFORMER`][moeref.aux_losses.SWITCH_TRANSFORMER]). The loss is always
        reported; its coefficient decides whether it enters the objective.
    load_balancing_coef : float
        $\alpha$ (HF ``router_aux_loss_coef``: 0.001 Mixtral, Qwen2-MoE, GPT-OSS, Llama 4, Switch;
        0.01 OLMoE; Fedus et al. 2021 use $10^{-2}$). 0 disables it in the objective.
    z_loss_coef : float
        $\beta$ of the router z-loss (ST-MoE, Zoph et al. 2022, eq. (5): $10^{-3}$; HF Switch
        ``router_z_loss_coef=0.001``). 0 disables it in the objective.
    """

    router: RouterOptions = field(default_factory=RouterOptions)
    capacity: CapacityOptions = field(default_factory=_dropless)
    ffn: ExpertFFN = RELU_FFN
    apply_weight_to: str = "output"
    load_balancing: LoadBalancingLossOptions = SWITCH_TRANSFORMER
    load_balancing_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        check_record_type(self.router, "options.router", RouterOptions)
        check_record_type(self.capacity, "options.capacity", CapacityOptions)
        check_record_type(self.ffn, "options.ffn", ExpertFFN)
        check_record_type(self.load_balancing, "options.load_balancing", LoadBalancingLossOptions)
        check_choice(self.apply_weight_to, "options.apply_weight_to", _APPLY_WEIGHT_TO)
        for name in ("load_balancing_coef", "z_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"options.{name} must be a finite number >= 0, got {v!r}")

    @property
    def normalize_after_capacity(self) -> bool:
        """``router.normalize_after_capacity``: renormalise over the routes kept by capacity."""
        return self.router.normalize_after_capacity


class SparseMoEDraws(NamedTuple):
    """Explicit random draws of the layer (each optional; required exactly when an option uses it).

    Attributes
    ----------
    router : RouterDraws, optional
        Jitter, noise, Gumbel and second-expert draws (see [`RouterDraws`][moeref.router.RouterDraws]).
    capacity : CapacityDraws, optional
        Uniform draws for ``capacity.priority="random"``.
    """

    router: RouterDraws | None = None
    capacity: CapacityDraws | None = None


class SparseMoEOutput(NamedTuple):
    """Everything the layer computes.

    Attributes
    ----------
    y : array, shape (T, d)
        The layer output (0 for a token whose routes were all dropped: the residual is outside).
    logits : array, shape (T, E)
        Router logits $z = \\tilde x W_r + b_r$ (before logit noise); the auxiliary losses read them.
    scores : array, shape (T, E)
        Router scores $\\phi(\\tilde z)$ (see [`RouterOutput`][moeref.router.RouterOutput]).
    routes : Routes
        After capacity: ``expert_index``, final ``weight`` (0 where dropped), ``kept``, ``position``.
    counts_before, counts_after : int64 array, shape (G, E)
        Live routes per (routing group, expert) before and after the capacity limit.
    capacity : int
        $C$ (for dropless: the largest count).
    load_balancing_loss : array, shape (), or None
        $\\mathcal L_\\text{balance}$ (unweighted), with ``options.load_balancing``; None when a
        ``-inf`` router bias switches an expert off (the losses need finite logits).
    z_loss : array, shape (), or None
        $\\mathcal L_z$ (unweighted); None as above.
    aux_loss : array, shape ()
        $\\alpha\\,\\mathcal L_\\text{balance} + \\beta\\,\\mathcal L_z$.
    """

    y: Any
    logits: Any
    scores: Any
    routes: Routes
    counts_before: Any
    counts_after: Any
    capacity: int
    load_balancing_loss: Any
    z_loss: Any
    aux_loss: Any


class SparseMoEAuxCotangents(NamedTuple):
    """Cotangents of the two unweighted auxiliary losses (Python floats or 0-d arrays)."""

    load_balancing: Any = 0.0
    z_loss: Any = 0.0


class SparseMoEGrads(NamedTuple):
    """Cotangents of the layer's inputs: ``x (T, d)`` and ``params`` (a ``SparseMoEParams`` of
    cotangents; ``None`` where a parameter is ``None``, zeros for ``router.selection_bias``)."""

    x: Any
    params: SparseMoEParams


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


_NON_FINITE_AUX = (
    "the auxiliary losses need finite router logits, but a -inf router bias switches an expert off; "
    "set {what} to 0 (the losses are then reported as None)"
)


def _finite_logits(logits: Any, xp: Any) -> bool:
    """False when some logit is -inf (the router already rejects NaN and +inf); True if unknown (traced)."""
    return concrete_bool(xp.all(logits > -math.inf)) is not False


class _Forward(NamedTuple):
    router_out: Any  # RouterOutput (routes before capacity)
    routes: Routes  # (T, k) after capacity (and renormalisation)
    report: Any  # CapacityReport


def _check(x: Any, params: Any, options: Any, draws: Any) -> tuple[Any, SparseMoEDraws]:
    check_record_type(params, "params", SparseMoEParams)
    check_record_type(options, "options", SparseMoEOptions)
    check_record_type(params.router, "params.router", RouterParams)
    check_record_type(params.experts, "params.experts", ExpertFFNParams)
    draws = SparseMoEDraws() if draws is None else draws
    check_record_type(draws, "draws", SparseMoEDraws)
    xp = check_arrays({"x": x, "params.router.weight": params.router.weight, "params.experts.w_in": params.experts.w_in})
    check_float_array(x, "x", ndim=2)
    d = x.shape[1]
    E_ffn, _, _ = check_expert_ffn_params(params.experts, options.ffn, d=d, name="params.experts")
    check_float_array(params.router.weight, "params.router.weight", ndim=2)
    E = params.router.weight.shape[1]
    if E_ffn != E:
        raise ValueError(f"params.experts has E={E_ffn} experts but params.router.weight has E={E} columns (shape (d, E))")
    return xp, draws


def _forward(x: Any, params: SparseMoEParams, options: SparseMoEOptions, draws: SparseMoEDraws) -> _Forward:
    E = params.router.weight.shape[1]
    r = route(x, params.router, options.router, draws.router)  # routes (T, k); logits (T, E)
    routes, report = apply_capacity(r.routes, E, options.capacity, draws=draws.capacity)  # (T, k)
    if options.normalize_after_capacity:
        routes = renormalize_routes(routes, options.router)  # (T, k)
    return _Forward(r, routes, report)


def sparse_moe_layer(
    x: Any, params: SparseMoEParams, options: SparseMoEOptions = SparseMoEOptions(), draws: SparseMoEDraws | None = None
) -> SparseMoEOutput:
    r"""Sparse token-choice MoE layer: route, apply capacity, run the experts, combine; with auxiliary losses.

    $$y_t = \sum_{j=0}^{k-1} m_{tj}\, w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)
    \quad\Big(\text{or } \sum_j m_{tj}\, \mathrm{FFN}_{e_{tj}}(w_{tj}\, x_t)\Big),$$

    $$\mathcal L_\text{aux} = \alpha\, s \sum_i f_i P_i + \beta\, \frac1T \sum_t
    \Big(\log \sum_i e^{z_{ti}}\Big)^2,$$

    with $e, g$ from [`route`][moeref.router.route], $m$ from
    [`apply_capacity`][moeref.capacity.apply_capacity], $w$ the router's weights (renormalised over
    the kept routes when ``options.normalize_after_capacity``), the balancing loss of Fedus et al.
    (2021), arXiv:2101.03961, eq. (4) with the conventions of ``options.load_balancing``, and the
    z-loss of Zoph et al. (2022), "ST-MoE", arXiv:2202.08906, eq. (5).

    Parameters
    ----------
    x : array, shape (T, d)
    params : SparseMoEParams
    options : SparseMoEOptions
    draws : SparseMoEDraws, optional
        The random draws the options need.

    Returns
    -------
    SparseMoEOutput

    Raises
    ------
    ValueError
        Expert counts of the router and the FFNs differ; ``k > E``; NaN inputs; missing, unused or
        out-of-range draws; a capacity group size that does not divide $T$ (from the building
        blocks, naming the argument).
    TypeError
        Records of the wrong type, non-float arrays, mixed libraries.

    Notes
    -----
    The selection is computed once (by [`route`][moeref.router.route]); capacity, dispatch and the
    losses reuse it. Ties in the top-$k$ go to the lower expert index; ties in the capacity
    priority to the lower $tk + j$. The balancing loss counts the routes selected before capacity
    unless ``options.load_balancing.count_dropped_routes`` is False. The experts see
    ``RouterOutput.expert_input`` (the jittered input only with ``router.jitter_experts``).
    Runs eagerly (block boundaries are Python ints), not under ``jax.jit``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.sparse_moe import SparseMoEParams, SparseMoEOptions, sparse_moe_layer
    >>> from moeref.router import RouterOptions, RouterParams
    >>> from moeref.expert_ffn import ExpertFFNParams
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> experts = ExpertFFNParams(w_in=np.stack([np.eye(2), 2 * np.eye(2)]), w_out=np.stack([np.eye(2)] * 2))
    >>> params = SparseMoEParams(RouterParams(np.array([[1.0, 0.0], [0.0, 1.0]])), experts)
    >>> out = sparse_moe_layer(x, params, SparseMoEOptions(router=RouterOptions(k=1)))
    >>> out.routes.expert_index[:, 0].tolist(), np.round(out.y, 4).tolist()
    ([0, 1], [[0.7311, 0.0], [0.0, 1.4621]])
    """
    xp, draws = _check(x, params, options, draws)
    f = _forward(x, params, options, draws)
    r = f.router_out
    y = dispatch_combine(r.expert_input, f.routes, params.experts, options.ffn, apply_weight_to=options.apply_weight_to)  # (T, d)
    if _finite_logits(r.logits, xp):
        lb = load_balancing_loss(r.logits, f.routes, options=options.load_balancing)
        z = router_z_loss(r.logits)
        aux = options.load_balancing_coef * lb + options.z_loss_coef * z
    else:  # an expert switched off by a -inf router bias: the losses are undefined here
        if options.load_balancing_coef != 0 or options.z_loss_coef != 0:
            raise ValueError(_NON_FINITE_AUX.format(what="options.load_balancing_coef and options.z_loss_coef"))
        lb = z = None
        aux = xp.zeros((), dtype=x.dtype, device=device_of(x))
    return SparseMoEOutput(
        y, r.logits, r.scores, f.routes, f.report.counts_before, f.report.counts_after, f.report.capacity, lb, z, aux
    )


# --------------------------------------------------------------------------------------------
# VJP
# --------------------------------------------------------------------------------------------


def sparse_moe_layer_vjp(
    x: Any,
    params: SparseMoEParams,
    options: SparseMoEOptions,
    cotangent_y: Any,
    *,
    draws: SparseMoEDraws | None = None,
    aux_cotangents: SparseMoEAuxCotangents | None = None,
) -> SparseMoEGrads:
    r"""VJP of [`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] w.r.t. ``x`` and every parameter.

    The selection $e$, the capacity decisions $m$ and the draws are held fixed. With $\bar y$ and
    the cotangents $\bar{\mathcal L}_\text{balance}$, $\bar{\mathcal L}_z$ of the two unweighted
    losses:

    1. dispatch: $(\bar x^{\text{exp}}, \bar\theta_e, \bar w) =$
       [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp]$(\bar y)$, with
       $\bar w_{tj} = m_{tj}\langle \bar y_t, \mathrm{FFN}_{e_{tj}}(x_t)\rangle$;
    2. capacity: routes dropped by capacity have $\bar w = 0$; with
       ``normalize_after_capacity`` the weights were $w = \rho\,\operatorname{normalize}(g, m)$, so
       $\bar g = \rho\,$[`normalize_route_weights_vjp`][moeref.router.normalize_route_weights_vjp]$(g, m, \bar w)$;
    3. router: $(\bar x^{\text{route}}, \bar W_r, \bar b_r, \dots) =$
       [`route_weights_vjp`][moeref.router.route_weights_vjp]$(\bar g)$;
    4. auxiliary losses: $\bar z^{\text{aux}} = \bar{\mathcal L}_\text{balance}\,\partial_z \mathcal L_\text{balance}
       + \bar{\mathcal L}_z\,\partial_z \mathcal L_z$ (their VJPs), chained through
       $z = \tilde x W_r + b_r$, $\tilde x = x \odot u$:

    $$\bar W_r \mathrel{+}= \tilde x^\top \bar z^{\text{aux}}, \quad
    \bar b_r \mathrel{+}= \textstyle\sum_t \bar z^{\text{aux}}_t, \quad
    \bar x \mathrel{+}= (\bar z^{\text{aux}} W_r^\top) \odot u ;$$

    5. $\bar x = \bar x^{\text{route}} + \bar x^{\text{exp}}$ (times $u$ when the experts see the
       jittered input).

    Parameters
    ----------
    x, params, options, draws
        As in the forward.
    cotangent_y : array, shape (T, d)
        $\bar y$.
    aux_cotangents : SparseMoEAuxCotangents, optional
        $\bar{\mathcal L}_\text{balance}$ and $\bar{\mathcal L}_z$. Default: the coefficients
        $(\alpha, \beta)$ of ``options``, i.e. the gradient of the training objective
        $\langle \bar y, y\rangle + \mathcal L_\text{aux}$.

    Returns
    -------
    SparseMoEGrads

    Notes
    -----
    At a tie in the top-$k$ or the capacity priority the layer is discontinuous; this is the
    one-sided derivative with the forward's selection.
    """
    xp, draws = _check(x, params, options, draws)
    check_shape(cotangent_y, "cotangent_y", tuple(x.shape), what="the layer output, (T, d)")
    check_arrays({"x": x, "cotangent_y": cotangent_y})
    if aux_cotangents is None:
        aux_cotangents = SparseMoEAuxCotangents(options.load_balancing_coef, options.z_loss_coef)
    check_record_type(aux_cotangents, "aux_cotangents", SparseMoEAuxCotangents)
    f = _forward(x, params, options, draws)
    r = f.router_out
    rp = params.router
    rdraws = draws.router if draws.router is not None else RouterDraws()

    # 1. dispatch and combine
    dg = dispatch_combine_vjp(r.expert_input, f.routes, params.experts, options.ffn, cotangent_y, apply_weight_to=options.apply_weight_to)
    x_bar = dg.x  # (T, d)
    if options.router.jitter_experts and rdraws.jitter is not None:
        x_bar = x_bar * rdraws.jitter
    w_bar = xp.where(f.routes.kept, dg.routes.weight, xp.zeros_like(dg.routes.weight))  # (T, k)

    # 2. capacity (and the deferred normalisation)
    if options.normalize_after_capacity:
        ro = options.router
        w_bar = ro.routed_scaling_factor * normalize_route_weights_vjp(
            r.routes.weight, f.routes.kept, ro.normalize, w_bar, eps=ro.normalize_eps, p=ro.normalize_p
        )  # (T, k)

    # 3. router weights
    rg = route_weights_vjp(x, rp, options.router, r, w_bar, rdraws)
    x_bar = x_bar + rg.x
    W_bar, b_bar = rg.params.weight, rg.params.bias

    # 4. auxiliary losses through z = x~ W + b
    zero_aux = all(isinstance(c, (int, float)) and c == 0 for c in aux_cotangents)
    if not zero_aux:
        if not _finite_logits(r.logits, xp):
            raise ValueError(_NON_FINITE_AUX.format(what="aux_cotangents (default: the loss coefficients)"))
        z_bar = load_balancing_loss_vjp(r.logits, f.routes, aux_cotangents.load_balancing, options=options.load_balancing).logits
        z_bar = z_bar + router_z_loss_vjp(r.logits, aux_cotangents.z_loss).logits  # (T, E)
        W_bar = W_bar + xp.matmul(xp.matrix_transpose(r.router_input), z_bar)  # (d, E)
        if b_bar is not None:
            b_bar = b_bar + xp.sum(z_bar, axis=0)  # (E,)
        xr_bar = xp.matmul(z_bar, xp.matrix_transpose(rp.weight))  # (T, d)
        x_bar = x_bar + (xr_bar if rdraws.jitter is None else xr_bar * rdraws.jitter)
    router_grads = rg.params._replace(weight=W_bar, bias=b_bar)
    return SparseMoEGrads(x=x_bar, params=SparseMoEParams(router=router_grads, experts=dg.experts))

r"""The full sparse token-choice MoE layer: router, capacity, dispatch and combine, auxiliary losses, and its VJP.

For $T$ tokens $x_t \in \mathbb R^d$ (rows of ``x``, shape ``(T, d)``) and $E$ expert FFNs, the
layer computes

$$z = \tilde x W_r + b_r, \qquad (e_{tj}, g_{tj})_{j<k} = \operatorname{route}(z),
\qquad m_{tj} = \operatorname{capacity}(e, \text{priority}),$$

$$w_{tj} = \rho\, m_{tj}\, \operatorname{normalize}(g_t)_j, \qquad
y_t = \sum_{j=0}^{k-1} m_{tj}\, w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$$

(eq. (1) of Shazeer et al. 2017, arXiv:1701.06538; eq. (2) of Fedus, Zoph & Shazeer 2022,
"Switch Transformers", JMLR 23(120), arXiv:2101.03961), together with the auxiliary losses
$\mathcal L_\text{aux} = \alpha\, \mathcal L_\text{balance}(z, e) + \beta\, \mathcal L_z(z)$
(plus, as options, DeepSeek-V3's sequence-wise balance loss and the importance and load losses
of Shazeer et al. 2017 and V-MoE, computed from the router's own noise draws).
Each step is one of moeref's building blocks, so every convention is an explicit option there:
[`route`][moeref.router.route] ([`RouterOptions`][moeref.router.RouterOptions]),
[`apply_capacity`][moeref.capacity.apply_capacity]
([`CapacityOptions`][moeref.capacity.CapacityOptions]),
[`dispatch_combine`][moeref.dispatch.dispatch_combine]
([`ExpertFFN`][moeref.expert_ffn.ExpertFFN]) and the losses of
[`moeref.aux_losses`][moeref.aux_losses]. [`moeref.presets`][moeref.presets] fills the options
for real systems.

Shared (always-on) experts join the routed output as ``options.shared`` says
([`moeref.shared_experts`][moeref.shared_experts]: DeepSeek's ungated sum, Qwen2-MoE's sigmoid
gate, DeepSpeed's Residual MoE, NLLB-200's Conditional MoE Routing):
$y_t = a_t\, y^{\text{routed}}_t + b_t \sum_s \mathrm{FFN}^{\text{shared}}_s(x_t)$.

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
    NoisyTopKDraws,
    SequenceBalanceLossOptions,
    ShazeerLossOptions,
    importance_loss,
    importance_loss_vjp,
    load_balancing_loss,
    load_balancing_loss_vjp,
    load_loss,
    load_loss_vjp,
    router_z_loss,
    router_z_loss_vjp,
    sequence_balance_loss,
    sequence_balance_loss_vjp,
    vmoe_importance_loss,
    vmoe_importance_loss_vjp,
    vmoe_load_loss,
    vmoe_load_loss_vjp,
)
from .capacity import CapacityDraws, CapacityOptions, apply_capacity
from .core import device_of, _take_along_axis
from .dispatch import dispatch_combine, dispatch_combine_value_and_vjp, dispatch_combine_vjp
from .expert_ffn import ExpertFFN, ExpertFFNParams, RELU_FFN, _named_params, check_expert_ffn_params
from .router import (
    _check_cotangent_of,
    _check_loss_cotangent,
    RouterDraws,
    RouterOptions,
    RouterOutput,
    RouterParams,
    normalize_route_weights_vjp,
    renormalize_routes,
    route,
    route_weights_vjp,
)
from .routes import Routes
from .shared_experts import SharedExpertOptions, SharedExpertOutput, SharedExpertParams, check_shared_expert_params
from .shared_experts import _combine as _combine_shared, _named as _shared_named, _vjp as _shared_vjp
from .validation import check_arrays, check_choice, check_finite, check_float_array, check_record_type, check_shape

__all__ = [
    "SparseMoEParams",
    "SparseMoEOptions",
    "SparseMoEDraws",
    "SparseMoEOutput",
    "SparseMoEAuxCotangents",
    "SparseMoEGrads",
    "sparse_moe_layer",
    "sparse_moe_layer_vjp",
    "sparse_moe_layer_value_and_vjp",
    "GATE_LOSSES",
]

_APPLY_WEIGHT_TO = ("output", "input")
GATE_LOSSES = ("shazeer2017", "vmoe")
"""Kinds of the importance and load losses (``SparseMoEOptions.importance_loss`` / ``load_loss``)."""


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
    shared : SharedExpertParams, optional
        The shared experts and their gate; required exactly when ``options.shared`` is set.
    """

    router: RouterParams
    experts: ExpertFFNParams
    shared: SharedExpertParams | None = None


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
    shared : SharedExpertOptions or None
        Shared experts beside the routed ones (see
        [`SharedExpertOptions`][moeref.shared_experts.SharedExpertOptions]): ``"add"``
        (DeepSeek-V2/V3), ``"sigmoid_gate"`` (Qwen2-MoE), ``"residual_softmax"`` (DeepSpeed
        Residual MoE), ``"nllb_cmr"`` (NLLB-200). None (default): no shared experts (Mixtral,
        Switch, OLMoE, DBRX, GPT-OSS).
    sequence_balance : SequenceBalanceLossOptions or None
        Report DeepSeek-V3's complementary sequence-wise balance loss
        ([`sequence_balance_loss`][moeref.aux_losses.sequence_balance_loss], on the top-$k$ of
        the affinities as eq. (18) is printed; per sequence of ``sequence_length`` tokens, then
        averaged). None (default): not computed.
    sequence_balance_coef : float
        Its $\alpha$ (DeepSeek-V3 Technical Report, Sec. 4.2: $10^{-4}$); needs
        ``sequence_balance``.
    importance_loss : {None, "shazeer2017", "vmoe"}
        The importance loss, $\mathrm{CV}^2$ of the per-expert sums of the gates (None, the
        default: not computed):

        * ``"shazeer2017"``: Shazeer et al. (2017), Appendix A, eqs. (6)-(7), on the noisy
          top-$k$ softmax gates $G = \operatorname{softmax}(\operatorname{KeepTopK}(H, k))$ of the
          router's noisy logits $H$ (the clean ones without ``router.noisy_top_k``), over all $T$
          tokens ([`importance_loss`][moeref.aux_losses.importance_loss], with the conventions
          of ``shazeer_loss``); tensorflow/tensor2tensor ``expert_utils.py``
          (``cv_squared(importance)``);
        * ``"vmoe"``: Riquelme et al. (2021), Appendix A, on the **clean** softmax over all
          $E$, per routing group (``capacity.group_size``) and averaged
          ([`vmoe_importance_loss`][moeref.aux_losses.vmoe_importance_loss]); google-research/vmoe
          ``vmoe/nn/routing.py`` ``NoisyTopExpertsPerItemRouter``.
    importance_loss_coef : float
        Its weight in ``aux_loss`` ($w_\text{importance}$; tensor2tensor ``local_moe``
        ``loss_coef=1e-2``; V-MoE ``importance_loss_weight``, 0.005 in
        ``vmoe/configs/vmoe_paper/common.py``). Needs ``importance_loss``.
    load_loss : {None, "shazeer2017", "vmoe"}
        The load loss, $\mathrm{CV}^2$ of a smooth estimate of the per-expert token counts
        under the router's noise (None, the default: not computed):

        * ``"shazeer2017"``: Shazeer et al. (2017), Appendix A, eqs. (8)-(11), the normal CDF of
          the margin to the $k$-th largest noisy logit excluding the expert itself, with the
          softplus noise scale ([`load_loss`][moeref.aux_losses.load_loss]); needs
          ``router.noisy_top_k`` (its draws ``RouterDraws.noise``) and $k < E$;
        * ``"vmoe"``: Riquelme et al. (2021), Appendix A, the normal CDF of the margin to the
          $k$-th largest noisy logit with V-MoE's fixed noise std $\sigma/E$
          ([`vmoe_load_loss`][moeref.aux_losses.vmoe_load_loss]); needs
          ``router.logit_noise_std > 0`` (its draws ``RouterDraws.logit_noise``); per routing
          group and averaged.

        The noise draws are explicit (the router's), so the loss is a deterministic function of
        the logits and is differentiated in the layer VJP with the draws held fixed.
    load_loss_coef : float
        Its weight ($w_\text{load}$; tensor2tensor ``loss_coef=1e-2``; V-MoE
        ``load_loss_weight``, 0.005). Needs ``load_loss``.
    shazeer_loss : ShazeerLossOptions or None
        The $\mathrm{CV}^2$ conventions (variance, epsilons) of the ``"shazeer2017"`` losses
        ([`SHAZEER_TENSOR2TENSOR`][moeref.aux_losses.SHAZEER_TENSOR2TENSOR],
        [`SHAZEER_RAU`][moeref.aux_losses.SHAZEER_RAU],
        [`SHAZEER_PAPER`][moeref.aux_losses.SHAZEER_PAPER]); required exactly when one of them
        is ``"shazeer2017"``. Its ``noise_epsilon`` must equal ``router.noise_epsilon`` when the
        router is noisy (both are the noise floor). The ``"vmoe"`` losses have no such knobs
        (population variance, no epsilons).
    """

    router: RouterOptions = field(default_factory=RouterOptions)
    capacity: CapacityOptions = field(default_factory=_dropless)
    ffn: ExpertFFN = RELU_FFN
    apply_weight_to: str = "output"
    load_balancing: LoadBalancingLossOptions = SWITCH_TRANSFORMER
    load_balancing_coef: float = 0.0
    z_loss_coef: float = 0.0
    shared: SharedExpertOptions | None = None
    sequence_balance: SequenceBalanceLossOptions | None = None
    sequence_balance_coef: float = 0.0
    importance_loss: str | None = None
    importance_loss_coef: float = 0.0
    load_loss: str | None = None
    load_loss_coef: float = 0.0
    shazeer_loss: ShazeerLossOptions | None = None

    def __post_init__(self) -> None:
        check_record_type(self.router, "options.router", RouterOptions)
        check_record_type(self.capacity, "options.capacity", CapacityOptions)
        check_record_type(self.ffn, "options.ffn", ExpertFFN)
        check_record_type(self.load_balancing, "options.load_balancing", LoadBalancingLossOptions)
        check_choice(self.apply_weight_to, "options.apply_weight_to", _APPLY_WEIGHT_TO)
        if self.shared is not None:
            check_record_type(self.shared, "options.shared", SharedExpertOptions)
        if self.sequence_balance is not None:
            check_record_type(self.sequence_balance, "options.sequence_balance", SequenceBalanceLossOptions)
        for name in ("load_balancing_coef", "z_loss_coef", "sequence_balance_coef", "importance_loss_coef", "load_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"options.{name} must be a finite number >= 0, got {v!r}")
        if self.sequence_balance_coef != 0 and self.sequence_balance is None:
            raise ValueError("options.sequence_balance_coef needs options.sequence_balance (a SequenceBalanceLossOptions)")
        self._check_gate_losses()

    def _check_gate_losses(self) -> None:
        """The importance / load loss fields: known kinds, the router noise they need, their CV^2 options."""
        for name in ("importance_loss", "load_loss"):
            kind = getattr(self, name)
            if kind is not None:
                check_choice(kind, f"options.{name}", GATE_LOSSES)
            elif getattr(self, name + "_coef") != 0:
                raise ValueError(f"options.{name}_coef needs options.{name} ('shazeer2017' or 'vmoe')")
        r = self.router
        if self.load_loss == "shazeer2017" and not r.noisy_top_k:
            raise ValueError("options.load_loss='shazeer2017' needs options.router.noisy_top_k=True (the smooth load of the softplus noise)")
        if self.load_loss == "vmoe" and not r.logit_noise_std > 0:
            raise ValueError("options.load_loss='vmoe' needs options.router.logit_noise_std > 0 (V-MoE's load loss is defined by the noise)")
        uses_shazeer = "shazeer2017" in (self.importance_loss, self.load_loss)
        if uses_shazeer != (self.shazeer_loss is not None):
            raise ValueError(
                "options.shazeer_loss (a ShazeerLossOptions, e.g. SHAZEER_TENSOR2TENSOR) must be given exactly when "
                f"options.importance_loss or options.load_loss is 'shazeer2017' (they are {self.importance_loss!r}, {self.load_loss!r})"
            )
        if self.shazeer_loss is not None:
            check_record_type(self.shazeer_loss, "options.shazeer_loss", ShazeerLossOptions)
            if r.noisy_top_k and self.shazeer_loss.noise_epsilon != r.noise_epsilon:
                raise ValueError(
                    f"options.shazeer_loss.noise_epsilon={self.shazeer_loss.noise_epsilon!r} must equal "
                    f"options.router.noise_epsilon={r.noise_epsilon!r}: both are the floor of the router's noise scale"
                )

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
    load_balancing_loss : array, shape ()
        $\\mathcal L_\\text{balance}$ (unweighted), with ``options.load_balancing`` (an expert
        switched off by a ``-inf`` router bias has probability 0 in it).
    z_loss : array, shape ()
        $\\mathcal L_z$ (unweighted).
    aux_loss : array, shape ()
        $\\alpha\\,\\mathcal L_\\text{balance} + \\beta\\,\\mathcal L_z$, plus the sequence-wise
        balance loss, the CMR budget loss and the importance and load losses times their
        coefficients when those are on.
    sequence_balance_loss : array, shape (), or None
        DeepSeek-V3's sequence-wise balance loss (unweighted), when ``options.sequence_balance``.
    routed_y : array, shape (T, d)
        The routed experts' output alone (``y`` without shared experts).
    shared : SharedExpertOutput or None
        The shared experts' output, gate and budget loss, when ``options.shared``.
    router : RouterOutput
        The router's full output (routes before capacity, router input); the VJP reuses it.
    importance_loss : array, shape (), or None
        The importance loss (unweighted) of ``options.importance_loss``, when set.
    load_loss : array, shape (), or None
        The load loss (unweighted) of ``options.load_loss``, when set.
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
    sequence_balance_loss: Any = None
    routed_y: Any = None
    shared: SharedExpertOutput | None = None
    router: RouterOutput | None = None
    importance_loss: Any = None
    load_loss: Any = None


class SparseMoEAuxCotangents(NamedTuple):
    """Cotangents of the unweighted auxiliary losses (Python floats or 0-d arrays): balancing,
    z-loss, DeepSeek-V3 sequence-wise balance, NLLB CMR budget, importance, load."""

    load_balancing: Any = 0.0
    z_loss: Any = 0.0
    sequence_balance: Any = 0.0
    shared_budget: Any = 0.0
    importance: Any = 0.0
    load: Any = 0.0


class SparseMoEGrads(NamedTuple):
    """Cotangents of the layer's inputs: ``x (T, d)`` and ``params`` (a ``SparseMoEParams`` of
    cotangents; ``None`` where a parameter is ``None``, zeros for ``router.selection_bias``;
    ``shared`` a ``SharedExpertParams`` of cotangents when the layer has shared experts)."""

    x: Any
    params: SparseMoEParams


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


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
    # every expert weight is checked here, once: dispatch_combine is then called with check_finite=False
    named = {"x": x, "params.router.weight": params.router.weight, **_named_params(params.experts, "params.experts")}
    if (options.shared is None) != (params.shared is None):
        raise ValueError(
            "params.shared must be given exactly when options.shared is set "
            f"(options.shared is {'None' if options.shared is None else repr(options.shared.kind)}, "
            f"params.shared is {'None' if params.shared is None else 'given'})"
        )
    if params.shared is not None:
        named.update(_shared_named(params.shared, "params.shared"))
    xp = check_arrays(named)
    check_float_array(x, "x", ndim=2)
    d = x.shape[1]
    if params.shared is not None:
        check_shared_expert_params(params.shared, options.shared, d, name="params.shared")
    E_ffn, _, _ = check_expert_ffn_params(params.experts, options.ffn, d=d, name="params.experts")
    check_float_array(params.router.weight, "params.router.weight", ndim=2)
    E = params.router.weight.shape[1]
    if E_ffn != E:
        raise ValueError(f"params.experts has E={E_ffn} experts but params.router.weight has E={E} columns (shape (d, E))")
    if options.load_loss == "shazeer2017" and options.router.k >= E:
        raise ValueError(
            f"options.load_loss='shazeer2017' needs options.router.k < E (the smooth load compares with the (k+1)-th "
            f"largest noisy logit), got k={options.router.k}, E={E}"
        )
    return xp, draws


def _capacity_priority(r: RouterOutput, capacity: CapacityOptions) -> Any:
    """The router's scores of the routes when ``capacity.priority_values="router_scores"`` needs them, else None."""
    if capacity.priority_values != "router_scores" or capacity.priority not in ("batch_prioritized", "score"):
        return None
    scores = _take_along_axis(r.scores, r.routes.expert_index, axis=-1)  # (T, k) before normalisation
    return scores[:, 0] if capacity.priority == "batch_prioritized" else scores


def _forward(x: Any, params: SparseMoEParams, options: SparseMoEOptions, draws: SparseMoEDraws) -> _Forward:
    E = params.router.weight.shape[1]
    r = route(x, params.router, options.router, draws.router)  # routes (T, k); logits (T, E)
    priority = _capacity_priority(r, options.capacity)
    routes, report = apply_capacity(r.routes, E, options.capacity, priority=priority, draws=draws.capacity)  # (T, k)
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
    z-loss of Zoph et al. (2022), "ST-MoE", arXiv:2202.08906, eq. (5). With ``options.shared`` the
    output is $a_t\, y_t + b_t \sum_s \mathrm{FFN}^\text{shared}_s(x_t)$
    ([`combine_shared_experts`][moeref.shared_experts.combine_shared_experts]); with
    ``options.sequence_balance`` the aux loss adds $\alpha_\text{seq}$ times DeepSeek-V3's
    sequence-wise balance loss (DeepSeek-AI 2024, arXiv:2412.19437, eqs. (17)-(20)), with an
    NLLB CMR budget its budget loss, and with ``options.importance_loss`` / ``options.load_loss``
    the importance and load losses of Shazeer et al. (2017), Appendix A, or of Riquelme et al.
    (2021), arXiv:2106.05974, Appendix A, times their coefficients.

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
    ``RouterOutput.expert_input`` (the jittered input only with ``router.jitter_experts``); the
    shared experts and their gate see ``x``. A ``-inf`` router bias switches an expert off; the
    losses stay finite (probability 0 for it) unless every expert of a token is off (the z-loss
    is then infinite and raises). Runs eagerly (block boundaries are Python ints), not under
    ``jax.jit``.

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
    routed = dispatch_combine(f.router_out.expert_input, f.routes, params.experts, options.ffn, apply_weight_to=options.apply_weight_to,
                              check_finite=False)  # (T, d)
    return _layer_output(x, params, options, draws, f, routed, xp)


def _layer_output(
    x: Any, params: SparseMoEParams, options: SparseMoEOptions, draws: SparseMoEDraws, f: _Forward, routed: Any, xp: Any
) -> SparseMoEOutput:
    """The layer's output record from its routing ``f`` and the routed experts' output ``routed`` (T, d)."""
    r = f.router_out
    y, shared = routed, None
    if options.shared is not None:
        shared = _combine_shared(x, routed, params.shared, options.shared, xp)
        y = shared.y  # (T, d)
    lb = load_balancing_loss(r.logits, f.routes, options=options.load_balancing)
    z = router_z_loss(r.logits)
    aux = options.load_balancing_coef * lb + options.z_loss_coef * z
    seq = None
    if options.sequence_balance is not None:
        seq = sequence_balance_loss(r.logits, options.router.k, options=options.sequence_balance)
        aux = aux + options.sequence_balance_coef * seq
    if shared is not None and shared.budget_loss is not None:
        aux = aux + options.shared.budget_loss_coef * shared.budget_loss
    imp, load = _gate_losses(r, params.router, options, draws.router, xp)
    if imp is not None:
        aux = aux + options.importance_loss_coef * imp
    if load is not None:
        aux = aux + options.load_loss_coef * load
    return SparseMoEOutput(
        y, r.logits, r.scores, f.routes, f.report.counts_before, f.report.counts_after, f.report.capacity, lb, z, aux,
        sequence_balance_loss=seq, routed_y=routed, shared=shared, router=r, importance_loss=imp, load_loss=load,
    )


# --------------------------------------------------------------------------------------------
# Importance and load losses (Shazeer et al. 2017, V-MoE)
# --------------------------------------------------------------------------------------------


def _shazeer_inputs(r: RouterOutput, rp: RouterParams, options: SparseMoEOptions, rdraws: Any, xp: Any) -> tuple[Any, NoisyTopKDraws]:
    """``(x~ W_noise, draws)`` of the noisy gate; zeros for a router without noise (then H = z)."""
    if options.router.noisy_top_k:
        return xp.matmul(r.router_input, rp.noise_weight), NoisyTopKDraws(rdraws.noise)  # (T, E)
    zeros = xp.zeros(r.logits.shape, dtype=r.logits.dtype, device=device_of(r.logits))
    return zeros, NoisyTopKDraws(zeros)


def _vmoe_inputs(r: RouterOutput, options: SparseMoEOptions, rdraws: Any) -> tuple[NoisyTopKDraws, float, int | None]:
    """``(draws, noise std sigma / E, group size)`` of V-MoE's load loss."""
    E = r.logits.shape[1]
    return NoisyTopKDraws(rdraws.logit_noise), options.router.logit_noise_std / E, options.capacity.group_size


def _gate_losses(r: RouterOutput, rp: RouterParams, options: SparseMoEOptions, rdraws: Any, xp: Any) -> tuple[Any, Any]:
    """``(importance loss or None, load loss or None)`` of ``options.importance_loss`` / ``load_loss``."""
    k, imp, load = options.router.k, None, None
    if "shazeer2017" in (options.importance_loss, options.load_loss):
        noise_logits, nd = _shazeer_inputs(r, rp, options, rdraws, xp)
        if options.importance_loss == "shazeer2017":
            imp = importance_loss(r.logits, noise_logits, nd, k, options=options.shazeer_loss)
        if options.load_loss == "shazeer2017":
            load = load_loss(r.logits, noise_logits, nd, k, options=options.shazeer_loss)
    if options.importance_loss == "vmoe":
        imp = vmoe_importance_loss(r.logits, group_size=options.capacity.group_size)
    if options.load_loss == "vmoe":
        nd, std, group = _vmoe_inputs(r, options, rdraws)
        load = vmoe_load_loss(r.logits, nd, k, noise_std=std, group_size=group)
    return imp, load


def _gate_losses_vjp(
    r: RouterOutput, rp: RouterParams, options: SparseMoEOptions, rdraws: Any, aux: Any, xp: Any
) -> tuple[Any, Any]:
    """``(z_bar, h_bar)``: cotangents of the logits and of ``x~ W_noise`` from the importance and load losses (None if none)."""
    k, z_bar, h_bar = options.router.k, None, None

    def add(a: Any, b: Any) -> Any:
        return b if a is None else a + b

    if "shazeer2017" in (options.importance_loss, options.load_loss):
        noise_logits, nd = _shazeer_inputs(r, rp, options, rdraws, xp)
        for kind, ct, vjp in (("importance_loss", aux.importance, importance_loss_vjp), ("load_loss", aux.load, load_loss_vjp)):
            if getattr(options, kind) == "shazeer2017" and not _is_zero(ct):
                g = vjp(r.logits, noise_logits, nd, k, ct, options=options.shazeer_loss)
                z_bar = add(z_bar, g.clean_logits)
                if options.router.noisy_top_k:
                    h_bar = add(h_bar, g.noise_logits)
    if options.importance_loss == "vmoe" and not _is_zero(aux.importance):
        z_bar = add(z_bar, vmoe_importance_loss_vjp(r.logits, aux.importance, group_size=options.capacity.group_size).logits)
    if options.load_loss == "vmoe" and not _is_zero(aux.load):
        nd, std, group = _vmoe_inputs(r, options, rdraws)
        z_bar = add(z_bar, vmoe_load_loss_vjp(r.logits, nd, k, aux.load, noise_std=std, group_size=group).logits)
    return z_bar, h_bar


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
    output: SparseMoEOutput | None = None,
) -> SparseMoEGrads:
    r"""VJP of [`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] w.r.t. ``x`` and every parameter.

    The selection $e$, the capacity decisions $m$ and the draws are held fixed. With $\bar y$ and
    the cotangents $\bar{\mathcal L}$ of the unweighted losses:

    0. shared experts ([`combine_shared_experts_vjp`][moeref.shared_experts.combine_shared_experts_vjp]):
       $y = a \odot y^{\text{routed}} + b \odot o$ gives $\bar y^{\text{routed}} = a \odot \bar y$,
       the shared FFN and gate cotangents and their part of $\bar x$;
    1. dispatch: $(\bar x^{\text{exp}}, \bar\theta_e, \bar w) =$
       [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp]$(\bar y^{\text{routed}})$, with
       $\bar w_{tj} = m_{tj}\langle \bar y^{\text{routed}}_t, \mathrm{FFN}_{e_{tj}}(x_t)\rangle$;
    2. capacity: routes dropped by capacity have $\bar w = 0$; with
       ``normalize_after_capacity`` the weights were $w = \rho\,\operatorname{normalize}(g, m)$, so
       $\bar g = \rho\,$[`normalize_route_weights_vjp`][moeref.router.normalize_route_weights_vjp]$(g, m, \bar w)$;
    3. router: $(\bar x^{\text{route}}, \bar W_r, \bar b_r, \dots) =$
       [`route_weights_vjp`][moeref.router.route_weights_vjp]$(\bar g)$, given the forward's
       router output (no second top-$k$);
    4. auxiliary losses: $\bar z^{\text{aux}} = \bar{\mathcal L}_\text{balance}\,\partial_z \mathcal L_\text{balance}
       + \bar{\mathcal L}_z\,\partial_z \mathcal L_z + \bar{\mathcal L}_\text{seq}\,\partial_z \mathcal L_\text{seq}
       + \bar{\mathcal L}_\text{imp}\,\partial_z \mathcal L_\text{imp} + \bar{\mathcal L}_\text{load}\,\partial_z \mathcal L_\text{load}$
       (their VJPs, the noise draws held fixed), chained through $z = \tilde x W_r + b_r$,
       $\tilde x = x \odot u$; Shazeer's losses also depend on $h = \tilde x W_\text{noise}$:
       $\bar W_\text{noise} \mathrel{+}= \tilde x^\top \bar h$, $\bar x \mathrel{+}= (\bar h W_\text{noise}^\top) \odot u$;

    $$\bar W_r \mathrel{+}= \tilde x^\top \bar z^{\text{aux}}, \quad
    \bar b_r \mathrel{+}= \textstyle\sum_t \bar z^{\text{aux}}_t, \quad
    \bar x \mathrel{+}= (\bar z^{\text{aux}} W_r^\top) \odot u ;$$

    5. $\bar x = \bar x^{\text{route}} + \bar x^{\text{exp}} + \bar x^{\text{shared}}$ (the
       expert part times $u$ when the experts see the jittered input).

    Parameters
    ----------
    x, params, options, draws
        As in the forward.
    cotangent_y : array, shape (T, d)
        $\bar y$.
    aux_cotangents : SparseMoEAuxCotangents, optional
        $\bar{\mathcal L}$ of the balancing loss, the z-loss, the sequence-wise balance loss, the
        CMR budget loss and the importance and load losses. Default: their coefficients in
        ``options``, i.e. the gradient of the training objective
        $\langle \bar y, y\rangle + \mathcal L_\text{aux}$.
    output : SparseMoEOutput, optional
        The forward's output for these inputs. Its router output, routes after capacity and
        routed output are reused: the VJP then runs no top-$k$ and no capacity pass, so at a tie
        it differentiates exactly the routes the forward took. Without it the forward's routing
        is recomputed once here.

    Returns
    -------
    SparseMoEGrads

    Notes
    -----
    At a tie in the top-$k$ or the capacity priority the layer is discontinuous; this is the
    one-sided derivative with the forward's selection.
    """
    xp, draws = _check(x, params, options, draws)
    _check_cotangent_of(cotangent_y, tuple(x.shape), x, "x", name="cotangent_y", what="the layer output, like x (T, d)")
    aux_cotangents = _aux_cotangents(options, aux_cotangents, x)
    r, routes, routed_y = _forward_state(x, params, options, draws, output)
    return _layer_vjp(x, params, options, cotangent_y, draws, aux_cotangents, r, routes, routed_y, xp, with_output=False)[0]


def sparse_moe_layer_value_and_vjp(
    x: Any,
    params: SparseMoEParams,
    options: SparseMoEOptions,
    cotangent_y: Any,
    *,
    draws: SparseMoEDraws | None = None,
    aux_cotangents: SparseMoEAuxCotangents | None = None,
) -> tuple[SparseMoEOutput, SparseMoEGrads]:
    r"""The layer's output and its VJP in one call: ``(sparse_moe_layer(...), sparse_moe_layer_vjp(...))``.

    The same two records as the two calls give, bit for bit on NumPy (the equations are those of
    [`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] and
    [`sparse_moe_layer_vjp`][moeref.sparse_moe.sparse_moe_layer_vjp]), for the cost of one forward
    and one backward pass: the routing runs once, and the experts run through
    [`dispatch_combine_value_and_vjp`][moeref.dispatch.dispatch_combine_value_and_vjp], which
    computes each piece's hidden activations once for the output and the cotangents. The two
    calls one after the other compute the router and the experts' first projection twice.

    Parameters
    ----------
    x, params, options, cotangent_y, draws, aux_cotangents
        As in [`sparse_moe_layer_vjp`][moeref.sparse_moe.sparse_moe_layer_vjp].

    Returns
    -------
    output : SparseMoEOutput
    grads : SparseMoEGrads

    Notes
    -----
    With shared experts whose mixing weights depend on the routed output
    (``options.shared.kind`` ``"residual_softmax"`` or ``"nllb_cmr"``) the cotangent that reaches
    the routed experts depends on their output, so the experts' forward runs first and the VJP
    after it, as in the two calls.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.sparse_moe import SparseMoEParams, SparseMoEOptions, sparse_moe_layer, sparse_moe_layer_value_and_vjp
    >>> from moeref.router import RouterOptions, RouterParams
    >>> from moeref.expert_ffn import ExpertFFNParams
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> experts = ExpertFFNParams(w_in=np.stack([np.eye(2), 2 * np.eye(2)]), w_out=np.stack([np.eye(2)] * 2))
    >>> params = SparseMoEParams(RouterParams(np.array([[1.0, 0.0], [0.0, 1.0]])), experts)
    >>> options = SparseMoEOptions(router=RouterOptions(k=1))
    >>> out, grads = sparse_moe_layer_value_and_vjp(x, params, options, np.ones((2, 2)))
    >>> np.array_equal(out.y, sparse_moe_layer(x, params, options).y), grads.x.shape
    (True, (2, 2))
    """
    xp, draws = _check(x, params, options, draws)
    _check_cotangent_of(cotangent_y, tuple(x.shape), x, "x", name="cotangent_y", what="the layer output, like x (T, d)")
    aux_cotangents = _aux_cotangents(options, aux_cotangents, x)
    f = _forward(x, params, options, draws)
    grads, routed = _layer_vjp(x, params, options, cotangent_y, draws, aux_cotangents, f.router_out, f.routes, None, xp, with_output=True)
    return _layer_output(x, params, options, draws, f, routed, xp), grads


def _layer_vjp(
    x: Any, params: SparseMoEParams, options: SparseMoEOptions, cotangent_y: Any, draws: SparseMoEDraws,
    aux_cotangents: SparseMoEAuxCotangents, r: RouterOutput, routes: Routes, routed_y: Any, xp: Any, *, with_output: bool,
) -> tuple[SparseMoEGrads, Any]:
    """``(grads, routed output)`` of the layer from its routing; the routed output is ``routed_y``
    as given, or computed (with ``with_output``; else None)."""
    rp = params.router
    rdraws = draws.router if draws.router is not None else RouterDraws()

    # 0. shared experts
    ct_routed, x_bar, shared_grads = cotangent_y, None, None
    if options.shared is not None:
        if routed_y is None and options.shared.kind in ("residual_softmax", "nllb_cmr"):  # a_t depends on x
            routed_y = dispatch_combine(r.expert_input, routes, params.experts, options.ffn, apply_weight_to=options.apply_weight_to,
                                        check_finite=False)
        sg = _shared_vjp(x, routed_y, params.shared, options.shared, cotangent_y, aux_cotangents.shared_budget, xp)
        ct_routed, x_bar, shared_grads = sg.routed_y, sg.x, sg.params

    # 1. dispatch and combine
    if with_output and routed_y is None:
        routed_y, dg = dispatch_combine_value_and_vjp(r.expert_input, routes, params.experts, options.ffn, ct_routed,
                                                      apply_weight_to=options.apply_weight_to, check_finite=False)
    else:
        dg = dispatch_combine_vjp(r.expert_input, routes, params.experts, options.ffn, ct_routed, apply_weight_to=options.apply_weight_to,
                                  check_finite=False)
    x_exp = dg.x  # (T, d)
    if options.router.jitter_experts and rdraws.jitter is not None:
        x_exp = x_exp * rdraws.jitter
    x_bar = x_exp if x_bar is None else x_bar + x_exp
    w_bar = xp.where(routes.kept, dg.routes.weight, xp.zeros_like(dg.routes.weight))  # (T, k)

    # 2. capacity (and the deferred normalisation)
    if options.normalize_after_capacity:
        ro = options.router
        w_bar = ro.routed_scaling_factor * normalize_route_weights_vjp(
            r.routes.weight, routes.kept, ro.normalize, w_bar, eps=ro.normalize_eps, p=ro.normalize_p
        )  # (T, k)

    # 3. router weights, with the forward's selection
    rg = route_weights_vjp(x, rp, options.router, r, w_bar, rdraws)
    x_bar = x_bar + rg.x
    W_bar, b_bar = rg.params.weight, rg.params.bias

    # 4. auxiliary losses through z = x~ W + b (and the importance / load losses through x~ W_noise)
    z_bar = _aux_logits_cotangent(r.logits, routes, options, aux_cotangents, xp)  # (T, E) or None
    gate_z_bar, h_bar = _gate_losses_vjp(r, rp, options, rdraws, aux_cotangents, xp)
    if gate_z_bar is not None:
        z_bar = gate_z_bar if z_bar is None else z_bar + gate_z_bar
    noise_weight_bar = rg.params.noise_weight
    if h_bar is not None:
        noise_weight_bar = noise_weight_bar + xp.matmul(xp.matrix_transpose(r.router_input), h_bar)  # (d, E)
        xh_bar = xp.matmul(h_bar, xp.matrix_transpose(rp.noise_weight))  # (T, d)
        x_bar = x_bar + (xh_bar if rdraws.jitter is None else xh_bar * rdraws.jitter)
    if z_bar is not None:
        W_bar = W_bar + xp.matmul(xp.matrix_transpose(r.router_input), z_bar)  # (d, E)
        if b_bar is not None:
            b_bar = b_bar + xp.sum(z_bar, axis=0)  # (E,)
        xr_bar = xp.matmul(z_bar, xp.matrix_transpose(rp.weight))  # (T, d)
        x_bar = x_bar + (xr_bar if rdraws.jitter is None else xr_bar * rdraws.jitter)
    router_grads = rg.params._replace(weight=W_bar, bias=b_bar, noise_weight=noise_weight_bar)
    return SparseMoEGrads(x=x_bar, params=SparseMoEParams(router=router_grads, experts=dg.experts, shared=shared_grads)), routed_y


def _is_zero(c: Any) -> bool:
    return isinstance(c, (int, float)) and c == 0


def _aux_cotangents(options: SparseMoEOptions, aux: SparseMoEAuxCotangents | None, x: Any) -> SparseMoEAuxCotangents:
    """The given cotangents, checked against the losses the options compute; default: the coefficients."""
    budget_coef = 0.0 if options.shared is None else options.shared.budget_loss_coef
    if aux is None:
        return SparseMoEAuxCotangents(
            options.load_balancing_coef, options.z_loss_coef, options.sequence_balance_coef, budget_coef,
            options.importance_loss_coef, options.load_loss_coef,
        )
    check_record_type(aux, "aux_cotangents", SparseMoEAuxCotangents)
    for name, value in zip(SparseMoEAuxCotangents._fields, aux):
        _check_loss_cotangent(value, x, "x", name=f"aux_cotangents.{name}")
    for name, kind in (("importance", options.importance_loss), ("load", options.load_loss)):
        if kind is None and not _is_zero(getattr(aux, name)):
            raise ValueError(f"aux_cotangents.{name} is nonzero but options.{name}_loss is None (the loss is not computed)")
    if options.sequence_balance is None and not _is_zero(aux.sequence_balance):
        raise ValueError("aux_cotangents.sequence_balance is nonzero but options.sequence_balance is None (the loss is not computed)")
    if (options.shared is None or options.shared.budget is None) and not _is_zero(aux.shared_budget):
        raise ValueError("aux_cotangents.shared_budget is nonzero but there is no CMR budget loss (options.shared.budget is None)")
    return aux


def _forward_state(x: Any, params: SparseMoEParams, options: SparseMoEOptions, draws: SparseMoEDraws, output: Any) -> tuple[Any, Routes, Any]:
    """``(router output, routes after capacity, routed output or None)``, from ``output`` when given."""
    if output is None:
        f = _forward(x, params, options, draws)
        return f.router_out, f.routes, None
    check_record_type(output, "output", SparseMoEOutput)
    if output.router is None:
        raise ValueError("output.router is None: pass the SparseMoEOutput that sparse_moe_layer returned for these inputs")
    check_record_type(output.router, "output.router", RouterOutput)
    T, k = x.shape[0], options.router.k
    check_shape(output.routes.expert_index, "output.routes.expert_index", (T, k), what=f"T={T} tokens, options.router.k={k}")
    check_shape(output.routes.kept, "output.routes.kept", (T, k), what=f"T={T} tokens, options.router.k={k}")
    # the dispatch VJP runs without its own finiteness check: the arrays it reads from `output` are checked here
    check_finite(output.routes.weight, "output.routes.weight")
    check_finite(output.router.expert_input, "output.router.expert_input")
    return output.router, output.routes, output.routed_y


def _aux_logits_cotangent(logits: Any, routes: Routes, options: SparseMoEOptions, aux: SparseMoEAuxCotangents, xp: Any) -> Any:
    """$\bar z$ of the balancing, z- and sequence-wise losses; None when every cotangent is 0."""
    z_bar = None
    if not _is_zero(aux.load_balancing):
        z_bar = load_balancing_loss_vjp(logits, routes, aux.load_balancing, options=options.load_balancing).logits
    if not _is_zero(aux.z_loss):
        g = router_z_loss_vjp(logits, aux.z_loss).logits
        z_bar = g if z_bar is None else z_bar + g
    if not _is_zero(aux.sequence_balance):
        g = sequence_balance_loss_vjp(logits, options.router.k, aux.sequence_balance, options=options.sequence_balance).logits
        z_bar = g if z_bar is None else z_bar + g
    return z_bar

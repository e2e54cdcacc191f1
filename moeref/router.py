r"""Token-choice routers: which $k$ of $E$ experts each token goes to, and with what weight.

For $T$ tokens $x_t \in \mathbb R^d$ (rows of ``x``, shape ``(T, d)``) and $E$ experts, a router
computes logits

$$z_t = x_t W_r + b_r \in \mathbb R^{E},$$

turns them into scores $s_t = \phi(z_t)$, selects the $k$ best experts per token and returns
the combine weight of each selected expert. Real systems differ in every one of these steps:
the score function (softmax over all $E$, or over the $k$ winners only; sigmoid), what the
top-$k$ runs on (scores, logits, scores plus a selection-only bias, group-limited), how the $k$
weights are renormalised, the noise that is added and where. Each of those conventions is an
explicit field of [`RouterOptions`][moeref.router.RouterOptions], documented with the systems
that use each value. All randomness comes in as explicit draws
([`RouterDraws`][moeref.router.RouterDraws]); nothing here samples.

The result is a [`Routes`][moeref.routes.Routes] record of shape ``(T, k)`` that the capacity
step ([`moeref.capacity`][moeref.capacity]) and the dispatch read.

**Ties: the lower expert index wins**, everywhere: in the top-$k$, in the group top-$k$, and
when a softmax or sigmoid maps distinct logits to equal scores (underflow). Selection is built
on [`core.top_k`][moeref.core.top_k] (a stable sort), never on a library's ``topk``, so the
chosen experts do not depend on the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import array_namespace, device_of, sigmoid, softmax, softmax_vjp, softplus, _take_along_axis, top_k
from .routes import Routes, check_routes
from .validation import (
    check_array,
    check_arrays,
    check_choice,
    check_cotangent,
    check_finite,
    check_float_array,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "RouterParams",
    "RouterDraws",
    "RouterOptions",
    "RouterOutput",
    "RouterGrads",
    "route",
    "route_weights_vjp",
    "normalize_route_weights",
    "normalize_route_weights_vjp",
    "renormalize_routes",
    "SCORE_FUNCTIONS",
    "SELECTIONS",
    "GROUP_SCORES",
    "NORMALIZATIONS",
    "GUMBEL_MODES",
    "SECOND_EXPERT_POLICIES",
]

SCORE_FUNCTIONS = ("softmax", "topk_softmax", "sigmoid", "topk_sigmoid", "none")
SELECTIONS = ("scores", "logits")
GROUP_SCORES = ("max", "top2_sum")
NORMALIZATIONS = ("none", "sum", "sum_plus_eps", "sum_clamp", "lp")
GUMBEL_MODES = ("none", "selection", "selection_after_first", "selection_and_weights")
SECOND_EXPERT_POLICIES = ("all", "none", "threshold", "random")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class RouterParams(NamedTuple):
    r"""Parameters of a linear router over $E$ experts.

    Attributes
    ----------
    weight : array, shape (d, E)
        $W_r$; column $e$ gives expert $e$'s logit $z_{te} = x_t \cdot W_{r,:e}$.
    bias : array, shape (E,), optional
        $b_r$, added to the logits (GPT-OSS has one; Mixtral, DeepSeek-V3, Switch do not).
        ``-inf`` switches an expert off: it is never routed to (see
        [`route`][moeref.router.route], Notes). Enters the weights and the selection.
    noise_weight : array, shape (d, E), optional
        $W_\text{noise}$ of the noisy top-$k$ gate of Shazeer et al. (2017), eq. (4); required
        when ``options.noisy_top_k`` is True and rejected otherwise.
    selection_bias : array, shape (E,), optional
        A bias added to the values the top-$k$ runs on **only**: it changes which experts win,
        never their weights (DeepSeek-V3's ``e_score_correction_bias``, the auxiliary-loss-free
        balancing bias of Wang et al. 2024, arXiv:2408.15664). It receives a zero gradient.
    """

    weight: Any
    bias: Any = None
    noise_weight: Any = None
    selection_bias: Any = None


class RouterDraws(NamedTuple):
    r"""Explicit random draws for the router (every field optional; each is required exactly when
    the option that uses it is on, and rejected otherwise).

    Attributes
    ----------
    jitter : array, shape (T, d)
        Multiplicative input-jitter factors, each in $[1 - \varepsilon, 1 + \varepsilon]$ with
        $\varepsilon$ = ``options.input_jitter`` (draw them as ``uniform(1 - eps, 1 + eps)``).
    noise : array, shape (T, E)
        Standard normal draws of the noisy top-$k$ gate (``options.noisy_top_k``).
    logit_noise : array, shape (T, E)
        Standard normal draws for fixed-std logit noise (``options.logit_noise_std``).
    gumbel : array, shape (T, E)
        Standard Gumbel draws $-\log(-\log U)$ (``options.gumbel``).
    second_expert_uniform : array, shape (T,)
        Uniform draws in $[0, 1)$ for ``options.second_expert_policy = "random"``.
    """

    jitter: Any = None
    noise: Any = None
    logit_noise: Any = None
    gumbel: Any = None
    second_expert_uniform: Any = None


@dataclass(frozen=True)
class RouterOptions:
    r"""Conventions of a token-choice router. Every field is a choice some real system makes.

    Sources read (file and commit listed in the router documentation page):
    HF transformers ``modeling_mixtral.py``, ``modeling_olmoe.py``, ``modeling_dbrx.py``,
    ``modeling_gpt_oss.py``, ``modeling_llama4.py``, ``modeling_deepseek_v3.py`` (and
    ``modeling_qwen2_moe.py``, ``modeling_switch_transformers.py`` as quoted in public copies);
    deepseek-ai/DeepSeek-V3
    ``inference/model.py``; DeepSpeed ``deepspeed/moe/sharded_moe.py``; fairseq
    ``fairseq/modules/moe/top2gate.py``; tensorflow/mesh ``mesh_tensorflow/transformer/moe.py``;
    google/flaxformer ``flaxformer/architectures/moe/routing.py``; google-research/vmoe
    ``vmoe/nn/routing.py``; databricks/megablocks ``megablocks/layers/router.py``.

    Attributes
    ----------
    k : int
        Routes per token (``num_experts_per_tok``, ``moe_top_k``, ``num_selected_experts``).
    score : str
        The score function $\phi$:

        * ``"softmax"``: $s = \operatorname{softmax}(z)$ over all $E$, then top-$k$ of $s$
          (Switch, GShard/Mesh-TF, DeepSpeed, fairseq, Mixtral, Qwen2-MoE, OLMoE, DBRX,
          Megablocks, V-MoE, flaxformer);
        * ``"topk_softmax"``: top-$k$ of $z$, then softmax over the $k$ winners only
          (GPT-OSS ``GptOssTopKRouter``; Shazeer et al. 2017's KeepTopK-then-softmax). It equals
          ``"softmax"`` followed by ``normalize="sum"`` (Mixtral) in exact arithmetic;
        * ``"sigmoid"``: $s = \sigma(z)$ elementwise (DeepSeek-V3);
        * ``"topk_sigmoid"``: top-$k$ of $z$, then $\sigma$ of the $k$ winners (Llama 4
          ``Llama4Router``);
        * ``"none"``: $s = z$ (raw logits as weights).
    selection : str or None
        What the top-$k$ runs on: ``"scores"`` or ``"logits"``; ``None`` (default) means
        ``"scores"`` for ``softmax``/``sigmoid``/``none`` and ``"logits"`` for the
        ``topk_*`` functions (the only choice there). On ``"scores"`` two logits that a softmax
        maps to equal probabilities (both underflow to 0) tie, and the lower index wins.
    n_group, topk_group : int or None
        Group-limited routing (DeepSeek-V2/V3 ``n_group``, ``topk_group``): the $E$ experts are
        split into ``n_group`` contiguous groups, each token keeps the ``topk_group`` best groups
        and picks its $k$ experts inside them. Both or neither.
    group_score : str
        A group's score: ``"max"`` of its selection values (DeepSeek-V2; DeepSeek-V3
        ``inference/model.py`` when there is no correction bias) or ``"top2_sum"``, the sum of
        its two largest (DeepSeek-V3 with ``e_score_correction_bias``; HF
        ``DeepseekV3TopkRouter`` always).
    group_masked_score : float
        Value given to experts of the groups left out before the expert top-$k$: ``-inf``
        (deepseek-ai/DeepSeek-V3 ``inference/model.py``; transformers v5.24.0
        ``DeepseekV3TopkRouter.forward``) or ``0.0`` (``DeepseekV3TopkRouter.get_topk_indices``
        of older transformers releases). They differ only when a selection value is negative (a
        negative correction bias).
    normalize : str
        Renormalisation of the $k$ gathered weights $g_{t1..k}$ (see
        [`normalize_route_weights`][moeref.router.normalize_route_weights]): ``"none"``
        (Switch, V-MoE, flaxformer, Llama 4, OLMoE/Qwen2-MoE with ``norm_topk_prob=False``);
        ``"sum"`` (Mixtral, OLMoE/Qwen2-MoE with ``norm_topk_prob=True``, DeepSeek-V3
        ``inference/model.py``); ``"sum_plus_eps"``, dividing by $\sum g + \epsilon$
        (HF DeepSeek-V3: ``1e-20``; Mesh-TF top-2: ``1e-9``); ``"sum_clamp"``, dividing by
        $\max(\sum g, \epsilon)$ (fairseq, DeepSpeed top-2 / top-k:
        $\epsilon$ = ``torch.finfo(dtype).eps``); ``"lp"``, dividing by
        $\lVert g\rVert_p$ (DBRX / Megablocks ``moe_normalize_expert_weights``).
    normalize_eps : float or "finfo_eps" or None
        The $\epsilon$ of ``"sum_plus_eps"`` / ``"sum_clamp"`` (required for those);
        ``"finfo_eps"`` takes the machine epsilon of the weights' dtype.
    normalize_p : float
        The $p > 0$ of ``"lp"`` (DBRX uses 1).
    routed_scaling_factor : float
        Multiplies every weight after normalisation (DeepSeek-V3 ``routed_scaling_factor``,
        2.5 in the HF config; ``route_scale`` in ``inference/model.py``).
    normalize_after_capacity : bool
        If True the router returns the gathered weights unnormalised and unscaled, and the
        layer renormalises over the routes that survive capacity with
        [`renormalize_routes`][moeref.router.renormalize_routes] (fairseq's default
        ``normalize_gate_prob_before_dropping=False``; DeepSpeed ``top2gating`` /
        ``topkgating``). False: normalise before dropping (Mesh-TF, fairseq with
        ``normalize_gate_prob_before_dropping=True``).
    noisy_top_k : bool
        Shazeer et al. (2017) eq. (4): $H = z + \mathcal N(0,1)\cdot
        \operatorname{softplus}(x W_\text{noise})$, used for selection and weights; needs
        ``params.noise_weight`` and ``draws.noise``. Pair with ``score="topk_softmax"`` for
        their eq. (3)-(5).
    noise_epsilon : float
        A floor $\epsilon \ge 0$ added to the noisy top-$k$ gate's noise scale,
        $H = z + \mathcal N(0,1)\cdot(\operatorname{softplus}(x W_\text{noise}) + \epsilon)$:
        0 in the paper's eq. (4) (the default); ``1e-2`` in tensorflow/tensor2tensor
        ``tensor2tensor/utils/expert_utils.py`` (``noisy_top_k_gating(..., noise_epsilon=1e-2)``)
        and in davidmrau/mixture-of-experts ``moe.py``. Needs ``noisy_top_k`` when positive.
    input_jitter : float
        $\varepsilon$ of multiplicative input jitter $\tilde x = x \odot u$,
        $u \in [1-\varepsilon, 1+\varepsilon]$ (``draws.jitter``): Switch / flaxformer
        ``jitter_noise``, DeepSpeed ``noisy_gate_policy="Jitter"`` (1e-2), Mixtral
        ``router_jitter_noise``, DBRX / Megablocks ``moe_jitter_eps``. 0 disables.
    jitter_experts : bool
        Whether the experts see the jittered input too; returned as
        ``RouterOutput.expert_input`` for the layer. False: flaxformer, DeepSpeed and Megablocks
        jitter a copy used by the router only. True: HF Mixtral and DBRX multiply
        ``hidden_states`` in place, so the experts see it.
    logit_noise_std : float
        V-MoE noise (``vmoe/nn/routing.py`` ``NoisyTopExpertsPerItemRouter``): logits
        $+\,(\sigma / E)\,\mathcal N(0, 1)$ (``draws.logit_noise``), used for selection and
        weights. V-MoE's default $\sigma$ is 1. 0 disables.
    gumbel : str
        Gumbel noise $G$ (``draws.gumbel``): ``"none"``; ``"selection"``, the $k$ experts are
        the top-$k$ of $z + G$ (a sample without replacement from $\operatorname{softmax}(z)$;
        DeepSpeed ``top1gating`` with ``noisy_gate_policy="RSample"``), weights from the
        noise-free scores; ``"selection_after_first"``, rank 0 is chosen noise-free and ranks
        $1..k-1$ are the top-$(k-1)$ of $z + G$ among the others (fairseq
        ``second_expert_policy="sampling"``, DeepSpeed ``top2_2nd_expert_sampling``);
        ``"selection_and_weights"``, $z + G$ replaces $z$ everywhere.
    second_expert_policy : str
        GShard's rule for the rank-1 route when $k = 2$ (Lepikhin et al. 2020, Algorithm 1;
        Mesh-TF ``_top_2_gating``): ``"all"`` keep it; ``"none"`` drop it; ``"threshold"``
        keep it iff $g_2 > \theta$; ``"random"`` keep it iff $U < g_2 / \theta$
        (``draws.second_expert_uniform``). $g_2$ is the rank-1 weight after ``normalize``
        (before the scaling factor; the raw gathered weight with ``normalize_after_capacity``):
        Mesh-TF normalises by $g_1 + g_2 + 10^{-9}$ first. fairseq's
        ``second_expert_policy="random"`` keeps it iff $2 g_2 > U$: this is ``"random"`` with
        $\theta = 0.5$. A dropped route gets ``kept=False`` and weight 0.
    second_expert_threshold : float
        $\theta \ge 0$ (Mesh-TF ``moe_second_threshold_train``, default 0.2); $\theta > 0$ for
        ``"random"``, which divides by it. Checked whatever the policy.
    """

    k: int = 1
    score: str = "softmax"
    selection: str | None = None
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "max"
    group_masked_score: float = -math.inf
    normalize: str = "none"
    normalize_eps: float | str | None = None
    normalize_p: float = 1.0
    routed_scaling_factor: float = 1.0
    normalize_after_capacity: bool = False
    noisy_top_k: bool = False
    noise_epsilon: float = 0.0
    input_jitter: float = 0.0
    jitter_experts: bool = False
    logit_noise_std: float = 0.0
    gumbel: str = "none"
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2

    def __post_init__(self) -> None:
        check_positive_int(self.k, "options.k")
        check_choice(self.score, "options.score", SCORE_FUNCTIONS)
        if self.selection is not None:
            check_choice(self.selection, "options.selection", SELECTIONS)
            if self.score.startswith("topk_") and self.selection != "logits":
                raise ValueError(
                    f"options.selection must be 'logits' (or None) with options.score={self.score!r}: "
                    "the score is computed from the k winning logits only"
                )
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("options.n_group and options.topk_group must be given together (group-limited routing) or both be None")
        if self.n_group is not None:
            check_positive_int(self.n_group, "options.n_group")
            check_positive_int(self.topk_group, "options.topk_group", maximum=self.n_group)
        check_choice(self.group_score, "options.group_score", GROUP_SCORES)
        if not isinstance(self.group_masked_score, (int, float)) or math.isnan(self.group_masked_score):
            raise ValueError(f"options.group_masked_score must be a number (-inf or 0.0), got {self.group_masked_score!r}")
        check_choice(self.normalize, "options.normalize", NORMALIZATIONS)
        _check_eps(self.normalize, self.normalize_eps, "options.normalize_eps")
        _check_p(self.normalize_p, "options.normalize_p")
        _check_finite_number(self.routed_scaling_factor, "options.routed_scaling_factor")
        _check_nonnegative(self.noise_epsilon, "options.noise_epsilon")
        if self.noise_epsilon > 0 and not self.noisy_top_k:
            raise ValueError(f"options.noise_epsilon={self.noise_epsilon!r} is the noise floor of the noisy top-k gate and needs options.noisy_top_k=True")
        _check_nonnegative(self.input_jitter, "options.input_jitter")
        if self.input_jitter >= 1:
            raise ValueError(f"options.input_jitter must be below 1 (factors in [1 - eps, 1 + eps] stay positive), got {self.input_jitter!r}")
        _check_nonnegative(self.logit_noise_std, "options.logit_noise_std")
        check_choice(self.gumbel, "options.gumbel", GUMBEL_MODES)
        if self.gumbel == "selection_after_first" and self.k < 2:
            raise ValueError("options.gumbel='selection_after_first' needs options.k >= 2 (rank 0 is chosen without noise)")
        if self.gumbel in ("selection", "selection_after_first") and self.n_group is not None:
            raise ValueError("Gumbel selection noise cannot be combined with group-limited routing (no system does this)")
        check_choice(self.second_expert_policy, "options.second_expert_policy", SECOND_EXPERT_POLICIES)
        if self.second_expert_policy != "all" and self.k != 2:
            raise ValueError(
                f"options.second_expert_policy={self.second_expert_policy!r} is GShard's top-2 rule and needs options.k == 2, got k={self.k}"
            )
        _check_threshold(self.second_expert_threshold, self.second_expert_policy)

    @property
    def effective_selection(self) -> str:
        """``selection`` with ``None`` resolved (``"logits"`` for the ``topk_*`` scores, else ``"scores"``)."""
        if self.selection is not None:
            return self.selection
        return "logits" if self.score.startswith("topk_") else "scores"


class RouterOutput(NamedTuple):
    """Everything a router computes, for the layer, the auxiliary losses and the tests.

    Attributes
    ----------
    logits : array, shape (T, E)
        $z = \\tilde x W_r + b_r$ (on the jittered input when ``input_jitter > 0``), before any
        logit noise.
    noisy_logits : array, shape (T, E)
        The logits the scores are computed from: ``logits`` plus the noisy top-$k$ term, the
        V-MoE noise and (``gumbel="selection_and_weights"``) the Gumbel draws; equal to
        ``logits`` without noise.
    scores : array, shape (T, E)
        $s = \\phi$(``noisy_logits``). For ``topk_softmax`` / ``topk_sigmoid``: the score of
        each selected expert and 0 elsewhere (GPT-OSS ``router_scores``, Llama 4).
    selection_scores : array, shape (T, E)
        The values the top-$k$ ran on (scores or logits, plus the selection bias, with left-out
        groups set to ``group_masked_score`` and switched-off experts, whose logit is $-\\infty$,
        set to $-\\infty$). With ``gumbel="selection"`` they are
        ``noisy_logits`` plus the Gumbel draws (plus the selection bias); with
        ``gumbel="selection_after_first"`` the noise-free values rank 0 was chosen from.
    routes : Routes
        ``expert_index`` (T, k) in rank order; ``weight`` (T, k) after normalisation and scaling
        (unless ``normalize_after_capacity``), 0 where dropped; ``kept`` (T, k), False where the
        second-expert policy dropped the route or where the token had fewer than $k$ selectable
        experts (the route goes to a switched-off expert); ``position`` all 0 (capacity fills
        it in).
    router_input : array, shape (T, d)
        $\\tilde x$, the (possibly jittered) input the logits were computed from.
    expert_input : array, shape (T, d)
        What the experts should see: ``router_input`` if ``options.jitter_experts`` else ``x``.
    """

    logits: Any
    noisy_logits: Any
    scores: Any
    selection_scores: Any
    routes: Routes
    router_input: Any
    expert_input: Any


class RouterGrads(NamedTuple):
    """Cotangents of [`route_weights_vjp`][moeref.router.route_weights_vjp]'s differentiable inputs.

    ``params`` mirrors [`RouterParams`][moeref.router.RouterParams]: ``None`` where the parameter
    is ``None``; ``selection_bias`` gets zeros (it never enters a weight).
    """

    x: Any
    params: RouterParams


# --------------------------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_finite_number(v: Any, name: str) -> None:
    if not _is_number(v) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")


def _check_nonnegative(v: Any, name: str) -> None:
    _check_finite_number(v, name)
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v!r}")


def _check_threshold(theta: Any, policy: str) -> None:
    """$\\theta$ of the second-expert policy: a finite number $\\ge 0$ (``> 0`` for ``"random"``, which divides by it)."""
    name = "options.second_expert_threshold"
    if not _is_number(theta) or not math.isfinite(theta) or theta < 0 or (policy == "random" and theta == 0):
        valid = "a finite number > 0 (the 'random' policy keeps the route iff U < g_2 / theta)" if policy == "random" else (
            "a finite number >= 0 (GShard's theta, compared with the rank-1 weight g_2 >= 0; Mesh-TF uses 0.2)"
        )
        raise ValueError(f"{name} must be {valid}, got {theta!r}")


def _check_eps(mode: str, eps: Any, name: str) -> None:
    if mode in ("sum_plus_eps", "sum_clamp"):
        if eps is None:
            raise ValueError(
                f"{name} is required with normalize={mode!r}: a positive float (1e-20 HF DeepSeek-V3, 1e-9 Mesh-TF) "
                "or 'finfo_eps' (fairseq, DeepSpeed)"
            )
        if eps == "finfo_eps":
            return
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"{name} must be a positive float or 'finfo_eps', got {eps!r}")


def _check_p(p: Any, name: str) -> None:
    if not _is_number(p) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {p!r}")


# --------------------------------------------------------------------------------------------
# Cotangent checks (shared with aux_losses, shared_experts and sparse_moe)
# --------------------------------------------------------------------------------------------


def _check_cotangent_of(cotangent: Any, expected: tuple, like: Any, like_name: str, *, name: str = "cotangent", what: str = "") -> Any:
    """``validation.check_cotangent`` with the forward's argument named in the library and dtype errors.

    ``like`` is the forward's floating-point argument ``like_name`` whose library and dtype the
    cotangent must have (a float32 ``x`` with a float64 cotangent names ``x``). Returns the namespace.
    """
    check_array(cotangent, name)
    check_array(like, like_name)
    array_namespace(like, cotangent, names=(like_name, name))
    check_float_array(cotangent, name)
    if str(cotangent.dtype) != str(like.dtype):
        raise TypeError(f"{name} has dtype {cotangent.dtype} but {like_name} has dtype {like.dtype} (a cotangent has the dtype of the forward's output)")
    return check_cotangent(cotangent, expected, like, name=name, what=what)


def _check_loss_cotangent(cotangent: Any, like: Any, like_name: str, *, name: str = "cotangent") -> None:
    """The cotangent of a scalar loss: a finite Python number, or a finite 0-d array of ``like``'s library and dtype."""
    if isinstance(cotangent, (int, float)) and not isinstance(cotangent, bool):
        if not math.isfinite(cotangent):
            raise ValueError(f"{name} must be a finite number, got {cotangent!r}")
        return
    _check_cotangent_of(cotangent, (), like, like_name, name=name, what="the loss is a scalar")


def _check_scalar_cotangent(cotangent: Any, like: Any, like_name: str, *, name: str = "cotangent") -> Any:
    """`_check_loss_cotangent`, then the cotangent as a 0-d array of ``like``'s dtype and device."""
    _check_loss_cotangent(cotangent, like, like_name, name=name)
    if isinstance(cotangent, (int, float)):
        xp = array_namespace(like, names=(like_name,))
        return xp.asarray(float(cotangent), dtype=like.dtype, device=device_of(like))
    return cotangent


# --------------------------------------------------------------------------------------------
# Weight normalisation (also used by the layer after capacity)
# --------------------------------------------------------------------------------------------


def _eps_value(eps: Any, xp: Any, dtype: Any) -> float:
    return float(xp.finfo(dtype).eps) if eps == "finfo_eps" else float(eps)


def _norm_denominator(w: Any, mode: str, eps: Any, p: float, xp: Any) -> tuple[Any, Any]:
    """``(S, dS/dw)`` of the normaliser ``S`` over the last axis (``w`` already 0 where dropped)."""
    if mode in ("sum", "sum_plus_eps", "sum_clamp"):
        total = xp.sum(w, axis=-1, keepdims=True)  # (T, 1)
        ones = xp.ones_like(w)
        if mode == "sum":
            return total, ones
        e = _eps_value(eps, xp, w.dtype)
        if mode == "sum_plus_eps":
            return total + e, ones
        above = total > e  # clamp: S = max(sum, eps); constant (no gradient) below eps
        return xp.where(above, total, xp.full_like(total, e)), xp.where(above, ones, xp.zeros_like(w))
    # "lp": S = (sum |w|^p)^(1/p)
    a = xp.abs(w)
    nonzero = a > 0
    safe_a = xp.where(nonzero, a, xp.ones_like(a))
    total = xp.sum(xp.where(nonzero, safe_a**p, xp.zeros_like(a)), axis=-1, keepdims=True)  # (T, 1)
    S = total ** (1.0 / p)
    positive = S > 0
    safe_S = xp.where(positive, S, xp.ones_like(S))
    # dS/dw_i = sign(w_i) |w_i|^(p-1) S^(1-p)
    dS = xp.where(nonzero, xp.sign(w) * safe_a ** (p - 1.0), xp.zeros_like(w)) * safe_S ** (1.0 - p)
    return S, xp.where(positive, dS, xp.zeros_like(dS))


def _check_normalize_args(weight: Any, kept: Any, mode: str, eps: Any, p: float) -> Any:
    xp = array_namespace(weight, kept, names=("weight", "kept"))
    check_arrays({"weight": weight})
    check_float_array(weight, "weight", ndim=2)
    check_choice(mode, "mode", NORMALIZATIONS)
    _check_eps(mode, eps, "eps")
    _check_p(p, "p")
    if kept is not None:
        check_shape(kept, "kept", tuple(weight.shape), what="one flag per route of weight")
        if kept.dtype != xp.bool:
            raise TypeError(f"kept must be a bool array, got {kept.dtype}")
    return xp


def normalize_route_weights(weight: Any, kept: Any = None, mode: str = "sum", *, eps: Any = None, p: float = 1.0) -> Any:
    r"""Renormalise each token's $k$ route weights over the routes that are kept.

    With $g_{tj}$ the weights, $m_{tj} \in \{0, 1\}$ the ``kept`` flags and
    $\bar g_{tj} = m_{tj} g_{tj}$:

    $$w_{tj} = \frac{\bar g_{tj}}{S_t}, \qquad
    S_t = \begin{cases}
    \sum_j \bar g_{tj} & \texttt{"sum"} \\
    \sum_j \bar g_{tj} + \epsilon & \texttt{"sum\_plus\_eps"} \\
    \max\!\big(\sum_j \bar g_{tj}, \epsilon\big) & \texttt{"sum\_clamp"} \\
    \big(\sum_j |\bar g_{tj}|^p\big)^{1/p} & \texttt{"lp"}
    \end{cases}$$

    and $w = \bar g$ for ``"none"``. Which systems use which mode is listed under
    ``RouterOptions.normalize``. The layer calls this after capacity dropping when the router
    deferred normalisation (``normalize_after_capacity=True``).

    Parameters
    ----------
    weight : array, shape (T, k)
    kept : bool array, shape (T, k), optional
        Routes to normalise over (default: all). Dropped routes get weight 0.
    mode : str
        ``"none"``, ``"sum"``, ``"sum_plus_eps"``, ``"sum_clamp"`` or ``"lp"``.
    eps : float or "finfo_eps"
        Required for ``"sum_plus_eps"`` and ``"sum_clamp"``; ``"finfo_eps"`` is the machine
        epsilon of ``weight.dtype`` (``torch.finfo(dtype).eps`` in fairseq and DeepSpeed).
    p : float
        Exponent of ``"lp"``.

    Returns
    -------
    array, shape (T, k)

    Notes
    -----
    A row whose normaliser is 0 (every route dropped, or all weights exactly 0) gives zeros,
    never NaN. ``"sum_clamp"`` has no gradient through $S$ where $\sum_j \bar g_{tj} \le \epsilon$.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.router import normalize_route_weights
    >>> w = np.array([[0.5, 0.25], [0.4, 0.1]])
    >>> normalize_route_weights(w, np.array([[True, True], [True, False]])).tolist()
    [[0.6666666666666666, 0.3333333333333333], [1.0, 0.0]]
    """
    xp = _check_normalize_args(weight, kept, mode, eps, p)
    return _normalize(weight, kept, mode, eps, p, xp)


def _normalize(weight: Any, kept: Any, mode: str, eps: Any, p: float, xp: Any) -> Any:
    w = weight if kept is None else xp.where(kept, weight, xp.zeros_like(weight))  # (T, k)
    if mode == "none":
        return w
    S, _ = _norm_denominator(w, mode, eps, p, xp)  # (T, 1)
    nonzero = S != 0
    out = w / xp.where(nonzero, S, xp.ones_like(S))
    return xp.where(nonzero, out, xp.zeros_like(out))


def normalize_route_weights_vjp(weight: Any, kept: Any, mode: str, cotangent: Any, *, eps: Any = None, p: float = 1.0) -> Any:
    r"""VJP of [`normalize_route_weights`][moeref.router.normalize_route_weights] w.r.t. ``weight``.

    With $w = \bar g / S$ and $\partial S/\partial \bar g_j$ as in the forward
    ($1$ for the sums, $\operatorname{sign}(\bar g_j)|\bar g_j|^{p-1} S^{1-p}$ for ``"lp"``):

    $$\bar g_j = m_j\Big(\frac{\bar w_j}{S} - \frac{\partial S}{\partial \bar g_j}\,
    \frac{\sum_i \bar w_i \bar g_i}{S^2}\Big).$$

    Parameters
    ----------
    weight, kept, mode, eps, p
        As in the forward.
    cotangent : array, shape (T, k)

    Returns
    -------
    array, shape (T, k)
    """
    xp = _check_normalize_args(weight, kept, mode, eps, p)
    _check_cotangent_of(cotangent, tuple(weight.shape), weight, "weight", what="like weight")
    return _normalize_vjp(weight, kept, mode, eps, p, cotangent, xp)


def _normalize_vjp(weight: Any, kept: Any, mode: str, eps: Any, p: float, cotangent: Any, xp: Any) -> Any:
    zeros = xp.zeros_like(weight)
    w = weight if kept is None else xp.where(kept, weight, zeros)  # (T, k)
    if mode == "none":
        g = cotangent
    else:
        S, dS = _norm_denominator(w, mode, eps, p, xp)
        nonzero = S != 0
        safe_S = xp.where(nonzero, S, xp.ones_like(S))
        inner = xp.sum(cotangent * w, axis=-1, keepdims=True)  # (T, 1)
        g = cotangent / safe_S - dS * inner / (safe_S * safe_S)
        g = xp.where(nonzero, g, zeros)
    return g if kept is None else xp.where(kept, g, zeros)


def renormalize_routes(routes: Routes, options: RouterOptions) -> Routes:
    r"""Apply the router's deferred normalisation and scaling to routes that went through capacity.

    $$w_{tj} \leftarrow \rho \cdot \operatorname{normalize}(g_t, m_t)_j ,$$

    with $\rho$ = ``options.routed_scaling_factor`` and the mode, $\epsilon$, $p$ of
    ``options``; dropped routes keep weight 0. Use it when ``options.normalize_after_capacity``
    is True (fairseq, DeepSpeed top-2 / top-k); the VJP is
    $\rho\,$[`normalize_route_weights_vjp`][moeref.router.normalize_route_weights_vjp].
    """
    check_routes(routes)
    check_record_type(options, "options", RouterOptions)
    w = normalize_route_weights(routes.weight, routes.kept, options.normalize, eps=options.normalize_eps, p=options.normalize_p)
    return routes._replace(weight=options.routed_scaling_factor * w)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


class _Forward(NamedTuple):
    """Intermediate values of the router forward, reused by the VJP."""

    router_input: Any  # (T, d)   x * jitter
    noise_pre: Any  # (T, E)      x~ W_noise (or None)
    logits: Any  # (T, E)         x~ W + b
    noisy_logits: Any  # (T, E)
    scores: Any  # (T, E)
    selection_scores: Any  # (T, E)
    expert_index: Any  # (T, k)
    gathered: Any  # (T, k)       weights before normalisation
    normalized: Any  # (T, k)     after normalisation (before scaling and dropping)
    live: Any  # (T, k)           False for a route to an expert that cannot be selected
    kept: Any  # (T, k)
    weight: Any  # (T, k)


def _check_route_inputs(x: Any, params: RouterParams, options: RouterOptions, draws: RouterDraws | None) -> tuple[Any, int, int]:
    check_record_type(params, "params", RouterParams)
    check_record_type(options, "options", RouterOptions)
    if draws is None:
        draws = RouterDraws()
    check_record_type(draws, "draws", RouterDraws)
    named = {"x": x, "params.weight": params.weight, "params.bias": params.bias, "params.noise_weight": params.noise_weight}
    named["params.selection_bias"] = params.selection_bias
    for f in RouterDraws._fields:
        named[f"draws.{f}"] = getattr(draws, f)
    xp = check_arrays(named, neg_inf_ok=("params.bias",))
    check_float_array(x, "x", ndim=2)
    T, d = x.shape
    check_float_array(params.weight, "params.weight", ndim=2)
    check_shape(params.weight, "params.weight", (d, None), what=f"x has d={d} features")
    E = params.weight.shape[1]
    if params.bias is not None:
        check_shape(params.bias, "params.bias", (E,), what=f"params.weight has E={E} experts")
    if params.selection_bias is not None:
        check_shape(params.selection_bias, "params.selection_bias", (E,), what=f"params.weight has E={E} experts")
    if options.noisy_top_k:
        if params.noise_weight is None:
            raise ValueError("options.noisy_top_k=True needs params.noise_weight, shape (d, E) (W_noise of Shazeer et al. 2017, eq. (4))")
        check_shape(params.noise_weight, "params.noise_weight", (d, E), what=f"x has d={d} features, params.weight E={E} experts")
    elif params.noise_weight is not None:
        raise ValueError("params.noise_weight is given but options.noisy_top_k is False")
    k = options.k
    if k > E:
        raise ValueError(f"options.k must be at most the number of experts E={E}, got k={k}")
    if options.n_group is not None:
        if E % options.n_group != 0:
            raise ValueError(f"options.n_group={options.n_group} must divide the number of experts E={E}")
        per_group = E // options.n_group
        if options.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"options.group_score='top2_sum' needs at least 2 experts per group, got E/n_group={per_group}")
        if k > options.topk_group * per_group:
            raise ValueError(
                f"options.k={k} exceeds the {options.topk_group * per_group} experts in the options.topk_group={options.topk_group} "
                f"groups a token may use (E/n_group={per_group} each)"
            )
    # draws: required exactly when their option is on
    needs = {
        "jitter": (options.input_jitter > 0, (T, d), "options.input_jitter > 0"),
        "noise": (options.noisy_top_k, (T, E), "options.noisy_top_k=True"),
        "logit_noise": (options.logit_noise_std > 0, (T, E), "options.logit_noise_std > 0"),
        "gumbel": (options.gumbel != "none", (T, E), f"options.gumbel={options.gumbel!r}"),
        "second_expert_uniform": (options.second_expert_policy == "random", (T,), "options.second_expert_policy='random'"),
    }
    for field, (needed, shape, why) in needs.items():
        value = getattr(draws, field)
        if needed and value is None:
            raise ValueError(f"{why} needs draws.{field}, shape {shape}")
        if not needed and value is not None:
            raise ValueError(f"draws.{field} is given but unused: it is read only when {why}")
        if value is not None:
            check_shape(value, f"draws.{field}", shape, what=f"T={T} tokens, d={d} features, E={E} experts")
    eps = options.input_jitter
    if draws.jitter is not None:
        in_range = xp.all((draws.jitter >= 1.0 - eps) & (draws.jitter <= 1.0 + eps))
        if concrete_bool(in_range) is False:
            raise ValueError(f"draws.jitter must lie in [1 - eps, 1 + eps] = [{1.0 - eps}, {1.0 + eps}] (options.input_jitter={eps})")
    u = draws.second_expert_uniform
    if u is not None and concrete_bool(xp.all((u >= 0) & (u < 1))) is False:
        raise ValueError("draws.second_expert_uniform must lie in [0, 1)")
    return xp, T, E


def _check_some_expert_selectable(logits: Any, xp: Any) -> None:
    """Raise if a token has a -inf logit for every expert: it has no expert to route to."""
    dead_rows = xp.all(logits == -math.inf, axis=-1)  # (T,)
    if concrete_bool(xp.any(dead_rows)) is True:
        t = int(xp.argmax(xp.astype(dead_rows, xp.int32)))
        n = int(xp.sum(xp.astype(dead_rows, xp.int32)))
        raise ValueError(
            f"router logits (x @ params.weight + params.bias) are -inf for every expert at token {t} "
            f"({n} such token(s)): no expert can be selected for token {t}; a -inf logit switches an expert off, "
            "so at least one expert per token must have a finite logit"
        )


def _live_routes(selection_values: Any, noisy_logits: Any, idx: Any, options: RouterOptions, xp: Any) -> Any:
    """``(T, k)`` False for a route the top-$k$ filled with an expert that cannot be selected.

    That is a route whose expert has a $-\\infty$ logit (switched off), or a $-\\infty$
    selection value (a left-out group with ``group_masked_score=-inf``), or, with
    ``gumbel="selection_after_first"``, a rank $\\ge 1$ that repeats rank 0. The top-$k$ picks
    such experts only when fewer than $k$ experts are selectable for the token.
    """
    minus_inf = -math.inf
    live = (_gather(selection_values, idx) > minus_inf) & (_gather(noisy_logits, idx) > minus_inf)  # (T, k)
    if options.gumbel == "selection_after_first":
        ranks = xp.arange(idx.shape[1], dtype=idx.dtype, device=device_of(idx))
        live = live & ((idx != idx[:, :1]) | (ranks == 0))
    return live


def _gather(a: Any, idx: Any) -> Any:
    return _take_along_axis(a, idx, axis=-1)


def _scatter_rows(values: Any, idx: Any, E: int, xp: Any) -> Any:
    """``out[t, idx[t, j]] += values[t, j]``, as a sum over the k ranks (no scatter)."""
    experts = xp.arange(E, dtype=idx.dtype, device=device_of(idx))
    out = xp.zeros((values.shape[0], E), dtype=values.dtype, device=device_of(values))
    for j in range(idx.shape[1]):  # loop over ranks k, not tokens
        hit = idx[:, j : j + 1] == experts  # (T, E)
        out = out + xp.where(hit, values[:, j : j + 1], xp.zeros_like(out))
    return out


def _group_mask(values: Any, options: RouterOptions, xp: Any) -> Any:
    """Keep the ``topk_group`` best groups of each token; set the others to ``group_masked_score``."""
    T, E = values.shape
    G = options.n_group
    grouped = xp.reshape(values, (T, G, E // G))  # (T, G, E/G)
    if options.group_score == "max":
        group_scores = xp.max(grouped, axis=-1)  # (T, G)
    else:
        top2, _ = top_k(grouped, 2, axis=-1)  # (T, G, 2)
        group_scores = xp.sum(top2, axis=-1)  # (T, G)
    _, chosen = top_k(group_scores, options.topk_group, axis=-1)  # (T, topk_group)
    groups = xp.arange(G, dtype=chosen.dtype, device=device_of(chosen))
    allowed = xp.any(chosen[:, :, None] == groups, axis=1)  # (T, G)
    allowed = xp.reshape(xp.broadcast_to(allowed[:, :, None], (T, G, E // G)), (T, E))  # (T, E)
    return xp.where(allowed, values, xp.full_like(values, options.group_masked_score))


def _forward(x: Any, params: RouterParams, options: RouterOptions, draws: RouterDraws, xp: Any) -> _Forward:
    T, E, k = x.shape[0], params.weight.shape[1], options.k
    x_r = x if draws.jitter is None else x * draws.jitter  # (T, d)
    logits = xp.matmul(x_r, params.weight)  # (T, E)
    if params.bias is not None:
        logits = logits + params.bias
    check_finite(logits, "router logits (x @ params.weight + params.bias)", allow_neg_inf=True)
    _check_some_expert_selectable(logits, xp)
    noisy = logits
    noise_pre = None
    if options.noisy_top_k:
        noise_pre = xp.matmul(x_r, params.noise_weight)  # (T, E)
        noisy = noisy + draws.noise * (softplus(noise_pre) + options.noise_epsilon)  # eq. (4), t2t's floor
    if options.logit_noise_std > 0:
        noisy = noisy + (options.logit_noise_std / E) * draws.logit_noise
    if options.gumbel == "selection_and_weights":
        noisy = noisy + draws.gumbel

    # selection
    if options.score in ("softmax", "sigmoid", "none"):
        scores = {"softmax": lambda z: softmax(z, axis=-1), "sigmoid": sigmoid, "none": lambda z: z}[options.score](noisy)
        base = scores if options.effective_selection == "scores" else noisy
    else:
        scores = None
        base = noisy
    if params.selection_bias is not None:
        base = base + params.selection_bias
    if options.n_group is not None:
        base = _group_mask(base, options, xp)
    # a -inf logit means "never route here": such an expert loses to every other one
    base = xp.where(noisy == -math.inf, xp.full_like(base, -math.inf), base)  # (T, E)
    if options.gumbel == "selection":
        base = noisy + draws.gumbel  # Gumbel-max on the logits, whatever options.selection says
        if params.selection_bias is not None:
            base = base + params.selection_bias
        _, idx = top_k(base, k, axis=-1)  # (T, k)
    elif options.gumbel == "selection_after_first":
        _, first = top_k(base, 1, axis=-1)  # (T, 1)
        gumbel_values = noisy + draws.gumbel
        if params.selection_bias is not None:
            gumbel_values = gumbel_values + params.selection_bias
        experts = xp.arange(E, dtype=first.dtype, device=device_of(first))
        gumbel_values = xp.where(first == experts, xp.full_like(gumbel_values, -math.inf), gumbel_values)
        _, rest = top_k(gumbel_values, k - 1, axis=-1)  # (T, k-1)
        idx = xp.concat([first, rest], axis=-1)  # (T, k)
    else:
        _, idx = top_k(base, k, axis=-1)  # (T, k)

    # weights of the k winners
    if scores is not None:
        gathered = _gather(scores, idx)  # (T, k)
    else:
        top_logits = _gather(noisy, idx)  # (T, k)
        gathered = softmax(top_logits, axis=-1) if options.score == "topk_softmax" else sigmoid(top_logits)
        scores = _scatter_rows(gathered, idx, E, xp)  # (T, E), 0 off the winners
    live = _live_routes(base, noisy, idx, options, xp)  # (T, k)
    if options.normalize_after_capacity:
        normalized, scale = xp.where(live, gathered, xp.zeros_like(gathered)), 1.0
    else:
        normalized = _normalize(gathered, live, options.normalize, options.normalize_eps, options.normalize_p, xp)
        scale = options.routed_scaling_factor

    # GShard second-expert policy (k == 2)
    true_col = xp.ones((T, 1), dtype=xp.bool, device=device_of(x))
    policy = options.second_expert_policy
    if policy == "all":
        kept = live
    else:
        g2 = normalized[:, 1:2]  # (T, 1)
        if policy == "none":
            keep2 = xp.zeros((T, 1), dtype=xp.bool, device=device_of(x))
        elif policy == "threshold":
            keep2 = g2 > options.second_expert_threshold
        else:
            keep2 = draws.second_expert_uniform[:, None] < g2 / options.second_expert_threshold
        kept = live & xp.concat([true_col, keep2], axis=-1)  # (T, 2)
    weight = xp.where(kept, scale * normalized, xp.zeros_like(normalized))  # (T, k)
    return _Forward(x_r, noise_pre, logits, noisy, scores, base, idx, gathered, normalized, live, kept, weight)


def route(x: Any, params: RouterParams, options: RouterOptions = RouterOptions(), draws: RouterDraws | None = None) -> RouterOutput:
    r"""Route $T$ tokens to $k$ of $E$ experts each (token choice).

    With $\tilde x_t = x_t \odot u_t$ (input jitter, $u_t = 1$ without it):

    $$z_t = \tilde x_t W_r + b_r, \qquad
    \tilde z_t = z_t + n_t \odot \big(\operatorname{softplus}(\tilde x_t W_\text{noise}) + \epsilon\big)
    + \tfrac{\sigma}{E}\,\nu_t \;\big(+\, G_t\big),$$

    $$s_t = \phi(\tilde z_t), \qquad
    \mathcal E_t = \operatorname{TopK}_k\big(v_t + \beta\big), \quad v_t \in \{s_t, \tilde z_t\}
    \text{ (restricted to the best groups)},$$

    $$g_{tj} = s_{t, e_{tj}}, \qquad w_{tj} = \rho \cdot \operatorname{normalize}(g_t)_j \cdot m_{tj},$$

    where the noise terms are present only when their option is on ($\epsilon$ is
    ``noise_epsilon``), $\beta$ is the
    selection-only bias, $\rho$ the routed scaling factor and $m_{tj}$ the second-expert
    policy's keep flag. For the ``topk_*`` score functions
    $g_t = \operatorname{softmax}(\tilde z_{t,\mathcal E_t})$ or $\sigma(\tilde z_{t,\mathcal E_t})$.

    Sources: noisy top-$k$ gating, Shazeer et al. (2017), "Outrageously Large Neural Networks:
    The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, arXiv:1701.06538, eqs. (3)-(5);
    top-2 gating and its second-expert policies, Lepikhin et al. (2020), "GShard", ICLR 2021,
    arXiv:2006.16668, Algorithm 1; top-1 routing, Fedus, Zoph & Shazeer (2021), "Switch
    Transformers", JMLR 23(120), arXiv:2101.03961, eqs. (1)-(2); group-limited sigmoid routing
    with a selection-only bias, DeepSeek-AI (2024), "DeepSeek-V3 Technical Report",
    arXiv:2412.19437, Sec. 2.1.2, eqs. (13)-(16). The per-system conventions are listed on
    [`RouterOptions`][moeref.router.RouterOptions].

    Parameters
    ----------
    x : array, shape (T, d)
        The router input (one row per token).
    params : RouterParams
    options : RouterOptions
    draws : RouterDraws, optional
        The random draws the options need (none for a deterministic router).

    Returns
    -------
    RouterOutput

    Raises
    ------
    ValueError
        ``k > E``; group settings that do not fit $E$; NaN or infinite inputs or logits; a token
        whose logits are $-\infty$ for every expert (no expert can be selected); a draw that is
        missing, unused, of the wrong shape or out of range.
    TypeError
        Non-float arrays, mixed dtypes or libraries, records of the wrong type.

    Notes
    -----
    *Ties*: the lower expert index wins in every top-$k$ (experts and groups), on every backend.
    The experts of a token come in rank order (best first). With ``"softmax"`` selection on
    scores, logits whose probabilities underflow to the same value tie.

    *Switched-off experts*: a $-\infty$ logit (a $-\infty$ entry of ``params.bias``) means
    "never route here". Such an expert gets selection value $-\infty$ (whatever the score,
    the selection bias or the group), so it loses to every expert with a finite logit, also to
    one whose softmax or sigmoid underflows to 0. When a token has fewer than $k$ selectable
    experts, the top-$k$ must still fill $k$ ranks: the extra routes (to a switched-off expert,
    to an expert of a group left out with ``group_masked_score=-inf``, or, with
    ``gumbel="selection_after_first"``, a repeat of rank 0) get ``kept=False`` and weight 0,
    take no capacity slot, and the weights are renormalised over the live routes only. A token
    whose logits are all $-\infty$ has no expert to go to: that is a ``ValueError``. The peer
    implementations run a plain top-$k$: they keep routes to switched-off experts (weight 0
    after a softmax or sigmoid, so the output agrees, but a capacity slot is taken) and, on
    scores, may prefer a switched-off expert to a live one whose score underflows to 0 or that
    a selection bias outbids.

    The weights are differentiable in ``x`` and the parameters with the selection held fixed:
    see [`route_weights_vjp`][moeref.router.route_weights_vjp].

    Examples
    --------
    Mixtral-style top-2 (softmax over all experts, top-2, renormalise):

    >>> import numpy as np
    >>> from moeref.router import RouterOptions, RouterParams, route
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> W = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    >>> out = route(x, RouterParams(W), RouterOptions(k=2, normalize="sum"))
    >>> out.routes.expert_index.tolist()
    [[0, 1], [2, 1]]
    >>> np.round(out.routes.weight, 4).tolist()
    [[0.7311, 0.2689], [0.8808, 0.1192]]
    """
    xp, _, _ = _check_route_inputs(x, params, options, draws)
    draws = RouterDraws() if draws is None else draws
    f = _forward(x, params, options, draws, xp)
    routes = Routes(
        expert_index=f.expert_index,
        weight=f.weight,
        kept=f.kept,
        position=xp.zeros(f.expert_index.shape, dtype=xp.int64, device=device_of(f.expert_index)),
    )
    expert_input = f.router_input if options.jitter_experts else x
    return RouterOutput(f.logits, f.noisy_logits, f.scores, f.selection_scores, routes, f.router_input, expert_input)


# --------------------------------------------------------------------------------------------
# VJP
# --------------------------------------------------------------------------------------------


def _from_output(x: Any, params: RouterParams, options: RouterOptions, output: Any, xp: Any) -> _Forward:
    """The intermediates the VJP needs, read from a forward's ``RouterOutput`` (no top-k is run)."""
    check_record_type(output, "output", RouterOutput)
    check_record_type(output.routes, "output.routes", Routes)
    T, E, k = x.shape[0], params.weight.shape[1], options.k
    check_shape(output.routes.expert_index, "output.routes.expert_index", (T, k), what=f"T={T} tokens, options.k={k}")
    check_shape(output.routes.kept, "output.routes.kept", (T, k), what=f"T={T} tokens, options.k={k}")
    for field in ("noisy_logits", "scores", "selection_scores"):
        check_shape(getattr(output, field), f"output.{field}", (T, E), what=f"T={T} tokens, E={E} experts")
    check_shape(output.router_input, "output.router_input", tuple(x.shape), what="the (possibly jittered) router input, like x")
    idx = xp.astype(output.routes.expert_index, xp.int64)
    # the k winners' weights before normalisation: for the topk_* scores, output.scores holds them
    # scattered to their experts, so gathering them back is exact
    gathered = _gather(output.scores, idx)  # (T, k)
    noise_pre = xp.matmul(output.router_input, params.noise_weight) if options.noisy_top_k else None  # (T, E)
    live = _live_routes(output.selection_scores, output.noisy_logits, idx, options, xp)  # (T, k)
    return _Forward(
        output.router_input, noise_pre, output.logits, output.noisy_logits, output.scores, output.selection_scores,
        idx, gathered, None, live, output.routes.kept, output.routes.weight,
    )


def route_weights_vjp(
    x: Any,
    params: RouterParams,
    options: RouterOptions,
    output: RouterOutput | None,
    cotangent_weight: Any,
    draws: RouterDraws | None = None,
) -> RouterGrads:
    r"""VJP of ``route(...).routes.weight`` w.r.t. ``x`` and the router parameters, selection fixed.

    The chosen experts $e_{tj}$, the keep flags $m_{tj}$ and the draws are held fixed (they are
    piecewise constant in the inputs; no straight-through estimator is used). Going backwards
    from $\bar w$ (shape ``(T, k)``):

    $$\bar g = \texttt{normalize\_vjp}(g, \rho\, m \odot \bar w), \qquad
    \bar s_{te} = \sum_{j:\, e_{tj} = e} \bar g_{tj},$$

    $$\bar{\tilde z} = \begin{cases}
    s \odot (\bar s - \langle s, \bar s\rangle) & \text{softmax} \\
    \bar s \odot s (1 - s) & \text{sigmoid} \\
    \bar s & \text{none}
    \end{cases}$$

    (for ``topk_softmax`` / ``topk_sigmoid`` the same formulas act on the $k$ gathered logits and
    are scattered back to their experts). The noise terms are constants except the noisy top-$k$
    term: with $h = \tilde x W_\text{noise}$, $\bar h = \bar{\tilde z} \odot n \odot \sigma(h)$.
    Then $\bar z = \bar{\tilde z}$ and

    $$\bar W_r = \tilde x^\top \bar z, \quad \bar b_r = \textstyle\sum_t \bar z_t, \quad
    \bar W_\text{noise} = \tilde x^\top \bar h, \quad
    \bar x = \big(\bar z W_r^\top + \bar h W_\text{noise}^\top\big) \odot u .$$

    Parameters
    ----------
    x, params, options, draws
        As in [`route`][moeref.router.route].
    output : RouterOutput or None
        The forward's output. Its selection (``routes.expert_index``, ``routes.kept``) and its
        intermediates (``router_input``, ``scores``) are used as they are: the VJP never runs a
        top-$k$ again, so at a tie it differentiates the routes the forward actually took.
        ``None`` runs the forward once here (the selection is then made in this call).
    cotangent_weight : array, shape (T, k)
        $\bar w$, the cotangent of ``routes.weight``.

    Returns
    -------
    RouterGrads
        ``x`` shape (T, d); ``params`` a ``RouterParams`` of cotangents (``None`` where the
        parameter is ``None``; zeros for ``selection_bias``).

    Notes
    -----
    At points where a selection changes (ties in the top-$k$, $g_2$ exactly at the threshold)
    the weights are discontinuous and this is the one-sided derivative with the forward's
    selection. With ``output`` given, ``x``, ``params`` and ``draws`` must be those of the
    forward (only the shapes are checked): the weights' values are taken from ``output``.
    """
    xp, T, E = _check_route_inputs(x, params, options, draws)
    draws = RouterDraws() if draws is None else draws
    k = options.k
    _check_cotangent_of(cotangent_weight, (T, k), x, "x", name="cotangent_weight", what=f"routes.weight: T={T} tokens, options.k={k}")
    f = _forward(x, params, options, draws, xp) if output is None else _from_output(x, params, options, output, xp)

    scale = 1.0 if options.normalize_after_capacity else options.routed_scaling_factor
    w_bar = xp.where(f.kept, scale * cotangent_weight, xp.zeros_like(cotangent_weight))  # (T, k)
    if options.normalize_after_capacity:
        g_bar = w_bar
    else:
        g_bar = _normalize_vjp(f.gathered, f.live, options.normalize, options.normalize_eps, options.normalize_p, w_bar, xp)  # (T, k)

    if options.score in ("softmax", "sigmoid", "none"):
        s_bar = _scatter_rows(g_bar, f.expert_index, E, xp)  # (T, E)
        if options.score == "softmax":
            z_bar = softmax_vjp(f.scores, s_bar, axis=-1)
        elif options.score == "sigmoid":
            z_bar = s_bar * f.scores * (1.0 - f.scores)
        else:
            z_bar = s_bar
    else:
        if options.score == "topk_softmax":
            zk_bar = softmax_vjp(f.gathered, g_bar, axis=-1)  # (T, k)
        else:
            zk_bar = g_bar * f.gathered * (1.0 - f.gathered)
        z_bar = _scatter_rows(zk_bar, f.expert_index, E, xp)  # (T, E)

    xr_bar = xp.matmul(z_bar, xp.matrix_transpose(params.weight))  # (T, d)
    weight_bar = xp.matmul(xp.matrix_transpose(f.router_input), z_bar)  # (d, E)
    bias_bar = None if params.bias is None else xp.sum(z_bar, axis=0)
    noise_weight_bar = None
    if options.noisy_top_k:
        h_bar = z_bar * draws.noise * sigmoid(f.noise_pre)  # (T, E)
        noise_weight_bar = xp.matmul(xp.matrix_transpose(f.router_input), h_bar)  # (d, E)
        xr_bar = xr_bar + xp.matmul(h_bar, xp.matrix_transpose(params.noise_weight))
    x_bar = xr_bar if draws.jitter is None else xr_bar * draws.jitter  # (T, d)
    selection_bias_bar = None if params.selection_bias is None else xp.zeros_like(params.selection_bias)
    return RouterGrads(x=x_bar, params=RouterParams(weight_bar, bias_bar, noise_weight_bar, selection_bias_bar))

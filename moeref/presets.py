r"""Presets: [`SparseMoEOptions`][moeref.sparse_moe.SparseMoEOptions] that mirror real systems.

Each function returns the options of one system's sparse MoE block. Sizes that are per-model
(``k``, groups, capacity) are keyword arguments with the released configuration's default, and
each docstring names the file and version it mirrors and lists every convention it sets; the
per-field conventions are documented on [`RouterOptions`][moeref.router.RouterOptions],
[`CapacityOptions`][moeref.capacity.CapacityOptions],
[`LoadBalancingLossOptions`][moeref.aux_losses.LoadBalancingLossOptions] and
[`ExpertFFN`][moeref.expert_ffn.ExpertFFN].

* **Inference presets** (no jitter, no noise; training-time noise needs explicit draws, add it
  with `dataclasses.replace`): the Hugging Face blocks of transformers v5.24.0 (the installed
  version, ``models/<name>/modeling_<name>.py`` and ``configuration_<name>.py``):
  [`mixtral`][moeref.presets.mixtral], [`switch`][moeref.presets.switch],
  [`deepseek_v3`][moeref.presets.deepseek_v3], [`qwen2_moe`][moeref.presets.qwen2_moe],
  [`olmoe`][moeref.presets.olmoe], [`gpt_oss`][moeref.presets.gpt_oss],
  [`llama4`][moeref.presets.llama4], [`dbrx`][moeref.presets.dbrx].
* **Training-rule presets**, whose defining convention is random (a second-expert coin, Gumbel
  or Gaussian noise, random token selection): [`gshard_top2`][moeref.presets.gshard_top2],
  [`fairseq_top2`][moeref.presets.fairseq_top2], [`deepspeed_top1`][moeref.presets.deepspeed_top1],
  [`deepspeed_top2`][moeref.presets.deepspeed_top2], [`deepspeed_topk`][moeref.presets.deepspeed_topk],
  [`shazeer2017`][moeref.presets.shazeer2017], [`vmoe`][moeref.presets.vmoe]. The layer then
  needs the matching [`SparseMoEDraws`][moeref.sparse_moe.SparseMoEDraws]; each docstring says
  which, and a keyword turns the randomness off.

[`conventions_table`][moeref.presets.conventions_table] reads every option of every preset
into a system $\times$ option table; the documentation's conventions matrix is generated from
it (``docs/scripts/conventions_matrix.py``), so the page cannot drift from the code.

**Shared experts** are part of the presets that have them (DeepSeek-V3 ``n_shared_experts``
added ungated, Qwen2-MoE's sigmoid-gated ``shared_expert``, Llama 4's ungated
``shared_expert``; see [`moeref.shared_experts`][moeref.shared_experts]); a keyword turns each
off. The router bias of GPT-OSS is a parameter (``RouterParams.bias``), DeepSeek-V3's
``e_score_correction_bias`` is ``RouterParams.selection_bias``. Every auxiliary loss a system
trains with is a loss of the layer, reported and differentiated: the Switch / GShard balancing
loss, the z-loss, DeepSeek-V3's sequence-wise loss, and the importance and load losses of
Shazeer et al. (2017) ([`shazeer2017`][moeref.presets.shazeer2017]) and V-MoE
([`vmoe`][moeref.presets.vmoe]).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from typing import Any, Callable, NamedTuple

from .aux_losses import (
    DEEPSEEK_V3_SEQUENCE_BALANCE,
    DEEPSPEED_TOPK,
    GSHARD,
    HF_MIXTRAL,
    HF_SWITCH_TRANSFORMERS,
    SHAZEER_TENSOR2TENSOR,
    SWITCH_TRANSFORMER,
)
from .capacity import CapacityOptions, expert_capacity
from .expert_ffn import GELU_TANH_FFN, GPT_OSS_SWIGLU, RELU_FFN, SWIGLU, ExpertFFN
from .router import RouterOptions
from .shared_experts import SharedExpertOptions
from .sparse_moe import SparseMoEOptions
from .validation import check_choice, check_positive_float, check_positive_int

__all__ = [
    "mixtral",
    "switch",
    "deepseek_v3",
    "qwen2_moe",
    "olmoe",
    "gpt_oss",
    "llama4",
    "dbrx",
    "gshard_top2",
    "fairseq_top2",
    "deepspeed_top1",
    "deepspeed_top2",
    "deepspeed_topk",
    "shazeer2017",
    "vmoe",
    "deepspeed_capacity",
    "PRESETS",
    "ConventionRow",
    "conventions_table",
    "options_from_column",
    "preset_source",
]


def mixtral(*, k: int = 2) -> SparseMoEOptions:
    r"""Mixtral 8x7B sparse MoE block (HF ``MixtralSparseMoeBlock``).

    Softmax over all $E$ router logits, top-$k$ of the probabilities ($k = 2$), renormalised to
    sum 1; SwiGLU experts (``act_fn(gate) * up``, gate first in the fused ``gate_up_proj``);
    dropless; balancing loss ``load_balancing_loss_func`` (every route counts) with
    ``router_aux_loss_coef = 0.001``; no z-loss.

    Source: transformers v5.24.0 ``models/mixtral/modeling_mixtral.py`` (``MixtralTopKRouter``,
    ``MixtralExperts``, ``MixtralSparseMoeBlock``), ``configuration_mixtral.py``.
    Jiang et al. (2024), "Mixtral of Experts", arXiv:2401.04088, eq. (1)-(2).

    Examples
    --------
    >>> from moeref.presets import mixtral
    >>> mixtral().router.k, mixtral().router.normalize
    (2, 'sum')
    """
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="softmax", normalize="sum"),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.001,
    )


def switch(*, capacity: int = 64, group_size: int | None = None) -> SparseMoEOptions:
    r"""Switch Transformer MoE layer, top-1 with a fixed expert capacity (HF ``SwitchTransformersSparseMLP``).

    Softmax over $E$, top-1, no renormalisation (the weight is the top-1 probability); a fixed
    ``expert_capacity`` (64) with routes claiming slots in token order (rank-major for $k = 1$);
    dropped tokens output 0 (HF adds the residual outside); ReLU experts (the original
    ``dense_act_fn="relu"``); balancing loss per HF (``router_aux_loss_coef = 0.001``) and
    router z-loss (``router_z_loss_coef = 0.001``). HF's ``router_jitter_noise = 0.01`` acts in
    training only and is off here.

    Source: transformers v5.24.0 ``models/switch_transformers/modeling_switch_transformers.py``
    (``SwitchTransformersTop1Router``, ``SwitchTransformersSparseMLP``),
    ``configuration_switch_transformers.py``. Fedus, Zoph & Shazeer (2022), "Switch
    Transformers", JMLR 23(120), arXiv:2101.03961, eqs. (1)-(4).

    Parameters
    ----------
    capacity : int
        ``expert_capacity`` per routing group.
    group_size : int or None
        Tokens per routing group, for the capacity and the balancing loss. HF routes each batch row
        separately (``cumsum`` over the sequence axis of ``(batch, seq, E)``): pass the sequence
        length and flatten ``(batch, seq, d)`` to ``(batch * seq, d)``. None: one group.
    """
    check_positive_int(capacity, "capacity")
    if group_size is not None:
        check_positive_int(group_size, "group_size")
    return SparseMoEOptions(
        router=RouterOptions(k=1, score="softmax", normalize="none"),
        capacity=CapacityOptions(capacity=capacity, capacity_factor=None, priority="rank_major", group_size=group_size),
        ffn=RELU_FFN,
        load_balancing=dataclasses.replace(HF_SWITCH_TRANSFORMERS, group_size=group_size),
        load_balancing_coef=0.001,
        z_loss_coef=0.001,
    )


def deepseek_v3(
    *,
    k: int = 8,
    n_group: int = 8,
    topk_group: int = 4,
    routed_scaling_factor: float = 2.5,
    n_shared_experts: int = 1,
    sequence_balance_coef: float = 0.0,
    sequence_length: int | None = None,
) -> SparseMoEOptions:
    r"""DeepSeek-V3 MoE layer (HF ``DeepseekV3MoE`` / ``DeepseekV3TopkRouter``), shared expert included.

    Sigmoid scores; selection on scores plus ``e_score_correction_bias`` (pass it as
    ``RouterParams.selection_bias``), limited to the ``topk_group = 4`` best of ``n_group = 8``
    groups (group score: sum of the two largest; experts of left-out groups masked with
    $-\infty$, as HF v5.24 and DeepSeek's ``inference/model.py`` do); $k = 8$; weights
    renormalised by $\sum g + 10^{-20}$ (``norm_topk_prob``) and scaled by
    ``routed_scaling_factor = 2.5``; SwiGLU experts; dropless; ``n_shared_experts = 1`` shared
    SwiGLU expert added ungated (its parameters are one fused FFN of width
    ``n_shared_experts * moe_intermediate_size``; 0 turns it off). Balancing is
    auxiliary-loss-free (the correction bias), so the Switch balance loss and the z-loss have
    coefficient 0; the complementary sequence-wise balance loss (eqs. (17)-(20),
    [`DEEPSEEK_V3_SEQUENCE_BALANCE`][moeref.aux_losses.DEEPSEEK_V3_SEQUENCE_BALANCE]) is always
    reported and enters the objective with ``sequence_balance_coef`` (the paper trains with
    $\alpha = 0.0001$; HF does not compute it: default 0); ``sequence_length`` splits the $T$
    rows into sequences (None: one sequence).

    Source: transformers v5.24.0 ``models/deepseek_v3/modeling_deepseek_v3.py``,
    ``configuration_deepseek_v3.py``. DeepSeek-AI (2024), "DeepSeek-V3 Technical Report",
    arXiv:2412.19437, Sec. 2.1.2, eqs. (12)-(20).
    """
    check_positive_int(n_shared_experts, "n_shared_experts", minimum=0)
    return SparseMoEOptions(
        router=RouterOptions(
            k=k,
            score="sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            group_score="top2_sum",
            group_masked_score=-math.inf,
            normalize="sum_plus_eps",
            normalize_eps=1e-20,
            routed_scaling_factor=routed_scaling_factor,
        ),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
        shared=SharedExpertOptions("add", SWIGLU) if n_shared_experts > 0 else None,
        sequence_balance=dataclasses.replace(DEEPSEEK_V3_SEQUENCE_BALANCE, sequence_length=sequence_length),
        sequence_balance_coef=sequence_balance_coef,
    )


def qwen2_moe(*, k: int = 4, norm_topk_prob: bool = False, shared_expert: bool = True) -> SparseMoEOptions:
    r"""Qwen2-MoE sparse MoE block (HF ``Qwen2MoeSparseMoeBlock``), shared expert included.

    Softmax over $E$, top-$k$ ($k = 4$), renormalised only when ``norm_topk_prob`` (False in the
    released config); SwiGLU experts; dropless; ``router_aux_loss_coef = 0.001``; one shared
    SwiGLU expert gated by $\sigma(x\,w_\text{sg})$ (``shared_expert_gate``, a ``(d, 1)``
    weight without bias; ``shared_expert=False`` turns it off).

    Source: transformers v5.24.0 ``models/qwen2_moe/modeling_qwen2_moe.py``,
    ``configuration_qwen2_moe.py``.
    """
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="softmax", normalize="sum" if norm_topk_prob else "none"),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.001,
        shared=SharedExpertOptions("sigmoid_gate", SWIGLU) if shared_expert else None,
    )


def olmoe(*, k: int = 8, norm_topk_prob: bool = False) -> SparseMoEOptions:
    r"""OLMoE sparse MoE block (HF ``OlmoeSparseMoeBlock``).

    Softmax over $E$ (64), top-$k$ ($k = 8$), renormalised only when ``norm_topk_prob`` (False
    in the released config); SwiGLU experts; dropless; ``router_aux_loss_coef = 0.01``. The
    OLMoE paper also trains with a z-loss (coefficient 0.001) that HF does not compute: set
    ``z_loss_coef`` with ``dataclasses.replace`` to include it.

    Source: transformers v5.24.0 ``models/olmoe/modeling_olmoe.py``, ``configuration_olmoe.py``.
    Muennighoff et al. (2024), "OLMoE: Open Mixture-of-Experts Language Models", arXiv:2409.02060.
    """
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="softmax", normalize="sum" if norm_topk_prob else "none"),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.01,
    )


def gpt_oss(*, k: int = 4) -> SparseMoEOptions:
    r"""GPT-OSS MoE block (HF ``GptOssMLP``: ``GptOssTopKRouter`` and ``GptOssExperts``).

    Router logits with a bias (``RouterParams.bias``); top-$k$ of the logits ($k = 4$), softmax
    over the $k$ winners; clamped SwiGLU experts with biases, interleaved gate/up columns,
    $\beta = 1.702$, limit 7, ``(up + 1)``
    ([`GPT_OSS_SWIGLU`][moeref.expert_ffn.GPT_OSS_SWIGLU]); dropless;
    ``router_aux_loss_coef = 0.001``.

    Source: transformers v5.24.0 ``models/gpt_oss/modeling_gpt_oss.py``,
    ``configuration_gpt_oss.py``.
    """
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="topk_softmax"),
        capacity=CapacityOptions(dropless=True),
        ffn=GPT_OSS_SWIGLU,
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.001,
    )


def llama4(*, k: int = 1, shared_expert: bool = True) -> SparseMoEOptions:
    r"""Llama 4 MoE block (HF ``Llama4TextMoe``), shared expert included.

    Top-$k$ of the logits ($k = 1$), sigmoid of the winners; the weight multiplies the expert
    **input** (``routed_in = hidden_states * router_scores``); SwiGLU experts (``gate_up_proj``
    as stored, gate first); dropless; ``router_aux_loss_coef = 0.001``; one shared SwiGLU
    expert added ungated (``shared_expert=False`` turns it off).

    Source: transformers v5.24.0 ``models/llama4/modeling_llama4.py``,
    ``configuration_llama4.py``.
    """
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="topk_sigmoid"),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
        apply_weight_to="input",
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.001,
        shared=SharedExpertOptions("add", SWIGLU) if shared_expert else None,
    )


def dbrx(*, k: int = 4, moe_normalize_expert_weights: float | None = 1.0, moe_jitter_eps: float = 0.0) -> SparseMoEOptions:
    r"""DBRX MoE FFN (HF ``DbrxFFN``: ``DbrxRouter`` and ``DbrxExperts``).

    Softmax over all $E$ router logits (16 experts), top-$k$ of the probabilities ($k$ =
    ``moe_top_k`` = 4), weights divided by their $L_p$ norm with
    $p$ = ``moe_normalize_expert_weights`` = 1 (``torch.norm(top, p)``; None: no
    normalisation); SwiGLU experts stored as separate ``w1`` (gate), ``v1`` (up), ``w2``
    (down) matrices (layout ``"separate"``, see [`moeref.expert_ffn`][moeref.expert_ffn]);
    dropless; balancing loss ``load_balancing_loss_func`` (every route counts, layers pooled)
    with ``moe_loss_weight = 0.05``; no z-loss. In training, ``moe_jitter_eps`` multiplies the
    hidden states **in place** by uniform factors, so the experts see the jittered input too
    (``jitter_experts=True``, draws ``RouterDraws.jitter``); 0 in the released config.

    Source: transformers v5.24.0 ``models/dbrx/modeling_dbrx.py`` (``DbrxRouter``,
    ``DbrxFFN.route_tokens_to_experts``, ``DbrxExpertGLU``, ``DbrxExperts``),
    ``configuration_dbrx.py``; released values from the ``databricks/dbrx-instruct``
    ``config.json`` (``moe_num_experts=16``, ``moe_top_k=4``, ``moe_loss_weight=0.05``,
    ``moe_jitter_eps=0``, ``moe_normalize_expert_weights=1``).

    Parameters
    ----------
    k : int
        ``moe_top_k``.
    moe_normalize_expert_weights : float or None
        The $p$ of the $L_p$ normalisation, or None for raw top-$k$ probabilities.
    moe_jitter_eps : float
        Multiplicative input jitter $\varepsilon$ (0: off).

    Examples
    --------
    >>> from moeref.presets import dbrx
    >>> o = dbrx()
    >>> o.router.k, o.router.normalize, o.router.normalize_p, o.ffn.gate_up_layout
    (4, 'lp', 1.0, 'separate')
    """
    check_positive_int(k, "k")
    if moe_normalize_expert_weights is not None:
        check_positive_float(moe_normalize_expert_weights, "moe_normalize_expert_weights")
    _check_fraction(moe_jitter_eps, "moe_jitter_eps", "factors in [1 - eps, 1 + eps] must stay positive")
    normalize = "none" if moe_normalize_expert_weights is None else "lp"
    p = 1.0 if moe_normalize_expert_weights is None else float(moe_normalize_expert_weights)
    return SparseMoEOptions(
        router=RouterOptions(
            k=k, score="softmax", normalize=normalize, normalize_p=p, input_jitter=moe_jitter_eps, jitter_experts=moe_jitter_eps > 0
        ),
        capacity=CapacityOptions(dropless=True),
        ffn=ExpertFFN(activation="silu", gated=True, gate_up_layout="separate"),
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.05,
    )


_GSHARD_POLICIES = ("random", "threshold", "all", "none")


def gshard_top2(
    *,
    capacity_factor: float = 2.0,
    group_size: int | None = None,
    second_expert_policy: str = "random",
    second_expert_threshold: float = 0.2,
    dropped_second_takes_slot: bool = False,
) -> SparseMoEOptions:
    r"""GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1) as tensorflow/mesh implements it (``_top_2_gating``).

    Softmax over $E$; the first expert is the arg-max, the second the arg-max of the others;
    both weights are normalised **before** the capacity limit, $g_i / (g_1 + g_2 + 10^{-9})$
    (``normalize="sum_plus_eps"``, $\epsilon = 10^{-9}$); the second-expert policy is applied to
    the normalised $g_2$: Mesh-TF's ``"random"`` (the train and eval default) keeps the second
    route iff $U < g_2/\theta$ with $\theta = 0.2$ (``moe_second_threshold_*``; draws
    ``RouterDraws.second_expert_uniform``, shape $(T,)$); capacity per routing group of $S$
    tokens $C = \min(S, \lfloor c\,S/E \rfloor)$ (``k_factor="none"``, ``rounding="floor"``,
    ``clip_to_group_size``, no minimum; ``int((S * c) / E)`` in Python floats:
    ``arithmetic="python_float"``) with $c = 2$: the $2S/E$ of the paper's Algorithm 1
    (Mesh-TF's ``capacity_factor_train`` default is 1.25, eval 2.0); rank-major priority (every
    first choice in token order, then the second choices, which queue behind the kept first
    choices: ``position_in_expert_2 = cumsum(mask_2) + mask_1_count``); a second route dropped by
    the policy takes no slot; ReLU experts without biases (``MoE1D(activation="relu")``); the
    balancing loss ``mean(density_1_proxy * density_1) * E^2`` per group, i.e.
    $E\sum_i f_i P_i$ with first-choice fractions counted before capacity
    ([`GSHARD`][moeref.aux_losses.GSHARD] with Mesh-TF's padding rule ``mask_mode="zero"``),
    coefficient ``loss_coef = 1e-2``; no z-loss.

    Differences from the paper's Algorithm 1, each available as an option: the paper
    normalises by $g_1 + g_2$ (no $\epsilon$: ``normalize="sum"``), keeps the second expert
    iff $2 g_2 > U$ (``second_expert_threshold=0.5``), lets a second route dropped by that coin
    still take its capacity slot (line 22 increments the counter either way:
    ``dropped_second_takes_slot=True``, i.e.
    ``CapacityOptions.dropped_routes_take_slots``), and writes the loss as
    $\frac1E\sum_e c_e m_e / S$ (the scale [`GSHARD_PAPER`][moeref.aux_losses.GSHARD_PAPER], a
    constant factor $E^2$).

    Source: tensorflow/mesh ``mesh_tensorflow/transformer/moe.py`` at commit ``b6e9d08``
    (``MoE1D``, ``transformer_moe_layer_v1``, ``_top_2_gating``). Lepikhin et al. (2020),
    "GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding", ICLR 2021,
    arXiv:2006.16668, Algorithm 1.

    Parameters
    ----------
    capacity_factor : float
        $c$ in $\lfloor c\,S/E\rfloor$ (2: the paper's $2S/E$).
    group_size : int or None
        $S$, tokens per routing group (Mesh-TF ``moe_group_size`` is at most 1024); None: one
        group.
    second_expert_policy : {"random", "threshold", "all", "none"}
        Mesh-TF's ``moe_second_policy_*``; ``"all"`` needs no draws.
    second_expert_threshold : float
        $\theta$.
    dropped_second_takes_slot : bool
        The paper's slot rule (a second route dropped by the policy still occupies its slot);
        False: Mesh-TF's (it takes none).

    Examples
    --------
    >>> from moeref.capacity import expert_capacity
    >>> from moeref.presets import gshard_top2
    >>> o = gshard_top2(group_size=16)
    >>> o.router.second_expert_policy, expert_capacity(16, 4, 2, o.capacity)  # floor(2 * 16 / 4)
    ('random', 8)
    """
    check_choice(second_expert_policy, "second_expert_policy", _GSHARD_POLICIES)
    check_positive_float(capacity_factor, "capacity_factor")
    if not isinstance(dropped_second_takes_slot, bool):
        raise TypeError(f"dropped_second_takes_slot must be a bool, got {dropped_second_takes_slot!r}")
    return SparseMoEOptions(
        router=RouterOptions(
            k=2,
            score="softmax",
            normalize="sum_plus_eps",
            normalize_eps=1e-9,
            second_expert_policy=second_expert_policy,
            second_expert_threshold=second_expert_threshold,
        ),
        capacity=CapacityOptions(
            capacity_factor=capacity_factor,
            rounding="floor",
            k_factor="none",
            arithmetic="python_float",
            clip_to_group_size=True,
            group_size=group_size,
            priority="rank_major",
            dropped_routes_take_slots=dropped_second_takes_slot,
        ),
        ffn=RELU_FFN,
        load_balancing=dataclasses.replace(GSHARD, mask_mode="zero", group_size=group_size),
        load_balancing_coef=0.01,
    )


_FAIRSEQ_POLICIES = ("random", "sampling", "all")


def fairseq_top2(
    *,
    second_expert_policy: str = "random",
    normalize_gate_prob_before_dropping: bool = False,
    batch_prioritized_routing: bool = False,
) -> SparseMoEOptions:
    r"""fairseq top-2 gating (``Top2Gate`` / ``top2gating``, the fairscale mirror of GShard).

    Softmax over $E$; first expert the arg-max; the second-expert rule
    ``second_expert_policy``: ``"random"`` keeps the second route iff $2 g_2 > U$ (moeref's
    ``"random"`` with $\theta = 0.5$; draws ``RouterDraws.second_expert_uniform``), where $g_2$
    is the raw second probability, or the normalised one with
    ``normalize_gate_prob_before_dropping``; ``"sampling"`` (fairseq's default) picks the
    second expert as the arg-max of the logits plus Gumbel noise among the others
    (``gumbel="selection_after_first"``, draws ``RouterDraws.gumbel``), weights from the
    noise-free probabilities; ``"all"`` keeps every second route. Capacity
    $C = 2\lceil T/E\rceil$ over all $T$ tokens of the batch (``capacity = 2 *
    math.ceil(num_tokens / num_experts)``: ``capacity_factor=1``, ``rounding="ceil"``,
    ``k_factor="outside"``, ``arithmetic="python_float"``); rank-major priority
    (``locations2 += sum(mask1)``, the second choices queue behind every first choice), or
    batch-prioritised routing, which orders the tokens by ``gates.max(dim=1)``, the raw softmax
    top-1 probability, also when the weights are normalised before dropping
    (``priority_values="router_scores"``); a second route dropped by the policy takes no slot. Weights renormalised
    **after** dropping over the kept routes, $g_i / \max(g_1 + g_2, \epsilon_\text{mach})$
    (``normalize="sum_clamp"``, ``torch.finfo(dtype).eps``), unless
    ``normalize_gate_prob_before_dropping``. ReLU experts (fairseq's ``FeedForwardNetwork``,
    with biases); the balancing loss ``mean(me * ce) * E^2`` with first-choice fractions before
    capacity ([`GSHARD`][moeref.aux_losses.GSHARD], padding ``mask_mode="counts_only"``) with
    the coefficient ``--moe-gate-loss-wt 0.01`` of fairseq's MoE training commands; no z-loss.

    Not covered: the evaluation capacity ``ceil(moe_eval_capacity_token_fraction * T)``
    (0.25 by default; express it with ``capacity_factor = 0.25 * E``, ``k_factor="none"``), the
    ``prefix_tokens`` statistics, ``use_fp32``.

    Source: facebookresearch/fairseq ``fairseq/modules/moe/top2gate.py`` at commit
    ``26d62ae8`` (``top2gating``, ``Top2Gate``). Lepikhin et al. (2020), "GShard",
    arXiv:2006.16668, Algorithm 1 (the $2 g_2 > U$ rule).

    Parameters
    ----------
    second_expert_policy : {"random", "sampling", "all"}
        fairseq's ``second_expert_policy`` (any other fairseq value keeps every second route:
        ``"all"``).
    normalize_gate_prob_before_dropping : bool
        Normalise $g_1, g_2$ before the policy and the capacity limit.
    batch_prioritized_routing : bool
        Order tokens by their raw top-1 probability before assigning slots (fairseq sorts with
        the unstable ``argsort``; moeref breaks ties by token index).

    Examples
    --------
    >>> from moeref.capacity import expert_capacity
    >>> from moeref.presets import fairseq_top2
    >>> o = fairseq_top2()
    >>> o.router.second_expert_threshold, o.normalize_after_capacity, expert_capacity(10, 4, 2, o.capacity)
    (0.5, True, 6)
    """
    check_choice(second_expert_policy, "second_expert_policy", _FAIRSEQ_POLICIES)
    if not isinstance(normalize_gate_prob_before_dropping, bool) or not isinstance(batch_prioritized_routing, bool):
        raise TypeError("normalize_gate_prob_before_dropping and batch_prioritized_routing must be bools")
    router = RouterOptions(
        k=2,
        score="softmax",
        normalize="sum_clamp",
        normalize_eps="finfo_eps",
        normalize_after_capacity=not normalize_gate_prob_before_dropping,
        gumbel="selection_after_first" if second_expert_policy == "sampling" else "none",
        second_expert_policy="random" if second_expert_policy == "random" else "all",
        second_expert_threshold=0.5 if second_expert_policy == "random" else 0.2,
    )
    return SparseMoEOptions(
        router=router,
        capacity=CapacityOptions(
            capacity_factor=1.0,
            rounding="ceil",
            k_factor="outside",
            arithmetic="python_float",
            priority="batch_prioritized" if batch_prioritized_routing else "rank_major",
            priority_values="router_scores" if batch_prioritized_routing else "weights",
        ),
        ffn=RELU_FFN,
        load_balancing=GSHARD,
        load_balancing_coef=0.01,
    )


# --------------------------------------------------------------------------------------------
# DeepSpeed (deepspeed/moe/sharded_moe.py)
# --------------------------------------------------------------------------------------------


def deepspeed_capacity(num_tokens: int, num_experts: int, capacity_factor: float, *, k: int = 1, min_capacity: int = 0) -> int:
    r"""DeepSpeed's expert capacity, bit for bit: its ``_capacity`` evaluated in float32.

    $$C = \max\Big(\big\lceil \mathrm{fl}_{32}\big(\mathrm{fl}_{32}(T/E)\cdot
    \mathrm{fl}_{32}(c\,k)\big)\big\rceil,\ C_\text{min}\Big),$$

    where $\mathrm{fl}_{32}$ rounds to float32: ``torch.tensor(capacity_factor * k)`` is a
    float32 tensor, and ``(num_tokens / num_experts) * capacity_factor`` multiplies it by the
    Python float $T/E$ in float32. This is
    [`expert_capacity`][moeref.capacity.expert_capacity] with
    ``CapacityOptions(arithmetic="deepspeed_float32", rounding="ceil", k_factor="inside")``, the
    arithmetic the DeepSpeed presets use; kept as a shortcut. The exact rule
    (``arithmetic="exact"``) differs wherever the product lies within float32 rounding of an
    integer: $T = 10$, $E = 2$, $c = 1.1$, $k = 2$ gives 11 here (the float32 product is exactly
    11) and 12 exactly (the double 1.1 is slightly above 11/10).

    Source: microsoft/DeepSpeed v0.19.8 (the installed version) ``deepspeed/moe/sharded_moe.py``
    ``_capacity``; ``top1gating`` passes ``capacity_factor``, ``top2gating``
    ``capacity_factor * 2``, ``topkgating`` ``capacity_factor * k``.

    Parameters
    ----------
    num_tokens, num_experts : int
        $T$ (all tokens of the local batch) and $E$.
    capacity_factor : float
        $c$.
    k : int
        1 for ``top1gating``, 2 for ``top2gating``, $k$ for ``topkgating``.
    min_capacity : int
        $C_\text{min}$.

    Returns
    -------
    int

    Examples
    --------
    >>> from moeref.presets import deepspeed_capacity
    >>> deepspeed_capacity(10, 2, 1.1, k=2), deepspeed_capacity(100, 3, 1.25, k=3)
    (11, 125)
    """
    check_positive_int(num_tokens, "num_tokens")
    check_positive_int(num_experts, "num_experts")
    check_positive_int(k, "k")
    check_positive_int(min_capacity, "min_capacity", minimum=0)
    c = check_positive_float(capacity_factor, "capacity_factor")
    options = CapacityOptions(capacity_factor=c, rounding="ceil", k_factor="inside", min_capacity=min_capacity, arithmetic="deepspeed_float32")
    return expert_capacity(num_tokens, num_experts, k, options)


_DS_NOISE = (None, "Jitter", "RSample")


def _deepspeed_capacity_options(
    capacity_factor: float,
    min_capacity: int,
    k: int,
    k_factor: str,
    drop_tokens: bool,
    priority: str,
    num_tokens: int | None,
    num_experts: int | None,
) -> CapacityOptions:
    if not isinstance(drop_tokens, bool):
        raise TypeError(f"drop_tokens must be a bool, got {drop_tokens!r}")
    check_positive_float(capacity_factor, "capacity_factor")
    check_positive_int(min_capacity, "min_capacity", minimum=0)
    if (num_tokens is None) != (num_experts is None):
        raise ValueError("num_tokens and num_experts must be given together (to pin DeepSpeed's float32 capacity) or both be None")
    if not drop_tokens:
        return CapacityOptions(dropless=True)
    if num_tokens is not None:  # the former way to get DeepSpeed's float32 value: still a fixed capacity
        fixed = deepspeed_capacity(num_tokens, num_experts, capacity_factor, k=k, min_capacity=min_capacity)
        return CapacityOptions(capacity=fixed, capacity_factor=None, priority=priority)
    return CapacityOptions(
        capacity_factor=capacity_factor,
        rounding="ceil",
        k_factor=k_factor,
        min_capacity=min_capacity,
        arithmetic="deepspeed_float32",
        priority=priority,
    )


def _deepspeed_jitter(noisy_gate_policy: str | None) -> float:
    return 0.01 if noisy_gate_policy == "Jitter" else 0.0


def deepspeed_top1(
    *,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    use_rts: bool = True,
    noisy_gate_policy: str | None = None,
    num_tokens: int | None = None,
    num_experts: int | None = None,
) -> SparseMoEOptions:
    r"""DeepSpeed top-1 gating (``top1gating``; the Switch rule with DeepSpeed's capacity and random token selection).

    Softmax over $E$ (float32 in DeepSpeed); the expert is the arg-max of the probabilities, its
    weight the raw probability (``normalize="none"``); capacity
    $\max(\lceil c\,T/E\rceil, C_\text{min})$ over all $T$ tokens (``rounding="ceil"``,
    ``k_factor="none"``, evaluated in float32 as DeepSpeed does:
    ``arithmetic="deepspeed_float32"``); with ``use_rts`` (Random Token
    Selection, the default) each expert keeps the routes with the largest uniform draws
    (``priority="random"``, draws ``CapacityDraws.uniform`` of shape $(T, 1)$: DeepSpeed's
    ``mask1 * uniform`` then ``topk`` over tokens); ``drop_tokens=False`` is dropless.
    ``noisy_gate_policy="RSample"`` selects the arg-max of logits plus Gumbel noise with the
    weight still the noise-free probability (``gumbel="selection"``, draws
    ``RouterDraws.gumbel``); ``"Jitter"`` multiplies the router's copy of the input by
    $U(1-10^{-2}, 1+10^{-2})$ (``input_jitter=0.01``, experts see the clean input; draws
    ``RouterDraws.jitter``); DeepSpeed applies both in training only. Balancing loss
    ``sum(me * ce) * E``: top-1 fractions before capacity
    ([`SWITCH_TRANSFORMER`][moeref.aux_losses.SWITCH_TRANSFORMER]); DeepSpeed returns it
    unweighted (coefficient 1 here: ``aux_loss`` is DeepSpeed's ``l_aux``); no z-loss. The
    expert FFN is the caller's module (ReLU here).

    With ``use_rts=False`` DeepSpeed keeps the first $C$ of ``torch.topk`` over a 0/1 column,
    whose order among equal values is unspecified (on CPU it is not token order): moeref uses
    rank-major token order there, and only the per-expert counts are comparable. DeepSpeed
    numbers the kept routes' buffer slots in token order, moeref in priority order; the kept
    routes and the weights agree.

    Source: microsoft/DeepSpeed v0.19.8 (the installed version) ``deepspeed/moe/sharded_moe.py``
    (``_capacity``, ``top1gating``, ``TopKGate``, ``multiplicative_jitter``,
    ``gumbel_rsample``); ``min_capacity=4`` is the default of ``deepspeed.moe.layer.MoE``
    (``TopKGate`` alone defaults to 8). Rajbhandari et al. (2022), "DeepSpeed-MoE", ICML 2022,
    arXiv:2201.05596.

    Parameters
    ----------
    capacity_factor : float
        $c$ (``capacity_factor`` in training, ``eval_capacity_factor`` in evaluation).
    min_capacity : int
        $C_\text{min}$.
    drop_tokens : bool
        False: dropless.
    use_rts : bool
        Random token selection.
    noisy_gate_policy : {None, "Jitter", "RSample"}
    num_tokens, num_experts : int or None
        Not needed (see [`deepspeed_top2`][moeref.presets.deepspeed_top2]).

    Examples
    --------
    >>> from moeref.presets import deepspeed_top1
    >>> o = deepspeed_top1()
    >>> o.router.k, o.capacity.priority, o.capacity.min_capacity, o.load_balancing_coef
    (1, 'random', 4, 1.0)
    """
    if noisy_gate_policy not in _DS_NOISE:
        raise ValueError(f"noisy_gate_policy must be None, 'Jitter' or 'RSample'; got {noisy_gate_policy!r}")
    if not isinstance(use_rts, bool):
        raise TypeError(f"use_rts must be a bool, got {use_rts!r}")
    priority = "random" if use_rts else "rank_major"
    return SparseMoEOptions(
        router=RouterOptions(
            k=1,
            score="softmax",
            normalize="none",
            input_jitter=_deepspeed_jitter(noisy_gate_policy),
            gumbel="selection" if noisy_gate_policy == "RSample" else "none",
        ),
        capacity=_deepspeed_capacity_options(capacity_factor, min_capacity, 1, "none", drop_tokens, priority, num_tokens, num_experts),
        ffn=RELU_FFN,
        load_balancing=SWITCH_TRANSFORMER,
        load_balancing_coef=1.0,
    )


def deepspeed_top2(
    *,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    top2_2nd_expert_sampling: bool = True,
    noisy_gate_policy: str | None = None,
    num_tokens: int | None = None,
    num_experts: int | None = None,
) -> SparseMoEOptions:
    r"""DeepSpeed top-2 gating (``top2gating``; GShard's top-2 with DeepSpeed's capacity).

    Softmax over $E$ (DeepSpeed runs it in float32 only); first expert the arg-max; with
    ``top2_2nd_expert_sampling`` (the default) the second is the arg-max of logits plus Gumbel
    noise among the others (``gumbel="selection_after_first"``, draws ``RouterDraws.gumbel``;
    DeepSpeed adds the noise to its ``logits`` argument **in place**), else the second-largest
    probability; weights are the noise-free probabilities. Capacity
    $\max(\lceil 2c\,T/E\rceil, C_\text{min})$ over all $T$ tokens (``rounding="ceil"``,
    ``k_factor="inside"``, in DeepSpeed's float32: ``arithmetic="deepspeed_float32"``);
    rank-major priority
    (``locations2 += sum(mask1)``: second choices queue behind every first choice);
    ``drop_tokens=False`` is dropless. Weights renormalised **after** dropping,
    $g_i/\max(g_1 + g_2, \epsilon_\text{mach})$ over the kept routes (``normalize="sum_clamp"``,
    ``torch.finfo(dtype).eps``). ``noisy_gate_policy="Jitter"`` jitters the router's input as
    in [`deepspeed_top1`][moeref.presets.deepspeed_top1] (``"RSample"`` is top-1 only).
    Balancing loss ``mean(me * ce) * E * E``: first-choice fractions before capacity
    ([`GSHARD`][moeref.aux_losses.GSHARD]), returned unweighted (coefficient 1); no z-loss.
    Expert FFN: the caller's (ReLU here).

    Source: microsoft/DeepSpeed v0.19.8 (the installed version) ``deepspeed/moe/sharded_moe.py``
    (``_capacity``, ``top2gating``, ``TopKGate``); ``min_capacity=4`` is the default of
    ``deepspeed.moe.layer.MoE`` (``TopKGate``: 8).

    Parameters
    ----------
    capacity_factor : float
        $c$ (DeepSpeed multiplies it by 2).
    min_capacity : int
        $C_\text{min}$.
    drop_tokens : bool
        False: dropless.
    top2_2nd_expert_sampling : bool
        Gumbel sampling of the second expert.
    noisy_gate_policy : {None, "Jitter"}
    num_tokens, num_experts : int or None
        Not needed: the capacity is already DeepSpeed's float32 value for every batch size.
        When given (both), the capacity is fixed to
        [`deepspeed_capacity`][moeref.presets.deepspeed_capacity] for this batch (a fixed
        ``capacity``, the same number); kept for compatibility.

    Examples
    --------
    >>> from moeref.capacity import expert_capacity
    >>> from moeref.presets import deepspeed_top2
    >>> o = deepspeed_top2(capacity_factor=1.1, min_capacity=0)
    >>> expert_capacity(10, 2, 2, o.capacity), o.router.gumbel, o.normalize_after_capacity  # DeepSpeed's 11, not 12
    (11, 'selection_after_first', True)
    """
    if noisy_gate_policy not in (None, "Jitter"):
        raise ValueError(f"noisy_gate_policy must be None or 'Jitter' for top-2 ('RSample' is top-1 only); got {noisy_gate_policy!r}")
    if not isinstance(top2_2nd_expert_sampling, bool):
        raise TypeError(f"top2_2nd_expert_sampling must be a bool, got {top2_2nd_expert_sampling!r}")
    return SparseMoEOptions(
        router=RouterOptions(
            k=2,
            score="softmax",
            normalize="sum_clamp",
            normalize_eps="finfo_eps",
            normalize_after_capacity=True,
            input_jitter=_deepspeed_jitter(noisy_gate_policy),
            gumbel="selection_after_first" if top2_2nd_expert_sampling else "none",
        ),
        capacity=_deepspeed_capacity_options(capacity_factor, min_capacity, 2, "inside", drop_tokens, "rank_major", num_tokens, num_experts),
        ffn=RELU_FFN,
        load_balancing=GSHARD,
        load_balancing_coef=1.0,
    )


_DS_DROP_POLICIES = {"probs": "score", "position": "token_major"}


def deepspeed_topk(
    *,
    k: int = 4,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    drop_policy: str = "probs",
    noisy_gate_policy: str | None = None,
    num_tokens: int | None = None,
    num_experts: int | None = None,
) -> SparseMoEOptions:
    r"""DeepSpeed top-$k$ gating (``topkgating``, which ``TopKGate`` uses for $k > 2$).

    Softmax over $E$; the $k$ largest probabilities (``torch.topk``); capacity
    $\max(\lceil k c\,T/E\rceil, C_\text{min})$ over all $T$ tokens (``rounding="ceil"``,
    ``k_factor="inside"``, in DeepSpeed's float32: ``arithmetic="deepspeed_float32"``);
    ``drop_policy="probs"`` (the
    default) keeps, per expert, the routes with the largest probabilities
    (``priority="score"`` on the raw probabilities), ``"position"`` the first in token order
    (``priority="token_major"``); ``drop_tokens=False`` is dropless. Weights renormalised
    **after** dropping, $g_j / \max(\sum_{\text{kept}} g, \epsilon_\text{mach})$
    (``normalize="sum_clamp"``). ``noisy_gate_policy="Jitter"`` jitters the router's input.
    Balancing loss ``mean(me * ce) * E * E / k``: every route counts $1/k$, before capacity
    ([`DEEPSPEED_TOPK`][moeref.aux_losses.DEEPSPEED_TOPK]), returned unweighted (coefficient
    1); no z-loss. Expert FFN: the caller's (ReLU here).

    Source: microsoft/DeepSpeed v0.19.8 (the installed version) ``deepspeed/moe/sharded_moe.py``
    (``_capacity``, ``topkgating``, ``TopKGate``).

    Parameters
    ----------
    k : int
        Routes per token.
    capacity_factor : float
        $c$ (DeepSpeed multiplies it by $k$).
    min_capacity : int
        $C_\text{min}$.
    drop_tokens : bool
        False: dropless.
    drop_policy : {"probs", "position"}
    noisy_gate_policy : {None, "Jitter"}
    num_tokens, num_experts : int or None
        Not needed (see [`deepspeed_top2`][moeref.presets.deepspeed_top2]).

    Examples
    --------
    >>> from moeref.presets import deepspeed_topk
    >>> o = deepspeed_topk(k=3, drop_policy="position")
    >>> o.capacity.priority, o.load_balancing.fraction
    ('token_major', 'all_routes_over_k')
    """
    check_positive_int(k, "k")
    check_choice(drop_policy, "drop_policy", tuple(_DS_DROP_POLICIES))
    if noisy_gate_policy not in (None, "Jitter"):
        raise ValueError(f"noisy_gate_policy must be None or 'Jitter' for top-k ('RSample' is top-1 only); got {noisy_gate_policy!r}")
    priority = _DS_DROP_POLICIES[drop_policy]
    return SparseMoEOptions(
        router=RouterOptions(
            k=k,
            score="softmax",
            normalize="sum_clamp",
            normalize_eps="finfo_eps",
            normalize_after_capacity=True,
            input_jitter=_deepspeed_jitter(noisy_gate_policy),
        ),
        capacity=_deepspeed_capacity_options(capacity_factor, min_capacity, k, "inside", drop_tokens, priority, num_tokens, num_experts),
        ffn=RELU_FFN,
        load_balancing=DEEPSPEED_TOPK,
        load_balancing_coef=1.0,
    )


# --------------------------------------------------------------------------------------------
# Papers with their reference code
# --------------------------------------------------------------------------------------------


def shazeer2017(*, k: int = 4, noisy: bool = True, loss_coef: float = 1e-2) -> SparseMoEOptions:
    r"""Noisy top-$k$ gating of Shazeer et al. (2017), eqs. (3)-(5), with its importance and load losses, as tensor2tensor implements it.

    $$H(x)_i = (x W_g)_i + \mathcal N(0, 1)\cdot\big(\operatorname{softplus}((x W_\text{noise})_i) + \epsilon\big),
    \qquad G(x) = \operatorname{softmax}\big(\operatorname{KeepTopK}(H(x), k)\big):$$

    the top-$k$ of the noisy logits, softmax over those $k$ (``score="topk_softmax"``,
    ``noisy_top_k=True``: pass ``RouterParams.noise_weight`` $W_\text{noise}$ and the normal
    draws ``RouterDraws.noise``; ``noisy=False`` gives the noise-free gate of evaluation), with
    tensor2tensor's noise floor $\epsilon = 10^{-2}$ (``noise_epsilon``; the paper's eq. (4) has
    none); no capacity limit (dropless); experts with one ReLU hidden layer (Sec. 3.1 /
    Appendix C). The layer computes the paper's two balancing losses over all $T$ tokens and
    differentiates them with the draws held fixed: the importance loss
    $w_\text{importance}\,\mathrm{CV}(\sum_x G(x))^2$ (eqs. (6)-(7),
    ``importance_loss="shazeer2017"``) and the load loss $w_\text{load}\,\mathrm{CV}(\mathrm{Load})^2$
    with the smooth normal-CDF load estimator (eqs. (8)-(11), ``load_loss="shazeer2017"``),
    with tensor2tensor's $\mathrm{CV}^2$ (population variance, $10^{-10}$ epsilons:
    [`SHAZEER_TENSOR2TENSOR`][moeref.aux_losses.SHAZEER_TENSOR2TENSOR]) and both weights
    $10^{-2}$, tensor2tensor's ``local_moe(..., loss_coef=1e-2)`` default (``loss_coef *
    (cv_squared(importance) + cv_squared(load))``; the paper's Appendix A compares several
    values of $w_\text{importance}$ and $w_\text{load}$). With ``noisy=False``
    only the importance loss is computed (tensor2tensor's noise-free load is a token count, not
    differentiable). The Switch-style balancing loss and the z-loss are reported with
    coefficient 0.

    Source: Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton & Dean (2017), "Outrageously Large
    Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, arXiv:1701.06538,
    eqs. (1), (3)-(5), (6)-(11); reference code tensorflow/tensor2tensor at commit ``e1f0e3a7``
    ``tensor2tensor/utils/expert_utils.py`` (``noisy_top_k_gating``, ``cv_squared``,
    ``local_moe``).

    Parameters
    ----------
    k : int
        Experts per token (4 in the paper's language-model experiments); the load loss needs
        $k < E$.
    noisy : bool
        Noisy gating (training); False: $H = x W_g$ and no load loss.
    loss_coef : float
        $w_\text{importance} = w_\text{load}$ (tensor2tensor's ``loss_coef``).

    Examples
    --------
    >>> from moeref.presets import shazeer2017
    >>> o = shazeer2017()
    >>> o.router.score, o.router.noise_epsilon, o.importance_loss, o.load_loss, o.load_loss_coef
    ('topk_softmax', 0.01, 'shazeer2017', 'shazeer2017', 0.01)
    """
    check_positive_int(k, "k")
    if not isinstance(noisy, bool):
        raise TypeError(f"noisy must be a bool, got {noisy!r}")
    loss_coef = _check_coef(loss_coef, "loss_coef")
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="topk_softmax", noisy_top_k=noisy, noise_epsilon=1e-2 if noisy else 0.0),
        capacity=CapacityOptions(dropless=True),
        ffn=RELU_FFN,
        importance_loss="shazeer2017",
        importance_loss_coef=loss_coef,
        load_loss="shazeer2017" if noisy else None,
        load_loss_coef=loss_coef if noisy else 0.0,
        shazeer_loss=SHAZEER_TENSOR2TENSOR,
    )


def _check_coef(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_fraction(value: Any, name: str, why: str) -> float:
    """A number in $[0, 1)$ (a jitter $\\varepsilon$), named as the preset's keyword."""
    value = _check_coef(value, name)
    if value >= 1:
        raise ValueError(f"{name} must be below 1 ({why}), got {value!r}")
    return value


def vmoe(
    *,
    k: int = 2,
    capacity_factor: float = 1.05,
    group_size: int | None = None,
    batch_priority: bool = True,
    noise_std: float = 1.0,
    importance_loss_weight: float = 0.005,
    load_loss_weight: float = 0.005,
) -> SparseMoEOptions:
    r"""V-MoE (Riquelme et al. 2021): noisy softmax router, per-group capacity, Batch Prioritized Routing.

    Logits plus fixed-std Gaussian noise $(\sigma/E)\,\mathcal N(0, 1)$ with $\sigma$ =
    ``noise_std`` = 1 (``logit_noise_std``, draws ``RouterDraws.logit_noise``; V-MoE's router is
    deterministic at inference: ``noise_std=0``), used for the selection **and** the weights;
    softmax over $E$, top-$k$ ($k = 2$), weights the raw (noisy) probabilities, no
    renormalisation. Capacity per routing group of $S$ tokens
    $\lceil c\,k\,S/E\rceil$ rounded up to a multiple of 4 (``compute_capacity``:
    ``rounding="ceil"``, ``k_factor="inside"``, ``multiple_of=4``; ``ceil(S * k * c / E)`` in
    Python floats: ``arithmetic="python_float"``) with $c = 1.05$ (the paper's training value;
    ``capacity_factor``); rank-major priority with the tokens ordered by their top-1 weight,
    descending (Batch Prioritized Routing, ``batch_priority``; the paper's configs train
    without it and use it at inference); experts are ViT MLPs, Dense-GELU-Dense with biases and
    Flax's default tanh GELU (``nn.gelu``). The layer computes V-MoE's two auxiliary losses per
    routing group and averages them, differentiated with the draws held fixed: the importance
    loss, $\mathrm{CV}^2$ of the per-expert sums of the **clean** softmax probabilities
    (``importance_loss="vmoe"``), and the load loss, $\mathrm{CV}^2$ of the mean probability
    that each expert beats the $k$-th largest noisy logit under the fixed noise std $\sigma/E$
    (``load_loss="vmoe"``; only with noise, as in V-MoE), each weighted 0.005
    (``importance_loss_weight``, ``load_loss_weight`` of ``vmoe/configs/vmoe_paper/common.py``).
    The Switch-style losses are reported with coefficient 0.

    Source: google-research/vmoe at commit ``fc7b61a6``: ``vmoe/nn/routing.py``
    (``NoisyTopExpertsPerItemRouter``), ``vmoe/moe.py`` (``compute_capacity``,
    ``get_top_experts_per_item_dispatcher``, ``_get_top_experts_per_item_common``),
    ``vmoe/nn/vit_moe.py``; values from ``vmoe/configs/vmoe_paper/common.py``
    (``noise_std=1.0``, ``capacity_factor=1.05``, loss weights 0.005, ``batch_priority=False``,
    ``group_size`` = 8 images' tokens). Riquelme et al. (2021), "Scaling Vision with Sparse
    Mixture of Experts", NeurIPS 2021, arXiv:2106.05974, Sec. 2 and Sec. 4 (Batch Prioritized
    Routing), Appendix A.

    Parameters
    ----------
    k : int
        ``num_selected_experts``.
    capacity_factor : float
        $c$.
    group_size : int or None
        Tokens per routing group (None: one group).
    batch_priority : bool
        Batch Prioritized Routing; False: token order.
    noise_std : float
        $\sigma$; 0 for the deterministic router (then no load loss).
    importance_loss_weight, load_loss_weight : float
        The two losses' coefficients (V-MoE's names).

    Examples
    --------
    >>> from moeref.capacity import expert_capacity
    >>> from moeref.presets import vmoe
    >>> o = vmoe(group_size=16)
    >>> o.capacity.priority, expert_capacity(16, 8, 2, o.capacity)  # ceil(1.05 * 2 * 16 / 8) = 5 -> 8
    ('batch_prioritized', 8)
    """
    check_positive_int(k, "k")
    if not isinstance(batch_priority, bool):
        raise TypeError(f"batch_priority must be a bool, got {batch_priority!r}")
    importance_loss_weight = _check_coef(importance_loss_weight, "importance_loss_weight")
    load_loss_weight = _check_coef(load_loss_weight, "load_loss_weight")
    noise_std = _check_coef(noise_std, "noise_std")
    router = RouterOptions(k=k, score="softmax", normalize="none", logit_noise_std=noise_std)
    noisy = router.logit_noise_std > 0
    return SparseMoEOptions(
        router=router,
        capacity=CapacityOptions(
            capacity_factor=capacity_factor,
            rounding="ceil",
            k_factor="inside",
            multiple_of=4,
            arithmetic="python_float",
            group_size=group_size,
            priority="batch_prioritized" if batch_priority else "rank_major",
        ),
        ffn=GELU_TANH_FFN,
        importance_loss="vmoe",
        importance_loss_coef=importance_loss_weight,
        load_loss="vmoe" if noisy else None,
        load_loss_coef=load_loss_weight if noisy else 0.0,
    )


PRESETS: dict[str, Callable[..., SparseMoEOptions]] = {
    "mixtral": mixtral,
    "switch": switch,
    "deepseek_v3": deepseek_v3,
    "qwen2_moe": qwen2_moe,
    "olmoe": olmoe,
    "gpt_oss": gpt_oss,
    "llama4": llama4,
    "dbrx": dbrx,
    "gshard_top2": gshard_top2,
    "fairseq_top2": fairseq_top2,
    "deepspeed_top1": deepspeed_top1,
    "deepspeed_top2": deepspeed_top2,
    "deepspeed_topk": deepspeed_topk,
    "shazeer2017": shazeer2017,
    "vmoe": vmoe,
}
"""System name -> preset function (call it, with keyword overrides, to get the options)."""


# --------------------------------------------------------------------------------------------
# Conventions matrix: every option of every preset, read from the option objects
# --------------------------------------------------------------------------------------------

MISSING = "—"
"""Cell text of an option a preset does not have (a nested record that is None there)."""


class ConventionRow(NamedTuple):
    """One row of the conventions matrix.

    Attributes
    ----------
    option : str
        Display name (Markdown).
    keys : tuple of str
        The dotted option fields the row is read from (``"router.score"``, ...).
    values : dict
        Preset name -> cell text (Markdown).
    """

    option: str
    keys: tuple[str, ...]
    values: dict[str, str]


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of every field that is not itself a dataclass, in declaration order."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(_leaves(value, path + "."))
        else:
            out.append((path, value))
    return out


def _format_leaf(value: Any) -> str:
    """A leaf value as text that :func:`_parse_leaf` reads back (Python literal syntax; ``inf`` for infinities)."""
    return repr(value)


def _parse_leaf(text: Any, path: str = "value") -> Any:
    """A cell's text back to its value (Python literal syntax, or ``inf``, ``-inf``, ``nan``)."""
    where = f"column[{path!r}]"
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str (a Python literal as conventions_table writes it), got {type(text).__name__} {text!r}")
    if text in ("inf", "-inf", "nan"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(
            f"{where} = {text!r} is not a Python literal (e.g. 2, 1.0, 'sum', None, True, -inf): {type(exc).__name__}"
        ) from None


def _show(value: Any) -> str:
    """A value in code font (strings without quotes)."""
    return f"`{value}`" if isinstance(value, str) else f"`{_format_leaf(value)}`"


def _get(options: Any, path: str) -> Any:
    for name in path.split("."):
        options = getattr(options, name)
    return options


# --- summary rows: one per convention, each reads the fields it names -----------------------


def _selection(o: SparseMoEOptions) -> str:
    r = o.router
    text = _show(r.effective_selection)
    if r.n_group is not None:
        text += (
            f"; best {r.topk_group} of {r.n_group} groups (group score {_show(r.group_score)}, "
            f"other groups set to {_show(r.group_masked_score)})"
        )
    return text


def _normalisation(o: SparseMoEOptions) -> str:
    r = o.router
    text = _show(r.normalize)
    if r.normalize in ("sum_plus_eps", "sum_clamp"):
        text += f" (ε = {_show(r.normalize_eps)})"
    elif r.normalize == "lp":
        text += f" (p = {_show(r.normalize_p)})"
    if r.normalize != "none" or r.normalize_after_capacity:
        text += ", after capacity" if r.normalize_after_capacity else ", before capacity"
    if r.routed_scaling_factor != 1.0:
        text += f", × {_show(r.routed_scaling_factor)}"
    return text


def _noise(o: SparseMoEOptions) -> str:
    r = o.router
    parts = []
    if r.noisy_top_k:
        floor = f" + {_show(r.noise_epsilon)}" if r.noise_epsilon > 0 else ""
        parts.append(f"noisy top-k: N(0,1)·(softplus(x W_noise){floor})")
    if r.input_jitter > 0:
        where = "router and experts" if r.jitter_experts else "router only"
        parts.append(f"input jitter ε = {_show(r.input_jitter)} ({where})")
    if r.logit_noise_std > 0:
        parts.append(f"logit noise (σ/E)·N(0,1), σ = {_show(r.logit_noise_std)}")
    if r.gumbel != "none":
        parts.append(f"Gumbel {_show(r.gumbel)}")
    return "; ".join(parts) if parts else "none"


def _second_expert(o: SparseMoEOptions) -> str:
    r = o.router
    text = _show(r.second_expert_policy)
    if r.second_expert_policy in ("threshold", "random"):
        text += f", θ = {_show(r.second_expert_threshold)}"
    return text


def _capacity_rule(o: SparseMoEOptions) -> str:
    c = o.capacity
    if c.dropless:
        return "dropless"
    if c.capacity is not None:
        return f"fixed C = {_show(c.capacity)}"
    r = _show(c.rounding)
    core = {"inside": f"{r}(c·k·T/E)", "outside": f"k·{r}(c·T/E)", "none": f"{r}(c·T/E)"}[c.k_factor]
    text = f"{core}, c = {_show(c.capacity_factor)}"
    if c.clip_to_group_size:
        text += ", at most T"
    if c.min_capacity > 0:
        text += f", at least {_show(c.min_capacity)}"
    if c.multiple_of > 1:
        text += f", multiple of {_show(c.multiple_of)}"
    if c.zero_capacity_means_dropless:
        text += ", 0 means dropless"
    if c.arithmetic != "exact":
        text += f", in {_show(c.arithmetic)} arithmetic"
    return text


def _routing_group(o: SparseMoEOptions) -> str:
    return "all tokens" if o.capacity.group_size is None else f"T = {_show(o.capacity.group_size)} tokens"


def _priority(o: SparseMoEOptions) -> str:
    c = o.capacity
    if c.dropless:
        return "n/a (dropless)"
    text = _show(c.priority)
    if c.priority in ("batch_prioritized", "score"):
        text += f" by {_show(c.priority_values)}"
    if c.dropped_routes_take_slots:
        text += "; routes dropped before capacity keep their slots"
    return text


def _gate_losses(o: SparseMoEOptions) -> str:
    parts = []
    for name, kind, coef in (("importance", o.importance_loss, o.importance_loss_coef), ("load", o.load_loss, o.load_loss_coef)):
        if kind is not None:
            parts.append(f"{name} {_show(kind)} × {_show(coef)}")
    if not parts:
        return "none"
    sh = o.shazeer_loss
    if sh is not None:
        parts.append(f"CV² {_show(sh.variance)} variance, ε = {_show(sh.epsilon)}, n + {_show(sh.size_epsilon)}")
    return "; ".join(parts)


def _ffn(o: SparseMoEOptions) -> str:
    f = o.ffn
    text = f"GLU, {_show(f.activation)} gate, {_show(f.gate_up_layout)}" if f.gated else f"{_show(f.activation)} FFN"
    if f.swish_beta != 1.0:
        text += f", β = {_show(f.swish_beta)}"
    if f.clamp_limit is not None:
        text += f", clamp {_show(f.clamp_limit)}"
    if f.up_offset != 0.0:
        text += f", up + {_show(f.up_offset)}"
    return text


def _balancing(o: SparseMoEOptions) -> str:
    lb = o.load_balancing
    coef = f"α = {_show(o.load_balancing_coef)}" + (" (reported only)" if o.load_balancing_coef == 0 else "")
    groups = "one group" if lb.group_size is None else f"groups of {_show(lb.group_size)}"
    text = f"{coef}; {_show(lb.fraction)}, scale {_show(lb.scale)}, {groups}, layers {_show(lb.layers)}, padding {_show(lb.mask_mode)}"
    if not lb.count_dropped_routes:
        text += ", kept routes only"
    return text


def _z_loss(o: SparseMoEOptions) -> str:
    return f"β = {_show(o.z_loss_coef)}" if o.z_loss_coef != 0 else "off (β = 0)"


_R, _C, _F, _L = "router.", "capacity.", "ffn.", "load_balancing."

_SUMMARY: tuple[tuple[str, tuple[str, ...], Callable[[SparseMoEOptions], str]], ...] = (
    ("routes per token $k$", (_R + "k",), lambda o: _show(o.router.k)),
    ("score function", (_R + "score",), lambda o: _show(o.router.score)),
    ("top-$k$ runs on", tuple(_R + n for n in ("selection", "n_group", "topk_group", "group_score", "group_masked_score")), _selection),
    (
        "weight normalisation",
        tuple(_R + n for n in ("normalize", "normalize_eps", "normalize_p", "normalize_after_capacity", "routed_scaling_factor")),
        _normalisation,
    ),
    (
        "noise (explicit draws)",
        tuple(_R + n for n in ("noisy_top_k", "noise_epsilon", "input_jitter", "jitter_experts", "logit_noise_std", "gumbel")),
        _noise,
    ),
    ("second-expert policy", (_R + "second_expert_policy", _R + "second_expert_threshold"), _second_expert),
    (
        "capacity",
        tuple(
            _C + n
            for n in (
                "dropless",
                "capacity",
                "capacity_factor",
                "rounding",
                "k_factor",
                "min_capacity",
                "multiple_of",
                "clip_to_group_size",
                "zero_capacity_means_dropless",
                "arithmetic",
            )
        ),
        _capacity_rule,
    ),
    ("routing group", (_C + "group_size",), _routing_group),
    ("drop priority", tuple(_C + n for n in ("priority", "priority_values", "dropped_routes_take_slots")), _priority),
    ("expert FFN", tuple(_F + n for n in ("activation", "gated", "gate_up_layout", "swish_beta", "clamp_limit", "up_offset")), _ffn),
    ("weight applied to", ("apply_weight_to",), lambda o: _show(o.apply_weight_to)),
    (
        "balancing loss",
        tuple(_L + n for n in ("fraction", "scale", "group_size", "mask_mode", "count_dropped_routes", "layers")) + ("load_balancing_coef",),
        _balancing,
    ),
    ("router z-loss", ("z_loss_coef",), _z_loss),
    (
        "importance and load losses",
        ("importance_loss", "importance_loss_coef", "load_loss", "load_loss_coef", "shazeer_loss")
        + tuple("shazeer_loss." + n for n in ("variance", "epsilon", "size_epsilon", "noise_epsilon")),
        _gate_losses,
    ),
)

_DISPLAY_NAMES = {
    "shared": "shared experts",
    "shared_experts": "shared experts",
    "sequence_balance": "sequence-wise balance loss",
    "sequence_balance_coef": "sequence-wise balance loss coefficient",
}
"""Display names of option fields that have no summary row of their own (others show their path)."""


def _label(path: str) -> str:
    """Display name of an option field without a summary row: a known name, else its dotted path."""
    if path in _DISPLAY_NAMES:
        return _DISPLAY_NAMES[path]
    head, _, rest = path.partition(".")
    return f"{_DISPLAY_NAMES[head]}: `{rest}`" if head in _DISPLAY_NAMES and rest else f"`{path}`"


def _preset_options(presets: dict[str, SparseMoEOptions] | None) -> dict[str, SparseMoEOptions]:
    if presets is None:
        return {name: make() for name, make in PRESETS.items()}
    for name, options in presets.items():
        if not isinstance(options, SparseMoEOptions):
            raise TypeError(f"presets[{name!r}] must be a SparseMoEOptions, got {type(options).__name__}")
    return dict(presets)


def _columns(options: dict[str, SparseMoEOptions]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The union of leaf paths (first-seen order) and each preset's leaves."""
    paths: list[str] = []
    leaves: dict[str, dict[str, Any]] = {}
    for name, o in options.items():
        leaves[name] = dict(_leaves(o))
        paths.extend(p for p in leaves[name] if p not in paths)
    return paths, leaves


def conventions_table(presets: dict[str, SparseMoEOptions] | None = None, *, detailed: bool = False) -> list[ConventionRow]:
    r"""The conventions matrix: one row per option, one value per preset, read from the option objects.

    Every field of [`SparseMoEOptions`][moeref.sparse_moe.SparseMoEOptions] is found by walking
    the dataclasses (``dataclasses.fields``), so a new option field appears without a change
    here. With ``detailed=False`` related fields are summarised in one row per convention (score
    function, normalisation, noise, capacity rule, drop priority, FFN, losses, ...), and every
    field no summary row reads gets a row of its own; with ``detailed=True`` there is one row
    per field (its dotted path) holding the value as a Python literal, which
    [`options_from_column`][moeref.presets.options_from_column] reads back.

    Parameters
    ----------
    presets : dict of str to SparseMoEOptions, optional
        Default: every entry of ``PRESETS`` called with its default arguments.
    detailed : bool

    Returns
    -------
    list of ConventionRow
        A field a preset does not have (a nested record that is None there) shows
        ``MISSING`` ("—").

    Examples
    --------
    >>> from moeref.presets import conventions_table
    >>> row = conventions_table()[1]
    >>> row.option, row.values["mixtral"], row.values["deepseek_v3"]
    ('score function', '`softmax`', '`sigmoid`')
    >>> detailed = {r.option: r.values for r in conventions_table(detailed=True)}
    >>> detailed["router.normalize_eps"]["deepseek_v3"]
    '1e-20'
    """
    options = _preset_options(presets)
    paths, leaves = _columns(options)
    if detailed:
        return [
            ConventionRow(path, (path,), {name: _format_leaf(lv[path]) if path in lv else MISSING for name, lv in leaves.items()})
            for path in paths
        ]
    rows, read = [], set()
    for label, keys, fmt in _SUMMARY:
        rows.append(ConventionRow(label, keys, {name: fmt(o) for name, o in options.items()}))
        read.update(keys)
    for path in paths:  # fields no summary row reads (new options appear here)
        if path not in read:
            values = {name: _show(lv[path]) if path in lv else MISSING for name, lv in leaves.items()}
            rows.append(ConventionRow(_label(path), (path,), values))
    return rows


def _dataclass_in(hint: Any) -> type:
    """The dataclass in a type hint (``X`` or ``X | None``)."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    raise TypeError(f"no dataclass in the type hint {hint!r}")


def _build(cls: type, column: dict[str, str], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if path in column and column[path] != MISSING:
            kwargs[f.name] = _parse_leaf(column[path], path)
        elif any(p.startswith(path + ".") and v != MISSING for p, v in column.items()):
            kwargs[f.name] = _build(_dataclass_in(hints[f.name]), column, path + ".")
    return cls(**kwargs)


def options_from_column(column: dict[str, str], *, options_type: type = SparseMoEOptions) -> SparseMoEOptions:
    """Rebuild the options of one preset from its column of the detailed conventions table.

    Parameters
    ----------
    column : dict of str to str
        Dotted field path -> cell text, i.e. ``{row.option: row.values[name]}`` over the rows of
        ``conventions_table(detailed=True)``.
    options_type : type
        The options dataclass to build (a subclass of ``SparseMoEOptions`` with more fields).

    Returns
    -------
    SparseMoEOptions
        Equal to the preset's options (the round trip the tests check).

    Examples
    --------
    >>> from moeref.presets import conventions_table, options_from_column, vmoe
    >>> column = {r.option: r.values["vmoe"] for r in conventions_table(detailed=True)}
    >>> options_from_column(column) == vmoe()
    True
    """
    if not (isinstance(options_type, type) and issubclass(options_type, SparseMoEOptions)):
        raise TypeError(f"options_type must be SparseMoEOptions or a subclass, got {options_type!r}")
    if not isinstance(column, dict):
        raise TypeError(f"column must be a dict of dotted field path -> cell text, got {type(column).__name__}")
    return _build(options_type, column, "")


def preset_source(name: str) -> tuple[str, str]:
    """``(summary, source)`` of a preset: its docstring's first line and its ``Source:`` paragraph (Markdown).

    Examples
    --------
    >>> from moeref.presets import preset_source
    >>> preset_source("dbrx")[1].startswith("Source: transformers v5.24.0 `models/dbrx/modeling_dbrx.py`")
    True
    """
    check_choice(name, "name", tuple(PRESETS))
    doc = inspect.getdoc(PRESETS[name]) or ""
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in doc.split("\n\n")]
    source = next((p for p in paragraphs if p.startswith("Source:")), "")
    if not source:
        raise ValueError(f"the docstring of preset {name!r} has no 'Source:' paragraph")
    return paragraphs[0].replace("``", "`"), source.replace("``", "`")

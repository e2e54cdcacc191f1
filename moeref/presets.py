r"""Presets: [`SparseMoEOptions`][moeref.sparse_moe.SparseMoEOptions] that mirror real systems.

Each function returns the options of one system's sparse MoE block **at inference** (no jitter,
no noise: training-time noise needs explicit draws and is left to the caller, with
`dataclasses.replace`). Sizes that are per-model (``k``, groups, capacity) are keyword arguments
with the released configuration's default. Sources are huggingface/transformers v5.24.0 (the
installed version): ``models/<name>/modeling_<name>.py`` and ``configuration_<name>.py``; the
per-field conventions are documented on [`RouterOptions`][moeref.router.RouterOptions],
[`CapacityOptions`][moeref.capacity.CapacityOptions],
[`LoadBalancingLossOptions`][moeref.aux_losses.LoadBalancingLossOptions] and
[`ExpertFFN`][moeref.expert_ffn.ExpertFFN].

**Not covered by the layer:** shared (always-on) experts (DeepSeek-V3 ``n_shared_experts``,
Qwen2-MoE's sigmoid-gated ``shared_expert``, Llama 4's ``shared_expert``): add them outside
the layer. The router bias of GPT-OSS is a parameter (``RouterParams.bias``), DeepSeek-V3's
``e_score_correction_bias`` is ``RouterParams.selection_bias``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .aux_losses import HF_MIXTRAL, HF_SWITCH_TRANSFORMERS
from .capacity import CapacityOptions
from .expert_ffn import GPT_OSS_SWIGLU, RELU_FFN, SWIGLU
from .router import RouterOptions
from .sparse_moe import SparseMoEOptions
from .validation import check_positive_int

__all__ = ["mixtral", "switch", "deepseek_v3", "qwen2_moe", "olmoe", "gpt_oss", "llama4", "PRESETS"]


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


def deepseek_v3(*, k: int = 8, n_group: int = 8, topk_group: int = 4, routed_scaling_factor: float = 2.5) -> SparseMoEOptions:
    r"""DeepSeek-V3 routed experts (HF ``DeepseekV3MoE`` / ``DeepseekV3TopkRouter``).

    Sigmoid scores; selection on scores plus ``e_score_correction_bias`` (pass it as
    ``RouterParams.selection_bias``), limited to the ``topk_group = 4`` best of ``n_group = 8``
    groups (group score: sum of the two largest; left-out groups set to 0.0 as in HF); $k = 8$;
    weights renormalised by $\sum g + 10^{-20}$ (``norm_topk_prob``) and scaled by
    ``routed_scaling_factor = 2.5``; SwiGLU experts; dropless; auxiliary-loss-free balancing, so
    both loss coefficients are 0 (the sequence-wise balance loss is not implemented here).
    The shared expert is not part of the layer.

    Source: transformers v5.24.0 ``models/deepseek_v3/modeling_deepseek_v3.py``,
    ``configuration_deepseek_v3.py``. DeepSeek-AI (2024), "DeepSeek-V3 Technical Report",
    arXiv:2412.19437, Sec. 2.1.2, eqs. (12)-(16).
    """
    return SparseMoEOptions(
        router=RouterOptions(
            k=k,
            score="sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            group_score="top2_sum",
            group_masked_score=0.0,
            normalize="sum_plus_eps",
            normalize_eps=1e-20,
            routed_scaling_factor=routed_scaling_factor,
        ),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
    )


def qwen2_moe(*, k: int = 4, norm_topk_prob: bool = False) -> SparseMoEOptions:
    r"""Qwen2-MoE routed experts (HF ``Qwen2MoeSparseMoeBlock``, without its shared expert).

    Softmax over $E$, top-$k$ ($k = 4$), renormalised only when ``norm_topk_prob`` (False in the
    released config); SwiGLU experts; dropless; ``router_aux_loss_coef = 0.001``.

    Source: transformers v5.24.0 ``models/qwen2_moe/modeling_qwen2_moe.py``,
    ``configuration_qwen2_moe.py``.
    """
    return SparseMoEOptions(
        router=RouterOptions(k=k, score="softmax", normalize="sum" if norm_topk_prob else "none"),
        capacity=CapacityOptions(dropless=True),
        ffn=SWIGLU,
        load_balancing=HF_MIXTRAL,
        load_balancing_coef=0.001,
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


def llama4(*, k: int = 1) -> SparseMoEOptions:
    r"""Llama 4 routed experts (HF ``Llama4TextMoe``, without its shared expert).

    Top-$k$ of the logits ($k = 1$), sigmoid of the winners; the weight multiplies the expert
    **input** (``routed_in = hidden_states * router_scores``); SwiGLU experts (``gate_up_proj``
    as stored, gate first); dropless; ``router_aux_loss_coef = 0.001``.

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
    )


PRESETS: dict[str, Callable[..., SparseMoEOptions]] = {
    "mixtral": mixtral,
    "switch": switch,
    "deepseek_v3": deepseek_v3,
    "qwen2_moe": qwen2_moe,
    "olmoe": olmoe,
    "gpt_oss": gpt_oss,
    "llama4": llama4,
}
"""System name -> preset function (call it, with keyword overrides, to get the options)."""

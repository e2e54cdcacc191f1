r"""Shared (always-on) experts beside the routed experts of a sparse MoE layer, and their VJP.

Several systems run a dense FFN on every token next to the routed experts and mix the two outputs.
With $r_t$ the routed output of token $t$ (the sparse layer's $y_t$) and
$o_t = \sum_{s=1}^{S} \mathrm{FFN}^{\text{shared}}_s(x_t)$ the shared output, all four forms here are

$$y_t = a_t\, r_t + b_t\, o_t ,$$

with per-token scalar coefficients $(a_t, b_t)$:

| ``kind`` | $a_t$ | $b_t$ | gate | systems |
|---|---|---|---|---|
| ``"add"`` | 1 | 1 | none | DeepSeek-V2 / V3 (``n_shared_experts``), DeepSeekMoE |
| ``"sigmoid_gate"`` | 1 | $\sigma(x_t w_g + c_g)$ | $(d, 1)$ | Qwen2-MoE (``shared_expert_gate``) |
| ``"residual_softmax"`` | $c_{t0}$ | $c_{t1}$ | $(d, 2)$, $c_t = \operatorname{softmax}(x_t W_c + b_c)$ | DeepSpeed Residual MoE |
| ``"nllb_cmr"`` | $g_t$ | $1 - g_t$ | $(d, 1)$, $g_t = \sigma(x_t w_g + c_g)$ | NLLB-200 Conditional MoE Routing |

The shared FFNs use the [`ExpertFFN`][moeref.expert_ffn.ExpertFFN] families and the
[`ExpertFFNParams`][moeref.expert_ffn.ExpertFFNParams] layout with a leading axis of $S$ shared
experts whose outputs are **summed**. DeepSeek fuses its ``n_shared_experts`` into one FFN of inner
width ``n_shared_experts * moe_intermediate_size``; that fused FFN ($S = 1$) and the $S$ separate
ones give the same sum (the SwiGLU inner units are independent).

[`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] calls
[`combine_shared_experts`][moeref.shared_experts.combine_shared_experts] when
``SparseMoEOptions.shared`` is set; the pair can also be used on its own around any routed output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import device_of, sigmoid, softmax, softmax_vjp
from .expert_ffn import SWIGLU, ExpertFFN, ExpertFFNParams, batched_expert_ffn, batched_expert_ffn_vjp, check_expert_ffn_params
from .router import _check_cotangent_of, _check_loss_cotangent
from .validation import check_arrays, check_choice, check_float_array, check_record_type, check_shape

__all__ = [
    "SHARED_EXPERT_KINDS",
    "SharedExpertOptions",
    "SharedExpertParams",
    "SharedExpertOutput",
    "SharedExpertGrads",
    "combine_shared_experts",
    "combine_shared_experts_vjp",
]

SHARED_EXPERT_KINDS = ("add", "sigmoid_gate", "residual_softmax", "nllb_cmr")
"""Names accepted by [`SharedExpertOptions.kind`][moeref.shared_experts.SharedExpertOptions]."""

_GATE_WIDTH = {"add": 0, "sigmoid_gate": 1, "residual_softmax": 2, "nllb_cmr": 1}


@dataclass(frozen=True)
class SharedExpertOptions:
    r"""How shared experts join the routed output: $y_t = a_t r_t + b_t o_t$.

    Attributes
    ----------
    kind : str
        * ``"add"``: $y_t = r_t + o_t$, ungated. DeepSeek-V2 / V3: transformers v5.24.0
          `models/deepseek_v3/modeling_deepseek_v3.py`, ``DeepseekV3MoE.forward``
          (``hidden_states + self.shared_experts(residuals)``, one ``DeepseekV3MLP`` of width
          ``moe_intermediate_size * n_shared_experts``); DeepSeek-AI (2024), "DeepSeek-V3
          Technical Report", arXiv:2412.19437, eq. (12); Dai et al. (2024), "DeepSeekMoE",
          arXiv:2401.06066 (shared expert isolation).
        * ``"sigmoid_gate"``: $y_t = r_t + \sigma(x_t w_g + c_g)\, o_t$. Qwen2-MoE: transformers
          v5.24.0 `models/qwen2_moe/modeling_qwen2_moe.py`, ``Qwen2MoeSparseMoeBlock.forward``
          (``F.sigmoid(self.shared_expert_gate(x)) * shared_expert_output``, the gate a
          ``Linear(hidden_size, 1, bias=False)``, the expert a ``Qwen2MoeMLP`` of width
          ``shared_expert_intermediate_size``).
        * ``"residual_softmax"``: $[c_{t0}, c_{t1}] = \operatorname{softmax}(x_t W_c + b_c)$,
          $y_t = c_{t0}\, r_t + c_{t1}\, o_t$: **the first coefficient multiplies the MoE output,
          the second the dense MLP**. DeepSpeed Residual MoE: deepspeed v0.19.8
          `deepspeed/moe/layer.py`, ``MoE.forward`` with ``use_residual=True``
          (``output * coef[..., 0:1] + output_mlp * coef[..., 1:]``, ``coefficient =
          Linear(hidden_size, 2)`` with bias); Rajbhandari et al. (2022), "DeepSpeed-MoE:
          Advancing Mixture-of-Experts Inference and Training to Power Next-Generation AI
          Scale", ICML, arXiv:2201.05596 (Residual-MoE).
        * ``"nllb_cmr"``: $g_t = \sigma(x_t w_g + c_g)$, $y_t = g_t\, r_t + (1 - g_t)\, o_t$: the
          first level of NLLB-200's two-level hierarchy chooses between a shared dense FFN and
          the routed experts, the second (the routed layer, top-2 in NLLB) among the experts.
          The first gate is **soft**: both branches run on every token and are mixed by $g_t$,
          as in facebookresearch/fairseq `fairseq/modules/moe/moe_cmr_layer.py` (``CMRGate``:
          ``Linear(model_dim, 1)`` with bias, then sigmoid; ``CMRLayer.forward``:
          ``x_ffn * (1 - gates) + x_moe * gates``, commit 26d62ae). NLLB Team (2022), "No
          Language Left Behind: Scaling Human-Centered Machine Translation",
          arXiv:2207.04672, Conditional MoE Routing. fairseq's dropout on the gate values
          (training only) is not applied; padding tokens get $g_t = 0$ there (mask them
          outside).
    ffn : ExpertFFN
        The shared FFN family: SwiGLU (DeepSeek, Qwen2-MoE; default
        [`SWIGLU`][moeref.expert_ffn.SWIGLU]); DeepSpeed and NLLB use the model's own FFN
        (NLLB: ReLU, [`RELU_FFN`][moeref.expert_ffn.RELU_FFN], with biases).
    budget : float or None
        ``"nllb_cmr"`` only: the target fraction $p$ of the CMR budget loss
        $\mathcal L_\text{CMR} = \big|\tfrac1T\sum_t g_t - p\big|$ (fairseq
        `moe_cross_entropy` criterion, ``cmr_gate_loss_p``; fairseq sums the numerator and
        the denominator over the CMR layers first, this is one layer's). None: not computed.
    budget_loss_coef : float
        Weight of $\mathcal L_\text{CMR}$ in the layer's ``aux_loss`` (fairseq
        ``cmr_gate_loss_wt``); needs ``budget``.
    """

    kind: str = "add"
    ffn: ExpertFFN = SWIGLU
    budget: float | None = None
    budget_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.kind, "shared.kind", SHARED_EXPERT_KINDS)
        check_record_type(self.ffn, "shared.ffn", ExpertFFN)
        if self.budget is not None:
            if self.kind != "nllb_cmr":
                raise ValueError(f"shared.budget is the NLLB CMR budget and needs kind='nllb_cmr', got kind={self.kind!r}")
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0:
                raise ValueError(f"shared.budget must be a fraction in [0, 1], got {b!r}")
        c = self.budget_loss_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"shared.budget_loss_coef must be a finite number >= 0, got {c!r}")
        if c != 0 and self.budget is None:
            raise ValueError("shared.budget_loss_coef needs shared.budget (the target fraction p of the CMR budget loss)")

    @property
    def gate_width(self) -> int:
        """Columns of the gate weight: 0 (``"add"``), 1 (sigmoid gates) or 2 (``"residual_softmax"``)."""
        return _GATE_WIDTH[self.kind]


class SharedExpertParams(NamedTuple):
    r"""Parameters of the shared experts and of their gate.

    Attributes
    ----------
    ffn : ExpertFFNParams
        $S$ shared FFNs (leading axis $S$; their outputs are summed), e.g. ``w_in (S, d, 2I)`` and
        ``w_out (S, I, d)`` for a concatenated SwiGLU.
    gate_weight : array, shape (d, 1) or (d, 2), optional
        $w_g$ (``"sigmoid_gate"``, ``"nllb_cmr"``) or $W_c$ (``"residual_softmax"``); None for
        ``"add"``.
    gate_bias : array, shape (1,) or (2,), optional
        $c_g$ or $b_c$ (DeepSpeed's ``coefficient`` and fairseq's ``CMRGate.wg`` have one,
        Qwen2-MoE's ``shared_expert_gate`` has none).
    """

    ffn: ExpertFFNParams
    gate_weight: Any = None
    gate_bias: Any = None


class SharedExpertOutput(NamedTuple):
    """Result of [`combine_shared_experts`][moeref.shared_experts.combine_shared_experts].

    Attributes
    ----------
    y : array, shape (T, d)
        $a_t r_t + b_t o_t$.
    shared_y : array, shape (T, d)
        $o_t$, the summed shared FFN outputs (before any gate).
    routed_coef, shared_coef : array, shape (T, 1)
        $a_t$ and $b_t$.
    gate_logits : array, shape (T, 1) or (T, 2), or None
        $x_t w_g + c_g$ (or $x_t W_c + b_c$); None for ``"add"``.
    budget_loss : array, shape (), or None
        $\\big|\\tfrac1T \\sum_t g_t - p\\big|$ for ``"nllb_cmr"`` with a ``budget``; else None.
    """

    y: Any
    shared_y: Any
    routed_coef: Any
    shared_coef: Any
    gate_logits: Any
    budget_loss: Any


class SharedExpertGrads(NamedTuple):
    """Cotangents of [`combine_shared_experts`][moeref.shared_experts.combine_shared_experts]'s
    inputs: ``x (T, d)``, ``routed_y (T, d)`` and ``params`` (a ``SharedExpertParams`` of
    cotangents, ``None`` where a parameter is ``None``)."""

    x: Any
    routed_y: Any
    params: SharedExpertParams


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_shared_expert_params(params: Any, options: SharedExpertOptions, d: int, *, name: str = "params") -> None:
    """Check a [`SharedExpertParams`][moeref.shared_experts.SharedExpertParams] record against ``options``."""
    check_record_type(params, name, SharedExpertParams)
    check_record_type(params.ffn, f"{name}.ffn", ExpertFFNParams)
    check_expert_ffn_params(params.ffn, options.ffn, d=d, name=f"{name}.ffn")
    width = options.gate_width
    if width == 0:
        if params.gate_weight is not None or params.gate_bias is not None:
            raise ValueError(f"{name}.gate_weight / {name}.gate_bias must be None for shared kind='add' (ungated shared experts)")
        return
    if params.gate_weight is None:
        raise ValueError(f"shared kind={options.kind!r} needs {name}.gate_weight, shape ({d}, {width})")
    check_float_array(params.gate_weight, f"{name}.gate_weight", ndim=2)
    check_shape(params.gate_weight, f"{name}.gate_weight", (d, width), what=f"x has d={d} features; kind={options.kind!r} has {width} gate output(s)")
    if params.gate_bias is not None:
        check_float_array(params.gate_bias, f"{name}.gate_bias", ndim=1)
        check_shape(params.gate_bias, f"{name}.gate_bias", (width,), what=f"kind={options.kind!r} has {width} gate output(s)")


def _named(params: SharedExpertParams, name: str) -> dict[str, Any]:
    out = {f"{name}.ffn.{f}": getattr(params.ffn, f) for f in ExpertFFNParams._fields}
    out[f"{name}.gate_weight"] = params.gate_weight
    out[f"{name}.gate_bias"] = params.gate_bias
    return out


def _check(x: Any, routed_y: Any, params: Any, options: Any) -> Any:
    check_record_type(options, "options", SharedExpertOptions)
    check_record_type(params, "params", SharedExpertParams)
    check_record_type(params.ffn, "params.ffn", ExpertFFNParams)  # before its fields are read
    xp = check_arrays({"x": x, "routed_y": routed_y, **_named(params, "params")})
    check_float_array(x, "x", ndim=2)
    check_shape(routed_y, "routed_y", tuple(x.shape), what="the routed output, like x (T, d)")
    check_shared_expert_params(params, options, x.shape[1])
    return xp


# --------------------------------------------------------------------------------------------
# Forward and VJP
# --------------------------------------------------------------------------------------------


class _Forward(NamedTuple):
    stacked_x: Any  # (S, T, d)  x broadcast over the S shared experts
    shared_y: Any  # (T, d)
    gate_logits: Any  # (T, w) or None
    gate: Any  # (T, w) sigmoid or softmax of the logits, or None
    routed_coef: Any  # (T, 1)
    shared_coef: Any  # (T, 1)


def _shared_forward(x: Any, params: SharedExpertParams, options: SharedExpertOptions, xp: Any) -> _Forward:
    S = params.ffn.w_out.shape[0]
    T, d = x.shape
    stacked = xp.broadcast_to(x[None, ...], (S, T, d))  # (S, T, d)
    shared_y = xp.sum(batched_expert_ffn(stacked, params.ffn, options.ffn), axis=0)  # (T, d)
    ones = xp.ones((T, 1), dtype=x.dtype, device=device_of(x))
    if options.kind == "add":
        return _Forward(stacked, shared_y, None, None, ones, ones)
    h = xp.matmul(x, params.gate_weight)  # (T, w)
    if params.gate_bias is not None:
        h = h + params.gate_bias
    if options.kind == "residual_softmax":
        c = softmax(h, axis=-1)  # (T, 2)
        return _Forward(stacked, shared_y, h, c, c[:, 0:1], c[:, 1:2])
    g = sigmoid(h)  # (T, 1)
    if options.kind == "sigmoid_gate":
        return _Forward(stacked, shared_y, h, g, ones, g)
    return _Forward(stacked, shared_y, h, g, g, 1.0 - g)  # nllb_cmr


def _budget_loss(f: _Forward, options: SharedExpertOptions, xp: Any) -> Any:
    if options.budget is None:
        return None
    return xp.abs(xp.mean(f.gate) - options.budget)


def combine_shared_experts(x: Any, routed_y: Any, params: SharedExpertParams, options: SharedExpertOptions) -> SharedExpertOutput:
    r"""Add (or mix in) the shared experts' output: $y_t = a_t\, r_t + b_t\, o_t$.

    $$o_t = \sum_{s=1}^{S} \mathrm{FFN}^{\text{shared}}_s(x_t), \qquad
    (a_t, b_t) = \begin{cases}
    (1,\ 1) & \texttt{"add"} \\
    (1,\ \sigma(x_t w_g + c_g)) & \texttt{"sigmoid\_gate"} \\
    \operatorname{softmax}(x_t W_c + b_c) & \texttt{"residual\_softmax"} \\
    (g_t,\ 1 - g_t),\ g_t = \sigma(x_t w_g + c_g) & \texttt{"nllb\_cmr"}
    \end{cases}$$

    DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437, eq. (12)), Qwen2-MoE (transformers
    ``Qwen2MoeSparseMoeBlock``), DeepSpeed Residual MoE (Rajbhandari et al. 2022,
    arXiv:2201.05596) and NLLB-200's Conditional MoE Routing (NLLB Team 2022,
    arXiv:2207.04672); the source files are listed on
    [`SharedExpertOptions`][moeref.shared_experts.SharedExpertOptions].

    Parameters
    ----------
    x : array, shape (T, d)
        The tokens (the shared experts and the gate read them).
    routed_y : array, shape (T, d)
        $r_t$, the routed experts' output for the same tokens.
    params : SharedExpertParams
    options : SharedExpertOptions

    Returns
    -------
    SharedExpertOutput

    Notes
    -----
    The gate is a per-token scalar (two for DeepSpeed), computed in the dtype of ``x``; nothing is
    sampled. With ``"nllb_cmr"`` both branches run on every token (a soft gate); a hard choice
    would make $y$ piecewise constant in $g$ and is not what fairseq trains.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> from moeref.shared_experts import SharedExpertOptions, SharedExpertParams, combine_shared_experts
    >>> ffn = ExpertFFNParams(w_in=np.ones((1, 1, 1)), w_out=np.ones((1, 1, 1)))  # o = relu(x)
    >>> x, r = np.array([[2.0]]), np.array([[10.0]])
    >>> combine_shared_experts(x, r, SharedExpertParams(ffn), SharedExpertOptions("add", RELU_FFN)).y.tolist()
    [[12.0]]
    >>> cmr = SharedExpertParams(ffn, gate_weight=np.zeros((1, 1)))  # g = 1/2
    >>> combine_shared_experts(x, r, cmr, SharedExpertOptions("nllb_cmr", RELU_FFN)).y.tolist()
    [[6.0]]
    """
    xp = _check(x, routed_y, params, options)
    return _combine(x, routed_y, params, options, xp)


def _combine(x: Any, routed_y: Any, params: SharedExpertParams, options: SharedExpertOptions, xp: Any) -> SharedExpertOutput:
    """The forward without argument checks (the layer checks its inputs once)."""
    f = _shared_forward(x, params, options, xp)
    y = f.routed_coef * routed_y + f.shared_coef * f.shared_y  # (T, d)
    return SharedExpertOutput(y, f.shared_y, f.routed_coef, f.shared_coef, f.gate_logits, _budget_loss(f, options, xp))


def combine_shared_experts_vjp(
    x: Any,
    routed_y: Any,
    params: SharedExpertParams,
    options: SharedExpertOptions,
    cotangent: Any,
    *,
    budget_cotangent: Any = 0.0,
) -> SharedExpertGrads:
    r"""VJP of [`combine_shared_experts`][moeref.shared_experts.combine_shared_experts].

    With $\bar y$ the output cotangent, $\bar a_t = \langle \bar y_t, r_t\rangle$ and
    $\bar b_t = \langle \bar y_t, o_t\rangle$:

    $$\bar r_t = a_t\, \bar y_t, \qquad \bar o_t = b_t\, \bar y_t \;\to\;
    (\bar x^{\text{ffn}}, \bar\theta) = \texttt{batched\_expert\_ffn\_vjp}(\bar o),$$

    and through the gate logits $h$: $\bar h_t = \bar b_t\, g_t(1 - g_t)$ (``"sigmoid_gate"``),
    $\bar h_t = c_t \odot ([\bar a_t, \bar b_t] - \langle c_t, [\bar a_t, \bar b_t]\rangle)$
    (``"residual_softmax"``), $\bar h_t = (\bar a_t - \bar b_t + \bar{\mathcal L}_\text{CMR}\,
    \operatorname{sign}(\tfrac1T \sum_s g_s - p)/T)\, g_t(1 - g_t)$ (``"nllb_cmr"``; the sign is
    0 at the kink); then $\bar W = x^\top \bar h$, $\bar c = \sum_t \bar h_t$,
    $\bar x = \bar x^{\text{ffn}} + \bar h W^\top$.

    Parameters
    ----------
    x, routed_y, params, options
        As in the forward.
    cotangent : array, shape (T, d)
        $\bar y$.
    budget_cotangent : float or array, shape ()
        $\bar{\mathcal L}_\text{CMR}$ (``"nllb_cmr"`` with a ``budget`` only).

    Returns
    -------
    SharedExpertGrads
    """
    xp = _check(x, routed_y, params, options)
    _check_cotangent_of(cotangent, tuple(x.shape), x, "x", what="the output, like x (T, d)")
    _check_loss_cotangent(budget_cotangent, x, "x", name="budget_cotangent")
    return _vjp(x, routed_y, params, options, cotangent, budget_cotangent, xp)


def _vjp(x: Any, routed_y: Any, params: SharedExpertParams, options: SharedExpertOptions, cotangent: Any, budget_cotangent: Any, xp: Any) -> SharedExpertGrads:
    """The VJP without argument checks; ``routed_y`` may be None when $a_t = 1$ (``"add"``, ``"sigmoid_gate"``)."""
    f = _shared_forward(x, params, options, xp)
    S = f.stacked_x.shape[0]
    o_bar = xp.broadcast_to((f.shared_coef * cotangent)[None, ...], f.stacked_x.shape)  # (S, T, d)
    fg = batched_expert_ffn_vjp(f.stacked_x, params.ffn, options.ffn, o_bar)
    x_bar = xp.sum(fg.x, axis=0) if S > 1 else fg.x[0, ...]  # (T, d)
    routed_bar = f.routed_coef * cotangent  # (T, d)
    if options.kind == "add":
        return SharedExpertGrads(x_bar, routed_bar, SharedExpertParams(fg.params))
    b_bar = xp.sum(cotangent * f.shared_y, axis=1, keepdims=True)  # (T, 1)
    if options.kind == "sigmoid_gate":
        h_bar = b_bar * f.gate * (1.0 - f.gate)  # (T, 1)
    else:
        a_bar = xp.sum(cotangent * routed_y, axis=1, keepdims=True)  # (T, 1)
        if options.kind == "residual_softmax":
            h_bar = softmax_vjp(f.gate, xp.concat([a_bar, b_bar], axis=1), axis=-1)  # (T, 2)
        else:
            g_bar = a_bar - b_bar  # (T, 1)
            if options.budget is not None and not (isinstance(budget_cotangent, (int, float)) and budget_cotangent == 0):
                T = x.shape[0]
                side = xp.sign(xp.mean(f.gate) - options.budget)  # 0 at the kink
                g_bar = g_bar + budget_cotangent * side / T
            h_bar = g_bar * f.gate * (1.0 - f.gate)  # (T, 1)
    W_bar = xp.matmul(xp.matrix_transpose(x), h_bar)  # (d, w)
    c_bar = None if params.gate_bias is None else xp.sum(h_bar, axis=0)  # (w,)
    x_bar = x_bar + xp.matmul(h_bar, xp.matrix_transpose(params.gate_weight))  # (T, d)
    return SharedExpertGrads(x_bar, routed_bar, SharedExpertParams(fg.params, W_bar, c_bar))

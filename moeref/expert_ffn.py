r"""Expert feed-forward networks of sparse MoE layers: the FFN families, their weight layouts, their VJPs.

In a token-choice MoE layer each of the $E$ experts is a position-wise feed-forward network
$\mathrm{FFN}_e : \mathbb{R}^d \to \mathbb{R}^d$ with an inner width $I$. Two families cover the
systems in use. The **plain** FFN (Shazeer et al. 2017; GShard; the original Switch Transformer):

$$\mathrm{FFN}_e(x) = \phi(x W^{\mathrm{in}}_e + b^{\mathrm{in}}_e)\, W^{\mathrm{out}}_e + b^{\mathrm{out}}_e .$$

The **gated linear unit** (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202,
eqs. (5)-(6): ReGLU, GEGLU, SwiGLU), with a gate projection $g$ and an up projection $u$:

$$\mathrm{FFN}_e(x) = \big(\phi(g) \odot (u + \delta)\big)\, W^{\mathrm{out}}_e + b^{\mathrm{out}}_e,
\qquad g = x W^{\mathrm{gate}}_e + b^{\mathrm{gate}}_e,\quad u = x W^{\mathrm{up}}_e + b^{\mathrm{up}}_e,$$

with $\delta = 0$ except in GPT-OSS (which also clamps $g$ and $u$, see
[`ExpertFFN`][moeref.expert_ffn.ExpertFFN]).

**Weight layout (moeref).** Weights act on row vectors, ``x @ W``: the input projection is stored
``(E, d, K)`` and the output projection ``(E, I, d)``, where $K = I$ for the plain family and for
a gated family with separate matrices, and $K = 2I$ for a gated family whose gate and up
projections are *fused* in one matrix, either **concatenated** (columns ``[:I]`` gate, ``[I:]``
up) or **interleaved** (even columns gate, odd columns up). The options record
[`ExpertFFN`][moeref.expert_ffn.ExpertFFN] names the family and the layout; the parameters are
one [`ExpertFFNParams`][moeref.expert_ffn.ExpertFFNParams] record for all $E$ experts.

**Loading Hugging Face weights** (transformers; layouts read in `integrations/moe.py` and the
models' `modeling_*.py`):

* Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE in transformers v5 store ``gate_up_proj (E, 2I, d)`` and
  ``down_proj (E, d, I)``, applied as ``linear(x, W) = x @ W.T``, gate rows first (``chunk(2)``):
  ``w_in = swapaxes(gate_up_proj, 1, 2)``, ``w_out = swapaxes(down_proj, 1, 2)``, layout
  ``"concatenated"``.
* The same models in transformers v4.x keep one ``nn.Linear`` per expert, ``weight (out, in)``
  (Mixtral: ``w1`` gate, ``w3`` up, ``w2`` down; others ``gate_proj``, ``up_proj``, ``down_proj``):
  ``w_in = stack(w1.weight.T)``, ``w_up = stack(w3.weight.T)``, ``w_out = stack(w2.weight.T)``,
  layout ``"separate"``.
* DBRX stores ``w1`` (gate), ``v1`` (up) and ``w2``, each ``(E*I, d)``: ``w_in`` and ``w_up`` are
  the first two reshaped to ``(E, I, d)`` with the last two axes swapped; ``w_out`` is ``w2``
  reshaped to ``(E, I, d)``; layout ``"separate"``.
* Llama 4 stores ``gate_up_proj (E, d, 2I)`` (gate first) and ``down_proj (E, I, d)``, used as
  ``x @ W``: as stored, layout ``"concatenated"``.
* GPT-OSS stores ``gate_up_proj (E, d, 2I)`` with bias ``(E, 2I)``, gate at even columns, and
  ``down_proj (E, I, d)`` with bias ``(E, d)``: as stored, preset
  [`GPT_OSS_SWIGLU`][moeref.expert_ffn.GPT_OSS_SWIGLU].

Every function has its analytic VJP beside it. The per-expert pair
[`expert_ffn`][moeref.expert_ffn.expert_ffn] / [`expert_ffn_vjp`][moeref.expert_ffn.expert_ffn_vjp]
acts on a block of tokens routed to one expert (the sorted dispatch of
[`moeref.dispatch`][moeref.dispatch] calls it once per expert); the batched pair
[`batched_expert_ffn`][moeref.expert_ffn.batched_expert_ffn] /
[`batched_expert_ffn_vjp`][moeref.expert_ffn.batched_expert_ffn_vjp] acts on an ``(E, C, d)``
buffer of all experts at once (the dense GShard form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import normal_cdf, normal_logpdf, sigmoid
from .validation import (
    check_arrays,
    check_choice,
    check_cotangent,
    check_float_array,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "ACTIVATIONS",
    "GATE_UP_LAYOUTS",
    "ExpertFFN",
    "ExpertFFNParams",
    "ExpertFFNGrads",
    "check_expert_ffn_params",
    "RELU_FFN",
    "GELU_FFN",
    "GELU_TANH_FFN",
    "SWIGLU",
    "GEGLU",
    "GPT_OSS_SWIGLU",
    "expert_ffn",
    "expert_ffn_vjp",
    "batched_expert_ffn",
    "batched_expert_ffn_vjp",
]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "identity")
"""Names accepted by [`ExpertFFN.activation`][moeref.expert_ffn.ExpertFFN]."""

GATE_UP_LAYOUTS = ("concatenated", "interleaved", "separate")
"""Names accepted by [`ExpertFFN.gate_up_layout`][moeref.expert_ffn.ExpertFFN]."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


@dataclass(frozen=True)
class ExpertFFN:
    r"""Which feed-forward network the experts compute, and how a gated one stores its weights.

    Attributes
    ----------
    activation : str
        $\phi$, one of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"sigmoid"``,
        ``"identity"``:

        * ``"relu"`` $\max(h, 0)$: the experts of Shazeer et al. (2017), GShard (Lepikhin et al.
          2020) and the original Switch Transformer (transformers
          `configuration_switch_transformers.py`: ``dense_act_fn="relu"``, "Original
          SwitchTransformers uses relu").
        * ``"gelu"`` $h\,\Phi(h)$, the exact GELU of Hendrycks & Gimpel (2016), arXiv:1606.08415,
          section 2 (PyTorch's ``torch.nn.GELU()`` default ``approximate="none"``, transformers'
          ``ACT2FN["gelu"]``).
        * ``"gelu_tanh"`` $\tfrac12 h\,(1 + \tanh(\sqrt{2/\pi}\,(h + 0.044715\,h^3)))$, the tanh
          approximation of the same paper: the default of ``jax.nn.gelu`` (``approximate=True``,
          so of Flax-based MoE code that calls it unchanged), transformers' ``"gelu_new"`` and
          ``"gelu_pytorch_tanh"``; transformers maps T5 v1.1 / Switch v1.1's ``"gated-gelu"`` to
          ``"gelu_new"`` (`configuration_t5.py`).
        * ``"silu"`` $h\,\sigma(\beta h)$ (Swish; $\beta$ = ``swish_beta``), the SwiGLU gate of
          Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE, DBRX, Llama 4 (all ``hidden_act="silu"``) and
          GPT-OSS ($\beta = 1.702$).
        * ``"sigmoid"`` $\sigma(h)$ (the GLU of Dauphin et al. 2017) and ``"identity"`` (the
          bilinear layer), the remaining variants of Shazeer (2020).
    gated : bool
        False: plain FFN $\phi(xW^{\mathrm{in}} + b^{\mathrm{in}})W^{\mathrm{out}} + b^{\mathrm{out}}$.
        True: gated linear unit $(\phi(g) \odot (u + \delta))W^{\mathrm{out}} + b^{\mathrm{out}}$.
    gate_up_layout : str
        Where a gated FFN keeps $W^{\mathrm{gate}}$ and $W^{\mathrm{up}}$ (ignored when not gated):

        * ``"concatenated"``: ``w_in (E, d, 2I)``, gate columns ``[:I]``, up columns ``[I:]``
          (transformers v5 fused ``gate_up_proj`` of Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE, read
          transposed; Llama 4's ``gate_up_proj`` as stored: ``chunk(2)`` returns the gate first
          in all of them);
        * ``"interleaved"``: ``w_in (E, d, 2I)``, gate at even columns ``0::2``, up at odd columns
          ``1::2`` (GPT-OSS, ``gate_up[..., ::2], gate_up[..., 1::2]`` in `modeling_gpt_oss.py`);
        * ``"separate"``: ``w_in (E, d, I)`` is the gate and ``w_up (E, d, I)`` the up projection
          (transformers v4.x per-expert modules, DBRX's ``w1`` / ``v1``).
    swish_beta : float
        $\beta$ in $\mathrm{silu}_\beta(h) = h\,\sigma(\beta h)$; 1 everywhere except GPT-OSS (1.702,
        its ``alpha``). Only with ``activation="silu"``.
    clamp_limit : float or None
        GPT-OSS's clamp $L$ (7.0, its ``limit``): the gate is clipped from above,
        $g \leftarrow \min(g, L)$, the up projection on both sides, $u \leftarrow \mathrm{clip}(u, -L, L)$,
        before the activation. None (every other system): no clamp. Gated FFNs only.
    up_offset : float
        $\delta$ in $\phi(g) \odot (u + \delta)$: 1.0 in GPT-OSS (``(up + 1) * glu``), 0 elsewhere.
        Gated FFNs only.

    Notes
    -----
    The derivative of ``relu`` at 0 is taken as 0; that of the clamp at $g = L$ (or $|u| = L$) as
    1 (the value passes, like ``torch.clamp``'s backward).
    """

    activation: str = "relu"
    gated: bool = False
    gate_up_layout: str = "concatenated"
    swish_beta: float = 1.0
    clamp_limit: float | None = None
    up_offset: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.activation, "ExpertFFN.activation", ACTIVATIONS)
        check_choice(self.gate_up_layout, "ExpertFFN.gate_up_layout", GATE_UP_LAYOUTS)
        if not isinstance(self.gated, bool):
            raise TypeError(f"ExpertFFN.gated must be a bool, got {type(self.gated).__name__} {self.gated!r}")
        check_positive_float(self.swish_beta, "ExpertFFN.swish_beta")
        if self.swish_beta != 1.0 and self.activation != "silu":
            raise ValueError(
                f"ExpertFFN.swish_beta={self.swish_beta} only applies to activation='silu', got activation={self.activation!r}"
            )
        if self.clamp_limit is not None:
            check_positive_float(self.clamp_limit, "ExpertFFN.clamp_limit")
        if isinstance(self.up_offset, bool) or not isinstance(self.up_offset, (int, float)) or not math.isfinite(self.up_offset):
            raise TypeError(f"ExpertFFN.up_offset must be a finite Python float, got {self.up_offset!r}")
        if not self.gated and (self.clamp_limit is not None or self.up_offset != 0.0):
            raise ValueError("ExpertFFN.clamp_limit and ExpertFFN.up_offset apply to gated FFNs only (gated=True)")

    @property
    def fused(self) -> bool:
        """True when ``w_in`` holds both the gate and the up projection (``(E, d, 2I)``)."""
        return self.gated and self.gate_up_layout != "separate"


RELU_FFN = ExpertFFN(activation="relu")
"""Plain ReLU FFN: Shazeer et al. (2017), GShard, the original Switch Transformer."""

GELU_FFN = ExpertFFN(activation="gelu")
"""Plain FFN with the exact (erf) GELU."""

GELU_TANH_FFN = ExpertFFN(activation="gelu_tanh")
"""Plain FFN with the tanh-approximated GELU."""

SWIGLU = ExpertFFN(activation="silu", gated=True, gate_up_layout="concatenated")
"""SwiGLU with the gate and up projections concatenated, gate first (Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE, Llama 4)."""

GEGLU = ExpertFFN(activation="gelu_tanh", gated=True, gate_up_layout="concatenated")
"""GEGLU with the tanh GELU (T5 v1.1 / Switch v1.1 ``"gated-gelu"`` as transformers maps it)."""

GPT_OSS_SWIGLU = ExpertFFN(
    activation="silu", gated=True, gate_up_layout="interleaved", swish_beta=1.702, clamp_limit=7.0, up_offset=1.0
)
"""GPT-OSS's clamped SwiGLU: $(\\min(g,7)\\,\\sigma(1.702\\min(g,7)))\\,(\\mathrm{clip}(u,-7,7) + 1)$, interleaved layout."""


class ExpertFFNParams(NamedTuple):
    """Weights of ``E`` expert FFNs (moeref layout: row vectors, ``x @ W``).

    Attributes
    ----------
    w_in : array, shape (E, d, K)
        Input projection. $K = I$ for a plain FFN and for a gated FFN with separate matrices
        (then ``w_in`` is the gate projection); $K = 2I$ for a gated FFN with a fused layout
        (``"concatenated"`` or ``"interleaved"``, see [`ExpertFFN`][moeref.expert_ffn.ExpertFFN]).
    w_out : array, shape (E, I, d)
        Output (down) projection.
    b_in : array, shape (E, K), optional
        Bias of ``w_in`` (None: no bias).
    b_out : array, shape (E, d), optional
        Bias of ``w_out``.
    w_up : array, shape (E, d, I), optional
        Up projection of a gated FFN with ``gate_up_layout="separate"``; None otherwise.
    b_up : array, shape (E, I), optional
        Bias of ``w_up``.
    """

    w_in: Any
    w_out: Any
    b_in: Any = None
    b_out: Any = None
    w_up: Any = None
    b_up: Any = None


class ExpertFFNGrads(NamedTuple):
    """Cotangents of an expert FFN's inputs: ``x`` and the parameters (``None`` where a parameter is ``None``)."""

    x: Any
    params: ExpertFFNParams


_PARAM_NAMES = ExpertFFNParams._fields


def check_expert_ffn_params(params: Any, ffn: Any, *, d: int | None = None, name: str = "experts") -> tuple[int, int, int]:
    """Check an [`ExpertFFNParams`][moeref.expert_ffn.ExpertFFNParams] record against ``ffn``; return ``(E, d, I)``.

    Every present array must be a real floating array of one dtype, with the shapes listed on the
    record; ``w_up`` / ``b_up`` must be given exactly for a gated FFN with ``"separate"`` layout.
    When ``d`` is given (the feature count of ``x``) the weights must match it. Finiteness is
    checked by the callers together with ``x``.
    """
    check_record_type(ffn, "ffn", ExpertFFN)
    check_record_type(params, name, ExpertFFNParams)
    check_float_array(params.w_out, f"{name}.w_out", ndim=3)
    E, I, d_out = params.w_out.shape
    if d is not None:
        check_shape(params.w_out, f"{name}.w_out", (None, None, d), what=f"x has d={d} features")
        d_out = d
    K = 2 * I if ffn.fused else I
    if ffn.fused:
        what = f"gated FFN with {ffn.gate_up_layout} gate/up layout: (E, d, 2I) with E={E}, I={I} from {name}.w_out"
    elif ffn.gated:
        what = f"gate projection of a gated FFN with separate layout: (E, d, I) with E={E}, I={I} from {name}.w_out"
    else:
        what = f"plain FFN: (E, d, I) with E={E}, I={I} from {name}.w_out"
    check_float_array(params.w_in, f"{name}.w_in", ndim=3)
    check_shape(params.w_in, f"{name}.w_in", (E, d_out, K), what=what)
    if params.b_in is not None:
        check_float_array(params.b_in, f"{name}.b_in", ndim=2)
        check_shape(params.b_in, f"{name}.b_in", (E, K), what=f"{name}.w_in has shape {tuple(params.w_in.shape)}")
    if params.b_out is not None:
        check_float_array(params.b_out, f"{name}.b_out", ndim=2)
        check_shape(params.b_out, f"{name}.b_out", (E, d_out), what=f"{name}.w_out has shape {tuple(params.w_out.shape)}")
    separate = ffn.gated and ffn.gate_up_layout == "separate"
    if separate:
        if params.w_up is None:
            raise ValueError(
                f"{name}.w_up is required by a gated FFN with gate_up_layout='separate' (shape (E, d, I) = ({E}, {d_out}, {I}))"
            )
        check_float_array(params.w_up, f"{name}.w_up", ndim=3)
        check_shape(params.w_up, f"{name}.w_up", (E, d_out, I), what="up projection, same shape as the gate projection w_in")
        if params.b_up is not None:
            check_float_array(params.b_up, f"{name}.b_up", ndim=2)
            check_shape(params.b_up, f"{name}.b_up", (E, I), what=f"{name}.w_up has shape {tuple(params.w_up.shape)}")
    elif params.w_up is not None or params.b_up is not None:
        raise ValueError(
            f"{name}.w_up / {name}.b_up are only used by a gated FFN with gate_up_layout='separate'; "
            f"got them with gated={ffn.gated}, gate_up_layout={ffn.gate_up_layout!r} (pass None)"
        )
    return E, d_out, I


def _named_params(params: ExpertFFNParams, name: str = "experts") -> dict[str, Any]:
    return {f"{name}.{f}": getattr(params, f) for f in _PARAM_NAMES}


# --------------------------------------------------------------------------------------------
# Activations and their derivatives (elementwise, on the pre-activation h).
#
# These run on every routed token, so they are written for few passes over memory (each array
# operation is one pass: NumPy has no fusion): the SiLU is h / (1 + e^{-beta h}) with one
# exponential, not h * sigmoid(beta h) through the two-branch sigmoid of moeref.core, and scalar
# bounds go to maximum / minimum directly (array-api-compat's clip for NumPy copies and masks).
# --------------------------------------------------------------------------------------------


def _exp_cap(dtype: Any, xp: Any) -> float:
    """The largest integer $c$ with $e^c$ (and $1 + e^c$) finite in ``dtype`` (88 in float32, 709 in float64)."""
    return float(math.floor(math.log(float(xp.finfo(dtype).max))))


def _exp_neg(h: Any, beta: float, xp: Any) -> Any:
    r"""$e^{-\beta h}$, with $h$ capped below at $-c/\beta$ so that it never overflows (2 passes).

    The cap costs a pass, so it is applied only when some $\beta h < -c$ (a read-only ``min``
    decides; always when the values are traced). Below the cap ($\beta h < -88$ in float32,
    $< -709$ in float64) the logistic $1/(1 + e^{-\beta h})$ computed from it is $e^{-c}$ instead
    of $e^{\beta h}$, so $\mathrm{silu}(h)$ is still exact to an absolute $|h|\, e^{-c}$.
    """
    lo = -_exp_cap(h.dtype, xp) / beta
    if math.prod(h.shape) > 0 and concrete_bool(xp.min(h) < lo) is not False:
        h = xp.maximum(h, lo)
    return xp.exp(-h) if beta == 1.0 else xp.exp(h * (-beta))


def _one_plus_exp_neg(h: Any, beta: float, xp: Any) -> Any:
    r"""$t = 1 + e^{-\beta h}$, the denominator of $\mathrm{silu}_\beta(h) = h / t$ and of $\sigma(\beta h) = 1 / t$."""
    return _exp_neg(h, beta, xp) + 1.0


def _act(h: Any, ffn: ExpertFFN, xp: Any) -> Any:
    a = ffn.activation
    if a == "relu":
        return xp.maximum(h, 0.0)
    if a == "gelu":
        return h * normal_cdf(h)
    if a == "gelu_tanh":
        return 0.5 * h * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_C * h * h * h)))
    if a == "silu":  # h sigma(beta h) = h / (1 + e^{-beta h})
        return h / _one_plus_exp_neg(h, ffn.swish_beta, xp)
    if a == "sigmoid":
        return sigmoid(h)
    return h  # identity


def _act_and_grad(h: Any, ffn: ExpertFFN, xp: Any) -> tuple[Any, Any]:
    r"""$(\phi(h), \phi'(h))$, sharing the transcendental work."""
    a = ffn.activation
    if a == "relu":
        return xp.maximum(h, 0.0), xp.astype(h > 0, h.dtype)
    if a == "gelu":  # Phi(h) + h phi(h)
        cdf = normal_cdf(h)
        return h * cdf, cdf + h * xp.exp(normal_logpdf(h))
    if a == "gelu_tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_C * h * h * h))
        value = 0.5 * h * (1.0 + t)
        return value, 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * h * h)
    if a == "silu":  # t = 1 + e^{-beta h}, s = 1/t; phi = h/t; phi' = s + beta h s (1 - s) = s + beta (phi - phi s)
        beta = ffn.swish_beta
        t = _one_plus_exp_neg(h, beta, xp)
        value = h / t  # as _act and _silu_times compute it, so that z from the factors is the forward's z bit for bit
        s = 1.0 / t
        grad = value - value * s
        return value, s + (grad if beta == 1.0 else beta * grad)
    if a == "sigmoid":
        s = sigmoid(h)
        return s, s * (1.0 - s)
    return h, xp.ones_like(h)


# --------------------------------------------------------------------------------------------
# The FFN on one block. `p` holds the weights of one expert (w_in (d, K), biases (K,)) or of all
# experts with a leading E axis (w_in (E, d, K), biases (E, 1, K)); matmul broadcasts either way.
# --------------------------------------------------------------------------------------------


class _Cache(NamedTuple):
    h: Any  # pre-activation of a plain FFN, or the gate g (before the clamp) of a gated one
    u: Any  # up projection before the clamp (gated only)
    z: Any  # input of the output projection


def _split_gate_up(h: Any, ffn: ExpertFFN, I: int) -> tuple[Any, Any]:
    if ffn.gate_up_layout == "interleaved":
        return h[..., 0::2], h[..., 1::2]  # (..., I), (..., I)
    return h[..., :I], h[..., I:]  # concatenated, gate first


def _join_gate_up(g_bar: Any, u_bar: Any, ffn: ExpertFFN, xp: Any) -> Any:
    if ffn.gate_up_layout == "interleaved":
        shape = tuple(g_bar.shape[:-1]) + (2 * g_bar.shape[-1],)
        return xp.reshape(xp.stack([g_bar, u_bar], axis=-1), shape)  # (..., I, 2) -> (..., 2I)
    return xp.concat([g_bar, u_bar], axis=-1)  # (..., 2I)


def _clamped(g: Any, u: Any, ffn: ExpertFFN, xp: Any) -> tuple[Any, Any]:
    if ffn.clamp_limit is None:
        return g, u
    L = ffn.clamp_limit
    return xp.minimum(g, L), xp.minimum(xp.maximum(u, -L), L)


def _gate_and_up(x: Any, h: Any, p: ExpertFFNParams, ffn: ExpertFFN, xp: Any) -> tuple[Any, Any]:
    """Gate $g$ and up projection $u$ of a gated FFN (before the clamp) from ``h = x w_in + b_in``."""
    if ffn.gate_up_layout == "separate":
        u = xp.matmul(x, p.w_up)  # (..., n, I)
        return h, u if p.b_up is None else u + p.b_up
    return _split_gate_up(h, ffn, p.w_out.shape[-2])  # (..., n, I) each


def _silu_times(g: Any, v: Any, beta: float, xp: Any) -> Any:
    r"""$\mathrm{silu}_\beta(g)\, v = (g / (1 + e^{-\beta g}))\, v$ in 5 passes (one ``min`` more to rule out overflow).

    Measured against the alternatives on NumPy and PyTorch CPU (float32 and float64):
    $\tfrac{g v}{2}(1 + \tanh\tfrac{\beta g}{2})$ has as many passes, loses relative accuracy for
    very negative $g$ and is slower in float64; $g\,\sigma(\beta g)\, v$ through the two-branch
    [`core.sigmoid`][moeref.core.sigmoid] takes twice the passes. The order of operations is
    ``_act_and_grad``'s ($\phi = g / t$, then times $v$), so that ``_activation_with_factors``
    returns this $z$ bit for bit and ``value_and_vjp`` need not compute it twice.
    """
    z = g / _one_plus_exp_neg(g, beta, xp)
    z *= v  # in place into the fresh quotient: one (n, I) temporary fewer (torch autograd keeps what the product needs)
    return z


def _glu(g: Any, u: Any, ffn: ExpertFFN, xp: Any) -> Any:
    r"""$\phi(\tilde g) \odot (\tilde u + \delta)$ (SwiGLU through ``_silu_times``)."""
    gc, uc = _clamped(g, u, ffn, xp)
    v = uc + ffn.up_offset if ffn.up_offset != 0.0 else uc
    if ffn.activation == "silu":
        return _silu_times(gc, v, ffn.swish_beta, xp)
    return _act(gc, ffn, xp) * v


def _pre_activations(x: Any, p: ExpertFFNParams, ffn: ExpertFFN, xp: Any) -> tuple[Any, Any]:
    """``(h, u)``: the pre-activation (plain) or the gate $g$ (gated), and the up projection (gated only)."""
    h = xp.matmul(x, p.w_in)  # (..., n, K)
    if p.b_in is not None:
        h = h + p.b_in
    if not ffn.gated:
        return h, None
    return _gate_and_up(x, h, p, ffn, xp)  # (..., n, I) each


def _hidden(h: Any, u: Any, ffn: ExpertFFN, xp: Any) -> Any:
    r"""$z$, the input of ``w_out``: $\phi(h)$ (plain) or the GLU of the gate ``h`` and ``u`` (gated)."""
    return _act(h, ffn, xp) if u is None else _glu(h, u, ffn, xp)  # (..., n, I)


def _project_out(z: Any, p: ExpertFFNParams, xp: Any) -> Any:
    r"""$z W_{\mathrm{out}} + b_{\mathrm{out}}$."""
    y = xp.matmul(z, p.w_out)  # (..., n, d)
    return y if p.b_out is None else y + p.b_out


def _ffn_hidden(x: Any, p: ExpertFFNParams, ffn: ExpertFFN, xp: Any) -> tuple[Any, Any, Any]:
    """``(h, u, z)``: pre-activation (plain) or gate (gated), up projection (gated only) and the input of ``w_out``."""
    h, u = _pre_activations(x, p, ffn, xp)
    return h, u, _hidden(h, u, ffn, xp)


class _Factors(NamedTuple):
    gate: Any  # dz/dh elementwise (plain FFN), or dz/dg (gated)
    up: Any  # dz/du (gated only, else None)


def _activation_with_factors(h: Any, u: Any, ffn: ExpertFFN, xp: Any) -> tuple[Any, _Factors]:
    r"""$z$ and its elementwise derivatives, sharing the activation's transcendental work.

    Plain: $z = \phi(h)$, $\partial z/\partial h = \phi'(h)$. Gated:
    $z = \phi(\tilde g)(\tilde u + \delta)$, $\partial z/\partial g = (\tilde u + \delta)\,\phi'(\tilde g)\,[g \le L]$,
    $\partial z/\partial u = \phi(\tilde g)\,[|u| \le L]$ (the clamp passes its value at the limit).
    """
    if u is None:
        a, a_grad = _act_and_grad(h, ffn, xp)
        return a, _Factors(a_grad, None)
    gc, uc = _clamped(h, u, ffn, xp)
    a, a_grad = _act_and_grad(gc, ffn, xp)
    v = uc + ffn.up_offset if ffn.up_offset != 0.0 else uc
    gate, up = v * a_grad, a
    if ffn.clamp_limit is not None:
        L = ffn.clamp_limit
        gate = xp.where(h <= L, gate, xp.zeros_like(gate))
        up = xp.where(xp.abs(u) <= L, up, xp.zeros_like(up))
    return a * v, _Factors(gate, up)


def _ffn_forward(x: Any, p: ExpertFFNParams, ffn: ExpertFFN, xp: Any) -> tuple[Any, _Cache]:
    h, u, z = _ffn_hidden(x, p, ffn, xp)
    return _project_out(z, p, xp), _Cache(h=h, u=u, z=z)


def _ffn_output(x: Any, p: ExpertFFNParams, ffn: ExpertFFN, xp: Any) -> Any:
    r"""$\mathrm{FFN}(x)$ of one block, keeping no intermediate (each is freed before the next is made)."""
    h, u = _pre_activations(x, p, ffn, xp)
    z = _hidden(h, u, ffn, xp)  # (n, I)
    del h, u  # the (n, K) projection is freed before the output is allocated
    return _project_out(z, p, xp)


def _hidden_backward_from(
    x: Any, p: ExpertFFNParams, ffn: ExpertFFN, factors: _Factors, z_bar: Any, xp: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """From $\\bar z$ back to $x$: ``(x_bar, w_in_bar, b_in_bar, w_up_bar, b_up_bar)``."""
    xt = xp.matrix_transpose(x)  # (..., d, n)
    w_up_bar = b_up_bar = None
    if factors.up is None:
        h_bar = z_bar * factors.gate  # (..., n, I)
        x_bar = xp.matmul(h_bar, xp.matrix_transpose(p.w_in))  # (..., n, d)
    else:
        g_bar, u_bar = z_bar * factors.gate, z_bar * factors.up  # (..., n, I) each
        if ffn.gate_up_layout == "separate":
            h_bar = g_bar
            w_up_bar = xp.matmul(xt, u_bar)  # (..., d, I)
            b_up_bar = None if p.b_up is None else xp.sum(u_bar, axis=-2)
            x_bar = xp.matmul(g_bar, xp.matrix_transpose(p.w_in)) + xp.matmul(u_bar, xp.matrix_transpose(p.w_up))
        else:
            h_bar = _join_gate_up(g_bar, u_bar, ffn, xp)  # (..., n, 2I)
            x_bar = xp.matmul(h_bar, xp.matrix_transpose(p.w_in))  # (..., n, d)
    w_in_bar = xp.matmul(xt, h_bar)  # (..., d, K)
    b_in_bar = None if p.b_in is None else xp.sum(h_bar, axis=-2)  # (..., K)
    return x_bar, w_in_bar, b_in_bar, w_up_bar, b_up_bar


def _hidden_backward(
    x: Any, p: ExpertFFNParams, ffn: ExpertFFN, h: Any, u: Any, z_bar: Any, xp: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """As ``_hidden_backward_from``, from the cached pre-activations ``h`` (or ``g``) and ``u``."""
    _, factors = _activation_with_factors(h, u, ffn, xp)
    return _hidden_backward_from(x, p, ffn, factors, z_bar, xp)


def _ffn_backward(
    x: Any, p: ExpertFFNParams, ffn: ExpertFFN, cache: _Cache, y_bar: Any, xp: Any
) -> tuple[Any, ExpertFFNParams]:
    """Cotangents of x and of the (one-expert or batched) weights ``p``; bias cotangents summed over tokens (axis -2)."""
    w_out_bar = xp.matmul(xp.matrix_transpose(cache.z), y_bar)  # (..., I, d)
    b_out_bar = None if p.b_out is None else xp.sum(y_bar, axis=-2)  # (..., d)
    z_bar = xp.matmul(y_bar, xp.matrix_transpose(p.w_out))  # (..., n, I)
    x_bar, w_in_bar, b_in_bar, w_up_bar, b_up_bar = _hidden_backward(x, p, ffn, cache.h, cache.u, z_bar, xp)
    return x_bar, ExpertFFNParams(w_in_bar, w_out_bar, b_in_bar, b_out_bar, w_up_bar, b_up_bar)


def _weighted_ffn_vjp(
    x: Any, p: ExpertFFNParams, ffn: ExpertFFN, cotangent: Any, weight: Any, xp: Any, *, with_output: bool = False
) -> tuple[Any, Any, ExpertFFNParams, Any]:
    r"""VJP of the rows $o_r = w_r\, \mathrm{FFN}(x_r)$ of one expert's block: ``(x_bar, w_bar, params_bar, y)``.

    With $c_r$ the cotangent row, $\hat z = c\, W_{\mathrm{out}}^\top$ (unweighted):
    $\bar w_r = \langle c_r, z_r W_{\mathrm{out}} + b_{\mathrm{out}}\rangle = \langle \hat z_r, z_r\rangle
    + \langle c_r, b_{\mathrm{out}}\rangle$ (no second forward matmul), $\bar z = w \hat z$,
    $\bar W_{\mathrm{out}} = z^\top (w c)$, $\bar b_{\mathrm{out}} = w^\top c$.
    ``weight`` has shape (n, 1); ``w_bar`` is returned with shape (n,). ``y`` is None, or with
    ``with_output`` the unweighted $\mathrm{FFN}(x)$, from the $z$ the factors come with (which
    ``_activation_with_factors`` computes with ``_hidden``'s operations: the forward's numbers).
    """
    h, u = _pre_activations(x, p, ffn, xp)
    z, factors = _activation_with_factors(h, u, ffn, xp)  # (n, I); z is _hidden's, bit for bit
    y = _project_out(z, p, xp) if with_output else None  # (n, d)
    z_hat = xp.matmul(cotangent, xp.matrix_transpose(p.w_out))  # (n, I)
    w_bar = xp.vecdot(z_hat, z, axis=-1)  # (n,)
    if p.b_out is not None:
        w_bar = w_bar + xp.matmul(cotangent, p.b_out)
    if z.shape[-1] < cotangent.shape[-1]:  # weight the narrower of z and c
        w_out_bar = xp.matmul(xp.matrix_transpose(z * weight), cotangent)  # (I, d)
    else:
        w_out_bar = xp.matmul(xp.matrix_transpose(z), cotangent * weight)  # (I, d)
    b_out_bar = None if p.b_out is None else xp.matmul(xp.matrix_transpose(weight), cotangent)[0, ...]  # (d,)
    x_bar, w_in_bar, b_in_bar, w_up_bar, b_up_bar = _hidden_backward_from(x, p, ffn, factors, z_hat * weight, xp)
    return x_bar, w_bar, ExpertFFNParams(w_in_bar, w_out_bar, b_in_bar, b_out_bar, w_up_bar, b_up_bar), y


def _expert_slice(params: ExpertFFNParams, e: int) -> ExpertFFNParams:
    """The weights of expert ``e`` (leading axis removed)."""
    return ExpertFFNParams(*(None if a is None else a[e, ...] for a in params))


def _batched_view(params: ExpertFFNParams) -> ExpertFFNParams:
    """All experts, biases given a token axis so that they broadcast over ``(E, C, K)``."""
    return ExpertFFNParams(
        params.w_in,
        params.w_out,
        None if params.b_in is None else params.b_in[:, None, :],
        None if params.b_out is None else params.b_out[:, None, :],
        params.w_up,
        None if params.b_up is None else params.b_up[:, None, :],
    )


def _stack_expert_grads(per_expert: list[ExpertFFNParams | None], params: ExpertFFNParams, xp: Any) -> ExpertFFNParams:
    """Stack per-expert cotangents into a full record; ``None`` entries (experts without tokens) give zeros."""
    fields = []
    for f in _PARAM_NAMES:
        a = getattr(params, f)
        if a is None:
            fields.append(None)
            continue
        zero = xp.zeros_like(a[0, ...])
        fields.append(xp.stack([zero if g is None else getattr(g, f) for g in per_expert], axis=0))
    return ExpertFFNParams(*fields)


# --------------------------------------------------------------------------------------------
# Public: one expert on a block of tokens
# --------------------------------------------------------------------------------------------


def _check_block(x: Any, params: ExpertFFNParams, ffn: ExpertFFN, expert: Any, ndim: int) -> tuple[Any, int]:
    check_record_type(ffn, "ffn", ExpertFFN)
    check_record_type(params, "params", ExpertFFNParams)
    named = {"x": x, **_named_params(params, "params")}
    xp = check_arrays(named)  # finite: large arrays are read once, through a sum
    check_float_array(x, "x", ndim=ndim)
    E, _, _ = check_expert_ffn_params(params, ffn, d=x.shape[-1], name="params")
    if expert is not None:
        check_positive_int(expert, "expert", minimum=0, maximum=E - 1)
    return xp, E


def expert_ffn(x: Any, params: ExpertFFNParams, ffn: ExpertFFN, *, expert: int) -> Any:
    r"""Expert ``expert``'s feed-forward network on a block of tokens.

    Plain ($\phi$ = ``ffn.activation``):

    $$\mathrm{FFN}_e(x) = \phi(x W^{\mathrm{in}}_e + b^{\mathrm{in}}_e)\, W^{\mathrm{out}}_e + b^{\mathrm{out}}_e ,$$

    the position-wise FFN of Vaswani et al. (2017), eq. (2), used as the expert of Shazeer et al.
    (2017), "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer",
    ICLR, arXiv:1701.06538, section 2, and of Fedus, Zoph & Shazeer (2022), "Switch
    Transformers", JMLR 23(120), arXiv:2101.03961. Gated:

    $$\mathrm{FFN}_e(x) = \big(\phi(\tilde g) \odot (\tilde u + \delta)\big) W^{\mathrm{out}}_e + b^{\mathrm{out}}_e,
    \quad \tilde g = \min(g, L),\ \tilde u = \mathrm{clip}(u, -L, L),$$

    with $g = xW^{\mathrm{gate}}_e + b^{\mathrm{gate}}_e$, $u = xW^{\mathrm{up}}_e + b^{\mathrm{up}}_e$;
    without a clamp ($L = \infty$) and $\delta = 0$ this is eq. (6) of Shazeer (2020), "GLU
    Variants Improve Transformer", arXiv:2002.05202 (SwiGLU for $\phi = \mathrm{silu}$).

    Parameters
    ----------
    x : array, shape (n, d)
        The tokens routed to this expert (any $n \ge 0$).
    params : ExpertFFNParams
        All $E$ experts' weights (layout on [`ExpertFFNParams`][moeref.expert_ffn.ExpertFFNParams]).
    ffn : ExpertFFN
        The family and layout, e.g. [`SWIGLU`][moeref.expert_ffn.SWIGLU].
    expert : int
        $e \in [0, E)$.

    Returns
    -------
    array, shape (n, d)

    Notes
    -----
    Computed in the dtype of the inputs; the exact GELU uses $\Phi(h) = \tfrac12\operatorname{erfc}(-h/\sqrt2)$
    ([`core.normal_cdf`][moeref.core.normal_cdf]), the erf form written so that it keeps full
    relative precision for very negative $h$.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN, expert_ffn
    >>> p = ExpertFFNParams(w_in=np.ones((2, 1, 3)), w_out=np.ones((2, 3, 1)))
    >>> expert_ffn(np.array([[1.0], [-1.0]]), p, RELU_FFN, expert=1).tolist()
    [[3.0], [0.0]]
    """
    xp, _ = _check_block(x, params, ffn, expert, 2)
    y, _ = _ffn_forward(x, _expert_slice(params, expert), ffn, xp)
    return y


def expert_ffn_vjp(x: Any, params: ExpertFFNParams, ffn: ExpertFFN, cotangent: Any, *, expert: int) -> ExpertFFNGrads:
    r"""VJP of [`expert_ffn`][moeref.expert_ffn.expert_ffn].

    With $\bar y$ the cotangent of the output block, $z$ the input of the output projection and
    $h$ its pre-activation (plain FFN):

    $$\bar W^{\mathrm{out}}_e = z^\top \bar y,\quad \bar b^{\mathrm{out}}_e = \textstyle\sum_n \bar y_n,\quad
    \bar z = \bar y\, W^{\mathrm{out}\top}_e,\quad \bar h = \bar z \odot \phi'(h),\quad
    \bar W^{\mathrm{in}}_e = x^\top \bar h,\quad \bar x = \bar h\, W^{\mathrm{in}\top}_e .$$

    Gated: $\bar g = \bar z \odot (\tilde u + \delta) \odot \phi'(\tilde g)\,[g \le L]$ and
    $\bar u = \bar z \odot \phi(\tilde g)\,[|u| \le L]$, reassembled in the layout of ``w_in``.

    Parameters
    ----------
    x, params, ffn, expert
        As in the forward.
    cotangent : array, shape (n, d)

    Returns
    -------
    ExpertFFNGrads
        ``x`` of shape (n, d) and a full ``params`` record (every expert; zeros except expert
        ``expert``; ``None`` where the parameter is ``None``).
    """
    xp, E = _check_block(x, params, ffn, expert, 2)
    check_cotangent(cotangent, tuple(x.shape), x, what="shape like x", like_name="x")
    p = _expert_slice(params, expert)
    _, cache = _ffn_forward(x, p, ffn, xp)
    x_bar, g = _ffn_backward(x, p, ffn, cache, cotangent, xp)
    per_expert: list[ExpertFFNParams | None] = [None] * E
    per_expert[expert] = g
    return ExpertFFNGrads(x=x_bar, params=_stack_expert_grads(per_expert, params, xp))


# --------------------------------------------------------------------------------------------
# Public: every expert at once on an (E, C, d) buffer
# --------------------------------------------------------------------------------------------


def batched_expert_ffn(x: Any, params: ExpertFFNParams, ffn: ExpertFFN) -> Any:
    r"""Every expert's FFN on its own slice of an ``(E, C, d)`` buffer: ``out[e] = FFN_e(x[e])``.

    The expert computation of the dense (GShard, Lepikhin et al. 2020, arXiv:2006.16668,
    Algorithm 2) formulation, where each expert holds a fixed-capacity buffer of $C$ slots. The
    equations are those of [`expert_ffn`][moeref.expert_ffn.expert_ffn], one batched matmul per
    projection.

    Parameters
    ----------
    x : array, shape (E, C, d)
    params : ExpertFFNParams
    ffn : ExpertFFN

    Returns
    -------
    array, shape (E, C, d)

    Notes
    -----
    An empty slot (a zero row) gives $\mathrm{FFN}_e(0)$, which is not 0 when there are biases;
    whoever combines the buffer must weight such slots by 0.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN, batched_expert_ffn
    >>> p = ExpertFFNParams(w_in=np.ones((2, 1, 3)), w_out=np.stack([np.ones((3, 1)), -np.ones((3, 1))]))
    >>> batched_expert_ffn(np.ones((2, 1, 1)), p, RELU_FFN).tolist()
    [[[3.0]], [[-3.0]]]
    """
    xp, E = _check_block(x, params, ffn, None, 3)
    check_shape(x, "x", (E, None, None), what=f"one (C, d) slice per expert, E={E}")
    y, _ = _ffn_forward(x, _batched_view(params), ffn, xp)
    return y


def batched_expert_ffn_vjp(x: Any, params: ExpertFFNParams, ffn: ExpertFFN, cotangent: Any) -> ExpertFFNGrads:
    r"""VJP of [`batched_expert_ffn`][moeref.expert_ffn.batched_expert_ffn].

    The equations of [`expert_ffn_vjp`][moeref.expert_ffn.expert_ffn_vjp] per expert; bias
    cotangents are summed over the $C$ slots.

    Parameters
    ----------
    x, params, ffn
        As in the forward.
    cotangent : array, shape (E, C, d)

    Returns
    -------
    ExpertFFNGrads
        ``x`` of shape (E, C, d) and the ``params`` record.
    """
    xp, E = _check_block(x, params, ffn, None, 3)
    check_shape(x, "x", (E, None, None), what=f"one (C, d) slice per expert, E={E}")
    check_cotangent(cotangent, tuple(x.shape), x, what="shape like x", like_name="x")
    p = _batched_view(params)
    _, cache = _ffn_forward(x, p, ffn, xp)
    x_bar, g = _ffn_backward(x, p, ffn, cache, cotangent, xp)
    return ExpertFFNGrads(x=x_bar, params=g)

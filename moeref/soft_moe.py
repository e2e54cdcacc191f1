r"""Soft MoE: every slot is a convex combination of all tokens, every token one of all slot outputs.

For one sequence of $m$ tokens $X \in \mathbb R^{m \times d}$ (rows of ``x``), $n$ experts with
$p$ slots each and slot parameters $\Phi \in \mathbb R^{d \times np}$, Soft MoE (Puigcerver,
Riquelme, Mustafa & Houlsby 2023, "From Sparse to Soft Mixtures of Experts", ICLR 2024,
arXiv:2308.00951, section 2.1 and Algorithm 1) computes

$$L = X\Phi, \qquad D_{ij} = \frac{e^{L_{ij}}}{\sum_{i'=1}^{m} e^{L_{i'j}}}, \qquad
\tilde X = D^\top X, \qquad \tilde Y_j = f_{\lfloor j/p \rfloor}(\tilde X_j), \qquad
C_{ij} = \frac{e^{L_{ij}}}{\sum_{j'=1}^{np} e^{L_{ij'}}}, \qquad Y = C\tilde Y .$$

The **dispatch weights** $D$ are a softmax over the tokens (each slot's column sums to 1), the
**combine weights** $C$ a softmax over all $np$ slots (each token's row sums to 1). No token is
dropped and nothing is sorted; the price is that a token's output depends on every other token
of its sequence, so the layer is **not causal** (see
[`soft_moe_layer`][moeref.soft_moe.soft_moe_layer]).

The two public implementations normalise the tokens and the slot parameters before the logits
in different ways; [`SoftMoEOptions`][moeref.soft_moe.SoftMoEOptions] names both, and the presets
[`vmoe`][moeref.soft_moe.vmoe] and
[`soft_moe_pytorch`][moeref.soft_moe.soft_moe_pytorch] fill them. The experts are moeref's
expert FFN families ([`moeref.expert_ffn`][moeref.expert_ffn]), run on an ``(n, p, d)`` buffer
of slots. The analytic VJP [`soft_moe_layer_vjp`][moeref.soft_moe.soft_moe_layer_vjp] covers the
input, $\Phi$, the logit scale, the normalisation gains and every expert weight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .capacity import CapacityOptions, ROUNDINGS, expert_capacity
from .core import softmax, softmax_vjp
from .expert_ffn import (
    GELU_FFN,
    GELU_TANH_FFN,
    ExpertFFN,
    ExpertFFNParams,
    _batched_view,
    _ffn_backward,
    _ffn_forward,
    _named_params,
    check_expert_ffn_params,
)
from .validation import (
    check_cotangent,
    check_arrays,
    check_choice,
    check_float_array,
    check_positive_float,
    check_positive_int,
    check_record_type,
    check_shape,
)

__all__ = [
    "NORMALIZATIONS",
    "MIXED_TOKENS",
    "SoftMoEParams",
    "SoftMoEOptions",
    "SoftMoEOutput",
    "SoftMoEGrads",
    "soft_moe_slots",
    "soft_moe_layer",
    "soft_moe_layer_vjp",
    "vmoe",
    "soft_moe_pytorch",
    "SOFT_MOE_PRESETS",
]

NORMALIZATIONS = ("none", "l2", "rms", "layer_norm")
"""Values of [`SoftMoEOptions.normalization`][moeref.soft_moe.SoftMoEOptions]."""

MIXED_TOKENS = ("original", "normalized")
"""Values of [`SoftMoEOptions.mixed_tokens`][moeref.soft_moe.SoftMoEOptions]."""

_DEFAULT_EPS = {"none": 0.0, "l2": 1e-6, "rms": 1e-12, "layer_norm": 1e-5}


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class SoftMoEParams(NamedTuple):
    r"""Parameters of a Soft MoE layer.

    Attributes
    ----------
    phi : array, shape (d, n, p)
        Slot parameters $\Phi$: column ``phi[:, e, s]`` belongs to slot $s$ of expert $e$, which is
        column $j = ep + s$ of the paper's $\Phi \in \mathbb R^{d \times np}$
        (``reshape(phi, (d, n * p))``). The layout of the V-MoE code's ``mu`` ``(d, n, p)``;
        soft-moe-pytorch's ``slot_embeds (n, p, d)`` is ``permute_dims(slot_embeds, (2, 0, 1))``.
    experts : ExpertFFNParams
        The $n$ expert FFNs (``w_in (n, d, K)``, ``w_out (n, I, d)``, ...).
    scale : array, shape (), optional
        The learned scalar that multiplies the logits (V-MoE ``scale``, initialised to 1).
        None: no scale.
    token_norm_weight : array, shape (d,), optional
        Per-feature gain after the token normalisation (soft-moe-pytorch ``norm.gamma``). None:
        no gain.
    slot_norm_weight : array, shape (d,), optional
        Per-feature gain after the slot normalisation (soft-moe-pytorch ``slot_norm.gamma``).
    """

    phi: Any
    experts: ExpertFFNParams
    scale: Any = None
    token_norm_weight: Any = None
    slot_norm_weight: Any = None


@dataclass(frozen=True)
class SoftMoEOptions:
    r"""Conventions of a Soft MoE layer.

    Attributes
    ----------
    normalization : str
        How the tokens $x_t$ (and, the same way, each slot's column $\phi_j$ of $\Phi$) are
        normalised over the $d$ features before $L = \hat X \hat\Phi$ (then times the gain, if
        given, and the logits times ``scale``, if given):

        * ``"l2"``: $\hat v = v / \sqrt{\lVert v\rVert^2 + \epsilon}$, unit norm (Puigcerver et
          al. 2023, the "Normalization" paragraph of section 2: $L_2$-normalised $X$ and $\Phi$ with one
          learned scale). The paper's code, google-research/vmoe
          ``vmoe/projects/soft_moe/router.py`` (read at commit 0c108255), ``normalize``:
          ``x * rsqrt(sum(x**2) + 1e-6)``, on the inputs and on ``mu`` (axis 0).
        * ``"rms"``: $\hat v = \sqrt d\; v / \max(\lVert v\rVert, \epsilon)$ (soft-moe-pytorch
          0.1.9 ``soft_moe.py``, ``RMSNorm``: ``F.normalize(x, dim=-1) * dim ** 0.5 * gamma``,
          whose ``F.normalize`` clamps the norm at $\epsilon = 10^{-12}$).
        * ``"layer_norm"``: $\hat v = (v - \bar v)/\sqrt{\operatorname{var}(v) + \epsilon}$,
          no bias (soft-moe-pytorch ``use_layernorm=True``: ``F.layer_norm`` with gain
          ``gamma`` and a zero ``beta`` buffer, $\epsilon = 10^{-5}$).
        * ``"none"``: $L = X\Phi$ as written in section 2.1 of the paper.
    eps : float or None
        $\epsilon$ of the normalisation; None takes the implementation's: $10^{-6}$ for
        ``"l2"`` (V-MoE), $10^{-12}$ for ``"rms"`` (``F.normalize``), $10^{-5}$ for
        ``"layer_norm"`` (``F.layer_norm``). Note where it enters: inside the square root for
        ``"l2"`` and ``"layer_norm"``, as a floor on the norm for ``"rms"``.
    mixed_tokens : str
        Which tokens the dispatch weights mix into the slots, $\tilde X = D^\top M$:
        ``"original"``, $M = X$ (V-MoE: the router normalises a copy, ``MlpMoeBlock`` dispatches
        the unnormalised ``inputs``; the paper's $\tilde X = D^\top X$), or ``"normalized"``,
        $M = \hat X$ times the token gain (soft-moe-pytorch: ``x = self.norm(x)`` overwrites the
        tokens before ``einsum('b n d, b n e s -> b e s d', x, dispatch_weights)``).
    slots_per_expert : int or None
        $p$, when fixed (V-MoE ``num_slots``, soft-moe-pytorch ``num_slots``). Must be at least 1.
        The layer checks ``params.phi`` against it.
    capacity_factor : float or None
        $c$: the total slot count is about $c$ times the tokens per sequence,
        $p = \operatorname{round}(c\,m/n)$ (V-MoE ``capacity_factor``, default 1.0, with
        ``moe.compute_capacity(group_size, num_experts, capacity_factor, ceil_or_round='round',
        multiple_of=1)``; soft-moe-pytorch: ``seq_len // num_experts``, i.e. $c = 1$ with
        ``"floor"``). See [`soft_moe_slots`][moeref.soft_moe.soft_moe_slots]. At most one of
        ``slots_per_expert`` and ``capacity_factor`` may be set; with neither, $p$ is read from
        ``params.phi``.
    slot_rounding : str
        The rounding of $c\,m/n$: ``"round_half_even"`` (V-MoE: Python's ``round``), ``"floor"``
        (soft-moe-pytorch's ``//``) or ``"ceil"`` (V-MoE ``ceil_or_round='ceil'``).
    ffn : ExpertFFN
        The expert family. V-MoE's ``MlpBlock`` (``vit_jax.models_vit``) is Dense, ``nn.gelu``
        (the tanh approximation, Flax's default), Dense, with biases:
        [`GELU_TANH_FFN`][moeref.expert_ffn.GELU_TANH_FFN]. soft-moe-pytorch's ``FeedForward``
        is Linear, ``nn.GELU()`` (exact), Linear, with biases:
        [`GELU_FFN`][moeref.expert_ffn.GELU_FFN]; its ``geglu=True`` experts are
        ``ExpertFFN(activation="gelu", gated=True)`` with the two halves of its first Linear
        swapped (it computes ``x, gate = chunk(2)``, up projection first).
    """

    normalization: str = "l2"
    eps: float | None = None
    mixed_tokens: str = "original"
    slots_per_expert: int | None = None
    capacity_factor: float | None = None
    slot_rounding: str = "round_half_even"
    ffn: ExpertFFN = GELU_TANH_FFN

    def __post_init__(self) -> None:
        check_choice(self.normalization, "options.normalization", NORMALIZATIONS)
        check_choice(self.mixed_tokens, "options.mixed_tokens", MIXED_TOKENS)
        check_choice(self.slot_rounding, "options.slot_rounding", ROUNDINGS)
        check_record_type(self.ffn, "options.ffn", ExpertFFN)
        if self.eps is not None:
            check_positive_float(self.eps, "options.eps")
        if self.slots_per_expert is not None:
            check_positive_int(self.slots_per_expert, "options.slots_per_expert")
        if self.capacity_factor is not None:
            check_positive_float(self.capacity_factor, "options.capacity_factor")
            if self.slots_per_expert is not None:
                raise ValueError(
                    "options.slots_per_expert and options.capacity_factor are two ways to set the slot count; "
                    f"give one, got slots_per_expert={self.slots_per_expert}, capacity_factor={self.capacity_factor}"
                )

    @property
    def norm_eps(self) -> float:
        """$\\epsilon$ in use: ``eps``, or the normalisation's default."""
        return _DEFAULT_EPS[self.normalization] if self.eps is None else self.eps


class SoftMoEOutput(NamedTuple):
    r"""Everything the layer computes (a leading batch axis ``B`` when ``x`` has one).

    Slots are numbered $j = ep + s$ (expert $e$, slot $s$), the columns of the paper's $\Phi$.

    Attributes
    ----------
    y : array, shape (B, m, d) or (m, d)
        $Y = C\tilde Y$.
    logits : array, shape (B, m, np) or (m, np)
        $L$ (times ``scale``, plus ``logit_noise``, as fed to both softmaxes).
    dispatch_weights : array, shape like ``logits``
        $D$: softmax over the tokens (axis $-2$); every column sums to 1.
    combine_weights : array, shape like ``logits``
        $C$: softmax over the slots (axis $-1$); every row sums to 1.
    slot_inputs : array, shape (B, np, d) or (np, d)
        $\tilde X = D^\top M$.
    slot_outputs : array, shape (B, np, d) or (np, d)
        $\tilde Y_j = f_{\lfloor j/p\rfloor}(\tilde X_j)$.
    """

    y: Any
    logits: Any
    dispatch_weights: Any
    combine_weights: Any
    slot_inputs: Any
    slot_outputs: Any


class SoftMoEGrads(NamedTuple):
    """Cotangents of the layer's inputs: ``x`` and ``params`` (a ``SoftMoEParams`` of cotangents,
    ``None`` where a parameter is ``None``)."""

    x: Any
    params: SoftMoEParams


# --------------------------------------------------------------------------------------------
# Slot count
# --------------------------------------------------------------------------------------------


def soft_moe_slots(num_tokens: int, num_experts: int, capacity_factor: float, *, rounding: str = "round_half_even") -> int:
    r"""Slots per expert $p$ from a capacity factor: $p = \operatorname{round}(c\,m/n)$, at least 1.

    Soft MoE has $np$ slots in all for $m$ tokens; the capacity factor is their ratio,
    $c = np/m$ (Puigcerver et al. 2023, arXiv:2308.00951, section 2; V-MoE
    ``SoftRouter``: ``compute_capacity(group_size, num_experts, capacity_factor,
    ceil_or_round='round', multiple_of=1)``). soft-moe-pytorch sizes its slots as
    ``seq_len // num_experts`` ($c = 1$, ``rounding="floor"``). $c\,m/n$ is evaluated exactly
    (as [`expert_capacity`][moeref.capacity.expert_capacity] does), so halves round to even
    exactly as Python's ``round`` does on an exact half.

    Parameters
    ----------
    num_tokens : int
        $m$, tokens per sequence (per routing group).
    num_experts : int
        $n$.
    capacity_factor : float
        $c > 0$.
    rounding : {"round_half_even", "floor", "ceil"}

    Returns
    -------
    int

    Raises
    ------
    ValueError
        When the rounded count is 0 (V-MoE raises the same: a capacity must be at least 1).

    Examples
    --------
    >>> from moeref.soft_moe import soft_moe_slots
    >>> soft_moe_slots(196, 128, 1.0), soft_moe_slots(10, 4, 1.0), soft_moe_slots(10, 4, 1.0, rounding="ceil")
    (2, 2, 3)
    """
    check_positive_int(num_tokens, "num_tokens")
    check_positive_int(num_experts, "num_experts")
    check_positive_float(capacity_factor, "capacity_factor")
    check_choice(rounding, "rounding", ROUNDINGS)
    options = CapacityOptions(capacity_factor=capacity_factor, rounding=rounding, k_factor="none")
    p = expert_capacity(num_tokens, num_experts, 1, options)
    if p < 1:
        raise ValueError(
            f"capacity_factor={capacity_factor} with {num_tokens} tokens and {num_experts} experts gives "
            f"p = {rounding}({capacity_factor} * {num_tokens} / {num_experts}) = {p} slots per expert; at least 1 is needed"
        )
    return p


# --------------------------------------------------------------------------------------------
# Normalisation over the last axis, and its VJP
# --------------------------------------------------------------------------------------------


def _sum_last(v: Any, xp: Any) -> Any:
    return xp.sum(v, axis=-1, keepdims=True)


def _normalize(v: Any, kind: str, eps: float, xp: Any) -> tuple[Any, Any]:
    """``(v_hat, aux)`` for one of NORMALIZATIONS, along the last axis."""
    d = v.shape[-1]
    if kind == "none":
        return v, None
    if kind == "l2":
        r = 1.0 / xp.sqrt(_sum_last(v * v, xp) + eps)  # (..., 1)
        return v * r, r
    if kind == "rms":
        norm = xp.sqrt(_sum_last(v * v, xp))  # (..., 1)
        return math.sqrt(d) * v / xp.maximum(norm, xp.full_like(norm, eps)), norm
    centred = v - _sum_last(v, xp) / d
    r = 1.0 / xp.sqrt(_sum_last(centred * centred, xp) / d + eps)  # (..., 1)
    return centred * r, r


def _normalize_vjp(v: Any, v_hat: Any, aux: Any, g: Any, kind: str, eps: float, xp: Any) -> Any:
    r"""Cotangent of ``v`` from the cotangent ``g`` of ``v_hat``."""
    d = v.shape[-1]
    if kind == "none":
        return g
    if kind == "l2":  # r (g - v_hat <v_hat, g>)
        return aux * (g - v_hat * _sum_last(v_hat * g, xp))
    if kind == "rms":  # sqrt(d)/|v| (g - u <u, g>), u = v/|v|, above the floor; sqrt(d) g / eps below it
        norm = aux
        above = norm > eps
        safe = xp.where(above, norm, xp.ones_like(norm))
        u = v / safe
        return xp.where(above, (math.sqrt(d) / safe) * (g - u * _sum_last(u * g, xp)), (math.sqrt(d) / eps) * g)
    # layer norm: r (g - mean(g) - v_hat mean(g v_hat))
    return aux * (g - _sum_last(g, xp) / d - v_hat * (_sum_last(g * v_hat, xp) / d))


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _param_arrays(params: SoftMoEParams) -> dict[str, Any]:
    named = {f"params.{f}": getattr(params, f) for f in SoftMoEParams._fields if f != "experts"}
    return {**named, **_named_params(params.experts, "params.experts")}


def _check(x: Any, params: Any, options: Any, logit_noise: Any) -> tuple[Any, int, int]:
    """Types, shapes, finiteness and the slot count; returns ``(xp, n, p)``."""
    check_record_type(params, "params", SoftMoEParams)
    check_record_type(options, "options", SoftMoEOptions)
    check_record_type(params.experts, "params.experts", ExpertFFNParams)
    xp = check_arrays({"x": x, **_param_arrays(params), "logit_noise": logit_noise})
    check_float_array(x, "x", ndim=(2, 3))
    m, d = x.shape[-2:]
    if m < 1:
        raise ValueError(f"x has no tokens (shape {tuple(x.shape)}); the dispatch softmax over tokens needs at least one")
    check_float_array(params.phi, "params.phi", ndim=3)
    check_shape(params.phi, "params.phi", (d, None, None), what=f"(d, n, p) with d={d} features of x")
    _, n, p = params.phi.shape
    n_ffn, _, _ = check_expert_ffn_params(params.experts, options.ffn, d=d, name="params.experts")
    if n_ffn != n:
        raise ValueError(f"params.experts has n={n_ffn} experts but params.phi has n={n} (shape (d, n, p) = {tuple(params.phi.shape)})")
    if p < 1:
        raise ValueError(f"params.phi has p={p} slots per expert (shape {tuple(params.phi.shape)}); at least 1 is needed")
    if options.slots_per_expert is not None and options.slots_per_expert != p:
        raise ValueError(f"params.phi has p={p} slots per expert but options.slots_per_expert={options.slots_per_expert}")
    if options.capacity_factor is not None:
        want = soft_moe_slots(m, n, options.capacity_factor, rounding=options.slot_rounding)
        if want != p:
            raise ValueError(
                f"params.phi has p={p} slots per expert but options.capacity_factor={options.capacity_factor} with "
                f"m={m} tokens and n={n} experts gives p = {options.slot_rounding}({options.capacity_factor} * {m} / {n}) = {want}"
            )
    if params.scale is not None:
        check_shape(params.scale, "params.scale", (), what="one learned scalar")
    for name in ("token_norm_weight", "slot_norm_weight"):
        w = getattr(params, name)
        if w is not None:
            check_shape(w, f"params.{name}", (d,), what=f"one gain per feature, d={d}")
    if logit_noise is not None:
        check_shape(logit_noise, "logit_noise", tuple(x.shape[:-1]) + (n * p,), what=f"the logits, (..., m, n*p) with n*p={n * p}")
    return xp, n, p


# --------------------------------------------------------------------------------------------
# Forward (batched: x is (B, m, d) inside)
# --------------------------------------------------------------------------------------------


class _Forward(NamedTuple):
    x: Any  # (B, m, d)
    x_hat: Any  # (B, m, d) normalised tokens before the gain
    x_aux: Any
    x_norm: Any  # (B, m, d) normalised tokens times the gain
    slots: Any  # (N, d) rows of Phi^T
    slot_hat: Any
    slot_aux: Any
    slot_norm: Any  # (N, d)
    raw: Any  # (B, m, N) x_norm slot_norm^T (before scale and noise)
    logits: Any  # (B, m, N)
    dispatch: Any  # (B, m, N)
    combine: Any  # (B, m, N)
    mixed: Any  # (B, m, d)
    buffer: Any  # (n, B p, d) slot inputs, expert-major
    ffn_cache: Any
    slot_in: Any  # (B, N, d)
    slot_out: Any  # (B, N, d)
    y: Any  # (B, m, d)


def _to_buffer(s: Any, n: int, p: int, xp: Any) -> Any:
    """(B, n p, d) slots -> (n, B p, d) expert buffers."""
    B, _, d = s.shape
    s = xp.permute_dims(xp.reshape(s, (B, n, p, d)), (1, 0, 2, 3))  # (n, B, p, d)
    return xp.reshape(s, (n, B * p, d))


def _from_buffer(b: Any, B: int, n: int, p: int, xp: Any) -> Any:
    """(n, B p, d) expert buffers -> (B, n p, d) slots."""
    d = b.shape[-1]
    b = xp.permute_dims(xp.reshape(b, (n, B, p, d)), (1, 0, 2, 3))  # (B, n, p, d)
    return xp.reshape(b, (B, n * p, d))


def _gain(v: Any, w: Any) -> Any:
    return v if w is None else v * w


def _forward(x: Any, params: SoftMoEParams, options: SoftMoEOptions, logit_noise: Any, n: int, p: int, xp: Any) -> _Forward:
    kind, eps = options.normalization, options.norm_eps
    x3 = x if x.ndim == 3 else x[None, ...]  # (B, m, d)
    B, d = x3.shape[0], x3.shape[-1]
    x_hat, x_aux = _normalize(x3, kind, eps, xp)
    x_norm = _gain(x_hat, params.token_norm_weight)  # (B, m, d)
    slots = xp.reshape(xp.permute_dims(params.phi, (1, 2, 0)), (n * p, d))  # (N, d), row j = e p + s
    slot_hat, slot_aux = _normalize(slots, kind, eps, xp)
    slot_norm = _gain(slot_hat, params.slot_norm_weight)  # (N, d)
    raw = xp.matmul(x_norm, xp.matrix_transpose(slot_norm))  # (B, m, N)
    logits = raw if params.scale is None else params.scale * raw
    if logit_noise is not None:
        logits = logits + (logit_noise if logit_noise.ndim == 3 else logit_noise[None, ...])
    dispatch = softmax(logits, axis=-2)  # (B, m, N): each slot's column sums to 1 over tokens
    combine = softmax(logits, axis=-1)  # (B, m, N): each token's row sums to 1 over slots
    mixed = x3 if options.mixed_tokens == "original" else x_norm
    slot_in = xp.matmul(xp.matrix_transpose(dispatch), mixed)  # (B, N, d)
    buffer = _to_buffer(slot_in, n, p, xp)  # (n, B p, d)
    out, cache = _ffn_forward(buffer, _batched_view(params.experts), options.ffn, xp)  # (n, B p, d)
    slot_out = _from_buffer(out, B, n, p, xp)  # (B, N, d)
    y = xp.matmul(combine, slot_out)  # (B, m, d)
    return _Forward(
        x3, x_hat, x_aux, x_norm, slots, slot_hat, slot_aux, slot_norm, raw, logits, dispatch, combine, mixed, buffer, cache,
        slot_in, slot_out, y,
    )


def soft_moe_layer(
    x: Any, params: SoftMoEParams, options: SoftMoEOptions = SoftMoEOptions(), *, logit_noise: Any = None
) -> SoftMoEOutput:
    r"""Soft MoE layer: dispatch every token to every slot, run the experts on their slots, combine.

    With $\hat X$, $\hat\Phi$ the normalised tokens and slot parameters (``options.normalization``,
    times the gains $\gamma_x$, $\gamma_\phi$ when given), the learned scale $s$ and optional logit
    noise $\varepsilon$:

    $$L = s\,\hat X\hat\Phi + \varepsilon, \qquad D = \operatorname{softmax}_{\text{tokens}}(L), \qquad
    C = \operatorname{softmax}_{\text{slots}}(L),$$

    $$\tilde X = D^\top M, \qquad \tilde Y_{ep+s} = f_e(\tilde X_{ep+s}), \qquad Y = C\,\tilde Y,$$

    with $M = X$ or $M = \hat X$ (``options.mixed_tokens``). With ``normalization="none"``, no
    scale and no noise this is section 2.1 / Algorithm 1 of Puigcerver, Riquelme, Mustafa &
    Houlsby (2023), "From Sparse to Soft Mixtures of Experts", ICLR 2024, arXiv:2308.00951; the
    normalisation is the "Normalization" paragraph of their section 2.

    Parameters
    ----------
    x : array, shape (m, d) or (B, m, d)
        One sequence of $m$ tokens, or $B$ sequences routed **separately** (each sequence has its
        own softmax over tokens; V-MoE calls them groups).
    params : SoftMoEParams
        ``phi (d, n, p)``, the experts, optional ``scale ()`` and gains ``(d,)``.
    options : SoftMoEOptions
        Default: the paper's form ([`vmoe`][moeref.soft_moe.vmoe] without a capacity
        factor check).
    logit_noise : array, shape (m, n p) or (B, m, n p), optional
        Explicit noise added to the logits, already scaled (V-MoE ``noise_std`` times standard
        normal draws; soft-moe-pytorch ``noise_mult`` times Gumbel draws). None: no noise.

    Returns
    -------
    SoftMoEOutput

    Raises
    ------
    ValueError
        Shapes that do not match (``phi`` against ``x`` and the experts), no slot
        (``p < 1``), a slot count that contradicts ``options.slots_per_expert`` or
        ``options.capacity_factor``, NaN or infinite values (also in ``params.scale``).
    TypeError
        Records of the wrong type, non-float arrays, mixed libraries.

    Notes
    -----
    **Not causal.** $D$ normalises over all $m$ tokens, so every slot, and hence every output
    row, depends on every token: changing token $m-1$ changes $y_0$. Soft MoE as written cannot
    serve an auto-regressive decoder (a token would see the future); Puigcerver et al. name this
    as a limitation of the method.

    **Conventions.** Slots are numbered expert-major, $j = ep + s$. The scale multiplies the
    logits; V-MoE multiplies whichever of the normalised inputs or $\Phi$ is smaller, which gives
    the same logits. V-MoE computes the dispatch and combine einsums in bfloat16
    (``Bfloat16Dispatcher``) and may group tokens across sequences (``group_size``): reshape to
    ``(B, group_size, d)`` to reproduce its groups. moeref computes in the dtype of ``x``.

    **Edge cases.** The softmaxes are shifted by their maxima (no overflow). An expert FFN with
    biases applied to an all-zero slot gives $f_e(0) \ne 0$; every slot gets a positive combine
    weight, so nothing is discarded.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_ffn import ExpertFFN, ExpertFFNParams
    >>> from moeref.soft_moe import SoftMoEOptions, SoftMoEParams, soft_moe_layer
    >>> identity = ExpertFFN(activation="identity")
    >>> params = SoftMoEParams(phi=np.zeros((1, 1, 1)), experts=ExpertFFNParams(np.ones((1, 1, 1)), np.ones((1, 1, 1))))
    >>> out = soft_moe_layer(np.array([[1.0], [3.0]]), params, SoftMoEOptions(normalization="none", ffn=identity))
    >>> out.y.tolist(), out.dispatch_weights.tolist()  # zero logits: one slot holds the mean token
    ([[2.0], [2.0]], [[0.5], [0.5]])
    """
    xp, n, p = _check(x, params, options, logit_noise)
    f = _forward(x, params, options, logit_noise, n, p, xp)
    fields = (f.y, f.logits, f.dispatch, f.combine, f.slot_in, f.slot_out)
    if x.ndim == 2:
        fields = tuple(a[0, ...] for a in fields)
    return SoftMoEOutput(*fields)


# --------------------------------------------------------------------------------------------
# VJP
# --------------------------------------------------------------------------------------------


def _sum_leading(v: Any, xp: Any) -> Any:
    """Sum over every axis but the last: (..., d) -> (d,)."""
    return xp.sum(xp.reshape(v, (-1, v.shape[-1])), axis=0)


def _gain_vjp(v_hat: Any, w: Any, g: Any, xp: Any) -> tuple[Any, Any]:
    """Cotangents of ``v_hat`` and ``w`` in ``v_hat * w`` (``w`` None: no gain)."""
    if w is None:
        return g, None
    return g * w, _sum_leading(g * v_hat, xp)


def soft_moe_layer_vjp(
    x: Any, params: SoftMoEParams, options: SoftMoEOptions, cotangent_y: Any, *, logit_noise: Any = None
) -> SoftMoEGrads:
    r"""VJP of [`soft_moe_layer`][moeref.soft_moe.soft_moe_layer] w.r.t. ``x`` and every parameter.

    Per sequence, with $\bar Y$ the output cotangent and $R = \hat X\hat\Phi$ (so $L = sR + \varepsilon$):

    $$\bar C = \bar Y\tilde Y^\top, \qquad \bar{\tilde Y} = C^\top\bar Y, \qquad
    (\bar{\tilde X}, \bar\theta) = \text{expert pullbacks of } \bar{\tilde Y},$$

    $$\bar D = M\,\bar{\tilde X}^\top, \qquad \bar M = D\,\bar{\tilde X}, \qquad
    \bar L = D \odot (\bar D - \mathbf 1\mathbf 1^\top(D\odot\bar D)) + C \odot (\bar C - (C\odot\bar C)\mathbf 1\mathbf 1^\top),$$

    $$\bar s = \langle \bar L, R\rangle, \qquad \bar{\hat X} = s\,\bar L\,\hat\Phi^\top, \qquad
    \bar{\hat\Phi} = s\,\hat X^\top\bar L \ (\text{summed over sequences}),$$

    then the gains ($\bar\gamma = \sum \bar{\hat v} \odot \hat v$) and the normalisations (for
    ``"l2"``, $\bar v = r\,(\bar{\hat v} - \hat v\langle\hat v, \bar{\hat v}\rangle)$ with
    $r = (\lVert v\rVert^2 + \epsilon)^{-1/2}$; for ``"rms"`` above the floor,
    $\bar v = \frac{\sqrt d}{\lVert v\rVert}(\bar{\hat v} - u\langle u, \bar{\hat v}\rangle)$,
    $u = v/\lVert v\rVert$, and $\sqrt d\,\bar{\hat v}/\epsilon$ below it; for ``"layer_norm"``,
    $\bar v = r(\bar{\hat v} - \overline{\bar{\hat v}} - \hat v\,\overline{\bar{\hat v}\odot\hat v})$,
    bars over features meaning means). $\bar M$ joins $\bar X$ or $\bar{\hat X}$ by
    ``options.mixed_tokens``. The expert pullbacks are those of
    [`batched_expert_ffn_vjp`][moeref.expert_ffn.batched_expert_ffn_vjp] on the ``(n, B p, d)``
    slot buffer.

    Parameters
    ----------
    x, params, options, logit_noise
        As in the forward (the noise is held fixed).
    cotangent_y : array, shape like ``x``
        $\bar Y$.

    Returns
    -------
    SoftMoEGrads
        ``x`` and a ``SoftMoEParams`` of cotangents: ``phi (d, n, p)``, ``experts``, ``scale ()``,
        gains ``(d,)``; ``None`` where the parameter is ``None``.

    Notes
    -----
    The layer is smooth (no selection), so this is the exact gradient everywhere except at the
    ``"rms"`` floor $\lVert v\rVert = \epsilon$, where the derivative below the floor is taken.
    """
    xp, n, p = _check(x, params, options, logit_noise)
    check_cotangent(cotangent_y, tuple(x.shape), like=x, name="cotangent_y", what="the layer output, shape like x")
    check_arrays({"x": x, "cotangent_y": cotangent_y})
    f = _forward(x, params, options, logit_noise, n, p, xp)
    kind, eps = options.normalization, options.norm_eps
    g_y = cotangent_y if cotangent_y.ndim == 3 else cotangent_y[None, ...]  # (B, m, d)
    B = f.x.shape[0]

    # combine: Y = C Y~
    g_combine = xp.matmul(g_y, xp.matrix_transpose(f.slot_out))  # (B, m, N)
    g_slot_out = xp.matmul(xp.matrix_transpose(f.combine), g_y)  # (B, N, d)
    # experts on the (n, B p, d) buffer
    g_buffer, g_experts = _ffn_backward(
        f.buffer, _batched_view(params.experts), options.ffn, f.ffn_cache, _to_buffer(g_slot_out, n, p, xp), xp
    )
    g_slot_in = _from_buffer(g_buffer, B, n, p, xp)  # (B, N, d)
    # dispatch: X~ = D^T M
    g_dispatch = xp.matmul(f.mixed, xp.matrix_transpose(g_slot_in))  # (B, m, N)
    g_mixed = xp.matmul(f.dispatch, g_slot_in)  # (B, m, d)
    # the two softmaxes of the same logits
    g_logits = softmax_vjp(f.dispatch, g_dispatch, axis=-2) + softmax_vjp(f.combine, g_combine, axis=-1)  # (B, m, N)
    g_scale = None
    if params.scale is not None:
        g_scale = xp.sum(g_logits * f.raw)
        g_logits = params.scale * g_logits
    # R = x_norm slot_norm^T
    g_x_norm = xp.matmul(g_logits, f.slot_norm)  # (B, m, d)
    g_slot_norm = xp.sum(xp.matmul(xp.matrix_transpose(g_logits), f.x_norm), axis=0)  # (N, d)
    if options.mixed_tokens == "normalized":
        g_x_norm = g_x_norm + g_mixed
    # gains and normalisations
    g_x_hat, g_token_w = _gain_vjp(f.x_hat, params.token_norm_weight, g_x_norm, xp)
    g_x = _normalize_vjp(f.x, f.x_hat, f.x_aux, g_x_hat, kind, eps, xp)  # (B, m, d)
    if options.mixed_tokens == "original":
        g_x = g_x + g_mixed
    g_slot_hat, g_slot_w = _gain_vjp(f.slot_hat, params.slot_norm_weight, g_slot_norm, xp)
    g_slots = _normalize_vjp(f.slots, f.slot_hat, f.slot_aux, g_slot_hat, kind, eps, xp)  # (N, d)
    d = f.x.shape[-1]
    g_phi = xp.permute_dims(xp.reshape(g_slots, (n, p, d)), (2, 0, 1))  # (d, n, p)
    if x.ndim == 2:
        g_x = g_x[0, ...]
    return SoftMoEGrads(
        x=g_x,
        params=SoftMoEParams(phi=g_phi, experts=g_experts, scale=g_scale, token_norm_weight=g_token_w, slot_norm_weight=g_slot_w),
    )


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _preset(base: SoftMoEOptions, changes: dict[str, Any]) -> SoftMoEOptions:
    if "slots_per_expert" in changes and "capacity_factor" not in changes:
        changes = {**changes, "capacity_factor": None}  # a fixed p overrides the capacity factor (as in both systems)
    return dataclasses.replace(base, **changes)


def vmoe(**changes: Any) -> SoftMoEOptions:
    r"""The paper's Soft MoE as in its authors' public code (google-research/vmoe): $L_2$-normalised tokens and slots, one learned scale.

    google-research/vmoe ``vmoe/projects/soft_moe/router.py`` ``SoftRouter``, the Soft MoE code
    released by the paper's authors (Google's vision code base; read at commit 0c108255):
    ``normalization="l2"`` with $\epsilon = 10^{-6}$ inside the square root, the original tokens
    mixed into the slots, $p = \operatorname{round}(c\,m/n)$ with $c = 1$ (``capacity_factor=1.0``,
    ``ceil_or_round='round'``), tanh-GELU experts with biases (``MlpBlock``). Give the learned
    scale as ``params.scale`` (initialised to 1 there).

    Parameters
    ----------
    **changes
        Fields of [`SoftMoEOptions`][moeref.soft_moe.SoftMoEOptions] to override; a given
        ``slots_per_expert`` clears the capacity factor (V-MoE ignores ``capacity_factor`` when
        ``num_slots`` is set).

    Examples
    --------
    >>> from moeref.soft_moe import vmoe
    >>> vmoe(slots_per_expert=1).capacity_factor is None
    True
    """
    base = SoftMoEOptions(
        normalization="l2", eps=1e-6, mixed_tokens="original", capacity_factor=1.0, slot_rounding="round_half_even", ffn=GELU_TANH_FFN
    )
    return _preset(base, changes)


def soft_moe_pytorch(**changes: Any) -> SoftMoEOptions:
    r"""lucidrains' soft-moe-pytorch ``SoftMoE``: RMS-normalised tokens and slots, normalised tokens mixed.

    soft-moe-pytorch 0.1.9, ``soft_moe_pytorch/soft_moe.py``: ``RMSNorm`` on the tokens and on
    ``slot_embeds`` ($\sqrt d\, v/\max(\lVert v\rVert, 10^{-12})$ times a learned ``gamma``: give
    ``params.token_norm_weight`` and ``params.slot_norm_weight``), no logit scale, the normalised
    tokens mixed into the slots, $p$ = ``seq_len // num_experts`` ($c = 1$, ``"floor"``),
    exact-GELU experts with biases (``FeedForward``). ``use_layernorm=True`` there is
    ``normalization="layer_norm", eps=None``; ``geglu=True`` is a gated exact-GELU FFN (see
    [`SoftMoEOptions.ffn`][moeref.soft_moe.SoftMoEOptions]).

    Parameters
    ----------
    **changes
        Fields of [`SoftMoEOptions`][moeref.soft_moe.SoftMoEOptions] to override
        (``slots_per_expert`` clears the capacity factor, as ``num_slots`` does there).

    Examples
    --------
    >>> from moeref.soft_moe import soft_moe_pytorch
    >>> o = soft_moe_pytorch()
    >>> o.normalization, o.mixed_tokens, o.norm_eps
    ('rms', 'normalized', 1e-12)
    """
    base = SoftMoEOptions(
        normalization="rms", eps=1e-12, mixed_tokens="normalized", capacity_factor=1.0, slot_rounding="floor", ffn=GELU_FFN
    )
    return _preset(base, changes)


SOFT_MOE_PRESETS = {"vmoe": vmoe, "soft_moe_pytorch": soft_moe_pytorch}
"""Preset name -> function returning [`SoftMoEOptions`][moeref.soft_moe.SoftMoEOptions]."""

r"""Expert-choice routing: each expert takes its top-$C$ tokens; a token may be taken by 0 to $E$ experts.

Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le & Laudon (2022), "Mixture-of-Experts with Expert
Choice Routing", NeurIPS 2022, arXiv:2202.09368, section 3. For $n$ tokens $X \in \mathbb R^{n\times d}$
and $e$ experts, the token-to-expert affinities are

$$S = \operatorname{Softmax}(X \cdot W_g) \in \mathbb R^{n \times e} \qquad \text{(eq. (1), softmax over experts)},$$

and every expert $i$ picks the $k$ tokens with the largest affinity to it,
$G, I = \operatorname{TopK}(S^\top, k)$: $I[i, j]$ is the $j$-th token chosen by expert $i$ and
$G[i, j] = S[I[i,j], i]$ its gate. The layer output is

$$y_t = \sum_{i=1}^{e}\ [t \in I[i, :]]\; S[t, i]\; \mathrm{FFN}_i(x_t),$$

so every expert processes exactly $k = C$ tokens (perfect load balance, no auxiliary loss),
while a token may be processed by several experts or by none. moeref writes $T$ for $n$, $E$ for
$e$ and $C$ for $k$ (the capacity), as in the rest of the library.

The assignment is expressed as the same [`Routes`][moeref.routes.Routes] record the token-choice
layer uses, of shape $(T, k_\max)$ with $k_\max$ the largest number of experts any token got, and
the experts run through the same sorted
[`dispatch_combine`][moeref.dispatch.dispatch_combine]: there is no second dispatch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

from .capacity import CapacityOptions, expert_capacity
from .core import _take_along_axis, device_of, one_hot, softmax, softmax_vjp, top_k
from .dispatch import dispatch_combine, dispatch_combine_vjp
from .expert_ffn import GELU_FFN, ExpertFFN, ExpertFFNParams, check_expert_ffn_params
from .routes import Routes
from .validation import (
    check_cotangent,
    check_arrays,
    check_choice,
    check_float_array,
    check_positive_int,
    check_record_type,
    check_shape,
)

__all__ = [
    "CAPACITY_RULES",
    "ExpertChoiceOptions",
    "ExpertChoiceParams",
    "ExpertChoiceRouting",
    "ExpertChoiceOutput",
    "ExpertChoiceGrads",
    "expert_choice_capacity",
    "expert_choice_routes",
    "expert_choice_layer",
    "expert_choice_layer_vjp",
]

CAPACITY_RULES = ("flaxformer", "paper")
"""Values of [`ExpertChoiceOptions.capacity_rule`][moeref.expert_choice.ExpertChoiceOptions]."""


@dataclass(frozen=True)
class ExpertChoiceOptions:
    r"""Conventions of an expert-choice layer.

    Attributes
    ----------
    capacity_factor : float or None
        $c > 0$: on average a token is processed by $c$ experts. The paper's main models use
        $c = 2$ ("EC-CF2", the default), and report $c = 1$ and $c = 0.5$ as well. None with a
        fixed ``capacity``.
    capacity_rule : {"flaxformer", "paper"}
        How $C$ follows from $c$ for $T_g$ tokens per group and $E$ experts:

        * ``"flaxformer"``: $C = \max(\operatorname{round}(c\,T_g/E),\ C_\text{min})$, round half
          to even, as google/flaxformer ``flaxformer/architectures/moe/moe_layers.py``
          (``MoeLayer.__call__``: ``int(round(capacity_factor * tokens_per_group /
          num_experts))`` then ``max(expert_capacity, self.min_expert_capacity)``), which feeds
          ``routing.py``'s ``ExpertsChooseMaskedRouter`` (``_top_k(router_probs_t,
          k=expert_capacity)``); read at commit 2ed752f5 / 5400cce0.
        * ``"paper"``: $C = T c / E$ (section 3: "$k = n \times c / e$"), which must be an integer;
          anything else is an error (the paper states no rounding).
    min_capacity : int
        $C_\text{min}$ of the ``"flaxformer"`` rule (flaxformer ``min_expert_capacity``, default
        4). Ignored by ``"paper"`` and by a fixed ``capacity``.
    capacity : int or None
        A fixed $C$ per expert and group; needs ``capacity_factor=None``.
    group_size : int or None
        Tokens per routing group $T_g$ (flaxformer routes each group of ``tokens_per_group``
        separately; the experts pick $C$ tokens in every group). Must divide $T$. None: one group
        of all $T$ tokens (the paper's "batch").
    ffn : ExpertFFN
        The expert FFN. The paper's experts are GeLU FFNs, $\mathrm{GeLU}(X_\text{in} W_1) W_2^\top$
        (section 3), so the default is [`GELU_FFN`][moeref.expert_ffn.GELU_FFN].

    Notes
    -----
    moeref evaluates $c\,T_g/E$ exactly (a rational number of the float $c$); flaxformer
    evaluates it in floating point, which can differ only where the product is within
    rounding error of a half-integer.
    """

    capacity_factor: float | None = 2.0
    capacity_rule: str = "flaxformer"
    min_capacity: int = 4
    capacity: int | None = None
    group_size: int | None = None
    ffn: ExpertFFN = GELU_FFN

    def __post_init__(self) -> None:
        check_choice(self.capacity_rule, "options.capacity_rule", CAPACITY_RULES)
        check_positive_int(self.min_capacity, "options.min_capacity", minimum=0)
        check_record_type(self.ffn, "options.ffn", ExpertFFN)
        if self.group_size is not None:
            check_positive_int(self.group_size, "options.group_size")
        if self.capacity is not None:
            check_positive_int(self.capacity, "options.capacity")
            if self.capacity_factor is not None:
                raise ValueError("options.capacity_factor must be None when a fixed options.capacity is given")
            return
        cf = self.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0:
            raise ValueError(f"options.capacity_factor must be a finite positive number (or give a fixed capacity), got {cf!r}")


class ExpertChoiceParams(NamedTuple):
    """Parameters of an expert-choice layer.

    Attributes
    ----------
    w_g : array, shape (d, E)
        $W_g$, the gating weights of eq. (1).
    experts : ExpertFFNParams
        The $E$ expert FFNs.
    b_g : array, shape (E,), optional
        A gating bias, $S = \\operatorname{Softmax}(X W_g + b_g)$ (flaxformer's
        ``RouterWeights(use_bias=True)`` default); None in the paper.
    """

    w_g: Any
    experts: ExpertFFNParams
    b_g: Any = None


class ExpertChoiceRouting(NamedTuple):
    """The expert-choice assignment, as the paper writes it and as a `Routes` record.

    Attributes
    ----------
    routes : Routes
        Shape (T, k_max), $k_\\max = \\max_t n_t$. Row $t$ lists the experts that took token $t$
        by decreasing $S[t, e]$ (ties: lower expert), then padding (``kept`` False, weight 0).
        ``weight`` is $S[t, e]$; ``position`` the token's slot in the expert's choice (0 = the
        expert's best token).
    token_index : int64 array, shape (G, E, C)
        $I$: the token (global row of ``x``) in slot $j$ of expert $i$ in group $g$.
    gates : array, shape (G, E, C)
        $G$: the affinity of that token to that expert.
    experts_per_token : int64 array, shape (T,)
        $n_t$, how many experts took token $t$ (0 to $E$).
    coverage : int64 array, shape (E + 1,)
        ``coverage[m]`` = number of tokens taken by exactly $m$ experts
        (``coverage[0]``: tokens no expert processes).
    capacity : int
        $C$.
    """

    routes: Routes
    token_index: Any
    gates: Any
    experts_per_token: Any
    coverage: Any
    capacity: int


class ExpertChoiceOutput(NamedTuple):
    """What [`expert_choice_layer`][moeref.expert_choice.expert_choice_layer] computes.

    Attributes
    ----------
    y : array, shape (T, d)
        The layer output (0 for a token no expert took; the residual is outside).
    scores : array, shape (T, E)
        $S = \\operatorname{Softmax}(X W_g + b_g)$.
    routing : ExpertChoiceRouting
        The assignment, its `Routes` record and the coverage counts.
    """

    y: Any
    scores: Any
    routing: ExpertChoiceRouting


class ExpertChoiceGrads(NamedTuple):
    """Cotangents of the layer's inputs: ``x (T, d)`` and ``params`` (an `ExpertChoiceParams` of cotangents)."""

    x: Any
    params: ExpertChoiceParams


# --------------------------------------------------------------------------------------------
# Capacity and routing
# --------------------------------------------------------------------------------------------


def expert_choice_capacity(tokens_per_group: int, num_experts: int, options: ExpertChoiceOptions = ExpertChoiceOptions()) -> int:
    r"""$C$, the number of tokens each expert takes per routing group.

    $$C = \max\big(\operatorname{round}(c\,T_g/E),\ C_\text{min}\big) \ \text{(flaxformer)}, \qquad
    C = T_g\, c / E \in \mathbb N \ \text{(paper, section 3)},$$

    or the fixed ``options.capacity``; see
    [`ExpertChoiceOptions`][moeref.expert_choice.ExpertChoiceOptions].

    Raises
    ------
    ValueError
        $C < 1$, $C > T_g$ (an expert cannot take more tokens than a group holds), or a
        non-integer $T_g c / E$ under the ``"paper"`` rule.

    Examples
    --------
    >>> from moeref.expert_choice import ExpertChoiceOptions, expert_choice_capacity
    >>> expert_choice_capacity(10, 4, ExpertChoiceOptions(capacity_factor=1.0, min_capacity=0))  # round(2.5) = 2
    2
    >>> expert_choice_capacity(16, 4, ExpertChoiceOptions(capacity_factor=2.0, capacity_rule="paper"))
    8
    """
    Tg = check_positive_int(tokens_per_group, "tokens_per_group")
    E = check_positive_int(num_experts, "num_experts")
    check_record_type(options, "options", ExpertChoiceOptions)
    if options.capacity is not None:
        C = options.capacity
    elif options.capacity_rule == "paper":
        exact = Fraction(options.capacity_factor) * Tg / E
        if exact.denominator != 1:
            raise ValueError(
                f"capacity_rule='paper' needs T*c/E to be an integer, got {Tg}*{options.capacity_factor}/{E} = {float(exact):g}; "
                "use capacity_rule='flaxformer' (rounds half to even) or a fixed capacity"
            )
        C = int(exact)
    else:
        C = expert_capacity(
            Tg, E, 1, CapacityOptions(capacity_factor=options.capacity_factor, rounding="round_half_even", k_factor="none", min_capacity=options.min_capacity)
        )
    if C < 1:
        raise ValueError(f"the expert capacity is C={C} (capacity_factor={options.capacity_factor}, T_g={Tg}, E={E}); each expert must take at least 1 token")
    if C > Tg:
        raise ValueError(f"the expert capacity C={C} exceeds the {Tg} tokens of a routing group; lower the capacity factor or min_capacity")
    return C


def expert_choice_routes(scores: Any, capacity: int, *, group_size: int | None = None) -> ExpertChoiceRouting:
    r"""Each expert takes its top-$C$ tokens by score, within each routing group.

    $$G, I = \operatorname{TopK}(S^\top, C), \qquad
    \mathrm{kept}_{te} = [\operatorname{rank}_e(t) < C], \qquad w_{te} = \mathrm{kept}_{te}\, S[t, e],$$

    Zhou et al. (2022), arXiv:2202.09368, section 3, with $\operatorname{rank}_e(t)$
    the place of token $t$ in expert $e$'s descending order of $S[:, e]$ within its group.

    Parameters
    ----------
    scores : array, shape (T, E)
        $S$ (any real scores; the layer passes the softmax affinities).
    capacity : int
        $C$, $1 \le C \le T_g$.
    group_size : int, optional
        $T_g$, dividing $T$; None for one group.

    Returns
    -------
    ExpertChoiceRouting

    Notes
    -----
    **Ties: the lower token index wins** (built on [`core.top_k`][moeref.core.top_k], a stable
    sort, the same on every backend; the top-k of JAX that flaxformer calls leaves ties to XLA). Within a
    token's row of the record, experts are ordered by decreasing score, ties to the lower expert.
    The record is gathered from the $(T, E)$ rank matrix by one stable sort per row; no
    $(T, E, C)$ one-hot tensor is formed. $k_\max$ is read as a Python int (eager only).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_choice import expert_choice_routes
    >>> S = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    >>> r = expert_choice_routes(S, 2)
    >>> r.token_index.tolist(), r.experts_per_token.tolist(), r.coverage.tolist()
    ([[[0, 1], [2, 1]]], [1, 2, 1], [0, 2, 1])
    """
    check_float_array(scores, "scores", ndim=2)
    xp = check_arrays({"scores": scores})
    T = scores.shape[0]
    Tg = T if group_size is None else check_positive_int(group_size, "group_size")
    if T % Tg != 0:
        raise ValueError(f"group_size={Tg} must divide the number of tokens T={T}")
    check_positive_int(capacity, "capacity", maximum=Tg)
    return _assign(scores, capacity, Tg, xp).routing


class _Assignment(NamedTuple):
    routing: ExpertChoiceRouting
    columns: Any  # (T, E) per row: the experts that took the token by decreasing score, then the others


def _inverse_rows(order: Any, xp: Any) -> Any:
    """Row-wise inverse of permutations along the last axis: ``inv[..., order[..., i]] = i`` (a sort, no scatter)."""
    return xp.astype(xp.argsort(order, axis=-1, stable=True), xp.int64)


def _assign(scores: Any, C: int, Tg: int, xp: Any) -> _Assignment:
    T, E = scores.shape
    G = T // Tg
    dev = device_of(scores)

    # --- each expert orders its group's tokens: TopK(S^T) over all T_g, then ranks --------------
    per_group = xp.permute_dims(xp.reshape(scores, (G, Tg, E)), (0, 2, 1))  # (G, E, Tg)
    ordered, order = top_k(per_group, Tg, axis=-1)  # (G, E, Tg) best token first, ties lower index
    offset = xp.reshape(xp.arange(G, dtype=xp.int64, device=dev) * Tg, (G, 1, 1))
    token_index = order[..., :C] + offset  # (G, E, C): I, global token rows
    gates = ordered[..., :C]  # (G, E, C): G
    rank = xp.reshape(xp.permute_dims(_inverse_rows(order, xp), (0, 2, 1)), (T, E))  # (T, E)
    kept = rank < C  # (T, E)

    # --- coverage: how many experts took each token ------------------------------------------
    n = xp.sum(xp.astype(kept, xp.int64), axis=1)  # (T,)
    coverage = xp.sum(one_hot(n, E + 1, dtype=xp.int64), axis=0)  # (E+1,)

    # --- the (T, k_max) record: a token's experts by decreasing score, then padding ----------
    sort_key = xp.where(kept, -scores, xp.full_like(scores, math.inf))  # (T, E)
    columns = xp.astype(xp.argsort(sort_key, axis=1, stable=True), xp.int64)  # (T, E)
    k_max = int(xp.max(n))  # >= 1: every expert takes C >= 1 tokens
    col = columns[:, :k_max]  # (T, k_max)
    kept_r = _take_along_axis(kept, col, axis=1)  # (T, k_max)
    zero = xp.zeros((T, k_max), dtype=scores.dtype, device=dev)
    weight = xp.where(kept_r, _take_along_axis(scores, col, axis=1), zero)  # (T, k_max)
    routes = Routes(expert_index=col, weight=weight, kept=kept_r, position=_take_along_axis(rank, col, axis=1))
    return _Assignment(ExpertChoiceRouting(routes, token_index, gates, n, coverage, C), columns)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


def _check(x: Any, params: Any, options: Any) -> tuple[Any, int]:
    check_record_type(params, "params", ExpertChoiceParams)
    check_record_type(options, "options", ExpertChoiceOptions)
    check_record_type(params.experts, "params.experts", ExpertFFNParams)
    named = {"x": x, "params.w_g": params.w_g, "params.b_g": params.b_g}
    named.update({f"params.experts.{f}": getattr(params.experts, f) for f in ExpertFFNParams._fields})
    xp = check_arrays(named)
    check_float_array(x, "x", ndim=2)
    T, d = x.shape
    check_float_array(params.w_g, "params.w_g", ndim=2)
    check_shape(params.w_g, "params.w_g", (d, None), what=f"x has d={d} features")
    E = params.w_g.shape[1]
    if params.b_g is not None:
        check_shape(params.b_g, "params.b_g", (E,), what=f"params.w_g has E={E} columns")
    E_ffn, _, _ = check_expert_ffn_params(params.experts, options.ffn, d=d, name="params.experts")
    if E_ffn != E:
        raise ValueError(f"params.experts has E={E_ffn} experts but params.w_g has E={E} columns (shape (d, E))")
    return xp, E


def _route(x: Any, params: ExpertChoiceParams, options: ExpertChoiceOptions, E: int, xp: Any) -> tuple[Any, _Assignment]:
    T = x.shape[0]
    Tg = T if options.group_size is None else options.group_size
    if T % Tg != 0:
        raise ValueError(f"options.group_size={Tg} must divide the number of tokens T={T}")
    C = expert_choice_capacity(Tg, E, options)
    logits = xp.matmul(x, params.w_g)  # (T, E)
    if params.b_g is not None:
        logits = logits + params.b_g
    S = softmax(logits, axis=1)  # (T, E), eq. (1)
    return S, _assign(S, C, Tg, xp)


def expert_choice_layer(x: Any, params: ExpertChoiceParams, options: ExpertChoiceOptions = ExpertChoiceOptions()) -> ExpertChoiceOutput:
    r"""Expert-choice MoE layer: affinities, each expert's top-$C$ tokens, gated expert outputs summed per token.

    $$S = \operatorname{Softmax}(X W_g), \qquad
    y_t = \sum_{e=1}^{E} [\operatorname{rank}_e(t) < C]\; S[t, e]\; \mathrm{FFN}_e(x_t),$$

    eq. (1) and section 3 of Zhou et al. (2022), "Mixture-of-Experts with Expert Choice
    Routing", NeurIPS 2022, arXiv:2202.09368 (the paper's $X_\text{out} = \sum_{i,j}
    P[i,j,\cdot]\,G[i,j]\,X_e[i,j,\cdot]$ with the permutation $P = \operatorname{one-hot}(I)$).
    $C$ from [`expert_choice_capacity`][moeref.expert_choice.expert_choice_capacity]; the
    assignment from [`expert_choice_routes`][moeref.expert_choice.expert_choice_routes]; the
    experts through [`dispatch_combine`][moeref.dispatch.dispatch_combine].

    Parameters
    ----------
    x : array, shape (T, d)
    params : ExpertChoiceParams
    options : ExpertChoiceOptions

    Returns
    -------
    ExpertChoiceOutput

    Raises
    ------
    ValueError
        Shapes that do not match, a group size that does not divide $T$, a capacity below 1 or
        above the group size, a non-integer capacity under the ``"paper"`` rule, NaN input.
    TypeError
        Records of the wrong type, non-float arrays, mixed libraries.

    Notes
    -----
    **Not causal.** A token's output depends on every other token of its group (they compete for
    the experts' slots), so the layer must not be used in an autoregressive decoder (flaxformer's
    ``ExpertsChooseMaskedRouter`` docstring says the same).

    No auxiliary loss: every expert is full by construction. The paper's variant that caps the
    number of experts per token (section 3, an entropy-regularised linear program) is not
    implemented. Runs eagerly (block sizes are Python ints), not under ``jax.jit``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_choice import ExpertChoiceOptions, ExpertChoiceParams, expert_choice_layer
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    >>> experts = ExpertFFNParams(w_in=np.stack([np.eye(2)] * 2), w_out=np.stack([np.eye(2), 2 * np.eye(2)]))
    >>> params = ExpertChoiceParams(w_g=np.array([[1.0, -1.0], [-1.0, 1.0]]), experts=experts)
    >>> out = expert_choice_layer(x, params, ExpertChoiceOptions(capacity_factor=1.0, min_capacity=0, ffn=RELU_FFN))
    >>> out.routing.token_index.tolist(), out.routing.coverage.tolist()
    ([[[3, 0], [1, 2]]], [0, 4, 0])
    """
    xp, E = _check(x, params, options)
    S, assignment = _route(x, params, options, E, xp)
    y = dispatch_combine(x, assignment.routing.routes, params.experts, options.ffn)  # (T, d)
    return ExpertChoiceOutput(y=y, scores=S, routing=assignment.routing)


def expert_choice_layer_vjp(x: Any, params: ExpertChoiceParams, options: ExpertChoiceOptions, cotangent: Any) -> ExpertChoiceGrads:
    r"""VJP of [`expert_choice_layer`][moeref.expert_choice.expert_choice_layer] w.r.t. ``x``, $W_g$, $b_g$ and the experts.

    With the selection (which expert took which token) held fixed, $z = XW_g + b_g$ and the kept
    pairs $\mathcal K = \{(t, e): \operatorname{rank}_e(t) < C\}$:

    $$\bar S_{te} = [(t,e) \in \mathcal K]\,\langle \bar y_t, \mathrm{FFN}_e(x_t)\rangle, \qquad
    \bar z_t = S_t \odot \big(\bar S_t - \langle S_t, \bar S_t\rangle\big),$$

    $$\bar W_g = X^\top \bar z, \qquad \bar b_g = \textstyle\sum_t \bar z_t, \qquad
    \bar x_t = \sum_{e:\ (t,e) \in \mathcal K} S_{te}\, J_{\mathrm{FFN}_e}(x_t)^\top \bar y_t + \bar z_t W_g^\top .$$

    The expert part ($\bar x$ through the FFNs, $\bar\theta_e$, and $\bar w$ of the record) is
    [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp]; $\bar w$ goes back from the
    $(T, k_\max)$ record to the $(T, E)$ grid by a gather through each row's inverse sort.

    Parameters
    ----------
    x, params, options
        As in the forward.
    cotangent : array, shape (T, d)

    Returns
    -------
    ExpertChoiceGrads

    Notes
    -----
    At a tie between the $C$-th and $(C{+}1)$-th token of an expert the layer is discontinuous;
    this is the derivative with the forward's selection.
    """
    xp, E = _check(x, params, options)
    check_cotangent(cotangent, tuple(x.shape), like=x, what="the layer output, (T, d)")
    check_arrays({"x": x, "cotangent": cotangent})
    S, assignment = _route(x, params, options, E, xp)
    routes = assignment.routing.routes
    g = dispatch_combine_vjp(x, routes, params.experts, options.ffn, cotangent)
    T, k_max = routes.expert_index.shape

    # w_bar (T, k_max) back to S_bar (T, E): pad each row to all E columns and undo its sort
    w_bar = xp.where(routes.kept, g.routes.weight, xp.zeros_like(g.routes.weight))  # (T, k_max)
    w_bar = xp.concat([w_bar, xp.zeros((T, E - k_max), dtype=x.dtype, device=device_of(x))], axis=1)  # (T, E)
    S_bar = _take_along_axis(w_bar, _inverse_rows(assignment.columns, xp), axis=1)  # (T, E)

    z_bar = softmax_vjp(S, S_bar, axis=1)  # (T, E)
    W_bar = xp.matmul(xp.matrix_transpose(x), z_bar)  # (d, E)
    b_bar = None if params.b_g is None else xp.sum(z_bar, axis=0)  # (E,)
    x_bar = g.x + xp.matmul(z_bar, xp.matrix_transpose(params.w_g))  # (T, d)
    return ExpertChoiceGrads(x=x_bar, params=ExpertChoiceParams(w_g=W_bar, experts=g.experts, b_g=b_bar))


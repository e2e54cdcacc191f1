r"""Expert capacity: how many routes each expert accepts, and which routes are dropped first.

Token-choice routing sends route $(t, j)$ of token $t$ to expert $e_{tj}$. Systems that run
experts on fixed-size buffers give each expert a **capacity** $C$ per routing group; when more
than $C$ routes choose an expert, the routes that come last in a **priority order** are dropped
(their weight becomes 0 and the token's output falls back to the residual). This module
computes $C$ under the rounding conventions of each system
([`expert_capacity`][moeref.capacity.expert_capacity]) and applies it
([`apply_capacity`][moeref.capacity.apply_capacity]).

Slots are computed without a $(T, E, C)$ one-hot tensor: the $Tk$ routes are stably sorted by
(group, expert, priority), the slot of a route is its index in the sorted order minus the start
of its (group, expert) segment (found with ``searchsorted``), and slots are gathered back to
route order through the inverse permutation.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

from .core import device_of, _inverse_permutation, _stable_argsort_small_ints
from .routes import Routes, check_routes
from .validation import (
    check_arrays,
    check_choice,
    check_finite,
    check_float_array,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "CapacityOptions",
    "CapacityDraws",
    "CapacityReport",
    "CapacityResult",
    "expert_capacity",
    "apply_capacity",
    "ROUNDINGS",
    "K_FACTORS",
    "ARITHMETICS",
    "PRIORITIES",
    "PRIORITY_VALUES",
]

ROUNDINGS = ("ceil", "floor", "round_half_even")
K_FACTORS = ("inside", "outside", "none")
ARITHMETICS = ("exact", "python_float", "python_float_quotient_first", "deepspeed_float32")
PRIORITIES = ("rank_major", "token_major", "batch_prioritized", "score", "random")
PRIORITY_VALUES = ("weights", "router_scores")


@dataclass(frozen=True)
class CapacityOptions:
    r"""How capacity is computed and who is dropped first.

    With $T_g$ tokens per routing group, $E$ experts, $k$ routes per token and capacity factor
    $c$, the capacity is

    $$C = \operatorname{multiple}_m\Big(\max\big(C_\text{min},\ \min(T_g,\ \kappa\,
    \operatorname{round}(c\, T_g\, k' / E))\big)\Big),$$

    where $k' = k$, $\kappa = 1$ for ``k_factor="inside"``; $k' = 1$, $\kappa = k$ for
    ``"outside"``; $k' = \kappa = 1$ for ``"none"``; the $\min(T_g, \cdot)$ applies only with
    ``clip_to_group_size``; and $\operatorname{multiple}_m$ rounds up to a multiple of $m$.
    How the product $c\,T_g k'/E$ is evaluated before the rounding is ``arithmetic``: exactly
    (as a rational number of the float $c$; the default, never off by one from floating-point
    error) or in the floating-point order of a system. See
    [`expert_capacity`][moeref.capacity.expert_capacity] for which system uses which formula.

    Attributes
    ----------
    capacity : int or None
        A fixed capacity per expert and group (HF ``SwitchTransformersTop1Router``
        ``expert_capacity``). Needs ``capacity_factor=None``.
    capacity_factor : float or None
        $c > 0$ (Switch / GShard / DeepSpeed / flaxformer / V-MoE / Megablocks
        ``capacity_factor``). Ignored with ``dropless=True``, where it must still be None or a
        finite number $\ge 0$ (NaN and negative factors are refused whatever the mode).
    rounding : str
        ``"ceil"`` (DeepSpeed ``_capacity``, V-MoE default, fairseq), ``"floor"`` (Mesh-TF
        ``int(...)``, Megablocks ``int(...)``) or ``"round_half_even"`` (flaxformer ``round``,
        V-MoE ``capacity_ceil_or_round="round"``; Python's ``round`` rounds half to even).
    k_factor : str
        Where $k$ enters: ``"inside"``, $\operatorname{round}(c\,k\,T_g/E)$ (DeepSpeed top-2 and
        top-k ``capacity_factor * k``, V-MoE ``group_size * num_selected_experts``, Megablocks);
        ``"outside"``, $k \operatorname{round}(c\,T_g/E)$ (fairseq top-2:
        ``2 * math.ceil(num_tokens / num_experts)``); ``"none"``, $\operatorname{round}(c\,T_g/E)$
        (Switch / Mesh-TF / flaxformer: capacity counts tokens per expert, $k = 1$ there or
        absorbed into $c$).
    min_capacity : int
        $C_\text{min}$ (DeepSpeed ``min_capacity``, default 8 in ``TopKGate``; Mesh-TF 4;
        flaxformer ``min_expert_capacity``, default 4). 0 for none.
    multiple_of : int
        Round $C$ up to a multiple of this (V-MoE ``capacity_multiple_of``, default 4). 1 for
        none.
    arithmetic : str
        How $v = c\,T_g k'/E$ is evaluated before the rounding, with $n = T_g k'$ (an integer):

        * ``"exact"`` (default): $v = c\,n/E$ as a rational number of the float $c$, the
          value the formulas state;
        * ``"python_float"``: Python floats (IEEE float64) in the order ``c * n / E``, i.e.
          $\mathrm{fl}_{64}(\mathrm{fl}_{64}(c\,n)/E)$: flaxformer ``moe_layers.py``
          (``round(capacity_factor * tokens_per_group / num_experts)``), Mesh-TF ``moe.py``
          (``int((S * capacity_factor) / E)``), V-MoE ``moe.py`` ``compute_capacity``
          (``ceil(num_tokens * capacity_factor / num_experts)`` with ``num_tokens = S * K``),
          fairseq ``top2gate.py`` (``ceil(num_tokens / num_experts)``, $c = 1$);
        * ``"python_float_quotient_first"``: float64 in the order ``c * (n / E)``, i.e.
          $\mathrm{fl}_{64}(c\cdot\mathrm{fl}_{64}(n/E))$: Megablocks ``layers/moe.py``
          ``expert_capacity`` (``int(moe_capacity_factor * (top_k * tokens / num_experts))``);
        * ``"deepspeed_float32"``: DeepSpeed ``sharded_moe.py`` ``_capacity``,
          ``ceil((T / E) * capacity_factor)`` with ``capacity_factor`` a float32 tensor of
          ``c * k`` (``top2gating``: ``c * 2``, ``topkgating``: ``c * k``), so
          $v = \mathrm{fl}_{32}\big(\mathrm{fl}_{32}(T_g/E)\cdot\mathrm{fl}_{32}(c\,k')\big)$.

        They differ only where $c\,n/E$ lies within rounding error of an integer (or, for
        ``"round_half_even"``, of a half): DeepSpeed's float32 gives
        $\lceil 10/2 \cdot 1.1 \cdot 2\rceil = 11$ where the exact value for the double
        $1.1$ (slightly above $11/10$) rounds up to 12.
    clip_to_group_size : bool
        $C \leftarrow \min(T_g, C)$ before the minimum (Mesh-TF ``min(s.size, ...)``).
    zero_capacity_means_dropless : bool
        A computed capacity of 0 means "no limit" (Megablocks ``forward_once``: ``if
        expert_capacity == 0: expert_capacity = max(tokens_per_expert)``).
    dropless : bool
        Never drop (Megablocks dMoE, DeepSpeed ``drop_tokens=False``, Mixtral, DeepSeek-V3,
        Qwen2-MoE, OLMoE, DBRX and every HF inference implementation). The other capacity fields
        are ignored; the reported capacity is the largest per-expert count.
    group_size : int or None
        Tokens per routing group $T_g$ (flaxformer / Mesh-TF ``group_size``, V-MoE group size,
        one sequence per group for per-sequence routing). Must divide $T$. ``None``: one group of
        all $T$ tokens (DeepSpeed, fairseq, Megablocks: all tokens of the local batch).
    priority : str
        Order in which routes of one (group, expert) claim slots; the first $C$ are kept:

        * ``"rank_major"``: every rank-0 route in token order, then every rank-1 route, ...
          (GShard / Mesh-TF ``position_in_expert_2 += mask_1_count``, DeepSpeed top-2, fairseq,
          flaxformer, V-MoE, HF Switch for $k = 1$);
        * ``"token_major"``: token order over all $k$ routes of a token,
          $(t, j) \prec (t', j')$ iff $tk + j < t'k + j'$ (Megablocks' stable sort of the
          flattened ``(T, k)`` expert ids; DeepSpeed ``topkgating`` ``drop_policy="position"``);
        * ``"batch_prioritized"``: rank-major, with tokens ordered by their top-1 weight,
          descending, ties by token index (V-MoE "Batch Prioritized Routing", Riquelme et al.
          2021, Sec. 4; flaxformer and fairseq ``batch_prioritized_routing``);
        * ``"score"``: by the route's own weight, descending, ties in token-major order
          (DeepSpeed ``topkgating`` ``drop_policy="probs"``);
        * ``"random"``: by an explicit uniform draw per route, descending (DeepSpeed top-1
          "Random Token Selection", ``use_rts=True``).
    priority_values : str
        What ``"batch_prioritized"`` and ``"score"`` order by: ``"weights"`` (default), the
        route weights as they enter the capacity step (``routes.weight``: already normalised
        when the router normalises before capacity); ``"router_scores"``, the router's score
        of the route before any normalisation or scaling (the layer passes
        $s_{t,e_{tj}}$ from [`RouterOutput`][moeref.router.RouterOutput]; a direct call of
        [`apply_capacity`][moeref.capacity.apply_capacity] must pass them as ``priority``).
        fairseq ``top2gating`` sorts by ``gates.max(dim=1)``, the raw softmax top-1
        probability, also with ``normalize_gate_prob_before_dropping=True``:
        ``"router_scores"``. V-MoE, flaxformer (``TokensChooseMaskedRouter``) and DeepSpeed
        ``topkgating`` (``drop_policy="probs"``) do not normalise before the capacity step, so
        both values agree there.
    dropped_routes_take_slots : bool
        Whether a route that arrives already dropped (``routes.kept`` False, e.g. by the
        second-expert policy's coin) still takes its slot in the priority order, pushing the
        routes behind it back. False (default): Mesh-TF ``_top_2_gating`` (``mask_2`` is
        zeroed by the policy before ``position_in_expert_2`` is counted), fairseq
        ``top2gating`` (``mask2 * sampled`` before ``locations2``), DeepSpeed. True: the
        GShard paper's Algorithm 1 (Lepikhin et al. 2020, arXiv:2006.16668), whose
        second-choice loop increments the expert's counter $c_{e_2}$ whether or not the
        random coin kept the route.
    """

    capacity: int | None = None
    capacity_factor: float | None = 1.0
    rounding: str = "ceil"
    k_factor: str = "inside"
    min_capacity: int = 0
    multiple_of: int = 1
    arithmetic: str = "exact"
    clip_to_group_size: bool = False
    zero_capacity_means_dropless: bool = False
    dropless: bool = False
    group_size: int | None = None
    priority: str = "rank_major"
    priority_values: str = "weights"
    dropped_routes_take_slots: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dropless, bool):
            raise TypeError(f"options.dropless must be a bool, got {self.dropless!r}")
        if self.dropless:
            _check_ignored_capacity(self.capacity, self.capacity_factor)
        else:
            if self.capacity is not None:
                check_positive_int(self.capacity, "options.capacity", minimum=0)
                if self.capacity_factor is not None:
                    raise ValueError("options.capacity_factor must be None when a fixed options.capacity is given")
            else:
                cf = self.capacity_factor
                if cf is None:
                    raise ValueError("options needs a capacity_factor, a fixed capacity, or dropless=True")
                if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0:
                    raise ValueError(f"options.capacity_factor must be a finite positive number (or use dropless=True), got {cf!r}")
        check_choice(self.rounding, "options.rounding", ROUNDINGS)
        check_choice(self.k_factor, "options.k_factor", K_FACTORS)
        check_positive_int(self.min_capacity, "options.min_capacity", minimum=0)
        check_positive_int(self.multiple_of, "options.multiple_of")
        check_choice(self.arithmetic, "options.arithmetic", ARITHMETICS)
        if self.group_size is not None:
            check_positive_int(self.group_size, "options.group_size")
        check_choice(self.priority, "options.priority", PRIORITIES)
        check_choice(self.priority_values, "options.priority_values", PRIORITY_VALUES)
        if not isinstance(self.dropped_routes_take_slots, bool):
            raise TypeError(f"options.dropped_routes_take_slots must be a bool, got {self.dropped_routes_take_slots!r}")


def _check_ignored_capacity(capacity: Any, capacity_factor: Any) -> None:
    """With ``dropless=True`` the capacity fields are ignored, but they must still be meaningful values."""
    if capacity is not None:
        check_positive_int(capacity, "options.capacity", minimum=0)
    cf = capacity_factor
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf < 0):
        raise ValueError(
            f"options.capacity_factor must be None or a finite number >= 0, got {cf!r} "
            "(ignored with dropless=True, but a NaN or negative factor is still refused)"
        )


class CapacityDraws(NamedTuple):
    """Explicit random draws for ``priority="random"``.

    Attributes
    ----------
    uniform : array, shape (T, k)
        One uniform draw in $[0, 1)$ per route; larger draws are served first (DeepSpeed's
        ``mask1 * uniform(...)`` then ``topk`` over tokens).
    """

    uniform: Any


class CapacityReport(NamedTuple):
    """Per-group, per-expert load before and after dropping.

    Attributes
    ----------
    counts_before : int64 array, shape (G, E)
        Live routes (``kept`` on input) that chose each expert, per group.
    counts_after : int64 array, shape (G, E)
        Routes kept after the capacity limit: ``minimum(counts_before, capacity)``.
    capacity : int
        $C$ (for ``dropless``: the largest entry of ``counts_before``).
    """

    counts_before: Any
    counts_after: Any
    capacity: int


class CapacityResult(NamedTuple):
    """``(routes, report)`` returned by [`apply_capacity`][moeref.capacity.apply_capacity]."""

    routes: Routes
    report: CapacityReport


def _round(value: Fraction | float, rounding: str) -> int:
    if rounding == "ceil":
        return math.ceil(value)
    if rounding == "floor":
        return math.floor(value)
    return round(value)  # Fraction.__round__ and float.__round__: half to even


def _float32(value: float) -> float:
    """Round a Python float to the nearest IEEE float32 (what ``torch.tensor(value)`` stores)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _capacity_value(tokens: int, k_in: int, num_experts: int, cf: float, arithmetic: str) -> Fraction | float:
    r"""$c\,T_g k'/E$ evaluated as ``arithmetic`` says (see ``CapacityOptions.arithmetic``)."""
    n = tokens * k_in  # an exact integer in every system
    if arithmetic == "exact":
        return Fraction(cf) * n / num_experts
    if arithmetic == "python_float":
        return float(cf) * n / num_experts  # (c * n) / E, left to right
    if arithmetic == "python_float_quotient_first":
        return float(cf) * (n / num_experts)
    # DeepSpeed _capacity: (T / E) as a Python float times the float32 tensor c * k, in float32
    return _float32(_float32(tokens / num_experts) * _float32(float(cf) * k_in))


def expert_capacity(tokens_per_group: int, num_experts: int, k: int, options: CapacityOptions) -> int | None:
    r"""The capacity $C$ of each expert in one routing group, or ``None`` when there is no limit.

    $$C = \operatorname{multiple}_m\Big(\max\big(C_\text{min},\ \min(T_g,\ \kappa\,
    \operatorname{round}(c\, T_g\, k' / E))\big)\Big)$$

    (see [`CapacityOptions`][moeref.capacity.CapacityOptions] for $k'$, $\kappa$, the clip and
    $m$). The formulas of the systems read:

    | system (file) | options |
    |---|---|
    | Switch Transformer, HF ``modeling_switch_transformers.py`` | fixed ``capacity`` |
    | flaxformer ``moe_layers.py``: ``max(int(round(cf * T_g / E)), min_expert_capacity)`` | ``rounding="round_half_even"``, ``k_factor="none"``, ``min_capacity=4``, ``arithmetic="python_float"`` |
    | Mesh-TF ``moe.py``: ``min(S, int(S * cf / E))`` (``transformer_moe_layer_v1``; v2 adds ``max(..., 4)``) | ``rounding="floor"``, ``k_factor="none"``, ``clip_to_group_size=True``, ``arithmetic="python_float"`` (``min_capacity=4`` for v2) |
    | DeepSpeed ``sharded_moe.py`` ``_capacity``: ``ceil(T / E * cf)`` in float32, top-k with ``cf * k``, ``min_capacity`` | ``rounding="ceil"``, ``k_factor="none"`` (top-1) or ``"inside"`` (top-2 / top-k), ``min_capacity``, ``arithmetic="deepspeed_float32"`` |
    | fairseq ``top2gate.py``: ``2 * ceil(T / E)`` | ``capacity_factor=1``, ``rounding="ceil"``, ``k_factor="outside"``, ``arithmetic="python_float"`` |
    | V-MoE ``moe.py`` ``compute_capacity``: ``ceil(T_g * k * cf / E)`` up to a multiple of 4 | ``rounding="ceil"`` (or ``"round_half_even"``), ``k_factor="inside"``, ``multiple_of=4``, ``arithmetic="python_float"`` |
    | Megablocks ``moe.py`` ``expert_capacity``: ``int(cf * (k * T / E))``, 0 = dropless | ``rounding="floor"``, ``k_factor="inside"``, ``zero_capacity_means_dropless=True``, ``arithmetic="python_float_quotient_first"`` |

    Parameters
    ----------
    tokens_per_group : int
        $T_g$.
    num_experts : int
        $E$.
    k : int
        Routes per token.
    options : CapacityOptions

    Returns
    -------
    int or None
        ``None`` for ``dropless`` (and for a zero capacity with ``zero_capacity_means_dropless``).

    Notes
    -----
    With ``arithmetic="exact"`` the product is exact: ``capacity_factor=1.1``, $n = 20$, $E = 2$
    gives $\lceil 1.1 \cdot 20/2\rceil = 12$ (the double nearest 1.1 is slightly above
    11/10), while ``1.1 * 20 / 2`` in Python floats is exactly 11.0. The two float orders differ
    too: ``1.1 * 90 / 3`` is ``33.00000000000001`` (ceil 34) and ``1.1 * (90 / 3)`` is ``33.0``.
    The float modes reproduce each system's value bit for bit, off-by-one results next to an
    integer included.

    Examples
    --------
    >>> from moeref.capacity import CapacityOptions, expert_capacity
    >>> expert_capacity(16, 4, 2, CapacityOptions(capacity_factor=1.25))  # ceil(1.25 * 2 * 16 / 4)
    10
    >>> expert_capacity(16, 4, 2, CapacityOptions(capacity_factor=1.0, k_factor="outside"))  # fairseq top-2
    8
    >>> [expert_capacity(10, 2, 2, CapacityOptions(capacity_factor=1.1, arithmetic=a)) for a in ("exact", "deepspeed_float32")]
    [12, 11]
    """
    check_positive_int(tokens_per_group, "tokens_per_group")
    check_positive_int(num_experts, "num_experts")
    check_positive_int(k, "k")
    check_record_type(options, "options", CapacityOptions)
    if options.dropless:
        return None
    if options.capacity is not None:
        return options.capacity
    k_in = k if options.k_factor == "inside" else 1
    kappa = k if options.k_factor == "outside" else 1
    value = _capacity_value(tokens_per_group, k_in, num_experts, options.capacity_factor, options.arithmetic)
    c = kappa * _round(value, options.rounding)
    if c == 0 and options.zero_capacity_means_dropless:
        return None
    if options.clip_to_group_size:
        c = min(tokens_per_group, c)
    c = max(options.min_capacity, c)
    m = options.multiple_of
    return -(-c // m) * m


def _check_routes(routes: Routes, num_experts: int) -> tuple[Any, int, int]:
    xp = check_routes(routes)
    check_positive_int(num_experts, "num_experts")
    check_float_array(routes.weight, "routes.weight", ndim=2)
    T, k = routes.weight.shape
    for name in ("expert_index", "kept", "position"):
        check_shape(getattr(routes, name), f"routes.{name}", (T, k), what=f"routes.weight has T={T} tokens, k={k} routes each")
    if not xp.isdtype(routes.expert_index.dtype, "integral"):
        raise TypeError(f"routes.expert_index must be an integer array, got {routes.expert_index.dtype}")
    if not xp.isdtype(routes.position.dtype, "integral"):
        raise TypeError(f"routes.position must be an integer array, got {routes.position.dtype}")
    if routes.kept.dtype != xp.bool:
        raise TypeError(f"routes.kept must be a bool array, got {routes.kept.dtype}")
    e = routes.expert_index
    if T * k > 0 and concrete_bool(xp.all((e >= 0) & (e < num_experts))) is False:
        raise ValueError(f"routes.expert_index must lie in [0, num_experts) = [0, {num_experts})")
    check_finite(routes.weight, "routes.weight")
    return xp, T, k


def apply_capacity(
    routes: Routes,
    num_experts: int,
    options: CapacityOptions = CapacityOptions(),
    *,
    priority: Any = None,
    draws: CapacityDraws | None = None,
) -> CapacityResult:
    r"""Assign every route a slot in its expert's buffer and drop the routes beyond capacity.

    Within each routing group $g$ and expert $e$, the live routes that chose $e$ are ranked in
    the priority order $\prec$ of ``options.priority``; route $r$'s slot is

    $$p_r = \#\{r' \text{ live}:\ \mathrm{group}(r') = \mathrm{group}(r),\ e_{r'} = e_r,\
    r' \prec r\},$$

    and it is kept iff it was live and $p_r < C$. Dropped routes get weight 0. Live means
    ``routes.kept`` on input: a route already dropped (e.g. by a second-expert policy) never
    takes a slot; its position is counted after every live route of its expert. With
    ``options.dropped_routes_take_slots`` (the GShard paper's Algorithm 1) the count runs over
    every route, dropped or not, so a dropped route still occupies its slot.

    Capacity and priority rules: Lepikhin et al. (2020), "GShard", arXiv:2006.16668,
    Algorithm 1 (top-2 with capacity, rank-major); Fedus, Zoph & Shazeer (2021), "Switch
    Transformers", arXiv:2101.03961, eq. (3) (expert capacity); Riquelme et al. (2021),
    "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021, arXiv:2106.05974, Sec. 4
    (Batch Prioritized Routing); Gale et al. (2023), "MegaBlocks", MLSys 2023, arXiv:2211.15841
    (dropless). The per-system options are on
    [`CapacityOptions`][moeref.capacity.CapacityOptions] and
    [`expert_capacity`][moeref.capacity.expert_capacity].

    Parameters
    ----------
    routes : Routes
        From the router, shape (T, k) each.
    num_experts : int
        $E$.
    options : CapacityOptions
    priority : array, optional
        Overrides the values the order is taken from: shape (T,) for ``"batch_prioritized"``
        (default ``routes.weight[:, 0]``; pass e.g. the router's unnormalised top-1 probability),
        shape (T, k) for ``"score"`` (default ``routes.weight``). Required by those two with
        ``options.priority_values="router_scores"``; not accepted by the other priorities.
    draws : CapacityDraws, optional
        Required for ``priority="random"`` (and rejected otherwise).

    Returns
    -------
    CapacityResult
        ``routes`` with ``position`` set, ``kept`` and ``weight`` updated; ``report`` with the
        per-group loads and $C$.

    Notes
    -----
    Ties in a priority value are broken by token-major order (lower $tk + j$ first), on every
    backend (stable sorts only). The slot order is the priority order; systems that lay the
    kept routes out in token order instead (DeepSpeed's random token selection) differ only in
    the slot numbering, not in which routes are kept.

    Examples
    --------
    Four tokens all choose expert 0; with capacity 2 the last two are dropped:

    >>> import numpy as np
    >>> from moeref.capacity import CapacityOptions, apply_capacity
    >>> from moeref.routes import Routes
    >>> r = Routes(np.zeros((4, 1), dtype=np.int64), np.ones((4, 1)), np.ones((4, 1), dtype=bool), np.zeros((4, 1), dtype=np.int64))
    >>> out, report = apply_capacity(r, 2, CapacityOptions(capacity=2, capacity_factor=None))
    >>> out.kept[:, 0].tolist(), out.position[:, 0].tolist(), report.counts_after.tolist()
    ([True, True, False, False], [0, 1, 2, 3], [[2, 0]])
    """
    check_record_type(options, "options", CapacityOptions)
    xp, T, k = _check_routes(routes, num_experts)
    E = num_experts
    dev = device_of(routes.weight)
    Tg = T if options.group_size is None else options.group_size
    if T % Tg != 0:
        raise ValueError(f"options.group_size={Tg} must divide the number of tokens T={T}")
    G = T // Tg
    N = T * k

    # --- the priority order of all routes (ties: token-major n = t*k + j) -----------------
    order_name = options.priority
    if priority is not None and order_name not in ("batch_prioritized", "score"):
        raise ValueError(f"priority values are read only by options.priority='batch_prioritized' or 'score', not {order_name!r}")
    if priority is None and order_name in ("batch_prioritized", "score") and options.priority_values == "router_scores":
        raise ValueError(
            f"options.priority_values='router_scores' needs the router's scores of the routes as priority= "
            f"(shape {(T,) if order_name == 'batch_prioritized' else (T, k)}); sparse_moe_layer passes them"
        )
    if (draws is not None) != (order_name == "random"):
        raise ValueError("draws (CapacityDraws) are required for options.priority='random' and accepted only there")
    flat_ids = xp.arange(N, dtype=xp.int64, device=dev)  # n = t*k + j
    if order_name == "token_major":
        pre_order = flat_ids
    elif order_name == "rank_major":
        pre_order = xp.reshape(xp.matrix_transpose(xp.reshape(flat_ids, (T, k))), (N,))  # (k*T,)
    elif order_name == "batch_prioritized":
        top1 = routes.weight[:, 0] if priority is None else priority
        if priority is not None:
            check_arrays({"priority": priority, "routes.weight": routes.weight})
            check_shape(priority, "priority", (T,), what="one top-1 value per token for batch_prioritized routing")
        token_order = xp.astype(xp.argsort(-top1, stable=True), xp.int64)  # (T,) best token first
        by_rank = token_order[None, :] * k + xp.arange(k, dtype=xp.int64, device=dev)[:, None]  # (k, T)
        pre_order = xp.reshape(by_rank, (N,))
    else:
        if order_name == "score":
            values = routes.weight if priority is None else priority
            if priority is not None:
                check_arrays({"priority": priority, "routes.weight": routes.weight})
                check_shape(priority, "priority", (T, k), what="one value per route for score priority")
        else:
            check_record_type(draws, "draws", CapacityDraws)
            values = draws.uniform
            check_arrays({"draws.uniform": values, "routes.weight": routes.weight})
            check_shape(values, "draws.uniform", (T, k), what="one uniform draw per route")
            if concrete_bool(xp.all((values >= 0) & (values < 1))) is False:
                raise ValueError("draws.uniform must lie in [0, 1)")
        pre_order = xp.astype(xp.argsort(-xp.reshape(values, (N,)), stable=True), xp.int64)  # (N,)

    # --- segment key (group, expert, dead), stable sort after the priority order ---------
    group = xp.reshape(xp.broadcast_to((xp.arange(T, dtype=xp.int64, device=dev) // Tg)[:, None], (T, k)), (N,))  # (N,)
    expert = xp.reshape(xp.astype(routes.expert_index, xp.int64), (N,))  # (N,)
    live = xp.reshape(routes.kept, (N,))  # (N,) False = dropped before capacity
    # a route dropped before capacity sorts after the live ones of its segment, unless it keeps its slot
    dead = xp.zeros((N,), dtype=xp.int64, device=dev) if options.dropped_routes_take_slots else xp.astype(~live, xp.int64)
    segment = (group * E + expert) * 2 + dead  # (N,)
    seg_in_priority = xp.take(segment, pre_order, axis=0)
    order = xp.take(pre_order, _stable_argsort_small_ints(seg_in_priority, 2 * G * E), axis=0)  # (N,)
    sorted_seg = xp.take(segment, order, axis=0)  # (N,) ascending
    seg_start = xp.searchsorted(sorted_seg, (sorted_seg // 2) * 2, side="left")  # first route of (group, expert)
    slot_sorted = xp.arange(N, dtype=xp.int64, device=dev) - xp.astype(seg_start, xp.int64)  # (N,)
    position = xp.reshape(xp.take(slot_sorted, _inverse_permutation(order), axis=0), (T, k))  # (T, k)

    # --- loads and capacity ------------------------------------------------------------
    grid = xp.arange(G * E, dtype=xp.int64, device=dev) * 2  # live segment of each (group, expert)
    left = xp.searchsorted(sorted_seg, grid, side="left")
    right = xp.searchsorted(sorted_seg, grid, side="right")
    C = expert_capacity(Tg, E, k, options)
    if options.dropped_routes_take_slots:
        # segments hold dead routes too: count the live ones with a prefix sum in sorted order
        live_prefix = xp.cumulative_sum(xp.astype(xp.take(live, order, axis=0), xp.int64), include_initial=True)  # (N+1,)
        counts_before = xp.reshape(xp.take(live_prefix, right, axis=0) - xp.take(live_prefix, left, axis=0), (G, E))  # (G, E)
    else:
        counts_before = xp.reshape(xp.astype(right - left, xp.int64), (G, E))  # (G, E)
    if C is None:
        C = int(xp.max(counts_before)) if G * E > 0 else 0
        kept = routes.kept
        counts_after = counts_before
    else:
        kept = routes.kept & (position < C)
        if options.dropped_routes_take_slots:
            first_c = xp.minimum(left + C, right)  # end of each segment's first C slots
            counts_after = xp.reshape(xp.take(live_prefix, first_c, axis=0) - xp.take(live_prefix, left, axis=0), (G, E))  # (G, E)
        else:
            counts_after = xp.minimum(counts_before, xp.full_like(counts_before, C))
    weight = xp.where(kept, routes.weight, xp.zeros_like(routes.weight))
    new_routes = Routes(expert_index=routes.expert_index, weight=weight, kept=kept, position=position)
    return CapacityResult(new_routes, CapacityReport(counts_before, counts_after, C))

r"""Balanced assignment of $T$ tokens to $E$ experts, exactly $T/E$ each, by an auction algorithm.

The routing problem of BASE layers (Lewis, Bhosale, Dettmers, Goyal & Zettlemoyer 2021, "BASE
Layers: Simplifying Training of Large, Sparse Models", ICML, arXiv:2103.16716) is the linear
program

$$\max_{\sigma}\ \sum_{t=1}^{T} a_{t\sigma(t)}
\quad\text{subject to}\quad |\{t : \sigma(t) = e\}| = C = T/E \ \text{ for every expert } e,$$

an assignment problem in which each expert is $C$ identical *slots* (a transportation problem with
unit supplies and equal demands). [`balanced_assignment`][moeref.balanced_assignment.balanced_assignment]
solves it with Bertsekas' auction algorithm with $\varepsilon$-scaling (D. P. Bertsekas 1988,
"The auction algorithm: a distributed relaxation method for the assignment problem", Annals of
Operations Research 14, 105-123; the transportation form: D. P. Bertsekas & D. A. Castañon 1989,
"The auction algorithm for the transportation problem", Annals of Operations Research 20, 67-96),
written in array-API code: every round is a handful of sorts and gathers over all tokens at
once; Python loops run over rounds and $\varepsilon$ phases only.

**Optimality certificate.** With expert prices $\lambda_e$ (the lowest slot price of $e$), the dual
bound $U(\lambda) = \sum_t \max_e (a_{te} - \lambda_e) + C\sum_e \lambda_e$ is at least the optimal
value for any $\lambda$, and the auction stops at an assignment whose value is at least
$U(\lambda) - T\varepsilon$. The returned prices let a caller check both inequalities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .core import _inverse_permutation, _take_along_axis, array_namespace, device_of, top_k
from .validation import (
    check_array,
    check_arrays,
    check_float_array,
    check_index_range,
    check_int_array,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "AuctionOptions",
    "BalancedAssignment",
    "balanced_assignment",
    "assignment_value",
    "dual_bound",
    "positions_in_expert",
]


@dataclass(frozen=True)
class AuctionOptions:
    r"""The $\varepsilon$ schedule and the round budget of the auction.

    Attributes
    ----------
    epsilon : float or None
        The final $\varepsilon > 0$: the returned assignment's total affinity is within
        $T\varepsilon$ of the optimum. With integer affinities and $\varepsilon < 1/T$ the
        assignment is exactly optimal. ``None`` (default):
        $\varepsilon = (\max a - \min a)/(10^6\, T)$, so the total is within $10^{-6}$ of the
        affinity range of the optimum. Either way $\varepsilon$ is raised to the floor
        $4096\,\epsilon_{\text{mach}} \max(|a|_\infty, \max a - \min a)$ below which price
        increments would be lost in rounding (an explicit ``epsilon`` below it is an error).
    epsilon_start : float or None
        $\varepsilon$ of the first phase; ``None``: half the affinity range (at least the final
        $\varepsilon$).
    scaling : float
        $\theta > 1$: each phase divides $\varepsilon$ by $\theta$ until it reaches the final value.
        Default 64: on Gaussian affinities it needed the fewest rounds of 2, 4, 8, 16, 64 (e.g.
        $T = 2048$, $E = 8$: 7997 rounds with $\theta = 4$, 2679 with 16, 1959 with 64).
        fairseq's BASE kernel (`fairseq/clib/libbase/balanced_assignment.cpp`) uses no
        scaling: one fixed $\varepsilon = \max(\mathrm{range}/50, 10^{-4})$ and at most 100
        exact rounds before an approximate finish, so its result is not certified optimal.
    max_rounds : int
        Budget of bidding rounds over all phases; exceeding it raises ``RuntimeError`` (it
        cannot happen for finite input within the bound documented on
        [`balanced_assignment`][moeref.balanced_assignment.balanced_assignment] unless the
        budget is tiny).
    """

    epsilon: float | None = None
    epsilon_start: float | None = None
    scaling: float = 64.0
    max_rounds: int = 100_000

    def __post_init__(self) -> None:
        for name in ("epsilon", "epsilon_start"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ValueError(f"options.{name} must be a finite positive number or None, got {v!r}")
        s = self.scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 1:
            raise ValueError(f"options.scaling must be a finite number > 1, got {s!r}")
        check_positive_int(self.max_rounds, "options.max_rounds")


class BalancedAssignment(NamedTuple):
    r"""Result of [`balanced_assignment`][moeref.balanced_assignment.balanced_assignment].

    Attributes
    ----------
    expert_index : int64 array, shape (T,)
        $\sigma(t)$; every expert appears exactly $C = T/E$ times.
    position : int64 array, shape (T,)
        Rank of token $t$ among the tokens of its expert, in token order ($0 \le p < C$).
    prices : array, shape (E,)
        Final expert prices $\lambda_e$ (dual variables), in the affinities' dtype.
    epsilon : float
        The final $\varepsilon$: ``assignment_value >= dual_bound(prices) - T * epsilon``.
    rounds : int
        Bidding rounds used, over all phases.
    """

    expert_index: Any
    position: Any
    prices: Any
    epsilon: float
    rounds: int


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def positions_in_expert(expert_index: Any, num_experts: int) -> Any:
    """Rank of each token among the tokens routed to the same expert, in token order (int64, shape (T,)).

    Built on a stable sort by expert and a ``searchsorted`` of the block starts (no scatter).
    ``expert_index``: integer, shape (T,), entries in ``[0, num_experts)``.
    """
    xp = array_namespace(expert_index, names=("expert_index",))
    check_int_array(expert_index, "expert_index", ndim=1)
    E = check_positive_int(num_experts, "num_experts")
    check_index_range(expert_index, "expert_index", E, what=f"num_experts={E} experts were given")
    return _positions_in_expert(expert_index, E, xp)


def _positions_in_expert(expert_index: Any, num_experts: int, xp: Any) -> Any:
    """[`positions_in_expert`][moeref.balanced_assignment.positions_in_expert] without argument checks."""
    e = xp.astype(expert_index, xp.int64)
    order = xp.astype(xp.argsort(e, stable=True), xp.int64)  # (T,) token order grouped by expert
    starts = xp.searchsorted(xp.take(e, order, axis=0), xp.arange(num_experts, dtype=xp.int64, device=device_of(e)))  # (E,)
    rank_in_sort = _inverse_permutation(order)  # (T,)
    return rank_in_sort - xp.take(xp.astype(starts, xp.int64), e, axis=0)


def assignment_value(affinities: Any, expert_index: Any) -> Any:
    r"""$\sum_t a_{t\sigma(t)}$, the total affinity of an assignment (0-d array).

    ``affinities`` (T, E), finite; ``expert_index`` integer (T,) in ``[0, E)`` (any assignment,
    balanced or not).
    """
    xp = _check_affinities(affinities, expert_index=expert_index)
    T, E = affinities.shape
    check_int_array(expert_index, "expert_index", ndim=1)
    check_shape(expert_index, "expert_index", (T,), what=f"affinities has T={T} rows, one expert per token")
    check_index_range(expert_index, "expert_index", E, what=f"affinities has E={E} columns")
    chosen = _take_along_axis(affinities, xp.astype(expert_index, xp.int64)[:, None], axis=1)  # (T, 1)
    return xp.sum(chosen)


def dual_bound(affinities: Any, prices: Any) -> Any:
    r"""$U(\lambda) = \sum_t \max_e (a_{te} - \lambda_e) + \frac{T}{E}\sum_e \lambda_e$, an upper bound on the optimal value.

    Weak duality: for any balanced $\sigma$, $\sum_t a_{t\sigma(t)} = \sum_t (a_{t\sigma(t)} -
    \lambda_{\sigma(t)}) + C\sum_e\lambda_e \le U(\lambda)$, whatever the prices. ``affinities`` (T, E)
    with $E$ dividing $T$, ``prices`` (E,), both finite.
    """
    xp = _check_affinities(affinities, prices=prices)
    T, E = affinities.shape
    _check_balanced(T, E)
    check_float_array(prices, "prices", ndim=1)
    check_shape(prices, "prices", (E,), what=f"affinities has E={E} columns, one price per expert")
    return xp.sum(xp.max(affinities - prices, axis=1)) + (T // E) * xp.sum(prices)


def _check_affinities(affinities: Any, **more: Any) -> Any:
    """``affinities`` (T, E): real floating, finite, one library with the ``more`` arrays. Returns the namespace."""
    check_array(affinities, "affinities")
    for name, a in more.items():
        check_array(a, name)
    array_namespace(affinities, *more.values(), names=("affinities", *more))
    floats = {name: a for name, a in more.items() if name != "expert_index"}
    xp = check_arrays({"affinities": affinities, **floats})
    check_float_array(affinities, "affinities", ndim=2)
    return xp


def _check_balanced(T: int, E: int) -> None:
    if T < 1 or E < 1:
        raise ValueError(f"affinities must have at least one token and one expert, got shape ({T}, {E})")
    if T % E != 0:
        raise ValueError(
            f"affinities has T={T} tokens, not divisible by E={E} experts: a balanced assignment gives every expert "
            f"exactly T/E tokens (pad or drop {T % E} tokens, or route greedily)"
        )


def _check(affinities: Any, options: Any) -> tuple[Any, int, int]:
    check_record_type(options, "options", AuctionOptions)
    xp = _check_affinities(affinities)
    T, E = affinities.shape
    _check_balanced(T, E)
    return xp, T, E


def _constant(a: Any) -> Any:
    """The affinities as constants: the assignment is not differentiated (a torch tensor is detached,
    so that no autograd graph is built over the rounds and no host read warns)."""
    detach = getattr(a, "detach", None)
    return detach() if callable(detach) else a


def _schedule(affinities: Any, options: AuctionOptions, xp: Any) -> tuple[list[float], float]:
    """Phase epsilons (decreasing, last = final) and the final epsilon."""
    try:
        hi, lo = float(xp.max(affinities)), float(xp.min(affinities))
    except Exception as exc:  # jax tracers raise a ConcretizationTypeError
        if "Concretization" in type(exc).__name__ or "Tracer" in type(exc).__name__:
            raise TypeError(
                "balanced_assignment needs concrete affinities, got traced values (jax.jit / jax.grad): solve the "
                "assignment outside the transformation and pass it on (base_layer's expert_index)"
            ) from exc
        raise
    spread = hi - lo
    scale = max(abs(hi), abs(lo), spread)
    T = affinities.shape[0]
    floor = 4096.0 * float(xp.finfo(affinities.dtype).eps) * max(scale, 1e-300)
    if options.epsilon is not None:
        if options.epsilon < floor:
            raise ValueError(
                f"options.epsilon={options.epsilon!r} is below the rounding floor {floor:.3g} for these affinities "
                f"(4096 machine epsilons of {affinities.dtype} times max(|a|, range) = {scale:.3g})"
            )
        final = float(options.epsilon)
    else:
        final = max(spread / (1e6 * T), floor) if spread > 0 else max(1.0, floor)
    start = options.epsilon_start if options.epsilon_start is not None else spread / 2
    eps = max(float(start), final)
    phases = [eps]
    while eps > final:
        eps = max(eps / options.scaling, final)
        phases.append(eps)
    return phases, final


# --------------------------------------------------------------------------------------------
# One bidding round
# --------------------------------------------------------------------------------------------


class _State(NamedTuple):
    price: Any  # (E, C) slot prices
    expert: Any  # (T,) assigned expert, -1 if unassigned
    slot: Any  # (T,) assigned slot in [0, C), -1 if unassigned


def _round(a: Any, state: _State, eps: float, xp: Any) -> _State:
    """Jacobi round: every unassigned token bids for the cheapest slots of its best expert."""
    T, E = a.shape
    C = T // E
    dev = device_of(a)
    price, expert, slot = state
    slot_order = xp.astype(xp.argsort(price, axis=1, stable=True), xp.int64)  # (E, C) cheapest slot first
    q = _take_along_axis(price, slot_order, axis=1)  # (E, C) sorted slot prices
    lam = q[:, 0]  # (E,) expert price = its cheapest slot

    # bids: best expert e* and the best value outside it; bid = a_te* - w_t + eps (at least lam_e* + eps)
    values, best = top_k(a - lam, 2)  # (T, 2) each; ties -> lower expert index
    target = best[:, 0]  # (T,)
    lam_t = xp.take(lam, target, axis=0)  # (T,)
    bid = xp.maximum(_take_along_axis(a, target[:, None], axis=1)[:, 0] - values[:, 1] + eps, lam_t + eps)  # (T,)

    # rank the bidders of each expert: by expert, then highest bid, then lower token index
    unassigned = expert < 0  # (T,)
    key = xp.where(unassigned, target, xp.full_like(target, E))  # (T,) non-bidders sort last
    by_bid = xp.astype(xp.argsort(-bid, stable=True), xp.int64)  # (T,)
    order = xp.take(by_bid, xp.astype(xp.argsort(xp.take(key, by_bid, axis=0), stable=True), xp.int64), axis=0)  # (T,)
    sorted_key = xp.take(key, order, axis=0)  # (T,)
    sorted_bid = xp.take(bid, order, axis=0)  # (T,)
    experts = xp.arange(E, dtype=xp.int64, device=dev)
    start = xp.astype(xp.searchsorted(sorted_key, experts, side="left"), xp.int64)  # (E,)
    count = xp.astype(xp.searchsorted(sorted_key, experts, side="right"), xp.int64) - start  # (E,)

    # slot side: the j-th best bid of expert e competes for its j-th cheapest slot
    j = xp.arange(C, dtype=xp.int64, device=dev)[None, :]  # (1, C)
    row = xp.clip(start[:, None] + j, 0, T - 1)  # (E, C) sorted bidder row
    offered = xp.take(sorted_bid, xp.reshape(row, (E * C,)), axis=0)  # (E*C,)
    offered = xp.reshape(offered, (E, C))  # (E, C)
    won = (j < count[:, None]) & (offered >= q + eps)  # (E, C), a prefix of each row
    slot_inverse = xp.astype(xp.argsort(slot_order, axis=1, stable=True), xp.int64)  # (E, C)
    new_price = _take_along_axis(xp.where(won, offered, q), slot_inverse, axis=1)  # (E, C)
    rebid = xp.reshape(_take_along_axis(won, slot_inverse, axis=1), (E * C,))  # (E*C,) slot got a new owner

    # token side: winners take their slot; holders of a re-bid slot are evicted
    rank = _inverse_permutation(order) - xp.take(start, xp.clip(key, 0, E - 1), axis=0)  # (T,)
    rank_c = xp.clip(rank, 0, C - 1)  # (T,)
    flat_target = xp.clip(key, 0, E - 1) * C + rank_c  # (T,)
    wins = unassigned & (rank < C) & xp.take(xp.reshape(won, (E * C,)), flat_target, axis=0)  # (T,)
    held = xp.clip(expert, 0, E - 1) * C + xp.clip(slot, 0, C - 1)  # (T,)
    evicted = (~unassigned) & xp.take(rebid, held, axis=0)  # (T,)
    won_slot = xp.take(xp.reshape(slot_order, (E * C,)), flat_target, axis=0)  # (T,)
    minus_one = xp.full_like(expert, -1)
    expert = xp.where(wins, target, xp.where(evicted, minus_one, expert))
    slot = xp.where(wins, won_slot, xp.where(evicted, minus_one, slot))
    return _State(new_price, expert, slot)


def _pending(state: _State, xp: Any) -> bool:
    """Whether some token is still unassigned; the loop needs a concrete answer."""
    pending = concrete_bool(xp.any(state.expert < 0))
    if pending is None:
        raise TypeError("balanced_assignment runs eagerly: its stopping test needs concrete affinities (not under jax.jit)")
    return pending


def _keep_satisfied(a: Any, state: _State, eps: float, xp: Any) -> _State:
    """Start of a phase: every slot at its expert's price; keep the tokens that satisfy eps-CS, unassign the rest."""
    T, E = a.shape
    C = T // E
    price, expert, slot = state
    lam = xp.min(price, axis=1)  # (E,)
    price = xp.broadcast_to(lam[:, None], (E, C))  # (E, C) every slot at its expert's price
    value = a - lam  # (T, E)
    e = xp.clip(expert, 0, E - 1)  # (T,)
    own = _take_along_axis(value, e[:, None], axis=1)[:, 0]  # (T,)
    is_own = xp.arange(E, dtype=xp.int64, device=device_of(a))[None, :] == e[:, None]  # (T, E)
    outside = xp.max(xp.where(is_own, xp.full_like(value, -math.inf), value), axis=1)  # (T,)
    ok = (expert >= 0) & (own >= outside - eps)  # (T,)
    minus_one = xp.full_like(expert, -1)
    return _State(price, xp.where(ok, expert, minus_one), xp.where(ok, slot, minus_one))


# --------------------------------------------------------------------------------------------
# Public
# --------------------------------------------------------------------------------------------


def balanced_assignment(affinities: Any, options: AuctionOptions = AuctionOptions()) -> BalancedAssignment:
    r"""Assign $T$ tokens to $E$ experts, exactly $C = T/E$ each, maximising the total affinity.

    $$\max_{\sigma}\ \sum_{t} a_{t\sigma(t)} \quad\text{s.t.}\quad |\sigma^{-1}(e)| = T/E\ \ \forall e,$$

    the token-to-expert assignment of BASE layers (Lewis et al. 2021, arXiv:2103.16716), solved by
    an auction (Bertsekas 1988, Annals of OR 14; Bertsekas & Castañon 1989, Annals of OR 20) in
    which the tokens bid for the experts' slots.

    **Algorithm.** Each expert has $C$ slots with prices $p_{ec}$ (all 0 at the start); its price
    is $\lambda_e = \min_c p_{ec}$. A phase with a given $\varepsilon$ first sets every slot of
    expert $e$ to $\lambda_e$ (lowering a slot price never breaks the slackness condition below)
    and unassigns the tokens that violate it for the new $\varepsilon$ (all tokens in the first
    phase), then repeats Jacobi rounds until every token is assigned:

    1. every unassigned token $t$ finds its best expert $e^*_t = \arg\max_e (a_{te} - \lambda_e)$
       and the best value outside it, $w_t = \max_{e \ne e^*_t} (a_{te} - \lambda_e)$, and bids
       $b_t = a_{te^*_t} - w_t + \varepsilon \ \ (\ge \lambda_{e^*_t} + \varepsilon)$;
    2. each expert ranks its bidders by bid (ties: lower token index) and its slots by price
       (ties: lower slot index); the $j$-th best bid wins the $j$-th cheapest slot if
       $b \ge p + \varepsilon$ (the winners form a prefix, the best bid always wins);
    3. a won slot takes the bid as its new price, and its previous holder becomes unassigned.

    Prices and the satisfied assignments persist across phases; $\varepsilon$ goes from
    ``epsilon_start`` down to ``epsilon``, divided by ``scaling`` each phase (the
    $\varepsilon$-scaling of Bertsekas 1988). Resetting an expert's slots to one price at each
    phase start avoids the slow "price war" between identical slots that the plain slot-wise
    auction suffers from (measured for $T = 512$, $E = 8$, $\theta = 4$: 27795 rounds when each
    phase keeps the slot prices and clears the assignment, 1812 with the reset).

    **Why it is $T\varepsilon$-optimal.** A token that wins a slot at price $b_t$ satisfies
    $a_{te} - b_t = w_t - \varepsilon$; within a phase prices only rise, and
    $\lambda_e \le b_t$ while it holds the slot (a token kept at a phase start holds a slot
    priced $\lambda_e$ and satisfies the condition there), so at the end every token satisfies
    $\varepsilon$-complementary slackness
    $a_{t\sigma(t)} - \lambda_{\sigma(t)} \ge \max_e (a_{te} - \lambda_e) - \varepsilon$. Summing
    over tokens, with exactly $C$ tokens per expert, the value is at least the dual bound
    [`dual_bound`][moeref.balanced_assignment.dual_bound]$(\lambda) - T\varepsilon$, and the dual
    bound is at least the optimum. **Termination:** every round accepts at least one bid, every
    accepted bid raises a slot price by at least $\varepsilon$, a slot once taken stays taken,
    and prices stay bounded while a slot that has received no bid in the phase remains.

    Parameters
    ----------
    affinities : array, shape (T, E)
        $a_{te}$, finite floats (BASE: $x_t \cdot c_e$). $T$ must be a multiple of $E$.
    options : AuctionOptions
        The $\varepsilon$ schedule and the round budget.

    Returns
    -------
    BalancedAssignment
        ``expert_index (T,)``, ``position (T,)``, ``prices (E,)``, the final ``epsilon`` and the
        number of ``rounds``.

    Raises
    ------
    ValueError
        $T$ not divisible by $E$ (**the rule: no remainder policy**; pad the batch, drop the
        remainder, or route those tokens greedily yourself), an empty problem, NaN or infinite
        affinities, or an ``epsilon`` below the rounding floor.
    RuntimeError
        ``options.max_rounds`` exhausted.

    Notes
    -----
    **Ties.** Optimal assignments are often not unique; the result is deterministic and the
    same on every backend: among equal values the lower expert index is a token's best expert,
    among equal bids the lower token index wins, among equal prices the lower slot index is
    cheaper. $E = 1$ is allowed (everything to expert 0).

    **No VJP.** The assignment is piecewise constant in the affinities (its derivative is 0
    wherever it is defined); layers hold it fixed and differentiate what they compute from it
    ([`base_layer_vjp`][moeref.base_layer.base_layer_vjp]).

    **Cost.** Each round is $O(TE + T\log T)$ work (two sorts of the tokens, one of each
    expert's slots); the number of rounds is data dependent.

    **Eager only.** The loop stops on a concrete test, so the affinities must be concrete: on
    every backend eagerly and under ``torch.autograd`` (the assignment is computed on detached
    values), not on JAX tracers (``jax.jit``, ``jax.grad``); there, solve it outside the
    transformation and pass the result on.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.balanced_assignment import balanced_assignment
    >>> a = np.array([[3.0, 1.0], [2.0, 0.0], [1.0, 0.5], [0.0, 2.0]])
    >>> balanced_assignment(a).expert_index.tolist()  # greedy would send tokens 0-2 to expert 0
    [0, 0, 1, 1]
    """
    xp, T, E = _check(affinities, options)
    affinities = _constant(affinities)
    C = T // E
    dev = device_of(affinities)
    phases, final = _schedule(affinities, options, xp)
    if E == 1:
        zeros = xp.zeros((T,), dtype=xp.int64, device=dev)
        prices = xp.zeros((1,), dtype=affinities.dtype, device=dev)
        return BalancedAssignment(zeros, xp.arange(T, dtype=xp.int64, device=dev), prices, final, 0)
    price = xp.zeros((E, C), dtype=affinities.dtype, device=dev)
    minus_one = xp.full((T,), -1, dtype=xp.int64, device=dev)
    rounds = 0
    state = _State(price, minus_one, minus_one)
    for eps in phases:
        state = _keep_satisfied(affinities, state, eps, xp)
        while _pending(state, xp):
            if rounds >= options.max_rounds:
                raise RuntimeError(
                    f"balanced_assignment used options.max_rounds={options.max_rounds} rounds without finishing (epsilon={eps:.3g})"
                )
            state = _round(affinities, state, eps, xp)
            rounds += 1
    price = state.price
    expert_index = state.expert
    return BalancedAssignment(expert_index, _positions_in_expert(expert_index, E, xp), xp.min(price, axis=1), final, rounds)

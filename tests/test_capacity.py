"""Expert capacity: formulas of each system, priority orders vs a direct loop, properties, bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.capacity import CapacityDraws, CapacityOptions, apply_capacity, expert_capacity
from moeref.routes import Routes, check_routes
from conftest import assert_close
from helpers import leaves

PRIORITIES = ("rank_major", "token_major", "batch_prioritized", "score", "random")


def _routes(expert_index, weight, kept=None):
    expert_index = np.asarray(expert_index, dtype=np.int64)
    kept = np.ones(expert_index.shape, bool) if kept is None else np.asarray(kept, bool)
    return Routes(expert_index, np.asarray(weight, dtype=np.float64), kept, np.zeros(expert_index.shape, np.int64))


def _random_routes(rng, T, E, k, *, live=0.85, ties=False):
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)])  # distinct experts per token, like a router
    w = rng.integers(1, 4, size=(T, k)).astype(float) if ties else rng.uniform(0.05, 1.0, size=(T, k))
    kept = rng.uniform(size=(T, k)) < live
    return _routes(idx, w, kept)


# --------------------------------------------------------------------------------------------
# The reference: a direct loop over groups, experts and routes
# --------------------------------------------------------------------------------------------


def reference_capacity(routes, E, Tg, C, priority, *, top1=None, score=None, uniform=None, take_slots=False):
    """Slots, kept flags and loads by sorting each (group, expert)'s routes in Python.

    ``take_slots``: routes dropped before capacity keep their place in the priority order (the
    GShard paper's counter); otherwise they queue after every live route.
    """
    idx, w, live = np.asarray(routes.expert_index), np.asarray(routes.weight), np.asarray(routes.kept)
    T, k = idx.shape
    top1 = w[:, 0] if top1 is None else top1
    score = w if score is None else score
    bpr_rank = {t: r for r, t in enumerate(sorted(range(T), key=lambda t: (-top1[t], t)))}

    def key(t, j):
        n = t * k + j
        return {
            "token_major": (n,),
            "rank_major": (j, t),
            "batch_prioritized": (j, bpr_rank[t]),
            "score": (-score[t, j], n),
            "random": (-(uniform[t, j] if uniform is not None else 0.0), n),
        }[priority]

    position = np.zeros((T, k), np.int64)
    kept = np.zeros((T, k), bool)
    counts = np.zeros((T // Tg, E), np.int64)
    after = np.zeros((T // Tg, E), np.int64)
    for g in range(T // Tg):
        for e in range(E):
            mine = [(t, j) for t in range(g * Tg, (g + 1) * Tg) for j in range(k) if idx[t, j] == e]
            alive = sorted([r for r in mine if live[r]], key=lambda r: key(*r))
            dead = sorted([r for r in mine if not live[r]], key=lambda r: key(*r))
            queue = sorted(mine, key=lambda r: key(*r)) if take_slots else alive + dead
            counts[g, e] = len(alive)
            for slot, r in enumerate(queue):
                position[r] = slot
                kept[r] = live[r] and (C is None or slot < C)
                after[g, e] += kept[r]
    return position, kept, counts, after


def _check_against_reference(routes, E, options, **kw):
    T, k = routes.weight.shape
    Tg = options.group_size or T
    out, report = apply_capacity(routes, E, options, **kw)
    C = expert_capacity(Tg, E, k, options)
    ref_kw = {}
    if options.priority == "random":
        ref_kw["uniform"] = kw["draws"].uniform
    if options.priority == "batch_prioritized" and kw.get("priority") is not None:
        ref_kw["top1"] = kw["priority"]
    if options.priority == "score" and kw.get("priority") is not None:
        ref_kw["score"] = kw["priority"]
    position, kept, counts, after = reference_capacity(
        routes, E, Tg, C, options.priority, take_slots=options.dropped_routes_take_slots, **ref_kw
    )
    np.testing.assert_array_equal(out.position, position)
    np.testing.assert_array_equal(out.kept, kept)
    np.testing.assert_array_equal(out.weight, np.where(kept, routes.weight, 0.0))
    np.testing.assert_array_equal(out.expert_index, routes.expert_index)
    np.testing.assert_array_equal(report.counts_before, counts)
    cap = counts.max() if C is None else C
    assert report.capacity == cap
    np.testing.assert_array_equal(report.counts_after, after)
    if not options.dropped_routes_take_slots:
        np.testing.assert_array_equal(report.counts_after, np.minimum(counts, cap))
    return out, report


# --------------------------------------------------------------------------------------------
# Capacity formulas of the systems read
# --------------------------------------------------------------------------------------------

def _ds32(T, E, cf, k):
    """DeepSpeed's _capacity with NumPy float32: (T / E) times the float32 tensor cf * k."""
    return int(np.ceil(np.float32(T / E) * np.float32(cf * k)))


SYSTEMS = {
    # name: (options with the system's arithmetic, the system's own expression, evaluated as it does)
    "deepspeed_top1": (
        CapacityOptions(capacity_factor=1.1, k_factor="none", min_capacity=8, arithmetic="deepspeed_float32"),
        lambda T, E, k: max(_ds32(T, E, 1.1, 1), 8),
    ),
    "deepspeed_topk": (
        CapacityOptions(capacity_factor=1.25, k_factor="inside", min_capacity=4, arithmetic="deepspeed_float32"),
        lambda T, E, k: max(_ds32(T, E, 1.25, k), 4),
    ),
    "flaxformer": (
        CapacityOptions(capacity_factor=1.1, rounding="round_half_even", k_factor="none", min_capacity=4, arithmetic="python_float"),
        lambda T, E, k: max(int(round(1.1 * T / E)), 4),
    ),
    "mesh_tf": (
        CapacityOptions(capacity_factor=1.1, rounding="floor", k_factor="none", clip_to_group_size=True, arithmetic="python_float"),
        lambda T, E, k: min(T, int((T * 1.1) / E)),
    ),
    "fairseq_top2": (
        CapacityOptions(capacity_factor=1.0, k_factor="outside", arithmetic="python_float"),
        lambda T, E, k: k * math.ceil(T / E),
    ),
    "vmoe": (
        CapacityOptions(capacity_factor=1.1, k_factor="inside", multiple_of=4, arithmetic="python_float"),
        lambda T, E, k: (lambda c: c + (-c) % 4)(int(math.ceil((T * k) * 1.1 / E))),
    ),
    "vmoe_round": (
        CapacityOptions(capacity_factor=0.5, rounding="round_half_even", k_factor="inside", multiple_of=1, arithmetic="python_float"),
        lambda T, E, k: int(round((T * k) * 0.5 / E)),
    ),
    "megablocks": (
        CapacityOptions(capacity_factor=1.1, rounding="floor", k_factor="inside", zero_capacity_means_dropless=True, arithmetic="python_float_quotient_first"),
        lambda T, E, k: (lambda c: None if c == 0 else c)(int(1.1 * (k * T / E))),
    ),
    "switch_fixed": (CapacityOptions(capacity=5, capacity_factor=None), lambda T, E, k: 5),
    "dropless": (CapacityOptions(dropless=True), lambda T, E, k: None),
}


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_capacity_formula_table(system):
    """Each system's arithmetic reproduces its expression bit for bit (c = 1.1 lands next to integers often)."""
    options, peer = SYSTEMS[system]
    for T in (1, 2, 3, 5, 8, 10, 12, 16, 20, 30, 64, 90, 100, 300):
        for E in (1, 2, 3, 4, 8, 16):
            for k in (1, 2, 3):
                assert expert_capacity(T, E, k, options) == peer(T, E, k), (system, T, E, k)


@pytest.mark.parametrize("rounding", ["ceil", "floor", "round_half_even"])
def test_exact_arithmetic_rounds_the_rational_value(rounding):
    rnd = {"ceil": math.ceil, "floor": math.floor, "round_half_even": round}[rounding]
    for cf in (0.3, 1.05, 1.1, 1.25):
        options = CapacityOptions(capacity_factor=cf, rounding=rounding, k_factor="inside")
        for T in (1, 7, 10, 20, 90, 100):
            for E, k in ((2, 1), (3, 2), (8, 3)):
                assert expert_capacity(T, E, k, options) == rnd(Fraction(cf) * T * k / E), (cf, T, E, k)


def test_the_arithmetics_differ_next_to_an_integer():
    value = lambda a, T, E, k=1, cf=1.1: expert_capacity(T, E, k, CapacityOptions(capacity_factor=cf, arithmetic=a))  # noqa: E731
    # 1.1 is stored slightly above 11/10: exactly ceil(11.000...01) = 12; 1.1 * 20 / 2 == 11.0 in floats
    assert [value(a, 20, 2) for a in ("exact", "python_float", "python_float_quotient_first", "deepspeed_float32")] == [12, 11, 11, 11]
    # the two float64 orders: 1.1 * 90 / 3 = 33.00000000000001, 1.1 * (90 / 3) = 33.0
    assert (value("python_float", 90, 3), value("python_float_quotient_first", 90, 3)) == (34, 33)
    # float64 (100 / 3) * 3.75 = 125.00000000000001, but DeepSpeed's float32 and the exact value give 125
    assert math.ceil((100 / 3) * (1.25 * 3)) == 126
    assert value("deepspeed_float32", 100, 3, 3, 1.25) == value("exact", 100, 3, 3, 1.25) == 125


def test_capacity_rounding_variants_and_exact_arithmetic():
    opts = lambda **kw: CapacityOptions(capacity_factor=1.0, k_factor="none", **kw)  # noqa: E731
    assert [expert_capacity(T, 4, 1, opts(rounding=r)) for T in (10, 14) for r in ("ceil", "floor", "round_half_even")] == [3, 2, 2, 4, 3, 4]
    assert expert_capacity(6, 4, 1, opts(rounding="round_half_even")) == 2  # 1.5 -> 2 (even)
    assert expert_capacity(10, 4, 1, opts(rounding="round_half_even")) == 2  # 2.5 -> 2 (even)
    # 0.3 is stored just below 3/10, so 0.3 * 10 / 3 is just below 1: exact arithmetic gives ceil = 1
    assert expert_capacity(10, 3, 1, CapacityOptions(capacity_factor=0.3, k_factor="none")) == 1
    assert expert_capacity(10, 3, 1, CapacityOptions(capacity_factor=0.3, k_factor="none", rounding="floor")) == 0
    assert expert_capacity(7, 2, 1, CapacityOptions(capacity_factor=1.0, k_factor="none", min_capacity=2, multiple_of=3)) == 6


# --------------------------------------------------------------------------------------------
# Every priority order against the direct loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", PRIORITIES)
def test_priority_orders_match_a_direct_loop(rng, priority):
    T, E, k = 12, 3, 2
    routes = _random_routes(rng, T, E, k, ties=priority == "score")
    draws = CapacityDraws(rng.uniform(size=(T, k))) if priority == "random" else None
    for options in (
        CapacityOptions(capacity_factor=0.5, priority=priority),
        CapacityOptions(capacity_factor=1.0, group_size=4, priority=priority),
        CapacityOptions(capacity=1, capacity_factor=None, group_size=6, priority=priority),
        CapacityOptions(dropless=True, group_size=3, priority=priority),
        CapacityOptions(capacity_factor=0.5, group_size=6, priority=priority, dropped_routes_take_slots=True),
        CapacityOptions(dropless=True, priority=priority, dropped_routes_take_slots=True),
    ):
        _check_against_reference(routes, E, options, draws=draws)


def test_rank_major_and_token_major_differ_as_documented():
    # token 0 sends its rank-1 route to expert 0, token 1 its rank-0 route; capacity 1
    routes = _routes([[1, 0], [0, 1]], [[0.6, 0.4], [0.7, 0.3]])
    fixed = dict(capacity=1, capacity_factor=None)
    rank, _ = apply_capacity(routes, 2, CapacityOptions(priority="rank_major", **fixed))
    token, _ = apply_capacity(routes, 2, CapacityOptions(priority="token_major", **fixed))
    assert rank.kept.tolist() == [[True, False], [True, False]]  # rank-0 routes first (GShard)
    assert token.kept.tolist() == [[True, True], [False, False]]  # token 0's routes first (Megablocks)


def test_batch_prioritized_routing_serves_confident_tokens_first():
    routes = _routes([[0], [0], [0], [0]], [[0.3], [0.9], [0.5], [0.9]])
    out, _ = apply_capacity(routes, 1, CapacityOptions(capacity=2, capacity_factor=None, priority="batch_prioritized"))
    assert out.kept[:, 0].tolist() == [False, True, False, True]  # ties (0.9) by token index
    assert out.position[:, 0].tolist() == [3, 0, 2, 1]
    # the router's raw top-1 probability can be passed instead of the (renormalised) weight
    out, _ = apply_capacity(routes, 1, CapacityOptions(capacity=2, capacity_factor=None, priority="batch_prioritized"), priority=np.array([0.8, 0.1, 0.7, 0.2]))
    assert out.kept[:, 0].tolist() == [True, False, True, False]


def test_router_scores_priority_needs_the_scores():
    routes = _routes([[0], [0], [0], [0]], [[1.0], [1.0], [1.0], [1.0]])  # normalised top-1 weights all equal
    raw = np.array([0.4, 0.9, 0.6, 0.5])  # the router's raw top-1 probabilities
    options = CapacityOptions(capacity=2, capacity_factor=None, priority="batch_prioritized", priority_values="router_scores")
    with pytest.raises(ValueError, match="priority_values='router_scores' needs the router's scores"):
        apply_capacity(routes, 1, options)
    out, _ = apply_capacity(routes, 1, options, priority=raw)
    assert out.kept[:, 0].tolist() == [False, True, True, False]
    by_weight, _ = apply_capacity(routes, 1, CapacityOptions(capacity=2, capacity_factor=None, priority="batch_prioritized"))
    assert by_weight.kept[:, 0].tolist() == [True, True, False, False]  # equal weights: token order
    score = CapacityOptions(capacity=1, capacity_factor=None, priority="score", priority_values="router_scores")
    with pytest.raises(ValueError, match=r"as priority= \(shape \(4, 1\)\)"):
        apply_capacity(routes, 1, score)


def gshard_algorithm_1(expert_index, second_kept, C):
    """Lines 4-23 of GShard's Algorithm 1 (k = 2, one group): a counter per expert that the second
    loop increments whether or not the coin kept the route."""
    T = expert_index.shape[0]
    counter = np.zeros(expert_index.max() + 1, dtype=int)
    kept = np.zeros((T, 2), bool)
    for j in range(2):
        for t in range(T):
            e = expert_index[t, j]
            kept[t, j] = counter[e] < C and (j == 0 or second_kept[t])
            counter[e] += 1
    return kept


def test_dropped_second_route_keeps_its_slot_like_gshard_algorithm_1(rng):
    # three tokens choose (0, 1); token 0's second route is dropped by the coin; C = 2
    idx = np.array([[0, 1], [0, 1], [0, 1]])
    coin = np.array([False, True, True])
    routes = _routes(idx, np.full((3, 2), 0.5), kept=np.stack([np.ones(3, bool), coin], axis=1))
    fixed = dict(capacity=2, capacity_factor=None)
    mesh_tf, rep = apply_capacity(routes, 2, CapacityOptions(**fixed))
    paper, rep_p = apply_capacity(routes, 2, CapacityOptions(dropped_routes_take_slots=True, **fixed))
    assert mesh_tf.kept[:, 1].tolist() == [False, True, True]  # Mesh-TF: the dropped route takes no slot
    assert paper.kept[:, 1].tolist() == [False, True, False]  # the paper: it holds slot 0 of expert 1
    assert paper.position[:, 1].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(paper.kept, gshard_algorithm_1(idx, coin, 2))
    assert rep.counts_before.tolist() == rep_p.counts_before.tolist() == [[3, 2]]
    assert rep.counts_after.tolist() == [[2, 2]] and rep_p.counts_after.tolist() == [[2, 1]]
    for _ in range(20):  # random top-2 problems against the algorithm's loop
        T, E = 10, 4
        idx = np.stack([rng.permutation(E)[:2] for _ in range(T)])
        coin = rng.uniform(size=T) < 0.6
        routes = _routes(idx, np.ones((T, 2)), kept=np.stack([np.ones(T, bool), coin], axis=1))
        out, _ = apply_capacity(routes, E, CapacityOptions(capacity=3, capacity_factor=None, dropped_routes_take_slots=True))
        np.testing.assert_array_equal(out.kept, gshard_algorithm_1(idx, coin, 3))


def test_routes_dropped_before_capacity_take_no_slot():
    routes = _routes([[0, 1], [0, 1], [0, 1]], np.ones((3, 2)), kept=[[True, False], [True, False], [True, True]])
    out, report = apply_capacity(routes, 2, CapacityOptions(capacity=1, capacity_factor=None))
    assert out.kept.tolist() == [[True, False], [False, False], [False, True]]
    assert out.position[:, 1].tolist() == [1, 2, 0]  # dead routes are counted after the live one
    assert report.counts_before.tolist() == [[3, 1]]
    assert report.counts_after.tolist() == [[1, 1]]


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@st.composite
def _routing_problem(draw):
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, min(E, 3)))
    Tg = draw(st.integers(1, 5))
    G = draw(st.integers(1, 3))
    T = G * Tg
    idx = np.array([draw(st.permutations(range(E)))[:k] for _ in range(T)], dtype=np.int64).reshape(T, k)
    w = np.array(draw(st.lists(st.integers(0, 4), min_size=T * k, max_size=T * k)), dtype=float).reshape(T, k)  # ties
    kept = np.array(draw(st.lists(st.booleans(), min_size=T * k, max_size=T * k)), dtype=bool).reshape(T, k)
    u = np.array(draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=T * k, max_size=T * k)), dtype=float).reshape(T, k)
    return _routes(idx, w, kept), E, Tg, u


@given(_routing_problem(), st.sampled_from(PRIORITIES), st.sampled_from([0.25, 0.5, 1.0, 2.0]), st.booleans(), st.booleans())
def test_kept_routes_are_the_first_c_in_priority_order_property(problem, priority, cf, grouped, take_slots):
    routes, E, Tg, u = problem
    draws = CapacityDraws(u) if priority == "random" else None
    options = CapacityOptions(capacity_factor=cf, group_size=Tg if grouped else None, priority=priority, dropped_routes_take_slots=take_slots)
    out, report = _check_against_reference(routes, E, options, draws=draws)
    # no expert over capacity, in any group; kept slots distinct and below C (contiguous from 0
    # unless dropped routes hold slots in between)
    T = routes.weight.shape[0]
    g = (np.arange(T) // (Tg if grouped else T))[:, None] * np.ones_like(out.position)
    for gg in np.unique(g):
        for e in range(E):
            sel = out.kept & (out.expert_index == e) & (g == gg)
            slots = sorted(out.position[sel].tolist())
            assert sel.sum() <= report.capacity and len(set(slots)) == len(slots) and all(p < report.capacity for p in slots)
            if not take_slots:
                assert slots == list(range(sel.sum()))


@given(_routing_problem(), st.sampled_from(PRIORITIES))
def test_dropless_equals_infinite_capacity_property(problem, priority):
    routes, E, Tg, u = problem
    draws = CapacityDraws(u) if priority == "random" else None
    T, k = routes.weight.shape
    dropless, rep = apply_capacity(routes, E, CapacityOptions(dropless=True, group_size=Tg, priority=priority), draws=draws)
    huge, _ = apply_capacity(routes, E, CapacityOptions(capacity=T * k, capacity_factor=None, group_size=Tg, priority=priority), draws=draws)
    for a, b in zip(dropless, huge):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dropless.kept, routes.kept)
    np.testing.assert_array_equal(rep.counts_after, rep.counts_before)


@given(st.integers(1, 4), st.integers(2, 6), st.integers(1, 3), st.sampled_from(["batch_prioritized", "score"]), st.data())
def test_permuting_tokens_within_a_group_permutes_the_result_property(G, Tg, E, priority, data):
    T, k = G * Tg, 1 if E == 1 else 2
    k = min(k, E)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    routes = _random_routes(rng, T, E, k, live=1.0)
    routes = routes._replace(weight=rng.permutation(np.linspace(0.1, 1.0, T * k)).reshape(T, k))  # distinct scores
    perm = np.concatenate([g * Tg + rng.permutation(Tg) for g in range(G)])
    options = CapacityOptions(capacity_factor=0.5, group_size=Tg, priority=priority)
    out, rep = apply_capacity(routes, E, options)
    permuted = Routes(*(a[perm] for a in routes))
    out_p, rep_p = apply_capacity(permuted, E, options)
    for a, b in zip(out_p, out):
        np.testing.assert_array_equal(a, b[perm])
    np.testing.assert_array_equal(rep_p.counts_after, rep.counts_after)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def test_capacity_agrees_with_numpy_on_every_backend(backend, rng):
    T, E, k = 12, 4, 2
    routes = _random_routes(rng, T, E, k, ties=True)
    u = rng.uniform(size=(T, k))
    cases = [CapacityOptions(capacity_factor=0.5, group_size=4, priority=p) for p in PRIORITIES] + [
        CapacityOptions(dropless=True),
        CapacityOptions(capacity_factor=0.5, group_size=4, dropped_routes_take_slots=True),
    ]
    for options in cases:
        draws = CapacityDraws(u) if options.priority == "random" else None
        ref = apply_capacity(routes, E, options, draws=draws)
        got = apply_capacity(backend.tree_from_numpy(routes), E, options, draws=backend.tree_from_numpy(draws))
        assert got.report.capacity == ref.report.capacity
        got_leaves = leaves(backend.tree_to_numpy((got.routes, got.report.counts_before, got.report.counts_after)))
        ref_leaves = leaves((ref.routes, ref.report.counts_before, ref.report.counts_after))
        for a, b in zip(got_leaves, ref_leaves):
            if np.asarray(b).dtype.kind == "f":
                assert_close(a, b, err_msg=options.priority)
            else:
                np.testing.assert_array_equal(a, b, err_msg=options.priority)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(rng):
    routes = _random_routes(rng, 6, 4, 2)
    with pytest.raises(ValueError, match="options.capacity_factor must be a finite positive number"):
        CapacityOptions(capacity_factor=0.0)
    with pytest.raises(ValueError, match="options.capacity_factor must be a finite positive number"):
        CapacityOptions(capacity_factor=-1.0)
    CapacityOptions(capacity_factor=0.0, dropless=True)  # no capacity when dropless
    with pytest.raises(ValueError, match="options.capacity_factor must be None when a fixed options.capacity is given"):
        CapacityOptions(capacity=4)
    with pytest.raises(ValueError, match="needs a capacity_factor, a fixed capacity, or dropless=True"):
        CapacityOptions(capacity_factor=None)
    with pytest.raises(ValueError, match="options.group_size=4 must divide the number of tokens T=6"):
        apply_capacity(routes, 4, CapacityOptions(group_size=4))
    with pytest.raises(ValueError, match="options.priority must be one of"):
        CapacityOptions(priority="fifo")
    with pytest.raises(ValueError, match="options.rounding must be one of"):
        CapacityOptions(rounding="nearest")
    with pytest.raises(ValueError, match="options.arithmetic must be one of 'exact', 'python_float'"):
        CapacityOptions(arithmetic="float16")
    with pytest.raises(ValueError, match="options.priority_values must be one of 'weights', 'router_scores'"):
        CapacityOptions(priority_values="probs")
    with pytest.raises(TypeError, match="options.dropped_routes_take_slots must be a bool"):
        CapacityOptions(dropped_routes_take_slots=1)
    with pytest.raises(ValueError, match="options.min_capacity must be at least 0, got -1"):
        CapacityOptions(min_capacity=-1)
    with pytest.raises(ValueError, match=r"routes.expert_index must lie in \[0, num_experts\) = \[0, 3\)"):
        apply_capacity(routes._replace(expert_index=np.full((6, 2), 3)), 3)
    with pytest.raises(ValueError, match=r"routes.expert_index must lie in"):
        apply_capacity(routes._replace(expert_index=np.full((6, 2), -1)), 3)
    with pytest.raises(ValueError, match=r"routes.kept has shape \(6, 1\) but \(6, 2\) was expected"):
        apply_capacity(routes._replace(kept=routes.kept[:, :1]), 4)
    with pytest.raises(TypeError, match="routes.kept must be a bool array"):
        apply_capacity(routes._replace(kept=routes.kept.astype(np.int64)), 4)
    with pytest.raises(TypeError, match="routes.expert_index must be an integer array"):
        apply_capacity(routes._replace(expert_index=routes.expert_index.astype(float)), 4)
    with pytest.raises(TypeError, match="routes must be a Routes"):
        apply_capacity(tuple(routes), 4)
    with pytest.raises(ValueError, match="draws .* are required for options.priority='random'"):
        apply_capacity(routes, 4, CapacityOptions(priority="random"))
    with pytest.raises(ValueError, match="accepted only there"):
        apply_capacity(routes, 4, CapacityOptions(), draws=CapacityDraws(np.zeros((6, 2))))
    with pytest.raises(ValueError, match=r"draws.uniform must lie in \[0, 1\)"):
        apply_capacity(routes, 4, CapacityOptions(priority="random"), draws=CapacityDraws(np.ones((6, 2))))
    with pytest.raises(ValueError, match="priority values are read only by"):
        apply_capacity(routes, 4, CapacityOptions(), priority=np.ones(6))
    with pytest.raises(ValueError, match=r"priority has shape \(6, 2\) but \(6,\) was expected"):
        apply_capacity(routes, 4, CapacityOptions(priority="batch_prioritized"), priority=np.ones((6, 2)))
    with pytest.raises(ValueError, match="num_experts must be at least 1"):
        apply_capacity(routes, 0)
    with pytest.raises(TypeError, match="different array libraries"):
        torch = pytest.importorskip("torch")
        apply_capacity(routes._replace(weight=torch.from_numpy(routes.weight)), 4)


def test_non_finite_weights_and_ignored_dropless_fields_are_refused(rng):
    routes = _random_routes(rng, 6, 4, 2)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="routes.weight contains NaN or infinite values"):
            apply_capacity(routes._replace(weight=np.where(routes.kept, bad, 0.0)), 4, CapacityOptions(capacity=2, capacity_factor=None))
    for cf in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"options.capacity_factor must be None or a finite number >= 0, got .* \(ignored with dropless=True"):
            CapacityOptions(capacity_factor=cf, dropless=True)
    with pytest.raises(ValueError, match="options.capacity must be at least 0, got -1"):
        CapacityOptions(capacity=-1, capacity_factor=None, dropless=True)
    with pytest.raises(TypeError, match="options.dropless must be a bool"):
        CapacityOptions(dropless=1)
    CapacityOptions(capacity_factor=None, dropless=True)  # ignored values may be None


@pytest.mark.parametrize("field", Routes._fields)
def test_a_routes_field_that_is_not_an_array_is_named(rng, field):
    routes = _random_routes(rng, 6, 4, 2)
    with pytest.raises(TypeError, match=f"routes.{field} must be an array, got None"):
        apply_capacity(routes._replace(**{field: None}), 4)
    with pytest.raises(TypeError, match=f"routes.{field} must be an array"):
        check_routes(routes._replace(**{field: [0, 1]}))
    with pytest.raises(TypeError, match="routes must be a Routes, got NoneType"):
        check_routes(None)

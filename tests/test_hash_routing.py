"""Hash routing: the seed's "eat" example, maps (seeded random, balanced, user), the layer against a
per-token loop, the VJP (finite differences, torch, jax), every backend, properties, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.expert_ffn import RELU_FFN, SWIGLU
from moeref.hash_routing import balanced_hash_table, hash_layer, hash_layer_vjp, hash_routes, random_hash_table
from conftest import assert_close
from helpers import assert_vjp_correct, leaves
from test_expert_ffn import make_params as make_expert_params
from test_expert_ffn import np_ffn

T, D, I, E, V = 7, 3, 4, 5, 11


def loop_reference(x, token_ids, table, experts, ffn):
    return np.concatenate([np_ffn(x[t : t + 1], experts, table[token_ids[t]], ffn) for t in range(len(x))])


# --------------------------------------------------------------------------------------------
# The seed's example, user tables, the layer and its VJP
# --------------------------------------------------------------------------------------------


def test_eat_goes_to_experts_1_4_2_3_in_four_layers():
    vocab = ["<pad>", "we", "eat", "bread", "and", "cheese"]
    tables = np.array(  # user-given maps, one row per layer; the seed numbers experts 1..4, used as-is (E = 5)
        [
            [0, 2, 1, 3, 0, 4],
            [0, 1, 4, 2, 3, 0],
            [0, 3, 2, 1, 4, 1],
            [0, 4, 3, 0, 2, 2],
        ]
    )
    rng = np.random.default_rng(0)
    experts = make_expert_params(rng, E, D, I, RELU_FFN, bias=True)
    ids = np.array([vocab.index(w) for w in ["we", "eat", "bread", "and", "eat", "cheese"]])
    assert ids[1] == ids[4] == vocab.index("eat")
    x = rng.normal(size=(len(ids), D))
    chosen = []
    for layer in range(4):
        out = hash_layer(x, ids, tables[layer], experts, RELU_FFN)
        chosen.append(int(out.routes.expert_index[1, 0]))  # row 1 is "eat"
        assert out.routes.expert_index[4, 0] == out.routes.expert_index[1, 0]  # same token, same expert
        assert_close(out.y[1], np_ffn(x[1:2], experts, chosen[-1], RELU_FFN)[0])
        x = x + out.y  # residual stream into the next layer
    assert chosen == [1, 4, 2, 3]


def parlai_table(vocab_size, hash_size, seed=42):
    """The table of ParlAI's HashLayerFFN.hash: Python's random.seed(42), randrange per id."""
    random.seed(seed)
    return np.array([random.randrange(0, hash_size) for _ in range(vocab_size)])


@pytest.mark.parametrize("ffn", [RELU_FFN, SWIGLU], ids=["relu", "swiglu"])
def test_layer_equals_per_token_loop_and_vjp(ffn):
    rng = np.random.default_rng(1)
    table = parlai_table(V, E)
    ids = rng.integers(0, V, size=T)
    x = rng.normal(size=(T, D))
    experts = make_expert_params(rng, E, D, I, ffn, bias=True)
    out = hash_layer(x, ids, table, experts, ffn)
    assert_close(out.y, loop_reference(x, ids, table, experts, ffn))
    np.testing.assert_array_equal(out.routes.expert_index[:, 0], table[ids])
    assert np.all(out.routes.weight == 1) and np.all(out.routes.kept)
    np.testing.assert_array_equal(out.counts, np.bincount(table[ids], minlength=E))
    ct = rng.normal(size=(T, D))
    assert_vjp_correct(
        f"hash_layer[{ffn.activation}]",
        lambda x, ids, table, experts: hash_layer(x, ids, table, experts, ffn).y,
        lambda x, ids, table, experts, ct: hash_layer_vjp(x, ids, table, experts, ffn, ct),
        (x, ids, table, experts),
        ct,
        autograd=("torch",),  # jax runs the forward and the analytic VJP in the backend test
    )


def test_gradient_reaches_only_the_chosen_experts():
    rng = np.random.default_rng(2)
    table = np.array([0, 0, 2, 2, 0, 2, 0, 0, 2, 0, 0])  # experts 1, 3, 4 never chosen
    ids = rng.integers(0, V, size=T)
    x = rng.normal(size=(T, D))
    experts = make_expert_params(rng, E, D, I, RELU_FFN, bias=True)
    g = hash_layer_vjp(x, ids, table, experts, RELU_FFN, rng.normal(size=(T, D)))
    used = set(table[ids].tolist())
    for e in range(E):
        nonzero = any(np.any(a[e] != 0) for a in g.experts if a is not None)
        assert nonzero == (e in used)
    assert g.token_ids is None and g.table is None


def test_positions_are_token_order_within_each_expert():
    routes, counts = hash_routes(np.array([3, 1, 3, 0, 1, 3]), np.array([1, 0, 0, 1]), 2)
    np.testing.assert_array_equal(routes.expert_index[:, 0], [1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(routes.position[:, 0], [0, 0, 1, 2, 1, 3])
    np.testing.assert_array_equal(counts, [2, 4])


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def _fmix32_u32(h):
    """MurmurHash3 fmix32 written independently in NumPy uint32 (wrap-around arithmetic)."""
    h = h.astype(np.uint32)
    with np.errstate(over="ignore"):
        h ^= h >> np.uint32(16)
        h = h * np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h = h * np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def reference_random_table(ids, E, seed, layer):
    g = np.uint32(0x9E3779B9)
    with np.errstate(over="ignore"):
        k = _fmix32_u32(np.array([seed], dtype=np.uint64).astype(np.uint32) + g)
        k = _fmix32_u32((k ^ np.uint32(layer)) + g)
        h = _fmix32_u32((ids.astype(np.uint32) ^ k) + g)
    return (h % np.uint32(E)).astype(np.int64)


def test_fmix32_known_values():
    # MurmurHash3 fmix32 reference values (e.g. fmix32(1) = 0x514E28B7)
    np.testing.assert_array_equal(_fmix32_u32(np.array([0, 1])), np.array([0, 0x514E28B7], dtype=np.uint32))
    from moeref.hash_routing import _fmix32

    assert _fmix32(1) == 0x514E28B7 and _fmix32(0xFFFFFFFF) == int(_fmix32_u32(np.array([0xFFFFFFFF]))[0])


@pytest.mark.parametrize("seed, layer", [(0, 0), (1, 3), (2**32 - 1, 2**32 - 1)])
def test_random_table_equals_uint32_reference_and_is_roughly_uniform(seed, layer):
    ids = np.arange(20000)
    table = random_hash_table(ids, 8, seed=seed, layer=layer)
    np.testing.assert_array_equal(table, reference_random_table(ids, 8, seed, layer))
    counts = np.bincount(table, minlength=8)
    assert np.all(np.abs(counts - 2500) < 5 * np.sqrt(2500))


def test_random_tables_differ_per_layer_and_seed():
    ids = np.arange(1000)
    base = random_hash_table(ids, 4, seed=7, layer=0)
    for other in (random_hash_table(ids, 4, seed=7, layer=1), random_hash_table(ids, 4, seed=8, layer=0)):
        assert 0.6 < np.mean(base != other) < 0.9  # about 3/4 of the ids move
    np.testing.assert_array_equal(base[[5, 9]], random_hash_table(np.array([5, 9]), 4, seed=7, layer=0))


def greedy_reference(counts, E):
    loads = [0] * E
    table = [0] * len(counts)
    for v in sorted(range(len(counts)), key=lambda v: (-counts[v], v)):
        e = min(range(E), key=lambda e: (loads[e], e))
        table[v] = e
        loads[e] += counts[v]
    return np.array(table)


@given(seed=st.integers(0, 2**31 - 1), V=st.integers(1, 40), E=st.integers(1, 6))
def test_balanced_table_is_the_greedy_and_balanced_property(seed, V, E):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=V) * rng.integers(0, 2, size=V) + rng.integers(0, 3, size=V)  # ties, zeros
    table = balanced_hash_table(counts, E)
    np.testing.assert_array_equal(table, greedy_reference(counts.tolist(), E))
    loads = np.bincount(table, weights=counts, minlength=E)
    assert loads.max() - loads.min() <= counts.max()  # the greedy's balance guarantee
    floats = balanced_hash_table(counts.astype(np.float64) / 8.0, E)
    np.testing.assert_array_equal(floats, table)  # frequencies instead of counts (exact scaling): same table


def test_balanced_table_zipf_counts():
    counts = (10000 / np.arange(1, 1001)).astype(np.int64)  # Zipf-like vocabulary
    table = balanced_hash_table(counts, 16)
    loads = np.bincount(table, weights=counts, minlength=16)
    assert table[0] == 0 and table[1] == 1  # the most frequent ids go to the empty experts first
    assert loads[0] == counts[0] and loads[1] == counts[1]  # each alone exceeds a fair share: nothing joins them
    assert np.ptp(loads[2:]) <= counts[2] and np.ptp(loads[2:]) / loads[2:].mean() < 0.01  # the rest nearly equal


@given(seed=st.integers(0, 2**31 - 1))
def test_layer_is_token_permutation_equivariant_property(seed):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, E, size=V)
    ids = rng.integers(0, V, size=T)
    x = rng.normal(size=(T, D))
    experts = make_expert_params(rng, E, D, I, RELU_FFN, bias=True)
    perm = rng.permutation(T)
    a, b = hash_layer(x, ids, table, experts, RELU_FFN), hash_layer(x[perm], ids[perm], table, experts, RELU_FFN)
    assert_close(b.y, a.y[perm], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(a.counts, b.counts)
    # relabelling the experts (and permuting their weights alike) leaves the output unchanged
    q = rng.permutation(E)
    relabelled = type(experts)(*(None if w is None else w[np.argsort(q)] for w in experts))
    c = hash_layer(x, ids, q[table], relabelled, RELU_FFN)
    assert_close(c.y, a.y, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Every backend equals NumPy (one shape)
# --------------------------------------------------------------------------------------------


def test_hash_routing_agrees_across_backends(backend):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, size=T)
    x = rng.normal(size=(T, D))
    experts = make_expert_params(rng, E, D, I, SWIGLU, bias=True)
    counts = rng.integers(0, 20, size=V)
    ct = rng.normal(size=(T, D))

    def run(x, ids, counts, experts, ct, vocab):
        table = random_hash_table(vocab, E, seed=123, layer=2)
        out = hash_layer(x, ids, table, experts, SWIGLU)
        g = hash_layer_vjp(x, ids, table, experts, SWIGLU, ct)
        return (table, balanced_hash_table(counts, E), out.y, out.routes, out.counts, g.x, g.experts)

    args = (x, ids, counts, experts, ct, np.arange(V))
    want = run(*args)
    got = backend.tree_to_numpy(run(*(backend.tree_from_numpy(a) for a in args)))
    for a, b in zip(leaves(got), leaves(want)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, D))
    experts = make_expert_params(rng, E, D, I, RELU_FFN)
    table = rng.integers(0, E, size=V)
    ids = rng.integers(0, V, size=T)
    with pytest.raises(ValueError, match="token_ids has values up to 70 but the hash table covers a vocabulary of 11"):
        hash_layer(x, np.where(np.arange(T) == 0, 70, ids), table, experts, RELU_FFN)
    with pytest.raises(ValueError, match="token_ids has negative values \\(min -3\\)"):
        hash_layer(x, np.where(np.arange(T) == 0, -3, ids), table, experts, RELU_FFN)
    with pytest.raises(TypeError, match="token_ids must have an integer dtype"):
        hash_layer(x, ids.astype(np.float64), table, experts, RELU_FFN)
    with pytest.raises(TypeError, match="table must have an integer dtype"):
        hash_layer(x, ids, table.astype(np.float64), experts, RELU_FFN)
    with pytest.raises(ValueError, match="table must be 1-dimensional.*tables\\[layer\\]"):
        hash_layer(x, ids, np.stack([table, table]), experts, RELU_FFN)
    with pytest.raises(ValueError, match="table has values up to 9 but the layer has E=5 experts"):
        hash_layer(x, ids, np.where(np.arange(V) == 2, 9, table), experts, RELU_FFN)
    with pytest.raises(ValueError, match="table has negative values"):
        hash_layer(x, ids, np.where(np.arange(V) == 2, -1, table), experts, RELU_FFN)
    with pytest.raises(ValueError, match="token_ids has shape \\(6,\\) but \\(7,\\) was expected"):
        hash_layer(x, ids[:6], table, experts, RELU_FFN)
    with pytest.raises(ValueError, match="cotangent"):
        hash_layer_vjp(x, ids, table, experts, RELU_FFN, np.ones((T, D + 1)))
    with pytest.raises(ValueError, match="seed must be at least 0"):
        random_hash_table(np.arange(4), 2, seed=-1)
    with pytest.raises(ValueError, match="layer must be at least 0 and at most 4294967295"):
        random_hash_table(np.arange(4), 2, seed=0, layer=2**32)
    with pytest.raises(ValueError, match="vocab_ids has negative values"):
        random_hash_table(np.array([-1, 2]), 2, seed=0)
    with pytest.raises(ValueError, match="counts must be non-negative"):
        balanced_hash_table(np.array([3, -1]), 2)
    with pytest.raises(ValueError, match="counts must be 1-dimensional"):
        balanced_hash_table(np.ones((2, 2)), 2)
    with pytest.raises(TypeError, match="counts must be an integer or real floating array"):
        balanced_hash_table(np.array([True, False]), 2)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        hash_layer(x, torch.from_numpy(ids), table, experts, RELU_FFN)

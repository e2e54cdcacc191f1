"""The sharded (Dask) path computes the same layer as the single-process path."""

from __future__ import annotations

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("safetensors")

from moeref.backends.distributed import (  # noqa: E402
    expert_assignment,
    load_expert,
    save_experts,
    sharded_sparse_moe_layer,
)
from moeref.capacity import CapacityOptions  # noqa: E402
from moeref.expert_ffn import ExpertFFNParams, SWIGLU  # noqa: E402
from moeref.presets import mixtral, switch  # noqa: E402
from moeref.router import RouterParams  # noqa: E402
from moeref.sparse_moe import SparseMoEParams, sparse_moe_layer  # noqa: E402

T, d, I, E = 64, 6, 5, 6


@pytest.fixture(scope="module")
def client():
    # two worker processes, as on a real cluster (each maps only its own experts)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(T, d))
    router = RouterParams(rng.normal(size=(d, E)))
    experts = ExpertFFNParams(w_in=rng.normal(size=(E, d, 2 * I)) / 3, w_out=rng.normal(size=(E, I, d)) / 3)
    folder = save_experts(experts, tmp_path_factory.mktemp("experts"))
    return x, router, experts, folder


def test_memory_mapped_expert_round_trip(layer):
    _, _, experts, folder = layer
    one = load_expert(folder, 3)
    assert isinstance(one.w_in, np.memmap)
    np.testing.assert_array_equal(one.w_in[0], experts.w_in[3])
    np.testing.assert_array_equal(one.w_out[0], experts.w_out[3])
    assert one.b_in is None


@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_sharded_layer_equals_single_process_dropless(client, layer, chunk_tokens):
    x, router, experts, folder = layer
    options = mixtral(k=2)
    ref = sparse_moe_layer(x, SparseMoEParams(router, experts), options)
    out = sharded_sparse_moe_layer(client, x, router, folder, options, chunk_tokens=chunk_tokens)
    np.testing.assert_allclose(out.y, ref.y, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(out.expert_index, ref.routes.expert_index)
    np.testing.assert_array_equal(out.counts, np.asarray(ref.counts_after).sum(axis=0))
    # every worker mapped only experts it owns
    for w, mapped in out.opened.items():
        assert set(mapped) <= set(out.owner[w])
    assert len(out.owner) == 2


def test_sharded_layer_with_capacity_groups(client, layer):
    x, router, experts, folder = layer
    base = switch(capacity=4, group_size=16)
    options = type(base)(**{**base.__dict__, "ffn": SWIGLU})
    ref = sparse_moe_layer(x, SparseMoEParams(router, experts), options)
    assert not np.asarray(ref.routes.kept).all()  # some routes dropped
    out = sharded_sparse_moe_layer(client, x, router, folder, options, chunk_tokens=32)
    np.testing.assert_allclose(out.y, ref.y, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(out.kept, ref.routes.kept)


def test_chunks_must_hold_whole_routing_groups(client, layer):
    x, router, _, folder = layer
    base = switch(capacity=4, group_size=16)
    options = type(base)(**{**base.__dict__, "ffn": SWIGLU})
    with pytest.raises(ValueError, match="chunk_tokens=24 must be a multiple of options.capacity.group_size=16"):
        sharded_sparse_moe_layer(client, x, router, folder, options, chunk_tokens=24)
    global_cap = type(base)(**{**base.__dict__, "ffn": SWIGLU, "capacity": CapacityOptions(capacity_factor=1.0)})
    with pytest.raises(ValueError, match="group_size=None"):
        sharded_sparse_moe_layer(client, x, router, folder, global_cap, chunk_tokens=32)


def test_bad_folder_and_expert_count(client, layer, tmp_path):
    x, router, _, folder = layer
    with pytest.raises(FileNotFoundError, match="save_experts"):
        sharded_sparse_moe_layer(client, x, router, tmp_path, mixtral())
    with pytest.raises(ValueError, match="holds 6 experts but router.weight has E=4"):
        sharded_sparse_moe_layer(client, x, RouterParams(router.weight[:, :4]), folder, mixtral())


def test_expert_assignment_is_contiguous_and_balanced():
    owner = expert_assignment(7, ["a", "b", "c"])
    assert owner == {"a": [0, 1], "b": [2, 3], "c": [4, 5, 6]}
    with pytest.raises(ValueError, match="no workers"):
        expert_assignment(4, [])

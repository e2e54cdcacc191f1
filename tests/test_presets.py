"""Presets: every preset runs the layer forward and VJP; the conventions matrix round-trips and is current.

The VJP of every preset is compared with `torch.autograd` through moeref's own forward (at the
preset's defaults, E = 16 experts) and, for the presets of real training rules (noise, random
second experts, random token selection, Lp normalisation), with finite differences on a smaller
problem, all draws held fixed. The committed pages docs/sparse/conventions_matrix.md and
docs/sparse/presets.md must equal what docs/scripts/conventions_matrix.py generates.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeref.backends._base import map_tree
from moeref.capacity import CapacityDraws
from moeref.core import array_namespace
from moeref.expert_ffn import ExpertFFNParams
from moeref.presets import (
    MISSING,
    PRESETS,
    conventions_table,
    deepspeed_top1,
    deepspeed_top2,
    deepspeed_topk,
    fairseq_top2,
    gshard_top2,
    options_from_column,
    preset_source,
    shazeer2017,
    switch,
    vmoe,
)
from moeref.router import RouterDraws, RouterParams
from moeref.shared_experts import SharedExpertParams
from moeref.sparse_moe import SparseMoEAuxCotangents, SparseMoEDraws, SparseMoEOptions, SparseMoEParams, sparse_moe_layer, sparse_moe_layer_vjp
from helpers import assert_vjp_correct, leaves, relative_error, torch_vjp

ROOT = Path(__file__).resolve().parents[1]
T, D, I = 8, 3, 2


def make_params(rng, options, E):
    """Router and expert parameters of the layout ``options`` needs (biases everywhere)."""
    ffn = options.ffn
    K = 2 * I if ffn.fused else I
    router = RouterParams(
        weight=rng.normal(size=(D, E)),
        noise_weight=rng.normal(size=(D, E)) if options.router.noisy_top_k else None,
    )
    experts = ExpertFFNParams(
        w_in=rng.normal(size=(E, D, K)),
        w_out=rng.normal(size=(E, I, D)),
        b_in=rng.normal(size=(E, K)),
        b_out=rng.normal(size=(E, D)),
        w_up=rng.normal(size=(E, D, I)) if ffn.gated and ffn.gate_up_layout == "separate" else None,
        b_up=rng.normal(size=(E, I)) if ffn.gated and ffn.gate_up_layout == "separate" else None,
    )
    shared = None
    if options.shared is not None:  # one shared expert of the same layout, and its gate when it has one
        sffn = options.shared.ffn
        SK = 2 * I if sffn.fused else I
        w = options.shared.gate_width
        shared = SharedExpertParams(
            ExpertFFNParams(w_in=rng.normal(size=(1, D, SK)), w_out=rng.normal(size=(1, I, D))),
            gate_weight=rng.normal(size=(D, w)) if w else None,
        )
    return SparseMoEParams(router, experts, shared=shared)


def make_draws(rng, options, E):
    """Exactly the draws the options read (the layer rejects unused ones)."""
    r = options.router
    router = RouterDraws(
        jitter=rng.uniform(1 - r.input_jitter, 1 + r.input_jitter, size=(T, D)) if r.input_jitter > 0 else None,
        noise=rng.normal(size=(T, E)) if r.noisy_top_k else None,
        logit_noise=rng.normal(size=(T, E)) if r.logit_noise_std > 0 else None,
        gumbel=-np.log(-np.log(rng.uniform(size=(T, E)))) if r.gumbel != "none" else None,
        second_expert_uniform=rng.uniform(size=T) if r.second_expert_policy == "random" else None,
    )
    capacity = CapacityDraws(rng.uniform(size=(T, r.k))) if not options.capacity.dropless and options.capacity.priority == "random" else None
    return SparseMoEDraws(router=router, capacity=capacity)


def draws_like(x, draws):
    """The NumPy draws as arrays of ``x``'s library (torch autograd runs the forward on tensors)."""
    if isinstance(x, np.ndarray):
        return draws
    import torch

    return map_tree(lambda a: torch.from_numpy(np.asarray(a).copy()), draws)


def flat_forward(options, draws):
    def forward(x, params):
        out = sparse_moe_layer(x, params, options, draws_like(x, draws))
        xp = array_namespace(out.y)
        return xp.concat([xp.reshape(out.y, (-1,)), xp.stack([out.load_balancing_loss, out.z_loss])])

    return forward


def flat_vjp(options, draws):
    def vjp(x, params, ct):
        n = x.shape[0] * x.shape[1]
        aux = SparseMoEAuxCotangents(float(ct[n]), float(ct[n + 1]))
        return sparse_moe_layer_vjp(x, params, options, np.reshape(ct[:n], x.shape), draws=draws, aux_cotangents=aux)

    return vjp


# --------------------------------------------------------------------------------------------
# Every preset builds and runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_forward_and_vjp_against_torch_autograd(name):
    """Defaults (deepseek_v3 needs E >= 16 for k = 8 in 4 of 8 groups); the layer drops where the preset has a capacity."""
    E = 16
    options = PRESETS[name]()
    assert isinstance(options, SparseMoEOptions)
    rng = np.random.default_rng(sum(map(ord, name)))
    params, draws = make_params(rng, options, E), make_draws(rng, options, E)
    x = rng.normal(size=(T, D))
    out = sparse_moe_layer(x, params, options, draws)
    assert out.y.shape == (T, D) and np.all(np.isfinite(out.y))
    assert out.routes.expert_index.shape == (T, options.router.k)
    assert np.all(out.counts_after <= out.capacity)
    ct = rng.normal(size=T * D + 2)
    analytic = flat_vjp(options, draws)(x, params, ct)
    assert all(np.all(np.isfinite(a)) for a in leaves(analytic))
    reference = torch_vjp(flat_forward(options, draws), (x, params), ct)
    assert relative_error(tuple(analytic), reference) < 1e-10


FD_CASES = {
    "dbrx": lambda: PRESETS["dbrx"](k=2),
    "gshard_top2": lambda: gshard_top2(group_size=4),
    "fairseq_top2": lambda: fairseq_top2(),
    "fairseq_top2_sampling_bpr": lambda: fairseq_top2(second_expert_policy="sampling", batch_prioritized_routing=True),
    "deepspeed_top1_rsample": lambda: deepspeed_top1(min_capacity=0, noisy_gate_policy="RSample"),
    "deepspeed_top2_jitter": lambda: deepspeed_top2(min_capacity=0, capacity_factor=0.5, noisy_gate_policy="Jitter"),
    "deepspeed_topk": lambda: deepspeed_topk(k=3, min_capacity=0, capacity_factor=0.5),
    "shazeer2017": lambda: shazeer2017(k=2),
    "vmoe": lambda: vmoe(capacity_factor=0.5),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_training_rule_preset_vjp_against_finite_differences(name):
    """E = 4: capacities small enough to drop; the selection is piecewise constant, so a seed whose
    routes sit at a tie could fail, and the seeds are fixed."""
    E = 4
    options = FD_CASES[name]()
    rng = np.random.default_rng(sum(map(ord, name)))
    params, draws = make_params(rng, options, E), make_draws(rng, options, E)
    x = rng.normal(size=(T, D))
    out = sparse_moe_layer(x, params, options, draws)
    if not options.capacity.dropless:
        assert not np.all(out.routes.kept), "the case should drop routes"
    ct = rng.normal(size=T * D + 2)
    assert_vjp_correct(f"preset[{name}]", flat_forward(options, draws), flat_vjp(options, draws), (x, params), ct, autograd=())


def test_preset_conventions_that_the_matrix_summarises():
    assert gshard_top2().router.normalize_eps == 1e-9 and not gshard_top2().normalize_after_capacity
    assert fairseq_top2().normalize_after_capacity and not fairseq_top2(normalize_gate_prob_before_dropping=True).normalize_after_capacity
    assert fairseq_top2(second_expert_policy="sampling").router.gumbel == "selection_after_first"
    assert deepspeed_top1(use_rts=False).capacity.priority == "rank_major"
    assert deepspeed_top1(drop_tokens=False).capacity.dropless
    assert deepspeed_top1(noisy_gate_policy="Jitter").router.input_jitter == 0.01
    assert not deepspeed_top1(noisy_gate_policy="Jitter").router.jitter_experts
    assert PRESETS["dbrx"](moe_jitter_eps=0.01).router.jitter_experts  # HF scales hidden_states in place
    assert PRESETS["dbrx"](moe_normalize_expert_weights=None).router.normalize == "none"
    assert vmoe(noise_std=0.0).router.logit_noise_std == 0.0 and vmoe(batch_priority=False).capacity.priority == "rank_major"
    assert not shazeer2017(noisy=False).router.noisy_top_k


def test_preset_bad_inputs():
    with pytest.raises(ValueError, match="second_expert_policy must be one of"):
        gshard_top2(second_expert_policy="sampling")
    with pytest.raises(ValueError, match="second_expert_policy must be one of"):
        fairseq_top2(second_expert_policy="threshold")
    with pytest.raises(ValueError, match="noisy_gate_policy must be None or 'Jitter' for top-2"):
        deepspeed_top2(noisy_gate_policy="RSample")
    with pytest.raises(ValueError, match="noisy_gate_policy must be None, 'Jitter' or 'RSample'"):
        deepspeed_top1(noisy_gate_policy="Gumbel")
    with pytest.raises(ValueError, match="drop_policy must be one of"):
        deepspeed_topk(drop_policy="random")
    with pytest.raises(ValueError, match="capacity_factor must be a finite positive number"):
        vmoe(capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        gshard_top2(capacity_factor=-1.0)
    with pytest.raises(TypeError, match="use_rts must be a bool"):
        deepspeed_top1(use_rts=1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        PRESETS["dbrx"](k=0)
    with pytest.raises(ValueError, match="name must be one of"):
        preset_source("gshard")


def test_every_preset_names_its_source_and_version():
    for name in PRESETS:
        summary, source = preset_source(name)
        assert summary and source.startswith("Source:"), name
        assert any(tag in source for tag in (" v5.24.0", " v0.19.8", "commit", "arXiv:")), f"{name}: no version in {source!r}"


# --------------------------------------------------------------------------------------------
# Conventions matrix
# --------------------------------------------------------------------------------------------


def _columns(rows):
    names = list(rows[0].values)
    return {n: {r.option: r.values[n] for r in rows} for n in names}


def test_detailed_table_round_trips_every_preset():
    for name, column in _columns(conventions_table(detailed=True)).items():
        assert options_from_column(column) == PRESETS[name](), name


def test_detailed_table_round_trips_non_default_presets():
    presets = {
        "switch": switch(capacity=3, group_size=4),
        "deepspeed_top2": deepspeed_top2(num_tokens=10, num_experts=2, capacity_factor=1.1),
        "vmoe": vmoe(batch_priority=False, noise_std=0.0),
        "fairseq_top2": fairseq_top2(second_expert_policy="sampling", batch_prioritized_routing=True),
    }
    for name, column in _columns(conventions_table(presets, detailed=True)).items():
        assert options_from_column(column) == presets[name], name


@given(
    k=st.integers(1, 4),
    cf=st.floats(0.1, 4.0, allow_nan=False),
    group=st.one_of(st.none(), st.integers(1, 64)),
    bpr=st.booleans(),
    noise=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_conventions_round_trip_property(k, cf, group, bpr, noise):
    options = vmoe(k=k, capacity_factor=cf, group_size=group, batch_priority=bpr, noise_std=noise)
    column = _columns(conventions_table({"v": options}, detailed=True))["v"]
    assert options_from_column(column) == options


def test_summary_rows_read_every_option_field():
    rows = conventions_table()
    detailed = conventions_table(detailed=True)
    fields = {r.option for r in detailed}
    read = set().union(*(r.keys for r in rows))
    assert read == fields  # every field appears in the summary, in a convention row or its own
    for r in rows:
        assert set(r.values) == set(PRESETS) and all(r.values.values())
    by_option = {r.option: r.values for r in rows}
    assert by_option["capacity"]["gshard_top2"] == "`floor`(c·T/E), c = `2.0`, at most T"
    assert by_option["drop priority"]["vmoe"] == "`batch_prioritized`"
    assert by_option["weight normalisation"]["fairseq_top2"] == "`sum_clamp` (ε = `finfo_eps`), after capacity"


@dataclasses.dataclass(frozen=True)
class _NewRecord:
    mode: str = "gated"
    count: int = 2


@dataclasses.dataclass(frozen=True)
class _ExtendedOptions(SparseMoEOptions):
    """A future option record and a plain field, as another module might add them."""

    brand_new: _NewRecord | None = None
    brand_new_coef: float = 0.0


def test_matrix_picks_up_new_option_fields():
    presets = {"a": _ExtendedOptions(brand_new=_NewRecord()), "b": _ExtendedOptions(brand_new_coef=0.5)}
    summary = {r.option: r.values for r in conventions_table(presets)}
    assert summary["`brand_new.mode`"] == {"a": "`gated`", "b": MISSING}
    assert summary["`brand_new`"] == {"a": MISSING, "b": "`None`"}
    assert summary["`brand_new_coef`"] == {"a": "`0.0`", "b": "`0.5`"}
    for name, column in _columns(conventions_table(presets, detailed=True)).items():
        assert options_from_column(column, options_type=_ExtendedOptions) == presets[name]
    with pytest.raises(TypeError, match="options_type"):
        options_from_column({}, options_type=dict)
    with pytest.raises(TypeError, match="SparseMoEOptions"):
        conventions_table({"x": "mixtral"})


def _load_page_script():
    spec = importlib.util.spec_from_file_location("conventions_matrix", ROOT / "docs" / "scripts" / "conventions_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_equal_the_regenerated_text():
    script = _load_page_script()
    for page, text in ((script.MATRIX_PAGE, script.matrix_page()), (script.PRESETS_PAGE, script.presets_page())):
        assert page.read_text(encoding="utf-8") == text, f"{page.name} is stale: run python docs/scripts/conventions_matrix.py"

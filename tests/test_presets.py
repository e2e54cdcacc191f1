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
import math
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


def _gate_losses(options):
    """The importance / load losses the preset computes (``SparseMoEOutput`` field names)."""
    return tuple(name for name in ("importance_loss", "load_loss") if getattr(options, name) is not None)


def flat_forward(options, draws):
    """y, the balancing loss, the z-loss and the preset's importance / load losses, as one vector."""

    def forward(x, params):
        out = sparse_moe_layer(x, params, options, draws_like(x, draws))
        xp = array_namespace(out.y)
        losses = [out.load_balancing_loss, out.z_loss] + [getattr(out, name) for name in _gate_losses(options)]
        return xp.concat([xp.reshape(out.y, (-1,)), xp.stack(losses)])

    return forward


def flat_vjp(options, draws):
    def vjp(x, params, ct):
        n = x.shape[0] * x.shape[1]
        gate = {name.removesuffix("_loss"): float(ct[n + 2 + i]) for i, name in enumerate(_gate_losses(options))}
        aux = SparseMoEAuxCotangents(float(ct[n]), float(ct[n + 1]), **gate)
        return sparse_moe_layer_vjp(x, params, options, np.reshape(ct[:n], x.shape), draws=draws, aux_cotangents=aux)

    return vjp


def _n_out(options):
    return T * D + 2 + len(_gate_losses(options))


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
    ct = rng.normal(size=_n_out(options))
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
    ct = rng.normal(size=_n_out(options))
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
    # importance and load losses with the papers' / reference code's coefficients
    sh = shazeer2017()
    assert (sh.importance_loss, sh.load_loss, sh.importance_loss_coef, sh.load_loss_coef) == ("shazeer2017", "shazeer2017", 0.01, 0.01)
    assert sh.router.noise_epsilon == sh.shazeer_loss.noise_epsilon == 0.01  # tensor2tensor's noise floor
    assert shazeer2017(noisy=False).load_loss is None and shazeer2017(noisy=False).router.noise_epsilon == 0.0
    v = vmoe()
    assert (v.importance_loss, v.load_loss, v.importance_loss_coef, v.load_loss_coef) == ("vmoe", "vmoe", 0.005, 0.005)
    assert vmoe(noise_std=0.0).load_loss is None and vmoe(noise_std=0.0).importance_loss == "vmoe"
    # capacity arithmetic of each system; fairseq's BPR key; the GShard paper's slot rule
    assert all(f().capacity.arithmetic == "deepspeed_float32" for f in (deepspeed_top1, deepspeed_top2, deepspeed_topk))
    assert gshard_top2().capacity.arithmetic == fairseq_top2().capacity.arithmetic == vmoe().capacity.arithmetic == "python_float"
    assert fairseq_top2(batch_prioritized_routing=True).capacity.priority_values == "router_scores"
    assert gshard_top2(dropped_second_takes_slot=True).capacity.dropped_routes_take_slots and not gshard_top2().capacity.dropped_routes_take_slots


def fairseq_top2gating(logits, uniform, *, normalize_before, bpr):
    """fairseq ``top2gating`` (``fairseq/modules/moe/top2gate.py``, commit 26d62ae8) with
    ``second_expert_policy="random"``, transliterated to NumPy float64: combine weights (T, E)
    summed over the capacity axis. Tie-free inputs (the peer's ``argsort`` is not stable)."""
    z = logits - logits.max(axis=1, keepdims=True)
    gates = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n, e = gates.shape
    capacity = 2 * math.ceil(n / e)
    eye = np.eye(e)
    mask1 = eye[np.argmax(gates, axis=1)]
    mask2 = eye[np.argmax(np.where(mask1 > 0, -np.inf, logits), axis=1)]
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    if normalize_before:
        denom = np.maximum(g1 + g2, np.finfo(np.float64).eps)
        g1, g2 = g1 / denom, g2 / denom
    mask2 = mask2 * (2 * g2 > uniform)[:, None]
    order = np.argsort(-gates.max(axis=1), kind="stable") if bpr else np.arange(n)
    inv = np.argsort(order)
    loc1 = ((np.cumsum(mask1[order], axis=0) - 1) * mask1[order])[inv]
    loc2 = ((np.cumsum(mask2[order], axis=0) - 1) * mask2[order])[inv] + mask1.sum(0, keepdims=True)
    mask1, mask2 = mask1 * (loc1 < capacity), mask2 * (loc2 < capacity)
    if not normalize_before:
        g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        denom = np.maximum(g1 + g2, np.finfo(np.float64).eps)
        g1, g2 = g1 / denom, g2 / denom
    return g1[:, None] * mask1 + g2[:, None] * mask2


@pytest.mark.parametrize("normalize_before", [False, True])
@pytest.mark.parametrize("bpr", [False, True])
def test_fairseq_top2_preset_matches_top2gating(normalize_before, bpr):
    """Exact for every combination, batch-prioritised routing by the raw top-1 probability included."""
    n, e = 16, 4  # capacity 2 * ceil(16 / 4) = 8 per expert for 32 routes
    rng = np.random.default_rng(0)
    params = make_params(rng, fairseq_top2(), e)
    params = params._replace(router=params.router._replace(weight=params.router.weight + np.array([1.5, 0.5, 0.0, 0.0])))
    x = np.concatenate([rng.normal(size=(n, D - 1)), np.ones((n, 1))], axis=1)  # a constant feature: a skewed router
    uniform = rng.uniform(size=n)
    options = fairseq_top2(normalize_gate_prob_before_dropping=normalize_before, batch_prioritized_routing=bpr)
    draws = SparseMoEDraws(router=RouterDraws(second_expert_uniform=uniform))
    want = fairseq_top2gating(x @ params.router.weight, uniform, normalize_before=normalize_before, bpr=bpr)

    def combine(opts):
        out = sparse_moe_layer(x, params, opts, draws)
        assert out.capacity == 8 and np.any(out.counts_before > 8), "the case should drop routes"
        c = np.zeros((n, e))
        for j in range(2):
            c[np.arange(n), out.routes.expert_index[:, j]] += out.routes.weight[:, j]
        return c

    np.testing.assert_allclose(combine(options), want, rtol=1e-13, atol=1e-15)
    if normalize_before and bpr:  # ordering by the normalised weight instead is a different rule here
        by_weight = dataclasses.replace(options, capacity=dataclasses.replace(options.capacity, priority_values="weights"))
        assert np.max(np.abs(combine(by_weight) - want)) > 0.1


def test_gshard_paper_slot_rule_through_the_preset():
    """``dropped_second_takes_slot=True``: a second route dropped by the coin still holds its slot."""
    rng = np.random.default_rng(11)
    options = gshard_top2(second_expert_policy="random", second_expert_threshold=0.5)
    paper = gshard_top2(second_expert_policy="random", second_expert_threshold=0.5, dropped_second_takes_slot=True)
    differ = 0
    for _ in range(10):
        params, x = make_params(rng, options, 4), rng.normal(size=(T, D))
        draws = SparseMoEDraws(router=RouterDraws(second_expert_uniform=rng.uniform(size=T)))
        a, b = sparse_moe_layer(x, params, options, draws), sparse_moe_layer(x, params, paper, draws)
        assert np.all(b.routes.kept <= a.routes.kept)  # holding slots for dropped routes only drops more
        coin = a.router.routes.kept[:, 1]
        C, idx = a.capacity, a.routes.expert_index
        counter, want = np.zeros(4, dtype=int), np.zeros((T, 2), bool)  # Algorithm 1, lines 4-23
        for j in range(2):
            for t in range(T):
                want[t, j] = counter[idx[t, j]] < C and (j == 0 or coin[t])
                counter[idx[t, j]] += 1
        np.testing.assert_array_equal(b.routes.kept, want)
        differ += not np.array_equal(a.routes.kept, b.routes.kept)
    assert differ > 0


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
    with pytest.raises(TypeError, match="dropped_second_takes_slot must be a bool"):
        gshard_top2(dropped_second_takes_slot=1)
    with pytest.raises(ValueError, match="loss_coef must be a finite number >= 0"):
        shazeer2017(loss_coef=-0.1)
    with pytest.raises(ValueError, match="load_loss_weight must be a finite number >= 0"):
        vmoe(load_loss_weight=float("nan"))


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
        "gshard_top2": gshard_top2(dropped_second_takes_slot=True),
        "shazeer2017": shazeer2017(noisy=False, loss_coef=0.1),
        "deepspeed_topk": deepspeed_topk(k=3, capacity_factor=1.1),
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
    assert by_option["capacity"]["gshard_top2"] == "`floor`(c·T/E), c = `2.0`, at most T, in `python_float` arithmetic"
    assert by_option["drop priority"]["vmoe"] == "`batch_prioritized` by `weights`"
    assert by_option["importance and load losses"]["vmoe"] == "importance `vmoe` × `0.005`; load `vmoe` × `0.005`"
    assert by_option["importance and load losses"]["mixtral"] == "none"
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


def test_preset_keywords_are_checked_under_their_own_names():
    from moeref.presets import dbrx, deepseek_v3

    with pytest.raises(ValueError, match="n_shared_experts must be at least 0, got -1"):
        deepseek_v3(n_shared_experts=-1)
    with pytest.raises(TypeError, match="n_shared_experts must be an int, got float 1.5"):
        deepseek_v3(n_shared_experts=1.5)
    assert deepseek_v3(n_shared_experts=0).shared is None
    for bad in (math.nan, -1.0):
        with pytest.raises(ValueError, match="moe_jitter_eps must be a finite number >= 0"):
            dbrx(moe_jitter_eps=bad)
        with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
            vmoe(noise_std=bad)
    with pytest.raises(ValueError, match=r"moe_jitter_eps must be below 1 \(factors in \[1 - eps, 1 \+ eps\] must stay positive\), got 1.0"):
        dbrx(moe_jitter_eps=1.0)
    assert dbrx(moe_jitter_eps=0.01).router.jitter_experts and vmoe(noise_std=0.0).load_loss is None


def test_options_from_column_names_the_bad_cell():
    with pytest.raises(ValueError, match=r"column\['router.k'\] = 'bogus' is not a Python literal"):
        options_from_column({"router.k": "bogus"})
    with pytest.raises(TypeError, match=r"column\['router.k'\] must be a str .*got NoneType None"):
        options_from_column({"router.k": None})
    with pytest.raises(TypeError, match="column must be a dict"):
        options_from_column([("router.k", "2")])
    assert options_from_column({"router.k": "2"}).router.k == 2

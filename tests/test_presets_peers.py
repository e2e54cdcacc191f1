"""The DeepSpeed and DBRX presets against the installed implementations, with tokens dropped.

Peers (each skipped cleanly when not installed):

* microsoft/DeepSpeed v0.19.8 `deepspeed/moe/sharded_moe.py`: `top1gating` (random token
  selection, Gumbel `RSample`), `top2gating` (Gumbel second expert; float32 only), `topkgating`
  (`drop_policy` "probs" and "position"), `_capacity`. The peer draws its own noise: the draws
  are fixed by putting a function that returns our draws into its `gumbel_map` /
  `exp_selection_uniform_map` caches (restored after each test), and the peer gets copies of
  the logits (`top2gating` adds its Gumbel noise to them in place). The peer's dense
  `combine_weights (T, E, C)` numbers the kept routes of an expert in token order (`top1gating`,
  `topkgating`) or rank-major (`top2gating`, the order of moeref's `Routes.position`); it is
  compared with moeref's kept routes and weights laid out the same way. The layer output is compared with
  the GShard combine of the same expert FFNs.
* huggingface/transformers v5.24.0 `models/dbrx/modeling_dbrx.py`: `DbrxFFN` (router, Lp
  normalisation, separate `w1`/`v1`/`w2` experts) in float64, and `load_balancing_loss_func`.

Inputs are random and tie-free (the peers use `torch.topk` / `argmax`, whose tie order is not
specified); the presets compute the capacity in DeepSpeed's float32 arithmetic
(`CapacityOptions.arithmetic="deepspeed_float32"`), so no size has to be pinned.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeref.capacity import CapacityDraws, CapacityOptions, expert_capacity
from moeref.expert_ffn import ExpertFFNParams
from moeref.presets import dbrx, deepspeed_capacity, deepspeed_top1, deepspeed_top2, deepspeed_topk
from moeref.router import RouterDraws, RouterParams
from moeref.sparse_moe import SparseMoEAuxCotangents, SparseMoEDraws, SparseMoEParams, sparse_moe_layer, sparse_moe_layer_vjp

torch = pytest.importorskip("torch")

T, D, I, E = 32, 6, 5, 4


@pytest.fixture(scope="module")
def sharded_moe():
    pytest.importorskip("deepspeed")
    import deepspeed.moe.sharded_moe as sm

    return sm


def _case(seed, *, dtype=np.float64):
    """x (T, d), router weight (d, E), ReLU experts with biases; all exactly representable in ``dtype``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(dtype).astype(np.float64)
    W = (1.5 * rng.normal(size=(D, E))).astype(dtype).astype(np.float64)
    experts = ExpertFFNParams(
        w_in=rng.normal(size=(E, D, I)), w_out=rng.normal(size=(E, I, D)), b_in=rng.normal(size=(E, I)), b_out=rng.normal(size=(E, D))
    )
    return rng, x, SparseMoEParams(RouterParams(W), experts)


def _margin(values, k):
    """Smallest gap between the k-th and (k+1)-th largest entry of each row."""
    s = -np.sort(-values, axis=1)
    return float(np.min(s[:, k - 1] - s[:, k]))


def _softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _expert_outputs(x, experts):
    """FFN_e(x_t) for every token and expert, (E, T, d)."""
    h = np.maximum(np.einsum("td,edi->eti", x, experts.w_in) + experts.b_in[:, None, :], 0.0)
    return np.einsum("eti,eid->etd", h, experts.w_out) + experts.b_out[:, None, :]


def _dense_combine(routes, capacity, slots):
    """moeref's kept routes as DeepSpeed's dense combine tensor (T, E, C).

    ``slots="token"``: an expert's kept routes fill its slots in token order (``top1gating``,
    ``topkgating``); ``"position"``: the slot is moeref's position, i.e. the rank-major priority
    order (``top2gating``: ``locations2 += sum(mask1)``).
    """
    combine = np.zeros((T, E, capacity))
    fill = np.zeros(E, dtype=int)
    for t in range(T):  # test-side reference layout, not library code
        for j in np.argsort(routes.expert_index[t]):  # routes of one token go to distinct experts
            if routes.kept[t, j]:
                e = routes.expert_index[t, j]
                slot = fill[e] if slots == "token" else routes.position[t, j]
                combine[t, e, slot] = routes.weight[t, j]
                fill[e] += 1
    return combine


def _gshard_combine_output(combine, x, experts):
    """y_t = sum_{e,c} combine[t, e, c] FFN_e(x_t): the einsum dispatch/combine of DeepSpeed's MOELayer."""
    return np.einsum("te,etd->td", combine.sum(axis=2), _expert_outputs(x, experts))


def _compare(peer, out, x, experts, *, tol, slots="token"):
    """Compare (l_aux, combine_weights, dispatch_mask, exp_counts) with the layer's output; return max errors."""
    l_aux, combine, dispatch, counts = peer
    combine = combine.detach().double().numpy()
    assert combine.shape == (T, E, out.capacity), "capacities differ"
    ours = _dense_combine(out.routes, out.capacity, slots)
    np.testing.assert_array_equal(dispatch.numpy(), ours > 0)
    np.testing.assert_array_equal(counts.numpy(), out.counts_before.sum(axis=0))
    err = {
        "combine": float(np.max(np.abs(combine - ours))),
        "l_aux": abs(float(l_aux) - float(out.load_balancing_loss)) / abs(float(out.load_balancing_loss)),
        "y": float(np.max(np.abs(_gshard_combine_output(combine, x, experts) - out.y))),
    }
    assert err["combine"] < tol and err["l_aux"] < tol and err["y"] < 50 * tol, err
    return err


# --------------------------------------------------------------------------------------------
# DeepSpeed capacity: float32 arithmetic
# --------------------------------------------------------------------------------------------


def test_deepspeed_capacity_is_bitwise_deepspeeds(sharded_moe):
    """`arithmetic="deepspeed_float32"` (and its shortcut `deepspeed_capacity`, and the presets'
    capacity options) equal `_capacity` on a grid; the exact rule differs on a few sizes."""
    exact_differs, total = [], 0
    for n in range(1, 161):
        for e in (2, 3, 7, 8):
            for cf in (0.3, 1.0, 1.1, 1.25):
                for k in (1, 2, 3):
                    total += 1
                    peer = int(sharded_moe._capacity(torch.zeros(n, e), torch.tensor(cf * k), torch.tensor(0)))
                    assert deepspeed_capacity(n, e, cf, k=k) == peer, (n, e, cf, k)
                    ds32 = CapacityOptions(capacity_factor=cf, k_factor="inside", arithmetic="deepspeed_float32")
                    assert expert_capacity(n, e, k, ds32) == peer, (n, e, cf, k)
                    exact = expert_capacity(n, e, k, CapacityOptions(capacity_factor=cf, k_factor="inside"))
                    if exact != peer:
                        exact_differs.append((n, e, cf, k, peer, exact))
    assert (10, 2, 1.1, 2, 11, 12) in exact_differs
    assert 0 < len(exact_differs) < total / 50  # 98 of 7680 with torch 2.13
    for n in (10, 20, 100, 160):  # the presets, as the gates call _capacity (top-1: cf; top-2: cf * 2; top-k: cf * k)
        for cf in (1.1, 1.25):
            top1 = deepspeed_top1(capacity_factor=cf, min_capacity=0).capacity
            assert expert_capacity(n, 2, 1, top1) == int(sharded_moe._capacity(torch.zeros(n, 2), torch.tensor(cf), torch.tensor(0)))
            top2 = deepspeed_top2(capacity_factor=cf, min_capacity=0).capacity
            assert expert_capacity(n, 2, 2, top2) == int(sharded_moe._capacity(torch.zeros(n, 2), torch.tensor(cf * 2), torch.tensor(0)))
            topk = deepspeed_topk(k=3, capacity_factor=cf, min_capacity=0).capacity
            assert expert_capacity(n, 3, 3, topk) == int(sharded_moe._capacity(torch.zeros(n, 3), torch.tensor(cf * 3), torch.tensor(0)))


def test_deepspeed_capacity_min_capacity_and_bad_input():
    assert deepspeed_capacity(8, 4, 1.0, min_capacity=4) == 4
    with pytest.raises(ValueError, match="capacity_factor"):
        deepspeed_capacity(8, 4, 0.0)
    with pytest.raises(ValueError, match="num_tokens and num_experts must be given together"):
        deepspeed_top2(num_tokens=8)


# --------------------------------------------------------------------------------------------
# top1gating
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noisy_gate_policy", [None, "RSample"])
def test_deepspeed_top1_preset_matches_top1gating_with_random_token_selection(sharded_moe, monkeypatch, noisy_gate_policy):
    rng, x, params = _case(0)
    logits = x @ params.router.weight
    uniform = rng.uniform(size=(T, E))
    gumbel = -np.log(-np.log(rng.uniform(size=(T, E))))
    scores = logits + gumbel if noisy_gate_policy else _softmax(logits)
    assert _margin(scores, 1) > 1e-6
    cpu = torch.device("cpu")
    monkeypatch.setitem(sharded_moe.exp_selection_uniform_map, cpu, lambda shape: torch.tensor(uniform))
    monkeypatch.setitem(sharded_moe.gumbel_map, cpu, lambda shape: torch.tensor(gumbel))
    cf = 0.5  # C = ceil(32 / 4 * 0.5) = 4: drops
    peer = sharded_moe.top1gating(
        torch.tensor(logits), cf, 0, noisy_gate_policy=noisy_gate_policy, drop_tokens=True, use_rts=True
    )

    options = deepspeed_top1(capacity_factor=cf, min_capacity=0, noisy_gate_policy=noisy_gate_policy)
    chosen = np.argmax(scores, axis=1)
    draws = SparseMoEDraws(
        router=RouterDraws(gumbel=gumbel) if noisy_gate_policy else None,
        capacity=CapacityDraws(uniform[np.arange(T), chosen][:, None]),  # the draw at the chosen expert
    )
    out = sparse_moe_layer(x, params, options, draws)
    assert out.capacity == 4 and not np.all(out.routes.kept)
    _compare(peer, out, x, params.experts, tol=1e-12)


def test_deepspeed_top1_without_rts_keeps_an_unspecified_subset(sharded_moe):
    """`use_rts=False`: DeepSpeed takes `torch.topk` of a 0/1 column, whose order among the ones is
    unspecified (not token order on CPU); the per-expert kept counts still agree."""
    _, x, params = _case(1)
    logits = x @ params.router.weight
    _, combine, _, counts = sharded_moe.top1gating(torch.tensor(logits), 0.5, 0, noisy_gate_policy=None, use_rts=False)
    out = sparse_moe_layer(x, params, deepspeed_top1(capacity_factor=0.5, min_capacity=0, use_rts=False))
    np.testing.assert_array_equal(counts.numpy(), out.counts_before[0])
    np.testing.assert_array_equal((combine.numpy() > 0).sum(axis=(0, 2)), out.counts_after[0])


# --------------------------------------------------------------------------------------------
# top2gating (float32 only)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [True, False])
def test_deepspeed_top2_preset_matches_top2gating(sharded_moe, monkeypatch, sampling):
    rng, x, params = _case(2, dtype=np.float32)
    logits32 = (x @ params.router.weight).astype(np.float32)
    gumbel = (-np.log(-np.log(rng.uniform(size=(T, E))))).astype(np.float32).astype(np.float64)
    probs = _softmax(logits32.astype(np.float64))
    first = np.argmax(probs, axis=1)
    second_values = np.where(np.arange(E) == first[:, None], -np.inf, logits32 + (gumbel if sampling else 0.0))
    assert _margin(logits32.astype(np.float64), 1) > 1e-3 and _margin(second_values, 1) > 1e-3
    monkeypatch.setitem(sharded_moe.gumbel_map, torch.device("cpu"), lambda shape: torch.tensor(gumbel, dtype=torch.float32))
    cf = 0.5  # C = ceil(32 / 4 * 1.0) = 8 for 64 routes: drops
    peer = sharded_moe.top2gating(torch.tensor(logits32), cf, 0, drop_tokens=True, top2_2nd_expert_sampling=sampling)

    options = deepspeed_top2(capacity_factor=cf, min_capacity=0, top2_2nd_expert_sampling=sampling)
    draws = SparseMoEDraws(router=RouterDraws(gumbel=gumbel)) if sampling else None
    out = sparse_moe_layer(x, params, options, draws)
    assert out.capacity == 8 and not np.all(out.routes.kept)
    _compare(peer, out, x, params.experts, tol=2e-6, slots="position")  # float32 peer


def test_deepspeed_top2_dropless(sharded_moe):
    _, x, params = _case(3, dtype=np.float32)
    logits32 = (x @ params.router.weight).astype(np.float32)
    peer = sharded_moe.top2gating(torch.tensor(logits32), 1.0, 0, drop_tokens=False, top2_2nd_expert_sampling=False)
    out = sparse_moe_layer(x, params, deepspeed_top2(drop_tokens=False, top2_2nd_expert_sampling=False))
    assert np.all(out.routes.kept)
    _compare(peer, out, x, params.experts, tol=2e-6, slots="position")


# --------------------------------------------------------------------------------------------
# topkgating
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_deepspeed_topk_preset_matches_topkgating(sharded_moe, drop_policy):
    k, cf = 3, 0.5  # C = ceil(32 / 4 * 1.5) = 12 for 96 routes: drops
    _, x, params = _case(4)
    logits = x @ params.router.weight
    assert _margin(logits, k) > 1e-6  # softmax is monotone: the logits order the probabilities
    peer = sharded_moe.topkgating(torch.tensor(logits), k, cf, 0, drop_tokens=True, drop_policy=drop_policy)
    options = deepspeed_topk(k=k, capacity_factor=cf, min_capacity=0, drop_policy=drop_policy)
    out = sparse_moe_layer(x, params, options)
    assert out.capacity == 12 and not np.all(out.routes.kept)
    _compare(peer, out, x, params.experts, tol=1e-12)


def test_deepspeed_pinning_keywords_still_give_deepspeeds_capacity():
    """`num_tokens, num_experts` (no longer needed) fix the same float32 value as a capacity."""
    for n, e, cf, k in ((10, 2, 1.1, 2), (T, E, 0.5, 3), (100, 3, 1.25, 3)):
        pinned = deepspeed_topk(k=k, capacity_factor=cf, min_capacity=0, num_tokens=n, num_experts=e).capacity
        assert pinned.capacity == expert_capacity(n, e, k, deepspeed_topk(k=k, capacity_factor=cf, min_capacity=0).capacity)
    assert deepspeed_top2(capacity_factor=1.1, min_capacity=0, num_tokens=10, num_experts=2).capacity.capacity == 11


# --------------------------------------------------------------------------------------------
# HF DBRX
# --------------------------------------------------------------------------------------------

B, S, K_DBRX = 2, 5, 2


@pytest.fixture(scope="module")
def dbrx_module():
    return pytest.importorskip("transformers.models.dbrx.modeling_dbrx")


def _hf_dbrx(dbrx_module, seed, p):
    from transformers import DbrxConfig

    ffn_config = {"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": K_DBRX, "moe_normalize_expert_weights": p}
    config = DbrxConfig(d_model=D, n_heads=2, n_layers=1, ffn_config=ffn_config, attn_config={"kv_n_heads": 1})
    block = dbrx_module.DbrxFFN(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
    return block


def _dbrx_params(block):
    split = lambda w: w.detach().numpy().reshape(E, I, D)  # (E*I, d) -> (E, I, d)
    return SparseMoEParams(
        router=RouterParams(block.router.layer.weight.detach().numpy().T.copy()),  # (d, E)
        experts=ExpertFFNParams(
            w_in=np.swapaxes(split(block.experts.mlp.w1), 1, 2).copy(),  # gate (E, d, I)
            w_up=np.swapaxes(split(block.experts.mlp.v1), 1, 2).copy(),  # up (E, d, I)
            w_out=split(block.experts.mlp.w2).copy(),  # down (E, I, d)
        ),
    )


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_dbrx_preset_matches_hf_dbrx_ffn(dbrx_module, p):
    block = _hf_dbrx(dbrx_module, 5, p)
    params = _dbrx_params(block)
    x = np.random.default_rng(5).normal(size=(B, S, D))
    probs = _softmax(x.reshape(-1, D) @ params.router.weight)
    assert _margin(np.log(probs), K_DBRX) > 1e-6
    with torch.no_grad():
        hf_y = block(torch.tensor(x.copy())).numpy().reshape(B * S, D)
        hf_logits = block.router(torch.tensor(x.copy()))
        hf_lb = dbrx_module.load_balancing_loss_func((hf_logits,), E, K_DBRX)
    out = sparse_moe_layer(x.reshape(B * S, D).copy(), params, dbrx(k=K_DBRX, moe_normalize_expert_weights=p))
    np.testing.assert_allclose(out.y, hf_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(out.load_balancing_loss), float(hf_lb), rtol=1e-6)  # HF accumulates in float32


def test_dbrx_preset_vjp_matches_hf_autograd(dbrx_module):
    block = _hf_dbrx(dbrx_module, 6, 1.0)
    params = _dbrx_params(block)
    rng = np.random.default_rng(6)
    x, ct = rng.normal(size=(B * S, D)), rng.normal(size=(B * S, D))
    xt = torch.tensor(x.reshape(B, S, D).copy(), requires_grad=True)
    block(xt).backward(torch.tensor(ct.reshape(B, S, D)))
    g = sparse_moe_layer_vjp(x, params, dbrx(k=K_DBRX), ct, aux_cotangents=SparseMoEAuxCotangents(0.0, 0.0))
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g.x, xt.grad.numpy().reshape(B * S, D), **tol)
    np.testing.assert_allclose(g.params.router.weight, block.router.layer.weight.grad.numpy().T, **tol)
    split = lambda w: w.grad.numpy().reshape(E, I, D)
    np.testing.assert_allclose(g.params.experts.w_in, np.swapaxes(split(block.experts.mlp.w1), 1, 2), **tol)
    np.testing.assert_allclose(g.params.experts.w_up, np.swapaxes(split(block.experts.mlp.v1), 1, 2), **tol)
    np.testing.assert_allclose(g.params.experts.w_out, split(block.experts.mlp.w2), **tol)

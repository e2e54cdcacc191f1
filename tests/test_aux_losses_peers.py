"""Agreement of moeref's auxiliary losses (values and logit gradients) with real implementations.

Peers, each skipped cleanly when not installed:

* huggingface/transformers: SwitchTransformers `load_balancing_loss_func` and `router_z_loss_func`,
  Mixtral `load_balancing_loss_func` (the same code serves Qwen2/3-MoE, OLMoE, DBRX, GPT-OSS, Jamba,
  PhiMoE);
* microsoft/DeepSpeed `deepspeed.moe.sharded_moe`: `top1gating`, `top2gating`, `topkgating`.

Inputs are random and tie-free, so every top-k agrees with moeref's. Peers that add noise in place
(DeepSpeed's Gumbel sampling and random token selection) get copies and have the noise switched
off. Gradients are `torch.autograd` through the peer's loss, compared with moeref's analytic VJP.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeref import aux_losses as al

torch = pytest.importorskip("torch")

G, S, E = 4, 16, 8  # S a power of two: the peers' float32 token fractions are then exact
T = G * S


@pytest.fixture(scope="module")
def switch():
    return pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")


@pytest.fixture(scope="module")
def mixtral():
    return pytest.importorskip("transformers.models.mixtral.modeling_mixtral")


@pytest.fixture(scope="module")
def deepspeed_moe():
    pytest.importorskip("deepspeed")
    import deepspeed.moe.sharded_moe as sharded_moe

    return sharded_moe


def _top(z, k):
    return np.argsort(-z, axis=1, kind="stable")[:, :k].astype(np.int64)


def _leaf(z):
    return torch.tensor(z, dtype=torch.float64, requires_grad=True)


def _grad(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf)
    return g.detach().numpy()


def _check(peer_value, ours, *, rtol=1e-13, atol=1e-15):
    np.testing.assert_allclose(float(peer_value.detach()), float(ours), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# huggingface/transformers SwitchTransformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_hf_switch_load_balancing_loss(switch, rng, k):
    z = rng.normal(size=(T, E))
    idx = _top(z, k)
    leaf = _leaf(z)
    probs = torch.softmax(leaf.reshape(G, S, E), dim=-1)
    indices = torch.from_numpy(idx.reshape(G, S, k) if k > 1 else idx[:, 0].reshape(G, S))
    peer = switch.load_balancing_loss_func(probs, indices)
    opts = replace(al.HF_SWITCH_TRANSFORMERS, group_size=S)
    _check(peer, al.load_balancing_loss(z, idx, options=opts))
    np.testing.assert_allclose(al.load_balancing_loss_vjp(z, idx, 1.0, options=opts).logits, _grad(peer, leaf), rtol=1e-12, atol=1e-16)


def test_hf_switch_counts_in_float32(switch, rng):
    """HF casts the expert mask to float32: with a group size that is not a power of two the token
    fractions are rounded to float32 (relative error ~1e-8), whatever the dtype of the probabilities."""
    s = 12
    z = rng.normal(size=(G * s, E))
    idx = _top(z, 1)
    peer = switch.load_balancing_loss_func(torch.softmax(torch.tensor(z).reshape(G, s, E), -1), torch.from_numpy(idx[:, 0].reshape(G, s)))
    ours = float(al.load_balancing_loss(z, idx, options=replace(al.HF_SWITCH_TRANSFORMERS, group_size=s)))
    np.testing.assert_allclose(float(peer), ours, rtol=1e-6)


def test_hf_switch_router_z_loss(switch, rng):
    z = 2.0 * rng.normal(size=(T, E))
    leaf = _leaf(z)
    peer = switch.router_z_loss_func(leaf.reshape(G, S, E))
    _check(peer, al.router_z_loss(z))
    np.testing.assert_allclose(al.router_z_loss_vjp(z, 1.0).logits, _grad(peer, leaf), rtol=1e-12, atol=1e-16)


def test_hf_switch_pools_layers_by_concatenating_the_sequence(switch, rng):
    """`SwitchTransformersForConditionalGeneration._unpack_router_logits`: torch.cat(dim=1), argmax, one loss."""
    zs = [rng.normal(size=(T, E)) for _ in range(2)]  # 2 S tokens per group: float32 fractions exact
    leaves = [_leaf(z) for z in zs]
    cat = torch.cat([l.reshape(G, S, E) for l in leaves], dim=1)  # (G, 2 S, E)
    peer = switch.load_balancing_loss_func(torch.softmax(cat, dim=-1), cat.argmax(dim=-1))
    opts = replace(al.HF_SWITCH_TRANSFORMERS, group_size=S)
    idxs = [_top(z, 1) for z in zs]
    _check(peer, al.multilayer_load_balancing_loss(zs, idxs, options=opts))
    ours = al.multilayer_load_balancing_loss_vjp(zs, idxs, 1.0, options=opts).logits
    for o, g in zip(ours, torch.autograd.grad(peer, leaves)):
        np.testing.assert_allclose(o, g.numpy(), rtol=1e-12, atol=1e-16)
    averaged = al.multilayer_load_balancing_loss(zs, idxs, options=replace(opts, layers="averaged"))
    assert abs(float(averaged) - float(peer.detach())) > 1e-6


# --------------------------------------------------------------------------------------------
# huggingface/transformers Mixtral (shared by Qwen2/3-MoE, OLMoE, DBRX, GPT-OSS, Jamba, PhiMoE)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_hf_mixtral_load_balancing_loss(mixtral, rng, with_mask):
    """Counts every top-k route, pools the layers, drops padding from both f and P. The peer
    accumulates in float32 whatever the input dtype, hence rtol 1e-6."""
    k, layers = 2, 3
    zs = [rng.normal(size=(T, E)) for _ in range(layers)]
    leaves = [_leaf(z) for z in zs]
    mask = rng.random(T) < 0.7
    attention = torch.from_numpy(mask.reshape(G, S).astype(np.int64)) if with_mask else None
    peer = mixtral.load_balancing_loss_func(tuple(leaves), E, k, attention)
    idxs = [_top(z, k) for z in zs]
    m = mask if with_mask else None
    _check(peer, al.multilayer_load_balancing_loss(zs, idxs, options=al.HF_MIXTRAL, mask=m), rtol=1e-6)
    ours = al.multilayer_load_balancing_loss_vjp(zs, idxs, 1.0, options=al.HF_MIXTRAL, mask=m).logits
    for o, g in zip(ours, torch.autograd.grad(peer, leaves)):
        np.testing.assert_allclose(o, g.numpy(), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------
# microsoft/DeepSpeed deepspeed/moe/sharded_moe.py
# --------------------------------------------------------------------------------------------


def test_deepspeed_top1gating(deepspeed_moe, rng):
    z = rng.normal(size=(T, E))
    leaf = _leaf(z)
    l_aux, *_ = deepspeed_moe.top1gating(leaf.clone(), 1.0, 0, noisy_gate_policy=None, drop_tokens=True, use_rts=False)
    idx = _top(z, 1)
    _check(l_aux, al.load_balancing_loss(z, idx, options=al.SWITCH_TRANSFORMER))
    np.testing.assert_allclose(al.load_balancing_loss_vjp(z, idx, 1.0).logits, _grad(l_aux, leaf), rtol=1e-12, atol=1e-16)


def test_deepspeed_top1gating_used_token_masks_the_counts_only(deepspeed_moe, rng):
    """`used_token` zeroes the padding tokens' counts but `me` still averages all tokens; it must be
    an integer tensor (a float mask crashes in `F.one_hot` of the capacity locations)."""
    z = rng.normal(size=(T, E))
    used = rng.random(T) < 0.7
    leaf = _leaf(z)
    l_aux, *_ = deepspeed_moe.top1gating(
        leaf.clone(), 1.0, 0, used_token=torch.from_numpy(used.astype(np.int64)), noisy_gate_policy=None, drop_tokens=True, use_rts=False
    )
    opts = replace(al.SWITCH_TRANSFORMER, mask_mode="counts_only")
    idx = _top(z, 1)
    _check(l_aux, al.load_balancing_loss(z, idx, options=opts, mask=used))
    np.testing.assert_allclose(al.load_balancing_loss_vjp(z, idx, 1.0, options=opts, mask=used).logits, _grad(l_aux, leaf), rtol=1e-12, atol=1e-16)
    with pytest.raises(RuntimeError, match="one_hot"):
        deepspeed_moe.top1gating(torch.tensor(z), 1.0, 0, used_token=torch.from_numpy(used.astype(np.float64)), noisy_gate_policy=None, use_rts=False)


def test_deepspeed_top2gating(deepspeed_moe, rng):
    """GShard's first-choice fraction with the E^2 mean. The peer only runs in float32 (float64
    logits fail in its `einsum` of gates with a float32 mask), hence rtol 1e-6."""
    z = rng.normal(size=(T, E)).astype(np.float32).astype(np.float64)
    leaf = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    l_aux, *_ = deepspeed_moe.top2gating(leaf.clone(), 1.0, 0, drop_tokens=True, top2_2nd_expert_sampling=False)
    idx = _top(z, 2)
    _check(l_aux, al.load_balancing_loss(z, idx, options=al.GSHARD), rtol=1e-6)
    np.testing.assert_allclose(al.load_balancing_loss_vjp(z, idx, 1.0, options=al.GSHARD).logits, _grad(l_aux, leaf), rtol=1e-5, atol=1e-9)
    with pytest.raises(RuntimeError, match="Double|Float"):
        deepspeed_moe.top2gating(torch.tensor(z), 1.0, 0, top2_2nd_expert_sampling=False)


def test_deepspeed_top2gating_sampling_adds_gumbel_noise_to_its_input_in_place(deepspeed_moe, rng):
    logits = torch.tensor(rng.normal(size=(T, E)), dtype=torch.float32)
    before = logits.clone()
    deepspeed_moe.top2gating(logits, 1.0, 0, top2_2nd_expert_sampling=True)
    assert not torch.equal(logits, before)  # hence the copies everywhere else


@pytest.mark.parametrize("k", [1, 2, 3])
def test_deepspeed_topkgating(deepspeed_moe, rng, k):
    z = rng.normal(size=(T, E))
    leaf = _leaf(z)
    l_aux, *_ = deepspeed_moe.topkgating(leaf.clone(), k, 1.0, 0, drop_tokens=True)
    idx = _top(z, k)
    _check(l_aux, al.load_balancing_loss(z, idx, options=al.DEEPSPEED_TOPK))
    np.testing.assert_allclose(al.load_balancing_loss_vjp(z, idx, 1.0, options=al.DEEPSPEED_TOPK).logits, _grad(l_aux, leaf), rtol=1e-12, atol=1e-16)

"""The sparse MoE layer with the Mixtral and Switch presets against huggingface/transformers' blocks.

Switch (below): `SwitchTransformersSparseMLP` with a fixed capacity per sequence, tokens dropped, all
in float64 (the router dtype is set on the module), equal to 1e-12.

Peer: transformers (v5.x) `models/mixtral/modeling_mixtral.py`: `MixtralSparseMoeBlock`
(`MixtralTopKRouter` + `MixtralExperts`) and `load_balancing_loss_func`. Weights are copied into
moeref's layout: router `weight (E, d)` -> `W_r = weight.T (d, E)`; `gate_up_proj (E, 2I, d)` ->
`w_in = swapaxes(., 1, 2)` (gate columns first, layout "concatenated"); `down_proj (E, d, I)` ->
`w_out = swapaxes(., 1, 2)`. The block runs in float64 except the router softmax, which HF computes
in float32 (`softmax(router_logits.float())`): the outputs agree to float32 precision.
The VJP is compared with torch.autograd through the HF block.
Inputs are random and tie-free (HF's `torch.topk` has no specified tie order).
"""

from __future__ import annotations

import numpy as np
import pytest

from moeref.expert_ffn import ExpertFFNParams
from moeref.presets import mixtral, switch
from moeref.router import RouterParams
from moeref.sparse_moe import SparseMoEAuxCotangents, SparseMoEParams, sparse_moe_layer, sparse_moe_layer_vjp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mixtral_mod = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")

T, D, I, E, K = 7, 6, 5, 4, 2


def _hf_block(seed):
    config = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, router_jitter_noise=0.0
    )
    block = mixtral_mod.MixtralSparseMoeBlock(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
    return block


def _moeref_params(block):
    gate = block.gate.weight.detach().numpy().copy()  # (E, d)
    gate_up = block.experts.gate_up_proj.detach().numpy().copy()  # (E, 2I, d)
    down = block.experts.down_proj.detach().numpy().copy()  # (E, d, I)
    return SparseMoEParams(
        router=RouterParams(weight=gate.T.copy()),
        experts=ExpertFFNParams(w_in=np.swapaxes(gate_up, 1, 2).copy(), w_out=np.swapaxes(down, 1, 2).copy()),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_mixtral_preset_matches_hf_mixtral_block(seed):
    block = _hf_block(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D))
    probs = np.exp(x @ block.gate.weight.detach().numpy().T)
    probs /= probs.sum(1, keepdims=True)
    s = -np.sort(-probs, axis=1)
    assert np.min(s[:, K - 1] - s[:, K]) > 1e-4, "inputs must be tie-free"

    with torch.no_grad():
        hf_y = block(torch.tensor(x.copy())[None]).numpy()[0]  # HF may modify its input in place: pass a copy
        hf_logits, _, hf_index = block.gate(torch.tensor(x.copy()))
        hf_lb = mixtral_mod.load_balancing_loss_func((hf_logits,), E, K)

    options = mixtral(k=K)
    out = sparse_moe_layer(x.copy(), _moeref_params(block), options)
    np.testing.assert_allclose(out.logits, hf_logits.numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.sort(out.routes.expert_index, axis=1), np.sort(hf_index.numpy(), axis=1))
    np.testing.assert_allclose(out.y, hf_y, rtol=1e-5, atol=1e-5)  # float32 router weights in HF
    np.testing.assert_allclose(float(out.load_balancing_loss), float(hf_lb), rtol=1e-6)


def test_mixtral_preset_vjp_matches_hf_autograd():
    block = _hf_block(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D))
    ct = rng.normal(size=(T, D))
    xt = torch.tensor(x.copy(), requires_grad=True)
    hf_y = block(xt.clone()[None])[0]  # a clone: HF may scale its input in place
    hf_y.backward(torch.tensor(ct))
    options = mixtral(k=K)  # load_balancing_coef is 0.001: differentiate y only, as HF's block does
    g = sparse_moe_layer_vjp(x.copy(), _moeref_params(block), options, ct, aux_cotangents=SparseMoEAuxCotangents(0.0, 0.0))
    tol = dict(rtol=1e-5, atol=1e-5)  # HF's router softmax runs in float32
    np.testing.assert_allclose(g.x, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(g.params.router.weight, block.gate.weight.grad.numpy().T, **tol)
    np.testing.assert_allclose(g.params.experts.w_in, np.swapaxes(block.experts.gate_up_proj.grad.numpy(), 1, 2), **tol)
    np.testing.assert_allclose(g.params.experts.w_out, np.swapaxes(block.experts.down_proj.grad.numpy(), 1, 2), **tol)


# --------------------------------------------------------------------------------------------
# Switch: transformers `models/switch_transformers/modeling_switch_transformers.py`
# (`SwitchTransformersTop1Router`, `SwitchTransformersSparseMLP`), capacity per sequence
# --------------------------------------------------------------------------------------------


def test_switch_preset_matches_hf_switch_sparse_mlp_with_drops():
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    B, S, cap = 2, 5, 1
    config = transformers.SwitchTransformersConfig(
        d_model=D, d_ff=I, num_experts=E, expert_capacity=cap, router_jitter_noise=0.0, dense_act_fn="relu"
    )
    mlp = sw.SwitchTransformersSparseMLP(config).double().eval()
    mlp.router.dtype = torch.float64  # the config accepts float32/16 only; the router reads this attribute
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for prm in mlp.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B, S, D))
    with torch.no_grad():
        hf_y = mlp(torch.tensor(x.copy())).numpy().reshape(B * S, D)
    W = mlp.router.classifier.weight.detach().numpy().T.copy()  # (d, E)
    experts = ExpertFFNParams(
        w_in=np.stack([mlp.experts[f"expert_{e}"].wi.weight.detach().numpy().T for e in range(E)]),  # (E, d, I)
        w_out=np.stack([mlp.experts[f"expert_{e}"].wo.weight.detach().numpy().T for e in range(E)]),  # (E, I, d)
    )
    out = sparse_moe_layer(x.reshape(B * S, D).copy(), SparseMoEParams(RouterParams(W), experts), switch(capacity=cap, group_size=S))
    assert not np.all(out.routes.kept), "the case should drop tokens"
    np.testing.assert_allclose(out.y, hf_y, rtol=1e-12, atol=1e-12)

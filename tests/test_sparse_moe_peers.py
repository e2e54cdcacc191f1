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


# --------------------------------------------------------------------------------------------
# DeepSeek-V3: transformers `models/deepseek_v3/modeling_deepseek_v3.py` (`DeepseekV3MoE`:
# `DeepseekV3TopkRouter`, `DeepseekV3Experts`, the fused shared `DeepseekV3MLP`)
# --------------------------------------------------------------------------------------------

DS = dict(E=8, n_group=4, topk_group=2, k=2, n_shared=1, scale=2.5, I=3)


def _hf_deepseek_v3(seed, bias_shift=0.0):
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    config = transformers.DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=DS["I"],
        n_routed_experts=DS["E"],
        n_group=DS["n_group"],
        topk_group=DS["topk_group"],
        num_experts_per_tok=DS["k"],
        n_shared_experts=DS["n_shared"],
        routed_scaling_factor=DS["scale"],
        norm_topk_prob=True,
    )
    config._experts_implementation = "eager"  # the per-expert loop (the only CPU choice in float64)
    moe = ds.DeepseekV3MoE(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in moe.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
        bias = 0.1 * torch.randn(DS["E"], generator=g, dtype=torch.float64) + bias_shift  # some negative
        moe.gate.e_score_correction_bias.copy_(bias)
    return moe


def _deepseek_params(moe):
    from moeref.shared_experts import SharedExpertParams

    def a(t):
        return t.detach().numpy().copy()

    sh = moe.shared_experts
    return SparseMoEParams(
        router=RouterParams(weight=a(moe.gate.weight).T.copy(), selection_bias=a(moe.gate.e_score_correction_bias)),
        experts=ExpertFFNParams(w_in=np.swapaxes(a(moe.experts.gate_up_proj), 1, 2).copy(), w_out=np.swapaxes(a(moe.experts.down_proj), 1, 2).copy()),
        shared=SharedExpertParams(
            ExpertFFNParams(
                w_in=np.concatenate([a(sh.gate_proj.weight).T, a(sh.up_proj.weight).T], axis=1)[None],  # (1, d, 2 I_s), gate first
                w_out=a(sh.down_proj.weight).T[None].copy(),  # (1, I_s, d)
            )
        ),
    )


def _deepseek_options(group_masked_score=-np.inf):
    import dataclasses

    from moeref.expert_ffn import SWIGLU
    from moeref.presets import deepseek_v3
    from moeref.shared_experts import SharedExpertOptions

    base = deepseek_v3(k=DS["k"], n_group=DS["n_group"], topk_group=DS["topk_group"], routed_scaling_factor=DS["scale"])
    # transformers v5.24 fills the left-out groups with -inf (`masked_fill(~score_mask.bool(), float("-inf"))`)
    router = dataclasses.replace(base.router, group_masked_score=group_masked_score)
    return dataclasses.replace(base, router=router, shared=SharedExpertOptions("add", SWIGLU))


def _deepseek_margins(x, params):
    """Smallest gaps at the group and the expert top-k (HF's float32 router must not flip them)."""
    s = 1.0 / (1.0 + np.exp(-(x @ params.router.weight))) + params.router.selection_bias  # (T, E)
    G, per = DS["n_group"], DS["E"] // DS["n_group"]
    grouped = -np.sort(-s.reshape(-1, G, per), axis=2)
    gs = -np.sort(-(grouped[:, :, 0] + grouped[:, :, 1]), axis=1)  # (T, G) group scores, descending
    gap_group = np.min(gs[:, DS["topk_group"] - 1] - gs[:, DS["topk_group"]])
    best = np.argsort(-(grouped[:, :, 0] + grouped[:, :, 1]), axis=1, kind="stable")[:, : DS["topk_group"]]
    allowed = np.zeros_like(s, dtype=bool).reshape(-1, G, per)
    np.put_along_axis(allowed, best[:, :, None].repeat(per, axis=2), True, axis=1)
    v = -np.sort(-np.where(allowed.reshape(s.shape), s, -np.inf), axis=1)
    return min(gap_group, np.min(v[:, DS["k"] - 1] - v[:, DS["k"]]))


def test_deepseek_v3_options_with_shared_experts_match_hf_deepseek_v3_moe():
    """Forward and VJP against `DeepseekV3MoE`; HF's router runs in float32 (`hidden_states.type(torch.float32)`),
    everything else in float64, so the agreement is to float32 precision (measured: ~1e-7)."""
    moe = _hf_deepseek_v3(0)
    params = _deepseek_params(moe)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D))
    assert _deepseek_margins(x, params) > 1e-4, "inputs must be tie-free"
    ct = rng.normal(size=(T, D))

    xt = torch.tensor(x.copy(), requires_grad=True)
    hf_y = moe(xt.clone()[None])[0]  # a clone: HF may modify its input in place
    hf_y.backward(torch.tensor(ct.copy()))
    with torch.no_grad():
        hf_logits, hf_w, hf_idx = moe.gate(torch.tensor(x.copy()))

    options = _deepseek_options()
    out = sparse_moe_layer(x.copy(), params, options)
    np.testing.assert_array_equal(np.sort(out.routes.expert_index, axis=1), np.sort(hf_idx.numpy(), axis=1))
    order = np.argsort(hf_idx.numpy(), axis=1)
    hf_w_sorted = np.take_along_axis(hf_w.numpy().astype(np.float64), order, axis=1)
    ours_sorted = np.take_along_axis(out.routes.weight, np.argsort(out.routes.expert_index, axis=1), axis=1)
    tol = dict(rtol=1e-5, atol=1e-6)  # float32 router in HF
    np.testing.assert_allclose(out.logits, hf_logits.numpy(), **tol)
    np.testing.assert_allclose(ours_sorted, hf_w_sorted, **tol)
    np.testing.assert_allclose(out.y, hf_y.detach().numpy(), **tol)
    # the shared expert alone is float64 on both sides
    with torch.no_grad():
        hf_shared = moe.shared_experts(torch.tensor(x.copy())).numpy()
    np.testing.assert_allclose(out.shared.shared_y, hf_shared, rtol=1e-13, atol=1e-13)

    g = sparse_moe_layer_vjp(x.copy(), params, options, ct, output=out)
    sh = moe.shared_experts
    np.testing.assert_allclose(g.x, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(g.params.router.weight, moe.gate.weight.grad.numpy().T, **tol)
    np.testing.assert_allclose(g.params.experts.w_in, np.swapaxes(moe.experts.gate_up_proj.grad.numpy(), 1, 2), **tol)
    np.testing.assert_allclose(g.params.experts.w_out, np.swapaxes(moe.experts.down_proj.grad.numpy(), 1, 2), **tol)
    shared_w_in = np.concatenate([sh.gate_proj.weight.grad.numpy().T, sh.up_proj.weight.grad.numpy().T], axis=1)[None]
    np.testing.assert_allclose(g.params.shared.ffn.w_in, shared_w_in, **tol)
    np.testing.assert_allclose(g.params.shared.ffn.w_out, sh.down_proj.weight.grad.numpy().T[None], **tol)


def test_hf_deepseek_v3_fills_left_out_groups_with_minus_inf():
    """With negative selection values (a negative correction bias) the group fill value decides the
    experts: transformers v5.24 uses -inf (as deepseek-ai/DeepSeek-V3 `inference/model.py`); a 0.0
    fill (older transformers' `masked_fill(..., 0.0)`) picks experts from left-out groups."""
    moe = _hf_deepseek_v3(1, bias_shift=-2.0)  # every selection value s + b < 0
    params = _deepseek_params(moe)
    x = np.random.default_rng(1).normal(size=(T, D))
    with torch.no_grad():
        _, _, hf_idx = moe.gate(torch.tensor(x.copy()))
    hf = np.sort(hf_idx.numpy(), axis=1)
    minus_inf = sparse_moe_layer(x, params, _deepseek_options(-np.inf)).routes.expert_index
    zero = sparse_moe_layer(x, params, _deepseek_options(0.0)).routes.expert_index
    np.testing.assert_array_equal(np.sort(minus_inf, axis=1), hf)
    assert np.any(np.sort(zero, axis=1) != hf)

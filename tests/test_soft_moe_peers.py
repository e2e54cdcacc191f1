"""Soft MoE with the soft_moe_pytorch preset against lucidrains' soft-moe-pytorch ``SoftMoE`` (CPU).

Peer: soft-moe-pytorch 0.1.9, ``soft_moe_pytorch/soft_moe.py``. Its weights are copied into moeref's
records:

* ``slot_embeds (n, p, d)`` -> ``phi = permute(slot_embeds, (2, 0, 1))`` ``(d, n, p)``;
* ``norm.gamma``, ``slot_norm.gamma`` -> ``token_norm_weight``, ``slot_norm_weight`` (set to random
  values here, so that the gains are tested);
* experts: ``FeedForward`` = ``Linear(d, 4d)``, ``nn.GELU()`` (exact), ``Dropout``, ``Linear(4d, d)``
  -> ``GELU_FFN`` with ``w_in = weight.T``, ``b_in = bias``, ``w_out``, ``b_out`` likewise;
  ``geglu=True``'s ``GLUFeedForward`` = ``Linear(d, 2h)``, ``x, gate = chunk(2)``,
  ``x * gelu(gate)`` -> ``ExpertFFN(activation="gelu", gated=True)`` (concatenated layout, gate
  first), i.e. the two row halves of the first Linear swapped.

The module runs in eval mode (dropout 0). In float64 the outputs and the gradients (torch.autograd
through the module, for the input, the slots, both gains and every expert weight) agree to
~1e-13; in float32 (the module's default dtype) against moeref in float64 to float32 precision.
Gumbel logit noise (``add_noise=True``) is reproduced by redrawing the same uniform numbers from the
same torch seed and passing the noise explicitly.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeref.expert_ffn import ExpertFFN, ExpertFFNParams
from moeref.soft_moe import SoftMoEParams, soft_moe_layer, soft_moe_layer_vjp, soft_moe_pytorch

torch = pytest.importorskip("torch")
smp = pytest.importorskip("soft_moe_pytorch")

B, M, D, N = 2, 8, 6, 4  # batch, tokens, features, experts: p = M // N = 2 slots per expert
GEGLU_EXACT = ExpertFFN(activation="gelu", gated=True)


def make_module(seed, *, geglu=False, use_layernorm=False, dtype=torch.float64):
    torch.manual_seed(seed)
    module = smp.SoftMoE(dim=D, seq_len=M, num_experts=N, expert_mult=2, geglu=geglu, use_layernorm=use_layernorm)
    module = module.to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in module.named_parameters():
            if name.endswith("gamma"):
                prm.copy_(torch.rand(prm.shape, generator=g, dtype=dtype) + 0.5)
            else:
                prm.copy_(0.5 * torch.randn(prm.shape, generator=g, dtype=dtype))
    return module


def np64(t):
    return t.detach().to(torch.float64).numpy().copy()


def moeref_params(module, *, geglu=False, read=lambda prm: prm):
    """The module's parameters in moeref's layout; ``read=lambda prm: prm.grad`` maps their gradients the same way."""

    def get(prm):
        return np64(read(prm))

    w_in, b_in, w_out, b_out = [], [], [], []
    for expert in module.experts.experts:
        first, last = expert[0], expert[-1]
        W, b = get(first.weight), get(first.bias)  # (K, d), (K,)
        if geglu:  # the peer's first half is the up projection, the second the gate: moeref wants gate first
            h = W.shape[0] // 2
            W, b = np.concatenate([W[h:], W[:h]]), np.concatenate([b[h:], b[:h]])
        w_in.append(W.T)
        b_in.append(b)
        w_out.append(get(last.weight).T)
        b_out.append(get(last.bias))
    return SoftMoEParams(
        phi=np.transpose(get(module.slot_embeds), (2, 0, 1)).copy(),  # (n, p, d) -> (d, n, p)
        experts=ExpertFFNParams(w_in=np.stack(w_in), w_out=np.stack(w_out), b_in=np.stack(b_in), b_out=np.stack(b_out)),
        token_norm_weight=get(module.norm.gamma),
        slot_norm_weight=get(module.slot_norm.gamma),
    )


def options_for(geglu, use_layernorm):
    changes = {"ffn": GEGLU_EXACT} if geglu else {}
    if use_layernorm:
        changes.update(normalization="layer_norm", eps=None)  # F.layer_norm, eps 1e-5
    return soft_moe_pytorch(**changes)


VARIANTS = {"rmsnorm_ffn": (False, False), "rmsnorm_geglu": (True, False), "layernorm_ffn": (False, True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_vjp_match_soft_moe_pytorch_float64(variant):
    geglu, use_layernorm = VARIANTS[variant]
    module = make_module(0, geglu=geglu, use_layernorm=use_layernorm)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, M, D))
    ct = rng.normal(size=(B, M, D))

    xt = torch.tensor(x, requires_grad=True)
    y_peer = module(xt)
    y_peer.backward(torch.tensor(ct))

    params, options = moeref_params(module, geglu=geglu), options_for(geglu, use_layernorm)
    out = soft_moe_layer(x, params, options)
    np.testing.assert_allclose(out.y, np64(y_peer), rtol=1e-12, atol=1e-12)

    g = soft_moe_layer_vjp(x, params, options, ct)
    peer_grads = moeref_params(module, geglu=geglu, read=lambda prm: prm.grad)
    np.testing.assert_allclose(g.x, np64(xt.grad), rtol=1e-11, atol=1e-12)
    for field in ("phi", "token_norm_weight", "slot_norm_weight"):
        np.testing.assert_allclose(getattr(g.params, field), getattr(peer_grads, field), rtol=1e-11, atol=1e-12, err_msg=field)
    for field in ("w_in", "w_out", "b_in", "b_out"):
        got, want = getattr(g.params.experts, field), getattr(peer_grads.experts, field)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12, err_msg=field)


@pytest.mark.parametrize("variant", ["rmsnorm_ffn", "rmsnorm_geglu"])
def test_forward_matches_soft_moe_pytorch_float32(variant):
    geglu, use_layernorm = VARIANTS[variant]
    module = make_module(1, geglu=geglu, use_layernorm=use_layernorm, dtype=torch.float32)
    x = np.random.default_rng(1).normal(size=(B, M, D)).astype(np.float32)
    with torch.no_grad():
        y_peer = module(torch.tensor(x)).numpy()
    out = soft_moe_layer(x.astype(np.float64), moeref_params(module, geglu=geglu), options_for(geglu, use_layernorm))
    err = float(np.max(np.abs(out.y - y_peer)))
    scale = float(np.max(np.abs(out.y)))
    print(f"soft-moe-pytorch float32 vs moeref float64 [{variant}]: max abs error {err:.2e} (max |y| {scale:.2f})")
    np.testing.assert_allclose(y_peer, out.y, rtol=2e-5, atol=2e-5 * scale)


def test_gumbel_noise_and_fixed_num_slots_match_soft_moe_pytorch():
    """``num_slots=3`` (not seq_len // num_experts) and ``add_noise=True`` with the same uniform draws."""
    torch.manual_seed(2)
    module = smp.SoftMoE(dim=D, num_slots=3, num_experts=N, expert_mult=2).double().eval()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, M, D))
    torch.manual_seed(7)
    with torch.no_grad():
        y_peer = module(torch.tensor(x), add_noise=True, noise_mult=0.5).numpy()
    torch.manual_seed(7)  # the forward's only random draw: uniform numbers shaped like the logits (B, M, N, p)
    u = torch.zeros((B, M, N, 3), dtype=torch.float64).uniform_(0, 1).numpy()
    gumbel = -np.log(np.maximum(-np.log(np.maximum(u, 1e-20)), 1e-20))
    noise = 0.5 * gumbel.reshape(B, M, N * 3)
    options = soft_moe_pytorch(slots_per_expert=3)
    out = soft_moe_layer(x, moeref_params(module), options, logit_noise=noise)
    np.testing.assert_allclose(out.y, y_peer, rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(soft_moe_layer(x, moeref_params(module), options).y - y_peer)) > 1e-4  # the noise mattered

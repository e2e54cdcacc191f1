"""A small Mixtral-style sparse MoE block in PyTorch, with one deliberate convention bug.

Mixtral (HF ``MixtralSparseMoeBlock``) takes the softmax over all E router logits, keeps the
top-k probabilities and **renormalises them to sum 1** before weighting the experts. ``MyMoE``
forgets the renormalisation (the Qwen2-MoE / OLMoE ``norm_topk_prob=False`` convention), a slip
that trains fine and silently changes every output. ``moeref check`` catches it and names it::

    moeref check examples/my_moe.py:make_block --formulation sparse_moe --preset mixtral

``make_fixed_block`` is the corrected block, and ``mixtral_moe`` a plain function in moeref's
calling convention (``fn(x, router_weight, experts, k)``); both pass::

    moeref check examples/my_moe.py:make_fixed_block --formulation sparse_moe --preset mixtral
    moeref check examples/my_moe.py:mixtral_moe --formulation sparse_moe --preset mixtral
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MyMoE(nn.Module):
    """Top-k softmax router and SwiGLU experts, weights stored like ``nn.Linear`` (out, in)."""

    def __init__(self, d: int, I: int, E: int, k: int, *, renormalize: bool = False):
        super().__init__()
        self.k, self.renormalize = k, renormalize
        self.gate = nn.Linear(d, E, bias=False)  # weight (E, d)
        self.w1 = nn.Parameter(torch.zeros(E, I, d))  # gate projection
        self.w3 = nn.Parameter(torch.zeros(E, I, d))  # up projection
        self.w2 = nn.Parameter(torch.zeros(E, d, I))  # down projection

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.gate(x)  # (T, E)
        probs = F.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.k, dim=-1)  # (T, k), best first
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # the deliberate bug: with renormalize=False the k weights do not sum to 1
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, rank = torch.where(experts == e)
            if token.numel() == 0:
                continue
            h = x[token]  # (n_e, d)
            out = (F.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T  # (n_e, d)
            y = y.index_add(0, token, weights[token, rank, None] * out)
        return {"y": y, "logits": logits, "expert_index": experts}


def _load(block: MyMoE, case) -> MyMoE:
    """Copy a moeref case's weights (row-vector layout, ``x @ W``) into the block."""
    I = case.sizes["I"]
    with torch.no_grad():
        block.gate.weight.copy_(case.torch("params/router/weight").T)
        w_in = case.torch("params/experts/w_in")  # (E, d, 2I): gate columns [:I], up columns [I:]
        block.w1.copy_(w_in[:, :, :I].transpose(1, 2))
        block.w3.copy_(w_in[:, :, I:].transpose(1, 2))
        block.w2.copy_(case.torch("params/experts/w_out").transpose(1, 2))  # (E, I, d) -> (E, d, I)
    return block


def make_block(case) -> MyMoE:
    """Module factory for ``moeref check``: the buggy block with the case's weights."""
    s = case.sizes
    return _load(MyMoE(s["d"], s["I"], s["E"], s["k"]).to(getattr(torch, case.dtype)), case)


def make_fixed_block(case) -> MyMoE:
    """The same block with Mixtral's renormalisation."""
    s = case.sizes
    return _load(MyMoE(s["d"], s["I"], s["E"], s["k"], renormalize=True).to(getattr(torch, case.dtype)), case)


def mixtral_moe(x: torch.Tensor, router_weight: torch.Tensor, experts: dict, k: int) -> tuple:
    """Plain-function convention: ``x (T, d)``, ``router_weight (d, E)``, ``experts["w_in"] (E, d, 2I)``,
    ``experts["w_out"] (E, I, d)``; returns ``(y, router_logits)``."""
    logits = x @ router_weight  # (T, E)
    weights, chosen = torch.topk(F.softmax(logits, dim=-1), k, dim=-1)  # (T, k)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    I = experts["w_out"].shape[1]
    y = torch.zeros_like(x)
    for e in range(router_weight.shape[1]):
        token, rank = torch.where(chosen == e)
        h = x[token] @ experts["w_in"][e]  # (n_e, 2I)
        out = (F.silu(h[:, :I]) * h[:, I:]) @ experts["w_out"][e]  # (n_e, d)
        y = y.index_add(0, token, weights[token, rank, None] * out)
    return y, logits

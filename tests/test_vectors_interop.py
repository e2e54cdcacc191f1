"""The golden vectors mean what their manifest says: real implementations reproduce them.

Vectors are generated for the Mixtral, OLMoE and Switch presets, loaded with safetensors into
huggingface/transformers (v5.x) blocks, and the blocks' outputs (and, for Mixtral, autograd
gradients) are compared with the stored reference:

* `MixtralSparseMoeBlock` and `OlmoeSparseMoeBlock` (`models/mixtral/modeling_mixtral.py`,
  `models/olmoe/modeling_olmoe.py`): router `weight (E, d)` = `params/router/weight` transposed;
  `gate_up_proj (E, 2I, d)` = `params/experts/w_in` with its last two axes swapped;
  `down_proj (E, d, I)` = `params/experts/w_out` swapped. HF computes the router softmax in
  float32, so float64 cases agree to float32 precision (rtol 1e-5).
* `SwitchTransformersSparseMLP` (`models/switch_transformers/modeling_switch_transformers.py`):
  the Switch vectors route each group of `sizes.T / group` tokens separately with
  `expert_capacity = 2`; HF routes each batch row separately, so the tokens are reshaped to
  `(T / group, group, d)`. Routes are dropped in these cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeref.testing import assert_moe_close, assert_routing_equal, load_cases
from moeref.vectors.generate import generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    generate(out, only=["sparse_moe.mixtral", "sparse_moe.olmoe", "sparse_moe.switch"])
    return out


def _dtype(case):
    return getattr(torch, case.dtype)


def _hf_fused_block(case, family):
    s = case.sizes
    if family == "mixtral":
        from transformers.models.mixtral import modeling_mixtral as m

        config = transformers.MixtralConfig(hidden_size=s["d"], intermediate_size=s["I"], num_local_experts=s["E"],
                                            num_experts_per_tok=s["k"], router_jitter_noise=0.0)
        block = m.MixtralSparseMoeBlock(config)
    else:
        from transformers.models.olmoe import modeling_olmoe as m

        config = transformers.OlmoeConfig(hidden_size=s["d"], intermediate_size=s["I"], num_experts=s["E"],
                                          num_experts_per_tok=s["k"], norm_topk_prob=False)
        block = m.OlmoeSparseMoeBlock(config)
    block = block.to(_dtype(case)).eval()
    with torch.no_grad():
        block.gate.weight.copy_(case.torch("params/router/weight").T)
        block.experts.gate_up_proj.copy_(case.torch("params/experts/w_in").transpose(1, 2))
        block.experts.down_proj.copy_(case.torch("params/experts/w_out").transpose(1, 2))
    return block


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_hf_fused_blocks_reproduce_the_vectors(folder, family):
    cases = load_cases(folder, f"sparse_moe.{family}.")
    assert {c.dtype for c in cases} == {"float64", "float32"}
    for case in cases:
        block = _hf_fused_block(case, family)
        x = case.torch("inputs/x")
        with torch.no_grad():
            y = block(x.clone()[None])[0]  # HF may scale its input in place: a copy
            logits, _, index = block.gate(x.clone())
        rtol = 1e-5 if case.dtype == "float64" else None  # HF's router softmax is float32
        assert_moe_close(y, case, rtol=rtol, atol=1e-7 if rtol else None)
        assert_moe_close(logits, case, name="outputs/logits")
        assert_routing_equal(index, case)


def test_hf_mixtral_autograd_reproduces_the_stored_vjp(folder):
    for case in load_cases(folder, "sparse_moe.mixtral."):
        block = _hf_fused_block(case, "mixtral")
        x = case.torch("inputs/x", requires_grad=True)
        y = block(x.clone()[None])[0]
        y.backward(case.torch("cotangents/y"))  # grads/... is the VJP of <cotangents/y, outputs/y>
        tol = dict(rtol=1e-5, atol=1e-7) if case.dtype == "float64" else {}
        assert_moe_close(x.grad, case, name="grads/x", **tol)
        assert_moe_close(block.gate.weight.grad.T, case, name="grads/params/router/weight", **tol)
        assert_moe_close(block.experts.gate_up_proj.grad.transpose(1, 2), case, name="grads/params/experts/w_in", **tol)
        assert_moe_close(block.experts.down_proj.grad.transpose(1, 2), case, name="grads/params/experts/w_out", **tol)


def test_hf_switch_sparse_mlp_reproduces_the_vectors_with_drops(folder):
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    cases = load_cases(folder, "sparse_moe.switch.")
    dropped = 0
    for case in cases:
        s, kwargs = case.sizes, case.entry["preset_kwargs"]
        group = kwargs["group_size"]
        config = transformers.SwitchTransformersConfig(d_model=s["d"], d_ff=s["I"], num_experts=s["E"],
                                                       expert_capacity=kwargs["capacity"], router_jitter_noise=0.0,
                                                       dense_act_fn="relu")
        mlp = sw.SwitchTransformersSparseMLP(config).to(_dtype(case)).eval()
        mlp.router.dtype = _dtype(case)  # the router computes in this dtype (the config allows float32/16 only)
        w_in, w_out = case["params/experts/w_in"], case["params/experts/w_out"]  # (E, d, I), (E, I, d)
        with torch.no_grad():
            mlp.router.classifier.weight.copy_(case.torch("params/router/weight").T)
            for e in range(s["E"]):
                mlp.experts[f"expert_{e}"].wi.weight.copy_(torch.from_numpy(w_in[e].T.copy()))
                mlp.experts[f"expert_{e}"].wo.weight.copy_(torch.from_numpy(w_out[e].T.copy()))
            x = case.torch("inputs/x").reshape(s["T"] // group, group, s["d"])
            y = mlp(x).reshape(s["T"], s["d"])
        dropped += int(np.sum(~case["outputs/routes/kept"]))
        assert_moe_close(y, case)
    assert dropped > 0, "the Switch vectors should drop routes"


# --------------------------------------------------------------------------------------------
# DeepSpeed: the deepspeed_topk vectors through DeepSpeed's own gating (DS_BUILD_OPS=0, CPU)
# --------------------------------------------------------------------------------------------


def test_deepspeed_topkgating_reproduces_the_vectors(tmp_path):
    """`topkgating` (deepspeed/moe/sharded_moe.py) on the stored router logits keeps the same routes
    with the same weights (its combine tensor summed over the capacity axis) and returns the stored
    balancing loss. DeepSpeed runs in the logits' dtype, except the route fractions, which it averages
    in float32 (`ce = torch.mean(mask.float(), dim=0)`): the loss agrees to float32 precision."""
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    generate(tmp_path, only=["sparse_moe.deepspeed_topk"])
    cases = [c for c in load_cases(tmp_path, "sparse_moe.deepspeed_topk.") if c.dtype == "float64"]
    assert cases
    for case in cases:
        cap = case.options["capacity"]
        logits = case.torch("outputs/logits")
        l_aux, combine, _, _ = sharded_moe.topkgating(
            logits.clone(), case.sizes["k"], cap["capacity_factor"], cap["min_capacity"], drop_policy="probs"
        )
        T, E = logits.shape
        index = np.asarray(case.tensors["outputs/routes/expert_index"])
        weight = np.asarray(case.tensors["outputs/routes/weight"])
        kept = np.asarray(case.tensors["outputs/routes/kept"])
        dense = np.zeros((T, E))
        np.add.at(dense, (np.repeat(np.arange(T), index.shape[1]), index.reshape(-1)), (weight * kept).reshape(-1))
        np.testing.assert_allclose(combine.sum(-1).double().numpy(), dense, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(l_aux), float(np.asarray(case.tensors["outputs/load_balancing_loss"])), rtol=1e-6)

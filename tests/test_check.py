"""``moeref check``: a user's implementation against moeref, with the convention bug of examples/my_moe.py explained."""

from __future__ import annotations

import pathlib
import textwrap

import pytest
from click.testing import CliRunner

from moeref.cli import main
from moeref.presets import mixtral
from moeref.vectors import VectorsError
from moeref.vectors.check import convention_variants, load_target, run_check

torch = pytest.importorskip("torch")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "my_moe.py"
MIXTRAL = ["--formulation", "sparse_moe", "--preset", "mixtral", "--dtype", "float32"]


def _check(target, *args):
    return CliRunner().invoke(main, ["check", str(target), *args])


def test_the_example_bug_is_caught_and_explained():
    result = _check(f"{EXAMPLE}:make_block", *MIXTRAL)
    assert result.exit_code == 1, result.output
    out = result.output
    assert "FAIL  sparse_moe.mixtral.T7-d5-I3-E8.float32" in out and "outputs/y" in out
    assert "router.normalize='none' (instead of 'sum')" in out and "not renormalised to sum 1" in out
    assert "qwen2_moe" in out and "olmoe" in out  # the systems that do use that convention
    assert "experts [" in out and "top-3 selection values" in out  # the first tokens, with their scores


def test_the_fixed_example_and_the_plain_function_pass():
    result = _check(f"{EXAMPLE}:make_fixed_block", *MIXTRAL)
    assert result.exit_code == 0, result.output
    assert "all agree with moeref" in result.output and "grads/x" in result.output
    result = _check(f"{EXAMPLE}:mixtral_moe", *MIXTRAL, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    assert "grads/params/experts/w_in" in result.output  # a function gets its weight gradients checked


def _write(tmp_path, source):
    path = tmp_path / "user_moe.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_a_function_that_raises_or_returns_the_wrong_shape(tmp_path):
    path = _write(tmp_path, """
        def boom(x, router_weight, experts):
            raise RuntimeError("shapes do not line up")

        def flat(x, router_weight, experts):
            return x.sum(dim=1)

        def text(x, router_weight, experts):
            return "y"
    """)
    result = _check(f"{path}:boom", *MIXTRAL)
    assert result.exit_code == 1 and "raised RuntimeError: shapes do not line up" in result.output
    assert "user_moe.py" in result.output  # the user's frame
    result = _check(f"{path}:flat", *MIXTRAL)
    assert result.exit_code == 1 and "outputs/y: shape (7,), expected (7, 5)" in result.output
    result = _check(f"{path}:text", *MIXTRAL)
    assert result.exit_code == 1 and "returned str" in result.output


def test_a_case_with_a_router_bias_needs_a_function_that_accepts_it(tmp_path):
    path = _write(tmp_path, """
        def no_bias(x, router_weight, experts):
            return x
    """)
    result = _check(f"{path}:no_bias", "--formulation", "sparse_moe", "--preset", "gpt_oss", "--dtype", "float32")
    assert result.exit_code == 1 and "does not accept router_bias=, and this case has a router bias" in result.output


def test_classical_formulation_with_a_torch_function(tmp_path):
    path = _write(tmp_path, """
        import torch

        def meta_pi(x, params):
            gates = torch.softmax(x @ params.gate.weight + params.gate.bias, dim=1)             # (N, n)
            outs = torch.einsum("nd,ido->nio", x, params.experts.weight) + params.experts.bias  # (N, n, d_out)
            return torch.einsum("ni,nio->no", gates, outs)
    """)
    result = _check(f"{path}:meta_pi", "--formulation", "meta_pi")
    assert result.exit_code == 0, result.output
    assert "grads/params/gate/weight" in result.output and "grads/x" in result.output


def test_jax_function_with_gradients_and_numpy_function(tmp_path):
    pytest.importorskip("jax")
    path = _write(tmp_path, """
        import jax, jax.numpy as jnp
        import numpy as np

        def mixtral_jax(x, router_weight, experts, k):
            logits = x @ router_weight                                                  # (T, E)
            w, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)                  # (T, k)
            w = w / w.sum(-1, keepdims=True)
            I = experts["w_out"].shape[1]
            h = jnp.einsum("td,edk->tek", x, experts["w_in"])                           # (T, E, 2I)
            out = jnp.einsum("tei,eid->ted", jax.nn.silu(h[..., :I]) * h[..., I:], experts["w_out"])
            gate = jnp.zeros_like(logits).at[jnp.arange(x.shape[0])[:, None], idx].set(w)
            return {"y": jnp.einsum("te,ted->td", gate, out), "logits": logits, "expert_index": idx}

        def logits_np(x, router_weight, experts):
            return x @ np.zeros_like(router_weight) @ np.zeros((router_weight.shape[1], x.shape[1])), x @ router_weight
    """)
    result = _check(f"{path}:mixtral_jax", *MIXTRAL, "--backend", "jax")
    assert result.exit_code == 0, result.output
    assert "grads/params/experts/w_out" in result.output and "outputs/routes/expert_index" in result.output
    result = _check(f"{path}:logits_np", *MIXTRAL, "--backend", "numpy")
    assert result.exit_code == 1 and "no gradients" in result.output and "outputs/logits" not in result.output.split("details")[1]


@pytest.mark.parametrize("args,message", [
    (["--formulation", "sparse_moee", "--preset", "mixtral"], "did you mean 'sparse_moe'"),
    (["--formulation", "sparse_moe", "--preset", "mixtrall"], "did you mean 'mixtral'"),
    (["--formulation", "sparse_moe"], "choose one with --preset"),
    (["--formulation", "mixtral"], "is a preset, not a formulation; use --formulation sparse_moe --preset mixtral"),
])
def test_bad_names_exit_2_with_a_suggestion(args, message):
    result = _check(f"{EXAMPLE}:make_block", *args)
    assert result.exit_code == 2 and message in result.output


def test_bad_targets_exit_2(tmp_path):
    result = _check(f"{EXAMPLE}:make_blok", *MIXTRAL)
    assert result.exit_code == 2 and "did you mean 'make_block'" in result.output
    result = _check(f"{tmp_path / 'missing.py'}:f", *MIXTRAL)
    assert result.exit_code == 2 and "no file" in result.output
    result = _check("no_colon", *MIXTRAL)
    assert result.exit_code == 2 and "MODULE:FUNCTION" in result.output
    path = _write(tmp_path, "raise ImportError('needs a GPU')\n")
    result = _check(f"{path}:f", *MIXTRAL)
    assert result.exit_code == 2 and "importing" in result.output and "needs a GPU" in result.output


def test_python_api_and_convention_variants():
    fn = load_target(f"{EXAMPLE}:make_fixed_block")
    report = run_check(fn, formulation="sparse_moe", preset="mixtral", dtypes=["float32"])
    assert report.ok and len(report.cases) == 2
    variants = dict(convention_variants(mixtral()))
    assert "router.normalize='none' (instead of 'sum')" in variants and "the olmoe preset" in variants
    with pytest.raises(VectorsError, match="MODULE:FUNCTION"):
        load_target("nothing")

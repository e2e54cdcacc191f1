"""``moeref.testing``: load_case / load_cases, assert_moe_close, assert_routing_equal."""

from __future__ import annotations

import numpy as np
import pytest

from moeref.testing import Case, assert_moe_close, assert_routing_equal, load_case, load_cases
from moeref.vectors import VectorsError
from moeref.vectors.generate import generate

NAME = "sparse_moe.mixtral.T7-d5-I3-E8.float32"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    generate(out, only=["sparse_moe.mixtral.T7", "meta_pi.N5"])
    return out


def test_load_case_by_name_and_substring(folder):
    case = load_case(folder, NAME)
    assert isinstance(case, Case) and str(case) == NAME and case.dtype == "float32"
    assert case["inputs/x"].shape == (7, 5) and case["inputs/x"].dtype == np.float32
    assert case.sizes["k"] == 2 and case.preset == "mixtral" and case.options["router"]["score"] == "softmax"
    assert set(case.group("params")) == {"router/weight", "experts/w_in", "experts/w_out"}
    assert load_case(folder, "meta_pi").formulation == "meta_pi"  # a unique substring
    with pytest.raises(KeyError, match="did you mean 'outputs/y'"):
        case["outputs/yy"]


def test_load_case_errors(folder, tmp_path):
    with pytest.raises(VectorsError, match="2 cases"):
        load_case(folder, "sparse_moe.mixtral")
    with pytest.raises(VectorsError, match="no case"):
        load_case(folder, "sparse_moe.mixtrall.T7-d5-I3-E8.float32")
    with pytest.raises(VectorsError, match="does not exist"):
        load_case(tmp_path / "none", NAME)


def test_load_cases_for_pytest_parametrize(folder):
    cases = load_cases(folder, "sparse_moe.mixtral")
    assert [c.dtype for c in cases] == ["float32", "float64"]
    assert len(load_cases(folder)) == 3


def test_case_converts_to_torch_and_jax(folder):
    case = load_case(folder, NAME)
    torch = pytest.importorskip("torch")
    t = case.torch("inputs/x", requires_grad=True)
    assert t.dtype == torch.float32 and t.requires_grad and t.shape == (7, 5)
    assert case.torch("inputs/x", dtype=torch.float64).dtype == torch.float64
    jnp = pytest.importorskip("jax.numpy")
    assert jnp.asarray(case.jax("outputs/routes/expert_index")).shape == (7, 2)


def test_assert_moe_close_uses_the_case_tolerance(folder):
    case = load_case(folder, NAME)
    y = case["outputs/y"]
    assert_moe_close(y.astype(np.float32), case)  # float32 rounding is within the float32 tolerance
    with pytest.raises(AssertionError, match="(?s)outputs/y differs.*max abs error"):
        assert_moe_close(y * 1.01, case)
    assert_moe_close(y * (1 + 1e-3), case, rtol=1e-2)
    with pytest.raises(AssertionError, match="shape"):
        assert_moe_close(y[:3], case)


def test_assert_moe_close_takes_torch_tensors_and_bfloat16(folder):
    torch = pytest.importorskip("torch")
    case = load_case(folder, NAME)
    y = torch.from_numpy(case["outputs/y"])
    assert_moe_close(y.to(torch.bfloat16), case, dtype="bfloat16")
    with pytest.raises(AssertionError):
        assert_moe_close(y.to(torch.bfloat16), case)  # bfloat16 rounding is beyond the float32 tolerance
    assert_moe_close(case.torch("grads/x"), case, name="grads/x")


def test_assert_routing_equal_is_tie_aware(folder):
    case = load_case(folder, NAME)
    index = case["outputs/routes/expert_index"]
    assert_routing_equal(index, case)
    assert_routing_equal(index[:, ::-1], case, ordered=False)
    wrong = index.copy()
    wrong[3] = wrong[3][::-1]
    with pytest.raises(AssertionError, match="token 3: expected experts .*top-3 scores"):
        assert_routing_equal(wrong, case)
    scores = np.array([[0.5, 0.5 - 1e-6, 0.0], [0.7, 0.2, 0.1]])
    assert_routing_equal(np.array([[1], [0]]), np.array([[0], [0]]), scores=scores, dtype="float32")  # a near tie
    with pytest.raises(AssertionError, match="1 of 2 tokens route differently"):
        assert_routing_equal(np.array([[1], [0]]), np.array([[0], [0]]), scores=scores, dtype="float64")
    with pytest.raises(AssertionError, match="shape"):
        assert_routing_equal(index[:, :1], case)


def test_bad_arguments_name_the_argument(folder):
    case = load_case(folder, NAME)
    y, index = case["outputs/y"], case["outputs/routes/expert_index"]
    with pytest.raises(TypeError, match="folder must be a path"):
        load_case(None, NAME)
    with pytest.raises(TypeError, match="folder must be a path"):
        load_cases(None)
    with pytest.raises(VectorsError, match="no case of .* match name='nope'"):
        load_case(folder, "nope")
    with pytest.raises(VectorsError, match="matches pattern='nope'"):
        load_cases(folder, "nope")
    with pytest.raises(TypeError, match="actual must be an array of numbers"):
        assert_moe_close(None, case)
    with pytest.raises(ValueError, match="name='outputs/yy' is not a tensor of case .*did you mean 'outputs/y'"):
        assert_moe_close(y, case, name="outputs/yy")
    with pytest.raises(ValueError, match="rtol must be None or a finite number >= 0, got -1"):
        assert_moe_close(y, case, rtol=-1.0)  # a negative rtol would fail equal arrays
    with pytest.raises(TypeError, match="expected must hold integer expert indices, got dtype float64"):
        assert_routing_equal(index, index.astype(np.float64))
    with pytest.raises(TypeError, match="actual must be an array of numbers"):
        assert_routing_equal(None, case)
    scores = case["outputs/selection_scores"]
    with pytest.raises(ValueError, match=r"scores must have shape \(T, E\) with T=7"):
        assert_routing_equal(index, index, scores=scores[:3])
    with pytest.raises(ValueError, match="scores contains NaN"):
        assert_routing_equal(index, index, scores=np.where(scores > 0, np.nan, scores))
    with pytest.raises(ValueError, match="k must be at least 1"):
        assert_routing_equal(index, index, scores=scores, k=0)
    with pytest.raises(ValueError, match="max_report must be at least 1"):
        assert_routing_equal(index, index, max_report=-1)
    with pytest.raises(ValueError, match="dtype 'float8' has no tie threshold"):
        assert_routing_equal(index, index, dtype="float8")
    with pytest.raises(AssertionError, match=r"actual has shape \(7, 1\) but expected has shape \(7, 2\)"):
        assert_routing_equal(index[:, :1], index)

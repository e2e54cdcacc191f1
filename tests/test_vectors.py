"""``moeref vectors``: the case registry, determinism, atomic and resumable writes, --only, --force."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from moeref import presets
from moeref.cli import main
from moeref.vectors import VectorsError
from moeref.vectors.generate import generate
from moeref.vectors.verify import verify
from moeref.vectors import io as vio
from moeref.vectors.cases import FORMULATIONS, all_cases, options_to_json, reference, select_cases
from moeref.backends.selfcheck import CASES as SELFCHECK_CASES
from moeref.testing import load_case

SMALL = ["sparse_moe.mixtral.T7", "meta_pi.N5"]  # 3 files: quick to write


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_covers_every_formulation_and_preset():
    specs = all_cases()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert {c.name for c in SELFCHECK_CASES} | {"sparse_moe", "soft_moe", "expert_choice", "hash_layer", "base_layer"} <= set(FORMULATIONS)
    sparse = [s for s in specs if s.formulation == "sparse_moe"]
    assert {s.preset for s in sparse} == set(presets.PRESETS)
    for preset in presets.PRESETS:
        mine = [s for s in sparse if s.preset == preset]
        assert {s.dtype for s in mine} == {"float64", "float32"}
        assert any(s.sizes["T"] % 2 and s.sizes["d"] % 2 for s in mine), "an odd shape"
    for s in specs:
        json.dumps(options_to_json(s.options), allow_nan=False)
        json.dumps(s.sizes, allow_nan=False)


def test_options_to_json_handles_non_finite_and_nested_records():
    opts = presets.deepseek_v3()
    out = options_to_json(opts)
    assert out["router"]["k"] == 8 and isinstance(out["ffn"], dict)
    assert options_to_json(float("-inf")) == "-inf" and options_to_json((1, 2.5)) == [1, 2.5]
    with pytest.raises(TypeError, match="cannot write option value"):
        options_to_json(object())


def test_sparse_reference_stores_every_output_draw_and_gradient():
    spec = select_cases(["sparse_moe.switch.T7-d5-I3-E8.float32"])[0]
    ref = reference(spec)
    t = ref.tensors
    for name in ("inputs/x", "params/router/weight", "params/experts/w_in", "params/experts/w_out", "cotangents/y",
                 "outputs/y", "outputs/logits", "outputs/scores", "outputs/selection_scores", "outputs/routes/expert_index",
                 "outputs/routes/weight", "outputs/routes/kept", "outputs/routes/position", "outputs/counts_before",
                 "outputs/counts_after", "outputs/capacity", "outputs/load_balancing_loss", "outputs/z_loss",
                 "outputs/aux_loss", "grads/x", "grads/params/router/weight", "aux_grads/params/router/weight"):
        assert name in t, name
    assert t["inputs/x"].dtype == np.float32 and t["outputs/y"].dtype == np.float64  # float64 reference
    assert not t["outputs/routes/kept"].all(), "the Switch cases drop routes"
    gshard = reference(select_cases(["sparse_moe.gshard_top2.T7"])[0]).tensors
    assert any(k.startswith("draws/") for k in gshard), "presets with random policies store their draws"


def test_reference_inputs_are_tie_free_in_float32():
    from moeref.vectors.compare import TIE_THRESHOLDS, top_gaps

    spec = select_cases(["sparse_moe.olmoe.T32-d16-I24-E16.float32"])[0]
    t = reference(spec).tensors
    assert top_gaps(t["outputs/selection_scores"], spec.sizes["k"]).min() > 10 * TIE_THRESHOLDS["float32"]


def test_select_cases_globs_substrings_and_suggestions():
    assert all(s.preset == "mixtral" for s in select_cases(["sparse_moe.mixtral"]))
    assert [s.name for s in select_cases(["*.mixtral.T7-*.float32"])] == ["sparse_moe.mixtral.T7-d5-I3-E8.float32"]
    with pytest.raises(VectorsError, match="did you mean 'mixtral'"):
        select_cases(["mixtrall"])


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def test_generate_everything_then_verify(tmp_path):
    result = generate(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["schema_version"] == vio.SCHEMA_VERSION
    assert {c["name"] for c in manifest["cases"]} == {s.name for s in all_cases()}
    assert all(r.status == "written" for r in result.cases)
    entry = manifest["cases"][0]
    assert set(entry) >= {"name", "file", "sha256", "formulation", "preset", "dtype", "seed", "sizes", "options", "tensors"}
    assert verify(tmp_path).ok


def test_generation_is_byte_identical_across_runs_and_processes(tmp_path):
    generate(tmp_path / "a", only=SMALL)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cmd = [sys.executable, "-m", "moeref.cli", "vectors", "--out", str(tmp_path / "b")] + [a for p in SMALL for a in ("--only", p)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(a[k] == b[k] for k in a), "generation must be deterministic"


def test_round_trip_load_case_equals_reference(tmp_path):
    generate(tmp_path, only=["sparse_moe.mixtral.T7-d5-I3-E8.float32"])
    case = load_case(tmp_path, "sparse_moe.mixtral.T7-d5-I3-E8.float32")
    ref = reference(select_cases(["sparse_moe.mixtral.T7-d5-I3-E8.float32"])[0])
    assert case.tensors.keys() == ref.tensors.keys()
    for k, v in ref.tensors.items():
        np.testing.assert_array_equal(case[k], v)
        assert case[k].dtype == v.dtype
    assert case.sizes == {"T": 7, "d": 5, "I": 3, "E": 8, "k": 2} and case.options["router"]["normalize"] == "sum"


def test_rerun_keeps_identical_files_and_merges_the_manifest(tmp_path):
    generate(tmp_path, only=["meta_pi"])
    before = _files(tmp_path)
    again = generate(tmp_path, only=["meta_pi"])
    assert {r.status for r in again.cases} == {"kept"} and again.manifest_status == "kept"
    assert _files(tmp_path) == before
    generate(tmp_path, only=["mixture"])  # adds to the manifest
    names = {c["name"] for c in vio.read_manifest(tmp_path)["cases"]}
    assert any(n.startswith("meta_pi") for n in names) and any(n.startswith("mixture") for n in names)


def test_interrupted_run_is_detected_and_completed(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = vio.atomic_write

    def crash_on_second(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data[: len(data) // 2])  # a half-written temporary file
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr("moeref.vectors.generate.atomic_write", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, only=SMALL)
    assert not (tmp_path / "manifest.json").exists() and vio.temp_files(tmp_path)
    with pytest.raises(VectorsError, match="incomplete"):
        verify(tmp_path)
    monkeypatch.setattr("moeref.vectors.generate.atomic_write", real)
    result = generate(tmp_path, only=SMALL)
    assert [r.status for r in result.cases].count("kept") == 1
    assert not vio.temp_files(tmp_path) and verify(tmp_path).ok


def test_nothing_is_overwritten_without_force(tmp_path):
    generate(tmp_path, only=["meta_pi.N5"])
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    edited = path.read_bytes()
    with pytest.raises(VectorsError, match="different content.*--force"):
        generate(tmp_path, only=["meta_pi.N5"])
    assert path.read_bytes() == edited
    result = generate(tmp_path, only=["meta_pi.N5"], force=True)
    assert result.cases[0].status == "replaced" and verify(tmp_path).ok


def test_manifest_of_another_version_needs_force(tmp_path):
    generate(tmp_path, only=["mixture.N6"])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["moeref_version"] = "0.0.1"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VectorsError, match="moeref '0.0.1'.*--force"):
        generate(tmp_path, only=["mixture.N6"])
    generate(tmp_path, only=["mixture.N6"], force=True)
    assert vio.read_manifest(tmp_path)["moeref_version"] != "0.0.1"


def test_cli_vectors_summary_and_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["vectors", "--out", str(tmp_path), "--only", "mixture.N6"])
    assert result.exit_code == 0, result.output
    assert "mixture.N6-n4-d_out2.float64" in result.output and "manifest written" in result.output
    result = runner.invoke(main, ["vectors", "--out", str(tmp_path), "--only", "mixtrall"])
    assert result.exit_code == 2 and "did you mean" in result.output
    (tmp_path / "file").write_text("x")
    result = runner.invoke(main, ["vectors", "--out", str(tmp_path / "file")])
    assert result.exit_code != 0


# --------------------------------------------------------------------------------------------
# No pickle anywhere in the readers and writers
# --------------------------------------------------------------------------------------------


def test_no_pickle_in_the_vectors_code():
    package = pathlib.Path(__file__).resolve().parents[1] / "moeref"
    for path in [*sorted((package / "vectors").glob("*.py")), package / "testing.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for m in mods), path.name
            if isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle", path.name
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("load_pickle", "unpickle"), path.name
        assert "torch.load" not in path.read_text() and "np.load(" not in path.read_text(), path.name

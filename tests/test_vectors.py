"""``moeref vectors``: the case registry, determinism, all-or-nothing staged writes and their repair, --only, --force."""

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
from moeref.vectors import staging
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
    assert _files(tmp_path) == before and not staging.leftovers(tmp_path)
    generate(tmp_path, only=["mixture"])  # adds to the manifest
    names = {c["name"] for c in vio.read_manifest(tmp_path)["cases"]}
    assert any(n.startswith("meta_pi") for n in names) and any(n.startswith("mixture") for n in names)


def _crash_on_second_write(monkeypatch):
    """Make the second case-file write of the next run leave a half-written temporary file and raise Ctrl-C."""
    calls = {"n": 0}
    real = vio.atomic_write

    def crash_on_second(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr("moeref.vectors.generate.atomic_write", crash_on_second)
    return real


@pytest.mark.parametrize("older", [False, True], ids=["new-folder", "older-complete-state"])
def test_interrupted_run_is_detected_and_completed(tmp_path, monkeypatch, older):
    folder = tmp_path / "v"
    if older:
        generate(folder, only=["meta_pi.N5"])
    before = _files(folder) if older else None
    real = _crash_on_second_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        generate(folder, only=SMALL + ["mixture.N6"])
    assert (_files(folder) if folder.exists() else None) == before, "the folder is exactly as before"
    assert not staging.leftovers(folder), "the staging folder is deleted on Ctrl-C"
    if not older:
        with pytest.raises(VectorsError, match="does not exist"):
            verify(folder)
    monkeypatch.setattr("moeref.vectors.generate.atomic_write", real)
    result = generate(folder, only=SMALL + ["mixture.N6"])
    assert [r.status for r in result.cases].count("kept") == (1 if older else 0)
    assert not vio.temp_files(folder) and not staging.leftovers(folder) and verify(folder).ok


def test_stale_staging_folder_and_temp_files_are_removed(tmp_path):
    folder = tmp_path / "v"
    generate(folder, only=["meta_pi.N5"])
    (folder / "meta_pi" / ".x.safetensors.tmp").write_bytes(b"half")
    (tmp_path / ".v.partial" / "meta_pi").mkdir(parents=True)
    (tmp_path / ".v.partial" / "meta_pi" / "junk.safetensors").write_bytes(b"junk")
    assert "interrupted `moeref vectors` left .v.partial" in " ".join(verify(folder).notes)
    result = generate(folder, only=["meta_pi.N5"])
    assert result.cases[0].status == "kept"
    assert not vio.temp_files(folder) and not staging.leftovers(folder) and verify(folder).ok


def test_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    folder = tmp_path / "v"
    generate(folder, only=["meta_pi.N5"])  # new folder: one rename
    (folder / "notes.txt").write_text("mine")
    generate(folder, only=["mixture.N6"])  # existing folder: two renames
    assert (folder / "notes.txt").read_text() == "mine" and not staging.leftovers(folder)
    assert {c["formulation"] for c in vio.read_manifest(folder)["cases"]} == {"meta_pi", "mixture", "hard_mixture"}
    before = _files(folder)
    real_rename = os.rename

    def ctrl_c_between_the_renames(src, dst):
        if pathlib.Path(src) == staging.staging_path(folder.resolve()):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", ctrl_c_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        generate(folder, only=SMALL)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _files(folder) == before, "the first rename is undone"
    generate(folder, only=SMALL)
    assert verify(folder).ok and not staging.leftovers(folder)


@pytest.mark.parametrize("staged_complete", [True, False], ids=["finish-swap", "restore-previous"])
def test_crash_between_the_fallback_renames_is_repaired(tmp_path, staged_complete):
    """The state a power loss between the two renames leaves: no folder, .v.previous and .v.partial beside."""
    folder, old, new = tmp_path / "v", tmp_path / "old", tmp_path / "new"
    generate(old, only=["meta_pi.N5"])
    generate(new, only=["meta_pi.N5", "mixture.N6"])
    if not staged_complete:
        (new / "manifest.json").unlink()  # the crash came before the new content was complete
    expected = _files(new if staged_complete else old)
    old.rename(tmp_path / ".v.previous")
    new.rename(tmp_path / ".v.partial")
    with pytest.raises(VectorsError, match=r"\.v\.previous \(its previous content\) and \.v\.partial .*moeref vectors --out"):
        verify(folder)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 2 and ".v.previous" in result.output and "to repair it" in result.output
    result = generate(folder, only=["meta_pi.N5", "mixture.N6"] if staged_complete else ["meta_pi.N5"])
    assert {r.status for r in result.cases} == {"kept"} and result.manifest_status == "kept"
    assert _files(folder) == expected and not staging.leftovers(folder) and verify(folder).ok


def test_leftover_previous_beside_a_complete_folder_is_noted_and_removed(tmp_path):
    folder = tmp_path / "v"
    generate(folder, only=["meta_pi.N5"])
    (tmp_path / ".v.previous").mkdir()
    assert ".v.previous beside the folder is the old content" in " ".join(verify(folder).notes)
    generate(folder, only=["meta_pi.N5"])
    assert not staging.leftovers(folder)


def test_missing_or_changed_files_of_cases_not_regenerated_are_dropped(tmp_path):
    folder = tmp_path / "v"
    generate(folder, only=SMALL)
    missing = next(folder.rglob("meta_pi*.safetensors"))
    missing.unlink()
    changed = next(folder.rglob("*mixtral*float32.safetensors"))
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
    result = CliRunner().invoke(main, ["vectors", "--out", str(folder), "--only", "mixture.N6"])
    assert result.exit_code == 0, result.output
    assert "dropped from the manifest, 2 case(s)" in result.output and "meta_pi.N5-d3-n3-d_out2.float64: " in result.output
    names = {c["name"] for c in vio.read_manifest(folder)["cases"]}
    assert names == {"sparse_moe.mixtral.T7-d5-I3-E8.float64", "mixture.N6-n4-d_out2.float64", "hard_mixture.N6-n4-d_out2.float64"}
    assert changed.exists(), "a changed file stays, unlisted"
    assert verify(folder).ok


def test_stage_links_the_targets_files_and_skips_what_it_is_told(tmp_path):
    target = tmp_path / "t"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "a.bin").write_bytes(b"a")
    (target / "skip.me").write_bytes(b"s")
    (target / "link").symlink_to("sub/a.bin")
    (target / "sub").chmod(0o750)
    staged = staging.stage(target, skip=lambda rel: rel.name == "skip.me")
    assert staged == tmp_path / ".t.partial"
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*")) == ["link", "sub", "sub/a.bin"]
    assert (staged / "sub" / "a.bin").stat().st_ino == (target / "sub" / "a.bin").stat().st_ino, "a hard link"
    assert (staged / "link").is_symlink() and (staged / "sub").stat().st_mode & 0o777 == 0o750
    assert staging.stage(tmp_path / "new") == tmp_path / ".new.partial"  # no target yet: an empty folder


def test_exchange_swaps_two_folders_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A"), (b / "f").write_text("B")
    if not staging.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    with pytest.raises(FileNotFoundError):
        staging.exchange(a, tmp_path / "absent")


def test_targets_that_cannot_be_replaced_as_a_whole(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(VectorsError, match="exists and is not a folder"):
        generate(tmp_path / "file", only=["meta_pi.N5"])
    (tmp_path / "v" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "v" / "sub")
    for out in (".", "..", str(tmp_path / "v")):
        with pytest.raises(VectorsError, match="working directory or contains it"):
            generate(out, only=["meta_pi.N5"])
    assert not staging.leftovers(tmp_path / "v")
    generate("vec", only=["meta_pi.N5"])  # a relative folder below the working directory is fine
    assert verify(tmp_path / "v" / "sub" / "vec").ok


def test_nothing_is_overwritten_without_force(tmp_path):
    generate(tmp_path, only=["meta_pi.N5"])
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    edited = path.read_bytes()
    with pytest.raises(VectorsError, match="different content.*--force"):
        generate(tmp_path, only=["meta_pi.N5"])
    assert path.read_bytes() == edited and not staging.leftovers(tmp_path)
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

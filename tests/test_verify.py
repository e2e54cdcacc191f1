"""``moeref verify``: checksums, clear errors, per-dtype tolerances, the tie-aware comparison, fuzzed readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from moeref.cli import main
from moeref.vectors import VectorsError
from moeref.vectors import io as vio
from moeref.vectors.cases import RoutingSpec
from moeref.vectors.compare import TIE_THRESHOLDS, compare, top_gaps
from moeref.vectors.generate import generate
from moeref.vectors.verify import verify

ONLY = ["sparse_moe.mixtral.T7", "sparse_moe.switch.T7-d5-I3-E8.float64", "meta_pi.N5"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine")
    generate(folder, only=ONLY)
    return folder


@pytest.fixture
def folder(pristine, tmp_path):
    """A fresh copy of the pristine vectors, free to tamper with."""
    import shutil

    return pathlib_copy(shutil, pristine, tmp_path / "v")


def pathlib_copy(shutil, src, dst):
    shutil.copytree(src, dst)
    return dst


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _run(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


# --------------------------------------------------------------------------------------------
# Passing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch"])
def test_verify_passes_on_backends(pristine, backend):
    pytest.importorskip({"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch"}[backend])
    result = _run(pristine, "--backend", backend)
    assert result.exit_code == 0, result.output
    assert "all passed" in result.output and "mixtral" in result.output and backend in result.output


def test_verify_table_reports_float32_errors(pristine):
    result = verify(pristine, only=["float32"])
    [outcome] = result.outcomes
    assert outcome.ok and 0 < outcome.comparison.max_rel("outputs") < 1e-5


# --------------------------------------------------------------------------------------------
# Clear errors (exit status 2)
# --------------------------------------------------------------------------------------------


def test_missing_folder_and_manifest(tmp_path):
    result = _run(tmp_path / "nope")
    assert result.exit_code == 2 and "does not exist" in result.output and "moeref vectors --out" in result.output
    result = _run(tmp_path)
    assert result.exit_code == 2 and "holds no manifest.json" in result.output


def test_tampered_file_is_caught_by_its_checksum(folder):
    path = next(folder.rglob("*mixtral*float32.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    result = _run(folder)
    assert result.exit_code == 2 and "does not match its SHA-256" in result.output and path.name in result.output


def test_missing_file_means_incomplete(folder):
    next(folder.rglob("*meta_pi*.safetensors")).unlink()
    result = _run(folder)
    assert result.exit_code == 2 and "incomplete" in result.output and "is missing" in result.output


def test_newer_schema_is_refused(folder):
    m = _manifest(folder)
    m["schema_version"] = vio.SCHEMA_VERSION + 1
    _write_manifest(folder, m)
    result = _run(folder)
    assert result.exit_code == 2 and "newer than this moeref" in result.output


@pytest.mark.parametrize("field,value,message", [
    ("formulation", "sparse_moee", "unknown formulation 'sparse_moee'; did you mean 'sparse_moe'?"),
    ("preset", "mixtrall", "unknown preset 'mixtrall' of sparse_moe; did you mean 'mixtral'?"),
])
def test_unknown_names_suggest_the_closest(folder, field, value, message):
    m = _manifest(folder)
    entry = next(e for e in m["cases"] if e["formulation"] == "sparse_moe")
    entry[field] = value
    _write_manifest(folder, m)
    result = _run(folder)
    assert result.exit_code == 2 and message in result.output


def test_unknown_backend(pristine):
    result = _run(pristine, "--backend", "tensorflow")
    assert result.exit_code == 2 and "unknown backend 'tensorflow'" in result.output


# --------------------------------------------------------------------------------------------
# Failures (exit status 1)
# --------------------------------------------------------------------------------------------


def _rewrite_case(folder, name, edit):
    """Change one stored tensor and re-sign the file in the manifest (a consistent but wrong vector)."""
    m = _manifest(folder)
    entry = next(e for e in m["cases"] if e["name"] == name)
    path = folder / entry["file"]
    tensors = vio.decode_case(path.read_bytes(), name)
    edit(tensors)
    data = vio.encode_case(tensors, name)
    path.write_bytes(data)
    entry["sha256"], entry["bytes"] = vio.sha256(data), len(data)
    _write_manifest(folder, m)


def test_wrong_stored_output_fails_with_the_tensor_named(folder):
    name = "sparse_moe.mixtral.T7-d5-I3-E8.float64"
    _rewrite_case(folder, name, lambda t: t.__setitem__("grads/params/experts/w_out", t["grads/params/experts/w_out"] * 1.001))
    result = _run(folder)
    assert result.exit_code == 1, result.output
    assert f"FAIL {name}" in result.output and "grads/params/experts/w_out" in result.output and "1 FAILED" in result.output


def test_tolerance_overrides(folder):
    name = "meta_pi.N5-d3-n3-d_out2.float64"
    _rewrite_case(folder, name, lambda t: t.__setitem__("outputs/meta_pi", t["outputs/meta_pi"] * (1 + 1e-8)))
    assert _run(folder).exit_code == 1
    assert _run(folder, "--rtol", "1e-6").exit_code == 0


def test_options_that_differ_from_this_moeref_fail(folder):
    m = _manifest(folder)
    next(e for e in m["cases"] if "mixtral" in e["name"])["options"]["router"]["k"] = 3
    _write_manifest(folder, m)
    result = _run(folder)
    assert result.exit_code == 1 and "options differ" in result.output and "router.k: stored 3" in result.output


def test_notes_for_leftover_temporary_files(folder):
    (folder / "sparse_moe" / ".x.safetensors.tmp").write_bytes(b"partial")
    result = _run(folder, "--only", "meta_pi")
    assert result.exit_code == 0 and "temporary file" in result.output


def test_notes_for_a_leftover_staging_folder(folder):
    (folder.parent / ".v.partial" / "meta_pi").mkdir(parents=True)
    result = _run(folder, "--only", "meta_pi")
    assert result.exit_code == 0, result.output
    assert "an interrupted `moeref vectors` left .v.partial beside the folder" in result.output
    assert "the folder itself is the previous complete state" in result.output


def test_missing_folder_with_leftovers_says_what_happened(folder):
    folder.rename(folder.parent / ".v.partial")
    result = _run(folder)
    assert result.exit_code == 2 and "an interrupted `moeref vectors` left .v.partial" in result.output
    (folder.parent / ".v.previous").mkdir()
    result = _run(folder)
    assert result.exit_code == 2 and ".v.previous (its previous content) and .v.partial (the new content)" in result.output
    assert "again to repair it" in result.output


# --------------------------------------------------------------------------------------------
# The tie-aware comparison
# --------------------------------------------------------------------------------------------

ROUTING = RoutingSpec("index", "scores", k=1, rows=("y", "index"), independent=("logits",))


def _routing_case():
    scores = np.array([[0.6, 0.3, 0.1], [0.5, 0.5 - 1e-7, 0.0], [0.2, 0.7, 0.1]])  # token 1: a near tie
    expected = {"scores": scores, "index": np.array([[0], [0], [1]]), "y": np.array([[1.0], [2.0], [3.0]]),
                "logits": np.log(scores + 1e-3), "grad_w": np.array([4.0, 5.0])}
    return expected


def test_near_tie_that_routes_differently_is_reported_not_failed():
    expected = _routing_case()
    actual = {**expected, "index": np.array([[0], [1], [1]]), "y": np.array([[1.0], [2.5], [3.0]]), "grad_w": np.array([9.0, 9.0])}
    result = compare(actual, expected, dtype="float32", routing=ROUTING)
    assert result.ok
    assert result.ties.differing == (1,) and 1 in result.ties.near_ties
    assert {t.name: t.status for t in result.tensors}["grad_w"] == "skipped"
    assert "near-tie" in result.report() and "not comparable" in result.report()


def test_clear_routing_mismatch_fails_with_scores():
    expected = _routing_case()
    actual = {**expected, "index": np.array([[1], [0], [1]])}
    result = compare(actual, expected, dtype="float32", routing=ROUTING)
    assert not result.ok
    line = result.mismatched_tokens[0]
    assert line.startswith("token 0") and "expected experts [0], got [1]" in line and "0: 0.6" in line


def test_float64_tie_threshold_is_tight():
    expected = _routing_case()
    actual = {**expected, "index": np.array([[0], [1], [1]])}
    assert compare(actual, expected, dtype="float32", routing=ROUTING).ok
    assert not compare(actual, expected, dtype="float64", routing=ROUTING).ok  # 2e-7 is no tie in float64
    assert TIE_THRESHOLDS["float64"] < 2e-7 < TIE_THRESHOLDS["float32"]


def test_top_gaps_covers_the_order_inside_the_top_k():
    v = np.array([[0.40, 0.39999999, 0.1, 0.0], [0.5, 0.3, 0.2, 0.0]])
    gaps = top_gaps(v, k=2)
    assert gaps[0] < 1e-6 < gaps[1]
    assert np.isinf(top_gaps(np.array([[1.0]]), k=1)).all()
    assert top_gaps(np.array([[1.0, -np.inf, -np.inf]]), k=2)[0] == np.inf  # never NaN


# --------------------------------------------------------------------------------------------
# Fuzzed readers: malformed manifests and case files give a VectorsError, never a crash
# --------------------------------------------------------------------------------------------

BAD_MANIFESTS = [
    b"",
    b"\xff\xfe\x00",
    b"[1, 2, 3]",
    b'{"schema_version": true, "cases": []}',
    b'{"schema_version": 1}',
    b'{"schema_version": 1, "cases": [{"name": "x"}]}',
    b"[" * 100000,
    b'{"schema_version": 1, "cases": [' + b'{"name": "a", "file": "../../etc/passwd.safetensors", "sha256": "' + b"0" * 64
    + b'", "bytes": 1, "formulation": "f", "preset": null, "dtype": "float64", "seed": 0, "sizes": {}, "options": {}, "tensors": {}}]}',
]


@pytest.mark.parametrize("data", BAD_MANIFESTS, ids=range(len(BAD_MANIFESTS)))
def test_malformed_manifest_is_a_clear_error(tmp_path, data):
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(VectorsError):
        verify(tmp_path)


def test_path_traversal_in_the_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_bytes(BAD_MANIFESTS[-1])
    with pytest.raises(VectorsError, match="relative path"):
        vio.read_manifest(tmp_path)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_case_file_reader_fuzz_property(pristine, tmp_path_factory, data):
    """Truncated, bit-flipped or spliced case files (re-signed in the manifest) are refused cleanly."""
    folder = tmp_path_factory.mktemp("fuzz")
    import shutil

    shutil.copytree(pristine, folder, dirs_exist_ok=True)
    m = _manifest(folder)
    entry = m["cases"][data.draw(st.integers(0, len(m["cases"]) - 1))]
    raw = bytearray((folder / entry["file"]).read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "header", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, min(len(raw) - 1, 400)))  # the JSON header and the first bytes
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "header":
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    else:
        raw = bytearray(data.draw(st.binary(max_size=300)))
    entry["sha256"], entry["bytes"] = vio.sha256(bytes(raw)), len(raw)
    (folder / entry["file"]).write_bytes(bytes(raw))
    _write_manifest(folder, m)
    try:
        result = verify(folder, only=[entry["name"]])
    except VectorsError:
        return  # refused with a message
    # a flip that still parses: the comparison reports it (or it hit a bit that does not matter)
    assert all(o.error is not None or o.comparison is not None for o in result.outcomes)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_manifest_reader_fuzz_property(pristine, tmp_path_factory, data):
    """Any field of the manifest replaced by any JSON value: a VectorsError or a normal result, nothing else."""
    folder = tmp_path_factory.mktemp("fuzzm")
    import shutil

    shutil.copytree(pristine, folder, dirs_exist_ok=True)
    m = _manifest(folder)
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(m)))
        m[key] = data.draw(JSON_VALUES)
    else:
        entry = m["cases"][data.draw(st.integers(0, len(m["cases"]) - 1))]
        key = data.draw(st.sampled_from(sorted(entry)))
        entry[key] = data.draw(JSON_VALUES)
    _write_manifest(folder, m)
    try:
        verify(folder)
    except VectorsError:
        pass

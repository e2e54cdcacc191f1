"""Fuzzing the vectors readers (moeref.vectors.io): malformed, truncated and tampered safetensors
files and manifests always give a VectorsError with a message, never another exception, never a
crash of the interpreter, never code execution (the pickle side is tests/test_no_pickle.py).

Hypothesis drives random bytes, bit flips and JSON values; targeted cases tamper with the
safetensors header (its 8-byte length, its JSON: dtypes, shapes, offsets) and the manifest's fields.
A subprocess decodes a few thousand corrupted files so that a crash inside the native parser would
fail one test instead of killing the run.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

vio = pytest.importorskip("moeref.vectors.io", reason="moeref.vectors is not there yet")
from moeref.vectors import VectorsError  # noqa: E402

#: Number of fuzz cases each test ran (printed by the last test: the figure for the issue's note).
FUZZ_CASES: dict[str, int] = {}


def count(name: str, n: int = 1) -> None:
    FUZZ_CASES[name] = FUZZ_CASES.get(name, 0) + n


def valid_case() -> bytes:
    return vio.encode_case({"inputs/x": np.arange(6.0).reshape(2, 3), "outputs/routes/expert_index": np.array([[1, 0]])}, "fuzz")


def split(data: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes, *, pad: bool = True) -> bytes:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _raw_header(h: bytes, body: bytes) -> bytes:
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def decode_or_error(data: bytes, name: str):
    """Decode; a VectorsError is fine, any other exception fails the test."""
    count(name)
    try:
        return vio.decode_case(data, "fuzzed.safetensors")
    except VectorsError as exc:
        assert "fuzzed.safetensors" in str(exc)
        return None


def test_the_valid_case_round_trips():
    out = vio.decode_case(valid_case(), "ok.safetensors")
    np.testing.assert_array_equal(out["inputs/x"], np.arange(6.0).reshape(2, 3))


# --------------------------------------------------------------------------------------------
# Case files: random bytes, truncations, bit flips, tampered headers
# --------------------------------------------------------------------------------------------


@given(st.binary(max_size=512))
def test_random_bytes_are_refused_property(data):
    assert decode_or_error(data, "random bytes") is None or len(data) >= 8


@given(st.binary(min_size=8, max_size=8), st.binary(max_size=256))
def test_random_header_length_and_body_property(prefix, rest):
    decode_or_error(prefix + rest, "random header length")


def test_every_truncation_is_refused():
    data = valid_case()
    for n in range(len(data)):
        assert decode_or_error(data[:n], "truncation") is None, f"a file truncated to {n} of {len(data)} bytes was read"


@given(st.data())
def test_bit_flips_give_an_error_or_a_file_the_checksum_catches_property(data):
    good = valid_case()
    i = data.draw(st.integers(0, len(good) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(good)
    bad[i] ^= 1 << bit
    decode_or_error(bytes(bad), "bit flip")
    assert vio.sha256(bytes(bad)) != vio.sha256(good)  # load_entry_tensors refuses it by checksum


HEADER_TAMPERS = {
    "length_zero": lambda n, h, b: struct.pack("<Q", 0) + b,
    "length_huge": lambda n, h, b: struct.pack("<Q", 2**63) + json.dumps(h).encode() + b,
    "length_past_end": lambda n, h, b: struct.pack("<Q", n + 1000) + json.dumps(h).encode().ljust(n) + b,
    "length_short": lambda n, h, b: struct.pack("<Q", n // 2) + json.dumps(h).encode().ljust(n) + b,
    "not_json": lambda n, h, b: join({}, b)[:8] + b"{not json" + b" " * 7 + b,
    "json_list": lambda n, h, b: join([1, 2], b),  # type: ignore[arg-type]
    "unknown_dtype": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "dtype": "F128"}}, b),
    "shape_too_big": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "shape": [2, 300]}}, b),
    "negative_shape": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "shape": [-2, 3]}}, b),
    "offsets_out_of_range": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "data_offsets": [0, 10**9]}}, b),
    "offsets_reversed": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "data_offsets": [48, 0]}}, b),
    "offsets_overlap": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "data_offsets": [0, 48]},
                                             "outputs/routes/expert_index": {**h["outputs/routes/expert_index"],
                                                                             "data_offsets": [0, 16]}}, b),
    "offsets_missing": lambda n, h, b: join({**h, "inputs/x": {"dtype": "F64", "shape": [2, 3]}}, b),
    "shape_not_list": lambda n, h, b: join({**h, "inputs/x": {**h["inputs/x"], "shape": "2x3"}}, b),
    "metadata_not_strings": lambda n, h, b: join({**h, "__metadata__": {"moeref": {"nested": 1}}}, b),
    "deeply_nested": lambda n, h, b: _raw_header(json.dumps(h)[:-1].encode() + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", b),
    "body_truncated": lambda n, h, b: join(h, b[:-8]),
    "body_extended": lambda n, h, b: join(h, b + b"\0" * 64),
}


@pytest.mark.parametrize("tamper", sorted(HEADER_TAMPERS))
def test_tampered_headers_are_refused(tamper):
    n, header, body = split(valid_case())
    bad = HEADER_TAMPERS[tamper](n, header, body)
    out = decode_or_error(bad, "tampered header")
    if out is not None:  # accepted: it must then be a file whose checksum differs from the original
        assert vio.sha256(bad) != vio.sha256(valid_case()), tamper


def test_no_crash_of_the_interpreter_on_thousands_of_corrupted_files():
    """Corrupted files decoded in a fresh interpreter: a crash in the native parser fails here only."""
    script = r"""
import random, struct, sys
import numpy as np
from moeref.vectors import VectorsError
from moeref.vectors.io import decode_case, encode_case
good = encode_case({"a": np.arange(12.0).reshape(3, 4), "b": np.array([1, 2, 3])}, "fuzz")
rng = random.Random(20261129)
ok = refused = 0
for i in range(3000):
    data = bytearray(good)
    kind = i % 4
    if kind == 0:   # random bytes in the header
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(8, 8 + struct.unpack("<Q", good[:8])[0]); data[j] = rng.randrange(256)
    elif kind == 1:  # random length prefix
        data[:8] = struct.pack("<Q", rng.choice([rng.randrange(2**16), rng.randrange(2**64)]))
    elif kind == 2:  # truncation plus garbage
        data = data[: rng.randrange(len(data))] + bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
    else:            # random bytes anywhere
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    try:
        decode_case(bytes(data), "f"); ok += 1
    except VectorsError:
        refused += 1
print(ok, refused)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the interpreter died or raised (status {done.returncode}): {done.stderr[-2000:]}"
    ok, refused = map(int, done.stdout.split())
    assert ok + refused == 3000
    count("subprocess corrupted files", 3000)


# --------------------------------------------------------------------------------------------
# Manifests: random bytes and JSON, tampered fields, unsafe paths
# --------------------------------------------------------------------------------------------


def good_entry(data: bytes) -> dict:
    return {"name": "case", "file": "sub/case.safetensors", "sha256": vio.sha256(data), "bytes": len(data),
            "formulation": "mixture", "preset": None, "dtype": "float64", "seed": 0, "sizes": {}, "options": {},
            "tensors": {"inputs/x": {"dtype": "float64", "shape": [2, 3]}, "outputs/routes/expert_index": {"dtype": "int64", "shape": [1, 2]}}}


def read_or_error(folder: Path, manifest_bytes: bytes, name: str):
    count(name)
    (folder / vio.MANIFEST).write_bytes(manifest_bytes)
    try:
        return vio.read_manifest(folder)
    except VectorsError as exc:
        assert str(exc)
        return None


def test_a_valid_manifest_and_its_case_load(tmp_path):
    data = valid_case()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "case.safetensors").write_bytes(data)
    m = read_or_error(tmp_path, json.dumps({"schema_version": 1, "cases": [good_entry(data)]}).encode(), "manifest")
    assert set(vio.load_entry_tensors(tmp_path, m["cases"][0])) == {"inputs/x", "outputs/routes/expert_index"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=256))
def test_random_manifest_bytes_are_refused_property(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("m")
    read_or_error(folder, data, "random manifest bytes")


@given(json_values)
def test_random_json_manifests_are_refused_property(tmp_path_factory, value):
    folder = tmp_path_factory.mktemp("m")
    read_or_error(folder, json.dumps(value).encode(), "random JSON manifest")


@given(st.data())
def test_manifest_with_a_field_removed_or_mistyped_property(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("m")
    entry = good_entry(valid_case())
    key = data.draw(st.sampled_from(sorted(entry)))
    if data.draw(st.booleans()):
        del entry[key]
    else:
        entry[key] = data.draw(json_values.filter(lambda v: type(v) is not type(entry[key])))
    assert read_or_error(folder, json.dumps({"schema_version": 1, "cases": [entry]}).encode(), "tampered manifest field") is None


UNSAFE_FILES = ["../outside.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors", "sub\\x.safetensors",
                "case.pkl", "case.npy", "", "."]


@pytest.mark.parametrize("file", UNSAFE_FILES)
def test_unsafe_case_paths_are_refused(tmp_path, file):
    entry = {**good_entry(valid_case()), "file": file}
    (tmp_path / vio.MANIFEST).write_text(json.dumps({"schema_version": 1, "cases": [entry]}))
    count("unsafe path")
    with pytest.raises(VectorsError, match="relative path ending .safetensors"):
        vio.read_manifest(tmp_path)


@pytest.mark.parametrize("manifest", [
    b'{"schema_version": 99, "cases": []}',
    b'{"schema_version": true, "cases": []}',
    b'{"schema_version": 1, "cases": {}}',
    b'{"schema_version": 1, "cases": [' + b"[" * 100000 + b"]" * 100000 + b"]}",
    b'{"schema_version": 1, "cases": [], "x": NaN}',
    b"\xff\xfe{}",
])
def test_targeted_manifests(tmp_path, manifest):
    out = read_or_error(tmp_path, manifest, "targeted manifest")
    assert out is None or manifest.endswith(b"NaN}")  # a NaN outside the checked fields is JSON-readable


def test_duplicate_case_names_are_refused(tmp_path):
    entry = good_entry(valid_case())
    assert read_or_error(tmp_path, json.dumps({"schema_version": 1, "cases": [entry, entry]}).encode(), "duplicate") is None


def test_tampered_case_file_under_a_valid_manifest_is_refused(tmp_path):
    data = valid_case()
    (tmp_path / "sub").mkdir()
    m = read_or_error(tmp_path, json.dumps({"schema_version": 1, "cases": [good_entry(data)]}).encode(), "manifest")
    for bad in (data[:-1], data[:40], b"", bytes(len(data)), data[:-1] + bytes([data[-1] ^ 1])):
        (tmp_path / "sub" / "case.safetensors").write_bytes(bad)
        count("tampered file under a valid manifest")
        with pytest.raises(VectorsError, match="SHA-256|missing"):
            vio.load_entry_tensors(tmp_path, m["cases"][0])
    (tmp_path / "sub" / "case.safetensors").unlink()
    with pytest.raises(VectorsError, match="missing"):
        vio.load_entry_tensors(tmp_path, m["cases"][0])


def test_fuzz_case_count(capsys):
    """Prints how many fuzz cases ran (this file's tests run before this one)."""
    with capsys.disabled():
        total = sum(FUZZ_CASES.values())
        print(f"\nvectors fuzzing: {total} cases, " + ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_CASES.items())))
    assert total > 0

"""No pickle anywhere: moeref and its backends never unpickle (an AST scan of the source), and the
vectors readers refuse pickle-bearing files without executing them.

Unpickling runs arbitrary code chosen by whoever wrote the file, so a reference whose files travel
between people must not do it: `np.load(allow_pickle=True)`, `torch.load`, `pickle`, `dill`,
`joblib`, `shelve`, `marshal`, `eval` / `exec` are all refused by this scan.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [p for folder in ("moeref", "backends") for p in sorted((ROOT / folder).rglob("*.py"))]

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "copyreg"}
FORBIDDEN_CALLS = {"torch.load", "torch.serialization.load", "pandas.read_pickle", "pd.read_pickle", "read_pickle"}
FORBIDDEN_BUILTINS = {"eval", "exec", "__import__"}


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name / Attribute chain, else ""."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def findings(source: str, filename: str) -> list[str]:
    """Every pickle-capable use in one file's source, as ``file:line: what``."""
    out = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        line = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in FORBIDDEN_MODULES:
                out.append(f"{line}: from {module} import ...")
            if module.split(".")[0] == "torch" and any(a.name == "load" for a in node.names):
                out.append(f"{line}: from {module} import load")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS or name.endswith(".read_pickle"):
                out.append(f"{line}: {name}(...)")
            if name in FORBIDDEN_BUILTINS:
                out.append(f"{line}: {name}(...)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    out.append(f"{line}: {name}(allow_pickle=...)")
    return out


def test_the_scan_finds_every_pickle_capable_form():
    bad = (
        "import pickle\nfrom dill import loads\nimport torch\nx = torch.load('f')\nfrom torch import load\n"
        "np.load('f', allow_pickle=True)\nnp.load('f', allow_pickle=flag)\neval('1')\nimport joblib\npd.read_pickle('f')\n"
    )
    assert len(findings(bad, "bad.py")) == 9  # every line but `import torch`
    assert findings("np.load('f', allow_pickle=False)\nimport json\nast.literal_eval('1')\n", "ok.py") == []


@pytest.mark.parametrize("path", SCANNED, ids=[str(p.relative_to(ROOT)) for p in SCANNED])
def test_no_pickle_in_moeref_or_backends(path):
    assert findings(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


# --------------------------------------------------------------------------------------------
# The vectors readers refuse pickle-bearing files, and do not run them
# --------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a marker file: evidence that a reader executed a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_bearing_payloads(marker: Path) -> dict[str, bytes]:
    """Files that execute code when unpickled: a raw pickle, an object .npy, a torch.save-style zip."""
    raw = pickle.dumps(_Trap(marker))
    npy = io.BytesIO()
    np.save(npy, np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:  # the layout of torch.save: archive/data.pkl
        z.writestr("archive/data.pkl", raw)
    return {"pickle": raw, "npy_object": npy.getvalue(), "torch_zip": zipped.getvalue()}


@pytest.fixture
def vectors_io():
    return pytest.importorskip("moeref.vectors.io", reason="moeref.vectors is not there yet")


def test_the_trap_works(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle_bearing_payloads(marker)["pickle"])
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "npy_object", "torch_zip"])
def test_case_reader_refuses_pickle_without_running_it(tmp_path, vectors_io, kind):
    from moeref.vectors import VectorsError

    marker = tmp_path / "ran"
    data = pickle_bearing_payloads(marker)[kind]
    with pytest.raises(VectorsError, match="not a valid safetensors file"):
        vectors_io.decode_case(data, f"{kind}.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "npy_object", "torch_zip"])
def test_manifest_reader_refuses_pickle_without_running_it(tmp_path, vectors_io, kind):
    from moeref.vectors import VectorsError

    marker = tmp_path / "ran"
    (tmp_path / vectors_io.MANIFEST).write_bytes(pickle_bearing_payloads(marker)[kind])
    with pytest.raises(VectorsError, match="not a valid moeref manifest"):
        vectors_io.read_manifest(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "npy_object", "torch_zip"])
def test_a_listed_pickle_with_a_matching_checksum_is_still_refused(tmp_path, vectors_io, kind):
    """The attacker writes both the file and the manifest: the checksum matches, the format does not."""
    from moeref.vectors import VectorsError

    marker = tmp_path / "ran"
    data = pickle_bearing_payloads(marker)[kind]
    (tmp_path / "case.safetensors").write_bytes(data)
    entry = {"name": "case", "file": "case.safetensors", "sha256": vectors_io.sha256(data), "bytes": len(data),
             "formulation": "mixture", "preset": None, "dtype": "float64", "seed": 0, "sizes": {}, "options": {},
             "tensors": {"x": {"dtype": "float64", "shape": [1]}}}
    (tmp_path / vectors_io.MANIFEST).write_text(json.dumps({"schema_version": 1, "cases": [entry]}))
    manifest = vectors_io.read_manifest(tmp_path)
    with pytest.raises(VectorsError, match="not a valid safetensors file"):
        vectors_io.load_entry_tensors(tmp_path, manifest["cases"][0])
    assert not marker.exists()

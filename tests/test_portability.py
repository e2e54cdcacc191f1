"""moeref's math is pure array-API: it imports no concrete array library."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moeref"
CONCRETE = {"numpy", "torch", "jax", "jaxlib", "cupy", "scipy"}
# host-side I/O, not math: the bundled data sets are read with NumPy; golden vectors and the testing API use NumPy and safetensors
HOST_IO = {"datasets", "vectors", "testing.py"}


def _math_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in HOST_IO:
            continue
        yield path


@pytest.mark.parametrize("path", list(_math_modules()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_no_concrete_array_library(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in CONCRETE, f"{path.name} imports {name}; use array_namespace(...) instead"


@pytest.mark.parametrize("path", list(_math_modules()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_docstrings_use_dollar_math_not_rst(path):
    text = path.read_text()
    assert ".. math::" not in text and ":math:`" not in text, f"{path.name}: write math as $...$ / $$...$$"


def test_no_library_topk_with_unspecified_tie_order():
    for path in _math_modules():
        text = path.read_text()
        assert ".topk(" not in text and "lax.top_k" not in text, f"{path.name}: use moeref.core.top_k (lower index wins ties)"

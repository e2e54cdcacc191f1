"""Flat ``group/path`` names for the leaves of nested NamedTuples, dicts and tuples, and back.

A NamedTuple contributes its field names, a dict its keys, a tuple or list its indices:
``SparseMoEParams(router=RouterParams(weight=W))`` under the prefix ``params`` is the single
leaf ``params/router/weight``. ``None`` leaves (absent optional fields) are skipped on the way
out and restored from the template on the way back.
"""

from __future__ import annotations

from typing import Any, Callable

from ._errors import VectorsError

__all__ = ["flatten", "unflatten", "map_leaves"]


def _is_namedtuple(tree: Any) -> bool:
    return isinstance(tree, tuple) and hasattr(tree, "_fields")


def _children(tree: Any):
    if _is_namedtuple(tree):
        return list(zip(tree._fields, tree))
    if isinstance(tree, dict):
        return [(str(k), v) for k, v in tree.items()]
    if isinstance(tree, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(tree)]
    return None


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """``{"prefix/a/b": leaf, ...}`` in a fixed order (fields / keys / indices); ``None`` skipped."""
    out: dict[str, Any] = {}
    if tree is None:
        return out
    children = _children(tree)
    if children is None:
        out[prefix] = tree
        return out
    for key, child in children:
        out.update(flatten(child, f"{prefix}/{key}"))
    return out


def unflatten(template: Any, flat: dict[str, Any], prefix: str) -> Any:
    """The tree shaped like ``template`` with each leaf taken from ``flat[path]`` (``None`` kept)."""
    if template is None:
        return None
    children = _children(template)
    if children is None:
        if prefix not in flat:
            raise VectorsError(f"tensor {prefix!r} is missing")
        return flat[prefix]
    values = [unflatten(child, flat, f"{prefix}/{key}") for key, child in children]
    if _is_namedtuple(template):
        return type(template)(*values)
    if isinstance(template, dict):
        return dict(zip(template.keys(), values))
    return type(template)(values)


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every non-``None`` leaf, keeping the structure."""
    if tree is None:
        return None
    children = _children(tree)
    if children is None:
        return fn(tree)
    values = [map_leaves(fn, child) for _, child in children]
    if _is_namedtuple(tree):
        return type(tree)(*values)
    if isinstance(tree, dict):
        return dict(zip(tree.keys(), values))
    return type(tree)(values)

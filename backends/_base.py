"""The adapter interface shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# Default comparison tolerances (rtol, atol) by dtype name, for results of moeref's formulations
# computed on two backends or compared with another implementation.
_TOLERANCES = {
    "float64": (1e-12, 1e-14),
    "float32": (1e-5, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """Default ``(rtol, atol)`` for comparing float results of the given dtype."""
    name = str(dtype).split(".")[-1]
    if name not in _TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; known: {', '.join(_TOLERANCES)}")
    return _TOLERANCES[name]


@dataclass(frozen=True)
class Backend:
    """One array library as the tests and the command line see it."""

    name: str
    available: Callable[[], bool]
    namespace: Callable[[], Any]
    _from_numpy: Callable[[np.ndarray, Any], Any]
    to_numpy: Callable[[Any], np.ndarray]
    reason_unavailable: Callable[[], str] = field(default=lambda: "")
    setup: Callable[[], None] = field(default=lambda: None)
    teardown: Callable[[], None] = field(default=lambda: None)

    def from_numpy(self, a: Any, dtype: Any = None) -> Any:
        """Host array -> backend array. ``dtype`` is a NumPy dtype (default: ``a.dtype``)."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        return self._from_numpy(a, a.dtype)

    def tolerance(self, dtype: Any) -> tuple[float, float]:
        """Default ``(rtol, atol)`` for this backend's results in ``dtype``."""
        return default_tolerance(dtype)

    def tree_from_numpy(self, tree: Any, dtype: Any = None) -> Any:
        """Apply `from_numpy` to every array leaf of a tuple / NamedTuple / list / dict tree."""
        return map_tree(lambda a: self.from_numpy(a, dtype if np.issubdtype(np.asarray(a).dtype, np.floating) else None), tree)

    def tree_to_numpy(self, tree: Any) -> Any:
        """Apply `to_numpy` to every array leaf of a tree."""
        return map_tree(self.to_numpy, tree)


def map_tree(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Map ``fn`` over the leaves of nested tuples, NamedTuples, lists and dicts (``None`` kept)."""
    if tree is None:
        return None
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tree(fn, t) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tree(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: map_tree(fn, v) for k, v in tree.items()}
    return fn(tree)

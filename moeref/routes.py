r"""The record that token-choice routing hands to dispatch: which expert each route goes to, with what weight.

For $T$ tokens routed to $k$ of $E$ experts each, a router produces, per token $t$ and rank
$j = 0, \dots, k-1$ (rank 0 is the best-scoring choice):

* $e_{tj}$, the chosen expert;
* $w_{tj}$, the weight that multiplies that expert's output in the combination
  $y_t = \sum_j w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$ (0 for a dropped route);
* whether the route survived the capacity limit, and its slot in the expert's buffer.

The record is deliberately small and dense (shape ``(T, k)``, no ``(T, E, C)`` one-hot tensor), so
the dispatch can sort routes by expert and gather tokens into contiguous per-expert blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .core import array_namespace
from .validation import check_array, check_record_type

__all__ = ["Routes", "check_routes"]


class Routes(NamedTuple):
    """Token-choice routing decisions for ``T`` tokens, ``k`` routes each.

    Attributes
    ----------
    expert_index : int64 array, shape (T, k)
        $e_{tj}$, the expert of route $j$ of token $t$, in rank order (rank 0 = highest score;
        ties broken towards the lower expert index).
    weight : float array, shape (T, k)
        $w_{tj}$, the combine weight; exactly 0 where ``kept`` is False.
    kept : bool array, shape (T, k)
        False where the route was dropped (capacity overflow, a second-expert policy, ...).
    position : int64 array, shape (T, k)
        Slot of the route in its expert's buffer, $0 \\le p < C$, in the documented priority
        order; only meaningful where ``kept`` is True (dropped routes carry their would-be rank).
    """

    expert_index: Any
    weight: Any
    kept: Any
    position: Any


def check_routes(routes: Any, name: str = "routes") -> Any:
    """Check that ``routes`` is a `Routes` record whose four fields are arrays of one library.

    Shapes and dtypes are the caller's to check (they depend on ``T``, ``k`` and ``E``); this only
    guarantees that no field is ``None``, a list or a scalar, so that reading ``.shape`` or
    ``.dtype`` afterwards cannot fail with an ``AttributeError``. Returns the array namespace.

    Raises
    ------
    TypeError
        ``routes`` is not a `Routes` (``None``, a plain tuple, ...), a field is not an array (the
        message names it, e.g. ``routes.kept must be an array, got None``), or the fields come
        from different array libraries.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.routes import Routes, check_routes
    >>> r = Routes(np.zeros((2, 1), dtype=np.int64), np.ones((2, 1)), np.ones((2, 1), dtype=bool), None)
    >>> check_routes(r)
    Traceback (most recent call last):
    ...
    TypeError: routes.position must be an array, got None
    """
    check_record_type(routes, name, Routes)
    names = tuple(f"{name}.{f}" for f in Routes._fields)
    for field_name, value in zip(names, routes):
        check_array(value, field_name)
    return array_namespace(*routes, names=names)

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

__all__ = ["Routes"]


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

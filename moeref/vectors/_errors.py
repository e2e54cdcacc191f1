"""The one exception type of `moeref.vectors`, and closest-name suggestions for its messages."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["VectorsError", "closest"]


class VectorsError(Exception):
    """A vectors folder, file, manifest or name that cannot be used; the message says why and what to do.

    The command line prints the message and exits with status 2.
    """


def closest(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate (difflib), or ``""`` when none is close."""
    match = difflib.get_close_matches(str(name), sorted(set(candidates)), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""

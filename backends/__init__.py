"""Adapters that know concrete array libraries (installed as ``moeref.backends``).

The math in `moeref` never imports an array library; these adapters do, for the test suite, the
command line and users who want to move NumPy data onto a backend. Each adapter gives:

* ``available()``: whether the library (and, for GPU backends, a device) is usable here;
* ``namespace()``: the array-API namespace;
* ``from_numpy(a, dtype=None)``: host NumPy array -> backend array (dtype and device explicit);
* ``to_numpy(x)``: backend array -> host NumPy array;
* ``tolerance(dtype)``: default ``(rtol, atol)`` for comparing results in that dtype.

Randomness is always drawn once with NumPy and converted, so every backend sees identical inputs.
"""

from __future__ import annotations

from ._base import Backend, default_tolerance
from .registry import BACKEND_NAMES, get_backend, available_backends, backends_from_env

__all__ = [
    "Backend",
    "BACKEND_NAMES",
    "get_backend",
    "available_backends",
    "backends_from_env",
    "default_tolerance",
]

"""array-api-strict: the standard itself, to prove the math uses nothing beyond it.

Two variants: ``array_api_strict`` (standard 2024.12) and ``array_api_strict_strictest``, which
also turns off boolean indexing and data-dependent output shapes, the optional parts that
lazy and compiled backends cannot provide.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ._base import Backend

API_VERSION = "2024.12"


def _available() -> bool:
    return importlib.util.find_spec("array_api_strict") is not None


def _namespace():
    import array_api_strict

    return array_api_strict


def _from_numpy(a: np.ndarray, dtype) -> object:
    import array_api_strict as xp

    return xp.asarray(np.array(a, copy=True), dtype=getattr(xp, np.dtype(dtype).name))


def _to_numpy(x) -> np.ndarray:
    # array-api-strict arrays support the buffer protocol / __array__ only on the CPU device
    return np.asarray(x._array) if hasattr(x, "_array") else np.asarray(x)


def _setup(strictest: bool):
    import array_api_strict

    array_api_strict.set_array_api_strict_flags(
        api_version=API_VERSION,
        boolean_indexing=not strictest,
        data_dependent_shapes=not strictest,
    )


def _teardown():
    import array_api_strict

    array_api_strict.reset_array_api_strict_flags()


def _make(name: str, strictest: bool) -> Backend:
    return Backend(
        name=name,
        available=_available,
        namespace=_namespace,
        _from_numpy=_from_numpy,
        to_numpy=_to_numpy,
        reason_unavailable=lambda: "array-api-strict is not installed",
        setup=lambda: _setup(strictest),
        teardown=_teardown,
    )


BACKEND = _make("array_api_strict", strictest=False)
STRICTEST = _make("array_api_strict_strictest", strictest=True)

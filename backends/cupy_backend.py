"""CuPy on the current CUDA device, through array-api-compat.

Unavailable (and its tests skipped) when CuPy is missing or no GPU is present. The check uses
``cupy.cuda.is_available()``, which returns False without a driver, rather than
``getDeviceCount()``, which raises.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ._base import Backend


def _available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # a broken CUDA install: treat as no GPU
        return False


def _namespace():
    import array_api_compat.cupy as xp

    return xp


def _from_numpy(a: np.ndarray, dtype) -> object:
    import cupy

    return cupy.asarray(np.array(a, dtype=dtype, copy=True))


def _to_numpy(x) -> np.ndarray:
    import cupy

    return cupy.asnumpy(x)


BACKEND = Backend(
    name="cupy",
    available=_available,
    namespace=_namespace,
    _from_numpy=_from_numpy,
    to_numpy=_to_numpy,
    reason_unavailable=lambda: "CuPy is not installed or no CUDA GPU is present",
)

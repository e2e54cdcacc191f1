"""array-api-strict: the standard itself, to prove the math uses nothing beyond it.

Three variants: ``array_api_strict`` (standard 2024.12); ``array_api_strict_strictest``, which
also turns off boolean indexing and data-dependent output shapes, the optional parts that
lazy and compiled backends cannot provide; and ``array_api_strict_device``, whose arrays live on
array-api-strict's simulated second device (``Device("device1")``). Those cannot be converted to
NumPy implicitly (``np.asarray`` raises) nor combined with arrays of the default device, which is
what CuPy and CUDA tensors demand: a formulation that creates an array without ``device=`` or
reads one back through NumPy fails there, on a machine without a GPU.
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


SIMULATED_DEVICE = "device1"  # array-api-strict's stand-in for an accelerator


def _from_numpy_on(device_name: str | None):
    def from_numpy(a: np.ndarray, dtype) -> object:
        import array_api_strict as xp

        device = None if device_name is None else xp.Device(device_name)
        return xp.asarray(np.array(a, copy=True), dtype=getattr(xp, np.dtype(dtype).name), device=device)

    return from_numpy


def _to_numpy(x) -> np.ndarray:
    # array-api-strict arrays support the buffer protocol / __array__ only on the CPU device; the
    # explicit transfer off the simulated device reads the wrapped NumPy array
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


def _make(name: str, strictest: bool, device: str | None = None) -> Backend:
    return Backend(
        name=name,
        available=_available,
        namespace=_namespace,
        _from_numpy=_from_numpy_on(device),
        to_numpy=_to_numpy,
        reason_unavailable=lambda: "array-api-strict is not installed",
        setup=lambda: _setup(strictest),
        teardown=_teardown,
    )


BACKEND = _make("array_api_strict", strictest=False)
STRICTEST = _make("array_api_strict_strictest", strictest=True)
ON_DEVICE = _make("array_api_strict_device", strictest=False, device=SIMULATED_DEVICE)

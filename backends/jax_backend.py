"""JAX on its default device, with 64-bit floats enabled (float64 is moeref's reference dtype)."""

from __future__ import annotations

import importlib.util

import numpy as np

from ._base import Backend


def _available() -> bool:
    return importlib.util.find_spec("jax") is not None


def _enable_x64():
    import jax

    jax.config.update("jax_enable_x64", True)


def _namespace():
    _enable_x64()
    import jax.numpy as jnp

    return jnp


def _from_numpy(a: np.ndarray, dtype) -> object:
    _enable_x64()
    import jax.numpy as jnp

    return jnp.asarray(np.array(a, dtype=dtype, copy=True))


BACKEND = Backend(
    name="jax",
    available=_available,
    namespace=_namespace,
    _from_numpy=_from_numpy,
    to_numpy=lambda x: np.asarray(x),
    reason_unavailable=lambda: "jax is not installed",
    setup=_enable_x64,
)

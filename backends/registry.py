"""Look-up of backends by name, and the selection used by the test suite."""

from __future__ import annotations

import os

from ._base import Backend
from . import cupy_backend, jax_backend, numpy_backend, strict_backend, torch_backend

_BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        numpy_backend.BACKEND,
        strict_backend.BACKEND,
        strict_backend.STRICTEST,
        strict_backend.ON_DEVICE,
        torch_backend.BACKEND,
        jax_backend.BACKEND,
        cupy_backend.BACKEND,
    )
}

BACKEND_NAMES: tuple[str, ...] = tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (one of `BACKEND_NAMES`)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}") from None


def available_backends() -> list[Backend]:
    """The backends usable on this machine."""
    return [b for b in _BACKENDS.values() if b.available()]


def backends_from_env(variable: str = "MOEREF_BACKENDS") -> list[str]:
    """Backend names selected by a comma-separated environment variable (default: all)."""
    raw = os.environ.get(variable, "").strip()
    if not raw or raw == "all":
        return list(BACKEND_NAMES)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for n in names:
        get_backend(n)  # validates
    return names

"""NumPy (CPU), through array-api-compat."""

from __future__ import annotations

import numpy as np

from ._base import Backend


def _namespace():
    import array_api_compat.numpy as xp

    return xp


BACKEND = Backend(
    name="numpy",
    available=lambda: True,
    namespace=_namespace,
    _from_numpy=lambda a, dtype: np.array(a, dtype=dtype, copy=True),
    to_numpy=lambda x: np.asarray(x),
)

"""PyTorch, through array-api-compat: CPU, or CUDA when ``MOEREF_TORCH_DEVICE=cuda`` and present."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ._base import Backend


def _available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _device():
    import torch

    want = os.environ.get("MOEREF_TORCH_DEVICE", "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(want)


def _namespace():
    import array_api_compat.torch as xp

    return xp


def _from_numpy(a: np.ndarray, dtype) -> object:
    import torch

    return torch.from_numpy(np.array(a, dtype=dtype, copy=True)).to(_device())


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy()


BACKEND = Backend(
    name="torch",
    available=_available,
    namespace=_namespace,
    _from_numpy=_from_numpy,
    to_numpy=_to_numpy,
    reason_unavailable=lambda: "torch is not installed",
)

"""The adapters in ``backends/``: round trips, and the simulated device that stands in for a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from moeref.backends import BACKEND_NAMES, get_backend
from moeref.core import device_of
from moeref.dispatch import dispatch_combine
from moeref.expert_ffn import SWIGLU, ExpertFFNParams
from moeref.routes import Routes

pytest.importorskip("array_api_strict")


@pytest.fixture
def on_device():
    b = get_backend("array_api_strict_device")
    b.setup()
    try:
        yield b
    finally:
        b.teardown()


def test_every_backend_name_resolves_and_unknown_names_raise():
    assert len(set(BACKEND_NAMES)) == len(BACKEND_NAMES)
    for name in BACKEND_NAMES:
        assert get_backend(name).name == name
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        get_backend("gpu")


def test_simulated_device_refuses_what_a_gpu_refuses(on_device):
    """The two properties that make it a stand-in for CuPy / CUDA tensors."""
    xp = on_device.namespace()
    a = on_device.from_numpy(np.arange(3.0))
    assert "device1" in repr(device_of(a))
    with pytest.raises(RuntimeError, match="convert"):
        np.asarray(a)  # no implicit copy to the host
    with pytest.raises(ValueError, match="different devices"):
        a + xp.zeros(3, dtype=a.dtype)  # created without device=: the default device
    np.testing.assert_array_equal(on_device.to_numpy(a), np.arange(3.0))  # the explicit transfer


def test_a_formulation_runs_on_the_simulated_device_and_stays_there(on_device, rng):
    T, d, I, E, k = 6, 4, 3, 3, 2
    experts = ExpertFFNParams(w_in=rng.standard_normal((E, d, 2 * I)), w_out=rng.standard_normal((E, I, d)))
    idx = np.array([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]])
    routes = Routes(expert_index=idx, weight=np.full((T, k), 0.5), kept=np.ones((T, k), dtype=bool), position=np.zeros((T, k), dtype=np.int64))
    x = rng.standard_normal((T, d))
    expected = dispatch_combine(x, routes, experts, SWIGLU)
    got = dispatch_combine(on_device.from_numpy(x), on_device.tree_from_numpy(routes), on_device.tree_from_numpy(experts), SWIGLU)
    assert "device1" in repr(device_of(got))
    np.testing.assert_allclose(on_device.to_numpy(got), expected, rtol=1e-12, atol=1e-14)

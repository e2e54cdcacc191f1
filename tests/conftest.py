"""Shared fixtures: one ``backend`` fixture parametrised over every array library.

Select backends with ``MOEREF_BACKENDS=numpy,torch`` (default: all). Unavailable ones skip with a
reason (CuPy without a GPU, a library that is not installed).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from moeref.backends import backends_from_env, get_backend

# Hypothesis: derandomised with a fixed budget in CI; `HYPOTHESIS_PROFILE=dev` for longer runs.
settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=300, deadline=None)
# the long local run (HYPOTHESIS_PROFILE=long): many more examples, no time limits
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=backends_from_env())
def backend(request):
    """A `moeref.backends.Backend`, set up for the test and torn down after it."""
    b = get_backend(request.param)
    if not b.available():
        pytest.skip(f"{b.name}: {b.reason_unavailable()}")
    b.setup()
    try:
        yield b
    finally:
        b.teardown()


@pytest.fixture
def xp(backend):
    """The array-API namespace of the ``backend`` fixture."""
    return backend.namespace()


@pytest.fixture
def rng():
    """A seeded NumPy generator: all random inputs are drawn on the host, then converted."""
    return np.random.default_rng(20261129)


def assert_close(actual, expected, *, rtol=1e-12, atol=1e-14, err_msg=""):
    """Compare a backend array (or NumPy array) with a NumPy reference."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=err_msg)


def pytest_terminal_summary(terminalreporter):
    from helpers import GRADIENT_REPORT

    if not GRADIENT_REPORT:
        return
    terminalreporter.section("gradient checks (worst relative error of the analytic VJP)")
    for (name, check), err in sorted(GRADIENT_REPORT.items()):
        terminalreporter.write_line(f"{name:<40} {check:<20} {err:.2e}")

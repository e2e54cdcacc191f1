"""Hypothesis strategies for extreme numbers: logits of +-1e4, -inf masks (whole rows too), denormal
and huge values, zero-probability experts, low-precision dtypes.

Sizes stay tiny: the "ci" profile of tests/conftest.py runs 25 derandomised examples per property.
For long local runs, ``HYPOTHESIS_PROFILE=long`` needs ``LONG_PROFILE`` registered in conftest.py,
which loads the profile before any test module is imported.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

#: Settings of the long local profile (``settings.register_profile("long", **LONG_PROFILE)`` in conftest.py).
LONG_PROFILE = dict(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: The smallest subnormal, a mid-range subnormal and the largest one (just below the smallest normal).
DENORMALS = (5e-324, 1e-310, math.ulp(0.0) * 2**51, -5e-324, -1e-310)
#: Finite but huge magnitudes (a margin below float64's max so that a sum of two stays finite).
HUGE = (1e300, -1e300, 1e307, -1e307)
BIG_LOGITS = (1e4, -1e4)

small = st.integers(min_value=1, max_value=5)
experts = st.integers(min_value=2, max_value=6)


def moderate(scale: float = 30.0) -> st.SearchStrategy[float]:
    return st.floats(min_value=-scale, max_value=scale, allow_nan=False, allow_infinity=False)


def extreme_floats(*, huge: bool = True) -> st.SearchStrategy[float]:
    """Ordinary values mixed with +-1e4, denormals and (optionally) huge finite values."""
    parts = [moderate(), st.sampled_from(BIG_LOGITS), st.sampled_from(DENORMALS), st.just(0.0)]
    if huge:
        parts.append(st.sampled_from(HUGE))
    return st.one_of(*parts)


def shapes(rows: st.SearchStrategy[int] = small, cols: st.SearchStrategy[int] = experts) -> st.SearchStrategy[tuple]:
    return st.tuples(rows, cols)


@st.composite
def logits(draw, shape=None, *, huge: bool = False) -> np.ndarray:
    """Finite float64 logits with +-1e4 entries, denormals and (optionally) huge values."""
    shape = draw(shapes()) if shape is None else shape
    return draw(hnp.arrays(np.float64, shape, elements=extreme_floats(huge=huge)))


@st.composite
def masked_logits(draw, shape=None, *, whole_rows: bool = True, min_live: int = 1) -> np.ndarray:
    """Logits with ``-inf`` masks; with ``whole_rows`` some rows may be masked entirely, otherwise
    every row keeps at least ``min_live`` finite entries (the first ``min_live`` of a permutation)."""
    x = draw(logits(shape))
    mask = draw(hnp.arrays(np.bool_, x.shape))
    if not whole_rows:
        for t in range(x.shape[0]):  # test-side data construction, not moeref code
            live = draw(st.permutations(range(x.shape[1])))[:min_live]
            mask[t, list(live)] = False
    return np.where(mask, -np.inf, x)


@st.composite
def zero_probability_gates(draw, shape=None) -> np.ndarray:
    """Probability rows (sum 1) in which some experts have probability exactly 0."""
    z = draw(masked_logits(shape, whole_rows=False))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@st.composite
def bias_with_dead_experts(draw, n: int, *, min_live: int = 1) -> np.ndarray:
    """A gate / router bias of length ``n``: moderate values, ``-inf`` (expert switched off) for
    all but at least ``min_live`` experts."""
    b = draw(hnp.arrays(np.float64, (n,), elements=moderate(3.0)))
    dead = draw(hnp.arrays(np.bool_, (n,)))
    live = list(draw(st.permutations(range(n)))[:min_live])
    dead[live] = False
    return np.where(dead, -np.inf, b)


low_precision_numpy = st.sampled_from([np.float16, np.float32])


def bfloat16_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True

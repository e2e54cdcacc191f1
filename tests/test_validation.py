"""The shared validation layer: the finiteness check's one-pass path and its fallbacks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moeref import validation
from moeref.validation import check_finite

BIG = (validation._SUM_CHECK_MIN_SIZE // 64 + 1, 64)  # large enough for the sum path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_single_bad_entry_of_a_large_array_is_found(dtype, bad):
    x = np.ones(BIG, dtype)
    x[-1, 17] = bad
    with pytest.raises(ValueError, match="w contains NaN or infinite values"):
        check_finite(x, "w")


def test_finite_values_whose_sum_overflows_pass():
    x = np.full(BIG, np.finfo(np.float32).max, np.float32)  # every plain column sum would overflow to inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no overflow warning on the way
        assert check_finite(x, "w") is x


def test_minus_infinity_is_accepted_where_allowed_on_the_sum_path():
    x = np.zeros(BIG)
    x[3, :5] = -np.inf
    assert check_finite(x, "bias", allow_neg_inf=True) is x
    x[4, 0] = np.inf
    with pytest.raises(ValueError, match="finite or -inf"):
        check_finite(x, "bias", allow_neg_inf=True)


def test_every_backend_finds_a_bad_entry_and_passes_good_arrays(backend, xp):
    x = np.arange(2 * BIG[0] * BIG[1], dtype=np.float64).reshape(2 * BIG[0], BIG[1])[::2, :]  # not contiguous
    assert check_finite(backend.from_numpy(x), "x") is not None
    x = x.copy()
    x[5, 5] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        check_finite(backend.from_numpy(x), "x")
    small = backend.from_numpy(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="s contains NaN"):
        check_finite(small, "s")

r"""Special functions in pure array-API math (no SciPy): the log-gamma and digamma functions.

$$\log\Gamma(x) = \log\int_0^\infty t^{x-1} e^{-t}\,dt, \qquad x > 0 .$$

Used by the Poisson experts of [`moeref.glm_experts`](#moeref.glm_experts) for the normalising
term $-\log y! = -\log\Gamma(y + 1)$ of the Poisson log-probability. Like
[`moeref.core.erf`][moeref.core.erf], it is built from a fixed number of elementwise operations
(no data-dependent loop), so it runs unchanged on NumPy, PyTorch, JAX, CuPy and array-api-strict.
"""

from __future__ import annotations

import math
from typing import Any

from .core import array_namespace
from .validation import check_float_array

__all__ = ["lgamma", "digamma"]

# Stirling's series: log Gamma(z) = (z - 1/2) log z - z + log(2 pi)/2 + sum_n B_2n / (2n (2n-1) z^(2n-1)),
# coefficients B_2n / (2n (2n - 1)) for n = 1..8 (B_2n the Bernoulli numbers).
_STIRLING = (
    1.0 / 12.0,
    -1.0 / 360.0,
    1.0 / 1260.0,
    -1.0 / 1680.0,
    1.0 / 1188.0,
    -691.0 / 360360.0,
    1.0 / 156.0,
    -3617.0 / 122400.0,
)
_SHIFT = 10  # arguments below this are shifted up by the recurrence before the series is used
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def lgamma(x: Any, /) -> Any:
    r"""Natural logarithm of the gamma function, elementwise, for $x \ge 0$.

    $$\log\Gamma(z) = \big(z - \tfrac12\big)\log z - z + \tfrac12\log(2\pi)
    + \sum_{n=1}^{8} \frac{B_{2n}}{2n(2n-1)\, z^{2n-1}}, \qquad z \ge 10,$$

    Stirling's asymptotic series with the Bernoulli numbers $B_{2n}$ (Abramowitz & Stegun 1964,
    *Handbook of Mathematical Functions*, eq. 6.1.40; NIST DLMF eq. 5.11.1,
    <https://dlmf.nist.gov/5.11.E1>). Arguments $x < 10$ are first moved to $z = x + 10$ by the
    recurrence $\Gamma(x + 1) = x\,\Gamma(x)$ (DLMF eq. 5.5.1):

    $$\log\Gamma(x) = \log\Gamma(x + 10) - \log\prod_{j=0}^{9} (x + j) .$$

    Parameters
    ----------
    x : array of real floating dtype
        Non-negative arguments (any shape).

    Returns
    -------
    array, same shape and dtype as ``x``

    Notes
    -----
    * Accuracy (float64): the first omitted term of the series is below $3\times10^{-17}$ for
      $z \ge 10$, so the result agrees with `scipy.special.gammaln` to about
      $10^{-14}$ absolute below $x = 10$ and $10^{-15}$ relative above. Near the zeros of
      $\log\Gamma$ ($x = 1, 2$) the recurrence subtracts two numbers of size $\approx 15$, so there
      the error is absolute (a few $10^{-15}$), not relative.
    * Edge cases: $\log\Gamma(0) = +\infty$ and $\log\Gamma(+\infty) = +\infty$ (no floating-point
      warning is raised); negative arguments and NaN give NaN (the reflection formula for
      $x < 0$ is not implemented, since moeref only needs $\log y!$ for counts $y \ge 0$).
    * Not differentiable here: it enters the Poisson log-density only through the data $y$.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.special import lgamma
    >>> np.round(lgamma(np.array([1.0, 5.0, 0.5])), 12).tolist()  # 0, log 24, log sqrt(pi)
    [0.0, 3.178053830348, 0.572364942925]
    """
    xp = array_namespace(x, names=("x",))
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"x must have a real floating-point dtype, got {x.dtype}")
    small = x < _SHIFT
    positive_small = small & (x > 0)
    xs = xp.where(positive_small, x, xp.ones_like(x))  # placeholder 1 where unused
    z = xp.where(small, xs + float(_SHIFT), x)  # >= 10 wherever it is used
    # log prod_{j<10} (x + j): one product, at most 10 * 20^9 < 1e13, so no overflow
    prod = xs
    for j in range(1, _SHIFT):
        prod = prod * (xs + float(j))
    log_shift = xp.where(positive_small, xp.log(prod), xp.zeros_like(x))
    # Stirling's series at z (Horner in 1/z^2)
    z_safe = xp.where(xp.isfinite(z) & (z > 0), z, xp.full_like(z, float(_SHIFT)))
    r = 1.0 / z_safe
    w = r * r  # 1/z^2 (underflows quietly to 0 for huge z instead of overflowing z*z)
    series = xp.full_like(z_safe, _STIRLING[-1])
    for c in reversed(_STIRLING[:-1]):
        series = series * w + c
    stirling = (z_safe - 0.5) * xp.log(z_safe) - z_safe + _HALF_LOG_2PI + series * r
    out = stirling - log_shift
    inf = xp.full_like(x, math.inf)
    out = xp.where(x == 0, inf, out)
    out = xp.where(xp.isinf(x) & (x > 0), inf, out)
    return xp.where((x < 0) | xp.isnan(x), xp.full_like(x, math.nan), out)


# digamma: psi(z) ~ log z - 1/(2z) - sum_n B_2n / (2n z^2n) for z >= 10, after the recurrence
_PSI_COEFFS = (1.0 / 12, -1.0 / 120, 1.0 / 252, -1.0 / 240, 1.0 / 132, -691.0 / 32760, 1.0 / 12)


def _digamma(x: Any, xp: Any) -> Any:
    """psi(x) for x > 0 (no checks): psi(x + 10) - sum_j 1/(x + j), then the asymptotic series."""
    acc = 1.0 / x
    for j in range(1, _SHIFT):
        acc = acc + 1.0 / (x + float(j))
    z = x + float(_SHIFT)
    inv2 = 1.0 / (z * z)
    series = _PSI_COEFFS[-1]
    for coeff in reversed(_PSI_COEFFS[:-1]):
        series = series * inv2 + coeff  # Horner in 1/z^2
    return xp.log(z) - 0.5 / z - series * inv2 - acc


def _on_domain(fn: Any, x: Any) -> Any:
    xp = array_namespace(x, names=("x",))
    check_float_array(x, "x")
    positive = x > 0
    out = fn(xp.where(positive, x, xp.ones_like(x)), xp)
    return xp.where(positive, out, xp.full_like(x, math.nan))


def digamma(x: Any, /) -> Any:
    r"""Digamma function $\psi(x) = \frac{d}{dx}\log\Gamma(x)$ for $x > 0$, in pure array-API code.

    $$\psi(x) = \psi(x + 10) - \sum_{j=0}^{9}\frac{1}{x + j}, \qquad
    \psi(z) \approx \log z - \frac1{2z} - \sum_{n=1}^{7}\frac{B_{2n}}{2n\,z^{2n}}\quad(z \ge 10),$$

    the recurrence and the asymptotic expansion with the Bernoulli numbers $B_{2n}$ (Abramowitz &
    Stegun 1964, "Handbook of Mathematical Functions", eqs. 6.3.5 and 6.3.18); the first omitted
    term is below $5\times10^{-17}$ at $z = 10$.

    Parameters
    ----------
    x : array
        Real floating point, positive.

    Returns
    -------
    array
        Same shape; NaN where $x \le 0$ or $x$ is NaN (the reflection formula for negative
        arguments is not needed by moeref).

    Notes
    -----
    A fixed number of elementwise operations (no data-dependent loop, no branch), differentiable by
    autograd. Agrees with ``scipy.special.digamma`` to $10^{-13}$ relative, or $10^{-15}$
    absolute near the root $x_0 \approx 1.4616$ (where $\psi(x + 10)$ and the sum cancel).

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.special import digamma
    >>> round(float(digamma(np.array(1.0))), 12)  # -Euler's gamma
    -0.577215664902
    """
    return _on_domain(_digamma, x)

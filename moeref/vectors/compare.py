r"""Comparing results with the reference honestly: tolerances by dtype, and a tie-aware routing check.

**Tolerances.** A float tensor $a$ passes against the reference $b$ when

$$\max_i |a_i - b_i| \le \text{atol} + \text{rtol}\cdot \max_i |b_i|$$

(a norm-wise test: entries that cancel to nearly 0 do not fail on rounding). The reported
relative error is $\max_i |a_i - b_i| / \max_i |b_i|$. Integer and boolean tensors (chosen
experts, kept flags, slots, counts) must be equal. The defaults by dtype of the computation are
``TOLERANCES``; every command takes ``--rtol`` / ``--atol`` to override them.

**Ties.** Where two experts score (nearly) the same, a correct implementation in low precision
may pick either. For each token the selection values $v_t$ (what the top-$k$ ran on) are sorted,
and its margin is the smallest gap among the $k+1$ largest, relative to the row's largest
$|v|$:

$$\mu_t = \min_{j < k} \frac{v_{t(j)} - v_{t(j+1)}}{\max_e |v_{te}|}.$$

This covers the top-$k$ margin ($k$-th vs $(k+1)$-th value: which experts) and the gaps between
the $k$ chosen (their rank order). A token with $\mu_t$ below ``TIE_THRESHOLDS[dtype]`` is a
*near tie*: if its routing or its row of a per-token output differs, it is reported separately
as a tie and left out; every other token is compared exactly. Outputs that mix tokens (parameter
gradients, counts, losses, and everything under a capacity limit, where one token's route moves
another's slot) are not comparable once a tie token routed differently and are reported as
skipped. The first few mismatching tokens are printed with their selection values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "TIE_THRESHOLDS",
    "tolerance_for",
    "dtype_name",
    "top_gaps",
    "TensorCheck",
    "TieReport",
    "Comparison",
    "compare",
]


@dataclass(frozen=True)
class Tolerance:
    """``max|a - b| <= atol + rtol * max|b|`` for a float tensor."""

    rtol: float
    atol: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-6),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
}
"""Recommended tolerances by the dtype of the computation, against a float64 reference.

float64 leaves room for a different summation order on another backend (moeref's own backends
agree to ~1e-15); float32 is ~1000 units of its rounding ($2^{-24}$) on the norm-wise test, which
covers matrix products over a few hundred features and a softmax; float16 and bfloat16 scale with
their epsilon ($2^{-11}$, $2^{-8}$)."""

TIE_THRESHOLDS: dict[str, float] = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
"""Relative margin $\\mu_t$ below which a token is a near tie, by the dtype of the computation."""


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``np.float32``, ``torch.float32``, ``jnp.float32``, ``"float32"``."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).split(".")[-1]


def tolerance_for(dtype: Any, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The default tolerance of ``dtype`` with ``rtol`` / ``atol`` overrides."""
    name = dtype_name(dtype)
    if name not in TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {name!r}; known: {', '.join(TOLERANCES)} (or pass rtol and atol)")
    t = TOLERANCES[name]
    return Tolerance(t.rtol if rtol is None else float(rtol), t.atol if atol is None else float(atol))


def top_gaps(values: Any, k: int) -> np.ndarray:
    """$\\mu_t$: per row, the smallest gap among the $k+1$ largest values over the row's largest $|v|$.

    Parameters
    ----------
    values : array, shape (T, E)
    k : int

    Returns
    -------
    array, shape (T,)
        ``inf`` for a row with a single candidate; non-finite gaps (between two ``-inf``) count as ``inf``.

    Examples
    --------
    >>> import numpy as np
    >>> top_gaps(np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]), k=1).round(3).tolist()
    [0.4, 0.0]
    """
    v = np.asarray(values, dtype=np.float64)
    T, E = v.shape
    m = min(k + 1, E)
    if m < 2:
        return np.full(T, np.inf)
    s = -np.sort(-v, axis=1)[:, :m]  # (T, m) descending
    with np.errstate(invalid="ignore"):
        gaps = s[:, :-1] - s[:, 1:]  # (T, m - 1)
    gaps = np.where(np.isnan(gaps), np.inf, gaps)
    scale = np.max(np.where(np.isfinite(v), np.abs(v), 0.0), axis=1)  # (T,)
    return np.min(gaps, axis=1) / np.maximum(scale, np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class TensorCheck:
    """One tensor's comparison: ``status`` is ``"pass"``, ``"fail"`` or ``"skipped"`` (ties)."""

    name: str
    status: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class TieReport:
    """Near-tie tokens of a case and those that came out different (left out of the comparison)."""

    threshold: float
    near_ties: tuple[int, ...]
    differing: tuple[int, ...]
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """The comparison of one case: per-tensor results, ties, and the first mismatching tokens."""

    tensors: tuple[TensorCheck, ...]
    ties: TieReport | None = None
    mismatched_tokens: tuple[str, ...] = ()
    tolerance: Tolerance | None = None

    @property
    def ok(self) -> bool:
        return all(t.status != "fail" for t in self.tensors)

    @property
    def failures(self) -> list[TensorCheck]:
        return [t for t in self.tensors if t.status == "fail"]

    def max_abs(self, prefix: str = "") -> float:
        return max((t.max_abs for t in self.tensors if t.name.startswith(prefix) and t.status != "skipped"), default=0.0)

    def max_rel(self, prefix: str = "") -> float:
        return max((t.max_rel for t in self.tensors if t.name.startswith(prefix) and t.status != "skipped"), default=0.0)

    def report(self, max_lines: int = 12) -> str:
        """Human-readable lines: failing tensors, mismatching tokens, ties."""
        lines = [f"  {t.name}: {t.detail}" for t in self.failures]
        lines += [f"  {m}" for m in self.mismatched_tokens]
        if self.ties and self.ties.differing:
            lines.append(
                f"  {len(self.ties.differing)} near-tie token(s) came out different and were left out "
                f"(margin below {self.ties.threshold:g}): {list(self.ties.differing)[:8]}"
            )
            lines += [f"    {m}" for m in self.ties.lines]
        skipped = [t.name for t in self.tensors if t.status == "skipped"]
        if skipped:
            lines.append(f"  not comparable after the tie(s): {', '.join(skipped)}")
        if len(lines) > max_lines:
            lines = lines[:max_lines] + [f"  ... ({len(lines) - max_lines} more lines)"]
        return "\n".join(lines)


def _as_host(a: Any) -> np.ndarray:
    """NumPy view of a NumPy / torch / JAX / CuPy array (bfloat16 widened to float32)."""
    if hasattr(a, "detach"):  # torch
        a = a.detach()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.cpu()
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        a = a.get()
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return a


def _errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| as float64 (0 where equal, inf where one side is NaN or the infinities differ)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - b64)
    return np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf))


def _scale(b: np.ndarray) -> float:
    b64 = np.abs(b.astype(np.float64))
    finite = b64[np.isfinite(b64)]
    return float(finite.max()) if finite.size else 0.0


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"


def _row_ok(a: np.ndarray, b: np.ndarray, tol: Tolerance) -> np.ndarray:
    """Per row (axis 0): does the row pass (floats against the whole tensor's scale)?"""
    T = b.shape[0]
    if _is_float(b) or _is_float(a):
        err = _errors(a, b).reshape(T, -1)
        limit = tol.atol + tol.rtol * _scale(b)
        return np.all(err <= limit, axis=1) if err.shape[1] else np.ones(T, bool)
    return np.all((a == b).reshape(T, -1), axis=1)


def _check(name: str, a: np.ndarray, b: np.ndarray, tol: Tolerance, keep: np.ndarray | None) -> TensorCheck:
    if keep is not None:
        a, b = a[keep], b[keep]
    if a.size == 0:
        return TensorCheck(name, "pass")
    if _is_float(b) or _is_float(a):
        err = _errors(a, b)
        max_abs = float(err.max())
        scale = _scale(b)
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        limit = tol.atol + tol.rtol * scale
        if max_abs <= limit:
            return TensorCheck(name, "pass", max_abs, max_rel)
        where = np.unravel_index(int(np.argmax(err)), err.shape)
        detail = (
            f"max abs error {max_abs:.3g} > {limit:.3g} (atol {tol.atol:g} + rtol {tol.rtol:g} x max|ref| {scale:.3g}), "
            f"max rel error {max_rel:.3g}; worst at {tuple(int(i) for i in where)}: got {float(a[where]):.8g}, expected {float(b[where]):.8g}"
        )
        return TensorCheck(name, "fail", max_abs, max_rel, detail)
    wrong = a != b
    if not wrong.any():
        return TensorCheck(name, "pass")
    first = tuple(int(i) for i in np.argwhere(wrong)[0])
    detail = f"{int(wrong.sum())} of {wrong.size} entries differ; first at {first}: got {a[first].item()!r}, expected {b[first].item()!r}"
    max_abs = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return TensorCheck(name, "fail", max_abs, float("inf"), detail)


def _token_line(t: int, expected: Mapping[str, np.ndarray], actual: Mapping[str, Any], routing: Any, gaps: np.ndarray,
                differing: Sequence[str]) -> str:
    k = routing.k
    values = np.asarray(expected[routing.values], dtype=np.float64)[t]
    order = np.argsort(-values, kind="stable")[: k + 1]
    top = ", ".join(f"{int(e)}: {values[e]:.6g}" for e in order)
    ref = np.asarray(expected[routing.index])[t].tolist()
    line = f"token {t}: {', '.join(differing)} differ"
    if routing.index in actual:
        got = np.asarray(actual[routing.index])[t].tolist()
        line += f"; experts {ref} as expected" if got == ref else f"; expected experts {ref}, got {got}"
    else:
        line += f"; expected experts {ref}"
    return line + f"; top-{k + 1} selection values {{{top}}}, relative margin {gaps[t]:.2g}"


def compare(
    actual: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    dtype: Any,
    rtol: float | None = None,
    atol: float | None = None,
    routing: Any = None,
    names: Sequence[str] | None = None,
    max_tokens: int = 5,
) -> Comparison:
    """Compare named results with the reference, tie-aware when ``routing`` is given.

    Parameters
    ----------
    actual, expected : mapping of name -> array
        ``expected`` must hold every compared name (and the routing's ``values`` / ``index``).
    dtype : dtype or str
        The dtype of the computation (chooses the default tolerance and tie threshold).
    rtol, atol : float, optional
        Overrides of ``TOLERANCES[dtype]``.
    routing : RoutingSpec, optional
    names : sequence of str, optional
        The names to compare (default: every name of ``actual`` that ``expected`` has).
    max_tokens : int
        How many mismatching tokens to describe.

    Returns
    -------
    Comparison
    """
    tol = tolerance_for(dtype, rtol, atol)
    actual = {k: _as_host(v) for k, v in actual.items()}
    expected = {k: np.asarray(v) for k, v in expected.items()}
    names = [n for n in actual if n in expected] if names is None else list(names)
    checks: list[TensorCheck] = []
    bad_shape = set()
    for n in names:
        if n not in actual:
            checks.append(TensorCheck(n, "fail", float("inf"), float("inf"), "not computed"))
            bad_shape.add(n)
        elif actual[n].shape != expected[n].shape:
            detail = f"shape {actual[n].shape}, expected {expected[n].shape}"
            checks.append(TensorCheck(n, "fail", float("inf"), float("inf"), detail))
            bad_shape.add(n)
    names = [n for n in names if n not in bad_shape]
    if routing is None or routing.values not in expected:
        checks += [_check(n, actual[n], expected[n], tol, None) for n in names]
        return Comparison(tuple(checks), tolerance=tol)

    threshold = TIE_THRESHOLDS.get(dtype_name(dtype), TIE_THRESHOLDS["float64"])
    gaps = top_gaps(expected[routing.values], routing.k)  # (T,)
    tie = gaps < threshold
    row_names = [n for n in names if n in routing.rows or n == routing.index]
    row_bad = {n: ~_row_ok(actual[n], expected[n], tol) for n in row_names}  # name -> (T,)
    bad_rows = np.zeros(gaps.shape[0], dtype=bool)
    for bad in row_bad.values():
        bad_rows |= bad
    differing, hard = bad_rows & tie, bad_rows & ~tie
    keep = ~differing
    for n in names:
        if n in routing.independent or not differing.any():
            checks.append(_check(n, actual[n], expected[n], tol, None))
        elif n in row_names:
            checks.append(_check(n, actual[n], expected[n], tol, keep))
        else:
            checks.append(TensorCheck(n, "skipped", detail="a near-tie token routed differently"))
    def line(t):
        return _token_line(t, expected, actual, routing, gaps, [n for n, bad in row_bad.items() if bad[t]])

    mismatched = tuple(line(int(t)) for t in np.flatnonzero(hard)[:max_tokens])
    if np.sum(hard) > max_tokens:
        mismatched += (f"... and {int(np.sum(hard)) - max_tokens} more tokens",)
    tie_tokens = [int(t) for t in np.flatnonzero(differing)]
    tie_lines = tuple(line(t) for t in tie_tokens[:max_tokens])
    ties = TieReport(threshold, tuple(int(t) for t in np.flatnonzero(tie)), tuple(tie_tokens), tie_lines)
    return Comparison(tuple(checks), ties, mismatched, tol)

"""Assertions and case loading for your own test suite: check an MoE implementation against moeref's vectors.

Plain functions, usable from pytest, unittest or a script. Arrays may be NumPy, PyTorch, JAX or
CuPy (they are copied to the host; bfloat16 is widened to float32 for the comparison). The
tolerances and tie rules are those of `moeref verify` ([`moeref.vectors.compare`][moeref.vectors.compare]).

```python
import pytest, torch
from moeref.testing import assert_moe_close, assert_routing_equal, load_cases

@pytest.mark.parametrize("case", load_cases("moeref-vectors", "sparse_moe.mixtral"), ids=str)
def test_my_block(case):
    block = build_my_block(case)              # copy case["params/..."] into your module
    y, logits, experts = block(case.torch("inputs/x"))
    assert_moe_close(y, case)                 # outputs/y, with the case's tolerance
    assert_routing_equal(experts, case)       # outputs/routes/expert_index, tie-aware
```
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .validation import check_positive_int
from .vectors._errors import VectorsError, closest
from .vectors.compare import TIE_THRESHOLDS, Tolerance, _as_host, compare, dtype_name, tolerance_for, top_gaps
from .vectors.io import load_entry_tensors, read_manifest

__all__ = ["Case", "load_case", "load_cases", "assert_moe_close", "assert_routing_equal"]


class Case:
    """One case of a vectors folder: its manifest entry and its tensors (NumPy, by name).

    Attributes
    ----------
    name, formulation, preset, dtype : str
    sizes : dict
        ``{"T": 7, "d": 5, "I": 3, "E": 8, "k": 2}`` for the sparse layer.
    options : dict
        The options as written in the manifest (nested dicts of the dataclass fields).
    tensors : dict of str -> numpy.ndarray
        Every tensor, by its name (``"inputs/x"``, ``"params/router/weight"``, ``"outputs/y"``).
    entry : dict
        The manifest entry.
    """

    def __init__(self, entry: Mapping[str, Any], tensors: Mapping[str, np.ndarray]):
        self.entry = dict(entry)
        self.tensors = dict(tensors)
        self.name: str = entry["name"]
        self.formulation: str = entry["formulation"]
        self.preset: str | None = entry.get("preset")
        self.dtype: str = entry["dtype"]
        self.sizes: dict = dict(entry.get("sizes", {}))
        self.options: dict = dict(entry.get("options", {}))

    def __repr__(self) -> str:
        return f"Case({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"case {self.name} has no tensor {name!r}{closest(name, self.tensors)}")
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """The tensors under ``prefix/``, keyed by the rest of their name (``case.group("params")``)."""
        p = prefix.rstrip("/") + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def tolerance(self) -> Tolerance:
        """The recommended tolerance for a computation in the case's input dtype."""
        return tolerance_for(self.dtype)

    def torch(self, name: str, *, dtype: Any = None, requires_grad: bool = False, device: Any = None):
        """The tensor ``name`` as a new ``torch.Tensor`` (optionally cast, on ``device``, with grad)."""
        import torch

        t = torch.from_numpy(np.array(self[name], copy=True))
        if dtype is not None:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t.requires_grad_(requires_grad) if requires_grad else t

    def jax(self, name: str, *, dtype: Any = None):
        """The tensor ``name`` as a JAX array (64-bit floats need ``jax_enable_x64``)."""
        import jax.numpy as jnp

        return jnp.asarray(self[name], dtype=dtype)


def _check_folder(folder: Any) -> Path:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike) of a vectors folder, got {type(folder).__name__} {folder!r}")
    return Path(folder)


def _check_str(value: Any, name: str, *, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise TypeError(f"{name} must be a str{' or None' if optional else ''}, got {type(value).__name__} {value!r}")


def _host(a: Any, name: str) -> np.ndarray:
    """``a`` as a NumPy array of numbers (`_as_host`), or a TypeError naming the argument."""
    out = _as_host(a)
    if out.dtype.kind not in "biufc":
        raise TypeError(f"{name} must be an array of numbers (NumPy, torch, JAX, CuPy), got {type(a).__name__} {a!r:.80}")
    return out


def _int_host(a: Any, name: str) -> np.ndarray:
    out = _host(a, name)
    if out.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer expert indices, got dtype {out.dtype}")
    return out.astype(np.int64)


def _check_tolerance(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")


def _select(entries: Sequence[dict], pattern: str | None) -> list[dict]:
    if pattern is None:
        return list(entries)
    exact = [e for e in entries if e["name"] == pattern]
    return exact or [e for e in entries if pattern in e["name"]]


def load_cases(folder: str | Path = "moeref-vectors", pattern: str | None = None) -> list[Case]:
    """Every case of ``folder`` whose name contains ``pattern`` (checksums verified).

    Parameters
    ----------
    folder : path
        A folder written by ``moeref vectors``.
    pattern : str, optional
        A substring of the case names (``"sparse_moe.mixtral"``, ``"float32"``).

    Raises
    ------
    VectorsError
        Missing or invalid folder, a file that does not match its checksum, no match.
    TypeError
        ``folder`` is not a path, ``pattern`` is not a str.
    """
    folder = _check_folder(folder)
    _check_str(pattern, "pattern", optional=True)
    entries = read_manifest(folder)["cases"]
    chosen = _select(entries, pattern)
    if not chosen:
        raise VectorsError(f"no case of {folder} matches pattern={pattern!r}{closest(pattern or '', [e['name'] for e in entries])}")
    return [Case(e, load_entry_tensors(folder, e)) for e in chosen]


def load_case(folder: str | Path = "moeref-vectors", name: str | None = None) -> Case:
    """The one case of ``folder`` called ``name`` (or whose name contains it, if that is unique).

    Raises
    ------
    VectorsError
        As [`load_cases`][moeref.testing.load_cases]; also several matching cases.
    TypeError
        ``folder`` is not a path, ``name`` is not a str.

    Examples
    --------
    >>> from moeref.testing import load_case
    >>> case = load_case("moeref-vectors", "sparse_moe.mixtral.T7-d5-I3-E8.float32")  # doctest: +SKIP
    >>> case["inputs/x"].shape, case.sizes["k"]  # doctest: +SKIP
    ((7, 5), 2)
    """
    folder = _check_folder(folder)
    _check_str(name, "name", optional=True)
    entries = read_manifest(folder)["cases"]
    chosen = _select(entries, name)
    if len(chosen) != 1:
        names = [e["name"] for e in chosen] or [e["name"] for e in entries]
        what = "no case" if not chosen else f"{len(chosen)} cases"
        raise VectorsError(f"{what} of {folder} match name={name!r}{closest(name or '', names) if not chosen else ''}; "
                           f"for example: {', '.join(names[:4])}")
    return Case(chosen[0], load_entry_tensors(folder, chosen[0]))


def _expected(expected: Any, name: str) -> tuple[np.ndarray, str | None]:
    if isinstance(expected, Case):
        if name not in expected:
            raise ValueError(f"name={name!r} is not a tensor of case {expected.name}{closest(name, expected.tensors)}")
        return expected[name], expected.dtype
    return _host(expected, "expected"), None


def assert_moe_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    dtype: Any = None,
    name: str = "outputs/y",
) -> None:
    r"""Assert that an output agrees with the reference: $\max|a - b| \le \text{atol} + \text{rtol} \max|b|$.

    Parameters
    ----------
    actual : array (NumPy, torch, JAX, CuPy)
    expected : Case or array
        A [`Case`][moeref.testing.Case] (its tensor ``name`` is the reference) or an array.
    rtol, atol : float, optional
        Default: ``TOLERANCES`` of ``dtype``.
    dtype : dtype or str, optional
        Dtype of the computation for the default tolerance; default: the case's input dtype, else
        ``actual``'s dtype.
    name : str
        The case tensor to compare with (``"outputs/y"``, ``"grads/x"``, ...).

    Raises
    ------
    AssertionError
        With the worst entry, the errors and the tolerance (also for a shape that differs).
    TypeError, ValueError
        ``actual`` or ``expected`` is not an array of numbers, ``name`` is not a tensor of the
        case, ``rtol`` / ``atol`` is negative or not finite, ``dtype`` has no default tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> assert_moe_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0000001]))
    """
    _check_str(name, "name")
    _check_tolerance(rtol, "rtol")
    _check_tolerance(atol, "atol")
    ref, case_dtype = _expected(expected, name)
    got = _host(actual, "actual")
    dt = dtype if dtype is not None else (case_dtype or got.dtype)
    result = compare({name: got}, {name: ref}, dtype=dtype_name(dt), rtol=rtol, atol=atol)
    if not result.ok:
        raise AssertionError(f"{name} differs from the moeref reference:\n{result.report()}")


def _scores(scores: Any, T: int) -> np.ndarray:
    v = _host(scores, "scores")
    if v.dtype.kind not in "f":
        raise TypeError(f"scores must be a floating-point array of selection values, got dtype {v.dtype}")
    if np.any(np.isnan(v)):
        raise ValueError("scores contains NaN (a selection value must be a number; -inf marks a masked expert)")
    if v.ndim != 2 or v.shape[0] != T:
        raise ValueError(f"scores must have shape (T, E) with T={T} tokens like expected, got {v.shape}")
    return v


def assert_routing_equal(
    actual: Any,
    expected: Any,
    *,
    scores: Any = None,
    k: int | None = None,
    dtype: Any = None,
    ordered: bool = True,
    max_report: int = 5,
) -> None:
    r"""Assert that the chosen experts equal the reference, except at near ties.

    A token whose relative top-$(k+1)$ margin of ``scores`` is below ``TIE_THRESHOLDS[dtype]``
    may choose differently; it is left out (see [`moeref.vectors.compare`][moeref.vectors.compare]).
    Every other token must choose the same experts.

    Parameters
    ----------
    actual : int array, shape (T, k)
        Your chosen experts, best first.
    expected : Case or int array, shape (T, k)
        A Case (``outputs/routes/expert_index``; its ``outputs/selection_scores`` are the
        ``scores``) or the reference experts.
    scores : array, shape (T, E), optional
        The reference selection values; without them every token must match.
    k : int, optional
        Default: ``expected.shape[1]``.
    dtype : dtype or str, optional
        The computation's dtype for the tie threshold (default: the case's, else float32).
    ordered : bool
        Compare in rank order (True) or as sets (False: each row sorted first).
    max_report : int
        How many mismatching tokens the message lists.

    Raises
    ------
    AssertionError
        Listing the first mismatching tokens with their top-$(k+1)$ scores and margins; or the two
        shapes, when they differ.
    TypeError, ValueError
        ``actual`` or ``expected`` does not hold integers, ``scores`` is not a float array of
        shape (T, E) or contains NaN, ``k`` or ``max_report`` is not a positive int, ``dtype`` has
        no tie threshold.

    Examples
    --------
    >>> import numpy as np
    >>> scores = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    >>> assert_routing_equal(np.array([[0], [1]]), np.array([[0], [0]]), scores=scores)  # token 1 is a tie
    """
    if isinstance(expected, Case):
        scores = expected["outputs/selection_scores"] if scores is None and "outputs/selection_scores" in expected else scores
        dtype = dtype or expected.dtype
        expected = expected["outputs/routes/expert_index"]
    got, ref = _int_host(actual, "actual"), _int_host(expected, "expected")
    if got.shape != ref.shape:
        raise AssertionError(f"expert indices: actual has shape {got.shape} but expected has shape {ref.shape} (T, k)")
    if got.ndim != 2:
        raise ValueError(f"actual and expected must have shape (T, k), got {got.ndim} dimensions {got.shape}")
    if not ordered:
        got, ref = np.sort(got, axis=1), np.sort(ref, axis=1)
    k = ref.shape[1] if k is None else check_positive_int(k, "k")
    check_positive_int(max_report, "max_report")
    dt = dtype_name(dtype or "float32")
    if dt not in TIE_THRESHOLDS:
        raise ValueError(f"dtype {dt!r} has no tie threshold; known: {', '.join(TIE_THRESHOLDS)}")
    wrong = np.any(got != ref, axis=1)  # (T,)
    tie = np.zeros_like(wrong)
    threshold = TIE_THRESHOLDS[dt]
    gaps = None
    if scores is not None:
        scores = _scores(scores, ref.shape[0])
        gaps = top_gaps(scores, k)
        tie = gaps < threshold
    bad = np.flatnonzero(wrong & ~tie)
    if bad.size:
        lines = []
        for t in bad[:max_report]:
            line = f"token {int(t)}: expected experts {ref[t].tolist()}, got {got[t].tolist()}"
            if scores is not None:
                v = scores[t].astype(np.float64)
                top = np.argsort(-v, kind="stable")[: k + 1]
                line += f"; top-{k + 1} scores {{{', '.join(f'{int(e)}: {v[e]:.6g}' for e in top)}}}, margin {gaps[t]:.2g}"
            lines.append(line)
        ties = int(np.sum(wrong & tie))
        raise AssertionError(
            f"{bad.size} of {ref.shape[0]} tokens route differently"
            + (f" ({ties} more differ at near ties below {threshold:g}, allowed)" if ties else "")
            + ":\n  " + "\n  ".join(lines)
        )

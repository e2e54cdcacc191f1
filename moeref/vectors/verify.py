"""``moeref verify``: checksums first, then recompute every case on a backend and compare.

Each stored case is recomputed by moeref from its stored inputs, on the chosen array backend, in
the case's input dtype (float32 cases in float32), and compared with the stored float64 reference
with the tolerances and tie rules of [`moeref.vectors.compare`][moeref.vectors.compare].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..backends import get_backend
from ._errors import VectorsError, closest
from .cases import FORMULATIONS, compute, find_case, options_to_json, preset_names, problem_from_tensors
from .compare import Comparison, TensorCheck, compare
from .io import MANIFEST, check_case_file, load_entry_tensors, read_manifest, temp_files
from .staging import previous_path, staging_path

__all__ = ["CaseOutcome", "VerifyResult", "verify", "check_folder"]


@dataclass(frozen=True)
class CaseOutcome:
    """One case on one backend: a Comparison, or the error that prevented it."""

    name: str
    formulation: str
    preset: str | None
    dtype: str
    backend: str
    comparison: Comparison | None
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and self.comparison is not None and self.comparison.ok


@dataclass(frozen=True)
class VerifyResult:
    folder: Path
    moeref_version: str
    outcomes: tuple[CaseOutcome, ...]
    notes: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)


def _diff_options(stored: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in dict.fromkeys([*stored, *current]):
            out += _diff_options(stored.get(key, "<absent>"), current.get(key, "<absent>"), f"{path}.{key}" if path else key)
        return out
    return [] if stored == current else [f"{path}: stored {stored!r}, this moeref {current!r}"]


def check_folder(folder: str | Path, only: Sequence[str] | None = None) -> tuple[dict, list[dict], list[str]]:
    """Read the manifest, check every listed file's SHA-256, resolve every name in the registry.

    Returns ``(manifest, entries, notes)``; raises a VectorsError listing every missing or
    changed file, or naming an unknown formulation, preset or case (with the closest name).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    entries = manifest["cases"]
    if only:
        entries = [e for e in entries if any(p in e["name"] for p in only)]
        if not entries:
            raise VectorsError(f"no case in {folder / MANIFEST} matches {', '.join(only)}")
    problems = [p for e in entries for p in [check_case_file(folder, e)[1]] if p]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise VectorsError(
            f"{folder} is incomplete or was modified ({len(problems)} of {len(entries)} files):\n{listed}\n"
            f"Regenerate with `moeref vectors --out {folder}` (add --force to replace changed files)."
        )
    for e in entries:
        f = e["formulation"]
        if f not in FORMULATIONS:
            raise VectorsError(f"case {e['name']}: unknown formulation {f!r}{closest(f, FORMULATIONS)}")
        if e["preset"] is not None:
            known = preset_names(f)
            if e["preset"] not in known:
                raise VectorsError(
                    f"case {e['name']}: unknown preset {e['preset']!r} of {f}{closest(e['preset'], known)} (known: {', '.join(known)})"
                )
        find_case(e["name"])
    notes = []
    if manifest.get("moeref_version") != _version():
        notes.append(f"vectors written by moeref {manifest.get('moeref_version')}, verified with moeref {_version()}")
    leftovers = temp_files(folder)
    if leftovers:
        notes.append(f"{len(leftovers)} temporary file(s) from an interrupted run (ignored; `moeref vectors` removes them)")
    notes += _leftover_notes(folder)
    listed_files = {e["file"] for e in manifest["cases"]}
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if str(p.relative_to(folder).as_posix()) not in listed_files)
    if extra:
        notes.append(f"{len(extra)} file(s) not listed in the manifest (ignored): {', '.join(extra[:3])}")
    return manifest, entries, notes


def _leftover_notes(folder: Path) -> list[str]:
    """Notes on what an interrupted ``moeref vectors`` left beside a folder that has a manifest."""
    notes = []
    if staging_path(folder).exists():
        notes.append(
            f"an interrupted `moeref vectors` left {staging_path(folder).name} beside the folder; the folder itself "
            f"is the previous complete state; rerun the same `moeref vectors --out {folder}` to finish (it removes the leftover)"
        )
    if previous_path(folder).exists():
        notes.append(
            f"{previous_path(folder).name} beside the folder is the old content from an interrupted swap; the folder is "
            "complete, and the next `moeref vectors` removes the leftover"
        )
    return notes


def _version() -> str:
    from .._version import __version__

    return __version__


def _verify_case(folder: Path, entry: dict, backend: str, rtol: float | None, atol: float | None) -> tuple[Comparison | None, str | None]:
    formulation, spec = find_case(entry["name"])
    diff = _diff_options(entry["options"], options_to_json(spec.options) if spec.options is not None else {})
    if diff:
        return None, "options differ from this moeref's: " + "; ".join(diff[:3])
    tensors = load_entry_tensors(folder, entry)
    problem = problem_from_tensors(formulation, spec, tensors)
    try:
        computed = compute(spec, problem, backend)
    except Exception as exc:  # a formulation that raises on this backend is a failure of this case
        return None, f"moeref raised {type(exc).__name__}: {exc}"
    missing = [n for n in computed if n not in tensors]
    result = compare(computed, tensors, dtype=entry["dtype"], rtol=rtol, atol=atol, routing=formulation.routing(spec),
                     names=[n for n in computed if n in tensors])
    if missing:
        extra = tuple(TensorCheck(n, "fail", float("inf"), float("inf"), "computed but not in the stored vectors") for n in missing)
        result = Comparison(result.tensors + extra, result.ties, result.mismatched_tokens, result.tolerance)
    return result, None


def verify(
    folder: str | Path,
    *,
    backends: Sequence[str] = ("numpy",),
    rtol: float | None = None,
    atol: float | None = None,
    only: Sequence[str] | None = None,
    on_case: Callable[[str, int, int], None] | None = None,
) -> VerifyResult:
    """Verify a vectors folder: checksums, names, then every case recomputed on each backend.

    Parameters
    ----------
    folder : path
    backends : sequence of str
        Backend names (``moeref.backends.BACKEND_NAMES``).
    rtol, atol : float, optional
        Override the per-dtype tolerances.
    only : sequence of str, optional
        Substrings of case names to verify (default: all).
    on_case : callable (name, index, total), optional
        Progress callback.

    Returns
    -------
    VerifyResult
        ``ok`` is False if any case failed.

    Raises
    ------
    VectorsError
        Missing folder or manifest, invalid or newer manifest, missing or changed files (all
        listed), unknown formulation / preset / case, unknown or unavailable backend.
    """
    start = time.perf_counter()
    folder = Path(folder)
    for name in backends:
        try:
            b = get_backend(name)
        except ValueError as exc:
            raise VectorsError(str(exc)) from None
        if not b.available():
            raise VectorsError(f"backend {name!r} is not available here: {b.reason_unavailable()}")
    manifest, entries, notes = check_folder(folder, only)
    outcomes = []
    total = len(entries) * len(backends)
    for bi, backend in enumerate(backends):
        for ei, entry in enumerate(entries):
            if on_case is not None:
                on_case(entry["name"], bi * len(entries) + ei, total)
            t0 = time.perf_counter()
            comparison, error = _verify_case(folder, entry, backend, rtol, atol)
            outcomes.append(
                CaseOutcome(entry["name"], entry["formulation"], entry["preset"], entry["dtype"], backend, comparison, error,
                            time.perf_counter() - t0)
            )
    return VerifyResult(folder, str(manifest.get("moeref_version")), tuple(outcomes), tuple(notes), time.perf_counter() - start)


def summary_rows(result: VerifyResult) -> list[dict]:
    """One row per (formulation, preset, dtype, backend): cases, worst errors, ties, pass/fail."""
    groups: dict[tuple, list[CaseOutcome]] = {}
    for o in result.outcomes:
        groups.setdefault((o.formulation, o.preset or "", o.dtype, o.backend), []).append(o)
    rows = []
    for (formulation, preset, dtype, backend), outs in groups.items():
        comps = [o.comparison for o in outs if o.comparison is not None]
        rows.append({
            "formulation": formulation,
            "preset": preset,
            "dtype": dtype,
            "backend": backend,
            "cases": len(outs),
            "out_abs": max((c.max_abs("outputs") for c in comps), default=0.0),
            "out_rel": max((c.max_rel("outputs") for c in comps), default=0.0),
            "grad_rel": max((max(c.max_rel("grads"), c.max_rel("aux_grads")) for c in comps), default=0.0),
            "ties": sum(len(c.ties.differing) for c in comps if c.ties),
            "failed": sum(not o.ok for o in outs),
        })
    return rows

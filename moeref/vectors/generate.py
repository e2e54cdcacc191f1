"""``moeref vectors``: write the golden reference vectors of every case to a folder.

The run is deterministic (the same moeref version writes byte-identical files on every machine)
and all-or-nothing: it builds the new content in a staging folder beside the target,
``<parent>/.<name>.partial`` (the target's files carried over as hard links), and swaps it in
as a whole when complete (see [`moeref.vectors.staging`][moeref.vectors.staging]). An
interrupted run, at any moment, leaves the target as it was or complete; running the same
command again finishes it. A file that already holds exactly the bytes this run would write is
kept; one that differs is replaced only with ``force``, and that check happens before the target
is touched. A run that would change nothing leaves the target untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .._version import __version__
from ._errors import VectorsError
from .cases import CaseSpec, get_formulation, options_to_json, reference, select_cases
from .compare import TIE_THRESHOLDS, TOLERANCES
from .io import (MANIFEST, SCHEMA_VERSION, atomic_write, check_case_file, encode_case, encode_manifest, is_temp_name,
                 read_manifest, sha256, temp_files)
from .staging import discard, repair, resolve_target, stage, staging_path, swap_in

__all__ = ["DEFAULT_FOLDER", "GeneratedCase", "GenerateResult", "generate", "manifest_entry"]

DEFAULT_FOLDER = "moeref-vectors"
"""Where ``moeref vectors`` writes without ``--out`` (relative to the working directory)."""

TENSOR_GROUPS = {
    "inputs": "data the formulation is applied to",
    "params": "parameters, in moeref's layout (row vectors: x @ W)",
    "draws": "explicit random draws the options use",
    "cotangents": "stated cotangents of the VJP",
    "outputs": "every output of the forward, computed in float64",
    "grads": "VJP of <cotangents/y, outputs/y> (classical: of the single output) w.r.t. inputs and params",
    "aux_grads": "sparse layer: VJP of the unweighted auxiliary losses alone, with cotangents/load_balancing_loss and cotangents/z_loss",
}


@dataclass(frozen=True)
class GeneratedCase:
    """One row of the summary: ``status`` is ``"written"``, ``"kept"`` (identical file) or ``"replaced"``."""

    spec: CaseSpec
    file: str
    nbytes: int
    ntensors: int
    status: str
    seconds: float


@dataclass(frozen=True)
class GenerateResult:
    """What a run did.

    ``manifest_status`` is ``"written"`` (new folder), ``"updated"`` or ``"kept"``; ``dropped``
    lists ``(case name, problem)`` for entries of the old manifest that this run did not
    regenerate and whose file was missing or failed its checksum: they are left out of the new
    manifest (a changed file itself stays in the folder, unlisted).
    """

    folder: Path
    cases: tuple[GeneratedCase, ...]
    manifest_status: str
    seconds: float
    dropped: tuple[tuple[str, str], ...] = ()


def manifest_entry(ref, data: bytes) -> dict:
    """The manifest's record of one case file."""
    spec = ref.spec
    formulation = get_formulation(spec.formulation)
    routing = formulation.routing(spec)
    return {
        "name": spec.name,
        "file": spec.file,
        "sha256": sha256(data),
        "bytes": len(data),
        "formulation": spec.formulation,
        "summary": formulation.summary,
        "preset": spec.preset,
        "preset_kwargs": options_to_json(dict(spec.preset_kwargs)),
        "dtype": spec.dtype,
        "reference_dtype": "float64",
        "seed": int(ref.seed),
        "sizes": options_to_json(dict(spec.sizes)),
        "options": options_to_json(spec.options) if spec.options is not None else {},
        "routing": routing.to_json() if routing is not None else None,
        "tensors": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in ref.tensors.items()},
    }


def _manifest(entries: Sequence[dict]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "moeref_version": __version__,
        "format": "one safetensors file per case; tensor names <group>/<path>",
        "tensor_groups": TENSOR_GROUPS,
        "reference_dtype": "float64",
        "tolerances": {k: {"rtol": t.rtol, "atol": t.atol} for k, t in TOLERANCES.items()},
        "tolerance_rule": "max|a - b| <= atol + rtol * max|b| per tensor; integer and bool tensors equal",
        "tie_thresholds": dict(TIE_THRESHOLDS),
        "tie_rule": "near tie: smallest gap among the k+1 largest selection values / max|values| of the row < threshold",
        "cases": sorted(entries, key=lambda e: e["name"]),
    }


def _previous_entries(folder: Path, force: bool) -> dict[str, dict]:
    """Entries of an existing manifest worth keeping (same moeref version and schema)."""
    if not (folder / MANIFEST).exists():
        return {}
    try:
        old = read_manifest(folder)
    except VectorsError as exc:
        if force:
            return {}
        raise VectorsError(f"{exc}\nThe folder's existing manifest cannot be read; use --force to replace it") from None
    if old.get("moeref_version") != __version__ or old["schema_version"] != SCHEMA_VERSION:
        if force:
            return {}
        raise VectorsError(
            f"{folder} holds vectors of moeref {old.get('moeref_version')!r} (schema {old['schema_version']}); "
            f"this is moeref {__version__}: use --force to regenerate them, or --out another folder"
        )
    return {e["name"]: e for e in old["cases"]}


def _not_carried(rel: Path) -> bool:
    """Files of the target not copied into the staging folder: temporary files, and the manifest
    (rewritten last, so a staging folder holds one only when complete)."""
    return rel == Path(MANIFEST) or is_temp_name(rel.name)


def _staging_complete(staging: Path) -> bool:
    return (staging / MANIFEST).is_file()


def _write_case(spec: CaseSpec, folder: Path, staging: Path, force: bool) -> tuple[GeneratedCase, dict]:
    """Compute one case, compare it with the target's file and write it into the staging folder."""
    t0 = time.perf_counter()
    ref = reference(spec)
    data = encode_case(ref.tensors, spec.name)
    path = folder / spec.file
    status = "written"
    if path.exists():
        if path.read_bytes() == data:
            status = "kept"
        elif force:
            status = "replaced"
        else:
            raise VectorsError(
                f"{path} exists with different content (written by another moeref version, or edited); "
                "nothing was overwritten: use --force to replace it, or --out another folder"
            )
    if status != "kept" or not (staging / spec.file).is_file():
        atomic_write(staging / spec.file, data)  # a new file: never writes into a carried-over hard link
    row = GeneratedCase(spec, spec.file, len(data), len(ref.tensors), status, time.perf_counter() - t0)
    return row, manifest_entry(ref, data)


def _drop_broken(entries: dict[str, dict], regenerated: set[str], folder: Path) -> list[tuple[str, str]]:
    """Remove from ``entries`` the old ones not regenerated whose file is missing or changed."""
    dropped = []
    for name in sorted(set(entries) - regenerated):
        problem = check_case_file(folder, entries[name])[1]
        if problem:
            dropped.append((name, problem))
            del entries[name]
    return dropped


def generate(
    out: str | Path = DEFAULT_FOLDER,
    *,
    only: Sequence[str] | None = None,
    force: bool = False,
    on_case: Callable[[CaseSpec, int, int], None] | None = None,
) -> GenerateResult:
    """Write the vectors of the selected cases (default: all) and the manifest to ``out``, atomically.

    Parameters
    ----------
    out : path
        The folder (created if needed). It is replaced as a whole: the run works in
        ``.<name>.partial`` beside it, and deletes a leftover of that name.
    only : sequence of str, optional
        Name patterns (globs, or substrings), see [`select_cases`][moeref.vectors.cases.select_cases].
        Cases already in the folder and not selected are carried over, with their manifest entries.
    force : bool
        Replace files whose content differs from this run's (another moeref version, edited files).
    on_case : callable (spec, index, total), optional
        Called before each case (progress display).

    Returns
    -------
    GenerateResult

    Raises
    ------
    VectorsError
        No case matches ``only``; ``out`` is a file, the working directory or contains it; a file
        or manifest would be overwritten with different content and ``force`` is False (raised
        before ``out`` is touched); the finished folder could not be put in place.
    KeyboardInterrupt
        Passed on after deleting the staging folder: ``out`` is unchanged.
    """
    start = time.perf_counter()
    specs = select_cases(only)
    folder = Path(out)
    target = resolve_target(folder)
    repair(target, _staging_complete)  # a crash during an earlier swap
    entries = _previous_entries(folder, force)
    staging = staging_path(target)
    try:
        stage(target, skip=_not_carried)
        rows = []
        for i, spec in enumerate(specs):
            if on_case is not None:
                on_case(spec, i, len(specs))
            row, entries[spec.name] = _write_case(spec, folder, staging, force)
            rows.append(row)
        dropped = _drop_broken(entries, {s.name for s in specs}, folder)
        manifest = encode_manifest(_manifest(list(entries.values())))
        path = folder / MANIFEST
        manifest_status = "written"
        if path.exists():
            manifest_status = "kept" if path.read_bytes() == manifest else "updated"
        atomic_write(staging / MANIFEST, manifest)  # last: marks the staging folder complete
        changed = manifest_status != "kept" or any(r.status != "kept" for r in rows) or bool(temp_files(target))
    except BaseException:
        discard(staging)
        raise
    if not changed:
        discard(staging)
    else:
        try:
            swap_in(staging, target)
        except OSError as exc:
            raise VectorsError(
                f"could not put the new vectors in place of {folder} ({exc}); the folder holds its previous "
                "or its new complete content: run the same command again"
            ) from None
    return GenerateResult(folder, tuple(rows), manifest_status, time.perf_counter() - start, tuple(dropped))


def shapes_of(spec: CaseSpec) -> str:
    """``"T=7 d=5 I=3 E=8 k=2"`` for the summary table."""
    return " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in spec.sizes.items())

"""``moeref vectors``: write the golden reference vectors of every case to a folder.

The run is deterministic (the same moeref version writes byte-identical files on every machine),
atomic per file (temporary name, then ``os.replace``; the manifest last) and resumable: a file
that already holds exactly the bytes this run would write is kept, one that differs is replaced
only with ``force``. Re-running after an interruption completes the folder.
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
from .io import MANIFEST, SCHEMA_VERSION, atomic_write, encode_case, encode_manifest, read_manifest, sha256, temp_files

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
    folder: Path
    cases: tuple[GeneratedCase, ...]
    manifest_status: str
    seconds: float


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


def generate(
    out: str | Path = DEFAULT_FOLDER,
    *,
    only: Sequence[str] | None = None,
    force: bool = False,
    on_case: Callable[[CaseSpec, int, int], None] | None = None,
) -> GenerateResult:
    """Write the vectors of the selected cases (default: all) and the manifest to ``out``.

    Parameters
    ----------
    out : path
        The folder (created if needed).
    only : sequence of str, optional
        Name patterns (globs, or substrings), see [`select_cases`][moeref.vectors.cases.select_cases].
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
        No case matches ``only``; ``out`` is a file; a file or manifest would be overwritten with
        different content and ``force`` is False.
    """
    start = time.perf_counter()
    specs = select_cases(only)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise VectorsError(f"{folder} exists and is not a folder")
    entries = _previous_entries(folder, force)
    for leftover in temp_files(folder):  # from an interrupted run: never a valid file
        leftover.unlink()
    rows = []
    for i, spec in enumerate(specs):
        if on_case is not None:
            on_case(spec, i, len(specs))
        t0 = time.perf_counter()
        ref = reference(spec)
        data = encode_case(ref.tensors, spec.name)
        path = folder / spec.file
        status = "written"
        if path.exists():
            if sha256(path.read_bytes()) == sha256(data):
                status = "kept"
            elif force:
                status = "replaced"
            else:
                raise VectorsError(
                    f"{path} exists with different content (written by another moeref version, or edited); "
                    "nothing was overwritten: use --force to replace it, or --out another folder"
                )
        if status != "kept":
            atomic_write(path, data)
        entries[spec.name] = manifest_entry(ref, data)
        rows.append(GeneratedCase(spec, spec.file, len(data), len(ref.tensors), status, time.perf_counter() - t0))
    manifest = encode_manifest(_manifest(list(entries.values())))
    path = folder / MANIFEST
    manifest_status = "written"
    if path.exists():
        manifest_status = "kept" if path.read_bytes() == manifest else "updated"
    if manifest_status != "kept":
        atomic_write(path, manifest)
    return GenerateResult(folder, tuple(rows), manifest_status, time.perf_counter() - start)


def shapes_of(spec: CaseSpec) -> str:
    """``"T=7 d=5 I=3 E=8 k=2"`` for the summary table."""
    return " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in spec.sizes.items())

"""Files of a vectors folder: safetensors case files, the JSON manifest, atomic writes, safe reads.

Layout of a folder::

    manifest.json                                   written last; lists every case
    sparse_moe/sparse_moe.mixtral.T7-d5-I3-E8.float32.safetensors
    meta_pi/meta_pi.N5-d3-n3-d_out2.float64.safetensors
    ...

Every file is written to a hidden temporary name in its own folder, flushed to disk and moved
into place with ``os.replace`` (atomic on POSIX and Windows), so no file under a real name is
ever partial. ``moeref vectors`` writes into a staging folder and swaps it in whole
([`moeref.vectors.generate`][moeref.vectors.generate], [`moeref.vectors.staging`][moeref.vectors.staging]),
so the manifest of a folder always describes a complete run; a missing manifest, a missing or
changed file, a temporary file or a leftover ``.<name>.partial`` beside the folder all mean
something went wrong, and [`read_manifest`][moeref.vectors.io.read_manifest] and ``moeref
verify`` say which. Readers never unpickle: safetensors is a JSON header and raw little-endian bytes,
parsed by its Rust library, and the manifest is plain JSON, validated field by field before
use. Every problem is a [`VectorsError`][moeref.vectors.VectorsError] with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np

from .._version import __version__
from ._errors import VectorsError
from .compare import TOLERANCES
from .staging import leftovers, previous_path, staging_path

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST",
    "sha256",
    "encode_case",
    "decode_case",
    "atomic_write",
    "temp_files",
    "is_temp_name",
    "read_manifest",
    "encode_manifest",
    "check_case_file",
]

SCHEMA_VERSION = 1
"""Version of the manifest and tensor-naming schema; readers refuse a newer one."""

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TEMP = re.compile(r"^\..+\.tmp$")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Case files
# --------------------------------------------------------------------------------------------


def encode_case(tensors: Mapping[str, np.ndarray], name: str) -> bytes:
    """The safetensors bytes of one case (deterministic: the library orders the tensors, and the
    header holds one metadata entry, ``"moeref"``, a JSON string with sorted keys)."""
    from safetensors.numpy import save

    arrays = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        arrays[k] = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d arrays 0-d
    meta = json.dumps({"case": name, "moeref_version": __version__, "schema_version": SCHEMA_VERSION}, sort_keys=True)
    return save(arrays, metadata={"moeref": meta})


def decode_case(data: bytes, source: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file's bytes; a VectorsError naming ``source`` if they are not one."""
    from safetensors.numpy import load

    try:
        tensors = load(bytes(data))
    except Exception as exc:  # SafetensorError, and anything else a malformed header provokes
        raise VectorsError(f"{source} is not a valid safetensors file ({exc})") from None
    return dict(tensors)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of [`atomic_write`][moeref.vectors.io.atomic_write]'s temporary names."""
    return bool(_TEMP.match(name))


def temp_files(folder: Path) -> list[Path]:
    """Temporary files an interrupted write left in a vectors folder (hidden names ending ``.tmp``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob(".*.tmp") if p.is_file() and _TEMP.match(p.name))


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

_CASE_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "file": (str,),
    "sha256": (str,),
    "bytes": (int,),
    "formulation": (str,),
    "preset": (str, type(None)),
    "dtype": (str,),
    "seed": (int,),
    "sizes": (dict,),
    "options": (dict,),
    "tensors": (dict,),
}


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's JSON bytes (key order as built, 1-space indent, no NaN, final newline)."""
    return (json.dumps(manifest, indent=1, allow_nan=False, ensure_ascii=False) + "\n").encode()


def _fail(source: str, what: str) -> VectorsError:
    return VectorsError(f"{source} is not a valid moeref manifest: {what}")


def _check_entry(entry: Any, i: int, source: str) -> None:
    if not isinstance(entry, dict):
        raise _fail(source, f"cases[{i}] is {type(entry).__name__}, expected an object")
    for key, types in _CASE_FIELDS.items():
        if key not in entry:
            raise _fail(source, f"cases[{i}] has no {key!r}")
        value = entry[key]
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            raise _fail(source, f"cases[{i}].{key} is {type(value).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    file = PurePosixPath(entry["file"])
    if file.is_absolute() or ".." in file.parts or "\\" in entry["file"] or file.suffix != ".safetensors":
        raise _fail(source, f"cases[{i}].file {entry['file']!r} must be a relative path ending .safetensors inside the folder")
    if entry["dtype"] not in TOLERANCES:
        raise _fail(source, f"cases[{i}].dtype {entry['dtype']!r} is not one of {', '.join(TOLERANCES)}")
    if not _HEX64.match(entry["sha256"]):
        raise _fail(source, f"cases[{i}].sha256 is not 64 lowercase hex digits")
    for name, info in entry["tensors"].items():
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in info["shape"])
        )
        if not ok:
            raise _fail(source, f"cases[{i}].tensors[{name!r}] must be {{'dtype': str, 'shape': [int, ...]}}")


def _missing_folder_message(folder: Path) -> str:
    """Why ``folder`` does not exist, when an interrupted ``moeref vectors`` left something beside it."""
    left = leftovers(folder)
    rerun = f"`moeref vectors --out {folder}`"
    if previous_path(folder) in left:
        roles = {previous_path(folder): "its previous content", staging_path(folder): "the new content"}
        found = " and ".join(f"{p.name} ({roles[p]})" for p in sorted(left, key=lambda p: p != previous_path(folder)))
        return (
            f"vectors folder {folder} does not exist, but {found} beside it: a crash while `moeref vectors` was "
            f"replacing it; run the same command, {rerun}, again to repair it: the run finishes the swap, or "
            "restores the previous content when the new one was incomplete"
        )
    if left:
        return (
            f"vectors folder {folder} does not exist: an interrupted `moeref vectors` left {left[0].name} beside it "
            f"(a first run that did not finish); run the same command, {rerun}, again to finish"
        )
    return f"vectors folder {folder} does not exist; generate it with {rerun}"


def read_manifest(folder: Path) -> dict:
    """Read and validate ``folder/manifest.json``.

    Raises
    ------
    VectorsError
        Missing folder or manifest (the message says whether the folder looks like an interrupted
        run), unreadable or malformed JSON, a schema version newer than this moeref reads, missing
        or mistyped fields, unsafe file paths, duplicate case names.
    """
    folder = Path(folder)
    if not folder.exists():
        raise VectorsError(_missing_folder_message(folder))
    if not folder.is_dir():
        raise VectorsError(f"{folder} is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        leftovers = temp_files(folder) or list(folder.rglob("*.safetensors"))
        if leftovers:
            raise VectorsError(
                f"{folder} is incomplete: case files but no {MANIFEST} (an interrupted `moeref vectors`?); "
                f"run `moeref vectors --out {folder}` again to complete it"
            )
        raise VectorsError(f"{folder} holds no {MANIFEST}; generate vectors with `moeref vectors --out {folder}`")
    source = str(path)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise _fail(source, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(source, f"unreadable JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(manifest, dict):
        raise _fail(source, f"top level is {type(manifest).__name__}, expected an object")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(source, f"schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise VectorsError(
            f"{source} has schema version {version}, newer than this moeref ({__version__}) reads "
            f"(version {SCHEMA_VERSION}); upgrade moeref, or regenerate the vectors with this version"
        )
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise _fail(source, "'cases' is missing or not a list")
    names = set()
    for i, entry in enumerate(cases):
        _check_entry(entry, i, source)
        if entry["name"] in names:
            raise _fail(source, f"case {entry['name']!r} is listed twice")
        names.add(entry["name"])
    return manifest


def check_case_file(folder: Path, entry: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
    """``(data, None)`` when the entry's file exists with its checksum, else ``(None, problem)``."""
    path = Path(folder) / entry["file"]
    if not path.is_file():
        return None, f"{entry['file']} is missing"
    data = path.read_bytes()
    if sha256(data) != entry["sha256"]:
        return None, f"{entry['file']} does not match its SHA-256 in the manifest (changed, corrupted or truncated)"
    return data, None


def load_entry_tensors(folder: Path, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of one manifest entry, after the checksum and against the listed names, dtypes, shapes."""
    data, problem = check_case_file(folder, entry)
    if problem:
        raise VectorsError(problem)
    tensors = decode_case(data, entry["file"])
    listed = entry["tensors"]
    if set(tensors) != set(listed):
        raise VectorsError(f"{entry['file']}: its tensors differ from the manifest's list")
    for name, info in listed.items():
        a = tensors[name]
        if a.dtype.name != info["dtype"] or list(a.shape) != info["shape"]:
            raise VectorsError(
                f"{entry['file']}: tensor {name} is {a.dtype.name} {list(a.shape)}, the manifest says {info['dtype']} {info['shape']}"
            )
    return tensors

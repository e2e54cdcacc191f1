"""Small public data sets of the classical mixture-of-experts literature, shipped as CSV.

The files are byte-identical copies of the CSVs described in ``moeref/datasets/PROVENANCE.md``
(sources, row counts, licences and SHA-256 checksums). [`load_dataset`][moeref.datasets.load_dataset]
verifies a file's SHA-256 every time it reads it, so a published result reproduced from these data is
reproduced from exactly the data the publication used.

This module is host I/O, not math: it reads files with the standard `csv` module and returns NumPy
arrays. Move them to any array library with ``xp.asarray(...)`` (or a `moeref.backends` adapter).

| name | rows | what |
|---|---|---|
| `tone` | 150 | tone perception (Cohen 1980): `stretchratio`, `tuned` |
| `tone_with_outliers_tmoe` | 155 | `tone` plus 5 outliers at (0, 4), in the row order of Chamroukhi's TMoE demo |
| `co2data` | 28 | 1996 GNP and CO2 per capita of 28 countries: `GNP`, `CO2`, `country` |
| `nodata` | 88 | nitric oxide vs equivalence ratio: `NO`, `Equivalence` |
| `patent` | 70 | patents vs R&D spending (Wang, Cockburn & Puterman 1998): `Company`, `Patents`, `RDS`, `lgRD` |
| `npreg` | 200 | flexmix's artificial data: `x`, `yn`, `yp`, `yb`, `class`, `id1`, `id2` |
| `tempanomalies_meteorits` | 136 | GISTEMP annual anomalies 1880-2015 (`-99.99` = missing 5-year mean) |
| `temperature_anomaly_tmoe_matlab` | 135 | older GISTEMP release, 1880-2014 (`-99.99` = missing 5-year mean) |
| `mcycle` | 133 | motorcycle crash head acceleration: `times`, `accel` |
| `peterson_barney_pb52` | 1520 | Peterson & Barney (1952) vowel formants `f0`..`f3` (vowels in X-SAMPA) |
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import re
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Mapping

import numpy as np

__all__ = ["Dataset", "DatasetChecksumError", "load_dataset", "list_datasets", "dataset_info"]


@dataclass(frozen=True)
class _Entry:
    filename: str
    sha256: str
    n_rows: int
    description: str
    source: str


# Checksums and row counts as listed in PROVENANCE.md (verified against the shared copies).
_REGISTRY: dict[str, _Entry] = {
    "tone": _Entry(
        "tone.csv",
        "11a7345c48ed68164246b47fb13ceb2147caa852357e47b6d622ea263e7e92a2",
        150,
        "Tone perception experiment (Cohen 1980): perceived tone ratio `tuned` vs actual `stretchratio`. "
        "Row 15 has stretchratio 2.03 where the other blocks have 2.05; this quirk is part of the "
        "distributed data set and published fits use it as is.",
        "cran/mixtools @ ead45058 : data/tonedata.RData (from R package fpc); identical to "
        "fchamroukhi/tMoE_m @ d15bdcb7 : data/x_Tone.mat + data/y_Tone.mat",
    ),
    "tone_with_outliers_tmoe": _Entry(
        "tone_with_outliers_tmoe.csv",
        "8ad756f733bb5f6b822f5b6eb376a9a65446b717b2681b642cecb1112def3a42",
        155,
        "The 150 tone rows plus 5 copies of (0, 4), in a different row order (Chamroukhi 2016 robustness "
        "experiment).",
        "fchamroukhi/tMoE_m @ d15bdcb7 : data/x_Tone_outliers.mat, data/y_Tone_outliers.mat",
    ),
    "co2data": _Entry(
        "co2data.csv",
        "e76086ef44e7f062391f8fd9f71c60afb8ade300566bf2612b5c9b75f11edc65",
        28,
        "1996 gross national product per capita (`GNP`) and estimated CO2 emissions per capita (`CO2`) "
        "of 28 countries (`country`); the mixtools JSS vignette's regmixEM example.",
        "cran/mixtools @ ead45058 : data/CO2data.RData",
    ),
    "nodata": _Entry(
        "nodata.csv",
        "e72710aede9bce86edb307c0317fd5c6154203f40bead211fc8feb45c065d86b",
        88,
        "Nitric oxide concentration (`NO`) vs equivalence ratio (`Equivalence`) of an ethanol engine.",
        "cran/mixtools @ ead45058 : data/NOdata.RData",
    ),
    "patent": _Entry(
        "patent.csv",
        "c467d9c99721a8d53641ef35551ced1bf926247e0fe4815c0ca90c2fdee380bf",
        70,
        "Patent counts vs R&D spending of 70 pharmaceutical and biomedical companies (NBER 1976); "
        "Wang, Cockburn & Puterman (1998). Trailing spaces stripped from `Company`.",
        "cran/flexmix @ d352332e : data/patent.RData",
    ),
    "npreg": _Entry(
        "npreg.csv",
        "d77cdda9338dd7a6cd85893b35a561772d128c235658767133037ce2ad18c111",
        200,
        "Artificial two-class regression data of the flexmix introduction vignette.",
        "cran/flexmix @ d352332e : data/NPreg.RData",
    ),
    "tempanomalies_meteorits": _Entry(
        "tempanomalies_meteorits.csv",
        "70ffc35165b557986720f387968781b1b3daebd67059f14c66aac05b0efebe21",
        136,
        "NASA GISS land-station annual temperature anomalies 1880-2015; `-99.99` marks a missing "
        "5-year mean.",
        "fchamroukhi/MEteorits @ 11c42aa9 : data/tempanomalies.rda",
    ),
    "temperature_anomaly_tmoe_matlab": _Entry(
        "temperature_anomaly_tmoe_matlab.csv",
        "1db244cea85337e744fe57c99da6f8bc65386e1099f8a5a5e678a55005d69b42",
        135,
        "An older GISTEMP release, 1880-2014, as used by the TMoE MATLAB demos; `-99.99` marks a "
        "missing 5-year mean.",
        "fchamroukhi/tMoE_m @ d15bdcb7 : data/TemperatureAnomaly.mat",
    ),
    "mcycle": _Entry(
        "mcycle.csv",
        "fd0bf0038ec6adf64929f63576961bcdbb41db9e17e97f4be9d938b567f7de91",
        133,
        "Simulated motorcycle accident: head acceleration (`accel`, g) vs time after impact (`times`, ms).",
        "cran/MASS @ b6a22745 : data/mcycle.rda",
    ),
    "peterson_barney_pb52": _Entry(
        "peterson_barney_pb52.csv",
        "0e6b43dd28b00224f32960c931ab484e55c4a6ac1c1112c6849bf6fb613fdb9e",
        1520,
        "Peterson & Barney (1952) vowel formant frequencies f0-f3 (Hz) of 76 speakers; vowels coded in "
        "X-SAMPA (case-sensitive).",
        "cran/phonTools @ 760ad826 : data/pb52.rda",
    ),
}


class DatasetChecksumError(ValueError):
    """A shipped CSV file's SHA-256 differs from the one recorded in PROVENANCE.md."""


@dataclass(frozen=True)
class Dataset:
    """One loaded data set: named columns as NumPy arrays, with its provenance.

    Attributes
    ----------
    name : str
        The name given to [`load_dataset`][moeref.datasets.load_dataset].
    columns : tuple of str
        Column names, in file order.
    data : Mapping[str, numpy.ndarray]
        Read-only mapping column name -> 1-D array (int64, float64 or str).
    description, source : str
        What the data are, and where the CSV was extracted from.
    sha256 : str
        The verified checksum of the file.
    """

    name: str
    columns: tuple[str, ...]
    data: Mapping[str, np.ndarray]
    description: str
    source: str
    sha256: str

    def __getitem__(self, column: str) -> np.ndarray:
        try:
            return self.data[column]
        except KeyError:
            raise KeyError(
                f"data set {self.name!r} has no column {column!r}; its columns are {', '.join(self.columns)}"
            ) from None

    @property
    def n_rows(self) -> int:
        """Number of data rows (the header excluded)."""
        return int(self.data[self.columns[0]].shape[0])


def list_datasets() -> list[str]:
    """Names accepted by [`load_dataset`][moeref.datasets.load_dataset], sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    key = name[:-4] if name.endswith(".csv") else name
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key.lower(), list(_REGISTRY), n=1, cutoff=0.3)
    close += [n for n in _REGISTRY if n.startswith(key.lower()) and n not in close] if key else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown data set {name!r}{hint}; available: {', '.join(list_datasets())}")


def dataset_info(name: str) -> dict[str, object]:
    """Registry record of ``name`` without reading the file: filename, sha256, n_rows, description, source."""
    e = _entry(name)
    return {"filename": e.filename, "sha256": e.sha256, "n_rows": e.n_rows, "description": e.description, "source": e.source}


_INT = re.compile(r"[+-]?\d+\Z")


def _column(values: list[str]) -> np.ndarray:
    """int64 if every entry is an integer literal, else float64 if every entry parses, else str."""
    if values and all(_INT.match(v) for v in values):
        return np.asarray([int(v) for v in values], dtype=np.int64)
    try:
        return np.asarray([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return np.asarray(values, dtype=str)


def load_dataset(name: str) -> Dataset:
    """Load a shipped data set, after checking its SHA-256.

    Parameters
    ----------
    name : str
        One of [`list_datasets`][moeref.datasets.list_datasets]() (a trailing ``.csv`` is accepted).

    Returns
    -------
    Dataset
        Columns as read-only NumPy arrays: int64 where every entry is an integer
        literal, float64 where every entry is a number, str otherwise.

    Raises
    ------
    ValueError
        For an unknown name (the message suggests the closest name).
    DatasetChecksumError
        If the file's SHA-256 is not the one in PROVENANCE.md (the message names the file).

    Examples
    --------
    >>> from moeref.datasets import load_dataset
    >>> co2 = load_dataset("co2data")
    >>> co2.n_rows, co2.columns
    (28, ('GNP', 'CO2', 'country'))
    >>> float(load_dataset("tone")["stretchratio"][14])  # the 15th row keeps its 2.03
    2.03
    """
    entry = _entry(name)
    raw = resources.files(__name__).joinpath("_data", entry.filename).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry.sha256:
        raise DatasetChecksumError(
            f"{entry.filename}: SHA-256 {digest} does not match the recorded {entry.sha256}; "
            "the shipped file was altered (see moeref/datasets/PROVENANCE.md)"
        )
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    header, body = rows[0], rows[1:]
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body) if len(r) != len(header))
        raise ValueError(f"{entry.filename}: row {bad + 1} has {len(body[bad])} fields, the header has {len(header)}")
    columns = {h: _column([r[j] for r in body]) for j, h in enumerate(header)}
    for arr in columns.values():
        arr.setflags(write=False)
    return Dataset(
        name=next(k for k, v in _REGISTRY.items() if v is entry),
        columns=tuple(header),
        data=MappingProxyType(columns),
        description=entry.description,
        source=entry.source,
        sha256=digest,
    )

"""moeref.datasets: every shipped CSV loads, matches PROVENANCE.md (rows, SHA-256) and keeps its quirks."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import moeref.datasets as ds
from moeref.datasets import DatasetChecksumError, dataset_info, list_datasets, load_dataset

PROVENANCE = resources.files("moeref.datasets").joinpath("PROVENANCE.md").read_text(encoding="utf-8")
_ROOT = Path(__file__).resolve().parents[1]
SHARED = next(
    (r / "shared" / "data" / "classical-moe" for r in (_ROOT, _ROOT.parent) if (r / "shared" / "data" / "classical-moe").is_dir()),
    _ROOT / "shared" / "data" / "classical-moe",
)


def _provenance_rows() -> dict[str, int]:
    """``file -> rows`` from the PROVENANCE.md table (first integer of the rows cell)."""
    out = {}
    for line in PROVENANCE.splitlines():
        m = re.match(r"\|\s*`([^`]+\.csv)`\s*\|\s*(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def _provenance_checksums() -> dict[str, str]:
    return {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64})  (\S+\.csv)$", PROVENANCE, re.M)}


def _package_files() -> list[str]:
    return sorted(p.name for p in resources.files("moeref.datasets").joinpath("_data").iterdir() if p.name.endswith(".csv"))


def test_registry_lists_every_shipped_file_and_provenance_entry():
    files = _package_files()
    assert len(files) == 10
    assert sorted(dataset_info(n)["filename"] for n in list_datasets()) == files
    assert sorted(_provenance_rows()) == files
    assert sorted(_provenance_checksums()) == files
    assert list_datasets() == sorted(list_datasets())


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_loads_with_provenance_row_count_and_checksum(name):
    d = load_dataset(name)
    info = dataset_info(name)
    assert d.name == name
    assert d.n_rows == info["n_rows"] == _provenance_rows()[info["filename"]]
    assert d.sha256 == info["sha256"] == _provenance_checksums()[info["filename"]]
    raw = resources.files("moeref.datasets").joinpath("_data", info["filename"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == d.sha256
    assert all(d[c].shape == (d.n_rows,) for c in d.columns)
    assert d.description and d.source


@pytest.mark.parametrize("name", list_datasets())
def test_shipped_file_is_byte_identical_to_shared_copy(name):
    fname = dataset_info(name)["filename"]
    if not (SHARED / fname).exists():
        pytest.skip(f"shared data folder not present at {SHARED}")
    packaged = resources.files("moeref.datasets").joinpath("_data", fname).read_bytes()
    assert packaged == (SHARED / fname).read_bytes()


def test_tone_quirk_row_15_keeps_stretchratio_2_03():
    tone = load_dataset("tone")
    s = tone["stretchratio"]
    assert s[14] == 2.03
    assert int(np.sum(s == 2.03)) == 6
    # the other four blocks of 30 have 2.05 at that position
    assert [float(s[14 + 30 * b]) for b in range(1, 5)] == [2.05] * 4


def test_column_types_and_values():
    co2 = load_dataset("co2data")
    assert co2.columns == ("GNP", "CO2", "country")
    assert co2["GNP"].dtype == np.float64 and co2["country"].dtype.kind == "U"
    assert (float(co2["GNP"][0]), float(co2["CO2"][0]), str(co2["country"][0])) == (19.02, 14.7, "CAN")
    pb = load_dataset("peterson_barney_pb52")
    assert pb["f1"].dtype == np.int64
    assert set(pb["vowel"].tolist()) == {"i", "I", "E", "{", "V", "A", "O", "U", "u", "3'"}
    npreg = load_dataset("npreg")
    assert npreg["class"].dtype == np.int64 and npreg["yp"].dtype == np.float64


def test_arrays_are_read_only_and_mapping_is_immutable():
    d = load_dataset("mcycle")
    with pytest.raises(ValueError):
        d["accel"][0] = 1.0
    with pytest.raises(TypeError):
        d.data["accel"] = np.zeros(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.name = "other"


def test_csv_suffix_is_accepted():
    assert load_dataset("co2data.csv").name == "co2data"


@pytest.mark.parametrize("bad, suggestion", [("co2", "co2data"), ("tones", "tone"), ("CO2data", "co2data"), ("mcycles", "mcycle")])
def test_unknown_name_suggests_the_closest(bad, suggestion):
    with pytest.raises(ValueError, match=rf"unknown data set '{bad}' \(did you mean '{suggestion}'\?\); available: co2data"):
        load_dataset(bad)


def test_unknown_column_lists_the_columns():
    with pytest.raises(KeyError, match="has no column 'gnp'; its columns are GNP, CO2, country"):
        load_dataset("co2data")["gnp"]


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="name must be a str"):
        load_dataset(3)


def test_checksum_mismatch_names_the_file(monkeypatch):
    entry = ds._REGISTRY["nodata"]
    monkeypatch.setitem(ds._REGISTRY, "nodata", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(DatasetChecksumError, match=r"nodata\.csv: SHA-256 e72710ae.* does not match the recorded 0000"):
        load_dataset("nodata")

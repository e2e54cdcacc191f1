"""Determinism: the same inputs give bit-identical outputs on NumPy, call after call and in a fresh
interpreter (another hash seed).

The calls are the bad-input catalogue's good calls (tests/bad_input_catalogue.py): every covered
public function, forward and VJP, fits included (max_iter 3), each on fixed seeded inputs. Each
output is reduced to one SHA-256 over its leaves' dtype, shape and bytes (timings excluded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import bad_input_catalogue as cat

TESTS = Path(__file__).resolve().parent
#: Result fields that measure wall-clock time, not numbers.
TIMING_FIELDS = {"seconds"}


def _feed(h, value) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        h.update(repr(value).encode())
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(value, np.generic):
        _feed(h, np.asarray(value))
    elif cat.is_record(value):
        for name in value._fields:
            if name not in TIMING_FIELDS:
                h.update(name.encode())
                _feed(h, getattr(value, name))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.name not in TIMING_FIELDS:
                h.update(f.name.encode())
                _feed(h, getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        h.update(f"seq{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _feed(h, value[k])
    else:
        h.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())


def digest(value) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def run(qualname: str) -> str:
    entry = cat.CATALOGUE[qualname]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return digest(cat.good_call(entry))


def all_digests() -> dict[str, str]:
    return {q: run(q) for q in sorted(cat.CATALOGUE)}


ENTRIES = sorted(cat.CATALOGUE)


@pytest.mark.parametrize("qualname", ENTRIES)
def test_same_bytes_call_after_call(qualname):
    assert run(qualname) == run(qualname)


def test_same_bytes_in_a_fresh_interpreter():
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_determinism as d; "
        "print(json.dumps(d.all_digests()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash order than this process
    done = subprocess.run([sys.executable, "-c", script, str(TESTS)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    here = all_digests()
    assert fresh.keys() == here.keys()
    differ = [q for q in here if fresh[q] != here[q]]
    assert not differ, f"outputs differ between interpreters: {differ}"


def test_digest_sees_a_one_ulp_change():
    a = np.linspace(0.0, 1.0, 7)
    b = a.copy()
    b[3] = np.nextafter(b[3], 2.0)
    assert digest(a) != digest(b) and digest(a) == digest(a.copy())

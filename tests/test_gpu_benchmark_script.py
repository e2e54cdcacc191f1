"""The prepared GPU check (benchmarks/gpu_layer.py) must still run when a GPU machine is lent.

No GPU here: the script runs on NumPy at the smallest sizes (its CPU smoke-test mode), and the
CuPy library it cannot use is skipped with the reason recorded.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_layer_runs_on_numpy_and_records_its_cells(tmp_path):
    out = tmp_path / "gpu_layer.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_layer.py"), "--quick", "--rounds", "1", "--libraries", "cupy,numpy",
           "--workloads", "A", "--dtypes", "float64", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    if "cupy" in doc["skipped"]:
        assert doc["skipped"]["cupy"]  # a reason, not an empty string
    numpy_cells = [c for c in doc["cells"] if c["library"] == "numpy"]
    assert len(numpy_cells) == 1
    cell = numpy_cells[0]
    assert cell["layer_max_abs_diff_to_numpy_layer"] == 0.0 and cell["routes_equal_numpy"]
    assert {"gemm_fwd", "gemm_fwd_bwd", "layer", "dispatch", "layer_value_and_vjp"} <= set(cell["candidates"])
    assert cell["candidates"]["layer"]["reference"] == "gemm_fwd"

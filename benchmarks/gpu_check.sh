#!/usr/bin/env bash
# The GPU check of the performance issue, as one command for a CUDA machine: the backend tests on
# CuPy and on PyTorch CUDA tensors, then benchmarks/gpu_layer.py (workloads A-C against the GPU's
# GEMM bound and HF Mixtral). Logs, a summary and the results file go to $OUT (default /tmp/gpu-check).
#
# The machine needs Python with CuPy, PyTorch (CUDA), NumPy, pytest and hypothesis; whatever else
# moeref needs and the machine lacks (array-api-compat, array-api-strict, ...) is installed from the
# wheels in .whl/ of the repository root, if there are any (no network needed). Download them
# beforehand on a machine with an index, for the GPU machine's Python (3.12 here), e.g.
#
#     python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         array-api-compat array-api-strict
#
# Run from anywhere:  bash benchmarks/gpu_check.sh   (about 10 minutes at most: each step is timed out)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

SITE=$(mktemp -d)
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl || exit 1
fi
# moeref as pip installs it: moeref/ with backends/ as moeref.backends (pyproject.toml's package-dir)
PKG=$(mktemp -d)
cp -r "$REPO/moeref" "$PKG/moeref"
cp -r "$REPO/backends" "$PKG/moeref/backends"
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# from here on in the copy, so that `import moeref` finds it rather than the source tree (which has
# no moeref/backends); the repository's pyproject.toml still configures pytest (rootdir)
cd "$PKG" || exit 1

{
    date -u
    nvidia-smi 2>&1 | head -15
    "$PY" - <<'EOF'
import importlib
for name in ("numpy", "cupy", "torch", "jax", "array_api_compat", "array_api_strict", "transformers", "moeref"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:
        print(name, "missing:", type(e).__name__, e)
try:
    import torch
    print("torch CUDA:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as e:
    print("torch CUDA: unusable", e)
EOF
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

PYTEST=(-m pytest "$REPO/tests" -q -p no:cacheprovider -o "addopts=" -rfE --continue-on-collection-errors)

MOEREF_BACKENDS=cupy timeout 270 "$PY" "${PYTEST[@]}" -k cupy > "$OUT/tests_cupy.log" 2>&1
echo "CuPy backend tests: exit status $? ($(tail -1 "$OUT/tests_cupy.log"))" | tee "$OUT/summary.txt"

MOEREF_BACKENDS=torch MOEREF_TORCH_DEVICE=cuda timeout 150 "$PY" "${PYTEST[@]}" -k torch > "$OUT/tests_torch_cuda.log" 2>&1
echo "PyTorch CUDA backend tests: exit status $? ($(tail -1 "$OUT/tests_torch_cuda.log"))" | tee -a "$OUT/summary.txt"

timeout 160 "$PY" "$REPO/benchmarks/gpu_layer.py" --out "$OUT/gpu_layer.json" > "$OUT/gpu_layer.log" 2>&1
echo "gpu_layer.py: exit status $?" | tee -a "$OUT/summary.txt"
tail -20 "$OUT/gpu_layer.log"

"""Shared machinery of the benchmark runners: side-by-side timing, memory peaks, environment, results files.

Absolute wall times drift by several per cent between processes (and far more on a shared machine),
ratios measured in one process do not. So every runner here measures **ratios**: the candidates of one
workload run interleaved, in a freshly shuffled order in every round, each round gives one ratio per
candidate (its time over the reference candidate's time in the same round), and the summary is the
median over the rounds with the min-max range of the per-round ratios as the spread.

Import this module first (before NumPy): :func:`reexec_without_blas_overrides` removes the OpenBLAS
tuning variables ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` from the environment and re-executes
the runner, since a forced older kernel costs about a third of GEMM speed and OpenBLAS reads them
only when it is loaded.
"""

from __future__ import annotations

import os
import sys

BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def reexec_without_blas_overrides() -> None:
    """Re-execute this process without the OpenBLAS tuning variables (no-op when they are unset)."""
    if any(v in os.environ for v in BLAS_VARS) and os.environ.get("_MOEREF_BENCH_REEXEC") != "1":
        env = {k: v for k, v in os.environ.items() if k not in BLAS_VARS}
        env["_MOEREF_BENCH_REEXEC"] = "1"
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


reexec_without_blas_overrides()

import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def blas_info() -> list[dict] | str:
    """BLAS / OpenMP pools as threadpoolctl reports them (library, kernel, threads, version)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    keep = ("user_api", "internal_api", "prefix", "num_threads", "version", "architecture", "threading_layer")
    return [{k: v for k, v in d.items() if k in keep} for d in threadpool_info()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """What a results file records about the machine and the libraries."""
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "blas": blas_info(),
        "openblas_env_removed": [v for v in BLAS_VARS],
        "openblas_env_present": {v: os.environ[v] for v in BLAS_VARS if v in os.environ},
        "malloc_env": {v: os.environ[v] for v in sorted(os.environ) if v.startswith("MALLOC_") or v == "LD_PRELOAD"},
    }
    for name in ("torch", "transformers", "scipy"):
        mod = sys.modules.get(name)
        if mod is not None:
            env[name] = getattr(mod, "__version__", "?")
    return env


def print_environment(env: dict) -> None:
    print(f"# {env['cpu']} ({env['cpu_count']} CPUs), Python {env['python']}, NumPy {env['numpy']}, load {env['load_average']}")
    blas = env["blas"]
    if isinstance(blas, list):
        for d in blas:
            print(f"# {d.get('user_api')}: {d.get('internal_api')} {d.get('version')} kernel={d.get('architecture')} threads={d.get('num_threads')}")
    else:
        print(f"# {blas}")


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Limit BLAS and OpenMP pools (and torch's intra-op pool, when torch is loaded) to ``n`` threads."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Timing: interleaved shuffled rounds, ratios per round
# --------------------------------------------------------------------------------------------


def interleaved_times(
    candidates: dict[str, Callable[[], Any]], *, rounds: int = 7, warmup: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Wall seconds of every candidate in every round; the order is reshuffled each round.

    Garbage collection is run before each call and disabled during it.
    """
    rng = random.Random(seed)
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                candidates[name]()
                times[name].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    return times


def summarize(times: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Per candidate: median seconds, and the median / min / max over rounds of its ratio to ``reference``."""
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, ref)]
        med = statistics.median(ratios)
        out[name] = {
            "median_seconds": statistics.median(ts),
            "min_seconds": min(ts),
            "ratio_to_" + reference: med,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_spread": (max(ratios) - min(ratios)) / med if med > 0 else float("nan"),
            "ratio_of_fastest": min(ts) / min(ref),
            "seconds": ts,
        }
    return out


def summarize_against(times: dict[str, list[float]], reference_of: dict[str, str]) -> dict[str, dict]:
    """Per candidate: with a reference in ``reference_of``, ``{"reference", "ratio", ...}`` as
    :func:`summarize` gives it (``ratio`` is the median ratio to that reference, round by round);
    without one (the references themselves), its times alone."""
    out = {}
    for name, ts in times.items():
        ref = reference_of.get(name)
        if ref:
            s = summarize({name: ts, ref: times[ref]}, ref)[name]
            out[name] = {"reference": ref, "ratio": s.pop("ratio_to_" + ref), **s}
        else:
            out[name] = {"median_seconds": statistics.median(ts), "min_seconds": min(ts), "seconds": ts}
    return out


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def transient_peak_bytes(f: Callable[[], Any], *, repeats: int = 3) -> list[int]:
    """Peak traced memory above the starting level during ``f()`` (NumPy reports its buffers to tracemalloc).

    The result of ``f`` is dropped only after the peak is read, so the peak includes the output.
    """
    peaks = []
    for _ in range(repeats):
        gc.collect()
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            out = f()
            _, peak = tracemalloc.get_traced_memory()
            del out
        finally:
            tracemalloc.stop()
        peaks.append(peak - start)
    return peaks


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def run_record(benchmark: str, script: str, started: str, env: dict, **fields: Any) -> dict:
    """The common head of a results file: what ran, the command that reruns it, when, and on what
    (``env`` taken at the start; the load average is read again at the end)."""
    return {
        "benchmark": benchmark,
        "command": f"env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/{script} " + " ".join(sys.argv[1:]),
        **{k: v for k, v in fields.items() if k in ("quick", "rounds")},
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**env, "load_average_at_end": environment()["load_average"]},
        **{k: v for k, v in fields.items() if k not in ("quick", "rounds")},
    }


def write_results(doc: dict, name: str, out: Path | None = None) -> Path:
    """Write ``doc`` as JSON to ``out`` (default ``benchmarks/results/<name>-<timestamp>.json``) and to ``<name>-latest.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = out or RESULTS / f"{name}-{stamp}.json"
    text = json.dumps(doc, indent=1, default=float) + "\n"
    path.write_text(text)
    if out is None:
        (RESULTS / f"{name}-latest.json").write_text(text)
    return path

"""Per-expert float64 throughput, and the projected cost of DeepSeek-V3's MoE layer on N Dask workers.

One routed expert of DeepSeek-V3 (d = 7168, I = 2048, SwiGLU; arXiv:2412.19437, Section 4.2) is
written with ``moeref.backends.distributed.save_experts`` and memory-mapped back with
``load_expert``, as a worker of ``sharded_sparse_moe_layer`` does; then ``moeref.expert_ffn.expert_ffn``
is timed on blocks of n tokens (median of several repeats). The projection for a layer call of T
tokens (k = 8 routed experts per token, plus the shared expert, which the client or one worker
computes: it is counted as one more expert) on N workers, each with this machine's throughput:

    time(N) = ceil(E / N) * t_load + T * (k + 1) * 6 d I / (N * rate)

with ``rate`` the FLOP/s measured at the block size nearest the layer's tokens per expert
(``T k / E``: 128 at T = 4096, 1024 at T = 32768), and ``t_load`` the time to read one expert's 352 MB (float64) of weights, paid once per worker
and expert (then cached): the larger of the measured map-and-touch time (the file was just written,
so this is the page cache) and 352 MB over an assumed storage bandwidth (``--disk-gbps``, default
1 GB/s). Memory per
worker: ceil(E / N) * 352 MB of weights plus its tokens' activations.

Run (OpenBLAS tuning variables removed for this process only):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/expert_throughput.py

Writes ``benchmarks/results/expert_throughput.json``; ``docs/distributed.md`` quotes it.
"""

from __future__ import annotations

import os
import sys

_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _BLAS_VARS) and os.environ.get("_MOEREF_BENCH_REEXEC") != "1":
    _env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARS}
    _env["_MOEREF_BENCH_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], _env)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from moeref.backends.distributed import load_expert, save_experts  # noqa: E402
from moeref.expert_ffn import SWIGLU, ExpertFFNParams, expert_ffn  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "expert_throughput.json"
D, I, E_ROUTED, K_ROUTED = 7168, 2048, 256, 8


def _blas_info() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: v for k, v in p.items() if k in ("internal_api", "version", "num_threads", "architecture")} for p in threadpool_info()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024], help="block sizes n to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--disk-gbps", type=float, default=1.0, help="assumed storage bandwidth for cold weight reads (GB/s)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    expert = ExpertFFNParams(
        w_in=rng.standard_normal((1, D, 2 * I)) / math.sqrt(D), w_out=rng.standard_normal((1, I, D)) / math.sqrt(I)
    )
    bytes_per_expert = sum(a.nbytes for a in (expert.w_in, expert.w_out))
    with tempfile.TemporaryDirectory() as tmp:
        save_experts(expert, tmp)
        del expert
        t0 = time.perf_counter()
        mapped = load_expert(tmp, 0)
        touched = float(mapped.w_in.sum() + mapped.w_out.sum())  # first touch: pages read from the file
        t_cached = time.perf_counter() - t0
        rows = []
        for n in args.tokens:
            x = rng.standard_normal((n, D))
            expert_ffn(x, mapped, SWIGLU, expert=0)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                expert_ffn(x, mapped, SWIGLU, expert=0)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            flops = 6 * n * D * I
            rows.append({"tokens": n, "median_s": t, "spread": (max(times) - min(times)) / t, "gflops": flops / t / 1e9})
            print(f"n={n:5d}  {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s")
        del mapped, touched
    t_load = max(t_cached, bytes_per_expert / (args.disk_gbps * 1e9))
    projection = []
    for T in (4096, 32768):
        per_expert = T * K_ROUTED / E_ROUTED
        nearest = min(rows, key=lambda r: abs(r["tokens"] - per_expert))
        rate = nearest["gflops"] * 1e9
        for N in (1, 4, 16, 64, 256):
            experts_per_worker = math.ceil(E_ROUTED / N)
            compute = T * (K_ROUTED + 1) * 6 * D * I / (N * rate)
            load = experts_per_worker * t_load
            projection.append(
                {"T": T, "workers": N, "rate_gflops": rate / 1e9, "weights_GB_per_worker": experts_per_worker * bytes_per_expert / 1e9,
                 "load_s": load, "compute_s": compute, "total_s": load + compute}
            )
    result = {
        "shape": {"d": D, "I": I, "ffn": "swiglu", "dtype": "float64", "routed_experts": E_ROUTED, "k": K_ROUTED},
        "bytes_per_expert": bytes_per_expert,
        "t_load_page_cache_s": t_cached,
        "assumed_disk_gbps": args.disk_gbps,
        "t_load_s": t_load,
        "throughput": rows,
        "projection": projection,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg(), "blas": _blas_info()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"load+touch of one expert ({bytes_per_expert / 1e6:.0f} MB): {t_load:.2f} s; wrote {args.out.name}")
    for p in projection:
        print(f"T={p['T']:6d} N={p['workers']:4d}  weights/worker {p['weights_GB_per_worker']:6.1f} GB  "
              f"load {p['load_s']:8.1f} s  compute {p['compute_s']:8.1f} s")


if __name__ == "__main__":
    main()

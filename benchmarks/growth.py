"""Growth from workload A to workload C (8x the FLOPs), measured side by side in one process.

``benchmarks/sparse_layer.py`` measures A and C minutes apart, so the machine's drift between the
two cells moves their time ratio (on a shared host, by tens of per cent). Here both workloads run
in the same rounds: per (threads, dtype), the candidates ``layer_A``, ``layer_C`` (``sparse_moe_layer``,
``mixtral`` preset) and ``gemm_A``, ``gemm_C`` (their GEMM bounds, as in ``sparse_layer.py``) run
interleaved in shuffled rounds, and every round gives the ratios ``layer_C / layer_A`` and
``gemm_C / gemm_A``. Reported: their medians and ranges over the rounds, and the layer's growth over
the bound's own (the bound's growth itself moves with the cache and GEMM-shape effects of the larger
workload, not with the layer).

Run (the OpenBLAS tuning variables are removed for this command only):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/growth.py

Writes ``benchmarks/results/growth-<time>.json`` and ``growth-latest.json``.
"""

from __future__ import annotations

import harness  # noqa: F401  (first: re-executes without the OpenBLAS tuning variables)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from moeref.presets import mixtral  # noqa: E402
from moeref.sparse_moe import sparse_moe_layer  # noqa: E402
from sparse_layer import WORKLOADS, GemmBound, make_inputs  # noqa: E402


def candidates(name: str, dtype: np.dtype) -> dict:
    """``layer_<name>`` and ``gemm_<name>`` of one workload."""
    w = WORKLOADS[name]
    x, params, _ = make_inputs(w, dtype)
    options = mixtral(k=w.k)
    routes = sparse_moe_layer(x, params, options).routes
    counts = np.bincount(routes.expert_index[routes.kept], minlength=w.E)
    bound = GemmBound(w, counts, params, dtype)
    return {f"layer_{name}": lambda: sparse_moe_layer(x, params, options), f"gemm_{name}": bound.forward}


def paired(times: dict, num: str, den: str) -> dict:
    ratios = [a / b for a, b in zip(times[num], times[den])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/growth-<time>.json)")
    args = parser.parse_args()
    if args.rounds < 7:
        parser.error("--rounds must be at least 7 for a recorded run")
    env = harness.environment()
    harness.print_environment(env)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    flops = WORKLOADS["C"].forward_flops / WORKLOADS["A"].forward_flops
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with harness.threads(threads):
            for dt in args.dtypes.split(","):
                dtype = np.dtype(dt)
                cands = {**candidates("A", dtype), **candidates("C", dtype)}
                times = harness.interleaved_times(cands, rounds=args.rounds, warmup=1, seed=args.seed)
                layer, gemm = paired(times, "layer_C", "layer_A"), paired(times, "gemm_C", "gemm_A")
                over = [a / b for a, b in zip(layer["ratios"], gemm["ratios"])]
                row = {
                    "threads": threads, "dtype": dt, "flops_C_over_A": flops,
                    "layer_C_over_A": layer, "gemm_C_over_A": gemm,
                    "layer_growth_over_bound_growth": {"median": statistics.median(over), "min": min(over), "max": max(over)},
                    "median_seconds": {k: statistics.median(v) for k, v in times.items()},
                }
                rows.append(row)
                print(f"{threads}t {dt:<7} layer C/A {layer['median']:.2f}x [{layer['min']:.2f},{layer['max']:.2f}]  "
                      f"bound C/A {gemm['median']:.2f}x [{gemm['min']:.2f},{gemm['max']:.2f}]  "
                      f"layer over bound {row['layer_growth_over_bound_growth']['median']:.2f}  ({flops:.0f}x the FLOPs)", flush=True)
    doc = harness.run_record("growth A -> C (8x the FLOPs), A and C interleaved in the same rounds", "growth.py", started, env,
                             rounds=args.rounds, rows=rows)
    print(f"wrote {harness.write_results(doc, 'growth', args.out)}")


if __name__ == "__main__":
    main()

"""The sparse layer on a GPU (CuPy, PyTorch CUDA) against the GPU's own GEMM bound, and HF Mixtral on CUDA.

The GPU half of ``sparse_layer.py``: the same workloads (A, B, C; float32 and float64; the
``mixtral`` preset), the same side-by-side method (``harness.interleaved_times``: candidates
interleaved in shuffled rounds, ratios per round, median and range), on one device. Every candidate
ends with a device synchronisation, so a time is the work's, not its launch's.

Per library (``--libraries cupy,torch``; the ones missing here are skipped and named in the results):

* ``gemm_fwd``: the expert matmuls alone (each expert's exact token count from the layer's routing,
  operands gathered beforehand, outputs preallocated), $6\\,TkdI$ FLOPs;
* ``gemm_fwd_bwd``: the same plus the backward matmuls, $18\\,TkdI$;
* ``layer``: ``sparse_moe_layer`` on the library's arrays; ``dispatch``: ``dispatch_combine`` on its
  routes (both against ``gemm_fwd``);
* ``layer_value_and_vjp``: ``sparse_moe_layer_value_and_vjp`` (against ``gemm_fwd_bwd``);
* with torch, ``hf_mixtral``: transformers' ``MixtralSparseMoeBlock`` (eager expert loop,
  ``torch.no_grad()``) on the same device, and ``layer_over_hf``, moeref's torch layer over it.

The layer's output on the device is compared with the NumPy layer's (relative max difference,
recorded) before anything is timed. Run on a CUDA machine (``benchmarks/gpu_check.sh`` runs it with the
CuPy and CUDA test suites in one command):

    python benchmarks/gpu_layer.py

``--quick`` uses small sizes; ``--libraries numpy`` or ``--libraries torch --device cpu`` run the
same script on the CPU (a smoke test of the script itself, not a GPU measurement).
"""

from __future__ import annotations

import harness  # noqa: F401  (first: re-executes without the OpenBLAS tuning variables)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
from sparse_layer import QUICK, WORKLOADS, GemmBound, Workload, make_inputs  # noqa: E402

from moeref.dispatch import dispatch_combine  # noqa: E402
from moeref.expert_ffn import ExpertFFNParams  # noqa: E402
from moeref.presets import mixtral  # noqa: E402
from moeref.router import RouterParams  # noqa: E402
from moeref.sparse_moe import SparseMoEParams, sparse_moe_layer, sparse_moe_layer_value_and_vjp  # noqa: E402

REFERENCE = {"layer": "gemm_fwd", "dispatch": "gemm_fwd", "layer_value_and_vjp": "gemm_fwd_bwd", "layer_over_hf": "hf_mixtral"}


class Library:
    """One array library on one device: conversion, synchronisation, ``matmul(..., out=)``."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        if name == "cupy":
            import cupy

            self.mod = cupy
            self.put = cupy.asarray
            self.get = cupy.asnumpy
            self.sync = cupy.cuda.Device().synchronize
            self.matmul = cupy.matmul
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            self.device_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        elif name == "torch":
            import torch

            self.mod = torch
            self.put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
            self.get = lambda a: a.detach().cpu().numpy()
            cuda = device.startswith("cuda")
            self.sync = torch.cuda.synchronize if cuda else (lambda: None)
            self.matmul = torch.matmul
            self.device_name = torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu"
        elif name == "numpy":
            self.mod = np
            self.put = np.ascontiguousarray
            self.get = np.asarray
            self.sync = lambda: None
            self.matmul = np.matmul
            self.device_name = "cpu"
        else:
            raise ValueError(f"--libraries: unknown library {name!r} (cupy, torch, numpy)")

    def synced(self, f: Callable[[], Any]) -> Callable[[], Any]:
        """``f`` followed by a device synchronisation."""

        def run():
            out = f()
            self.sync()
            return out

        return run


def available(name: str, device: str) -> str | None:
    """None when ``name`` can run on ``device`` here, else the reason it cannot."""
    if name in ("cupy", "torch") and importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    if name == "cupy":
        import cupy

        try:
            if not cupy.cuda.is_available():
                return "no CUDA device"
        except Exception as e:  # a broken CUDA install
            return f"CUDA unusable: {e}"
    if name == "torch" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    return None


def hf_candidate(lib: Library, w: Workload, params: SparseMoEParams, x: Any) -> tuple[Callable[[], Any] | None, str | None]:
    """HF's ``MixtralSparseMoeBlock`` on ``lib``'s device with the same weights (torch only), or
    ``(None, why not)``."""
    if lib.name != "torch":
        return None, "HF Mixtral runs on torch only"
    try:
        import torch
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=w.d, intermediate_size=w.I, num_local_experts=w.E, num_experts_per_tok=w.k,
                               experts_implementation="eager")
        block = MixtralSparseMoeBlock(config).to(dtype=x.dtype, device=x.device).eval()
        with torch.no_grad():
            block.gate.weight.copy_(lib.put(params.router.weight.T))
            block.experts.gate_up_proj.copy_(lib.put(np.swapaxes(params.experts.w_in, 1, 2)))
            block.experts.down_proj.copy_(lib.put(np.swapaxes(params.experts.w_out, 1, 2)))
    except Exception as e:  # transformers missing, or a release whose Mixtral block differs
        return None, f"{type(e).__name__}: {e}"

    def hf():
        with torch.no_grad():
            return block(x[None])

    return lib.synced(hf), None


def run_cell(lib: Library, w: Workload, dtype: Any, rounds: int, seed: int) -> dict:
    x_np, params_np, ct_np = make_inputs(w, dtype)
    options = mixtral(k=w.k)
    reference = sparse_moe_layer(x_np, params_np, options)
    routes_np = reference.routes
    counts = np.bincount(routes_np.expert_index[routes_np.kept], minlength=w.E)
    x, ct = lib.put(x_np), lib.put(ct_np)
    params = SparseMoEParams(
        RouterParams(lib.put(params_np.router.weight)), ExpertFFNParams(lib.put(params_np.experts.w_in), lib.put(params_np.experts.w_out))
    )
    out = sparse_moe_layer(x, params, options)
    routes = out.routes
    scale = float(np.max(np.abs(reference.y)))
    cell: dict = {
        "library": lib.name, "device": lib.device_name,
        "workload": w._asdict(), "dtype": np.dtype(dtype).name, "forward_flops": w.forward_flops,
        "layer_max_abs_diff_to_numpy_layer": float(np.max(np.abs(lib.get(out.y) - reference.y))) / scale,
        "routes_equal_numpy": bool(np.array_equal(lib.get(routes.expert_index), routes_np.expert_index)),
    }
    bound = GemmBound(w, counts, params_np, dtype, put=lib.put, matmul=lib.matmul, sync=lib.sync)
    grad = lambda: sparse_moe_layer_value_and_vjp(x, params, options, ct)  # noqa: E731
    cands = {
        "gemm_fwd": bound.forward, "gemm_fwd_bwd": bound.forward_backward,
        "layer": lib.synced(lambda: sparse_moe_layer(x, params, options)),
        "dispatch": lib.synced(lambda: dispatch_combine(x, routes, params.experts, options.ffn)),
        "layer_value_and_vjp": lib.synced(grad),
    }
    hf, why_not = hf_candidate(lib, w, params_np, x)
    if hf is not None:
        import torch

        def layer_no_grad():
            with torch.no_grad():
                return sparse_moe_layer(x, params, options).y

        cands["layer_over_hf"] = lib.synced(layer_no_grad)
        cands["hf_mixtral"] = hf
        cell["hf_max_abs_diff_to_numpy_layer"] = float(np.max(np.abs(lib.get(hf()[0]) - reference.y))) / scale
    else:
        cell["hf_mixtral_skipped"] = why_not
    times = harness.interleaved_times(cands, rounds=rounds, warmup=1, seed=seed)
    summary = harness.summarize_against(times, REFERENCE)
    cell["candidates"] = summary
    cell["gemm_fwd_gflops"] = w.forward_flops / summary["gemm_fwd"]["median_seconds"] / 1e9
    return cell


def print_cell(cell: dict) -> None:
    w, c = cell["workload"], cell["candidates"]
    parts = [f"{k}={v['ratio']:.3f} [{v['ratio_min']:.2f},{v['ratio_max']:.2f}]" for k, v in c.items() if "ratio" in v]
    print(
        f"{cell['library']:<5} {w['name']} {cell['dtype']:<7} gemm_fwd {c['gemm_fwd']['median_seconds'] * 1e3:8.2f} ms "
        f"({cell['gemm_fwd_gflops']:.0f} GF/s) | " + " ".join(parts) + f" | max diff to NumPy {cell['layer_max_abs_diff_to_numpy_layer']:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (development)")
    parser.add_argument("--libraries", default="cupy,torch", help="comma-separated: cupy, torch, numpy")
    parser.add_argument("--device", default="cuda", help="torch's device (cuda, cuda:1, cpu)")
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/gpu_layer-<time>.json)")
    args = parser.parse_args()
    if args.rounds < 7 and not args.quick:
        parser.error("--rounds must be at least 7 for a recorded run")
    table = QUICK if args.quick else WORKLOADS
    for name in args.workloads.split(","):
        if name not in table:
            parser.error(f"--workloads: unknown workload {name!r} (A, B, C)")
    env = harness.environment()
    harness.print_environment(env)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    name = "gpu_layer-quick" if args.quick else "gpu_layer"
    path = args.out or harness.RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    cells, skipped = [], {}

    def save() -> None:  # after every cell: a run cut short by a time limit keeps what it measured
        doc = harness.run_record(
            "sparse token-choice layer (mixtral preset) on a GPU vs the GPU's GEMM bound and HF Mixtral", "gpu_layer.py", started,
            {**env, "load_average": env["load_average"]}, quick=args.quick, rounds=args.rounds, skipped=skipped, cells=cells,
        )
        harness.write_results(doc, name, path)

    for lib_name in args.libraries.split(","):
        reason = available(lib_name, args.device)
        if reason is not None:
            skipped[lib_name] = reason
            print(f"# {lib_name}: skipped ({reason})", flush=True)
            continue
        lib = Library(lib_name, args.device)
        for wl in args.workloads.split(","):
            for dt in args.dtypes.split(","):
                cells.append(run_cell(lib, table[wl], np.dtype(dt), args.rounds, args.seed))
                print_cell(cells[-1])
                save()
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

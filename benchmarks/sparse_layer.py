"""The sparse token-choice layer against the matmul limit, against HF Mixtral, and its memory.

Workloads (SwiGLU experts, softmax over all experts, top-k, renormalised: ``moeref.presets.mixtral``):

    A: T=4096,  d=512,  I=1024, E=8,  k=2
    B: T=4096,  d=512,  I=256,  E=64, k=8
    C: T=16384, d=1024, I=512,  E=32, k=4

in float32 and float64, with the BLAS (and torch) thread pools limited to 2 and to 1 thread. For each
(threads, workload, dtype) the candidates below run interleaved in shuffled rounds (``harness``):

* ``gemm_fwd``: the GEMM bound of the forward: only the unavoidable expert matmuls, for each expert
  its exact token count (from the layer's own routing), operands gathered beforehand into contiguous
  arrays, outputs preallocated (``out=``): ``x_e @ w_in_e`` and ``z_e @ w_out_e``, 6 T k d I FLOPs.
* ``swiglu_floor``: ``gemm_fwd`` plus SwiGLU's elementwise work done NumPy's cheapest way (in place,
  into preallocated buffers, 5 passes): the floor of any NumPy implementation of these experts before
  it gathers or combines a token; ratio to ``gemm_fwd``. NumPy runs elementwise work on one core, so
  at 2 threads this floor shows how much of the gap to the bound is out of reach without threads.
* ``tuned_dispatch``: a hand-tuned NumPy sorted dispatch (``benchmarks/tuned_numpy.py``: moeref's
  algorithm with every buffer allocated once and reused by every call, ``out=`` everywhere, no checks),
  the reference point the issue's forward target was set from; ratio to ``gemm_fwd``. Its output must
  equal ``dispatch_combine``'s bit for bit (recorded). ``dispatch_over_tuned``: ``dispatch`` over it,
  per round: what the portable array-API form costs against the best NumPy can do here.
* ``gemm_fwd_bwd``: the same plus the backward matmuls (``dz = dy w_out^T``, ``dw_out = z^T dy``,
  ``dw_in = x^T dh``, ``dx = dh w_in^T``): 18 T k d I FLOPs.
* ``layer``: ``sparse_moe_layer`` on NumPy (router, capacity, dispatch, combine, auxiliary losses),
  ratio to ``gemm_fwd``.
* ``dispatch``: ``dispatch_combine`` alone on the layer's routes, ratio to ``gemm_fwd``.
* ``layer_vjp``: ``sparse_moe_layer_vjp`` (it recomputes the forward; the cotangents of ``x`` and of
  every parameter), ratio to ``gemm_fwd_bwd``.
* ``dispatch_vjp``: ``dispatch_combine_vjp`` alone, ratio to ``gemm_fwd_bwd``.
* ``layer_value_and_vjp``: ``sparse_moe_layer_value_and_vjp``, the layer's output and its VJP in one
  call (what a training step needs: forward and backward), ratio to ``gemm_fwd_bwd``.
* ``hf_mixtral``: transformers' ``MixtralSparseMoeBlock`` (eager expert loop, ``torch.no_grad()``) and
  ``layer_torch``: ``sparse_moe_layer`` on torch CPU tensors, same weights, same threads; ratio
  ``layer_torch / hf_mixtral``.
* with ``--expert-threads``, at more than one thread: ``layer_threads``, ``dispatch_threads``,
  ``layer_vjp_threads``, ``dispatch_vjp_threads``, ``layer_value_and_vjp_threads``: the same calls inside
  ``moeref.backends.threads.expert_threads(threads)`` (the experts on that many Python threads, one
  BLAS thread each), against the same references.

Memory: the peak of NumPy allocations (tracemalloc) during one ``layer`` / ``dispatch`` call above the
level before it, output included, in units of the routed activations T k d (times the item size);
three calls, their spread reported. Growth: median time of C over A (8x the FLOPs), and that over the
GEMM bound's own C/A (the cells run one after the other, so load changes between them move the first
number, less the second).

Run (the OpenBLAS tuning variables are removed for this command only):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/sparse_layer.py

``--quick`` uses small sizes for development. Writes ``benchmarks/results/sparse_layer-<time>.json`` and
``sparse_layer-latest.json`` (``docs/scripts/benchmark_figure.py`` draws the figure from it).
"""

from __future__ import annotations

import harness  # noqa: F401  (first: re-executes without the OpenBLAS tuning variables)

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
from tuned_numpy import TunedNumPyDispatch, swiglu_into  # noqa: E402

from moeref.dispatch import dispatch_combine, dispatch_combine_vjp  # noqa: E402
from moeref.expert_ffn import ExpertFFNParams  # noqa: E402
from moeref.presets import mixtral  # noqa: E402
from moeref.router import RouterParams  # noqa: E402
from moeref.sparse_moe import SparseMoEParams, sparse_moe_layer, sparse_moe_layer_value_and_vjp, sparse_moe_layer_vjp  # noqa: E402


class Workload(NamedTuple):
    name: str
    T: int
    d: int
    I: int
    E: int
    k: int

    @property
    def forward_flops(self) -> int:
        return 6 * self.T * self.k * self.d * self.I


WORKLOADS = {
    "A": Workload("A", 4096, 512, 1024, 8, 2),
    "B": Workload("B", 4096, 512, 256, 64, 8),
    "C": Workload("C", 16384, 1024, 512, 32, 4),
}
QUICK = {
    "A": Workload("A", 512, 128, 256, 8, 2),
    "B": Workload("B", 512, 128, 64, 64, 8),
    "C": Workload("C", 2048, 256, 128, 32, 4),
}
REFERENCE = {
    "layer": "gemm_fwd", "dispatch": "gemm_fwd", "swiglu_floor": "gemm_fwd", "tuned_dispatch": "gemm_fwd", "layer_vjp": "gemm_fwd_bwd", "dispatch_vjp": "gemm_fwd_bwd",
    "layer_value_and_vjp": "gemm_fwd_bwd", "layer_value_and_vjp_threads": "gemm_fwd_bwd",
    "layer_torch": "hf_mixtral",
    # --expert-threads: the same calls inside moeref.backends.threads.expert_threads(threads)
    "layer_threads": "gemm_fwd", "dispatch_threads": "gemm_fwd", "layer_vjp_threads": "gemm_fwd_bwd", "dispatch_vjp_threads": "gemm_fwd_bwd",
}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(w: Workload, dtype: Any, seed: int = 0) -> tuple[Any, SparseMoEParams, Any]:
    """Tokens, Mixtral-layout parameters (w_in (E, d, 2I) gate first, w_out (E, I, d)) and an output cotangent."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((w.T, w.d)).astype(dtype)
    router = RouterParams(weight=(rng.standard_normal((w.d, w.E)) / np.sqrt(w.d)).astype(dtype))
    experts = ExpertFFNParams(
        w_in=(rng.standard_normal((w.E, w.d, 2 * w.I)) / np.sqrt(w.d)).astype(dtype),
        w_out=(rng.standard_normal((w.E, w.I, w.d)) / np.sqrt(w.I)).astype(dtype),
    )
    cotangent = rng.standard_normal((w.T, w.d)).astype(dtype)
    return x, SparseMoEParams(router, experts), cotangent


class GemmBound:
    """Only the expert matmuls, on operands gathered beforehand, into preallocated outputs.

    NumPy by default; ``put`` (host array -> device array), ``matmul`` (with ``out=``) and ``sync``
    run the same matmuls on another library's device (``gpu_layer.py``). ``swiglu_floor`` is
    NumPy's alone.
    """

    def __init__(self, w: Workload, counts: np.ndarray, params: SparseMoEParams, dtype: Any, seed: int = 1, *,
                 put: Callable[[np.ndarray], Any] = np.ascontiguousarray, matmul: Callable[..., Any] = np.matmul,
                 sync: Callable[[], None] = lambda: None):
        rng = np.random.default_rng(seed)
        self.matmul, self.sync = matmul, sync
        w_in = [np.ascontiguousarray(params.experts.w_in[e]) for e in range(w.E)]  # (d, 2I)
        w_out = [np.ascontiguousarray(params.experts.w_out[e]) for e in range(w.E)]  # (I, d)
        self.w_in, self.w_out = [put(a) for a in w_in], [put(a) for a in w_out]
        self.w_in_t = [put(np.ascontiguousarray(a.T)) for a in w_in]  # (2I, d)
        self.w_out_t = [put(np.ascontiguousarray(a.T)) for a in w_out]  # (d, I)
        n = [int(c) for c in counts]
        self.x = [put(rng.standard_normal((c, w.d)).astype(dtype)) for c in n]  # gathered tokens
        self.z = [put(rng.standard_normal((c, w.I)).astype(dtype)) for c in n]  # SwiGLU output
        self.h = [put(np.empty((c, 2 * w.I), dtype)) for c in n]  # x w_in, then reused as dh
        self.y = [put(np.empty((c, w.d), dtype)) for c in n]  # z w_out, then reused as dy
        self.dw_in = [put(np.empty((w.d, 2 * w.I), dtype)) for _ in n]
        self.dw_out = [put(np.empty((w.I, w.d), dtype)) for _ in n]
        self.dz = [put(np.empty((c, w.I), dtype)) for c in n]
        self.dx = [put(np.empty((c, w.d), dtype)) for c in n]
        self.t = [np.empty((c, w.I), dtype) for c in n]  # SwiGLU workspace (swiglu_floor, NumPy only)
        self.active = [e for e in range(w.E) if n[e] > 0]

    def _forward(self) -> None:
        for e in self.active:
            self.matmul(self.x[e], self.w_in[e], out=self.h[e])
            self.matmul(self.z[e], self.w_out[e], out=self.y[e])

    def forward(self) -> None:
        self._forward()
        self.sync()

    def swiglu_floor(self) -> None:
        """The bound plus SwiGLU's elementwise work in NumPy's fewest passes (in place, into
        preallocated buffers: ``t = 1 + exp(-g)``, ``z = (g / t) u``): what any NumPy implementation of
        this FFN costs before it gathers or combines a single token."""
        for e in self.active:
            np.matmul(self.x[e], self.w_in[e], out=self.h[e])
            swiglu_into(self.h[e], self.t[e], self.z[e])
            np.matmul(self.z[e], self.w_out[e], out=self.y[e])

    def forward_backward(self) -> None:
        self._forward()
        mm = self.matmul
        for e in self.active:
            mm(self.y[e], self.w_out_t[e], out=self.dz[e])  # dz = dy w_out^T
            mm(self.z[e].T, self.y[e], out=self.dw_out[e])  # dw_out = z^T dy
            mm(self.x[e].T, self.h[e], out=self.dw_in[e])  # dw_in = x^T dh
            mm(self.h[e], self.w_in_t[e], out=self.dx[e])  # dx = dh w_in^T
        self.sync()


# --------------------------------------------------------------------------------------------
# Torch: HF Mixtral block and moeref on torch tensors
# --------------------------------------------------------------------------------------------


def torch_candidates(w: Workload, x: np.ndarray, params: SparseMoEParams, options: Any, reference_y: np.ndarray) -> tuple[dict, dict]:
    """``hf_mixtral`` and ``layer_torch`` callables, and their agreement with the NumPy layer."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    tdtype = torch.float64 if x.dtype == np.float64 else torch.float32
    config = MixtralConfig(
        hidden_size=w.d, intermediate_size=w.I, num_local_experts=w.E, num_experts_per_tok=w.k, experts_implementation="eager"
    )
    block = MixtralSparseMoeBlock(config).to(tdtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(params.router.weight.T.copy()))
        block.experts.gate_up_proj.copy_(torch.from_numpy(np.swapaxes(params.experts.w_in, 1, 2).copy()))
        block.experts.down_proj.copy_(torch.from_numpy(np.swapaxes(params.experts.w_out, 1, 2).copy()))
    tx = torch.from_numpy(x)
    tparams = SparseMoEParams(
        RouterParams(torch.from_numpy(params.router.weight)),
        ExpertFFNParams(torch.from_numpy(params.experts.w_in), torch.from_numpy(params.experts.w_out)),
    )

    def hf():
        with torch.no_grad():
            return block(tx[None])

    def ours():
        with torch.no_grad():
            return sparse_moe_layer(tx, tparams, options).y

    scale = float(np.max(np.abs(reference_y)))
    info = {
        "experts_implementation": getattr(config, "_experts_implementation", None),
        "hf_max_abs_diff_to_numpy_layer": float(np.max(np.abs(hf()[0].numpy() - reference_y))) / scale,
        "torch_layer_max_abs_diff_to_numpy_layer": float(np.max(np.abs(ours().numpy() - reference_y))) / scale,
        "torch": torch.__version__,
    }
    return {"hf_mixtral": hf, "layer_torch": ours}, info


# --------------------------------------------------------------------------------------------
# One (threads, workload, dtype) cell
# --------------------------------------------------------------------------------------------


def in_expert_threads(f: Any, workers: int) -> Any:
    """``f`` run inside ``expert_threads(workers)`` (the experts on ``workers`` threads, one BLAS thread each)."""
    from moeref.backends.threads import expert_threads

    def run():
        with expert_threads(workers):
            return f()

    return run


def run_cell(w: Workload, dtype: Any, args: argparse.Namespace, threads: int = 1) -> dict:
    x, params, cotangent = make_inputs(w, dtype)
    options = mixtral(k=w.k)
    out = sparse_moe_layer(x, params, options)
    routes = out.routes
    counts = np.bincount(routes.expert_index[routes.kept], minlength=w.E)
    bound = GemmBound(w, counts, params, dtype)
    ffn = options.ffn
    y_dispatch = dispatch_combine(x, routes, params.experts, ffn)
    cell: dict = {
        "workload": w._asdict(),
        "dtype": np.dtype(dtype).name,
        "forward_flops": w.forward_flops,
        "tokens_per_expert": {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean())},
        "dispatch_equals_layer": bool(np.array_equal(y_dispatch, out.y)),
    }
    cands = {"gemm_fwd": bound.forward, "swiglu_floor": bound.swiglu_floor, "layer": lambda: sparse_moe_layer(x, params, options), "dispatch": lambda: dispatch_combine(x, routes, params.experts, ffn)}
    if not args.no_tuned:
        tuned = TunedNumPyDispatch(x, routes, params.experts)
        cell["tuned_equals_dispatch"] = bool(np.array_equal(tuned(), y_dispatch))
        cands["tuned_dispatch"] = tuned
    if not args.no_vjp:
        cands.update(
            gemm_fwd_bwd=bound.forward_backward,
            layer_vjp=lambda: sparse_moe_layer_vjp(x, params, options, cotangent),
            dispatch_vjp=lambda: dispatch_combine_vjp(x, routes, params.experts, ffn, cotangent),
            layer_value_and_vjp=lambda: sparse_moe_layer_value_and_vjp(x, params, options, cotangent),
        )
    if args.expert_threads and threads > 1:
        for name in [n for n in ("layer", "dispatch", "layer_vjp", "dispatch_vjp", "layer_value_and_vjp") if n in cands]:
            cands[name + "_threads"] = in_expert_threads(cands[name], threads)
    if not args.no_torch:
        tc, info = torch_candidates(w, x, params, options, out.y)
        cands.update(tc)
        cell["torch_check"] = info
    times = harness.interleaved_times(cands, rounds=args.rounds, warmup=1, seed=args.seed)
    summary = harness.summarize_against(times, REFERENCE)
    cell["candidates"] = summary
    if "tuned_dispatch" in times:
        over = harness.summarize({"dispatch": times["dispatch"], "tuned_dispatch": times["tuned_dispatch"]}, "tuned_dispatch")["dispatch"]
        cell["dispatch_over_tuned"] = {"ratio": over["ratio_to_tuned_dispatch"], "ratio_min": over["ratio_min"], "ratio_max": over["ratio_max"]}
    gf = summary["gemm_fwd"]["median_seconds"]
    cell["gemm_fwd_gflops"] = w.forward_flops / gf / 1e9
    if not args.no_memory:
        unit = w.T * w.k * w.d * np.dtype(dtype).itemsize
        mem = {}
        for name, f in (("layer", cands["layer"]), ("dispatch", cands["dispatch"])):
            peaks = harness.transient_peak_bytes(f, repeats=3)
            mem[name] = {
                "peak_bytes": peaks,
                "peak_over_Tkd": [p / unit for p in peaks],
                "spread": (max(peaks) - min(peaks)) / max(1, min(peaks)),
            }
        mem["Tkd_bytes"] = unit
        cell["memory"] = mem
    return cell


def print_cell(threads: int, cell: dict) -> None:
    w, c = cell["workload"], cell["candidates"]
    parts = [f"{k}={v['ratio']:.3f} [{v['ratio_min']:.2f},{v['ratio_max']:.2f}] f{v['ratio_of_fastest']:.3f}" for k, v in c.items() if "ratio" in v]
    if "dispatch_over_tuned" in cell:
        parts.append(f"dispatch/tuned={cell['dispatch_over_tuned']['ratio']:.3f}")
    if cell.get("tuned_equals_dispatch") is False:
        parts.append("WARNING: tuned_dispatch differs from dispatch_combine")
    mem = cell.get("memory")
    if mem:
        parts.append(f"mem layer={max(mem['layer']['peak_over_Tkd']):.2f}Tkd dispatch={max(mem['dispatch']['peak_over_Tkd']):.2f}Tkd")
    print(
        f"{threads}t {w['name']} {cell['dtype']:<7} gemm_fwd {c['gemm_fwd']['median_seconds'] * 1e3:8.1f} ms "
        f"({cell['gemm_fwd_gflops']:.0f} GF/s) | " + " ".join(parts),
        flush=True,
    )


def growth(cells: list[dict]) -> list[dict]:
    """Median time of workload C over workload A per (threads, dtype, candidate)."""
    out = []
    index = {(c["threads"], c["workload"]["name"], c["dtype"]): c for c in cells}
    for (t, name, dt), c in index.items():
        a = index.get((t, "A", dt))
        if name != "C" or a is None:
            continue
        bound = c["candidates"]["gemm_fwd"]["median_seconds"] / a["candidates"]["gemm_fwd"]["median_seconds"]
        for cand, v in c["candidates"].items():
            g = v["median_seconds"] / a["candidates"][cand]["median_seconds"]
            out.append({"threads": t, "dtype": dt, "candidate": cand, "time_C_over_A": g, "over_gemm_bound_growth": g / bound,
                        "flops_C_over_A": c["forward_flops"] / a["forward_flops"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (development)")
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the HF Mixtral / torch candidates")
    parser.add_argument("--no-vjp", action="store_true", help="skip the VJP candidates")
    parser.add_argument("--no-tuned", action="store_true", help="skip the hand-tuned NumPy dispatch")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peaks")
    parser.add_argument("--expert-threads", action="store_true",
                        help="also time layer / dispatch (and VJPs) with the experts on as many threads as the run's BLAS had (moeref.backends.threads)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/sparse_layer-<time>.json)")
    args = parser.parse_args()
    if args.rounds < 7 and not args.quick:
        parser.error("--rounds must be at least 7 for a recorded run")
    table = QUICK if args.quick else WORKLOADS
    env = harness.environment()
    harness.print_environment(env)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cells = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with harness.threads(threads):
            for name in args.workloads.split(","):
                for dt in args.dtypes.split(","):
                    cell = run_cell(table[name], np.dtype(dt), args, threads)
                    cell["threads"] = threads
                    cells.append(cell)
                    print_cell(threads, cell)
    doc = harness.run_record(
        "sparse token-choice layer (mixtral preset) vs GEMM bound, HF Mixtral block, memory", "sparse_layer.py", started,
        {**harness.environment(), "load_average": env["load_average"]}, quick=args.quick, rounds=args.rounds, cells=cells, growth=growth(cells),
    )
    name = "sparse_layer-quick" if args.quick else "sparse_layer"
    path = harness.write_results(doc, name, args.out)
    for g in doc["growth"]:
        if g["candidate"] in ("gemm_fwd", "layer", "dispatch"):
            print(f"growth {g['threads']}t {g['dtype']} {g['candidate']}: C/A = {g['time_C_over_A']:.2f}x for {g['flops_C_over_A']:.0f}x FLOPs "
                  f"({g['over_gemm_bound_growth']:.2f}x the bound's growth)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

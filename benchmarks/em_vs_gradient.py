"""EM versus plain gradient ascent on the same classical MoE log-likelihood.

Claim under test: "EM can converge faster than gradient ascent" (Jordan & Jacobs 1994, Section 6;
Xu & Jordan 1996). Model: K = 2 experts, a softmax gate (baseline parametrisation) and linear-Gaussian
experts with one variance each, on two bundled data sets (``npreg``: flexmix's artificial data, ``yn``
on ``x``; ``tone``: the tone-perception data, ``tuned`` on ``stretchratio``), from one fixed starting
point per data set.

* EM: ``moeref.moe_em.fit_moe`` (Newton to convergence in the gate M-step), absolute rule, tol 1e-10.
* Gradient ascent: ``moeref.moe_em.fit_moe_gradient`` on the mean log-likelihood, in the families'
  unconstrained view (gate: the K-1 free columns; experts: log-variances), for each learning rate of
  a grid, stopped when the log-likelihood is within 1e-6 of EM's final value or after a budget of
  steps. The "tuned" learning rate is the grid value that reaches the target in the fewest steps (or,
  if none does, gets closest within the budget).

Run (OpenBLAS tuning variables are removed for this process, see below):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/em_vs_gradient.py

Writes ``benchmarks/results/em_vs_gradient.json``; ``docs/scripts/em_vs_gradient_figure.py`` draws
the figure from it. Wall times are ``time.perf_counter`` around each fit, on whatever machine runs it
(the JSON records the BLAS thread pools via threadpoolctl when it is installed, and the load average).
"""

from __future__ import annotations

import os
import sys

# OpenBLAS reads these when it is loaded: drop them for this process before NumPy is imported.
_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _BLAS_VARS) and os.environ.get("_MOEREF_BENCH_REEXEC") != "1":
    _env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARS}
    _env["_MOEREF_BENCH_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], _env)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from moeref.datasets import load_dataset  # noqa: E402
from moeref.em import EMOptions  # noqa: E402
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams  # noqa: E402
from moeref.moe_em import MoEParams, fit_moe, fit_moe_gradient  # noqa: E402
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "em_vs_gradient.json"
GAP = 1e-6


@dataclass(frozen=True)
class LogVarianceExperts(LinearGaussianExperts):
    """Isotropic linear-Gaussian experts with an unconstrained view: the log-variances."""

    def unconstrained(self, p):
        return p._replace(cov=np.log(p.cov))

    def constrained(self, u):
        return u._replace(cov=np.exp(u.cov))

    def constrained_vjp(self, u, bar):
        return bar._replace(cov=bar.cov * np.exp(u.cov))


def problems():
    """(name, x (N, 1), y (N, 1), init, learning-rate grid, step budget)."""
    npreg = load_dataset("npreg")
    tone = load_dataset("tone")
    gate0 = SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2))
    return [
        (
            "npreg",
            np.asarray(npreg["x"], dtype=float)[:, None],
            np.asarray(npreg["yn"], dtype=float)[:, None],
            # slopes 4 and 2, intercepts 0 and 20, variances 10
            MoEParams(gate0, LinearGaussianExpertsParams(np.array([[[4.0]], [[2.0]]]), np.array([[0.0], [20.0]]), np.array([10.0, 10.0]))),
            (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
            10000,
        ),
        (
            "tone",
            np.asarray(tone["stretchratio"], dtype=float)[:, None],
            np.asarray(tone["tuned"], dtype=float)[:, None],
            # the two regimes of the tone data: tuned = stretchratio, and tuned = 2
            MoEParams(gate0, LinearGaussianExpertsParams(np.array([[[1.0]], [[0.0]]]), np.array([[0.0], [2.0]]), np.array([0.1, 0.1]))),
            (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
            20000,
        ),
    ]


def first_within(trace, target):
    for t, v in enumerate(trace):
        if v >= target:
            return t
    return None


def subsample(trace, n=300):
    """(iterations, values) at about n log-spaced iterations (all of them for short traces)."""
    T = len(trace)
    if T <= n:
        idx = np.arange(T)
    else:
        idx = np.unique(np.r_[0, np.round(np.geomspace(1, T - 1, n)).astype(int), T - 1])
    return idx.tolist(), [float(trace[i]) for i in idx]


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return [{k: v for k, v in d.items() if k in ("user_api", "internal_api", "num_threads", "version", "architecture")} for d in threadpool_info()]


def run(budget_scale: float = 1.0) -> dict:
    gate, experts = SoftmaxGate(), LogVarianceExperts(covariance="isotropic")
    results = {}
    for name, x, y, init, grid, budget in problems():
        budget = max(1, int(budget * budget_scale))
        t0 = time.perf_counter()
        em = fit_moe(x, y, gate, experts, init, options=EMOptions(criterion="absolute", tol=1e-10, max_iter=5000))
        em_seconds = time.perf_counter() - t0
        target = em.loglik - GAP
        em_hit = first_within(em.loglik_trace, target)
        print(f"[{name}] EM: {em.n_iter} iterations, L = {em.loglik:.6f}, within {GAP:g} after {em_hit} ({em_seconds:.2f} s)")
        runs = []
        for lr in grid:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                try:
                    ga = fit_moe_gradient(
                        x, y, gate, experts, init, learning_rate=lr,
                        options=EMOptions(criterion="absolute", tol=0.0, max_iter=budget, warn_not_converged=False),
                        target=target,
                    )
                except Exception as err:  # a learning rate that diverges
                    runs.append({"learning_rate": lr, "error": f"{type(err).__name__}: {err}"})
                    print(f"[{name}] GA lr={lr:g}: {type(err).__name__}")
                    continue
            reached = ga.converged
            best = max(ga.loglik_trace)
            runs.append({
                "learning_rate": lr,
                "reached_target": reached,
                "steps": ga.n_iter,
                "final_loglik": ga.loglik,
                "best_loglik": best,
                "gap_to_em": em.loglik - best,
                "seconds": ga.seconds,
                "seconds_per_step": ga.seconds / max(ga.n_iter, 1),
                "n_decreases": len(ga.decreases),
                "_trace": ga.loglik_trace,
            })
            print(f"[{name}] GA lr={lr:g}: {'reached' if reached else 'did not reach'} the target, {ga.n_iter} steps, "
                  f"gap {em.loglik - best:.3e}, {ga.seconds:.2f} s, {len(ga.decreases)} decreases")
        ok = [r for r in runs if "error" not in r]
        hit = [r for r in ok if r["reached_target"]]
        tuned = min(hit, key=lambda r: r["steps"]) if hit else min(ok, key=lambda r: r["gap_to_em"])
        trace_it, trace_val = subsample(tuned["_trace"])
        for r in runs:
            r.pop("_trace", None)
        results[name] = {
            "n_samples": int(x.shape[0]),
            "init": {"gate_weight": init.gate.weight.tolist(), "gate_bias": init.gate.bias.tolist(),
                     "expert_slopes": init.experts.weight[:, 0, 0].tolist(), "expert_intercepts": init.experts.bias[:, 0].tolist(),
                     "expert_variances": init.experts.cov.tolist()},
            "em": {
                "iterations": em.n_iter,
                "iterations_to_within_gap": em_hit,
                "final_loglik": em.loglik,
                "seconds": em_seconds,
                "seconds_per_iteration": em_seconds / em.n_iter,
                "converged": em.converged,
                "decreases": list(em.decreases),
                "trace": list(em.loglik_trace),
                "params": {"gate_weight": em.params.gate.weight.tolist(), "gate_bias": em.params.gate.bias.tolist(),
                           "expert_slopes": em.params.experts.weight[:, 0, 0].tolist(),
                           "expert_intercepts": em.params.experts.bias[:, 0].tolist(),
                           "expert_variances": em.params.experts.cov.tolist()},
            },
            "gradient_ascent": {
                "budget_steps": budget,
                "grid": runs,
                "tuned_learning_rate": tuned["learning_rate"],
                "tuned": {k: v for k, v in tuned.items()},
                "tuned_trace_iterations": trace_it,
                "tuned_trace_values": trace_val,
            },
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply the gradient-ascent step budgets (smoke runs)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results = run(args.budget_scale)
    doc = {
        "benchmark": "EM vs plain gradient ascent, K=2 softmax-gated linear-Gaussian MoE",
        "command": "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/em_vs_gradient.py",
        "target": f"log-likelihood within {GAP:g} of EM's final value",
        "em_options": "criterion='absolute', tol=1e-10; gate M-step: Newton to convergence (tol 1e-10)",
        "ga_objective": "mean log-likelihood, unconstrained view (gate free columns, log-variances), fixed learning rate",
        "started": started,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "blas": blas_info(),
            "openblas_env_removed": list(_BLAS_VARS),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

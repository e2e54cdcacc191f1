"""One classical EM iteration against the weighted least-squares solves it must do, and its growth in n.

Model: a mixture of K = 8 linear experts on d = 16 inputs (plus an intercept, p = 17 regressors),
n = 100,000 samples drawn from the model itself (well separated components, so that EM is well
posed). Two forms of the model, both from moeref:

* ``regression_mixture``: constant gate (mixing weights), ``moeref.regression_mixture``;
* ``moe``: softmax gate and linear-Gaussian experts, ``moeref.moe_em`` with ``SoftmaxGate`` (Newton to
  convergence in the gate M-step, an exact EM; and ``newton="single_step"``, one Newton step per
  iteration, a generalised EM) and ``LinearGaussianExperts(covariance="isotropic")``.

One EM iteration is what ``moeref.em.run_em`` does per step: responsibilities ``exp(log tau)``, the
M-step, the E-step. The reference ``wls`` is the work any EM iteration of this model must do: the K
weighted least-squares solves ``(X^T W_k X) b_k = X^T W_k y`` (NumPy: ``X * tau_k`` then two BLAS
products and ``numpy.linalg.solve`` per component). Candidates run interleaved in shuffled rounds
(``harness``); the ratios are per round, summarised by their median and range.

Growth: ``fit_regression_mixture`` to convergence (default ``EMOptions``: absolute rule, tol 1e-8) at
three sample sizes from the same kind of starting point, at each thread count; iterations, time and
time per iteration.
A cProfile of one iteration of each form is recorded (top functions by own time).

Run (the OpenBLAS tuning variables are removed for this command only):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/em_iteration.py

Writes ``benchmarks/results/em_iteration-<time>.json`` and ``em_iteration-latest.json``.

``--gate softmax`` measures the softmax-gated form only: the ``wls`` reference, the MoE iteration
(full and single-step Newton), its gate and expert M-steps, and the tracemalloc peak of the gate
M-step (``harness.transient_peak_bytes``); no profile, no growth, and it writes a results file only
when ``--out`` is given.
"""

from __future__ import annotations

import harness  # noqa: F401  (first: re-executes without the OpenBLAS tuning variables)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from moeref.em import EMOptions  # noqa: E402
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams  # noqa: E402
from moeref.moe_em import MoEParams, moe_e_step, moe_m_step  # noqa: E402
from moeref.regression_mixture import (  # noqa: E402
    RegressionMixtureParams,
    fit_regression_mixture,
    regression_mixture_e_step,
    regression_mixture_m_step,
    with_intercept,
)
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams  # noqa: E402

K, D_IN = 8, 16


def make_data(n: int, seed: int = 0) -> dict:
    """Samples of a K-component mixture of linear regressions; the truth and a perturbed start."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D_IN))
    X = with_intercept(x)  # (n, p)
    p = X.shape[1]
    beta = 3.0 * rng.standard_normal((p, K))  # well separated components
    sigma = np.full(K, 0.5)
    weights = np.full(K, 1.0 / K)
    label = rng.integers(0, K, size=n)
    y = np.take_along_axis(X @ beta, label[:, None], axis=1)[:, 0] + sigma[label] * rng.standard_normal(n)
    start = RegressionMixtureParams(beta=beta + 0.3 * rng.standard_normal((p, K)), sigma=np.full(K, 1.0), weights=weights)
    return {"x": x, "X": X, "y": y, "truth": RegressionMixtureParams(beta, sigma, weights), "start": start}


def wls_solves(X: np.ndarray, y: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """The K weighted least-squares solves of one M-step: ``(X^T W_k X) b_k = X^T W_k y``."""
    out = np.empty((X.shape[1], tau.shape[1]))
    for k in range(tau.shape[1]):
        xw = X * tau[:, k : k + 1]  # (n, p)
        out[:, k] = np.linalg.solve(xw.T @ X, xw.T @ y)
    return out


def regression_mixture_candidates(data: dict) -> dict:
    X, y = data["X"], data["y"]
    e = regression_mixture_e_step(X, y, data["start"])
    tau = np.exp(e.log_responsibilities)

    def iteration():
        params = regression_mixture_m_step(X, y, np.exp(e.log_responsibilities))
        return regression_mixture_e_step(X, y, params)

    return {
        "wls": lambda: wls_solves(X, y, tau),
        "regression_mixture_iteration": iteration,
        "regression_mixture_m_step": lambda: regression_mixture_m_step(X, y, tau),
        "regression_mixture_e_step": lambda: regression_mixture_e_step(X, y, data["start"]),
    }


def moe_candidates(data: dict) -> dict:
    x, y = data["x"], data["y"][:, None]
    gate, experts = SoftmaxGate(), LinearGaussianExperts(covariance="isotropic")
    start = data["start"]
    params = MoEParams(
        SoftmaxGateParams(np.zeros((D_IN, K)), np.zeros(K)),
        LinearGaussianExpertsParams(start.beta[1:].T[:, :, None].copy(), start.beta[:1].T.copy(), start.sigma**2),
    )
    e = moe_e_step(x, y, gate, experts, params)
    tau = np.exp(e.log_responsibilities)

    def iteration(g=gate):
        new = moe_m_step(x, y, g, experts, params, np.exp(e.log_responsibilities))
        return moe_e_step(x, y, g, experts, new)

    single = SoftmaxGate(newton="single_step")
    return {
        "moe_iteration": iteration,
        "moe_iteration_single_newton": lambda: iteration(single),
        "moe_gate_m_step": lambda: gate.m_step(params.gate, x, tau),
        "moe_experts_m_step": lambda: experts.m_step(params.experts, x, y, tau),
        "moe_e_step": lambda: moe_e_step(x, y, gate, experts, params),
    }


def profile(f, top: int = 12) -> list[dict]:
    """Top functions of one call by own time (cProfile)."""
    pr = cProfile.Profile()
    pr.enable()
    f()
    pr.disable()
    stats = pstats.Stats(pr, stream=io.StringIO())
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": nc, "own_seconds": tt, "cumulative_seconds": ct})
    return sorted(rows, key=lambda r: -r["own_seconds"])[:top]


def growth(sizes: list[int], seed: int) -> list[dict]:
    out = []
    for n in sizes:
        data = make_data(n, seed)
        t0 = time.perf_counter()
        fit = fit_regression_mixture(data["X"], data["y"], data["start"], options=EMOptions())
        seconds = time.perf_counter() - t0
        out.append({
            "n": n, "iterations": fit.n_iter, "converged": bool(fit.converged), "seconds": seconds,
            "seconds_per_iteration": seconds / max(fit.n_iter, 1),
            "microseconds_per_iteration_per_sample": 1e6 * seconds / max(fit.n_iter, 1) / n,
            "final_loglik_per_sample": float(fit.loglik) / n,
        })
        r = out[-1]
        print(f"growth n={n}: {r['iterations']} iterations, {r['seconds']:.2f} s, {r['seconds_per_iteration'] * 1e3:.1f} ms/iteration "
              f"({r['microseconds_per_iteration_per_sample']:.3f} us per iteration and sample)", flush=True)
    return out


def softmax_gate_only(data: dict, args: argparse.Namespace, env: dict, started: str) -> None:
    """The softmax-gated iteration against ``wls`` at each thread count, and the gate M-step's memory peak."""
    cells = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with harness.threads(threads):
            cands = {"wls": regression_mixture_candidates(data)["wls"], **moe_candidates(data)}
            times = harness.interleaved_times(cands, rounds=args.rounds, warmup=1, seed=args.seed)
            summary = harness.summarize(times, "wls")
            peaks = harness.transient_peak_bytes(cands["moe_gate_m_step"])
        cell = {"threads": threads, "n": args.n, "K": K, "d": D_IN, "candidates": {},
                "gate_m_step_peak_bytes": peaks}
        for name, s in summary.items():
            cell["candidates"][name] = {"reference": "wls", "ratio": s.pop("ratio_to_wls"), **s}
        cells.append(cell)
        print(f"{threads}t n={args.n}: wls {cell['candidates']['wls']['median_seconds'] * 1e3:.1f} ms | " + " ".join(
            f"{k}={v['ratio']:.2f} [{v['ratio_min']:.2f},{v['ratio_max']:.2f}]" for k, v in cell["candidates"].items() if k != "wls"
        ) + f" | gate M-step peak {min(peaks) / 2**20:.1f} MiB", flush=True)
    if args.out is not None:
        doc = harness.run_record(
            "softmax-gated EM iteration (K=8 linear experts) vs its weighted least-squares solves; gate M-step memory",
            "em_iteration.py", started, env, rounds=args.rounds, cells=cells,
        )
        print(f"wrote {harness.write_results(doc, 'em_iteration_softmax', args.out)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--sizes", default="25000,50000,100000", help="sample sizes of the growth measurement")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-moe", action="store_true", help="skip the softmax-gated form")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--gate", choices=("all", "softmax"), default="all",
                        help="'softmax': the softmax-gated iteration and the gate M-step's memory only")
    args = parser.parse_args()
    env = harness.environment()
    harness.print_environment(env)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data = make_data(args.n, args.seed)
    if args.gate == "softmax":
        softmax_gate_only(data, args, env, started)
        return
    cells = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with harness.threads(threads):
            cands = regression_mixture_candidates(data)
            if not args.no_moe:
                cands.update(moe_candidates(data))
            times = harness.interleaved_times(cands, rounds=args.rounds, warmup=1, seed=args.seed)
            summary = harness.summarize(times, "wls")
            cell = {"threads": threads, "n": args.n, "K": K, "d": D_IN, "candidates": {}}
            for name, s in summary.items():
                cell["candidates"][name] = {"reference": "wls", "ratio": s.pop("ratio_to_wls"), **s}
            cell["profile"] = {"regression_mixture_iteration": profile(cands["regression_mixture_iteration"])}
            if not args.no_moe:
                cell["profile"]["moe_iteration"] = profile(cands["moe_iteration"])
            cell["growth"] = None
            cells.append(cell)
            print(f"{threads}t n={args.n}: wls {cell['candidates']['wls']['median_seconds'] * 1e3:.1f} ms | " + " ".join(
                f"{k}={v['ratio']:.2f} [{v['ratio_min']:.2f},{v['ratio_max']:.2f}]" for k, v in cell["candidates"].items() if k != "wls"
            ), flush=True)
    for cell in cells:
        with harness.threads(cell["threads"]):
            print(f"{cell['threads']} thread(s):")
            cell["growth"] = growth([int(s) for s in args.sizes.split(",")], args.seed)
    doc = harness.run_record(
        "classical EM iteration (K=8 mixture of linear experts) vs its weighted least-squares solves; growth in n",
        "em_iteration.py", started, env, rounds=args.rounds, cells=cells,
    )
    path = harness.write_results(doc, "em_iteration", args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

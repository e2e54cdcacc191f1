"""``moeref selfcheck``: every formulation on every backend, against NumPy and finite differences.

Inputs are drawn once on the host with a seeded NumPy generator and converted to each backend.
For each case the forward on each backend is compared with the NumPy forward (float64), and the
analytic VJP with a central finite-difference VJP on NumPy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import moeref
from ._base import Backend
from .gradcheck import finite_difference_vjp, relative_error


@dataclass(frozen=True)
class Case:
    """One formulation as the self-check and the golden vectors (`moeref.vectors`) exercise it.

    ``make(rng, **sizes)`` draws ``(args, cotangent)`` with a NumPy generator; its keyword
    arguments are the sizes (defaults: the self-check's shapes). ``shapes`` lists the size
    overrides the golden vectors are generated for (``{}`` = the defaults); keep one odd shape.
    """

    name: str
    summary: str
    make: Callable[..., tuple[tuple, np.ndarray]]  # (rng, **sizes) -> (args, cotangent)
    forward: Callable[..., Any]
    vjp: Callable[..., Any]
    shapes: tuple[dict, ...] = ({},)


def _gate(rng, d, n):
    return moeref.LinearSoftmaxGateParams(rng.normal(size=(d, n)), rng.normal(size=n))


def _experts(rng, n, d_in, d_out):
    return moeref.LinearExpertsParams(rng.normal(size=(n, d_in, d_out)), rng.normal(size=(n, d_out)))


def _softmax_gate(rng, N=6, d=3, n=4):
    return (rng.normal(size=(N, d)), _gate(rng, d, n)), rng.normal(size=(N, n))


def _linear_experts(rng, N=6, d=3, n=4, d_out=2):
    return (rng.normal(size=(N, d)), _experts(rng, n, d, d_out)), rng.normal(size=(N, n, d_out))


def _mixture(rng, N=6, n=4, d_out=2):
    return (rng.dirichlet(np.ones(n), size=N), rng.normal(size=(N, n, d_out))), rng.normal(size=(N, d_out))


def _meta_pi(rng, N=5, d=3, n=3, d_out=2):
    params = moeref.MetaPiParams(_gate(rng, d, n), _experts(rng, n, d, d_out))
    return (rng.normal(size=(N, d)), params), rng.normal(size=(N, d_out))


def _local_experts(rng, N=5, d=3, n=3, d_out=2):
    params = moeref.LinearLocalExpertsParams(_gate(rng, d, n), _experts(rng, n, d, d_out))
    return (rng.normal(size=(N, d)), rng.normal(size=(N, d_out)), params), rng.normal(size=N)


def _hme(rng, N=5, d=3, branching=(2, 3), d_out=2):
    nodes = np.cumprod((1,) + branching[:-1])
    params = moeref.HMEParams(
        tuple(rng.normal(size=(m, d, b)) for m, b in zip(nodes, branching)),
        tuple(rng.normal(size=(m, b)) for m, b in zip(nodes, branching)),
        _experts(rng, int(np.prod(branching)), d, d_out),
    )
    return (rng.normal(size=(N, d)), rng.normal(size=(N, d_out)), params), rng.normal(size=N)


def _mos(rng, N=4, d=3, K=2, d_e=3, V=5):
    params = moeref.MixtureOfSoftmaxesParams(
        rng.normal(size=(d, K)), rng.normal(size=(K, d, d_e)), rng.normal(size=(K, d_e)),
        rng.normal(size=(d_e, V)), rng.normal(size=V),
    )
    return (rng.normal(size=(N, d)), params), rng.normal(size=(N, V))


def _deep_moe(rng, N=4, dims=(3, 4, 2), n=3, h=3):
    layers = tuple(
        moeref.DeepMoELayerParams(
            rng.normal(size=(n, d_in, d_out)), rng.normal(size=(n, d_out)), rng.normal(size=(d_in, h)),
            rng.normal(size=h), rng.normal(size=(h, n)), rng.normal(size=n),
        )
        for d_in, d_out in zip(dims[:-1], dims[1:])
    )
    return (rng.normal(size=(N, dims[0])), layers), rng.normal(size=(N, dims[-1]))


CASES: list[Case] = [
    Case(
        "linear_softmax_gate",
        "w(x) = softmax(K^T x + b)",
        _softmax_gate,
        moeref.linear_softmax_gate,
        moeref.linear_softmax_gate_vjp,
        ({}, {"N": 1, "d": 5, "n": 7}),
    ),
    Case(
        "linear_experts",
        "f_i(x) = A_i x + c_i",
        _linear_experts,
        moeref.linear_experts,
        moeref.linear_experts_vjp,
        ({}, {"N": 3, "d": 1, "n": 5, "d_out": 3}),
    ),
    Case(
        "mixture",
        "sum_i w_i(x) f_i(x)",
        _mixture,
        moeref.mixture,
        moeref.mixture_vjp,
        ({}, {"N": 9, "n": 1, "d_out": 3}),
    ),
    Case(
        "hard_mixture",
        "f_argmax w(x)(x), ties to the lower index",
        _mixture,
        moeref.hard_mixture,
        moeref.hard_mixture_vjp,
        ({}, {"N": 9, "n": 3, "d_out": 1}),
    ),
    Case(
        "meta_pi",
        "sum_i softmax(K^T x + b)_i (A_i x + c_i) (Hampshire & Waibel 1992)",
        _meta_pi,
        moeref.meta_pi,
        moeref.meta_pi_vjp,
        ({}, {"N": 7, "d": 5, "n": 3, "d_out": 1}),
    ),
    Case(
        "local_experts_log_likelihood",
        "log sum_i w_i(x) N(y | A_i x + c_i, I) (Jacobs et al. 1991)",
        _local_experts,
        moeref.local_experts_log_likelihood,
        moeref.local_experts_log_likelihood_vjp,
        ({}, {"N": 9, "d": 1, "n": 5, "d_out": 3}),
    ),
    Case(
        "hme_log_likelihood",
        "hierarchical MoE, branching (2, 3) (Jordan & Jacobs 1994)",
        _hme,
        moeref.hme_log_likelihood,
        moeref.hme_log_likelihood_vjp,
        ({}, {"N": 7, "d": 4, "branching": (3, 2, 2), "d_out": 1}),
    ),
    Case(
        "mixture_of_softmaxes",
        "log sum_k pi_k softmax(h_k^T W) (Yang et al. 2017)",
        _mos,
        moeref.mixture_of_softmaxes_log_probs,
        moeref.mixture_of_softmaxes_log_probs_vjp,
        ({}, {"N": 7, "d": 5, "K": 3, "d_e": 2, "V": 9}),
    ),
    Case(
        "deep_moe",
        "stacked dense MoE layers (Eigen et al. 2013)",
        _deep_moe,
        moeref.deep_moe,
        moeref.deep_moe_vjp,
        ({}, {"N": 5, "dims": (5, 3, 4, 1), "n": 2, "h": 5}),
    ),
]


def run_selfcheck(
    backends: list[Backend], *, only: str | None = None, seed: int = 0, echo: Callable[[str], None] = print
) -> bool:
    """Run the checks; print one row per (formulation, backend); return True if all pass."""
    forward_rtol, grad_rtol = 1e-10, 1e-6
    cases = [c for c in CASES if only is None or only in c.name]
    if not cases:
        echo(f"no formulation matches {only!r}")
        return False
    echo(f"{'formulation':<30} {'backend':<28} {'forward rel err':>16} {'VJP vs FD':>12}  result")
    all_ok = True
    start = time.perf_counter()
    for case in cases:
        rng = np.random.default_rng(seed)
        args, cotangent = case.make(rng)
        ref = np.asarray(case.forward(*args))
        analytic = tuple(case.vjp(*args, cotangent))
        fd = finite_difference_vjp(lambda *a: np.asarray(case.forward(*a)), args, cotangent)
        # compare where moeref returns a gradient (a None field means "not differentiable")
        grad_err = relative_error(
            [a for a, f in zip(analytic, fd) if a is not None], [f for a, f in zip(analytic, fd) if a is not None]
        )
        for b in backends:
            b.setup()
            try:
                out = b.to_numpy(case.forward(*(b.tree_from_numpy(a) for a in args)))
            finally:
                b.teardown()
            err = relative_error(out, ref)
            ok = err <= forward_rtol and grad_err <= grad_rtol
            all_ok &= ok
            echo(f"{case.name:<30} {b.name:<28} {err:>16.2e} {grad_err:>12.2e}  {'ok' if ok else 'FAIL'}")
    echo(f"{len(cases)} formulations x {len(backends)} backends in {time.perf_counter() - start:.1f} s: "
         f"{'all checks passed' if all_ok else 'SOME CHECKS FAILED'}")
    return all_ok

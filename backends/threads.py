"""Run the experts of moeref's sorted dispatch on several threads (expert parallelism on one machine).

NumPy runs its elementwise work, gathers and copies on one core; only its BLAS uses more. At two
threads the expert matmuls of [`dispatch_combine`][moeref.dispatch.dispatch_combine] use both
cores and everything else one, so that everything else weighs twice as much against the matmuls
as at one thread. [`expert_threads`][moeref.backends.threads.expert_threads] runs the experts'
jobs (gather and FFN; in the VJP also the pullback and the weight cotangents) and the combine's
token groups concurrently on ``workers`` threads, and gives the BLAS one thread per worker while
they run, so the expert work is spread over the cores (the calling thread copies each job's
results into the shared buffers). NumPy and torch release the GIL inside their kernels.

The results are bit for bit those of the default (one expert after the other): a job only reads
the shared arrays and returns its results, which the calling thread writes into the shared
buffers (so no array is modified from two threads, which torch autograd's in-place records would
not survive), and a job's arithmetic does not depend on the thread that runs it. Immutable arrays
(JAX) always run one expert after the other.

This module imports ``threadpoolctl`` (the ``test`` and ``bench`` extras) to set the BLAS / OpenMP
thread pools: it is a backend adapter, not math.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from moeref import dispatch as _dispatch

__all__ = ["expert_threads"]


@contextlib.contextmanager
def expert_threads(workers: int, *, blas_threads: int = 1) -> Iterator[None]:
    """Inside the block, sorted dispatches run their experts on ``workers`` threads.

    Covers [`dispatch_combine`][moeref.dispatch.dispatch_combine],
    [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp],
    [`dispatch_combine_value_and_vjp`][moeref.dispatch.dispatch_combine_value_and_vjp] and the layers built on them
    ([`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] and its VJP among them) called from
    this thread (the setting is a context variable: other threads keep the default).

    Parameters
    ----------
    workers : int
        Threads that run expert jobs (at least 1; 1 runs them one after the other as without
        the block, with the BLAS still limited).
    blas_threads : int
        BLAS and OpenMP threads per call while the jobs run (default 1: ``workers`` threads each
        running single-threaded matmuls use ``workers`` cores; more oversubscribes them). The
        work between the jobs (router, checks, losses) keeps the BLAS's own setting.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.backends.threads import expert_threads
    >>> from moeref.dispatch import dispatch_combine
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> from moeref.routes import Routes
    >>> experts = ExpertFFNParams(w_in=np.ones((2, 1, 1)), w_out=np.array([[[1.0]], [[10.0]]]))
    >>> routes = Routes(expert_index=np.array([[0, 1], [1, 0]]), weight=np.array([[0.75, 0.25], [1.0, 0.0]]),
    ...                 kept=np.array([[True, True], [True, False]]), position=np.array([[0, 0], [1, 1]]))
    >>> with expert_threads(2):
    ...     y = dispatch_combine(np.array([[1.0], [2.0]]), routes, experts, RELU_FFN)
    >>> y.tolist()
    [[3.25], [20.0]]
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int of at least 1, got {workers!r}")
    if isinstance(blas_threads, bool) or not isinstance(blas_threads, int) or blas_threads < 1:
        raise ValueError(f"blas_threads must be an int of at least 1, got {blas_threads!r}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError as err:  # pragma: no cover - threadpoolctl is in the test extra
        raise ImportError("expert_threads needs threadpoolctl (pip install threadpoolctl)") from err
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moeref-expert") as pool:

        def run(job, items):
            # results are yielded as the caller consumes them (it writes them into the shared
            # buffers itself); the BLAS is limited only until the last one is taken, so the
            # router's and the checks' matmuls between the maps keep the BLAS's own threads
            with threadpool_limits(blas_threads):
                yield from pool.map(job, items)

        token = _dispatch._JOB_MAP.set(run if workers > 1 else None)
        try:
            yield
        finally:
            _dispatch._JOB_MAP.reset(token)

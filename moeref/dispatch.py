r"""Sorted dispatch and combine: send each kept route's token to its expert, weight and sum the outputs.

Given the routing record `Routes` (`moeref.routes`) of $T$ tokens with $k$ routes each,
the layer output is

$$y_t = \sum_{j=0}^{k-1} [\mathrm{kept}_{tj}]\; w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t),$$

eq. (1) of Shazeer et al. (2017), "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", ICLR, arXiv:1701.06538, restricted to the routes that survived the
capacity limit. [`dispatch_combine`][moeref.dispatch.dispatch_combine] computes it the way
dropless implementations do (MegaBlocks, Gale et al. 2023, arXiv:2211.15841; transformers'
``grouped_mm`` experts): sort the kept routes by expert, gather their tokens into one contiguous
buffer, run one matmul chain per expert on its block, and combine back through the inverse
permutation. Memory is $O(T k d)$ plus one expert's activations; no $(T, E, C)$ tensor is ever
formed.

The GShard einsum form (dispatch and combine tensors of shape $(T, E, C)$) is kept for inspection
only: [`dense_dispatch_tensors`][moeref.dispatch.dense_dispatch_tensors],
[`dense_dispatch_combine`][moeref.dispatch.dense_dispatch_combine].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, NamedTuple

from array_api_compat import is_writeable_array

from .core import array_namespace, device_of, _inverse_permutation, _stable_argsort_small_ints, one_hot
from .expert_ffn import (
    ExpertFFN,
    ExpertFFNParams,
    _expert_slice,
    _ffn_backward,
    _ffn_forward,
    _ffn_output,
    _named_params,
    _stack_expert_grads,
    _weighted_ffn_vjp,
    batched_expert_ffn,
    check_expert_ffn_params,
)
from .routes import Routes, check_routes
from .validation import (
    check_arrays,
    check_choice,
    check_finite as check_all_finite,
    check_float_array,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "WEIGHT_PLACEMENTS",
    "DispatchCombineGrads",
    "DenseDispatch",
    "dispatch_combine",
    "dispatch_combine_vjp",
    "dispatch_combine_value_and_vjp",
    "dense_dispatch_tensors",
    "dense_dispatch_combine",
]

WEIGHT_PLACEMENTS = ("output", "input")
"""Values of ``apply_weight_to``: where the route weight $w_{tj}$ multiplies."""


class DispatchCombineGrads(NamedTuple):
    """Cotangents of [`dispatch_combine`][moeref.dispatch.dispatch_combine]'s inputs.

    Attributes
    ----------
    x : array, shape (T, d)
    routes : Routes
        Only ``weight`` (shape (T, k)) is differentiable; ``expert_index``, ``kept`` and
        ``position`` are ``None``. A dropped route's weight cotangent is 0.
    experts : ExpertFFNParams
        Same record as the parameters (``None`` where a parameter is ``None``); zeros for an
        expert that received no token.
    """

    x: Any
    routes: Routes
    experts: ExpertFFNParams


class DenseDispatch(NamedTuple):
    """The GShard dispatch and combine tensors (inspection form, memory $O(TEC)$).

    Attributes
    ----------
    dispatch : array, shape (T, E, C)
        1 where token $t$ sits in slot $c$ of expert $e$ (a kept route), else 0; in the weight's
        dtype (``dispatch > 0`` is GShard's boolean ``dispatch_mask``).
    combine : array, shape (T, E, C)
        $w_{tj}$ at the same place, else 0 (GShard's ``combine_weights``).
    """

    dispatch: Any
    combine: Any


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_routes(routes: Any, T: int | None, xp: Any) -> tuple[int, int]:
    """Types and shapes of a Routes record for ``T`` tokens; returns ``(T, k)``."""
    check_routes(routes)
    e = routes.expert_index
    if e.ndim != 2:
        raise ValueError(f"routes.expert_index must be 2-dimensional (T, k), got shape {tuple(e.shape)}")
    if T is not None:
        check_shape(e, "routes.expert_index", (T, None), what=f"x has T={T} tokens")
    T, k = e.shape
    for name in ("expert_index", "position"):
        a = getattr(routes, name)
        if not xp.isdtype(a.dtype, "integral"):
            raise TypeError(f"routes.{name} must have an integer dtype (int64), got {a.dtype}")
    if not xp.isdtype(routes.kept.dtype, "bool"):
        raise TypeError(f"routes.kept must be a bool array, got {routes.kept.dtype}")
    check_float_array(routes.weight, "routes.weight")
    for name in ("weight", "kept", "position"):
        check_shape(getattr(routes, name), f"routes.{name}", (T, k), what=f"routes.expert_index has shape ({T}, {k})")
    return T, k


def _check_kept_range(values: Any, kept: Any, bound: int, name: str, what: str, xp: Any) -> None:
    """Every kept route's ``values`` must lie in ``[0, bound)`` (skipped when traced)."""
    bad = kept & ((values < 0) | (values >= bound))
    if concrete_bool(xp.any(bad)) is True:
        zero = xp.zeros_like(values)
        lo = int(xp.min(xp.where(kept, values, zero)))
        hi = int(xp.max(xp.where(kept, values, zero)))
        raise ValueError(f"{name} of the kept routes must lie in [0, {bound}) ({what}); found values in [{lo}, {hi}]")


def _check_call(
    x: Any, routes: Any, experts: Any, ffn: Any, apply_weight_to: str, check_finite: bool = True
) -> tuple[Any, int, int, int]:
    check_record_type(routes, "routes", Routes)
    check_record_type(experts, "experts", ExpertFFNParams)
    check_record_type(ffn, "ffn", ExpertFFN)
    check_choice(apply_weight_to, "apply_weight_to", WEIGHT_PLACEMENTS)
    names = ("x",) + tuple(f"routes.{f}" for f in Routes._fields) + tuple(f"experts.{f}" for f in ExpertFFNParams._fields)
    xp = array_namespace(x, *routes, *experts, names=names)
    check_float_array(x, "x", ndim=2)
    T, k = _check_routes(routes, x.shape[0], xp)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__} {check_finite!r}")
    named = {"x": x, "routes.weight": routes.weight, **_named_params(experts)}
    check_arrays(named, finite=check_finite)
    E, _, _ = check_expert_ffn_params(experts, ffn, d=x.shape[1])
    _check_kept_range(routes.expert_index, routes.kept, E, "routes.expert_index", f"experts holds E={E} experts", xp)
    return xp, T, k, E


# --------------------------------------------------------------------------------------------
# The sort: kept routes grouped by expert, contiguous blocks [start_e, end_e)
# --------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    bounds: list  # E + 1 Python ints: expert e owns sorted rows [bounds[e], bounds[e + 1])
    token: Any  # (R,) token of each sorted row
    weight: Any  # (R,) route weight of each sorted row
    combine_row: Any  # (T, k) sorted row of each route; R (the zero row) for a dropped route


def _plan(routes: Routes, E: int, xp: Any) -> _Plan:
    T, k = routes.expert_index.shape
    n = T * k
    dev = device_of(routes.expert_index)
    e = xp.reshape(xp.astype(routes.expert_index, xp.int64), (n,))  # (T*k,) flat route t*k + j
    kept = xp.reshape(routes.kept, (n,))  # (T*k,)
    key = xp.where(kept, e, xp.full_like(e, E))  # (T*k,) dropped routes get key E: sorted to the end
    order = _stable_argsort_small_ints(key, E + 1)  # (T*k,) sorted row -> flat route
    edges = xp.searchsorted(xp.take(key, order, axis=0), xp.arange(E + 1, dtype=xp.int64, device=dev), side="left")  # (E+1,)
    bounds = [int(edges[i]) for i in range(E + 1)]
    R = bounds[E]  # number of kept routes
    rows = order[:R]  # (R,)
    token = rows // k  # (R,)
    weight = xp.take(xp.reshape(routes.weight, (n,)), rows, axis=0)  # (R,)
    inv = _inverse_permutation(order)  # (T*k,) flat route -> sorted row
    combine_row = xp.reshape(xp.where(inv < R, inv, xp.full_like(inv, R)), (T, k))  # (T, k)
    return _Plan(bounds, token, weight, combine_row)


# Sizes of the pieces the work is cut into, in numbers per piece. Large temporaries are mapped
# fresh and page-faulted on every call, small ones are recycled by the allocator and stay in cache;
# pieces must still be large enough for the matmuls to keep their speed and for the Python
# overhead per piece to vanish.
_BLOCK_ELEMENTS = 1 << 22  # expert rows per piece: at most about this many hidden activations (rows x K)
_MIN_BLOCK_ROWS = 256
_COMBINE_ELEMENTS = 1 << 17  # tokens per combine piece: about this many gathered numbers (tokens x k x d)
_EXPERT_ROWS_PER_CHUNK = 512  # forward token chunks: about this many rows per expert on average (T_c k / E)
_MIN_CHUNK_TOKENS = 256  # ... but not fewer than this


def _pieces(start: int, end: int, max_rows: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into equal consecutive pieces of at most ``max_rows`` rows."""
    n = end - start
    count = -(-n // max_rows)
    size = -(-n // count)
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def _chunk_plans(routes: Routes, E: int, xp: Any) -> tuple[int, Iterator[tuple[int, int, _Plan]]]:
    """``(max chunk rows R_c, iterator of (t0, t1, plan))`` over the token chunks of ``routes``.

    Each token's results depend on its own routes only, so a chunk is planned (sorted by expert)
    on its own; ``R_c = k * (longest chunk)`` sizes the sorted-rows buffer every chunk reuses.
    """
    T, k = routes.expert_index.shape
    chunks = _token_chunks(T, k, E)

    def plans() -> Iterator[tuple[int, int, _Plan]]:
        for t0, t1 in chunks:
            chunk = routes if (t0, t1) == (0, T) else Routes(*(a[t0:t1, :] for a in routes))
            yield t0, t1, _plan(chunk, E, xp)

    return k * max(t1 - t0 for t0, t1 in chunks), plans()


def _max_piece_rows(experts: ExpertFFNParams) -> int:
    """Rows per piece of an expert's block: about ``_BLOCK_ELEMENTS`` hidden activations (rows x K)."""
    width = experts.w_in.shape[-1] + (0 if experts.w_up is None else experts.w_up.shape[-1])  # K (+ I separate)
    return max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // width)


def _token_chunks(T: int, k: int, E: int) -> list[tuple[int, int]]:
    """The forward's token chunks: equal pieces of about ``_EXPERT_ROWS_PER_CHUNK * E / k`` tokens
    (not under ``_MIN_CHUNK_TOKENS``).

    Every expert gets about 512 rows of a chunk, enough for full-speed matmuls, while a chunk's
    sorted rows stay $1/n$ of the call's routed activations; an expert's temporaries are sized by
    its rows in the chunk, so they stay small too. Measured on the benchmark workloads (2 cores,
    float32, interleaved rounds against the GEMM bound): at C ($T = 16384$, four chunks) 1.31
    against 1.41 for one chunk; at A (two chunks) no difference; at B ($k = 8$, $E = 64$: one
    chunk of 4096 tokens) one chunk was 0.03-0.07 faster than two in float32 and float64.
    """
    size = max(_MIN_CHUNK_TOKENS, -(-_EXPERT_ROWS_PER_CHUNK * E // max(k, 1)))
    return [(0, T)] if size >= T else _pieces(0, T, size)


class _Rows:
    """Rows of a result, handed over in order as consecutive blocks, read back as one array.

    Where the backend's arrays can be written in place (NumPy, CuPy, torch, array-api-strict),
    the array is allocated once and every block is copied into it as soon as it exists, so the
    block is freed at once and the same memory serves every chunk of the call. Large temporaries
    are otherwise mapped and page-faulted afresh on every allocation (glibc returns blocks over
    its mmap threshold, at most 32 MiB, to the system when they are freed): at the benchmark's
    workload C (float32, 2 threads) the expert outputs of a chunk (64 MiB) and their concatenation
    (another 64 MiB) cost 0.1-0.25 of the GEMM time per call that way
    (`benchmarks/sparse_layer.py`). On immutable arrays (JAX) the blocks are kept and
    concatenated; both give the same numbers.
    """

    def __init__(self, rows: int, like: Any, xp: Any):
        self._xp = xp
        self._like = like
        self._buffer = xp.empty((rows, like.shape[1]), dtype=like.dtype, device=device_of(like)) if _writeable(like, xp) else None
        self._blocks: list = []

    @property
    def writeable(self) -> bool:
        """Whether blocks are written into one buffer (so they may arrive in any order)."""
        return self._buffer is not None

    def put(self, start: int, block: Any) -> None:
        """Rows ``[start, start + len(block))``. Into the buffer (writeable arrays) in any order;
        otherwise the blocks must arrive in order, without gaps."""
        if self._buffer is None:
            self._blocks.append(block)
        else:
            self._buffer[start : start + block.shape[0], :] = block

    def array(self, rows: int) -> Any:
        """The first ``rows`` rows handed over (the buffer itself when writeable: rows after them are stale)."""
        if self._buffer is not None:
            return self._buffer if self._buffer.shape[0] == rows else self._buffer[:rows, :]
        blocks, self._blocks = self._blocks, []
        if not blocks:
            return self._xp.zeros((0, self._like.shape[1]), dtype=self._like.dtype, device=device_of(self._like))
        return blocks[0] if len(blocks) == 1 else self._xp.concat(blocks, axis=0)

    def with_zero_row(self, rows: int) -> Any:
        """``array(rows + 1)`` after a zero row has been put at ``rows`` (the row dropped routes read)."""
        zero = self._xp.zeros((1, self._like.shape[1]), dtype=self._like.dtype, device=device_of(self._like))
        self.put(rows, zero)
        return self.array(rows + 1)


def _writeable(like: Any, xp: Any) -> bool:
    """Whether arrays of this backend can be written in place (not JAX's)."""
    return bool(is_writeable_array(xp.empty((0,), dtype=like.dtype, device=device_of(like))))


def _expert_outputs(x: Any, plan: _Plan, experts: ExpertFFNParams, ffn: ExpertFFN, apply_weight_to: str, rows: _Rows, xp: Any) -> None:
    """Expert outputs of the kept routes in sorted order, into ``rows``; weighted only for ``"input"``."""
    max_rows = _max_piece_rows(experts)

    def one_expert(e: int) -> list:
        p = _expert_slice(experts, e)
        blocks = []  # (first sorted row, its outputs) per piece
        for a, b in _pieces(plan.bounds[e], plan.bounds[e + 1], max_rows):
            xs = xp.take(x, plan.token[a:b], axis=0)  # (n, d) this piece's tokens
            if apply_weight_to == "input":
                xs = xs * plan.weight[a:b, None]
            blocks.append((a, _ffn_output(xs, p, ffn, xp)))  # (n, d)
            del xs  # freed before the next piece's tokens are gathered
        return blocks

    for blocks in _for_each_expert(one_expert, plan, rows.writeable):
        for a, y in blocks:
            rows.put(a, y)


_JOB_MAP: ContextVar[Callable | None] = ContextVar("moeref_dispatch_job_map", default=None)
"""How the independent jobs of a dispatch (one per expert; the combine's token groups) run:
``None`` (one after the other, the default) or a ``map(job, items)`` installed by
`moeref.backends.threads.expert_threads`."""

_COMBINE_GROUPS = 8  # the combine's pieces are handed to a job map in this many contiguous groups


def _for_each(job: Callable[[Any], Any], items: list, writeable: bool) -> Iterator:
    """``job(i)`` for each of ``items``, yielded in the order of ``items`` as they are consumed.

    A job only reads shared arrays and returns its results; the caller writes them into the
    shared buffers, in its own thread. So the jobs may run concurrently, and they do when a map is
    installed (``_JOB_MAP``) and the arrays can be written in place. No shared array is ever
    modified from two threads (torch autograd records every in-place write on the tensor's own
    graph node, which is not safe to race). Otherwise (the default, and always on JAX) each job
    runs when its result is consumed, one after the other, so at most one job's results are held
    at a time. The results are the same either way, bit for bit: a job's arithmetic does not
    depend on the thread that runs it.
    """
    run = _JOB_MAP.get()
    if run is None or not writeable or len(items) < 2:
        return map(job, items)
    return run(job, items)


def _for_each_expert(job: Callable[[int], Any], plan: _Plan, writeable: bool) -> Iterator:
    """``job(e)`` for every expert with rows in ``plan``, in expert order (see ``_for_each``)."""
    return _for_each(job, [e for e in range(len(plan.bounds) - 1) if plan.bounds[e + 1] > plan.bounds[e]], writeable)


def _combine_weight(routes: Routes, apply_weight_to: str, xp: Any) -> Any:
    """The combine's $(T, k)$ weights: the route weights, 0 for a dropped route; None when they multiply the input."""
    return xp.where(routes.kept, routes.weight, xp.zeros_like(routes.weight)) if apply_weight_to == "output" else None


def _combine_into(out: _Rows, t_offset: int, sorted_rows: _Rows, plan: _Plan, weight: Any, xp: Any) -> None:
    r"""$\mathrm{out}_t = \sum_j w_{tj}\, \mathrm{rows}[\mathrm{row}_{tj}]$ with a zero row appended: a gather, no scatter.

    ``sorted_rows`` holds the kept routes' rows in sorted order; the zero row is put after them
    and dropped routes read it. ``weight`` (T, k), or None for an unweighted sum. The gather runs
    over pieces of tokens: one ``take`` of their ``k`` rows each, then a ``(1, k) @ (k, width)``
    matmul per token (the weighted sum in one pass); each piece goes to ``out`` at its tokens'
    rows (``t_offset`` + its first token).
    """
    T, k = plan.combine_row.shape
    buffer = sorted_rows.with_zero_row(plan.bounds[-1])  # (R+1, width)
    width = buffer.shape[1]
    step = max(1, _COMBINE_ELEMENTS // (k * width))
    starts = list(range(0, T, step))
    size = -(-len(starts) // _COMBINE_GROUPS)

    def group(g0: int) -> list:  # consecutive pieces: starts[g0 : g0 + size]
        pieces = []
        for t0 in starts[g0 : g0 + size]:
            t1 = min(t0 + step, T)
            rows = plan.combine_row[t0:t1, :]  # (n, k)
            n = t1 - t0
            gathered = xp.reshape(xp.take(buffer, xp.reshape(rows, (n * k,)), axis=0), (n, k, width))  # (n, k, width)
            if weight is None:
                pieces.append((t0, xp.sum(gathered, axis=1)))  # (n, width)
            else:
                pieces.append((t0, xp.matmul(weight[t0:t1, None, :], gathered)[:, 0, :]))  # (n, 1, k) @ (n, k, width) -> (n, width)
        return pieces

    for pieces in _for_each(group, list(range(0, len(starts), size)), out.writeable):
        for t0, piece in pieces:
            out.put(t_offset + t0, piece)


# --------------------------------------------------------------------------------------------
# Public: sorted dispatch / combine and its VJP
# --------------------------------------------------------------------------------------------


def dispatch_combine(
    x: Any,
    routes: Routes,
    experts: ExpertFFNParams,
    ffn: ExpertFFN,
    *,
    apply_weight_to: str = "output",
    check_finite: bool = True,
) -> Any:
    r"""Sparse MoE layer output from a routing record, by sorted dispatch and gathered combine.

    $$y_t = \sum_{j=0}^{k-1} [\mathrm{kept}_{tj}]\; w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)
    \qquad\text{or, with } \texttt{apply\_weight\_to="input"},\qquad
    y_t = \sum_{j=0}^{k-1} [\mathrm{kept}_{tj}]\; \mathrm{FFN}_{e_{tj}}(w_{tj}\, x_t).$$

    The first form is eq. (1) of Shazeer et al. (2017), arXiv:1701.06538, and eq. (2) of Fedus,
    Zoph & Shazeer (2022), "Switch Transformers", JMLR 23(120), arXiv:2101.03961 (Mixtral,
    Qwen2-MoE, DeepSeek, OLMoE, DBRX, GPT-OSS, Switch, GShard all weight the output). The second
    is Llama 4's (transformers `modeling_llama4.py`, ``Llama4TextMoe.forward``:
    ``routed_in = hidden_states * router_scores``, then the experts). The two agree only when
    $\mathrm{FFN}_e(w x) = w\,\mathrm{FFN}_e(x)$ for $w \ge 0$ (a bias-free ReLU FFN); gated FFNs
    and FFNs with biases do not satisfy it.

    Algorithm (dropless-style; one expert's block at a time):

    1. flatten the $(T, k)$ routes, give every dropped route the key $E$ and every kept route its
       expert, and stable-sort by key (kept routes of one expert stay in token order, dropped
       ones go last);
    2. per-expert blocks $[\mathrm{start}_e, \mathrm{end}_e)$ from ``searchsorted`` of
       $0, \dots, E$ in the sorted keys;
    3. per expert with a non-empty block: gather its tokens' rows (contiguous, $n_e \times d$) and
       run one matmul chain ([`expert_ffn`][moeref.expert_ffn.expert_ffn]'s math) on them;
    4. concatenate the blocks and a zero row ($R + 1$ rows, $R$ = number of kept routes), and
       combine: $y_t = \sum_j w_{tj}\, \mathrm{buf}[\mathrm{row}_{tj}]$ where $\mathrm{row}$ is
       the inverse permutation of the sort (dropped routes read the zero row). A gather of the
       $k$ rows of a few tokens at a time and one $(1 \times k)(k \times d)$ product per token:
       no scatter-add.

    Parameters
    ----------
    x : array, shape (T, d)
    routes : Routes
        ``expert_index (T, k)`` int, ``weight (T, k)`` float (dtype of ``x``), ``kept (T, k)``
        bool; ``position`` is not used here (the order inside a block does not change any
        output row).
    experts : ExpertFFNParams
        $E$ experts' weights.
    ffn : ExpertFFN
        The FFN family and weight layout.
    apply_weight_to : {"output", "input"}
        Where $w_{tj}$ multiplies (see above).
    check_finite : bool
        Check that ``x``, ``routes.weight`` and every expert parameter are finite (default). The
        check reads every weight once (a matrix-vector product with ones, so a few per cent of the
        layer's time when $E d I$ is large against $T k d I$); a caller that has validated the
        same arrays already (a layer, at its boundary) passes False. Non-finite input then gives
        non-finite output instead of a ``ValueError``.

    Returns
    -------
    array, shape (T, d)

    Notes
    -----
    **Memory.** The tokens are processed in consecutive chunks of about $512\,E / k$ tokens (each
    expert gets about 512 rows of a chunk on average; not fewer than 256 tokens),
    steps 1-4 once per chunk: each output row depends on its own token's routes only, so the
    chunking does not change the mathematics (on NumPy with OpenBLAS the outputs are
    bit-identical to a single chunk's). Besides the output, the transients of a chunk of $T_c$
    tokens and $R_c$ kept routes are one buffer of $(R_c + 1) \times d$ expert outputs in sorted
    order (each expert's block is written into it as soon as it is computed; allocated once per
    call and reused by every chunk), one expert's tokens and activations ($n_e \times d$ and
    $n_e \times K$, $K = 2I$ for a fused gated FFN) at a time, and the combine's small
    per-token pieces, which are written into the output as they are made:
    $O(T_c k d + \max_e n_e K)$. On immutable arrays (JAX) the expert blocks and the output
    pieces are kept and concatenated instead, which holds the expert outputs twice for a moment.
    No $(T, E, C)$ tensor and no padded copy per expert. An expert with more than about
    $2^{22} / K$ rows of a chunk is run in equal pieces of at most that many rows.

    **Edge cases.** A dropped route contributes nothing whatever its weight (the record sets it to
    0) and whatever its expert index; a kept route's expert index must lie in $[0, E)$. An expert
    without tokens is skipped; a token whose routes are all dropped gets $y_t = 0$.

    **Threads.** Inside `moeref.backends.threads.expert_threads` the experts'
    jobs (gather, FFN) and the combine's token groups run on a thread
    pool; a job only reads the shared arrays and the calling thread writes its results, so the
    output is the same bit for bit (and torch autograd through it stays exact).

    **Eager only.** Block boundaries are read as Python ints (data-dependent shapes), so the
    function runs eagerly on every backend, and under ``jax.grad`` / ``jax.vjp`` (the routing
    arrays stay concrete), but not under ``jax.jit``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.routes import Routes
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> from moeref.dispatch import dispatch_combine
    >>> experts = ExpertFFNParams(w_in=np.ones((2, 1, 1)), w_out=np.array([[[1.0]], [[10.0]]]))
    >>> routes = Routes(expert_index=np.array([[0, 1], [1, 0]]), weight=np.array([[0.75, 0.25], [1.0, 0.0]]),
    ...                 kept=np.array([[True, True], [True, False]]), position=np.array([[0, 0], [1, 1]]))
    >>> dispatch_combine(np.array([[1.0], [2.0]]), routes, experts, RELU_FFN).tolist()
    [[3.25], [20.0]]
    """
    xp, T, k, E = _check_call(x, routes, experts, ffn, apply_weight_to, check_finite)
    weight = _combine_weight(routes, apply_weight_to, xp)
    chunk_rows, plans = _chunk_plans(routes, E, xp)
    out = _Rows(T, x, xp)  # (T, d)
    sorted_rows = _Rows(chunk_rows + 1, x, xp)  # (R_c + 1, d), reused by every chunk
    for t0, t1, plan in plans:
        _expert_outputs(x[t0:t1, :], plan, experts, ffn, apply_weight_to, sorted_rows, xp)
        _combine_into(out, t0, sorted_rows, plan, None if weight is None else weight[t0:t1, :], xp)
    return out.array(T)  # (T, d)


def dispatch_combine_vjp(
    x: Any,
    routes: Routes,
    experts: ExpertFFNParams,
    ffn: ExpertFFN,
    cotangent: Any,
    *,
    apply_weight_to: str = "output",
    check_finite: bool = True,
) -> DispatchCombineGrads:
    r"""VJP of [`dispatch_combine`][moeref.dispatch.dispatch_combine] w.r.t. ``x``, the expert weights and ``routes.weight``.

    For a kept route $r = (t, j)$ to expert $e$ with $o_r = \mathrm{FFN}_e(x_t)$ and the output
    cotangent $\bar y_t$ (``apply_weight_to="output"``):

    $$\bar w_{tj} = \langle \bar y_t, o_r \rangle, \qquad
    \bar x_t = \sum_{j\ \mathrm{kept}} J_{\mathrm{FFN}_e}(x_t)^\top (w_{tj}\,\bar y_t), \qquad
    \bar\theta_e = \sum_{r \to e} \partial_{\theta_e}\mathrm{FFN}_e(x_t)^\top (w_{tj}\,\bar y_t);$$

    with ``apply_weight_to="input"`` and $\bar\xi_r = J_{\mathrm{FFN}_e}(w_{tj} x_t)^\top \bar y_t$:
    $\bar w_{tj} = \langle \bar\xi_r, x_t\rangle$ and $\bar x_t = \sum_j w_{tj}\,\bar\xi_r$.
    Dropped routes get $\bar w_{tj} = 0$. The per-expert pullback is
    [`expert_ffn_vjp`][moeref.expert_ffn.expert_ffn_vjp]'s math; the sum over a token's routes is
    the same gather through the inverse permutation as the forward's combine (no scatter).

    Parameters
    ----------
    x, routes, experts, ffn, apply_weight_to, check_finite
        As in the forward (``check_finite`` also covers ``cotangent``).
    cotangent : array, shape (T, d)

    Returns
    -------
    DispatchCombineGrads
        ``x (T, d)``, ``routes`` (a Routes record with only ``weight (T, k)`` set) and
        ``experts`` (an [`ExpertFFNParams`][moeref.expert_ffn.ExpertFFNParams] record).

    Notes
    -----
    The expert forward is recomputed block by block (nothing is stored between the forward and
    this call), up to the hidden activations only: with $z$ the input of $W^{\mathrm{out}}_e$ and
    $\hat z = \bar y\, W^{\mathrm{out}\top}_e$, $\bar w_{tj} = \langle \hat z_r, z_r\rangle +
    \langle \bar y_t, b^{\mathrm{out}}_e\rangle$, so the output projection is never recomputed and
    the matmuls are exactly those of one forward and one backward pass.

    **Memory.** The tokens run in the forward's chunks (about $512\,E / k$ tokens) and every
    expert's rows of a chunk in the forward's pieces, so besides the results the transients are
    one $(R_c + 1) \times d$ buffer of per-route input cotangents (reused by every chunk) and one
    piece's activations and their cotangents. Each piece's weight cotangents are added into the
    stacked result in place (JAX: summed per expert, stacked at the end). Measured at the
    benchmark's workload C ($T = 16384$, float32, 2 threads, `benchmarks/sparse_layer.py`'s
    inputs): 1.26 of the forward+backward GEMM bound against 1.38 for one chunk holding every
    expert's full-size temporaries. The summation order over a token's chunks is fixed, so the
    result does not depend on the backend's writeability (bit for bit on NumPy).
    """
    return _vjp_pass(x, routes, experts, ffn, cotangent, apply_weight_to, check_finite, with_output=False)[1]


def dispatch_combine_value_and_vjp(
    x: Any,
    routes: Routes,
    experts: ExpertFFNParams,
    ffn: ExpertFFN,
    cotangent: Any,
    *,
    apply_weight_to: str = "output",
    check_finite: bool = True,
) -> tuple[Any, DispatchCombineGrads]:
    r"""[`dispatch_combine`][moeref.dispatch.dispatch_combine]'s output and its VJP in one pass: ``(y, grads)``.

    $y_t = \sum_j [\mathrm{kept}_{tj}]\, w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$ and the cotangents of
    [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp]
    ($\bar x$, $\bar w$, $\bar\theta_e$ for the output cotangent $\bar y$), the same arrays as
    the two calls return, bit for bit on NumPy: each piece of an expert's tokens is gathered and
    its hidden activations are computed once, for both.

    A training step (forward, then backward) costs, in matmuls, one forward and one backward pass:
    $18\,T k d I$ multiply-adds for SwiGLU experts, against $6 + 16$ when the forward and the VJP
    are called one after the other (the VJP recomputes $x W^{\mathrm{in}}$, since nothing is
    kept between calls).

    Parameters
    ----------
    x, routes, experts, ffn, cotangent, apply_weight_to, check_finite
        As in [`dispatch_combine_vjp`][moeref.dispatch.dispatch_combine_vjp].

    Returns
    -------
    y : array, shape (T, d)
    grads : DispatchCombineGrads

    Notes
    -----
    Besides the VJP's transients it holds a second $(R_c + 1) \times d$ buffer, the expert
    outputs of a chunk in sorted order, which the forward's combine reads. Eager only, as the
    forward.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.routes import Routes
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> from moeref.dispatch import dispatch_combine_value_and_vjp
    >>> experts = ExpertFFNParams(w_in=np.ones((2, 1, 1)), w_out=np.array([[[1.0]], [[10.0]]]))
    >>> routes = Routes(expert_index=np.array([[0, 1], [1, 0]]), weight=np.array([[0.75, 0.25], [1.0, 0.0]]),
    ...                 kept=np.array([[True, True], [True, False]]), position=np.array([[0, 0], [1, 1]]))
    >>> y, grads = dispatch_combine_value_and_vjp(np.array([[1.0], [2.0]]), routes, experts, RELU_FFN, np.ones((2, 1)))
    >>> y.tolist(), grads.x.tolist(), grads.routes.weight.tolist()
    ([[3.25], [20.0]], [[3.25], [10.0]], [[1.0, 10.0], [20.0, 0.0]])
    """
    return _vjp_pass(x, routes, experts, ffn, cotangent, apply_weight_to, check_finite, with_output=True)


def _vjp_pass(
    x: Any, routes: Routes, experts: ExpertFFNParams, ffn: ExpertFFN, cotangent: Any, apply_weight_to: str, check_finite: bool,
    *, with_output: bool,
) -> tuple[Any, DispatchCombineGrads]:
    """``(y or None, grads)``: the VJP over the forward's chunks, and with ``with_output`` the forward's output too."""
    xp, T, k, E = _check_call(x, routes, experts, ffn, apply_weight_to, check_finite)
    check_shape(cotangent, "cotangent", tuple(x.shape), what="the output of dispatch_combine, (T, d)")
    check_arrays({"x": x, "cotangent": cotangent}, finite=False)
    if check_finite:
        check_all_finite(cotangent, "cotangent")
    chunk_rows, plans = _chunk_plans(routes, E, xp)  # the forward's chunks
    x_bar = _Rows(T, x, xp)  # (T, d)
    x_rows = _Rows(chunk_rows + 1, x, xp)  # (R_c + 1, d) per-route cotangents, reused by every chunk
    out = y_rows = weight = None
    if with_output:
        out = _Rows(T, x, xp)  # (T, d)
        y_rows = _Rows(chunk_rows + 1, x, xp)  # (R_c + 1, d) expert outputs in sorted order, as in the forward
        weight = _combine_weight(routes, apply_weight_to, xp)
    grads = _ExpertGrads(experts, xp)
    w_bar = []
    for t0, t1, plan in plans:
        w_rows = _expert_vjps(x[t0:t1, :], cotangent[t0:t1, :], plan, experts, ffn, apply_weight_to, x_rows, grads, y_rows, xp)  # (R_c,)
        _combine_into(x_bar, t0, x_rows, plan, None, xp)
        if out is not None:
            _combine_into(out, t0, y_rows, plan, None if weight is None else weight[t0:t1, :], xp)
        w_rows = xp.concat([w_rows, xp.zeros((1,), dtype=x.dtype, device=device_of(x))], axis=0)  # (R_c + 1,) zero row last
        w_bar.append(xp.reshape(xp.take(w_rows, xp.reshape(plan.combine_row, (-1,)), axis=0), (t1 - t0, k)))  # (T_c, k)
    grads_record = DispatchCombineGrads(
        x=x_bar.array(T),
        routes=Routes(expert_index=None, weight=w_bar[0] if len(w_bar) == 1 else xp.concat(w_bar, axis=0), kept=None, position=None),
        experts=grads.array(),
    )
    return (None if out is None else out.array(T)), grads_record


def _expert_vjps(
    x: Any, cotangent: Any, plan: _Plan, experts: ExpertFFNParams, ffn: ExpertFFN, apply_weight_to: str, x_rows: _Rows,
    grads: _ExpertGrads, y_rows: _Rows | None, xp: Any,
) -> Any:
    """One chunk's per-route VJPs in sorted order: input cotangents into ``x_rows``, weight
    cotangents into ``grads``, and (when ``y_rows`` is given) the expert outputs, unweighted for
    ``"output"``, into ``y_rows``; returns the route-weight cotangents ``(R_c,)``."""
    max_rows = _max_piece_rows(experts)
    with_output = y_rows is not None

    def one_expert(e: int) -> tuple:
        p = _expert_slice(experts, e)
        blocks, y_blocks, w_blocks, p_sum = [], [], [], None  # per piece: (first sorted row, its rows); route-weight cotangents
        for a, b in _pieces(plan.bounds[e], plan.bounds[e + 1], max_rows):
            tok = plan.token[a:b]  # (n,)
            xs = xp.take(x, tok, axis=0)  # (n, d)
            ct = xp.take(cotangent, tok, axis=0)  # (n, d)
            w = plan.weight[a:b, None]  # (n, 1)
            if apply_weight_to == "input":
                xin = xs * w
                y, cache = _ffn_forward(xin, p, ffn, xp)  # y: the forward's FFN(w x) (the same operations)
                xin_bar, p_bar = _ffn_backward(xin, p, ffn, cache, ct, xp)  # (n, d)
                w_blocks.append(xp.vecdot(xin_bar, xs, axis=-1))  # (n,)
                blocks.append((a, xin_bar * w))
            else:
                xs_bar, w_bar, p_bar, y = _weighted_ffn_vjp(xs, p, ffn, ct, w, xp, with_output=with_output)  # (n, d), (n,)
                w_blocks.append(w_bar)
                blocks.append((a, xs_bar))
            if with_output:
                y_blocks.append((a, y))
            p_sum = p_bar if p_sum is None else _add_params(p_sum, p_bar)
            del xs, ct, y
        return e, blocks, y_blocks, w_blocks, p_sum

    writeable = x_rows.writeable and grads.writeable and (y_rows is None or y_rows.writeable)
    w_blocks = []
    for e, blocks, y_blocks, w_e, p_sum in _for_each_expert(one_expert, plan, writeable):
        for a, block in blocks:
            x_rows.put(a, block)
        for a, block in y_blocks:
            y_rows.put(a, block)
        grads.add(e, p_sum)
        w_blocks.extend(w_e)
    if not w_blocks:
        return xp.zeros((0,), dtype=x.dtype, device=device_of(x))
    return w_blocks[0] if len(w_blocks) == 1 else xp.concat(w_blocks, axis=0)


def _add_params(a: ExpertFFNParams, b: ExpertFFNParams) -> ExpertFFNParams:
    """Field-wise ``a + b`` of two cotangent records (new arrays; ``None`` fields stay ``None``)."""
    return ExpertFFNParams(*(None if u is None else u + v for u, v in zip(a, b)))


class _ExpertGrads:
    """Cotangents of the stacked expert weights, summed over the pieces of tokens as they come.

    Writeable arrays: one zero-initialised array per parameter, each piece's cotangent added into
    its expert's slice in place (no per-expert list, no final stack). Immutable arrays (JAX): the
    sums are kept per expert and stacked at the end. Experts without tokens get zeros either way.
    """

    def __init__(self, params: ExpertFFNParams, xp: Any):
        self._xp = xp
        self._params = params
        self._stacked = ExpertFFNParams(*(None if a is None else xp.zeros_like(a) for a in params)) if _writeable(params.w_in, xp) else None
        self._per_expert: list[ExpertFFNParams | None] = [] if self._stacked is not None else [None] * params.w_in.shape[0]

    @property
    def writeable(self) -> bool:
        """Whether each expert's sums go into its own slice in place (any order of experts)."""
        return self._stacked is not None

    def add(self, e: int, g: ExpertFFNParams) -> None:
        if self._stacked is not None:
            for acc, part in zip(self._stacked, g):
                if acc is not None:
                    acc[e, ...] += part
            return
        old = self._per_expert[e]
        self._per_expert[e] = g if old is None else _add_params(old, g)

    def array(self) -> ExpertFFNParams:
        if self._stacked is not None:
            return self._stacked
        return _stack_expert_grads(self._per_expert, self._params, self._xp)


# --------------------------------------------------------------------------------------------
# Public: the GShard einsum form, for inspection
# --------------------------------------------------------------------------------------------


def dense_dispatch_tensors(routes: Routes, num_experts: int, capacity: int) -> DenseDispatch:
    r"""The GShard dispatch and combine tensors of a routing record (inspection form only).

    $$\mathrm{dispatch}_{tec} = \sum_j [\mathrm{kept}_{tj}]\,[e_{tj} = e]\,[p_{tj} = c], \qquad
    \mathrm{combine}_{tec} = \sum_j [\mathrm{kept}_{tj}]\, w_{tj}\,[e_{tj} = e]\,[p_{tj} = c],$$

    the ``dispatch_mask`` and ``combine_weights`` of Lepikhin et al. (2021), "GShard: Scaling Giant
    Models with Conditional Computation and Automatic Sharding", ICLR, arXiv:2006.16668,
    Algorithm 2 (``einsum("GSEC,GSM->EGCM")`` dispatch, ``einsum("GSEC,EGCM->GSM")`` combine), as in
    Mesh TensorFlow `moe.py`, DeepSpeed `sharded_moe.py` and fairseq `top2gate.py`.

    **Memory $O(TEC)$**: with $C \approx kT/E$ this is $O(kT^2)$, e.g. $TEC \times 4$ bytes = 4 GiB
    per tensor in float32 for $T = 16384$, $E = 32$, $k = 4$, $C = kT/E = 2048$. Use it to inspect or cross-check small cases;
    the layer itself is [`dispatch_combine`][moeref.dispatch.dispatch_combine].

    Parameters
    ----------
    routes : Routes
        The record; kept routes must have ``position`` in $[0, C)$ and distinct
        (expert, position) slots. When capacity is counted per routing group (positions restart
        in every group), call this once per group with that group's tokens.
    num_experts : int
        $E$.
    capacity : int
        $C$, slots per expert.

    Returns
    -------
    DenseDispatch
        ``dispatch`` and ``combine``, shape (T, E, C), in the dtype of ``routes.weight``.

    Raises
    ------
    ValueError
        A kept route with an expert outside $[0, E)$ or a position outside $[0, C)$, or two kept
        routes in one slot.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.routes import Routes
    >>> from moeref.dispatch import dense_dispatch_tensors
    >>> r = Routes(np.array([[1], [1]]), np.array([[0.5], [0.25]]), np.array([[True], [True]]), np.array([[0], [1]]))
    >>> dense_dispatch_tensors(r, 2, 2).combine.tolist()
    [[[0.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 0.25]]]
    """
    xp = check_routes(routes)
    T, k = _check_routes(routes, None, xp)
    E = check_positive_int(num_experts, "num_experts")
    C = check_positive_int(capacity, "capacity")
    check_arrays({"routes.weight": routes.weight})
    _check_kept_range(routes.expert_index, routes.kept, E, "routes.expert_index", f"num_experts={E}", xp)
    _check_kept_range(routes.position, routes.kept, C, "routes.position", f"capacity={C}", xp)
    dt = routes.weight.dtype
    dev = device_of(routes.weight)
    kept = xp.astype(routes.kept, dt)  # (T, k)
    dispatch = xp.zeros((T, E, C), dtype=dt, device=dev)
    combine = xp.zeros((T, E, C), dtype=dt, device=dev)
    for j in range(k):
        to_expert = one_hot(routes.expert_index[:, j], E, dtype=dt)  # (T, E)
        to_slot = one_hot(routes.position[:, j], C, dtype=dt)  # (T, C)
        slot = to_expert[:, :, None] * to_slot[:, None, :]  # (T, E, C)
        dispatch = dispatch + kept[:, j, None, None] * slot
        combine = combine + (kept[:, j] * routes.weight[:, j])[:, None, None] * slot
    occupancy = xp.sum(dispatch, axis=0)  # (E, C)
    if concrete_bool(xp.any(occupancy > 1)) is True:
        raise ValueError("routes puts two kept routes in the same (expert, position) slot; positions must be distinct per expert")
    return DenseDispatch(dispatch=dispatch, combine=combine)


def dense_dispatch_combine(
    x: Any,
    routes: Routes,
    experts: ExpertFFNParams,
    ffn: ExpertFFN,
    capacity: int,
    *,
    apply_weight_to: str = "output",
) -> Any:
    r"""The same layer output as [`dispatch_combine`][moeref.dispatch.dispatch_combine], through the GShard einsums (inspection only).

    $$X_{ecm} = \sum_t \mathrm{dispatch}_{tec}\, x_{tm}, \qquad O_{e} = \mathrm{FFN}_e(X_e), \qquad
    y_{tm} = \sum_{e,c} \mathrm{combine}_{tec}\, O_{ecm}$$

    (with ``apply_weight_to="input"`` the two tensors swap roles: $X = \mathrm{combine}^\top x$,
    $y = \mathrm{dispatch} \cdot O$). Algorithm 2 of Lepikhin et al. (2021), arXiv:2006.16668.
    It equals the sorted path whenever every kept route fits (``position < capacity``) in its own
    slot; empty slots compute $\mathrm{FFN}_e(0)$, which the zero combine weight discards.

    Memory $O(TEC + ECI)$; see [`dense_dispatch_tensors`][moeref.dispatch.dense_dispatch_tensors].

    Parameters
    ----------
    x : array, shape (T, d)
    routes, experts, ffn, apply_weight_to
        As in [`dispatch_combine`][moeref.dispatch.dispatch_combine].
    capacity : int
        $C$.

    Returns
    -------
    array, shape (T, d)
    """
    xp, T, k, E = _check_call(x, routes, experts, ffn, apply_weight_to)
    dispatch, combine = dense_dispatch_tensors(routes, E, capacity)  # (T, E, C) each
    into, out_of = (combine, dispatch) if apply_weight_to == "input" else (dispatch, combine)
    buffers = xp.tensordot(into, x, axes=([0], [0]))  # (E, C, d)
    outputs = batched_expert_ffn(buffers, experts, ffn)  # (E, C, d)
    return xp.tensordot(out_of, outputs, axes=([1, 2], [0, 1]))  # (T, d)

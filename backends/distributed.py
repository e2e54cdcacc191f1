r"""A float64 reference of a sparse MoE layer with its experts sharded over a Dask cluster.

A real layer's routed experts do not fit one machine in float64 (DeepSeek-V3: 256 experts of
$3 \times 7168 \times 2048$ weights, about 90 GB). This module computes the same output as
[`moeref.sparse_moe.sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] with

* the **router, capacity and combine on the client**, through moeref's own
  [`route`][moeref.router.route], [`apply_capacity`][moeref.capacity.apply_capacity] and
  [`renormalize_routes`][moeref.router.renormalize_routes];
* the **experts on the workers**: worker $w$ owns a contiguous range of experts, memory-maps only
  those experts' weights from one safetensors file per expert (written once by
  [`save_experts`][moeref.backends.distributed.save_experts]) and runs moeref's per-expert FFN
  ([`expert_ffn`][moeref.expert_ffn.expert_ffn]) on the tokens routed to them;
* the **tokens streamed in chunks**, so the client holds one chunk's routed activations
  ($T_c k d$ numbers) at a time, and at most ``max_chunks_in_flight`` chunks are on the wire.

The combine is the same sum as the single-process path,
$y_t = \sum_j m_{tj}\, w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$, so the two agree to round-off
(the $k$ terms of a token are added in expert order here and in rank order there, and BLAS may
block the per-expert matmuls differently).

Pointing it at a real cluster: start a scheduler and workers (``dask scheduler``,
``dask worker tcp://HOST:8786`` on each machine), put the expert folder on a file system every
worker can read (NFS, a parallel file system, or a copy per machine at the same path), then
``Client("tcp://HOST:8786")`` and call
[`sharded_sparse_moe_layer`][moeref.backends.distributed.sharded_sparse_moe_layer]. See
``docs/distributed.md`` for the projected cost of DeepSeek-V3's layer.

This module imports NumPy, safetensors and dask.distributed (the ``distributed`` extra); it is a
backend, not math: the math it runs is moeref's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import tempfile
from typing import Any, NamedTuple

import numpy as np

from moeref.capacity import apply_capacity
from moeref.expert_ffn import ExpertFFNParams, check_expert_ffn_params, expert_ffn
from moeref.router import RouterParams, renormalize_routes, route
from moeref.sparse_moe import SparseMoEOptions

__all__ = ["ShardedOutput", "save_experts", "load_expert", "expert_assignment", "sharded_sparse_moe_layer"]

_INDEX = "experts.json"
_FORMAT = "moeref-sharded-experts"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class ShardedOutput(NamedTuple):
    """What the sharded layer returns.

    Attributes
    ----------
    y : ndarray, shape (T, d)
        The layer output (0 for a token whose routes were all dropped).
    expert_index, weight, kept : ndarray, shape (T, k)
        The routes after capacity (as in [`Routes`][moeref.routes.Routes]).
    counts : ndarray, shape (E,)
        Kept routes per expert, over all chunks.
    owner : dict
        Worker address -> the experts it owned.
    opened : dict
        Worker address -> the experts its process has memory-mapped (a subset of its own).
    """

    y: Any
    expert_index: Any
    weight: Any
    kept: Any
    counts: Any
    owner: dict
    opened: dict


# --------------------------------------------------------------------------------------------
# Expert files: one safetensors file per expert, memory-mapped by the workers
# --------------------------------------------------------------------------------------------


def _expert_file(folder: pathlib.Path, e: int) -> pathlib.Path:
    return folder / f"expert-{e:05d}.safetensors"


def save_experts(experts: ExpertFFNParams, folder: str | os.PathLike) -> pathlib.Path:
    """Write ``E`` experts' weights as one safetensors file per expert plus an ``experts.json`` index.

    Each file holds the non-``None`` fields of [`ExpertFFNParams`][moeref.expert_ffn.ExpertFFNParams]
    for that expert (``w_in (d, K)``, ``w_out (I, d)``, optional ``w_up``, ``b_in``, ``b_up``,
    ``b_out``). Files are written to a temporary name and renamed, and the index last, so an
    interrupted call never leaves a folder that loads.

    Parameters
    ----------
    experts : ExpertFFNParams
        NumPy arrays with a leading expert axis.
    folder : path
        Created if missing.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    from safetensors.numpy import save as st_save

    if not isinstance(experts, ExpertFFNParams):
        raise TypeError(f"experts must be an ExpertFFNParams record, got {type(experts).__name__}")
    fields = {name: np.asarray(v) for name, v in experts._asdict().items() if v is not None}
    E = fields["w_in"].shape[0]
    for name, v in fields.items():
        if v.ndim < 2 or v.shape[0] != E:
            raise ValueError(f"experts.{name} has shape {v.shape} but a leading axis of E={E} experts was expected")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for e in range(E):
        blob = st_save({name: np.ascontiguousarray(v[e]) for name, v in fields.items()}, metadata={"expert": str(e)})
        _atomic_write(_expert_file(folder, e), blob)
    index = {"format": _FORMAT, "version": 1, "num_experts": E, "fields": sorted(fields), "dtype": str(fields["w_in"].dtype)}
    _atomic_write(folder / _INDEX, json.dumps(index, indent=1, sort_keys=True).encode())
    return folder


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _read_index(folder: pathlib.Path) -> dict:
    path = folder / _INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {_INDEX}: write the experts with save_experts(...) first")
    index = json.loads(path.read_text())
    if index.get("format") != _FORMAT or index.get("version") != 1:
        raise ValueError(f"{path} is not a version-1 {_FORMAT} index")
    return index


def load_expert(folder: str | os.PathLike, e: int) -> ExpertFFNParams:
    """Memory-map expert ``e``'s weights (read-only) as an ``ExpertFFNParams`` with a leading axis of 1.

    The safetensors header (an 8-byte little-endian length, then JSON naming each tensor's dtype,
    shape and byte range) is parsed here and every tensor is a ``numpy.memmap`` view of the file:
    nothing is read until the FFN touches it, and nothing is copied into the worker's heap.
    """
    folder = pathlib.Path(folder)
    path = _expert_file(folder, e)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n < 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(fh.read(n))
    data_start = 8 + n
    fields = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None or name not in ExpertFFNParams._fields:
            raise ValueError(f"{path}: unexpected tensor {name!r} of dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        view = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
        fields[name] = view[None, ...]  # (1, ...): one expert
    return ExpertFFNParams(**fields)


@functools.lru_cache(maxsize=None)
def _cached_expert(folder: str, e: int) -> ExpertFFNParams:
    return load_expert(folder, e)


_OPENED: set = set()  # (folder, expert) pairs this worker process has memory-mapped


def _run_experts(folder: str, ffn: Any, blocks: dict) -> tuple[dict, list]:
    """On a worker: the FFN of each owned expert on its token rows; also the experts this process has opened."""
    _OPENED.update((folder, e) for e in blocks)
    out = {e: expert_ffn(rows, _cached_expert(folder, e), ffn, expert=0) for e, rows in blocks.items()}
    return out, sorted(e for f, e in _OPENED if f == folder)


# --------------------------------------------------------------------------------------------
# The client side
# --------------------------------------------------------------------------------------------


def expert_assignment(num_experts: int, workers: list) -> dict:
    """Contiguous, balanced ranges: worker ``i`` of ``W`` owns experts ``[i E / W, (i + 1) E / W)``."""
    if not workers:
        raise ValueError("the cluster has no workers")
    W = len(workers)
    return {w: list(range(i * num_experts // W, (i + 1) * num_experts // W)) for i, w in enumerate(workers)}


def _chunk_size(T: int, options: SparseMoEOptions, chunk_tokens: int | None) -> int:
    if chunk_tokens is None:
        return T
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    cap = options.capacity
    if not cap.dropless:
        # capacity is per routing group: a chunk must hold whole groups
        if cap.group_size is None:
            raise ValueError(
                "chunk_tokens needs routing groups: options.capacity has a capacity over all T tokens "
                "(group_size=None), so the tokens cannot be streamed; pass chunk_tokens=None or set a group_size"
            )
        if chunk_tokens % cap.group_size:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be a multiple of options.capacity.group_size={cap.group_size}")
    return min(chunk_tokens, T)


def sharded_sparse_moe_layer(
    client: Any,
    x: Any,
    router: RouterParams,
    experts_folder: str | os.PathLike,
    options: SparseMoEOptions = SparseMoEOptions(),
    *,
    chunk_tokens: int | None = None,
    max_chunks_in_flight: int = 2,
) -> ShardedOutput:
    r"""The sparse MoE layer's output with experts on Dask workers and tokens streamed in chunks.

    $$y_t = \sum_{j=0}^{k-1} m_{tj}\, w_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$$

    (Shazeer et al. 2017, arXiv:1701.06538, eq. (1)) computed as in
    [`sparse_moe_layer`][moeref.sparse_moe.sparse_moe_layer] (same router, capacity,
    renormalisation and FFN code), with ``FFN_e`` evaluated on the worker that owns expert $e$.

    Parameters
    ----------
    client : distributed.Client
    x : ndarray, shape (T, d)
        Tokens (NumPy; float64 for a reference).
    router : RouterParams
        NumPy router weights (kept on the client).
    experts_folder : path
        Written by [`save_experts`][moeref.backends.distributed.save_experts], readable by every
        worker at the same path.
    options : SparseMoEOptions
        Any deterministic layer options (no noise, jitter, Gumbel or random priority: those need
        per-token draws that this streaming path does not take). ``apply_weight_to`` either way.
    chunk_tokens : int, optional
        Tokens per chunk (default: all). With a capacity limit it must hold whole routing groups.
    max_chunks_in_flight : int
        Chunks whose expert work may be outstanding at once (bounds client memory).

    Returns
    -------
    ShardedOutput
    """
    from distributed import wait

    if not isinstance(options, SparseMoEOptions):
        raise TypeError(f"options must be SparseMoEOptions, got {type(options).__name__}")
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a float (T, d) array, got shape {x.shape} and dtype {x.dtype}")
    folder = pathlib.Path(experts_folder).resolve()
    index = _read_index(folder)
    E = router.weight.shape[1]
    if index["num_experts"] != E:
        raise ValueError(f"experts_folder holds {index['num_experts']} experts but router.weight has E={E} columns")
    T, d = x.shape
    Tc = _chunk_size(T, options, chunk_tokens)
    ffn = options.ffn
    check_expert_ffn_params(load_expert(folder, 0), ffn, d=d, name="experts_folder")

    owner = expert_assignment(E, sorted(client.scheduler_info()["workers"]))

    y = np.zeros_like(x)
    k = options.router.k
    expert_index = np.zeros((T, k), dtype=np.int64)
    weight = np.zeros((T, k), dtype=x.dtype)
    kept = np.zeros((T, k), dtype=bool)
    counts = np.zeros(E, dtype=np.int64)
    pending: list = []
    opened: dict = {}

    def finish(item):
        start, futures, tok, w_sorted, bounds = item
        pieces = {}
        for w, fut in futures:
            out, mapped = fut.result()
            pieces.update(out)
            opened[w] = mapped
        for e, out in pieces.items():
            b0, b1 = bounds[e], bounds[e + 1]
            contrib = out if options.apply_weight_to == "input" else out * w_sorted[b0:b1, None]
            np.add.at(y, start + tok[b0:b1], contrib)  # scatter on the client: plain NumPy, not moeref math

    for start in range(0, T, Tc):
        xc = x[start : start + Tc]
        r = route(xc, router, options.router)
        routes, report = apply_capacity(r.routes, E, options.capacity)
        if options.normalize_after_capacity:
            routes = renormalize_routes(routes, options.router)
        ei, wc, kc = (np.asarray(a) for a in (routes.expert_index, routes.weight, routes.kept))
        expert_index[start : start + Tc], weight[start : start + Tc], kept[start : start + Tc] = ei, wc, kc
        # group the kept routes by expert (stable: token order inside a block)
        key = np.where(kc, ei, E).reshape(-1)
        order = np.argsort(key, kind="stable")
        bounds = np.searchsorted(key[order], np.arange(E + 1), side="left")
        counts += np.diff(bounds)
        tok = order[: bounds[E]] // k  # (R,)
        w_sorted = wc.reshape(-1)[order[: bounds[E]]]  # (R,)
        rows = xc[tok]  # (R, d): this chunk's routed activations
        if options.apply_weight_to == "input":
            rows = rows * w_sorted[:, None]
        futures = []
        for w, es in owner.items():
            blocks = {e: rows[bounds[e] : bounds[e + 1]] for e in es if bounds[e + 1] > bounds[e]}
            if blocks:
                futures.append((w, client.submit(_run_experts, str(folder), ffn, blocks, workers=[w], pure=False)))
        pending.append((start, futures, tok, w_sorted, bounds))
        while len(pending) >= max_chunks_in_flight:
            wait([f for _, f in pending[0][1]])
            finish(pending.pop(0))
    for item in pending:
        finish(item)
    return ShardedOutput(y, expert_index, weight, kept, counts, owner, opened)

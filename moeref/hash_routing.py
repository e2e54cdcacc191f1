r"""Hash routing: each token goes to the expert that a fixed table assigns to its token id.

A Hash layer (Roller, Sukhbaatar, Szlam & Weston 2021, "Hash Layers For Large Sparse Models",
NeurIPS 2021, arXiv:2106.04426, section 3) replaces the learned router of a sparse MoE layer by a
fixed map $h^{(l)}$ from the vocabulary to the $E$ experts, one map per layer $l$. Token $t$
with input id $v_t$ and hidden state $x_t$ gets

$$y_t = \mathrm{FFN}_{h^{(l)}(v_t)}(x_t),$$

with no router parameters, no combine weight (it is 1) and no auxiliary loss. The map is
built before training and never changes. This module gives three ways to build it and the
layer itself:

* [`random_hash_table`][moeref.hash_routing.random_hash_table]: the paper's "Random Hash", from
  an explicit seed through a small pure-integer hash of (seed, layer, token id) that gives the
  same table on every backend;
* [`balanced_hash_table`][moeref.hash_routing.balanced_hash_table]: the paper's "Balanced
  assignment", greedy by descending token frequency to the least-loaded expert;
* any user table: an integer array of shape ``(V,)`` with entries in $[0, E)$;
* [`hash_layer`][moeref.hash_routing.hash_layer] /
  [`hash_layer_vjp`][moeref.hash_routing.hash_layer_vjp]: the layer and its VJP, through the
  same sorted dispatch as the token-choice layer
  ([`dispatch_combine`][moeref.dispatch.dispatch_combine]) with every weight equal to 1.
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

from .capacity import CapacityOptions, apply_capacity
from .core import _inverse_permutation, array_namespace, device_of
from .dispatch import dispatch_combine, dispatch_combine_vjp
from .expert_ffn import ExpertFFN, ExpertFFNParams, check_expert_ffn_params
from .routes import Routes
from .validation import (
    check_array,
    check_arrays,
    check_cotangent,
    check_float_array,
    check_index_range,
    check_int_array,
    check_positive_int,
    check_record_type,
    check_shape,
    concrete_bool,
)

__all__ = [
    "HashLayerOutput",
    "HashLayerGrads",
    "random_hash_table",
    "balanced_hash_table",
    "hash_routes",
    "hash_layer",
    "hash_layer_vjp",
]

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # floor(2^32 / golden ratio): keeps seed 0, layer 0, id 0 away from the fixed point 0
_MURMUR_C1 = 0x85EBCA6B
_MURMUR_C2 = 0xC2B2AE35


class HashLayerOutput(NamedTuple):
    """What [`hash_layer`][moeref.hash_routing.hash_layer] computes.

    Attributes
    ----------
    y : array, shape (T, d)
        $\\mathrm{FFN}_{h(v_t)}(x_t)$ (the residual connection is outside the layer).
    routes : Routes
        Shape (T, 1): ``expert_index`` $h(v_t)$, ``weight`` 1, ``kept`` True, ``position`` the
        token's slot in its expert's buffer (token order).
    counts : int64 array, shape (E,)
        Tokens routed to each expert.
    """

    y: Any
    routes: Routes
    counts: Any


class HashLayerGrads(NamedTuple):
    """Cotangents of [`hash_layer`][moeref.hash_routing.hash_layer]'s inputs.

    Attributes
    ----------
    x : array, shape (T, d)
    token_ids : None
        Integer input: not differentiable.
    table : None
        Integer input: not differentiable.
    experts : ExpertFFNParams
        Zeros for every expert that received no token.
    """

    x: Any
    token_ids: Any
    table: Any
    experts: ExpertFFNParams


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_int_array(a: Any, name: str, what: str) -> Any:
    xp = array_namespace(a, names=(name,))
    check_int_array(a, name, ndim=1, what=what)
    return xp


def _check_table(table: Any, num_experts: int) -> tuple[Any, int]:
    xp = _check_int_array(table, "table", "one expert index per vocabulary id, shape (V,); for several layers pass tables[layer]")
    check_index_range(table, "table", num_experts, what=f"the layer has E={num_experts} experts")
    return xp, table.shape[0]


def _check_token_ids(token_ids: Any, V: int, xp: Any) -> None:
    _check_int_array(token_ids, "token_ids", "one input token id per token, shape (T,)")
    check_index_range(token_ids, "token_ids", V, what=f"the hash table covers a vocabulary of {V}")


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def _mul32(h: Any, c: int) -> Any:
    """``(h * c) mod 2^32`` for ``0 <= h, c < 2^32`` without leaving int64: split ``h`` in 16-bit halves.

    $hc = h_\\mathrm{lo} c + 2^{16} h_\\mathrm{hi} c$ and, mod $2^{32}$, the second term only needs
    $h_\\mathrm{hi}\\,(c \\bmod 2^{16})$; both products stay below $2^{48}$.
    """
    lo = h & 0xFFFF
    hi = h >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _MASK32


def _fmix32(h: Any) -> Any:
    """MurmurHash3's 32-bit finalizer on values in ``[0, 2^32)`` (Python ints or int64 arrays alike)."""
    h = h ^ (h >> 16)
    h = _mul32(h, _MURMUR_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _MURMUR_C2)
    return h ^ (h >> 16)


def _layer_key(seed: int, layer: int) -> int:
    k = _fmix32((seed + _GOLDEN32) & _MASK32)
    return _fmix32(((k ^ layer) + _GOLDEN32) & _MASK32)


def random_hash_table(vocab_ids: Any, num_experts: int, *, seed: int, layer: int = 0) -> Any:
    r"""The "Random Hash" map of a Hash layer: a fixed pseudo-random expert per token id, from a seed.

    $$h^{(l)}(v) = \operatorname{fmix}_{32}\big(((v \oplus \kappa_l) + \gamma) \bmod 2^{32}\big) \bmod E,
    \qquad \kappa_l = \operatorname{fmix}_{32}\big(((\operatorname{fmix}_{32}((s + \gamma) \bmod 2^{32}) \oplus l) + \gamma) \bmod 2^{32}\big),$$

    with seed $s$, layer $l$, $\gamma$ = ``0x9E3779B9`` and $\operatorname{fmix}_{32}$ the 32-bit
    finalizer of MurmurHash3 (Appleby 2011: xor-shift 16, multiply by ``0x85EBCA6B``, xor-shift 13,
    multiply by ``0xC2B2AE35``, xor-shift 16). Roller et al. (2021), arXiv:2106.04426, section 3
    ("Random Hash"): each vocabulary entry is given a fixed random expert before training; a
    different seed or layer index gives a different map.

    Parameters
    ----------
    vocab_ids : integer array, shape (V,)
        The ids to map, usually ``arange(V)`` (the whole table). Applied to a batch of token ids
        it gives the same experts as looking them up in that table.
    num_experts : int
        $E$.
    seed : int
        $0 \le s < 2^{32}$.
    layer : int
        $0 \le l < 2^{32}$: the layer index, so that every layer gets its own map.

    Returns
    -------
    int64 array, shape (V,)
        $h^{(l)}(v)$ for every entry, in $[0, E)$.

    Notes
    -----
    **Why an integer hash and not draws.** moeref holds no random state; a table drawn by a
    library RNG would differ from backend to backend. The map is a pure function of
    (seed, layer, id) written in array-API integer operations (and, xor, shifts, products), so it
    is bit-identical on NumPy, PyTorch, JAX, CuPy and array-api-strict. The 32-bit finalizer is
    evaluated in int64 with every product below $2^{48}$ (a 32-bit multiplier is split in 16-bit
    halves): the array API leaves integer overflow unspecified, and PyTorch has no complete
    uint64 arithmetic, so a 64-bit mixer such as splitmix64 would depend on wrap-around that the
    standard does not promise. $h \bmod E$ has a relative bias below $E / 2^{32}$. Token ids must
    lie in $[0, 2^{32})$.

    **Other random maps.** The authors' public code (ParlAI
    ``projects/params_vs_compute/hash_ladder/hash_ladder.py``, ``HashLayerFFN.hash``) draws the
    table with Python's ``random.seed(42)`` and ``random.randrange(0, hash_size)`` per id; build
    such a table with Python and pass it to [`hash_layer`][moeref.hash_routing.hash_layer] as a
    user table.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.hash_routing import random_hash_table
    >>> table = random_hash_table(np.arange(6), 4, seed=0, layer=0)
    >>> table.tolist() == random_hash_table(np.arange(6), 4, seed=0, layer=0).tolist()
    True
    >>> bool(np.all((table >= 0) & (table < 4)))
    True
    """
    xp = _check_int_array(vocab_ids, "vocab_ids", "the token ids to hash, usually arange(V)")
    E = check_positive_int(num_experts, "num_experts")
    check_positive_int(seed, "seed", minimum=0, maximum=_MASK32)
    check_positive_int(layer, "layer", minimum=0, maximum=_MASK32)
    check_index_range(vocab_ids, "vocab_ids", _MASK32 + 1, what="the hash takes ids in [0, 2^32)")
    v = xp.astype(vocab_ids, xp.int64)  # (V,)
    h = _fmix32(((v ^ _layer_key(seed, layer)) + _GOLDEN32) & _MASK32)  # (V,) in [0, 2^32)
    return h % E


def balanced_hash_table(counts: Any, num_experts: int) -> Any:
    r"""The "Balanced assignment" map of a Hash layer: frequent tokens spread greedily over the experts.

    Visit the vocabulary in order of decreasing count $n_v$ (ties: lower id first) and give each
    id to the expert with the smallest load so far (ties: lower expert index), where an expert's
    load is the total count of the ids it holds:

    $$h(v_{(i)}) = \operatorname*{arg\,min}_{e}\ \sum_{j < i:\ h(v_{(j)}) = e} n_{v_{(j)}},
    \qquad n_{v_{(1)}} \ge n_{v_{(2)}} \ge \dots$$

    Roller et al. (2021), arXiv:2106.04426, section 3 ("Balanced assignment": the table is built
    before training from the training data's token frequencies, most frequent tokens first, each
    to the emptiest expert). This is the longest-processing-time greedy of scheduling: the final
    loads differ by at most the largest count, $\max_e L_e - \min_e L_e \le \max_v n_v$.

    Parameters
    ----------
    counts : array, shape (V,)
        Non-negative token counts (or frequencies) per vocabulary id, integer or float.
    num_experts : int
        $E$.

    Returns
    -------
    int64 array, shape (V,)
        $h(v)$ for every id, on the device of ``counts``.

    Notes
    -----
    The greedy is sequential by nature (each choice depends on the loads left by the previous
    ones): the table is built once, in $O(V \log E)$ Python steps on the counts read as Python
    numbers (a heap of expert loads), and is the same on every backend. Integer counts are summed
    exactly; float counts in Python floats, in the visiting order.

    Ids with count 0 add no load, so all of them go to the expert that is least loaded at the
    end of the pass (the greedy read literally). To spread unseen ids as well, pass smoothed
    counts such as ``counts + 1``.

    The greedy map does not depend on the layer; for a different balanced map per layer,
    relabel the experts with a per-layer permutation ``perm[table]``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.hash_routing import balanced_hash_table
    >>> balanced_hash_table(np.array([5, 9, 1, 4, 4]), 2).tolist()  # ids visited 1, 0, 3, 4, 2; loads 13 and 10
    [1, 0, 1, 1, 0]
    """
    xp = array_namespace(counts, names=("counts",))
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-dimensional, one count per vocabulary id (V,); got shape {tuple(counts.shape)}")
    integral = xp.isdtype(counts.dtype, "integral")
    if not integral and not xp.isdtype(counts.dtype, "real floating"):
        raise TypeError(f"counts must be an integer or real floating array, got {counts.dtype}")
    E = check_positive_int(num_experts, "num_experts")
    V = counts.shape[0]
    dev = device_of(counts)
    if V == 0:
        return xp.zeros((0,), dtype=xp.int64, device=dev)
    if not integral and concrete_bool(xp.all(xp.isfinite(counts))) is False:
        raise ValueError("counts contains NaN or infinite values")
    if concrete_bool(xp.any(counts < 0)) is True:
        raise ValueError(f"counts must be non-negative, got a minimum of {xp.min(counts)}")
    key = -xp.astype(counts, xp.int64) if integral else -counts  # (V,) int64 first: no unsigned wrap-around
    order = xp.astype(xp.argsort(key, stable=True), xp.int64)  # (V,) most frequent first, ties lower id
    ordered = xp.take(counts, order, axis=0)  # (V,)
    to_number = int if integral else float
    loads = [(0, e) for e in range(E)]  # a heap of (load, expert): the top is the least loaded, ties lower index
    chosen = []
    for i in range(V):
        load, e = heapq.heappop(loads)
        chosen.append(e)
        heapq.heappush(loads, (load + to_number(ordered[i]), e))
    in_order = xp.asarray(chosen, dtype=xp.int64, device=dev)  # (V,) expert of the i-th visited id
    return xp.take(in_order, _inverse_permutation(order), axis=0)  # (V,) expert of id v


# --------------------------------------------------------------------------------------------
# Routes and the layer
# --------------------------------------------------------------------------------------------


def hash_routes(token_ids: Any, table: Any, num_experts: int, *, dtype: Any = None) -> tuple[Routes, Any]:
    r"""The routing record of a Hash layer: one route per token, to $h(v_t)$, with weight 1.

    $$e_{t0} = h(v_t) = \mathrm{table}[v_t], \qquad w_{t0} = 1 .$$

    Parameters
    ----------
    token_ids : integer array, shape (T,)
        $v_t$, the input token ids (the paper hashes the current token's id).
    table : integer array, shape (V,)
        $h$: one expert in $[0, E)$ per vocabulary id.
    num_experts : int
        $E$.
    dtype : floating dtype, optional
        Dtype of ``weight`` (default float64 of the namespace).

    Returns
    -------
    routes : Routes
        Shape (T, 1); every route kept, ``position`` its slot in the expert's buffer in token
        order (no capacity limit: a Hash layer drops nothing).
    counts : int64 array, shape (E,)
        Tokens per expert.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.hash_routing import hash_routes
    >>> routes, counts = hash_routes(np.array([2, 0, 2]), np.array([1, 0, 1]), 2)
    >>> routes.expert_index[:, 0].tolist(), routes.position[:, 0].tolist(), counts.tolist()
    ([1, 1, 1], [0, 1, 2], [0, 3])
    """
    E = check_positive_int(num_experts, "num_experts")
    array_namespace(token_ids, table, names=("token_ids", "table"))
    xp, V = _check_table(table, E)
    _check_token_ids(token_ids, V, xp)
    T = token_ids.shape[0]
    dev = device_of(token_ids)
    dt = xp.float64 if dtype is None else dtype
    expert = xp.reshape(xp.take(xp.astype(table, xp.int64), xp.astype(token_ids, xp.int64), axis=0), (T, 1))  # (T, 1)
    routes = Routes(
        expert_index=expert,
        weight=xp.ones((T, 1), dtype=dt, device=dev),
        kept=xp.ones((T, 1), dtype=xp.bool, device=dev),
        position=xp.zeros((T, 1), dtype=xp.int64, device=dev),
    )
    routes, report = apply_capacity(routes, E, CapacityOptions(dropless=True))  # slots in token order
    return routes, report.counts_before[0, :]


def _check_layer(x: Any, token_ids: Any, table: Any, experts: Any, ffn: Any) -> tuple[Any, int]:
    check_record_type(experts, "experts", ExpertFFNParams)
    check_record_type(ffn, "ffn", ExpertFFN)
    check_float_array(x, "x", ndim=2)
    xp = check_arrays({"x": x, **{f"experts.{f}": getattr(experts, f) for f in ExpertFFNParams._fields}})
    check_array(token_ids, "token_ids")
    check_array(table, "table")
    array_namespace(x, token_ids, table, names=("x", "token_ids", "table"))
    E, _, _ = check_expert_ffn_params(experts, ffn, d=x.shape[1])
    if token_ids.ndim == 1:
        check_shape(token_ids, "token_ids", (x.shape[0],), what=f"one id per row of x, T={x.shape[0]}")
    return xp, E


def hash_layer(x: Any, token_ids: Any, table: Any, experts: ExpertFFNParams, ffn: ExpertFFN) -> HashLayerOutput:
    r"""A Hash layer: every token through the expert its token id hashes to.

    $$y_t = \mathrm{FFN}_{h(v_t)}(x_t)$$

    Roller et al. (2021), "Hash Layers For Large Sparse Models", NeurIPS 2021, arXiv:2106.04426,
    section 3: the MoE layer $y_t = \sum_e g_e(x_t)\,\mathrm{FFN}_e(x_t)$ with the gate replaced by
    the one-hot $g_e = [e = h(v_t)]$ of a fixed map of the input token id. Computed by
    [`dispatch_combine`][moeref.dispatch.dispatch_combine] on the record of
    [`hash_routes`][moeref.hash_routing.hash_routes] (weight 1, nothing dropped).

    Parameters
    ----------
    x : array, shape (T, d)
        Hidden states entering the layer.
    token_ids : integer array, shape (T,)
        $v_t$, the input token id at each position.
    table : integer array, shape (V,)
        This layer's map $h$ (from [`random_hash_table`][moeref.hash_routing.random_hash_table],
        [`balanced_hash_table`][moeref.hash_routing.balanced_hash_table] or the user); for a
        stack of layers pass ``tables[layer]``.
    experts : ExpertFFNParams
        The $E$ expert FFNs.
    ffn : ExpertFFN
        Their family (ParlAI's ``HashLayerFFN`` uses a ReLU FFN,
        [`RELU_FFN`][moeref.expert_ffn.RELU_FFN]).

    Returns
    -------
    HashLayerOutput

    Raises
    ------
    ValueError
        Token ids negative or beyond the table's vocabulary; table entries outside $[0, E)$;
        a table that is not 1-dimensional; shapes that do not match.
    TypeError
        Non-integer ids or table, non-float ``x`` or weights.

    Notes
    -----
    The output excludes the residual: ParlAI's ``HashLayerFFN`` returns
    $\mathrm{LayerNorm}(x_t + \mathrm{FFN}_{h(v_t)}(x_t))$ (post-norm Transformer); add the residual
    and the norm outside. Runs eagerly (expert block sizes are Python ints), not under ``jax.jit``.

    Examples
    --------
    >>> import numpy as np
    >>> from moeref.expert_ffn import ExpertFFNParams, RELU_FFN
    >>> from moeref.hash_routing import hash_layer
    >>> experts = ExpertFFNParams(w_in=np.ones((2, 1, 1)), w_out=np.array([[[1.0]], [[10.0]]]))
    >>> out = hash_layer(np.array([[1.0], [2.0]]), np.array([0, 1]), np.array([1, 0]), experts, RELU_FFN)
    >>> out.y.tolist(), out.counts.tolist()
    ([[10.0], [2.0]], [1, 1])
    """
    xp, E = _check_layer(x, token_ids, table, experts, ffn)
    routes, counts = hash_routes(token_ids, table, E, dtype=x.dtype)  # (T, 1)
    y = dispatch_combine(x, routes, experts, ffn)  # (T, d)
    return HashLayerOutput(y=y, routes=routes, counts=counts)


def hash_layer_vjp(
    x: Any, token_ids: Any, table: Any, experts: ExpertFFNParams, ffn: ExpertFFN, cotangent: Any
) -> HashLayerGrads:
    r"""VJP of [`hash_layer`][moeref.hash_routing.hash_layer] w.r.t. ``x`` and the expert weights.

    With $e_t = h(v_t)$ fixed and $\bar y_t$ the output cotangent,

    $$\bar x_t = J_{\mathrm{FFN}_{e_t}}(x_t)^\top \bar y_t, \qquad
    \bar\theta_e = \sum_{t:\ e_t = e} \partial_{\theta_e}\mathrm{FFN}_e(x_t)^\top \bar y_t ;$$

    the gradient reaches the chosen expert only (zeros for an expert without tokens). There is
    no router to differentiate; token ids and the table are integers.

    Parameters
    ----------
    x, token_ids, table, experts, ffn
        As in the forward.
    cotangent : array, shape (T, d)

    Returns
    -------
    HashLayerGrads
    """
    xp, E = _check_layer(x, token_ids, table, experts, ffn)
    check_cotangent(cotangent, tuple(x.shape), like=x, what="the output of hash_layer, (T, d)")
    routes, _ = hash_routes(token_ids, table, E, dtype=x.dtype)
    g = dispatch_combine_vjp(x, routes, experts, ffn, cotangent)
    return HashLayerGrads(x=g.x, token_ids=None, table=None, experts=g.experts)

"""A hand-tuned NumPy sorted dispatch: what the best single-threaded-elementwise NumPy code reaches.

Issue 7 sets the forward target (<= 1.25x the GEMM bound at 2 threads) from "a tuned pure-NumPy
sorted dispatch measured at 1.20-1.32x". ``TunedNumPyDispatch`` is such an implementation, timed
side by side with moeref's ``dispatch_combine`` so that the two questions stay apart: how far this
host lets NumPy get (this candidate over the bound), and what moeref's portable array-API form costs
on top (``dispatch`` over this candidate).

It runs moeref's algorithm (the same token chunks, a stable sort by expert per chunk, each expert's
tokens gathered into a contiguous block, SwiGLU as ``g u / (1 + e^{-g})``, the combine as a gather
through the inverse permutation in cache-sized pieces), so its output is moeref's bit for bit, but
with everything NumPy-specific a reference cannot do portably: every temporary is allocated once,
when the object is made, and reused by every call (``out=`` on ``take``, ``matmul`` and the ufuncs,
so no page is faulted twice), SwiGLU works in place, the second matmul writes straight into the
sorted rows, and the output buffer itself is reused (moeref returns a fresh array). There are no
input checks and no ``min`` pass guarding ``exp`` against overflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeref.dispatch import _COMBINE_ELEMENTS, _token_chunks  # the same chunks and combine pieces as moeref's


def swiglu_into(h: np.ndarray, t: np.ndarray, z: np.ndarray) -> None:
    """``z = (g / (1 + e^{-g})) u`` for ``h = [g | u]`` (n, 2I), in NumPy's fewest passes: in place,
    ``t`` (n, I) as workspace, no temporaries (five passes: negate, exponential, add one, divide,
    multiply; moeref's order of operations, so the same numbers)."""
    half = h.shape[1] // 2
    g, u = h[:, :half], h[:, half:]
    np.negative(g, out=t)
    np.exp(t, out=t)
    t += 1.0
    np.divide(g, t, out=z)
    z *= u


class TunedNumPyDispatch:
    """``dispatch_combine(x, routes, experts, SWIGLU)`` (output weighting, gate first in ``w_in``) in tuned NumPy.

    ``experts.w_in`` is ``(E, d, 2I)``, ``experts.w_out`` ``(E, I, d)``; no biases. Calling the object
    returns the ``(T, d)`` output, in a buffer that the next call overwrites.
    """

    def __init__(self, x: np.ndarray, routes: Any, experts: Any):
        self.x = x
        T, self.k = routes.expert_index.shape
        self.E, d, two_i = experts.w_in.shape
        self.I = two_i // 2
        self.w_in = [np.ascontiguousarray(experts.w_in[e]) for e in range(self.E)]
        self.w_out = [np.ascontiguousarray(experts.w_out[e]) for e in range(self.E)]
        # dropped routes get the key E (sorted last); the record already gives them weight 0
        self.key = np.where(routes.kept, routes.expert_index, self.E).astype(np.int64)  # (T, k)
        self.weight = np.ascontiguousarray(routes.weight)[:, None, :]  # (T, 1, k)
        self.chunks = _token_chunks(T, self.k, self.E)
        most_rows = max(int(np.bincount(self.key[t0:t1].ravel(), minlength=self.E + 1)[: self.E].max()) for t0, t1 in self.chunks)
        chunk_routes = self.k * max(t1 - t0 for t0, t1 in self.chunks)
        self.step = max(1, _COMBINE_ELEMENTS // (self.k * d))  # tokens per combine piece
        dt = x.dtype
        self.xs = np.empty((most_rows, d), dt)  # one expert's gathered tokens
        self.h = np.empty((most_rows, 2 * self.I), dt)  # [g | u]
        self.t = np.empty((most_rows, self.I), dt)  # 1 + e^{-g}
        self.z = np.empty((most_rows, self.I), dt)  # SwiGLU output
        self.rows = np.empty((chunk_routes + 1, d), dt)  # expert outputs in sorted order, then the zero row
        self.gathered = np.empty((self.step, self.k, d), dt)
        self.inverse = np.empty(chunk_routes, np.int64)
        self.arange = np.arange(chunk_routes, dtype=np.int64)
        self.out = np.empty((T, d), dt)

    def __call__(self) -> np.ndarray:
        for t0, t1 in self.chunks:
            self._chunk(t0, t1)
        return self.out

    def _chunk(self, t0: int, t1: int) -> None:
        k, n_routes = self.k, (t1 - t0) * self.k
        key = self.key[t0:t1].reshape(n_routes)
        order = np.argsort(key, kind="stable")  # sorted row -> flat route
        bounds = np.zeros(self.E + 2, np.int64)
        np.cumsum(np.bincount(key, minlength=self.E + 1), out=bounds[1:])
        kept = int(bounds[self.E])
        token = order // k
        x = self.x[t0:t1]
        for e in range(self.E):
            a, b = int(bounds[e]), int(bounds[e + 1])
            n = b - a
            if n == 0:
                continue
            xs, h, t, z = self.xs[:n], self.h[:n], self.t[:n], self.z[:n]
            np.take(x, token[a:b], axis=0, out=xs)
            np.matmul(xs, self.w_in[e], out=h)
            swiglu_into(h, t, z)
            np.matmul(z, self.w_out[e], out=self.rows[a:b])
        self.rows[kept] = 0.0
        inverse = self.inverse[:n_routes]
        inverse[order] = self.arange[:n_routes]
        np.minimum(inverse, kept, out=inverse)  # dropped routes read the zero row
        for s0 in range(0, t1 - t0, self.step):
            s1 = min(s0 + self.step, t1 - t0)
            g = self.gathered[: s1 - s0]
            np.take(self.rows, inverse[s0 * k : s1 * k], axis=0, out=g.reshape((s1 - s0) * k, -1))
            np.matmul(self.weight[t0 + s0 : t0 + s1], g, out=self.out[t0 + s0 : t0 + s1, None, :])

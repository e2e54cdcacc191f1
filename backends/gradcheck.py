"""Gradient checking: central finite differences and autograd VJPs through moeref's own forward.

Used by the test suite and by ``moeref selfcheck``. Arguments are trees (tuples, NamedTuples,
lists, dicts) of NumPy arrays; integer leaves are held fixed.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._base import map_tree


def leaves(tree: Any) -> list:
    out: list = []
    map_tree(lambda a: out.append(a), tree)
    return out


def unflatten_like(tree: Any, flat: list) -> Any:
    it = iter(flat)
    return map_tree(lambda _: next(it), tree)


def finite_difference_vjp(f: Callable[..., Any], args: tuple, cotangent: np.ndarray, *, eps: float = 1e-6) -> tuple:
    """Central-difference VJP of ``f`` (NumPy in, NumPy out) at ``args`` for ``cotangent``.

    Every float leaf of every argument is perturbed entry by entry; returns a tuple shaped like
    ``args`` (integer leaves get ``None``).
    """
    flat_args = [leaves(a) for a in args]
    grads = []
    for ai, arg_leaves in enumerate(flat_args):
        g_leaves = []
        for li, leaf in enumerate(arg_leaves):
            leaf = np.asarray(leaf)
            if not np.issubdtype(leaf.dtype, np.floating):
                g_leaves.append(None)
                continue
            g = np.zeros_like(leaf)
            for idx in np.ndindex(leaf.shape):
                vals = []
                for sign in (1.0, -1.0):
                    pert = leaf.copy()
                    pert[idx] += sign * eps
                    new_leaves = list(arg_leaves)
                    new_leaves[li] = pert
                    new_args = list(args)
                    new_args[ai] = unflatten_like(args[ai], new_leaves)
                    vals.append(np.sum(np.asarray(f(*new_args)) * cotangent))
                g[idx] = (vals[0] - vals[1]) / (2 * eps)
            g_leaves.append(g)
        grads.append(unflatten_like(args[ai], g_leaves))
    return tuple(grads)


def relative_error(a: Any, b: Any) -> float:
    """max |a - b| / max(|b|, tiny) over all leaves of two trees."""
    worst = 0.0
    for x, y in zip(leaves(a), leaves(b)):
        if x is None or y is None:
            continue
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        scale = max(np.max(np.abs(y)) if y.size else 0.0, 1e-300)
        worst = max(worst, float(np.max(np.abs(x - y)) / scale) if x.size else 0.0)
    return worst


def torch_vjp(forward: Callable[..., Any], args: tuple, cotangent: np.ndarray) -> tuple:
    """``torch.autograd`` VJP of moeref's own forward run on torch float64 tensors."""
    import torch

    def to_t(a):
        a = np.asarray(a)
        t = torch.from_numpy(a.copy())
        if np.issubdtype(a.dtype, np.floating):
            t.requires_grad_(True)
        return t

    t_args = tuple(map_tree(to_t, a) for a in args)
    out = forward(*t_args)
    t_leaves = [l for a in t_args for l in leaves(a) if l.requires_grad]
    grads = torch.autograd.grad(out, t_leaves, grad_outputs=torch.from_numpy(np.asarray(cotangent).copy()), allow_unused=True, materialize_grads=True)
    it = iter(grads)
    return tuple(
        map_tree(lambda l: (lambda g: None if g is None else g.numpy())(next(it)) if l.requires_grad else None, a)
        for a in t_args
    )


def jax_vjp(forward: Callable[..., Any], args: tuple, cotangent: np.ndarray) -> tuple:
    """``jax.vjp`` of moeref's own forward run on JAX float64 arrays (integer leaves held fixed)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    flat = [leaves(a) for a in args]
    float_mask = [[np.issubdtype(np.asarray(l).dtype, np.floating) for l in fl] for fl in flat]
    diff_leaves = [jnp.asarray(l) for fl, m in zip(flat, float_mask) for l, f in zip(fl, m) if f]

    def g(*dl):
        it = iter(dl)
        new_args = []
        for a, fl, m in zip(args, flat, float_mask):
            new_args.append(unflatten_like(a, [next(it) if f else jnp.asarray(l) for l, f in zip(fl, m)]))
        return forward(*new_args)

    _, pullback = jax.vjp(g, *diff_leaves)
    grads = iter(pullback(jnp.asarray(cotangent)))
    out = []
    for a, fl, m in zip(args, flat, float_mask):
        out.append(unflatten_like(a, [np.asarray(next(grads)) if f else None for l, f in zip(fl, m)]))
    return tuple(out)

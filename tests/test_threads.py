"""Experts on several threads (moeref.backends.threads): the same numbers as one after the other."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("threadpoolctl")

import moeref.dispatch as dispatch_module
from moeref.backends.threads import expert_threads
from moeref.dispatch import dispatch_combine, dispatch_combine_value_and_vjp, dispatch_combine_vjp
from moeref.expert_ffn import GPT_OSS_SWIGLU, SWIGLU
from moeref.presets import mixtral
from moeref.router import RouterParams
from moeref.sparse_moe import SparseMoEParams, sparse_moe_layer, sparse_moe_layer_vjp
from helpers import leaves
from test_dispatch import make_routes
from test_expert_ffn import make_params


@pytest.fixture
def small_pieces(monkeypatch):
    """Several token chunks, experts cut into pieces of 3 rows: many jobs, each with several pieces."""
    monkeypatch.setattr(dispatch_module, "_EXPERT_ROWS_PER_CHUNK", 4)
    monkeypatch.setattr(dispatch_module, "_MIN_CHUNK_TOKENS", 1)
    monkeypatch.setattr(dispatch_module, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(dispatch_module, "_MIN_BLOCK_ROWS", 3)


def _case(rng, T=61, k=2, E=5, d=4, I=3):
    x, routes = rng.normal(size=(T, d)), make_routes(rng, T, k, E, drop=0.2, skip_expert=E - 1)
    p = make_params(rng, E, d, I, GPT_OSS_SWIGLU, bias=True, scale=3.0)
    return x, routes, p, rng.normal(size=(T, d))


@pytest.mark.parametrize("apply_weight_to", ["output", "input"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threads_give_the_sequential_numbers_bit_for_bit(apply_weight_to, workers, rng, small_pieces):
    x, routes, p, ct = _case(rng)
    y = dispatch_combine(x, routes, p, GPT_OSS_SWIGLU, apply_weight_to=apply_weight_to)
    g = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
    with expert_threads(workers):
        assert (dispatch_module._JOB_MAP.get() is None) == (workers == 1)  # one worker: the plain loop
        y2 = dispatch_combine(x, routes, p, GPT_OSS_SWIGLU, apply_weight_to=apply_weight_to)
        g2 = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
        y3, g3 = dispatch_combine_value_and_vjp(x, routes, p, GPT_OSS_SWIGLU, ct, apply_weight_to=apply_weight_to)
    assert dispatch_module._JOB_MAP.get() is None  # restored
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(y3, y)
    for a, b, c in zip(leaves(g2), leaves(g), leaves(g3), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)
    assert not np.any(g2.experts.w_in[-1])  # the expert without tokens: zeros


def test_jobs_really_run_on_the_pool(rng, small_pieces, monkeypatch):
    x, routes, p, _ = _case(rng)
    seen = set()
    ffn_output = dispatch_module._ffn_output

    def spy(*args):
        seen.add(threading.current_thread().name)
        return ffn_output(*args)

    monkeypatch.setattr(dispatch_module, "_ffn_output", spy)
    with expert_threads(2):
        dispatch_combine(x, routes, p, GPT_OSS_SWIGLU)
    assert seen and all(name.startswith("moeref-expert") for name in seen)


def test_the_layer_and_its_vjp_under_threads(rng):
    T, d, I, E, k = 40, 6, 5, 4, 2
    params = SparseMoEParams(RouterParams(rng.normal(size=(d, E))), make_params(rng, E, d, I, SWIGLU))
    x, ct = rng.normal(size=(T, d)), rng.normal(size=(T, d))
    options = mixtral(k=k)
    out = sparse_moe_layer(x, params, options)
    grads = sparse_moe_layer_vjp(x, params, options, ct)
    with expert_threads(2):
        out2 = sparse_moe_layer(x, params, options)
        grads2 = sparse_moe_layer_vjp(x, params, options, ct)
    np.testing.assert_array_equal(out2.y, out.y)
    for a, b in zip(leaves(grads2), leaves(grads)):
        np.testing.assert_array_equal(a, b)


def test_a_failing_job_raises_and_the_setting_is_restored(rng, small_pieces, monkeypatch):
    x, routes, p, _ = _case(rng)

    def boom(*args):
        raise FloatingPointError("expert job failed")

    monkeypatch.setattr(dispatch_module, "_ffn_output", boom)
    with pytest.raises(FloatingPointError, match="expert job failed"):
        with expert_threads(2):
            dispatch_combine(x, routes, p, GPT_OSS_SWIGLU)
    assert dispatch_module._JOB_MAP.get() is None


def test_other_backends_under_threads(rng, small_pieces):
    """array-api-strict (writeable) runs on the pool; JAX (immutable) one expert after the other."""
    x, routes, p, ct = _case(rng)
    want_y = dispatch_combine(x, routes, p, GPT_OSS_SWIGLU)
    want_g = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct)
    for name in ("array_api_strict", "jax"):
        lib = pytest.importorskip(name)
        if name == "jax":
            lib.config.update("jax_enable_x64", True)
            conv = lib.numpy.asarray
        else:
            conv = lib.asarray
        cast = lambda tree: type(tree)(*(None if a is None else conv(a) for a in tree))  # noqa: E731
        with expert_threads(2):
            y = dispatch_combine(conv(x), cast(routes), cast(p), GPT_OSS_SWIGLU)
            g = dispatch_combine_vjp(conv(x), cast(routes), cast(p), GPT_OSS_SWIGLU, conv(ct))
        np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-13, atol=1e-13)
        for a, b in zip(leaves(g), leaves(want_g)):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="workers must be an int of at least 1"):
        with expert_threads(bad):
            pass
    with pytest.raises(ValueError, match="blas_threads must be an int of at least 1"):
        with expert_threads(2, blas_threads=bad):
            pass


def test_torch_autograd_through_the_threaded_forward_matches_the_analytic_vjp(rng, small_pieces):
    """The jobs return their results and the calling thread writes them: torch autograd records
    every in-place write on the written tensor's node, which two threads writing at once would
    corrupt (a wrong gradient, silently)."""
    torch = pytest.importorskip("torch")
    x, routes, p, ct = _case(rng)
    want = dispatch_combine_vjp(x, routes, p, GPT_OSS_SWIGLU, ct)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(routes.weight, requires_grad=True)
    tw_in = torch.tensor(p.w_in, requires_grad=True)
    troutes = type(routes)(*(torch.from_numpy(a) for a in routes))._replace(weight=tw)
    tp = type(p)(*(None if a is None else torch.from_numpy(a) for a in p))._replace(w_in=tw_in)
    with expert_threads(2):
        y = dispatch_combine(tx, troutes, tp, GPT_OSS_SWIGLU)
    (y * torch.from_numpy(ct)).sum().backward()
    np.testing.assert_allclose(tx.grad.numpy(), want.x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tw.grad.numpy(), want.routes.weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tw_in.grad.numpy(), want.experts.w_in, rtol=1e-10, atol=1e-12)

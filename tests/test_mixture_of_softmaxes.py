"""Mixture of softmaxes (Yang et al. 2017): forward, VJPs, properties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeref.mixture_of_softmaxes import (
    MixtureOfSoftmaxesParams,
    mixture_of_softmaxes_log_probs,
    mixture_of_softmaxes_log_probs_vjp,
    mixture_of_softmaxes_nll,
    mixture_of_softmaxes_nll_vjp,
)
from conftest import assert_close
from helpers import assert_vjp_correct, leaves


# One set of shapes for (almost) every test: JAX compiles each primitive once per shape and dtype.
N, D, K, D_E, V = 4, 3, 2, 3, 5


def _params(rng, d=D, K=K, d_e=D_E, V=V, scale=1.0):
    return MixtureOfSoftmaxesParams(
        prior_weight=scale * rng.normal(size=(d, K)),
        latent_weight=scale * rng.normal(size=(K, d, d_e)),
        latent_bias=scale * rng.normal(size=(K, d_e)),
        output_weight=scale * rng.normal(size=(d_e, V)),
        output_bias=scale * rng.normal(size=V),
    )


def _reference_probs(g, p):
    """P(x | c) the way the reference code (zihangdai/mos) forms it: sum_k pi_k softmax_k, in probability space."""

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    prior = softmax(g @ p.prior_weight)  # (N, K)
    h = np.tanh(np.einsum("nd,kde->nke", g, p.latent_weight) + p.latent_bias)  # (N, K, d_e)
    probs = softmax(h @ p.output_weight + p.output_bias)  # (N, K, V)
    return np.einsum("nk,nkv->nv", prior, probs)


def test_log_probs_match_a_probability_space_reference_on_every_backend(backend, rng):
    g, p = rng.normal(size=(N, D)), _params(rng)
    ref = _reference_probs(g, p)
    out = backend.to_numpy(mixture_of_softmaxes_log_probs(backend.from_numpy(g), backend.tree_from_numpy(p)))
    assert out.shape == (N, V)
    assert_close(out, np.log(ref))
    assert_close(np.exp(out).sum(axis=1), np.ones(N))
    # the reference code's loss: log(P + 1e-8), only when asked for
    out_eps = mixture_of_softmaxes_log_probs(backend.from_numpy(g), backend.tree_from_numpy(p), eps=1e-8)
    assert_close(backend.to_numpy(out_eps), np.log(ref + 1e-8))


def test_one_component_is_plain_log_softmax(backend, rng):
    g, p = rng.normal(size=(N, D)), _params(rng, K=1)
    logits = np.tanh(g @ p.latent_weight[0] + p.latent_bias[0]) @ p.output_weight + p.output_bias  # (N, V)
    expected = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    out = mixture_of_softmaxes_log_probs(backend.from_numpy(g), backend.tree_from_numpy(p))
    assert_close(backend.to_numpy(out), expected)


def test_log_probs_stay_finite_where_probabilities_underflow():
    rng = np.random.default_rng(0)
    g, p = rng.normal(size=(2, 3)), _params(rng, 3, 2, 2, 5)
    p = p._replace(output_bias=np.array([0.0, 0.0, 0.0, 0.0, -2000.0]))  # token 4: P ~ exp(-2000)
    out = mixture_of_softmaxes_log_probs(g, p)
    assert np.all(np.isfinite(out)) and np.all(out[:, 4] < -1990)
    with np.errstate(divide="ignore"):
        assert np.all(np.log(_reference_probs(g, p))[:, 4] == -np.inf)  # the probability-space form gives -inf


@pytest.mark.parametrize("eps", [None, 1e-2])
def test_log_probs_vjp(rng, eps):
    g, p = rng.normal(size=(N, D)), _params(rng)
    ct = rng.normal(size=(N, V))
    name = "mos_log_probs" + ("" if eps is None else " (eps)")
    assert_vjp_correct(
        name,
        lambda g, p: mixture_of_softmaxes_log_probs(g, p, eps=eps),
        lambda g, p, c: mixture_of_softmaxes_log_probs_vjp(g, p, c, eps=eps),
        (g, p),
        ct,
    )


@pytest.mark.parametrize("eps", [None, 1e-2])
def test_nll_vjp(rng, eps):
    g, p = rng.normal(size=(N, D)), _params(rng)
    targets = np.array([0, 4, 2, 4])
    name = "mos_nll" + ("" if eps is None else " (eps)")
    assert_vjp_correct(
        name,
        lambda g, t, p: mixture_of_softmaxes_nll(g, t, p, eps=eps),
        lambda g, t, p, c: mixture_of_softmaxes_nll_vjp(g, t, p, c, eps=eps),
        (g, targets, p),
        np.asarray(0.7),
    )


def test_nll_is_mean_of_picked_log_probs_and_its_vjp_accepts_a_float(rng):
    g, p = rng.normal(size=(N, D)), _params(rng)
    targets = np.array([3, 0, 1, 1])
    logp = mixture_of_softmaxes_log_probs(g, p)
    nll = mixture_of_softmaxes_nll(g, targets, p)
    assert nll.shape == ()
    assert_close(nll, -logp[np.arange(N), targets].mean())
    a = mixture_of_softmaxes_nll_vjp(g, targets, p, 2.0)
    b = mixture_of_softmaxes_nll_vjp(g, targets, p, np.asarray(2.0))
    assert a.targets is None
    for x, y in zip(leaves(a), leaves(b)):
        assert_close(x, y)


def test_vjps_agree_across_backends(backend, rng):
    g, p = rng.normal(size=(N, D)), _params(rng)
    targets = np.array([1, 0, 4, 2])
    ct = rng.normal(size=(N, V))

    def run(to, frm):
        nll_grads = mixture_of_softmaxes_nll_vjp(to(g), to(targets), to(p), to(np.asarray(1.5)))
        return frm(
            (
                mixture_of_softmaxes_log_probs_vjp(to(g), to(p), to(ct)),
                mixture_of_softmaxes_log_probs_vjp(to(g), to(p), to(ct), eps=1e-8),
                mixture_of_softmaxes_nll(to(g), to(targets), to(p)),
                nll_grads.g,
                nll_grads.params,
            )
        )

    ref = run(lambda a: a, lambda t: t)
    out = run(backend.tree_from_numpy, backend.tree_to_numpy)
    for a, b in zip(leaves(out), leaves(ref)):
        assert_close(a, np.asarray(b))


def test_float32_inputs_stay_float32(backend, rng):
    g = backend.from_numpy(rng.normal(size=(N, D)), np.float32)
    p = backend.tree_from_numpy(_params(rng), np.float32)
    out = backend.to_numpy(mixture_of_softmaxes_log_probs(g, p, eps=1e-8))
    assert out.dtype == np.float32
    grads = mixture_of_softmaxes_log_probs_vjp(g, p, backend.from_numpy(np.ones((N, V)), np.float32))
    assert all(backend.to_numpy(a).dtype == np.float32 for a in leaves(grads))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 5), st.data())
def test_permuting_components_leaves_probabilities_unchanged_property(N, K, V, data):
    d, d_e = 3, 2
    floats = st.floats(-3, 3)
    g = data.draw(hnp.arrays(np.float64, (N, d), elements=floats))
    p = MixtureOfSoftmaxesParams(
        data.draw(hnp.arrays(np.float64, (d, K), elements=floats)),
        data.draw(hnp.arrays(np.float64, (K, d, d_e), elements=floats)),
        data.draw(hnp.arrays(np.float64, (K, d_e), elements=floats)),
        data.draw(hnp.arrays(np.float64, (d_e, V), elements=floats)),
        data.draw(hnp.arrays(np.float64, (V,), elements=floats)),
    )
    perm = np.asarray(data.draw(st.permutations(range(K))))
    q = p._replace(prior_weight=p.prior_weight[:, perm], latent_weight=p.latent_weight[perm], latent_bias=p.latent_bias[perm])
    out = mixture_of_softmaxes_log_probs(g, p)
    np.testing.assert_allclose(mixture_of_softmaxes_log_probs(g, q), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-12)


def test_bad_input_names_the_argument(rng):
    g, p = rng.normal(size=(4, 3)), _params(rng, 3, 2, 2, 5)
    with pytest.raises(ValueError, match=r"targets has values up to 5 but .*\(entries must lie in \[0, 5\)\)"):
        mixture_of_softmaxes_nll(g, np.array([0, 1, 5, 2]), p)
    with pytest.raises(ValueError, match=r"targets has negative values \(min -1\) but .*\(entries must lie in \[0, 5\)\)"):
        mixture_of_softmaxes_nll_vjp(g, np.array([0, -1, 1, 2]), p, 1.0)
    with pytest.raises(TypeError, match="targets must have an integer dtype"):
        mixture_of_softmaxes_nll(g, np.array([0.0, 1.0, 2.0, 3.0]), p)
    with pytest.raises(ValueError, match=r"targets has shape \(3,\) but \(4,\) was expected"):
        mixture_of_softmaxes_nll(g, np.array([0, 1, 2]), p)
    with pytest.raises(TypeError, match="g must have a real floating-point dtype"):
        mixture_of_softmaxes_log_probs(g.astype(np.int64), p)
    with pytest.raises(ValueError, match=r"params.prior_weight has shape \(4, 2\) but \(3, 2\) was expected"):
        mixture_of_softmaxes_log_probs(g, p._replace(prior_weight=rng.normal(size=(4, 2))))
    with pytest.raises(ValueError, match=r"params.latent_weight has shape \(3, 3, 2\) but \(2, 3, 2\) was expected"):
        mixture_of_softmaxes_log_probs(g, p._replace(latent_weight=rng.normal(size=(3, 3, 2))))
    with pytest.raises(ValueError, match=r"params.output_weight has shape \(3, 5\) but \(2, 5\) was expected"):
        mixture_of_softmaxes_log_probs(g, p._replace(output_weight=rng.normal(size=(3, 5))))
    with pytest.raises(ValueError, match=r"params.output_bias has shape \(4,\) but \(5,\) was expected"):
        mixture_of_softmaxes_log_probs(g, p._replace(output_bias=np.zeros(4)))
    with pytest.raises(ValueError, match="g must be 2-dimensional"):
        mixture_of_softmaxes_log_probs(g[0], p)
    with pytest.raises(ValueError, match=r"cotangent has shape \(4, 4\) but \(4, 5\) was expected"):
        mixture_of_softmaxes_log_probs_vjp(g, p, np.zeros((4, 4)))
    with pytest.raises(TypeError, match="share one dtype"):
        mixture_of_softmaxes_log_probs(g.astype(np.float32), p)
    with pytest.raises(ValueError, match="eps must be None or a positive finite float"):
        mixture_of_softmaxes_log_probs(g, p, eps=0.0)
    with pytest.raises(TypeError, match="params must be a MixtureOfSoftmaxesParams"):
        mixture_of_softmaxes_log_probs(g, tuple(p))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries"):
        mixture_of_softmaxes_log_probs(torch.from_numpy(g), p)

"""The vowel experiment of Jacobs, Jordan, Nowlan & Hinton (1991): two linear experts split the vowels in pairs.

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive mixtures of local experts", Neural Computation
3(1):79-87, doi:10.1162/neco.1991.3.1.79: speaker-independent discrimination of four vowels from
the first two formants of the Peterson & Barney (1952) recordings. Their abstract: the learning
procedure "divides up a vowel discrimination task into appropriate subtasks, each of which can be
solved by a very simple expert network". The numbers printed in the paper (its table of training
and test scores and epochs) could not be checked from the material available here, so this file
pins moeref's own numbers and the qualitative finding, not a printed value.

**Data.** ``peterson_barney_pb52`` (76 speakers, 2 repetitions), the four vowels heed [i], hid [ɪ],
hod [ɑ] and hud [ʌ] (X-SAMPA ``i``, ``I``, ``A``, ``V``; the paper writes [i], [I], [a], [Λ]):
608 tokens, inputs $(F_1, F_2)$ in kHz. **Split by speaker**, deterministic: every fourth speaker
(numbers 4, 8, ..., 76: 8 men, 7 women, 4 children) is the test set (152 tokens), the other 57
speakers the training set (456 tokens); no speaker is in both.

**Model** (the 1991 one, fitted by EM): a softmax gate on $(F_1, F_2)$ and $K = 2$ linear experts
with 4 outputs, $p(y \\mid x) = \\sum_k g_k(x)\\,\\mathcal N(y \\mid B_k^\\top x + c_k, I)$, $y$ the one-hot
vowel code. The unit variance is fixed (``variance="fixed"``, the paper's eq. (1.3)); with an
estimated variance the likelihood is unbounded on one-hot targets. The training set's front
vowels ([i], [ɪ]) and back vowels ([ɑ], [ʌ]) are linearly separable in $(F_1, F_2)$, so the
unpenalised gate weights diverge (a ``GateSeparationWarning``); the gate has a ridge
$\\rho = 0.01$, and EM maximises $L - \\frac\\rho2\\lVert(W, b)\\rVert^2$. A token is classified by the
largest entry of the predictive mean $\\sum_k g_k(x)\\,(B_k^\\top x + c_k)$.

**Starts.** Four random starts from ``numpy.random.default_rng(1991)`` by
``moe_random_starts`` (scheme ``"partition"``: a random half of the training tokens per expert,
then one M-step), run by ``fit_moe`` as ``init`` + 3 explicit restarts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moeref.constant_gate import ConstantGate, ConstantGateParams
from moeref.datasets import load_dataset
from moeref.em import EMOptions
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams
from moeref.glm_experts import MultinomialLogisticExperts, MultinomialLogisticExpertsParams
from moeref.moe_em import MoEParams, fit_moe, moe_random_starts
from moeref.softmax_gate import GateSeparationWarning, SoftmaxGate, SoftmaxGateParams, fit_weighted_multinomial

VOWELS = ("i", "I", "A", "V")  # X-SAMPA: heed [i], hid [ɪ], hod [ɑ], hud [ʌ]
K = 2
RIDGE = 1e-2
SEED = 1991
N_STARTS = 4
GATE = SoftmaxGate(ridge=RIDGE)
EXPERTS = LinearGaussianExperts(covariance="isotropic", tied=True, variance="fixed")
OPTIONS = EMOptions(tol=1e-10, max_iter=1000)

# moeref's values (float64, NumPy); every start reaches the same maximum
OBJECTIVE = -1719.940797882  # penalised log-likelihood L - penalty at the maximum
LOGLIK = -1717.74563  # unpenalised L there (EM converges linearly: agreement to ~1e-5)
PENALTY = 2.19517
TRAIN_CORRECT, N_TRAIN = 422, 456  # 92.5 %
TEST_CORRECT, N_TEST = 140, 152  # 92.1 %


def vowel_data():
    """``(x (608, 2) in kHz, labels (608,) in 0..3, test mask (608,))``, rows in file order."""
    d = load_dataset("peterson_barney_pb52")
    keep = np.isin(d["vowel"], VOWELS)
    x = np.column_stack([d["f1"][keep], d["f2"][keep]]).astype(np.float64) / 1000.0
    labels = np.array([VOWELS.index(v) for v in d["vowel"][keep]])
    test = d["speaker"][keep] % 4 == 0
    return x, labels, test


def template():
    return MoEParams(
        SoftmaxGateParams(np.zeros((2, K)), np.zeros(K)),
        LinearGaussianExpertsParams(np.zeros((K, 2, 4)), np.zeros((K, 4)), np.ones(1)),
    )


def fit_vowels(x, labels, test, *, gate=GATE):
    xt, yt = x[~test], np.eye(4)[labels[~test]]
    starts = moe_random_starts(xt, yt, gate, EXPERTS, template(), np.random.default_rng(SEED), N_STARTS)
    return fit_moe(xt, yt, gate, EXPERTS, starts[0].params, restarts=[s.params for s in starts[1:]], options=OPTIONS)


def predict(params, x):
    """``(predicted class (N,), gate probabilities (N, K))``: argmax of the predictive mean."""
    g = np.exp(GATE.log_weights(params.gate, x))  # (N, K)
    mean = np.einsum("nk,nkc->nc", g, EXPERTS.mean(params.experts, x))  # (N, 4)
    return np.argmax(mean, axis=1), g


@pytest.fixture(scope="module")
def data():
    return vowel_data()


@pytest.fixture(scope="module")
def fit(data):
    return fit_vowels(*data)


def test_the_split_is_by_speaker_and_deterministic(data):
    x, labels, test = data
    d = load_dataset("peterson_barney_pb52")
    speakers = d["speaker"][np.isin(d["vowel"], VOWELS)]
    assert x.shape == (608, 2) and int(test.sum()) == N_TEST and int((~test).sum()) == N_TRAIN
    assert not set(speakers[test]) & set(speakers[~test])
    assert sorted(set(speakers[test])) == list(range(4, 77, 4))
    assert np.bincount(labels[test], minlength=4).tolist() == [38, 38, 38, 38]


def test_every_start_reaches_the_same_maximum(fit):
    assert len(fit.restarts) == N_STARTS and fit.decreases == ()
    for rec in fit.restarts:
        assert rec.error is None and rec.converged and 40 <= rec.n_iter <= 150
        assert rec.objective == pytest.approx(OBJECTIVE, abs=1e-7)
    assert fit.penalised_loglik == pytest.approx(OBJECTIVE, abs=1e-7)
    assert fit.loglik == pytest.approx(LOGLIK, abs=1e-4)
    assert fit.penalty == pytest.approx(PENALTY, abs=1e-4)
    assert fit.n_free_parameters == 3 + 2 * 4 * 3  # gate (K-1)(d+1), experts K*D*(d+1); the variance is fixed


def test_accuracy_on_the_training_and_test_speakers(fit, data):
    x, labels, test = data
    pred, _ = predict(fit.params, x)
    assert int(np.sum(pred[~test] == labels[~test])) == TRAIN_CORRECT
    assert int(np.sum(pred[test] == labels[test])) == TEST_CORRECT
    assert TEST_CORRECT / N_TEST >= 0.92
    # every error confuses the two vowels of a pair, never a front vowel with a back one
    assert np.all((pred < 2) == (labels < 2))


def test_each_expert_owns_a_pair_of_vowels(fit, data):
    """Front vowels [i], [ɪ] to one expert, back vowels [ɑ], [ʌ] to the other, by every measure."""
    x, labels, test = data
    tau = np.asarray(fit.responsibilities)  # (456, K), training tokens
    share = np.array([tau[labels[~test] == c].mean(axis=0) for c in range(4)])  # (4 vowels, K)
    front = int(np.argmax(share[0]))
    owner = [front, front, 1 - front, 1 - front]
    for c in range(4):
        assert share[c, owner[c]] > 0.999, (VOWELS[c], share[c])
    _, g = predict(fit.params, x)
    for c in range(4):  # the gate's argmax region holds every token of the vowel, training and test
        assert np.all(np.argmax(g[labels == c], axis=1) == owner[c]), VOWELS[c]
    # and each expert is a discriminator of its pair: its outputs for the other pair stay near 0
    w, b = np.asarray(fit.params.experts.weight), np.asarray(fit.params.experts.bias)  # (K, 2, 4), (K, 4)
    assert np.max(np.abs(w[front][:, 2:])) < 1e-2 and np.max(np.abs(b[front][2:])) < 1e-2
    assert np.max(np.abs(w[1 - front][:, :2])) < 1e-2 and np.max(np.abs(b[1 - front][:2])) < 1e-2
    assert np.min(np.abs(w[front][:, :2])) > 0.5 and np.min(np.abs(w[1 - front][:, 2:])) > 1.0


def test_one_linear_expert_cannot_do_it_and_a_linear_softmax_classifier_does_a_little_worse(data):
    x, labels, test = data
    xt, yt = x[~test], np.eye(4)[labels[~test]]
    one = MoEParams(ConstantGateParams(np.ones(1)), LinearGaussianExpertsParams(np.zeros((1, 2, 4)), np.zeros((1, 4)), np.ones(1)))
    single = fit_moe(xt, yt, ConstantGate(), EXPERTS, one, options=OPTIONS)
    pred = np.argmax(EXPERTS.mean(single.params.experts, x)[:, 0, :], axis=1)
    assert np.mean(pred[test] == labels[test]) < 0.6  # 82 / 152: a linear map cannot rank 4 classes in 2-D
    softmax = fit_weighted_multinomial(xt, yt, None, np.zeros((2, 4)), np.zeros(4), ridge=RIDGE)
    pred = np.argmax(x @ softmax.weight + softmax.bias, axis=1)
    assert int(np.sum(pred[test] == labels[test])) == 138 < TEST_CORRECT


def test_multinomial_logistic_experts_split_the_same_pairs_more_softly(data):
    """Experts that are linear softmax classifiers (each could classify all four vowels alone).

    With the same ridge on the gate and on the experts, the first random start, and a loose
    tolerance (EM converges slowly here: 335 iterations to a relative change of 1e-8, all four
    starts to the same maximum, -116.6509425): the same front/back split, with softer ownership.
    """
    x, labels, test = data
    xt, yt = x[~test], np.eye(4)[labels[~test]]
    gate, experts = SoftmaxGate(ridge=RIDGE), MultinomialLogisticExperts(ridge=RIDGE)
    zero = MoEParams(SoftmaxGateParams(np.zeros((2, K)), np.zeros(K)),
                     MultinomialLogisticExpertsParams(np.zeros((K, 2, 4)), np.zeros((K, 4))))
    (start,) = moe_random_starts(xt, yt, gate, experts, zero, np.random.default_rng(SEED), 1)
    fit = fit_moe(xt, yt, gate, experts, start.params, options=EMOptions(tol=1e-4, max_iter=1000))
    assert fit.converged and fit.decreases == ()
    assert fit.penalised_loglik == pytest.approx(-116.6509425, abs=1e-2)
    g = np.exp(gate.log_weights(fit.params.gate, x))  # (608, K)
    pred = np.argmax(np.einsum("nk,nkc->nc", g, experts.mean(fit.params.experts, x)), axis=1)
    assert int(np.sum(pred[~test] == labels[~test])) == 424 and int(np.sum(pred[test] == labels[test])) == 139
    tau = np.asarray(fit.responsibilities)
    share = np.array([tau[labels[~test] == c].mean(axis=0) for c in range(4)])  # (4, K)
    front = int(np.argmax(share[0]))
    assert share[0, front] > 0.99 and share[1, front] > 0.9  # [i], [ɪ]
    assert share[2, 1 - front] > 0.99 and share[3, 1 - front] > 0.85  # [ɑ], [ʌ]


def test_without_the_ridge_the_gate_separates_front_from_back(data):
    x, labels, test = data
    with pytest.warns(GateSeparationWarning):
        fit = fit_vowels(x, labels, test, gate=SoftmaxGate())
    assert fit.penalty == 0.0 and fit.loglik > LOGLIK  # the penalised maximum is a little below
    tau = np.asarray(fit.responsibilities)
    front = int(np.argmax(tau[labels[~test] == 0].mean(axis=0)))
    assert np.all(np.argmax(tau[labels[~test] < 2], axis=1) == front)
    assert np.all(np.argmax(tau[labels[~test] >= 2], axis=1) == 1 - front)


def test_the_fit_on_every_backend(backend, data):
    if backend.name == "jax":
        pytest.skip("JAX compiles every op of the gate's Newton loops (~20 s); the families are checked on JAX in their own tests")
    x, labels, test = data
    xt, yt = x[~test], np.eye(4)[labels[~test]]
    (start,) = moe_random_starts(xt, yt, GATE, EXPERTS, template(), np.random.default_rng(SEED), 1)
    opts = EMOptions(max_iter=10, warn_not_converged=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = fit_moe(xt, yt, GATE, EXPERTS, start.params, options=opts)
        got = fit_moe(backend.from_numpy(xt), backend.from_numpy(yt), GATE, EXPERTS, backend.tree_from_numpy(start.params), options=opts)
    np.testing.assert_allclose(got.loglik_trace, ref.loglik_trace, rtol=1e-10)
    for a, b in zip(backend.tree_to_numpy(tuple(got.params.gate) + tuple(got.params.experts)),
                    tuple(ref.params.gate) + tuple(ref.params.experts)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)

"""Figure for docs/classical/vowels.md: two linear experts on the Peterson & Barney vowels, and the gate's split.

The experiment of tests/test_vowels_reproduction.py (Jacobs, Jordan, Nowlan & Hinton 1991): the
vowels heed [i], hid [ɪ], hod [ɑ], hud [ʌ], first two formants in kHz, every fourth speaker held out;
a softmax gate (ridge 0.01) and two linear experts with fixed unit variance on the one-hot vowel
code, fitted by EM (fit_moe) from four random starts of numpy.random.default_rng(1991). The left
panel is the formant plane in the orientation of a vowel chart (F2 decreasing to the right, F1
increasing downwards), shaded by the gate's argmax region, with the gate's 0.5 line; training tokens
are dots, test tokens crosses, coloured by vowel. The right panel shades the mixture's predicted
vowel (argmax of the predictive mean) over the same plane.

Run from the repository root:  python docs/scripts/vowels_figure.py
Writes docs/img/vowels_experts.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.datasets import load_dataset  # noqa: E402
from moeref.em import EMOptions  # noqa: E402
from moeref.gaussian_experts import LinearGaussianExperts, LinearGaussianExpertsParams  # noqa: E402
from moeref.moe_em import MoEParams, fit_moe, moe_random_starts  # noqa: E402
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "vowels_experts.png"
VOWELS = ("i", "I", "A", "V")  # X-SAMPA
NAMES = ("[i] heed", "[ɪ] hid", "[ɑ] hod", "[ʌ] hud")
COLOURS = ("#1f77b4", "#2ca02c", "#d62728", "#ff7f0e")
PALE_VOWEL = ("#c6dbef", "#c7e9c0", "#fcbba1", "#fdd0a2")
PALE_EXPERT = ("#e5e5f5", "#f5ebdc")
GATE = SoftmaxGate(ridge=1e-2)
EXPERTS = LinearGaussianExperts(covariance="isotropic", tied=True, variance="fixed")


def vowel_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = load_dataset("peterson_barney_pb52")
    keep = np.isin(d["vowel"], VOWELS)
    x = np.column_stack([d["f1"][keep], d["f2"][keep]]).astype(np.float64) / 1000.0  # (608, 2) kHz
    labels = np.array([VOWELS.index(v) for v in d["vowel"][keep]])
    return x, labels, d["speaker"][keep] % 4 == 0


def fit(x: np.ndarray, labels: np.ndarray, test: np.ndarray):
    xt, yt = x[~test], np.eye(4)[labels[~test]]
    template = MoEParams(
        SoftmaxGateParams(np.zeros((2, 2)), np.zeros(2)),
        LinearGaussianExpertsParams(np.zeros((2, 2, 4)), np.zeros((2, 4)), np.ones(1)),
    )
    starts = moe_random_starts(xt, yt, GATE, EXPERTS, template, np.random.default_rng(1991), 4)
    return fit_moe(xt, yt, GATE, EXPERTS, starts[0].params, restarts=[s.params for s in starts[1:]],
                   options=EMOptions(tol=1e-10, max_iter=1000))


def predict(params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = np.exp(GATE.log_weights(params.gate, x))  # (N, 2)
    mean = np.einsum("nk,nkc->nc", g, EXPERTS.mean(params.experts, x))  # (N, 4)
    return np.argmax(mean, axis=1), g


def scatter(ax, x, labels, test) -> None:
    for c in range(4):
        tr, te = (labels == c) & ~test, (labels == c) & test
        ax.scatter(x[tr, 1], x[tr, 0], s=9, color=COLOURS[c], label=NAMES[c], linewidths=0)
        ax.scatter(x[te, 1], x[te, 0], s=14, color=COLOURS[c], marker="x", linewidths=0.9)
    ax.set_xlim(3.6, 0.6)  # F2 decreasing to the right
    ax.set_ylim(1.45, 0.15)  # F1 increasing downwards
    ax.set_xlabel("$F_2$ (kHz)")


def main() -> None:
    x, labels, test = vowel_data()
    res = fit(x, labels, test)
    pred, _ = predict(res.params, x)
    acc_tr, acc_te = np.mean(pred[~test] == labels[~test]), np.mean(pred[test] == labels[test])

    f2, f1 = np.meshgrid(np.linspace(0.6, 3.6, 301), np.linspace(0.15, 1.45, 261))
    grid = np.column_stack([f1.ravel(), f2.ravel()])  # (G, 2) as (F1, F2)
    grid_pred, grid_g = predict(res.params, grid)
    front = int(np.argmax(np.asarray(res.responsibilities)[labels[~test] == 0].mean(axis=0)))  # the expert of [i]
    owner = np.where(np.argmax(grid_g, axis=1) == front, 0, 1).reshape(f1.shape)  # 0: front-vowel expert

    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.0), sharey=True)
    ax = axes[0]
    ax.contourf(f2, f1, owner, levels=[-0.5, 0.5, 1.5], colors=PALE_EXPERT)
    ax.contour(f2, f1, grid_g[:, front].reshape(f1.shape), levels=[0.5], colors="0.3", linewidths=1.0)
    scatter(ax, x, labels, test)
    ax.text(3.5, 1.0, "gate region of\nexpert A ([i], [ɪ])", fontsize=8, va="bottom", color="0.25")
    ax.text(1.35, 0.22, "gate region of\nexpert B ([ɑ], [ʌ])", fontsize=8, va="top", color="0.25")
    ax.set_ylabel("$F_1$ (kHz)")
    ax.set_title("gate: argmax $g_k(x)$ (line: $g_k = 0.5$)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", frameon=True, framealpha=0.9)

    ax = axes[1]
    ax.contourf(f2, f1, grid_pred.reshape(f1.shape), levels=[-0.5, 0.5, 1.5, 2.5, 3.5], colors=PALE_VOWEL)
    ax.contour(f2, f1, grid_g[:, front].reshape(f1.shape), levels=[0.5], colors="0.3", linewidths=1.0)
    scatter(ax, x, labels, test)
    ax.set_title(f"predicted vowel (train {acc_tr:.1%}, test {acc_te:.1%})", fontsize=10)

    fig.suptitle("Two linear experts and a softmax gate fitted by EM: dots train, crosses test speakers", fontsize=10)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=85)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB); train {acc_tr:.4f}, test {acc_te:.4f}, "
          f"{res.n_iter} iterations, L = {res.loglik:.5f}, L - penalty = {res.penalised_loglik:.9f}")


if __name__ == "__main__":
    main()

"""Figure for docs/formulations/local_experts.md: which expert owns which region, before and after training.

Two linear local experts are fitted by gradient ascent on the log-likelihood of a 1-D task with
two regimes (y = 2 + x for x < 0, y = -2 + 2x for x > 0). Each panel colours every training
case by the expert with the largest posterior responsibility h_i, draws each expert's mean line
mu_i(x) and, below, the gate probabilities w_i(x).

Run from the repository root:  python docs/scripts/local_experts_figure.py
Writes docs/img/local_experts_specialisation.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.experts import LinearExpertsParams  # noqa: E402
from moeref.gates import LinearSoftmaxGateParams, linear_softmax_gate  # noqa: E402
from moeref.local_experts import (  # noqa: E402
    LinearLocalExpertsParams,
    fit_local_experts,
    local_experts_means,
    local_experts_posteriors,
)

OUT = Path(__file__).resolve().parents[1] / "img" / "local_experts_specialisation.png"
COLOURS = ("#1f77b4", "#d62728")
VARIANCE = 0.25


def task(rng: np.random.Generator, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1.0, 1.0, size=(n, 1))
    y = np.where(x[:, 0] < 0, 2.0 + x[:, 0], -2.0 + 2.0 * x[:, 0])[:, None] + 0.1 * rng.normal(size=(n, 1))
    return x, y


def panel(ax_top, ax_bottom, x, y, params, title):
    h = local_experts_posteriors(x, y, params, variance=VARIANCE)  # (N, 2)
    owner = np.argmax(h, axis=1)
    grid = np.linspace(-1.0, 1.0, 201)[:, None]
    mu = local_experts_means(grid, params)[:, :, 0]  # (201, 2)
    w = linear_softmax_gate(grid, params.gate)  # (201, 2)
    for i, c in enumerate(COLOURS):
        sel = owner == i
        ax_top.scatter(x[sel, 0], y[sel, 0], s=12, color=c, label=f"owned by expert {i + 1}")
        ax_top.plot(grid[:, 0], mu[:, i], "--", color=c, lw=1.5, label=f"$\\mu_{i + 1}(x)$")
        ax_bottom.plot(grid[:, 0], w[:, i], color=c, lw=2, label=f"$w_{i + 1}(x)$")
    ax_top.set_title(title, fontsize=10)
    ax_top.set_ylim(-4.5, 3.5)
    ax_top.axvline(0.0, color="0.7", lw=0.8)
    ax_bottom.axvline(0.0, color="0.7", lw=0.8)
    ax_bottom.set_ylim(-0.05, 1.05)
    ax_bottom.set_xlabel("$x$")


def main() -> None:
    rng = np.random.default_rng(20261129)
    x, y = task(rng)
    p0 = LinearLocalExpertsParams(
        LinearSoftmaxGateParams(0.1 * rng.normal(size=(1, 2)), np.zeros(2)),
        LinearExpertsParams(0.1 * rng.normal(size=(2, 1, 1)), 0.1 * rng.normal(size=(2, 1))),
    )
    fit = fit_local_experts(x, y, p0, learning_rate=0.5, steps=300, variance=VARIANCE)

    fig, axes = plt.subplots(2, 2, figsize=(8, 4.8), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    panel(axes[0, 0], axes[1, 0], x, y, p0, f"before training (mean log-lik. {fit.log_likelihood[0]:.2f})")
    panel(axes[0, 1], axes[1, 1], x, y, fit.params, f"after 300 steps (mean log-lik. {fit.log_likelihood[-1]:.2f})")
    axes[0, 0].set_ylabel("$y$")
    axes[1, 0].set_ylabel("gate")
    axes[0, 1].legend(fontsize=7, loc="lower right", frameon=False)
    axes[1, 1].legend(fontsize=7, loc="center right", frameon=False)
    fig.suptitle("Adaptive mixture of two linear local experts: points coloured by argmax posterior $h_i$", fontsize=10)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()

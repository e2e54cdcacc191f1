"""Figure for docs/sparse/aux_losses.md: expert load with and without the load-balancing loss.

A tiny Switch-style layer (a linear router, top-1 routing, E = 8 affine experts, output
y = p_{e*}(x) * (a_{e*}^T x + c_{e*})) is fitted by plain gradient descent to a regression task on
synthetic clustered data: 8 Gaussian clusters on a circle, each with its own affine target. The
same run (same data, same initialisation) is repeated with the Switch load-balancing loss
alpha * E * sum_i f_i P_i added to the squared error. Each panel stacks the fraction of tokens
routed to each expert over the training steps.

Gradients: the router's through moeref.core.softmax_vjp and moeref.aux_losses.load_balancing_loss_vjp;
the experts' by hand (NumPy). The selection (top-1) is piecewise constant, so only the router
probability of the chosen expert carries the task gradient to the router.

Run from the repository root:  python docs/scripts/aux_loss_figure.py
Writes docs/img/aux_loss_balance.png.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

from moeref.aux_losses import load_balancing_loss, load_balancing_loss_vjp  # noqa: E402
from moeref.core import softmax, softmax_vjp, top_k  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "aux_loss_balance.png"
E, CLUSTERS, T, STEPS = 8, 8, 512, 600
ROUTER_STEP, EXPERT_STEP = 0.1, 0.3
ALPHA = 1.0  # weight of the balance loss (the squared error here is O(1), not a cross-entropy)


def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    angle = 2 * np.pi * np.arange(CLUSTERS) / CLUSTERS
    centres = 3.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (C, 2)
    cluster = rng.integers(0, CLUSTERS, T)
    x = centres[cluster] + 0.5 * rng.normal(size=(T, 2))  # (T, 2)
    slope, offset = rng.normal(size=(CLUSTERS, 2)), 2.0 * rng.normal(size=CLUSTERS)
    y = np.sum(x * slope[cluster], axis=1) + offset[cluster]  # (T,)
    return x, y


def train(x: np.ndarray, y: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Gradient descent; returns the per-step token fractions (STEPS, E), final MSE and balance loss."""
    W, b = 0.01 * rng.normal(size=(2, E)), np.zeros(E)  # router
    A, c = 0.01 * rng.normal(size=(E, 2)), np.zeros(E)  # experts
    rows = np.arange(T)
    fractions = []
    for _ in range(STEPS):
        logits = x @ W + b  # (T, E)
        p = softmax(logits)
        _, chosen = top_k(logits, 1)  # (T, 1), ties to the lower index
        e = chosen[:, 0]
        gate = p[rows, e]  # (T,)
        expert_out = np.sum(x * A[e], axis=1) + c[e]  # (T,)
        residual = gate * expert_out - y
        d_out = 2.0 * residual / T  # d MSE / d output
        d_gate, d_expert = d_out * expert_out, d_out * gate
        dA = np.stack([d_expert[e == i] @ x[e == i] for i in range(E)])  # (E, 2), a loop over experts
        dc = np.array([d_expert[e == i].sum() for i in range(E)])
        d_p = np.zeros_like(p)
        d_p[rows, e] = d_gate
        d_logits = softmax_vjp(p, d_p)  # (T, E)
        if alpha:
            d_logits = d_logits + load_balancing_loss_vjp(logits, chosen, alpha).logits
        W, b = W - ROUTER_STEP * x.T @ d_logits, b - ROUTER_STEP * d_logits.sum(axis=0)
        A, c = A - EXPERT_STEP * dA, c - EXPERT_STEP * dc
        fractions.append(np.bincount(e, minlength=E) / T)
    return np.array(fractions), float(np.mean(residual**2)), float(load_balancing_loss(logits, chosen))


def main() -> None:
    x, y = data(np.random.default_rng(0))
    runs = {alpha: train(x, y, alpha, np.random.default_rng(1)) for alpha in (0.0, ALPHA)}
    colours = plt.get_cmap("tab10").colors[:E]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=True)
    for ax, (alpha, (fractions, mse, balance)) in zip(axes, runs.items()):
        ax.stackplot(np.arange(1, STEPS + 1), fractions.T, colors=colours, labels=[f"expert {i}" for i in range(E)])
        title = "task loss only" if alpha == 0 else rf"task loss + {alpha:g} $\times$ balance loss"
        used = int(np.sum(fractions[-1] >= 0.02))
        ax.set_title(
            f"{title}\nfinal step: {used}/{E} experts hold at least 2% of the tokens, largest share {fractions[-1].max():.2f}\n"
            f"balance loss $E\\,\\Sigma_i f_i P_i$ = {balance:.2f} (1 when balanced), task MSE {mse:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("gradient step")
        ax.set_xlim(1, STEPS)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("fraction of tokens per expert (stacked)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    # a 64-colour palette keeps the file small (the stacked areas flicker step to step)
    Image.open(buffer).convert("RGB").quantize(colors=64).save(OUT, optimize=True)
    print(f"wrote {OUT}")
    for alpha, (fractions, mse, balance) in runs.items():
        print(f"alpha={alpha:g}: final fractions {np.round(fractions[-1], 3).tolist()}, MSE {mse:.3f}, balance loss {balance:.3f}")


if __name__ == "__main__":
    main()

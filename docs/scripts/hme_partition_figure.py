"""Figure for docs/classical/hme_em.md: how a depth-2 HME fitted by EM partitions a 2-D input space.

The data: 400 inputs uniform on [-3, 3]^2 and a response made of four linear pieces on a
hierarchical partition (first x1 < 0 or > 0, then x2 < 1 on the left, x2 < -1 on the right), with
noise sd 0.1. A binary tree of depth 2 (four linear experts) is fitted by `fit_hme` (shared variance
estimated, a small gate ridge) from a generic start: near-zero gates and experts fitted to the four
quadrants. The left panel colours the plane by the leaf with the largest path prior pi_p(x) (the
gates alone) and overlays the data coloured by their largest path posterior h_p (gates and experts);
the dashed lines are the true boundaries. The right panel is the log-likelihood trace.

Run from the repository root:  python docs/scripts/hme_partition_figure.py
Writes docs/img/hme_partition.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from moeref.em import EMOptions  # noqa: E402
from moeref.experts import LinearExpertsParams  # noqa: E402
from moeref.hierarchical_moe import HMEParams, hme_posteriors, hme_priors  # noqa: E402
from moeref.hme_em import fit_hme  # noqa: E402
from moeref.softmax_gate import SoftmaxGate  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "hme_partition.png"
COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2")
PALE = ("#c9d5ea", "#cde6d3", "#efcbcc", "#d8d2e8")


def region(x: np.ndarray) -> np.ndarray:
    """The true piece of each input: 0/1 on the left (x2 below/above 1), 2/3 on the right (below/above -1)."""
    left = x[:, 0] < 0
    return np.where(left, np.where(x[:, 1] < 1.0, 0, 1), np.where(x[:, 1] < -1.0, 2, 3))


def task(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-3.0, 3.0, size=(n, 2))
    coef = np.array([[1.0, 2.0, 0.0], [-2.0, 0.5, 4.0], [0.5, -1.5, -3.0], [2.0, 1.0, 1.0]])  # (a1, a2, c) per piece
    r = region(x)
    y = np.sum(coef[r, :2] * x, axis=1) + coef[r, 2] + 0.1 * rng.normal(size=n)
    return x, y[:, None]


def quadrant_init(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> HMEParams:
    quad = 2 * (x[:, 0] > 0) + (x[:, 1] > 0)
    x1 = np.column_stack([x, np.ones(len(x))])
    coef = np.array([np.linalg.lstsq(x1[quad == q], y[quad == q], rcond=None)[0] for q in range(4)])  # (4, 3, 1)
    return HMEParams(
        (0.01 * rng.normal(size=(1, 2, 2)), 0.01 * rng.normal(size=(2, 2, 2))),
        (np.zeros((1, 2)), np.zeros((2, 2))),
        LinearExpertsParams(coef[:, :2, :], coef[:, 2, :]),
    )


def main() -> None:
    rng = np.random.default_rng(7)
    x, y = task(rng)
    init = quadrant_init(x, y, rng)
    fit = fit_hme(x, y, init, variance=1.0, estimate_variance=True, gate=SoftmaxGate(ridge=1e-2),
                  options=EMOptions(tol=1e-9, max_iter=500))

    g = np.linspace(-3.0, 3.0, 241)
    gx, gy = np.meshgrid(g, g)
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    owner_grid = np.argmax(hme_priors(grid, fit.params).paths, axis=1).reshape(gx.shape)
    owner_data = np.argmax(hme_posteriors(x, y, fit.params, variance=fit.variance).paths, axis=1)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.6, 4.0), gridspec_kw={"width_ratios": [1.25, 1.0]})
    ax.imshow(owner_grid, origin="lower", extent=(-3, 3, -3, 3), cmap=ListedColormap(PALE), vmin=-0.5, vmax=3.5,
              interpolation="nearest")
    for p, c in enumerate(COLOURS):
        sel = owner_data == p
        ax.scatter(x[sel, 0], x[sel, 1], s=7, color=c, label=f"leaf {p} (path {p // 2}{p % 2})")
    ax.plot([0, 0], [-3, 3], "k--", lw=0.8)
    ax.plot([-3, 0], [1, 1], "k--", lw=0.8)
    ax.plot([0, 3], [-1, -1], "k--", lw=0.8)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("argmax path prior (shading), argmax posterior (points)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.9, markerscale=1.5)

    ax2.plot(np.arange(len(fit.loglik_trace)), fit.loglik_trace, "k.-", lw=1.2, ms=4)
    ax2.set_xlabel("EM iteration")
    ax2.set_ylabel("penalised log-likelihood")
    ax2.set_title(f"depth-2 HME, {fit.n_iter} iterations, $\\hat\\sigma$ = {np.sqrt(fit.variance):.3f}", fontsize=9)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB); converged={fit.converged}, n_iter={fit.n_iter}, "
          f"loglik={fit.loglik:.3f}, sigma={np.sqrt(fit.variance):.4f}, decreases={fit.decreases}")
    print("slopes/intercepts:", np.round(np.column_stack([fit.params.experts.weight[:, :, 0], fit.params.experts.bias]), 2).tolist())


if __name__ == "__main__":
    main()

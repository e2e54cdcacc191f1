"""Figure for docs/routing/base.md: greedy top-1 routing versus the balanced assignment of a BASE layer.

48 tokens in the plane, drawn around two clusters, and 4 expert centroids. Greedy routing (the
BASE layer at evaluation) sends each token to the centroid with the largest dot product, which
overloads some experts; the balanced assignment (training) gives every expert exactly 12 tokens
while maximising the total affinity. The right panel shows the per-expert loads.

Run from the repository root:  python docs/scripts/base_assignment_figure.py
Writes docs/img/base_assignment.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.balanced_assignment import assignment_value, balanced_assignment  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "base_assignment.png"
T, E = 48, 4
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]


def main() -> None:
    rng = np.random.default_rng(20261129)
    x = np.concatenate([rng.normal([1.6, 0.4], 0.45, size=(30, 2)), rng.normal([-0.6, 1.2], 0.45, size=(18, 2))])
    angles = np.deg2rad([10.0, 100.0, 190.0, 280.0])
    centroids = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (E, 2)
    a = x @ centroids.T  # (T, E)
    greedy = np.argmax(a, axis=1)
    balanced = np.asarray(balanced_assignment(a).expert_index)

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for ax, assign, title in ((axes[0], greedy, "greedy top-1 (evaluation)"), (axes[1], balanced, "balanced assignment (training)")):
        for e in range(E):
            pts = x[assign == e]
            ax.scatter(pts[:, 0], pts[:, 1], s=14, color=COLORS[e])
            ax.annotate("", xy=1.8 * centroids[e], xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=COLORS[e], lw=1.6))
        ax.set_title(f"{title}\ntotal affinity {float(assignment_value(a, assign)):.2f}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-2.3, 3.0)
        ax.set_ylim(-2.1, 2.6)
        ax.set_xticks([])
        ax.set_yticks([])
    experts = np.arange(E)
    axes[2].bar(experts - 0.2, np.bincount(greedy, minlength=E), width=0.4, color="#bbbbbb", label="greedy")
    axes[2].bar(experts + 0.2, np.bincount(balanced, minlength=E), width=0.4, color=COLORS, label="balanced")
    axes[2].axhline(T / E, color="k", ls="--", lw=1, label="$T/E = 12$")
    axes[2].set_xticks(experts)
    axes[2].set_xlabel("expert")
    axes[2].set_ylabel("tokens")
    axes[2].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

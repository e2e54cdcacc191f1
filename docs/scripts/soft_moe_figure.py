"""Figure for docs/routing/soft_moe.md: Soft MoE dispatch and combine weights, and its non-causality.

16 tokens in 4 loose clusters, 4 experts with 2 slots each (capacity factor 0.5), the vmoe
preset (L2-normalised tokens and slots, learned scale 8). Each slot's parameter vector points
near one cluster centre, so the weights show a block pattern. Left: the dispatch weights D (a
softmax over tokens, every column sums to 1). Middle: the combine weights C (a softmax over
slots, every row sums to 1). Right: how much each token's output moves when only the last token
is changed (every earlier token moves: the layer is not causal).

Run from the repository root:  python docs/scripts/soft_moe_figure.py
Writes docs/img/soft_moe_weights.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.expert_ffn import ExpertFFNParams  # noqa: E402
from moeref.soft_moe import SoftMoEParams, vmoe, soft_moe_layer  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "soft_moe_weights.png"
M, D, N, P, I = 16, 8, 4, 2, 16


def main() -> None:
    rng = np.random.default_rng(20261129)
    centres = rng.normal(size=(N, D))
    cluster = np.repeat(np.arange(N), M // N)  # tokens 0-3 in cluster 0, ...
    x = centres[cluster] + 0.6 * rng.normal(size=(M, D))
    phi = centres.T[:, :, None] + 0.5 * rng.normal(size=(D, N, P))  # (d, n, p): slots of expert e near centre e
    experts = ExpertFFNParams(
        w_in=rng.normal(size=(N, D, I)) / np.sqrt(D),
        w_out=rng.normal(size=(N, I, D)) / np.sqrt(I),
        b_in=np.zeros((N, I)),
        b_out=np.zeros((N, D)),
    )
    params = SoftMoEParams(phi=phi, experts=experts, scale=np.asarray(8.0))
    options = vmoe(capacity_factor=0.5)  # p = round(0.5 * 16 / 4) = 2
    out = soft_moe_layer(x, params, options)

    x_later = x.copy()
    x_later[-1] = centres[0]  # move only the last token, to cluster 0
    delta = np.linalg.norm(soft_moe_layer(x_later, params, options).y - out.y, axis=1)

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    slot_labels = [f"{e},{s}" for e in range(N) for s in range(P)]
    for ax, w, title in (
        (axes[0], out.dispatch_weights, "dispatch $D$ (columns sum to 1)"),
        (axes[1], out.combine_weights, "combine $C$ (rows sum to 1)"),
    ):
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=float(w.max()), aspect="auto")
        ax.set_xticks(range(N * P))
        ax.set_xticklabels(slot_labels, fontsize=7)
        ax.set_xlabel("slot (expert, slot)")
        ax.set_ylabel("token")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    axes[2].barh(np.arange(M), delta, color="#d62728")
    axes[2].set_ylim(M - 0.5, -0.5)
    axes[2].set_yticks(range(0, M, 2))
    axes[2].set_xscale("log")
    axes[2].set_ylabel("token")
    axes[2].set_xlabel(r"$\|\Delta y_t\|$")
    axes[2].set_title("change only the last token", fontsize=10)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=80)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB)")
    print("dispatch column sums:", np.round(out.dispatch_weights.sum(0), 12).tolist())
    print("combine row sums:", np.round(out.combine_weights.sum(1), 12).tolist())
    print("smallest |delta y_t| over the earlier tokens:", float(delta[:-1].min()))


if __name__ == "__main__":
    main()

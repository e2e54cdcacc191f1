"""Figure for docs/sparse/capacity.md: expert load before and after capacity dropping.

A top-2 softmax router with a skewed bias (experts 0 and 1 are popular) routes 64 tokens to 8
experts. With capacity factor 1.25 (C = ceil(1.25 * 2 * 64 / 8) = 20) the popular experts
overflow. The left panel shows each expert's load before and after dropping; the right panel
shows which ranks lose their routes under the rank-major (GShard) and token-major (Megablocks)
priority orders.

Run from the repository root:  python docs/scripts/capacity_figure.py
Writes docs/img/capacity_load.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.capacity import CapacityOptions, apply_capacity  # noqa: E402
from moeref.router import RouterOptions, RouterParams, route  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "capacity_load.png"
T, D, E, K = 64, 16, 8, 2


def main() -> None:
    rng = np.random.default_rng(20261129)
    x = rng.normal(size=(T, D))
    params = RouterParams(0.3 * rng.normal(size=(D, E)), np.array([2.0, 1.5, 0.5, 0.0, 0.0, -0.5, -1.0, -1.5]))
    routes = route(x, params, RouterOptions(k=K, normalize="sum")).routes

    results = {}
    for priority in ("rank_major", "token_major"):
        results[priority] = apply_capacity(routes, E, CapacityOptions(capacity_factor=1.25, priority=priority))
    report = results["rank_major"].report
    C = report.capacity

    fig, (ax_load, ax_rank) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.6, 1]})
    experts = np.arange(E)
    ax_load.bar(experts - 0.2, report.counts_before[0], width=0.4, color="#bbbbbb", label="routes chosen")
    ax_load.bar(experts + 0.2, report.counts_after[0], width=0.4, color="#1f77b4", label="routes kept")
    ax_load.axhline(C, color="#d62728", ls="--", lw=1.2, label=f"capacity $C = {C}$")
    ax_load.set_xticks(experts)
    ax_load.set_xlabel("expert")
    ax_load.set_ylabel("routes (of $Tk = 128$)")
    ax_load.set_title("load per expert, capacity factor 1.25", fontsize=10)
    ax_load.legend(fontsize=8, frameon=False)

    labels = ("rank-major\n(GShard)", "token-major\n(Megablocks)")
    for i, priority in enumerate(("rank_major", "token_major")):
        dropped = np.asarray(~results[priority].routes.kept)  # (T, k)
        ax_rank.bar(i - 0.2, dropped[:, 0].sum(), width=0.4, color="#ff7f0e", label="rank 0 (first choice)" if i == 0 else None)
        ax_rank.bar(i + 0.2, dropped[:, 1].sum(), width=0.4, color="#9467bd", label="rank 1 (second choice)" if i == 0 else None)
    ax_rank.set_xticks([0, 1])
    ax_rank.set_xticklabels(labels, fontsize=8)
    ax_rank.set_ylabel("dropped routes")
    ax_rank.set_title("which choices are dropped", fontsize=10)
    top = max(int(np.asarray(~r.routes.kept).sum(axis=0).max()) for r in results.values())
    ax_rank.set_ylim(0, 1.45 * top)
    ax_rank.legend(fontsize=8, frameon=False, loc="upper center")

    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB); C = {C}")
    for priority, r in results.items():
        print(priority, "dropped by rank:", np.asarray(~r.routes.kept).sum(axis=0).tolist())
    print("counts before:", report.counts_before[0].tolist())


if __name__ == "__main__":
    main()

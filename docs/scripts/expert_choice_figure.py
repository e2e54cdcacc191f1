"""Figure for docs/routing/expert_choice.md: how many experts each token got under expert choice.

512 tokens, 16 experts, affinities S = softmax(X W_g) with a random gate (X and W_g standard
normal, W_g scaled by 0.5). Each expert takes its top-C tokens, C = round(c T / E), for capacity
factors c = 0.5, 1 and 2 (the paper's EC-CF2). The bars count the tokens taken by 0, 1, 2, ...
experts; on average a token gets c experts, but some get none and some get many.

Run from the repository root:  python docs/scripts/expert_choice_figure.py
Writes docs/img/expert_choice_coverage.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.core import softmax  # noqa: E402
from moeref.expert_choice import ExpertChoiceOptions, expert_choice_capacity, expert_choice_routes  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "expert_choice_coverage.png"
T, D, E = 512, 32, 16
FACTORS = (0.5, 1.0, 2.0)
COLORS = ("#9ecae1", "#4292c6", "#08519c")


def main() -> None:
    rng = np.random.default_rng(20261129)
    x = rng.normal(size=(T, D))
    w_g = 0.5 * rng.normal(size=(D, E))
    scores = softmax(x @ w_g, axis=1)

    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.27
    shown = 0
    for i, (c, color) in enumerate(zip(FACTORS, COLORS)):
        C = expert_choice_capacity(T, E, ExpertChoiceOptions(capacity_factor=c, min_capacity=0))
        coverage = np.asarray(expert_choice_routes(scores, C).coverage)  # (E+1,)
        shown = max(shown, int(np.nonzero(coverage)[0].max()) + 1)
        m = np.arange(E + 1)
        ax.bar(m + (i - 1) * width, coverage, width=width, color=color, label=f"$c = {c:g}$, $C = {C}$")
        print(f"c = {c}: C = {C}, tokens by number of experts {coverage[:shown].tolist()}, "
              f"mean {np.dot(m, coverage) / T:.2f}, none {coverage[0]} ({100 * coverage[0] / T:.1f}%)")
    ax.set_xlim(-0.6, shown - 0.4)
    ax.set_xticks(np.arange(shown))
    ax.set_xlabel("number of experts that took the token")
    ax.set_ylabel(f"tokens (of $T = {T}$)")
    ax.set_title(f"expert choice, $E = {E}$ experts, each takes its top-$C$ tokens, $C = \\mathrm{{round}}(cT/E)$", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()

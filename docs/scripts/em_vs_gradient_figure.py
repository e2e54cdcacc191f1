"""Figure for docs/classical/moe_em.md: EM versus gradient ascent, log-likelihood gap per iteration.

Reads benchmarks/results/em_vs_gradient.json (written by benchmarks/em_vs_gradient.py) and draws, for
each data set, the gap $L^\\ast - L^{(t)}$ between EM's final log-likelihood $L^\\ast$ and the value
after $t$ iterations, for EM and for gradient ascent at its tuned learning rate (log-log axes; the
dotted line is the 1e-6 target).

Run from the repository root:  python docs/scripts/em_vs_gradient_figure.py
Writes docs/img/em_vs_gradient.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "benchmarks" / "results" / "em_vs_gradient.json"
OUT = ROOT / "docs" / "img" / "em_vs_gradient.png"
FLOOR = 1e-9  # gaps below this (EM's last iterates) are drawn at the floor


def main() -> None:
    doc = json.loads(DATA.read_text())
    names = list(doc["results"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.3), dpi=110)
    for ax, name in zip(np.atleast_1d(axes), names):
        r = doc["results"][name]
        best = r["em"]["final_loglik"]
        em = np.asarray(r["em"]["trace"])
        em_it = np.arange(len(em))
        ga = r["gradient_ascent"]
        ga_it = np.asarray(ga["tuned_trace_iterations"])
        ga_val = np.asarray(ga["tuned_trace_values"])
        ax.plot(em_it + 1, np.maximum(best - em, FLOOR), "o-", ms=2.5, lw=1.2, color="#1f77b4",
                label=f"EM ({r['em']['iterations']} it.)")
        reached = ga["tuned"]["reached_target"]
        ga_label = (f"gradient ascent, lr={ga['tuned_learning_rate']:g} "
                    + (f"({ga['tuned']['steps']} steps)" if reached else f"(gap {ga['tuned']['gap_to_em']:.2g} after {ga['tuned']['steps']})"))
        ax.plot(ga_it + 1, np.maximum(best - ga_val, FLOOR), "-", lw=1.2, color="#d62728", label=ga_label)
        ax.axhline(1e-6, ls=":", color="0.4", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("iteration t + 1")
        ax.set_title(f"{name} (N={r['n_samples']}, K=2)", fontsize=10)
        ax.legend(fontsize=7, loc="center left")
        ax.grid(True, which="major", lw=0.3, alpha=0.5)
    np.atleast_1d(axes)[0].set_ylabel(r"$L^\ast - L^{(t)}$")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()

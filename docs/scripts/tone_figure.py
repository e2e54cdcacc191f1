"""Figure for docs/classical/moe_em.md: a gated mixture of two regressions on the tone data.

The tone-perception data (Cohen 1980; load_dataset("tone")): perceived tone ratio `tuned` against
the actual `stretchratio` of 150 trials. A softmax gate on `stretchratio` (baseline parametrisation)
and two linear-Gaussian experts with one variance each are fitted by EM (fit_moe, absolute rule,
tol 1e-10) from the start of the EM-versus-gradient benchmark: the two regimes tuned = stretchratio
and tuned = 2, variances 0.1, a flat gate. The top panel shows the data, coloured by the expert with
the largest responsibility, and the two fitted lines; the bottom panel the gate probabilities
g_k(x) over the range of `stretchratio`.

Run from the repository root:  python docs/scripts/tone_figure.py
Writes docs/img/tone_gated_regressions.png.
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
from moeref.moe_em import MoEParams, fit_moe  # noqa: E402
from moeref.softmax_gate import SoftmaxGate, SoftmaxGateParams  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "tone_gated_regressions.png"
COLOURS = ("#1f77b4", "#d62728")
GATE = SoftmaxGate()
EXPERTS = LinearGaussianExperts(covariance="isotropic")


def main() -> None:
    tone = load_dataset("tone")
    x = np.asarray(tone["stretchratio"], dtype=np.float64)[:, None]  # (150, 1)
    y = np.asarray(tone["tuned"], dtype=np.float64)[:, None]  # (150, 1)
    init = MoEParams(
        SoftmaxGateParams(np.zeros((1, 2)), np.zeros(2)),
        LinearGaussianExpertsParams(np.array([[[1.0]], [[0.0]]]), np.array([[0.0], [2.0]]), np.array([0.1, 0.1])),
    )
    fit = fit_moe(x, y, GATE, EXPERTS, init, options=EMOptions(tol=1e-10))
    p = fit.params
    owner = np.argmax(np.asarray(fit.responsibilities), axis=1)  # (150,)
    grid = np.linspace(1.3, 3.1, 181)[:, None]  # (G, 1)
    mu = EXPERTS.mean(p.experts, grid)[:, :, 0]  # (G, 2)
    g = np.exp(GATE.log_weights(p.gate, grid))  # (G, 2)
    w, b, v = p.experts.weight[:, 0, 0], p.experts.bias[:, 0], p.experts.cov

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.0), sharex=True, gridspec_kw={"height_ratios": [2.3, 1]})
    for k, c in enumerate(COLOURS):
        sel = owner == k
        top.scatter(x[sel, 0], y[sel, 0], s=12, color=c, alpha=0.8, linewidths=0, label=f"largest responsibility: expert {k + 1}")
        top.plot(grid[:, 0], mu[:, k], color=c, lw=1.6,
                 label=f"expert {k + 1}: $y = {b[k]:.3f} {'+' if w[k] >= 0 else '-'} {abs(w[k]):.3f}\\,x$, $\\sigma^2 = {v[k]:.4f}$")
        bottom.plot(grid[:, 0], g[:, k], color=c, lw=2, label=f"$g_{k + 1}(x)$")
    top.set_ylabel("tuned (perceived ratio)")
    top.set_ylim(1.2, 3.3)
    top.legend(fontsize=7, loc="upper left", frameon=False)
    top.set_title(f"Softmax gate + 2 linear-Gaussian experts by EM: {fit.n_iter} iterations, $L$ = {fit.loglik:.3f}", fontsize=10)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("gate")
    bottom.set_xlabel("stretchratio (actual ratio)")
    bottom.legend(fontsize=7, loc="center left", frameon=False, ncols=2)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=85)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} kB); {fit.n_iter} iterations, L = {fit.loglik:.6f}; "
          f"slopes {w.round(4).tolist()}, intercepts {b.round(4).tolist()}, variances {np.asarray(v).round(5).tolist()}, "
          f"gate weight {p.gate.weight.ravel().round(3).tolist()}, bias {p.gate.bias.round(3).tolist()}")


if __name__ == "__main__":
    main()

"""Figure for docs/routing/reinforce.md: the REINFORCE estimate converges to the exact gradient, faster with a baseline.

One token, a policy over 4 experts and a reward table R(e) with a large common offset. The mean
of N single-draw REINFORCE estimates (explicit uniform draws, inverse-CDF sampling) is compared
with the exact gradient of E[R]; the error falls like 1/sqrt(N), and the baseline b = E[R]
removes the variance that the offset causes.

Run from the repository root:  python docs/scripts/reinforce_figure.py
Writes docs/img/reinforce_convergence.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeref.reinforce import expected_reward_vjp, reinforce_logits_gradient, sample_policy  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img" / "reinforce_convergence.png"
E, N_MAX, REPEATS = 4, 100_000, 20


def main() -> None:
    rng = np.random.default_rng(20261129)
    logits = np.array([[0.5, -0.3, 1.0, 0.0]])
    table = np.array([[3.0, 1.0, 2.0, -1.0]]) + 5.0  # rewards with a common offset of 5
    exact = np.asarray(expected_reward_vjp(logits, table, 1.0).logits)[0]
    mean_reward = float((np.exp(logits) / np.exp(logits).sum() * table).sum())
    sizes = np.unique(np.logspace(1, np.log10(N_MAX), 25).astype(int))
    errors = {"no baseline": np.zeros((REPEATS, sizes.size)), "baseline $b = E[R]$": np.zeros((REPEATS, sizes.size))}
    batch = np.repeat(logits, N_MAX, axis=0)
    for r in range(REPEATS):
        s = sample_policy(batch, rng.random(N_MAX))
        reward = table[0, s.action]
        for label, b in (("no baseline", None), ("baseline $b = E[R]$", np.array(mean_reward))):
            running = np.cumsum(reinforce_logits_gradient(batch, s.action, reward, b), axis=0)  # (N, E)
            errors[label][r] = np.linalg.norm(running[sizes - 1] / sizes[:, None] - exact, axis=1)

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for (label, err), color in zip(errors.items(), ("#d62728", "#1f77b4")):
        ax.loglog(sizes, err.mean(0), color=color, label=label)
    ax.loglog(sizes, errors["no baseline"].mean(0)[0] * np.sqrt(sizes[0] / sizes), "k:", lw=1, label=r"$\propto 1/\sqrt{N}$")
    ax.set_xlabel("number of sampled routes $N$")
    ax.set_ylabel(r"$\|\bar g_N - \nabla_z E[R]\|$ (mean of 20 runs)")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

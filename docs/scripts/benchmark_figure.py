"""Figure for docs/performance.md: the sparse layer's time over its GEMM bound (and over HF Mixtral).

Reads benchmarks/results/sparse_layer-latest.json (written by benchmarks/sparse_layer.py) and draws, per
thread count, for each workload and dtype: the forward of ``sparse_moe_layer`` and of ``dispatch_combine``
over the forward GEMM bound, ``sparse_moe_layer_value_and_vjp`` (output and VJP) over the forward+backward GEMM bound, and
``sparse_moe_layer`` on torch tensors over HF's ``MixtralSparseMoeBlock``. Bars are the medians of the
per-round ratios, whiskers their range; the lines mark the targets (1.25, 1.35, 1).

Run from the repository root:  python docs/scripts/benchmark_figure.py [--data PATH]
Writes docs/img/sparse_layer_benchmark.png, and prints the Markdown tables of docs/performance.md (the
sparse layer's, the expert-threads table from benchmarks/results/sparse_layer-expert-threads.json, and the
classical EM benchmark's from benchmarks/results/em_iteration-latest.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "benchmarks" / "results" / "sparse_layer-latest.json"
EM_DATA = ROOT / "benchmarks" / "results" / "em_iteration-latest.json"
THREADS_DATA = ROOT / "benchmarks" / "results" / "sparse_layer-expert-threads.json"
OUT = ROOT / "docs" / "img" / "sparse_layer_benchmark.png"
SERIES = [  # candidate, label, colour
    ("swiglu_floor", "NumPy floor (GEMMs + in-place SwiGLU) / GEMM bound", "#bbbbbb"),
    ("tuned_dispatch", "tuned NumPy dispatch / GEMM bound", "#dddddd"),
    ("dispatch", "dispatch_combine / GEMM bound", "#9ecae1"),
    ("layer", "layer forward / GEMM bound", "#1f77b4"),
    ("layer_value_and_vjp", "layer output + VJP / fwd+bwd GEMM bound", "#ff7f0e"),
    ("layer_torch", "layer on torch / HF Mixtral", "#2ca02c"),
]
TARGETS = [(1.25, "--", "forward target 1.25"), (1.35, ":", "VJP target 1.35"), (1.0, "-", "HF / bound = 1")]


def _ratio(v: dict | None) -> str:
    return "n/a" if v is None else f"{v['ratio']:.2f} ({v['ratio_min']:.2f}-{v['ratio_max']:.2f})"


def sparse_table(doc: dict) -> str:
    """Markdown tables, one row per (threads, workload, dtype): the forward, then the VJP."""
    head = (
        "| threads | workload | dtype | GEMM bound fwd | NumPy floor | tuned NumPy dispatch | dispatch fwd | dispatch / tuned "
        "| layer fwd | torch layer / HF | peak memory (layer) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in doc["cells"]:
        k = c["candidates"]
        mem = c.get("memory", {}).get("layer")
        mem_s = "n/a" if mem is None else f"{max(mem['peak_over_Tkd']):.2f} Tkd (spread {100 * mem['spread']:.0f}%)"
        rows.append(
            f"| {c['threads']} | {c['workload']['name']} | {c['dtype']} | {k['gemm_fwd']['median_seconds'] * 1e3:.0f} ms "
            f"({c['gemm_fwd_gflops']:.0f} GF/s) | {_ratio(k.get('swiglu_floor'))} | {_ratio(k.get('tuned_dispatch'))} | "
            f"{_ratio(k.get('dispatch'))} | {_ratio(c.get('dispatch_over_tuned'))} | {_ratio(k.get('layer'))} | "
            f"{_ratio(k.get('layer_torch'))} | {mem_s} |"
        )
    text = head + "\n".join(rows) + "\n"
    head = (
        "\n| threads | workload | dtype | GEMM bound fwd+bwd | layer output + VJP (`value_and_vjp`) | layer VJP alone "
        "| dispatch VJP alone |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in doc["cells"]:
        k = c["candidates"]
        if "gemm_fwd_bwd" not in k:
            continue
        rows.append(
            f"| {c['threads']} | {c['workload']['name']} | {c['dtype']} | {k['gemm_fwd_bwd']['median_seconds'] * 1e3:.0f} ms | "
            f"{_ratio(k.get('layer_value_and_vjp'))} | {_ratio(k.get('layer_vjp'))} | {_ratio(k.get('dispatch_vjp'))} |"
        )
    if rows:
        text += head + "\n".join(rows) + "\n"
    growth = [g for g in doc.get("growth", []) if g["candidate"] in ("gemm_fwd", "layer", "dispatch")]
    if growth:
        text += "\n| threads | dtype | candidate | time C / time A (FLOPs x8) | over the bound's C / A |\n|---|---|---|---|---|\n"
        text += "\n".join(
            f"| {g['threads']} | {g['dtype']} | {g['candidate']} | {g['time_C_over_A']:.2f} | {g.get('over_gemm_bound_growth', float('nan')):.2f} |"
            for g in growth
        ) + "\n"
    return text


def threads_table(doc: dict) -> str:
    """Markdown table of a ``sparse_layer.py --expert-threads`` run: each candidate with and without expert threads."""
    names = [("layer", "layer fwd"), ("dispatch", "dispatch fwd"), ("layer_value_and_vjp", "layer output + VJP"), ("layer_vjp", "layer VJP"),
             ("dispatch_vjp", "dispatch VJP")]
    text = "| threads | workload | dtype | " + " | ".join(f"{label} | {label}, expert threads" for _, label in names) + " |\n"
    text += "|---|---|---|" + "---|" * (2 * len(names)) + "\n"
    for c in doc["cells"]:
        k = c["candidates"]
        cols = " | ".join(f"{_ratio(k.get(n))} | {_ratio(k.get(n + '_threads'))}" for n, _ in names)
        text += f"| {c['threads']} | {c['workload']['name']} | {c['dtype']} | {cols} |\n"
    return text


def em_table(doc: dict) -> str:
    text = "| threads | candidate | median ms | ratio to the K WLS solves |\n|---|---|---|---|\n"
    for c in doc["cells"]:
        for name, v in c["candidates"].items():
            text += f"| {c['threads']} | {name} | {v['median_seconds'] * 1e3:.1f} | {_ratio(v) if name != 'wls' else '1'} |\n"
    text += "\n| threads | n | iterations | seconds | ms per iteration | us per iteration and sample |\n|---|---|---|---|---|---|\n"
    for c in doc["cells"]:
        for g in c.get("growth") or []:
            text += (f"| {c['threads']} | {g['n']} | {g['iterations']} | {g['seconds']:.2f} | {g['seconds_per_iteration'] * 1e3:.1f} "
                     f"| {g['microseconds_per_iteration_per_sample']:.3f} |\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    doc = json.loads(args.data.read_text())
    cells = doc["cells"]
    threads = sorted({c["threads"] for c in cells}, reverse=True)
    fig, axes = plt.subplots(1, len(threads), figsize=(5.6 * len(threads), 3.5), dpi=100, sharey=True, squeeze=False)
    top = 1.0
    for ax, t in zip(axes[0], threads):
        mine = [c for c in cells if c["threads"] == t]
        labels = [f"{c['workload']['name']} {c['dtype'].replace('float', 'f')}" for c in mine]
        x = np.arange(len(mine))
        width = 0.8 / len(SERIES)
        for i, (name, label, colour) in enumerate(SERIES):
            med, lo, hi = [], [], []
            for c in mine:
                v = c["candidates"].get(name)
                med.append(np.nan if v is None else v["ratio"])
                lo.append(np.nan if v is None else v["ratio"] - v["ratio_min"])
                hi.append(np.nan if v is None else v["ratio_max"] - v["ratio"])
            pos = x + (i - (len(SERIES) - 1) / 2) * width
            ax.bar(pos, med, width, color=colour, label=label, yerr=[lo, hi], error_kw={"elinewidth": 0.7, "capsize": 1.5})
            tops = np.asarray(med) + np.asarray(hi)
            if np.isfinite(tops).any():  # a candidate the run did not time has no bars
                top = max(top, np.nanmax(tops))
        for y, style, label in TARGETS:
            ax.axhline(y, color="k", lw=0.8, ls=style, label=label)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("time ratio (median of rounds)")
    axes[0][0].set_ylim(0, min(top * 1.05, 4.0))
    env = doc["environment"]
    load = f"load {env['load_average'][0]:.1f} at start, {env.get('load_average_at_end', [float('nan')])[0]:.1f} at end"
    fig.suptitle(f"sparse layer vs GEMM bound and HF Mixtral ({env['cpu_count']} CPUs, {load})", fontsize=10)
    handles, names = axes[0][0].get_legend_handles_labels()
    ncol = 4 if len(threads) > 1 else 2
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if ncol == 4 else 0.2, 1, 0.95))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)\n")
    print(sparse_table(doc))
    if THREADS_DATA.exists():
        print(threads_table(json.loads(THREADS_DATA.read_text())))
    if EM_DATA.exists():
        print(em_table(json.loads(EM_DATA.read_text())))


if __name__ == "__main__":
    main()

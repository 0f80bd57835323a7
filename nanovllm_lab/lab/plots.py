"""Matplotlib figures shared by the report, the wandb logger and the notebooks.

Each function takes the loaders' DataFrames (nanovllm_lab.lab.results) and returns a Figure, or None when
the data has nothing to draw. Figures are built without pyplot, so no GUI backend is ever touched (headless
machines) and nothing needs closing; notebooks show them with `display(fig)`.
"""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure


def step_latency_vs_tokens(steps: pd.DataFrame, runs: pd.DataFrame | None = None) -> Figure | None:
    """Median step latency against tokens per step, one line per (strategy, tp), one panel per phase."""
    if steps.empty:
        return None
    timed = steps[~steps["warmup"]]
    phases = [p for p in ("prefill", "decode") if (timed["phase"] == p).any()]
    if not phases:
        return None
    fig = Figure(figsize=(6 * len(phases), 4))
    axes = fig.subplots(1, len(phases), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        df = timed[timed["phase"] == phase]
        med = df.groupby(["workload", "strategy", "tp", "num_tokens"])["latency_ms"].median().reset_index()
        for (wl, strat, tp), g in med.groupby(["workload", "strategy", "tp"]):
            ax.plot(g["num_tokens"], g["latency_ms"], marker="o", label=f"{strat} tp{tp} ({wl})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step")
        ax.set_ylabel("median step latency (ms)")
        ax.set_title(f"{phase} steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def speedup_over_blocking(table: pd.DataFrame) -> Figure | None:
    """Bars of `speedup_vs_blocking` (from compare.comparison_table) per run group."""
    df = table.dropna(subset=["speedup_vs_blocking"]) if "speedup_vs_blocking" in table else pd.DataFrame()
    if df.empty:
        return None
    labels = [f"{r.workload}\n{r.strategy} tp{r.tp}" + (f"\n{r.variant}" if getattr(r, "variant", "") else "")
              for r in df.itertuples()]
    fig = Figure(figsize=(max(4.0, 0.8 * len(df)), 4))
    ax = fig.subplots()
    ax.bar(range(len(df)), df["speedup_vs_blocking"], color=["tab:gray" if s == "blocking" else "tab:blue"
                                                              for s in df["strategy"]])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(df)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("throughput / blocking's")
    ax.set_title("speedup over blocking (same workload, model, tp)")
    fig.tight_layout()
    return fig


def layer_overlap(layer: pd.DataFrame) -> Figure | None:
    """Exposed communication and overlap efficiency against tokens, per strategy (layer rows). Rows with
    neither (step rows of a sweep without a `none` run) are left out: None when no row has one."""
    if not layer.empty:
        layer = layer.dropna(subset=["exposed_comm_ms", "overlap_efficiency"], how="all")
    if layer.empty:
        return None
    keys = [k for k in ("arch", "tp", "unit", "phase") if k in layer]  # units (layer, row_linear) never mix
    groups = list(layer.groupby(keys))
    fig = Figure(figsize=(11, 3.5 * len(groups)))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (key, g), (ax_e, ax_o) in zip(groups, axes):
        title = " ".join(f"{k}={v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,)))
        for strat, s in g.groupby("strategy"):
            s = s.sort_values("tokens")
            ax_e.plot(s["tokens"], s["exposed_comm_ms"] * 1e3, marker="o", label=strat)
            ax_o.plot(s["tokens"], s["overlap_efficiency"], marker="o", label=strat)
        ax_e.set_ylabel("exposed comm (us per unit)")
        ax_o.set_ylabel("overlap efficiency")
        ax_o.axhline(1.0, color="black", lw=0.6)
        ax_o.axhline(0.0, color="black", lw=0.6)
        for ax, col in ((ax_e, "exposed_comm_ms"), (ax_o, "overlap_efficiency")):
            if g[col].notna().any():  # a log axis with no finite point fails at layout
                ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def step_timeline(steps: pd.DataFrame) -> Figure | None:
    """Latency of every step of one run in order, coloured by phase (warm-up steps faded)."""
    if steps.empty:
        return None
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    for phase, color in (("prefill", "tab:orange"), ("decode", "tab:blue")):
        df = steps[steps["phase"] == phase]
        ax.scatter(df["step"], df["latency_ms"], s=6, c=color, alpha=[0.25 if w else 1.0 for w in df["warmup"]],
                   label=phase)
    ax.set_xlabel("step")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

"""Console tables: a run's summary at its end, a sweep's side by side at the sweep's end.

rich draws them when it is installed; otherwise pandas' to_string. Runs that differ in a setting other than
the strategy (a sweep over elementwise_kernels=torch,triton) show their `variant` (compare / results.run_variants):
a column of the sweep table, and in the per-size table's column labels (`blocking [elementwise_kernels=triton]`).
"""
from __future__ import annotations

import math
import sys
from typing import Any

import pandas as pd

# The columns worth a glance, in reading order; missing ones are skipped.
SWEEP_COLUMNS = ["run", "status", "workload", "model", "strategy", "variant", "tp", "device", "throughput_tok_s",
                 "overlap_efficiency", "prefill_latency_ms_p50", "decode_latency_ms_p50", "ttft_ms_p50", "tpot_ms_p50", "achieved_over_floor",
                 "valid_outputs", "error_type"]
RUN_KEYS = ["workload", "model", "strategy", "tp", "device", "dtype", "valid_outputs", "throughput_tok_s",
            "output_tok_s", "num_steps", "prefill_latency_ms_p50", "prefill_latency_ms_p10", "prefill_latency_ms_p90",
            "decode_latency_ms_p50", "decode_latency_ms_p10", "decode_latency_ms_p90", "ttft_ms_p50", "tpot_ms_p50",
            "num_layer_rows", "measured_s", "step_time_s", "between_steps_s", "copy_bandwidth_gbs", "floor_s",
            "achieved_over_floor", "elapsed_s", "run_dir"]


# Short headers so that a sweep's table fits a terminal.
HEADERS = {"throughput_tok_s": "tok/s", "speedup_vs_blocking": "x blocking", "prefill_latency_ms_p50": "prefill ms p50",
           "decode_latency_ms_p50": "decode ms p50", "ttft_ms_p50": "TTFT ms p50", "tpot_ms_p50": "TPOT ms p50",
           "valid_outputs": "valid", "error_type": "error", "achieved_over_floor": "of floor",
           "overlap_efficiency": "overlap eff"}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def print_table(df: pd.DataFrame, title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(f"\n{title}\n{df.to_string(index=False, formatters={c: _fmt for c in df.columns})}\n")
        return
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        # plain text too: a variant's label ("blocking [elementwise_kernels=triton]") is not markup
        header = HEADERS.get(str(col), str(col))
        # Numbers never wrap. Run names, variants and long labels (a per-size table's "none_mb [single_rank=
        # true]") may, each keeping a readable minimum, so that a wide sweep folds them instead of squeezing the
        # run column to one character (seen in a 160-column log).
        wraps = col in ("run", "variant") or len(header) > 24
        longest = max([len(header), *(len(_fmt(v)) for v in df[col])]) if len(df) else len(header)
        table.add_column(Text(header), overflow="fold", no_wrap=not wraps,
                         min_width=min(longest, 16) if wraps else None)
    for row in df.itertuples(index=False):
        table.add_row(*(Text(_fmt(v)) for v in row))  # plain text: an error message's "[/path]" is not markup
    # A terminal's own width; a pipe or a log file gets a wide fixed one rather than rich's 80 columns.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def print_run_summary(summary: dict[str, Any]) -> None:
    rows = [(k, summary[k]) for k in RUN_KEYS if k in summary and summary[k] is not None]
    print_table(pd.DataFrame(rows, columns=["metric", "value"]), f"run summary ({summary.get('run_id', '')})")


def sweep_frame(summaries: pd.DataFrame) -> pd.DataFrame:
    from nanovllm_lab.lab.compare import comparison_table  # overlap efficiency where the sweep has blocking + none
    if "run" in summaries.columns and "overlap_efficiency" not in summaries.columns:
        eff = comparison_table(summaries)
        add = [c for c, shown in (("overlap_efficiency", lambda v: v.notna()), ("variant", lambda v: v != ""))
               if c in eff.columns and c not in summaries.columns and shown(eff[c]).any()]
        if add:
            summaries = summaries.merge(eff[["run", *add]], on="run", how="left")
    cols = [c for c in SWEEP_COLUMNS if c in summaries.columns]
    df = summaries[cols]
    return df.sort_values([c for c in ("workload", "tp", "variant", "strategy") if c in df.columns], kind="stable")


def print_sweep_summary(summaries: pd.DataFrame, title: str) -> None:
    if summaries.empty:
        print(f"{title}: no runs found")
        return
    print_table(sweep_frame(summaries), title)


def _label(strategy: str, params_json: str, variant: str = "") -> str:
    """`chunked[chunks=3]` for parameters that differ from the strategy's declared defaults, else the name; then
    the run's variant if it has one: `blocking [elementwise_kernels=triton]`."""
    import dataclasses
    import json
    from nanovllm_lab.comm import STRATEGIES, resolve_strategy
    try:
        resolve_strategy(strategy)  # loads the built-in strategies
        fields = dataclasses.fields(STRATEGIES.get(strategy)[0])
    except (ValueError, TypeError, KeyError):
        fields = ()
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    # JSON turns tuples into lists: compare sequences as lists
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    diff = {k: v for k, v in json.loads(params_json or "{}").items()
            if k not in defaults or norm(defaults[k]) != norm(v)}
    label = strategy + ("[" + ",".join(f"{k}={v}" for k, v in sorted(diff.items())) + "]" if diff else "")
    return with_variant(label, variant)


def with_variant(label: str, variant: str) -> str:
    """`blocking [elementwise_kernels=triton]`: a label with the run's variant, if it has one."""
    return f"{label} [{variant}]" if variant else label


def step_frame(table: pd.DataFrame) -> pd.DataFrame:
    """`compare.step_table` as one row per (workload, model, tp, size, graph) and one column per strategy (with its
    non-default parameters and its variant): "median ms (overlap efficiency)", the per-size answer to how much of
    the communication a strategy hides."""
    if table.empty:
        return table
    variants = table["variant"] if "variant" in table else [""] * len(table)
    t = table.assign(label=[_label(s, p, v) for s, p, v in zip(table["strategy"], table["params"], variants)])
    cell = t["t_ms"].map(lambda v: f"{v:.3f}") + t["overlap_efficiency"].map(
        lambda e: "" if e is None or (isinstance(e, float) and math.isnan(e)) else f" ({e:.2f})")
    index = ["workload", "model", "tp", "num_tokens"] + (["cuda_graph"] if "cuda_graph" in t else [])
    wide = t.assign(cell=cell).pivot_table(index=index, columns="label", values="cell", aggfunc="first")
    return (wide.reset_index().rename(columns={"num_tokens": "tokens", "cuda_graph": "graph"})
            .rename_axis(columns=None).fillna("-"))


def print_step_summary(table: pd.DataFrame, title: str) -> None:
    if not table.empty:
        print_table(step_frame(table), title)

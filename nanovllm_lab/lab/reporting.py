"""The report of the runs under a directory: the comparison tables of lab/compare.py with figures, as markdown or
HTML (`python -m nanovllm_lab.report DIR --out report.md`), or logged to wandb. Figures are PNGs in
`<report stem>_files/`, written whole through a temporary file (results.atomic_write).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from nanovllm_lab.lab import console, plots, results
from nanovllm_lab.lab.compare import (variants_by_run, comparison_table, failed_table, layer_table, scaling_table,
                                      step_table, trace_size_table, trace_table)

@dataclass
class Report:
    root: Path
    runs: pd.DataFrame                       # one row per successful run, with speedup_vs_blocking
    failed: pd.DataFrame                     # one row per failed run
    layer: pd.DataFrame                      # layer rows, pivoted per strategy
    steps: pd.DataFrame = field(default_factory=pd.DataFrame)  # decode/prefill step latencies per size
    traces: pd.DataFrame = field(default_factory=pd.DataFrame)  # profiled runs: busy times, compute interference
    trace_sizes: pd.DataFrame = field(default_factory=pd.DataFrame)  # profiled steps by size: span, time by class
    scaling: pd.DataFrame = field(default_factory=pd.DataFrame)  # throughput against linear scaling from tp=1
    figures: dict[str, Figure] = field(default_factory=dict)
    uses_wandb: bool = False



def build_report(root: str | Path) -> Report:
    root = Path(root)
    summaries = results.load_summaries(root)
    steps, layer = results.load_steps(root), results.load_layer(root)
    runs = comparison_table(summaries)
    rep = Report(root=root, runs=runs, failed=failed_table(summaries), layer=layer_table(layer),
                 steps=step_table(steps, summaries), scaling=scaling_table(runs), traces=trace_table(summaries),
                 trace_sizes=trace_size_table(results.load_trace_sizes(root), summaries),
                 uses_wandb="logger" in summaries and bool((summaries["logger"] == "wandb").any()))
    step_rows = pd.DataFrame()
    if not rep.steps.empty:  # the layer plot's axes fit step rows too: one "unit" is then one engine step
        step_rows = rep.steps[rep.steps["strategy"] != "none"].rename(
            columns={"model": "arch", "num_tokens": "tokens"}).assign(unit="step")
        step_rows["strategy"] = [console.with_variant(s, v)
                                 for s, v in zip(step_rows["strategy"], step_rows["variant"])]
    if not steps.empty and "run" in steps:  # a line per variant in the latency figure too
        variants = variants_by_run(summaries)
        steps = steps.assign(strategy=[console.with_variant(s, variants.get(r, "")) for s, r in
                                       zip(steps["strategy"], steps["run"])])
    for name, fig in (("latency_vs_tokens", plots.step_latency_vs_tokens(steps) if not steps.empty else None),
                      ("speedup_vs_blocking", plots.speedup_over_blocking(runs)),
                      ("step_overlap", plots.layer_overlap(step_rows)),
                      ("layer_overlap", plots.layer_overlap(layer))):
        if fig is not None:
            rep.figures[name] = fig
    return rep


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_report(rep: Report, out: str | Path) -> Path:
    """Write the report (format by suffix: .md or .html) and its figures next to it."""
    out = Path(out)
    if out.suffix not in (".md", ".html"):
        raise ValueError(f"report format must be .md or .html, got {out.name!r}")
    assets = out.with_name(f"{out.stem}_files")
    assets.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, fig in rep.figures.items():
        path = assets / f"{name}.png"
        results.atomic_write(path, lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=110))
        images[name] = f"{assets.name}/{path.name}"
    sections = [("Runs", rep.runs), ("Failed runs", rep.failed), ("TP scaling", rep.scaling),
                ("Step latency per size: median ms (overlap efficiency)", console.step_frame(rep.steps)),
                ("Step latencies", rep.steps), ("Traces (per step)", rep.traces),
                ("Traced steps by size", rep.trace_sizes), ("Layer sweep", rep.layer)]
    if out.suffix == ".md":
        parts = [f"# nanovllm_lab report: {rep.root}\n"]
        for title, df in sections:
            if title == "Runs" or not df.empty:
                parts.append(f"## {title}\n\n{markdown_table(df)}")
        parts += [f"## {name.replace('_', ' ')}\n\n![{name}]({src})\n" for name, src in images.items()]
        text = "\n".join(parts)
    else:
        body = [f"<h1>nanovllm_lab report: {html.escape(str(rep.root))}</h1>"]
        for title, df in sections:
            if title == "Runs" or not df.empty:
                body.append(f"<h2>{title}</h2>" + df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}"))
        body += [f'<h2>{name.replace("_", " ")}</h2><img src="{src}" alt="{name}">' for name, src in images.items()]
        text = ("<!doctype html><html><head><meta charset='utf-8'><title>nanovllm_lab report</title><style>"
                "table{border-collapse:collapse;font:12px monospace}td,th{border:1px solid #ccc;padding:2px 6px}"
                "</style></head><body>" + "\n".join(body) + "</body></html>\n")
    results.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return out


def log_report_to_wandb(rep: Report, project: str = "nanovllm_lab", mode: str = "offline") -> None:
    """One wandb run (job_type report, grouped by the directory's name) holding the tables and figures."""
    import wandb
    from nanovllm_lab.lab.loggers import figure_image, wandb_settings
    run = wandb.init(project=project, group=rep.root.name, job_type="report", name=f"report_{rep.root.name}",
                     dir=str(rep.root), mode=mode, reinit="finish_previous", settings=wandb_settings(60.0))
    def table(df: pd.DataFrame) -> "wandb.Table":  # NaN -> None: wandb tables reject NaN in object columns
        return wandb.Table(dataframe=df.astype(object).where(df.notna(), None))

    payload: dict[str, Any] = {"runs": table(rep.runs)}
    for name, df in (("layer", rep.layer), ("scaling", rep.scaling), ("steps", rep.steps), ("traces", rep.traces),
                     ("trace_sizes", rep.trace_sizes)):
        if not df.empty:
            payload[name] = table(df)
    payload.update({name: figure_image(fig) for name, fig in rep.figures.items()})
    run.log(payload)
    run.finish()

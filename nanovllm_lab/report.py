"""Build a side-by-side report of the runs under a results directory (a sweep, or results/ itself).

    python -m nanovllm_lab.report results/sweeps/2026-11-28_10-00-00_sweep            # -> <dir>/report.md
    python -m nanovllm_lab.report results/ --out report.html
    python -m nanovllm_lab.report results/sweeps/... --wandb                          # also a wandb run
    python -m nanovllm_lab.report results/sweeps/<decode+prefill sweep> --write-table my_table.json

The report holds one row per run (throughput, speedup over blocking, step-latency and TTFT/TPOT medians),
the failed runs, the step latencies of decode/prefill sweeps (also as a row per size and a column per strategy,
printed on the console too) and the layer rows per strategy, and PNG figures. Runs that differ in a setting
other than the strategy (`-m elementwise_kernels=torch,triton`) are kept apart by their `variant` (lab/compare.py).
It is logged to wandb (offline) with --wandb, or when the runs themselves were logged with logger=wandb.
--write-table turns the step latencies into an `overlap` table entry per model, tp and card (use it with
`+strategy=overlap strategy.table=...`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanovllm_lab.lab.reporting import build_report, log_report_to_wandb, write_report
from nanovllm_lab.lab.console import print_step_summary, print_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanovllm_lab.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a run, sweep or results directory (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="report.md or report.html (default: <root>/report.md)")
    ap.add_argument("--wandb", action="store_true", help="log the report to wandb even if the runs did not")
    ap.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    ap.add_argument("--write-table", type=Path, default=None,
                    help="write (or update) an overlap table from the decode/prefill step latencies")
    ap.add_argument("--card", default=None, help="the card the table entry is for (default: the runs' GPU)")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    rep = build_report(args.root)
    if rep.runs.empty and rep.failed.empty:
        print(f"error: no runs (summary.json / error.json) under {args.root}", file=sys.stderr)
        return 1
    try:
        out = write_report(rep, args.out or args.root / "report.md")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rep.runs, f"{len(rep.runs)} runs under {args.root}")
    print_step_summary(rep.steps, "step latency ms p50 (overlap efficiency) per size")
    if not rep.failed.empty:
        print_table(rep.failed, f"{len(rep.failed)} failed")
    if args.write_table is not None:
        code = _write_table(rep, args.root, args.write_table, args.card)
        if code:
            return code
    if args.wandb or rep.uses_wandb:
        log_report_to_wandb(rep, mode=args.wandb_mode)
    print(f"report: {out}")
    return 0


def _write_table(rep, root: Path, path: Path, card: str | None) -> int:
    from nanovllm_lab.lab.tuning import TuningError, write_table_from_sweep
    try:
        card = write_table_from_sweep(root, path, card=card, steps=rep.steps)
    except TuningError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    print(f"overlap table: {path} (card {card or '*'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`overlap`'s table from a sweep of the engine's own decode and prefill steps.

Per model, tp, card, phase and token count, the strategies that ran fastest in the sweep (never one slower than
blocking by more than its spread: comm/overlap_write.py). Two callers: `python -m nanovllm_lab.report <sweep>
--write-table t.json`, and the end of a multirun whose config sets `overlap_table` (the overlap_tuning study), so
tuning is one command. Why steps and not the layer workload (which can write a table too): the shipped table's
entries come from engine steps (compiled, graph-replayed decode, the whole model, real batches), what `overlap`
runs in; the layer workload times isolated layers.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from nanovllm_lab.lab import results


class TuningError(ValueError):
    """The sweep cannot give a table; `code` is the report CLI's exit status for it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def sweep_card(root: Path) -> str | None:
    """The one card the sweep's runs measured on (env.json's first GPU), None for CPU runs (a '*' entry)."""
    cards = {g for d in results.find_run_dirs(root) if (d / "env.json").exists()
             for g in (results.read_json(d / "env.json").get("gpus") or [])[:1]}
    if len(cards) > 1:
        raise TuningError(f"runs from several cards under {root} ({sorted(cards)}); pass --card", code=2)
    return next(iter(cards), None)


def write_table_from_sweep(root: str | Path, path: str | Path, card: str | None = None,
                           steps: pd.DataFrame | None = None) -> str | None:
    """Write (or update: other entries of the file are kept) `path` from the step sweep under `root` and return
    the card its entry names. `steps`: the sweep's `compare.step_table`, if already built."""
    from nanovllm_lab.comm.overlap_write import write_table
    from nanovllm_lab.lab.compare import overlap_rows_from_steps, step_table
    root = Path(root)
    if steps is None:
        steps = step_table(results.load_steps(root), results.load_summaries(root))
    if steps.empty or not (steps["strategy"] == "blocking").any():
        raise TuningError(f"--write-table needs decode/prefill step sweeps with a blocking run under {root}", code=1)
    variants = sorted(set(steps["variant"])) if "variant" in steps else [""]
    if len(variants) > 1:  # one table entry per model/tp/card: it cannot say which engine setting it is for
        raise TuningError(f"the sweep under {root} ran several engine settings ({variants}); a table is tuned for "
                          "one: write it from a sweep of one setting", code=2)
    card = sweep_card(root) if card is None else card
    write_table(overlap_rows_from_steps(steps), str(path), card=card)
    return card

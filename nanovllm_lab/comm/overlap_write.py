"""Writing `overlap`'s table from measurements: per phase and token count, the strategies that were fastest
in a sweep (layer rows, or step rows through `lab.compare.step_table`), never one slower than blocking by more
than its own spread. `report --write-table` and the layer workload call `write_table`; the table's format and how
`overlap` reads it are in comm/overlap.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from typing import Any

from nanovllm_lab.comm.overlap import DEFAULT_TABLE, _choice_key, delegates, load_table
from nanovllm_lab.lab.results import atomic_write

log = logging.getLogger(__name__)


def _rules_from(rows: list[dict]) -> dict[str, list[dict]]:
    by_point: dict[tuple[str, int], list[dict]] = defaultdict(list)
    valid = delegates()
    for r in rows:
        # `none` gives wrong outputs and `overlap` cannot delegate to itself: neither is a choice.
        if r["strategy"] in valid and math.isfinite(r["t_ms"]):
            by_point[(r["phase"], int(r["tokens"]))].append(r)
    rules: dict[str, list[dict]] = {}
    for phase in ("prefill", "decode"):
        tokens = sorted(t for p, t in by_point if p == phase)
        out: list[dict] = []
        for i, t in enumerate(tokens):
            pts = by_point[(phase, t)]
            blk = [r["t_ms"] for r in pts if r["strategy"] == "blocking"]
            blk += [r["t_blocking_ms"] for r in pts if not blk and math.isfinite(r.get("t_blocking_ms", math.nan))]
            t_block = min(blk) if blk else math.inf

            def spread(r: dict) -> float:
                return max(0.0, r.get("t_p90_ms", r["t_ms"]) - r.get("t_p10_ms", r["t_ms"]))

            # Never pick one slower than blocking by more than its own measured spread; fastest first.
            ok = sorted((r for r in pts if r["t_ms"] <= t_block + spread(r)), key=lambda r: r["t_ms"])
            choices, seen = [], set()
            for r in ok:
                params = r.get("params") or {}
                c = {"strategy": r["strategy"], "params": json.loads(params) if isinstance(params, str) else params}
                if _choice_key(c) not in seen:
                    seen.add(_choice_key(c))
                    choices.append(c)
                if r["strategy"] == "blocking":
                    break
            if not any(c["strategy"] == "blocking" for c in choices):
                choices.append({"strategy": "blocking", "params": {}})
            bound = int(math.sqrt(t * tokens[i + 1])) if i + 1 < len(tokens) else None  # geometric midpoint
            if out and out[-1]["choices"] == choices:
                out[-1]["max_tokens"] = bound
            else:
                out.append({"max_tokens": bound, "choices": choices, "measured_at": t})
        if out:
            rules[phase] = out
    return rules


def _entry_key(entry: dict) -> tuple[Any, Any, Any]:
    """What write_table writes one entry per: (model, tp, card), "*" where absent."""
    return entry.get("model", "*"), entry.get("tp", "*"), entry.get("card", "*")


def write_table(rows: list[dict], path: str, card: str | None = None) -> dict:
    """Write (or update) a table at `path` from layer-sweep rows (phase, tokens, strategy, t_ms, and
    optionally t_p10_ms / t_p90_ms / t_blocking_ms / params / arch / tp / unit / card). One entry per
    (arch, tp, card); entries of the file for other keys are kept; a new file gets the default table's
    fallback entry. An entry's phases that the rows do not cover keep their old rules (a decode sweep written
    after a prefill sweep updates decode only). Returns the table written."""
    if any(r.get("unit") == "layer" for r in rows):
        rows = [r for r in rows if r.get("unit", "layer") == "layer"]
    groups: dict[tuple[Any, Any, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r.get("arch", "*"), r.get("tp", "*"), card or r.get("card") or "*")].append(r)
    if os.path.isfile(path):
        with open(path) as f:
            table = json.load(f)
    else:
        with open(DEFAULT_TABLE) as f:
            table = {"format": 1, "entries": [e for e in json.load(f)["entries"] if e.get("model", "*") == "*"]}
    for (arch, tp, c), grp in groups.items():
        entry: dict[str, Any] = {"model": arch, "tp": tp, "card": c}
        if arch != "*":
            try:
                from nanovllm_lab.models.arch import load_arch
                a = load_arch(arch)
                entry.update(hidden_size=a.hidden_size, intermediate_size=a.intermediate_size)
            except (FileNotFoundError, ValueError):
                log.warning("write_table: unknown model %r; its entry matches by name only and will not be used", arch)
        same = [e for e in table["entries"] if _entry_key(e) == (arch, tp, c)]
        new_rules = _rules_from(grp)
        kept = {ph: r for e in same for ph, r in e.get("rules", {}).items() if ph not in new_rules}
        entry["rules"] = {**kept, **new_rules}
        # Where each phase's rules came from: the old entry's record for the kept phases, this call for the rest.
        old_src = {ph: (e.get("sources") or {}).get(ph, e.get("source", "?")) for e in same for ph in kept}
        entry["sources"] = {**old_src, **{ph: f"write_table from {len(grp)} rows" for ph in new_rules}}
        entry["source"] = "; ".join(f"{ph}: {src}" for ph, src in sorted(entry["sources"].items()))
        table["entries"] = [e for e in table["entries"] if _entry_key(e) != (arch, tp, c)]
        table["entries"].insert(0, entry)

    def write(tmp: str) -> None:  # checked before it replaces the table: never half a file, nor one that won't load
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
        load_table(tmp)

    atomic_write(path, write)
    return table

"""Markdown table of a layer sweep (`python -m nanovllm_lab.comm.layerbench --out rows.json`).

    python scripts/layer_table.py rows.json [more.json ...]
One line per (model, tp, phase, tokens) for the two-layer unit: T_blocking, T_none, T_comm, then each
strategy's time and overlap efficiency ((T_blocking - T) / (T_blocking - T_none)), the best marked.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

COLS = ["async", "chunked", "symm", "rsag", "overlap"]


def table(rows: list[dict]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("unit") != "layer" or r.get("error"):
            continue
        plain = r.get("params", "{}") in ("{}", {}, None)
        key = r["strategy"] if plain or r["strategy"] == "overlap" else None
        if key:
            groups[(r["arch"], r["tp"], r["phase"], r["tokens"])][key] = r
    out = ["| model, tp | phase, tokens | T_blocking us | T_none | T_comm | " + " | ".join(COLS) + " |",
           "|---|---|---|---|---|" + "---|" * len(COLS)]
    for (arch, tp, phase, toks), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "decode", kv[0][3])):
        b = g.get("blocking")
        if b is None:
            continue
        best = min((s for s in COLS if s in g), key=lambda s: g[s]["t_ms"], default=None)
        cells = []
        for s in COLS:
            if s not in g:
                cells.append("-")
                continue
            c = f'{g[s]["t_ms"] * 1e3:.0f} ({g[s]["overlap_efficiency"]:+.2f})'
            cells.append(f"**{c}**" if s == best else c)
        out.append(f"| {arch}, {tp} | {phase} {toks} | {b['t_ms'] * 1e3:.0f} | {b['t_none_ms'] * 1e3:.0f} | "
                   f"{b['t_comm_ms'] * 1e3:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    rows: list[dict] = []
    for p in sys.argv[1:]:
        with open(p) as f:
            rows += json.load(f)
    print(table(rows))

"""Per-step records from the engine's step hooks, and the statistics a summary reports.

Percentiles are p10/p50/p90 (the spread the research guide asks for); warm-up rows are kept in
steps.parquet, flagged, and left out of every statistic.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from nanovllm_lab.engine.model_runner import StepRecord


class StepRecorder:
    """A step hook (`llm.model_runner.step_hooks.append(recorder)`): one row per forward step on rank 0."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.warmup = False  # set by the workload context around untimed parts

    def __call__(self, rec: StepRecord) -> None:
        self.rows.append({"step": len(self.rows), "phase": rec.phase, "num_seqs": rec.num_seqs,
                          "num_tokens": rec.num_tokens, "latency_ms": rec.latency_s * 1e3,
                          "cuda_graph": rec.cuda_graph, "kv_tokens_read": rec.kv_tokens_read,
                          "warmup": self.warmup, "host_ms": rec.host_s * 1e3})

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self, **columns: Any) -> pd.DataFrame:
        """The rows plus constant columns (strategy, tp, workload, model)."""
        cols = ["step", "phase", "num_seqs", "num_tokens", "latency_ms", "cuda_graph", "kv_tokens_read", "warmup",
                "host_ms"]
        df = pd.DataFrame(self.rows, columns=cols)
        for k, v in columns.items():
            df[k] = v
        return df


def percentiles(values: Iterable[float], prefix: str) -> dict[str, float | None]:
    """{prefix_p10, prefix_p50, prefix_p90}; None when there are no finite values."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {f"{prefix}_p10": None, f"{prefix}_p50": None, f"{prefix}_p90": None}
    p10, p50, p90 = np.percentile(arr, [10, 50, 90])
    return {f"{prefix}_p10": float(p10), f"{prefix}_p50": float(p50), f"{prefix}_p90": float(p90)}


def step_stats(steps: pd.DataFrame) -> dict[str, Any]:
    """Per phase: step count, latency percentiles, tokens/s over the timed steps."""
    out: dict[str, Any] = {"num_steps": int((~steps["warmup"]).sum()) if len(steps) else 0}
    timed = steps[~steps["warmup"]] if len(steps) else steps
    for phase in ("prefill", "decode"):
        rows = timed[timed["phase"] == phase] if len(timed) else timed
        out[f"{phase}_steps"] = int(len(rows))
        out.update(percentiles(rows["latency_ms"] if len(rows) else [], f"{phase}_latency_ms"))
        secs = float(rows["latency_ms"].sum()) / 1e3 if len(rows) else 0.0
        out[f"{phase}_tok_s"] = float(rows["num_tokens"].sum()) / secs if secs > 0 else None
    return out


def request_stats(requests: pd.DataFrame, elapsed_s: float) -> dict[str, Any]:
    """Throughput of a request run and TTFT/TPOT percentiles."""
    out_tokens = int(requests["output_tokens"].sum())
    prompt_tokens = int(requests["prompt_tokens"].sum())
    out: dict[str, Any] = {
        "num_requests": int(len(requests)), "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "output_tok_s": out_tokens / elapsed_s if elapsed_s > 0 else None,
        "total_tok_s": (out_tokens + prompt_tokens) / elapsed_s if elapsed_s > 0 else None,
    }
    out.update(percentiles(requests["ttft_ms"], "ttft_ms"))
    out.update(percentiles(requests["tpot_ms"], "tpot_ms"))
    return out

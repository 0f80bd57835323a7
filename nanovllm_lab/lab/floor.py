"""The memory-traffic floor of a run: the bytes its steps must move, over the copy bandwidth measured in the
same run.

Per step and per rank: the weights once (every parameter except the input embedding table, of which only
the looked-up rows are read; a tied LM head counts once), the K/V cache that attention reads (each
sequence's whole context), and the K/V written for the step's new tokens. Activations are left out, so the
floor is a lower bound on time; achieved/floor = floor_s / measured_s (1.0 = at the floor).
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from nanovllm_lab.models.arch import ModelArch


def bytes_per_step(arch: ModelArch, tp: int, dtype_bytes: int) -> tuple[float, float]:
    """(weight bytes read per step, K/V bytes per token) on one rank."""
    params = arch.num_params - (0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size)
    kv_per_token = 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * dtype_bytes
    return params * dtype_bytes / tp, kv_per_token / tp


def memory_floor(steps: pd.DataFrame, arch: ModelArch, tp: int, dtype_bytes: int,
                 copy_gbs: float | None) -> dict[str, Any]:
    """Floor metrics over the timed (non-warm-up) steps of a StepRecorder frame."""
    timed = steps[~steps["warmup"]] if len(steps) else steps
    w, kv = bytes_per_step(arch, tp, dtype_bytes)
    total = len(timed) * w + kv * float(timed["kv_tokens_read"].sum() + timed["num_tokens"].sum())
    # The steps' own time (device events on cuda) against the wall clock: the rest is host work between steps.
    step_s = float(timed["latency_ms"].sum()) / 1e3 if len(timed) and "latency_ms" in timed else 0.0
    out: dict[str, Any] = {"floor_bytes_per_rank": total, "copy_bandwidth_gbs": copy_gbs, "floor_s": None,
                           "step_time_s": step_s}
    if copy_gbs:
        out["floor_s"] = total / (copy_gbs * 1e9)
    return out

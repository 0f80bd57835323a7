"""The results store: atomic writes, table schemas, JSON cleaning, loaders over nested run directories."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from nanovllm_lab.lab import results
from nanovllm_lab.lab.metrics import percentiles, step_stats


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    results.write_json(path, {"a": 1})

    def broken(tmp: str) -> None:
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        results.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind


def test_json_is_strict():
    obj = {"nan": float("nan"), "np": np.float32(1.5), "i": np.int64(3), "t": (1, 2), "p": results.Path("/x")}
    assert results.to_jsonable(obj) == {"nan": None, "np": 1.5, "i": 3, "t": [1, 2], "p": "/x"}


def test_conform_orders_and_types():
    df = pd.DataFrame({"extra": [1], "tp": [2.0], "phase": ["decode"], "step": [0], "num_seqs": [1], "num_tokens": [1],
                       "latency_ms": [1], "cuda_graph": [0], "kv_tokens_read": [5], "warmup": [False], "host_ms": [0.5],
                       "strategy": ["b"], "workload": ["w"],
                       "model": ["m"]})
    out = results.conform(df, results.STEP_SCHEMA)
    assert list(out.columns) == list(results.STEP_SCHEMA) + ["extra"]
    assert out["tp"].dtype == "int64" and out["latency_ms"].dtype == "float64" and out["cuda_graph"].dtype == bool
    with pytest.raises(ValueError, match="lacks columns"):
        results.conform(df.drop(columns=["phase"]), results.STEP_SCHEMA)


def test_loaders_find_nested_runs_and_failures(tmp_path):
    ok, bad = tmp_path / "sweeps" / "s1" / "0_blocking_tp1", tmp_path / "sweeps" / "s1" / "1_symm_tp2"
    results.write_json(ok / "summary.json", {"run_id": ok.name, "status": "ok", "strategy": "blocking", "tp": 1})
    results.write_json(bad / "error.json", {"run_id": bad.name, "status": "error", "traceback": "long", "message": "m"})
    steps = pd.DataFrame({"step": [0, 1], "phase": ["prefill", "decode"], "num_seqs": [1, 1], "num_tokens": [4, 1],
                          "latency_ms": [2.0, 1.0], "cuda_graph": [False, False], "kv_tokens_read": [3, 4], "warmup": [False, False],
                          "host_ms": [1.0, 0.5],
                          "strategy": "blocking", "tp": 1, "workload": "small", "model": "tiny"})
    results.write_parquet(ok / "steps.parquet", steps, results.STEP_SCHEMA)
    summaries = results.load_summaries(tmp_path)
    assert sorted(summaries["run"]) == ["sweeps/s1/0_blocking_tp1", "sweeps/s1/1_symm_tp2"]
    assert "traceback" not in summaries.columns
    loaded = results.load_steps(tmp_path / "sweeps" / "s1")
    assert list(loaded["run"].unique()) == ["0_blocking_tp1"] and len(loaded) == 2
    assert results.load_layer(tmp_path).empty and results.load_requests(tmp_path).empty
    assert results.load_summaries(ok)["run"].tolist() == ["0_blocking_tp1"]  # a run dir itself


def test_statistics_skip_warmup():
    steps = pd.DataFrame({"phase": ["prefill", "decode", "decode", "decode"], "num_tokens": [10, 2, 2, 2],
                          "latency_ms": [5.0, 100.0, 1.0, 3.0], "warmup": [False, True, False, False]})
    s = step_stats(steps)
    assert s["num_steps"] == 3 and s["decode_steps"] == 2 and s["prefill_steps"] == 1
    assert s["decode_latency_ms_p50"] == pytest.approx(2.0)
    assert s["decode_tok_s"] == pytest.approx(4 / 0.004)
    empty = percentiles([float("nan")], "x")
    assert empty == {"x_p10": None, "x_p50": None, "x_p90": None}
    assert not math.isnan(percentiles([1.0, 2.0], "y")["y_p90"])

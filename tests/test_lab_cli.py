"""End to end through the command line (subprocesses), results redirected to tmp: the README command, a
CPU sweep over strategies x tp with one failing job, the results schema, the exit-code policy, the report."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pandas.api import types as ptypes

from nanovllm_lab.lab import results
from nanovllm_lab.lab.testing import TINY_WORKLOAD, cpu_results, run_cli

_KIND_CHECK = {"int": ptypes.is_integer_dtype, "float": ptypes.is_float_dtype, "bool": ptypes.is_bool_dtype,
               "str": ptypes.is_string_dtype}
ENV_KEYS = {"git_sha", "git_dirty", "torch", "cuda", "nccl", "triton", "transformers", "gpus", "host", "python"}


@pytest.fixture(scope="session")
def results_root(tmp_path_factory) -> Path:
    return cpu_results(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def sweep_dir(results_root) -> Path:
    return results_root / "sweep"


def check_table(path: Path, schema: dict[str, str]) -> pd.DataFrame:
    df = pd.read_parquet(path)
    assert list(df.columns[:len(schema)]) == list(schema), path
    for col, kind in schema.items():
        assert _KIND_CHECK[kind](df[col]), f"{path.name}:{col} is {df[col].dtype}, expected {kind}"
    return df


def test_readme_command(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["+strategy=overlap", "tp=2", f"hydra.run.dir={run_dir}", "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [summary[k] for k in ("strategy", "tp", "workload", "model")] == ["overlap", 2, "small", "tiny"]
    assert summary["valid_outputs"] is True and summary["throughput_tok_s"] > 0
    assert "run summary" in proc.stdout  # the console table
    for name in ("config.yaml", "env.json", "steps.parquet", "requests.parquet"):
        assert (run_dir / name).is_file(), name
    assert not list(tmp_path.glob("**/outputs")) and not (tmp_path / "results").exists()
    assert "still shutting down" not in proc.stderr  # a normal exit never meets the exit deadline


def test_exit_deadline_ends_a_stalled_shutdown(tmp_path):
    """A shutdown that stalls after the results are written (an atexit handler that sleeps 300 s, as
    inductor's pool shutdown did on a GPU) ends at the deadline, with the run's exit code and a message."""
    stall = tmp_path / "stall"
    stall.mkdir()  # a sitecustomize the CLI's interpreter imports at start-up
    (stall / "sitecustomize.py").write_text("import atexit, time\natexit.register(time.sleep, 300)\n")
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = run_cli([f"hydra.run.dir={run_dir}", "progress=false"], cwd=tmp_path,
                   env={"NANOVLLM_LAB_EXIT_GRACE_S": "2",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(stall), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "still shutting down 2 s after its results were written" in proc.stderr
    assert time.monotonic() - t0 < 200  # not the 300 s sleep
    assert json.loads((run_dir / "summary.json").read_text())["valid_outputs"] is True

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


def run_with_sitecustomize(tmp_path, code: str, grace_s: str):
    """One lab run whose interpreter first imports a sitecustomize holding `code`: (process, run dir, seconds)."""
    stall = tmp_path / "stall"
    stall.mkdir()
    (stall / "sitecustomize.py").write_text(code)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = run_cli([f"hydra.run.dir={run_dir}", "progress=false"], cwd=tmp_path,
                   env={"NANOVLLM_LAB_EXIT_GRACE_S": grace_s,
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(stall), os.environ.get("PYTHONPATH")]))})
    return proc, run_dir, time.monotonic() - t0


def test_exit_deadline_ends_a_stalled_shutdown(tmp_path):
    """A shutdown that stalls after the results are written (an atexit handler that sleeps 300 s, as
    inductor's pool shutdown did on a GPU) ends at the deadline, with the run's exit code and a message."""
    proc, run_dir, took = run_with_sitecustomize(tmp_path, "import atexit, time\natexit.register(time.sleep, 300)\n", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "still shutting down 2 s after its results were written" in proc.stderr
    assert took < 200  # not the 300 s sleep
    assert json.loads((run_dir / "summary.json").read_text())["valid_outputs"] is True


def test_exit_skips_what_interpreter_shutdown_would_wait_for(tmp_path):
    """Once the results are written the process ends at once, even with a thread that interpreter shutdown would
    join for 300 s (a stand-in for the native teardown that outlived the deadline on a GPU), and before the
    deadline (250 s here) would have to end it."""
    proc, run_dir, took = run_with_sitecustomize(
        tmp_path, "import threading, time\nthreading.Thread(target=time.sleep, args=(300,), daemon=False).start()\n",
        "250")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 200
    assert "still shutting down" not in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["valid_outputs"] is True


def test_sweep_one_dir_per_job_and_failure_survives(sweep_dir):
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_blocking_tp1", "1_blocking_tp2", "2_none_tp1", "3_none_tp2", "4_overlap_tp1", "5_overlap_tp2",
                    "6_symm_tp1", "7_symm_tp2"]
    failed = sweep_dir / "7_symm_tp2"
    assert not (failed / "summary.json").exists()
    err = json.loads((failed / "error.json").read_text())
    assert err["status"] == "error" and err["strategy"] == "symm" and err["tp"] == 2
    assert "CUDA" in err["message"] and "Traceback" in err["traceback"]
    for job in jobs[:-1]:
        assert (sweep_dir / job / "summary.json").is_file(), job
    summaries = results.load_summaries(sweep_dir)
    assert (summaries["status"] == "ok").sum() == 7
    none = summaries[summaries["strategy"] == "none"]
    assert not none["valid_outputs"].any() and summaries[summaries["strategy"] == "blocking"]["valid_outputs"].all()
    assert set(summaries[summaries["status"] == "ok"]["sweep"]) == {sweep_dir.name}


def test_results_schema(sweep_dir):
    run = sweep_dir / "3_none_tp2"
    steps = check_table(run / "steps.parquet", results.STEP_SCHEMA)
    assert set(steps["phase"]) == {"prefill", "decode"} and (steps["latency_ms"] > 0).all()
    # on cpu the step's clock is the host's: building and launching a step is all of it
    assert (steps["host_ms"] > 0).all() and (steps["host_ms"] <= steps["latency_ms"] * 1.0001).all()
    assert set(steps["strategy"]) == {"none"} and set(steps["tp"]) == {2} and steps["warmup"].any()
    reqs = check_table(run / "requests.parquet", results.REQUEST_SCHEMA)
    assert len(reqs) == 2 and (reqs["ttft_ms"] > 0).all() and (reqs["e2e_ms"] >= reqs["ttft_ms"]).all()
    summary = json.loads((run / "summary.json").read_text())
    types = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "list": list,
             "None": type(None)}
    for key, kind in results.SUMMARY_SCHEMA.items():
        assert isinstance(summary[key], tuple(types[k] for k in kind.split("|"))), (key, summary[key])
    for key in ("decode_latency_ms_p50", "decode_latency_ms_p10", "decode_latency_ms_p90", "ttft_ms_p50", "tpot_ms_p50",
                "output_tok_s"):
        assert isinstance(summary[key], float), key
    assert summary["valid_outputs"] is False and summary["strategy"] == "none"
    env = json.loads((run / "env.json").read_text())
    assert ENV_KEYS <= set(env)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["tp"] == 2 and config["strategy"] == {"name": "none"} and config["workload"]["num_seqs"] == 2


def test_multirun_exits_1_only_when_every_job_fails(tmp_path):
    proc = run_cli(["-m", "tp=3,5", f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path)
    assert proc.returncode == 1
    for job in ("0_blocking_tp3", "1_blocking_tp5"):
        assert json.loads((tmp_path / "s" / job / "error.json").read_text())["error_type"] == "LabConfigError"
    assert "0 ok, 2 failed" in proc.stdout


@pytest.mark.parametrize("args,code,needle", [
    (["+strategy=bogus"], 1, "Available options in 'strategy'"),
    (["tp=0"], 2, "error: tp must be an integer >= 1, got 0"),
    (["model.name=qwen9"], 2, "unknown model 'qwen9'; valid: tiny"),
])
def test_bad_overrides_on_the_command_line(tmp_path, args, code, needle):
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == code
    assert needle in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_report_cli(sweep_dir, tmp_path):
    out = tmp_path / "report.html"
    proc = run_cli([str(sweep_dir), "--out", str(out)], cwd=tmp_path, module="nanovllm_lab.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "overlap" in text and "7_symm_tp2" in text and "<img" in text
    assert (tmp_path / "report_files" / "speedup_vs_blocking.png").stat().st_size > 1000


def test_report_write_table_needs_step_sweeps(sweep_dir, tmp_path):
    """The CPU sweep runs the `small` workload only: no decode/prefill steps to tune an overlap table from."""
    table = tmp_path / "table.json"
    proc = run_cli([str(sweep_dir), "--out", str(tmp_path / "r.md"), "--write-table", str(table)], cwd=tmp_path,
                   module="nanovllm_lab.report")
    assert proc.returncode == 1 and "needs decode/prefill step sweeps" in proc.stderr, proc.stderr[-2000:]
    assert not table.exists()


def test_report_markdown_in_process(sweep_dir, tmp_path):
    from nanovllm_lab.lab.reporting import build_report, write_report
    rep = build_report(sweep_dir)
    assert len(rep.runs) == 7 and len(rep.failed) == 1
    blocking = rep.runs[rep.runs["strategy"] == "blocking"]
    assert (blocking["speedup_vs_blocking"] == 1.0).all()
    md = write_report(rep, tmp_path / "r.md").read_text()
    assert "| run |" in md and "![latency_vs_tokens](r_files/latency_vs_tokens.png)" in md
    assert "## Failed runs" in md
    with pytest.raises(ValueError, match=".md or .html"):
        write_report(rep, tmp_path / "r.pdf")


def test_tiny_overrides_cover_every_workload():
    from nanovllm_lab.lab.workloads import WORKLOADS
    assert set(TINY_WORKLOAD) == set(WORKLOADS.names())


def test_report_with_layer_rows(results_root, tmp_path):
    if not (results_root / "layer" / "layer.parquet").exists():
        pytest.skip("no layer benchmark in this checkout")
    from nanovllm_lab.lab.reporting import build_report, write_report
    rep = build_report(results_root)
    assert len(rep.runs) == 8 and not rep.layer.empty and "layer_overlap" in rep.figures
    assert {"overlap_efficiency[chunked]", "exposed_comm_ms[chunked]"} <= set(rep.layer.columns)
    assert "## Layer sweep" in write_report(rep, tmp_path / "r.md").read_text()

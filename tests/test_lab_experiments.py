"""Every experiment preset composes and runs one tiny job (tiny model, shrunk workload, tp=1, in-process),
and every study in experiments/ is a one-command script naming its preset and its question."""
from __future__ import annotations

import json
import sys

import pytest

from nanovllm_lab.lab.testing import CONF_DIR, TINY_WORKLOAD, compose, run_in_process, stand_in_layerbench

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
REPO = CONF_DIR.parent


def test_standard_studies_exist():
    assert {"strategy_matrix", "layer_sweep", "bench_compare", "overlap_tuning"} <= set(EXPERIMENTS)


def _has_layerbench() -> bool:
    try:
        import nanovllm_lab.comm.layerbench  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_preset_runs_one_tiny_job(exp, tmp_path, monkeypatch):
    base = [f"+experiment={exp}", "model=tiny", "tp=1", "progress=false"]
    workload = compose(base).workload.name
    overrides = base + TINY_WORKLOAD[workload]
    if workload == "layer":
        if not _has_layerbench():  # not in this checkout yet: run the preset's plumbing against a stand-in
            monkeypatch.setitem(sys.modules, "nanovllm_lab.comm.layerbench", stand_in_layerbench())
        if compose(overrides).workload.write_table:
            overrides.append(f"workload.write_table={tmp_path / 'overlap.json'}")
    summary = run_in_process(overrides, tmp_path / "run")
    assert summary["status"] == "ok" and summary["tag"] == exp and summary["workload"] == workload
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run_id"] == "run"
    if workload == "layer":
        assert summary["num_layer_rows"] > 0
        if "overlap_table" in summary:
            assert (tmp_path / "overlap.json").is_file()


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_study_script(exp):
    script = REPO / "experiments" / f"{exp}.sh"
    assert script.is_file() and script.stat().st_mode & 0o111, f"experiments/{exp}.sh missing or not executable"
    text = script.read_text()
    assert f"+experiment={exp}" in text and "-m" in text
    assert exp in (REPO / "experiments" / "README.md").read_text()
    assert "Question" in (CONF_DIR / "experiment" / f"{exp}.yaml").read_text()

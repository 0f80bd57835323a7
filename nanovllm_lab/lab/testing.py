"""Helpers for testing the lab: compose its config in-process, run a job in-process, run the CLI.

Used by tests/test_lab*.py and tests/test_notebooks.py; handy for poking at a config in a notebook too:

    from nanovllm_lab.lab.testing import compose
    cfg = compose(["+strategy=chunked", "tp=2"])
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nanovllm_lab.lab import schemas  # noqa: F401  (registers the schemas)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Per workload: overrides that make one run take a second or two on a CPU with the tiny model.
TINY_WORKLOAD: dict[str, list[str]] = {
    "small": ["workload.num_seqs=2", "workload.min_input_len=4", "workload.max_input_len=8",
              "workload.min_output_len=2", "workload.max_output_len=3"],
    "bench": ["workload.num_seqs=2", "workload.min_input_len=4", "workload.max_input_len=8",
              "workload.min_output_len=2", "workload.max_output_len=3"],
    "decode": ["workload.batch_sizes=[1,2]", "workload.context_len=8", "workload.steps=2", "workload.warmup_steps=1"],
    "prefill": ["workload.tokens=[8,24]", "workload.seq_len=16", "workload.repeats=1", "workload.warmup=0"],
    "generate": ["workload.prompts=[Hello]", "workload.max_tokens=3"],
    "layer": ["workload.tokens=[4]", "workload.repeats=1", "workload.strategies=[blocking,none]",
              "workload.phases=[decode]"],
    # GPU only: on a CPU machine it stops at its check with a clear error (tests/test_lab_floor.py).
    "kernels": ["workload.decode_batches=[1]", "workload.decode_contexts=[16]", "workload.prefill_tokens=[64]"],
}


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    """The lab config as `python -m nanovllm_lab.run <overrides>` would compose it (no run dir is made)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)


def run_in_process(overrides: list[str], run_dir: str | os.PathLike) -> dict[str, Any]:
    """Compose and run one job into run_dir, in this process; returns its summary (raises on failure)."""
    from nanovllm_lab.lab.runner import JobInfo, run_job
    return run_job(compose(overrides), JobInfo(run_dir=Path(run_dir), overrides=list(overrides)))


def run_cli(args: list[str], cwd: str | os.PathLike, timeout: float = 300,
            env: dict[str, str] | None = None, module: str = "nanovllm_lab.run") -> subprocess.CompletedProcess:
    """`python -m nanovllm_lab.run <args>` in a subprocess (text output captured)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("NANOVLLM_LAB_RESULTS", "HYDRA_FULL_ERROR")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def cpu_results(base: str | os.PathLike) -> Path:
    """A small results tree, made once per `base` dir (several test modules share it; the first caller
    makes it, later ones find the marker file):

        <base>/lab_results/sweep/   the CLI sweep: 4 strategies x tp=1,2 (`symm` at tp=2 fails on CPU)
        <base>/lab_results/layer/   one layer-workload run at tp=2 (when nanovllm_lab.comm.layerbench exists)
    """
    root = Path(base) / "lab_results"
    marker = root / ".complete"
    if marker.exists():
        return root
    sweep = root / "sweep"
    proc = run_cli(["-m", "+strategy=blocking,none,overlap,symm", "tp=1,2", "progress=false",
                    *TINY_WORKLOAD["small"], f"hydra.sweep.dir={sweep}"], cwd=base)
    if proc.returncode != 0:
        raise RuntimeError(f"the CPU sweep failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    try:
        import nanovllm_lab.comm.layerbench  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        run_in_process(["workload=layer", "tp=2", "workload.tokens=[4,32]", "workload.repeats=2",
                        "workload.strategies=[blocking,chunked]", "progress=false"], root / "layer")
    marker.write_text("ok\n")
    return root


def stand_in_layer_sweep(arch_name: str, tp: int, strategies: list[str], tokens: list[int], phases: list[str],
                         repeats: int, device: str) -> list[dict[str, Any]]:
    """Made-up rows in layer_sweep's format (blocking 1 ms above none, other strategies half-way): lets the
    layer workload's plumbing be tested without timing anything."""
    rows = []
    for phase in phases:
        for t in tokens:
            blocking, none = 2.0 + t / 100, 1.0 + t / 100
            for strat in strategies:
                ms = {"blocking": blocking, "none": none}.get(strat, 1.5 + t / 100)
                rows.append({"arch": arch_name, "tp": tp, "phase": phase, "tokens": t, "unit": "layer",
                             "strategy": strat, "t_ms": ms, "t_p10_ms": ms * 0.9, "t_p90_ms": ms * 1.1,
                             "t_blocking_ms": blocking, "t_none_ms": none, "t_comm_ms": 0.8,
                             "exposed_comm_ms": ms - none, "overlap_efficiency": (blocking - ms) / (blocking - none)})
    return rows


def stand_in_layerbench(calls: list | None = None) -> Any:
    """A module object to put at sys.modules['nanovllm_lab.comm.layerbench'] (records its calls in `calls`)."""
    import types
    mod = types.ModuleType("nanovllm_lab.comm.layerbench")

    def layer_sweep(*args: Any, prefill_graph: bool = True, torch_compile: bool | None = None,
                    elementwise_kernels: str | None = None) -> list[dict[str, Any]]:
        if calls is not None:
            calls.append(args)
        return stand_in_layer_sweep(*args)

    mod.layer_sweep = layer_sweep
    return mod

"""One lab job: validate the config, start the engine, run the workload, write the run directory.

`hydra_task` is what `python -m nanovllm_lab.run` calls per job. Failure policy:
- a single run: a config error prints one line and exits 2; any other error writes error.json and re-raises
  (Hydra prints the traceback, exit code 1).
- a multirun: every failure writes error.json in its job directory and the sweep goes on. At the end
  `SweepEndCallback` prints the sweep's table; the process exits 0 if at least one job succeeded and 1 if
  every job failed (`run.py` reads `LAST_SWEEP`). Failed jobs are listed in the table and in each error.json.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nanovllm_lab.lab import results
from nanovllm_lab.lab.console import print_run_summary, print_step_summary, print_sweep_summary
from nanovllm_lab.lab.env import capture_env
from nanovllm_lab.lab.loggers import LOGGERS, RunLogger
from nanovllm_lab.lab.metrics import StepRecorder, step_stats
from nanovllm_lab.lab.settings import LabConfigError, RunSettings, settings_from_config
from nanovllm_lab.lab.workloads import WORKLOADS, RunContext, Workload, WorkloadResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInfo:
    run_dir: Path
    multirun: bool = False
    group: str | None = None        # the sweep directory's name: the wandb group of its runs
    job_num: int | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepOutcome:
    ok: int = 0
    failed: int = 0
    dir: str | None = None


LAST_SWEEP = SweepOutcome()


def job_info_from_hydra() -> JobInfo:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return JobInfo(run_dir=Path(hc.runtime.output_dir), multirun=multirun,
                   group=Path(hc.sweep.dir).name if multirun else None,
                   job_num=hc.job.num if multirun else None, overrides=list(hc.overrides.task))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _execute(settings: RunSettings, workload: Workload, run_dir: Path) -> tuple[WorkloadResult, RunContext, dict]:
    """Run the workload (with an engine when it needs one); return its result and the engine's facts."""
    recorder = StepRecorder()
    llm = None
    try:
        if workload.needs_engine:
            from nanovllm_lab import LLM
            llm = LLM(settings.model, **settings.engine_kwargs)
            llm.model_runner.step_hooks.append(recorder)
            engine = {"device": llm.config.device, "dtype": llm.config.dtype, "valid_outputs": llm.valid_outputs,
                      "num_kvcache_blocks": llm.model_runner.num_kvcache_blocks,
                      "single_rank": llm.model_runner.info.single_rank}
        else:
            from nanovllm_lab.comm import STRATEGIES, resolve_strategy
            cls = STRATEGIES.get(resolve_strategy(dict(settings.strategy)).name)[1]
            engine = {"device": settings.device, "dtype": settings.engine_kwargs["dtype"],
                      "valid_outputs": cls.valid_outputs}
        ctx = RunContext(settings, llm, recorder, run_dir)
        result = workload.run(ctx)
        if llm is not None:
            llm.model_runner.strategy.check()  # e.g. lamport_norm's timed-out waits: the job fails, not its numbers
        ctx.llm = None
    finally:
        if llm is not None:
            llm.exit()  # frees the engine's device memory (ModelRunner.shutdown) for the next job of a sweep
    return result, ctx, engine


def _tables(settings: RunSettings, result: WorkloadResult, ctx: RunContext) -> tuple[pd.DataFrame, pd.DataFrame | None,
                                                                                       pd.DataFrame | None]:
    meta = {"strategy": settings.strategy_name, "tp": settings.tp, "workload": settings.workload.name,
            "model": settings.model_label}
    steps = results.conform(ctx.recorder.frame(**meta), results.STEP_SCHEMA)
    requests = None
    if result.requests is not None:
        requests = results.conform(result.requests.assign(**meta), results.REQUEST_SCHEMA)
    layer = None
    if result.layer_rows is not None:
        layer = pd.DataFrame(result.layer_rows)
        try:
            layer = results.conform(layer, results.LAYER_SCHEMA)
        except ValueError as e:  # keep the measured rows even if layerbench's columns drifted
            log.error("layer rows do not match the results schema (%s); written as they are", e)
    return steps, requests, layer


def run_job(cfg: DictConfig, job: JobInfo) -> dict[str, Any]:
    """Run one job into job.run_dir and return its summary; on failure write error.json and re-raise."""
    t0 = time.perf_counter()
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    settings: RunSettings | None = None
    logger: RunLogger | None = None
    env: dict[str, Any] = {}
    try:
        settings = settings_from_config(cfg)
        results.write_yaml(run_dir / "config.yaml", settings.config)
        workload = WORKLOADS.get(settings.workload.name)(settings.workload, settings)  # checks params
        if settings.engine_kwargs.get("single_rank") and settings.tp > 1 and not workload.needs_engine:
            raise LabConfigError(f"single_rank=true runs the engine's rank 0 alone; workload "
                                 f"{settings.workload.name!r} does not run the engine (drop single_rank)")
        env = capture_env()
        results.write_json(run_dir / "env.json", env)
        logger = LOGGERS.get(settings.logger.name)(settings.logger)
        logger.start(run_dir, settings.config, name=run_dir.name, group=job.group,
                     tags=[settings.strategy_name, f"tp{settings.tp}", settings.workload.name])
        result, ctx, engine = _execute(settings, workload, run_dir)
        steps, requests, layer = _tables(settings, result, ctx)
        results.write_parquet(run_dir / "steps.parquet", steps)
        if requests is not None:
            results.write_parquet(run_dir / "requests.parquet", requests)
        if layer is not None:
            results.write_parquet(run_dir / "layer.parquet", layer)
        summary: dict[str, Any] = {
            "run_id": run_dir.name, "status": "ok", "created_at": _now(), "workload": settings.workload.name,
            "model": settings.model_label, "strategy": settings.strategy_name,
            "strategy_params": {k: v for k, v in settings.strategy.items() if k != "name"}, "tp": settings.tp,
            **engine, "logger": settings.logger.name, "tag": settings.tag, "sweep": job.group, "job_num": job.job_num,
            "overrides": job.overrides,
            "git_sha": env.get("git_sha"), "git_dirty": env.get("git_dirty"),
            "measured_s": ctx.measured_s, "throughput_tok_s": result.throughput_tok_s,
            **step_stats(steps), **result.metrics,
        }
        if ctx.trace_file is not None:
            from nanovllm_lab.lab.trace import analyze_trace_file
            trace = analyze_trace_file(ctx.trace_file, ctx.traced_steps)
            results.write_json(run_dir / "trace_summary.json", trace)
            summary.update({k if k.startswith("trace_") else f"trace_{k}": v for k, v in trace.items()
                            if isinstance(v, (int, float)) and k not in ("rank", "num_steps")})
        summary["elapsed_s"] = time.perf_counter() - t0
        summary["run_dir"] = str(run_dir)
        results.write_json(run_dir / "summary.json", summary)
        logger.log_result(summary, steps, layer)
        print_run_summary(summary)
        return summary
    except BaseException as e:
        err = _error_record(e, cfg, settings, job, env)
        results.write_json(run_dir / "error.json", err)
        if logger is not None:
            logger.log_error(err)
        raise
    finally:
        if logger is not None:
            logger.finish()


def _error_record(e: BaseException, cfg: DictConfig, settings: RunSettings | None, job: JobInfo,
                  env: dict[str, Any]) -> dict[str, Any]:
    if settings is not None:
        meta = {"workload": settings.workload.name, "model": settings.model_label,
                "strategy": settings.strategy_name, "tp": settings.tp}
    else:  # the config itself was bad: take what can be read
        sel = lambda key, default=None: OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)  # noqa: E731
        meta = {"workload": sel("workload.name"), "model": sel("model.path") or sel("model.name"),
                "strategy": sel("strategy.name", "blocking"), "tp": sel("tp")}
    return {"run_id": job.run_dir.name, "status": "error", "created_at": _now(), **meta, "sweep": job.group,
            "job_num": job.job_num, "overrides": job.overrides, "git_sha": env.get("git_sha"),
            "error_type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}


def hydra_task(cfg: DictConfig) -> dict[str, Any] | None:
    """The body of the Hydra app (see the module docstring for the failure policy)."""
    job = job_info_from_hydra()
    try:
        return run_job(cfg, job)
    except LabConfigError as e:
        if job.multirun:
            log.error("job %s: invalid config: %s", job.run_dir.name, e)
            return None
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        if not job.multirun:
            raise
        log.error("job %s failed: %s: %s (traceback in %s)", job.run_dir.name, type(e).__name__, e,
                  job.run_dir / "error.json")
        return None


class SweepEndCallback(Callback):
    """At the end of a multirun: the sweep's table, and the tally `run.py` turns into the exit code."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summaries = results.load_summaries(sweep_dir) if sweep_dir.exists() else pd.DataFrame()
        status = summaries["status"] if "status" in summaries else pd.Series(dtype=str)
        LAST_SWEEP.ok, LAST_SWEEP.failed = int((status == "ok").sum()), int((status != "ok").sum())
        LAST_SWEEP.dir = str(sweep_dir)
        print_sweep_summary(summaries, "sweep summary")
        if sweep_dir.exists():  # decode/prefill sweeps: step latency and overlap efficiency per size
            from nanovllm_lab.lab.compare import step_table
            print_step_summary(step_table(results.load_steps(sweep_dir), summaries),
                               "step latency ms p50 (overlap efficiency) per size")
        print(f"sweep {sweep_dir}: {LAST_SWEEP.ok} ok, {LAST_SWEEP.failed} failed")
        table = OmegaConf.select(config, "overlap_table")
        if table and sweep_dir.exists():  # the overlap_tuning study: the table in the same command
            from nanovllm_lab.lab.tuning import TuningError, write_table_from_sweep
            try:
                card = write_table_from_sweep(sweep_dir, table)
                print(f"overlap table: {table} (card {card or '*'}); use it with "
                      f"+strategy=overlap strategy.table={table}")
            except TuningError as e:  # the sweep's own results stay; the table is what could not be made
                log.error("no overlap table written: %s", e)

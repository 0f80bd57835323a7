"""Run loggers: where a run's results go besides its run directory (which is always written).

`files`: the run directory only. `wandb`: also a wandb run with the resolved config, the summary metrics,
the step-latency table and plots. Offline by default (the lab machines have no network): the run lands in
<run dir>/wandb/offline-run-*, to `wandb sync` later. Runs of one sweep share a wandb group (the sweep
directory's name), so the sweep compares side by side in the wandb UI.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from nanovllm_lab.lab.schemas import LoggerSchema, WandbLoggerSchema
from nanovllm_lab.utils.registry import Registry

log = logging.getLogger(__name__)


class RunLogger:
    """The files logger: every hook is a no-op because the run directory is written by the runner."""

    def __init__(self, cfg: LoggerSchema) -> None:
        self.cfg = cfg

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None, tags: list[str]) -> None:
        pass

    def log_result(self, summary: dict[str, Any], steps: pd.DataFrame, layer: pd.DataFrame | None) -> None:
        pass

    def log_error(self, error: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


LOGGERS: Registry[type[RunLogger]] = Registry("logger")
LOGGERS.register("files")(RunLogger)


def wandb_settings(timeout_s: float) -> Any:
    """Settings that keep wandb quiet and cheap: no system-stats sampler, no console capture, no code upload."""
    import wandb
    return wandb.Settings(x_disable_stats=True, x_disable_machine_info=True, console="off", save_code=False,
                          init_timeout=timeout_s, silent=True)


def figure_image(fig: Any) -> Any:
    """A Figure as a wandb.Image (rendered to PNG here: wandb's own conversion wants pyplot figures)."""
    import io

    import wandb
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return wandb.Image(Image.open(buf))


@LOGGERS.register("wandb")
class WandbLogger(RunLogger):
    cfg: WandbLoggerSchema

    def __init__(self, cfg: LoggerSchema) -> None:
        super().__init__(cfg)
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None, tags: list[str]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        if self.cfg.mode == "offline":
            os.environ.setdefault("WANDB_MODE", "offline")
        import wandb
        self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, name=name, group=group,
                              tags=[*tags, *self.cfg.tags], config=config, dir=str(self.cfg.dir or run_dir),
                              mode=self.cfg.mode, reinit="finish_previous",
                              settings=wandb_settings(self.cfg.init_timeout_s))

    def log_result(self, summary: dict[str, Any], steps: pd.DataFrame, layer: pd.DataFrame | None) -> None:
        import wandb
        from nanovllm_lab.lab import plots
        if self.run is None:
            return
        self.run.summary.update({k: v for k, v in summary.items()
                                 if isinstance(v, (int, float, str, bool)) or v is None})
        payload: dict[str, Any] = {}
        if not steps.empty:
            payload["steps"] = wandb.Table(dataframe=steps)
            for key, fig in (("step_timeline", plots.step_timeline(steps)),
                             ("latency_vs_tokens", plots.step_latency_vs_tokens(steps))):
                if fig is not None:
                    payload[key] = figure_image(fig)
        if layer is not None and not layer.empty:
            payload["layer"] = wandb.Table(dataframe=layer)
            fig = plots.layer_overlap(layer)
            if fig is not None:
                payload["layer_overlap"] = figure_image(fig)
        if payload:
            self.run.log(payload)

    def log_error(self, error: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({"status": "error", "error": error.get("message", "")})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if self.run.summary.get("status") == "error" else 0)
            self.run = None

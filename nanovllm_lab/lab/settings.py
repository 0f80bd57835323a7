"""A composed Hydra config -> validated `RunSettings`: plain values the engine and the workloads take.

This is the only place a DictConfig is read. Unknown keys (which Hydra's `+key=value` lets through a
structured config) and unknown names are errors that list the valid choices; the engine's own `Config`
validation runs here too, so a bad override fails before any engine starts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanovllm_lab.lab.schemas import LOGGER_SCHEMAS, LabConfig, LoggerSchema, WorkloadSchema

# LabConfig fields that are nanovllm_lab.Config fields under the same name.
_ENGINE_FIELDS = ("device", "dtype", "enforce_eager", "prefill_graphs", "torch_compile", "elementwise_kernels", "async_scheduling",
                  "single_rank", "max_model_len",
                  "kvcache_block_size", "num_kvcache_blocks", "max_num_seqs", "max_num_batched_tokens",
                  "gpu_memory_utilization", "attention_backend", "seed")


class LabConfigError(ValueError):
    """A config that cannot run: reported as one clear line, never as a traceback."""


@dataclass(frozen=True)
class RunSettings:
    model: str                      # what LLM() takes: a built-in name or a checkpoint directory
    model_label: str                # the name results are filed under
    tp: int
    strategy: dict[str, Any]        # {"name": ..., **params}: what Config.strategy takes
    workload: WorkloadSchema
    logger: LoggerSchema
    engine_kwargs: dict[str, Any]   # nanovllm_lab.Config kwargs besides model (strategy and tp included)
    device: str                     # "auto" resolved: cpu or cuda
    trace: bool
    progress: bool
    tag: str
    config: dict[str, Any]          # the resolved config, for the records

    @property
    def strategy_name(self) -> str:
        return self.strategy["name"]


def _check_keys(node: Any, path: str = "") -> None:
    """Reject keys that a schema does not declare (`+tpp=2` passes Hydra's struct check)."""
    if isinstance(node, DictConfig):
        cls = OmegaConf.get_type(node)
        if cls is not None and dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls)}
            for key in node.keys():
                if key not in known:
                    where = f" in '{path}'" if path else ""
                    raise LabConfigError(f"unknown config key '{key}'{where}; valid: {', '.join(sorted(known))}")
        for key in node.keys():
            if not OmegaConf.is_missing(node, key):
                _check_keys(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            _check_keys(node._get_node(i), f"{path}[{i}]")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _model(obj: LabConfig) -> tuple[str, str]:
    from nanovllm_lab.models.arch import BUILTIN_ARCHS
    m = obj.model
    if m.path:
        path = os.path.expanduser(m.path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise LabConfigError(f"model.path={m.path!r} is not a checkpoint directory (no config.json)")
        return path, os.path.basename(os.path.normpath(path))
    if m.name not in BUILTIN_ARCHS:
        raise LabConfigError(f"unknown model {m.name!r}; valid: {', '.join(BUILTIN_ARCHS)} "
                             f"(or model.path=/a/checkpoint/dir)")
    return m.name, m.name


def _strategy(obj: LabConfig) -> dict[str, Any]:
    if obj.strategy is None:
        return {"name": "blocking"}
    spec = dataclasses.asdict(obj.strategy) if dataclasses.is_dataclass(obj.strategy) else dict(obj.strategy)
    from nanovllm_lab.comm import resolve_strategy
    try:  # the engine's registry and its config's checks have the last word
        resolve_strategy(dict(spec))
    except (ValueError, TypeError) as e:
        raise LabConfigError(str(e)) from None
    return spec


def settings_from_config(cfg: DictConfig) -> RunSettings:
    """Validate a composed config and turn it into plain run settings (raises LabConfigError)."""
    from nanovllm_lab.config import Config
    from nanovllm_lab.lab.loggers import LOGGERS
    from nanovllm_lab.lab.workloads import WORKLOADS

    _check_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise LabConfigError(f"invalid config: {e}") from None
    if not isinstance(obj, LabConfig):
        raise LabConfigError("the config does not follow the lab schema (compose it from conf/config.yaml)")
    if isinstance(obj.tp, bool) or not isinstance(obj.tp, int) or obj.tp < 1:
        raise LabConfigError(f"tp must be an integer >= 1, got {obj.tp!r}")
    model, label = _model(obj)
    strategy = _strategy(obj)
    if not isinstance(obj.workload, WorkloadSchema) or obj.workload.name not in WORKLOADS:
        raise LabConfigError(f"unknown workload {getattr(obj.workload, 'name', obj.workload)!r}; "
                             f"valid: {', '.join(WORKLOADS.names())}")
    if not isinstance(obj.logger, LoggerSchema) or obj.logger.name not in LOGGERS:
        raise LabConfigError(f"unknown logger {getattr(obj.logger, 'name', obj.logger)!r}; "
                             f"valid: {', '.join(LOGGER_SCHEMAS)}")
    kwargs = {name: getattr(obj, name) for name in _ENGINE_FIELDS}
    kwargs.update(tensor_parallel_size=obj.tp, load_format=obj.model.load_format, strategy=strategy)
    try:  # the engine's own checks, machine-dependent ones included (tp vs heads and devices); no model built
        Config.from_kwargs(model, **kwargs).resolve()
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise LabConfigError(str(e)) from None
    resolved["strategy"] = dict(strategy)  # the record names what ran, also when no strategy was given
    return RunSettings(model=model, model_label=label, tp=obj.tp, strategy=strategy, workload=obj.workload,
                       logger=obj.logger, engine_kwargs=kwargs, device=resolve_device(obj.device), trace=obj.trace,
                       progress=obj.progress, tag=obj.tag, config=resolved)

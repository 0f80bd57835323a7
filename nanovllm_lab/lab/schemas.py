"""Typed schemas of the lab's Hydra config, registered in the ConfigStore.

YAML under `conf/` holds the values; these dataclasses check their types. Strategy schemas are derived from
the engine's own StrategyConfig dataclasses (one source of truth for a strategy's parameters). Each group
option extends its schema through its defaults list (`- /schema/<group>/<kind>@_here_`), so
`strategy.chunks=x` is a type error and `strategy.chunkz=8` an unknown key. Schemas live in `schema/...`
groups so that they never show up as selectable options (`+strategy=` lists only the YAML files).

Range checks and cross-field checks (model names, tp, registry names) happen in `settings.py`, once the
config is composed; a schema only fixes the shape.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# -- model ------------------------------------------------------------------------------------------
@dataclass
class ModelSchema:
    name: str = "tiny"              # a built-in architecture (nanovllm_lab.models.arch.BUILTIN_ARCHS)
    path: Optional[str] = None      # a local Hugging Face checkpoint directory; overrides `name`
    load_format: str = "auto"       # auto: dummy weights for built-ins, safetensors for a path


# -- strategies ------------------------------------------------------------------------------------
@dataclass
class StrategySchema:
    name: str = "blocking"


def _schema_type(tp: Any) -> Any:
    """An engine field's type as OmegaConf can check it (tuples become lists; the engine re-tuples them)."""
    if tp in (int, float, str, bool):
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is tuple or tp is list or origin in (tuple, list):
        return list[Any]
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (int, float, str, bool):
            return Optional[rest[0]]
    return Any


def strategy_schema(config_cls: type) -> type:
    """A mutable, OmegaConf-checkable copy of an engine StrategyConfig dataclass (same fields and defaults).

    The engine's frozen config stays the one source of truth for a strategy's parameters: a new engine
    parameter is overridable here (`strategy.<param>=...`) without touching the lab.
    """
    hints = typing.get_type_hints(config_cls)
    fields = []
    for f in dataclasses.fields(config_cls):
        if f.name == "name":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        if isinstance(default, (tuple, list)):
            fields.append((f.name, _schema_type(hints[f.name]), field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((f.name, _schema_type(hints[f.name]), field(default=default)))
    return dataclasses.make_dataclass(f"{config_cls.__name__}Schema", fields, bases=(StrategySchema,))


def strategy_schemas() -> dict[str, Any]:
    """Schema per registered engine strategy (conf/strategy/ has one YAML file per registered name)."""
    from nanovllm_lab.comm import STRATEGIES, resolve_strategy
    resolve_strategy("blocking")  # imports the built-in strategy modules, which register themselves
    return {name: strategy_schema(STRATEGIES.get(name)[0]) for name in STRATEGIES.names()}


# -- workloads --------------------------------------------------------------------------------------
@dataclass
class WorkloadSchema:
    name: str = MISSING


@dataclass
class RequestsWorkloadSchema(WorkloadSchema):
    """Random-token requests (nano-vLLM's bench); `small` is the same with CPU-sized numbers."""

    num_seqs: int = 256
    min_input_len: int = 100
    max_input_len: int = 1024
    min_output_len: int = 100
    max_output_len: int = 1024
    max_token_id: int = 10000       # prompt ids drawn from [0, max_token_id], clipped to the vocabulary
    temperature: float = 0.6
    ignore_eos: bool = True
    seed: int = 0
    warmup: bool = True             # one short untimed generate first


@dataclass
class DecodeWorkloadSchema(WorkloadSchema):
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 512])
    context_len: int = 512
    steps: int = 32                 # timed decode steps per batch size
    warmup_steps: int = 4
    seed: int = 0


@dataclass
class PrefillWorkloadSchema(WorkloadSchema):
    tokens: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192])
    seq_len: int = 2048             # a step of T tokens holds ceil(T / seq_len) sequences
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


@dataclass
class GenerateWorkloadSchema(WorkloadSchema):
    prompts: list[str] = field(default_factory=lambda: ["Hello, my name is"])
    max_tokens: int = 32
    temperature: float = 0.6
    ignore_eos: bool = False


@dataclass
class LayerWorkloadSchema(WorkloadSchema):
    """One decoder layer timed per strategy, phase and token count (nanovllm_lab.comm.layerbench)."""

    arch: Optional[str] = None      # default: model.name
    strategies: list[str] = field(default_factory=lambda: ["blocking", "async", "chunked", "symm", "rsag",
                                                           "async_rsag", "symm_norm", "lamport_norm"])
    tokens: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 512, 2048, 8192])
    phases: list[str] = field(default_factory=lambda: ["decode", "prefill"])
    repeats: int = 20
    prefill_graph: bool = True      # time prefill from CUDA graphs (decode always is); false: eager launches in
    write_table: Optional[str] = None  # write the overlap strategy's table from the rows to this path


@dataclass
class KernelsWorkloadSchema(WorkloadSchema):
    """Attention-kernel microbenchmarks against the card's measured ceilings (nanovllm_lab.kernels.bench)."""

    decode_batches: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    decode_contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    prefill_tokens: list[int] = field(default_factory=lambda: [4096, 16384])
    block_size: int = 256
    # SiLU-and-mul and q/k norm + RoPE: Triton kernels against the compiled PyTorch versions, per token count
    # (x width per rank for SiLU-and-mul: 6144 is qwen3-8b at tp=2, 12800 qwen3-32b at tp=2)
    activation_tokens: list[int] = field(default_factory=lambda: [128, 2048, 16384])
    activation_cols: list[int] = field(default_factory=lambda: [6144, 12800])


# -- loggers ----------------------------------------------------------------------------------------
@dataclass
class LoggerSchema:
    name: str = "files"


@dataclass
class WandbLoggerSchema(LoggerSchema):
    project: str = "nanovllm_lab"
    entity: Optional[str] = None
    mode: str = "offline"           # the lab machines have no network: `wandb sync` the run dirs later
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None       # default: the run directory
    init_timeout_s: float = 60.0


# -- the root ---------------------------------------------------------------------------------------
@dataclass
class LabConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    workload: Any = MISSING
    logger: Any = MISSING
    strategy: Any = None            # not in the defaults list: `+strategy=NAME`; None runs `blocking`
    tp: int = 1
    # Engine knobs (nanovllm_lab.Config); "auto" is resolved by the engine for this machine.
    device: str = "auto"
    dtype: str = "auto"
    enforce_eager: bool = False
    prefill_graphs: int = 0         # cuda: replay repeated prefill step shapes from CUDA graphs (up to this many)
    torch_compile: Optional[bool] = None  # fuse the small elementwise layers with torch.compile; null: on for cuda
    elementwise_kernels: str = "auto"  # SiLU-and-mul, q/k norm + RoPE: triton or torch; auto: triton on cuda
    async_scheduling: bool = True  # queue decode step N+1 before step N's tokens reach the host (ignore_eos)
    single_rank: bool = False       # tp=N's rank 0 alone on one device (none, none_mb only): one rank's compute
    max_model_len: int = 4096
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"
    seed: int = 0
    # Lab knobs
    trace: bool = False             # torch.profiler around the timed part; Chrome trace + overlap analysis
    progress: bool = True
    results_dir: str = "results"
    tag: str = "sweep"              # names sweep directories; experiments set their own
    # After a multirun: write `overlap`'s table from its decode/prefill steps to this path (lab/tuning.py)
    overlap_table: Optional[str] = None


WORKLOAD_SCHEMAS: dict[str, type[WorkloadSchema]] = {
    "requests": RequestsWorkloadSchema, "decode": DecodeWorkloadSchema, "prefill": PrefillWorkloadSchema,
    "generate": GenerateWorkloadSchema, "layer": LayerWorkloadSchema,
    "kernels": KernelsWorkloadSchema,
}
LOGGER_SCHEMAS: dict[str, type[LoggerSchema]] = {"files": LoggerSchema, "wandb": WandbLoggerSchema}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: storing again replaces)."""
    cs = ConfigStore.instance()
    cs.store(name="lab_schema", node=LabConfig)
    cs.store(group="schema/model", name="model", node=ModelSchema)
    for group, table in (("strategy", strategy_schemas()), ("workload", WORKLOAD_SCHEMAS), ("logger", LOGGER_SCHEMAS)):
        for name, node in table.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


register_configs()

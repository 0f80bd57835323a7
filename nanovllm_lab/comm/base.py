"""The strategy interface, its typed configs and the registry.

A strategy is one file: a frozen `StrategyConfig` subclass with its parameters and a `CommStrategy`
subclass, registered together with `@register_strategy("name", ConfigClass)`.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanovllm_lab.distributed.parallel import ParallelInfo
from nanovllm_lab.utils.registry import Registry



@dataclass(frozen=True)
class StrategyConfig:
    """Parameters common to every strategy; subclasses add their own."""

    name: str = "blocking"


def check_int(cfg: StrategyConfig, key: str, lo: int | None = None, hi: int | None = None) -> None:
    """Raise a ValueError naming the strategy and parameter unless `cfg.<key>` is an integer (a bool is not)
    with lo <= value (< hi)."""
    v = getattr(cfg, key)
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v >= hi):
        bound = "" if lo is None else f" >= {lo}" if hi is None else f" in [{lo}, {hi - 1}]"
        raise ValueError(f"strategy {cfg.name!r}: {key} must be an integer{bound}, got {v!r}")


def check_bool(cfg: StrategyConfig, key: str) -> None:
    """Raise a ValueError naming the strategy and parameter unless `cfg.<key>` is true or false."""
    v = getattr(cfg, key)
    if not isinstance(v, bool):
        raise ValueError(f"strategy {cfg.name!r}: {key} must be true or false, got {v!r}")


STRATEGIES: Registry[tuple[type[StrategyConfig], type["CommStrategy"]]] = Registry("strategy")


def register_strategy(name: str, config_cls: type[StrategyConfig]) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        STRATEGIES.register(name)((config_cls, cls))
        return cls
    return deco


def _load_builtins() -> None:
    """Import every module of this package: a strategy module registers itself, so adding a strategy is one
    new file here (plus its YAML in conf/strategy/)."""
    import nanovllm_lab.comm as package
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name != "base" and not mod.ispkg:
            importlib.import_module(f"nanovllm_lab.comm.{mod.name}")


def resolve_strategy(spec: Any) -> StrategyConfig:
    """A name, a config dataclass or a mapping with a `name` key -> the strategy's typed config."""
    _load_builtins()
    if isinstance(spec, str):
        return STRATEGIES.get(spec)[0](name=spec)
    if isinstance(spec, StrategyConfig):
        cfg_cls = STRATEGIES.get(spec.name)[0]
        if not isinstance(spec, cfg_cls):
            raise TypeError(f"strategy {spec.name!r} takes a {cfg_cls.__name__}, got {type(spec).__name__}")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name is None:
            raise ValueError("a strategy mapping needs a 'name' key")
        cfg_cls = STRATEGIES.get(name)[0]
        known = {f.name for f in dataclasses.fields(cfg_cls)}
        for key in spec:
            if key not in known:
                raise TypeError(f"strategy {name!r} has no parameter {key!r}; valid: {', '.join(sorted(known - {'name'}))}")
        return cfg_cls(name=name, **spec)
    raise TypeError(f"strategy must be a name, a StrategyConfig or a mapping, got {type(spec).__name__}")


class CommStrategy:
    """Blocking behaviour by default: one all-reduce on the compute stream after each row-parallel GEMM."""

    name = "base"
    valid_outputs = True  # False for strategies that skip reductions (timing bounds only)
    communicates = True   # False: no collective at all, so it can run with no peers (Config.single_rank)

    def __init__(self, cfg: StrategyConfig, info: ParallelInfo) -> None:
        self.cfg = cfg
        self.rank = info.rank
        self.world_size = info.world_size
        self.single_rank = info.single_rank  # no peers (Config.single_rank): only non-communicating strategies
        self.device = torch.device(info.device)

    # -- collectives -------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A row-parallel GEMM (x holds this rank's slice of the input features) and its reduction."""
        return self.all_reduce(F.linear(x, weight, bias))

    def column_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A column-parallel GEMM (this rank's slice of the output features). No communication, except for
        strategies that keep activations sharded by token and fuse their gather into it (async_tp)."""
        return F.linear(x, weight, bias)

    def reduce_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's embedding lookup (zero rows for tokens outside its vocabulary shard) -> the sum over the
        ranks. A micro-batching strategy may return it unreduced and reduce it per micro-batch in `run_layers`
        (async_rsag)."""
        return self.all_reduce(x)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab shards -> full logits on every rank (worker ranks sample too under overlapped decode).

        An all-gather, not `dist.gather`: NCCL runs gather as point-to-point sends, which set up their own
        communicators lazily; on 2 x H200 the first steps of each new batch size then took ~2 s
        (all-gather: 0.09 s for the same first generate). The extra bytes other ranks receive cost
        microseconds over NVLink."""
        if self.world_size == 1:
            return logits
        if self.single_rank:  # no peers: this shard stands in for theirs (wrong values, the gather's output bytes)
            return logits.repeat(1, self.world_size)
        logits = logits.contiguous()
        out = torch.empty((self.world_size * logits.shape[0], logits.shape[1]), dtype=logits.dtype,
                          device=logits.device)
        dist.all_gather_into_tensor(out, logits)
        return out.view(self.world_size, *logits.shape).permute(1, 0, 2).reshape(logits.shape[0], -1)

    # -- the decoder stack -------------------------------------------------------------------------
    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the decoder layers in order; micro-batching strategies interleave several batches here.
        Returns (hidden, residual) for the model's final norm; residual is None where the strategy's last
        reduction already added it into hidden (async_rsag_ce's), and the final norm then normalises hidden alone."""
        residual = None
        for layer in layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual

    # -- lifecycle ---------------------------------------------------------------------------------
    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        """Called once after the model is built (allocate buffers, streams)."""

    def check(self) -> None:
        """Raise if this rank's reductions went wrong in a way only the device knows (lamport_norm's timed-out
        waits). A host sync: the engine calls it once per generate() and the lab once per job, not per step."""

    def close(self) -> None:
        pass


# -- the decoder layer's parts, for strategies that run its halves themselves --------------------------------
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def has_layer_parts(*layers) -> bool:
    """Whether every layer exposes the pre-norm block's parts (Qwen3DecoderLayer does), so that a strategy may
    run its attention and MLP halves with its own reductions in between; else it runs the layers whole."""
    return all(hasattr(layer, p) for layer in layers for p in LAYER_PARTS)


# -- reductions off the compute stream (shared by the overlapping strategies) ------------------------------
_COMM_STREAMS: dict[tuple[int, int], "torch.cuda.Stream"] = {}


def comm_stream(device: torch.device, priority: int = -1) -> "torch.cuda.Stream":
    """This process's communication side stream on `device`, one per priority.

    Shared by all strategy instances (the `overlap` strategy holds several): only one strategy drives a
    forward pass at a time, and one FIFO stream keeps every rank's NCCL calls in one order.
    """
    key = (device.index if device.index is not None else torch.cuda.current_device(), priority)
    if key not in _COMM_STREAMS:
        _COMM_STREAMS[key] = torch.cuda.Stream(device=device, priority=priority)
    return _COMM_STREAMS[key]


def nccl_group_with_max_ctas(max_ctas: int) -> "dist.ProcessGroup":
    """A new NCCL group over every rank whose collectives use at most `max_ctas` CTAs (ncclConfig_t.maxCTAs)."""
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = max_ctas
    return dist.new_group(backend="nccl", pg_options=opts)


class PendingReduction:
    """An all-reduce in flight. `wait()` orders the caller after it: on CUDA the current stream waits on an
    event of the communication stream (the host does not block); elsewhere the async work handle is waited."""

    __slots__ = ("tensor", "_event", "_work", "_done")

    def __init__(self, tensor: torch.Tensor, event: Any = None, work: Any = None) -> None:
        self.tensor, self._event, self._work, self._done = tensor, event, work, event is None and work is None

    def wait(self) -> torch.Tensor:
        if not self._done:
            if self._event is not None:
                torch.cuda.current_stream(self.tensor.device).wait_event(self._event)
            else:
                self._work.wait()
            self._done = True
        return self.tensor


class SideReducer:
    """Issues in-place all-reduces that do not block the compute stream.

    CUDA: the reduction runs on the shared communication stream after it waits for the producer (an
    event of the current stream), and an event recorded after it is what consumers wait on. Call `fork()`
    at the start and `join()` at the end of every forward that issues reductions: inside CUDA-graph capture
    the side stream must branch off the capturing stream and merge back into it before capture ends.
    Other backends (gloo): `dist.all_reduce(async_op=True)`, so the same ordering code runs on CPU and a
    missing wait shows up as wrong numbers there too.
    """

    def __init__(self, device: torch.device, world_size: int, priority: int = -1, max_ctas: int = 0) -> None:
        self.world_size = world_size
        self.stream = comm_stream(device, priority) if device.type == "cuda" and world_size > 1 else None
        # NCCL kernels that overlap compute occupy SMs the GEMMs want (compute interference); a dedicated
        # communicator capped at `max_ctas` CTAs trades reduction speed for compute SMs (NanoFlow-style SM
        # partitioning). 0: the default communicator. Created collectively, in the same order on every rank.
        self.group = nccl_group_with_max_ctas(max_ctas) if self.stream is not None and max_ctas > 0 else None

    def fork(self) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def issue(self, t: torch.Tensor) -> PendingReduction:
        if self.world_size == 1:
            return PendingReduction(t)
        if self.stream is None:
            return PendingReduction(t, work=dist.all_reduce(t, async_op=True))
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            dist.all_reduce(t, group=self.group)  # a sync collective orders itself on the current stream
            ev = torch.cuda.Event()
            ev.record(self.stream)
        # t was allocated on the compute stream; every consumer (and so every later reuse of its memory
        # there) is ordered after `ev`, so no record_stream is needed.
        return PendingReduction(t, event=ev)


_CURRENT: CommStrategy | None = None


def build_strategy(cfg: StrategyConfig, info: ParallelInfo) -> CommStrategy:
    cfg = resolve_strategy(cfg)
    return STRATEGIES.get(cfg.name)[1](cfg, info)


def set_comm(strategy: CommStrategy | None) -> None:
    global _CURRENT
    _CURRENT = strategy


def get_comm() -> CommStrategy:
    global _CURRENT
    if _CURRENT is None:  # layers used outside an engine (unit tests): single process, blocking
        _CURRENT = CommStrategy(StrategyConfig(), ParallelInfo())
    return _CURRENT

"""Engine configuration: one typed, validated dataclass.

`Config` holds the user's choices (all kwargs of `LLM(...)`); `resolve()` fills in what depends on the
machine and the model (device, dtype, model architecture, capped max_model_len). The engine never sees a
Hydra DictConfig.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from nanovllm_lab.models.arch import ModelArch, load_arch
from nanovllm_lab.utils.compile import ELEMENTWISE_KERNELS

_DTYPES = {"auto", "float32", "float16", "bfloat16"}
_LOAD_FORMATS = {"auto", "safetensors", "dummy"}


@dataclass
class Config:
    model: str = "tiny"
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    prefill_graphs: int = 0  # cuda graphs of up to N repeated prefill shapes (engine/prefill_graphs.py)
    torch_compile: bool | None = None  # fuse RMSNorm/RoPE/SiLU-mul/sampler (utils/compile.py); None: on for cuda
    elementwise_kernels: str = "auto"  # SiLU-and-mul, q/k norm + RoPE: "triton" or "torch"; auto: triton on cuda
    async_scheduling: bool = True  # queue decode step N+1 before step N's tokens reach the host (engine/overlap.py)
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    cpu_kvcache_bytes: int = 256 * 2**20  # the KV budget on cpu when num_kvcache_blocks is -1
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    strategy: Any = "blocking"  # a registered name or a strategy config dataclass (nanovllm_lab.comm)
    # Run rank 0 of the tensor_parallel_size-way shard alone on one device, with no peers: one rank's compute at
    # tp=N (shard shapes) for strategies that communicate nothing (none, none_mb). See single_rank_check below.
    single_rank: bool = False
    # Filled by resolve():
    arch: ModelArch | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"Config.{name}: {msg}, got {getattr(self, name)!r}")

        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "tensor_parallel_size",
                     "kvcache_block_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "must be an integer >= 1")
        need(isinstance(self.num_kvcache_blocks, int) and (self.num_kvcache_blocks == -1 or self.num_kvcache_blocks >= 1),
             "num_kvcache_blocks", "must be -1 (automatic) or >= 1")
        need(isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1,
             "gpu_memory_utilization", "must be in (0, 1]")
        need(self.kvcache_block_size % 16 == 0 or self.kvcache_block_size in (1, 2, 4, 8),
             "kvcache_block_size", "must be a power of two below 16 or a multiple of 16")
        need(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}")
        need(self.load_format in _LOAD_FORMATS, "load_format", f"must be one of {sorted(_LOAD_FORMATS)}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             "device", "must be 'auto', 'cpu' or 'cuda'")
        need(isinstance(self.enforce_eager, bool), "enforce_eager", "must be a bool")
        need(isinstance(self.prefill_graphs, int) and not isinstance(self.prefill_graphs, bool)
             and self.prefill_graphs >= 0, "prefill_graphs", "must be an integer >= 0 (0: eager prefill)")
        need(self.torch_compile is None or isinstance(self.torch_compile, bool), "torch_compile",
             "must be a bool or None (automatic)")
        need(isinstance(self.async_scheduling, bool), "async_scheduling", "must be a bool")
        need(isinstance(self.single_rank, bool), "single_rank", "must be a bool")
        need(self.elementwise_kernels in ELEMENTWISE_KERNELS, "elementwise_kernels",
             f"must be one of {list(ELEMENTWISE_KERNELS)}")
        need(isinstance(self.model, str) and bool(self.model), "model", "must be a model directory or a built-in name")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "Config":
        names = {f.name for f in dataclasses.fields(cls) if f.name not in ("model", "arch")}
        for key in kwargs:
            if key not in names:
                raise TypeError(f"unknown engine argument {key!r}; valid: {', '.join(sorted(names))}")
        return cls(model=model, **kwargs)

    def resolve(self) -> "Config":
        """Return a copy with device, dtype, architecture and limits settled for this machine."""
        cfg = dataclasses.replace(self)
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("Config.device: 'cuda' requested but torch sees no CUDA device")
        cfg.arch = load_arch(cfg.model)
        arch = cfg.arch
        tp = cfg.tensor_parallel_size
        if arch.num_attention_heads % tp or arch.num_key_value_heads % tp:
            raise ValueError(
                f"Config.tensor_parallel_size={tp} must divide the attention heads ({arch.num_attention_heads}) "
                f"and the KV heads ({arch.num_key_value_heads}) of {cfg.model!r}")
        available = torch.cuda.device_count() if cfg.device.startswith("cuda") else (os.cpu_count() or 1)
        if tp > available and not cfg.single_rank:  # single_rank runs one rank on one device
            kind = "CUDA devices" if cfg.device.startswith("cuda") else "CPU cores"
            raise ValueError(f"Config.tensor_parallel_size={tp} exceeds the {available} {kind} available")
        if cfg.torch_compile is None:  # measured on an H200: decode step 10.7 -> 7.2 ms (results/LOG.md)
            cfg.torch_compile = cfg.device.startswith("cuda")
        if cfg.elementwise_kernels == "auto":  # measured on an H200 (utils/compile.py, results/LOG.md session 13)
            cfg.elementwise_kernels = "triton" if cfg.device.startswith("cuda") else "torch"
        if cfg.elementwise_kernels == "triton" and not cfg.device.startswith("cuda"):
            raise ValueError("Config.elementwise_kernels='triton' needs a CUDA device; use 'torch' or 'auto' on cpu")
        if cfg.load_format == "auto":
            cfg.load_format = "dummy" if arch.builtin else "safetensors"
        if cfg.load_format == "safetensors" and arch.builtin:
            raise ValueError(f"Config.load_format: built-in architecture {cfg.model!r} has no checkpoint; use 'dummy'")
        if cfg.dtype == "auto":
            cfg.dtype = arch.torch_dtype if cfg.device.startswith("cuda") else "float32"
        cfg.max_model_len = min(cfg.max_model_len, arch.max_position_embeddings)
        from nanovllm_lab.attention.base import resolve_backend
        cfg.attention_backend = resolve_backend(cfg.attention_backend, cfg.device)
        from nanovllm_lab.comm import resolve_strategy
        cfg.strategy = resolve_strategy(cfg.strategy)
        if cfg.single_rank and tp > 1:
            single_rank_check(cfg.strategy.name)
        return cfg

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def single_rank_check(strategy: str) -> None:
    """Config.single_rank has no peers to communicate with: only a strategy that issues no collective at all
    (`CommStrategy.communicates` False: none, none_mb) can run that way. Its step then times what the same
    strategy's rank 0 computes at tp=N, less the logits all-gather, which it replaces by a local copy of the same
    bytes (comm/base.py)."""
    from nanovllm_lab.comm.base import STRATEGIES
    if STRATEGIES.get(strategy)[1].communicates:
        allowed = sorted(n for n in STRATEGIES.names() if not STRATEGIES.get(n)[1].communicates)
        raise ValueError(f"Config.single_rank runs rank 0 with no peers, so strategy {strategy!r}, which "
                         f"communicates, cannot run; use one that skips communication: {', '.join(allowed)}")

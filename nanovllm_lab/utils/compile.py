"""Opt-in torch.compile for the small elementwise layers (RMSNorm, RoPE, SiLU-and-mul, sampler).

In a decode step these are dozens of tiny kernels per layer; inductor fuses each into one or two Triton
kernels, as nano-vLLM does with @torch.compile. `Config.torch_compile` defaults to on for cuda (measured on an
H200, qwen3-0.6b at batch 256: decode step 10.7 -> 7.2 ms) and off on cpu, where compile time outweighs the
gain for the tiny model; the model runner switches it per process.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)
_ENABLED = False


def set_compile(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled
    if enabled and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # Compile in this process, without inductor's pool of compile workers. On 2 x H200 (torch 2.11) a lab
        # sweep at tp=2 finished, printed its table and then did not exit for minutes: the pool's shutdown at
        # interpreter exit waits up to 300 s for its sidecar (pytorch issues 162199, 125235; the workaround
        # there is this setting). Each TP worker pays the same wait when its engine exits. The compiled regions
        # are a handful of small elementwise kernels, so compiling them serially costs seconds.
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1


def compilable(fn: F) -> F:
    """Run `fn` eagerly, or through torch.compile (built on first use) while compilation is enabled."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if not _ENABLED:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
